//! SQLite embedded.

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

struct SqliteTx {
    conn: tokio::sync::OwnedMutexGuard<rusqlite::Connection>,
    /// In a transaction that has not ended yet.
    open: bool,
    /// Commits do not wait for the disk until this transaction ends.
    lazy: bool,
    /// Began with `BEGIN IMMEDIATE`: holds the file's write lock.
    immediate: bool,
}

impl SqliteTx {
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

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Err(e) = self.end("ROLLBACK") {
            tracing::error!(error = %e, "rolling back a SQLite transaction failed");
        }
    }
}

impl Tx for SqliteTx {
    fn execute<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<u64, ServerError>> {
        Box::pin(async move { SqliteTx::execute(self, sql, &args) })
    }
    fn query<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Vec<Row>, ServerError>> {
        Box::pin(async move { SqliteTx::query(self, sql, &args) })
    }
    fn batch<'a>(&'a mut self, sql: &'a str) -> BoxFuture<'a, Result<(), ServerError>> {
        Box::pin(async move { Ok(self.conn.execute_batch(sql)?) })
    }
    fn serialized(&self) -> bool {
        self.open && self.immediate
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
        Box::pin(async move { self.end("COMMIT") })
    }
}

impl Database for Sqlite {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn begin(&self, mode: Mode) -> BoxFuture<'_, Result<Box<dyn Tx>, ServerError>> {
        Box::pin(async move {
            let conn = self.conn.clone().lock_owned().await;
            let mut tx = SqliteTx { conn, open: false, lazy: false, immediate: false };
            if mode == Mode::Lazy {
                tx.conn.pragma_update(None, "synchronous", "NORMAL")?;
                tx.lazy = true;
            }
            let begin = match mode {
                Mode::Autocommit => None,
                Mode::Shared => Some("BEGIN"),
                Mode::Exclusive | Mode::Write | Mode::Lazy => Some("BEGIN IMMEDIATE"),
            };
            if let Some(sql) = begin {
                tx.conn.execute_batch(sql)?;
                tx.open = true;
                tx.immediate = sql == "BEGIN IMMEDIATE";
            }
            Ok(Box::new(tx) as Box<dyn Tx>)
        })
    }
}

