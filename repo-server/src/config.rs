//! Server configuration (TOML), validated into typed values at load time. Relative
//! paths are relative to the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ServerError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    data_dir: PathBuf,
    #[serde(default)]
    database: RawDb,
    repository: RawRepo,
    #[serde(default)]
    attestation: RawAttestation,
    #[serde(default)]
    director: RawDirector,
    #[serde(default)]
    rollouts: RawRollouts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirector {
    key: Option<PathBuf>,
    targets_expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollouts {
    tick: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    nonce_lifetime: Option<String>,
    challenge_lifetime: Option<String>,
    #[serde(default)]
    ek_ca_certificates: Vec<PathBuf>,
    #[serde(default)]
    accept_uncertified_eks: bool,
    /// Hardware class (or "*" for every class without its own entry) → measurement
    /// policy.
    #[serde(default)]
    classes: std::collections::BTreeMap<String, RawMeasurement>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeasurement {
    pcrs: Vec<u32>,
    #[serde(default = "default_event_types")]
    event_types: Vec<String>,
    #[serde(default)]
    testbed: bool,
}

fn default_event_types() -> Vec<String> {
    vec!["slot_boot".into()]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDb {
    sqlite: Option<PathBuf>,
    postgres: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepo {
    trusted_root: PathBuf,
    snapshot_key: PathBuf,
    timestamp_key: PathBuf,
    snapshot_expiry: Option<String>,
    timestamp_expiry: Option<String>,
    resign_interval: Option<String>,
    max_upload_bytes: Option<u64>,
    #[serde(default)]
    require_sbom: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The state store: SQLite (default) or PostgreSQL.
    pub database: crate::storage::Backend,
    pub trusted_root: PathBuf,
    pub snapshot_key: PathBuf,
    pub timestamp_key: PathBuf,
    pub snapshot_expiry: Duration,
    pub timestamp_expiry: Duration,
    pub resign_interval: Duration,
    pub max_upload_bytes: u64,
    /// Policy: every new firmware release must name a signed SBOM.
    pub require_sbom: bool,
    /// How long a check-in nonce may be used (once).
    pub nonce_lifetime: Duration,
    /// How long an enrollment challenge (credential) may be answered.
    pub challenge_lifetime: Duration,
    /// PEM files of the CAs EK certificates must chain to.
    pub ek_ca_certificates: Vec<PathBuf>,
    /// Enrollment without an EK certificate chain (software TPMs, anyone holding a
    /// token): an explicit opt-in, warned about at start.
    pub accept_uncertified_eks: bool,
    /// Per hardware class ("*": every other class): which PCRs and event types prove
    /// the booted image. A class with no policy cannot attest.
    pub measurement: std::collections::BTreeMap<String, outpost_protocol::attest::MeasurementPolicy>,
    /// The director's online signing key (made offline by `outpost director init`; the
    /// server never makes one).
    pub director_key: PathBuf,
    /// How long a device's director targets stay valid.
    pub director_targets_expiry: Duration,
    /// How often running rollouts are re-evaluated (soak times pass without check-ins).
    pub rollout_tick: Duration,
    /// The file this was loaded from (named in errors about its settings).
    pub config_path: PathBuf,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ServerError> {
        let err = |reason: String| ServerError::Config { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw: Raw = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = raw.listen.parse().map_err(|e| err(format!("listen {:?}: {e} (example: 127.0.0.1:8080)", raw.listen)))?;
        let dur = |name: &str, v: &Option<String>, default: Duration| -> Result<Duration, ServerError> {
            match v {
                None => Ok(default),
                Some(s) => humantime::parse_duration(s).map_err(|e| err(format!("repository.{name} {s:?}: {e}"))),
            }
        };
        let snapshot_expiry = dur("snapshot_expiry", &raw.repository.snapshot_expiry, Duration::from_secs(7 * 86400))?;
        let timestamp_expiry = dur("timestamp_expiry", &raw.repository.timestamp_expiry, Duration::from_secs(86400))?;
        let resign_interval = dur("resign_interval", &raw.repository.resign_interval, Duration::from_secs(60))?;
        if timestamp_expiry < Duration::from_secs(2) || snapshot_expiry < Duration::from_secs(2) {
            return Err(err("repository.snapshot_expiry and timestamp_expiry must be at least 2s".into()));
        }
        if resign_interval < Duration::from_millis(100) || resign_interval > timestamp_expiry.min(snapshot_expiry) / 3 {
            return Err(err(format!(
                "repository.resign_interval {resign_interval:?} must be at least 100ms and at most a third of the shorter of \
                 snapshot_expiry and timestamp_expiry ({:?}), or metadata could expire before it is re-signed",
                timestamp_expiry.min(snapshot_expiry)
            )));
        }
        // A duration setting that must be more than zero; `name` is its dotted path.
        let positive = |name: &str, v: &Option<String>, default: Duration| -> Result<Duration, ServerError> {
            match v {
                None => Ok(default),
                Some(s) => humantime::parse_duration(s)
                    .map_err(|e| err(format!("{name} {s:?}: {e}")))
                    .and_then(|d| if d.is_zero() { Err(err(format!("{name} must be more than 0s"))) } else { Ok(d) }),
            }
        };
        let nonce_lifetime = positive("attestation.nonce_lifetime", &raw.attestation.nonce_lifetime, Duration::from_secs(60))?;
        let challenge_lifetime = positive("attestation.challenge_lifetime", &raw.attestation.challenge_lifetime, Duration::from_secs(300))?;
        let director_targets_expiry = positive("director.targets_expiry", &raw.director.targets_expiry, Duration::from_secs(86400))?;
        let rollout_tick = positive("rollouts.tick", &raw.rollouts.tick, Duration::from_secs(5))?;
        let data_dir = base.join(&raw.data_dir);
        let database = match (raw.database.sqlite, raw.database.postgres) {
            (Some(_), Some(_)) => return Err(err("database: set either sqlite or postgres, not both".into())),
            (_, Some(url)) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(err(format!("database.postgres {:?}: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE", crate::storage::db::redact(&url))));
                }
                let max_connections = raw.database.max_connections.unwrap_or(16);
                if max_connections == 0 {
                    return Err(err("database.max_connections must be at least 1".into()));
                }
                crate::storage::Backend::Postgres { url, max_connections }
            }
            (sqlite, None) => {
                if raw.database.max_connections.is_some() {
                    return Err(err("database.max_connections applies to postgres only (SQLite uses one connection)".into()));
                }
                crate::storage::Backend::Sqlite(data_dir.join(sqlite.unwrap_or_else(|| PathBuf::from("outpost.db"))))
            }
        };
        if raw.attestation.accept_uncertified_eks && !raw.attestation.ek_ca_certificates.is_empty() {
            return Err(err(
                "attestation: ek_ca_certificates and accept_uncertified_eks = true contradict each other; \
                 keep the CAs (devices must prove their TPM's maker) or the opt-in, not both"
                    .into(),
            ));
        }
        let mut measurement = std::collections::BTreeMap::new();
        for (class, m) in raw.attestation.classes {
            if class != "*" {
                class.parse::<outpost_protocol::release::HardwareClass>().map_err(|e| err(format!("attestation.classes.{class}: {e}")))?;
            }
            let kinds = m
                .event_types
                .iter()
                .map(|t| t.parse::<outpost_protocol::attest::EventKind>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(format!("attestation.classes.{class:?}.event_types: {e}")))?;
            let policy = outpost_protocol::attest::MeasurementPolicy::new(m.pcrs, kinds, m.testbed)
                .map_err(|e| err(format!("attestation.classes.{class:?}: {e}")))?;
            measurement.insert(class, policy);
        }
        let director_key = raw.director.key.map(|k| base.join(k)).unwrap_or_else(|| data_dir.join("director-key.json"));
        Ok(ServerConfig {
            listen,
            database,
            data_dir,
            trusted_root: base.join(raw.repository.trusted_root),
            snapshot_key: base.join(raw.repository.snapshot_key),
            timestamp_key: base.join(raw.repository.timestamp_key),
            snapshot_expiry,
            timestamp_expiry,
            resign_interval,
            max_upload_bytes: raw.repository.max_upload_bytes.unwrap_or(64 << 30),
            require_sbom: raw.repository.require_sbom,
            nonce_lifetime,
            challenge_lifetime,
            ek_ca_certificates: raw.attestation.ek_ca_certificates.iter().map(|p| base.join(p)).collect(),
            accept_uncertified_eks: raw.attestation.accept_uncertified_eks,
            measurement,
            director_key,
            director_targets_expiry,
            rollout_tick,
            config_path: path.to_owned(),
        })
    }
}
