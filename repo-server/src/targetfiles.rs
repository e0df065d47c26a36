//! Serving target files (`GET`/`HEAD /targets/...`): firmware images of a gigabyte and
//! more, to many devices, with single-range requests for resumed downloads.
//!
//! Each response reads the file in large chunks straight into the buffers that go to
//! the socket, so every byte is copied once on its way out (page cache -> buffer) and
//! once more by the kernel (buffer -> socket). The buffers are recycled, and reading
//! runs at most `READ_AHEAD` chunks ahead of the connection, which bounds memory per
//! download.
//!
//! Targets are named by their hash (consistent snapshots), so they never change under a
//! path: they are served as immutable, with `Last-Modified` for conditional requests.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Utc};

/// Bytes per read and per body chunk.
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the socket, per response.
const READ_AHEAD: usize = 2;

/// `Cache-Control` of files that never change under their name (hash-named targets,
/// versioned metadata).
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The answer to `method` for `rel` (the URL path below `/targets/`, percent-decoded)
/// under `root`.
pub async fn serve(root: PathBuf, rel: String, method: Method, headers: HeaderMap) -> Response {
    let Some(path) = resolve(&root, &rel) else {
        return plain(StatusCode::NOT_FOUND, "no such target\n");
    };
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(std::fs::File, u64, Option<SystemTime>)>> {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        Ok(Some((file, meta.len(), meta.modified().ok())))
    })
    .await;
    let (file, len, modified) = match opened {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return plain(StatusCode::NOT_FOUND, "no such target\n"),
        Ok(Err(e)) => {
            tracing::error!(target = %rel, error = %e, "cannot open target file");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "target file unreadable\n");
        }
        Err(e) => {
            tracing::error!(target = %rel, error = %e, "target open task failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "target file unreadable\n");
        }
    };
    let modified = modified.map(DateTime::<Utc>::from);
    let last_modified = modified.map(|m| m.format("%a, %d %b %Y %H:%M:%S GMT").to_string());
    let modified_secs = modified.map(|m| m.timestamp());

    // Conditional requests (RFC 9110 section 13), at one-second resolution.
    if let (Some(since), Some(mtime)) = (header_date(&headers, &header::IF_UNMODIFIED_SINCE), modified_secs) {
        if mtime > since {
            return plain(StatusCode::PRECONDITION_FAILED, "target modified since the If-Unmodified-Since date\n");
        }
    }
    if let (Some(since), Some(mtime)) = (header_date(&headers, &header::IF_MODIFIED_SINCE), modified_secs) {
        if mtime <= since {
            let mut resp = empty(StatusCode::NOT_MODIFIED);
            set_common(resp.headers_mut(), last_modified.as_deref());
            return resp;
        }
    }

    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(value) => match parse_range(value, len) {
            RangeRequest::Ignore => None,
            RangeRequest::Satisfiable(start, end) => Some((start, end)),
            RangeRequest::Unsatisfiable => {
                let mut resp = plain(StatusCode::RANGE_NOT_SATISFIABLE, "requested range is beyond the end of the target\n");
                resp.headers_mut().insert(header::CONTENT_RANGE, value_of(&format!("bytes */{len}")));
                return resp;
            }
        },
    };
    let (status, start, count) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, len),
    };
    let body = if method == Method::HEAD || count == 0 { Body::empty() } else { stream_file(file, start, count, rel) };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    set_common(h, last_modified.as_deref());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, value_of(&format!("bytes {start}-{}/{len}", start + count - 1)));
    }
    resp
}

fn set_common(h: &mut HeaderMap, last_modified: Option<&str>) {
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    if let Some(lm) = last_modified {
        h.insert(header::LAST_MODIFIED, value_of(lm));
    }
}

fn value_of(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn empty(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// The file under `root` that `rel` names, or None when `rel` is not a plain relative
/// path of normal components (no `..`, `.`, empty segments, absolute paths or NULs).
fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    if rel.is_empty() || rel.contains('\0') || rel.contains('\\') {
        return None;
    }
    let mut path = root.to_path_buf();
    for segment in rel.split('/') {
        let mut components = Path::new(segment).components();
        match (components.next(), components.next()) {
            (Some(Component::Normal(c)), None) if c == segment => path.push(c),
            _ => return None,
        }
    }
    Some(path)
}

fn header_date(headers: &HeaderMap, name: &header::HeaderName) -> Option<i64> {
    let value = headers.get(name)?.to_str().ok()?;
    DateTime::parse_from_rfc2822(value.trim()).ok().map(|d| d.timestamp())
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Not a single byte range we serve (another unit, several ranges, malformed): the
    /// whole file is sent, as RFC 9110 allows.
    Ignore,
    /// Inclusive first and last byte.
    Satisfiable(u64, u64),
    Unsatisfiable,
}

/// A `Range` header value against a file of `len` bytes.
fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeRequest::Ignore };
    if spec.contains(',') {
        return RangeRequest::Ignore;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Ignore };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(n) if len > 0 => RangeRequest::Satisfiable(len.saturating_sub(n), len - 1),
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Ignore,
        },
        // bytes=S-: from S to the end.
        (false, true) => match number(first) {
            Some(s) if s < len => RangeRequest::Satisfiable(s, len - 1),
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Ignore,
        },
        (false, false) => match (number(first), number(last)) {
            (Some(s), Some(e)) if s > e => RangeRequest::Ignore,
            (Some(s), Some(_)) if s >= len => RangeRequest::Unsatisfiable,
            (Some(s), Some(e)) => RangeRequest::Satisfiable(s, e.min(len - 1)),
            _ => RangeRequest::Ignore,
        },
        (true, true) => RangeRequest::Ignore,
    }
}

/// `count` bytes of `file` from `start`, at most `READ_AHEAD` chunks ahead of the
/// client. A read error, or a file that ends early, ends the body with an error, so the
/// client sees a broken transfer, never a short one that looks complete.
///
/// Reading happens on the blocking pool in stretches that never wait: a stretch reads
/// and queues chunks while there is room in the queue and a free buffer, then hands
/// the reader back to a task that waits (without a thread) for the client. A fast
/// client is served by long stretches; a client that stops reading holds no thread (a
/// thousand devices downloading at once must not use up the blocking pool that the
/// rest of the server shares). The chunks are a small pool of buffers per response
/// that come back when the connection has written them (`Bytes::from_owner`), so a
/// gigabyte costs no allocations, page faults or zeroing after the first few chunks.
fn stream_file(file: std::fs::File, start: u64, count: u64, what: String) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(READ_AHEAD);
    let (home, free) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut reader = Reader { file, offset: start, left: count, made: 0, spare: None, free, home, tx };
    tokio::spawn(async move {
        loop {
            let stretch = tokio::task::spawn_blocking(move || {
                let stop = reader.stretch();
                (reader, stop)
            })
            .await;
            let (back, stop) = match stretch {
                Ok(v) => v,
                Err(e) => {
                    // The body ends short of its Content-Length: the client sees a
                    // broken transfer.
                    tracing::error!(target = %what, error = %e, "target read task failed mid-response");
                    return;
                }
            };
            reader = back;
            match stop {
                Ok(Stop::Done) | Ok(Stop::ClientGone) => return,
                Ok(Stop::NeedRoom) => {
                    if reader.tx.reserve().await.is_err() {
                        return; // the client went away
                    }
                }
                // The pool cannot close while the reader holds `home`.
                Ok(Stop::NeedBuffer) => reader.spare = reader.free.recv().await,
                Err(e) => {
                    tracing::error!(target = %what, error = %e, "reading target file failed mid-response");
                    let _ = reader.tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }))
}

/// The state of one response's reading, moved between the blocking pool and its task.
struct Reader {
    file: std::fs::File,
    offset: u64,
    left: u64,
    /// Buffers allocated so far (at most `POOL`).
    made: usize,
    /// A free buffer the task waited for.
    spare: Option<Vec<u8>>,
    free: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    home: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
}

/// Why a stretch of reading ended.
enum Stop {
    Done,
    ClientGone,
    /// The queue to the connection is full.
    NeedRoom,
    /// Every buffer is queued or being written.
    NeedBuffer,
}

impl Reader {
    /// Reads and queues chunks for as long as that needs no waiting.
    fn stretch(&mut self) -> std::io::Result<Stop> {
        use tokio::sync::mpsc::error::TrySendError;
        while self.left > 0 {
            let permit = match self.tx.try_reserve() {
                Ok(p) => p,
                Err(TrySendError::Full(())) => return Ok(Stop::NeedRoom),
                Err(TrySendError::Closed(())) => return Ok(Stop::ClientGone),
            };
            let mut buf = match self.spare.take().map(Ok).unwrap_or_else(|| self.free.try_recv()) {
                Ok(b) => b,
                Err(_) if self.made < POOL => {
                    self.made += 1;
                    vec![0u8; CHUNK]
                }
                Err(_) => return Ok(Stop::NeedBuffer),
            };
            let want = self.left.min(CHUNK as u64) as usize;
            let got = read_full_at(&self.file, &mut buf[..want], self.offset)?;
            if got == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("target file ended {} bytes early", self.left),
                ));
            }
            self.offset += got as u64;
            self.left -= got as u64;
            permit.send(Ok(Bytes::from_owner(PooledChunk { buf, len: got, home: self.home.clone() })));
        }
        Ok(Stop::Done)
    }
}

/// Buffers per response: the chunks queued, one being read, one being written.
const POOL: usize = READ_AHEAD + 2;

/// Reads at `offset` until `buf` is full or the file ends; returns how much was read.
fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A chunk of a response body; its buffer goes back to the reader when dropped.
struct PooledChunk {
    buf: Vec<u8>,
    len: usize,
    home: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-9", 100), Satisfiable(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Satisfiable(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Satisfiable(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Satisfiable(0, 99));
        assert_eq!(parse_range("bytes=50-1000", 100), Satisfiable(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=9-0", 100), Ignore);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ignore);
        assert_eq!(parse_range("items=0-1", 100), Ignore);
        assert_eq!(parse_range("bytes=a-b", 100), Ignore);
        assert_eq!(parse_range("bytes=+1-2", 100), Ignore);
        assert_eq!(parse_range("bytes=-", 100), Ignore);
    }

    #[test]
    fn paths_stay_below_the_root() {
        let root = Path::new("/srv/targets");
        assert_eq!(resolve(root, "firmware/rpi4/abc.img"), Some(root.join("firmware/rpi4/abc.img")));
        for bad in ["", "../etc/passwd", "a/../../b", "./a", "a//b", "/etc/passwd", "a/", "a\\b", "a\0b", "a/."] {
            assert_eq!(resolve(root, bad), None, "{bad:?}");
        }
    }
}
