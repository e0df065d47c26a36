//! `outpost-fleet-sim`: many simulated devices in one process, enrolling through the
//! server's real enrollment API and checking in through its real attested check-in
//! API, at a configurable rate, with a configurable failure rate per release.
//!
//! SIMULATED DEVICES: software keys in place of a TPM (see `softkeys`). That is the
//! only shortcut; every message is what a device with a TPM sends, and the server
//! verifies it the same way. A simulated install is instantaneous: an assigned release
//! is "committed" (its digest becomes the measured boot) or "rolled back" at once,
//! reported at the next check-in.

mod softkeys;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use outpost_protocol::attest::{
    self, Checkin, CheckinReport, CheckinVerdict, DeviceHealth, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, EventKind, EventLog,
    MeasurementEvent, NonceGrant,
};
use outpost_protocol::report::{InstallReport, ReportOutcome};
use rsa::pkcs8::EncodePrivateKey;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const LABEL: &str = "SIMULATED devices (software keys in place of a TPM)";
const PCR: u32 = 23;

#[derive(Debug, Parser)]
#[command(name = "outpost-fleet-sim", about = "Outpost fleet simulator: simulated devices (software keys in place of a TPM) enrolling and checking in")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll N simulated devices (one-time token each, credential activation) that run
    /// the signed release with image digest --image-sha256; keep them in --state.
    Enroll {
        #[arg(long)]
        server: String,
        /// Operator API token (makes the enrollment tokens).
        #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long)]
        devices: usize,
        #[arg(long, default_value = "rpi4")]
        hardware_class: String,
        /// SHA-256 of the signed image the devices boot (their measured state).
        #[arg(long)]
        image_sha256: String,
        #[arg(long)]
        version: Option<String>,
        /// KEY=VALUE labels for every device.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Distinct RSA keys behind the devices' EKs (each EK public area still differs).
        #[arg(long, default_value_t = 8)]
        ek_pool: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long)]
        state: PathBuf,
        /// Add to the devices already in --state (same server).
        #[arg(long)]
        append: bool,
    },
    /// Check the devices in --state in, round robin, for --duration, at --rate check-ins
    /// per second in total (0: as fast as --concurrency allows); print throughput and
    /// latency. Releases named in --fail VERSION=FRACTION fail on that fraction of the
    /// devices they are assigned to (a stable choice per device).
    Run {
        #[arg(long)]
        state: PathBuf,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long = "fail")]
        fail: Vec<String>,
        /// Stop after this many check-ins (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_checkins: usize,
        /// Check in through these servers instead of the one the devices enrolled with
        /// (repeat for servers sharing one database): each check-in takes its nonce from
        /// one server and reports to the next, round robin.
        #[arg(long = "server")]
        servers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimDevice {
    device_id: String,
    hardware_class: String,
    ek: usize,
    ek_policy: String,
    ak: String,
    image_sha256: String,
    version: Option<String>,
    slot: String,
    #[serde(default)]
    pending: Vec<InstallReport>,
    /// Versions this device rolled back (not installed again, like the agent).
    #[serde(default)]
    failed: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SimState {
    label: String,
    server: String,
    /// PKCS#8 DER of the pool's RSA keys, hex.
    ek_keys: Vec<String>,
    devices: Vec<SimDevice>,
}

type Res<T> = Result<T, String>;

async fn post<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str, token: Option<&str>, body: &impl Serialize) -> Res<T> {
    let mut req = http.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| format!("POST {url}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| format!("POST {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("POST {url}: {status}: {}", text.chars().take(300).collect::<String>()));
    }
    serde_json::from_str(&text).map_err(|e| format!("POST {url}: {e}"))
}

fn ak_key(hex_secret: &str) -> Res<p256::ecdsa::SigningKey> {
    let bytes = hex::decode(hex_secret).map_err(|e| e.to_string())?;
    p256::ecdsa::SigningKey::from_slice(&bytes).map_err(|e| e.to_string())
}

async fn enroll_one(http: &reqwest::Client, server: &str, token: &str, class: &str, labels: &BTreeMap<String, String>, ek: &rsa::RsaPrivateKey, ek_index: usize) -> Res<SimDevice> {
    let one_time: Value = post(http, &format!("{server}/api/v1/device-tokens"), Some(token), &json!({"hardware_class": class, "ttl": "1h", "labels": labels})).await?;
    let one_time = one_time["token"].as_str().ok_or("no token in answer")?.to_owned();
    let policy: [u8; 16] = attest::credential::random_bytes();
    let ek_public = softkeys::ek_public(&ek.to_public_key(), &policy);
    let ak = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let ak_public = softkeys::ak_public(ak.verifying_key());
    let req = EnrollRequest {
        token: one_time,
        hardware_class: class.to_owned(),
        ek_public: hex::encode(&ek_public),
        ek_certificate: None,
        ak_public: hex::encode(&ak_public),
    };
    let ch: EnrollChallenge = post(http, &format!("{server}/api/v1/enroll"), None, &req).await?;
    let blob = hex::decode(&ch.credential_blob).map_err(|e| e.to_string())?;
    let secret = hex::decode(&ch.encrypted_secret).map_err(|e| e.to_string())?;
    let recovered = softkeys::activate_credential(ek, &softkeys::name(&ak_public), &blob, &secret)?;
    let done: Enrolled = post(http, &format!("{server}/api/v1/enroll/{}", ch.challenge_id), None, &EnrollProof { secret: hex::encode(recovered) }).await?;
    Ok(SimDevice {
        device_id: done.device_id,
        hardware_class: class.to_owned(),
        ek: ek_index,
        ek_policy: hex::encode(policy),
        ak: hex::encode(ak.to_bytes()),
        image_sha256: String::new(),
        version: None,
        slot: "A".into(),
        pending: Vec::new(),
        failed: Vec::new(),
    })
}

/// Whether `device` fails `version` under a failure fraction (stable per device).
fn fails(fraction: f64, version: &str, device: &str) -> bool {
    outpost_protocol::rollout::position(&format!("sim-failure:{version}"), device) < fraction
}

#[derive(Default)]
struct Tally {
    latency_ms: Vec<f64>,
    checkin_ms: Vec<f64>,
    attested: usize,
    failed_verdicts: usize,
    errors: usize,
    first_errors: Vec<String>,
    assigned: usize,
    committed: usize,
    rolled_back: usize,
}

/// One check-in of one device: nonce, quote over the report, verdict, and a simulated
/// install of whatever the director assigns.
/// One attested check-in: the nonce from `nonce_server`, the report to `report_server`
/// (the same server, or two sharing one database).
async fn checkin(http: &reqwest::Client, nonce_server: &str, report_server: &str, d: &mut SimDevice, fail: &BTreeMap<String, f64>, t: &mut Tally) -> Res<()> {
    let started = Instant::now();
    let ak = ak_key(&d.ak)?;
    let ak_public = softkeys::ak_public(ak.verifying_key());
    let ak_name = softkeys::name(&ak_public);
    // The nonce request is quoted by the (software) AK, as a TPM's would be.
    let ask = serde_json::to_value(attest::NonceAsk { device_id: d.device_id.clone(), at: chrono::Utc::now().to_rfc3339() }).map_err(|e| e.to_string())?;
    let ask_q = attest::nonce_request_qualifying_data(&ask).map_err(|e| e.to_string())?;
    let (a, s) = softkeys::quote(&ak, &ak_name, &ask_q, PCR, &[0u8; 32], started.elapsed().as_millis() as u64);
    let nonce_req = attest::NonceRequest { request: ask, attest: hex::encode(a), signature: hex::encode(s) };
    let grant: NonceGrant = post(http, &format!("{nonce_server}/api/v1/devices/{}/nonce", d.device_id), None, &nonce_req).await?;
    let base = format!("{report_server}/api/v1/devices/{}", d.device_id);
    let log = EventLog {
        events: vec![MeasurementEvent {
            pcr: PCR,
            sha256: d.image_sha256.clone(),
            event: EventKind::SlotBoot,
            slot: d.slot.clone(),
            length: 0,
            at: chrono::Utc::now().to_rfc3339(),
        }],
    };
    let pcr_digest = log.pcr_digest(&[PCR]).map_err(|e| e.to_string())?;
    let report = CheckinReport {
        device_id: d.device_id.clone(),
        nonce: grant.nonce,
        slot: d.slot.clone(),
        version: d.version.clone(),
        image_sha256: Some(d.image_sha256.clone()),
        sbom_sha256: None,
        health: DeviceHealth::Healthy,
        pcr: PCR,
        event_log: log,
        reports: d.pending.clone(),
        policy: None,
        at: chrono::Utc::now().to_rfc3339(),
    };
    let report = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    let qualifying = attest::qualifying_data(&report).map_err(|e| e.to_string())?;
    let (a, s) = softkeys::quote(&ak, &ak_name, &qualifying, PCR, &pcr_digest, started.elapsed().as_millis() as u64);
    let body = Checkin { report, attest: hex::encode(a), signature: hex::encode(s) };
    let sent = Instant::now();
    let verdict: CheckinVerdict = post(http, &format!("{base}/checkin"), None, &body).await?;
    t.checkin_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    t.latency_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    d.pending.clear();
    if verdict.verdict == outpost_protocol::attest::Verdict::Attested {
        t.attested += 1;
    } else {
        t.failed_verdicts += 1;
    }
    // The simulated device reads its assignment without verifying it (a real agent
    // verifies it against its pinned director root and the image repository).
    let Some(text) = verdict.director_targets else { return Ok(()) };
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("director targets: {e}"))?;
    let Some((path, target)) = doc["signed"]["targets"].as_object().and_then(|m| m.iter().next()) else { return Ok(()) };
    let version = target["custom"]["version"].as_str().unwrap_or_default().to_owned();
    let sha = target["hashes"]["sha256"].as_str().unwrap_or_default().to_owned();
    if sha == d.image_sha256 || d.failed.contains(&version) || d.version.as_deref() == Some(version.as_str()) {
        return Ok(());
    }
    t.assigned += 1;
    let other = if d.slot == "A" { "B" } else { "A" };
    let failing = fails(fail.get(&version).copied().unwrap_or(0.0), &version, &d.device_id);
    let outcome = if failing { ReportOutcome::RolledBack } else { ReportOutcome::Committed };
    d.pending.push(InstallReport {
        device_id: d.device_id.clone(),
        hardware_class: d.hardware_class.clone(),
        target: path.clone(),
        version: version.clone(),
        outcome,
        reason: failing.then(|| "simulated health check failure".to_owned()),
        slot: other.to_owned(),
        at: chrono::Utc::now().to_rfc3339(),
    });
    if failing {
        t.rolled_back += 1;
        d.failed.push(version);
    } else {
        t.committed += 1;
        d.image_sha256 = sha;
        d.version = Some(version);
        d.slot = other.to_owned();
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn load(path: &PathBuf) -> Res<SimState> {
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn save(path: &PathBuf, state: &SimState) -> Res<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(state).map_err(|e| e.to_string())?).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename {}: {e}", path.display()))
}

async fn run(cli: Cli) -> Res<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(256).build().map_err(|e| e.to_string())?;
    match cli.command {
        Command::Enroll { server, token, devices, hardware_class, image_sha256, version, labels, ek_pool, concurrency, state, append } => {
            let server = server.trim_end_matches('/').to_owned();
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("label {l:?} is not KEY=VALUE")))
                .collect::<Res<_>>()?;
            eprintln!("{LABEL}: generating {ek_pool} RSA-2048 keys for the EKs");
            let keys: Vec<rsa::RsaPrivateKey> = (0..ek_pool.max(1))
                .map(|_| rsa::RsaPrivateKey::new(&mut attest::credential::OsRng, 2048).map_err(|e| e.to_string()))
                .collect::<Res<_>>()?;
            let keys = Arc::new(keys);
            let next = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (http, server, token, class, labels, keys, next) =
                    (http.clone(), server.clone(), token.clone(), hardware_class.clone(), labels.clone(), keys.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= devices {
                            return Ok::<_, String>(out);
                        }
                        let k = i % keys.len();
                        out.push(enroll_one(&http, &server, &token, &class, &labels, &keys[k], k).await?);
                        if (i + 1) % 1000 == 0 {
                            eprintln!("  enrolled {} devices", i + 1);
                        }
                    }
                }));
            }
            let mut enrolled = Vec::new();
            for t in tasks {
                enrolled.extend(t.await.map_err(|e| e.to_string())??);
            }
            for d in &mut enrolled {
                d.image_sha256 = image_sha256.clone();
                d.version = version.clone();
            }
            let secs = started.elapsed().as_secs_f64();
            let ek_keys = keys.iter().map(|k| k.to_pkcs8_der().map(|d| hex::encode(d.as_bytes())).map_err(|e| e.to_string())).collect::<Res<_>>()?;
            let mut all = SimState { label: LABEL.into(), server, ek_keys, devices: Vec::new() };
            if append && state.exists() {
                let old = load(&state)?;
                if old.server != all.server {
                    return Err(format!("{} holds devices of {}, not {}", state.display(), old.server, all.server));
                }
                all.devices = old.devices;
            }
            all.devices.extend(enrolled);
            save(&state, &all)?;
            eprintln!("{LABEL}: enrolled {devices} devices in {secs:.1} s ({:.0}/s)", devices as f64 / secs);
            Ok(())
        }
        Command::Run { state: path, duration, rate, concurrency, fail, max_checkins, json, servers } => {
            let state = load(&path)?;
            let servers: Arc<Vec<String>> =
                Arc::new(if servers.is_empty() { vec![state.server.clone()] } else { servers.iter().map(|s| s.trim_end_matches('/').to_owned()).collect() });
            let fail: BTreeMap<String, f64> = fail
                .iter()
                .map(|f| match f.split_once('=').map(|(v, x)| (v.to_owned(), x.parse::<f64>())) {
                    Some((v, Ok(x))) if (0.0..=1.0).contains(&x) => Ok((v, x)),
                    _ => Err(format!("--fail {f:?} must be VERSION=FRACTION with FRACTION in 0..1")),
                })
                .collect::<Res<_>>()?;
            let n = state.devices.len();
            if n == 0 {
                return Err("no devices in the state file; run enroll first".into());
            }
            let devices: Arc<Vec<tokio::sync::Mutex<SimDevice>>> = Arc::new(state.devices.iter().cloned().map(tokio::sync::Mutex::new).collect());
            let fail = Arc::new(fail);
            let next = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let deadline = started + duration;
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (http, servers, devices, fail, next) = (http.clone(), servers.clone(), devices.clone(), fail.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    let mut t = Tally::default();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if Instant::now() >= deadline || (max_checkins > 0 && k >= max_checkins) {
                            return t;
                        }
                        if rate > 0.0 {
                            let due = started + Duration::from_secs_f64(k as f64 / rate);
                            if due >= deadline {
                                return t;
                            }
                            tokio::time::sleep_until(due.into()).await;
                        }
                        let Ok(mut d) = devices[k % devices.len()].try_lock() else { continue };
                        let (nonce_server, report_server) = (&servers[k % servers.len()], &servers[(k + 1) % servers.len()]);
                        if let Err(e) = checkin(&http, nonce_server, report_server, &mut d, &fail, &mut t).await {
                            t.errors += 1;
                            if t.first_errors.len() < 3 {
                                t.first_errors.push(e);
                            }
                        }
                    }
                }));
            }
            let mut all = Tally::default();
            for task in tasks {
                let t = task.await.map_err(|e| e.to_string())?;
                all.latency_ms.extend(t.latency_ms);
                all.checkin_ms.extend(t.checkin_ms);
                all.attested += t.attested;
                all.failed_verdicts += t.failed_verdicts;
                all.errors += t.errors;
                all.first_errors.extend(t.first_errors);
                all.assigned += t.assigned;
                all.committed += t.committed;
                all.rolled_back += t.rolled_back;
            }
            let secs = started.elapsed().as_secs_f64();
            all.latency_ms.sort_by(f64::total_cmp);
            all.checkin_ms.sort_by(f64::total_cmp);
            let done = all.latency_ms.len();
            let result = json!({
                "label": LABEL,
                "devices": n,
                "seconds": secs,
                "checkins": done,
                "checkins_per_s": done as f64 / secs,
                "target_rate": rate,
                "concurrency": concurrency,
                "servers": *servers,
                "attested": all.attested,
                "failed_verdicts": all.failed_verdicts,
                "errors": all.errors,
                "first_errors": all.first_errors,
                "latency_ms": {"p50": percentile(&all.latency_ms, 0.5), "p99": percentile(&all.latency_ms, 0.99), "max": all.latency_ms.last()},
                "checkin_request_ms": {"p50": percentile(&all.checkin_ms, 0.5), "p99": percentile(&all.checkin_ms, 0.99)},
                "installs": {"assigned": all.assigned, "committed": all.committed, "rolled_back": all.rolled_back},
            });
            let mut saved = state;
            saved.devices = Vec::with_capacity(n);
            for d in devices.iter() {
                saved.devices.push(d.lock().await.clone());
            }
            save(&path, &saved)?;
            if json {
                println!("{result}");
            } else {
                println!(
                    "{LABEL}: {done} check-ins from {n} devices in {secs:.1} s = {:.0}/s; latency (nonce + check-in) p50 {:.1} ms p99 {:.1} ms; {} attested, {} failed, {} errors; installs: {} assigned, {} committed, {} rolled back",
                    done as f64 / secs,
                    percentile(&all.latency_ms, 0.5),
                    percentile(&all.latency_ms, 0.99),
                    all.attested,
                    all.failed_verdicts,
                    all.errors,
                    all.assigned,
                    all.committed,
                    all.rolled_back
                );
                for e in &all.first_errors {
                    println!("  error: {e}");
                }
            }
            if all.errors > 0 && done == 0 {
                return Err("every check-in failed".into());
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("outpost-fleet-sim: {e}");
        std::process::exit(1);
    }
}
