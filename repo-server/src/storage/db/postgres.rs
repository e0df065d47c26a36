//! PostgreSQL through sqlx.

use futures_util::future::BoxFuture;
use sqlx::{Column as _, Row as _, TypeInfo as _, ValueRef as _};

use super::{redact, Database, Dialect, Kind, Mode, Row, Tx, Value, Work};
use crate::error::ServerError;


/// The advisory lock serialised transactions hold ("outpost" in ASCII).
const EXCLUSIVE_LOCK: i64 = 0x006f_7574_706f_7374;
/// BEGIN and take [`EXCLUSIVE_LOCK`] (its decimal value; checked in the tests).
const BEGIN_SERIALIZED: &str = "BEGIN; SELECT pg_advisory_xact_lock(31372865377891188)";

/// PostgreSQL through a sqlx connection pool.
pub struct Postgres {
    pool: sqlx::PgPool,
}

impl Postgres {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, ServerError> {
        let failed = |e: &dyn std::fmt::Display| ServerError::Db(format!("connecting to PostgreSQL at {}: {e}", redact(url)).into());
        // One connection first: the pool would retry a refused or misnamed server until
        // its timeout, and the operator should see why at once.
        let probe = tokio::time::timeout(std::time::Duration::from_secs(15), <sqlx::PgConnection as sqlx::Connection>::connect(url))
            .await
            .map_err(|_| failed(&"no answer within 15s"))?
            .map_err(|e| failed(&e))?;
        sqlx::Connection::close(probe).await.map_err(|e| failed(&e))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|e| failed(&e))?;
        Ok(Postgres { pool })
    }
}

/// `?N` placeholders as PostgreSQL's `$N`.
fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

enum PgConn {
    Tx(sqlx::Transaction<'static, sqlx::Postgres>),
    Single(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

struct PgTx {
    conn: PgConn,
    /// Holds the advisory lock.
    locked: bool,
}

impl PgTx {
    fn conn(&mut self) -> &mut sqlx::PgConnection {
        match &mut self.conn {
            PgConn::Tx(t) => t,
            PgConn::Single(c) => c,
        }
    }
}

type PgQuery = sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn pg_bind(sql: &str, args: Vec<Value>) -> PgQuery {
    let mut q = sqlx::query(sqlx::AssertSqlSafe(pg_sql(sql)));
    for a in args {
        q = match a {
            Value::Int(v) => q.bind(v),
            Value::Text(v) => q.bind(v),
            Value::Blob(v) => q.bind(v),
            Value::Null(Kind::Int) => q.bind(None::<i64>),
            Value::Null(Kind::Text) => q.bind(None::<String>),
            Value::Null(Kind::Blob) => q.bind(None::<Vec<u8>>),
        };
    }
    q
}

fn pg_row(r: &sqlx::postgres::PgRow) -> Result<Row, ServerError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let raw = r.try_get_raw(i)?;
        if raw.is_null() {
            values.push(Value::Null(Kind::Text));
            continue;
        }
        let type_name = raw.type_info().name().to_owned();
        values.push(match type_name.as_str() {
            "INT8" => Value::Int(r.try_get::<i64, _>(i)?),
            "INT4" => Value::Int(i64::from(r.try_get::<i32, _>(i)?)),
            "INT2" => Value::Int(i64::from(r.try_get::<i16, _>(i)?)),
            "BOOL" => Value::Int(i64::from(r.try_get::<bool, _>(i)?)),
            "TEXT" | "VARCHAR" | "NAME" | "BPCHAR" => Value::Text(r.try_get::<String, _>(i)?),
            "BYTEA" => Value::Blob(r.try_get::<Vec<u8>, _>(i)?),
            other => return Err(ServerError::Db(format!("column {i} ({}): unexpected type {other}", col.name()).into())),
        });
    }
    Ok(Row(values))
}

impl Tx for PgTx {
    fn execute<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<u64, ServerError>> {
        Box::pin(async move { Ok(pg_bind(sql, args).execute(self.conn()).await?.rows_affected()) })
    }
    fn query<'a>(&'a mut self, sql: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Vec<Row>, ServerError>> {
        Box::pin(async move { pg_bind(sql, args).fetch_all(self.conn()).await?.iter().map(pg_row).collect() })
    }
    fn batch<'a>(&'a mut self, sql: &'a str) -> BoxFuture<'a, Result<(), ServerError>> {
        Box::pin(async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(self.conn()).await?;
            Ok(())
        })
    }
    fn serialized(&self) -> bool {
        self.locked
    }
    fn serialize(&mut self) -> BoxFuture<'_, Result<(), ServerError>> {
        Box::pin(async move {
            if !self.locked {
                if matches!(self.conn, PgConn::Single(_)) {
                    return Err(ServerError::State("statements outside a transaction cannot be serialised".into()));
                }
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(EXCLUSIVE_LOCK).execute(self.conn()).await?;
                self.locked = true;
            }
            Ok(())
        })
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), ServerError>> {
        Box::pin(async move {
            if let PgConn::Tx(t) = self.conn {
                t.commit().await?;
            }
            Ok(())
        })
    }
}

impl Database for Postgres {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    fn run(&self, mode: Mode, work: Work) -> BoxFuture<'_, Result<(), ServerError>> {
        Box::pin(async move { work(self.begin(mode).await?).await })
    }
}

impl Postgres {
    async fn begin(&self, mode: Mode) -> Result<Box<dyn Tx>, ServerError> {
        // What a transaction needs at its start goes with its BEGIN, in one round trip.
        let conn = match mode {
            Mode::Autocommit | Mode::Read => PgConn::Single(self.pool.acquire().await?),
            Mode::Shared | Mode::Write => PgConn::Tx(self.pool.begin().await?),
            Mode::Exclusive => PgConn::Tx(self.pool.begin_with(BEGIN_SERIALIZED).await?),
            Mode::Lazy => PgConn::Tx(self.pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off").await?),
        };
        Ok(Box::new(PgTx { conn, locked: mode == Mode::Exclusive }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    fn placeholders_and_types_are_translated_for_postgres() {
        assert_eq!(pg_sql("SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c = ?2)"), "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $2)");
        assert_eq!(
            Dialect::Postgres.schema("id INTEGER PRIMARY KEY, n INTEGER NOT NULL, k BLOB"),
            "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL, k BYTEA"
        );
        assert_eq!(redact("postgres://outpost:s3cret@db:5432/outpost"), "postgres://outpost:***@db:5432/outpost");
        assert_eq!(redact("postgres://outpost@db/outpost"), "postgres://outpost@db/outpost");
        assert!(BEGIN_SERIALIZED.ends_with(&format!("({EXCLUSIVE_LOCK})")));
        let configured = crate::storage::Backend::Postgres { url: "postgres://outpost:s3cret@db/outpost".into(), max_connections: 4 };
        assert!(!format!("{configured:?}").contains("s3cret"));
    }
}
