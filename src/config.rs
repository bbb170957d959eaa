//! The command line and the settings it yields.
//!
//! Owns parsing and validation of every option, so that a bad value is a clap usage
//! error (exit status 2) before anything is bound or forked. It does not bind, resolve
//! at run time or touch processes: the types here are plain data the master and the
//! workers read.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use log::LevelFilter;

use crate::codec::Unit;

/// raasd: Reverse string As A Service, a preforking master/worker server.
///
/// Every line a client sends (up to "\n") comes back reversed. The master binds the
/// listen sockets, forks the workers and supervises them; see raasd(8) for signals.
#[derive(Parser, Debug, Clone)]
#[command(name = "raasd", version, max_term_width = 100)]
pub struct Config {
    /// Worker processes: a number, or "auto" for one per CPU.
    #[arg(short = 'w', long, value_name = "N|auto", default_value = "auto")]
    pub workers: WorkerCount,

    /// Address to listen on: HOST:PORT, [V6]:PORT, :PORT (all interfaces) or unix:PATH.
    /// Repeat for several.
    #[arg(
        short = 'l',
        long = "listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:2200"
    )]
    pub listen: Vec<ListenAddr>,

    /// Listen backlog: connections the kernel queues before a worker accepts them.
    #[arg(short = 'b', long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
    pub backlog: u32,

    /// Seconds a graceful stop waits for workers to drain before it kills them.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub graceful_timeout: u64,

    /// Longest line accepted, in bytes (without its "\n"); longer lines get an ERR reply.
    #[arg(long, value_name = "BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub max_line: u64,

    /// Seconds a connection may stay silent before it is closed; 0 = never.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub idle_timeout: u64,

    /// What "reverse" reverses: graphemes, chars (Unicode scalar values) or bytes.
    #[arg(long, value_name = "UNIT", default_value = "graphemes",
          value_parser = PossibleValuesParser::new(["graphemes", "chars", "bytes"])
              .map(|s| s.parse::<Unit>().expect("a listed unit")))]
    pub unit: Unit,

    /// Seconds a worker may go without a heartbeat before it is killed and replaced;
    /// 0 = never.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,

    /// Seconds a client may take to finish a line it has started; 0 = no limit.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub line_timeout: u64,

    /// Unsent reply bytes per connection above which its reading pauses.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub max_pending: u64,

    /// Connections per worker; a worker at the limit stops accepting.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub max_conns: u64,

    /// Requests after which a worker is replaced gracefully; 0 = never.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests: u64,

    /// Adds a random 0..=J to each worker's --max-requests, so workers are not all
    /// replaced at once.
    #[arg(long, value_name = "J", default_value_t = 0)]
    pub max_requests_jitter: u64,

    /// Resident memory in MiB above which a worker is replaced gracefully; 0 = no limit.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub max_worker_memory: u64,

    /// User the workers run as (the master keeps its own, to bind and to supervise).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Group the workers run as [default: the user's primary group].
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Permissions of unix sockets, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0660", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Pid file: written once the listeners are bound, removed on exit.
    #[arg(long, value_name = "FILE")]
    pub pid: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace [default: RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LevelFilter>,
}

impl Config {
    pub fn graceful_timeout(&self) -> Duration {
        Duration::from_secs(self.graceful_timeout)
    }

    /// What a worker needs to know about serving; copied into it at fork.
    pub fn serving(&self) -> Serving {
        Serving {
            unit: self.unit,
            max_line: self.max_line as usize,
            idle_timeout: (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout)),
            graceful_timeout: self.graceful_timeout(),
            line_timeout: (self.line_timeout > 0).then(|| Duration::from_secs(self.line_timeout)),
            max_pending: self.max_pending as usize,
            max_conns: self.max_conns as usize,
            max_requests: None,
            heartbeat: heartbeat_interval(self.timeout),
        }
    }
}

/// The part of the configuration a worker serves by.
#[derive(Debug, Clone, Copy)]
pub struct Serving {
    pub unit: Unit,
    pub max_line: usize,
    pub idle_timeout: Option<Duration>,
    pub graceful_timeout: Duration,
    pub line_timeout: Option<Duration>,
    pub max_pending: usize,
    pub max_conns: usize,
    /// This worker's own limit, --max-requests plus its jitter; set at spawn.
    pub max_requests: Option<u64>,
    /// How often the worker's loop wakes at least, to beat and to check time limits.
    pub heartbeat: Duration,
}

/// Often enough that an idle worker is never mistaken for a stuck one: four beats
/// per --timeout, but at most one a second and at least every 50 ms.
fn heartbeat_interval(timeout_secs: u64) -> Duration {
    match timeout_secs {
        0 => Duration::from_secs(1),
        secs => {
            (Duration::from_secs(secs) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("'{s}' is not an octal mode such as 0660")),
    }
}

/// The most workers raasd runs; TTIN stops there.
pub const MAX_WORKERS: usize = 4096;

/// `-w N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    Auto,
    Fixed(NonZeroUsize),
}

impl WorkerCount {
    /// The number of workers to run: `auto` is the CPUs this process may use.
    pub fn resolve(self) -> usize {
        match self {
            WorkerCount::Fixed(n) => n.get(),
            WorkerCount::Auto => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        }
    }
}

impl FromStr for WorkerCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(WorkerCount::Auto);
        }
        match s.parse::<usize>() {
            Ok(0) => Err("must be at least 1 (or auto)".into()),
            Ok(n) if n > MAX_WORKERS => Err(format!("at most {MAX_WORKERS} workers")),
            Ok(n) => Ok(WorkerCount::Fixed(NonZeroUsize::new(n).expect("n > 0"))),
            Err(_) => Err(format!("expected a number of workers or auto, not '{s}'")),
        }
    }
}

/// One `--listen` address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, as in unix:/run/raasd.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("'{port}' is not a port number (0-65535)"))?;
            return Ok(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "'{s}' is not HOST:PORT, [V6]:PORT, :PORT or unix:PATH"
            ));
        };
        if port.parse::<u16>().is_err() {
            return Err(format!("'{port}' is not a port number (0-65535)"));
        }
        // A host name: bind its first address, as a resolver lists them.
        match (host, port.parse::<u16>().unwrap_or(0)).to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(ListenAddr::Tcp)
                .ok_or_else(|| format!("host '{host}' has no address")),
            Err(e) => Err(format!("cannot resolve host '{host}': {e}")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        let tcp = |s: &str| match s.parse::<ListenAddr>().unwrap() {
            ListenAddr::Tcp(a) => a.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(tcp("127.0.0.1:2200"), "127.0.0.1:2200");
        assert_eq!(tcp("[::1]:80"), "[::1]:80");
        assert_eq!(tcp(":2200"), "0.0.0.0:2200");
        assert_eq!(
            "unix:/tmp/r.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/r.sock".into())
        );
        for bad in ["nonsense", "unix:", ":http", "1.2.3.4:99999", "[::1]"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn worker_counts_parse() {
        assert_eq!("auto".parse::<WorkerCount>().unwrap(), WorkerCount::Auto);
        assert_eq!("3".parse::<WorkerCount>().unwrap().resolve(), 3);
        assert!("0".parse::<WorkerCount>().is_err());
        assert!("-1".parse::<WorkerCount>().is_err());
        assert!(WorkerCount::Auto.resolve() >= 1);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::parse_from(["raasd"]);
        assert_eq!(c.workers, WorkerCount::Auto);
        assert_eq!(c.listen, vec!["127.0.0.1:2200".parse().unwrap()]);
        assert_eq!(
            (c.backlog, c.graceful_timeout, c.max_line, c.idle_timeout),
            (1024, 30, 65536, 60)
        );
        assert_eq!(c.unit, Unit::Graphemes);
    }
}
