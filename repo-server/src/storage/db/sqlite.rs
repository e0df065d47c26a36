//! SQLite embedded. Every statement (and each BEGIN, COMMIT and ROLLBACK, which may
//! wait for another process's lock or for the disk) runs off the async workers (see
//! [`blocking`]), never blocking a worker that has other tasks to run.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Database, Dialect, Kind, Mode, Row, Tx, Value};
use crate::error::ServerError;


/// SQLite embedded: one connection (WAL, fully synced commits) shared by the server.
/// Several servers may share the file on one host; each waits for the other's write
/// lock.
pub struct Sqlite {
    conn: Arc<tokio::sync::Mutex<rusqlite::Connection>>,
}

impl Sqlite {
    pub fn open(path: &std::path::Path) -> Result<Self, ServerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ServerError::io("create", dir, e))?;
        }
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Sqlite { conn: Arc::new(tokio::sync::Mutex::new(conn)) })
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

/// The connection, held for one transaction; dropped anywhere (after a commit, or in a
/// task whose future was cancelled mid-statement), it ends what it began first.
struct Held {
    conn: tokio::sync::OwnedMutexGuard<rusqlite::Connection>,
    /// In a transaction that has not ended yet.
    open: bool,
    /// Commits do not wait for the disk until this transaction ends.
    lazy: bool,
}

impl Held {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, ServerError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, ServerError> {
        use rusqlite::types::ValueRef;
        let mut stmt = self.conn.prepare_cached(sql)?;
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
            self.conn.execute_batch(sql)?;
        }
        if self.lazy {
            self.lazy = false;
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Err(e) = self.end("ROLLBACK") {
            tracing::error!(error = %e, "rolling back a SQLite transaction failed");
        }
    }
}

/// Runs `f` on the connection off the async workers and hands the connection back
/// with what `f` came to (a failed statement leaves the transaction to its owner).
///
/// On the server's multi-threaded runtime this is `block_in_place`: the worker hands
/// its other tasks to another thread and this one runs the statement, so the
/// transaction's next statement follows without waiting to be scheduled again while it
/// holds the connection. (`spawn_blocking` per statement did the same work, but each
/// statement then queued for a worker to resume the transaction, with the one
/// connection held: check-ins halved under load, see docs/benchmarks.md.) On a
/// current-thread runtime (unit tests) there is no worker to hand over, so the
/// statement goes to the blocking pool.
async fn blocking<T: Send + 'static>(
    mut held: Held,
    f: impl FnOnce(&mut Held) -> Result<T, ServerError> + Send + 'static,
) -> Result<(Held, Result<T, ServerError>), ServerError> {
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        return Ok(tokio::task::block_in_place(move || {
            let r = f(&mut held);
            (held, r)
        }));
    }
    tokio::task::spawn_blocking(move || {
        let r = f(&mut held);
        (held, r)
    })
    .await
    .map_err(|e| ServerError::Db(format!("a SQLite statement's task failed: {e}").into()))
}

struct SqliteTx {
    /// None only while a statement runs, or after one failed to come back.
    held: Option<Held>,
    /// Began with `BEGIN IMMEDIATE`: holds the file's write lock.
    immediate: bool,
}

impl SqliteTx {
    async fn run<T: Send + 'static>(&mut self, f: impl FnOnce(&mut Held) -> Result<T, ServerError> + Send + 'static) -> Result<T, ServerError> {
        let held = self.held.take().ok_or_else(|| ServerError::Db("a SQLite transaction used after its connection was lost".into()))?;
        let (held, out) = blocking(held, f).await?;
        self.held = Some(held);
        out
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        // The rollback may wait for the disk: off the async workers when there are any.
        if let (Some(held), Ok(rt)) = (self.held.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn_blocking(move || drop(held));
        }
    }
}

impl Tx for SqliteTx {
    fn execute<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<u64, ServerError>> {
        let sql = sql.to_owned();
        Box::pin(async move { self.run(move |h| h.execute(&sql, &args)).await })
    }
    fn query<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Vec<Row>, ServerError>> {
        let sql = sql.to_owned();
        Box::pin(async move { self.run(move |h| h.query(&sql, &args)).await })
    }
    fn batch<'a>(&'a mut self, sql: &'a str) -> BoxFuture<'a, Result<(), ServerError>> {
        let sql = sql.to_owned();
        Box::pin(async move { self.run(move |h| Ok(h.conn.execute_batch(&sql)?)).await })
    }
    fn serialized(&self) -> bool {
        self.immediate && self.held.as_ref().is_some_and(|h| h.open)
    }
    fn serialize(&mut self) -> BoxFuture<'_, Result<(), ServerError>> {
        Box::pin(async move {
            if self.serialized() {
                Ok(())
            } else {
                Err(ServerError::State("a SQLite transaction is serialised only when it begins immediate".into()))
            }
        })
    }
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), ServerError>> {
        Box::pin(async move { self.run(|h| h.end("COMMIT")).await })
    }
}

impl Database for Sqlite {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn begin(&self, mode: Mode) -> BoxFuture<'_, Result<Box<dyn Tx>, ServerError>> {
        Box::pin(async move {
            let conn = self.conn.clone().lock_owned().await;
            let begin = match mode {
                Mode::Autocommit => None,
                Mode::Shared => Some("BEGIN"),
                Mode::Exclusive | Mode::Write | Mode::Lazy => Some("BEGIN IMMEDIATE"),
            };
            let held = Held { conn, open: false, lazy: false };
            let (held, began) = blocking(held, move |h| {
                if mode == Mode::Lazy {
                    h.conn.pragma_update(None, "synchronous", "NORMAL")?;
                    h.lazy = true;
                }
                if let Some(sql) = begin {
                    h.conn.execute_batch(sql)?;
                    h.open = true;
                }
                Ok(())
            })
            .await?;
            let tx = SqliteTx { held: Some(held), immediate: begin == Some("BEGIN IMMEDIATE") };
            began?;
            Ok(Box::new(tx) as Box<dyn Tx>)
        })
    }
}
