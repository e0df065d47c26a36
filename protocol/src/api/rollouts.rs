//! `/api/v1/rollouts`: a rollout with its waves' counters, transitions and (on
//! request) assigned devices; the list; the answer to each operator action.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::{Cause, Gate, State};

/// One wave of `POST /api/v1/rollouts` (signed numbers, so the server can name a
/// negative value rather than fail to parse it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveRequest {
    pub percent: f64,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    #[serde(default)]
    pub min_devices: i64,
    #[serde(default)]
    pub soak_secs: i64,
}

/// `POST /api/v1/rollouts` body: a draft rollout of release `version` of a class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Default: "<class> <version>".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub version: String,
    pub hardware_class: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub waves: Vec<WaveRequest>,
    #[serde(default = "auto_gate")]
    pub gate: Gate,
}

fn auto_gate() -> Gate {
    Gate::Auto
}

/// `POST /api/v1/rollouts/{id}/{action}` body: empty for every action but `abort`,
/// which may roll back the devices the rollout reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roll_back: Option<bool>,
}

/// The release a rollout assigns.
pub use crate::director::FirmwareRelease;

/// One wave: its plan and its cumulative counters (wave k counts waves 0..=k).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveView {
    pub wave: usize,
    pub percent: f64,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    pub min_devices: u32,
    pub soak_secs: u64,
    /// The rollout is in this wave.
    pub current: bool,
    pub assigned: u32,
    pub installing: u32,
    pub healthy: u32,
    pub rolled_back: u32,
    pub attestation_failed: u32,
    /// With `?plan=true`: how many selected devices this wave would expose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<u32>,
}

/// One recorded state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    pub at: String,
    /// State names ([`State::name`]).
    pub from: String,
    pub to: String,
    pub cause: Cause,
}

pub use crate::rollout::AssignmentStatus;

/// One device assigned by a rollout (with `?devices=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentView {
    pub device_id: String,
    pub wave: i64,
    pub status: AssignmentStatus,
    pub reason: Option<String>,
    pub assigned_at: String,
    pub updated_at: String,
}

/// A rollout as the API shows it (`GET /api/v1/rollouts/{id}`, and the answer to
/// create and to each action).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub name: String,
    pub hardware_class: String,
    pub labels: BTreeMap<String, String>,
    pub release: FirmwareRelease,
    pub gate: Gate,
    pub state: State,
    /// [`State::name`] of `state`.
    pub state_name: String,
    pub created_by: String,
    pub created_at: String,
    pub waves: Vec<WaveView>,
    pub events: Vec<RolloutEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<AssignmentView>>,
}

impl RolloutView {
    /// Completed or aborted: nothing more will happen.
    pub fn ended(&self) -> bool {
        matches!(self.state, State::Completed { .. } | State::Aborted { .. })
    }
}

/// `GET /api/v1/rollouts`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutList {
    pub rollouts: Vec<RolloutView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::round_trip;
    use crate::rollout::PauseReason;
    use serde_json::{json, Value};

    fn wave(i: usize, current: bool) -> Value {
        json!({
            "wave": i, "percent": 50.0, "success_threshold": 0.95, "failure_threshold": 0.05, "min_devices": 1, "soak_secs": 0,
            "current": current, "assigned": 2, "installing": 0, "healthy": 1, "rolled_back": 1, "attestation_failed": 0
        })
    }

    fn rollout(state: Value, state_name: &str) -> Value {
        json!({
            "id": "ro_0011", "name": "gw 1.2.0", "hardware_class": "gw", "labels": {"ring": "canary"},
            "release": {"path": "firmware/gw/1.2.0/fw.img", "length": 4096, "sha256": "ab", "version": "1.2.0", "measurement": "ab", "sbom_sha256": null},
            "gate": "manual", "state": state, "state_name": state_name, "created_by": "ops", "created_at": "2026-12-05T06:00:00+00:00",
            "waves": [wave(0, true), wave(1, false)],
            "events": [
                {"at": "2026-12-05T06:00:01+00:00", "from": "draft", "to": "running", "cause": {"kind": "operator", "by": "ops", "action": "start"}},
                {"at": "2026-12-05T06:00:09+00:00", "from": "running", "to": "paused", "cause": {"kind": "failure_threshold", "wave": 0, "failed": 1, "assigned": 2}}
            ]
        })
    }

    #[test]
    fn a_paused_rollout_round_trips_with_its_reason() {
        let v: RolloutView = round_trip(rollout(
            json!({"state": "paused", "wave": 0, "wave_started_at": 1_765_000_000, "reason": {"kind": "failure_threshold", "wave": 0, "failed": 1, "assigned": 2, "threshold": 0.05}}),
            "paused",
        ));
        assert!(matches!(v.state, State::Paused { reason: PauseReason::FailureThreshold { failed: 1, .. }, .. }));
        assert_eq!(v.gate, Gate::Manual);
        assert!(!v.ended());
    }

    #[test]
    fn devices_and_plan_appear_only_when_asked_for() {
        let mut r = rollout(json!({"state": "aborted", "at": 1_765_000_100, "by": "ops", "roll_back": true}), "aborted");
        r["waves"][0]["planned"] = json!(3);
        r["devices"] = json!([{"device_id": "d1", "wave": 0, "status": "rolled_back", "reason": "health", "assigned_at": "t0", "updated_at": "t1"}]);
        let v: RolloutView = round_trip(r);
        assert_eq!(v.waves[0].planned, Some(3));
        assert_eq!(v.waves[1].planned, None);
        assert_eq!(v.devices.as_ref().map(|d| d[0].status), Some(AssignmentStatus::RolledBack));
        assert!(v.ended());
        let create: CreateRollout = round_trip(json!({
            "version": "1.2.0", "hardware_class": "gw", "labels": {}, "gate": "auto",
            "waves": [{"percent": 10.0, "success_threshold": 0.95, "failure_threshold": 0.05, "min_devices": 1, "soak_secs": 1800}]
        }));
        assert_eq!(create.name, None);
        assert_eq!(serde_json::to_value(ActionRequest::default()).ok(), Some(json!({})));
        let _: ActionRequest = round_trip(json!({"roll_back": true}));
        let list: RolloutList = round_trip(json!({"rollouts": [rollout(json!({"state": "draft"}), "draft")]}));
        assert_eq!(list.rollouts[0].devices, None);
    }
}
