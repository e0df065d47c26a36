//! Attestation benchmark driver (run by bench/attest.sh; see bench/README.md).
//!
//! For an enrolled device (agent config with a `[tpm]` section, booted once so its
//! measurement log exists) against a running `outpost-server`:
//! 1. `latency`: N sequential full check-ins (nonce request, TPM quote, POST, verdict),
//!    each timed end to end;
//! 2. `server`: K check-ins, prepared in batches of 16 (each with its own nonce and
//!    quote; the server allows 16 unused nonces per device) and each batch posted back to
//!    back; the server process's CPU time (utime + stime from /proc/PID/stat) while it
//!    issued the K nonces and handled the K check-ins gives check-ins per server CPU-second;
//! 3. `verify`: the server's pure per-check-in work in this process on one thread
//!    (parse the AK, verify the quote signature and its binding to the report, parse the
//!    report, replay the event log, look up expected measurements) for S seconds.
//!
//! Usage: attest_bench CONFIG SERVER_PID LATENCY_N BATCH_K VERIFY_SECS  (JSON on stdout)

use std::time::{Duration, Instant};

use outpost_agent::attest::{self, DeviceState, Identity};
use outpost_agent::config::AgentConfig;
use outpost_protocol::attest::{evaluate_checkin, verify_checkin_quote, CheckinReport, DeviceHealth, TpmPublic};

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat of the server");
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(args.len() == 6, "usage: attest_bench CONFIG SERVER_PID LATENCY_N BATCH_K VERIFY_SECS");
    let config = AgentConfig::load(std::path::Path::new(&args[1])).expect("agent config");
    let fetcher = outpost_agent::Fetcher::new(config.http_limits(), config.http_ca_file.as_deref()).expect("HTTP client");
    let http = fetcher.client().clone();
    let pid: u32 = args[2].parse().expect("server pid");
    let n: usize = args[3].parse().expect("latency count");
    let k: usize = args[4].parse().expect("batch size");
    let verify_secs: f64 = args[5].parse().expect("verify seconds");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let state = DeviceState { slot: outpost_protocol::slot::Slot::A, version: Some("1.0.0".into()), sbom_sha256: None, health: DeviceHealth::Healthy, reports: vec![], incidents: vec![] };

    // 1. End-to-end latency.
    let mut lat = Vec::with_capacity(n);
    let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let v = rt.block_on(attest::checkin(&config, &http, &state, None)).expect("check-in");
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        *verdicts.entry(v.verdict.to_string()).or_default() += 1;
    }
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);

    // 2. Server CPU per check-in: nonces and quotes prepared in batches (the server
    // lets a device hold at most 16 unused nonces), each batch then posted back to back.
    const BATCH: usize = 16;
    let mut prepared = Vec::with_capacity(k);
    let (mut prep_s, mut wall) = (0.0f64, 0.0f64);
    let cpu0 = cpu_seconds(pid);
    let mut nonce_cpu = 0.0f64;
    while prepared.len() < k {
        let n = BATCH.min(k - prepared.len());
        let c0 = cpu_seconds(pid);
        let t = Instant::now();
        let batch: Vec<_> = (0..n).map(|_| rt.block_on(attest::prepare_checkin(&config, &http, &state, None)).expect("prepare check-in")).collect();
        prep_s += t.elapsed().as_secs_f64();
        // While preparing, the server only issued nonces (the quotes come from swtpm).
        nonce_cpu += cpu_seconds(pid) - c0;
        let t = Instant::now();
        for (url, body) in &batch {
            let v = rt.block_on(attest::send_checkin(&config, &http, url, body)).expect("send check-in");
            *verdicts.entry(v.verdict.to_string()).or_default() += 1;
        }
        wall += t.elapsed().as_secs_f64();
        prepared.extend(batch);
    }
    let cpu = cpu_seconds(pid) - cpu0 - nonce_cpu;

    // 3. Pure verification on one core.
    let identity = Identity::load(&config).expect("identity").expect("enrolled");
    let ak_bytes = hex::decode(&identity.ak_public).expect("ak hex");
    let (_, sample) = &prepared[0];
    let attest_bytes = hex::decode(&sample.attest).expect("attest hex");
    let sig = hex::decode(&sample.signature).expect("sig hex");
    let expected: std::collections::BTreeMap<String, String> = {
        let report: CheckinReport = serde_json::from_value(sample.report.clone()).expect("report");
        report.event_log.events.iter().map(|e| (e.sha256.clone(), "firmware/x".to_owned())).collect()
    };
    let deadline = Duration::from_secs_f64(verify_secs);
    let t0 = Instant::now();
    let mut iterations = 0u64;
    while t0.elapsed() < deadline {
        for _ in 0..50 {
            let ak = TpmPublic::parse(&ak_bytes, "attestation key").expect("ak");
            let quote = verify_checkin_quote(&ak, &sample.report, &attest_bytes, &sig).expect("verify");
            let report: CheckinReport = serde_json::from_value(sample.report.clone()).expect("report");
            let measured = evaluate_checkin(&quote, &report).expect("evaluate");
            assert!(measured.iter().all(|d| expected.contains_key(d)));
            iterations += 1;
        }
    }
    let verify_elapsed = t0.elapsed().as_secs_f64();

    let out = serde_json::json!({
        "latency_ms": lat,
        "latency_p50_ms": percentile(&sorted, 0.50),
        "latency_p99_ms": percentile(&sorted, 0.99),
        "verdicts": verdicts,
        "batch": {"count": k, "prepare_s": prep_s, "post_wall_s": wall, "server_cpu_s": cpu, "nonce_cpu_s": nonce_cpu,
                   "per_server_cpu_s": if cpu + nonce_cpu > 0.0 { k as f64 / (cpu + nonce_cpu) } else { f64::NAN }},
        "verify": {"iterations": iterations, "seconds": verify_elapsed, "per_s": iterations as f64 / verify_elapsed},
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
