//! A worker's life cycle: in service, retiring by hand-over, or stopping.
//!
//! Owns the phase, its deadlines and the rules over them as plain functions (what a
//! stop does to a retiring worker, when a worker may exit); no I/O. The invariant:
//! a phase only moves forward (Serving → Retiring → Finishing/Stopping), and every
//! phase after Serving has a deadline, the graceful timeout counted from when the
//! worker first left service.

use std::time::{Duration, Instant};

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Accepting, and taking connections that retiring siblings hand over.
    Serving,
    /// Handing its connections over, a slice per loop pass; `cursor` is the next
    /// slot of the connection table to offer. Those not offered yet, and those that
    /// cannot travel, are served meanwhile.
    Retiring { cursor: usize, deadline: Instant },
    /// The hand-over is settled: what stayed (nobody took it, or it could not
    /// travel) is served to its end, until the client leaves or `deadline`.
    Finishing { deadline: Instant },
    /// A graceful stop: every client is answered what it sent, then closed; the
    /// listen sockets get one more drain at `listeners_close_at`.
    Stopping {
        deadline: Instant,
        listeners_close_at: Option<Instant>,
    },
}

impl Life {
    /// Whether it accepts and takes hand-overs.
    pub fn in_service(&self) -> bool {
        *self == Life::Serving
    }

    /// The moment it exits even with clients left.
    pub fn deadline(&self) -> Option<Instant> {
        match *self {
            Life::Serving => None,
            Life::Retiring { deadline, .. }
            | Life::Finishing { deadline }
            | Life::Stopping { deadline, .. } => Some(deadline),
        }
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self, Life::Stopping { .. })
    }

    /// Starts a hand-over (only from service).
    pub fn retire(&mut self, now: Instant, graceful: Duration) -> bool {
        if *self != Life::Serving {
            return false;
        }
        *self = Life::Retiring {
            cursor: 0,
            deadline: now + graceful,
        };
        true
    }

    /// The hand-over is settled: serve what stayed.
    pub fn finish_retiring(&mut self) {
        if let Life::Retiring { deadline, .. } = *self {
            *self = Life::Finishing { deadline };
        }
    }

    /// Starts a graceful stop; false if one had begun. A retiring or finishing
    /// worker keeps its deadline (the stop does not extend it).
    pub fn stop(&mut self, now: Instant, graceful: Duration, listener_grace: Duration) -> bool {
        let deadline = match *self {
            Life::Stopping { .. } => return false,
            Life::Serving => now + graceful,
            Life::Retiring { deadline, .. } | Life::Finishing { deadline } => deadline,
        };
        *self = Life::Stopping {
            deadline,
            listeners_close_at: Some(now + listener_grace),
        };
        true
    }

    /// When the listen sockets get their last drain.
    pub fn listeners_close_at(&self) -> Option<Instant> {
        match *self {
            Life::Stopping {
                listeners_close_at, ..
            } => listeners_close_at,
            _ => None,
        }
    }

    pub fn listeners_closed(&mut self) {
        if let Life::Stopping {
            listeners_close_at, ..
        } = self
        {
            *listeners_close_at = None;
        }
    }

    /// Whether the worker is done: out of service with nothing left to serve, hold
    /// or settle — or past its deadline.
    pub fn may_exit(&self, now: Instant, holds_anything: bool) -> Exit {
        match *self {
            Life::Serving | Life::Retiring { .. } if self.deadline().is_none_or(|d| now < d) => {
                Exit::No
            }
            _ if !holds_anything => Exit::Done,
            _ if self.deadline().is_some_and(|d| now >= d) => Exit::Deadline,
            _ => Exit::No,
        }
    }
}

/// What [`Life::may_exit`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    No,
    /// Nothing is left.
    Done,
    /// The graceful timeout is over.
    Deadline,
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Duration = Duration::from_secs(30);
    const L: Duration = Duration::from_millis(100);

    #[test]
    fn a_stop_during_a_hand_over_keeps_the_hand_overs_deadline() {
        let t0 = Instant::now();
        let mut life = Life::Serving;
        assert!(life.retire(t0, G));
        assert!(!life.retire(t0, G), "retires once");
        let later = t0 + Duration::from_secs(5);
        assert!(life.stop(later, G, L));
        assert_eq!(life.deadline(), Some(t0 + G));
        assert_eq!(life.listeners_close_at(), Some(later + L));
        assert!(!life.stop(later, G, L), "stops once");
    }

    #[test]
    fn a_worker_exits_only_out_of_service_and_empty_or_late() {
        let t0 = Instant::now();
        let mut life = Life::Serving;
        assert_eq!(life.may_exit(t0, false), Exit::No);
        life.retire(t0, G);
        assert_eq!(life.may_exit(t0, false), Exit::No, "still offering");
        life.finish_retiring();
        assert_eq!(life.may_exit(t0, true), Exit::No);
        assert_eq!(life.may_exit(t0, false), Exit::Done);
        assert_eq!(life.may_exit(t0 + G, true), Exit::Deadline);
        let mut life = Life::Serving;
        life.stop(t0, G, L);
        assert_eq!(life.may_exit(t0, false), Exit::Done);
        assert!(life.is_stopping() && !life.in_service());
    }
}
