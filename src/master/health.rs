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
use nix::unistd::Pid;

use super::Master;
use super::workers::{Life, WorkerProcess};
use crate::scoreboard::{self, Scoreboard};

/// A worker that dies sooner than this after its start is crash-looping.
const CRASH_WINDOW: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How often workers' resident memory is sampled for --max-worker-memory.
const MEMORY_SAMPLE: Duration = Duration::from_secs(2);

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

/// A slot's respawn delay (crash-loop backoff).
#[derive(Default, Clone, Copy)]
struct Backoff {
    delay: Duration,
    not_before: Option<Instant>,
}

/// What the master knows of its workers' health between passes of its loop: the
/// respawn delay of each slot, when it last ran (to notice it was held up), when to
/// sample memory next, and the random source of --max-requests-jitter. Its methods
/// say whom to kill, replace or hold back; the master does it.
pub(super) struct Health {
    backoff: Vec<Backoff>,
    /// When the previous pass of the loop ran, to notice that the master itself was
    /// stopped or the machine suspended.
    last_pass_ms: u64,
    /// After such a hold-up: heartbeats are not due before this moment.
    heartbeats_due_from_ms: u64,
    next_memory_sample: Instant,
    system: sysinfo::System,
    random: u64,
    /// The OOM killer's count in our memory cgroup.
    oom: super::oom::OomCounter,
}

/// A worker to kill for its heartbeat, and how old that is.
pub(super) struct Lazy {
    pub pid: Pid,
    pub age_ms: u64,
}

/// A worker to replace for its memory, and how much it uses.
pub(super) struct Bloated {
    pub pid: Pid,
    pub bytes: u64,
}

impl Health {
    pub fn new(seed: u64) -> Result<Health, String> {
        Ok(Health {
            backoff: Vec::new(),
            last_pass_ms: scoreboard::monotonic_ms(),
            heartbeats_due_from_ms: 0,
            next_memory_sample: Instant::now() + MEMORY_SAMPLE,
            system: sysinfo::System::new()
                .map_err(|e| format!("cannot read process information: {e}"))?,
            random: seed | 1,
            oom: super::oom::OomCounter::of_this_process(),
        })
    }

    fn backoff_of(&mut self, slot: usize) -> &mut Backoff {
        if self.backoff.len() <= slot {
            self.backoff.resize(slot + 1, Backoff::default());
        }
        &mut self.backoff[slot]
    }

    /// A worker of `slot` ended unexpectedly after `lived`: returns the delay before
    /// its slot's next worker (zero: at once), which [`Health::may_spawn`] keeps.
    pub fn note_exit(&mut self, slot: usize, lived: Duration, exit: Exit) -> Duration {
        let backoff = self.backoff_of(slot);
        let delay = respawn_delay(backoff.delay, lived, exit);
        backoff.not_before = (delay > Duration::ZERO).then(|| Instant::now() + delay);
        if delay > Duration::ZERO {
            backoff.delay = delay;
        }
        delay
    }

    /// Whether a worker that ended so was the OOM killer's: SIGKILL from outside while
    /// the memory cgroup's OOM kill count rose. (Reads the count on every exit, so a
    /// rise is never blamed on a later one.)
    pub fn killed_by_oom(&mut self, exit: Exit) -> bool {
        self.oom.rose() && exit == Exit::Signal(Signal::SIGKILL)
    }

    /// Whether `slot` may get a worker at `now` (its respawn delay is over).
    pub fn may_spawn(&self, slot: usize, now: Instant) -> bool {
        self.backoff
            .get(slot)
            .and_then(|b| b.not_before)
            .is_none_or(|at| now >= at)
    }

    /// The next moment a held-back slot may get a worker.
    pub fn next_respawn(&self) -> Option<Instant> {
        self.backoff.iter().filter_map(|b| b.not_before).min()
    }

    /// Whether some slot has a respawn delay (to be forgotten once it is healthy).
    pub fn is_backing_off(&self) -> bool {
        self.backoff.iter().any(|b| b.delay > Duration::ZERO)
    }

    /// Forgets the respawn delay of slots whose current worker has lived
    /// [`BACKOFF_RESET`].
    pub fn forget_backoff_of_healthy_slots(
        &mut self,
        workers: &[WorkerProcess],
        generation: u64,
        now: Instant,
    ) {
        for slot in 0..self.backoff.len() {
            if self.backoff[slot].delay == Duration::ZERO {
                continue;
            }
            let healthy = super::workers::current(workers, slot, generation)
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

    /// The workers unresponsive for the whole --timeout (`timeout_secs`; 0 = never):
    /// stuck in a loop, stopped, wedged. A worker beats every `beat`, so its last
    /// beat may be up to that old when it freezes: it is unresponsive for the whole
    /// timeout only once its beat is older than both together. After the master
    /// itself was held up, every worker gets a full timeout from then to be seen.
    pub fn lazy_workers(
        &mut self,
        workers: &[WorkerProcess],
        board: &Scoreboard,
        timeout_secs: u64,
        beat: Duration,
    ) -> Vec<Lazy> {
        let now_ms = scoreboard::monotonic_ms();
        let since_last_pass = now_ms.saturating_sub(self.last_pass_ms);
        self.last_pass_ms = now_ms;
        let timeout_ms = timeout_secs * 1000;
        if timeout_ms == 0 {
            return Vec::new();
        }
        if since_last_pass > timeout_ms {
            // The master itself did not run for a while (stopped, the whole tree frozen,
            // the machine suspended): the workers may not have run either.
            info!(
                "the master was held up {since_last_pass} ms; giving every worker {timeout_secs}s to beat"
            );
            self.heartbeats_due_from_ms = now_ms;
            return Vec::new();
        }
        let grace_age = now_ms.saturating_sub(self.heartbeats_due_from_ms);
        let beat_ms = beat.as_millis() as u64;
        workers
            .iter()
            // Killed once is enough: its channel closes before it can be reaped.
            .filter(|w| !matches!(w.life, Life::Killed(_)))
            .filter_map(|w| {
                let age_ms = board.heartbeat_age_ms(w.cell, now_ms);
                (age_ms.min(grace_age) > timeout_ms + beat_ms)
                    .then_some(Lazy { pid: w.pid, age_ms })
            })
            .collect()
    }

    /// Whether a worker has missed a beat (its heartbeat is more than two beats
    /// old): not killed yet, but not to be counted as healthy either.
    pub fn is_late(
        &self,
        w: &WorkerProcess,
        board: &Scoreboard,
        timeout_secs: u64,
        beat: Duration,
    ) -> bool {
        let beat_ms = beat.as_millis() as u64;
        let now_ms = scoreboard::monotonic_ms();
        timeout_secs > 0
            && now_ms.saturating_sub(self.heartbeats_due_from_ms) > 2 * beat_ms
            && board.heartbeat_age_ms(w.cell, now_ms) > 2 * beat_ms
    }

    /// When memory is to be sampled next.
    pub fn next_memory_sample(&self) -> Instant {
        self.next_memory_sample
    }

    /// --max-worker-memory (`limit` bytes; 0 = none): the workers over it, sampled
    /// every [`MEMORY_SAMPLE`]; those already leaving are not counted.
    pub fn bloated_workers(
        &mut self,
        workers: &[WorkerProcess],
        limit: u64,
        now: Instant,
    ) -> Vec<Bloated> {
        if limit == 0 || now < self.next_memory_sample {
            return Vec::new();
        }
        self.next_memory_sample = now + MEMORY_SAMPLE;
        let pid_of = |w: &WorkerProcess| sysinfo::Pid::from_u32(w.pid.as_raw() as u32);
        let pids: Vec<sysinfo::Pid> = workers.iter().map(pid_of).collect();
        self.system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&pids),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        workers
            .iter()
            .filter(|w| matches!(w.life, Life::Starting | Life::Accepting))
            .filter_map(|w| {
                let bytes = self.system.process(pid_of(w))?.memory();
                (bytes > limit).then_some(Bloated { pid: w.pid, bytes })
            })
            .collect()
    }

    /// A worker's --max-requests, with gunicorn's jitter: `base` + random(0..=`jitter`).
    pub fn next_max_requests(&mut self, base: u64, jitter: u64) -> Option<u64> {
        if base == 0 {
            return None;
        }
        // xorshift64: plenty for spreading restarts, and no dependency.
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        Some(
            base + if jitter == 0 {
                0
            } else {
                self.random % (jitter + 1)
            },
        )
    }
}

impl Master {
    /// A worker died without being asked to: log it, and when it failed young by its
    /// own doing, make its slot wait longer before the next one (crash-loop backoff).
    pub(super) fn note_unexpected_exit(&mut self, gone: &WorkerProcess, exit: Exit, oom: bool) {
        let (slot, pid) = (gone.slot, gone.pid);
        let lived = gone.spawned_at.elapsed();
        let delay = self.health.note_exit(slot, lived, exit);
        match exit {
            _ if oom => error!(
                "worker[{slot}] pid {pid} was killed by the kernel's OOM killer (its memory cgroup's oom_kill count rose); respawning{}",
                if delay > Duration::ZERO {
                    format!(" in {} ms", delay.as_millis())
                } else {
                    " at once".to_string()
                }
            ),
            _ if delay > Duration::ZERO => error!(
                "worker[{slot}] pid {pid} exited unexpectedly ({exit}) {} ms after its start; respawning in {} ms",
                lived.as_millis(),
                delay.as_millis()
            ),
            Exit::Status(0) => info!(
                "worker[{slot}] pid {pid} stopped on a signal sent to it, not by the master (exit status 0); respawning"
            ),
            Exit::Signal(signal) if !exit.is_own_failure() => error!(
                "worker[{slot}] pid {pid} was killed by {signal} from outside raasd; respawning at once"
            ),
            _ => error!("worker[{slot}] pid {pid} exited unexpectedly ({exit}); respawning"),
        }
    }

    /// Kills the workers unresponsive for the whole --timeout; reaping then
    /// respawns them.
    pub(super) fn murder_lazy_workers(&mut self) {
        let beat = self.config.serving().heartbeat;
        let lazy =
            self.health
                .lazy_workers(&self.workers, &self.scoreboard, self.config.timeout, beat);
        for Lazy { pid, age_ms } in lazy {
            if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
                warn!(
                    "worker[{}] pid {pid} missed its heartbeat: last beat {age_ms} ms ago (timeout {}s); killing it",
                    w.slot, self.config.timeout
                );
                w.life = Life::Killed("no heartbeat within --timeout");
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    /// Whether `w` has missed a beat, for the title.
    pub(super) fn is_late(&self, w: &WorkerProcess) -> bool {
        let beat = self.config.serving().heartbeat;
        self.health
            .is_late(w, &self.scoreboard, self.config.timeout, beat)
    }

    /// --max-worker-memory: a worker over the limit is replaced gracefully.
    pub(super) fn replace_bloated_workers(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let limit = self.config.max_worker_memory * 1024 * 1024;
        for Bloated { pid, bytes } in
            self.health
                .bloated_workers(&self.workers, limit, Instant::now())
        {
            if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
                info!(
                    "worker[{}] pid {pid} uses {} MiB (limit {} MiB); replacing it",
                    w.slot,
                    bytes / (1024 * 1024),
                    self.config.max_worker_memory
                );
                w.life = Life::Replacing;
            }
        }
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
