//! When a worker accepts: the balancing rule, its pauses, and the nudge that passes
//! a burst on to a sibling.
//!
//! Owns a worker's accept state — in service or not, stepped back (over its share),
//! paused for want of descriptors, full at --max-conns — and the one rule that
//! decides stepping back, [`should_step_back`], a plain function over the counts the
//! scoreboard shows. It does not accept (the worker does) and never decides anything
//! about another worker: it only wakes one.
//!
//! Why a nudge: the listen sockets are shared and registered with EPOLLEXCLUSIVE, so a
//! burst of connections that lands in the accept queue before any worker runs wakes
//! one worker, which would take them all — with long-lived connections, for good. A
//! worker over its fair share stops, and writes to the [`Nudge`], an eventfd every
//! worker also holds with EPOLLEXCLUSIVE: the kernel wakes one sleeping sibling, which
//! takes the rest of the queue (and nudges back when it in turn is over its share).
//! The nudge costs nothing while connections spread by themselves.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::scoreboard::Load;

/// How long a worker over its share stays out of accepting, unless a nudge or its
/// siblings catching up end the pause sooner.
pub const STEP_BACK: Duration = Duration::from_millis(5);
/// Fewer connections than this never make a worker step back: connect-per-request
/// clients come and go too fast for an imbalance of a few to matter, and stepping
/// back for them cost 5 % of that throughput (scripts/ab.sh, floor 2 against none).
pub const STEP_BACK_FLOOR: u64 = 4;
/// How long accepting pauses when the process is out of file descriptors.
pub const OUT_OF_DESCRIPTORS: Duration = Duration::from_millis(100);

/// Whether a worker holding `mine` connections should stop accepting, given what its
/// serving siblings hold. Over its share means more than the even split rounded up
/// (plus an eighth, so a large worker does not step back for one connection), and
/// only while a sibling accepts or soon will: otherwise there is nobody to leave the
/// connections to.
pub fn should_step_back(mine: u64, siblings: Load) -> bool {
    if siblings.accepting == 0 || mine < STEP_BACK_FLOOR {
        return false;
    }
    let fair = (siblings.connections + mine).div_ceil(siblings.workers + 1);
    mine > fair + fair / 8
}

/// Why accepting is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// Over its share: until then, or until the siblings catch up.
    SteppedBack { until: Instant },
    /// Out of descriptors: until then.
    OutOfDescriptors { until: Instant },
}

/// A worker's accept state, apart from its listeners (which the worker registers as
/// [`AcceptGate::wants_listeners`] says).
#[derive(Debug, Default)]
pub struct AcceptGate {
    pause: Option<Pause>,
    stopping: bool,
    full: bool,
    last_fd_warning: Option<Instant>,
}

impl AcceptGate {
    /// Whether the listeners belong in the poll set now.
    pub fn wants_listeners(&self) -> bool {
        !self.stopping && !self.full && self.pause.is_none()
    }

    /// The moment a pause ends, to wake for it.
    pub fn paused_until(&self) -> Option<Instant> {
        match self.pause {
            Some(Pause::SteppedBack { until } | Pause::OutOfDescriptors { until }) => Some(until),
            None => None,
        }
    }

    /// Whether this worker stepped back over its share (rather than paused for
    /// another reason).
    pub fn stepped_back(&self) -> bool {
        matches!(self.pause, Some(Pause::SteppedBack { .. }))
    }

    /// From when, for the siblings (scoreboard, monotonic ms), this worker accepts:
    /// 0 now — or as soon as a nudge wakes it, when it only stepped back —, a moment
    /// ahead while out of descriptors, never while stopping or full.
    pub fn accepts_from_ms(&self, now: Instant, now_ms: u64) -> u64 {
        match self.pause {
            _ if self.stopping || self.full => u64::MAX,
            Some(Pause::OutOfDescriptors { until }) => {
                now_ms + until.saturating_duration_since(now).as_millis() as u64
            }
            Some(Pause::SteppedBack { .. }) | None => 0,
        }
    }

    pub fn step_back(&mut self, now: Instant) {
        self.pause = Some(Pause::SteppedBack {
            until: now + STEP_BACK,
        });
    }

    /// Out of descriptors: pause; returns whether to warn (at most once a second).
    pub fn pause_for_descriptors(&mut self, now: Instant) -> bool {
        self.pause = Some(Pause::OutOfDescriptors {
            until: now + OUT_OF_DESCRIPTORS,
        });
        let warn = self
            .last_fd_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if warn {
            self.last_fd_warning = Some(now);
        }
        warn
    }

    /// Ends a pause that is over, or a step back that is no longer needed.
    pub fn resume_if_due(&mut self, now: Instant, still_over_share: impl FnOnce() -> bool) {
        let due = match self.pause {
            Some(Pause::SteppedBack { until }) => now >= until || !still_over_share(),
            Some(Pause::OutOfDescriptors { until }) => now >= until,
            None => false,
        };
        if due {
            self.pause = None;
        }
    }

    pub fn set_full(&mut self, full: bool) {
        self.full = full;
    }

    pub fn stop(&mut self) {
        self.stopping = true;
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }
}

/// The eventfd that wakes one sleeping sibling to take the rest of a burst. Made by
/// the master before it forks; every worker of that master shares it.
#[derive(Debug)]
pub struct Nudge(OwnedFd);

impl Nudge {
    pub fn new() -> io::Result<Nudge> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )?;
        Ok(Nudge(fd.into()))
    }

    /// Wakes one worker waiting on the nudge.
    pub fn poke(&self) {
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Takes the pending nudges, so that the eventfd stops being readable.
    pub fn drain(&self) {
        let mut count = [0u8; 8];
        let _ = nix::unistd::read(&self.0, &mut count);
    }
}

impl AsFd for Nudge {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn siblings(connections: u64, workers: u64) -> Load {
        Load {
            connections,
            workers,
            accepting: workers,
        }
    }

    #[test]
    fn a_burst_is_split_evenly_from_the_first_connections() {
        // Eight connections at once over two workers: whoever accepts steps back as
        // soon as it holds more than half, rounded up.
        assert!(!should_step_back(3, siblings(0, 1)), "below the floor");
        assert!(should_step_back(4, siblings(0, 1)));
        assert!(!should_step_back(4, siblings(4, 1)));
        assert!(should_step_back(5, siblings(3, 1)));
        // 36 over 3: 12 each, with an eighth of slack once shares are large.
        assert!(!should_step_back(13, siblings(23, 2)));
        assert!(should_step_back(15, siblings(21, 2)));
    }

    #[test]
    fn nobody_steps_back_without_a_sibling_to_leave_the_connections_to() {
        assert!(!should_step_back(100, siblings(0, 0)));
        let busy = Load {
            connections: 0,
            workers: 2,
            accepting: 0,
        };
        assert!(!should_step_back(100, busy));
    }

    #[test]
    fn a_step_back_ends_when_due_or_when_the_siblings_caught_up() {
        let now = Instant::now();
        let mut gate = AcceptGate::default();
        assert!(gate.wants_listeners());
        gate.step_back(now);
        assert!(!gate.wants_listeners() && gate.stepped_back());
        gate.resume_if_due(now, || true);
        assert!(!gate.wants_listeners());
        gate.resume_if_due(now, || false);
        assert!(gate.wants_listeners());
        gate.step_back(now);
        gate.resume_if_due(now + STEP_BACK, || true);
        assert!(gate.wants_listeners());
    }

    #[test]
    fn a_descriptor_pause_lasts_its_time_and_warns_once_a_second() {
        let now = Instant::now();
        let mut gate = AcceptGate::default();
        assert!(gate.pause_for_descriptors(now));
        assert!(!gate.pause_for_descriptors(now + Duration::from_millis(10)));
        gate.resume_if_due(now + Duration::from_millis(20), || false);
        assert!(!gate.wants_listeners(), "not over before its time");
        gate.resume_if_due(now + Duration::from_secs(1), || false);
        assert!(gate.wants_listeners());
        assert!(gate.pause_for_descriptors(now + Duration::from_secs(2)));
    }

    #[test]
    fn stopping_or_full_keeps_the_listeners_out_and_tells_the_siblings() {
        let now = Instant::now();
        let mut gate = AcceptGate::default();
        assert_eq!(gate.accepts_from_ms(now, 5), 0);
        gate.set_full(true);
        assert!(!gate.wants_listeners());
        assert_eq!(gate.accepts_from_ms(now, 5), u64::MAX);
        gate.set_full(false);
        gate.stop();
        assert!(!gate.wants_listeners() && gate.is_stopping());
    }

    #[test]
    fn a_nudge_is_readable_until_drained() {
        let nudge = Nudge::new().unwrap();
        nudge.poke();
        nudge.poke();
        nudge.drain();
        let mut count = [0u8; 8];
        assert_eq!(
            nix::unistd::read(&nudge.0, &mut count),
            Err(nix::errno::Errno::EAGAIN)
        );
    }
}
