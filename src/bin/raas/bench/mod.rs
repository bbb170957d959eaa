//! `raas bench`: loads one server address with verified requests, optionally while
//! sending a script of signals to the server's master, and reports throughput, errors
//! by kind and latency percentiles (text, or one JSON object).
//!
//! This file owns the options and the run as a whole (threads, progress, exit status);
//! the parts live in submodules:
//!
//! | module | owns |
//! |---|---|
//! | [`payload`] | the request lines and the replies they must get |
//! | [`engine`] | one thread's epoll loop driving many non-blocking connections |
//! | [`stats`] | counters by kind and phase, the latency histogram, merging |
//! | [`chaos`] | the signal script and the phase clock |
//! | [`report`] | the text report and the JSON object |

mod chaos;
mod engine;
mod payload;
mod report;
mod stats;

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use indicatif::{ProgressBar, ProgressStyle};
use raasd::codec::Unit;

use crate::addr::Addr;
use crate::rlimit::raise_nofile;
use chaos::ChaosSignal;
use engine::{Plan, Shared};
use payload::Payloads;
use stats::Stats;

/// Distinct request lines per run: enough variety to catch replies sent to the wrong
/// request, few enough to stay in cache.
const PAYLOAD_POOL: usize = 512;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Server address: HOST:PORT, [V6]:PORT or unix:PATH (or --addr) [default:
    /// 127.0.0.1:2200].
    #[arg(value_name = "ADDR", conflicts_with = "addr_opt")]
    addr_pos: Option<Addr>,

    /// Server address, as an option.
    #[arg(long = "addr", value_name = "ADDR")]
    addr_opt: Option<Addr>,

    /// persist: pipelined requests on persistent connections; connect: one
    /// connect-send-read-close per request; idle: persistent connections that each
    /// send one line every --interval.
    #[arg(long, value_enum, default_value_t = Mode::Persist)]
    mode: Mode,

    /// Concurrent connections.
    #[arg(short = 'c', long, value_name = "C", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    conns: u32,

    /// Requests in flight per connection (persist mode).
    #[arg(short = 'p', long, value_name = "D", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pipeline: u32,

    /// Seconds to send requests for [default: 5, or with --chaos one interval per
    /// signal plus one; none with only --requests].
    #[arg(short = 'd', long, value_name = "SECS", value_parser = crate::parse_secs)]
    duration: Option<f64>,

    /// Requests to send in all (the run also ends at --duration when given).
    #[arg(short = 'n', long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,

    /// Bytes per request line, without its "\n".
    #[arg(long, value_name = "BYTES", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(0..=1 << 24))]
    len: u32,

    /// Random text with multi-codepoint graphemes (combining accents, flags, ZWJ
    /// emoji) instead of ASCII.
    #[arg(long)]
    unicode: bool,

    /// What the server reverses by, to compute the expected replies.
    #[arg(long, value_name = "UNIT", default_value = "graphemes",
          value_parser = PossibleValuesParser::new(["graphemes", "chars", "bytes"])
              .map(|s| s.parse::<Unit>().expect("a listed unit")))]
    unit: Unit,

    /// Seconds a request (or a connect) may take before it counts as a timeout.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = crate::parse_secs)]
    timeout: f64,

    /// Seconds between the lines of one connection in idle mode.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = crate::parse_secs)]
    interval: f64,

    /// Load-generating threads [default: min(conns, CPUs, 4)].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: Option<u32>,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,

    /// While loading, send the --chaos-script signals to this raasd master pid.
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    chaos: Option<i32>,

    /// Signals to send, in order, one per --chaos-interval.
    #[arg(
        long,
        value_name = "SIG,...",
        value_delimiter = ',',
        default_value = "HUP,TTIN,TTIN,TTOU,HUP"
    )]
    chaos_script: Vec<ChaosSignal>,

    /// Seconds between two chaos signals (and before the first).
    #[arg(long, value_name = "SECS", default_value_t = 2.0, value_parser = crate::parse_secs)]
    chaos_interval: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Persist,
    Connect,
    Idle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Persist => "persist",
            Mode::Connect => "connect",
            Mode::Idle => "idle",
        }
    }
}

impl BenchArgs {
    /// Checks the combinations clap cannot express; the message is a usage error.
    pub fn validate(&self) -> Result<(), String> {
        if self.pipeline > 1 && self.mode != Mode::Persist {
            return Err(format!(
                "--pipeline applies to persist mode only (--mode {} sends one request per \
                 connection at a time)",
                self.mode.name()
            ));
        }
        if self.chaos.is_some() && self.chaos_script.is_empty() {
            return Err("--chaos needs at least one signal in --chaos-script".into());
        }
        if self.timeout <= 0.0 {
            return Err("--timeout must be more than 0".into());
        }
        if self.mode == Mode::Idle && self.interval <= 0.0 {
            return Err("--interval must be more than 0".into());
        }
        Ok(())
    }

    fn addr(&self) -> Addr {
        self.addr_pos
            .clone()
            .or_else(|| self.addr_opt.clone())
            .unwrap_or_else(|| {
                "127.0.0.1:2200"
                    .parse()
                    .expect("the default address parses")
            })
    }

    /// How long requests are sent for, if bounded in time.
    fn duration(&self) -> Option<Duration> {
        match (self.duration, self.requests, self.chaos) {
            (Some(secs), _, _) => Some(Duration::from_secs_f64(secs)),
            (None, Some(_), _) => None,
            (None, None, Some(_)) => Some(Duration::from_secs_f64(
                self.chaos_interval * (self.chaos_script.len() + 1) as f64,
            )),
            (None, None, None) => Some(Duration::from_secs(5)),
        }
    }

    fn threads(&self) -> usize {
        let cpus = thread::available_parallelism().map_or(2, |n| n.get());
        match self.threads {
            Some(n) => n as usize,
            None => cpus.min(4),
        }
        .min(self.conns as usize)
    }
}

/// Runs the benchmark; true when at least one reply came and no error was counted.
pub fn run(args: BenchArgs) -> bool {
    let addr = args.addr();
    let threads = args.threads();
    // Each connection is one descriptor; the rest is stdio, epoll and spare.
    let wanted = u64::from(args.conns) + 64 + threads as u64;
    match raise_nofile(wanted) {
        Ok(limit) if limit < wanted => eprintln!(
            "raas bench: warning: only {limit} open files allowed, {} connections asked for",
            args.conns
        ),
        Ok(_) => {}
        Err(e) => eprintln!("raas bench: warning: {e}"),
    }

    let payloads = Payloads::generate(PAYLOAD_POOL, args.len as usize, args.unicode, args.unit);
    let phases = if args.chaos.is_some() {
        args.chaos_script.len() + 1
    } else {
        1
    };
    let start = Instant::now();
    let duration = args.duration();
    let plan = Plan {
        addr: addr.clone(),
        mode: args.mode,
        pipeline: args.pipeline as usize,
        timeout: Duration::from_secs_f64(args.timeout),
        interval: Duration::from_secs_f64(args.interval),
        start,
        deadline: duration.map(|d| start + d),
        payloads,
        phases,
    };
    let shared = Shared::new(args.requests);
    // Without a time limit the bar counts requests instead.
    let by_count = duration.is_none();
    let progress = progress_bar(duration, args.requests);

    let (stats, marks, elapsed) = thread::scope(|scope| {
        let mut engines = Vec::new();
        for t in 0..threads {
            let slots = (args.conns as usize + threads - 1 - t) / threads;
            let (plan, shared) = (&plan, &shared);
            engines.push(scope.spawn(move || engine::run_thread(plan, shared, slots, t)));
        }
        let chaos = args.chaos.map(|pid| {
            let (script, interval, shared) = (
                &args.chaos_script,
                Duration::from_secs_f64(args.chaos_interval),
                &shared,
            );
            scope.spawn(move || chaos::run(pid, script, interval, start, shared))
        });
        while !engines.iter().all(|h| h.is_finished()) {
            thread::sleep(Duration::from_millis(100));
            update_progress(&progress, &shared, start, by_count);
        }
        let elapsed = start.elapsed();
        shared.finished.store(true, Ordering::SeqCst);
        let mut stats = Stats::new(phases);
        for handle in engines {
            match handle.join() {
                Ok(Ok(s)) => stats.merge(&s),
                Ok(Err(e)) => stats.other(0, e),
                Err(_) => stats.other(0, "a load thread panicked".into()),
            }
        }
        let marks = chaos.map(|h| h.join().unwrap_or_default());
        (stats, marks, elapsed)
    });
    progress.finish_and_clear();
    if let Some(e) = &stats.first_other {
        eprintln!("raas bench: first unexpected error: {e}");
    }

    let summary = report::Summary::new(&args, &addr, threads, &stats, marks.as_deref(), elapsed);
    if args.json {
        println!("{}", summary.to_json());
    } else {
        print!("{}", summary.to_text());
    }
    let signals_failed = marks.iter().flatten().any(|m| m.error.is_some());
    summary.replies > 0 && summary.error_total == 0 && !signals_failed
}

/// A bar on a terminal, nothing otherwise (logs and pipes get only the report).
fn progress_bar(duration: Option<Duration>, requests: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, template) = match (duration, requests) {
        (Some(d), _) => (
            d.as_millis() as u64,
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
        (None, Some(n)) => (
            n,
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        ),
        (None, None) => (0, "{spinner} [{elapsed_precise}] {msg}"),
    };
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len).with_style(style)
}

fn update_progress(bar: &ProgressBar, shared: &Shared, start: Instant, by_count: bool) {
    if bar.is_hidden() {
        return;
    }
    let replies = shared.live_replies.load(Ordering::Relaxed);
    let errors = shared.live_errors.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    bar.set_position(if by_count {
        replies + errors
    } else {
        start.elapsed().as_millis() as u64
    });
    bar.set_message(format!(
        "{replies} replies, {:.0}/s, {errors} errors",
        replies as f64 / secs.max(1e-3)
    ));
}
