//! The master process: the shell around the supervisor's decisions.
//!
//! Binds, forks workers, then only supervises. What to do is decided by
//! [`crate::supervisor::Supervisor`], a pure state machine; this module is the
//! shell around it: each pass of `Master::supervise` turns the world into events
//! (signals, exited children, workers' reports, console commands, the successor's
//! readiness, heartbeats, the pass itself) and carries out the actions that come
//! back (fork, tell, kill, move the pid file, start or abandon an upgrade, log,
//! reply), then sleeps until a signal, a worker's message or the next deadline. It
//! never reads a client byte.
//!
//! The submodules hold the operations the actions dispatch to: `reload` (HUP,
//! USR1), `handover` (USR2: the upgrade's mechanics), `steering` (the console's
//! questions: status, metrics, probes) and `probes` (memory, the OOM killer).
//!
//! Workers are told what to do through their control channel, never by signal, so
//! ordering and delivery are certain.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use sd_notify::NotifyState;

use crate::accept_gate::Nudge;
use crate::config::{self, Config, MAX_WORKERS};
use crate::console::Console;
use crate::control::{self, Command, MasterEnd, Report};
use crate::handoff::{self, Queue};
use crate::listeners::{self, Configured, Inheritance};
use crate::pidfile::{self, PidFile};
use crate::privileges::{self, Identity};
use crate::process::{self, Blocked, Forked};
use crate::scoreboard::{CELLS, Scoreboard};
use crate::signals::SignalSet;
use crate::supervisor::{
    self, Action, Census, Event, Exit, Exited, Facts, Notice, Order, Reply, Said, Settings,
    Supervisor, Upgrade,
};
use crate::upgrade::{self, Predecessor};
use crate::worker::Who;
use crate::{logging, title, worker};

mod handover;
mod oom;
mod probes;
mod reload;
mod steering;

use probes::Probes;

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

/// Starts raasd with `config`; `args` are the original arguments. Returns the exit
/// status: 0 after a stop, 1 when start-up failed.
pub fn run(config: Config, args: Vec<OsString>) -> i32 {
    logging::set_format(&config.log_format);
    if let Err(e) = logging::init(config.log_level, config.log_file.as_deref()) {
        eprintln!("raasd: {e}");
        return 1;
    }
    if let Some(Err(e)) = config.access_log.as_deref().map(logging::open_access_log) {
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
    /// When this master started (seconds since the epoch).
    started_at: u64,
    /// --pid as it was at the start: a reload's change takes effect at the next
    /// start or upgrade (and the supervisor decided from it).
    pid_path: Option<PathBuf>,
}

/// The listen sockets this master holds.
struct Sockets {
    listeners: Vec<Configured>,
    /// Socket activation fixes the listeners: reloads leave them alone.
    inheritance: Inheritance,
    /// Their addresses, for the title.
    addresses: Vec<String>,
}

/// What every worker inherits to coordinate with its siblings.
struct Coordination {
    /// Wakes one worker to take the rest of a burst (see [`crate::accept_gate`]).
    /// Taken by a worker after fork.
    nudge: Option<Nudge>,
    /// Where retiring workers hand their connections over (None with --handover
    /// off).
    handoff: Option<Queue>,
    /// Each worker's heartbeat and counters, one cell each.
    scoreboard: Scoreboard,
}

/// The other masters of an upgrade.
#[derive(Default)]
struct Links {
    /// The new master this one started (USR2), until it is abandoned; after the
    /// hand-over, told our totals when we exit.
    successor: Option<upgrade::Successor>,
    /// This master was started by USR2: the old master waits to hear it is ready.
    predecessor: Option<Predecessor>,
    /// Once ready after an upgrade: where the old master's totals will come from.
    farewell: Option<upgrade::Farewell>,
}

/// The master's process title.
struct Title {
    /// --name (kept for the life of the process: workers' titles borrow it).
    name: Option<&'static str>,
    /// The text shown, rewritten only when it changes.
    shown: String,
}

pub struct Master {
    /// Every decision: which workers, when, what to tell and whom to kill.
    core: Supervisor,
    config: Config,
    /// How this master was started: what a reload re-reads, an upgrade re-executes.
    origin: Origin,
    sockets: Sockets,
    signals: Option<SignalSet>,
    pid_file: Option<PidFile>,
    /// Each live worker's control channel, until the worker closes it.
    channels: Vec<(Pid, MasterEnd)>,
    /// What the workers share to coordinate among themselves.
    coordination: Coordination,
    /// The control socket and the metrics endpoint.
    console: Console,
    links: Links,
    probes: Probes,
    identity: Option<Identity>,
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
        let probes = Probes::new().inspect_err(|_| owned_files(&listeners))?;
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
        let now = Instant::now();
        let core = Supervisor::new(
            settings_of(&config, handoff.is_some()),
            Facts {
                generation,
                predecessor: predecessor.is_some(),
                pid_file: config.pid.is_some(),
                sockets_from_systemd: inheritance == Inheritance::Systemd,
                watchdog: sd_notify::watchdog_enabled().map(|every| every / 2),
                cells: CELLS,
                max_workers: MAX_WORKERS,
                seed: seed(),
            },
            now,
        );
        let pid_path = config.pid.clone();
        let mut master = Master {
            core,
            config,
            origin: Origin {
                args,
                exe,
                start_dir,
                started_at: epoch_seconds(),
                pid_path,
            },
            sockets: Sockets {
                listeners,
                inheritance,
                addresses,
            },
            signals: Some(signals),
            pid_file,
            channels: Vec::new(),
            coordination: Coordination {
                nudge: Some(nudge),
                handoff,
                scoreboard,
            },
            console,
            links: Links {
                predecessor: predecessor.take(),
                ..Links::default()
            },
            probes,
            identity,
            title: Title {
                name,
                shown: String::new(),
            },
        };
        master.show_title();
        Ok(master)
    }

    /// The master loop: the world in, the supervisor's actions out. Returns the
    /// exit status.
    fn supervise(mut self) -> i32 {
        let mut woken = Vec::new();
        loop {
            // Signals first: when a whole process group is signalled (Ctrl-C, systemd's
            // control-group stop), the workers' exits must be read as part of the stop.
            self.take_signals();
            self.reap_children();
            // Read before the console's questions, so that status and /livez are fresh.
            let beats = self.heartbeat_ages();
            self.feed(Event::Beats(beats));
            self.read_worker_reports(std::mem::take(&mut woken));
            self.serve_console();
            self.follow_upgrade();
            self.hear_farewell();
            self.feed(Event::Tick);
            if let Some(code) = self.core.exit_code() {
                return code;
            }
            self.show_title();
            woken = self.sleep_until_woken();
        }
    }

    /// Hands `event` to the supervisor and carries out what it decides, feeding
    /// back the outcome of each action that has one before anything else happens.
    /// (`Action::Exit` ends the loop: see `supervise`.)
    fn feed(&mut self, event: Event) {
        let mut actions: VecDeque<Action> = self.core.handle(event, Instant::now()).into();
        while let Some(action) = actions.pop_front() {
            if let Some(outcome) = self.carry_out(action) {
                // The answer's consequences come first, before the rest of what was
                // decided: as if the action had returned its outcome.
                let answered = self.core.handle(outcome, Instant::now());
                for next in answered.into_iter().rev() {
                    actions.push_front(next);
                }
            }
        }
    }

    /// Does what the supervisor decided; returns the outcome it waits for, if any.
    fn carry_out(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Log(line) => logging::write_line(&line),
            Action::Spawn {
                slot,
                generation,
                cell,
                max_requests,
            } => return Some(self.spawn_worker(slot, generation, cell, max_requests)),
            Action::Tell(pid, order) => {
                let command = match order {
                    Order::GracefulStop => Command::GracefulStop,
                    Order::HandOver => Command::HandOver,
                    Order::QuickStop => Command::QuickStop,
                };
                if let Some((_, channel)) = self.channels.iter().find(|(p, _)| p.as_raw() == pid.0)
                {
                    let _ = channel.send(&command);
                }
            }
            Action::Kill(pid) => {
                let _ = kill(Pid::from_raw(pid.0), Signal::SIGKILL);
            }
            Action::ReopenLogs => self.reopen_logs(),
            Action::Reload { asked_by } => {
                let outcome = self.reload();
                return Some(Event::Reloaded { asked_by, outcome });
            }
            Action::StartUpgrade { generation } => return Some(self.start_successor(generation)),
            Action::AbandonSuccessor(group) => self.abandon(group),
            Action::EndAbandoned(group) => self.end_abandoned(group),
            Action::CloseListeners { refuse_first } => self.close_listeners(refuse_first),
            Action::PidFile(step) => self.move_pid_file(step),
            Action::Notify(notice) => notify_systemd(&match notice {
                Notice::Ready => vec![NotifyState::Ready],
                Notice::Reloading => vec![NotifyState::Reloading],
                Notice::Stopping => vec![NotifyState::Stopping],
                Notice::Watchdog => vec![NotifyState::Watchdog],
                Notice::HandedTo(pid) => {
                    vec![NotifyState::MainPid(pid.0 as u32), NotifyState::Ready]
                }
            }),
            Action::TellPredecessorReady => self.tell_predecessor_ready(),
            Action::HandOnTotals(totals) => self.hand_on_totals(&totals),
            Action::SampleMemory(pids) => {
                return Some(Event::MemorySampled(self.probes.resident(&pids)));
            }
            Action::Reply(client, reply) => {
                self.console
                    .reply(client, 200, &reply_text(&reply), Instant::now())
            }
            Action::AwaitUpgrade(client) => self.console.await_upgrade(client),
            Action::AnswerUpgradeWaiters(reply) => self
                .console
                .answer_upgrade(&reply_text(&reply), Instant::now()),
            Action::FlushConsole => self.console.flush(),
            Action::CloseConsole { remove_files } => self.console.close_listeners(remove_files),
            Action::Exit(_) => {}
        }
        None
    }

    /// Collects every exited child, so none stays a zombie: what a worker had done
    /// comes from its scoreboard cell, which is free again.
    fn reap_children(&mut self) {
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Status(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, Exit::Signal(signal.as_str())),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid: {e}");
                    return;
                }
            };
            let known = core_pid(pid);
            let mut served = Default::default();
            let mut oom_rose = false;
            if let Some(cell) = self.core.worker(known).map(|w| w.cell) {
                served = self.coordination.scoreboard.counters(cell).served();
                self.coordination.scoreboard.release(cell);
                self.channels.retain(|(p, _)| *p != pid);
                oom_rose = self.probes.oom_kill_count_rose();
            }
            let said = self.successor_said(pid);
            self.feed(Event::ChildExited(Exited {
                pid: known,
                exit,
                oom_rose,
                served,
                said,
            }));
        }
    }

    fn take_signals(&mut self) {
        let Some(signals) = &self.signals else { return };
        for (signal, times) in signals.take() {
            let signal = match signal {
                libc::SIGTERM => supervisor::Signal::Term,
                libc::SIGQUIT => supervisor::Signal::Quit,
                libc::SIGINT => supervisor::Signal::Int,
                libc::SIGHUP => supervisor::Signal::Hup,
                libc::SIGUSR1 => supervisor::Signal::Usr1,
                libc::SIGUSR2 => supervisor::Signal::Usr2,
                // On a terminal the kernel sends WINCH to the foreground process group at
                // every window resize, and a resize must not stop the service.
                libc::SIGWINCH => supervisor::Signal::Winch {
                    on_terminal: has_controlling_terminal(),
                },
                libc::SIGTTIN => supervisor::Signal::Ttin,
                libc::SIGTTOU => supervisor::Signal::Ttou,
                libc::SIGCHLD => supervisor::Signal::Chld,
                _ => continue,
            };
            self.feed(Event::Signal(signal, times));
        }
    }

    /// Forks a worker for `slot`; the child never returns from here.
    fn spawn_worker(
        &mut self,
        slot: usize,
        generation: u64,
        cell: usize,
        max_requests: Option<u64>,
    ) -> Event {
        self.coordination.scoreboard.claim(cell);
        let who = Who {
            slot,
            generation,
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
                self.channels.push((pid, channel));
                Event::Spawned(core_pid(pid))
            }
            Err(e) => {
                self.coordination.scoreboard.release(cell);
                Event::SpawnFailed(e.to_string())
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
        self.channels.clear();
        if let Some(signals) = self.signals.take() {
            signals.uninstall();
        }
        title::set(&format!(
            "raasd worker[{slot}]{} gen {}",
            title::name_part(self.title.name),
            who.generation
        ));
        title::set_comm("raasd-worker");
        if let Some(Err(e)) = self.identity.map(|identity| identity.assume()) {
            error!("cannot drop privileges: {e}");
            std::process::exit(1);
        }
        self.links = Links::default();
        // The console is the master's: a worker must hold none of its sockets.
        self.console = Console::default();
        let listeners = std::mem::take(&mut self.sockets.listeners)
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
            (&self.coordination.scoreboard, cell),
            blocked,
        );
        std::process::exit(code)
    }

    /// Our copies of the listen sockets go (a stop): with `refuse_first`, their
    /// files first and new connections refused, so that once the workers have
    /// drained the accept queue the port refuses connections.
    fn close_listeners(&mut self, refuse_first: bool) {
        let listeners = std::mem::take(&mut self.sockets.listeners);
        if refuse_first {
            listeners::remove_socket_files(listeners.iter().map(|c| &c.listener));
            if let Err(e) = listeners::refuse_new_connections(listeners.iter().map(|c| &c.listener))
            {
                warn!("cannot stop taking new connections before the drain: {e}");
            }
        }
    }

    /// The heartbeat age of every worker, from the scoreboard.
    fn heartbeat_ages(&self) -> Vec<(supervisor::Pid, u64)> {
        let now_ms = crate::scoreboard::monotonic_ms();
        self.core
            .workers()
            .iter()
            .map(|w| {
                let age = self
                    .coordination
                    .scoreboard
                    .heartbeat_age_ms(w.cell, now_ms);
                (w.pid, age)
            })
            .collect()
    }

    /// Waits for a signal, a worker's message or the next deadline; returns the
    /// workers whose channel woke it.
    fn sleep_until_woken(&mut self) -> Vec<Pid> {
        let now = Instant::now();
        let deadline = [self.core.wake_at(), self.console.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        let timeout = match deadline {
            Some(at) => {
                let millis = at.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1;
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::NONE)
            }
            None => PollTimeout::NONE,
        };
        let Some(signals) = &self.signals else {
            return Vec::new();
        };
        let mut fds = Vec::with_capacity(self.channels.len() + 2);
        fds.push(PollFd::new(signals.fd(), PollFlags::POLLIN));
        if matches!(self.core.upgrade(), Upgrade::Waiting { .. })
            && let Some(successor) = &self.links.successor
        {
            fds.push(PollFd::new(successor.fd(), PollFlags::POLLIN));
        }
        if let Some(farewell) = &self.links.farewell {
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
            self.channels
                .iter()
                .map(|(_, channel)| PollFd::new(channel.as_fd(), PollFlags::POLLIN)),
        );
        if let Err(e) = poll(&mut fds, timeout) {
            if e != Errno::EINTR {
                error!("poll: {e}");
            }
            return Vec::new();
        }
        fds[first_worker..]
            .iter()
            .zip(&self.channels)
            .filter(|(fd, _)| fd.any().unwrap_or(false))
            .map(|(_, (pid, _))| *pid)
            .collect()
    }

    /// Takes the reports of the workers whose channel woke the master: ready
    /// (accepting), replace me (--max-requests), or the end of the channel (then
    /// there is nothing to poll: its exit follows).
    fn read_worker_reports(&mut self, woken: Vec<Pid>) {
        for pid in woken {
            let Some(at) = self.channels.iter().position(|(p, _)| *p == pid) else {
                continue;
            };
            let received = self.channels[at].1.receive();
            if received.closed {
                self.channels.swap_remove(at);
            }
            for report in received.messages {
                let said = match report {
                    Report::Ready => Said::Ready,
                    Report::ReplaceMe => Said::ReplaceMe,
                };
                self.feed(Event::Said(core_pid(pid), said));
            }
        }
    }

    /// `raasd master gen 2 -w 3 127.0.0.1:2200: 3/3 workers`, rewritten only when it changes.
    fn show_title(&mut self) {
        let Census { accepting, late } = self.core.census();
        let late = if late > 0 {
            format!(", {late} late")
        } else {
            String::new()
        };
        let state = if self.core.upgrade() != Upgrade::Idle {
            " (old)"
        } else if self.core.is_stopping() {
            " (stopping)"
        } else if self.core.is_draining() {
            " (draining)"
        } else {
            ""
        };
        // Counters before addresses: a short argv area cuts the addresses, never the
        // counts.
        let target = self.core.target();
        let text = format!(
            "raasd master{} gen {}: {accepting}/{target} workers{late}{state} -w {target} {}",
            title::name_part(self.title.name),
            self.core.generation(),
            self.sockets.addresses.join(" "),
        );
        if text != self.title.shown {
            // systemctl status shows the same line.
            notify_systemd(&[NotifyState::Status(&text)]);
            title::set(&text);
            self.title.shown = text;
        }
    }
}

/// What the supervisor needs of the configuration.
fn settings_of(config: &Config, handoff_queue: bool) -> Settings {
    Settings {
        workers: config.workers.resolve(),
        timeout_secs: config.timeout,
        heartbeat: config.serving().heartbeat,
        max_requests: config.max_requests,
        max_requests_jitter: config.max_requests_jitter,
        max_worker_memory: config.max_worker_memory,
        handover: config.handover && handoff_queue,
        drain_delay: Duration::from_secs(config.drain_delay),
        graceful_timeout: config.graceful_timeout(),
        upgrade_timeout: config.upgrade_timeout(),
        sandbox: config.sandbox,
    }
}

fn core_pid(pid: Pid) -> supervisor::Pid {
    supervisor::Pid(pid.as_raw())
}

/// A console answer in the console's words.
fn reply_text(reply: &Reply) -> String {
    match reply {
        Reply::Done(value) => value.to_string(),
        Reply::Failed(why) => crate::console::error_reply(why),
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
/// Never waits: the socket is a datagram queue of a few messages, and a service
/// manager that does not read it must not stall the loop (reaping, resizing, the
/// console); a message it has no room for is dropped, and said.
fn notify_systemd(states: &[NotifyState]) {
    use std::fmt::Write as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = String::new();
    for state in states {
        let _ = writeln!(message, "{state}");
    }
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|socket| {
        socket.connect(&path)?;
        socket.set_nonblocking(true)?;
        socket.send(message.as_bytes())
    });
    if let Err(e) = sent {
        warn!(
            "cannot notify systemd ({}): {}",
            message.trim_end().replace('\n', ", "),
            crate::errors::plain(&e)
        );
    }
}
