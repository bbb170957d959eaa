//! What the master is doing, in one word: what `ctl status` says and `/readyz`
//! decides by.

use super::workers::Census;

/// Where a binary upgrade is, as the old master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeStep {
    Idle,
    Waiting,
    HandedOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At least one worker of the current generation accepts and beats in time.
    Serving,
    /// No worker is wanted (WINCH, `ctl workers 0`): the sockets stay open and
    /// connections wait in the accept queue.
    Paused,
    /// Workers are wanted but none accepts (starting, late or failing).
    Unavailable,
    /// A new master was started and is not ready yet; this one still serves.
    Upgrading,
    /// A new master took over; this one is on its way out.
    HandedOver,
    /// A graceful stop is coming (--drain-delay): the workers still accept, but
    /// /readyz fails so that load balancers stop sending.
    Draining,
    /// A stop has begun.
    Stopping,
}

impl Phase {
    /// Decides from the master's state: a pure rule, so that it is tested alone.
    pub fn of(
        upgrade: UpgradeStep,
        (draining, stopping): (bool, bool),
        census: Census,
        target: usize,
    ) -> Phase {
        match upgrade {
            UpgradeStep::HandedOver => Phase::HandedOver,
            _ if stopping => Phase::Stopping,
            _ if draining => Phase::Draining,
            _ if target == 0 => Phase::Paused,
            _ if census.accepting == 0 => Phase::Unavailable,
            UpgradeStep::Waiting => Phase::Upgrading,
            UpgradeStep::Idle => Phase::Serving,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Paused => "paused",
            Phase::Unavailable => "unavailable",
            Phase::Upgrading => "upgrading",
            Phase::HandedOver => "handed over",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        }
    }

    /// Whether `/readyz` says yes: new clients are welcome.
    pub fn is_ready(self) -> bool {
        matches!(self, Phase::Serving | Phase::Upgrading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_says_serving_only_while_a_worker_serves() {
        let up = |accepting| Census { accepting, late: 0 };
        let idle = UpgradeStep::Idle;
        assert_eq!(Phase::of(idle, (false, false), up(2), 2), Phase::Serving);
        assert_eq!(Phase::of(idle, (false, false), up(0), 0), Phase::Paused);
        assert_eq!(
            Phase::of(idle, (false, false), up(0), 2),
            Phase::Unavailable
        );
        assert_eq!(Phase::of(idle, (false, true), up(2), 2), Phase::Stopping);
        assert_eq!(Phase::of(idle, (false, true), up(0), 0), Phase::Stopping);
        let waiting = UpgradeStep::Waiting;
        assert_eq!(
            Phase::of(waiting, (false, false), up(1), 2),
            Phase::Upgrading
        );
        let handed = UpgradeStep::HandedOver;
        assert_eq!(
            Phase::of(handed, (false, true), up(2), 2),
            Phase::HandedOver
        );
        assert_eq!(Phase::of(idle, (true, false), up(2), 2), Phase::Draining);
        assert_eq!(Phase::of(idle, (true, true), up(2), 2), Phase::Stopping);
        assert!(Phase::Serving.is_ready() && Phase::Upgrading.is_ready());
        assert!(!Phase::Draining.is_ready() && !Phase::Paused.is_ready());
        assert_eq!(Phase::Paused.name(), "paused");
    }
}
