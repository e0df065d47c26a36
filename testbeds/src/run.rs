//! `run`: the devices in the state file check in, round robin, for a duration at a
//! rate; throughput, latency and simulated installs are printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::checkin::{checkin, Tally};
use crate::error::SimError;
use crate::state::{load, save, SimDevice};
use crate::LABEL;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
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
}

/// When the workers stop, and how fast they go.
#[derive(Clone, Copy)]
struct Pace {
    started: Instant,
    deadline: Instant,
    rate: f64,
    max_checkins: usize,
}

pub async fn run(http: reqwest::Client, args: RunArgs) -> Result<(), SimError> {
    let RunArgs { state: path, duration, rate, concurrency, fail, max_checkins, json, servers } = args;
    let state = load(&path)?;
    let servers: Arc<Vec<String>> =
        Arc::new(if servers.is_empty() { vec![state.server.clone()] } else { servers.iter().map(|s| s.trim_end_matches('/').to_owned()).collect() });
    let fail = parse_failures(&fail)?;
    let n = state.devices.len();
    if n == 0 {
        return Err(SimError::NoDevices);
    }
    let devices: Arc<Vec<Mutex<SimDevice>>> = Arc::new(state.devices.iter().cloned().map(Mutex::new).collect());
    let started = Instant::now();
    let pace = Pace { started, deadline: started + duration, rate, max_checkins };
    let all = check_in_all(&http, &servers, &devices, Arc::new(fail), pace, concurrency).await?;
    let secs = started.elapsed().as_secs_f64();
    let result = summary(&all, n, secs, rate, concurrency, &servers);
    let mut saved = state;
    saved.devices = Vec::with_capacity(n);
    for d in devices.iter() {
        saved.devices.push(d.lock().await.clone());
    }
    save(&path, &saved)?;
    if json {
        println!("{result}");
    } else {
        print_summary(&all, n, secs);
    }
    if all.errors > 0 && all.latency_ms.is_empty() {
        return Err(SimError::EveryCheckinFailed);
    }
    Ok(())
}

/// `--fail VERSION=FRACTION` arguments.
fn parse_failures(fail: &[String]) -> Result<BTreeMap<String, f64>, SimError> {
    fail.iter()
        .map(|f| match f.split_once('=').map(|(v, x)| (v.to_owned(), x.parse::<f64>())) {
            Some((v, Ok(x))) if (0.0..=1.0).contains(&x) => Ok((v, x)),
            _ => Err(SimError::Usage(format!("--fail {f:?} must be VERSION=FRACTION with FRACTION in 0..1"))),
        })
        .collect()
}

/// Runs `concurrency` workers until the pace says stop; returns their tallies merged,
/// latencies sorted.
async fn check_in_all(
    http: &reqwest::Client,
    servers: &Arc<Vec<String>>,
    devices: &Arc<Vec<Mutex<SimDevice>>>,
    fail: Arc<BTreeMap<String, f64>>,
    pace: Pace,
    concurrency: usize,
) -> Result<Tally, SimError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, servers, devices, fail, next) = (http.clone(), servers.clone(), devices.clone(), fail.clone(), next.clone());
        tasks.push(tokio::spawn(async move { worker(&http, &servers, &devices, &fail, &next, pace).await }));
    }
    let mut all = Tally::default();
    for task in tasks {
        all.merge(task.await.map_err(|e| SimError::Runtime(e.to_string()))?);
    }
    all.latency_ms.sort_by(f64::total_cmp);
    all.checkin_ms.sort_by(f64::total_cmp);
    Ok(all)
}

/// One worker: takes the next check-in number, waits for its time at `pace.rate`, and
/// checks in a device that no other worker holds.
async fn worker(http: &reqwest::Client, servers: &[String], devices: &[Mutex<SimDevice>], fail: &BTreeMap<String, f64>, next: &AtomicUsize, pace: Pace) -> Tally {
    let mut t = Tally::default();
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= pace.deadline || (pace.max_checkins > 0 && k >= pace.max_checkins) {
            return t;
        }
        if pace.rate > 0.0 {
            let due = pace.started + Duration::from_secs_f64(k as f64 / pace.rate);
            if due >= pace.deadline {
                return t;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(mut d) = devices[k % devices.len()].try_lock() else { continue };
        let (nonce_server, report_server) = (&servers[k % servers.len()], &servers[(k + 1) % servers.len()]);
        if let Err(e) = checkin(http, nonce_server, report_server, &mut d, fail, &mut t).await {
            t.errors += 1;
            if t.first_errors.len() < 3 {
                t.first_errors.push(e.to_string());
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The `--json` result.
fn summary(all: &Tally, n: usize, secs: f64, rate: f64, concurrency: usize, servers: &[String]) -> Value {
    let done = all.latency_ms.len();
    json!({
        "label": LABEL,
        "devices": n,
        "seconds": secs,
        "checkins": done,
        "checkins_per_s": done as f64 / secs,
        "target_rate": rate,
        "concurrency": concurrency,
        "servers": servers,
        "attested": all.attested,
        "failed_verdicts": all.failed_verdicts,
        "errors": all.errors,
        "first_errors": all.first_errors,
        "latency_ms": {"p50": percentile(&all.latency_ms, 0.5), "p99": percentile(&all.latency_ms, 0.99), "max": all.latency_ms.last()},
        "checkin_request_ms": {"p50": percentile(&all.checkin_ms, 0.5), "p99": percentile(&all.checkin_ms, 0.99)},
        "installs": {"assigned": all.assigned, "committed": all.committed, "rolled_back": all.rolled_back},
    })
}

fn print_summary(all: &Tally, n: usize, secs: f64) {
    let done = all.latency_ms.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_samples() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.99), 3.0);
    }

    #[test]
    fn failures_are_version_equals_fraction() {
        let f = parse_failures(&["2.0.0=0.6".to_owned()]).expect("valid");
        assert_eq!(f.get("2.0.0"), Some(&0.6));
        assert!(parse_failures(&["2.0.0=1.5".to_owned()]).is_err());
        assert!(parse_failures(&["2.0.0".to_owned()]).is_err());
    }
}
