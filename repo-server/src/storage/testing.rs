//! Stores for the store suite: SQLite in a directory, or a fresh database on the
//! PostgreSQL server named by `OUTPOST_TEST_POSTGRES` (`postgres://USER@HOST:PORT`;
//! `scripts/test.sh` starts one and sets it).

use super::{random_hex, Backend, Store};
use crate::storage::db::Mode;

/// A new, empty database on the test PostgreSQL server.
pub(crate) async fn postgres_backend() -> Backend {
    use sqlx::Connection as _;
    let base = std::env::var("OUTPOST_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!("the PostgreSQL store tests need OUTPOST_TEST_POSTGRES=postgres://USER@HOST:PORT (scripts/test.sh starts a server and sets it)")
    });
    let name = format!("outpost_test_{}", &random_hex().unwrap_or_else(|e| panic!("{e}"))[..16]);
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres")).await.unwrap_or_else(|e| panic!("PostgreSQL at {base}: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap_or_else(|e| panic!("{e}"));
    Backend::Postgres { url: format!("{base}/{name}"), max_connections: 4 }
}

/// A bare device of class rpi4 (`?1`: its id, `?2`: a placeholder key, both EK and
/// AK), as the store suite enrolls them.
/// A test's result, or a panic that prints the error (its Display, not Debug).
pub(crate) fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) const INSERT_BARE_DEVICE: &str =
    "INSERT INTO devices (device_id, hardware_class, ek_public, ak_public, enrolled_at) VALUES (?1, 'rpi4', ?2, ?2, 'now')";

/// Enrolls `ids` as bare devices of class rpi4.
pub(crate) async fn add_devices(s: &Store, ids: impl Iterator<Item = String>) {
    let ids: Vec<String> = ids.collect();
    let added = s
        .transaction(Mode::Shared, move |mut tx| async move {
            for id in ids {
                tx.execute(INSERT_BARE_DEVICE, crate::args![id, &vec![0u8]]).await?;
            }
            tx.commit().await
        })
        .await;
    added.unwrap_or_else(|e| panic!("{e}"));
}

/// The store suite: each scenario (an `async fn(Backend)` beside the call) runs on a
/// fresh SQLite database in a temporary directory and on a fresh PostgreSQL database.
macro_rules! on_both_backends {
    ($($scenario:ident;)+) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
                super::$scenario(crate::storage::Backend::Sqlite(dir.path().join("t.db"))).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(crate::storage::testing::postgres_backend().await).await;
            }
        }
    )+};
}
pub(crate) use on_both_backends;
