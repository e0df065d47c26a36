//! The director: per-device targets signed at each check-in ([`sign`]), and the
//! decision of what each device should run ([`decide`], pure). This module runs a
//! decision inside the store's check-in transaction: the store reads, `decide`
//! decides, the store writes.

pub mod decide;
pub mod sign;

use outpost_protocol::director::{Assignment, FirmwareRelease};
use outpost_protocol::rollout::Transition;
use serde_json::json;
use std::sync::Arc;

pub use decide::{decide, DeviceFacts};
pub use sign::Director;

use crate::error::ServerError;
use crate::storage::{Decided, DirectorView, Store};

/// The director's answer for one check-in.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The per-device director targets version to sign.
    pub director_version: u64,
    pub assignment: Option<Assignment>,
    /// Rollout transitions this check-in caused.
    pub transitions: Vec<(String, Transition)>,
}

/// What the decision hands back through the store's transaction.
pub type Chosen = (Option<Assignment>, Vec<(String, Transition)>);

/// The decision as the store's check-in transaction runs it on what it read.
pub fn decider(f: DeviceFacts, releases: Arc<Vec<FirmwareRelease>>, now: i64) -> impl FnMut(&DirectorView) -> Decided<Chosen> + Send + 'static {
    move |view| {
        let d = decide(view, &f, &releases, now).map_err(|e| ServerError::State(e.to_string()))?;
        let transitions = d.changes.transitions.iter().map(|(id, _, t)| (id.clone(), t.clone())).collect();
        Ok((d.changes, (d.assignment, transitions)))
    }
}

impl Outcome {
    pub fn new(((assignment, transitions), director_version): (Chosen, u64)) -> Self {
        Outcome { director_version, assignment, transitions }
    }
}

/// The director's part of a check-in on its own, in one write transaction: update the
/// device's assignment statuses from what it reported, feed the rollouts they belong
/// to, then decide what the device should run and bump its director version.
/// `releases` are the signed full-image releases of the device's class.
pub async fn director_checkin(store: &Store, f: &DeviceFacts, releases: &[FirmwareRelease], now: i64) -> Result<Outcome, ServerError> {
    let decide = decider(f.clone(), Arc::new(releases.to_vec()), now);
    store.director_checkin(&f.device_id, &f.hardware_class, f.verdict(), decide, now).await.map(Outcome::new)
}

/// Records transitions the engine caused (thresholds, soak) in the audit log.
pub async fn log_transitions(s: &Store, transitions: &[(String, Transition)]) {
    for (id, t) in transitions {
        tracing::warn!(rollout = %id, from = %t.from, to = %t.to, cause = ?t.cause, "rollout transition");
        if let Err(e) = s.log("server", &format!("rollout_{}", t.to), &json!({"rollout": id, "transition": t})).await {
            tracing::error!(error = %e, "cannot record a rollout transition in the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use outpost_protocol::attest::DeviceHealth;
    use outpost_protocol::director::FirmwareRelease;
    use outpost_protocol::rollout::{self, Event, Gate, State, WaveSpec};
    use outpost_protocol::slot::Slot;

    use super::*;
    use crate::error::ServerError;
    use crate::storage::{ActionOutcome, InstallReport, ReportOutcome, RolloutRecord, Store};
    use super::decide::tests::release;

    /// The API's JSON of stored rows, as the checks below read them.
    fn as_json<T: serde::Serialize>(rows: &[T]) -> Vec<serde_json::Value> {
        rows.iter().map(|r| serde_json::to_value(r).unwrap_or_else(|e| panic!("{e}"))).collect()
    }

    use crate::storage::testing::{add_devices, on_both_backends};
    use crate::storage::Backend;

    /// A store on `b` with `devices` bare rpi4 devices, dev-00000 onwards.
    async fn store_with(b: Backend, devices: usize) -> Store {
        let s = Store::open(&b).await.unwrap_or_else(|e| panic!("{e}"));
        add_devices(&s, (0..devices).map(|i| format!("dev-{i:05}"))).await;
        s
    }

    on_both_backends! {
        a_release_failing_on_30_percent_pauses_in_the_first_wave_and_goes_no_further;
        waves_pass_after_the_soak_and_late_devices_join;
        quarantined_devices_get_nothing_and_abort_can_roll_back;
        two_stores_on_one_database_assign_each_device_once_and_count_once;
    }

    fn rollout(id: &str, rel: FirmwareRelease, waves: &[f64], failure: f64, min_devices: u32, soak: u64) -> RolloutRecord {
        RolloutRecord {
            id: id.into(),
            name: id.into(),
            hardware_class: "rpi4".into(),
            labels: BTreeMap::new(),
            release: rel,
            waves: waves
                .iter()
                .map(|&p| WaveSpec { percent: p, success_threshold: 0.9, failure_threshold: failure, min_devices, soak_secs: soak })
                .collect(),
            gate: Gate::Auto,
            state: State::Draft,
            created_by: "ops".into(),
            created_at: "now".into(),
        }
    }

    fn report(device: &str, rel: &FirmwareRelease, outcome: ReportOutcome) -> InstallReport {
        InstallReport {
            device_id: device.into(),
            hardware_class: "rpi4".into(),
            target: rel.path.clone(),
            version: rel.version.clone(),
            outcome,
            reason: (outcome == ReportOutcome::RolledBack).then(|| "health check failed".into()),
            slot: Slot::B,
            at: "2026-11-23T00:00:00Z".into(),
        }
    }

    fn facts(device: &str, image: &str, version: &str, health: DeviceHealth, reports: &[InstallReport]) -> DeviceFacts {
        DeviceFacts {
            device_id: device.to_owned(),
            hardware_class: "rpi4".to_owned(),
            attested: true,
            image_sha256: Some(image.to_owned()),
            version: Some(version.to_owned()),
            health,
            reports: reports.to_vec(),
        }
    }

    fn fails(device: &str) -> bool {
        // A stable 30 % of devices fail the release.
        rollout::position("failure-model", device) < 0.3
    }

    async fn a_release_failing_on_30_percent_pauses_in_the_first_wave_and_goes_no_further(b: Backend) {
        let s = store_with(b, 10_000).await;
        let n = 10_000;
        let (v1, v2) = (release("1.0.0", 'a'), release("2.0.0", 'b'));
        s.create_rollout(&rollout("r-bad", v2.clone(), &[1.0, 10.0, 50.0, 100.0], 0.1, 5, 0)).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s.rollout_action("r-bad", Event::Start { by: "ops".into() }, 0).await, Ok(ActionOutcome::Done(..))));
        let releases = [v1.clone(), v2.clone()];
        let ids: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
        let mut assigned = std::collections::BTreeSet::new();
        // Three rounds of check-ins: devices assigned in one round report their outcome
        // in the next.
        for round in 0..3 {
            for id in &ids {
                let outcome = assigned.contains(id).then(|| report(id, &v2, if fails(id) { ReportOutcome::RolledBack } else { ReportOutcome::Committed }));
                let reports: Vec<InstallReport> = outcome.into_iter().collect();
                let (image, version) = match reports.first() {
                    Some(r) if r.outcome == ReportOutcome::Committed => (v2.measurement.as_str(), "2.0.0"),
                    _ => (v1.measurement.as_str(), "1.0.0"),
                };
                let d = director_checkin(&s, &facts(id, image, version, DeviceHealth::Healthy, &reports), &releases, 10 + round).await.unwrap_or_else(|e| panic!("{e}"));
                if let Some(a) = d.assignment {
                    assert_eq!(a.custom.wave, 0, "{id} assigned outside wave 0 in round {round}");
                    assigned.insert(id.clone());
                }
            }
        }
        let r = s.rollout("r-bad").await.ok().flatten().unwrap_or_else(|| panic!("rollout"));
        let State::Paused { wave: 0, reason: rollout::PauseReason::FailureThreshold { failed, assigned: total, .. }, .. } = r.state else {
            panic!("expected a pause in wave 0, got {:?}", r.state)
        };
        let in_wave0 = ids.iter().filter(|id| rollout::wave_of(&r.waves, "r-bad", id) == Some(0)).count();
        assert!(in_wave0 > 50 && in_wave0 < 150, "{in_wave0}");
        assert!(assigned.len() <= in_wave0 && failed as f64 >= 0.1 * total as f64, "{failed} of {total}");
        let rows = as_json(&s.rollout_assignments("r-bad").await.unwrap_or_default());
        assert!(rows.iter().all(|a| a["wave"] == 0), "nothing outside wave 0 was ever assigned");
        let (_, events) = s.rollout_progress("r-bad").await.unwrap_or_default();
        let events = as_json(&events);
        assert_eq!(events.last().map(|e| e["cause"]["kind"].clone()), Some(serde_json::json!("failure_threshold")));
    }

    async fn waves_pass_after_the_soak_and_late_devices_join(b: Backend) {
        let s = store_with(b, 400).await;
        let (v1, v2) = (release("1.0.0", 'a'), release("2.0.0", 'b'));
        s.create_rollout(&rollout("r-ok", v2.clone(), &[10.0, 100.0], 0.5, 3, 600)).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s.rollout_action("r-ok", Event::Start { by: "ops".into() }, 1000).await, Ok(ActionOutcome::Done(..))));
        let releases = [v1.clone(), v2.clone()];
        let checkin_all = async |now: i64, s: &Store| {
            for i in 0..400 {
                let id = format!("dev-{i:05}");
                let d = director_checkin(s, &facts(&id, &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, now).await.unwrap_or_else(|e| panic!("{e}"));
                if let Some(a) = d.assignment {
                    // The device installs it at once and reports at its next check-in.
                    let r = [report(&id, &v2, ReportOutcome::Committed)];
                    director_checkin(s, &facts(&id, &v2.measurement, "2.0.0", DeviceHealth::Healthy, &r), &releases, now).await.unwrap_or_else(|e| panic!("{e}"));
                    // Delivered twice (a retried check-in): counted once.
                    director_checkin(s, &facts(&id, &v2.measurement, "2.0.0", DeviceHealth::Healthy, &r), &releases, now).await.unwrap_or_else(|e| panic!("{e}"));
                    let _ = a;
                }
            }
        };
        checkin_all(1100, &s).await;
        let r = s.rollout("r-ok").await.ok().flatten().unwrap_or_else(|| panic!("rollout"));
        assert!(matches!(r.state, State::Running { wave: 0, .. }), "still soaking: {:?}", r.state);
        let (c, _) = s.rollout_progress("r-ok").await.unwrap_or_default();
        assert_eq!(c[0].healthy, c[0].assigned, "each device counted once");
        assert!(c[0].assigned > 10 && c[0].assigned < 80, "{:?}", c[0]);
        // The soak passes without check-ins: the tick advances it.
        let t = s.rollout_tick(1599).await.unwrap_or_default();
        assert_eq!(t.len(), 0, "soak not over 599 s after the start");
        let t = s.rollout_tick(1600).await.unwrap_or_default();
        assert_eq!(t.len(), 1, "{t:?}");
        checkin_all(1700, &s).await;
        let (c, _) = s.rollout_progress("r-ok").await.unwrap_or_default();
        assert_eq!(c[1].assigned, 400, "every device is in the last wave: {:?}", c[1]);
        s.rollout_tick(2400).await.unwrap_or_default();
        let r = s.rollout("r-ok").await.ok().flatten().unwrap_or_else(|| panic!("rollout"));
        assert_eq!(r.state.name(), "completed");
        // A device enrolled later joins the completed rollout.
        add_devices(&s, std::iter::once("dev-late".to_owned())).await;
        let d = director_checkin(&s, &facts("dev-late", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, 3000).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.assignment.map(|a| a.custom.version), Some("2.0.0".into()));
        // Director versions only grow.
        let d2 = director_checkin(&s, &facts("dev-late", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, 3001).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(d2.director_version > d.director_version);
    }

    async fn quarantined_devices_get_nothing_and_abort_can_roll_back(b: Backend) {
        let s = store_with(b, 2).await;
        let (v1, v2) = (release("1.0.0", 'a'), release("2.0.0", 'b'));
        s.create_rollout(&rollout("r", v2.clone(), &[100.0], 0.9, 1, 0)).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s.rollout_action("r", Event::Start { by: "ops".into() }, 0).await, Ok(ActionOutcome::Done(..))));
        let releases = [v1.clone(), v2.clone()];
        let mut bad = facts("dev-00000", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]);
        bad.attested = false;
        assert_eq!(director_checkin(&s, &bad, &releases, 1).await.map(|d| d.assignment).ok(), Some(None), "quarantined: nothing assigned");
        let d = director_checkin(&s, &facts("dev-00001", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, 1).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.assignment.as_ref().map(|a| a.custom.rollback), Some(false));
        assert!(matches!(s.rollout_action("r", Event::Abort { by: "ops".into(), roll_back: true }, 2).await, Ok(ActionOutcome::Done(..))));
        let d = director_checkin(&s, &facts("dev-00001", &v2.measurement, "2.0.0", DeviceHealth::Healthy, &[]), &releases, 3).await.unwrap_or_else(|e| panic!("{e}"));
        let a = d.assignment.unwrap_or_else(|| panic!("a rollback assignment"));
        assert_eq!((a.path.as_str(), a.custom.rollback), (v1.path.as_str(), true));
        assert!(matches!(s.rollout_action("r", Event::Resume { by: "ops".into() }, 4).await, Ok(ActionOutcome::Refused(_))));
    }

    async fn two_stores_on_one_database_assign_each_device_once_and_count_once(b: Backend) {
        use std::sync::Arc;
        let ok = |e: ServerError| -> ! { panic!("{e}") };
        let n = 300;
        let stores = [Arc::new(store_with(b.clone(), n).await), Arc::new(Store::open(&b).await.unwrap_or_else(|e| ok(e)))];
        let ids: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
        let (v1, v2) = (release("1.0.0", 'a'), release("2.0.0", 'b'));
        stores[1].create_rollout(&rollout("r", v2.clone(), &[20.0, 100.0], 0.1, 5, 3600)).await.unwrap_or_else(|e| ok(e));
        assert!(matches!(stores[0].rollout_action("r", Event::Start { by: "ops".into() }, 0).await, Ok(ActionOutcome::Done(..))));
        // Three rounds; in each, eight tasks check their devices in at once, through
        // alternating stores. Assigned devices report their outcome in the next round.
        let assigned = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
        for round in 0..3i64 {
            let mut tasks = Vec::new();
            for t in 0..8 {
                let (stores, ids, assigned, v1, v2) = (stores.clone(), ids.clone(), assigned.clone(), v1.clone(), v2.clone());
                tasks.push(tokio::spawn(async move {
                    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 8 == t) {
                        let had = assigned.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id);
                        let reports: Vec<InstallReport> =
                            if had { vec![report(id, &v2, if fails(id) { ReportOutcome::RolledBack } else { ReportOutcome::Committed })] } else { Vec::new() };
                        let committed = reports.first().is_some_and(|r| r.outcome == ReportOutcome::Committed);
                        let (image, version) = if committed { (v2.measurement.as_str(), "2.0.0") } else { (v1.measurement.as_str(), "1.0.0") };
                        let releases = [v1.clone(), v2.clone()];
                        let d = director_checkin(&stores[(i + round as usize) % 2], &facts(id, image, version, DeviceHealth::Healthy, &reports), &releases, 10 + round)
                            .await
                            .unwrap_or_else(|e| panic!("{e}"));
                        if let Some(a) = d.assignment {
                            assigned.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), a.custom.wave);
                        }
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let r = stores[0].rollout("r").await.unwrap_or_else(|e| ok(e)).unwrap_or_else(|| panic!("rollout"));
        assert!(matches!(r.state, State::Paused { wave: 0, .. }), "{:?}", r.state);
        let rows = as_json(&stores[1].rollout_assignments("r").await.unwrap_or_else(|e| ok(e)));
        let devices: std::collections::BTreeSet<&str> = rows.iter().filter_map(|a| a["device_id"].as_str()).collect();
        assert_eq!(devices.len(), rows.len(), "no device assigned twice");
        let told = assigned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(told.len(), rows.len(), "every device told of an assignment has exactly one");
        assert!(rows.iter().all(|a| a["wave"] == 0) && told.values().all(|w| *w == 0), "nothing outside wave 0");
        let (counters, events) = stores[1].rollout_progress("r").await.unwrap_or_else(|e| ok(e));
        let events = as_json(&events);
        let count = |s: &str| rows.iter().filter(|a| a["status"] == s).count() as u32;
        assert_eq!(
            (counters[0].assigned, counters[0].healthy, counters[0].rolled_back),
            (rows.len() as u32, count("healthy"), count("rolled_back")),
            "counters are the statuses, each device counted once"
        );
        assert_eq!(events.iter().filter(|e| e["to"] == "paused").count(), 1, "{events:?}");
    }
}
