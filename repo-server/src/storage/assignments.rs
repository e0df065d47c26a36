//! Per-device rollout assignments and the director's part of a check-in, as data: what
//! the director reads ([`DirectorView`]) and what it decided to write
//! ([`DirectorChanges`]). The decision itself is the caller's (a pure function in the
//! director); this file reads, hands the view over, and writes the changes in the
//! same transaction.
//!
//! Counters are never incremented: they are counted from the assignments, whose
//! status only moves forward, so a check-in handled twice (or by two servers on one
//! database) cannot count twice. Every decision that changes rollout state is made on
//! state read in a serialised transaction, so no device is assigned from a state that
//! a concurrent check-in has already paused.

use std::collections::BTreeMap;

use outpost_protocol::attest::Verdict;
use outpost_protocol::director::FirmwareRelease;
use outpost_protocol::rollout::{AssignmentStatus, Counters, State, Transition};

use super::rollouts::{load, record_transition, rollout_from_row, RolloutRecord, ROLLOUT_COLUMNS};
use super::{json, parse, rfc3339, SqlEnum, Store};
use crate::args;
use crate::error::ServerError;
use crate::storage::db::{Mode, Tx};

/// One of a device's assignments, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentView {
    pub rollout_id: String,
    pub wave: u32,
    pub status: AssignmentStatus,
    /// The release the device ran when it was assigned (a rollback's target).
    pub from_release: Option<FirmwareRelease>,
}

/// How many of a rollout's assignments are in each wave and status (not cumulative).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaveCounts(BTreeMap<(u32, AssignmentStatus), u32>);

impl WaveCounts {
    /// Counts `n` more assignments in `wave` with `status`.
    pub fn add(&mut self, wave: u32, status: AssignmentStatus, n: u32) {
        *self.0.entry((wave, status)).or_default() += n;
    }

    /// One assignment of `wave` moved from `from` to `to`.
    pub fn moved(&mut self, wave: u32, from: AssignmentStatus, to: AssignmentStatus) {
        if let Some(n) = self.0.get_mut(&(wave, from)) {
            *n = n.saturating_sub(1);
        }
        self.add(wave, to, 1);
    }

    /// The cumulative counters of waves 0..=wave (what the rollout machine is fed).
    pub fn cumulative(&self, wave: usize) -> Counters {
        let mut c = Counters::default();
        for (&(w, status), &n) in &self.0 {
            if w as usize > wave {
                continue;
            }
            c.assigned += n;
            match status {
                AssignmentStatus::Assigned => {}
                AssignmentStatus::Installing => c.installing += n,
                AssignmentStatus::Healthy => c.healthy += n,
                AssignmentStatus::RolledBack => c.rolled_back += n,
                AssignmentStatus::AttestationFailed => c.attestation_failed += n,
            }
        }
        c
    }
}

/// What the director reads for one device's check-in.
#[derive(Debug, Clone, Default)]
pub struct DirectorView {
    /// The device's labels (rollout selectors match them).
    pub labels: BTreeMap<String, String>,
    pub assignments: Vec<AssignmentView>,
    /// The rollouts of the device's class, newest first (read when the device is
    /// attested or has assignments).
    pub rollouts: Vec<RolloutRecord>,
    /// Rollouts of other classes the device has assignments in (it was re-enrolled as
    /// another class).
    pub other_rollouts: Vec<RolloutRecord>,
    /// Assignment counts of each running rollout among those.
    pub counts: BTreeMap<String, WaveCounts>,
}

/// A device's assignment that moves to a new status.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    pub rollout_id: String,
    pub status: AssignmentStatus,
    /// Kept when None (the earlier reason stays).
    pub reason: Option<String>,
}

/// A new assignment of the device.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAssignment {
    pub rollout_id: String,
    pub wave: u32,
    pub status: AssignmentStatus,
    pub from_release: Option<FirmwareRelease>,
}

/// What a director decision writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectorChanges {
    pub statuses: Vec<StatusChange>,
    pub new_assignment: Option<NewAssignment>,
    /// Rollout transitions, in the order they happened: the rollout, its state after
    /// the transition, the transition.
    pub transitions: Vec<(String, State, Transition)>,
}

impl DirectorChanges {
    /// Nothing to write but the director version.
    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.new_assignment.is_none() && self.transitions.is_empty()
    }
}

/// The decision a director check-in runs on what it read: the changes to write and
/// what to hand back to the caller.
pub type Decided<T> = Result<(DirectorChanges, T), ServerError>;

/// Reads what the director needs about `device_id` (of `hardware_class`).
async fn read_view(tx: &mut dyn Tx, device_id: &str, hardware_class: &str, verdict: Verdict) -> Result<DirectorView, ServerError> {
    // The device's labels and its assignments, in one query.
    let rows = tx
        .query(
            "SELECT d.labels, a.rollout_id, a.status, a.wave, a.from_release FROM devices d
             LEFT JOIN assignments a ON a.device_id = d.device_id WHERE d.device_id = ?1",
            args![device_id],
        )
        .await?;
    let Some(first) = rows.first() else { return Err(ServerError::State(format!("no device {device_id:?}"))) };
    let mut view = DirectorView { labels: parse("labels", &first.text(0)?)?, ..DirectorView::default() };
    for row in &rows {
        if let Some(rollout_id) = row.opt_text(1)? {
            view.assignments.push(AssignmentView {
                rollout_id,
                status: AssignmentStatus::from_sql("assignments.status", &row.text(2)?)?,
                wave: u32::try_from(row.int(3)?).map_err(|e| ServerError::State(format!("stored assignments.wave: {e}")))?,
                from_release: row.opt_text(4)?.map(|f| parse("from_release", &f)).transpose()?,
            });
        }
    }
    if verdict == Verdict::Attested || !view.assignments.is_empty() {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE hardware_class = ?1 ORDER BY seq DESC");
        view.rollouts = tx.query(&sql, args![hardware_class]).await?.iter().map(rollout_from_row).collect::<Result<_, _>>()?;
    }
    for a in &view.assignments {
        if !view.rollouts.iter().any(|r| r.id == a.rollout_id) {
            if let Some(r) = load(tx, &a.rollout_id).await? {
                view.other_rollouts.push(r);
            }
        }
    }
    let running: Vec<String> =
        view.rollouts.iter().chain(&view.other_rollouts).filter(|r| matches!(r.state, State::Running { .. })).map(|r| r.id.clone()).collect();
    for id in running {
        let rows = tx.query("SELECT wave, status, count(*) FROM assignments WHERE rollout_id = ?1 GROUP BY wave, status", args![&id]).await?;
        let mut counts = WaveCounts::default();
        for row in rows {
            let wave = u32::try_from(row.int(0)?).unwrap_or(u32::MAX);
            let n = u32::try_from(row.int(2)?).unwrap_or(u32::MAX);
            counts.add(wave, AssignmentStatus::from_sql("assignments.status", &row.text(1)?)?, n);
        }
        view.counts.insert(id, counts);
    }
    Ok(view)
}

async fn write_changes(tx: &mut dyn Tx, device_id: &str, c: &DirectorChanges, now: i64) -> Result<(), ServerError> {
    for s in &c.statuses {
        tx.execute(
            "UPDATE assignments SET status = ?1, reason = coalesce(?2, reason), updated_at = ?3 WHERE rollout_id = ?4 AND device_id = ?5",
            args![s.status.as_sql(), s.reason.as_deref(), rfc3339(now), &s.rollout_id, device_id],
        )
        .await?;
    }
    if let Some(a) = &c.new_assignment {
        tx.execute(
            "INSERT INTO assignments (rollout_id, device_id, wave, status, from_release, assigned_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            args![&a.rollout_id, device_id, i64::from(a.wave), a.status.as_sql(), a.from_release.as_ref().map(json), rfc3339(now)],
        )
        .await?;
    }
    for (id, state, t) in &c.transitions {
        record_transition(tx, id, state, t, now).await?;
    }
    Ok(())
}

/// The director's part of a check-in inside the caller's write transaction: read,
/// `decide`, write, and bump the device's director version (returned with what
/// `decide` handed back).
///
/// Most check-ins change no rollout state (the device's assignment is where it was, or
/// its wave is not open): those are decided without waiting for other servers. A
/// decision that would change state is made again serialised, on the latest committed
/// state (nothing was written yet, so nothing is undone). Call it before the
/// transaction writes anything else (a transaction waiting for the lock must hold no
/// row another serialised one may need).
pub(super) async fn director_tx<T, F>(
    tx: &mut dyn Tx,
    device_id: &str,
    hardware_class: &str,
    verdict: Verdict,
    decide: &mut F,
    now: i64,
) -> Result<(T, u64), ServerError>
where
    F: FnMut(&DirectorView) -> Decided<T>,
{
    loop {
        let view = read_view(tx, device_id, hardware_class, verdict).await?;
        let (changes, out) = decide(&view)?;
        if !changes.is_empty() && !tx.serialized() {
            tx.serialize().await?;
            continue;
        }
        write_changes(tx, device_id, &changes, now).await?;
        let version =
            tx.one("UPDATE devices SET director_version = director_version + 1 WHERE device_id = ?1 RETURNING director_version", args![device_id]).await?.int(0)?;
        return Ok((out, u64::try_from(version).unwrap_or(0)));
    }
}

impl Store {
    /// The director's part of a check-in on its own, in one write transaction (a
    /// check-in proper goes through [`Store::checkin`], with its nonce and verdict).
    pub async fn director_checkin<T, F>(&self, device_id: &str, hardware_class: &str, verdict: Verdict, mut decide: F, now: i64) -> Result<(T, u64), ServerError>
    where
        F: FnMut(&DirectorView) -> Decided<T> + Send + 'static,
        T: Send + 'static,
    {
        let (device_id, hardware_class) = (device_id.to_owned(), hardware_class.to_owned());
        self.transaction(Mode::Write, move |mut tx| async move {
            let out = director_tx(tx.as_mut(), &device_id, &hardware_class, verdict, &mut decide, now).await?;
            tx.commit().await?;
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_counts_are_cumulative_and_moves_count_once() {
        let mut c = WaveCounts::default();
        c.add(0, AssignmentStatus::Assigned, 3);
        c.add(1, AssignmentStatus::Healthy, 2);
        c.moved(0, AssignmentStatus::Assigned, AssignmentStatus::RolledBack);
        let w0 = c.cumulative(0);
        assert_eq!((w0.assigned, w0.rolled_back, w0.healthy), (3, 1, 0));
        let w1 = c.cumulative(1);
        assert_eq!((w1.assigned, w1.rolled_back, w1.healthy), (5, 1, 2));
    }
}
