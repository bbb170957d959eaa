//! Worker health rules: how a worker ended, crash-loop backoff, heartbeats and the
//! random spread of --max-requests.
//!
//! The rules (DESIGN.md explains their reasons): a worker whose heartbeat is older
//! than --timeout is killed, once; after the master itself was held up, every
//! worker gets a full --timeout to be seen beating; a worker dying by its own doing
//! within [`CRASH_WINDOW`] of its start makes its slot wait [`BACKOFF_FIRST`],
//! doubling up to [`BACKOFF_MAX`], until one has lived [`BACKOFF_RESET`].
//! Everything here is a value or a plain function of values: times come in.

use std::time::{Duration, Instant};

/// A worker that dies sooner than this after its start is crash-looping.
pub const CRASH_WINDOW: Duration = Duration::from_secs(1);
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest a slot waits for its next worker (the documented bound).
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How often workers' resident memory is sampled for --max-worker-memory.
pub const MEMORY_SAMPLE: Duration = Duration::from_secs(2);

/// How a child process ended. A signal goes by its name (`SIGKILL`): the shell
/// names it, and the rules below read it without a system header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Status(i32),
    Signal(&'static str),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Status(code) => write!(f, "exit status {code}"),
            Exit::Signal(signal) => write!(f, "killed by {signal}"),
        }
    }
}

impl Exit {
    /// Whether the worker failed by its own doing — an error exit, or a crash (a
    /// fault signal the kernel raises for the process's own instructions) — rather
    /// than being ended from outside (SIGKILL from the OOM killer or an operator,
    /// TERM) or stopping cleanly.
    pub fn is_own_failure(self) -> bool {
        match self {
            Exit::Status(code) => code != 0,
            Exit::Signal(signal) => matches!(
                signal,
                "SIGSEGV" | "SIGBUS" | "SIGILL" | "SIGFPE" | "SIGABRT" | "SIGSYS" | "SIGTRAP"
            ),
        }
    }

    /// SIGKILL: what the OOM killer sends.
    pub fn is_kill(self) -> bool {
        self == Exit::Signal("SIGKILL")
    }
}

/// The delay before a slot's next worker, after one ended `exit` having lived
/// `lived`, when the slot's delay so far was `previous`. Only a worker that failed
/// by its own doing soon after its start (a crash loop: a broken environment, a
/// missing library) makes the slot wait, doubling each time; one ended from outside
/// is replaced at once, however young, so a storm of kills never empties the server.
pub fn respawn_delay(previous: Duration, lived: Duration, exit: Exit) -> Duration {
    if exit.is_own_failure() && lived < CRASH_WINDOW {
        (previous * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX)
    } else {
        Duration::ZERO
    }
}

/// A slot's respawn delay (crash-loop backoff).
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    pub delay: Duration,
    pub not_before: Option<Instant>,
}

/// Every slot's respawn delay.
#[derive(Debug, Default, Clone)]
pub struct Backoffs(Vec<Backoff>);

impl Backoffs {
    fn of(&mut self, slot: usize) -> &mut Backoff {
        if self.0.len() <= slot {
            self.0.resize(slot + 1, Backoff::default());
        }
        &mut self.0[slot]
    }

    /// A worker of `slot` ended unexpectedly at `now` after `lived`: returns the
    /// delay before its slot's next worker (zero: at once), kept for `may_spawn`.
    pub fn note_exit(
        &mut self,
        slot: usize,
        lived: Duration,
        exit: Exit,
        now: Instant,
    ) -> Duration {
        let backoff = self.of(slot);
        let delay = respawn_delay(backoff.delay, lived, exit);
        backoff.not_before = (delay > Duration::ZERO).then(|| now + delay);
        if delay > Duration::ZERO {
            backoff.delay = delay;
        }
        delay
    }

    /// Whether `slot` may get a worker at `now` (its respawn delay is over).
    pub fn may_spawn(&self, slot: usize, now: Instant) -> bool {
        self.0
            .get(slot)
            .and_then(|b| b.not_before)
            .is_none_or(|at| now >= at)
    }

    /// When `slot` may get its next worker, if it is held back.
    pub fn not_before(&self, slot: usize) -> Option<Instant> {
        self.0.get(slot).and_then(|b| b.not_before)
    }

    /// The next moment after `now` a held-back slot may get a worker (a moment
    /// passed is no reason to wake: the slot was served then).
    pub fn next_respawn(&self, now: Instant) -> Option<Instant> {
        self.0
            .iter()
            .filter_map(|b| b.not_before)
            .filter(|&at| at > now)
            .min()
    }

    /// Whether some slot has a respawn delay (to be forgotten once it is healthy).
    pub fn any(&self) -> bool {
        self.0.iter().any(|b| b.delay > Duration::ZERO)
    }

    /// The slots with a respawn delay.
    pub fn delayed(&self) -> Vec<usize> {
        (0..self.0.len())
            .filter(|&s| self.0[s].delay > Duration::ZERO)
            .collect()
    }

    pub fn forget(&mut self, slot: usize) {
        *self.of(slot) = Backoff::default();
    }
}

/// Whether a worker whose heartbeat is `age_ms` old is unresponsive for the whole
/// --timeout: a worker beats every `beat_ms`, so its last beat may be up to that old
/// when it freezes. `grace_ms` is how long ago heartbeats became due (after the
/// master was held up, every worker gets a full timeout from then).
pub fn is_lazy(age_ms: u64, grace_ms: u64, timeout_ms: u64, beat_ms: u64) -> bool {
    timeout_ms > 0 && age_ms.min(grace_ms) > timeout_ms + beat_ms
}

/// Whether a worker has missed a beat (its heartbeat is more than two beats old):
/// not killed yet, but not to be counted as healthy either.
pub fn is_late(age_ms: u64, grace_ms: u64, timeout_ms: u64, beat_ms: u64) -> bool {
    timeout_ms > 0 && grace_ms > 2 * beat_ms && age_ms > 2 * beat_ms
}

/// --max-requests with gunicorn's jitter: xorshift64, plenty for spreading
/// restarts, and no dependency.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// A worker's --max-requests: `base` + random(0..=`jitter`); None for 0.
    pub fn max_requests(&mut self, base: u64, jitter: u64) -> Option<u64> {
        if base == 0 {
            return None;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Some(
            base + if jitter == 0 {
                0
            } else {
                self.0 % (jitter + 1)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YOUNG: Duration = Duration::from_millis(10);
    const OLD: Duration = Duration::from_secs(5);

    #[test]
    fn a_worker_killed_from_outside_is_replaced_at_once_however_young() {
        for signal in ["SIGKILL", "SIGTERM", "SIGINT"] {
            let exit = Exit::Signal(signal);
            assert_eq!(respawn_delay(BACKOFF_MAX, YOUNG, exit), Duration::ZERO);
        }
        assert_eq!(
            respawn_delay(BACKOFF_FIRST, YOUNG, Exit::Status(0)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_young_worker_failing_by_itself_backs_off_doubling_up_to_the_cap() {
        let mut delay = Duration::ZERO;
        let mut seen = Vec::new();
        for exit in [
            Exit::Status(1),
            Exit::Signal("SIGSEGV"),
            Exit::Signal("SIGABRT"),
        ] {
            delay = respawn_delay(delay, YOUNG, exit);
            seen.push(delay.as_millis());
        }
        assert_eq!(seen, [100, 200, 400]);
        assert_eq!(
            respawn_delay(BACKOFF_MAX, YOUNG, Exit::Status(2)),
            BACKOFF_MAX
        );
    }

    #[test]
    fn a_worker_failing_after_the_crash_window_is_replaced_at_once() {
        assert_eq!(
            respawn_delay(BACKOFF_FIRST, OLD, Exit::Status(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_heartbeat_within_the_timeout_and_one_beat_is_not_lazy() {
        assert!(!is_lazy(30_000, u64::MAX, 30_000, 1_000));
        assert!(!is_lazy(31_000, u64::MAX, 30_000, 1_000));
        assert!(is_lazy(31_001, u64::MAX, 30_000, 1_000));
        assert!(!is_lazy(60_000, 5_000, 30_000, 1_000), "after a hold-up");
        assert!(!is_lazy(60_000, u64::MAX, 0, 1_000), "no --timeout");
    }
}
