//! HTTP retrieval with the limits TUF needs: one shared connection pool, a cap on
//! bytes (endless data), a stall timeout between received chunks (slow retrieval),
//! and streaming into a verified file without holding it in memory.

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
    OsBuffered,
}

/// Shared HTTP client. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    stall: Duration,
}

impl Fetcher {
    /// `stall` bounds connecting and any wait for the next bytes.
    pub fn new(stall: Duration) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(stall)
            .user_agent(concat!("outpost-agent/", env!("CARGO_PKG_VERSION")))
            .no_gzip()
            .build()
            .map_err(|e| AgentError::Fetch { url: String::new(), reason: format!("building HTTP client: {e}") })?;
        Ok(Fetcher { client, stall })
    }

    async fn start(&self, url: &str) -> Result<reqwest::Response> {
        self.start_at(url, 0).await
    }

    /// GET from byte `offset` (a Range request when `offset > 0`). The caller checks
    /// whether the answer is 206 (resumed) or 200 (the server sent everything).
    pub async fn start_at(&self, url: &str, offset: u64) -> Result<reqwest::Response> {
        let mut req = self.client.get(url);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let send = req.send();
        let resp = tokio::time::timeout(self.stall, send)
            .await
            .map_err(|_| AgentError::Timeout { url: url.to_owned(), after: self.stall })?
            .map_err(|e| AgentError::Fetch { url: url.to_owned(), reason: outpost_protocol::display_chain(&e) })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(AgentError::HttpStatus { url: url.to_owned(), status: status.as_u16() });
        }
        Ok(resp)
    }

    pub async fn next_chunk(&self, resp: &mut reqwest::Response, url: &str) -> Result<Option<Bytes>> {
        tokio::time::timeout(self.stall, resp.chunk())
            .await
            .map_err(|_| AgentError::Timeout { url: url.to_owned(), after: self.stall })?
            .map_err(|e| AgentError::Fetch { url: url.to_owned(), reason: outpost_protocol::display_chain(&e) })
    }

    /// Fetches a whole (small) body, refusing more than `limit` bytes.
    pub async fn fetch_bytes(&self, url: &str, limit: u64) -> Result<Vec<u8>> {
        let mut resp = self.start(url).await?;
        if resp.content_length().is_some_and(|l| l > limit) {
            return Err(AgentError::TooLarge { url: url.to_owned(), limit });
        }
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk(&mut resp, url).await? {
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
        mut hasher: MultiHasher,
        hashes: &BTreeMap<String, String>,
        what: &str,
        durability: Durability,
    ) -> Result<()> {
        let mut resp = self.start(url).await?;
        if resp.content_length().is_some_and(|l| l > length) {
            return Err(AgentError::TooLarge { url: url.to_owned(), limit: length });
        }
        let file = std::fs::File::create(tmp).map_err(|e| AgentError::io("create", tmp, e))?;
        // A fixed pool of buffers travels network -> hasher -> writer -> back, so
        // receiving, hashing and writing overlap, memory is bounded by the pool, and
        // nothing is allocated per chunk.
        let (free_tx, mut free_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(POOL_BUFFERS);
        for _ in 0..POOL_BUFFERS {
            let _ = free_tx.try_send(Vec::with_capacity(POOL_BUFFER_SIZE));
        }
        let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(POOL_BUFFERS);
        let (write_tx, write_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(POOL_BUFFERS);
        let hasher_task = tokio::task::spawn_blocking(move || {
            for buf in hash_rx {
                hasher.update(&buf);
                if write_tx.send(buf).is_err() {
                    break;
                }
            }
            hasher
        });
        let tmp_owned: PathBuf = tmp.to_owned();
        let writer = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut out = file;
            let mut since_flush: u64 = 0;
            for mut buf in write_rx {
                out.write_all(&buf).map_err(|e| AgentError::io("write", &tmp_owned, e))?;
                since_flush += buf.len() as u64;
                if durability == Durability::Fsync && since_flush >= WRITEBACK_EVERY {
                    // Push dirty pages out while the download goes on, so the final
                    // fsync waits for the tail only.
                    out.sync_data().map_err(|e| AgentError::io("fsync", &tmp_owned, e))?;
                    since_flush = 0;
                }
                buf.clear();
                let _ = free_tx.blocking_send(buf);
            }
            if durability == Durability::Fsync {
                out.sync_all().map_err(|e| AgentError::io("fsync", &tmp_owned, e))?;
            }
            Ok(())
        });
        let mut received: u64 = 0;
        let mut failure = None;
        let mut cur: Option<Vec<u8>> = None;
        'receive: loop {
            match self.next_chunk(&mut resp, url).await {
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
                        let n = rest.len().min(POOL_BUFFER_SIZE - buf.len());
                        buf.extend_from_slice(&rest[..n]);
                        rest = &rest[n..];
                        if buf.len() == POOL_BUFFER_SIZE {
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
            if failure.is_none() && !buf.is_empty() {
                let _ = hash_tx.send(buf);
            }
        }
        drop(hash_tx);
        let hasher = hasher_task
            .await
            .map_err(|e| AgentError::Fetch { url: url.to_owned(), reason: format!("hasher task: {e}") })?;
        writer
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

const POOL_BUFFERS: usize = 8;
const POOL_BUFFER_SIZE: usize = 1 << 20;

/// With [`Durability::Fsync`], how much to write before pushing it to disk.
const WRITEBACK_EVERY: u64 = 64 << 20;

fn temp_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // One fixed name per destination, so an interrupted download's leftovers are
    // replaced by the next attempt instead of piling up.
    dest.with_file_name(format!(".{name}.partial"))
}
