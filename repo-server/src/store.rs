//! State store (SQLite, embedded): API tokens, stored hashed, and the append-only
//! log of publishes and online re-signs.

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
CREATE TABLE IF NOT EXISTS repository_log (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

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
        conn.execute_batch(MIGRATIONS)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
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
