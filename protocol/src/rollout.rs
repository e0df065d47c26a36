//! Canary rollout maths, pure and with the clock passed in: wave membership from a
//! stable hash, the rollout state machine with typed states, and the transitions that
//! feedback (per-wave outcome counters) and operators cause. Every transition carries
//! its cause. The server (issue 5) stores rollouts and feeds this; nothing here does I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One wave: the cumulative share of the selected fleet it covers and its gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveSpec {
    /// Cumulative percentage of the selected devices (0 < percent <= 100, increasing).
    pub percent: f64,
    /// Fraction of the wave's assigned devices that must report healthy to advance.
    pub success_threshold: f64,
    /// Fraction of the wave's assigned devices failing (rolled back or failed
    /// attestation) that pauses the rollout.
    pub failure_threshold: f64,
    /// Devices that must have reported healthy before the wave may pass.
    pub min_devices: u32,
    /// Seconds the wave must have run before it may pass.
    pub soak_secs: u64,
}

/// Whether passing waves advance by themselves or wait for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    Auto,
    Manual,
}

impl Gate {
    pub const ALL: [Gate; 2] = [Gate::Auto, Gate::Manual];

    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Auto => "auto",
            Gate::Manual => "manual",
        }
    }
}

/// A device's assignment in a rollout. The order is the only direction it moves in,
/// except that a healthy device that later fails attestation counts as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentStatus {
    Assigned,
    Installing,
    Healthy,
    RolledBack,
    AttestationFailed,
}

impl AssignmentStatus {
    pub const ALL: [AssignmentStatus; 5] = [
        AssignmentStatus::Assigned,
        AssignmentStatus::Installing,
        AssignmentStatus::Healthy,
        AssignmentStatus::RolledBack,
        AssignmentStatus::AttestationFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentStatus::Assigned => "assigned",
            AssignmentStatus::Installing => "installing",
            AssignmentStatus::Healthy => "healthy",
            AssignmentStatus::RolledBack => "rolled_back",
            AssignmentStatus::AttestationFailed => "attestation_failed",
        }
    }

    /// Rolled back or failed attestation: it moves no further.
    pub fn terminal(self) -> bool {
        matches!(self, AssignmentStatus::RolledBack | AssignmentStatus::AttestationFailed)
    }
}

/// Checks a wave plan: at least one wave, percentages increasing up to at most 100,
/// thresholds within 0..=1. Errors name the wave and field.
pub fn validate_waves(waves: &[WaveSpec]) -> Result<()> {
    let bad = |m: String| Err(Error::Build(format!("rollout waves: {m}")));
    if waves.is_empty() {
        return bad("at least one wave is needed".into());
    }
    let mut last = 0.0;
    for (i, w) in waves.iter().enumerate() {
        if !(w.percent > last && w.percent <= 100.0) {
            return bad(format!("wave {i}: percent {} must be above the previous wave's ({last}) and at most 100", w.percent));
        }
        for (name, v) in [("success_threshold", w.success_threshold), ("failure_threshold", w.failure_threshold)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("wave {i}: {name} {v} is not between 0 and 1"));
            }
        }
        if w.failure_threshold == 0.0 {
            return bad(format!("wave {i}: failure_threshold 0 would pause on no failure; use a small fraction"));
        }
        last = w.percent;
    }
    Ok(())
}

/// A device's stable position in a rollout, in [0, 1): SHA-256 of the rollout id and
/// device id. A device keeps its position for the rollout's whole life, so each wave
/// contains the previous one, and devices that enroll later fall into waves too.
pub fn position(rollout_id: &str, device_id: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(rollout_id.as_bytes());
    h.update([0]);
    h.update(device_id.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // 53 bits: exact in an f64.
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The first wave whose cumulative share includes the device, or None (the rollout's
/// last wave covers less than 100 %).
pub fn wave_of(waves: &[WaveSpec], rollout_id: &str, device_id: &str) -> Option<usize> {
    let p = position(rollout_id, device_id) * 100.0;
    waves.iter().position(|w| p < w.percent)
}

/// Install outcomes of the devices assigned within one wave's population (cumulative:
/// wave k counts the devices of waves 0..=k).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub assigned: u32,
    pub installing: u32,
    pub healthy: u32,
    pub rolled_back: u32,
    pub attestation_failed: u32,
}

impl Counters {
    pub fn failed(&self) -> u32 {
        self.rolled_back + self.attestation_failed
    }
}

/// Why a rollout paused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PauseReason {
    Operator { by: String },
    FailureThreshold { wave: usize, failed: u32, assigned: u32, threshold: f64 },
}

/// The rollout's state. Devices are assigned only while `Running` or `AwaitingApproval`
/// (up to the current wave) and in `Completed` (everyone selected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Draft,
    Running { wave: usize, wave_started_at: i64 },
    /// A manual gate: the wave passed its thresholds and soak; an operator advances it.
    AwaitingApproval { wave: usize, wave_started_at: i64 },
    Paused { wave: usize, wave_started_at: i64, reason: PauseReason },
    Completed { at: i64 },
    Aborted { at: i64, by: String, roll_back: bool },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Draft => "draft",
            State::Running { .. } => "running",
            State::AwaitingApproval { .. } => "awaiting_approval",
            State::Paused { .. } => "paused",
            State::Completed { .. } => "completed",
            State::Aborted { .. } => "aborted",
        }
    }

    /// The highest wave whose devices may be assigned now, or None for no new assignments.
    pub fn assignable_wave(&self, waves: usize) -> Option<usize> {
        match self {
            State::Running { wave, .. } | State::AwaitingApproval { wave, .. } => Some(*wave),
            State::Completed { .. } => waves.checked_sub(1),
            State::Draft | State::Paused { .. } | State::Aborted { .. } => None,
        }
    }
}

/// What caused a transition (recorded with it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    Operator { by: String, action: String },
    FailureThreshold { wave: usize, failed: u32, assigned: u32 },
    PassedAfterSoak { wave: usize, healthy: u32, assigned: u32 },
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub from: String,
    pub to: String,
    pub cause: Cause,
    pub at: i64,
}

/// What can happen to a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start { by: String },
    Pause { by: String },
    Resume { by: String },
    Advance { by: String },
    Abort { by: String, roll_back: bool },
    /// Feedback: cumulative counters for the current wave's population.
    Feedback { counters: Counters },
}

/// A rollout: its plan and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub waves: Vec<WaveSpec>,
    pub gate: Gate,
    pub state: State,
}

fn refuse(state: &State, action: &str) -> Error {
    Error::Order(format!("cannot {action} a rollout that is {}", state.name()))
}

impl Rollout {
    pub fn new(id: &str, waves: Vec<WaveSpec>, gate: Gate) -> Result<Self> {
        validate_waves(&waves)?;
        Ok(Rollout { id: id.to_owned(), waves, gate, state: State::Draft })
    }

    fn next_wave(&self, wave: usize, now: i64) -> State {
        if wave + 1 < self.waves.len() {
            State::Running { wave: wave + 1, wave_started_at: now }
        } else {
            State::Completed { at: now }
        }
    }

    /// Applies an event at `now` (Unix seconds). Returns the transition it caused, if
    /// any; an operator action that makes no sense in the current state is an error.
    pub fn apply(&mut self, event: Event, now: i64) -> Result<Option<Transition>> {
        let from = self.state.clone();
        let (to, cause) = match (&self.state, event) {
            (State::Draft, Event::Start { by }) => {
                (State::Running { wave: 0, wave_started_at: now }, Cause::Operator { by, action: "start".into() })
            }
            (State::Running { wave, wave_started_at } | State::AwaitingApproval { wave, wave_started_at }, Event::Pause { by }) => (
                State::Paused { wave: *wave, wave_started_at: *wave_started_at, reason: PauseReason::Operator { by: by.clone() } },
                Cause::Operator { by, action: "pause".into() },
            ),
            (State::Paused { wave, wave_started_at, .. }, Event::Resume { by }) => {
                (State::Running { wave: *wave, wave_started_at: *wave_started_at }, Cause::Operator { by, action: "resume".into() })
            }
            (State::Running { wave, .. } | State::AwaitingApproval { wave, .. } | State::Paused { wave, .. }, Event::Advance { by }) => {
                (self.next_wave(*wave, now), Cause::Operator { by, action: "advance".into() })
            }
            (State::Draft | State::Running { .. } | State::AwaitingApproval { .. } | State::Paused { .. }, Event::Abort { by, roll_back }) => (
                State::Aborted { at: now, by: by.clone(), roll_back },
                Cause::Operator { by, action: if roll_back { "abort and roll back".into() } else { "abort".into() } },
            ),
            (State::Running { wave, wave_started_at }, Event::Feedback { counters }) => {
                let spec = &self.waves[*wave];
                let assigned = counters.assigned.max(1) as f64;
                if counters.failed() > 0 && counters.failed() as f64 / assigned >= spec.failure_threshold {
                    let reason = PauseReason::FailureThreshold {
                        wave: *wave,
                        failed: counters.failed(),
                        assigned: counters.assigned,
                        threshold: spec.failure_threshold,
                    };
                    (
                        State::Paused { wave: *wave, wave_started_at: *wave_started_at, reason },
                        Cause::FailureThreshold { wave: *wave, failed: counters.failed(), assigned: counters.assigned },
                    )
                } else if counters.healthy >= spec.min_devices
                    && counters.assigned > 0
                    && counters.healthy as f64 / counters.assigned as f64 >= spec.success_threshold
                    && now - wave_started_at >= spec.soak_secs as i64
                {
                    let cause = Cause::PassedAfterSoak { wave: *wave, healthy: counters.healthy, assigned: counters.assigned };
                    match self.gate {
                        Gate::Auto => (self.next_wave(*wave, now), cause),
                        Gate::Manual => (State::AwaitingApproval { wave: *wave, wave_started_at: *wave_started_at }, cause),
                    }
                } else {
                    return Ok(None);
                }
            }
            // Feedback while paused, waiting or finished changes nothing by itself.
            (_, Event::Feedback { .. }) => return Ok(None),
            (state, Event::Start { .. }) => return Err(refuse(state, "start")),
            (state, Event::Pause { .. }) => return Err(refuse(state, "pause")),
            (state, Event::Resume { .. }) => return Err(refuse(state, "resume")),
            (state, Event::Advance { .. }) => return Err(refuse(state, "advance")),
            (state, Event::Abort { .. }) => return Err(refuse(state, "abort")),
        };
        self.state = to;
        Ok(Some(Transition { from: from.name().into(), to: self.state.name().into(), cause, at: now }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_and_status_names_are_their_wire_names() {
        for g in Gate::ALL {
            assert_eq!(serde_json::to_value(g).ok(), Some(serde_json::Value::from(g.as_str())));
        }
        for s in AssignmentStatus::ALL {
            assert_eq!(serde_json::to_value(s).ok(), Some(serde_json::Value::from(s.as_str())));
        }
    }

    fn waves() -> Vec<WaveSpec> {
        [1.0, 10.0, 50.0, 100.0]
            .iter()
            .map(|&p| WaveSpec { percent: p, success_threshold: 0.9, failure_threshold: 0.2, min_devices: 1, soak_secs: 600 })
            .collect()
    }

    fn op() -> String {
        "ops".into()
    }

    #[test]
    fn membership_is_stable_nested_and_proportional() {
        let w = waves();
        let ids: Vec<String> = (0..20_000).map(|i| format!("dev-{i}")).collect();
        let mut per_wave = [0usize; 4];
        for id in &ids {
            let k = wave_of(&w, "r1", id).unwrap_or(usize::MAX);
            assert_eq!(wave_of(&w, "r1", id), Some(k), "stable");
            per_wave[k] += 1;
        }
        let cumulative: Vec<f64> = per_wave.iter().scan(0, |s, n| { *s += n; Some(*s as f64 / ids.len() as f64) }).collect();
        for (got, want) in cumulative.iter().zip([0.01, 0.10, 0.50, 1.0]) {
            assert!((got - want).abs() < 0.01, "{got} vs {want}");
        }
        // Another rollout orders the fleet differently.
        let same = ids.iter().filter(|id| wave_of(&w, "r2", id) == wave_of(&w, "r1", id)).count();
        assert!(same < ids.len());
        // A last wave under 100 % leaves the rest out.
        let partial = vec![WaveSpec { percent: 5.0, ..w[0].clone() }];
        assert!(ids.iter().any(|id| wave_of(&partial, "r1", id).is_none()));
    }

    #[test]
    fn failures_pause_before_more_devices_are_assigned() {
        let mut r = Rollout::new("r", waves(), Gate::Auto).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.state.assignable_wave(4), None, "a draft assigns nothing");
        r.apply(Event::Start { by: op() }, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.state.assignable_wave(4), Some(0));
        let c = Counters { assigned: 10, installing: 7, healthy: 1, rolled_back: 2, attestation_failed: 0 };
        let t = r.apply(Event::Feedback { counters: c }, 10).unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("paused"));
        assert_eq!((t.from.as_str(), t.to.as_str()), ("running", "paused"));
        assert_eq!(t.cause, Cause::FailureThreshold { wave: 0, failed: 2, assigned: 10 });
        assert_eq!(r.state.assignable_wave(4), None, "paused: nothing new is assigned");
        r.apply(Event::Resume { by: op() }, 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.state, State::Running { wave: 0, wave_started_at: 0 });
    }

    #[test]
    fn waves_pass_after_their_soak_by_themselves_or_by_an_operator() {
        let healthy = Counters { assigned: 10, installing: 0, healthy: 10, rolled_back: 0, attestation_failed: 0 };
        let mut auto = Rollout::new("r", waves(), Gate::Auto).unwrap_or_else(|e| panic!("{e}"));
        auto.apply(Event::Start { by: op() }, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(auto.apply(Event::Feedback { counters: healthy }, 599).unwrap_or_else(|e| panic!("{e}")), None, "still soaking");
        let t = auto.apply(Event::Feedback { counters: healthy }, 600).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(t.map(|t| t.cause), Some(Cause::PassedAfterSoak { wave: 0, .. })));
        assert_eq!(auto.state, State::Running { wave: 1, wave_started_at: 600 });
        for (wave, now) in [(1, 1200), (2, 1800), (3, 2400)] {
            auto.apply(Event::Feedback { counters: healthy }, now).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(auto.state.name(), if wave == 3 { "completed" } else { "running" });
        }
        assert_eq!(auto.state.assignable_wave(4), Some(3));

        let mut manual = Rollout::new("m", waves(), Gate::Manual).unwrap_or_else(|e| panic!("{e}"));
        manual.apply(Event::Start { by: op() }, 0).unwrap_or_else(|e| panic!("{e}"));
        manual.apply(Event::Feedback { counters: healthy }, 700).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(manual.state, State::AwaitingApproval { wave: 0, wave_started_at: 0 });
        let t = manual.apply(Event::Advance { by: op() }, 800).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.map(|t| t.cause), Some(Cause::Operator { by: op(), action: "advance".into() }));
        assert_eq!(manual.state, State::Running { wave: 1, wave_started_at: 800 });
        // Too few healthy devices never pass, whatever the fraction.
        let few = Counters { assigned: 1, healthy: 1, ..Counters::default() };
        let mut strict = Rollout::new("s", vec![WaveSpec { min_devices: 5, ..waves()[0].clone() }], Gate::Auto).unwrap_or_else(|e| panic!("{e}"));
        strict.apply(Event::Start { by: op() }, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(strict.apply(Event::Feedback { counters: few }, 10_000).unwrap_or_else(|e| panic!("{e}")), None);
    }

    #[test]
    fn operator_actions_follow_the_state() {
        let mut r = Rollout::new("r", waves(), Gate::Auto).unwrap_or_else(|e| panic!("{e}"));
        for bad in [Event::Pause { by: op() }, Event::Resume { by: op() }, Event::Advance { by: op() }] {
            let err = r.apply(bad, 0).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("draft"), "{err}");
        }
        r.apply(Event::Start { by: op() }, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.apply(Event::Start { by: op() }, 1).is_err());
        assert!(r.apply(Event::Resume { by: op() }, 1).is_err(), "running is not paused");
        let t = r.apply(Event::Abort { by: op(), roll_back: true }, 5).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.map(|t| t.to), Some("aborted".into()));
        assert_eq!(r.state, State::Aborted { at: 5, by: op(), roll_back: true });
        assert_eq!(r.state.assignable_wave(4), None);
        assert!(r.apply(Event::Abort { by: op(), roll_back: false }, 6).is_err());
        assert_eq!(r.apply(Event::Feedback { counters: Counters::default() }, 7).unwrap_or_else(|e| panic!("{e}")), None);
    }

    #[test]
    fn bad_wave_plans_name_the_wave() {
        let mut w = waves();
        w[2].percent = 5.0;
        let err = validate_waves(&w).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("wave 2") && err.contains("percent"), "{err}");
        let mut w = waves();
        w[0].failure_threshold = 1.5;
        assert!(validate_waves(&w).err().map(|e| e.to_string()).unwrap_or_default().contains("failure_threshold"));
        assert!(validate_waves(&[]).is_err());
    }
}
