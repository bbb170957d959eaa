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
use crate::control::{self, Command, MasterEnd, Report};
use crate::listeners::{self, Configured, Inheritance};
use crate::pidfile::{self, PidFile};
use crate::privileges::{self, Identity};
use crate::process::{self, Blocked, Forked};
use crate::scoreboard::{self, CELLS, Scoreboard};
use crate::signals::{self, SignalSet};
use crate::upgrade::{self, Predecessor, Successor};
use crate::worker::Who;
use crate::{logging, title, worker};

mod handover;
mod health;
mod reload;

use health::{Exit, MEMORY_SAMPLE};

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
    if let Err(e) = logging::init(config.log_level, config.log_file.as_deref()) {
        eprintln!("raasd: {e}");
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
        Err(message) => {
            eprintln!("raasd: {message}");
            if let Some(predecessor) = predecessor {
                predecessor.announce_failure(&message);
            }
            1
        }
    }
}

/// One worker process, as the master sees it.
struct WorkerProcess {
    pid: Pid,
    slot: usize,
    generation: u64,
    /// Its scoreboard cell.
    cell: usize,
    spawned_at: Instant,
    /// It asked to be replaced (--max-requests) or outgrew --max-worker-memory: a
    /// successor is spawned, and it retires once that one accepts.
    replace: bool,
    channel: MasterEnd,
    channel_open: bool,
    /// It reported that its listeners are in its poll set.
    accepting: bool,
    /// It was told to stop gracefully.
    retiring: bool,
    /// The master SIGKILLed it, for this reason (it is not reaped yet).
    killed_for: Option<&'static str>,
}

struct Stopping {
    quick: bool,
    deadline: Instant,
    killed: bool,
}

pub struct Master {
    config: Config,
    /// The command line as given, kept for a re-exec (the title overwrote argv).
    args: Vec<OsString>,
    /// The binary this master was started from, resolved at start: USR2 executes
    /// whatever is installed at that path then.
    exe: PathBuf,
    /// Where a new master of an upgrade starts: --working-directory, else the
    /// directory raasd was started in, as the operator named it.
    start_dir: PathBuf,
    listeners: Vec<Configured>,
    /// Socket activation fixes the listeners: reloads leave them alone.
    inheritance: Inheritance,
    /// A new master started by USR2, not yet ready.
    successor: Option<(Successor, Instant)>,
    /// This master was started by USR2: the old master waits to hear it is ready.
    predecessor: Option<Predecessor>,
    /// A successor given up on, whose process group is being ended.
    abandoned: Option<handover::Abandoned>,
    /// A successor took over: stop without removing what it now owns.
    handing_over: bool,
    /// systemd has been told READY=1 for the current configuration.
    systemd_ready: bool,
    addresses: Vec<String>,
    signals: Option<SignalSet>,
    pid_file: Option<PidFile>,
    workers: Vec<WorkerProcess>,
    /// Shared by every worker: wakes one to take the rest of a burst (see
    /// [`crate::accept_gate`]). Taken by a worker after fork.
    nudge: Option<Nudge>,
    /// How many worker slots are wanted.
    target: usize,
    /// Raised by each rotation; workers of older generations are retired.
    generation: u64,
    stopping: Option<Stopping>,
    all_accepting_announced: bool,
    fork_retry_at: Option<Instant>,
    scoreboard: Scoreboard,
    identity: Option<Identity>,
    /// Respawn delay per slot (crash-loop backoff).
    backoff: Vec<Backoff>,
    /// When the previous pass of the loop ran, to notice that the master itself
    /// was stopped or the machine suspended.
    last_pass_ms: u64,
    /// After such a hold-up: heartbeats are not due before this moment.
    heartbeats_due_from_ms: u64,
    next_memory_sample: Instant,
    system: sysinfo::System,
    random: u64,
    title: String,
}

#[derive(Default, Clone, Copy)]
struct Backoff {
    delay: Duration,
    not_before: Option<Instant>,
}

impl Master {
    /// `predecessor` is taken only once the start has succeeded.
    fn start(
        config: Config,
        args: Vec<OsString>,
        predecessor: &mut Option<Predecessor>,
    ) -> Result<Master, String> {
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
                        listeners::plain(&e)
                    )
                })?;
                launch_dir.join(dir)
            }
            None => launch_dir.clone(),
        };
        raise_descriptor_limit();
        warn_if_descriptors_fall_short(&config);
        match (&config.pid, &predecessor) {
            (Some(path), None) => pidfile::check_not_running(path)?,
            // Fail now, so that the old master rolls back, rather than serve without one.
            (Some(path), Some(_)) => PidFile::check_writable(path)?,
            _ => {}
        }
        let exe = upgrade::binary_path(args.first().map(OsString::as_os_str), &launch_dir)
            .map_err(|e| format!("cannot find my own binary: {e}"))?;
        let identity = privileges::resolve(config.user.as_deref(), config.group.as_deref())?;
        let scoreboard =
            Scoreboard::new().map_err(|e| format!("cannot map the scoreboard: {e}"))?;
        let (inheritance, mut inherited) = listeners::inherited()?;
        let listeners = if inheritance == Inheritance::Systemd {
            info!(
                "socket activation: serving the {} sockets systemd passed; --listen is not used",
                inherited.len()
            );
            std::mem::take(&mut inherited)
        } else {
            listeners::open_all(&config.listen, config.backlog, &mut inherited)
                .map_err(|e| e.to_string())?
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
            return Err(e);
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
        // A master started by an upgrade writes the pid file once it serves; until
        // then the file is the old master's (renamed .oldbin) and a rollback needs
        // the name free.
        let pid_file = match (&config.pid, &predecessor) {
            (Some(path), None) => Some(
                PidFile::write(path, std::process::id())
                    .inspect_err(|_| owned_files(&listeners))?,
            ),
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
        let mut master = Master {
            scoreboard,
            identity,
            backoff: Vec::new(),
            last_pass_ms: scoreboard::monotonic_ms(),
            heartbeats_due_from_ms: 0,
            next_memory_sample: Instant::now() + MEMORY_SAMPLE,
            system: sysinfo::System::new()
                .map_err(|e| format!("cannot read process information: {e}"))?,
            random: seed(),
            title: String::new(),
            target: config.workers.resolve(),
            config,
            args,
            exe,
            start_dir,
            listeners,
            inheritance,
            successor: None,
            abandoned: None,
            predecessor: predecessor.take(),
            handing_over: false,
            systemd_ready: false,
            addresses,
            signals: Some(signals),
            pid_file,
            workers: Vec::new(),
            nudge: Some(Nudge::new().map_err(|e| format!("cannot create an eventfd: {e}"))?),
            generation: upgrade::starting_generation(),
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
            if self.stopping.is_some() && self.workers.is_empty() {
                break;
            }
            self.follow_upgrade();
            self.finish_abandoned_upgrade(false);
            self.maintain_worker_count();
            self.murder_lazy_workers();
            self.replace_bloated_workers();
            self.kill_workers_past_deadline();
            self.show_title();
            self.sleep_until_woken();
        }
        self.finish_abandoned_upgrade(true);
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
            if let Some((successor, _)) = self.successor.as_ref().filter(|(s, _)| s.pid == pid) {
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
            self.scoreboard.cell(gone.cell).release();
            if let Some(why) = gone.killed_for {
                warn!(
                    "worker[{}] pid {pid} was killed by the master ({why})",
                    gone.slot
                );
                continue;
            }
            if gone.retiring || self.stopping.is_some() {
                info!("worker[{}] pid {pid} exited ({how})", gone.slot);
                continue;
            }
            self.note_unexpected_exit(&gone, how);
        }
    }

    fn handle_signals(&mut self) {
        let Some(signals) = &self.signals else { return };
        for (signal, times) in signals.take() {
            debug!("received {} x{times}", signals::name(signal));
            match signal {
                libc::SIGTERM | libc::SIGQUIT => self.stop(false, signals::name(signal)),
                libc::SIGINT => self.stop(true, signals::name(signal)),
                libc::SIGHUP => self.reload(),
                libc::SIGUSR2 => self.start_upgrade(),
                libc::SIGWINCH => self.drain_unless_on_a_terminal(),
                libc::SIGUSR1 => self.reopen_logs(),
                libc::SIGTTIN => self.resize(
                    self.target.saturating_add(times).min(MAX_WORKERS),
                    "SIGTTIN",
                ),
                libc::SIGTTOU if self.target > 0 => {
                    self.resize(self.target.saturating_sub(times).max(1), "SIGTTOU")
                }
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
        info!("{why}: workers: {} -> {target}", self.target);
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
        for slot in 0..self.target {
            if self.current_worker(slot).is_some() {
                continue;
            }
            if self.backoff_of(slot).not_before.is_some_and(|at| now < at) {
                continue;
            }
            if !self.spawn_worker(slot) {
                break;
            }
        }
        self.forget_backoff_of_healthy_slots(now);
        let retire: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| !w.retiring)
            .filter(|w| {
                w.slot >= self.target
                    || ((w.generation < self.generation || w.replace)
                        && self.current_worker(w.slot).is_some_and(|c| c.accepting))
            })
            .map(|w| w.pid)
            .collect();
        for pid in retire {
            self.retire(pid);
        }
        let all_accepting =
            (0..self.target).all(|slot| self.current_worker(slot).is_some_and(|w| w.accepting));
        if all_accepting && !self.all_accepting_announced && self.target > 0 {
            self.all_accepting_announced = true;
            match self.target {
                1 => info!("1 worker accepting"),
                n => info!("all {n} workers accepting"),
            }
            self.announce_ready();
        }
    }

    /// The worker of the current generation serving `slot`, if any.
    fn current_worker(&self, slot: usize) -> Option<&WorkerProcess> {
        self.workers.iter().find(|w| {
            w.slot == slot && w.generation == self.generation && !w.retiring && !w.replace
        })
    }

    fn retire(&mut self, pid: Pid) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            info!("retiring worker[{}] pid {pid}", w.slot);
            w.retiring = true;
            let _ = w.channel.send(Command::GracefulStop);
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
        self.scoreboard.cell(cell).claim(0, self.generation);
        let in_use = &self.scoreboard.header().cells_in_use;
        in_use.fetch_max(cell as u64 + 1, std::sync::atomic::Ordering::Relaxed);
        let max_requests = self.next_max_requests();
        let master = nix::unistd::getpid();
        let forked = control::channel().and_then(|(master_end, worker_end)| {
            Ok(match process::fork()? {
                Forked::Parent(pid) => (pid, master_end),
                Forked::Child(blocked) => {
                    drop(master_end);
                    let who = Who {
                        slot,
                        generation: self.generation,
                        master,
                    };
                    self.become_worker(who, cell, max_requests, worker_end, blocked)
                }
            })
        });
        match forked {
            Ok((pid, channel)) => {
                info!("spawned worker[{slot}] pid {pid}");
                self.scoreboard
                    .cell(cell)
                    .pid
                    .store(pid.as_raw() as u64, std::sync::atomic::Ordering::Relaxed);
                self.fork_retry_at = None;
                self.all_accepting_announced = false;
                self.workers.push(WorkerProcess {
                    pid,
                    slot,
                    generation: self.generation,
                    cell,
                    spawned_at: Instant::now(),
                    replace: false,
                    channel,
                    channel_open: true,
                    accepting: false,
                    retiring: false,
                    killed_for: None,
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
        logging::become_worker(slot);
        // Siblings' channels must close here, or a worker would keep the master's
        // end of another worker's channel open and hide the master's death from it.
        self.workers.clear();
        if let Some(signals) = self.signals.take() {
            signals.uninstall();
        }
        title::set(&format!("raasd worker[{slot}] gen {}", self.generation));
        title::set_comm("raasd-worker");
        if let Some(Err(e)) = self.identity.map(|identity| identity.assume()) {
            error!("cannot drop privileges: {e}");
            std::process::exit(1);
        }
        self.successor = None;
        self.predecessor = None;
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
            self.nudge.take().expect("the master's nudge"),
            channel,
            serving,
            (&self.scoreboard, cell),
            blocked,
        );
        std::process::exit(code)
    }

    /// TERM/QUIT or a hand-over (graceful), INT (quick).
    fn stop(&mut self, quick: bool, why: &str) {
        if self.stopping.as_ref().is_some_and(|s| s.quick || !quick) {
            return;
        }
        let (command, timeout) = if quick {
            info!("{why}: quick stop");
            (Command::QuickStop, QUICK_STOP_TIMEOUT)
        } else {
            let timeout = self.config.graceful_timeout();
            info!(
                "{}: graceful stop, waiting up to {}s for workers",
                why,
                timeout.as_secs()
            );
            (Command::GracefulStop, timeout)
        };
        for w in &mut self.workers {
            w.retiring = true;
            let _ = w.channel.send(command);
        }
        if !self.handing_over {
            notify_systemd(&[NotifyState::Stopping]);
        }
        if let Some((successor, _)) = self.successor.take() {
            info!(
                "stopping: the upgrade to pid {} is abandoned",
                successor.pid
            );
            self.abandon(successor.pid);
        }
        // Our copies of the listen sockets go now: once the workers have drained the
        // accept queue and closed theirs, the port refuses connections. After a hand
        // over, the sockets (and their files) are the new master's.
        if !self.handing_over && self.inheritance != Inheritance::Systemd {
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
            w.killed_for = Some("not stopped within --graceful-timeout");
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    /// Waits for a signal, a worker's message or the next deadline.
    fn sleep_until_woken(&mut self) {
        let now = Instant::now();
        let deadline = match &self.stopping {
            Some(s) if !s.killed => Some(s.deadline),
            Some(_) => None,
            None => {
                let checks = [
                    self.fork_retry_at,
                    self.backoff.iter().filter_map(|b| b.not_before).min(),
                    (self.config.timeout > 0).then(|| now + self.config.serving().heartbeat),
                    (self.config.max_worker_memory > 0).then_some(self.next_memory_sample),
                    self.successor.as_ref().map(|(_, deadline)| *deadline),
                    self.abandoned.as_ref().map(|a| a.kill_at),
                    (!self.all_accepting_announced
                        || self.backoff.iter().any(|b| b.delay > Duration::ZERO))
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
        let listening: Vec<usize> = (0..self.workers.len())
            .filter(|&i| self.workers[i].channel_open)
            .collect();
        let mut fds = Vec::with_capacity(listening.len() + 1);
        fds.push(PollFd::new(signals.fd(), PollFlags::POLLIN));
        if let Some((successor, _)) = &self.successor {
            fds.push(PollFd::new(successor.fd(), PollFlags::POLLIN));
        }
        let first_worker = fds.len();
        fds.extend(
            listening
                .iter()
                .map(|&i| PollFd::new(self.workers[i].channel.as_fd(), PollFlags::POLLIN)),
        );
        if let Err(e) = poll(&mut fds, timeout) {
            if e != Errno::EINTR {
                error!("poll: {e}");
            }
            return;
        }
        let woke: Vec<usize> = fds[first_worker..]
            .iter()
            .zip(&listening)
            .filter(|(fd, _)| fd.any().unwrap_or(false))
            .map(|(_, &i)| i)
            .collect();
        drop(fds);
        for i in woke {
            let w = &mut self.workers[i];
            let received = w.channel.receive();
            if received.messages.contains(&Report::Ready) && !w.accepting {
                w.accepting = true;
                debug!("worker[{}] pid {} accepting", w.slot, w.pid);
            }
            if received.messages.contains(&Report::ReplaceMe) && !w.replace && !w.retiring {
                info!(
                    "worker[{}] pid {} reached --max-requests; replacing it",
                    w.slot, w.pid
                );
                w.replace = true;
            }
            if received.closed {
                w.channel_open = false;
            }
        }
    }

    /// `raasd master gen 2 -w 3 127.0.0.1:2200: 3/3 workers`, rewritten only when it changes.
    fn show_title(&mut self) {
        let (mut accepting, mut late) = (0, 0);
        for slot in 0..self.target {
            match self.current_worker(slot) {
                Some(w) if w.accepting && self.is_late(w) => late += 1,
                Some(w) if w.accepting => accepting += 1,
                _ => {}
            }
        }
        let late = if late > 0 {
            format!(", {late} late")
        } else {
            String::new()
        };
        let state = if self.successor.is_some() || self.handing_over {
            " (old)"
        } else if self.stopping.is_some() {
            " (stopping)"
        } else {
            ""
        };
        let text = format!(
            "raasd master gen {} -w {} {}: {accepting}/{} workers{late}{state}",
            self.generation,
            self.target,
            self.addresses.join(" "),
            self.target
        );
        if text != self.title {
            title::set(&text);
            self.title = text;
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
