//! The master process: binds, forks workers, then only supervises.
//!
//! Owns the worker slots and every decision about workers: how many, which
//! generation, when to spawn, retire, respawn or kill them. It never reads a client
//! byte. Each pass of `Master::supervise` reads as the story of a supervisor: take
//! the signals, reap the dead, bring the workers to what is wanted, kill those stuck
//! or past their deadline, then sleep until a signal or a worker's message arrives.
//!
//! This file holds the loop and the workers' life cycle; the submodules hold the
//! operations the loop dispatches to: `reload` (HUP, USR1), `handover` (USR2: the
//! binary upgrade's policy) and `health` (heartbeats, crash-loop backoff, recycling).
//!
//! Workers are told what to do through their control channel, never by signal, so
//! ordering and delivery are certain. A slot keeps its number across respawns and
//! rotations; during a rotation (HUP) a slot briefly has an old and a new worker, and
//! the old one is retired only once the new one reports that it is accepting.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use sd_notify::NotifyState;

use crate::accept_gate::Nudge;
use crate::config::{self, Config, MAX_WORKERS};
use crate::console::{Console, Totals};
use crate::control::{self, Command, MasterEnd, Report};
use crate::handoff::{self, Queue};
use crate::listeners::{self, Configured, Inheritance};
use crate::pidfile::{self, PidFile};
use crate::privileges::{self, Identity};
use crate::process::{self, Blocked, Forked};
use crate::scoreboard::{CELLS, Scoreboard};
use crate::signals::{self, SignalSet};
use crate::upgrade::{self, Predecessor};
use crate::worker::Who;
use crate::{logging, title, worker};

mod handover;
mod health;
mod oom;
mod reload;
mod steering;
mod workers;

use handover::Upgrade;
use health::{Exit, Health};
use workers::{Life, WorkerProcess};

/// The signals the master handles; see the table in README.md and raasd(8).
const SIGNALS_HANDLED: [libc::c_int; 10] = [
    libc::SIGTERM,
    libc::SIGQUIT,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCHLD,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// How long a quick stop waits for workers to exit before it kills them.
const QUICK_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed fork, how long before trying again.
const FORK_RETRY: Duration = Duration::from_secs(1);

/// Starts raasd with `config`; `args` are the original arguments. Returns the exit
/// status: 0 after a stop, 1 when start-up failed.
pub fn run(config: Config, args: Vec<OsString>) -> i32 {
    logging::set_format(&config.log_format);
    if let Err(e) = logging::init(config.log_level, config.log_file.as_deref()) {
        eprintln!("raasd: {e}");
        return 1;
    }
    if let Some(Err(e)) = config.access_log.as_deref().map(logging::open_access_log) {
        eprintln!("raasd: {}", e.replace("log file", "access log"));
        return 1;
    }
    let mut predecessor = match Predecessor::from_environment() {
        Ok(predecessor) => predecessor,
        Err(message) => {
            eprintln!("raasd: {message}");
            return 1;
        }
    };
    match Master::start(config, args, &mut predecessor) {
        Ok(master) => master.supervise(),
        Err(error) => {
            eprintln!("raasd: {error}");
            if let Some(predecessor) = predecessor {
                predecessor.announce_failure(&error.to_string());
            }
            1
        }
    }
}

/// Why the master could not start: each a one-line message in `Display`, worded for
/// the operator (`cannot listen on 127.0.0.1:2200: address already in use`).
#[derive(Debug)]
pub enum StartError {
    /// A listen socket could not be bound.
    Listen(listeners::BindError),
    /// Descriptors handed over (by a previous master or systemd) are unusable.
    Inherited(String),
    /// The pid file names a running raasd, or cannot be written.
    PidFile(String),
    /// --user or --group cannot be used.
    Privileges(String),
    /// The control socket or the metrics port cannot be opened.
    Console(String),
    /// Anything else the start needs (the binary's path, the working directory, the
    /// scoreboard, signal handlers, an eventfd).
    Setup(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Listen(e) => write!(f, "{e}"),
            StartError::Inherited(m)
            | StartError::PidFile(m)
            | StartError::Privileges(m)
            | StartError::Console(m)
            | StartError::Setup(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StartError {}

impl From<String> for StartError {
    fn from(message: String) -> StartError {
        StartError::Setup(message)
    }
}

/// How a master was started.
struct Origin {
    /// The command line as given, kept for a reload and a re-exec (the title
    /// overwrote argv).
    args: Vec<OsString>,
    /// The binary this master was started from, resolved at start: USR2 executes
    /// whatever is installed at that path then.
    exe: PathBuf,
    /// Where a new master of an upgrade starts: --working-directory, else the
    /// directory raasd was started in, as the operator named it.
    start_dir: PathBuf,
}

/// What systemd has heard, and its watchdog.
struct Systemd {
    /// READY=1 has been sent for the current configuration.
    ready: bool,
    /// WATCHDOG_USEC: how often to ping, and when next.
    watchdog: Option<(Duration, Instant)>,
}

/// What every worker inherits to coordinate with its siblings.
struct Coordination {
    /// Wakes one worker to take the rest of a burst (see [`crate::accept_gate`]).
    /// Taken by a worker after fork.
    nudge: Option<Nudge>,
    /// Where retiring workers hand their connections over (None with --handover
    /// off).
    handoff: Option<Queue>,
}

/// The master's process title.
struct Title {
    /// --name (kept for the life of the process: workers' titles borrow it).
    name: Option<&'static str>,
    /// The text shown, rewritten only when it changes.
    shown: String,
}

struct Stopping {
    quick: bool,
    deadline: Instant,
    killed: bool,
}

pub struct Master {
    config: Config,
    /// How this master was started: what a reload re-reads, an upgrade re-executes.
    origin: Origin,
    listeners: Vec<Configured>,
    /// Socket activation fixes the listeners: reloads leave them alone.
    inheritance: Inheritance,
    /// The binary upgrade this master is in, as the old master.
    upgrade: Upgrade,
    /// This master was started by USR2: the old master waits to hear it is ready.
    predecessor: Option<Predecessor>,
    /// Once ready after an upgrade: where the old master's totals will come from.
    farewell: Option<upgrade::Farewell>,
    /// A graceful stop asked for, waiting out --drain-delay: until when, and who asked.
    draining: Option<(Instant, String)>,
    /// A successor given up on, whose process group is being ended.
    abandoned: Option<handover::Abandoned>,
    systemd: Systemd,
    addresses: Vec<String>,
    signals: Option<SignalSet>,
    pid_file: Option<PidFile>,
    workers: Vec<WorkerProcess>,
    /// What the workers share to coordinate among themselves.
    coordination: Coordination,
    /// The control socket and the metrics endpoint.
    console: Console,
    /// When this master started (seconds since the epoch).
    started_at: u64,
    /// What workers gone since the master started had done, and why workers were
    /// replaced: with the live workers' counters, the totals of `status`.
    totals: Totals,
    /// How many worker slots are wanted.
    target: usize,
    /// Raised by each rotation; workers of older generations are retired.
    generation: u64,
    stopping: Option<Stopping>,
    all_accepting_announced: bool,
    fork_retry_at: Option<Instant>,
    scoreboard: Scoreboard,
    identity: Option<Identity>,
    health: Health,
    /// Workers whose control channel woke the master: their reports are read next.
    woken: Vec<Pid>,
    title: Title,
}

impl Master {
    /// `predecessor` is taken only once the start has succeeded.
    fn start(
        config: Config,
        args: Vec<OsString>,
        predecessor: &mut Option<Predecessor>,
    ) -> Result<Master, StartError> {
        // Inherited descriptors first, before anything else is opened, each by exactly
        // one owner; then the variables that named them go.
        let (inheritance, mut inherited) =
            match upgrade::inherited_listeners().map_err(StartError::Inherited)? {
                Some((true, adopted)) => (Inheritance::Systemd, adopted),
                Some((false, adopted)) => (Inheritance::Upgrade, adopted),
                None => match listeners::systemd_sockets().map_err(StartError::Inherited)? {
                    adopted if adopted.is_empty() => (Inheritance::Nothing, adopted),
                    adopted => (Inheritance::Systemd, adopted),
                },
            };
        let generation = upgrade::starting_generation();
        let inherited_console = upgrade::inherited_console().map_err(StartError::Inherited)?;
        // The predecessor's hand-over queue, when it speaks our format: its retiring
        // workers hand their connections to ours through it.
        let inherited_queue = match std::env::var(handoff::ENV) {
            Ok(value) => Queue::inherited(&value).map_err(StartError::Inherited)?,
            Err(_) => None,
        };
        let handoff = match (config.handover, inherited_queue) {
            (false, _) => None,
            (true, Some(queue)) => Some(queue),
            (true, None) => {
                Some(Queue::new().map_err(|e| format!("cannot create the hand-over queue: {e}"))?)
            }
        };
        process::forget_environment(&upgrade::HANDED_OVER_VARIABLES);
        let launch_dir = upgrade::launch_directory()
            .map_err(|e| format!("cannot read the working directory: {e}"))?;
        // The config file by its full logical path: a reload reads it there whatever
        // the working directory, and through a switched `current` link.
        let args = config::with_absolute_config_path(args, &launch_dir);
        let start_dir = match &config.working_directory {
            Some(dir) => {
                std::env::set_current_dir(dir).map_err(|e| {
                    format!(
                        "cannot change into working directory {}: {}",
                        dir.display(),
                        crate::errors::plain(&e)
                    )
                })?;
                launch_dir.join(dir)
            }
            None => launch_dir.clone(),
        };
        raise_descriptor_limit();
        warn_if_descriptors_fall_short(&config);
        match (&config.pid, &predecessor) {
            (Some(path), None) => pidfile::check_not_running(path).map_err(StartError::PidFile)?,
            // Fail now, so that the old master rolls back, rather than serve without one.
            (Some(path), Some(_)) => PidFile::check_writable(path).map_err(StartError::PidFile)?,
            _ => {}
        }
        let exe = upgrade::binary_path(args.first().map(OsString::as_os_str), &launch_dir)
            .map_err(|e| format!("cannot find my own binary: {e}"))?;
        let identity = privileges::resolve(config.user.as_deref(), config.group.as_deref())
            .map_err(StartError::Privileges)?;
        let scoreboard =
            Scoreboard::new().map_err(|e| format!("cannot map the scoreboard: {e}"))?;
        let listeners = if inheritance == Inheritance::Systemd {
            info!(
                "socket activation: serving the {} sockets systemd passed; --listen is not used",
                inherited.len()
            );
            std::mem::take(&mut inherited)
        } else {
            listeners::open_all(&config.listen, config.backlog, &mut inherited)
                .map_err(StartError::Listen)?
        };
        for unused in inherited {
            info!("closing inherited {}: no longer configured", unused.addr);
        }
        let owned_files = |l: &[Configured]| {
            if inheritance == Inheritance::Nothing {
                listeners::remove_socket_files(l.iter().map(|c| &c.listener));
            }
        };
        if let Err(e) = listeners::set_socket_access(
            listeners.iter().map(|c| &c.listener),
            config.socket_mode,
            identity,
        ) {
            owned_files(&listeners);
            return Err(StartError::Setup(e));
        }
        if let Err(e) =
            listeners::set_keepalive(listeners.iter().map(|c| &c.listener), config.tcp_keepalive)
        {
            warn!("cannot set TCP keepalive on the listeners: {e}");
        }
        let signals = SignalSet::install(&SIGNALS_HANDLED).map_err(|e| {
            owned_files(&listeners);
            format!("cannot install signal handlers: {e}")
        })?;
        let health = Health::new(seed()).inspect_err(|_| owned_files(&listeners))?;
        let nudge = Nudge::new().map_err(|e| {
            owned_files(&listeners);
            format!("cannot create an eventfd: {e}")
        })?;
        let console = Console::open(
            config.control.as_deref(),
            config.metrics.as_deref(),
            inherited_console,
        )
        .inspect_err(|_| owned_files(&listeners))
        .map_err(StartError::Console)?;
        // The last thing that can fail, so that a failed start leaves no file behind.
        // A master started by an upgrade writes the pid file once it serves; until
        // then the file is the old master's (renamed .oldbin) and a rollback needs
        // the name free.
        let pid_file = match (&config.pid, &predecessor) {
            (Some(path), None) => match PidFile::write(path, std::process::id()) {
                Ok(file) => Some(file),
                Err(e) => {
                    owned_files(&listeners);
                    console.abandon();
                    return Err(StartError::PidFile(e));
                }
            },
            _ => None,
        };
        if let Err(e) = title::init() {
            warn!("process titles unavailable: {e}");
        }
        title::set_comm("raasd-master");
        let addresses: Vec<String> = listeners.iter().map(|c| c.listener.local_addr()).collect();
        // Once nothing can fail any more: a start-up error stays the only line.
        info!("raasd {} started", env!("CARGO_PKG_VERSION"));
        for address in &addresses {
            info!("listening on {address}");
        }
        warn_if_unconfined(&config);
        // Where to look: every endpoint and file an operator may want, said once.
        if let Some(path) = &config.control {
            info!("control socket at {} (raasd ctl)", path.display());
        }
        if let Some(addr) = &config.metrics {
            info!("metrics at http://{addr}/metrics, probes at /livez and /readyz");
        }
        if let Some(path) = &config.access_log {
            info!("access log at {}", path.display());
        }
        let name = leak_name(config.name.as_deref());
        let mut master = Master {
            scoreboard,
            identity,
            health,
            woken: Vec::new(),
            title: Title {
                name,
                shown: String::new(),
            },
            target: config.workers.resolve(),
            config,
            origin: Origin {
                args,
                exe,
                start_dir,
            },
            listeners,
            inheritance,
            upgrade: Upgrade::Idle,
            abandoned: None,
            predecessor: predecessor.take(),
            farewell: None,
            draining: None,
            systemd: Systemd {
                ready: false,
                watchdog: sd_notify::watchdog_enabled().map(|usec| (usec / 2, Instant::now())),
            },
            addresses,
            signals: Some(signals),
            pid_file,
            workers: Vec::new(),
            coordination: Coordination {
                nudge: Some(nudge),
                handoff,
            },
            console,
            started_at: epoch_seconds(),
            totals: Totals::default(),
            generation,
            stopping: None,
            all_accepting_announced: false,
            fork_retry_at: None,
        };
        master.show_title();
        Ok(master)
    }

    /// The master loop. Returns the exit status.
    fn supervise(mut self) -> i32 {
        loop {
            // Signals first: when a whole process group is signalled (Ctrl-C, systemd's
            // control-group stop), the workers' exits must be read as part of the stop.
            self.handle_signals();
            self.reap_all_workers();
            self.read_worker_reports();
            self.serve_console();
            if self.stopping.is_some() && self.workers.is_empty() {
                break;
            }
            self.follow_upgrade();
            self.hear_farewell();
            self.finish_draining();
            self.finish_abandoned_upgrade(false);
            self.maintain_worker_count();
            self.murder_lazy_workers();
            self.replace_bloated_workers();
            self.kill_workers_past_deadline();
            self.tend_watchdog();
            self.show_title();
            self.sleep_until_woken();
        }
        self.finish_abandoned_upgrade(true);
        self.hand_on_totals();
        self.console.flush();
        let handed_over = matches!(self.upgrade, Upgrade::HandedOver { .. });
        self.console.close_listeners(!handed_over);
        if let Some(pid_file) = &self.pid_file {
            pid_file.remove();
        }
        info!("exiting");
        0
    }

    /// Collects every exited child, so none stays a zombie.
    fn reap_all_workers(&mut self) {
        loop {
            let (pid, how) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Status(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, Exit::Signal(signal)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid: {e}");
                    return;
                }
            };
            if let Upgrade::Waiting { successor, .. } = &self.upgrade
                && successor.pid == pid
            {
                // What it said before exiting is the better reason.
                let why = match successor.readiness() {
                    upgrade::Readiness::Failed(Some(why)) => {
                        format!("the new master could not start: {why}")
                    }
                    _ => format!("the new master exited ({how})"),
                };
                self.roll_back_upgrade(&why);
                continue;
            }
            let Some(at) = self.workers.iter().position(|w| w.pid == pid) else {
                // A successor given up on (its readiness pipe closed first).
                info!("child pid {pid} exited ({how})");
                continue;
            };
            let gone = self.workers.swap_remove(at);
            let served = self.scoreboard.counters(gone.cell);
            self.scoreboard.release(gone.cell);
            self.totals.add_gone(&served.served());
            match gone.life {
                Life::Killed(why) => {
                    self.totals.count_restart("killed by the master");
                    warn!(
                        "worker[{}] pid {pid} was killed by the master ({why})",
                        gone.slot
                    )
                }
                Life::Retiring => info!(
                    slot = gone.slot, worker_pid = pid.as_raw(), requests = served.served,
                    connections = served.accepted + served.taken_over,
                    taken_over = served.taken_over;
                    "worker[{}] pid {pid} exited ({how}) after {} on {}{}",
                    gone.slot,
                    logging::plural(served.served, "request"),
                    logging::plural(served.accepted + served.taken_over, "connection"),
                    match served.taken_over {
                        0 => String::new(),
                        n => format!(" ({n} taken over)"),
                    }
                ),
                _ if self.stopping.is_some() => {
                    info!("worker[{}] pid {pid} exited ({how})", gone.slot)
                }
                _ => {
                    let oom = self.health.killed_by_oom(how);
                    self.totals.count_restart(if oom {
                        "killed by the kernel's OOM killer"
                    } else if how.is_own_failure() {
                        "failed"
                    } else {
                        "ended from outside"
                    });
                    self.note_unexpected_exit(&gone, how, oom)
                }
            }
        }
    }

    fn handle_signals(&mut self) {
        let Some(signals) = &self.signals else { return };
        for (signal, times) in signals.take() {
            debug!("received {} x{times}", signals::name(signal));
            match signal {
                libc::SIGTERM | libc::SIGQUIT => self.stop_after_draining(signals::name(signal)),
                libc::SIGINT => self.stop(true, signals::name(signal)),
                libc::SIGHUP => {
                    let _ = self.reload();
                }
                libc::SIGUSR2 => {
                    let _ = self.start_upgrade();
                }
                libc::SIGWINCH => self.drain_unless_on_a_terminal(),
                libc::SIGUSR1 => self.reopen_logs(),
                libc::SIGTTIN => self.resize(
                    self.target.saturating_add(times).min(MAX_WORKERS),
                    "SIGTTIN",
                ),
                libc::SIGTTOU => match self.target {
                    // Said, not dropped: the operator is left wondering otherwise.
                    0 => info!("SIGTTOU ignored: no workers (TTIN or HUP brings them back)"),
                    1 => info!("SIGTTOU ignored: 1 worker, the least TTOU leaves"),
                    n => self.resize(n.saturating_sub(times).max(1), "SIGTTOU"),
                },
                libc::SIGCHLD => {} // reaped at the top of the loop
                _ => {}
            }
        }
    }

    /// WINCH retires every worker, as in Unicorn and nginx, but only when the master
    /// runs detached: on a terminal the kernel sends WINCH to the foreground process
    /// group at every window resize, and a resize must not stop the service.
    fn drain_unless_on_a_terminal(&mut self) {
        if has_controlling_terminal() {
            info!(
                "SIGWINCH ignored: the master has a controlling terminal, where a window \
                 resize sends it (run raasd detached to drain workers with WINCH)"
            );
            return;
        }
        self.resize(0, "SIGWINCH");
    }

    fn resize(&mut self, target: usize, why: &str) {
        if self.stopping.is_some() || target == self.target {
            return;
        }
        info!(cause = why, workers_before = self.target, workers = target;
            "{why}: workers: {} -> {target}", self.target);
        self.target = target;
        self.all_accepting_announced = false;
        self.show_title();
    }

    /// Spawns what is missing, then retires what is surplus or replaced.
    fn maintain_worker_count(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        for slot in workers::slots_to_fill(&self.workers, self.target, self.generation) {
            if self.health.may_spawn(slot, now) && !self.spawn_worker(slot) {
                break;
            }
        }
        self.health
            .forget_backoff_of_healthy_slots(&self.workers, self.generation, now);
        let retiring = workers::to_retire(&self.workers, self.target, self.generation);
        let replaced: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| retiring.contains(&w.pid) && w.life == Life::Replacing)
            .map(|w| w.pid)
            .collect();
        for w in self
            .workers
            .iter_mut()
            .filter(|w| retiring.contains(&w.pid))
        {
            w.life = Life::Retiring;
        }
        // Connections move to the workers that stay, when there are any.
        let receivers = self.workers.iter().any(|w| w.life == Life::Accepting);
        let command = if receivers && self.config.handover && self.coordination.handoff.is_some() {
            Command::HandOver
        } else {
            Command::GracefulStop
        };
        for pid in retiring {
            let reason = match self.workers.iter().find(|w| w.pid == pid) {
                _ if replaced.contains(&pid) => "recycled",
                Some(w) if w.slot >= self.target => "resize",
                _ => "reload",
            };
            self.totals.count_restart(reason);
            self.retire(pid, &command);
        }
        let all_accepting = workers::all_accepting(&self.workers, self.target, self.generation);
        if all_accepting && !self.all_accepting_announced {
            self.all_accepting_announced = true;
            match self.target {
                1 => info!("1 worker accepting"),
                n => info!("all {n} workers accepting"),
            }
            self.announce_ready();
        }
    }

    fn retire(&mut self, pid: Pid, command: &Command) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            let how = match command {
                Command::HandOver => "handing its connections over",
                _ => "draining its connections",
            };
            info!("retiring worker[{}] pid {pid}, {how}", w.slot);
            w.life = Life::Retiring;
            if let Some(channel) = &w.channel {
                let _ = channel.send(command);
            }
        }
    }

    /// Forks a worker for `slot`; false when forking failed (retried later).
    fn spawn_worker(&mut self, slot: usize) -> bool {
        if self.fork_retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let Some(cell) = (0..CELLS).find(|&c| self.workers.iter().all(|w| w.cell != c)) else {
            error!("no free scoreboard cell for worker[{slot}]");
            return false;
        };
        self.scoreboard.claim(cell);
        let max_requests = self
            .health
            .next_max_requests(self.config.max_requests, self.config.max_requests_jitter);
        let who = Who {
            slot,
            generation: self.generation,
            master: nix::unistd::getpid(),
            name: self.title.name,
        };
        let forked = control::channel()
            .and_then(|(master_end, worker_end)| Ok((process::fork()?, master_end, worker_end)));
        match forked {
            Ok((Forked::Child(blocked), master_end, worker_end)) => {
                drop(master_end);
                self.become_worker(who, cell, max_requests, worker_end, blocked)
            }
            Ok((Forked::Parent(pid), channel, _worker_end)) => {
                info!(slot = slot, worker_pid = pid.as_raw(); "spawned worker[{slot}] pid {pid}");
                self.fork_retry_at = None;
                self.all_accepting_announced = false;
                self.workers.push(WorkerProcess {
                    pid,
                    slot,
                    generation: self.generation,
                    cell,
                    spawned_at: Instant::now(),
                    life: Life::Starting,
                    sandbox: self.config.sandbox,
                    channel: Some(channel),
                });
                true
            }
            Err(e) => {
                error!("cannot fork worker[{slot}]: {e}; retrying in {FORK_RETRY:?}");
                self.fork_retry_at = Some(Instant::now() + FORK_RETRY);
                false
            }
        }
    }

    /// In the child after fork: shed everything of the master's, then serve.
    fn become_worker(
        &mut self,
        who: Who,
        cell: usize,
        max_requests: Option<u64>,
        channel: control::WorkerEnd,
        blocked: Blocked,
    ) -> ! {
        let slot = who.slot;
        logging::become_worker(slot, who.generation);
        // Siblings' channels must close here, or a worker would keep the master's
        // end of another worker's channel open and hide the master's death from it.
        self.workers.clear();
        if let Some(signals) = self.signals.take() {
            signals.uninstall();
        }
        title::set(&format!(
            "raasd worker[{slot}]{} gen {}",
            title::name_part(self.title.name),
            self.generation
        ));
        title::set_comm("raasd-worker");
        if let Some(Err(e)) = self.identity.map(|identity| identity.assume()) {
            error!("cannot drop privileges: {e}");
            std::process::exit(1);
        }
        self.upgrade = Upgrade::Idle;
        self.predecessor = None;
        self.farewell = None;
        // The console is the master's: a worker must hold none of its sockets.
        self.console = Console::default();
        let listeners = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(|c| c.listener)
            .collect();
        let serving = crate::config::Serving {
            max_requests,
            ..self.config.serving()
        };
        let code = worker::run(
            who,
            listeners,
            (
                self.coordination.nudge.take().expect("the master's nudge"),
                self.coordination.handoff.take(),
            ),
            channel,
            serving,
            (&self.scoreboard, cell),
            blocked,
        );
        std::process::exit(code)
    }

    /// TERM/QUIT or a hand-over (graceful), INT (quick).
    /// A graceful stop, after --drain-delay: meanwhile /readyz fails and the workers
    /// keep accepting, so that load balancers stop sending before the sockets close.
    /// Asked again while draining, it stops at once.
    fn stop_after_draining(&mut self, why: &str) {
        let delay = self.config.drain_delay;
        if delay == 0 || self.draining.is_some() || self.stopping.is_some() {
            self.draining = None;
            self.stop(false, why);
            return;
        }
        info!(
            "{why}: draining for {delay}s (/readyz fails, the workers keep accepting), \
             then a graceful stop"
        );
        self.draining = Some((Instant::now() + Duration::from_secs(delay), why.to_string()));
        self.title.shown.clear();
    }

    /// The drain delay is over: the graceful stop proceeds.
    fn finish_draining(&mut self) {
        let Some((until, _)) = &self.draining else {
            return;
        };
        if self.stopping.is_some() {
            self.draining = None;
        } else if Instant::now() >= *until
            && let Some((_, why)) = self.draining.take()
        {
            self.stop(false, &why);
        }
    }

    fn stop(&mut self, quick: bool, why: &str) {
        if self.stopping.as_ref().is_some_and(|s| s.quick || !quick) {
            return;
        }
        let (command, timeout) = if quick {
            info!(cause = why; "{why}: quick stop");
            (Command::QuickStop, QUICK_STOP_TIMEOUT)
        } else {
            let timeout = self.config.graceful_timeout();
            info!(
                cause = why, timeout_s = timeout.as_secs();
                "{}: graceful stop, waiting up to {}s for workers",
                why,
                timeout.as_secs()
            );
            // After an upgrade to a master that takes connections, they move to its
            // workers; on any other stop they are served to their end.
            match self.upgrade {
                Upgrade::HandedOver {
                    connections_follow: true,
                    ..
                } => (Command::HandOver, timeout),
                _ => (Command::GracefulStop, timeout),
            }
        };
        for w in &mut self.workers {
            if !matches!(w.life, Life::Killed(_)) {
                w.life = Life::Retiring;
            }
            if let Some(channel) = &w.channel {
                let _ = channel.send(&command);
            }
        }
        let handing_over = matches!(self.upgrade, Upgrade::HandedOver { .. });
        if !handing_over {
            notify_systemd(&[NotifyState::Stopping]);
        }
        if matches!(self.upgrade, Upgrade::Waiting { .. })
            && let Upgrade::Waiting { successor, .. } =
                std::mem::replace(&mut self.upgrade, Upgrade::Idle)
        {
            info!(
                "stopping: the upgrade to pid {} is abandoned",
                successor.pid
            );
            self.abandon(successor.pid);
            self.answer_upgrade_waiters(&crate::console::error_reply(
                "abandoned: the server is stopping",
            ));
        }
        // Our copies of the listen sockets go now: once the workers have drained the
        // accept queue and closed theirs, the port refuses connections. After a hand
        // over, the sockets (and their files) are the new master's.
        if !handing_over && self.inheritance != Inheritance::Systemd {
            listeners::remove_socket_files(self.listeners.iter().map(|c| &c.listener));
            if let Err(e) =
                listeners::refuse_new_connections(self.listeners.iter().map(|c| &c.listener))
            {
                warn!("cannot stop taking new connections before the drain: {e}");
            }
        }
        self.listeners.clear();
        self.stopping = Some(Stopping {
            quick,
            deadline: Instant::now() + timeout,
            killed: false,
        });
    }

    fn kill_workers_past_deadline(&mut self) {
        let Some(stopping) = &mut self.stopping else {
            return;
        };
        if stopping.killed || Instant::now() < stopping.deadline {
            return;
        }
        stopping.killed = true;
        for w in &mut self.workers {
            warn!(
                "worker[{}] pid {} did not stop in time; killing it",
                w.slot, w.pid
            );
            w.life = Life::Killed("not stopped within --graceful-timeout");
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    /// systemd's watchdog hears from the master while its loop runs and every
    /// worker of the current generation beats in time: a master that hangs, or whose
    /// workers all wedge, is restarted by systemd (WatchdogSec=).
    fn tend_watchdog(&mut self) {
        let Some((every, next)) = self.systemd.watchdog else {
            return;
        };
        let now = Instant::now();
        if now < next || self.stopping.is_some() {
            return;
        }
        let healthy = self
            .workers
            .iter()
            .filter(|w| w.is_current(self.generation))
            .all(|w| !self.is_late(w));
        if healthy {
            notify_systemd(&[NotifyState::Watchdog]);
        }
        self.systemd.watchdog = Some((every, now + every));
    }

    /// Waits for a signal, a worker's message or the next deadline; notes whose
    /// channel woke it.
    fn sleep_until_woken(&mut self) {
        let now = Instant::now();
        let deadline = match &self.stopping {
            Some(s) if !s.killed => Some(
                s.deadline
                    .min(self.console.next_deadline().unwrap_or(s.deadline)),
            ),
            Some(_) => self.console.next_deadline(),
            None => {
                let checks = [
                    self.fork_retry_at,
                    self.health.next_respawn(),
                    (self.config.timeout > 0).then(|| now + self.config.serving().heartbeat),
                    (self.config.max_worker_memory > 0).then(|| self.health.next_memory_sample()),
                    self.upgrade.deadline(),
                    self.draining.as_ref().map(|(until, _)| *until),
                    self.abandoned.as_ref().map(|a| a.kill_at),
                    self.console.next_deadline(),
                    self.systemd.watchdog.map(|(_, next)| next),
                    (!self.all_accepting_announced || self.health.is_backing_off())
                        .then(|| now + Duration::from_secs(1)),
                ];
                checks.into_iter().flatten().min()
            }
        };
        let timeout = match deadline {
            Some(at) => {
                let millis = at.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1;
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::NONE)
            }
            None => PollTimeout::NONE,
        };
        let Some(signals) = &self.signals else { return };
        let listening: Vec<(Pid, &MasterEnd)> = self
            .workers
            .iter()
            .filter_map(|w| Some((w.pid, w.channel.as_ref()?)))
            .collect();
        let mut fds = Vec::with_capacity(listening.len() + 2);
        fds.push(PollFd::new(signals.fd(), PollFlags::POLLIN));
        if let Upgrade::Waiting { successor, .. } = &self.upgrade {
            fds.push(PollFd::new(successor.fd(), PollFlags::POLLIN));
        }
        if let Some(farewell) = &self.farewell {
            fds.push(PollFd::new(farewell.fd(), PollFlags::POLLIN));
        }
        let interests = self.console.interests();
        for interest in &interests {
            let flags = if interest.writable {
                PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            fds.push(PollFd::new(interest.fd, flags));
        }
        let first_worker = fds.len();
        fds.extend(
            listening
                .iter()
                .map(|(_, channel)| PollFd::new(channel.as_fd(), PollFlags::POLLIN)),
        );
        if let Err(e) = poll(&mut fds, timeout) {
            if e != Errno::EINTR {
                error!("poll: {e}");
            }
            return;
        }
        self.woken = fds[first_worker..]
            .iter()
            .zip(&listening)
            .filter(|(fd, _)| fd.any().unwrap_or(false))
            .map(|(_, (pid, _))| *pid)
            .collect();
    }

    /// Takes the reports of the workers whose channel woke the master: ready
    /// (accepting), replace me (--max-requests), or the end of the channel.
    fn read_worker_reports(&mut self) {
        for pid in std::mem::take(&mut self.woken) {
            let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
                continue;
            };
            let Some(channel) = &w.channel else {
                continue;
            };
            let received = channel.receive();
            for report in received.messages {
                match (report, w.life) {
                    (Report::Ready, Life::Starting) => {
                        w.life = Life::Accepting;
                        debug!("worker[{}] pid {} accepting", w.slot, w.pid);
                    }
                    (Report::ReplaceMe, Life::Starting | Life::Accepting) => {
                        info!(
                            "worker[{}] pid {} reached --max-requests; replacing it",
                            w.slot, w.pid
                        );
                        w.life = Life::Replacing;
                    }
                    _ => {}
                }
            }
            if received.closed {
                w.channel = None;
            }
        }
    }

    /// The slots now: accepting, or late with their heartbeat.
    fn census(&self) -> workers::Census {
        workers::census(&self.workers, self.target, self.generation, |w| {
            self.is_late(w)
        })
    }

    /// `raasd master gen 2 -w 3 127.0.0.1:2200: 3/3 workers`, rewritten only when it changes.
    fn show_title(&mut self) {
        let workers::Census { accepting, late } = self.census();
        let late = if late > 0 {
            format!(", {late} late")
        } else {
            String::new()
        };
        let state = if !matches!(self.upgrade, Upgrade::Idle) {
            " (old)"
        } else if self.stopping.is_some() {
            " (stopping)"
        } else if self.draining.is_some() {
            " (draining)"
        } else {
            ""
        };
        // Counters before addresses: a short argv area cuts the addresses, never the
        // counts.
        let text = format!(
            "raasd master{} gen {}: {accepting}/{} workers{late}{state} -w {} {}",
            title::name_part(self.title.name),
            self.generation,
            self.target,
            self.target,
            self.addresses.join(" "),
        );
        if text != self.title.shown {
            // systemctl status shows the same line.
            notify_systemd(&[NotifyState::Status(&text)]);
            title::set(&text);
            self.title.shown = text;
        }
    }
}

/// Descriptors a worker needs besides its connections: stdio, the log file, its
/// epoll set, control channel and signal pipe, the scoreboard, with room to spare.
const WORKER_DESCRIPTORS: u64 = 32;

/// Descriptors one worker may need with `config`: one per connection, one per
/// listener, and its own.
fn descriptors_needed(config: &Config) -> u64 {
    config.max_conns + config.listen.len() as u64 + WORKER_DESCRIPTORS
}

/// Raises the soft limit on open descriptors to the hard one (a shell's soft 1024
/// would cap --max-conns far below its default); workers inherit it.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!("cannot raise the open file limit from {soft} to {hard}: {e}");
    }
}

/// Says so (once per start or reload) when --max-conns cannot be reached within the
/// open file limit, as nginx does with worker_connections.
fn warn_if_descriptors_fall_short(config: &Config) {
    use nix::sys::resource::{Resource, getrlimit};
    let Ok((limit, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let needed = descriptors_needed(config);
    if needed > limit {
        warn!(
            "--max-conns {} needs about {needed} open files per worker, but the limit \
             is {limit}: a worker stops accepting sooner (raise it with ulimit -n or \
             systemd's LimitNOFILE=)",
            config.max_conns
        );
    }
}

/// The filter is compiled here, once, before the first fork (workers inherit it);
/// where it cannot be used, --sandbox on says so (the workers run unconfined).
fn warn_if_unconfined(config: &Config) {
    if let Err(why) = crate::sandbox::availability()
        && config.sandbox
    {
        warn!("sandbox unavailable: {why}; workers run unconfined");
    }
}

/// --name, kept for the life of the process (leaked: once at start and at a reload
/// that changes it).
fn leak_name(name: Option<&str>) -> Option<&'static str> {
    name.map(|n| &*Box::leak(n.to_owned().into_boxed_str()))
}

/// Whether this process has a controlling terminal (opening /dev/tty fails with
/// ENXIO when it has none).
fn has_controlling_terminal() -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/tty")
        .is_ok()
}

fn epoch_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

/// Tells systemd (when it started us with NOTIFY_SOCKET) how the service is doing.
fn notify_systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify systemd: {e}");
    }
}
