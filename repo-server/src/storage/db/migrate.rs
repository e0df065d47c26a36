//! Schema migrations: the base schema, then numbered steps, on either backend.

use super::{Database, Dialect, Mode};
use crate::args;
use crate::error::ServerError;

/// Brings a database's schema up to date: `base` (idempotent `CREATE … IF NOT
/// EXISTS`), then each of `steps` not applied yet, all in one exclusive transaction
/// (another server may be migrating the same database).
pub async fn migrate(db: &dyn Database, base: String, steps: &'static [&'static str]) -> Result<(), ServerError> {
    let dialect = db.dialect();
    super::transaction(db, Mode::Exclusive, move |mut tx| async move {
        tx.batch(&dialect.schema(&base)).await?;
        let have = match dialect {
            Dialect::Sqlite => tx.one("PRAGMA user_version", args![]).await?.int(0)?,
            Dialect::Postgres => {
                tx.batch("CREATE TABLE IF NOT EXISTS outpost_schema (version BIGINT NOT NULL)").await?;
                match tx.opt("SELECT version FROM outpost_schema", args![]).await? {
                    Some(r) => r.int(0)?,
                    None => {
                        tx.execute("INSERT INTO outpost_schema (version) VALUES (0)", args![]).await?;
                        0
                    }
                }
            }
        };
        let have = usize::try_from(have).unwrap_or(0);
        if have > steps.len() {
            return Err(ServerError::State(format!(
                "the database's schema is version {have}, newer than this server's {}: upgrade the server",
                steps.len()
            )));
        }
        for (n, sql) in steps.iter().enumerate().skip(have) {
            tx.batch(&dialect.schema(sql)).await?;
            let version = n + 1;
            match dialect {
                Dialect::Sqlite => tx.batch(&format!("PRAGMA user_version = {version}")).await?,
                Dialect::Postgres => {
                    tx.execute("UPDATE outpost_schema SET version = ?1", args![version as i64]).await?;
                }
            }
        }
        tx.commit().await
    })
    .await
}

