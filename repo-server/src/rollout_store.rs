//! Rollouts in the state store: definitions and typed state, every transition with its
//! cause, and per-device assignments whose statuses are the per-wave counters.
//!
//! Counters are never incremented: they are counted from the assignments, whose
//! status only moves forward, so a check-in handled twice (or by two servers on one
//! database) cannot count twice. Every decision that reads a rollout's state and acts
//! on it runs in one write transaction, so no device is assigned from a state that a
//! concurrent check-in has already paused.

use std::collections::BTreeMap;

use outpost_protocol::director::{Assignment, AssignmentCustom};
use outpost_protocol::release::ReleaseVersion;
use outpost_protocol::attest::DeviceHealth;
use outpost_protocol::rollout::{self, AssignmentStatus as Status, Counters, Event, Gate, Rollout, State, Transition, WaveSpec};
use serde::{Deserialize, Serialize};

use crate::args;
use crate::db::{Mode, Row, Tx};
use crate::error::ServerError;
use crate::storage::SqlEnum;
use crate::repository::FirmwareRelease;
use crate::store::Store;

pub const TABLES: &str = "
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

/// A rollout as stored: its plan (release, selector, waves, gate) and state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    pub name: String,
    pub hardware_class: String,
    /// Devices must carry all of these labels.
    pub labels: BTreeMap<String, String>,
    pub release: FirmwareRelease,
    pub waves: Vec<WaveSpec>,
    pub gate: Gate,
    pub state: State,
    pub created_by: String,
    pub created_at: String,
}

impl RolloutRecord {
    fn machine(&self) -> Rollout {
        Rollout { id: self.id.clone(), waves: self.waves.clone(), gate: self.gate, state: self.state.clone() }
    }
}

/// What a check-in says about a device, for the rollout engine.
pub struct DeviceFacts<'a> {
    pub device_id: &'a str,
    pub hardware_class: &'a str,
    pub attested: bool,
    /// The measured image digest of the booted slot.
    pub image_sha256: Option<&'a str>,
    pub version: Option<&'a str>,
    pub health: DeviceHealth,
    pub reports: &'a [crate::store::InstallReport],
}

/// The director's decision for one check-in.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The per-device director targets version to sign.
    pub director_version: u64,
    pub assignment: Option<Assignment>,
    /// Rollout transitions this check-in caused.
    pub transitions: Vec<(String, Transition)>,
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339()
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, ServerError> {
    serde_json::from_str(s).map_err(|e| ServerError::State(format!("stored {what}: {e}")))
}

const ROLLOUT_COLUMNS: &str = "id, name, hardware_class, labels, release, waves, gate, state, created_by, created_at";

fn rollout_from_row(r: &Row) -> Result<RolloutRecord, ServerError> {
    Ok(RolloutRecord {
        id: r.text(0)?,
        name: r.text(1)?,
        hardware_class: r.text(2)?,
        labels: parse("labels", &r.text(3)?)?,
        release: parse("release", &r.text(4)?)?,
        waves: parse("waves", &r.text(5)?)?,
        gate: Gate::from_sql("rollouts.gate", &r.text(6)?)?,
        state: parse("state", &r.text(7)?)?,
        created_by: r.text(8)?,
        created_at: r.text(9)?,
    })
}

async fn load(tx: &mut dyn Tx, id: &str) -> Result<Option<RolloutRecord>, ServerError> {
    tx.opt(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"), args![id]).await?.as_ref().map(rollout_from_row).transpose()
}

/// Cumulative counters of waves 0..=wave.
async fn counters(tx: &mut dyn Tx, id: &str, wave: usize) -> Result<Counters, ServerError> {
    let rows = tx.query("SELECT status, count(*) FROM assignments WHERE rollout_id = ?1 AND wave <= ?2 GROUP BY status", args![id, wave as i64]).await?;
    let mut c = Counters::default();
    for row in rows {
        let (status, n) = (row.text(0)?, u32::try_from(row.int(1)?).unwrap_or(u32::MAX));
        c.assigned += n;
        match Status::from_sql("assignments.status", &status)? {
            Status::Assigned => {}
            Status::Installing => c.installing += n,
            Status::Healthy => c.healthy += n,
            Status::RolledBack => c.rolled_back += n,
            Status::AttestationFailed => c.attestation_failed += n,
        }
    }
    Ok(c)
}

/// Applies `event` to the stored rollout and records the transition it causes; the
/// inner error is an action that does not fit the state.
async fn apply(tx: &mut dyn Tx, record: &mut RolloutRecord, event: Event, now: i64) -> Result<Result<Option<Transition>, String>, ServerError> {
    let mut m = record.machine();
    let t = match m.apply(event, now) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if let Some(t) = &t {
        record.state = m.state;
        tx.execute("UPDATE rollouts SET state = ?1 WHERE id = ?2", args![json(&record.state), &record.id]).await?;
        tx.execute(
            "INSERT INTO rollout_events (rollout_id, at, from_state, to_state, cause) VALUES (?1, ?2, ?3, ?4, ?5)",
            args![&record.id, now_text(), &t.from, &t.to, json(&t.cause)],
        )
        .await?;
    }
    Ok(Ok(t))
}

/// Feeds the current wave's counters to a running rollout.
async fn feedback(tx: &mut dyn Tx, record: &mut RolloutRecord, now: i64) -> Result<Option<Transition>, ServerError> {
    let State::Running { wave, .. } = record.state else { return Ok(None) };
    let c = counters(tx, &record.id, wave).await?;
    apply(tx, record, Event::Feedback { counters: c }, now).await?.map_err(ServerError::State)
}

/// What an operator's action on a rollout came to.
pub enum ActionOutcome {
    NotFound,
    /// The action does not fit the rollout's state.
    Refused(String),
    Done(Box<RolloutRecord>, Option<Transition>),
}

fn version_of(s: &str) -> Option<ReleaseVersion> {
    s.parse().ok()
}

impl Store {
    pub async fn create_rollout(&self, r: &RolloutRecord) -> Result<(), ServerError> {
        let mut tx = self.tx(Mode::Exclusive).await?;
        let seq = tx.one("SELECT coalesce(max(seq), 0) + 1 FROM rollouts", args![]).await?.int(0)?;
        tx.execute(
            &format!("INSERT INTO rollouts ({ROLLOUT_COLUMNS}, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            args![
                &r.id,
                &r.name,
                &r.hardware_class,
                json(&r.labels),
                json(&r.release),
                json(&r.waves),
                r.gate.as_sql(),
                json(&r.state),
                &r.created_by,
                &r.created_at,
                seq
            ],
        )
        .await?;
        tx.commit().await
    }

    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, ServerError> {
        let mut tx = self.tx(Mode::Autocommit).await?;
        load(tx.as_mut(), id).await
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<Vec<RolloutRecord>, ServerError> {
        let mut tx = self.tx(Mode::Autocommit).await?;
        tx.query(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY seq DESC"), args![]).await?.iter().map(rollout_from_row).collect()
    }

    /// An operator's action on a rollout, applied and recorded in one transaction.
    /// Errors with `Refused` when the action does not fit the state.
    pub async fn rollout_action(&self, id: &str, event: Event, now: i64) -> Result<ActionOutcome, ServerError> {
        let mut tx = self.tx(Mode::Exclusive).await?;
        let Some(mut record) = load(tx.as_mut(), id).await? else { return Ok(ActionOutcome::NotFound) };
        let t = match apply(tx.as_mut(), &mut record, event, now).await? {
            Ok(t) => t,
            Err(why) => return Ok(ActionOutcome::Refused(why)),
        };
        tx.commit().await?;
        Ok(ActionOutcome::Done(Box::new(record), t))
    }

    /// Re-evaluates every running rollout (soak times pass without check-ins).
    pub async fn rollout_tick(&self, now: i64) -> Result<Vec<(String, Transition)>, ServerError> {
        let mut tx = self.tx(Mode::Exclusive).await?;
        let all = tx.query(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY seq"), args![]).await?;
        let mut out = Vec::new();
        for row in &all {
            let mut record = rollout_from_row(row)?;
            if let Some(t) = feedback(tx.as_mut(), &mut record, now).await? {
                out.push((record.id, t));
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Per-wave counters (cumulative) and the transition history of a rollout.
    pub async fn rollout_progress(&self, id: &str) -> Result<(Vec<Counters>, Vec<serde_json::Value>), ServerError> {
        let mut tx = self.tx(Mode::Shared).await?;
        let Some(record) = load(tx.as_mut(), id).await? else { return Ok((Vec::new(), Vec::new())) };
        let mut per_wave = Vec::with_capacity(record.waves.len());
        for w in 0..record.waves.len() {
            per_wave.push(counters(tx.as_mut(), id, w).await?);
        }
        let rows = tx.query("SELECT at, from_state, to_state, cause FROM rollout_events WHERE rollout_id = ?1 ORDER BY id", args![id]).await?;
        let events = rows
            .iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "at": r.text(0)?, "from": r.text(1)?, "to": r.text(2)?,
                    "cause": serde_json::from_str::<serde_json::Value>(&r.text(3)?).unwrap_or_default(),
                }))
            })
            .collect::<Result<Vec<_>, ServerError>>()?;
        Ok((per_wave, events))
    }

    /// Assignments of a rollout (device, wave, status, reason).
    pub async fn rollout_assignments(&self, id: &str) -> Result<Vec<serde_json::Value>, ServerError> {
        let mut tx = self.tx(Mode::Autocommit).await?;
        let rows = tx
            .query(
                "SELECT device_id, wave, status, reason, assigned_at, updated_at FROM assignments WHERE rollout_id = ?1 ORDER BY wave, device_id",
                args![id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "device_id": r.text(0)?, "wave": r.int(1)?, "status": r.text(2)?,
                    "reason": r.opt_text(3)?, "assigned_at": r.text(4)?, "updated_at": r.text(5)?,
                }))
            })
            .collect()
    }

    /// The director's part of a check-in, in one write transaction: update the
    /// device's assignment statuses from what it reported, feed the rollouts they
    /// belong to, then decide what the device should run and bump its director
    /// version. `releases` are the signed full-image releases of the device's class.
    pub async fn director_checkin(&self, f: &DeviceFacts<'_>, releases: &[FirmwareRelease], now: i64) -> Result<Decision, ServerError> {
        let mut tx = self.tx(Mode::Write).await?;
        let d = director_checkin_tx(tx.as_mut(), f, releases, now).await?;
        tx.commit().await?;
        Ok(d)
    }

    /// Sets a device's labels (rollout selectors match them).
    pub async fn set_device_labels(&self, device_id: &str, labels: &BTreeMap<String, String>) -> Result<bool, ServerError> {
        let mut tx = self.tx(Mode::Autocommit).await?;
        Ok(tx.execute("UPDATE devices SET labels = ?1 WHERE device_id = ?2", args![json(labels), device_id]).await? == 1)
    }
}

/// The decision must be made again, serialised: it would change rollout state.
struct Restart;

/// Before a decision writes rollout state: a transaction that is not serialised yet
/// becomes so, and the decision starts over on what is committed now (nothing was
/// written yet, so nothing is undone).
async fn before_write(tx: &mut dyn Tx) -> Result<Result<(), Restart>, ServerError> {
    if tx.serialized() {
        return Ok(Ok(()));
    }
    tx.serialize().await?;
    Ok(Err(Restart))
}

/// The director's part of a check-in inside the caller's write transaction.
///
/// Most check-ins change no rollout state (the device's assignment is where it was, or
/// its wave is not open): those decide without waiting for other servers. A decision
/// that would change state (a status, a new assignment, a transition) is made again
/// serialised, so every change is decided on the latest committed state. Call it
/// before the transaction writes anything else (a transaction waiting for the lock must
/// hold no row another serialised one may need).
pub(crate) async fn director_checkin_tx(tx: &mut dyn Tx, f: &DeviceFacts<'_>, releases: &[FirmwareRelease], now: i64) -> Result<Decision, ServerError> {
    loop {
        if let Ok(d) = director_pass(tx, f, releases, now).await? {
            return Ok(d);
        }
    }
}

async fn director_pass(tx: &mut dyn Tx, f: &DeviceFacts<'_>, releases: &[FirmwareRelease], now: i64) -> Result<Result<Decision, Restart>, ServerError> {
    // The device's labels and its assignments, in one query.
    let rows = tx
        .query(
            "SELECT d.labels, a.rollout_id, a.status FROM devices d LEFT JOIN assignments a ON a.device_id = d.device_id WHERE d.device_id = ?1",
            args![f.device_id],
        )
        .await?;
    let Some(first) = rows.first() else { return Err(ServerError::State(format!("no device {:?}", f.device_id))) };
    let labels: BTreeMap<String, String> = parse("labels", &first.text(0)?)?;
    let mut assigned = Vec::new();
    for row in &rows {
        if let Some(rollout_id) = row.opt_text(1)? {
            assigned.push((rollout_id, Status::from_sql("assignments.status", &row.text(2)?)?));
        }
    }
    // The rollouts of the device's class, newest first, read once: step 1 updates them
    // in place, step 2 chooses among them.
    let mut rollouts: Vec<RolloutRecord> = if f.attested || !assigned.is_empty() {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE hardware_class = ?1 ORDER BY seq DESC");
        tx.query(&sql, args![f.hardware_class]).await?.iter().map(rollout_from_row).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let mut transitions = Vec::new();

    // 1. Feedback: statuses of this device's assignments.
    for (rollout_id, old) in assigned {
        // A rollout of another class (the device was re-enrolled as another class) is
        // read on its own.
        let mut other = None;
        let record = match rollouts.iter_mut().find(|r| r.id == rollout_id) {
            Some(r) => r,
            None => match load(tx, &rollout_id).await? {
                Some(r) => other.insert(r),
                None => continue,
            },
        };
        let (new, reason) = next_status(old, f, &record.release);
        if new != old {
            if let Err(r) = before_write(tx).await? {
                return Ok(Err(r));
            }
            tx.execute(
                "UPDATE assignments SET status = ?1, reason = coalesce(?2, reason), updated_at = ?3 WHERE rollout_id = ?4 AND device_id = ?5",
                args![new.as_sql(), reason, now_text(), &rollout_id, f.device_id],
            )
            .await?;
            if let Some(t) = feedback(tx, record, now).await? {
                transitions.push((rollout_id.clone(), t));
            }
        }
    }

    // 2. Decide: the newest started rollout selecting this device.
    let mut assignment = None;
    let chosen = rollouts.into_iter().find(|r| r.state != State::Draft && r.labels.iter().all(|(k, v)| labels.get(k) == Some(v)));
    if let Some(mut record) = chosen.filter(|_| f.attested) {
        assignment = match decide(tx, &record, f, releases).await? {
            Ok(a) => a,
            Err(r) => return Ok(Err(r)),
        };
        // The counters may call for a transition (a new assignment, perhaps already
        // healthy, or a soak that has passed): made serialised, like every change.
        if !tx.serialized() {
            if would_transition(tx, &record, now).await? {
                if let Err(r) = before_write(tx).await? {
                    return Ok(Err(r));
                }
            }
        } else if let Some(t) = feedback(tx, &mut record, now).await? {
            transitions.push((record.id.clone(), t));
        }
    }
    let director_version =
        tx.one("UPDATE devices SET director_version = director_version + 1 WHERE device_id = ?1 RETURNING director_version", args![f.device_id]).await?.int(0)?;
    Ok(Ok(Decision { director_version: u64::try_from(director_version).unwrap_or(0), assignment, transitions }))
}

/// Whether feeding the current counters to `record` would change its state.
async fn would_transition(tx: &mut dyn Tx, record: &RolloutRecord, now: i64) -> Result<bool, ServerError> {
    let State::Running { wave, .. } = record.state else { return Ok(false) };
    let c = counters(tx, &record.id, wave).await?;
    Ok(matches!(record.machine().apply(Event::Feedback { counters: c }, now), Ok(Some(_))))
}

/// Where a device's assignment stands after a check-in.
fn next_status(old: Status, f: &DeviceFacts<'_>, release: &FirmwareRelease) -> (Status, Option<String>) {
    if !f.attested {
        return if old == Status::AttestationFailed { (old, None) } else { (Status::AttestationFailed, Some("attestation failed".into())) };
    }
    if old.terminal() {
        return (old, None);
    }
    if let Some(r) = f.reports.iter().find(|r| r.target == release.path) {
        return match r.outcome {
            crate::store::ReportOutcome::RolledBack => (Status::RolledBack, r.reason.clone().or_else(|| Some("rolled back".into()))),
            crate::store::ReportOutcome::Committed => (Status::Healthy, None),
        };
    }
    if f.image_sha256 == Some(release.measurement.as_str()) && f.health == DeviceHealth::Healthy {
        return (Status::Healthy, None);
    }
    if old == Status::Assigned && matches!(f.health, DeviceHealth::Updating | DeviceHealth::Trial) {
        return (Status::Installing, None);
    }
    (old, None)
}

fn assignment_of(release: &FirmwareRelease, record: &RolloutRecord, device_id: &str, wave: u32, rollback: bool) -> Assignment {
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
            rollback,
        },
    }
}

/// What `record` assigns the device now, inserting its assignment when the device's
/// wave is open.
async fn decide(tx: &mut dyn Tx, record: &RolloutRecord, f: &DeviceFacts<'_>, releases: &[FirmwareRelease]) -> Result<Result<Option<Assignment>, Restart>, ServerError> {
    let existing = match tx.opt("SELECT wave, from_release FROM assignments WHERE rollout_id = ?1 AND device_id = ?2", args![&record.id, f.device_id]).await? {
        Some(r) => Some((r.int(0)?, r.opt_text(1)?)),
        None => None,
    };
    if let State::Aborted { roll_back, .. } = record.state {
        // Abort stops new assignments; with roll back, devices the rollout reached are
        // sent back to the release they ran before (an explicit, signed rollback).
        let Some((wave, Some(from))) = existing.filter(|_| roll_back) else { return Ok(Ok(None)) };
        let from: FirmwareRelease = parse("from_release", &from)?;
        return Ok(Ok(Some(assignment_of(&from, record, f.device_id, wave as u32, true))));
    }
    if let Some((wave, _)) = existing {
        // Assigned once, assigned for the rollout's life (a device that rolled back
        // keeps it too: its agent does not retry a release it rolled back).
        return Ok(Ok(Some(assignment_of(&record.release, record, f.device_id, wave as u32, false))));
    }
    let Some(open) = record.state.assignable_wave(record.waves.len()) else { return Ok(Ok(None)) };
    let Some(wave) = rollout::wave_of(&record.waves, &record.id, f.device_id) else { return Ok(Ok(None)) };
    if wave > open {
        return Ok(Ok(None));
    }
    // Never downgrade by rollout: a device already ahead stays where it is.
    if let (Some(running), Some(target)) = (f.version.and_then(version_of), version_of(&record.release.version)) {
        if running > target {
            return Ok(Ok(None));
        }
    }
    if let Err(r) = before_write(tx).await? {
        return Ok(Err(r));
    }
    let from = f.image_sha256.and_then(|m| releases.iter().find(|r| r.measurement == m));
    let status = if f.image_sha256 == Some(record.release.measurement.as_str()) { Status::Healthy } else { Status::Assigned };
    tx.execute(
        "INSERT INTO assignments (rollout_id, device_id, wave, status, from_release, assigned_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        args![&record.id, f.device_id, wave as i64, status.as_sql(), from.map(json), now_text()],
    )
    .await?;
    Ok(Ok(Some(assignment_of(&record.release, record, f.device_id, wave as u32, false))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InstallReport, ReportOutcome};

    fn release(version: &str, fill: char) -> FirmwareRelease {
        FirmwareRelease {
            path: format!("firmware/rpi4/{version}/image.bin"),
            length: 1000,
            sha256: fill.to_string().repeat(64),
            version: version.into(),
            measurement: fill.to_string().repeat(64),
            sbom_sha256: None,
        }
    }

    use crate::store::testing::{add_devices, on_both_backends};
    use crate::store::Backend;

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
        the_audit_log_is_append_only;
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
            slot: "B".into(),
            at: "2026-11-23T00:00:00Z".into(),
        }
    }

    fn facts<'a>(device: &'a str, image: &'a str, version: &'a str, health: DeviceHealth, reports: &'a [InstallReport]) -> DeviceFacts<'a> {
        DeviceFacts { device_id: device, hardware_class: "rpi4", attested: true, image_sha256: Some(image), version: Some(version), health, reports }
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
                let d = s.director_checkin(&facts(id, image, version, DeviceHealth::Healthy, &reports), &releases, 10 + round).await.unwrap_or_else(|e| panic!("{e}"));
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
        let rows = s.rollout_assignments("r-bad").await.unwrap_or_default();
        assert!(rows.iter().all(|a| a["wave"] == 0), "nothing outside wave 0 was ever assigned");
        let (_, events) = s.rollout_progress("r-bad").await.unwrap_or_default();
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
                let d = s.director_checkin(&facts(&id, &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, now).await.unwrap_or_else(|e| panic!("{e}"));
                if let Some(a) = d.assignment {
                    // The device installs it at once and reports at its next check-in.
                    let r = [report(&id, &v2, ReportOutcome::Committed)];
                    s.director_checkin(&facts(&id, &v2.measurement, "2.0.0", DeviceHealth::Healthy, &r), &releases, now).await.unwrap_or_else(|e| panic!("{e}"));
                    // Delivered twice (a retried check-in): counted once.
                    s.director_checkin(&facts(&id, &v2.measurement, "2.0.0", DeviceHealth::Healthy, &r), &releases, now).await.unwrap_or_else(|e| panic!("{e}"));
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
        let d = s.director_checkin(&facts("dev-late", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, 3000).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.assignment.map(|a| a.custom.version), Some("2.0.0".into()));
        // Director versions only grow.
        let d2 = s.director_checkin(&facts("dev-late", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, 3001).await.unwrap_or_else(|e| panic!("{e}"));
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
        assert_eq!(s.director_checkin(&bad, &releases, 1).await.map(|d| d.assignment).ok(), Some(None), "quarantined: nothing assigned");
        let d = s.director_checkin(&facts("dev-00001", &v1.measurement, "1.0.0", DeviceHealth::Healthy, &[]), &releases, 1).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.assignment.as_ref().map(|a| a.custom.rollback), Some(false));
        assert!(matches!(s.rollout_action("r", Event::Abort { by: "ops".into(), roll_back: true }, 2).await, Ok(ActionOutcome::Done(..))));
        let d = s.director_checkin(&facts("dev-00001", &v2.measurement, "2.0.0", DeviceHealth::Healthy, &[]), &releases, 3).await.unwrap_or_else(|e| panic!("{e}"));
        let a = d.assignment.unwrap_or_else(|| panic!("a rollback assignment"));
        assert_eq!((a.path.as_str(), a.custom.rollback), (v1.path.as_str(), true));
        assert!(matches!(s.rollout_action("r", Event::Resume { by: "ops".into() }, 4).await, Ok(ActionOutcome::Refused(_))));
    }

    async fn the_audit_log_is_append_only(b: Backend) {
        let s = store_with(b, 0).await;
        s.log("ops", "rollout_start", &serde_json::json!({"rollout": "r"})).await.unwrap_or_else(|e| panic!("{e}"));
        for sql in ["UPDATE repository_log SET actor = 'someone else'", "DELETE FROM repository_log"] {
            let mut tx = s.tx(Mode::Autocommit).await.unwrap_or_else(|e| panic!("{e}"));
            let err = tx.execute(sql, args![]).await.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
        assert_eq!(s.recent_log(10).await.unwrap_or_default().len(), 1);
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
                        let d = stores[(i + round as usize) % 2]
                            .director_checkin(&facts(id, image, version, DeviceHealth::Healthy, &reports), &releases, 10 + round)
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
        let rows = stores[1].rollout_assignments("r").await.unwrap_or_else(|e| ok(e));
        let devices: std::collections::BTreeSet<&str> = rows.iter().filter_map(|a| a["device_id"].as_str()).collect();
        assert_eq!(devices.len(), rows.len(), "no device assigned twice");
        let told = assigned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(told.len(), rows.len(), "every device told of an assignment has exactly one");
        assert!(rows.iter().all(|a| a["wave"] == 0) && told.values().all(|w| *w == 0), "nothing outside wave 0");
        let (counters, events) = stores[1].rollout_progress("r").await.unwrap_or_else(|e| ok(e));
        let count = |s: &str| rows.iter().filter(|a| a["status"] == s).count() as u32;
        assert_eq!(
            (counters[0].assigned, counters[0].healthy, counters[0].rolled_back),
            (rows.len() as u32, count("healthy"), count("rolled_back")),
            "counters are the statuses, each device counted once"
        );
        assert_eq!(events.iter().filter(|e| e["to"] == "paused").count(), 1, "{events:?}");
    }
}
