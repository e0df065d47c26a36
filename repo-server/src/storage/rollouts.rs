//! Rollouts in the state store: definitions and typed state, every transition with its
//! cause, and per-device assignments whose statuses are the per-wave counters.
//!
//! Counters are never incremented: they are counted from the assignments, whose
//! status only moves forward, so a check-in handled twice (or by two servers on one
//! database) cannot count twice. Every decision that reads a rollout's state and acts
//! on it runs in one write transaction, so no device is assigned from a state that a
//! concurrent check-in has already paused.

use std::collections::BTreeMap;

use outpost_protocol::api::rollouts::{AssignmentView, RolloutEvent};
use outpost_protocol::director::FirmwareRelease;
use outpost_protocol::rollout::{AssignmentStatus as Status, Counters, Event, Gate, Rollout, State, Transition, WaveSpec};
use serde::{Deserialize, Serialize};

use super::{json, parse, rfc3339, SqlEnum, Store};
use crate::args;
use crate::storage::db::{Mode, Row, Tx};
use crate::error::ServerError;

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
    /// The state machine of this rollout.
    pub fn machine(&self) -> Rollout {
        Rollout { id: self.id.clone(), waves: self.waves.clone(), gate: self.gate, state: self.state.clone() }
    }
}

pub(super) const ROLLOUT_COLUMNS: &str = "id, name, hardware_class, labels, release, waves, gate, state, created_by, created_at";

pub(super) fn rollout_from_row(r: &Row) -> Result<RolloutRecord, ServerError> {
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

pub(super) async fn load(tx: &mut dyn Tx, id: &str) -> Result<Option<RolloutRecord>, ServerError> {
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
        record_transition(tx, &record.id, &record.state, t, now).await?;
    }
    Ok(Ok(t))
}

/// Stores a rollout's new state and the transition that led to it.
pub(super) async fn record_transition(tx: &mut dyn Tx, id: &str, state: &State, t: &Transition, now: i64) -> Result<(), ServerError> {
    tx.execute("UPDATE rollouts SET state = ?1 WHERE id = ?2", args![json(state), id]).await?;
    tx.execute(
        "INSERT INTO rollout_events (rollout_id, at, from_state, to_state, cause) VALUES (?1, ?2, ?3, ?4, ?5)",
        args![id, rfc3339(now), &t.from, &t.to, json(&t.cause)],
    )
    .await?;
    Ok(())
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

impl Store {
    pub async fn create_rollout(&self, r: &RolloutRecord) -> Result<(), ServerError> {
        let r = r.clone();
        self.transaction(Mode::Exclusive, move |mut tx| async move {
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
        })
        .await
    }

    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, ServerError> {
        let id = id.to_owned();
        self.transaction(Mode::Read, move |mut tx| async move {
            let id = id.as_str();
            load(tx.as_mut(), id).await
        })
        .await
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<Vec<RolloutRecord>, ServerError> {
        self.transaction(Mode::Read, move |mut tx| async move {
            tx.query(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY seq DESC"), args![]).await?.iter().map(rollout_from_row).collect()
        })
        .await
    }

    /// An operator's action on a rollout, applied and recorded in one transaction.
    /// Errors with `Refused` when the action does not fit the state.
    pub async fn rollout_action(&self, id: &str, event: Event, now: i64) -> Result<ActionOutcome, ServerError> {
        let id = id.to_owned();
        self.transaction(Mode::Exclusive, move |mut tx| async move {
            let id = id.as_str();
            let Some(mut record) = load(tx.as_mut(), id).await? else { return Ok(ActionOutcome::NotFound) };
            let t = match apply(tx.as_mut(), &mut record, event, now).await? {
                Ok(t) => t,
                Err(why) => return Ok(ActionOutcome::Refused(why)),
            };
            tx.commit().await?;
            Ok(ActionOutcome::Done(Box::new(record), t))
        })
        .await
    }

    /// Re-evaluates every running rollout (soak times pass without check-ins).
    pub async fn rollout_tick(&self, now: i64) -> Result<Vec<(String, Transition)>, ServerError> {
        self.transaction(Mode::Exclusive, move |mut tx| async move {
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
        })
        .await
    }

    /// Per-wave counters (cumulative) and the transition history of a rollout.
    pub async fn rollout_progress(&self, id: &str) -> Result<(Vec<Counters>, Vec<RolloutEvent>), ServerError> {
        let id = id.to_owned();
        self.transaction(Mode::Shared, move |mut tx| async move {
            let id = id.as_str();
            let Some(record) = load(tx.as_mut(), id).await? else { return Ok((Vec::new(), Vec::new())) };
            let mut per_wave = Vec::with_capacity(record.waves.len());
            for w in 0..record.waves.len() {
                per_wave.push(counters(tx.as_mut(), id, w).await?);
            }
            let rows = tx.query("SELECT at, from_state, to_state, cause FROM rollout_events WHERE rollout_id = ?1 ORDER BY id", args![id]).await?;
            let events = rows
                .iter()
                .map(|r| {
                    Ok(RolloutEvent { at: r.text(0)?, from: r.text(1)?, to: r.text(2)?, cause: parse("rollout_events.cause", &r.text(3)?)? })
                })
                .collect::<Result<Vec<_>, ServerError>>()?;
            Ok((per_wave, events))
        })
        .await
    }

    /// Assignments of a rollout (device, wave, status, reason).
    pub async fn rollout_assignments(&self, id: &str) -> Result<Vec<AssignmentView>, ServerError> {
        let id = id.to_owned();
        self.transaction(Mode::Read, move |mut tx| async move {
            let id = id.as_str();
            let rows = tx
                .query(
                    "SELECT device_id, wave, status, reason, assigned_at, updated_at FROM assignments WHERE rollout_id = ?1 ORDER BY wave, device_id",
                    args![id],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(AssignmentView {
                        device_id: r.text(0)?,
                        wave: r.int(1)?,
                        status: Status::from_sql("assignments.status", &r.text(2)?)?,
                        reason: r.opt_text(3)?,
                        assigned_at: r.text(4)?,
                        updated_at: r.text(5)?,
                    })
                })
                .collect()
        })
        .await
    }


}

