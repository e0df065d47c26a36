//! Server configuration (TOML), validated into typed values at load time. Relative
//! paths are relative to the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ServerError;
use crate::repository::{RepositorySettings, SbomPolicy};
use crate::tls::TlsSettings;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    /// The listener without TLS: only when set, and on a loopback address unless
    /// `plain_http_beyond_loopback` is set too.
    #[serde(default)]
    plain_http: bool,
    #[serde(default)]
    plain_http_beyond_loopback: bool,
    tls: Option<RawTls>,
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
    device_ca: Option<RawDeviceCa>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceCa {
    certificate: PathBuf,
    key: PathBuf,
    #[serde(default)]
    previous_certificates: Vec<PathBuf>,
    trust_domain: String,
    lifetime: Option<String>,
    #[serde(default = "yes")]
    require_client_certificate: bool,
    #[serde(default)]
    targets_require_client_certificate: bool,
    /// Lifetimes under 5 minutes, for tests that watch certificates expire.
    #[serde(default)]
    testbed_short_lifetime: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: PathBuf,
    key: PathBuf,
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
    #[serde(default)]
    pcrs: Option<Vec<u32>>,
    #[serde(default = "default_event_types")]
    event_types: Vec<String>,
    #[serde(default)]
    testbed: bool,
    /// Measured by the boot chain: devices send the firmware's event log, which must
    /// match the golden values of one of the class's signed releases.
    #[serde(default)]
    boot_event_log: bool,
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
    /// TLS on the listener, or plain HTTP where the configuration says so.
    pub transport: Transport,
    pub data_dir: PathBuf,
    /// The state store: SQLite (default) or PostgreSQL.
    pub database: crate::storage::Backend,
    /// What the TUF repository needs (its directory, trusted root, online keys,
    /// expiries, SBOM policy): all `Repository::open` is given.
    pub repository: RepositorySettings,
    pub resign_interval: Duration,
    pub max_upload_bytes: u64,
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
    /// The device CA (`[device_ca]`): client certificates for attested devices.
    pub device_ca: Option<crate::fleet::deviceca::DeviceCaSettings>,
    /// The file this was loaded from (named in errors about its settings).
    pub config_path: PathBuf,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ServerError> {
        let cx = Load { path, base: path.parent().unwrap_or(Path::new(".")) };
        let text = std::fs::read_to_string(path).map_err(|e| cx.err(format!("cannot read: {e}")))?;
        let raw: Raw = toml::from_str(&text).map_err(|e| cx.err(e.to_string()))?;
        let listen: SocketAddr =
            raw.listen.parse().map_err(|e| cx.err(format!("listen {:?}: {e} (example: 0.0.0.0:8443)", raw.listen)))?;
        let transport = Transport::choose(&cx, listen, raw.tls, raw.plain_http, raw.plain_http_beyond_loopback)?;
        let data_dir = cx.base.join(&raw.data_dir);
        let (repository, resign_interval, max_upload_bytes) = raw.repository.validate(&cx, &data_dir)?;
        let nonce_lifetime = cx.positive("attestation.nonce_lifetime", &raw.attestation.nonce_lifetime, Duration::from_secs(60))?;
        let challenge_lifetime = cx.positive("attestation.challenge_lifetime", &raw.attestation.challenge_lifetime, Duration::from_secs(300))?;
        let director_targets_expiry = cx.positive("director.targets_expiry", &raw.director.targets_expiry, Duration::from_secs(86400))?;
        let rollout_tick = cx.positive("rollouts.tick", &raw.rollouts.tick, Duration::from_secs(5))?;
        let database = raw.database.backend(&cx, &data_dir)?;
        let attestation = raw.attestation.validate(&cx)?;
        let director_key = raw.director.key.map(|k| cx.base.join(k)).unwrap_or_else(|| data_dir.join("director-key.json"));
        let device_ca = raw.device_ca.map(|d| d.validate(&cx, &transport)).transpose()?;
        Ok(ServerConfig {
            listen,
            transport,
            database,
            data_dir,
            repository,
            resign_interval,
            max_upload_bytes,
            nonce_lifetime,
            challenge_lifetime,
            ek_ca_certificates: attestation.ek_ca_certificates,
            accept_uncertified_eks: attestation.accept_uncertified_eks,
            measurement: attestation.measurement,
            director_key,
            director_targets_expiry,
            rollout_tick,
            device_ca,
            config_path: path.to_owned(),
        })
    }
}

/// What the listener speaks.
#[derive(Debug, Clone)]
pub enum Transport {
    Tls(TlsSettings),
    /// No TLS (`plain_http = true`): on loopback behind a TLS-terminating proxy, or
    /// anywhere when `plain_http_beyond_loopback = true` says so as well.
    Plain,
}

impl Transport {
    fn choose(cx: &Load, listen: SocketAddr, tls: Option<RawTls>, plain: bool, beyond_loopback: bool) -> Result<Self, ServerError> {
        match (tls, plain) {
            (Some(_), true) => Err(cx.err("both [tls] and plain_http = true are set: choose one".into())),
            (Some(t), false) => {
                if beyond_loopback {
                    return Err(cx.err("plain_http_beyond_loopback is set, but plain_http is not: remove it (the listener is TLS)".into()));
                }
                Ok(Transport::Tls(TlsSettings { certificate: cx.base.join(t.certificate), key: cx.base.join(t.key) }))
            }
            (None, true) if !listen.ip().is_loopback() && !beyond_loopback => Err(cx.err(format!(
                "plain_http = true with listen = \"{listen}\", which is not a loopback address: anyone on the way could read \
                 and change what the server and its devices say. Configure [tls] (certificate, key), or listen on \
                 127.0.0.1 behind a TLS-terminating proxy, or add plain_http_beyond_loopback = true"
            ))),
            (None, true) => Ok(Transport::Plain),
            (None, false) => Err(cx.err(
                "no [tls]: set [tls] certificate and key (PEM files) for the listener, or plain_http = true to serve \
                 without TLS (on a loopback address, behind a TLS-terminating proxy)"
                    .into(),
            )),
        }
    }
}

/// The file being loaded: where its relative paths start, and how its errors name it.
struct Load<'a> {
    path: &'a Path,
    base: &'a Path,
}

impl Load<'_> {
    fn err(&self, reason: String) -> ServerError {
        ServerError::Config { path: self.path.to_owned(), reason }
    }

    /// A duration setting under `[repository]`.
    fn repository_duration(&self, name: &str, v: &Option<String>, default: Duration) -> Result<Duration, ServerError> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s).map_err(|e| self.err(format!("repository.{name} {s:?}: {e}"))),
        }
    }

    /// A duration setting that must be more than zero; `name` is its dotted path.
    fn positive(&self, name: &str, v: &Option<String>, default: Duration) -> Result<Duration, ServerError> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| self.err(format!("{name} {s:?}: {e}")))
                .and_then(|d| if d.is_zero() { Err(self.err(format!("{name} must be more than 0s"))) } else { Ok(d) }),
        }
    }
}

impl RawDeviceCa {
    fn validate(self, cx: &Load, transport: &Transport) -> Result<crate::fleet::deviceca::DeviceCaSettings, ServerError> {
        use crate::fleet::deviceca::{MAX_LIFETIME, MIN_LIFETIME};
        let lifetime = cx.positive("device_ca.lifetime", &self.lifetime, Duration::from_secs(3600))?;
        let floor = if self.testbed_short_lifetime { Duration::from_secs(5) } else { MIN_LIFETIME };
        if lifetime < floor || lifetime > MAX_LIFETIME {
            return Err(cx.err(format!(
                "device_ca.lifetime {lifetime:?} must be from {floor:?} to {MAX_LIFETIME:?} (a device's access ends within one lifetime of its quarantine)"
            )));
        }
        let td = &self.trust_domain;
        if td.is_empty() || !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
            return Err(cx.err(format!("device_ca.trust_domain {td:?}: lowercase letters, digits, '-', '.' and '_' only (a SPIFFE trust domain)")));
        }
        if matches!(transport, Transport::Plain) {
            return Err(cx.err("[device_ca] needs [tls]: client certificates are presented in the TLS handshake".into()));
        }
        Ok(crate::fleet::deviceca::DeviceCaSettings {
            certificate: cx.base.join(self.certificate),
            key: cx.base.join(self.key),
            previous_certificates: self.previous_certificates.into_iter().map(|p| cx.base.join(p)).collect(),
            trust_domain: self.trust_domain,
            lifetime,
            require_client_certificate: self.require_client_certificate,
            targets_require_client_certificate: self.targets_require_client_certificate,
        })
    }
}

impl RawRepo {
    /// The repository's settings, the re-signing interval and the upload limit.
    fn validate(self, cx: &Load, data_dir: &Path) -> Result<(RepositorySettings, Duration, u64), ServerError> {
        let snapshot_expiry = cx.repository_duration("snapshot_expiry", &self.snapshot_expiry, Duration::from_secs(7 * 86400))?;
        let timestamp_expiry = cx.repository_duration("timestamp_expiry", &self.timestamp_expiry, Duration::from_secs(86400))?;
        let resign_interval = cx.repository_duration("resign_interval", &self.resign_interval, Duration::from_secs(60))?;
        if timestamp_expiry < Duration::from_secs(2) || snapshot_expiry < Duration::from_secs(2) {
            return Err(cx.err("repository.snapshot_expiry and timestamp_expiry must be at least 2s".into()));
        }
        if resign_interval < Duration::from_millis(100) || resign_interval > timestamp_expiry.min(snapshot_expiry) / 3 {
            return Err(cx.err(format!(
                "repository.resign_interval {resign_interval:?} must be at least 100ms and at most a third of the shorter of \
                 snapshot_expiry and timestamp_expiry ({:?}), or metadata could expire before it is re-signed",
                timestamp_expiry.min(snapshot_expiry)
            )));
        }
        let settings = RepositorySettings {
            dir: data_dir.join("repository"),
            trusted_root: cx.base.join(self.trusted_root),
            snapshot_key: cx.base.join(self.snapshot_key),
            timestamp_key: cx.base.join(self.timestamp_key),
            snapshot_expiry,
            timestamp_expiry,
            sbom_policy: if self.require_sbom { SbomPolicy::Required } else { SbomPolicy::Optional },
        };
        Ok((settings, resign_interval, self.max_upload_bytes.unwrap_or(64 << 30)))
    }
}

impl RawDb {
    fn backend(self, cx: &Load, data_dir: &Path) -> Result<crate::storage::Backend, ServerError> {
        match (self.sqlite, self.postgres) {
            (Some(_), Some(_)) => Err(cx.err("database: set either sqlite or postgres, not both".into())),
            (_, Some(url)) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(cx.err(format!("database.postgres {:?}: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE", crate::storage::db::redact(&url))));
                }
                let max_connections = self.max_connections.unwrap_or(16);
                if max_connections == 0 {
                    return Err(cx.err("database.max_connections must be at least 1".into()));
                }
                Ok(crate::storage::Backend::Postgres { url, max_connections })
            }
            (sqlite, None) => {
                if self.max_connections.is_some() {
                    return Err(cx.err("database.max_connections applies to postgres only (SQLite uses one connection)".into()));
                }
                Ok(crate::storage::Backend::Sqlite(data_dir.join(sqlite.unwrap_or_else(|| PathBuf::from("outpost.db")))))
            }
        }
    }
}

/// `[attestation]`, validated: the EK CAs (or the opt-in without them) and the
/// measurement policy per hardware class.
struct Attestation {
    ek_ca_certificates: Vec<PathBuf>,
    accept_uncertified_eks: bool,
    measurement: std::collections::BTreeMap<String, outpost_protocol::attest::MeasurementPolicy>,
}

impl RawAttestation {
    fn validate(self, cx: &Load) -> Result<Attestation, ServerError> {
        if self.accept_uncertified_eks && !self.ek_ca_certificates.is_empty() {
            return Err(cx.err(
                "attestation: ek_ca_certificates and accept_uncertified_eks = true contradict each other; \
                 keep the CAs (devices must prove their TPM's maker) or the opt-in, not both"
                    .into(),
            ));
        }
        let mut measurement = std::collections::BTreeMap::new();
        for (class, m) in self.classes {
            if class != "*" {
                class.parse::<outpost_protocol::release::HardwareClass>().map_err(|e| cx.err(format!("attestation.classes.{class}: {e}")))?;
            }
            if m.boot_event_log {
                if m.pcrs.is_some() || m.testbed {
                    return Err(cx.err(format!(
                        "attestation.classes.{class:?}: boot_event_log = true judges PCRs 4, 8 and 9 against the releases' golden values; \
                         pcrs and testbed belong to the agent-measured scheme"
                    )));
                }
                measurement.insert(class, outpost_protocol::attest::MeasurementPolicy::event_log());
                continue;
            }
            let pcrs = m.pcrs.ok_or_else(|| cx.err(format!("attestation.classes.{class:?}: pcrs is missing (or boot_event_log = true)")))?;
            let kinds = m
                .event_types
                .iter()
                .map(|t| t.parse::<outpost_protocol::attest::EventKind>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| cx.err(format!("attestation.classes.{class:?}.event_types: {e}")))?;
            let platform = if m.testbed { outpost_protocol::attest::Platform::Testbed } else { outpost_protocol::attest::Platform::BootChain };
            let policy = outpost_protocol::attest::MeasurementPolicy::new(pcrs, kinds, platform)
                .map_err(|e| cx.err(format!("attestation.classes.{class:?}: {e}")))?;
            measurement.insert(class, policy);
        }
        Ok(Attestation {
            ek_ca_certificates: self.ek_ca_certificates.iter().map(|p| cx.base.join(p)).collect(),
            accept_uncertified_eks: self.accept_uncertified_eks,
            measurement,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(extra: &str) -> RawRepo {
        toml::from_str(&format!("trusted_root = \"1.root.json\"\nsnapshot_key = \"s.key\"\ntimestamp_key = \"t.key\"\n{extra}")).unwrap()
    }

    #[test]
    fn repository_settings_are_typed_and_relative_to_the_config_file() {
        let cx = Load { path: Path::new("/etc/outpost/server.toml"), base: Path::new("/etc/outpost") };
        let (settings, resign, max_upload) = repo("require_sbom = true\ntimestamp_expiry = \"1h\"").validate(&cx, Path::new("/var/lib/outpost")).unwrap();
        assert_eq!(settings.dir, Path::new("/var/lib/outpost/repository"));
        assert_eq!(settings.trusted_root, Path::new("/etc/outpost/1.root.json"));
        assert_eq!(settings.timestamp_expiry, Duration::from_secs(3600));
        assert_eq!(settings.sbom_policy, SbomPolicy::Required);
        assert_eq!((resign, max_upload), (Duration::from_secs(60), 64 << 30));
    }

    #[test]
    fn a_resign_interval_that_lets_metadata_expire_is_refused() {
        let cx = Load { path: Path::new("server.toml"), base: Path::new(".") };
        let err = repo("timestamp_expiry = \"60s\"\nresign_interval = \"30s\"").validate(&cx, Path::new("data")).unwrap_err().to_string();
        assert!(err.contains("repository.resign_interval") && err.contains("a third"), "{err}");
        let err = repo("snapshot_expiry = \"soon\"").validate(&cx, Path::new("data")).unwrap_err().to_string();
        assert!(err.contains("repository.snapshot_expiry \"soon\""), "{err}");
    }

    #[test]
    fn database_settings_name_the_conflict() {
        let cx = Load { path: Path::new("server.toml"), base: Path::new(".") };
        let both: RawDb = toml::from_str("sqlite = \"a.db\"\npostgres = \"postgres://u@h/d\"").unwrap();
        assert!(both.backend(&cx, Path::new("data")).unwrap_err().to_string().contains("either sqlite or postgres"));
        let pool: RawDb = toml::from_str("max_connections = 4").unwrap();
        assert!(pool.backend(&cx, Path::new("data")).unwrap_err().to_string().contains("postgres only"));
    }
}
