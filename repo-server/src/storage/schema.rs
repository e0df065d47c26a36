//! The one schema of the state store: every table, created when missing, and the
//! numbered alterations since.

use crate::storage::db::Dialect;

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

const ROLLOUT_TABLES: &str = "
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    labels TEXT NOT NULL,
    release TEXT NOT NULL,
    waves TEXT NOT NULL,
    gate TEXT NOT NULL CHECK (gate IN ('auto', 'manual')),
    state TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY,
    rollout_id TEXT NOT NULL,
    at TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    cause TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id);
CREATE TABLE IF NOT EXISTS assignments (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('assigned', 'installing', 'healthy', 'rolled_back', 'attestation_failed')),
    reason TEXT,
    from_release TEXT,
    assigned_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS assignments_device ON assignments (device_id);
CREATE INDEX IF NOT EXISTS assignments_wave ON assignments (rollout_id, wave, status);
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

/// The tables, created when missing (both backends; see `Dialect::schema`).
pub(super) fn base_schema(dialect: Dialect) -> String {
    let append_only = match dialect {
        Dialect::Sqlite => APPEND_ONLY_SQLITE,
        Dialect::Postgres => APPEND_ONLY_POSTGRES,
    };
    format!("{TABLES}\n{ROLLOUT_TABLES}\n{append_only}")
}

/// Schema changes to tables that already exist, numbered from 1 (SQLite keeps the
/// number in `PRAGMA user_version`, PostgreSQL in `outpost_schema`).
pub(super) const ALTERATIONS: [&str; 9] = [
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
    // 5: slots are typed ("A" or "B"). Servers before took any 1-8 characters, which
    // no agent ever sent: such a slot is forgotten (a device's and an attestation's
    // are unknown until the next check-in), and an install report that names one
    // (unsigned, or from a broken agent) is dropped, so no row stops a device's
    // check-ins or a listing.
    "UPDATE devices SET slot = NULL WHERE slot NOT IN ('A', 'B');
     UPDATE attestations SET slot = NULL WHERE slot NOT IN ('A', 'B');
     DELETE FROM install_reports WHERE slot NOT IN ('A', 'B');",
    // 6: an attested boot-chain check-in's measured-boot events beside the golden values
    // they matched (api::devices::BootEvents as JSON), kept once per distinct boot under
    // the SHA-256 of that JSON. Rows from before have none.
    "CREATE TABLE IF NOT EXISTS boot_event_sets (
         sha256 TEXT PRIMARY KEY,
         events TEXT NOT NULL
     );
     ALTER TABLE attestations ADD COLUMN boot_events_sha256 TEXT;",
    // 7: integrity incidents (protocol::incident): dm-verity blocks that failed
    // verification on a device, read from the kernel's pstore record after the restart.
    // One row per device, record, dev and block, attested or not (an agent may send one
    // twice). Servers before had none.
    "CREATE TABLE IF NOT EXISTS integrity_incidents (
         id INTEGER PRIMARY KEY,
         received_at TEXT NOT NULL,
         device_id TEXT NOT NULL,
         hardware_class TEXT NOT NULL,
         kind TEXT NOT NULL CHECK (kind IN ('verity_data', 'verity_metadata')),
         dev TEXT NOT NULL,
         block_no BIGINT NOT NULL,
         slot TEXT CHECK (slot IN ('A', 'B')),
         release TEXT,
         boot_at TEXT NOT NULL,
         record TEXT NOT NULL,
         line TEXT NOT NULL,
         attested INTEGER NOT NULL,
         UNIQUE (device_id, record, dev, block_no, attested)
     );
     CREATE INDEX IF NOT EXISTS integrity_incidents_device ON integrity_incidents (device_id, id);",
    // 8: client certificates the device CA issued (serial hex, lowercase), and their
    // revocation; devices an operator revoked, which get no new certificate until
    // allowed again. Servers before issued none.
    "CREATE TABLE IF NOT EXISTS device_certificates (
         serial TEXT PRIMARY KEY,
         device_id TEXT NOT NULL,
         issued_at TEXT NOT NULL,
         not_after BIGINT NOT NULL,
         revoked_at BIGINT,
         revoked_reason TEXT
     );
     CREATE INDEX IF NOT EXISTS device_certificates_device ON device_certificates (device_id);
     CREATE INDEX IF NOT EXISTS device_certificates_revoked ON device_certificates (revoked_at);
     CREATE TABLE IF NOT EXISTS device_certificate_blocks (
         device_id TEXT PRIMARY KEY,
         blocked_at BIGINT NOT NULL,
         blocked_by TEXT NOT NULL,
         reason TEXT NOT NULL
     );",
    // 9: expired certificates are purged by expiry (see Store::purge_certificates).
    "CREATE INDEX IF NOT EXISTS device_certificates_expiry ON device_certificates (not_after);",
];
