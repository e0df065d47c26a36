//! States stored as text: each typed enum converts to its column's text and back, and
//! text a column should not hold is an error naming the column and the text (never a
//! default that would let a corrupt row pass as a state).

use outpost_protocol::attest::{AttestationState, DeviceHealth, Verdict};
use outpost_protocol::incident::IncidentKind;
use outpost_protocol::report::ReportOutcome;
use outpost_protocol::rollout::{AssignmentStatus, Gate};
use outpost_protocol::slot::Slot;

use crate::error::ServerError;

/// An enum stored as text.
pub trait SqlEnum: Copy + PartialEq + 'static {
    /// Every value, in the order the error lists them.
    const ALL: &'static [Self];

    /// The text stored for this value.
    fn as_sql(self) -> &'static str;

    /// The value of `text` read from `column`; unknown text is an error.
    fn from_sql(column: &str, text: &str) -> Result<Self, ServerError> {
        Self::ALL.iter().copied().find(|v| v.as_sql() == text).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|v| v.as_sql()).collect();
            ServerError::State(format!("stored {column} {text:?} is not one of {}", known.join(", ")))
        })
    }
}

/// An enrollment challenge's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeState {
    /// Issued; the device has not proved itself yet.
    Open,
    /// The device proved itself and was enrolled.
    Completed,
    /// A wrong secret closed it for good.
    Failed,
}

macro_rules! sql_enum {
    ($($t:ty => $all:expr, via $as_str:path;)+) => {$(
        impl SqlEnum for $t {
            const ALL: &'static [Self] = $all;
            fn as_sql(self) -> &'static str {
                $as_str(self)
            }
        }
    )+};
}

impl ChallengeState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeState::Open => "open",
            ChallengeState::Completed => "completed",
            ChallengeState::Failed => "failed",
        }
    }
}

sql_enum! {
    ChallengeState => &[ChallengeState::Open, ChallengeState::Completed, ChallengeState::Failed], via ChallengeState::as_str;
    ReportOutcome => &[ReportOutcome::Committed, ReportOutcome::RolledBack], via ReportOutcome::as_str;
    // The protocol's own lists of every value.
    Verdict => &Verdict::ALL, via Verdict::as_str;
    AttestationState => &AttestationState::ALL, via AttestationState::as_str;
    DeviceHealth => &DeviceHealth::ALL, via DeviceHealth::as_str;
    Gate => &Gate::ALL, via Gate::as_str;
    AssignmentStatus => &AssignmentStatus::ALL, via AssignmentStatus::as_str;
    Slot => &Slot::ALL, via Slot::as_str;
    IncidentKind => &IncidentKind::ALL, via IncidentKind::as_str;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: SqlEnum + std::fmt::Debug>() {
        for v in T::ALL {
            assert_eq!(T::from_sql("c", v.as_sql()).ok(), Some(*v));
        }
    }

    #[test]
    fn every_state_round_trips_and_unknown_text_names_the_column() {
        round_trips::<ChallengeState>();
        round_trips::<Verdict>();
        round_trips::<AttestationState>();
        round_trips::<DeviceHealth>();
        round_trips::<Gate>();
        round_trips::<ReportOutcome>();
        round_trips::<AssignmentStatus>();
        round_trips::<IncidentKind>();
        let err = AssignmentStatus::from_sql("assignments.status", "asigned").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("assignments.status") && err.contains("\"asigned\""), "{err}");
        assert!(Gate::from_sql("rollouts.gate", "").is_err(), "no default for empty text");
    }
}
