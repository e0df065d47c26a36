//! The state store, the server's bottom layer and the only place with SQL: API
//! tokens (stored hashed), enrollment, devices, nonces, check-ins, rollouts and their
//! assignments, the SBOM index, install reports and the append-only audit log, on
//! SQLite (embedded) or PostgreSQL (see [`db`]). One schema ([`schema`]), one file per
//! table group; states are typed enums that refuse unknown text ([`enums`]).
//!
//! It imports only `protocol`, `fsio`, its own `db` and the crate's error type: the
//! domain modules (director, fleet, repository) call it, never the other way round.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::ServerError;
use db::{Database, Mode, Postgres, Row, Sqlite, Tx, Value};

pub mod assignments;
pub mod audit;
pub mod certificates;
pub mod checkins;
pub mod db;
pub mod devices;
pub mod enrollment;
pub mod enums;
pub mod incidents;
pub mod nonces;
pub mod reports;
pub mod rollouts;
pub mod sbom;
mod schema;
#[cfg(test)]
pub(crate) mod testing;
pub mod tokens;

pub use assignments::{AssignmentView, Decided, DirectorChanges, DirectorView, NewAssignment, StatusChange, WaveCounts};
pub use checkins::{CheckinRecord, Judged};
pub use devices::DeviceRecord;
pub use enrollment::{EnrollRefusal, NewChallenge};
pub use enums::{ChallengeState, SqlEnum};
pub use incidents::{Taken, MAX_UNATTESTED_INCIDENTS, MAX_UNATTESTED_INCIDENTS_PER_DEVICE};
pub use nonces::{NonceIssue, NonceRefusal, MAX_OPEN_NONCES};
pub use outpost_protocol::report::{InstallReport, ReportOutcome};
pub use reports::{ReportFilter, ReportSource, MAX_UNATTESTED_REPORTS, MAX_UNATTESTED_REPORTS_PER_DEVICE};
pub use rollouts::{ActionOutcome, RolloutRecord};
pub use sbom::{SbomRelease, SbomSearch};
pub use tokens::{Principal, TokenRole};

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, ServerError> {
    serde_json::from_str(s).map_err(|e| ServerError::State(format!("stored {what}: {e}")))
}

/// A Unix time (seconds) as the RFC 3339 text the store keeps.
fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default().to_rfc3339()
}

/// A Unix time in milliseconds as RFC 3339 text.
fn rfc3339_ms(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms).unwrap_or_default().to_rfc3339()
}

/// The state store: the same operations on either backend.
pub struct Store {
    db: Box<dyn Database>,
}

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_hex() -> Result<String, ServerError> {
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw).map_err(|e| ServerError::State(format!("no randomness: {e}")))?;
    Ok(hex::encode(raw))
}

/// The state store's two backends, as configured.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: one file.
    Sqlite(PathBuf),
    /// A PostgreSQL server several `outpost-server`s may share.
    Postgres { url: String, max_connections: u32 },
}

impl std::fmt::Debug for Backend {
    // The URL may carry a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Backend::Postgres { url, max_connections } => {
                f.debug_struct("Postgres").field("url", &db::redact(url)).field("max_connections", max_connections).finish()
            }
        }
    }
}

impl Store {
    /// Opens (and migrates) the configured database.
    pub async fn open(backend: &Backend) -> Result<Self, ServerError> {
        Self::open_migrated(backend, &schema::ALTERATIONS).await
    }

    /// Opens the database with the schema as of `steps` (tests make old databases).
    async fn open_migrated(backend: &Backend, steps: &'static [&'static str]) -> Result<Self, ServerError> {
        let db: Box<dyn Database> = match backend {
            Backend::Sqlite(path) => {
                let path = path.clone();
                let opened = tokio::task::spawn_blocking(move || Sqlite::open(&path)).await;
                Box::new(opened.map_err(|e| ServerError::Db(format!("opening the SQLite database: {e}").into()))??)
            }
            Backend::Postgres { url, max_connections } => Box::new(Postgres::connect(url, *max_connections).await?),
        };
        db::migrate(db.as_ref(), schema::base_schema(db.dialect()), steps).await?;
        Ok(Store { db })
    }

    /// Opens (and migrates) the SQLite database at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Self, ServerError> {
        Self::open(&Backend::Sqlite(path.to_owned())).await
    }

    /// Which backend this is ("sqlite" or "postgres").
    pub fn backend(&self) -> &'static str {
        self.db.dialect().name()
    }

    /// Runs `work` in one transaction of `mode` (see [`db::transaction`]).
    pub(crate) async fn transaction<R, F, Fut>(&self, mode: Mode, work: F) -> Result<R, ServerError>
    where
        R: Send + 'static,
        F: FnOnce(Box<dyn Tx>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<R, ServerError>> + Send + 'static,
    {
        db::transaction(self.db.as_ref(), mode, work).await
    }

    /// One statement on its own.
    pub(super) async fn execute(&self, sql: &str, args: Vec<Value>) -> Result<u64, ServerError> {
        let sql = sql.to_owned();
        self.transaction(Mode::Autocommit, move |mut tx| async move { tx.execute(&sql, args).await }).await
    }

    /// One query on its own, that only reads.
    pub(super) async fn query(&self, sql: &str, args: Vec<Value>) -> Result<Vec<Row>, ServerError> {
        let sql = sql.to_owned();
        self.transaction(Mode::Read, move |mut tx| async move { tx.query(&sql, args).await }).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::args;
    use crate::storage::db::Mode;
    use crate::storage::schema::ALTERATIONS;

    use crate::storage::testing::{add_devices, ok, on_both_backends, INSERT_BARE_DEVICE};

    on_both_backends! {
        nonces_are_single_use_for_their_device_and_bounded;
        enrollment_uses_a_token_once_and_a_wrong_secret_closes_the_challenge;
        reopening_migrates_once_and_keeps_everything;
        slots_no_agent_sends_are_forgotten_by_the_migration_not_fatal_to_lookups;
        sbom_search_orders_versions_by_each_ecosystem_and_keeps_the_undecided;
    }

    async fn sbom_search_orders_versions_by_each_ecosystem_and_keeps_the_undecided(b: Backend) {
        use outpost_sbom::query::Query;
        use outpost_sbom::ComponentRef;
        let s = ok(Store::open(&b).await);
        let c = |name: &str, version: Option<&str>, purl: Option<&str>| ComponentRef {
            name: name.into(),
            version: version.map(str::to_owned),
            purl: purl.map(str::to_owned),
        };
        let rel = SbomRelease {
            sbom_sha256: "ab".repeat(32),
            target: "firmware/rpi4/1.0.0/fw.img".into(),
            hardware_class: "rpi4".into(),
            version: "1.0.0".into(),
            image_sha256: "cd".repeat(32),
        };
        let components = [
            c("foo", Some("1.0.0-alpha"), Some("pkg:cargo/foo@1.0.0-alpha")),
            c("bar", Some("2.0.0-rc.1"), Some("pkg:npm/bar@2.0.0-rc.1")),
            c("django", Some("1.0.0rc1"), Some("pkg:pypi/Django@1.0.0rc1")),
            c("libc6", Some("2.36-9+deb12u14"), Some("pkg:deb/debian/libc6@2.36-9%2Bdeb12u14?arch=amd64")),
            c("busybox", Some("1.36.1"), None),
            // packageurl refuses a namespace on a cargo purl: it cannot be read.
            c("baz", Some("0.1.0"), Some("pkg:cargo/ns/baz@0.1.0")),
        ];
        ok(s.index_sbom(&rel, &components).await);
        let search = async |q: &str| {
            let found = ok(s.sbom_search(&ok(Query::parse(q))).await);
            let mut hits = found.releases.into_iter().map(|h| (h.component, h.undecided.is_some())).collect::<Vec<_>>();
            hits.sort();
            hits
        };
        let hit = |n: &str| (n.to_owned(), false);
        let undecided = |n: &str| (n.to_owned(), true);
        // Pre-releases are before the release (dpkg's order put 1.0.0-alpha after 1.0.0).
        assert_eq!(search("foo@<1.0.0").await, [hit("foo")]);
        assert_eq!(search("bar@<2.0.0").await, [hit("bar")]);
        assert_eq!(search("pkg:pypi/django@<1.0.0").await, [undecided("baz"), hit("django")]);
        assert_eq!(search("pkg:cargo/foo@>=1.0.0").await, [undecided("baz")], "a purl that cannot be read may be this one");
        assert_eq!(search("pkg:deb/debian/libc6@<2.36-9+deb12u10").await, [undecided("baz")]);
        assert_eq!(search("pkg:deb/debian/libc6@>=2.36-9+deb12u10").await, [undecided("baz"), hit("libc6")]);
        // No purl: no ecosystem, so a range is undecided and an exact version is text.
        assert_eq!(search("busybox@<1.37.0").await, [undecided("busybox")]);
        assert_eq!(search("busybox@1.36.1").await, [hit("busybox")]);
        assert_eq!(search("busybox@1.36.2").await, []);
        assert_eq!(search("baz@<1.0.0").await, [undecided("baz")]);
        let found = ok(s.sbom_search(&ok(Query::parse("busybox@<1.37.0"))).await);
        assert!(found.releases[0].undecided.as_deref().is_some_and(|w| w.contains("has no purl")), "{:?}", found.releases);
    }

    async fn nonces_are_single_use_for_their_device_and_bounded(b: Backend) {
        let s = ok(Store::open(&b).await);
        let now = 1_000_000;
        add_devices(&s, ["dev-a", "dev-c"].map(String::from).into_iter()).await;
        assert_eq!(ok(s.issue_nonce("dev-x", now + 60_000, now).await), NonceIssue::UnknownDevice);
        let issue = async |id: &str, until: i64| match ok(s.issue_nonce(id, until, now).await) {
            NonceIssue::Issued(n) => n,
            other => panic!("no nonce for {id}: {other:?}"),
        };
        let n = issue("dev-a", now + 60_000).await;
        assert!(matches!(ok(s.consume_nonce(&n, "dev-b", now).await), Err(NonceRefusal::OtherDevice)));
        assert!(ok(s.consume_nonce(&n, "dev-a", now).await).is_ok());
        assert!(matches!(ok(s.consume_nonce(&n, "dev-a", now).await), Err(NonceRefusal::Used)));
        assert!(matches!(ok(s.consume_nonce("f00d", "dev-a", now).await), Err(NonceRefusal::Unknown)));
        let late = issue("dev-a", now + 10).await;
        assert!(matches!(ok(s.consume_nonce(&late, "dev-a", now + 10).await), Err(NonceRefusal::Expired(_))));
        // At most MAX_OPEN_NONCES unused ones per device.
        let mut issued = 0;
        while let NonceIssue::Issued(_) = ok(s.issue_nonce("dev-c", now + 60_000, now).await) {
            issued += 1;
            assert!(issued <= MAX_OPEN_NONCES);
        }
        assert_eq!(issued, MAX_OPEN_NONCES);
        // Expired for an hour: purged.
        assert_eq!(ok(s.purge_nonces(now + 10 + 3_600_001).await), 1);
        assert!(matches!(ok(s.consume_nonce(&late, "dev-a", now).await), Err(NonceRefusal::Unknown)));
    }

    async fn enrollment_uses_a_token_once_and_a_wrong_secret_closes_the_challenge(b: Backend) {
        let s = ok(Store::open(&b).await);
        let now = chrono::Utc::now().timestamp();
        let labels = BTreeMap::from([("site".to_owned(), "lab".to_owned())]);
        let token = ok(s.create_enrollment_token("rpi4", &labels, "ops", now + 3600).await);
        assert!(matches!(ok(s.check_enrollment_token(&token, "x86", now).await), Err(EnrollRefusal::WrongClass { .. })));
        let challenge = |id: &'static str| NewChallenge {
            id,
            token: &token,
            device_id: "dev-1",
            hardware_class: "rpi4",
            ek_public: b"ek",
            ek_certificate: None,
            ak_public: b"ak",
            secret_sha256: "good",
            expires_at: now + 300,
        };
        assert!(ok(s.open_challenge(&challenge("c1"), now).await).is_ok());
        assert!(matches!(ok(s.complete_challenge("c1", "bad", now).await), Err(EnrollRefusal::WrongSecret)));
        assert!(matches!(ok(s.complete_challenge("c1", "good", now).await), Err(EnrollRefusal::ChallengeClosed(_))));
        assert!(ok(s.open_challenge(&challenge("c2"), now).await).is_ok());
        assert_eq!(ok(s.complete_challenge("c2", "good", now).await).ok(), Some(("dev-1".to_owned(), "rpi4".to_owned())));
        assert!(matches!(ok(s.check_enrollment_token(&token, "rpi4", now).await), Err(EnrollRefusal::TokenUsed)));
        let d = ok(s.device("dev-1").await).unwrap_or_else(|| panic!("enrolled"));
        assert_eq!((d.attestation.as_str(), d.labels.clone(), d.ak_public.clone(), d.has_ek_certificate), ("pending", labels, b"ak".to_vec(), false));
    }

    async fn reopening_migrates_once_and_keeps_everything(b: Backend) {
        let first = ok(Store::open(&b).await);
        let token = ok(first.create_token("ci", TokenRole::Pipeline).await);
        ok(first.log("ci", "publish", &serde_json::json!({"n": 1})).await);
        // A second server (or a restart) on the same database: nothing re-applied.
        let second = ok(Store::open(&b).await);
        assert_eq!(ok(second.authenticate(&token).await).map(|p| p.role), Some(TokenRole::Pipeline));
        assert_eq!(ok(second.recent_log(10).await).len(), 1);
        let version = match &b {
            Backend::Sqlite(_) => "PRAGMA user_version",
            Backend::Postgres { .. } => "SELECT version FROM outpost_schema",
        };
        let have = ok(second.transaction(Mode::Autocommit, move |mut tx| async move { tx.one(version, args![]).await?.int(0) }).await);
        assert_eq!(have, ALTERATIONS.len() as i64);
        // A database a newer server migrated is refused, not run with a schema this
        // server does not know.
        let newer = ALTERATIONS.len() + 1;
        let sqlite = matches!(b, Backend::Sqlite(_));
        let made_newer = second
            .transaction(Mode::Autocommit, move |mut tx| async move {
                if sqlite {
                    tx.batch(&format!("PRAGMA user_version = {newer}")).await
                } else {
                    tx.execute("UPDATE outpost_schema SET version = ?1", args![newer as i64]).await.map(drop)
                }
            })
            .await;
        ok(made_newer);
        let refused = Store::open(&b).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains(&format!("schema is version {newer}, newer than this server's")), "{refused}");
    }

    async fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = ok(tempfile::tempdir());
        let s = ok(Store::open(&Backend::Sqlite(dir.path().join("t.db"))).await);
        (dir, s)
    }

    /// Lookups go to SQLite's read-only connections: they see each commit at once, and
    /// a write sent there is refused, not run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_readers_see_every_commit_and_refuse_writes() {
        let (_dir, s) = sqlite_store().await;
        for n in 0..20 {
            add_devices(&s, std::iter::once(format!("d{n}"))).await;
            assert!(ok(s.device(&format!("d{n}")).await).is_some(), "d{n} committed, then looked up");
        }
        let refused = s.transaction(Mode::Read, move |mut tx| async move { tx.execute("DELETE FROM devices", args![]).await }).await;
        let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(why.contains("readonly"), "{why}");
        assert_eq!(ok(s.devices().await).len(), 20);
    }

    /// A transaction that panics half-way on the store's thread is rolled back and fails
    /// its caller only: the next transaction runs on the same connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_that_panics_half_way_is_rolled_back_and_the_next_runs() {
        let (_dir, s) = sqlite_store().await;
        let failed = s
            .transaction(Mode::Write, move |mut tx| async move {
                tx.execute(INSERT_BARE_DEVICE, args!["half", &vec![0u8]]).await?;
                if tx.serialized() {
                    panic!("a bug half-way through a transaction");
                }
                tx.commit().await
            })
            .await;
        assert!(failed.is_err());
        assert!(ok(s.device("half").await).is_none(), "the half-done insert was rolled back");
        add_devices(&s, std::iter::once("after".to_owned())).await;
        assert!(ok(s.device("after").await).is_some());
    }


    /// Servers before schema 5 stored any 1-8 character slot. Such a row must not stop
    /// the device's lookups (and so its check-ins) or the report listing once slots
    /// are typed.
    async fn slots_no_agent_sends_are_forgotten_by_the_migration_not_fatal_to_lookups(b: Backend) {
        const BEFORE_TYPED_SLOTS: [&str; 4] = [ALTERATIONS[0], ALTERATIONS[1], ALTERATIONS[2], ALTERATIONS[3]];
        let s = ok(Store::open_migrated(&b, &BEFORE_TYPED_SLOTS).await);
        add_devices(&s, ["dev-z".to_owned(), "dev-a".to_owned()].into_iter()).await;
        ok(s.execute("UPDATE devices SET slot = 'Z' WHERE device_id = 'dev-z'", args![]).await);
        ok(s.execute("UPDATE devices SET slot = 'A' WHERE device_id = 'dev-a'", args![]).await);
        for (device, slot) in [("junk", "Q"), ("junk", "B")] {
            ok(s.execute(
                "INSERT INTO install_reports (received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at, attested)
                 VALUES ('now', ?1, 'rpi4', 't', '1.0.0', 'committed', NULL, ?2, 'now', 0)",
                args![device, slot],
            )
            .await);
        }
        let broken = s.device("dev-z").await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(broken.contains("devices.slot"), "a stored slot no agent sends is an error naming the column: {broken}");
        drop(s);
        let s = ok(Store::open(&b).await);
        assert_eq!(ok(s.device("dev-z").await).map(|d| d.device.slot), Some(None));
        assert_eq!(ok(s.device("dev-a").await).map(|d| d.device.slot), Some(Some(outpost_protocol::slot::Slot::A)));
        let reports = ok(s.recent_reports(None, 10, reports::ReportFilter::All).await);
        assert_eq!(reports.iter().map(|r| r.slot).collect::<Vec<_>>(), vec![outpost_protocol::slot::Slot::B]);
    }

    /// A COMMIT that fails and leaves SQLite's transaction open (a deferred constraint;
    /// a full disk does the same) must not leave the writer inside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_fails_leaves_no_transaction_open() {
        let (_dir, s) = sqlite_store().await;
        let setup = "PRAGMA foreign_keys = ON;
                     CREATE TABLE parent (id INTEGER PRIMARY KEY);
                     CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);";
        ok(s.transaction(Mode::Autocommit, move |mut tx| async move { tx.batch(setup).await }).await);
        let failed = s
            .transaction(Mode::Write, move |mut tx| async move {
                tx.execute("INSERT INTO child (parent) VALUES (7)", args![]).await?;
                tx.commit().await
            })
            .await;
        let why = failed.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(why.contains("FOREIGN KEY"), "{why}");
        add_devices(&s, std::iter::once("after".to_owned())).await;
        assert!(ok(s.device("after").await).is_some());
        let left = ok(s.transaction(Mode::Read, move |mut tx| async move { tx.one("SELECT count(*) FROM child", args![]).await?.int(0) }).await);
        assert_eq!(left, 0, "the failed transaction's row was rolled back");
    }

    /// Work that awaits anything but its statements cannot finish on the store's
    /// thread: it fails at once, rolled back, instead of hanging the writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_that_awaits_something_else_fails_and_rolls_back() {
        let (_dir, s) = sqlite_store().await;
        let failed = s
            .transaction(Mode::Write, move |mut tx| async move {
                tx.execute(INSERT_BARE_DEVICE, args!["waits", &vec![0u8]]).await?;
                let mut first = true;
                futures_util::future::poll_fn(move |cx| {
                    if std::mem::take(&mut first) {
                        cx.waker().wake_by_ref();
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                })
                .await;
                tx.commit().await
            })
            .await;
        let why = failed.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(why.contains("awaited something other than its statements"), "{why}");
        assert!(ok(s.device("waits").await).is_none());
        add_devices(&s, std::iter::once("after".to_owned())).await;
        assert!(ok(s.device("after").await).is_some());
    }

}
