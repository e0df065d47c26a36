//! SQLite embedded, on threads of its own. Each connection lives on one thread, which
//! runs whole transactions one after another, from BEGIN (which may wait for another
//! process's lock) to COMMIT or ROLLBACK (which wait for the disk): no async worker
//! ever blocks on SQLite, and a transaction holds its connection only while it runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;

use super::{Database, Dialect, Kind, Mode, Row, Tx, Value, Work};
use crate::error::ServerError;


/// How many read-only connections serve [`Mode::Read`] beside the one that writes.
const READERS: usize = 2;

/// A connection's thread; jobs run in the order they were sent.
struct Connection {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Jobs sent and not finished.
    queued: Arc<AtomicUsize>,
}

type Job = Box<dyn FnOnce(&Arc<Mutex<rusqlite::Connection>>) + Send>;

impl Connection {
    fn start(name: String, conn: rusqlite::Connection) -> Result<Self, ServerError> {
        let (jobs, next) = std::sync::mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let done = queued.clone();
        let conn = Arc::new(Mutex::new(conn));
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Ends when the store is dropped (its senders with it).
                for job in next {
                    // A panic in one transaction (rolled back as it unwinds) fails
                    // that transaction's caller, not the ones after it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&conn)));
                    done.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| ServerError::Db(format!("starting a SQLite thread: {e}").into()))?;
        Ok(Connection { jobs, queued })
    }

    fn send(&self, job: Job) -> Result<(), ServerError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.jobs.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            ServerError::Db("the SQLite thread has stopped".into())
        })
    }
}

/// SQLite embedded (WAL, fully synced commits): one connection for everything that
/// may write, and [`READERS`] read-only ones, so lookups never queue behind a commit
/// waiting for the disk (a WAL reader sees the last commit and takes no lock a writer
/// waits for). Several servers may share the file on one host; each waits for the
/// other's write lock.
pub struct Sqlite {
    writer: Connection,
    readers: Vec<Connection>,
    next_reader: AtomicUsize,
}

impl Sqlite {
    pub fn open(path: &std::path::Path) -> Result<Self, ServerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ServerError::io("create", dir, e))?;
        }
        let writer = rusqlite::Connection::open(path)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.busy_timeout(std::time::Duration::from_secs(10))?;
        let mut readers = Vec::with_capacity(READERS);
        for n in 0..READERS {
            let reader = rusqlite::Connection::open(path)?;
            // A statement that would write on a reader fails instead.
            reader.pragma_update(None, "query_only", true)?;
            reader.busy_timeout(std::time::Duration::from_secs(10))?;
            readers.push(Connection::start(format!("sqlite-reader-{n}"), reader)?);
        }
        Ok(Sqlite { writer: Connection::start("sqlite-writer".into(), writer)?, readers, next_reader: AtomicUsize::new(0) })
    }

    /// The connection for a transaction of `mode`: a reader with the fewest jobs
    /// waiting, or the writer.
    fn connection(&self, mode: Mode) -> &Connection {
        if mode != Mode::Read {
            return &self.writer;
        }
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        (0..self.readers.len())
            .map(|i| &self.readers[(start + i) % self.readers.len()])
            .min_by_key(|r| r.queued.load(Ordering::Relaxed))
            .unwrap_or(&self.writer)
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
            Value::Null(_) => ValueRef::Null,
        }))
    }
}

/// Runs a transaction's work, whose only awaits are its statements (ready at once on
/// this thread), in a single poll. Work that awaits anything else would wait for a
/// wake-up this thread cannot give: it is an error, and its transaction rolls back.
fn in_one_go(mut work: BoxFuture<'static, Result<(), ServerError>>) -> Result<(), ServerError> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match work.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(ServerError::Db("a SQLite transaction awaited something other than its statements".into())),
    }
}

/// A transaction on a connection's own thread (its statements run in place there).
/// Dropped without a commit (an error or a panic in the transaction's work), it rolls
/// back what it began.
struct SqliteTx {
    conn: Arc<Mutex<rusqlite::Connection>>,
    /// In a transaction that has not ended yet.
    open: bool,
    /// Began with `BEGIN IMMEDIATE`: holds the file's write lock.
    immediate: bool,
    /// Commits do not wait for the disk until this transaction ends.
    lazy: bool,
}

impl SqliteTx {
    fn begin(conn: Arc<Mutex<rusqlite::Connection>>, mode: Mode) -> Result<Self, ServerError> {
        let begin = match mode {
            Mode::Autocommit | Mode::Read => None,
            Mode::Shared => Some("BEGIN"),
            Mode::Exclusive | Mode::Write | Mode::Lazy => Some("BEGIN IMMEDIATE"),
        };
        let mut tx = SqliteTx { conn, open: false, immediate: begin == Some("BEGIN IMMEDIATE"), lazy: false };
        if mode == Mode::Lazy {
            tx.lazy = true;
            tx.conn().pragma_update(None, "synchronous", "NORMAL")?;
        }
        if let Some(sql) = begin {
            tx.conn().execute_batch(sql)?;
            tx.open = true;
        }
        Ok(tx)
    }

    /// Only this connection's thread runs transactions on it, one at a time: the lock
    /// is never contended.
    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn execute_now(&mut self, sql: &str, args: &[Value]) -> Result<u64, ServerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn query_now(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, ServerError> {
        use rusqlite::types::ValueRef;
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null(Kind::Text),
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                    ValueRef::Real(f) => return Err(ServerError::Db(format!("column {i}: unexpected real {f}").into())),
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    fn end(&mut self, sql: &str) -> Result<(), ServerError> {
        if self.open {
            self.open = false;
            self.conn().execute_batch(sql)?;
        }
        if self.lazy {
            self.lazy = false;
            self.conn().pragma_update(None, "synchronous", "FULL")?;
        }
        Ok(())
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        // Also after a COMMIT that failed and left the transaction open (a deferred
        // constraint, a full disk): the connection must not stay inside it.
        let in_transaction = !self.conn().is_autocommit();
        self.open = in_transaction;
        if let Err(e) = self.end("ROLLBACK") {
            tracing::error!(error = %e, "rolling back a SQLite transaction failed");
        }
    }
}

impl Tx for SqliteTx {
    fn execute<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<u64, ServerError>> {
        Box::pin(std::future::ready(self.execute_now(sql, &args)))
    }
    fn query<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Vec<Row>, ServerError>> {
        Box::pin(std::future::ready(self.query_now(sql, &args)))
    }
    fn batch<'a>(&'a mut self, sql: &'a str) -> BoxFuture<'a, Result<(), ServerError>> {
        Box::pin(std::future::ready(self.conn().execute_batch(sql).map_err(ServerError::from)))
    }
    fn serialized(&self) -> bool {
        self.immediate && self.open
    }
    fn serialize(&mut self) -> BoxFuture<'_, Result<(), ServerError>> {
        let r = if self.serialized() {
            Ok(())
        } else {
            Err(ServerError::State("a SQLite transaction is serialised only when it begins immediate".into()))
        };
        Box::pin(std::future::ready(r))
    }
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), ServerError>> {
        Box::pin(std::future::ready(self.end("COMMIT")))
    }
}

impl Database for Sqlite {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    /// Sends the whole transaction to its connection's thread and waits for it there
    /// without blocking: one hop per transaction, not per statement. Work whose caller
    /// stopped waiting before it began is skipped; work that began ends, committed or
    /// rolled back, as it says.
    fn run(&self, mode: Mode, work: Work) -> BoxFuture<'_, Result<(), ServerError>> {
        let (done, finished) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            if done.is_closed() {
                return;
            }
            let r = SqliteTx::begin(conn.clone(), mode).and_then(|tx| in_one_go(work(Box::new(tx))));
            let _ = done.send(r);
        });
        let sent = self.connection(mode).send(job);
        Box::pin(async move {
            sent?;
            finished.await.map_err(|_| ServerError::Db("a SQLite transaction panicked on its thread".into()))?
        })
    }
}
