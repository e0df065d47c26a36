//! The director's decision for one check-in, pure: given what the store read (the
//! device's assignments and labels, the rollouts and their assignment counts), what
//! the device reported and the clock, which assignment statuses move, which rollout
//! transitions that feedback causes, and what the device should run now. No I/O: the
//! caller reads and writes inside one transaction (`storage::assignments`).

use std::collections::BTreeMap;

use outpost_protocol::attest::{DeviceHealth, Verdict};
use outpost_protocol::director::{Assignment, AssignmentCustom, FirmwareRelease};
use outpost_protocol::release::ReleaseVersion;
use outpost_protocol::report::{InstallReport, ReportOutcome};
use outpost_protocol::rollout::{self, AssignmentStatus as Status, Event, State};

use crate::storage::{AssignmentView, DirectorChanges, DirectorView, NewAssignment, RolloutRecord, StatusChange, WaveCounts};

/// What a check-in says about a device, for the rollout engine.
/// Owned: the decision runs inside the store's transaction, on the store's thread.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub device_id: String,
    pub hardware_class: String,
    pub attested: bool,
    /// The measured image digest of the booted slot.
    pub image_sha256: Option<String>,
    pub version: Option<String>,
    pub health: DeviceHealth,
    pub reports: Vec<InstallReport>,
}

impl DeviceFacts {
    /// The check-in's verdict these facts come with.
    pub fn verdict(&self) -> Verdict {
        if self.attested {
            Verdict::Attested
        } else {
            Verdict::Failed
        }
    }
}

/// Whether an assignment takes the device back to the release it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    RollBack,
}

/// The decision: what to write, and the assignment to sign for the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub changes: DirectorChanges,
    pub assignment: Option<Assignment>,
}

/// Feedback the rollout machine refused (a stored state that does not fit its plan).
#[derive(Debug, thiserror::Error)]
#[error("rollout {rollout}: feedback refused: {reason}")]
pub struct DecideError {
    pub rollout: String,
    pub reason: String,
}

/// Decides one check-in of `f`'s device on `view`; `releases` are the signed
/// full-image releases of its class, `now` the clock (Unix seconds).
///
/// 1. Feedback: each of the device's assignments moves to the status its report
///    shows, and the rollout it belongs to is fed its counters.
/// 2. The newest started rollout selecting the device (class and labels) assigns it,
///    when the device is attested and its wave is open; the rollout is fed again
///    (a new assignment, or a soak that has passed, may call for a transition).
pub fn decide(view: &DirectorView, f: &DeviceFacts, releases: &[FirmwareRelease], now: i64) -> Result<Decision, DecideError> {
    let mut rollouts = view.rollouts.clone();
    let mut others = view.other_rollouts.clone();
    let mut counts = view.counts.clone();
    let mut changes = DirectorChanges::default();

    for a in &view.assignments {
        let Some(record) = rollouts.iter_mut().chain(others.iter_mut()).find(|r| r.id == a.rollout_id) else { continue };
        let (new, reason) = next_status(a.status, f, &record.release);
        if new != a.status {
            changes.statuses.push(StatusChange { rollout_id: a.rollout_id.clone(), status: new, reason });
            if let Some(c) = counts.get_mut(&record.id) {
                c.moved(a.wave, a.status, new);
            }
            feedback(record, &counts, now, &mut changes)?;
        }
    }

    let mut assignment = None;
    let chosen = rollouts.iter_mut().find(|r| r.state != State::Draft && r.labels.iter().all(|(k, v)| view.labels.get(k) == Some(v)));
    if let Some(record) = chosen.filter(|_| f.attested) {
        let existing = view.assignments.iter().find(|a| a.rollout_id == record.id);
        let (a, new) = assign(record, existing, f, releases);
        assignment = a;
        if let Some(n) = new {
            if let Some(c) = counts.get_mut(&record.id) {
                c.add(n.wave, n.status, 1);
            }
            changes.new_assignment = Some(n);
        }
        feedback(record, &counts, now, &mut changes)?;
    }
    Ok(Decision { changes, assignment })
}

/// Feeds a running rollout the cumulative counters of its current wave; a transition
/// updates `record` and is added to `changes`.
fn feedback(record: &mut RolloutRecord, counts: &BTreeMap<String, WaveCounts>, now: i64, changes: &mut DirectorChanges) -> Result<(), DecideError> {
    let State::Running { wave, .. } = record.state else { return Ok(()) };
    let c = counts.get(&record.id).map(|c| c.cumulative(wave)).unwrap_or_default();
    let mut m = record.machine();
    match m.apply(Event::Feedback { counters: c }, now) {
        Ok(Some(t)) => {
            record.state = m.state;
            changes.transitions.push((record.id.clone(), record.state.clone(), t));
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(DecideError { rollout: record.id.clone(), reason: e.to_string() }),
    }
}

/// Where a device's assignment stands after a check-in.
fn next_status(old: Status, f: &DeviceFacts, release: &FirmwareRelease) -> (Status, Option<String>) {
    if !f.attested {
        return if old == Status::AttestationFailed { (old, None) } else { (Status::AttestationFailed, Some("attestation failed".into())) };
    }
    if old.terminal() {
        return (old, None);
    }
    if let Some(r) = f.reports.iter().find(|r| r.target == release.path) {
        return match r.outcome {
            ReportOutcome::RolledBack => (Status::RolledBack, r.reason.clone().or_else(|| Some("rolled back".into()))),
            ReportOutcome::Committed => (Status::Healthy, None),
        };
    }
    if f.image_sha256.as_deref() == Some(release.measurement.as_str()) && f.health == DeviceHealth::Healthy {
        return (Status::Healthy, None);
    }
    if old == Status::Assigned && matches!(f.health, DeviceHealth::Updating | DeviceHealth::Trial) {
        return (Status::Installing, None);
    }
    (old, None)
}

fn assignment_of(release: &FirmwareRelease, record: &RolloutRecord, device_id: &str, wave: u32, direction: Direction) -> Assignment {
    Assignment {
        path: release.path.clone(),
        length: release.length,
        sha256: release.sha256.clone(),
        custom: AssignmentCustom {
            device_id: device_id.to_owned(),
            rollout_id: record.id.clone(),
            wave,
            hardware_class: record.hardware_class.clone(),
            version: release.version.clone(),
            rollback: direction == Direction::RollBack,
        },
    }
}

fn version_of(s: &str) -> Option<ReleaseVersion> {
    s.parse().ok()
}

/// What `record` assigns the device now, and the assignment to record when the
/// device's wave has just opened for it.
fn assign(
    record: &RolloutRecord,
    existing: Option<&AssignmentView>,
    f: &DeviceFacts,
    releases: &[FirmwareRelease],
) -> (Option<Assignment>, Option<NewAssignment>) {
    if let State::Aborted { roll_back, .. } = record.state {
        // Abort stops new assignments; with roll back, devices the rollout reached are
        // sent back to the release they ran before (an explicit, signed rollback).
        let Some((wave, from)) = existing.filter(|_| roll_back).and_then(|a| Some((a.wave, a.from_release.as_ref()?))) else { return (None, None) };
        return (Some(assignment_of(from, record, &f.device_id, wave, Direction::RollBack)), None);
    }
    if let Some(a) = existing {
        // Assigned once, assigned for the rollout's life (a device that rolled back
        // keeps it too: its agent does not retry a release it rolled back).
        return (Some(assignment_of(&record.release, record, &f.device_id, a.wave, Direction::Forward)), None);
    }
    let Some(open) = record.state.assignable_wave(record.waves.len()) else { return (None, None) };
    let Some(wave) = rollout::wave_of(&record.waves, &record.id, &f.device_id) else { return (None, None) };
    if wave > open {
        return (None, None);
    }
    // Never downgrade by rollout: a device already ahead stays where it is.
    if let (Some(running), Some(target)) = (f.version.as_deref().and_then(version_of), version_of(&record.release.version)) {
        if running > target {
            return (None, None);
        }
    }
    let wave = wave as u32;
    let from = f.image_sha256.as_deref().and_then(|m| releases.iter().find(|r| r.measurement == m)).cloned();
    let status = if f.image_sha256.as_deref() == Some(record.release.measurement.as_str()) { Status::Healthy } else { Status::Assigned };
    let new = NewAssignment { rollout_id: record.id.clone(), wave, status, from_release: from };
    (Some(assignment_of(&record.release, record, &f.device_id, wave, Direction::Forward)), Some(new))
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use outpost_protocol::rollout::{Cause, Gate, PauseReason, Transition, WaveSpec};
    use outpost_protocol::slot::Slot;

    use super::*;

    /// A release of class rpi4 whose digests are `fill` repeated.
    pub(in crate::director) fn release(version: &str, fill: char) -> FirmwareRelease {
        FirmwareRelease {
            path: format!("firmware/rpi4/{version}/image.bin"),
            length: 1000,
            sha256: fill.to_string().repeat(64),
            version: version.into(),
            measurement: fill.to_string().repeat(64),
            sbom_sha256: None,
            golden: None,
        }
    }

    fn record(gate: Gate, state: State, waves: &[f64]) -> RolloutRecord {
        RolloutRecord {
            id: "r".into(),
            name: "r".into(),
            hardware_class: "rpi4".into(),
            labels: BTreeMap::new(),
            release: release("2.0.0", 'b'),
            waves: waves
                .iter()
                .map(|&percent| WaveSpec { percent, success_threshold: 0.5, failure_threshold: 0.2, min_devices: 1, soak_secs: 60 })
                .collect(),
            gate,
            state,
            created_by: "ops".into(),
            created_at: "then".into(),
        }
    }

    fn running(wave: usize) -> State {
        State::Running { wave, wave_started_at: 0 }
    }

    fn facts(device: &str, image: &str, reports: &[InstallReport]) -> DeviceFacts {
        DeviceFacts {
            device_id: device.to_owned(),
            hardware_class: "rpi4".to_owned(),
            attested: true,
            image_sha256: Some(image.to_owned()),
            version: None,
            health: DeviceHealth::Healthy,
            reports: reports.to_vec(),
        }
    }

    /// A view of `record` with `counts` and the device's assignment, if any.
    fn view(record: RolloutRecord, counts: WaveCounts, assigned: Option<AssignmentView>) -> DirectorView {
        DirectorView {
            labels: BTreeMap::new(),
            assignments: assigned.into_iter().collect(),
            counts: BTreeMap::from([(record.id.clone(), counts)]),
            rollouts: vec![record],
            other_rollouts: Vec::new(),
        }
    }

    fn assigned(status: Status, from: Option<FirmwareRelease>) -> AssignmentView {
        AssignmentView { rollout_id: "r".into(), wave: 0, status, from_release: from }
    }

    fn report(rel: &FirmwareRelease, outcome: ReportOutcome) -> InstallReport {
        InstallReport {
            device_id: "dev".into(),
            hardware_class: "rpi4".into(),
            target: rel.path.clone(),
            version: rel.version.clone(),
            outcome,
            reason: None,
            slot: Slot::B,
            at: "2026-11-23T00:00:00Z".into(),
        }
    }

    /// A device id in wave 0 of `waves` and one outside it.
    fn in_and_out(r: &RolloutRecord) -> (String, String) {
        let ids: Vec<String> = (0..1000).map(|i| format!("dev-{i}")).collect();
        let wave = |id: &String| rollout::wave_of(&r.waves, &r.id, id);
        let inside = ids.iter().find(|id| wave(id) == Some(0)).cloned().unwrap_or_default();
        let outside = ids.iter().find(|id| wave(id).is_some_and(|w| w > 0)).cloned().unwrap_or_default();
        (inside, outside)
    }

    fn ok(d: Result<Decision, DecideError>) -> Decision {
        d.unwrap_or_else(|e| panic!("{e}"))
    }

    fn to(t: &[(String, State, Transition)]) -> Vec<&str> {
        t.iter().map(|(_, _, t)| t.to.as_str()).collect()
    }

    #[test]
    fn a_device_in_the_open_wave_is_assigned_and_one_outside_it_is_not() {
        let r = record(Gate::Auto, running(0), &[10.0, 100.0]);
        let (inside, outside) = in_and_out(&r);
        let v1 = release("1.0.0", 'a');
        let releases = [v1.clone(), r.release.clone()];
        let d = ok(decide(&view(r.clone(), WaveCounts::default(), None), &facts(&inside, &v1.measurement, &[]), &releases, 10));
        let a = d.assignment.unwrap_or_else(|| panic!("assigned"));
        assert_eq!((a.custom.wave, a.custom.rollback, a.path.as_str()), (0, false, r.release.path.as_str()));
        let new = d.changes.new_assignment.unwrap_or_else(|| panic!("recorded"));
        assert_eq!((new.status, new.from_release), (Status::Assigned, Some(v1.clone())));
        let d = ok(decide(&view(r, WaveCounts::default(), None), &facts(&outside, &v1.measurement, &[]), &releases, 10));
        assert_eq!((d.assignment, d.changes.is_empty()), (None, true), "wave 1 is not open");
    }

    #[test]
    fn the_auto_gate_advances_after_the_soak_and_the_manual_gate_waits() {
        let v2 = release("2.0.0", 'b');
        let mut counts = WaveCounts::default();
        counts.add(0, Status::Assigned, 1);
        let r = record(Gate::Auto, running(0), &[10.0, 100.0]);
        let (inside, _) = in_and_out(&r);
        let committed = [report(&v2, ReportOutcome::Committed)];
        let device = facts(&inside, &v2.measurement, &committed);
        let mine = Some(assigned(Status::Assigned, None));
        // Healthy before the soak is over: counted, no transition.
        let d = ok(decide(&view(r.clone(), counts.clone(), mine.clone()), &device, &[], 30));
        assert_eq!(d.changes.statuses, [StatusChange { rollout_id: "r".into(), status: Status::Healthy, reason: None }]);
        assert!(d.changes.transitions.is_empty());
        // After it: the auto gate moves on to wave 1.
        let d = ok(decide(&view(r, counts.clone(), mine.clone()), &device, &[], 60));
        assert_eq!(to(&d.changes.transitions), ["running"]);
        assert_eq!(d.changes.transitions[0].1, State::Running { wave: 1, wave_started_at: 60 });
        // The manual gate waits for an operator.
        let manual = record(Gate::Manual, running(0), &[10.0, 100.0]);
        let d = ok(decide(&view(manual, counts, mine), &device, &[], 60));
        assert_eq!(to(&d.changes.transitions), ["awaiting_approval"]);
        assert!(d.assignment.is_some(), "the device keeps its assignment");
    }

    #[test]
    fn failures_over_the_threshold_pause_and_nothing_new_is_assigned() {
        let r = record(Gate::Auto, running(0), &[50.0, 100.0]);
        let v2 = r.release.clone();
        let mut counts = WaveCounts::default();
        counts.add(0, Status::Healthy, 3);
        counts.add(0, Status::Assigned, 1);
        let (inside, _) = in_and_out(&r);
        let rolled_back = [report(&v2, ReportOutcome::RolledBack)];
        let device = facts(&inside, "00", &rolled_back);
        let d = ok(decide(&view(r.clone(), counts, Some(assigned(Status::Assigned, None))), &device, &[], 10));
        assert_eq!(d.changes.statuses[0].status, Status::RolledBack);
        assert_eq!(d.changes.statuses[0].reason.as_deref(), Some("rolled back"));
        let (_, paused, t) = &d.changes.transitions[0];
        assert!(matches!(t.cause, Cause::FailureThreshold { wave: 0, failed: 1, assigned: 4 }), "{t:?}");
        assert!(matches!(paused, State::Paused { reason: PauseReason::FailureThreshold { .. }, .. }), "{paused:?}");
        // Paused: a device not assigned yet gets nothing.
        let other = ["dev-a", "dev-b", "dev-c", "dev-d"].into_iter().find(|id| rollout::wave_of(&r.waves, "r", id) == Some(0)).unwrap_or("dev-a");
        let mut paused_record = r;
        paused_record.state = paused.clone();
        let d = ok(decide(&view(paused_record, WaveCounts::default(), None), &facts(other, "00", &[]), &[], 11));
        assert_eq!((d.assignment, d.changes.is_empty()), (None, true));
    }

    #[test]
    fn an_abort_with_roll_back_sends_reached_devices_back_and_one_without_does_not() {
        let v1 = release("1.0.0", 'a');
        let aborted = |roll_back| State::Aborted { roll_back, at: 5, by: "ops".into() };
        let mine = Some(assigned(Status::Healthy, Some(v1.clone())));
        let r = record(Gate::Auto, aborted(true), &[100.0]);
        let d = ok(decide(&view(r.clone(), WaveCounts::default(), mine.clone()), &facts("dev", &r.release.measurement, &[]), &[], 10));
        let a = d.assignment.unwrap_or_else(|| panic!("a rollback"));
        assert_eq!((a.path.as_str(), a.custom.rollback), (v1.path.as_str(), true));
        assert!(d.changes.is_empty());
        let r = record(Gate::Auto, aborted(false), &[100.0]);
        let d = ok(decide(&view(r.clone(), WaveCounts::default(), mine), &facts("dev", &r.release.measurement, &[]), &[], 10));
        assert_eq!(d.assignment, None, "abort without roll back leaves devices where they are");
        // A device the rollout never reached is not rolled back.
        let r = record(Gate::Auto, aborted(true), &[100.0]);
        let d = ok(decide(&view(r, WaveCounts::default(), None), &facts("dev", &v1.measurement, &[]), &[], 10));
        assert_eq!(d.assignment, None);
    }

    #[test]
    fn an_unattested_device_fails_its_assignment_and_gets_nothing() {
        let r = record(Gate::Auto, running(0), &[100.0]);
        let mut device = facts("dev", "00", &[]);
        device.attested = false;
        let d = ok(decide(&view(r, WaveCounts::default(), Some(assigned(Status::Healthy, None))), &device, &[], 10));
        assert_eq!(d.changes.statuses[0].status, Status::AttestationFailed);
        assert_eq!(d.assignment, None);
    }
}
