//! HTTP retrieval with the limits TUF needs: one shared connection pool, a cap on
//! bytes (endless data), and the slow-retrieval defence of the specification (a stall
//! timeout between received chunks, and a minimum average rate that every answer must
//! keep, which gives each file a deadline scaled to its signed or maximum length), and
//! streaming into a verified file without holding it in memory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use outpost_protocol::hashing::MultiHasher;

use crate::error::{AgentError, Result};

/// Whether a verified download must survive a power cut once it is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory before returning (device updates).
    Fsync,
    /// Atomic rename only; the OS writes the bytes back in its own time (tools and
    /// tests that re-verify on the next run anyway, such as the conformance client).
    /// Dangerous for device state: see [`crate::danger::OsBuffered`].
    OsBuffered(crate::danger::OsBuffered),
}

/// How slowly an answer may arrive (`[http]` in agent.toml).
///
/// Every request must show its headers within `stall`, may wait at most `stall` for
/// its next bytes, and must keep an average of `min_rate` bytes per second measured
/// from the moment it was sent, once `stall` has passed: at any instant `t` after the
/// request, at least `min_rate * (t - stall)` bytes must have arrived. So a file of
/// `L` bytes has the deadline `stall + L / min_rate` (L is its signed length, or the
/// maximum the client accepts when metadata gives none), and a server that trickles
/// is cut off as soon as it falls behind, not when the file would be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connecting, the answer's headers, any wait for the next bytes, and the grace
    /// before the average rate counts.
    pub stall: Duration,
    /// Minimum average rate in bytes per second (at least 1).
    pub min_rate: u64,
}

/// The default `[http] min_bytes_per_sec`: 1 KiB/s, below any working cellular link,
/// far above what a slow-retrieval attacker who wants to hold a fetch for days sends.
pub const DEFAULT_MIN_RATE: u64 = 1024;

impl HttpLimits {
    pub fn new(stall: Duration, min_rate: u64) -> Self {
        HttpLimits { stall, min_rate: min_rate.max(1) }
    }

    /// How long after its request an answer of `bytes` bytes may take in all; also
    /// the instant (counted from the request) at which an answer that has received
    /// `bytes` bytes falls behind the minimum rate if nothing more arrives.
    pub fn deadline_for(&self, bytes: u64) -> Duration {
        self.stall.saturating_add(Duration::from_secs_f64(bytes as f64 / self.min_rate as f64))
    }
}

/// Shared HTTP client. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: HttpLimits,
    /// The device's TLS client identity, which check-ins renew.
    identity: Option<std::sync::Arc<crate::devicecert::DeviceIdentity>>,
}

/// An answer being received under the [`HttpLimits`]: [`Body::chunk`] fails with
/// [`AgentError::Timeout`] after a stall and with [`AgentError::SlowRetrieval`] as soon
/// as the answer falls behind the minimum average rate.
pub struct Body {
    resp: reqwest::Response,
    url: String,
    limits: HttpLimits,
    sent_at: tokio::time::Instant,
    received: u64,
}

impl Body {
    pub fn status(&self) -> reqwest::StatusCode {
        self.resp.status()
    }

    pub fn content_length(&self) -> Option<u64> {
        self.resp.content_length()
    }

    /// The next bytes of the answer, or `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        let stall_at = tokio::time::Instant::now() + self.limits.stall;
        let behind_at = self.sent_at + self.limits.deadline_for(self.received);
        match tokio::time::timeout_at(stall_at.min(behind_at), self.resp.chunk()).await {
            Ok(Ok(chunk)) => {
                self.received += chunk.as_ref().map_or(0, |c| c.len() as u64);
                Ok(chunk)
            }
            Ok(Err(e)) => Err(AgentError::Fetch { url: self.url.clone(), reason: outpost_protocol::display_chain(&e) }),
            Err(_) if behind_at <= stall_at => Err(AgentError::SlowRetrieval {
                url: self.url.clone(),
                received: self.received,
                elapsed: self.sent_at.elapsed(),
                min_rate: self.limits.min_rate,
                grace: self.limits.stall,
            }),
            Err(_) => Err(AgentError::Timeout { url: self.url.clone(), after: self.limits.stall }),
        }
    }
}

impl Fetcher {
    /// `ca_file`: a PEM file of the only CAs the server's TLS certificate may chain to;
    /// without one, the system's trust store (see [`crate::tls`]).
    pub fn new(limits: HttpLimits, ca_file: Option<&Path>) -> Result<Self> {
        Self::with_identity(limits, ca_file, None)
    }

    /// A client that presents `identity`'s certificate (the agent config's
    /// `device_fetcher` makes it).
    pub(crate) fn with_identity(limits: HttpLimits, ca_file: Option<&Path>, identity: Option<std::sync::Arc<crate::devicecert::DeviceIdentity>>) -> Result<Self> {
        let builder = reqwest::Client::builder()
            .connect_timeout(limits.stall)
            .user_agent(concat!("outpost-agent/", env!("CARGO_PKG_VERSION")))
            .no_gzip();
        Ok(Fetcher { client: crate::tls::client(builder, ca_file, identity.clone())?, limits, identity })
    }

    /// The device's TLS client identity (None without a TPM).
    pub fn identity(&self) -> Option<&std::sync::Arc<crate::devicecert::DeviceIdentity>> {
        self.identity.as_ref()
    }

    /// The one HTTP client of the agent (its connection pool), for the API calls that
    /// are not metadata or target downloads: check-ins, enrollment, install reports.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    async fn start(&self, url: &str) -> Result<Body> {
        self.start_at(url, 0).await
    }

    /// GET from byte `offset` (a Range request when `offset > 0`). The caller checks
    /// whether the answer is 206 (resumed) or 200 (the server sent everything).
    pub async fn start_at(&self, url: &str, offset: u64) -> Result<Body> {
        let mut req = self.client.get(url);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let sent_at = tokio::time::Instant::now();
        let send = req.send();
        let resp = tokio::time::timeout(self.limits.stall, send)
            .await
            .map_err(|_| AgentError::Timeout { url: url.to_owned(), after: self.limits.stall })?
            .map_err(|e| AgentError::Fetch { url: url.to_owned(), reason: outpost_protocol::display_chain(&e) })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(AgentError::HttpStatus { url: url.to_owned(), status: status.as_u16() });
        }
        Ok(Body { resp, url: url.to_owned(), limits: self.limits, sent_at, received: 0 })
    }

    /// Fetches a whole (small) body, refusing more than `limit` bytes.
    pub async fn fetch_bytes(&self, url: &str, limit: u64) -> Result<Vec<u8>> {
        let mut resp = self.start(url).await?;
        if resp.content_length().is_some_and(|l| l > limit) {
            return Err(AgentError::TooLarge { url: url.to_owned(), limit });
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(AgentError::TooLarge { url: url.to_owned(), limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Streams `url` into `dest`, verifying exact `length` and every hash in `hashes`
    /// while receiving. Bytes go to a temporary file beside `dest` that is renamed
    /// into place only after verification; on any failure nothing is left behind.
    pub async fn download_verified(
        &self,
        url: &str,
        dest: &Path,
        length: u64,
        hashes: &BTreeMap<String, String>,
        what: &str,
        durability: Durability,
    ) -> Result<()> {
        let hasher = MultiHasher::for_expected(hashes, what).map_err(|e| AgentError::tuf(format!("download {what}"), e))?;
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = temp_path(dest);
        let result = self.stream_to(url, &tmp, length, hasher, hashes, what, durability).await;
        match result {
            Ok(()) => {
                std::fs::rename(&tmp, dest).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    AgentError::io("rename into", dest, e)
                })?;
                if durability == Durability::Fsync {
                    outpost_fsio::sync_dir(dir).map_err(|e| AgentError::io("fsync", dir, e))?;
                }
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    async fn stream_to(
        &self,
        url: &str,
        tmp: &Path,
        length: u64,
        hasher: MultiHasher,
        hashes: &BTreeMap<String, String>,
        what: &str,
        durability: Durability,
    ) -> Result<()> {
        let mut resp = self.start(url).await?;
        if resp.content_length().is_some_and(|l| l > length) {
            return Err(AgentError::TooLarge { url: url.to_owned(), limit: length });
        }
        let file = TargetFile::create(tmp)?;
        // A fixed pool of buffers travels network -> hasher -> writer -> back, so
        // receiving, hashing and writing overlap, memory is bounded by the pool, and
        // nothing is allocated per chunk.
        let (free_tx, mut free_rx) = tokio::sync::mpsc::channel::<PoolBuffer>(POOL_BUFFERS);
        for _ in 0..POOL_BUFFERS {
            let _ = free_tx.try_send(PoolBuffer::new());
        }
        let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<PoolBuffer>(POOL_BUFFERS);
        let (write_tx, write_rx) = std::sync::mpsc::sync_channel::<PoolBuffer>(POOL_BUFFERS);
        let hasher_task = spawn_hasher(hasher, hash_rx, write_tx);
        let writer = spawn_writer(file, write_rx, free_tx, durability);
        let mut received: u64 = 0;
        let mut failure = None;
        let mut cur: Option<PoolBuffer> = None;
        'receive: loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    if received > length {
                        failure = Some(AgentError::TooLarge { url: url.to_owned(), limit: length });
                        break;
                    }
                    let mut rest: &[u8] = &chunk;
                    while !rest.is_empty() {
                        let mut buf = match cur.take() {
                            Some(b) => b,
                            None => match free_rx.recv().await {
                                Some(b) => b,
                                None => break 'receive, // a worker failed; reported below
                            },
                        };
                        rest = &rest[buf.fill_from(rest)..];
                        if buf.is_full() {
                            if hash_tx.send(buf).is_err() {
                                break 'receive;
                            }
                        } else {
                            cur = Some(buf);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(buf) = cur.take() {
            if failure.is_none() && !buf.filled().is_empty() {
                let _ = hash_tx.send(buf);
            }
        }
        drop(hash_tx);
        let stages = Stages { hasher: hasher_task, writer };
        stages.join(url, failure, received, length, hashes, what).await
    }
}

/// The hashing and writing stages of one [`Fetcher::stream_to`].
struct Stages {
    hasher: tokio::task::JoinHandle<MultiHasher>,
    writer: tokio::task::JoinHandle<Result<()>>,
}

impl Stages {
    /// Waits for both stages (the stream has ended), then judges the whole answer: the
    /// receiving side's `failure` first, then its length, then its signed hashes.
    async fn join(self, url: &str, failure: Option<AgentError>, received: u64, length: u64, hashes: &BTreeMap<String, String>, what: &str) -> Result<()> {
        let hasher = self
            .hasher
            .await
            .map_err(|e| AgentError::Fetch { url: url.to_owned(), reason: format!("hasher task: {e}") })?;
        self.writer
            .await
            .map_err(|e| AgentError::Fetch { url: url.to_owned(), reason: format!("writer task: {e}") })??;
        if let Some(e) = failure {
            return Err(e);
        }
        if received != length {
            return Err(AgentError::Truncated { url: url.to_owned(), got: received, expected: length });
        }
        hasher.verify(hashes, what).map_err(|e| AgentError::tuf(format!("verify {what}"), e))
    }
}

/// The hashing stage of [`Fetcher::stream_to`]: hashes each full buffer, then passes it
/// to the writer. Returns the hasher when the stream ends.
fn spawn_hasher(
    mut hasher: MultiHasher,
    hash_rx: std::sync::mpsc::Receiver<PoolBuffer>,
    write_tx: std::sync::mpsc::SyncSender<PoolBuffer>,
) -> tokio::task::JoinHandle<MultiHasher> {
    tokio::task::spawn_blocking(move || {
        for buf in hash_rx {
            hasher.update(buf.filled());
            if write_tx.send(buf).is_err() {
                break;
            }
        }
        hasher
    })
}

/// The writing stage of [`Fetcher::stream_to`]: writes each buffer to the file and
/// returns it to the pool (with [`Durability::Fsync`], flushing as it goes and fsyncing
/// at the end).
fn spawn_writer(
    mut out: TargetFile,
    write_rx: std::sync::mpsc::Receiver<PoolBuffer>,
    free_tx: tokio::sync::mpsc::Sender<PoolBuffer>,
    durability: Durability,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut since_flush: u64 = 0;
        for mut buf in write_rx {
            out.write(buf.filled())?;
            since_flush += buf.filled().len() as u64;
            if durability == Durability::Fsync && since_flush >= WRITEBACK_EVERY {
                // Push what the disk cache holds out while the download goes on,
                // so the final fsync waits for the tail only.
                out.sync_data()?;
                since_flush = 0;
            }
            buf.clear();
            let _ = free_tx.blocking_send(buf);
        }
        if durability == Durability::Fsync {
            out.sync_all()?;
        }
        Ok(())
    })
}

const POOL_BUFFERS: usize = 8;
const POOL_BUFFER_SIZE: usize = 1 << 20;

/// Alignment of the pool's buffers and of direct writes: the largest logical block
/// size of the disks an agent writes to (4 KiB sectors; 512-byte disks accept it too).
const DIRECT_ALIGN: usize = 4096;

/// One buffer of the pool: `POOL_BUFFER_SIZE` bytes starting at a `DIRECT_ALIGN`ed
/// address, so that full buffers can be written with `O_DIRECT`. (The allocation is
/// one alignment larger and the buffer starts at its first aligned byte; that keeps
/// the code free of `unsafe`.) Zeroed once when the pool is made, which also faults
/// its pages in before the download starts.
struct PoolBuffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl PoolBuffer {
    fn new() -> Self {
        let bytes = vec![0u8; POOL_BUFFER_SIZE + DIRECT_ALIGN];
        let start = (DIRECT_ALIGN - bytes.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        PoolBuffer { bytes, start, len: 0 }
    }

    fn filled(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    fn is_full(&self) -> bool {
        self.len == POOL_BUFFER_SIZE
    }

    /// Appends as much of `data` as fits; returns how much that was.
    fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(POOL_BUFFER_SIZE - self.len);
        let at = self.start + self.len;
        self.bytes[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// The temporary file a download streams into.
///
/// Full, aligned buffers are written with `O_DIRECT` where the file system supports
/// it: straight from the pool to the disk, without copying every byte into newly
/// allocated page-cache pages first (on a device that copy costs more CPU than the
/// receive itself, and the image would push everything else out of the cache). The
/// unaligned tail, and file systems that refuse direct I/O (tmpfs before Linux 6.6,
/// some FUSE), use ordinary buffered writes on the same descriptor.
struct TargetFile {
    file: std::fs::File,
    path: PathBuf,
    direct: bool,
}

impl TargetFile {
    fn create(path: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        let direct = options.clone().custom_flags(nix::libc::O_DIRECT).open(path);
        let (file, direct) = match direct {
            Ok(file) => (file, true),
            Err(_) => (options.open(path).map_err(|e| AgentError::io("create", path, e))?, false),
        };
        Ok(TargetFile { file, path: path.to_owned(), direct })
    }

    /// Writes all of `data` at the current offset.
    fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.direct && !(data.len().is_multiple_of(DIRECT_ALIGN) && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)) {
            self.buffered()?;
        }
        let mut rest = data;
        while !rest.is_empty() {
            match self.file.write(rest) {
                Ok(0) => return Err(AgentError::io("write", &self.path, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The file system wants a larger alignment than ours (or refuses direct
                // writes after all): nothing was written, so go on buffered.
                Err(e) if self.direct && e.raw_os_error() == Some(nix::libc::EINVAL) => self.buffered()?,
                Err(e) => return Err(AgentError::io("write", &self.path, e)),
            }
        }
        Ok(())
    }

    /// Switches the descriptor to ordinary buffered writes (for good).
    fn buffered(&mut self) -> Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| AgentError::io("fcntl", &self.path, e.into()))?;
        let flags = OFlag::from_bits_truncate(flags) - OFlag::O_DIRECT;
        fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| AgentError::io("fcntl", &self.path, e.into()))?;
        self.direct = false;
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| AgentError::io("fsync", &self.path, e))
    }

    fn sync_all(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| AgentError::io("fsync", &self.path, e))
    }
}

/// With [`Durability::Fsync`], how much to write before pushing it to disk.
const WRITEBACK_EVERY: u64 = 64 << 20;

fn temp_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // One fixed name per destination, so an interrupted download's leftovers are
    // replaced by the next attempt instead of piling up.
    dest.with_file_name(format!(".{name}.partial"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP server on 127.0.0.1 that answers one request with `length` bytes,
    /// `per_write` bytes every `every`.
    async fn trickler(length: usize, per_write: usize, every: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n");
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut sent = 0;
            while sent < length {
                let n = per_write.min(length - sent);
                if sock.write_all(&vec![b'x'; n]).await.is_err() {
                    return;
                }
                sent += n;
                tokio::time::sleep(every).await;
            }
        });
        format!("http://{addr}/file")
    }

    #[test]
    fn deadlines_scale_with_length() {
        let l = HttpLimits::new(Duration::from_secs(30), 1024);
        assert_eq!(l.deadline_for(0), Duration::from_secs(30));
        assert_eq!(l.deadline_for(16 * 1024), Duration::from_secs(46));
        assert_eq!(HttpLimits::new(Duration::from_secs(1), 0).min_rate, 1, "a rate of 0 would disable the defence");
    }

    /// One byte every 200 ms never trips a 1 s stall timeout, but is far below 1 KiB/s:
    /// the fetch ends as a slow retrieval soon after the grace, not when the file is done.
    #[tokio::test]
    async fn a_trickle_below_the_minimum_rate_is_cut_off() {
        let url = trickler(4096, 1, Duration::from_millis(200)).await;
        let fetcher = Fetcher::new(HttpLimits::new(Duration::from_secs(1), 1024), None).expect("fetcher");
        let started = std::time::Instant::now();
        let err = fetcher.fetch_bytes(&url, 4096).await.expect_err("a trickle must fail");
        assert!(matches!(err, AgentError::SlowRetrieval { .. }), "{err}");
        assert!(err.to_string().contains("slow retrieval") && err.to_string().contains("1024 bytes/s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    /// A steady answer above the floor arrives whole, even though it takes longer than
    /// the stall timeout in all.
    #[tokio::test]
    async fn a_steady_answer_above_the_floor_completes() {
        let url = trickler(3000, 300, Duration::from_millis(100)).await;
        let fetcher = Fetcher::new(HttpLimits::new(Duration::from_millis(500), 1024), None).expect("fetcher");
        let body = fetcher.fetch_bytes(&url, 3000).await.expect("steady answer");
        assert_eq!(body.len(), 3000);
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn pool_buffers_are_aligned_and_fill_to_their_size() {
        let mut buf = PoolBuffer::new();
        assert_eq!(buf.filled().as_ptr() as usize % DIRECT_ALIGN, 0);
        let data = pattern(POOL_BUFFER_SIZE + 100, 1);
        assert_eq!(buf.fill_from(&data[..10]), 10);
        assert!(!buf.is_full());
        assert_eq!(buf.fill_from(&data[10..]), POOL_BUFFER_SIZE - 10);
        assert!(buf.is_full());
        assert_eq!(buf.filled(), &data[..POOL_BUFFER_SIZE]);
        buf.clear();
        assert!(buf.filled().is_empty());
    }

    /// Full buffers (direct where the file system allows), then an unaligned tail
    /// (buffered): the file holds exactly the bytes written, in order.
    #[test]
    fn target_file_holds_direct_buffers_and_a_buffered_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.partial");
        let mut file = TargetFile::create(&path).expect("create");
        let opened_direct = file.direct;
        let mut expected = Vec::new();
        for seed in 0..3u8 {
            let mut buf = PoolBuffer::new();
            buf.fill_from(&pattern(POOL_BUFFER_SIZE, seed));
            file.write(buf.filled()).expect("write full buffer");
            expected.extend_from_slice(buf.filled());
            assert_eq!(file.direct, opened_direct, "full aligned buffers keep the mode the file was opened in");
        }
        let tail = pattern(1000, 9);
        file.write(&tail).expect("write tail");
        expected.extend_from_slice(&tail);
        assert!(!file.direct, "an unaligned tail is written buffered");
        file.sync_all().expect("fsync");
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read back"), expected);
    }

    /// Data at an unaligned address cannot go direct: the writer switches to buffered
    /// before the first byte, and later aligned buffers stay buffered.
    #[test]
    fn unaligned_data_is_written_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.partial");
        let mut file = TargetFile::create(&path).expect("create");
        let mut buf = PoolBuffer::new();
        buf.fill_from(&pattern(2 * DIRECT_ALIGN + 1, 3));
        let unaligned = &buf.filled()[1..];
        file.write(unaligned).expect("write");
        assert!(!file.direct);
        let mut next = PoolBuffer::new();
        next.fill_from(&pattern(POOL_BUFFER_SIZE, 4));
        file.write(next.filled()).expect("write");
        drop(file);
        let mut expected = unaligned.to_vec();
        expected.extend_from_slice(next.filled());
        assert_eq!(std::fs::read(&path).expect("read back"), expected);
    }
}
