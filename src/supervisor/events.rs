//! The supervisor's vocabulary: what comes in ([`Event`], with [`Settings`] and
//! [`Facts`]) and what goes out ([`Action`]). One owner for both sides: the shell
//! (`crate::master`) builds the events and carries out the actions, the simulator
//! does the same with a made-up world.

use std::time::Duration;

use log::Level;

use super::health::Exit;
use super::totals::{Served, Totals};

/// A process id, as the supervisor knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pid(pub i32);

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A signal the master handles (see the table in README.md and raasd(8)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Quit,
    Int,
    Hup,
    Usr1,
    Usr2,
    /// The master has a controlling terminal when the window-size signal comes (a
    /// resize sends it there, and must not drain the service).
    Winch {
        on_terminal: bool,
    },
    Ttin,
    Ttou,
    Chld,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Quit => "SIGQUIT",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
            Signal::Usr1 => "SIGUSR1",
            Signal::Usr2 => "SIGUSR2",
            Signal::Winch { .. } => "SIGWINCH",
            Signal::Ttin => "SIGTTIN",
            Signal::Ttou => "SIGTTOU",
            Signal::Chld => "SIGCHLD",
        }
    }
}

/// What a worker tells the master over its control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// Its listeners are in its poll set: it accepts.
    Ready,
    /// It reached --max-requests.
    ReplaceMe,
}

/// What the master tells a worker over its control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    GracefulStop,
    HandOver,
    QuickStop,
}

/// A console client, by the console's id.
pub type Client = u64;

/// A console command that changes something (the questions — status, metrics,
/// probes — the shell answers from [`Supervisor`]'s read-only view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Workers(usize),
    Reload,
    Upgrade,
    Stop { quick: bool },
    ReopenLogs,
}

/// A child process reaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    pub pid: Pid,
    pub exit: Exit,
    /// The memory cgroup's OOM kill count rose since the previous exit.
    pub oom_rose: bool,
    /// What it had done, when it was a worker.
    pub served: Served,
    /// When it was the successor of an upgrade: what it said before exiting.
    pub said: Option<String>,
}

/// What the configuration says about supervising (the rest is the workers' or
/// the shell's). Replaced by a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub workers: usize,
    /// --timeout in seconds (0: no heartbeat checks).
    pub timeout_secs: u64,
    /// How often a worker beats.
    pub heartbeat: Duration,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// --max-worker-memory in MiB (0: none).
    pub max_worker_memory: u64,
    /// Retiring workers hand their connections over (--handover on, with a queue).
    pub handover: bool,
    pub drain_delay: Duration,
    pub graceful_timeout: Duration,
    pub upgrade_timeout: Duration,
    pub sandbox: bool,
}

/// What is fixed for the life of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The generation of the first workers (an upgrade's new master counts on).
    pub generation: u64,
    /// This master was started by an upgrade: the old one waits to hear it is ready.
    pub predecessor: bool,
    /// A pid file is configured.
    pub pid_file: bool,
    /// The listeners came from systemd (socket activation): never closed early.
    pub sockets_from_systemd: bool,
    /// systemd's watchdog: how often to ping it.
    pub watchdog: Option<Duration>,
    /// Scoreboard cells: at most this many workers at once.
    pub cells: usize,
    /// The most workers TTIN reaches.
    pub max_workers: usize,
    /// Seeds the --max-requests jitter.
    pub seed: u64,
}

/// A value attached to a log line (the JSON log format shows it as a field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(i64),
    Text(String),
}

/// A log line to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub level: Level,
    pub text: String,
    pub fields: Vec<(&'static str, Field)>,
}

/// A console answer: `{"ok":true,…}` or `{"ok":false,"error":…}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done(serde_json::Value),
    Failed(String),
}

/// The pid file's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidFileStep {
    /// Write it: a master started by an upgrade, once it serves (and a stale
    /// FILE.oldbin of a predecessor that died goes).
    Write,
    /// FILE.oldbin back to FILE: an upgrade rolled back.
    Back,
    Remove,
}

/// What systemd is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Reloading,
    Stopping,
    Watchdog,
    /// The new master of an upgrade is the main pid now, and ready.
    HandedTo(Pid),
}

/// Something for the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Log(Line),
    /// Fork a worker for `slot` of `generation` on scoreboard cell `cell`; answer
    /// with `Spawned` or `SpawnFailed`.
    Spawn {
        slot: usize,
        generation: u64,
        cell: usize,
        max_requests: Option<u64>,
    },
    /// Send a worker an order over its control channel (when it still has one).
    Tell(Pid, Order),
    /// SIGKILL a worker.
    Kill(Pid),
    /// Reopen the log files and pass them to every worker.
    ReopenLogs,
    /// Re-read the configuration and apply what the shell owns; answer with
    /// `Reloaded`.
    Reload {
        asked_by: Option<Client>,
    },
    /// Rename the pid file to FILE.oldbin and start the successor; answer with
    /// `SuccessorStarted`, `SuccessorNotStarted` or (pid file) `UpgradeAborted`.
    StartUpgrade {
        generation: u64,
    },
    /// TERM the successor's process group; forget it.
    AbandonSuccessor(Pid),
    /// KILL what is left of an abandoned successor's group, and say who else holds
    /// the listen sockets.
    EndAbandoned(Pid),
    /// Close this master's listen sockets; `refuse_first`: remove the socket files
    /// and stop taking connections first (not when they are a successor's or
    /// systemd's).
    CloseListeners {
        refuse_first: bool,
    },
    PidFile(PidFileStep),
    Notify(Notice),
    /// Tell the old master of an upgrade that this one serves.
    TellPredecessorReady,
    /// Hand the totals on to the master this one handed over to.
    HandOnTotals(Totals),
    /// Read these workers' resident memory; answer with `MemorySampled`.
    SampleMemory(Vec<Pid>),
    Reply(Client, Reply),
    /// This client is answered when the upgrade ends.
    AwaitUpgrade(Client),
    AnswerUpgradeWaiters(Reply),
    /// Write the console's owed replies, for a moment at most (before exiting).
    FlushConsole,
    /// Stop taking console clients (`remove_files`: the control socket's file too;
    /// not when it is a successor's); clients already connected get their replies.
    CloseConsole {
        remove_files: bool,
    },
    /// Exit the process with this status.
    Exit(i32),
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Signal(Signal, usize),
    ChildExited(Exited),
    Said(Pid, Said),
    Spawned(Pid),
    SpawnFailed(String),
    /// The workers' heartbeat ages, in milliseconds, read at the start of a pass.
    Beats(Vec<(Pid, u64)>),
    /// Resident bytes of the workers sampled.
    MemorySampled(Vec<(Pid, u64)>),
    Console(Client, Command),
    Reloaded {
        asked_by: Option<Client>,
        outcome: Result<Settings, String>,
    },
    /// The pid file could not be renamed: no upgrade was started.
    UpgradeAborted(String),
    SuccessorStarted(Pid),
    SuccessorNotStarted(String),
    /// The successor says it serves; `takes_connections`: it speaks our hand-over
    /// format.
    SuccessorReady {
        takes_connections: bool,
    },
    /// The successor's readiness pipe ended without "ready": what it said, if any.
    SuccessorFailed(Option<String>),
    /// The old master of an upgrade exited: its totals (JSON), or nothing.
    Farewell(Option<String>),
    /// One pass of the loop: timers, convergence, health.
    Tick,
}
