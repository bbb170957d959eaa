//! The supervisor's decisions, as a pure state machine.
//!
//! [`Supervisor::handle`] takes one [`Event`] (a signal with its count, a child's
//! exit, a worker's report, a console command, a successor's readiness, the result
//! of an action it asked for, or a pass of the loop) and the current time, and
//! returns the [`Action`]s to carry out: fork a worker for a slot, tell a worker to
//! stop, kill one, start or abandon an upgrade, move the pid file, tell systemd,
//! log a line, answer a console client. It owns the supervisor's state — the
//! workers and their lives, the generation, the target, the stop, drain and upgrade
//! phases, crash-loop backoff, heartbeat bookkeeping, the totals — and performs no
//! system call and reads no clock: the shell (`crate::master`) turns the world into
//! events and the actions into system calls, and the simulator (`simulation`, a
//! test) feeds it millions of event orders and checks its invariants after each.
//!
//! An action whose outcome the supervisor needs is answered by an event before any
//! other: `Spawn` by `Spawned` or `SpawnFailed`, `Reload` by `Reloaded`,
//! `StartUpgrade` by `SuccessorStarted`, `SuccessorNotStarted` or `UpgradeAborted`.
//!
//! Read [`Supervisor::handle`] and [`Supervisor::pass`] as the policy, in the
//! order Unicorn's master loop tells it.

use std::time::{Duration, Instant};

use log::Level;
use serde_json::json;

mod events;
mod health;
mod phase;
mod totals;
mod workers;

#[cfg(test)]
mod simulation;

pub use events::{
    Action, Client, Command, Event, Exited, Facts, Field, Line, Notice, Order, Pid, PidFileStep,
    Reply, Said, Settings, Signal,
};
pub use health::{BACKOFF_MAX, Exit};
pub use phase::{Phase, UpgradeStep};
pub use totals::{Served, Totals};
pub use workers::{Census, Life, Worker};

use health::{Backoffs, Jitter, MEMORY_SAMPLE};

/// How long a quick stop waits for workers to exit before it kills them.
pub const QUICK_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed fork, how long before trying again.
pub const FORK_RETRY: Duration = Duration::from_secs(1);
/// How long an abandoned successor's process group has, after TERM, before KILL.
pub const ABANDON_GRACE: Duration = Duration::from_secs(3);
/// How often the loop looks again while something is settling (workers starting,
/// a slot backing off).
const SETTLING: Duration = Duration::from_secs(1);

/// A stop under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping {
    pub quick: bool,
    pub deadline: Instant,
    pub killed: bool,
}

/// Where this master is in a binary upgrade, as the old master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    Idle,
    /// The shell is starting the successor (`StartUpgrade` not answered yet).
    Starting,
    /// The successor was started and has until `deadline` to say it is ready.
    Waiting {
        successor: Pid,
        deadline: Instant,
        started: Instant,
    },
    /// The new master took over: this one stops without removing what it now owns.
    HandedOver {
        connections_follow: bool,
        successor: Pid,
    },
}

/// Where the pid file is, as far as this master is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PidFileState {
    /// None of ours: none configured, not written yet (a successor before it
    /// serves), or removed.
    None,
    /// FILE names this master.
    Held,
    /// FILE.oldbin names this master: an upgrade is under way.
    Oldbin,
}

/// A fork asked for and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Forking {
    slot: usize,
    generation: u64,
    cell: usize,
}

/// The supervisor's state. See the module header.
pub struct Supervisor {
    settings: Settings,
    facts: Facts,
    /// The time of the event being handled.
    now: Instant,
    workers: Vec<Worker>,
    target: usize,
    generation: u64,
    forking: Option<Forking>,
    /// This pass's second half (heartbeats, memory, the stop's deadline, the
    /// watchdog) waits for its forks to be answered: as in Unicorn's loop, the
    /// workers are brought to the target first, and a slot a kill empties is filled
    /// at the next pass.
    rest_of_pass_owed: bool,
    fork_retry_at: Option<Instant>,
    backoff: Backoffs,
    jitter: Jitter,
    /// Heartbeats: when the previous pass ran (a long gap means the master itself
    /// was held up), and since when heartbeats are due.
    last_pass: Instant,
    heartbeats_due_from: Option<Instant>,
    next_memory_sample: Instant,
    all_accepting_announced: bool,
    /// A graceful stop asked for, waiting out --drain-delay: until when, and why.
    draining: Option<(Instant, String)>,
    stopping: Option<Stopping>,
    upgrade: Upgrade,
    /// Successors given up on: each one's group, and when it gets KILL (a second
    /// upgrade may fail within the first one's grace).
    abandoned: Vec<(Pid, Instant)>,
    /// Started by an upgrade and not yet ready.
    predecessor: bool,
    pid_file: PidFileState,
    /// READY=1 sent for the current configuration.
    systemd_ready: bool,
    watchdog_next: Instant,
    totals: Totals,
    /// Set once the supervisor said `Exit`: every later event is ignored.
    exit_code: Option<i32>,
    out: Vec<Action>,
}

impl Supervisor {
    pub fn new(settings: Settings, facts: Facts, now: Instant) -> Supervisor {
        Supervisor {
            target: settings.workers,
            generation: facts.generation,
            jitter: Jitter::new(facts.seed),
            predecessor: facts.predecessor,
            pid_file: if facts.pid_file && !facts.predecessor {
                PidFileState::Held
            } else {
                PidFileState::None
            },
            settings,
            facts,
            now,
            workers: Vec::new(),
            forking: None,
            rest_of_pass_owed: false,
            fork_retry_at: None,
            backoff: Backoffs::default(),
            last_pass: now,
            heartbeats_due_from: None,
            next_memory_sample: now + MEMORY_SAMPLE,
            all_accepting_announced: false,
            draining: None,
            stopping: None,
            upgrade: Upgrade::Idle,
            abandoned: Vec::new(),
            systemd_ready: false,
            watchdog_next: now,
            totals: Totals::default(),
            exit_code: None,
            out: Vec::new(),
        }
    }

    /// Takes one event at `now`; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        self.now = now.max(self.now);
        if self.exit_code.is_some() {
            return Vec::new();
        }
        match event {
            Event::Signal(signal, times) => self.on_signal(signal, times),
            Event::ChildExited(exited) => self.reap(exited),
            Event::Said(pid, said) => self.hear(pid, said),
            Event::Spawned(pid) => {
                self.spawned(pid);
                self.converge();
                self.finish_pass();
            }
            Event::SpawnFailed(why) => {
                self.spawn_failed(&why);
                self.converge();
                self.finish_pass();
            }
            Event::Beats(ages) => {
                for (pid, age) in ages {
                    if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
                        w.beat_age_ms = age;
                    }
                }
            }
            Event::MemorySampled(usage) => self.replace_bloated(&usage),
            Event::Console(client, command) => self.on_command(client, command),
            Event::Reloaded { asked_by, outcome } => self.reloaded(asked_by, outcome),
            Event::UpgradeAborted(why) => self.upgrade_aborted(&why),
            Event::SuccessorStarted(pid) => {
                self.upgrade = Upgrade::Waiting {
                    successor: pid,
                    deadline: self.now + self.settings.upgrade_timeout,
                    started: self.now,
                };
            }
            Event::SuccessorNotStarted(why) => self.roll_back(&why),
            Event::SuccessorReady { takes_connections } => self.hand_over(takes_connections),
            // Read only while waiting; a word after the upgrade ended changes nothing.
            Event::SuccessorFailed(_) if !matches!(self.upgrade, Upgrade::Waiting { .. }) => {}
            Event::SuccessorFailed(None) => {
                self.roll_back("the new master exited before it was ready")
            }
            Event::SuccessorFailed(Some(why)) => {
                self.roll_back(&format!("the new master could not start: {why}"))
            }
            Event::Farewell(heard) => self.hear_farewell(heard),
            Event::Tick => self.pass(),
        }
        std::mem::take(&mut self.out)
    }

    /// One pass of the loop, after the signals, the exits, the reports and the
    /// console were taken: end when stopped, follow the timers, bring the workers to
    /// what is wanted, kill those stuck or past their deadline.
    fn pass(&mut self) {
        if let Upgrade::Waiting { deadline, .. } = self.upgrade
            && self.now >= deadline
        {
            self.roll_back(&format!(
                "the new master was not ready within {}s (--upgrade-timeout)",
                self.settings.upgrade_timeout.as_secs()
            ));
        }
        self.finish_draining();
        // Stopped with no worker left — also a stop begun just now, --drain-delay
        // over: nothing else would wake the loop before the stop's deadline.
        if self.stopping.is_some() && self.workers.is_empty() {
            return self.exit();
        }
        self.end_abandoned(false);
        self.rest_of_pass_owed = true;
        self.converge();
        self.finish_pass();
    }

    /// The pass's second half, once its forks are answered: kill those stuck or
    /// past their deadline.
    fn finish_pass(&mut self) {
        if self.forking.is_some() || !self.rest_of_pass_owed {
            return;
        }
        self.rest_of_pass_owed = false;
        self.kill_lazy_workers();
        self.sample_memory();
        self.kill_workers_past_deadline();
        self.tend_watchdog();
    }

    fn on_signal(&mut self, signal: Signal, times: usize) {
        self.log(Level::Debug, format!("received {} x{times}", signal.name()));
        match signal {
            Signal::Term | Signal::Quit => self.stop_after_draining(signal.name()),
            Signal::Int => self.stop(true, signal.name()),
            Signal::Hup => self.reload(None),
            Signal::Usr2 => self.start_upgrade(None),
            Signal::Winch { on_terminal: true } => self.log(
                Level::Info,
                "SIGWINCH ignored: the master has a controlling terminal, where a window \
                 resize sends it (run raasd detached to drain workers with WINCH)",
            ),
            Signal::Winch { on_terminal: false } => self.resize(0, "SIGWINCH"),
            Signal::Usr1 => self.out.push(Action::ReopenLogs),
            Signal::Ttin => self.resize(
                self.target
                    .saturating_add(times)
                    .min(self.facts.max_workers),
                "SIGTTIN",
            ),
            Signal::Ttou => match self.target {
                // Said, not dropped: the operator is left wondering otherwise.
                0 => self.log(
                    Level::Info,
                    "SIGTTOU ignored: no workers (TTIN or HUP brings them back)",
                ),
                1 => self.log(
                    Level::Info,
                    "SIGTTOU ignored: 1 worker, the least TTOU leaves",
                ),
                n => self.resize(n.saturating_sub(times).max(1), "SIGTTOU"),
            },
            Signal::Chld => {} // the shell reaps at the top of each pass
        }
    }

    fn on_command(&mut self, client: Client, command: Command) {
        match command {
            Command::Workers(_) if self.stopping.is_some() => {
                self.reply(client, Reply::Failed("the server is stopping".to_string()))
            }
            Command::Workers(n) => {
                self.resize(n, "raasd ctl workers");
                self.reply(client, Reply::Done(json!({ "ok": true, "workers": n })));
            }
            Command::Reload => self.reload(Some(client)),
            Command::Upgrade => self.start_upgrade(Some(client)),
            Command::Stop { quick } => {
                let how = if quick { "quick" } else { "graceful" };
                self.reply(client, Reply::Done(json!({ "ok": true, "stopping": how })));
                if quick {
                    self.stop(true, "raasd ctl stop");
                } else {
                    self.stop_after_draining("raasd ctl stop");
                }
            }
            Command::ReopenLogs => {
                self.out.push(Action::ReopenLogs);
                self.reply(client, Reply::Done(json!({ "ok": true })));
            }
        }
    }

    // ---- the workers' lives -------------------------------------------------

    /// Spawns what is missing (one fork at a time: the next once this one is
    /// answered), then retires what is surplus or replaced, and says when every
    /// slot accepts.
    fn converge(&mut self) {
        if self.stopping.is_some() || self.forking.is_some() {
            return;
        }
        let now = self.now;
        for slot in workers::slots_to_fill(&self.workers, self.target, self.generation) {
            if !self.backoff.may_spawn(slot, now) {
                continue;
            }
            if self.fork_retry_at.is_some_and(|at| now < at) {
                break;
            }
            let Some(cell) = workers::free_cell(&self.workers, self.facts.cells) else {
                self.log(
                    Level::Error,
                    format!("no free scoreboard cell for worker[{slot}]"),
                );
                break;
            };
            let max_requests = self.jitter.max_requests(
                self.settings.max_requests,
                self.settings.max_requests_jitter,
            );
            self.forking = Some(Forking {
                slot,
                generation: self.generation,
                cell,
            });
            self.out.push(Action::Spawn {
                slot,
                generation: self.generation,
                cell,
                max_requests,
            });
            return;
        }
        self.forget_backoff_of_healthy_slots();
        self.retire_surplus();
        if !self.all_accepting_announced
            && workers::all_accepting(&self.workers, self.target, self.generation)
        {
            self.all_accepting_announced = true;
            match self.target {
                1 => self.log(Level::Info, "1 worker accepting"),
                n => self.log(Level::Info, format!("all {n} workers accepting")),
            }
            self.announce_ready();
        }
    }

    fn spawned(&mut self, pid: Pid) {
        let Some(Forking {
            slot,
            generation,
            cell,
        }) = self.forking.take()
        else {
            return;
        };
        self.log_with(
            Level::Info,
            format!("spawned worker[{slot}] pid {pid}"),
            vec![
                ("slot", Field::Int(slot as i64)),
                ("worker_pid", Field::Int(i64::from(pid.0))),
            ],
        );
        self.fork_retry_at = None;
        self.all_accepting_announced = false;
        self.workers.push(Worker {
            pid,
            slot,
            generation,
            cell,
            spawned_at: self.now,
            life: Life::Starting,
            sandbox: self.settings.sandbox,
            beat_age_ms: 0,
        });
    }

    fn spawn_failed(&mut self, why: &str) {
        let Some(forking) = self.forking.take() else {
            return;
        };
        self.log(
            Level::Error,
            format!(
                "cannot fork worker[{}]: {why}; retrying in {FORK_RETRY:?}",
                forking.slot
            ),
        );
        self.fork_retry_at = Some(self.now + FORK_RETRY);
    }

    /// Forgets the respawn delay of slots whose current worker has lived long
    /// enough.
    fn forget_backoff_of_healthy_slots(&mut self) {
        for slot in self.backoff.delayed() {
            let healthy = workers::current(&self.workers, slot, self.generation)
                .is_some_and(|w| self.now.duration_since(w.spawned_at) >= health::BACKOFF_RESET);
            if healthy {
                self.log(
                    Level::Info,
                    format!(
                        "worker[{slot}] has lived {}s: its respawn delay is reset",
                        health::BACKOFF_RESET.as_secs()
                    ),
                );
                self.backoff.forget(slot);
            }
        }
    }

    /// Retires the workers beyond the target, of an older generation, or replaced,
    /// once their slot's new worker accepts.
    fn retire_surplus(&mut self) {
        let target = self.target;
        let mut retiring = Vec::new();
        for pid in workers::to_retire(&self.workers, target, self.generation) {
            let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
                continue;
            };
            let reason = if w.life == Life::Replacing {
                "recycled"
            } else if w.slot >= target {
                "resize"
            } else {
                "reload"
            };
            w.life = Life::Retiring;
            retiring.push((pid, w.slot, reason));
        }
        if retiring.is_empty() {
            return;
        }
        // Connections move to the workers that stay, when there are any.
        let receivers = self.workers.iter().any(|w| w.life == Life::Accepting);
        let (order, how) = if receivers && self.settings.handover {
            (Order::HandOver, "handing its connections over")
        } else {
            (Order::GracefulStop, "draining its connections")
        };
        for (pid, slot, reason) in retiring {
            self.totals.count_restart(reason);
            self.log(
                Level::Info,
                format!("retiring worker[{slot}] pid {pid}, {how}"),
            );
            self.out.push(Action::Tell(pid, order));
        }
    }

    fn hear(&mut self, pid: Pid, said: Said) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        match (said, w.life) {
            (Said::Ready, Life::Starting) => {
                w.life = Life::Accepting;
                let line = format!("worker[{}] pid {pid} accepting", w.slot);
                self.log(Level::Debug, line);
            }
            (Said::ReplaceMe, Life::Starting | Life::Accepting) => {
                w.life = Life::Replacing;
                let line = format!(
                    "worker[{}] pid {pid} reached --max-requests; replacing it",
                    w.slot
                );
                self.log(Level::Info, line);
            }
            _ => {}
        }
    }

    /// A child exited: the successor of an upgrade (roll back), a worker (count
    /// what it did; when its exit was not asked for, say why and hold its slot back
    /// if it is crash-looping), or a process given up on.
    fn reap(&mut self, exited: Exited) {
        let Exited {
            pid,
            exit,
            oom_rose,
            served,
            said,
        } = exited;
        if let Upgrade::Waiting { successor, .. } = self.upgrade
            && successor == pid
        {
            // What it said before exiting is the better reason.
            let why = match said {
                Some(why) => format!("the new master could not start: {why}"),
                None => format!("the new master exited ({exit})"),
            };
            return self.roll_back(&why);
        }
        let Some(at) = self.workers.iter().position(|w| w.pid == pid) else {
            // A successor given up on (its readiness pipe closed first).
            return self.log(Level::Info, format!("child pid {pid} exited ({exit})"));
        };
        let gone = self.workers.swap_remove(at);
        self.totals.add_served(&served);
        let slot = gone.slot;
        match gone.life {
            Life::Killed(why) => {
                self.totals.count_restart("killed by the master");
                self.log(
                    Level::Warn,
                    format!("worker[{slot}] pid {pid} was killed by the master ({why})"),
                );
            }
            Life::Retiring => {
                let connections = served.accepted + served.taken_over;
                let text = format!(
                    "worker[{slot}] pid {pid} exited ({exit}) after {} on {}{}",
                    plural(served.requests, "request"),
                    plural(connections, "connection"),
                    match served.taken_over {
                        0 => String::new(),
                        n => format!(" ({n} taken over)"),
                    }
                );
                self.log_with(
                    Level::Info,
                    text,
                    vec![
                        ("slot", Field::Int(slot as i64)),
                        ("worker_pid", Field::Int(i64::from(pid.0))),
                        ("requests", Field::Int(served.requests as i64)),
                        ("connections", Field::Int(connections as i64)),
                        ("taken_over", Field::Int(served.taken_over as i64)),
                    ],
                );
            }
            _ if self.stopping.is_some() => {
                self.log(
                    Level::Info,
                    format!("worker[{slot}] pid {pid} exited ({exit})"),
                );
            }
            _ => {
                let oom = oom_rose && exit.is_kill();
                self.totals.count_restart(if oom {
                    "killed by the kernel's OOM killer"
                } else if exit.is_own_failure() {
                    "failed"
                } else {
                    "ended from outside"
                });
                self.note_unexpected_exit(&gone, exit, oom);
            }
        }
    }

    /// A worker died without being asked to: say so, and when it failed young by its
    /// own doing, make its slot wait longer before the next one (crash-loop backoff).
    fn note_unexpected_exit(&mut self, gone: &Worker, exit: Exit, oom: bool) {
        let (slot, pid) = (gone.slot, gone.pid);
        let lived = self.now.saturating_duration_since(gone.spawned_at);
        let delay = self.backoff.note_exit(slot, lived, exit, self.now);
        let line = match exit {
            _ if oom => format!(
                "worker[{slot}] pid {pid} was killed by the kernel's OOM killer (its memory cgroup's oom_kill count rose); respawning{}",
                if delay > Duration::ZERO {
                    format!(" in {} ms", delay.as_millis())
                } else {
                    " at once".to_string()
                }
            ),
            _ if delay > Duration::ZERO => format!(
                "worker[{slot}] pid {pid} exited unexpectedly ({exit}) {} ms after its start; respawning in {} ms",
                lived.as_millis(),
                delay.as_millis()
            ),
            Exit::Status(0) => {
                return self.log(
                    Level::Info,
                    format!(
                        "worker[{slot}] pid {pid} stopped on a signal sent to it, not by the master (exit status 0); respawning"
                    ),
                );
            }
            Exit::Signal(signal) if !exit.is_own_failure() => format!(
                "worker[{slot}] pid {pid} was killed by {signal} from outside raasd; respawning at once"
            ),
            _ => format!("worker[{slot}] pid {pid} exited unexpectedly ({exit}); respawning"),
        };
        self.log(Level::Error, line);
    }

    fn resize(&mut self, target: usize, why: &str) {
        if self.stopping.is_some() || target == self.target {
            return;
        }
        self.log_with(
            Level::Info,
            format!("{why}: workers: {} -> {target}", self.target),
            vec![
                ("cause", Field::Text(why.to_string())),
                ("workers_before", Field::Int(self.target as i64)),
                ("workers", Field::Int(target as i64)),
            ],
        );
        self.target = target;
        self.all_accepting_announced = false;
    }

    // ---- health ---------------------------------------------------------------

    /// Whether `w` has missed a beat (for the title, status and /livez).
    pub fn is_late(&self, w: &Worker) -> bool {
        health::is_late(
            w.beat_age_ms,
            self.since_heartbeats_due(),
            self.settings.timeout_secs * 1000,
            self.settings.heartbeat.as_millis() as u64,
        )
    }

    fn since_heartbeats_due(&self) -> u64 {
        self.heartbeats_due_from.map_or(u64::MAX, |from| {
            self.now.saturating_duration_since(from).as_millis() as u64
        })
    }

    /// Kills the workers unresponsive for the whole --timeout (once: the kill's
    /// effect is certain); reaping then respawns them.
    fn kill_lazy_workers(&mut self) {
        let since_last_pass = self.now.saturating_duration_since(self.last_pass);
        self.last_pass = self.now;
        let timeout_secs = self.settings.timeout_secs;
        if timeout_secs == 0 {
            return;
        }
        if since_last_pass > Duration::from_secs(timeout_secs) {
            // The master itself did not run for a while (stopped, the whole tree frozen,
            // the machine suspended): the workers may not have run either.
            self.log(
                Level::Info,
                format!(
                    "the master was held up {} ms; giving every worker {timeout_secs}s to beat",
                    since_last_pass.as_millis()
                ),
            );
            self.heartbeats_due_from = Some(self.now);
            return;
        }
        let grace = self.since_heartbeats_due();
        let beat_ms = self.settings.heartbeat.as_millis() as u64;
        let lazy: Vec<(Pid, u64)> = self
            .workers
            .iter()
            .filter(|w| !matches!(w.life, Life::Killed(_)))
            .filter(|w| health::is_lazy(w.beat_age_ms, grace, timeout_secs * 1000, beat_ms))
            .map(|w| (w.pid, w.beat_age_ms))
            .collect();
        for (pid, age_ms) in lazy {
            let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
                continue;
            };
            w.life = Life::Killed("no heartbeat within --timeout");
            let line = format!(
                "worker[{}] pid {pid} missed its heartbeat: last beat {age_ms} ms ago (timeout {timeout_secs}s); killing it",
                w.slot
            );
            self.log(Level::Warn, line);
            self.out.push(Action::Kill(pid));
        }
    }

    /// --max-worker-memory: every [`MEMORY_SAMPLE`], asks for the workers' memory.
    fn sample_memory(&mut self) {
        if self.stopping.is_some()
            || self.settings.max_worker_memory == 0
            || self.now < self.next_memory_sample
        {
            return;
        }
        self.next_memory_sample = self.now + MEMORY_SAMPLE;
        let pids = self.workers.iter().map(|w| w.pid).collect();
        self.out.push(Action::SampleMemory(pids));
    }

    /// A worker over --max-worker-memory is replaced gracefully.
    fn replace_bloated(&mut self, usage: &[(Pid, u64)]) {
        let limit_mib = self.settings.max_worker_memory;
        if self.stopping.is_some() || limit_mib == 0 {
            return;
        }
        for &(pid, bytes) in usage {
            let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
                continue;
            };
            if bytes <= limit_mib * 1024 * 1024
                || !matches!(w.life, Life::Starting | Life::Accepting)
            {
                continue;
            }
            w.life = Life::Replacing;
            let line = format!(
                "worker[{}] pid {pid} uses {} MiB (limit {limit_mib} MiB); replacing it",
                w.slot,
                bytes / (1024 * 1024),
            );
            self.log(Level::Info, line);
        }
    }

    /// systemd's watchdog hears from the master while its loop runs and every
    /// worker of the current generation beats in time: a master that hangs, or whose
    /// workers all wedge, is restarted by systemd (WatchdogSec=).
    fn tend_watchdog(&mut self) {
        let Some(every) = self.facts.watchdog else {
            return;
        };
        if self.now < self.watchdog_next || self.stopping.is_some() {
            return;
        }
        let healthy = self
            .workers
            .iter()
            .filter(|w| w.is_current(self.generation))
            .all(|w| !self.is_late(w));
        if healthy {
            self.out.push(Action::Notify(Notice::Watchdog));
        }
        self.watchdog_next = self.now + every;
    }

    // ---- reload and upgrade -------------------------------------------------

    /// HUP: the shell re-reads the configuration; [`Supervisor::reloaded`] rotates
    /// the workers onto it.
    fn reload(&mut self, asked_by: Option<Client>) {
        if self.stopping.is_some() {
            if let Some(client) = asked_by {
                self.reply(
                    client,
                    Reply::Failed("reload failed, nothing changed: the server is stopping".into()),
                );
            }
            return;
        }
        self.out.push(Action::Notify(Notice::Reloading));
        self.systemd_ready = false;
        self.out.push(Action::Reload { asked_by });
    }

    fn reloaded(&mut self, asked_by: Option<Client>, outcome: Result<Settings, String>) {
        match outcome {
            Ok(settings) => {
                self.target = settings.workers;
                self.settings = settings;
                self.log(Level::Info, "configuration reloaded");
                // A fresh generation replaces the current one, slot by slot.
                self.generation += 1;
                self.all_accepting_announced = false;
                let line = format!("rotating workers: generation {} starting", self.generation);
                self.log(Level::Info, line);
                if let Some(client) = asked_by {
                    let generation = self.generation;
                    self.reply(
                        client,
                        Reply::Done(json!({ "ok": true, "generation": generation })),
                    );
                }
            }
            Err(why) => {
                self.log(
                    Level::Error,
                    format!("reload failed, the running configuration stays: {why}"),
                );
                self.all_accepting_announced = false;
                if let Some(client) = asked_by {
                    self.reply(
                        client,
                        Reply::Failed(format!("reload failed, nothing changed: {why}")),
                    );
                }
            }
        }
    }

    /// USR2: the shell starts the binary installed at our path as a new master.
    /// It takes over once ready; if it fails, nothing changes here.
    fn start_upgrade(&mut self, asked_by: Option<Client>) {
        if let Some(client) = asked_by {
            // Answered when the new master is ready or the upgrade rolled back.
            self.out.push(Action::AwaitUpgrade(client));
        }
        if self.stopping.is_some() || self.upgrade != Upgrade::Idle || self.predecessor {
            self.log(
                Level::Warn,
                "upgrade refused: an upgrade or a stop is already under way",
            );
            if let Some(client) = asked_by {
                self.reply(
                    client,
                    Reply::Failed("an upgrade or a stop is already under way".into()),
                );
            }
            return;
        }
        if self.pid_file == PidFileState::Held {
            self.pid_file = PidFileState::Oldbin;
        }
        self.upgrade = Upgrade::Starting;
        self.out.push(Action::StartUpgrade {
            generation: self.generation + 1,
        });
    }

    /// The pid file could not become FILE.oldbin: nothing was started, nothing changed.
    fn upgrade_aborted(&mut self, why: &str) {
        self.upgrade = Upgrade::Idle;
        if self.pid_file == PidFileState::Oldbin {
            self.pid_file = PidFileState::Held;
        }
        self.log(Level::Error, format!("upgrade aborted: {why}"));
        self.out
            .push(Action::AnswerUpgradeWaiters(Reply::Failed(format!(
                "upgrade aborted: {why}"
            ))));
    }

    /// The successor is ready: it owns the sockets and the pid file now. Retire.
    fn hand_over(&mut self, takes_connections: bool) {
        let Upgrade::Waiting {
            successor, started, ..
        } = self.upgrade
        else {
            return;
        };
        let connections_follow = self.settings.handover && takes_connections;
        self.upgrade = Upgrade::HandedOver {
            connections_follow,
            successor,
        };
        self.out
            .push(Action::AnswerUpgradeWaiters(Reply::Done(json!({
                "ok": true,
                "upgrade": "handed over",
                "new_master": successor.0,
                "ready_after_ms": self.now.saturating_duration_since(started).as_millis() as u64,
                "connections": if connections_follow { "handed over" } else { "drained" },
            }))));
        // New clients go to the new master, which holds the same sockets.
        self.out.push(Action::CloseConsole {
            remove_files: false,
        });
        let how = if connections_follow {
            "handing the connections over to its workers"
        } else if self.settings.handover {
            "draining the connections (it does not take them: another hand-over format)"
        } else {
            "draining the connections (--handover off)"
        };
        self.log(
            Level::Info,
            format!("upgrade: new master pid {successor} is ready; retiring, {how}"),
        );
        // systemd (NotifyAccess=main) hears only the main pid: name the successor
        // and vouch for its readiness in one message, before leaving.
        self.out.push(Action::Notify(Notice::HandedTo(successor)));
        if self.pid_file != PidFileState::None {
            self.pid_file = PidFileState::None;
            self.out.push(Action::PidFile(PidFileStep::Remove));
        }
        self.stop(false, "hand-over");
    }

    fn roll_back(&mut self, why: &str) {
        if let Upgrade::Waiting { successor, .. } = self.upgrade {
            self.abandon(successor);
        }
        if matches!(self.upgrade, Upgrade::Waiting { .. } | Upgrade::Starting) {
            self.upgrade = Upgrade::Idle;
        }
        // The pid file first: whoever acts on the log line finds it back in place.
        if self.pid_file == PidFileState::Oldbin {
            self.pid_file = PidFileState::Held;
            self.out.push(Action::PidFile(PidFileStep::Back));
        }
        self.log(Level::Error, format!("upgrade failed, rolling back: {why}"));
        self.out
            .push(Action::AnswerUpgradeWaiters(Reply::Failed(format!(
                "rolled back: {why}"
            ))));
    }

    /// Ends a successor that will not take over, with everything it started (its
    /// process group): TERM now, KILL after [`ABANDON_GRACE`].
    fn abandon(&mut self, group: Pid) {
        self.out.push(Action::AbandonSuccessor(group));
        self.abandoned.push((group, self.now + ABANDON_GRACE));
    }

    fn end_abandoned(&mut self, exiting: bool) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.abandoned)
            .into_iter()
            .partition(|&(_, kill_at)| exiting || now >= kill_at);
        self.abandoned = later;
        for (group, _) in due {
            self.out.push(Action::EndAbandoned(group));
        }
    }

    /// After an upgrade: the old master's totals, when it exits, join ours.
    fn hear_farewell(&mut self, heard: Option<String>) {
        let Some(json) = heard else {
            return self.log(
                Level::Warn,
                "the old master exited without handing on its totals; they restart here",
            );
        };
        match serde_json::from_str::<Totals>(&json) {
            Ok(theirs) => {
                self.log(
                    Level::Info,
                    format!(
                        "the old master's totals carried on: {} on {}",
                        plural(theirs.requests, "request"),
                        plural(theirs.connections_accepted, "connection")
                    ),
                );
                self.totals.add(&theirs);
            }
            Err(e) => self.log(
                Level::Warn,
                format!("the old master's totals are unreadable ({e}): {json}"),
            ),
        }
    }

    /// Every slot accepts: tell whoever waits for it.
    fn announce_ready(&mut self) {
        if self.predecessor {
            self.predecessor = false;
            // The old master, still systemd's main pid, reports our readiness for us.
            self.systemd_ready = true;
            if self.facts.pid_file {
                self.pid_file = PidFileState::Held;
                self.out.push(Action::PidFile(PidFileStep::Write));
            }
            self.out.push(Action::TellPredecessorReady);
        }
        if !self.systemd_ready {
            self.systemd_ready = true;
            self.out.push(Action::Notify(Notice::Ready));
        }
    }

    // ---- stopping -------------------------------------------------------------

    /// A graceful stop, after --drain-delay: meanwhile /readyz fails and the workers
    /// keep accepting, so that load balancers stop sending before the sockets close.
    /// Asked again while draining, it stops at once.
    fn stop_after_draining(&mut self, why: &str) {
        let delay = self.settings.drain_delay;
        if delay.is_zero() || self.draining.is_some() || self.stopping.is_some() {
            self.draining = None;
            return self.stop(false, why);
        }
        self.log(
            Level::Info,
            format!(
                "{why}: draining for {}s (/readyz fails, the workers keep accepting), \
                 then a graceful stop",
                delay.as_secs()
            ),
        );
        self.draining = Some((self.now + delay, why.to_string()));
    }

    fn finish_draining(&mut self) {
        let Some((until, _)) = &self.draining else {
            return;
        };
        if self.stopping.is_some() {
            self.draining = None;
        } else if self.now >= *until
            && let Some((_, why)) = self.draining.take()
        {
            self.stop(false, &why);
        }
    }

    /// TERM/QUIT or a hand-over (graceful), INT (quick). A quick stop may follow a
    /// graceful one, not the other way round.
    fn stop(&mut self, quick: bool, why: &str) {
        if self.stopping.as_ref().is_some_and(|s| s.quick || !quick) {
            return;
        }
        let handed_over = matches!(self.upgrade, Upgrade::HandedOver { .. });
        let (order, timeout) = if quick {
            self.log_with(
                Level::Info,
                format!("{why}: quick stop"),
                vec![("cause", Field::Text(why.to_string()))],
            );
            (Order::QuickStop, QUICK_STOP_TIMEOUT)
        } else {
            let timeout = self.settings.graceful_timeout;
            self.log_with(
                Level::Info,
                format!(
                    "{why}: graceful stop, waiting up to {}s for workers",
                    timeout.as_secs()
                ),
                vec![
                    ("cause", Field::Text(why.to_string())),
                    ("timeout_s", Field::Int(timeout.as_secs() as i64)),
                ],
            );
            // After an upgrade to a master that takes connections, they move to its
            // workers; on any other stop they are served to their end.
            let order = match self.upgrade {
                Upgrade::HandedOver {
                    connections_follow: true,
                    ..
                } => Order::HandOver,
                _ => Order::GracefulStop,
            };
            (order, timeout)
        };
        for w in &mut self.workers {
            if !matches!(w.life, Life::Killed(_)) {
                w.life = Life::Retiring;
            }
            self.out.push(Action::Tell(w.pid, order));
        }
        if !handed_over {
            self.out.push(Action::Notify(Notice::Stopping));
        }
        if let Upgrade::Waiting { successor, .. } = self.upgrade {
            self.upgrade = Upgrade::Idle;
            self.log(
                Level::Info,
                format!("stopping: the upgrade to pid {successor} is abandoned"),
            );
            self.abandon(successor);
            self.out.push(Action::AnswerUpgradeWaiters(Reply::Failed(
                "abandoned: the server is stopping".into(),
            )));
        }
        // Our copies of the listen sockets go now: once the workers have drained the
        // accept queue and closed theirs, the port refuses connections. After a hand
        // over, the sockets (and their files) are the new master's.
        self.out.push(Action::CloseListeners {
            refuse_first: !handed_over && !self.facts.sockets_from_systemd,
        });
        // A quick stop after a graceful one never gives the workers longer.
        let deadline = match self.stopping {
            Some(graceful) => graceful.deadline.min(self.now + timeout),
            None => self.now + timeout,
        };
        self.stopping = Some(Stopping {
            quick,
            deadline,
            killed: false,
        });
    }

    fn kill_workers_past_deadline(&mut self) {
        let Some(stopping) = &mut self.stopping else {
            return;
        };
        if stopping.killed || self.now < stopping.deadline {
            return;
        }
        stopping.killed = true;
        let pids: Vec<(Pid, usize)> = self.workers.iter().map(|w| (w.pid, w.slot)).collect();
        for (pid, slot) in pids {
            self.log(
                Level::Warn,
                format!("worker[{slot}] pid {pid} did not stop in time; killing it"),
            );
            self.out.push(Action::Kill(pid));
        }
        for w in &mut self.workers {
            w.life = Life::Killed("not stopped within --graceful-timeout");
        }
    }

    /// Every worker is gone: close what is ours, hand on what is the successor's.
    fn exit(&mut self) {
        self.end_abandoned(true);
        let handed_over = matches!(self.upgrade, Upgrade::HandedOver { .. });
        if handed_over {
            self.out.push(Action::HandOnTotals(self.totals.clone()));
        }
        self.out.push(Action::FlushConsole);
        self.out.push(Action::CloseConsole {
            remove_files: !handed_over,
        });
        if self.pid_file != PidFileState::None {
            self.pid_file = PidFileState::None;
            self.out.push(Action::PidFile(PidFileStep::Remove));
        }
        self.log(Level::Info, "exiting");
        self.out.push(Action::Exit(0));
        self.exit_code = Some(0);
    }

    // ---- output -----------------------------------------------------------------

    fn log(&mut self, level: Level, text: impl Into<String>) {
        self.log_with(level, text.into(), Vec::new());
    }

    fn log_with(&mut self, level: Level, text: String, fields: Vec<(&'static str, Field)>) {
        self.out.push(Action::Log(Line {
            level,
            text,
            fields,
        }));
    }

    fn reply(&mut self, client: Client, reply: Reply) {
        self.out.push(Action::Reply(client, reply));
    }

    // ---- the read-only view -------------------------------------------------

    /// When the loop must look again at the latest, if nothing wakes it sooner.
    pub fn wake_at(&self) -> Option<Instant> {
        let now = self.now;
        let abandoned = self.abandoned.iter().map(|&(_, kill_at)| kill_at).min();
        match &self.stopping {
            Some(s) if !s.killed => Some(abandoned.map_or(s.deadline, |at| at.min(s.deadline))),
            Some(_) => abandoned,
            None => {
                let upgrade_deadline = match self.upgrade {
                    Upgrade::Waiting { deadline, .. } => Some(deadline),
                    _ => None,
                };
                let checks = [
                    self.fork_retry_at,
                    self.backoff.next_respawn(now),
                    (self.settings.timeout_secs > 0).then(|| now + self.settings.heartbeat),
                    (self.settings.max_worker_memory > 0).then_some(self.next_memory_sample),
                    upgrade_deadline,
                    self.draining.as_ref().map(|(until, _)| *until),
                    abandoned,
                    self.facts.watchdog.map(|_| self.watchdog_next),
                    (!self.all_accepting_announced || self.backoff.any()).then(|| now + SETTLING),
                ];
                checks.into_iter().flatten().min()
            }
        }
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn worker(&self, pid: Pid) -> Option<&Worker> {
        self.workers.iter().find(|w| w.pid == pid)
    }

    /// The slots now: accepting, or late with their heartbeat.
    pub fn census(&self) -> Census {
        workers::census(&self.workers, self.target, self.generation, |w| {
            self.is_late(w)
        })
    }

    pub fn phase(&self) -> Phase {
        Phase::of(
            self.upgrade_step(),
            (self.draining.is_some(), self.stopping.is_some()),
            self.census(),
            self.target,
        )
    }

    fn upgrade_step(&self) -> UpgradeStep {
        match self.upgrade {
            Upgrade::Idle => UpgradeStep::Idle,
            Upgrade::Starting | Upgrade::Waiting { .. } => UpgradeStep::Waiting,
            Upgrade::HandedOver { .. } => UpgradeStep::HandedOver,
        }
    }

    /// A worker's state word in `status`.
    pub fn state_of(&self, w: &Worker) -> &'static str {
        match w.life {
            Life::Starting => "starting",
            Life::Accepting if self.is_late(w) => "late",
            Life::Accepting => "accepting",
            Life::Replacing => "replacing",
            Life::Retiring => "retiring",
            Life::Killed(_) => "killed",
        }
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn target(&self) -> usize {
        self.target
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    pub fn stopping(&self) -> Option<Stopping> {
        self.stopping
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    pub fn upgrade(&self) -> Upgrade {
        self.upgrade
    }

    /// The exit status, once the supervisor said to exit.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// When `slot` may next get a worker, if it is held back (crash loop or a
    /// failed fork).
    pub fn held_back_until(&self, slot: usize) -> Option<Instant> {
        let backoff = self.backoff.not_before(slot).filter(|&at| at > self.now);
        let fork = self.fork_retry_at.filter(|&at| at > self.now);
        backoff.into_iter().chain(fork).max()
    }
}

/// `1 request`, `2 requests`: the count and its noun as every log line says it
/// (`crate::logging` speaks through this one).
pub fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    pub fn settings() -> Settings {
        Settings {
            workers: 1,
            timeout_secs: 0,
            heartbeat: Duration::from_secs(1),
            max_requests: 0,
            max_requests_jitter: 0,
            max_worker_memory: 0,
            handover: true,
            drain_delay: Duration::ZERO,
            graceful_timeout: Duration::from_secs(30),
            upgrade_timeout: Duration::from_secs(30),
            sandbox: true,
        }
    }

    pub fn facts() -> Facts {
        Facts {
            generation: 1,
            predecessor: false,
            pid_file: true,
            sockets_from_systemd: false,
            watchdog: None,
            cells: 8,
            max_workers: 4,
            seed: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn two_successors_abandoned_within_the_grace_both_get_their_kill() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut core = Supervisor::new(settings(), facts(), t0);
        for (n, (started, failed)) in [(100, 200), (1_000, 1_100)].into_iter().enumerate() {
            let successor = Pid(500 + n as i32);
            let actions = core.handle(Event::Signal(Signal::Usr2, 1), at(started));
            assert!(actions.contains(&Action::StartUpgrade { generation: 2 }));
            core.handle(Event::SuccessorStarted(successor), at(started));
            let actions = core.handle(Event::SuccessorFailed(None), at(failed));
            assert!(actions.contains(&Action::AbandonSuccessor(successor)));
        }
        let mut ended = Vec::new();
        for ms in (1_200..6_000).step_by(100) {
            ended.extend(
                core.handle(Event::Tick, at(ms))
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::EndAbandoned(group) => Some((group, ms)),
                        _ => None,
                    }),
            );
        }
        assert_eq!(ended, [(Pid(500), 3_200), (Pid(501), 4_100)]);
    }
}

#[cfg(test)]
mod stop_tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn a_quick_stop_after_a_graceful_one_never_moves_the_deadline_later() {
        let t0 = Instant::now();
        let mut core = Supervisor::new(settings(), facts(), t0);
        core.handle(Event::Tick, t0);
        core.handle(Event::Spawned(Pid(10)), t0);
        core.handle(Event::Signal(Signal::Term, 1), t0);
        let graceful = core.stopping().expect("stopping").deadline;
        let late = graceful - Duration::from_millis(500);
        core.handle(Event::Signal(Signal::Int, 1), late);
        let stop = core.stopping().expect("stopping");
        assert!(stop.quick);
        assert_eq!(stop.deadline, graceful, "INT must not give workers longer");
    }

    #[test]
    fn a_stop_wakes_for_an_abandoned_successors_kill() {
        let t0 = Instant::now();
        let mut core = Supervisor::new(settings(), facts(), t0);
        core.handle(Event::Signal(Signal::Usr2, 1), t0);
        core.handle(Event::SuccessorStarted(Pid(500)), t0);
        core.handle(Event::Tick, t0);
        core.handle(Event::Spawned(Pid(10)), t0);
        core.handle(Event::Signal(Signal::Term, 1), t0);
        assert_eq!(core.wake_at(), Some(t0 + ABANDON_GRACE));
    }

    #[test]
    fn a_successors_word_after_the_upgrade_ended_changes_nothing() {
        let t0 = Instant::now();
        let mut core = Supervisor::new(settings(), facts(), t0);
        assert!(core.handle(Event::SuccessorFailed(None), t0).is_empty());
        let ready = Event::SuccessorReady {
            takes_connections: true,
        };
        assert!(core.handle(ready, t0).is_empty());
        assert_eq!(core.upgrade(), Upgrade::Idle);
    }
}

#[cfg(test)]
mod pass_tests {
    use super::tests_support::*;
    use super::*;

    /// Feeds `event`, answering every fork at once as the shell does (pids from
    /// `next_pid`); returns every action in the order carried out.
    fn feed(core: &mut Supervisor, event: Event, now: Instant, next_pid: &mut i32) -> Vec<Action> {
        let mut done = Vec::new();
        let mut queue: std::collections::VecDeque<Action> = core.handle(event, now).into();
        while let Some(action) = queue.pop_front() {
            let answer = match action {
                Action::Spawn { .. } => {
                    *next_pid += 1;
                    Some(Event::Spawned(Pid(*next_pid)))
                }
                _ => None,
            };
            done.push(action);
            if let Some(answer) = answer {
                for a in core.handle(answer, now).into_iter().rev() {
                    queue.push_front(a);
                }
            }
        }
        done
    }

    fn spawned_slots(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_worker_killed_for_its_heartbeat_is_replaced_at_the_next_pass_not_amid_this_one() {
        let t0 = Instant::now();
        let mut core = Supervisor::new(
            Settings {
                workers: 1,
                timeout_secs: 2,
                heartbeat: Duration::from_millis(500),
                ..settings()
            },
            facts(),
            t0,
        );
        let mut pid = 100;
        feed(&mut core, Event::Tick, t0, &mut pid);
        core.handle(Event::Said(Pid(101), Said::Ready), t0);
        // It stops beating; the master passes every half second.
        for half in 1..6 {
            let at = t0 + Duration::from_millis(500 * half);
            core.handle(Event::Beats(vec![(Pid(101), 500 * half)]), at);
            let actions = feed(&mut core, Event::Tick, at, &mut pid);
            assert!(!actions.contains(&Action::Kill(Pid(101))), "{half}");
        }
        let later = t0 + Duration::from_secs(3);
        core.handle(Event::Signal(Signal::Ttin, 1), later);
        core.handle(Event::Beats(vec![(Pid(101), 3_000)]), later);
        let actions = feed(&mut core, Event::Tick, later, &mut pid);
        assert!(actions.contains(&Action::Kill(Pid(101))));
        assert_eq!(
            spawned_slots(&actions),
            [1],
            "slot 0's replacement waits for the kill's exit: {actions:#?}"
        );
        let text: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(line) => Some(line.text.as_str()),
                _ => None,
            })
            .collect();
        let spawned = text.iter().position(|t| t.starts_with("spawned worker[1]"));
        let killed = text.iter().position(|t| t.contains("missed its heartbeat"));
        assert!(spawned < killed, "the pass spawns, then kills: {text:#?}");
    }

    #[test]
    fn a_slot_respawned_after_a_crash_loop_does_not_keep_the_loop_awake() {
        let t0 = Instant::now();
        let mut core = Supervisor::new(settings(), facts(), t0);
        let mut pid = 100;
        feed(&mut core, Event::Tick, t0, &mut pid);
        let young = t0 + Duration::from_millis(10);
        core.handle(
            Event::ChildExited(Exited {
                pid: Pid(101),
                exit: Exit::Status(1),
                oom_rose: false,
                served: Served::default(),
                said: None,
            }),
            young,
        );
        let after = young + Duration::from_millis(150);
        let actions = feed(&mut core, Event::Tick, after, &mut pid);
        assert_eq!(spawned_slots(&actions), [0]);
        let wake = core.wake_at().expect("a wake-up while the slot settles");
        assert!(
            wake > after,
            "woken at once, again and again: {wake:?} <= {after:?}"
        );
    }
}
