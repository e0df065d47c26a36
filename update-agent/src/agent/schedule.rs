//! When each timed concern of the daemon is next due: the policy fetch on
//! `policy.check_interval`, the check-in (which wakes the install) on
//! `install.check_interval`. Pure: the daemon passes the clock in.

use std::time::{Duration, Instant};

/// The concerns due in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    pub policy: bool,
    /// The check-in, and the install it wakes.
    pub checkin: bool,
}

impl Due {
    pub fn any(self) -> bool {
        self.policy || self.checkin
    }
}

/// One deadline per concern; each next one counts from the end of the round that ran
/// it (a slow round never makes the next one start at once).
#[derive(Debug, Clone)]
pub struct Schedule {
    policy: Option<(Duration, Instant)>,
    checkin: (Duration, Instant),
}

impl Schedule {
    /// Everything due at `now`; `policy_every` is None without a policy engine.
    pub fn new(now: Instant, policy_every: Option<Duration>, checkin_every: Duration) -> Schedule {
        Schedule { policy: policy_every.map(|every| (every, now)), checkin: (checkin_every, now) }
    }

    /// The concerns whose deadline has come at `now`.
    pub fn due(&self, now: Instant) -> Due {
        Due { policy: self.policy.is_some_and(|(_, at)| at <= now), checkin: self.checkin.1 <= now }
    }

    /// The round that ran `due` ended at `now`: their next deadlines are one interval on.
    pub fn ran(&mut self, due: Due, now: Instant) {
        if let (true, Some((every, at))) = (due.policy, self.policy.as_mut()) {
            *at = now + *every;
        }
        if due.checkin {
            self.checkin.1 = now + self.checkin.0;
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Instant {
        match self.policy {
            Some((_, at)) => at.min(self.checkin.1),
            None => self.checkin.1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn everything_is_due_at_start_and_concerns_with_equal_intervals_stay_together() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Some(5 * MIN), 5 * MIN);
        let all = Due { policy: true, checkin: true };
        assert_eq!(s.due(t0), all);
        s.ran(all, t0 + MIN);
        assert!(!s.due(t0 + 5 * MIN).any());
        assert_eq!(s.next(), t0 + 6 * MIN);
        assert_eq!(s.due(t0 + 6 * MIN), all);
    }

    #[test]
    fn each_concern_keeps_its_own_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Some(MIN), 3 * MIN);
        s.ran(s.due(t0), t0);
        assert_eq!(s.due(t0 + MIN), Due { policy: true, checkin: false });
        s.ran(Due { policy: true, checkin: false }, t0 + MIN);
        assert_eq!(s.next(), t0 + 2 * MIN);
        assert_eq!(s.due(t0 + 3 * MIN), Due { policy: true, checkin: true });
    }

    #[test]
    fn without_a_policy_engine_only_the_checkin_is_due() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, None, MIN);
        assert_eq!(s.due(t0), Due { policy: false, checkin: true });
        assert_eq!(s.next(), t0);
    }
}
