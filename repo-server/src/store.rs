//! State store (SQLite, embedded): API tokens, stored hashed; the append-only log of
//! publishes, online re-signs and admin actions; devices, their enrollment and
//! attestation records.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ServerError;

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

pub struct Store {
    conn: Mutex<Connection>,
}

const MIGRATIONS: &str = "
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
-- The audit log is append-only: the database itself refuses to change or drop entries.
CREATE TRIGGER IF NOT EXISTS repository_log_append_only_update BEFORE UPDATE ON repository_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS repository_log_append_only_delete BEFORE DELETE ON repository_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
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
    ChallengeClosed(String),
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
    pub health: Option<String>,
    pub attestation: String,
    pub attestation_reason: Option<String>,
    pub attested_at: Option<String>,
    /// The latest attestation failed: nothing may be assigned to this device.
    pub quarantined: bool,
    /// Labels rollout selectors match.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The network policy the device reported at its last attested check-in.
    pub policy: Option<serde_json::Value>,
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
    pub verdict: &'a str,
    pub reason: Option<&'a str>,
    pub slot: &'a str,
    pub version: Option<&'a str>,
    pub image_sha256: Option<&'a str>,
    pub sbom_sha256: Option<&'a str>,
    pub health: &'a str,
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

/// An enrollment challenge as stored: token hash, device id, class, EK public, EK
/// certificate, AK public, secret hash, expiry, state.
type ChallengeRow = (String, String, String, Vec<u8>, Option<Vec<u8>>, Vec<u8>, String, i64, String);

/// Unused, unexpired nonces one device may have at a time.
pub const MAX_OPEN_NONCES: i64 = 16;

fn consume_nonce_tx(tx: &rusqlite::Transaction<'_>, nonce: &str, device_id: &str, now: i64) -> Result<Result<(), NonceRefusal>, ServerError> {
    let row: Option<(String, i64, i64)> = tx
        .prepare_cached("SELECT device_id, expires_at, used FROM nonces WHERE nonce = ?1")?
        .query_row(params![nonce], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let refusal = match row {
        None => Some(NonceRefusal::Unknown),
        Some((d, _, _)) if d != device_id => Some(NonceRefusal::OtherDevice),
        Some((_, _, used)) if used != 0 => Some(NonceRefusal::Used),
        Some((_, exp, _)) if exp <= now => Some(NonceRefusal::Expired(exp)),
        Some(_) => None,
    };
    if let Some(r) = refusal {
        return Ok(Err(r));
    }
    // The guarded update makes use-once hold under concurrent check-ins too.
    let n = tx.prepare_cached("UPDATE nonces SET used = 1 WHERE nonce = ?1 AND used = 0")?.execute(params![nonce])?;
    Ok(if n == 1 { Ok(()) } else { Err(NonceRefusal::Used) })
}

fn record_checkin_tx(tx: &rusqlite::Transaction<'_>, c: &CheckinRecord<'_>) -> Result<(), ServerError> {
    let now = chrono::Utc::now().to_rfc3339();
    tx.prepare_cached(
        "INSERT INTO attestations (device_id, at, verdict, reason, slot, version, image_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![c.device_id, now, c.verdict, c.reason, c.slot, c.version, c.image_sha256])?;
    tx.prepare_cached(
        "UPDATE devices SET last_checkin_at = ?1, slot = ?2, version = ?3, image_sha256 = ?4, health = ?5,
           attestation = ?6, attestation_reason = ?7, attested_at = ?1, sbom_sha256 = ?9, policy = COALESCE(?10, policy) WHERE device_id = ?8",
    )?
    .execute(params![now, c.slot, c.version, c.image_sha256, c.health, c.verdict, c.reason, c.device_id, c.sbom_sha256, c.policy])?;
    for r in c.reports {
        tx.prepare_cached(
            "INSERT INTO install_reports (received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![now, r.device_id, r.hardware_class, r.target, r.version, r.outcome.as_str(), r.reason, r.slot, r.at])?;
    }
    Ok(())
}

/// Schema changes to tables that already exist, by `PRAGMA user_version`.
const ALTERATIONS: [&str; 2] = [
    // 1: device labels (rollout selectors) and the per-device director version;
    // labels given to enrollment tokens.
    "ALTER TABLE devices ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE devices ADD COLUMN director_version INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE enrollment_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';",
    // 2: the network policy status devices report at check-in.
    "ALTER TABLE devices ADD COLUMN policy TEXT;",
];

fn migrate(conn: &Connection) -> Result<(), ServerError> {
    loop {
        // Read the version under the write lock: another server may be migrating too.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let have = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        let Some(sql) = ALTERATIONS.get(have) else {
            conn.execute_batch("COMMIT")?;
            return Ok(());
        };
        if let Err(e) = conn.execute_batch(&format!("{sql} PRAGMA user_version = {};", have + 1)) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        conn.execute_batch("COMMIT")?;
    }
}

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, ServerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ServerError::io("create", dir, e))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Two servers may share one database file: wait for the other's write lock.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(MIGRATIONS)?;
        conn.execute_batch(crate::rollout_store::MIGRATIONS)?;
        migrate(&conn)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A poisoned lock only means another thread panicked mid-query; SQLite's own
        // transactions keep the data consistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a token and returns it; only its hash is stored.
    pub fn create_token(&self, name: &str, role: TokenRole) -> Result<String, ServerError> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| ServerError::State(format!("no randomness: {e}")))?;
        let token = format!("opt_{}", hex::encode(raw));
        self.conn().execute(
            "INSERT INTO api_tokens (name, role, token_sha256, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), hash_token(&token), chrono::Utc::now().to_rfc3339()],
        )?;
        Ok(token)
    }

    pub fn authenticate(&self, token: &str) -> Result<Option<Principal>, ServerError> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row("SELECT name, role FROM api_tokens WHERE token_sha256 = ?1", params![hash_token(token)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.and_then(|(name, role)| TokenRole::parse(&role).map(|role| Principal { name, role })))
    }

    /// A one-time enrollment token for `hardware_class`, valid until `expires_at` (Unix s).
    /// The device enrolled with it gets `labels`.
    pub fn create_enrollment_token(
        &self,
        hardware_class: &str,
        labels: &std::collections::BTreeMap<String, String>,
        created_by: &str,
        expires_at: i64,
    ) -> Result<String, ServerError> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| ServerError::State(format!("no randomness: {e}")))?;
        let token = format!("ote_{}", hex::encode(raw));
        let labels = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        self.conn().execute(
            "INSERT INTO enrollment_tokens (token_sha256, hardware_class, created_by, created_at, expires_at, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![hash_token(&token), hardware_class, created_by, chrono::Utc::now().to_rfc3339(), expires_at, labels],
        )?;
        Ok(token)
    }

    /// Whether an enrollment token may be used now for `hardware_class` (checked before
    /// any expensive work; `open_challenge` checks again).
    pub fn check_enrollment_token(&self, token: &str, hardware_class: &str, now: i64) -> Result<Result<(), EnrollRefusal>, ServerError> {
        let row: Option<(String, i64, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT hardware_class, expires_at, used_at FROM enrollment_tokens WHERE token_sha256 = ?1",
                params![hash_token(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(match row {
            None => Err(EnrollRefusal::UnknownToken),
            Some((_, _, Some(_))) => Err(EnrollRefusal::TokenUsed),
            Some((_, exp, None)) if exp <= now => Err(EnrollRefusal::TokenExpired(exp)),
            Some((class, _, None)) if class != hardware_class => Err(EnrollRefusal::WrongClass { token: class }),
            Some(_) => Ok(()),
        })
    }

    /// Checks an enrollment token (unused, unexpired, for this class) and records the
    /// challenge made for it. The token is consumed only when the device proves itself.
    pub fn open_challenge(&self, c: &NewChallenge<'_>, now: i64) -> Result<Result<(), EnrollRefusal>, ServerError> {
        let conn = self.conn();
        let row: Option<(String, i64, Option<String>)> = conn
            .query_row(
                "SELECT hardware_class, expires_at, used_at FROM enrollment_tokens WHERE token_sha256 = ?1",
                params![hash_token(c.token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let refusal = match row {
            None => Some(EnrollRefusal::UnknownToken),
            Some((_, _, Some(_))) => Some(EnrollRefusal::TokenUsed),
            Some((_, exp, None)) if exp <= now => Some(EnrollRefusal::TokenExpired(exp)),
            Some((class, _, None)) if class != c.hardware_class => Some(EnrollRefusal::WrongClass { token: class }),
            Some(_) => None,
        };
        if let Some(r) = refusal {
            return Ok(Err(r));
        }
        conn.execute(
            "INSERT INTO enrollment_challenges (id, token_sha256, device_id, hardware_class, ek_public, ek_certificate, ak_public, secret_sha256, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![c.id, hash_token(c.token), c.device_id, c.hardware_class, c.ek_public, c.ek_certificate, c.ak_public, c.secret_sha256, c.expires_at],
        )?;
        Ok(Ok(()))
    }

    /// Completes a challenge with the secret the device's TPM recovered: in one
    /// transaction the challenge closes, the token is consumed and the device is
    /// recorded (a re-enrolled device gets its new AK and starts over as pending).
    /// A wrong secret closes the challenge for good.
    pub fn complete_challenge(&self, id: &str, secret_sha256: &str, now: i64) -> Result<Result<(String, String), EnrollRefusal>, ServerError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<ChallengeRow> = tx
            .query_row(
                "SELECT token_sha256, device_id, hardware_class, ek_public, ek_certificate, ak_public, secret_sha256, expires_at, state
                 FROM enrollment_challenges WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)),
            )
            .optional()?;
        let Some((token, device_id, class, ek, ek_cert, ak, want, expires, state)) = row else {
            return Ok(Err(EnrollRefusal::UnknownChallenge));
        };
        if state != "open" {
            return Ok(Err(EnrollRefusal::ChallengeClosed(state)));
        }
        if expires <= now {
            return Ok(Err(EnrollRefusal::ChallengeExpired));
        }
        if want != secret_sha256 {
            tx.execute("UPDATE enrollment_challenges SET state = 'failed' WHERE id = ?1", params![id])?;
            tx.commit()?;
            return Ok(Err(EnrollRefusal::WrongSecret));
        }
        let consumed = tx.execute(
            "UPDATE enrollment_tokens SET used_at = ?1, used_by = ?2 WHERE token_sha256 = ?3 AND used_at IS NULL",
            params![chrono::Utc::now().to_rfc3339(), device_id, token],
        )?;
        if consumed != 1 {
            return Ok(Err(EnrollRefusal::TokenUsed));
        }
        tx.execute("UPDATE enrollment_challenges SET state = 'completed' WHERE id = ?1", params![id])?;
        let labels: String = tx.query_row("SELECT labels FROM enrollment_tokens WHERE token_sha256 = ?1", params![token], |r| r.get(0))?;
        tx.execute(
            "INSERT INTO devices (device_id, hardware_class, ek_public, ek_certificate, ak_public, enrolled_at, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (device_id) DO UPDATE SET hardware_class = excluded.hardware_class, ek_certificate = excluded.ek_certificate,
               ak_public = excluded.ak_public, enrolled_at = excluded.enrolled_at, attestation = 'pending', attestation_reason = NULL,
               labels = excluded.labels",
            params![device_id, class, ek, ek_cert, ak, chrono::Utc::now().to_rfc3339(), labels],
        )?;
        tx.commit()?;
        Ok(Ok((device_id, class)))
    }

    fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
        let attestation: String = r.get(9)?;
        Ok(Device {
            device_id: r.get(0)?,
            hardware_class: r.get(1)?,
            ak_public: r.get(2)?,
            has_ek_certificate: r.get::<_, Option<Vec<u8>>>(3)?.is_some(),
            enrolled_at: r.get(4)?,
            last_checkin_at: r.get(5)?,
            slot: r.get(6)?,
            version: r.get(7)?,
            image_sha256: r.get(8)?,
            quarantined: attestation == "failed",
            attestation,
            attestation_reason: r.get(10)?,
            attested_at: r.get(11)?,
            health: r.get(12)?,
            sbom_sha256: r.get(13)?,
            labels: serde_json::from_str(&r.get::<_, String>(14)?).unwrap_or_default(),
            policy: r.get::<_, Option<String>>(15)?.and_then(|p| serde_json::from_str(&p).ok()),
        })
    }

    const DEVICE_COLUMNS: &'static str = "device_id, hardware_class, ak_public, ek_certificate, enrolled_at, last_checkin_at, slot, version, image_sha256, attestation, attestation_reason, attested_at, health, sbom_sha256, labels, policy";

    pub fn device(&self, id: &str) -> Result<Option<Device>, ServerError> {
        let sql = format!("SELECT {} FROM devices WHERE device_id = ?1", Self::DEVICE_COLUMNS);
        Ok(self.conn().query_row(&sql, params![id], Self::device_from_row).optional()?)
    }

    pub fn devices(&self) -> Result<Vec<Device>, ServerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {} FROM devices ORDER BY device_id", Self::DEVICE_COLUMNS))?;
        let rows = stmt.query_map([], Self::device_from_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A single-use nonce for `device_id`, valid until `expires_at` (Unix milliseconds,
    /// like `now`); nonces expired for an hour go.
    /// None when the device already has `MAX_OPEN_NONCES` unused, unexpired nonces (the
    /// endpoint is unauthenticated; this bounds what anyone can make the server store).
    pub fn issue_nonce(&self, device_id: &str, expires_at: i64, now: i64) -> Result<Option<String>, ServerError> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| ServerError::State(format!("no randomness: {e}")))?;
        let nonce = hex::encode(raw);
        let conn = self.conn();
        conn.execute("DELETE FROM nonces WHERE expires_at < ?1", params![now - 3_600_000])?;
        let open: i64 = conn.query_row(
            "SELECT count(*) FROM nonces WHERE device_id = ?1 AND used = 0 AND expires_at > ?2",
            params![device_id, now],
            |r| r.get(0),
        )?;
        if open >= MAX_OPEN_NONCES {
            return Ok(None);
        }
        // An issued nonce lost to a power cut costs the device one retry, so this commit
        // does not wait for the disk; the check-in that uses it (and every commit after
        // it) is synced in full, which makes this one durable too.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let inserted = conn.execute("INSERT INTO nonces (nonce, device_id, expires_at) VALUES (?1, ?2, ?3)", params![nonce, device_id, expires_at]);
        conn.pragma_update(None, "synchronous", "FULL")?;
        inserted?;
        Ok(Some(nonce))
    }

    /// Uses a nonce up: it must have been issued to `device_id`, be unused and unexpired.
    pub fn consume_nonce(&self, nonce: &str, device_id: &str, now: i64) -> Result<Result<(), NonceRefusal>, ServerError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let r = consume_nonce_tx(&tx, nonce, device_id, now)?;
        if r.is_ok() {
            tx.commit()?;
        }
        Ok(r)
    }

    /// Records a check-in: the verdict (history and latest), the device's reported
    /// state and the install reports it carried, in one transaction.
    pub fn record_checkin(&self, c: &CheckinRecord<'_>) -> Result<(), ServerError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        record_checkin_tx(&tx, c)?;
        tx.commit()?;
        Ok(())
    }

    /// A whole check-in in one write transaction (one fsync): the nonce used up, the
    /// verdict and state recorded, and the director's decision (rollout feedback and
    /// assignment). A refused nonce changes nothing.
    pub fn checkin(
        &self,
        nonce: &str,
        c: &CheckinRecord<'_>,
        f: &crate::rollout_store::DeviceFacts<'_>,
        releases: &[crate::repository::FirmwareRelease],
        now_ms: i64,
    ) -> Result<Result<crate::rollout_store::Decision, NonceRefusal>, ServerError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Err(r) = consume_nonce_tx(&tx, nonce, c.device_id, now_ms)? {
            return Ok(Err(r));
        }
        record_checkin_tx(&tx, c)?;
        let decision = crate::rollout_store::director_checkin_tx(&tx, f, releases, now_ms / 1000)?;
        tx.commit()?;
        Ok(Ok(decision))
    }

    pub fn attestations(&self, device_id: &str, limit: u32) -> Result<Vec<serde_json::Value>, ServerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, verdict, reason, slot, version, image_sha256 FROM attestations WHERE device_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![device_id, limit], |r| {
            Ok(serde_json::json!({
                "at": r.get::<_, String>(0)?, "verdict": r.get::<_, String>(1)?, "reason": r.get::<_, Option<String>>(2)?,
                "slot": r.get::<_, Option<String>>(3)?, "version": r.get::<_, Option<String>>(4)?,
                "image_sha256": r.get::<_, Option<String>>(5)?,
            }))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn sbom_indexed(&self, sbom_sha256: &str) -> Result<bool, ServerError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM sbom_releases WHERE sbom_sha256 = ?1", params![sbom_sha256], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records one release's SBOM components (one transaction; idempotent per SBOM).
    pub fn index_sbom(&self, r: &SbomRelease, components: &[outpost_sbom::ComponentRef]) -> Result<(), ServerError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let fresh = tx.execute(
            "INSERT OR IGNORE INTO sbom_releases (sbom_sha256, target, hardware_class, version, image_sha256, components, indexed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256, components.len() as i64, chrono::Utc::now().to_rfc3339()],
        )?;
        if fresh == 1 {
            let mut stmt = tx.prepare("INSERT INTO sbom_components (sbom_sha256, name, version, purl, purl_base) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for c in components {
                let base = c.purl.as_deref().map(outpost_sbom::query::purl_base);
                stmt.execute(params![r.sbom_sha256, c.name, c.version, c.purl, base])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Releases whose SBOM has a component matching `query`, and the devices whose
    /// attested image is one of those releases.
    pub fn sbom_search(&self, query: &outpost_sbom::query::Query) -> Result<SbomSearch, ServerError> {
        use outpost_sbom::query::Subject;
        let conn = self.conn();
        let (sql, key) = match &query.subject {
            Subject::Name(n) => (
                "SELECT c.name, c.version, c.purl, r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256
                 FROM sbom_components c JOIN sbom_releases r ON r.sbom_sha256 = c.sbom_sha256 WHERE c.name = ?1",
                n.as_str(),
            ),
            Subject::Purl(p) => (
                "SELECT c.name, c.version, c.purl, r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256
                 FROM sbom_components c JOIN sbom_releases r ON r.sbom_sha256 = c.sbom_sha256 WHERE c.purl_base = ?1",
                p.as_str(),
            ),
        };
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params![key], |r| {
            Ok(SbomHit {
                component: r.get(0)?,
                component_version: r.get(1)?,
                purl: r.get(2)?,
                sbom_sha256: r.get(3)?,
                target: r.get(4)?,
                hardware_class: r.get(5)?,
                version: r.get(6)?,
                image_sha256: r.get(7)?,
            })
        })?;
        let mut releases: Vec<SbomHit> = Vec::new();
        for hit in rows {
            let hit = hit?;
            if query.matches_version(hit.component_version.as_deref()) {
                releases.push(hit);
            }
        }
        let mut devices = Vec::new();
        let mut dstmt = conn.prepare_cached(
            "SELECT device_id, hardware_class, version, attestation FROM devices WHERE image_sha256 = ?1 ORDER BY device_id",
        )?;
        let mut seen = std::collections::BTreeSet::new();
        for rel in &releases {
            if !seen.insert(rel.image_sha256.clone()) {
                continue;
            }
            let rows = dstmt.query_map(params![rel.image_sha256], |r| {
                Ok(SbomDevice {
                    device_id: r.get(0)?,
                    hardware_class: r.get(1)?,
                    version: r.get(2)?,
                    quarantined: r.get::<_, String>(3)? == "failed",
                    release: rel.target.clone(),
                })
            })?;
            for d in rows {
                devices.push(d?);
            }
        }
        Ok(SbomSearch { releases, devices })
    }

    pub fn log(&self, actor: &str, action: &str, detail: &serde_json::Value) -> Result<(), ServerError> {
        self.conn().execute(
            "INSERT INTO repository_log (at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![chrono::Utc::now().to_rfc3339(), actor, action, detail.to_string()],
        )?;
        Ok(())
    }

    pub fn add_report(&self, r: &InstallReport) -> Result<(), ServerError> {
        self.conn().execute(
            "INSERT INTO install_reports (received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                chrono::Utc::now().to_rfc3339(),
                r.device_id,
                r.hardware_class,
                r.target,
                r.version,
                r.outcome.as_str(),
                r.reason,
                r.slot,
                r.at
            ],
        )?;
        Ok(())
    }

    pub fn recent_reports(&self, device: Option<&str>, limit: u32) -> Result<Vec<serde_json::Value>, ServerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at
             FROM install_reports WHERE (?1 IS NULL OR device_id = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![device, limit], |r| {
            Ok(serde_json::json!({
                "received_at": r.get::<_, String>(0)?, "device_id": r.get::<_, String>(1)?,
                "hardware_class": r.get::<_, String>(2)?, "target": r.get::<_, String>(3)?,
                "version": r.get::<_, String>(4)?, "outcome": r.get::<_, String>(5)?,
                "reason": r.get::<_, Option<String>>(6)?, "slot": r.get::<_, String>(7)?,
                "at": r.get::<_, String>(8)?,
            }))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn recent_log(&self, limit: u32) -> Result<Vec<serde_json::Value>, ServerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT at, actor, action, detail FROM repository_log ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map(params![limit], |r| {
            let detail: String = r.get(3)?;
            Ok(serde_json::json!({
                "at": r.get::<_, String>(0)?, "actor": r.get::<_, String>(1)?, "action": r.get::<_, String>(2)?,
                "detail": serde_json::from_str::<serde_json::Value>(&detail).unwrap_or(serde_json::Value::Null),
            }))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

pub use outpost_protocol::report::{InstallReport, ReportOutcome};
