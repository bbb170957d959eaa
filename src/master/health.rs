//! Worker health: heartbeats, crash-loop backoff and recycling.
//!
//! The rules (DESIGN.md explains their reasons): a worker whose scoreboard heartbeat
//! is older than --timeout is killed, once; after the master itself was held up,
//! every worker gets a full --timeout to be seen beating; a worker dying within
//! [`CRASH_WINDOW`] of its start makes its slot wait [`BACKOFF_FIRST`], doubling up
//! to [`BACKOFF_MAX`], until one has lived [`BACKOFF_RESET`]; --max-requests (with
//! jitter) and --max-worker-memory replace a worker gracefully.

use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::sys::signal::{Signal, kill};

use super::{Backoff, Master, WorkerProcess};
use crate::scoreboard;

/// A worker that dies sooner than this after its start is crash-looping.
const CRASH_WINDOW: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How often workers' resident memory is sampled for --max-worker-memory.
pub(super) const MEMORY_SAMPLE: Duration = Duration::from_secs(2);

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exit {
    Status(i32),
    Signal(Signal),
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
    pub(super) fn is_own_failure(self) -> bool {
        match self {
            Exit::Status(code) => code != 0,
            Exit::Signal(signal) => matches!(
                signal,
                Signal::SIGSEGV
                    | Signal::SIGBUS
                    | Signal::SIGILL
                    | Signal::SIGFPE
                    | Signal::SIGABRT
                    | Signal::SIGSYS
                    | Signal::SIGTRAP
            ),
        }
    }
}

/// The delay before a slot's next worker, after one ended `exit` having lived
/// `lived`, when the slot's delay so far was `previous`. Only a worker that failed
/// by its own doing soon after its start (a crash loop: a broken environment, a
/// missing library) makes the slot wait, doubling each time; one ended from outside
/// is replaced at once, however young, so a storm of kills never empties the server.
pub(super) fn respawn_delay(previous: Duration, lived: Duration, exit: Exit) -> Duration {
    if exit.is_own_failure() && lived < CRASH_WINDOW {
        (previous * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX)
    } else {
        Duration::ZERO
    }
}

impl Master {
    /// A worker died without being asked to: log it, and when it failed young by its
    /// own doing, make its slot wait longer before the next one (crash-loop backoff).
    pub(super) fn note_unexpected_exit(&mut self, gone: &WorkerProcess, exit: Exit) {
        let (slot, pid) = (gone.slot, gone.pid);
        let lived = gone.spawned_at.elapsed();
        let backoff = self.backoff_of(slot);
        let delay = respawn_delay(backoff.delay, lived, exit);
        backoff.not_before = (delay > Duration::ZERO).then(|| Instant::now() + delay);
        match exit {
            _ if delay > Duration::ZERO => {
                backoff.delay = delay;
                error!(
                    "worker[{slot}] pid {pid} exited unexpectedly ({exit}) {} ms after its start; respawning in {} ms",
                    lived.as_millis(),
                    delay.as_millis()
                );
            }
            Exit::Status(0) => info!(
                "worker[{slot}] pid {pid} stopped on a signal sent to it, not by the master (exit status 0); respawning"
            ),
            Exit::Signal(signal) if !exit.is_own_failure() => error!(
                "worker[{slot}] pid {pid} was killed by {signal} from outside raasd; respawning at once"
            ),
            _ => error!("worker[{slot}] pid {pid} exited unexpectedly ({exit}); respawning"),
        }
    }

    pub(super) fn backoff_of(&mut self, slot: usize) -> &mut Backoff {
        if self.backoff.len() <= slot {
            self.backoff.resize(slot + 1, Backoff::default());
        }
        &mut self.backoff[slot]
    }

    pub(super) fn forget_backoff_of_healthy_slots(&mut self, now: Instant) {
        for slot in 0..self.backoff.len() {
            if self.backoff[slot].delay == Duration::ZERO {
                continue;
            }
            let healthy = self
                .current_worker(slot)
                .is_some_and(|w| now.duration_since(w.spawned_at) >= BACKOFF_RESET);
            if healthy {
                info!(
                    "worker[{slot}] has lived {}s: its respawn delay is reset",
                    BACKOFF_RESET.as_secs()
                );
                self.backoff[slot] = Backoff::default();
            }
        }
    }

    /// Kills workers whose heartbeat is older than --timeout: stuck in a loop,
    /// stopped, wedged. Reaping then respawns them.
    pub(super) fn murder_lazy_workers(&mut self) {
        let now_ms = scoreboard::monotonic_ms();
        let since_last_pass = now_ms.saturating_sub(self.last_pass_ms);
        self.last_pass_ms = now_ms;
        let timeout_ms = self.config.timeout * 1000;
        if timeout_ms == 0 {
            return;
        }
        if since_last_pass > timeout_ms {
            // The master itself did not run for a while (stopped, the whole tree frozen,
            // the machine suspended): the workers may not have run either. Each gets a
            // full --timeout from now to be seen beating.
            info!(
                "the master was held up {since_last_pass} ms; giving every worker {}s to beat",
                self.config.timeout
            );
            self.heartbeats_due_from_ms = now_ms;
            return;
        }
        let grace_age = now_ms.saturating_sub(self.heartbeats_due_from_ms);
        // A worker beats every `beat`; its last beat may be up to that old when it
        // freezes, so it is unresponsive for the whole --timeout only once its beat
        // is older than both together.
        let beat_ms = self.config.serving().heartbeat.as_millis() as u64;
        for w in &mut self.workers {
            let age = self.scoreboard.cell(w.cell).heartbeat_age_ms(now_ms);
            // Killed once is enough: its channel closes before it can be reaped.
            if age.min(grace_age) > timeout_ms + beat_ms && w.killed_for.is_none() {
                warn!(
                    "worker[{}] pid {} missed its heartbeat: last beat {age} ms ago (timeout {}s); killing it",
                    w.slot, w.pid, self.config.timeout
                );
                w.killed_for = Some("no heartbeat within --timeout");
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
    }

    /// Whether a worker has missed a beat (its heartbeat is more than two beats old):
    /// not killed yet, but not to be counted as healthy either.
    pub(super) fn is_late(&self, w: &WorkerProcess) -> bool {
        let beat_ms = self.config.serving().heartbeat.as_millis() as u64;
        let now_ms = scoreboard::monotonic_ms();
        self.config.timeout > 0
            && now_ms.saturating_sub(self.heartbeats_due_from_ms) > 2 * beat_ms
            && self.scoreboard.cell(w.cell).heartbeat_age_ms(now_ms) > 2 * beat_ms
    }

    /// --max-worker-memory: a worker over the limit is replaced gracefully.
    pub(super) fn replace_bloated_workers(&mut self) {
        let limit = self.config.max_worker_memory * 1024 * 1024;
        let now = Instant::now();
        if limit == 0 || self.stopping.is_some() || now < self.next_memory_sample {
            return;
        }
        self.next_memory_sample = now + MEMORY_SAMPLE;
        let pid_of = |w: &WorkerProcess| sysinfo::Pid::from_u32(w.pid.as_raw() as u32);
        let pids: Vec<sysinfo::Pid> = self.workers.iter().map(pid_of).collect();
        self.system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&pids),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        for w in &mut self.workers {
            if w.replace || w.retiring {
                continue;
            }
            let Some(process) = self.system.process(pid_of(w)) else {
                continue;
            };
            if process.memory() > limit {
                info!(
                    "worker[{}] pid {} uses {} MiB (limit {} MiB); replacing it",
                    w.slot,
                    w.pid,
                    process.memory() / (1024 * 1024),
                    self.config.max_worker_memory
                );
                w.replace = true;
            }
        }
    }

    /// This worker's --max-requests, with gunicorn's jitter: N + random(0..=J).
    pub(super) fn next_max_requests(&mut self) -> Option<u64> {
        let base = self.config.max_requests;
        if base == 0 {
            return None;
        }
        // xorshift64: plenty for spreading restarts, and no dependency.
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let jitter = self.config.max_requests_jitter;
        Some(
            base + if jitter == 0 {
                0
            } else {
                self.random % (jitter + 1)
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
        for signal in [Signal::SIGKILL, Signal::SIGTERM, Signal::SIGINT] {
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
            Exit::Signal(Signal::SIGSEGV),
            Exit::Signal(Signal::SIGABRT),
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
}
