//! State store (SQLite embedded, or PostgreSQL; see `db`): API tokens, stored hashed; the append-only log of
//! publishes, online re-signs and admin actions; devices, their enrollment and
//! attestation records.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::args;
use crate::db::{Database, Dialect, Mode, Postgres, Row, Sqlite, Tx, Value};
use crate::error::ServerError;
use crate::storage::{ChallengeState, SqlEnum};
use outpost_protocol::attest::{AttestationState, DeviceHealth, Verdict};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Publish releases and metadata.
    Pipeline,
    /// Rollouts and devices (later issues).
    Operator,
    /// Read only.
    Viewer,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Pipeline => "pipeline",
            TokenRole::Operator => "operator",
            TokenRole::Viewer => "viewer",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "pipeline" => Some(TokenRole::Pipeline),
            "operator" => Some(TokenRole::Operator),
            "viewer" => Some(TokenRole::Viewer),
            _ => None,
        }
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TokenRole::parse(s).ok_or_else(|| format!("unknown role {s:?} (pipeline, operator or viewer)"))
    }
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: TokenRole,
}

/// The state store: the same operations on either backend.
pub struct Store {
    db: Box<dyn Database>,
}

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('pipeline', 'operator', 'viewer')),
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS install_reports (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    device_id TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    target TEXT NOT NULL,
    version TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('committed', 'rolled_back')),
    reason TEXT,
    slot TEXT NOT NULL,
    reported_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS install_reports_device ON install_reports (device_id, id);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    hardware_class TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at TEXT,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS enrollment_challenges (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    device_id TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    ek_public BLOB NOT NULL,
    ek_certificate BLOB,
    ak_public BLOB NOT NULL,
    secret_sha256 TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'completed', 'failed'))
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    hardware_class TEXT NOT NULL,
    ek_public BLOB NOT NULL,
    ek_certificate BLOB,
    ak_public BLOB NOT NULL,
    enrolled_at TEXT NOT NULL,
    last_checkin_at TEXT,
    slot TEXT,
    version TEXT,
    image_sha256 TEXT,
    sbom_sha256 TEXT,
    health TEXT,
    attestation TEXT NOT NULL DEFAULT 'pending' CHECK (attestation IN ('pending', 'attested', 'failed')),
    attestation_reason TEXT,
    attested_at TEXT
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at);
CREATE INDEX IF NOT EXISTS nonces_device ON nonces (device_id, used, expires_at);
CREATE TABLE IF NOT EXISTS attestations (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    at TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('attested', 'failed')),
    reason TEXT,
    slot TEXT,
    version TEXT,
    image_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS attestations_device ON attestations (device_id, id);
CREATE TABLE IF NOT EXISTS sbom_releases (
    sbom_sha256 TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    version TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    components INTEGER NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sbom_components (
    sbom_sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT,
    purl TEXT,
    purl_base TEXT
);
CREATE INDEX IF NOT EXISTS sbom_components_name ON sbom_components (name);
CREATE INDEX IF NOT EXISTS sbom_components_purl_base ON sbom_components (purl_base);
CREATE INDEX IF NOT EXISTS devices_image ON devices (image_sha256);
CREATE TABLE IF NOT EXISTS repository_log (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

// The audit log is append-only: the database itself refuses to change or drop entries.
const APPEND_ONLY_SQLITE: &str = "
CREATE TRIGGER IF NOT EXISTS repository_log_append_only_update BEFORE UPDATE ON repository_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS repository_log_append_only_delete BEFORE DELETE ON repository_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";
const APPEND_ONLY_POSTGRES: &str = "
CREATE OR REPLACE FUNCTION outpost_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE OR REPLACE TRIGGER repository_log_append_only BEFORE UPDATE OR DELETE ON repository_log
FOR EACH ROW EXECUTE FUNCTION outpost_append_only();
CREATE OR REPLACE TRIGGER repository_log_no_truncate BEFORE TRUNCATE ON repository_log
FOR EACH STATEMENT EXECUTE FUNCTION outpost_append_only();
";

/// A new enrollment challenge, before the device proves it.
pub struct NewChallenge<'a> {
    pub id: &'a str,
    pub token: &'a str,
    pub device_id: &'a str,
    pub hardware_class: &'a str,
    pub ek_public: &'a [u8],
    pub ek_certificate: Option<&'a [u8]>,
    pub ak_public: &'a [u8],
    pub secret_sha256: &'a str,
    pub expires_at: i64,
}

/// Why an enrollment step is refused (each maps to an API error).
#[derive(Debug)]
pub enum EnrollRefusal {
    UnknownToken,
    TokenUsed,
    TokenExpired(i64),
    WrongClass { token: String },
    UnknownChallenge,
    ChallengeClosed(ChallengeState),
    ChallengeExpired,
    WrongSecret,
}

/// A device's record.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    pub device_id: String,
    pub hardware_class: String,
    #[serde(skip)]
    pub ak_public: Vec<u8>,
    pub has_ek_certificate: bool,
    pub enrolled_at: String,
    pub last_checkin_at: Option<String>,
    pub slot: Option<String>,
    pub version: Option<String>,
    pub image_sha256: Option<String>,
    pub sbom_sha256: Option<String>,
    pub health: Option<DeviceHealth>,
    pub attestation: AttestationState,
    pub attestation_reason: Option<String>,
    pub attested_at: Option<String>,
    /// The latest attestation failed: nothing may be assigned to this device.
    pub quarantined: bool,
    /// Labels rollout selectors match.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The network policy the device reported at its last attested check-in.
    pub policy: Option<serde_json::Value>,
}

/// What a nonce request came to.
#[derive(Debug, PartialEq, Eq)]
pub enum NonceIssue {
    Issued(String),
    UnknownDevice,
    /// The device has `MAX_OPEN_NONCES` unused, unexpired nonces already.
    TooMany,
}

/// Why a nonce cannot be used.
#[derive(Debug)]
pub enum NonceRefusal {
    Unknown,
    OtherDevice,
    Used,
    Expired(i64),
}

/// One check-in's outcome, recorded with the device's state.
pub struct CheckinRecord<'a> {
    pub device_id: &'a str,
    pub verdict: Verdict,
    pub reason: Option<&'a str>,
    pub slot: &'a str,
    pub version: Option<&'a str>,
    pub image_sha256: Option<&'a str>,
    pub sbom_sha256: Option<&'a str>,
    pub health: DeviceHealth,
    pub reports: &'a [InstallReport],
    /// The policy status (JSON) the device reported.
    pub policy: Option<String>,
}

/// A release whose SBOM is indexed.
pub struct SbomRelease {
    pub sbom_sha256: String,
    pub target: String,
    pub hardware_class: String,
    pub version: String,
    pub image_sha256: String,
}

/// One release containing a matching component.
#[derive(Debug, Clone, Serialize)]
pub struct SbomHit {
    pub component: String,
    pub component_version: Option<String>,
    pub purl: Option<String>,
    pub sbom_sha256: String,
    pub target: String,
    pub hardware_class: String,
    pub version: String,
    pub image_sha256: String,
    /// Set when the component may match but its version cannot be placed against the
    /// query's range (the reason); it is listed, and counted as affected by the
    /// deny-list views, rather than left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undecided: Option<String>,
}

/// A device whose attested image is an affected release.
#[derive(Debug, Clone, Serialize)]
pub struct SbomDevice {
    pub device_id: String,
    pub hardware_class: String,
    pub version: Option<String>,
    pub quarantined: bool,
    pub release: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SbomSearch {
    pub releases: Vec<SbomHit>,
    pub devices: Vec<SbomDevice>,
}

/// Unused, unexpired nonces one device may have at a time.
pub const MAX_OPEN_NONCES: i64 = 16;

async fn consume_nonce_tx(tx: &mut dyn Tx, nonce: &str, device_id: &str, now: i64) -> Result<Result<(), NonceRefusal>, ServerError> {
    // The guarded update makes use-once hold under concurrent check-ins too.
    let used = tx
        .execute("UPDATE nonces SET used = 1 WHERE nonce = ?1 AND device_id = ?2 AND used = 0 AND expires_at > ?3", args![nonce, device_id, now])
        .await?;
    if used == 1 {
        return Ok(Ok(()));
    }
    // Refused: say why.
    let row = tx.opt("SELECT device_id, expires_at, used FROM nonces WHERE nonce = ?1", args![nonce]).await?;
    let Some(r) = row else { return Ok(Err(NonceRefusal::Unknown)) };
    let (d, exp, used) = (r.text(0)?, r.int(1)?, r.int(2)?);
    Ok(Err(if d != device_id {
        NonceRefusal::OtherDevice
    } else if used != 0 {
        NonceRefusal::Used
    } else if exp <= now {
        NonceRefusal::Expired(exp)
    } else {
        NonceRefusal::Used
    }))
}

const INSERT_REPORT: &str = "INSERT INTO install_reports (received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at, attested)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// Unattested reports (devices that follow no director and have no identity) kept at
/// most, in all and per device id: anyone can send them, so they must not grow without
/// bound, and they never sit beside an enrolled device's attested ones.
pub const MAX_UNATTESTED_REPORTS: i64 = 10_000;
pub const MAX_UNATTESTED_REPORTS_PER_DEVICE: i64 = 100;

fn report_args(received_at: &str, r: &InstallReport, attested: bool) -> Vec<Value> {
    args![received_at, &r.device_id, &r.hardware_class, &r.target, &r.version, r.outcome.as_str(), r.reason.as_deref(), &r.slot, &r.at, i64::from(attested)]
}

async fn record_checkin_tx(tx: &mut dyn Tx, c: &CheckinRecord<'_>) -> Result<(), ServerError> {
    let now = chrono::Utc::now().to_rfc3339();
    tx.execute(
        "INSERT INTO attestations (device_id, at, verdict, reason, slot, version, image_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        args![c.device_id, &now, c.verdict.as_sql(), c.reason, c.slot, c.version, c.image_sha256],
    )
    .await?;
    tx.execute(
        "UPDATE devices SET last_checkin_at = ?1, slot = ?2, version = ?3, image_sha256 = ?4, health = ?5,
           attestation = ?6, attestation_reason = ?7, attested_at = ?1, sbom_sha256 = ?9, policy = ?10 WHERE device_id = ?8",
        args![&now, c.slot, c.version, c.image_sha256, c.health.as_sql(), AttestationState::from(c.verdict).as_sql(), c.reason, c.device_id, c.sbom_sha256, c.policy.as_deref()],
    )
    .await?;
    for r in c.reports {
        tx.execute(INSERT_REPORT, report_args(&now, r, true)).await?;
    }
    Ok(())
}

/// The tables, created when missing (both backends; see `Dialect::schema`).
fn base_schema(dialect: Dialect) -> String {
    let append_only = match dialect {
        Dialect::Sqlite => APPEND_ONLY_SQLITE,
        Dialect::Postgres => APPEND_ONLY_POSTGRES,
    };
    format!("{TABLES}\n{}\n{append_only}", crate::rollout_store::TABLES)
}

/// Schema changes to tables that already exist, numbered from 1 (SQLite keeps the
/// number in `PRAGMA user_version`, PostgreSQL in `outpost_schema`).
const ALTERATIONS: [&str; 4] = [
    // 1: device labels (rollout selectors) and the per-device director version;
    // labels given to enrollment tokens.
    "ALTER TABLE devices ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE devices ADD COLUMN director_version INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE enrollment_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';",
    // 2: the network policy status devices report at check-in.
    "ALTER TABLE devices ADD COLUMN policy TEXT;",
    // 3: purl_base is the canonical purl read with the packageurl crate (or
    // UNREADABLE_PURL); rows written before were split by hand. The index is emptied
    // and rebuilt from the signed releases when the server starts.
    "DELETE FROM sbom_components;
     DELETE FROM sbom_releases;",
    // 4: whether a device signed the report (inside an attested check-in). Rows from
    // before cannot tell, so they count as unattested.
    "ALTER TABLE install_reports ADD COLUMN attested INTEGER NOT NULL DEFAULT 0;",
];

/// `sbom_components.purl_base` of a component whose purl cannot be read (no canonical
/// purl starts with `-`): every purl search considers these, since any of them may be
/// the package searched for. NULL is a component without a purl.
const UNREADABLE_PURL: &str = "-";

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
                f.debug_struct("Postgres").field("url", &crate::db::redact(url)).field("max_connections", max_connections).finish()
            }
        }
    }
}

impl Store {
    /// Opens (and migrates) the configured database.
    pub async fn open(backend: &Backend) -> Result<Self, ServerError> {
        let db: Box<dyn Database> = match backend {
            Backend::Sqlite(path) => Box::new(Sqlite::open(path)?),
            Backend::Postgres { url, max_connections } => Box::new(Postgres::connect(url, *max_connections).await?),
        };
        crate::db::migrate(db.as_ref(), &base_schema(db.dialect()), &ALTERATIONS).await?;
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

    pub(crate) async fn tx(&self, mode: Mode) -> Result<Box<dyn Tx>, ServerError> {
        self.db.begin(mode).await
    }

    /// One statement on its own.
    async fn execute(&self, sql: &str, args: Vec<Value>) -> Result<u64, ServerError> {
        self.tx(Mode::Autocommit).await?.execute(sql, args).await
    }

    /// One query on its own.
    async fn query(&self, sql: &str, args: Vec<Value>) -> Result<Vec<Row>, ServerError> {
        self.tx(Mode::Autocommit).await?.query(sql, args).await
    }

    /// Creates a token and returns it; only its hash is stored.
    pub async fn create_token(&self, name: &str, role: TokenRole) -> Result<String, ServerError> {
        let token = format!("opt_{}", random_hex()?);
        self.execute(
            "INSERT INTO api_tokens (name, role, token_sha256, created_at) VALUES (?1, ?2, ?3, ?4)",
            args![name, role.as_str(), hash_token(&token), chrono::Utc::now().to_rfc3339()],
        )
        .await?;
        Ok(token)
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>, ServerError> {
        let rows = self.query("SELECT name, role FROM api_tokens WHERE token_sha256 = ?1", args![hash_token(token)]).await?;
        let Some(r) = rows.first() else { return Ok(None) };
        let (name, role) = (r.text(0)?, r.text(1)?);
        Ok(TokenRole::parse(&role).map(|role| Principal { name, role }))
    }

    /// A one-time enrollment token for `hardware_class`, valid until `expires_at` (Unix s).
    /// The device enrolled with it gets `labels`.
    pub async fn create_enrollment_token(
        &self,
        hardware_class: &str,
        labels: &std::collections::BTreeMap<String, String>,
        created_by: &str,
        expires_at: i64,
    ) -> Result<String, ServerError> {
        let token = format!("ote_{}", random_hex()?);
        let labels = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        self.execute(
            "INSERT INTO enrollment_tokens (token_sha256, hardware_class, created_by, created_at, expires_at, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![hash_token(&token), hardware_class, created_by, chrono::Utc::now().to_rfc3339(), expires_at, labels],
        )
        .await?;
        Ok(token)
    }

    /// Whether an enrollment token may be used now for `hardware_class`.
    async fn enrollment_token_refusal(tx: &mut dyn Tx, token: &str, hardware_class: &str, now: i64) -> Result<Option<EnrollRefusal>, ServerError> {
        let row = tx.opt("SELECT hardware_class, expires_at, used_at FROM enrollment_tokens WHERE token_sha256 = ?1", args![hash_token(token)]).await?;
        let Some(r) = row else { return Ok(Some(EnrollRefusal::UnknownToken)) };
        let (class, exp, used) = (r.text(0)?, r.int(1)?, r.opt_text(2)?);
        Ok(if used.is_some() {
            Some(EnrollRefusal::TokenUsed)
        } else if exp <= now {
            Some(EnrollRefusal::TokenExpired(exp))
        } else if class != hardware_class {
            Some(EnrollRefusal::WrongClass { token: class })
        } else {
            None
        })
    }

    /// Whether an enrollment token may be used now for `hardware_class` (checked before
    /// any expensive work; `open_challenge` checks again).
    pub async fn check_enrollment_token(&self, token: &str, hardware_class: &str, now: i64) -> Result<Result<(), EnrollRefusal>, ServerError> {
        let mut tx = self.tx(Mode::Autocommit).await?;
        Ok(match Self::enrollment_token_refusal(tx.as_mut(), token, hardware_class, now).await? {
            Some(r) => Err(r),
            None => Ok(()),
        })
    }

    /// Checks an enrollment token (unused, unexpired, for this class) and records the
    /// challenge made for it. The token is consumed only when the device proves itself.
    pub async fn open_challenge(&self, c: &NewChallenge<'_>, now: i64) -> Result<Result<(), EnrollRefusal>, ServerError> {
        let mut tx = self.tx(Mode::Shared).await?;
        if let Some(r) = Self::enrollment_token_refusal(tx.as_mut(), c.token, c.hardware_class, now).await? {
            return Ok(Err(r));
        }
        tx.execute(
            "INSERT INTO enrollment_challenges (id, token_sha256, device_id, hardware_class, ek_public, ek_certificate, ak_public, secret_sha256, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            args![c.id, hash_token(c.token), c.device_id, c.hardware_class, c.ek_public, c.ek_certificate, c.ak_public, c.secret_sha256, c.expires_at],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Completes a challenge with the secret the device's TPM recovered: in one
    /// transaction the challenge closes, the token is consumed and the device is
    /// recorded (a re-enrolled device gets its new AK and starts over as pending).
    /// A wrong secret closes the challenge for good.
    pub async fn complete_challenge(&self, id: &str, secret_sha256: &str, now: i64) -> Result<Result<(String, String), EnrollRefusal>, ServerError> {
        let mut tx = self.tx(Mode::Shared).await?;
        let row = tx
            .opt(
                "SELECT token_sha256, device_id, hardware_class, ek_public, ek_certificate, ak_public, secret_sha256, expires_at, state
                 FROM enrollment_challenges WHERE id = ?1",
                args![id],
            )
            .await?;
        let Some(r) = row else { return Ok(Err(EnrollRefusal::UnknownChallenge)) };
        let (token, device_id, class) = (r.text(0)?, r.text(1)?, r.text(2)?);
        let (ek, ek_cert, ak, want, expires) = (r.blob(3)?, r.opt_blob(4)?, r.blob(5)?, r.text(6)?, r.int(7)?);
        let state = ChallengeState::from_sql("enrollment_challenges.state", &r.text(8)?)?;
        if state != ChallengeState::Open {
            return Ok(Err(EnrollRefusal::ChallengeClosed(state)));
        }
        if expires <= now {
            return Ok(Err(EnrollRefusal::ChallengeExpired));
        }
        if want != secret_sha256 {
            tx.execute("UPDATE enrollment_challenges SET state = 'failed' WHERE id = ?1", args![id]).await?;
            tx.commit().await?;
            return Ok(Err(EnrollRefusal::WrongSecret));
        }
        let consumed = tx
            .execute(
                "UPDATE enrollment_tokens SET used_at = ?1, used_by = ?2 WHERE token_sha256 = ?3 AND used_at IS NULL",
                args![chrono::Utc::now().to_rfc3339(), &device_id, &token],
            )
            .await?;
        if consumed != 1 {
            return Ok(Err(EnrollRefusal::TokenUsed));
        }
        tx.execute("UPDATE enrollment_challenges SET state = 'completed' WHERE id = ?1", args![id]).await?;
        let labels = tx.one("SELECT labels FROM enrollment_tokens WHERE token_sha256 = ?1", args![&token]).await?.text(0)?;
        tx.execute(
            "INSERT INTO devices (device_id, hardware_class, ek_public, ek_certificate, ak_public, enrolled_at, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (device_id) DO UPDATE SET hardware_class = excluded.hardware_class, ek_certificate = excluded.ek_certificate,
               ak_public = excluded.ak_public, enrolled_at = excluded.enrolled_at, attestation = 'pending', attestation_reason = NULL,
               labels = excluded.labels",
            args![&device_id, &class, &ek, ek_cert.as_ref(), &ak, chrono::Utc::now().to_rfc3339(), labels],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok((device_id, class)))
    }

    fn device_from_row(r: &Row) -> Result<Device, ServerError> {
        let attestation = AttestationState::from_sql("devices.attestation", &r.text(9)?)?;
        Ok(Device {
            device_id: r.text(0)?,
            hardware_class: r.text(1)?,
            ak_public: r.blob(2)?,
            has_ek_certificate: r.opt_blob(3)?.is_some(),
            enrolled_at: r.text(4)?,
            last_checkin_at: r.opt_text(5)?,
            slot: r.opt_text(6)?,
            version: r.opt_text(7)?,
            image_sha256: r.opt_text(8)?,
            quarantined: attestation == AttestationState::Failed,
            attestation,
            attestation_reason: r.opt_text(10)?,
            attested_at: r.opt_text(11)?,
            health: r.opt_text(12)?.map(|h| DeviceHealth::from_sql("devices.health", &h)).transpose()?,
            sbom_sha256: r.opt_text(13)?,
            labels: serde_json::from_str(&r.text(14)?).unwrap_or_default(),
            policy: r.opt_text(15)?.and_then(|p| serde_json::from_str(&p).ok()),
        })
    }

    const DEVICE_COLUMNS: &'static str = "device_id, hardware_class, ak_public, ek_certificate, enrolled_at, last_checkin_at, slot, version, image_sha256, attestation, attestation_reason, attested_at, health, sbom_sha256, labels, policy";

    pub async fn device(&self, id: &str) -> Result<Option<Device>, ServerError> {
        let sql = format!("SELECT {} FROM devices WHERE device_id = ?1", Self::DEVICE_COLUMNS);
        self.query(&sql, args![id]).await?.first().map(Self::device_from_row).transpose()
    }

    pub async fn devices(&self) -> Result<Vec<Device>, ServerError> {
        let sql = format!("SELECT {} FROM devices ORDER BY device_id", Self::DEVICE_COLUMNS);
        self.query(&sql, args![]).await?.iter().map(Self::device_from_row).collect()
    }

    /// A single-use nonce for `device_id`, valid until `expires_at` (Unix milliseconds,
    /// like `now`). Refused for a device that is not enrolled, and for one that already
    /// has `MAX_OPEN_NONCES` unused, unexpired nonces (the endpoint is unauthenticated;
    /// this bounds what anyone can make the server store).
    pub async fn issue_nonce(&self, device_id: &str, expires_at: i64, now: i64) -> Result<NonceIssue, ServerError> {
        let nonce = random_hex()?;
        // An issued nonce lost to a power cut costs the device one retry, so this commit
        // does not wait for the disk; the check-in that uses it (and every commit after
        // it) is synced in full, which makes this one durable too.
        let mut tx = self.tx(Mode::Lazy).await?;
        let r = tx
            .one(
                "SELECT (SELECT count(*) FROM devices WHERE device_id = ?1),
                        (SELECT count(*) FROM nonces WHERE device_id = ?1 AND used = 0 AND expires_at > ?2)",
                args![device_id, now],
            )
            .await?;
        if r.int(0)? == 0 {
            return Ok(NonceIssue::UnknownDevice);
        }
        if r.int(1)? >= MAX_OPEN_NONCES {
            return Ok(NonceIssue::TooMany);
        }
        tx.execute("INSERT INTO nonces (nonce, device_id, expires_at) VALUES (?1, ?2, ?3)", args![&nonce, device_id, expires_at]).await?;
        tx.commit().await?;
        Ok(NonceIssue::Issued(nonce))
    }

    /// Removes nonces expired for an hour (the server's ticker calls it); the number
    /// removed.
    pub async fn purge_nonces(&self, now: i64) -> Result<u64, ServerError> {
        self.execute("DELETE FROM nonces WHERE expires_at < ?1", args![now - 3_600_000]).await
    }

    /// Uses a nonce up: it must have been issued to `device_id`, be unused and unexpired.
    pub async fn consume_nonce(&self, nonce: &str, device_id: &str, now: i64) -> Result<Result<(), NonceRefusal>, ServerError> {
        let mut tx = self.tx(Mode::Exclusive).await?;
        let r = consume_nonce_tx(tx.as_mut(), nonce, device_id, now).await?;
        if r.is_ok() {
            tx.commit().await?;
        }
        Ok(r)
    }

    /// A whole check-in in one write transaction (one fsync): the nonce used up, the
    /// verdict and state recorded, and the director's decision (rollout feedback and
    /// assignment). A refused nonce changes nothing.
    pub async fn checkin(
        &self,
        nonce: &str,
        c: &CheckinRecord<'_>,
        f: &crate::rollout_store::DeviceFacts<'_>,
        releases: &[crate::repository::FirmwareRelease],
        now_ms: i64,
    ) -> Result<Result<crate::rollout_store::Decision, NonceRefusal>, ServerError> {
        let mut tx = self.tx(Mode::Write).await?;
        // The director first: it may have to wait for other servers' decisions, and a
        // transaction that waits must hold no rows they may need.
        let decision = crate::rollout_store::director_checkin_tx(tx.as_mut(), f, releases, now_ms / 1000).await?;
        if let Err(r) = consume_nonce_tx(tx.as_mut(), nonce, c.device_id, now_ms).await? {
            return Ok(Err(r));
        }
        record_checkin_tx(tx.as_mut(), c).await?;
        tx.commit().await?;
        Ok(Ok(decision))
    }

    pub async fn attestations(&self, device_id: &str, limit: u32) -> Result<Vec<serde_json::Value>, ServerError> {
        let rows = self
            .query(
                "SELECT at, verdict, reason, slot, version, image_sha256 FROM attestations WHERE device_id = ?1 ORDER BY id DESC LIMIT ?2",
                args![device_id, limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "at": r.text(0)?, "verdict": r.text(1)?, "reason": r.opt_text(2)?,
                    "slot": r.opt_text(3)?, "version": r.opt_text(4)?, "image_sha256": r.opt_text(5)?,
                }))
            })
            .collect()
    }

    pub async fn sbom_indexed(&self, sbom_sha256: &str) -> Result<bool, ServerError> {
        Ok(!self.query("SELECT 1 FROM sbom_releases WHERE sbom_sha256 = ?1", args![sbom_sha256]).await?.is_empty())
    }

    /// Records one release's SBOM components (one transaction; idempotent per SBOM).
    pub async fn index_sbom(&self, r: &SbomRelease, components: &[outpost_sbom::ComponentRef]) -> Result<(), ServerError> {
        let mut tx = self.tx(Mode::Shared).await?;
        let fresh = tx
            .execute(
                "INSERT INTO sbom_releases (sbom_sha256, target, hardware_class, version, image_sha256, components, indexed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                args![&r.sbom_sha256, &r.target, &r.hardware_class, &r.version, &r.image_sha256, components.len() as i64, chrono::Utc::now().to_rfc3339()],
            )
            .await?;
        if fresh == 1 {
            for c in components {
                let base = c.purl.as_deref().map(|p| outpost_sbom::query::purl_base(p).unwrap_or_else(|_| UNREADABLE_PURL.to_owned()));
                tx.execute(
                    "INSERT INTO sbom_components (sbom_sha256, name, version, purl, purl_base) VALUES (?1, ?2, ?3, ?4, ?5)",
                    args![&r.sbom_sha256, &c.name, c.version.as_deref(), c.purl.as_deref(), base],
                )
                .await?;
            }
        }
        tx.commit().await
    }

    /// Releases whose SBOM has a component matching `query`, and the devices whose
    /// attested image is one of those releases. The rows SQL finds are decided by
    /// [`outpost_sbom::query::Query::check`], as on devices; a component that cannot be
    /// decided is kept, with the reason in [`SbomHit::undecided`].
    pub async fn sbom_search(&self, query: &outpost_sbom::query::Query) -> Result<SbomSearch, ServerError> {
        use outpost_sbom::query::{Match, Subject};
        let mut tx = self.tx(Mode::Shared).await?;
        let (sql, args) = match &query.subject {
            Subject::Name(n) => (
                "SELECT c.name, c.version, c.purl, r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256
                 FROM sbom_components c JOIN sbom_releases r ON r.sbom_sha256 = c.sbom_sha256 WHERE c.name = ?1",
                args![n.as_str()],
            ),
            // A purl that cannot be read may be this one.
            Subject::Purl { base, .. } => (
                "SELECT c.name, c.version, c.purl, r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256
                 FROM sbom_components c JOIN sbom_releases r ON r.sbom_sha256 = c.sbom_sha256 WHERE c.purl_base IN (?1, ?2)",
                args![base.as_str(), UNREADABLE_PURL],
            ),
        };
        let rows = tx.query(sql, args).await?;
        let mut releases: Vec<SbomHit> = Vec::new();
        for r in rows {
            let component = outpost_sbom::ComponentRef { name: r.text(0)?, version: r.opt_text(1)?, purl: r.opt_text(2)? };
            let undecided = match query.check(&component) {
                Match::No => continue,
                Match::Yes => None,
                Match::Undecided(why) => Some(why),
            };
            releases.push(SbomHit {
                component: component.name,
                component_version: component.version,
                purl: component.purl,
                sbom_sha256: r.text(3)?,
                target: r.text(4)?,
                hardware_class: r.text(5)?,
                version: r.text(6)?,
                image_sha256: r.text(7)?,
                undecided,
            });
        }
        let mut devices = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for rel in &releases {
            if !seen.insert(rel.image_sha256.clone()) {
                continue;
            }
            let rows = tx
                .query(
                    "SELECT device_id, hardware_class, version, attestation FROM devices WHERE image_sha256 = ?1 ORDER BY device_id",
                    args![&rel.image_sha256],
                )
                .await?;
            for r in rows {
                devices.push(SbomDevice {
                    device_id: r.text(0)?,
                    hardware_class: r.text(1)?,
                    version: r.opt_text(2)?,
                    quarantined: AttestationState::from_sql("devices.attestation", &r.text(3)?)? == AttestationState::Failed,
                    release: rel.target.clone(),
                });
            }
        }
        Ok(SbomSearch { releases, devices })
    }

    pub async fn log(&self, actor: &str, action: &str, detail: &serde_json::Value) -> Result<(), ServerError> {
        self.execute(
            "INSERT INTO repository_log (at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            args![chrono::Utc::now().to_rfc3339(), actor, action, detail.to_string()],
        )
        .await?;
        Ok(())
    }

    /// Records a report no device signed, for a device id that is not enrolled
    /// (`false`: the id is enrolled, whose reports come only in attested check-ins),
    /// and drops the oldest unattested reports beyond the bounds.
    pub async fn add_unattested_report(&self, r: &InstallReport) -> Result<bool, ServerError> {
        let mut tx = self.tx(Mode::Shared).await?;
        if tx.opt("SELECT 1 FROM devices WHERE device_id = ?1", args![&r.device_id]).await?.is_some() {
            return Ok(false);
        }
        tx.execute(INSERT_REPORT, report_args(&chrono::Utc::now().to_rfc3339(), r, false)).await?;
        tx.execute(
            "DELETE FROM install_reports WHERE attested = 0 AND device_id = ?1 AND id <=
               (SELECT id FROM install_reports WHERE attested = 0 AND device_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            args![&r.device_id, MAX_UNATTESTED_REPORTS_PER_DEVICE],
        )
        .await?;
        tx.execute(
            "DELETE FROM install_reports WHERE attested = 0 AND id <=
               (SELECT id FROM install_reports WHERE attested = 0 ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            args![MAX_UNATTESTED_REPORTS],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Install reports, newest first; `attested_only` leaves out the ones no device signed.
    pub async fn recent_reports(&self, device: Option<&str>, limit: u32, attested_only: bool) -> Result<Vec<serde_json::Value>, ServerError> {
        let rows = self
            .query(
                "SELECT received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at, attested
                 FROM install_reports WHERE (?1 IS NULL OR device_id = ?1) AND (?3 = 0 OR attested = 1) ORDER BY id DESC LIMIT ?2",
                args![device, limit, i64::from(attested_only)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "received_at": r.text(0)?, "device_id": r.text(1)?, "hardware_class": r.text(2)?, "target": r.text(3)?,
                    "version": r.text(4)?, "outcome": r.text(5)?, "reason": r.opt_text(6)?, "slot": r.text(7)?, "at": r.text(8)?,
                    "attested": r.int(9)? == 1,
                }))
            })
            .collect()
    }

    pub async fn recent_log(&self, limit: u32) -> Result<Vec<serde_json::Value>, ServerError> {
        let rows = self.query("SELECT at, actor, action, detail FROM repository_log ORDER BY id DESC LIMIT ?1", args![limit]).await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "at": r.text(0)?, "actor": r.text(1)?, "action": r.text(2)?,
                    "detail": serde_json::from_str::<serde_json::Value>(&r.text(3)?).unwrap_or(serde_json::Value::Null),
                }))
            })
            .collect()
    }
}

pub use outpost_protocol::report::{InstallReport, ReportOutcome};

/// Stores for the store suite: SQLite in a directory, or a fresh database on the
/// PostgreSQL server named by `OUTPOST_TEST_POSTGRES` (`postgres://USER@HOST:PORT`;
/// `scripts/test.sh` starts one and sets it).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

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

    /// Enrolls `ids` as bare devices of class rpi4.
    pub(crate) async fn add_devices(s: &Store, ids: impl Iterator<Item = String>) {
        let mut tx = s.tx(Mode::Shared).await.unwrap_or_else(|e| panic!("{e}"));
        for id in ids {
            tx.execute(
                "INSERT INTO devices (device_id, hardware_class, ek_public, ak_public, enrolled_at) VALUES (?1, 'rpi4', ?2, ?2, 'now')",
                crate::args![id, &vec![0u8]],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
        tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// The store suite: each scenario (an `async fn(Backend)` beside the call) runs on a
    /// fresh SQLite database in a temporary directory and on a fresh PostgreSQL database.
    macro_rules! on_both_backends {
        ($($scenario:ident;)+) => {$(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
                    super::$scenario(crate::store::Backend::Sqlite(dir.path().join("t.db"))).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario(crate::store::testing::postgres_backend().await).await;
                }
            }
        )+};
    }
    pub(crate) use on_both_backends;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    use crate::store::testing::{add_devices, on_both_backends};

    on_both_backends! {
        nonces_are_single_use_for_their_device_and_bounded;
        enrollment_uses_a_token_once_and_a_wrong_secret_closes_the_challenge;
        reopening_migrates_once_and_keeps_everything;
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
        assert_eq!((d.attestation.as_str(), d.labels, d.ak_public, d.has_ek_certificate), ("pending", labels, b"ak".to_vec(), false));
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
        let mut tx = ok(second.tx(Mode::Autocommit).await);
        assert_eq!(ok(ok(tx.one(version, crate::args![]).await).int(0)), ALTERATIONS.len() as i64);
        // A database a newer server migrated is refused, not run with a schema this
        // server does not know.
        let newer = ALTERATIONS.len() + 1;
        match &b {
            Backend::Sqlite(_) => ok(tx.batch(&format!("PRAGMA user_version = {newer}")).await),
            Backend::Postgres { .. } => drop(ok(tx.execute("UPDATE outpost_schema SET version = ?1", crate::args![newer as i64]).await)),
        }
        drop(tx);
        let refused = Store::open(&b).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains(&format!("schema is version {newer}, newer than this server's")), "{refused}");
    }
}
