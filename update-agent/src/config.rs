//! The agent's TOML configuration, validated into typed values at load time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::release::{HardwareClass, HealthCheck};
use serde::Deserialize;

use crate::error::{AgentError, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server_url: String,
    hardware_class: String,
    state_dir: PathBuf,
    trusted_root: PathBuf,
    device_id: Option<String>,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    install: RawInstall,
    #[serde(default)]
    health: Vec<HealthCheck>,
    tpm: Option<RawTpm>,
    policy: Option<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    enabled: Option<bool>,
    cgroup_root: Option<PathBuf>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    metrics_listen: Option<String>,
    metrics_max_connections: Option<usize>,
    metrics_max_connections_per_peer: Option<usize>,
    metrics_header_timeout: Option<String>,
    metrics_request_timeout: Option<String>,
    pin_dir: Option<PathBuf>,
    check_interval: Option<String>,
}

/// Network policy enforcement (`[policy]`): signed bundles of the `policy` delegation,
/// enforced with eBPF.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Where workload cgroup paths start (default: the cgroup v2 mount).
    pub cgroup_root: Option<PathBuf>,
    /// This device's labels, matched against bundle selectors.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Serve Prometheus `/metrics` (policy counters) here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Limits of that listener (connections, per-peer connections, timeouts).
    pub metrics_limits: crate::metrics::ListenerLimits,
    /// Where programs, maps and links are pinned in bpffs, so enforcement outlives the
    /// agent process (default [`DEFAULT_PIN_DIR`]).
    pub pin_dir: PathBuf,
    /// How often the daemon fetches signed bundles (default: `install.check_interval`).
    pub check_interval: Duration,
}

/// The default pin directory of the network-policy programs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/outpost";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
    tcti: String,
    pcr: Option<u32>,
    boot_event_log: Option<PathBuf>,
}

/// The device's TPM: how to reach it and which PCR the boot step measures into.
#[derive(Debug, Clone)]
pub struct TpmConfig {
    /// `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, ...
    pub tcti: String,
    /// 16 or 23 (resettable from locality 0, as the testbed's boot step needs).
    pub pcr: u32,
    /// The firmware's TCG event log (`/sys/kernel/security/tpm0/binary_bios_measurements`)
    /// on a device whose boot chain measures: then the agent measures nothing itself,
    /// and its check-ins quote PCRs 4, 8 and 9 and carry this log.
    pub boot_event_log: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstall {
    boot_backend: Option<String>,
    grub_env: Option<PathBuf>,
    kernel_cmdline: Option<PathBuf>,
    pstore_dir: Option<PathBuf>,
    slot_a: Option<PathBuf>,
    slot_b: Option<PathBuf>,
    boot_dir: Option<PathBuf>,
    trial_attempts: Option<u32>,
    trial_deadline: Option<String>,
    retries: Option<u32>,
    bandwidth_limit_bytes_per_sec: Option<u64>,
    check_interval: Option<String>,
}

/// Where the kernel shows pstore records (systemd mounts it at boot).
pub const PSTORE_DIR: &str = "/sys/fs/pstore";

/// Which bootloader holds the A/B state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootBackend {
    /// Slots and environment as files in `boot_dir` (testbeds).
    File,
    /// A GRUB environment block and two slot paths (devices or files); the kernel
    /// command line (`/proc/cmdline`) names the slot GRUB booted. `pstore` is where the
    /// kernel's records of the boots before are (`/sys/fs/pstore`): the agent reports
    /// the dm-verity corruptions it finds there.
    Grub { env: PathBuf, slot_a: PathBuf, slot_b: PathBuf, cmdline: PathBuf, pstore: PathBuf },
}

/// Install settings.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    pub boot_backend: BootBackend,
    /// The file boot-control backend's directory (slots and boot environment).
    pub boot_dir: PathBuf,
    /// Unconfirmed boots of a trial slot before the bootloader falls back.
    pub trial_attempts: u32,
    /// How long health checks may take after a trial boot.
    pub trial_deadline: Duration,
    pub retries: u32,
    pub bandwidth_limit: Option<u64>,
    /// Time between update checks in `run` (without `--once`).
    pub check_interval: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    timeout: Option<String>,
    min_bytes_per_sec: Option<u64>,
    ca_certificates: Option<PathBuf>,
}

/// A loaded, validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server_url: String,
    pub hardware_class: HardwareClass,
    pub state_dir: PathBuf,
    pub trusted_root: PathBuf,
    /// `[http] timeout`: connecting, an answer's headers, any wait for the next bytes.
    pub http_timeout: Duration,
    /// `[http] min_bytes_per_sec`: the average rate every answer must keep once
    /// `http_timeout` has passed (see [`crate::fetch::HttpLimits`]).
    pub http_min_rate: u64,
    /// `[http] ca_certificates`: the only CAs the server's TLS certificate may chain
    /// to (absent: the system's trust store).
    pub http_ca_file: Option<PathBuf>,
    pub device_id: String,
    pub install: InstallConfig,
    /// Health checks run after every trial boot (the release may add its own).
    pub health: Vec<HealthCheck>,
    /// TPM-rooted identity, measured boot and attested check-ins (absent: none of them).
    pub tpm: Option<TpmConfig>,
    /// Network policy enforcement (absent or `enabled = false`: none).
    pub policy: Option<PolicyConfig>,
}

impl AgentConfig {
    /// The device's HTTP client: this configuration's limits and CAs, and its TLS
    /// client identity (TPM-resident key and certificate) when it has a TPM.
    pub fn device_fetcher(&self) -> Result<crate::fetch::Fetcher> {
        let identity = match &self.tpm {
            Some(tpm) => Some(crate::devicecert::DeviceIdentity::load(&tpm.tcti, &self.state_dir)?),
            None => None,
        };
        crate::fetch::Fetcher::with_identity(self.http_limits(), self.http_ca_file.as_deref(), identity)
    }
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| AgentError::Config { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let hardware_class = raw.hardware_class.parse().map_err(|e: outpost_protocol::Error| err(format!("hardware_class: {e}")))?;
        if !(raw.server_url.starts_with("http://") || raw.server_url.starts_with("https://")) {
            return Err(err(format!("server_url {:?} must start with http:// or https://", raw.server_url)));
        }
        let (http_timeout, http_min_rate) = http_settings(&raw.http, &raw.install, &err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let state_dir = base.join(&raw.state_dir);
        let install = install_config(&raw.install, base, &state_dir, &err)?;
        let device_id = raw.device_id.unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "device".into())
        });
        if device_id.is_empty() || device_id.len() > 128 {
            return Err(err("device_id must be 1-128 characters".into()));
        }
        let tpm = raw.tpm.map(|t| tpm_config(t, &err)).transpose()?;
        let policy = match raw.policy {
            Some(p) if p.enabled.unwrap_or(true) => Some(policy_config(p, base, install.check_interval, &err)?),
            _ => None,
        };
        Ok(AgentConfig {
            policy,
            tpm,
            device_id,
            install,
            health: raw.health,
            server_url: raw.server_url.trim_end_matches('/').to_owned(),
            hardware_class,
            state_dir,
            trusted_root: base.join(raw.trusted_root),
            http_timeout,
            http_min_rate,
            http_ca_file: raw.http.ca_certificates.as_ref().map(|p| base.join(p)),
        })
    }

    /// The retrieval limits of `[http]`.
    pub fn http_limits(&self) -> crate::fetch::HttpLimits {
        crate::fetch::HttpLimits::new(self.http_timeout, self.http_min_rate)
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.state_dir.join("metadata")
    }

    pub fn download_dir(&self) -> PathBuf {
        self.state_dir.join("downloads")
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.state_dir.join("policy")
    }

    pub fn boot_dir(&self) -> PathBuf {
        self.install.boot_dir.clone()
    }
}

/// Builds the `Config` error for the file being loaded.
type ConfigErr<'a> = &'a dyn Fn(String) -> AgentError;

/// `[http]`: the request timeout and the minimum average rate (checked against the
/// install bandwidth cap).
fn http_settings(http: &RawHttp, install: &RawInstall, err: ConfigErr<'_>) -> Result<(Duration, u64)> {
    let http_timeout = match &http.timeout {
        Some(t) => humantime::parse_duration(&t).map_err(|e| err(format!("http.timeout {t:?}: {e}")))?,
        None => Duration::from_secs(30),
    };
    if http_timeout.is_zero() {
        return Err(err("http.timeout must be more than 0s".into()));
    }
    let http_min_rate = http.min_bytes_per_sec.unwrap_or(crate::fetch::DEFAULT_MIN_RATE);
    if http_min_rate == 0 {
        return Err(err("http.min_bytes_per_sec must be at least 1: it is the slow-retrieval defence, and 0 would let one byte a day hold a fetch for ever".into()));
    }
    if let Some(cap) = install.bandwidth_limit_bytes_per_sec {
        if cap < http_min_rate {
            return Err(err(format!(
                "install.bandwidth_limit_bytes_per_sec ({cap}) is below http.min_bytes_per_sec ({http_min_rate}): every download would be cut off as a slow retrieval; lower http.min_bytes_per_sec or raise the cap"
            )));
        }
    }
    Ok((http_timeout, http_min_rate))
}

/// `[install]`, with paths relative to the config file's directory.
fn install_config(raw: &RawInstall, base: &Path, state_dir: &Path, err: ConfigErr<'_>) -> Result<InstallConfig> {
    let dur = |name: &str, v: &Option<String>, default: Duration| -> Result<Duration> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s).map_err(|e| err(format!("install.{name} {s:?}: {e}"))),
        }
    };
    let boot_backend = match raw.boot_backend.as_deref().unwrap_or("file") {
        "file" => BootBackend::File,
        "grub" => match (&raw.grub_env, &raw.slot_a, &raw.slot_b) {
            (Some(env), Some(a), Some(b)) => {
                // testbeds/vm/grub.cfg counts trial attempts down from at most 9.
                if raw.trial_attempts.is_some_and(|n| n > 9) {
                    return Err(err("install.trial_attempts: GRUB's boot counting (grub.cfg) counts at most 9 attempts".into()));
                }
                let cmdline = raw.kernel_cmdline.as_ref().map(|p| base.join(p)).unwrap_or_else(|| PathBuf::from("/proc/cmdline"));
                let pstore = raw.pstore_dir.as_ref().map(|p| base.join(p)).unwrap_or_else(|| PathBuf::from(PSTORE_DIR));
                BootBackend::Grub { env: base.join(env), slot_a: base.join(a), slot_b: base.join(b), cmdline, pstore }
            }
            _ => return Err(err("install.boot_backend = \"grub\" needs install.grub_env, install.slot_a and install.slot_b".into())),
        },
        other => return Err(err(format!("install.boot_backend {other:?} is not one of \"file\", \"grub\""))),
    };
    Ok(InstallConfig {
        boot_backend,
        boot_dir: raw.boot_dir.as_ref().map(|p| base.join(p)).unwrap_or_else(|| state_dir.join("boot")),
        trial_attempts: raw.trial_attempts.unwrap_or(2).max(1),
        trial_deadline: dur("trial_deadline", &raw.trial_deadline, Duration::from_secs(300))?,
        retries: raw.retries.unwrap_or(5),
        bandwidth_limit: raw.bandwidth_limit_bytes_per_sec,
        check_interval: dur("check_interval", &raw.check_interval, Duration::from_secs(300))?,
    })
}

/// `[tpm]`: the TCTI and the measurement PCR.
fn tpm_config(t: RawTpm, err: ConfigErr<'_>) -> Result<TpmConfig> {
    if t.boot_event_log.is_some() && t.pcr.is_some() {
        return Err(err("tpm.pcr and tpm.boot_event_log contradict each other: the agent measures into tpm.pcr only when the boot chain does not measure".into()));
    }
    let pcr = t.pcr.unwrap_or(outpost_protocol::attest::DEFAULT_PCR);
    if pcr != 16 && pcr != 23 {
        return Err(err(format!("tpm.pcr {pcr}: the boot step measures into PCR 16 or 23 (the PCRs locality 0 can reset)")));
    }
    if !(t.tcti.starts_with("device:") || t.tcti.starts_with("swtpm:") || t.tcti.starts_with("mssim:") || t.tcti.starts_with("tabrmd")) {
        return Err(err(format!("tpm.tcti {:?} is not a device:, swtpm:, mssim: or tabrmd TCTI", t.tcti)));
    }
    Ok(TpmConfig { tcti: t.tcti, pcr, boot_event_log: t.boot_event_log })
}

/// `[policy]` (enabled): labels, the `/metrics` listener and its limits, the pin
/// directory, the fetch interval.
fn policy_config(p: RawPolicy, base: &Path, default_interval: Duration, err: ConfigErr<'_>) -> Result<PolicyConfig> {
    let metrics_listen = match &p.metrics_listen {
        None => None,
        Some(a) => Some(a.parse().map_err(|e| err(format!("policy.metrics_listen {a:?}: {e}")))?),
    };
    let defaults = crate::metrics::ListenerLimits::default();
    let positive = |name: &str, v: Option<usize>, default: usize| -> Result<usize> {
        match v {
            Some(0) => Err(err(format!("policy.{name} must be at least 1"))),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    };
    let timeout = |name: &str, v: &Option<String>, default: Duration| -> Result<Duration> {
        let d = match v {
            None => return Ok(default),
            Some(s) => humantime::parse_duration(s).map_err(|e| err(format!("policy.{name} {s:?}: {e}")))?,
        };
        if d.is_zero() {
            return Err(err(format!("policy.{name} must be more than 0s")));
        }
        Ok(d)
    };
    let metrics_limits = crate::metrics::ListenerLimits {
        max_connections: positive("metrics_max_connections", p.metrics_max_connections, defaults.max_connections)?,
        max_connections_per_peer: positive("metrics_max_connections_per_peer", p.metrics_max_connections_per_peer, defaults.max_connections_per_peer)?,
        header_timeout: timeout("metrics_header_timeout", &p.metrics_header_timeout, defaults.header_timeout)?,
        request_timeout: timeout("metrics_request_timeout", &p.metrics_request_timeout, defaults.request_timeout)?,
    };
    let pin_dir = p.pin_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    if !pin_dir.is_absolute() {
        return Err(err(format!("policy.pin_dir {:?} must be an absolute path on a BPF file system", pin_dir.display())));
    }
    let check_interval = timeout("check_interval", &p.check_interval, default_interval)?;
    Ok(PolicyConfig { cgroup_root: p.cgroup_root.map(|c| base.join(c)), labels: p.labels, metrics_listen, metrics_limits, pin_dir, check_interval })
}

impl AgentConfig {
    /// Creates the metadata and download directories and, on first use, trusts the
    /// provisioned root (`trusted_root`) by copying it into the metadata directory.
    pub fn prepare_state(&self) -> Result<()> {
        let metadata_dir = self.metadata_dir();
        for d in [&metadata_dir, &self.download_dir()] {
            std::fs::create_dir_all(d).map_err(|e| AgentError::io("create", d, e))?;
        }
        let root_file = metadata_dir.join("root.json");
        if !root_file.exists() {
            let data = std::fs::read(&self.trusted_root).map_err(|e| AgentError::io("read trusted root", &self.trusted_root, e))?;
            outpost_fsio::write_atomic(&root_file, &data).map_err(|e| AgentError::io("write", &root_file, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<AgentConfig> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let text = format!("server_url = \"http://127.0.0.1:1\"\nhardware_class = \"rpi4\"\nstate_dir = \"s\"\ntrusted_root = \"r.json\"\ndevice_id = \"d\"\n{extra}");
        std::fs::write(&path, text).expect("write");
        AgentConfig::load(&path)
    }

    #[test]
    fn the_boot_chain_log_replaces_the_agents_own_pcr() {
        let c = load("[tpm]\ntcti = \"device:/dev/tpmrm0\"\nboot_event_log = \"/sys/kernel/security/tpm0/binary_bios_measurements\"\n").expect("boot chain");
        assert!(c.tpm.expect("tpm").boot_event_log.is_some());
        let err = load("[tpm]\ntcti = \"device:/dev/tpmrm0\"\npcr = 23\nboot_event_log = \"/x\"\n").expect_err("both").to_string();
        assert!(err.contains("tpm.pcr and tpm.boot_event_log"), "{err}");
    }

    #[test]
    fn grub_counts_at_most_nine_trial_attempts() {
        let grub = "[install]\nboot_backend = \"grub\"\ngrub_env = \"e\"\nslot_a = \"a\"\nslot_b = \"b\"\n";
        assert!(load(&format!("{grub}trial_attempts = 9\n")).is_ok());
        let err = load(&format!("{grub}trial_attempts = 10\n")).expect_err("10").to_string();
        assert!(err.contains("at most 9"), "{err}");
    }

    #[test]
    fn http_limits_default_and_validate() {
        let c = load("").expect("defaults");
        assert_eq!(c.http_limits(), crate::fetch::HttpLimits::new(Duration::from_secs(30), crate::fetch::DEFAULT_MIN_RATE));
        let c = load("[http]\ntimeout = \"5s\"\nmin_bytes_per_sec = 4096\n").expect("set");
        assert_eq!((c.http_timeout, c.http_min_rate), (Duration::from_secs(5), 4096));
        let e = load("[http]\nmin_bytes_per_sec = 0\n").expect_err("a floor of 0");
        assert!(e.to_string().contains("http.min_bytes_per_sec must be at least 1"), "{e}");
        let e = load("[http]\nmin_bytes_per_sec = 2048\n[install]\nbandwidth_limit_bytes_per_sec = 1000\n").expect_err("cap below floor");
        assert!(e.to_string().contains("bandwidth_limit_bytes_per_sec (1000) is below http.min_bytes_per_sec (2048)"), "{e}");
    }

    #[test]
    fn metrics_listener_limits_default_and_validate() {
        let c = load("[policy]\nmetrics_listen = \"127.0.0.1:9101\"\n").expect("defaults");
        assert_eq!(c.policy.expect("policy").metrics_limits, crate::metrics::ListenerLimits::default());
        let c = load("[policy]\nmetrics_max_connections = 4\nmetrics_header_timeout = \"2s\"\n").expect("set");
        let l = c.policy.expect("policy").metrics_limits;
        assert_eq!((l.max_connections, l.header_timeout), (4, Duration::from_secs(2)));
        let e = load("[policy]\nmetrics_max_connections_per_peer = 0\n").expect_err("0 per peer");
        assert!(e.to_string().contains("policy.metrics_max_connections_per_peer must be at least 1"), "{e}");
        let e = load("[policy]\nmetrics_request_timeout = \"0s\"\n").expect_err("no deadline");
        assert!(e.to_string().contains("policy.metrics_request_timeout must be more than 0s"), "{e}");
    }

    #[test]
    fn the_policy_interval_defaults_to_the_install_interval() {
        let c = load("[install]\ncheck_interval = \"7s\"\n[policy]\n").expect("default");
        assert_eq!(c.policy.expect("policy").check_interval, Duration::from_secs(7));
        let c = load("[policy]\ncheck_interval = \"1m\"\n").expect("set");
        assert_eq!((c.install.check_interval, c.policy.expect("policy").check_interval), (Duration::from_secs(300), Duration::from_secs(60)));
        let e = load("[policy]\ncheck_interval = \"0s\"\n").expect_err("no interval");
        assert!(e.to_string().contains("policy.check_interval must be more than 0s"), "{e}");
    }
}
