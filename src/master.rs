//! The master process: binds, forks workers, then only supervises.
//!
//! Owns the worker slots and every decision about workers: how many, which
//! generation, when to spawn, retire, respawn or kill them. It never reads a client
//! byte. Each pass of [`Master::supervise`] reads as the story of a supervisor: reap
//! the dead, take the signals, bring the workers to what is wanted, kill those past
//! their deadline, then sleep until a signal or a worker's message arrives.
//!
//! Workers are told what to do through their control channel, never by signal, so
//! ordering and delivery are certain. A slot keeps its number across respawns and
//! rotations; during a rotation (HUP) a slot briefly has an old and a new worker, and
//! the old one is retired only once the new one reports that it is accepting.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::config::Config;
use crate::control::{self, Command, MasterEnd, Report};
use crate::listeners::{self, Listener};
use crate::pidfile::{self, PidFile};
use crate::process::{self, Blocked, Forked};
use crate::signals::{self, SignalSet};
use crate::{logging, title, worker};

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
    logging::init(config.log_level);
    match Master::start(config, args) {
        Ok(master) => master.supervise(),
        Err(message) => {
            eprintln!("raasd: {message}");
            1
        }
    }
}

/// One worker process, as the master sees it.
struct WorkerProcess {
    pid: Pid,
    slot: usize,
    generation: u64,
    channel: MasterEnd,
    channel_open: bool,
    /// It reported that its listeners are in its poll set.
    accepting: bool,
    /// It was told to stop gracefully.
    retiring: bool,
}

struct Stopping {
    quick: bool,
    deadline: Instant,
    killed: bool,
}

pub struct Master {
    config: Config,
    /// The command line as given, kept for a re-exec (the title overwrote argv).
    #[allow(dead_code)]
    args: Vec<OsString>,
    listeners: Vec<Listener>,
    addresses: Vec<String>,
    signals: Option<SignalSet>,
    pid_file: Option<PidFile>,
    workers: Vec<WorkerProcess>,
    /// How many worker slots are wanted.
    target: usize,
    /// Raised by each rotation; workers of older generations are retired.
    generation: u64,
    stopping: Option<Stopping>,
    all_accepting_announced: bool,
    fork_retry_at: Option<Instant>,
}

impl Master {
    fn start(config: Config, args: Vec<OsString>) -> Result<Master, String> {
        if let Some(path) = &config.pid {
            pidfile::check_not_running(path)?;
        }
        let listeners =
            listeners::bind_all(&config.listen, config.backlog).map_err(|e| e.to_string())?;
        let addresses: Vec<String> = listeners.iter().map(Listener::local_addr).collect();
        let fail = |what: String| {
            listeners::remove_socket_files(&listeners);
            what
        };
        let signals = SignalSet::install(&SIGNALS_HANDLED)
            .map_err(|e| fail(format!("cannot install signal handlers: {e}")))?;
        let pid_file = match &config.pid {
            Some(path) => Some(PidFile::write(path, std::process::id()).map_err(fail)?),
            None => None,
        };
        if let Err(e) = title::init() {
            warn!("process titles unavailable: {e}");
        }
        title::set_comm("raasd-master");
        for address in &addresses {
            info!("listening on {address}");
        }
        let master = Master {
            target: config.workers.resolve(),
            config,
            args,
            listeners,
            addresses,
            signals: Some(signals),
            pid_file,
            workers: Vec::new(),
            generation: 1,
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
            self.reap_all_workers();
            self.handle_signals();
            if self.stopping.is_some() && self.workers.is_empty() {
                break;
            }
            self.maintain_worker_count();
            self.kill_workers_past_deadline();
            self.sleep_until_woken();
        }
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
                Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exit status {code}")),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, format!("killed by {signal}")),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid: {e}");
                    return;
                }
            };
            let Some(at) = self.workers.iter().position(|w| w.pid == pid) else {
                continue;
            };
            let gone = self.workers.swap_remove(at);
            if gone.retiring || self.stopping.is_some() {
                info!("worker[{}] pid {pid} exited ({how})", gone.slot);
            } else {
                warn!(
                    "worker[{}] pid {pid} exited unexpectedly ({how}); respawning",
                    gone.slot
                );
            }
        }
    }

    fn handle_signals(&mut self) {
        let Some(signals) = &self.signals else { return };
        for (signal, times) in signals.take() {
            debug!("received {} x{times}", signals::name(signal));
            match signal {
                libc::SIGTERM | libc::SIGQUIT => self.stop(false, signal),
                libc::SIGINT => self.stop(true, signal),
                libc::SIGHUP => self.rotate_workers(),
                libc::SIGTTIN => self.resize(self.target.saturating_add(times)),
                libc::SIGTTOU => self.resize(self.target.saturating_sub(times).max(1)),
                libc::SIGCHLD => {} // reaped at the top of the loop
                other => warn!(
                    "{} is not supported by this version; ignored",
                    signals::name(other)
                ),
            }
        }
    }

    fn resize(&mut self, target: usize) {
        if self.stopping.is_some() || target == self.target {
            return;
        }
        info!("workers: {} -> {target}", self.target);
        self.target = target;
        self.all_accepting_announced = false;
        self.show_title();
    }

    /// HUP: a fresh generation of workers replaces the current one, slot by slot.
    fn rotate_workers(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.generation += 1;
        self.all_accepting_announced = false;
        info!("rotating workers: generation {} starting", self.generation);
    }

    /// Spawns what is missing, then retires what is surplus or replaced.
    fn maintain_worker_count(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        for slot in 0..self.target {
            if self.current_worker(slot).is_none() && !self.spawn_worker(slot) {
                break;
            }
        }
        let retire: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| !w.retiring)
            .filter(|w| {
                w.slot >= self.target
                    || (w.generation < self.generation
                        && self.current_worker(w.slot).is_some_and(|c| c.accepting))
            })
            .map(|w| w.pid)
            .collect();
        for pid in retire {
            self.retire(pid);
        }
        let all_accepting =
            (0..self.target).all(|slot| self.current_worker(slot).is_some_and(|w| w.accepting));
        if all_accepting && !self.all_accepting_announced {
            self.all_accepting_announced = true;
            info!("all {} workers accepting", self.target);
        }
    }

    /// The worker of the current generation serving `slot`, if any.
    fn current_worker(&self, slot: usize) -> Option<&WorkerProcess> {
        self.workers
            .iter()
            .find(|w| w.slot == slot && w.generation == self.generation && !w.retiring)
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
        let forked = control::channel().and_then(|(master_end, worker_end)| {
            Ok(match process::fork()? {
                Forked::Parent(pid) => (pid, master_end),
                Forked::Child(blocked) => {
                    drop(master_end);
                    self.become_worker(slot, worker_end, blocked)
                }
            })
        });
        match forked {
            Ok((pid, channel)) => {
                info!("spawned worker[{slot}] pid {pid}");
                self.fork_retry_at = None;
                self.all_accepting_announced = false;
                self.workers.push(WorkerProcess {
                    pid,
                    slot,
                    generation: self.generation,
                    channel,
                    channel_open: true,
                    accepting: false,
                    retiring: false,
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
    fn become_worker(&mut self, slot: usize, channel: control::WorkerEnd, blocked: Blocked) -> ! {
        logging::become_worker(slot);
        // Siblings' channels must close here, or a worker would keep the master's
        // end of another worker's channel open and hide the master's death from it.
        self.workers.clear();
        if let Some(signals) = self.signals.take() {
            signals.uninstall();
        }
        title::set(&format!("raasd worker[{slot}]"));
        title::set_comm("raasd-worker");
        let listeners = std::mem::take(&mut self.listeners);
        let code = worker::run(listeners, channel, self.config.serving(), blocked);
        std::process::exit(code)
    }

    /// TERM/QUIT (graceful) or INT (quick).
    fn stop(&mut self, quick: bool, signal: libc::c_int) {
        if self.stopping.as_ref().is_some_and(|s| s.quick || !quick) {
            return;
        }
        let (command, timeout) = if quick {
            info!("{}: quick stop", signals::name(signal));
            (Command::QuickStop, QUICK_STOP_TIMEOUT)
        } else {
            let timeout = self.config.graceful_timeout();
            info!(
                "{}: graceful stop, waiting up to {}s for workers",
                signals::name(signal),
                timeout.as_secs()
            );
            (Command::GracefulStop, timeout)
        };
        for w in &mut self.workers {
            w.retiring = true;
            let _ = w.channel.send(command);
        }
        // Our copies of the listen sockets go now: once the workers have drained the
        // accept queue and closed theirs, the port refuses connections.
        listeners::remove_socket_files(&self.listeners);
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
        for w in &self.workers {
            warn!(
                "worker[{}] pid {} did not stop in time; killing it",
                w.slot, w.pid
            );
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    /// Waits for a signal, a worker's message or the next deadline.
    fn sleep_until_woken(&mut self) {
        let now = Instant::now();
        let deadline = match &self.stopping {
            Some(s) if !s.killed => Some(s.deadline),
            _ => self.fork_retry_at,
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
        let woke: Vec<usize> = fds[1..]
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
            if received.closed {
                w.channel_open = false;
            }
        }
    }

    fn show_title(&self) {
        title::set(&format!(
            "raasd master -w {} {}",
            self.target,
            self.addresses.join(" ")
        ));
    }
}
