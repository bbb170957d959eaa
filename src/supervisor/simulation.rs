//! A deterministic simulator for the supervisor: a seeded random world drives one
//! [`Supervisor`] through random event orders and times, and checks its promises
//! after every step.
//!
//! # The world
//!
//! The world plays the shell (`crate::master`) and everything around it:
//!
//! - worker processes: each has a pid, is alive or dead, reaped or not, beats every
//!   `--heartbeat` unless it hangs (never again) or beats late (pauses for a while),
//!   says `Ready` at the first pass after its fork unless it hangs or died at
//!   start, stops at the pass after it was told to unless it refuses (or hangs), and
//!   dies at once when killed; it may die from outside (SIGKILL, the OOM killer, a
//!   TERM that ends it with status 0) or by its own fault (SIGSEGV, exit 1), young or
//!   old;
//! - the successor master of an upgrade: not started, aborted by the pid file,
//!   exits before it is ready (saying why or not), says it failed, closes its pipe,
//!   never says anything (the upgrade times out), or becomes ready, taking the
//!   connections or not;
//! - the pid file's place: FILE and FILE.oldbin, each ours, the successor's or
//!   absent;
//! - console clients, one per command, each to be answered exactly once;
//! - the shell's loop: a pass reaps every dead child, reads the workers' reports,
//!   answers a pending memory sample, then feeds `Beats` and `Tick` at the same
//!   time. Time only moves at a pass (or a suspension: a big jump, with or without
//!   the workers frozen too).
//!
//! A run is a [`Scenario`]: random `Settings` and `Facts`, and a list of [`Step`]s
//! generated from its seed. Actions the supervisor needs answered are answered by
//! the world at once, as told by knobs that earlier steps set ("the next 2 forks
//! fail", "the next reload reads a bad configuration"), and a step about "worker
//! k" picks k modulo the live workers (and does nothing when there is none): so
//! deleting steps keeps the others meaningful, and a failing run is shrunk by
//! delta debugging to the shortest list that still breaks the same invariant. A run
//! ends at `Exit`; after its steps, a finale stops the master (TERM) and passes
//! time until it exits.
//!
//! # The invariants
//!
//! Checked after every event fed (and every action carried out), each named by one
//! of the constants below: slots never over-served (1) and filled after a pass (2),
//! never twice in one generation (3); only our unreaped children are signalled and
//! reaped children are forgotten (4); a stop ends, cleanly, with the pid file where
//! raasd(8) says (5); an upgrade ends in exactly one way (6); backoff only holds
//! back young own failures and for at most `BACKOFF_MAX` (7); heartbeats kill only
//! the silent (8); totals never decrease (9); console answers (10); forks (11);
//! wake-ups (12).
//!
//! `RAASD_SIM_SEED=S` plays seed S alone; `RAASD_SIM_STEPS=N` plays N steps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::health::{BACKOFF_MAX, Exit};
use super::workers::{self, Life};
use super::{
    Action, Client, Command, Event, Exited, FORK_RETRY, Facts, Notice, Order, Pid, PidFileStep,
    Served, Settings, Signal, Supervisor, Totals, Upgrade,
};

const SLOT_OVERSERVED: &str = "1 never more workers serving a slot than the target allows";
const SLOT_UNFILLED: &str = "2 after a pass every slot below the target has a worker or a reason";
const SLOT_FILLED_TWICE: &str = "3 no slot filled twice in one generation";
const ONLY_OUR_LIVE_CHILDREN: &str =
    "4 only our unreaped children are told or killed, and reaped ones are forgotten";
const STOP_ENDS: &str = "5 a stop always ends, and ends clean";
const UPGRADE_ENDS_ONCE: &str = "6 an upgrade ends in exactly one way";
const BACKOFF_BOUNDED: &str = "7 backoff holds back only young own failures, at most BACKOFF_MAX";
const HEARTBEAT_FAIR: &str = "8 heartbeats kill only workers silent past their timeout";
const TOTALS_GROW: &str = "9 totals never decrease";
const ANSWERED_ONCE: &str = "10 every console command is answered exactly once";
const FORKS_SOUND: &str = "11 Spawn only while not stopping, below the target, on a free cell";
const WAKES_IN_TIME: &str = "12 the loop is woken by the next due timer";

/// The default budget of each random-world test (they run in parallel).
const DEFAULT_STEPS_PER_TEST: usize = 60_000;
/// How many tests share RAASD_SIM_STEPS.
const RANDOM_WORLD_TESTS: usize = 2;
/// The finale's passes: more than any drain delay plus graceful timeout here.
const FINALE_PASSES: usize = 60;

// ---- randomness ------------------------------------------------------------------

/// splitmix64: tiny, fast, and good enough to spread scenarios.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---- the steps -------------------------------------------------------------------

/// How a worker dies when nobody asked it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    KilledFromOutside,
    OomKilled,
    /// A TERM from outside: it stops cleanly, status 0.
    StoppedFromOutside,
    Segfault,
    ErrorExit,
}

impl Death {
    fn exit(self) -> (Exit, bool) {
        match self {
            Death::KilledFromOutside => (Exit::Signal("SIGKILL"), false),
            Death::OomKilled => (Exit::Signal("SIGKILL"), true),
            Death::StoppedFromOutside => (Exit::Status(0), false),
            Death::Segfault => (Exit::Signal("SIGSEGV"), false),
            Death::ErrorExit => (Exit::Status(1), false),
        }
    }
}

/// What the next `Reload` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReloadOutcome {
    BadConfig,
    Good { workers: usize, timeout_secs: u64 },
}

/// How the next `StartUpgrade` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpgradeStart {
    Started,
    /// The binary cannot be executed (FILE was renamed already).
    NotStarted,
    /// FILE cannot be renamed: nothing is started.
    PidFileStuck,
}

/// What the successor does next (only while the old master waits for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SuccessorMove {
    Ready {
        takes_connections: bool,
    },
    /// Writes "E<why>" on its pipe and exits.
    SaysItFailed,
    /// Its pipe ends without a word, and it exits.
    ClosesItsPipe,
    /// Exits (reaped at the next pass), having said why or not.
    Exits {
        said: bool,
    },
}

/// What the old master leaves when this one was started by an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Farewell {
    Totals,
    Nothing,
    Garbage,
}

/// A deliberate fault of the world, for the tests that prove the checker can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mischief {
    /// The next pass reads every heartbeat age as a minute (a shell reading the
    /// wrong scoreboard cells).
    OverstateBeatAges,
    /// The shell stops reaping (a lost SIGCHLD, forever).
    StopReaping,
}

/// One thing that happens in the world. Knobs (`ForkFails`, `Next…`) feed nothing:
/// they decide how the world answers later actions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Time passes (`after_ms`, or until the supervisor's `wake_at` when
    /// `until_wake`), then one pass of the shell's loop.
    Pass {
        after_ms: u64,
        until_wake: bool,
    },
    /// The master (and, `whole_tree`, its workers) did not run for `secs`; then a pass.
    Suspend {
        secs: u64,
        whole_tree: bool,
    },
    Signal(Signal, usize),
    Console(Command),
    WorkerDies {
        k: usize,
        how: Death,
    },
    WorkerHangs {
        k: usize,
    },
    WorkerBeatsLate {
        k: usize,
        ms: u64,
    },
    WorkerRefusesToStop {
        k: usize,
    },
    WorkerReachesMaxRequests {
        k: usize,
    },
    WorkerBloats {
        k: usize,
    },
    ForkFails {
        times: usize,
    },
    NextWorkerDiesAtStart,
    NextReload(ReloadOutcome),
    NextUpgrade(UpgradeStart),
    Successor(SuccessorMove),
    Farewell(Farewell),
    Mischief(Mischief),
}

fn random_signal(rng: &mut Rng) -> Signal {
    match rng.below(100) {
        0..=19 => Signal::Ttin,
        20..=39 => Signal::Ttou,
        40..=54 => Signal::Hup,
        55..=69 => Signal::Usr2,
        70..=74 => Signal::Usr1,
        75..=79 => Signal::Winch { on_terminal: true },
        80..=84 => Signal::Winch { on_terminal: false },
        85..=89 => Signal::Chld,
        90..=95 => Signal::Term,
        96..=97 => Signal::Quit,
        _ => Signal::Int,
    }
}

fn random_death(rng: &mut Rng) -> Death {
    match rng.below(5) {
        0 => Death::KilledFromOutside,
        1 => Death::OomKilled,
        2 => Death::StoppedFromOutside,
        3 => Death::Segfault,
        _ => Death::ErrorExit,
    }
}

fn random_step(rng: &mut Rng) -> Step {
    let k = rng.below(8) as usize;
    match rng.below(1000) {
        0..=339 => Step::Pass {
            after_ms: if rng.chance(10) {
                rng.range(2_000, 7_000)
            } else {
                rng.range(0, 1_500)
            },
            until_wake: rng.chance(30),
        },
        340..=359 => Step::Suspend {
            secs: rng.range(3, 40),
            whole_tree: rng.chance(50),
        },
        360..=469 => {
            let signal = random_signal(rng);
            // A stop ends the run: keep them rare, so that runs live long.
            let signal =
                if matches!(signal, Signal::Term | Signal::Quit | Signal::Int) && rng.chance(70) {
                    Signal::Ttin
                } else {
                    signal
                };
            Step::Signal(signal, rng.range(1, 3) as usize)
        }
        470..=529 => Step::Console(match rng.below(20) {
            0..=5 => Command::Workers(rng.below(8) as usize),
            6..=10 => Command::Reload,
            11..=15 => Command::Upgrade,
            16 => Command::Stop {
                quick: rng.chance(50),
            },
            _ => Command::ReopenLogs,
        }),
        530..=629 => Step::WorkerDies {
            k,
            how: random_death(rng),
        },
        630..=649 => Step::WorkerHangs { k },
        650..=679 => Step::WorkerBeatsLate {
            k,
            ms: rng.range(0, 7_000),
        },
        680..=699 => Step::WorkerRefusesToStop { k },
        700..=729 => Step::WorkerReachesMaxRequests { k },
        730..=749 => Step::WorkerBloats { k },
        750..=769 => Step::ForkFails {
            times: rng.range(1, 3) as usize,
        },
        770..=799 => Step::NextWorkerDiesAtStart,
        800..=829 => Step::NextReload(if rng.chance(40) {
            ReloadOutcome::BadConfig
        } else {
            ReloadOutcome::Good {
                workers: rng.below(7) as usize,
                timeout_secs: if rng.chance(40) { 0 } else { rng.range(1, 4) },
            }
        }),
        830..=859 => Step::NextUpgrade(match rng.below(4) {
            0 => UpgradeStart::NotStarted,
            1 => UpgradeStart::PidFileStuck,
            _ => UpgradeStart::Started,
        }),
        860..=969 => Step::Successor(match rng.below(6) {
            0 | 1 => SuccessorMove::Ready {
                takes_connections: rng.chance(50),
            },
            2 => SuccessorMove::SaysItFailed,
            3 => SuccessorMove::ClosesItsPipe,
            _ => SuccessorMove::Exits {
                said: rng.chance(50),
            },
        }),
        _ => Step::Farewell(match rng.below(3) {
            0 => Farewell::Totals,
            1 => Farewell::Nothing,
            _ => Farewell::Garbage,
        }),
    }
}

/// One run: the configuration and the steps, all from one seed.
#[derive(Debug, Clone)]
struct Scenario {
    settings: Settings,
    facts: Facts,
    steps: Vec<Step>,
}

fn scenario(seed: u64) -> Scenario {
    let mut rng = Rng(seed);
    let workers = rng.below(7) as usize;
    let timeout_secs = if rng.chance(40) { 0 } else { rng.range(1, 4) };
    let settings = Settings {
        workers,
        timeout_secs,
        heartbeat: Duration::from_millis(rng.range(100, 1_000)),
        max_requests: if rng.chance(30) { 1_000 } else { 0 },
        max_requests_jitter: rng.below(50),
        max_worker_memory: if rng.chance(40) { 0 } else { 64 },
        handover: rng.chance(50),
        drain_delay: if rng.chance(50) {
            Duration::ZERO
        } else {
            Duration::from_secs(rng.range(1, 3))
        },
        graceful_timeout: Duration::from_secs(rng.range(1, 5)),
        upgrade_timeout: Duration::from_secs(rng.range(2, 10)),
        sandbox: rng.chance(50),
    };
    let max_workers = 8;
    let watchdog = if rng.chance(30) {
        Some(Duration::from_millis(rng.range(500, 3_000)))
    } else {
        None
    };
    let facts = Facts {
        generation: rng.range(1, 3),
        predecessor: rng.chance(20),
        pid_file: rng.chance(60),
        sockets_from_systemd: rng.chance(20),
        watchdog,
        // Small enough, sometimes, to run out.
        cells: if rng.chance(25) {
            rng.range(1, 4) as usize
        } else {
            2 * max_workers + 2
        },
        max_workers,
        seed: rng.next(),
    };
    let length = rng.range(30, 400);
    let steps = (0..length).map(|_| random_step(&mut rng)).collect();
    Scenario {
        settings,
        facts,
        steps,
    }
}

// ---- the world -----------------------------------------------------------------

/// A broken promise.
#[derive(Debug, Clone)]
struct Violation {
    invariant: &'static str,
    detail: String,
}

fn broken<T>(invariant: &'static str, detail: String) -> Result<T, Violation> {
    Err(Violation { invariant, detail })
}

/// A worker process as the world knows it (times are offsets from the world's start).
#[derive(Debug, Clone)]
struct SimWorker {
    slot: usize,
    cell: usize,
    spawned_at: Duration,
    alive: bool,
    reaped: bool,
    /// How it ended (when it is dead).
    exit: Exit,
    oom: bool,
    /// It died by its own fault (the world's word, not the supervisor's rule).
    own_fault: bool,
    last_beat: Duration,
    hung: bool,
    /// Beats paused until then (a worker beating late).
    beats_paused_until: Duration,
    refuses_to_stop: bool,
    told_to_stop: bool,
    killed: bool,
    said_ready: bool,
    bloated: bool,
}

impl SimWorker {
    fn is_running(&self) -> bool {
        self.alive && !self.hung
    }
}

#[derive(Debug, Clone)]
struct SimSuccessor {
    pid: Pid,
    alive: bool,
    reaped: bool,
    said: Option<String>,
}

/// Whose pid is in a pid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Us,
    Successor,
}

/// What the actions of one `handle` (and of the answers it asked for) did, for the
/// checks after it.
#[derive(Debug, Default)]
struct Emitted {
    killed: Vec<Pid>,
    heartbeat_kills: Vec<Pid>,
    closed_listeners: Option<bool>,
    exited: bool,
}

impl Emitted {
    /// Adds what an answer's actions did: a pass ends once its forks are answered,
    /// and its second half (the heartbeat kills) comes with the last answer.
    fn absorb(&mut self, answer: Emitted) {
        self.killed.extend(answer.killed);
        self.heartbeat_kills.extend(answer.heartbeat_kills);
        self.closed_listeners = answer.closed_listeners.or(self.closed_listeners);
        self.exited |= answer.exited;
    }
}

struct World {
    base: Instant,
    now: Duration,
    facts: Facts,
    sup: Supervisor,
    workers: BTreeMap<i32, SimWorker>,
    next_pid: i32,
    forks_to_fail: usize,
    next_dies_at_start: bool,
    next_reload: ReloadOutcome,
    next_upgrade: UpgradeStart,
    successor: Option<SimSuccessor>,
    /// FILE was ours when the upgrade began (it must come back on a rollback).
    pid_file_at_upgrade: bool,
    file: Option<Owner>,
    oldbin: Option<Owner>,
    listeners_closed: bool,
    next_client: Client,
    asked: BTreeSet<Client>,
    answered: BTreeSet<Client>,
    awaiting_upgrade: BTreeSet<Client>,
    told_predecessor: bool,
    farewell_heard: bool,
    memory_asked: Option<Vec<Pid>>,
    /// When the last `Tick` was fed, and since when heartbeats are due after the
    /// master was held up (the world's own model of health.rs's grace rule).
    last_tick: Duration,
    heartbeats_due_from: Option<Duration>,
    /// When the last failed fork may be retried.
    fork_retry_until: Option<Duration>,
    /// Slots whose worker was ended from outside: refilled at the next pass.
    refill_at_once: BTreeSet<usize>,
    /// A worker forked whose `Spawned` is not fed yet.
    unannounced: Option<i32>,
    overstate_beats: bool,
    reaping: bool,
    totals: Totals,
    exited: bool,
    /// Events fed, kept only to show a shrunk failure.
    trace: Option<Vec<String>>,
    /// How often the notable paths were taken (printed, to show what was covered).
    seen: BTreeMap<&'static str, usize>,
}

/// Notable log lines, counted to show what the runs covered.
const NOTABLE: [(&str, &str); 10] = [
    ("is ready; retiring", "hand-overs"),
    ("rolling back", "rollbacks"),
    ("upgrade aborted", "upgrades aborted"),
    ("is abandoned", "upgrades abandoned by a stop"),
    ("missed its heartbeat", "heartbeat kills"),
    ("did not stop in time", "stop deadline kills"),
    ("respawning in", "backoffs"),
    ("cannot fork", "failed forks"),
    ("no free scoreboard cell", "cells run out"),
    ("giving every worker", "master held up"),
];

fn pid_in(text: &str) -> Option<Pid> {
    let at = text.find(" pid ")? + 5;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().map(Pid)
}

impl World {
    fn new(settings: &Settings, facts: &Facts, traced: bool) -> World {
        let base = Instant::now();
        World {
            base,
            now: Duration::ZERO,
            facts: facts.clone(),
            sup: Supervisor::new(settings.clone(), facts.clone(), base),
            workers: BTreeMap::new(),
            next_pid: 100,
            forks_to_fail: 0,
            next_dies_at_start: false,
            next_reload: ReloadOutcome::Good {
                workers: settings.workers,
                timeout_secs: settings.timeout_secs,
            },
            next_upgrade: UpgradeStart::Started,
            successor: None,
            pid_file_at_upgrade: false,
            file: (facts.pid_file && !facts.predecessor).then_some(Owner::Us),
            oldbin: None,
            listeners_closed: false,
            next_client: 1,
            asked: BTreeSet::new(),
            answered: BTreeSet::new(),
            awaiting_upgrade: BTreeSet::new(),
            told_predecessor: false,
            farewell_heard: false,
            memory_asked: None,
            last_tick: Duration::ZERO,
            heartbeats_due_from: None,
            fork_retry_until: None,
            refill_at_once: BTreeSet::new(),
            unannounced: None,
            overstate_beats: false,
            reaping: true,
            totals: Totals::default(),
            exited: false,
            trace: traced.then(Vec::new),
            seen: BTreeMap::new(),
        }
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    fn next_pid(&mut self) -> Pid {
        self.next_pid += 1;
        Pid(self.next_pid)
    }

    /// The live workers, for steps about "worker k".
    fn pick_live(&self, k: usize) -> Option<i32> {
        let live: Vec<i32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.alive)
            .map(|(&pid, _)| pid)
            .collect();
        (!live.is_empty()).then(|| live[k % live.len()])
    }

    fn timeout_ms(&self) -> u64 {
        self.sup.settings().timeout_secs * 1000
    }

    fn heartbeat(&self) -> Duration {
        self.sup.settings().heartbeat
    }

    /// Workers that run beat every heartbeat since their start; a paused one beats
    /// again as it resumes.
    fn workers_beat(&mut self) {
        let (now, beat) = (self.now, self.heartbeat());
        for w in self.workers.values_mut().filter(|w| w.is_running()) {
            if now < w.beats_paused_until {
                continue;
            }
            let on_schedule = now
                - Duration::from_nanos(
                    ((now - w.spawned_at).as_nanos() % beat.as_nanos().max(1)) as u64,
                );
            w.last_beat = w.last_beat.max(on_schedule).max(w.beats_paused_until);
        }
    }

    // ---- steps --------------------------------------------------------------

    fn play(&mut self, step: &Step) -> Result<(), Violation> {
        match step {
            Step::Pass {
                after_ms,
                until_wake,
            } => {
                let after = match self.sup.wake_at() {
                    Some(wake) if *until_wake => wake
                        .saturating_duration_since(self.at())
                        .min(Duration::from_secs(5)),
                    _ => Duration::from_millis(*after_ms),
                };
                self.pass(after, false)?;
            }
            Step::Suspend { secs, whole_tree } => {
                self.pass(Duration::from_secs(*secs), *whole_tree)?
            }
            Step::Signal(signal, times) => self.feed(Event::Signal(*signal, *times))?,
            Step::Console(command) => {
                let client = self.next_client;
                self.next_client += 1;
                self.asked.insert(client);
                self.feed(Event::Console(client, command.clone()))?;
            }
            Step::WorkerDies { k, how } => {
                if let Some(pid) = self.pick_live(*k) {
                    let (exit, oom) = how.exit();
                    let w = self.workers.get_mut(&pid).expect("picked");
                    (w.alive, w.exit, w.oom) = (false, exit, oom);
                    w.own_fault = matches!(how, Death::Segfault | Death::ErrorExit);
                }
            }
            Step::WorkerHangs { k } => {
                if let Some(pid) = self.pick_live(*k) {
                    self.workers.get_mut(&pid).expect("picked").hung = true;
                }
            }
            Step::WorkerBeatsLate { k, ms } => {
                if let Some(pid) = self.pick_live(*k) {
                    let until = self.now + Duration::from_millis(*ms);
                    self.workers
                        .get_mut(&pid)
                        .expect("picked")
                        .beats_paused_until = until;
                }
            }
            Step::WorkerRefusesToStop { k } => {
                if let Some(pid) = self.pick_live(*k) {
                    self.workers.get_mut(&pid).expect("picked").refuses_to_stop = true;
                }
            }
            Step::WorkerReachesMaxRequests { k } => {
                if let Some(pid) = self.pick_live(*k)
                    && !self.workers[&pid].hung
                {
                    self.feed(Event::Said(Pid(pid), super::Said::ReplaceMe))?;
                }
            }
            Step::WorkerBloats { k } => {
                if let Some(pid) = self.pick_live(*k) {
                    self.workers.get_mut(&pid).expect("picked").bloated = true;
                }
            }
            Step::ForkFails { times } => self.forks_to_fail += times,
            Step::NextWorkerDiesAtStart => self.next_dies_at_start = true,
            Step::NextReload(outcome) => self.next_reload = *outcome,
            Step::NextUpgrade(start) => self.next_upgrade = *start,
            Step::Successor(next) => self.successor_moves(*next)?,
            Step::Farewell(farewell) => {
                if self.told_predecessor && !self.farewell_heard {
                    self.farewell_heard = true;
                    let heard = match farewell {
                        Farewell::Totals => {
                            let mut theirs = Totals {
                                requests: 7,
                                connections_accepted: 3,
                                ..Totals::default()
                            };
                            theirs.count_restart("reload");
                            Some(serde_json::to_string(&theirs).expect("totals serialize"))
                        }
                        Farewell::Nothing => None,
                        Farewell::Garbage => Some("{not json".to_string()),
                    };
                    self.feed(Event::Farewell(heard))?;
                }
            }
            Step::Mischief(Mischief::OverstateBeatAges) => self.overstate_beats = true,
            Step::Mischief(Mischief::StopReaping) => self.reaping = false,
        }
        self.check_console()
    }

    fn successor_moves(&mut self, next: SuccessorMove) -> Result<(), Violation> {
        let Some(successor) = self.successor.clone().filter(|s| s.alive) else {
            return Ok(());
        };
        // The shell reads the readiness pipe only while it waits for this successor.
        if !matches!(self.sup.upgrade(), Upgrade::Waiting { successor: p, .. } if p == successor.pid)
        {
            return Ok(());
        }
        let succ = self.successor.as_mut().expect("checked");
        match next {
            SuccessorMove::Ready { takes_connections } => {
                if self.facts.pid_file {
                    self.file = Some(Owner::Successor);
                }
                self.feed(Event::SuccessorReady { takes_connections })
            }
            SuccessorMove::SaysItFailed => {
                let why = "bad configuration key".to_string();
                (succ.alive, succ.said) = (false, Some(why.clone()));
                self.feed(Event::SuccessorFailed(Some(why)))
            }
            SuccessorMove::ClosesItsPipe => {
                succ.alive = false;
                self.feed(Event::SuccessorFailed(None))
            }
            SuccessorMove::Exits { said } => {
                succ.alive = false;
                succ.said = said.then(|| "cannot bind the control socket".to_string());
                Ok(())
            }
        }
    }

    /// One pass of the shell's loop after `after` has passed.
    fn pass(&mut self, after: Duration, whole_tree_frozen: bool) -> Result<(), Violation> {
        self.now += after;
        if !whole_tree_frozen {
            self.workers_beat();
        }
        // Workers told to stop have finished by now, unless they refuse or hang.
        for w in self.workers.values_mut() {
            if w.told_to_stop && w.is_running() && !w.refuses_to_stop {
                (w.alive, w.exit, w.oom) = (false, Exit::Status(0), false);
            }
        }
        if self.reaping {
            self.reap()?;
        }
        let starting: Vec<i32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.is_running() && !w.said_ready)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in starting {
            self.workers.get_mut(&pid).expect("listed").said_ready = true;
            self.feed(Event::Said(Pid(pid), super::Said::Ready))?;
        }
        if let Some(pids) = self.memory_asked.take() {
            let usage = pids
                .iter()
                .filter_map(|pid| self.workers.get(&pid.0).filter(|w| w.alive))
                .zip(pids.iter())
                .map(|(w, &pid)| (pid, if w.bloated { 512 << 20 } else { 16 << 20 }))
                .collect();
            self.feed(Event::MemorySampled(usage))?;
        }
        let ages = self
            .sup
            .workers()
            .iter()
            .map(|w| {
                let age = if self.overstate_beats {
                    60_000
                } else {
                    self.beat_age_ms(w.pid)
                };
                (w.pid, age)
            })
            .collect();
        self.overstate_beats = false;
        self.feed(Event::Beats(ages))?;
        self.feed(Event::Tick)?;
        if whole_tree_frozen {
            // The tree runs again: the workers beat as they resume.
            self.workers_beat();
            let now = self.now;
            for w in self.workers.values_mut().filter(|w| w.is_running()) {
                if now >= w.beats_paused_until {
                    w.last_beat = now;
                }
            }
        }
        Ok(())
    }

    fn beat_age_ms(&self, pid: Pid) -> u64 {
        self.workers
            .get(&pid.0)
            .map_or(0, |w| (self.now - w.last_beat).as_millis() as u64)
    }

    /// Reports every dead child, once.
    fn reap(&mut self) -> Result<(), Violation> {
        let dead: Vec<i32> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.alive && !w.reaped)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in dead {
            let w = self.workers.get_mut(&pid).expect("listed");
            w.reaped = true;
            let (exit, oom, own_fault) = (w.exit, w.oom, w.own_fault);
            let asked_for = w.told_to_stop || w.killed;
            let slot = w.slot;
            let was_current = self
                .sup
                .worker(Pid(pid))
                .is_some_and(|sw| sw.is_current(self.sup.generation()));
            let served = Served {
                requests: (pid % 7) as u64,
                accepted: (pid % 5) as u64,
                taken_over: (pid % 2) as u64,
                bytes_received: 100,
                bytes_sent: 1_000,
            };
            self.feed(Event::ChildExited(Exited {
                pid: Pid(pid),
                exit,
                oom_rose: oom,
                served,
                said: None,
            }))?;
            if self.sup.worker(Pid(pid)).is_some() {
                return broken(
                    ONLY_OUR_LIVE_CHILDREN,
                    format!("pid {pid} still listed after its exit was reported"),
                );
            }
            if !asked_for && was_current && !own_fault && !self.sup.is_stopping() {
                self.refill_at_once.insert(slot);
            }
        }
        if let Some(s) = self.successor.as_mut()
            && !s.alive
            && !s.reaped
        {
            s.reaped = true;
            let exited = Exited {
                pid: s.pid,
                exit: Exit::Status(1),
                oom_rose: false,
                served: Served::default(),
                said: s.said.clone(),
            };
            self.feed(Event::ChildExited(exited))?;
        }
        Ok(())
    }

    // ---- feeding and answering ------------------------------------------------

    /// Feeds one event, carries out its actions, checks, then feeds the answers the
    /// actions asked for (before anything else).
    fn feed(&mut self, event: Event) -> Result<(), Violation> {
        self.feed_and_tell(event).map(drop)
    }

    /// [`World::feed`], returning what the event's actions and its answers' did.
    fn feed_and_tell(&mut self, event: Event) -> Result<Emitted, Violation> {
        if self.exited {
            return Ok(Emitted::default());
        }
        if let Some(trace) = &mut self.trace {
            trace.push(format!("t={}ms {event:?}", self.now.as_millis()));
        }
        if let Event::Spawned(pid) = event
            && self.unannounced == Some(pid.0)
        {
            self.unannounced = None;
        }
        let is_tick = event == Event::Tick;
        let stop_before = self.sup.stopping();
        let upgrade_before = self.sup.upgrade();
        let beat_rule = is_tick.then(|| self.heartbeat_rule_at_tick());
        let actions = self.sup.handle(event, self.at());
        let mut emitted = Emitted::default();
        let mut answers = Vec::new();
        for action in actions {
            self.carry_out(action, &mut emitted, &mut answers)?;
        }
        if let (Some(before), Some(after)) = (stop_before, self.sup.stopping())
            && before.quick
            && !after.quick
        {
            return broken(STOP_ENDS, "a quick stop turned graceful".into());
        }
        if stop_before.is_some() && self.sup.stopping().is_none() && !emitted.exited {
            return broken(STOP_ENDS, "a stop was called off".into());
        }
        self.check_state(upgrade_before, &emitted)?;
        for answer in answers {
            let answered = self.feed_and_tell(answer)?;
            emitted.absorb(answered);
        }
        // A pass is judged once the forks it asked for are answered.
        if let Some(rule) = beat_rule {
            self.check_heartbeat_kills(rule, &emitted)?;
            self.check_after_tick(&emitted)?;
        }
        Ok(emitted)
    }

    fn carry_out(
        &mut self,
        action: Action,
        emitted: &mut Emitted,
        answers: &mut Vec<Event>,
    ) -> Result<(), Violation> {
        if let Some(trace) = &mut self.trace
            && !matches!(action, Action::Log(_))
        {
            trace.push(format!("    -> {action:?}"));
        }
        match action {
            Action::Log(line) => {
                for (text, name) in NOTABLE {
                    if line.text.contains(text) {
                        *self.seen.entry(name).or_default() += 1;
                    }
                }
                if line.text.contains("missed its heartbeat")
                    && let Some(pid) = pid_in(&line.text)
                {
                    emitted.heartbeat_kills.push(pid);
                }
            }
            Action::Spawn {
                slot,
                generation,
                cell,
                ..
            } => {
                if self.sup.is_stopping() {
                    return broken(FORKS_SOUND, format!("Spawn of slot {slot} while stopping"));
                }
                if slot >= self.sup.target() || generation != self.sup.generation() {
                    return broken(
                        FORKS_SOUND,
                        format!(
                            "Spawn of slot {slot} gen {generation} (target {}, gen {})",
                            self.sup.target(),
                            self.sup.generation()
                        ),
                    );
                }
                let taken = self.workers.values().any(|w| !w.reaped && w.cell == cell);
                if cell >= self.facts.cells || taken {
                    return broken(FORKS_SOUND, format!("Spawn on cell {cell}, not free"));
                }
                if self.forks_to_fail > 0 {
                    self.forks_to_fail -= 1;
                    self.fork_retry_until = Some(self.now + FORK_RETRY);
                    answers.push(Event::SpawnFailed(
                        "Resource temporarily unavailable".into(),
                    ));
                } else {
                    let pid = self.next_pid();
                    let dies = std::mem::take(&mut self.next_dies_at_start);
                    self.workers.insert(
                        pid.0,
                        SimWorker {
                            slot,
                            cell,
                            spawned_at: self.now,
                            alive: !dies,
                            reaped: false,
                            exit: Exit::Status(1),
                            oom: false,
                            own_fault: dies,
                            last_beat: self.now,
                            hung: false,
                            beats_paused_until: Duration::ZERO,
                            refuses_to_stop: false,
                            told_to_stop: false,
                            killed: false,
                            said_ready: false,
                            bloated: false,
                        },
                    );
                    self.unannounced = Some(pid.0);
                    answers.push(Event::Spawned(pid));
                }
            }
            Action::Tell(pid, order) => {
                let w = self.our_unreaped_worker(pid, &format!("Tell({pid}, {order:?})"))?;
                if matches!(
                    order,
                    Order::GracefulStop | Order::HandOver | Order::QuickStop
                ) {
                    w.told_to_stop = true;
                }
            }
            Action::Kill(pid) => {
                let w = self.our_unreaped_worker(pid, &format!("Kill({pid})"))?;
                w.killed = true;
                if w.alive {
                    (w.alive, w.exit, w.oom) = (false, Exit::Signal("SIGKILL"), false);
                }
                emitted.killed.push(pid);
            }
            Action::FlushConsole => {}
            Action::CloseConsole { remove_files } => {
                // After a hand-over the control socket's file is the successor's.
                if remove_files && matches!(self.sup.upgrade(), Upgrade::HandedOver { .. }) {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        "removes the console's files after handing over".into(),
                    );
                }
            }
            Action::ReopenLogs | Action::EndAbandoned(_) => {}
            Action::Reload { asked_by } => {
                let outcome = match self.next_reload {
                    ReloadOutcome::BadConfig => Err("unknown key `wokers`".to_string()),
                    ReloadOutcome::Good {
                        workers,
                        timeout_secs,
                    } => Ok(Settings {
                        workers,
                        timeout_secs,
                        ..self.sup.settings().clone()
                    }),
                };
                answers.push(Event::Reloaded { asked_by, outcome });
            }
            Action::StartUpgrade { .. } => {
                self.pid_file_at_upgrade = self.file == Some(Owner::Us);
                if self.next_upgrade != UpgradeStart::PidFileStuck && self.file == Some(Owner::Us) {
                    (self.file, self.oldbin) = (None, Some(Owner::Us));
                }
                answers.push(match self.next_upgrade {
                    UpgradeStart::PidFileStuck => {
                        Event::UpgradeAborted("cannot rename the pid file".into())
                    }
                    UpgradeStart::NotStarted => {
                        Event::SuccessorNotStarted("cannot execute the binary".into())
                    }
                    UpgradeStart::Started => {
                        let pid = self.next_pid();
                        self.successor = Some(SimSuccessor {
                            pid,
                            alive: true,
                            reaped: false,
                            said: None,
                        });
                        Event::SuccessorStarted(pid)
                    }
                });
            }
            Action::AbandonSuccessor(pid) => match self.successor.as_mut() {
                Some(s) if s.pid == pid => s.alive = false,
                _ => {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        format!("abandons pid {pid}, not the successor"),
                    );
                }
            },
            Action::PidFile(step) => self.move_pid_file(step)?,
            Action::Notify(Notice::HandedTo(pid)) => {
                if self.successor.as_ref().map(|s| s.pid) != Some(pid) {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        format!("hands over to {pid}, a stranger"),
                    );
                }
            }
            Action::Notify(_) => {}
            Action::TellPredecessorReady => {
                if !self.facts.predecessor || self.told_predecessor {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        "tells a predecessor it serves: none, or twice".into(),
                    );
                }
                self.told_predecessor = true;
            }
            Action::HandOnTotals(_) => {
                if !matches!(self.sup.upgrade(), Upgrade::HandedOver { .. }) {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        "hands on totals without a hand-over".into(),
                    );
                }
            }
            Action::SampleMemory(pids) => {
                for &pid in &pids {
                    self.our_unreaped_worker(pid, &format!("SampleMemory of {pid}"))?;
                }
                self.memory_asked = Some(pids);
            }
            Action::Reply(client, _) => self.answer(client)?,
            Action::AwaitUpgrade(client) => {
                self.awaiting_upgrade.insert(client);
            }
            Action::AnswerUpgradeWaiters(_) => {
                for client in std::mem::take(&mut self.awaiting_upgrade) {
                    self.answer(client)?;
                }
            }
            Action::CloseListeners { refuse_first } => {
                if !self.sup.is_stopping() {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        "CloseListeners outside a stop: nobody would serve".into(),
                    );
                }
                let handed_over = matches!(self.sup.upgrade(), Upgrade::HandedOver { .. });
                if refuse_first && (handed_over || self.facts.sockets_from_systemd) {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        "CloseListeners{refuse_first:true} on sockets that are not ours alone"
                            .into(),
                    );
                }
                self.listeners_closed = true;
                emitted.closed_listeners = Some(refuse_first);
            }
            Action::Exit(_) => {
                emitted.exited = true;
                self.exited = true;
                self.check_exit()?;
            }
        }
        Ok(())
    }

    fn our_unreaped_worker(&mut self, pid: Pid, what: &str) -> Result<&mut SimWorker, Violation> {
        match self.workers.get_mut(&pid.0) {
            Some(w) if !w.reaped => Ok(w),
            Some(_) => Err(Violation {
                invariant: ONLY_OUR_LIVE_CHILDREN,
                detail: format!("{what}: pid {pid} was reaped already"),
            }),
            None => Err(Violation {
                invariant: ONLY_OUR_LIVE_CHILDREN,
                detail: format!("{what}: pid {pid} is not a worker we forked"),
            }),
        }
    }

    fn answer(&mut self, client: Client) -> Result<(), Violation> {
        self.awaiting_upgrade.remove(&client);
        if !self.asked.contains(&client) {
            return broken(
                ANSWERED_ONCE,
                format!("answers client {client}, who never asked"),
            );
        }
        if !self.answered.insert(client) {
            return broken(ANSWERED_ONCE, format!("answers client {client} twice"));
        }
        Ok(())
    }

    fn move_pid_file(&mut self, step: PidFileStep) -> Result<(), Violation> {
        match step {
            PidFileStep::Write => {
                if !self.facts.pid_file || !self.facts.predecessor {
                    return broken(STOP_ENDS, "writes a pid file it should not".into());
                }
                self.file = Some(Owner::Us);
            }
            PidFileStep::Back => {
                if self.oldbin != Some(Owner::Us) {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        "renames back a FILE.oldbin it lacks".into(),
                    );
                }
                (self.file, self.oldbin) = (Some(Owner::Us), None);
            }
            PidFileStep::Remove => {
                if self.oldbin == Some(Owner::Us) {
                    self.oldbin = None;
                } else if self.file == Some(Owner::Us) {
                    self.file = None;
                } else {
                    return broken(
                        STOP_ENDS,
                        format!(
                            "removes a pid file that is not ours (FILE {:?}, FILE.oldbin {:?})",
                            self.file, self.oldbin
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    // ---- the checks -------------------------------------------------------------

    /// Invariants 1, 3, 4, 6, 7 (the bound), 9, after every event.
    fn check_state(&mut self, upgrade_before: Upgrade, emitted: &Emitted) -> Result<(), Violation> {
        if !self.sup.totals().covers(&self.totals) {
            return broken(
                TOTALS_GROW,
                format!("{:?} after {:?}", self.sup.totals(), self.totals),
            );
        }
        self.totals = self.sup.totals().clone();
        if emitted.exited {
            return Ok(());
        }
        let generation = self.sup.generation();
        let target = self.sup.target();
        let mut current_per_slot: BTreeMap<usize, usize> = BTreeMap::new();
        let mut serving: BTreeMap<(usize, u64), usize> = BTreeMap::new();
        for w in self.sup.workers() {
            match self.workers.get(&w.pid.0) {
                Some(sim) if !sim.reaped => {}
                _ => {
                    return broken(
                        ONLY_OUR_LIVE_CHILDREN,
                        format!("workers() lists pid {}, not an unreaped child", w.pid),
                    );
                }
            }
            if w.is_current(generation) {
                *current_per_slot.entry(w.slot).or_default() += 1;
            }
            if matches!(w.life, Life::Starting | Life::Accepting) {
                *serving.entry((w.slot, w.generation)).or_default() += 1;
            }
        }
        if let Some((slot, n)) = current_per_slot.iter().find(|(_, n)| **n > 1) {
            return broken(
                SLOT_OVERSERVED,
                format!("{n} current workers in slot {slot}"),
            );
        }
        if let Some(((slot, g), n)) = serving.iter().find(|(_, n)| **n > 1) {
            return broken(
                SLOT_FILLED_TWICE,
                format!("{n} serving workers in slot {slot} of generation {g}"),
            );
        }
        let current = current_per_slot.values().sum::<usize>();
        let replaced = self
            .sup
            .workers()
            .iter()
            .filter(|w| {
                w.generation < generation
                    || matches!(w.life, Life::Replacing | Life::Retiring | Life::Killed(_))
            })
            .count();
        if self.sup.workers().len() > target.max(current) + replaced {
            return broken(
                SLOT_OVERSERVED,
                format!(
                    "{} workers for a target of {target} with {replaced} being replaced",
                    self.sup.workers().len()
                ),
            );
        }
        let known: BTreeSet<i32> = self.sup.workers().iter().map(|w| w.pid.0).collect();
        if let Some((pid, _)) = self
            .workers
            .iter()
            .find(|(pid, w)| !w.reaped && !known.contains(pid) && self.unannounced != Some(**pid))
        {
            return broken(
                ONLY_OUR_LIVE_CHILDREN,
                format!("pid {pid} is an unreaped child the supervisor forgot"),
            );
        }
        for slot in 0..target {
            if let Some(at) = self.sup.held_back_until(slot)
                && at > self.at() + BACKOFF_MAX
            {
                return broken(
                    BACKOFF_BOUNDED,
                    format!("slot {slot} held back {:?}", at.duration_since(self.at())),
                );
            }
        }
        self.check_upgrade(upgrade_before, emitted)
    }

    /// Invariant 6: an upgrade ends handed over, or rolled back, never both, and
    /// every client waiting for it is answered by then.
    fn check_upgrade(&mut self, before: Upgrade, emitted: &Emitted) -> Result<(), Violation> {
        let after = self.sup.upgrade();
        let in_flight = |u: Upgrade| matches!(u, Upgrade::Starting | Upgrade::Waiting { .. });
        match (before, after) {
            (Upgrade::HandedOver { .. }, Upgrade::HandedOver { .. }) => {}
            (Upgrade::HandedOver { .. }, other) => {
                return broken(UPGRADE_ENDS_ONCE, format!("handed over, then {other:?}"));
            }
            (_, Upgrade::HandedOver { successor, .. })
                if !self.sup.is_stopping() || emitted.closed_listeners != Some(false) =>
            {
                return broken(
                    UPGRADE_ENDS_ONCE,
                    format!(
                        "handed over to {successor} without stopping and closing the \
                         listeners as the successor's (closed: {:?})",
                        emitted.closed_listeners
                    ),
                );
            }
            (b, Upgrade::Idle) if in_flight(b) && !self.sup.is_stopping() => {
                let back = !self.pid_file_at_upgrade
                    || (self.file == Some(Owner::Us) && self.oldbin.is_none());
                if !back || self.listeners_closed {
                    return broken(
                        UPGRADE_ENDS_ONCE,
                        format!(
                            "rolled back with FILE {:?}, FILE.oldbin {:?}, listeners closed: {}",
                            self.file, self.oldbin, self.listeners_closed
                        ),
                    );
                }
            }
            _ => {}
        }
        if !in_flight(after) && !self.awaiting_upgrade.is_empty() {
            return broken(
                ANSWERED_ONCE,
                format!(
                    "clients {:?} still wait for an upgrade that is over ({after:?})",
                    self.awaiting_upgrade
                ),
            );
        }
        Ok(())
    }

    /// The world's model of the heartbeat rule at this tick: the kill threshold,
    /// and whether heartbeats are due at all (not after the master was held up).
    fn heartbeat_rule_at_tick(&mut self) -> HeartbeatRule {
        let timeout_ms = self.timeout_ms();
        let since_last_tick = self.now - self.last_tick;
        self.last_tick = self.now;
        let held_up = timeout_ms > 0 && since_last_tick.as_millis() as u64 > timeout_ms;
        if held_up {
            self.heartbeats_due_from = Some(self.now);
        }
        HeartbeatRule {
            limit_ms: timeout_ms + self.heartbeat().as_millis() as u64,
            held_up,
            due_for_ms: self
                .heartbeats_due_from
                .map_or(u64::MAX, |from| (self.now - from).as_millis() as u64),
        }
    }

    /// Invariant 8.
    fn check_heartbeat_kills(
        &self,
        rule: HeartbeatRule,
        emitted: &Emitted,
    ) -> Result<(), Violation> {
        for &pid in &emitted.heartbeat_kills {
            let age = self.beat_age_ms(pid);
            if rule.held_up || age <= rule.limit_ms || rule.due_for_ms <= rule.limit_ms {
                return broken(
                    HEARTBEAT_FAIR,
                    format!(
                        "killed pid {pid} for its heartbeat: it beat {age} ms ago (limit {} ms, \
                         master held up: {}, heartbeats due for {} ms)",
                        rule.limit_ms, rule.held_up, rule.due_for_ms
                    ),
                );
            }
        }
        Ok(())
    }

    /// Invariants 1, 2, 5, 7, 12 after a `Tick`.
    fn check_after_tick(&mut self, emitted: &Emitted) -> Result<(), Violation> {
        if emitted.exited {
            return Ok(());
        }
        let now = self.at();
        if let Some(stopping) = self.sup.stopping() {
            self.refill_at_once.clear();
            if now >= stopping.deadline
                && let Some(w) = self
                    .sup
                    .workers()
                    .iter()
                    .find(|w| !self.workers[&w.pid.0].killed)
            {
                return broken(
                    STOP_ENDS,
                    format!("past the stop's deadline, pid {} was not killed", w.pid),
                );
            }
            if self.workers.values().all(|w| w.reaped) {
                return broken(STOP_ENDS, "stopping, no worker left, and no Exit".into());
            }
            if !stopping.killed
                && self
                    .sup
                    .wake_at()
                    .is_none_or(|wake| wake > stopping.deadline)
            {
                return broken(WAKES_IN_TIME, "the stop's deadline is not a wake-up".into());
            }
            return Ok(());
        }
        let generation = self.sup.generation();
        let target = self.sup.target();
        let workers = self.sup.workers();
        if let Some(w) = workers
            .iter()
            .find(|w| w.slot >= target && w.is_current(generation))
        {
            return broken(
                SLOT_OVERSERVED,
                format!(
                    "pid {} still serves slot {} beyond the target {target}",
                    w.pid, w.slot
                ),
            );
        }
        let cell_free = workers::free_cell(workers, self.facts.cells).is_some();
        let wake = self.sup.wake_at();
        for slot in 0..target {
            if workers::current(workers, slot, generation).is_some() {
                continue;
            }
            // Unicorn's order: the pass fills slots, then kills the lazy; the killed
            // one's slot is filled at the next pass.
            let killed_now = workers
                .iter()
                .any(|w| w.slot == slot && emitted.heartbeat_kills.contains(&w.pid));
            let held_back = self.sup.held_back_until(slot);
            if held_back.is_none() && cell_free && !killed_now {
                return broken(
                    SLOT_UNFILLED,
                    format!("slot {slot} has no worker and no reason"),
                );
            }
            if let Some(at) = held_back {
                if self.refill_at_once.contains(&slot)
                    && Some(at) != self.fork_retry_until.map(|d| self.base + d)
                {
                    return broken(
                        BACKOFF_BOUNDED,
                        format!(
                            "slot {slot}, whose worker was ended from outside, is held back {:?}",
                            at.duration_since(now)
                        ),
                    );
                }
                if wake.is_none_or(|w| w > at) {
                    return broken(
                        WAKES_IN_TIME,
                        format!(
                            "slot {slot} is due at {:?} but the loop wakes at {:?}",
                            at.duration_since(now),
                            wake.map(|w| w.duration_since(now))
                        ),
                    );
                }
            }
        }
        self.refill_at_once.clear();
        if let Upgrade::Waiting { deadline, .. } = self.sup.upgrade()
            && wake.is_none_or(|w| w > deadline)
        {
            return broken(
                WAKES_IN_TIME,
                "the upgrade's deadline is not a wake-up".into(),
            );
        }
        Ok(())
    }

    /// Invariant 5 at `Exit`: no worker left, the pid file where raasd(8) says.
    fn check_exit(&self) -> Result<(), Violation> {
        if let Some((pid, _)) = self.workers.iter().find(|(_, w)| !w.reaped) {
            return broken(STOP_ENDS, format!("exits with worker pid {pid} not reaped"));
        }
        if self.file == Some(Owner::Us) || self.oldbin == Some(Owner::Us) {
            return broken(
                STOP_ENDS,
                format!(
                    "exits leaving its pid file (FILE {:?}, FILE.oldbin {:?})",
                    self.file, self.oldbin
                ),
            );
        }
        let handed_over = matches!(self.sup.upgrade(), Upgrade::HandedOver { .. });
        if handed_over && self.facts.pid_file && self.file != Some(Owner::Successor) {
            return broken(
                STOP_ENDS,
                format!(
                    "handed over, but FILE is {:?}, not the successor's",
                    self.file
                ),
            );
        }
        Ok(())
    }

    /// Invariant 10, after each step: every command is answered, or waits for the
    /// upgrade under way.
    fn check_console(&self) -> Result<(), Violation> {
        if self.exited {
            return Ok(());
        }
        let unanswered: Vec<&Client> = self
            .asked
            .iter()
            .filter(|c| !self.answered.contains(c) && !self.awaiting_upgrade.contains(c))
            .collect();
        if !unanswered.is_empty() {
            return broken(
                ANSWERED_ONCE,
                format!("clients {unanswered:?} got no answer"),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct HeartbeatRule {
    limit_ms: u64,
    held_up: bool,
    due_for_ms: u64,
}

// ---- runs, shrinking, reporting ---------------------------------------------

/// How a run went.
struct Outcome {
    steps: usize,
    violation: Option<Violation>,
    trace: Vec<String>,
    seen: BTreeMap<&'static str, usize>,
}

/// Plays `steps` on a fresh world, then the finale: TERM, and passes until `Exit`.
fn play(settings: &Settings, facts: &Facts, steps: &[Step], traced: bool) -> Outcome {
    let mut world = World::new(settings, facts, traced);
    let mut played = 0;
    let mut result = Ok(());
    for step in steps {
        if world.exited {
            break;
        }
        played += 1;
        result = world.play(step);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() && !world.exited {
        if !world.sup.is_stopping() {
            played += 1;
            result = world.play(&Step::Signal(Signal::Term, 1));
        }
        let mut passes = 0;
        while result.is_ok() && !world.exited {
            if passes == FINALE_PASSES {
                result = broken(
                    STOP_ENDS,
                    format!("no Exit {FINALE_PASSES} passes of a second into the final stop"),
                );
                break;
            }
            passes += 1;
            played += 1;
            result = world.play(&Step::Pass {
                after_ms: 1_000,
                until_wake: false,
            });
        }
    }
    Outcome {
        steps: played,
        violation: result.err(),
        trace: world.trace.unwrap_or_default(),
        seen: world.seen,
    }
}

/// Delta debugging: removes chunks, then single steps, as long as the run still
/// breaks `invariant`.
fn shrink(settings: &Settings, facts: &Facts, steps: &[Step], invariant: &str) -> Vec<Step> {
    let fails = |candidate: &[Step]| {
        play(settings, facts, candidate, false)
            .violation
            .is_some_and(|v| v.invariant == invariant)
    };
    let mut current = steps.to_vec();
    let mut chunk = current.len().div_ceil(2).max(1);
    loop {
        let mut at = 0;
        let mut removed = false;
        while at < current.len() {
            let end = (at + chunk).min(current.len());
            let candidate: Vec<Step> = current[..at]
                .iter()
                .chain(&current[end..])
                .cloned()
                .collect();
            if fails(&candidate) {
                current = candidate;
                removed = true;
            } else {
                at = end;
            }
        }
        if chunk == 1 && !removed {
            return current;
        }
        if !removed {
            chunk = chunk.div_ceil(2);
        }
    }
}

/// The message of a failed run: the invariant, the reproduction, the shortest
/// steps found and the events they fed.
fn report(seed: Option<u64>, scenario: &Scenario, violation: &Violation) -> String {
    let shrunk = shrink(
        &scenario.settings,
        &scenario.facts,
        &scenario.steps,
        violation.invariant,
    );
    let replay = play(&scenario.settings, &scenario.facts, &shrunk, true);
    let detail = replay
        .violation
        .map_or_else(|| violation.detail.clone(), |v| v.detail);
    let mut text = format!("invariant broken: {}\n  {detail}\n", violation.invariant);
    if let Some(seed) = seed {
        text += &format!("reproduce: RAASD_SIM_SEED={seed} cargo test simulation\n");
    }
    text += &format!(
        "settings: {:?}\nfacts: {:?}\nshortest steps ({} of {}; then TERM and passes until exit):\n",
        scenario.settings,
        scenario.facts,
        shrunk.len(),
        scenario.steps.len()
    );
    for step in &shrunk {
        text += &format!("  {step:?}\n");
    }
    text += "events fed (last 60):\n";
    let from = replay.trace.len().saturating_sub(60);
    for line in &replay.trace[from..] {
        text += &format!("  {line}\n");
    }
    text
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Plays seeds from `first` until `budget` steps are spent (or the one seed of
/// RAASD_SIM_SEED); panics with a shrunk report on the first violation.
fn explore(name: &str, first: u64, seed_stride: u64, budget: usize) {
    if let Some(seed) = env_number("RAASD_SIM_SEED") {
        let scenario = scenario(seed);
        let outcome = play(&scenario.settings, &scenario.facts, &scenario.steps, false);
        eprintln!("{name}: seed {seed}: {} steps", outcome.steps);
        if let Some(v) = outcome.violation {
            panic!("{}", report(Some(seed), &scenario, &v));
        }
        return;
    }
    // Long mode: N steps in all, shared by the random-world tests.
    let budget = env_number("RAASD_SIM_STEPS").map_or(budget, |n| n as usize / RANDOM_WORLD_TESTS);
    let started = Instant::now();
    let (mut steps, mut runs) = (0, 0u64);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut seed = first;
    while steps < budget {
        let scenario = scenario(seed);
        let outcome = play(&scenario.settings, &scenario.facts, &scenario.steps, false);
        steps += outcome.steps;
        runs += 1;
        for (name, n) in outcome.seen {
            *seen.entry(name).or_default() += n;
        }
        if let Some(v) = outcome.violation {
            panic!("{}", report(Some(seed), &scenario, &v));
        }
        seed += seed_stride;
    }
    eprintln!(
        "{name}: seeds {first}..{seed} step {seed_stride} ({runs} runs), {steps} steps, {:?}; \
         covered: {seen:?}",
        started.elapsed()
    );
}

/// The first seed: fixed for the default run (reproducible in CI); from the clock
/// in long mode, so that each long run explores new worlds.
fn first_seed(fixed: u64) -> u64 {
    if std::env::var("RAASD_SIM_STEPS").is_ok() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (nanos % 1_000_000_000) * 2 + fixed % 2
    } else {
        fixed
    }
}

#[test]
fn simulation_random_worlds_even_seeds() {
    explore(
        "simulation_random_worlds_even_seeds",
        first_seed(0),
        2,
        DEFAULT_STEPS_PER_TEST,
    );
}

#[test]
fn simulation_random_worlds_odd_seeds() {
    explore(
        "simulation_random_worlds_odd_seeds",
        first_seed(1),
        2,
        DEFAULT_STEPS_PER_TEST,
    );
}

/// The checker can fail, and the shrinker finds the cause: a world whose shell
/// overstates heartbeat ages makes the supervisor kill healthy workers.
#[test]
fn simulation_shrinks_a_planted_bug() {
    let mut scenario = scenario(7);
    scenario.settings.workers = 2;
    scenario.settings.timeout_secs = 3;
    scenario.facts.cells = 18;
    scenario.facts.predecessor = false;
    let mut steps: Vec<Step> = scenario.steps.iter().take(40).cloned().collect();
    steps.insert(20, Step::Mischief(Mischief::OverstateBeatAges));
    let pass = Step::Pass {
        after_ms: 100,
        until_wake: false,
    };
    steps.insert(21, pass.clone());
    steps.insert(0, pass);
    scenario.steps = steps;
    let outcome = play(&scenario.settings, &scenario.facts, &scenario.steps, false);
    let violation = outcome.violation.expect("the planted fault is caught");
    assert_eq!(violation.invariant, HEARTBEAT_FAIR);
    let shrunk = shrink(
        &scenario.settings,
        &scenario.facts,
        &scenario.steps,
        violation.invariant,
    );
    assert!(shrunk.contains(&Step::Mischief(Mischief::OverstateBeatAges)));
    assert!(shrunk.len() <= 4, "shrunk to {shrunk:?}");
    let text = report(None, &scenario, &violation);
    assert!(
        text.contains("OverstateBeatAges") && text.contains(HEARTBEAT_FAIR),
        "{text}"
    );
}

/// A shell that stops reaping never sees its workers exit: the stop cannot end,
/// and the finale says so.
#[test]
fn simulation_catches_a_stop_that_never_ends() {
    let mut scenario = scenario(11);
    scenario.settings.workers = 1;
    scenario.facts.cells = 18;
    scenario.steps = vec![
        Step::Pass {
            after_ms: 0,
            until_wake: false,
        },
        Step::Mischief(Mischief::StopReaping),
    ];
    let outcome = play(&scenario.settings, &scenario.facts, &scenario.steps, false);
    let violation = outcome.violation.expect("the lost exits are caught");
    assert_eq!(violation.invariant, STOP_ENDS, "{violation:?}");
}

/// Plays a scenario (and its shrunk form, when given) and fails on any violation.
fn assert_plays_clean(seed: u64, shrunk: Option<Vec<Step>>) {
    let mut scenario = scenario(seed);
    if let Some(outcome) =
        play(&scenario.settings, &scenario.facts, &scenario.steps, false).violation
    {
        panic!("{}", report(Some(seed), &scenario, &outcome));
    }
    if let Some(steps) = shrunk {
        scenario.steps = steps;
        let outcome = play(&scenario.settings, &scenario.facts, &scenario.steps, true);
        assert!(
            outcome.violation.is_none(),
            "{:?}\n{}",
            outcome.violation,
            outcome.trace.join("\n")
        );
    }
}

/// Found by seeds 21 and 36: TERM with --drain-delay and no worker (none spawned
/// yet, or every fork failing): the stop began inside a pass, after the pass's
/// check for "stopping and no worker left", and nothing woke the loop before the
/// stop's deadline. Fixed: `pass` checks again once the drain is over.
#[test]
fn simulation_seed_21_a_drained_stop_with_no_worker_exits_in_that_pass() {
    assert_plays_clean(21, Some(Vec::new()));
    assert_plays_clean(36, Some(vec![Step::ForkFails { times: 3 }]));
}

#[test]
fn simulation_a_pid_is_read_from_a_log_line() {
    assert_eq!(
        pid_in("worker[3] pid 4711 missed its heartbeat: last beat 9 ms ago"),
        Some(Pid(4711))
    );
    assert_eq!(pid_in("no pid here"), None);
}
