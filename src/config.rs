//! The command line, the config file, and the settings they yield.
//!
//! Owns parsing and validation of every option, so that a bad value is an error
//! (exit status 2) before anything is bound or forked. The config file (TOML) has one
//! key per long option, of the same name; the command line overrides the file. Both
//! go through the very same clap parsers: each file key is checked on its own (so
//! every bad key is reported, not only the first), then file and command line are
//! parsed together. Reloading (HUP) calls [`load`] again with the original arguments.
//! This module does not bind, resolve at run time or touch processes.

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use log::LevelFilter;

use crate::codec::Unit;

/// `raasd -h`: the everyday options on one screen of a phone's terminal (24 lines of
/// 80 columns, as Unicorn's `-h`), ending with where the rest is, as curl and git do.
/// tests/manpage.rs checks its size and that every option in it exists.
pub const SHORT_HELP: &str = "\
raasd: Reverse string As A Service, a preforking master/worker server

Usage: raasd [OPTIONS]
       raasd ctl [--control PATH | -c FILE] COMMAND   (steer a running raasd)

Everyday options:
  -c, --config FILE        config file (TOML; the command line wins)
      --check-config       check the configuration, print it and exit
  -w, --workers N|auto     worker processes (default: auto, one per CPU)
  -l, --listen ADDR        HOST:PORT, :PORT or unix:PATH; repeatable
                           (default: 127.0.0.1:2200)
      --timeout SECS       kill a worker silent this long (default: 30)
      --pid FILE           write the master's pid here
      --log-file PATH      log here instead of stderr (reopened on USR1)
      --control PATH       the control socket, for raasd ctl
      --metrics ADDR       Prometheus /metrics, /livez and /readyz here
      --user USER          run the workers as USER
  -h, --help               this summary; --help: every option
  -V, --version            the version

Signals: TERM graceful stop, INT quick stop, HUP reload, USR2 upgrade,
TTIN/TTOU one worker more/fewer, USR1 reopen the logs.
Every option: raasd --help. The manual: man 8 raasd. Steering: raasd ctl --help.
";

const HELP_ID: &str = "help";

/// The command line parser: [`Config`]'s, with one help flag that [`load`] answers:
/// `-h` with [`SHORT_HELP`], `--help` with clap's full help.
fn command() -> clap::Command {
    use clap::{Arg, ArgAction};
    Config::command()
        .disable_help_flag(true)
        .override_usage(
            "raasd [OPTIONS]\n       raasd ctl [--control PATH | -c FILE] COMMAND  \
             (raasd ctl --help)",
        )
        .after_long_help(
            "Signals, files, the control socket and the metrics: man 8 raasd. \
             Steering a running raasd: raasd ctl --help.",
        )
        .arg(
            Arg::new(HELP_ID)
                .short('h')
                .long("help")
                .action(ArgAction::SetTrue)
                .help("Print help (-h: the everyday options; --help: every option)"),
        )
}

/// raasd: Reverse string As A Service, a preforking master/worker server.
///
/// Every line a client sends (up to "\n") comes back reversed. The master binds the
/// listen sockets, forks the workers and supervises them; see raasd(8) for signals.
#[derive(Parser, Debug, Clone)]
#[command(name = "raasd", version, max_term_width = 80)]
pub struct Config {
    /// Config file (TOML, one key per long option; the command line wins).
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the configuration, print it in full and exit: 0 when valid, 2 otherwise.
    #[arg(long)]
    pub check_config: bool,

    /// Append logs to this file instead of stderr; reopened on SIGUSR1.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

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

    /// Seconds a graceful stop (TERM, QUIT, ctl stop) first keeps serving, with
    /// /readyz failing, so that load balancers stop sending before the sockets close.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub drain_delay: u64,

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

    /// Seconds a new master started by SIGUSR2 has to be ready before the upgrade is
    /// rolled back.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub upgrade_timeout: u64,

    /// Seconds a TCP connection may be silent before keepalive probes check that its
    /// peer still exists; 0 = off.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=32_767))]
    pub tcp_keepalive: u64,

    /// Hand established connections over, live, to the workers that stay when a
    /// worker retires (reload, resize, recycling, upgrade); off: they are served to
    /// their end and closed, as Unicorn does.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set,
          value_parser = PossibleValuesParser::new(["on", "off"]).map(|s| s == "on"))]
    pub handover: bool,

    /// Confine each worker, at the end of its set-up, to the system calls it
    /// serves with (seccomp-bpf, no_new_privs): it cannot open a file, execute,
    /// fork or connect out. off: for debugging with tools that need more.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set,
          value_parser = PossibleValuesParser::new(["on", "off"]).map(|s| s == "on"))]
    pub sandbox: bool,

    /// Control socket (a unix socket path, mode 0600) for `raasd ctl`: status,
    /// workers N, reload, upgrade, stop, reopen-logs.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<String>,

    /// One line per closed connection (peer, duration, lines, bytes, why it ended)
    /// appended to this file; reopened on SIGUSR1.
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<PathBuf>,

    /// A name in the process titles (`raasd master NAME ...`), so that several
    /// instances can be told apart in ps.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Directory raasd runs in and a binary upgrade starts from [default: where raasd
    /// was started, as the shell's $PWD names it].
    #[arg(long, value_name = "DIR")]
    pub working_directory: Option<PathBuf>,

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
    #[arg(long, value_name = "LEVEL",
          value_parser = PossibleValuesParser::new(["error", "warn", "info", "debug", "trace"])
              .map(|s| s.parse::<LevelFilter>().expect("a listed level")))]
    pub log_level: Option<LevelFilter>,

    /// Log line format: text, or json (one object a line: ts, level, pid, msg,
    /// worker, generation and the line's figures); the access log follows it.
    #[arg(long, value_name = "FORMAT", default_value = "text",
          value_parser = PossibleValuesParser::new(["text", "json"]))]
    pub log_format: String,
}

impl Config {
    pub fn graceful_timeout(&self) -> Duration {
        Duration::from_secs(self.graceful_timeout)
    }

    pub fn upgrade_timeout(&self) -> Duration {
        Duration::from_secs(self.upgrade_timeout)
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
            sandbox: self.sandbox,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The command line itself is wrong (or asked for --help): clap reports it.
    CommandLine(clap::Error),
    /// The config file is unreadable or has bad keys: one message per problem.
    File(Vec<String>),
    /// `-h` or `--help`: print this ([`SHORT_HELP`], or every option) and exit 0.
    Help(String),
}

/// Options that make sense on the command line only.
const COMMAND_LINE_ONLY: [&str; 4] = ["config", "check-config", "help", "version"];

/// Parses `args` (argv, program name first), then the config file it names.
pub fn load(args: &[OsString]) -> Result<Config, LoadError> {
    let matches = command()
        .try_get_matches_from(args)
        .map_err(LoadError::CommandLine)?;
    if matches.get_flag(HELP_ID) {
        let long = args.iter().any(|a| a == "--help");
        return Err(LoadError::Help(if long {
            command().render_long_help().to_string()
        } else {
            SHORT_HELP.to_string()
        }));
    }
    let on_command_line = Config::from_arg_matches(&matches).map_err(LoadError::CommandLine)?;
    let Some(path) = &on_command_line.config else {
        reject_duplicate_listeners(&on_command_line)?;
        return Ok(on_command_line);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadError::File(vec![format!(
            "cannot read config file {}: {}",
            path.display(),
            crate::errors::plain(&e)
        )])
    })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|span| format!(" (line {})", line_at(&text, span.start)))
            .unwrap_or_default();
        LoadError::File(vec![format!(
            "{}{at}: {}",
            path.display(),
            e.message().trim_end()
        )])
    })?;
    // (line, message): reported in the file's order, not the table's (sorted) one.
    let mut errors: Vec<(usize, String)> = Vec::new();
    let mut merged: Vec<OsString> = vec![args.first().cloned().unwrap_or_else(|| "raasd".into())];
    for (key, value) in &table {
        // "path (line N)" for errors about this key.
        let found = key_line(&text, key);
        let at = match found {
            Some(line) => format!("{} (line {line})", path.display()),
            None => path.display().to_string(),
        };
        let line = found.unwrap_or(usize::MAX);
        let Some(id) = file_key_id(key) else {
            let guess = closest_key(key)
                .map(|k| format!("; did you mean '{k}'?"))
                .unwrap_or_default();
            errors.push((line, format!("{at}: unknown key '{key}'{guess}")));
            continue;
        };
        let values = match option_values(key, value) {
            Ok(values) => values,
            Err(why) => {
                errors.push((line, format!("{at}: key '{key}': {why}")));
                continue;
            }
        };
        let as_args: Vec<OsString> = values
            .iter()
            .flat_map(|v| [format!("--{key}").into(), v.into()])
            .collect();
        let alone = std::iter::once(OsString::from("raasd")).chain(as_args.iter().cloned());
        if let Err(e) = Config::try_parse_from(alone) {
            errors.push((line, format!("{at}: key '{key}': {}", clap_reason(&e))));
            continue;
        }
        if matches.value_source(&id) != Some(ValueSource::CommandLine) {
            merged.extend(as_args);
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|(line, _)| *line);
        return Err(LoadError::File(
            errors.into_iter().map(|(_, e)| e).collect(),
        ));
    }
    merged.extend(args.iter().skip(1).cloned());
    let config = Config::try_parse_from(merged).map_err(LoadError::CommandLine)?;
    reject_duplicate_listeners(&config)?;
    Ok(config)
}

/// The same address twice is a mistake, not a request to bind twice (port 0 aside:
/// each asks for a port of its own).
fn reject_duplicate_listeners(config: &Config) -> Result<(), LoadError> {
    let errors: Vec<String> = config
        .listen
        .iter()
        .enumerate()
        .filter(|(_, addr)| !matches!(addr, ListenAddr::Tcp(a) if a.port() == 0))
        .filter(|(i, addr)| config.listen[..*i].contains(addr))
        .map(|(_, addr)| format!("listen address {addr} is given twice"))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LoadError::File(errors))
    }
}

/// `args` with a relative config file path (`-c FILE`, `-cFILE`, `--config FILE`,
/// `--config=FILE`) made absolute against `base`, so that it names the same file
/// whatever the working directory becomes.
pub fn with_absolute_config_path(args: Vec<OsString>, base: &std::path::Path) -> Vec<OsString> {
    let absolute = |path: &std::ffi::OsStr| -> OsString {
        let path = std::path::Path::new(path);
        if path.is_absolute() {
            path.into()
        } else {
            base.join(path).into()
        }
    };
    let mut out = Vec::with_capacity(args.len());
    let mut value_next = false;
    for (i, arg) in args.into_iter().enumerate() {
        let text = arg.to_string_lossy().into_owned();
        if i == 0 {
            out.push(arg);
        } else if value_next {
            value_next = false;
            out.push(absolute(&arg));
        } else if text == "--" {
            out.push(arg);
            value_next = false;
        } else if text == "-c" || text == "--config" {
            value_next = true;
            out.push(arg);
        } else if let Some(path) = text.strip_prefix("--config=") {
            let mut joined = OsString::from("--config=");
            joined.push(absolute(path.as_ref()));
            out.push(joined);
        } else if let Some(path) = text
            .strip_prefix("-c")
            .filter(|p| !p.is_empty() && !text.starts_with("--"))
        {
            let mut joined = OsString::from("-c");
            joined.push(absolute(path.as_ref()));
            out.push(joined);
        } else {
            out.push(arg);
        }
    }
    out
}

/// The clap argument id of a config file key, when the key names an option.
fn file_key_id(key: &str) -> Option<String> {
    if COMMAND_LINE_ONLY.contains(&key) {
        return None;
    }
    Config::command()
        .get_arguments()
        .find(|arg| arg.get_long() == Some(key))
        .map(|arg| arg.get_id().to_string())
}

/// A TOML value as the option value(s) it stands for.
fn option_values(key: &str, value: &toml::Value) -> Result<Vec<String>, String> {
    match value {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        // `socket-mode = 0o660` arrives as the number 432.
        toml::Value::Integer(i) if key == "socket-mode" => Ok(vec![format!("{i:o}")]),
        toml::Value::Integer(i) => Ok(vec![i.to_string()]),
        toml::Value::Array(items) if key == "listen" && items.is_empty() => {
            Err("at least one address is needed".to_string())
        }
        toml::Value::Array(items) if key == "listen" => items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "expected addresses as strings, found {}",
                    other.type_str()
                )),
            })
            .collect(),
        other => Err(format!(
            "expected a string or a number, found {}",
            other.type_str()
        )),
    }
}

/// The line number (from 1) of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line number of the line that sets `key` (`key = ...`, possibly quoted).
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let rest = line
                .strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// The file key nearest to an unknown `key` (a typo: at most 2 edits away).
fn closest_key(key: &str) -> Option<String> {
    Config::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| !COMMAND_LINE_ONLY.contains(long))
        .map(|long| (edit_distance(key, long), long))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, long)| long.to_string())
}

/// Levenshtein distance, over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The reason in a clap error, without its "error: " and usage lines.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let reason = first.strip_prefix("error: ").unwrap_or(first);
    // The valid values, when clap lists them, are the useful half of the message.
    match text
        .lines()
        .find_map(|l| l.trim().strip_prefix("[possible values: "))
    {
        Some(values) => format!("{reason}; valid values: {}", values.trim_end_matches(']')),
        None => reason.to_string(),
    }
}

impl Config {
    /// The configuration in full, as a config file: what --check-config prints.
    pub fn to_toml(&self) -> String {
        let quoted = |s: &str| format!("{s:?}");
        let optional = |key: &str, value: Option<String>| match value {
            Some(v) => format!("{key} = {}\n", quoted(&v)),
            None => format!("# {key} = (not set)\n"),
        };
        let workers = match self.workers {
            WorkerCount::Auto => "\"auto\"".to_string(),
            WorkerCount::Fixed(n) => n.to_string(),
        };
        let listen: Vec<String> = self.listen.iter().map(|a| quoted(&a.to_string())).collect();
        let mut out = String::new();
        out += &format!("workers = {workers}\n");
        out += &format!("listen = [{}]\n", listen.join(", "));
        out += &format!("backlog = {}\n", self.backlog);
        out += &format!("graceful-timeout = {}\n", self.graceful_timeout);
        out += &format!("drain-delay = {}\n", self.drain_delay);
        out += &format!("max-line = {}\n", self.max_line);
        out += &format!("idle-timeout = {}\n", self.idle_timeout);
        out += &format!("unit = {}\n", quoted(self.unit.name()));
        out += &format!("timeout = {}\n", self.timeout);
        out += &format!("line-timeout = {}\n", self.line_timeout);
        out += &format!("max-pending = {}\n", self.max_pending);
        out += &format!("max-conns = {}\n", self.max_conns);
        out += &format!("max-requests = {}\n", self.max_requests);
        out += &format!("max-requests-jitter = {}\n", self.max_requests_jitter);
        out += &format!("max-worker-memory = {}\n", self.max_worker_memory);
        out += &format!("upgrade-timeout = {}\n", self.upgrade_timeout);
        out += &format!("tcp-keepalive = {}\n", self.tcp_keepalive);
        out += &format!(
            "handover = {}\n",
            quoted(if self.handover { "on" } else { "off" })
        );
        out += &format!(
            "sandbox = {}\n",
            quoted(if self.sandbox { "on" } else { "off" })
        );
        out += &optional(
            "working-directory",
            self.working_directory
                .as_ref()
                .map(|p| p.display().to_string()),
        );
        out += &optional(
            "control",
            self.control.as_ref().map(|p| p.display().to_string()),
        );
        out += &optional("metrics", self.metrics.clone());
        out += &optional("name", self.name.clone());
        out += &optional(
            "access-log",
            self.access_log.as_ref().map(|p| p.display().to_string()),
        );
        out += &optional("user", self.user.clone());
        out += &optional("group", self.group.clone());
        out += &format!("socket-mode = \"{:04o}\"\n", self.socket_mode);
        out += &optional("pid", self.pid.as_ref().map(|p| p.display().to_string()));
        out += &optional(
            "log-file",
            self.log_file.as_ref().map(|p| p.display().to_string()),
        );
        out += &optional(
            "log-level",
            self.log_level.map(|l| l.to_string().to_lowercase()),
        );
        out += &format!("log-format = {}\n", quoted(&self.log_format));
        out
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
    /// --sandbox: the worker confines itself at the end of its set-up.
    pub sandbox: bool,
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

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 32 || !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "'{s}' is not a name: 1 to 32 visible ASCII characters, no spaces"
        ));
    }
    Ok(s.to_string())
}

/// `HOST:PORT`, or `:PORT` for every interface, as `--listen` takes it.
fn parse_metrics_addr(s: &str) -> Result<String, String> {
    let s = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    s.parse::<SocketAddr>()
        .map(|_| s.clone())
        .map_err(|_| format!("'{s}' is not HOST:PORT or :PORT, such as 127.0.0.1:9187"))
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

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("raasd-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load_args(args: &[&str]) -> Result<Config, LoadError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        load(&args)
    }

    #[test]
    fn the_example_config_has_every_key_with_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/raasd.toml");
        let from_file = load_args(&["raasd", "-c", path]).unwrap();
        let mut defaults = Config::parse_from(["raasd"]);
        defaults.config = Some(path.into());
        assert_eq!(from_file.to_toml(), defaults.to_toml());
        let text = std::fs::read_to_string(path).unwrap();
        for arg in Config::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if !COMMAND_LINE_ONLY.contains(&long) {
                assert!(
                    text.contains(&format!("{long} = ")),
                    "examples/raasd.toml lacks '{long}'"
                );
            }
        }
    }

    #[test]
    fn an_unknown_key_near_a_known_one_is_suggested() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(closest_key("wokers").as_deref(), Some("workers"));
        assert_eq!(closest_key("max_line").as_deref(), Some("max-line"));
        assert_eq!(closest_key("bogus"), None);
    }

    #[test]
    fn check_config_prints_every_option_and_reads_back_the_same() {
        let set = load_args(&[
            "raasd",
            "-w",
            "3",
            "-l",
            "127.0.0.1:7",
            "-l",
            "unix:/tmp/x.sock",
            "-b",
            "9",
            "--graceful-timeout",
            "4",
            "--max-line",
            "99",
            "--idle-timeout",
            "5",
            "--unit",
            "bytes",
            "--timeout",
            "6",
            "--line-timeout",
            "7",
            "--max-pending",
            "4096",
            "--max-conns",
            "8",
            "--max-requests",
            "9",
            "--max-requests-jitter",
            "2",
            "--max-worker-memory",
            "64",
            "--upgrade-timeout",
            "11",
            "--tcp-keepalive",
            "0",
            "--working-directory",
            "/srv",
            "--user",
            "nobody",
            "--group",
            "nogroup",
            "--handover",
            "off",
            "--sandbox",
            "off",
            "--control",
            "/run/raasd/ctl.sock",
            "--metrics",
            "127.0.0.1:9187",
            "--name",
            "web",
            "--access-log",
            "/tmp/access.log",
            "--socket-mode",
            "0600",
            "--pid",
            "/run/x.pid",
            "--log-file",
            "/tmp/x.log",
            "--log-level",
            "debug",
            "--log-format",
            "json",
        ])
        .unwrap();
        let printed = set.to_toml();
        for arg in Config::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if !COMMAND_LINE_ONLY.contains(&long) {
                assert!(
                    printed
                        .lines()
                        .any(|l| l.starts_with(&format!("{long} = "))),
                    "--check-config does not print '{long}':\n{printed}"
                );
            }
        }
        let path = temp_file("round-trip", &printed);
        let read_back = load_args(&["raasd", "-c", path.to_str().unwrap()]).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read_back.to_toml(), printed);
        let mut read_back = read_back;
        read_back.config = None;
        assert_eq!(format!("{read_back:?}"), format!("{set:?}"));
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let path = temp_file(
            "override",
            "workers = 3\nbacklog = 7\nlisten = [\"127.0.0.1:1\", \"unix:/x\"]\n",
        );
        let path = path.to_str().unwrap();
        let c = load_args(&["raasd", "-c", path, "-w", "5"]).unwrap();
        assert_eq!((c.workers.resolve(), c.backlog, c.listen.len()), (5, 7, 2));
        let c = load_args(&["raasd", "-c", path, "-l", "127.0.0.1:9"]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:9".parse().unwrap()]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn every_bad_key_is_reported_with_its_name() {
        let path = temp_file(
            "bad",
            "workers = 0\nbogus = 1\nunit = \"words\"\nbacklog = 10\n",
        );
        let Err(LoadError::File(errors)) = load_args(&["raasd", "-c", path.to_str().unwrap()])
        else {
            panic!("a bad file must fail");
        };
        assert_eq!(errors.len(), 3, "{errors:?}");
        for key in ["'workers'", "'bogus'", "'unit'"] {
            assert!(
                errors.iter().any(|e| e.contains(key)),
                "{key} in {errors:?}"
            );
        }
        std::fs::remove_file(path).unwrap();
        let Err(LoadError::File(errors)) = load_args(&["raasd", "-c", "/nonexistent/raasd.toml"])
        else {
            panic!("a missing file must fail");
        };
        assert!(errors[0].contains("cannot read config file"), "{errors:?}");
    }

    #[test]
    fn an_address_given_twice_is_refused_but_port_0_twice_is_fine() {
        let Err(LoadError::File(errors)) =
            load_args(&["raasd", "-l", "127.0.0.1:5", "-l", "127.0.0.1:5"])
        else {
            panic!("a duplicate must fail");
        };
        assert_eq!(
            errors,
            vec!["listen address 127.0.0.1:5 is given twice".to_string()]
        );
        assert!(load_args(&["raasd", "-l", "127.0.0.1:0", "-l", "127.0.0.1:0"]).is_ok());
    }

    /// The errors a config file with `text` gives.
    fn file_errors(tag: &str, text: &str) -> Vec<String> {
        let path = std::env::temp_dir().join(format!(
            "raasd-config-errors-{}-{tag}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        let got = load_args(&["raasd", "-c", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        match got {
            Err(LoadError::File(errors)) => errors,
            Err(LoadError::CommandLine(e)) => vec![e.to_string()],
            Err(LoadError::Help(text)) => vec![text],
            Ok(_) => Vec::new(),
        }
    }

    #[test]
    fn metrics_take_port_only_addresses_as_listen_does() {
        assert_eq!(parse_metrics_addr(":9187").as_deref(), Ok("0.0.0.0:9187"));
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9187").as_deref(),
            Ok("127.0.0.1:9187")
        );
        assert!(parse_metrics_addr("9187").is_err());
    }

    #[test]
    fn file_errors_come_in_line_order_and_unknown_keys_get_a_line_and_a_guess() {
        let errors = file_errors(
            "order",
            "workers = \"many\"\nbacklogg = 5\nunit = \"words\"\nzzz = 1\n",
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        for (i, error) in errors.iter().enumerate() {
            assert!(error.contains(&format!("(line {})", i + 1)), "{errors:?}");
        }
        assert!(errors[1].contains("unknown key 'backlogg'"), "{errors:?}");
        assert!(errors[1].contains("did you mean 'backlog'"), "{errors:?}");
        assert!(!errors[3].contains("did you mean"), "{errors:?}");
    }

    #[test]
    fn config_errors_name_the_key_and_the_line() {
        let cases: [(&str, &str, &[&str]); 6] = [
            (
                "dup",
                "workers = 2\nbacklog = 5\nworkers = 3\n",
                &["line 3", "duplicate key"],
            ),
            (
                "string",
                "workers = 2\nlisten = [\"127.0.0.1:0]\n",
                &["line 2"],
            ),
            (
                "negative",
                "workers = 2\n\nmax-line = -5\n",
                &["line 3", "key 'max-line'", "-5"],
            ),
            (
                "level",
                "log-level = \"verbose\"\n",
                &[
                    "line 1",
                    "key 'log-level'",
                    "verbose",
                    "error, warn, info, debug, trace",
                ],
            ),
            (
                "unit",
                "unit = \"words\"\n",
                &["line 1", "key 'unit'", "graphemes, chars, bytes"],
            ),
            (
                "empty",
                "listen = []\n",
                &["line 1", "key 'listen'", "at least one address"],
            ),
        ];
        for (tag, text, wanted) in cases {
            let errors = file_errors(tag, text);
            assert_eq!(errors.len(), 1, "{tag}: {errors:?}");
            for want in wanted {
                assert!(
                    errors[0].contains(want),
                    "{tag}: {want:?} not in {:?}",
                    errors[0]
                );
            }
        }
    }

    #[test]
    fn a_relative_config_path_is_made_absolute_in_every_spelling() {
        let base = std::path::Path::new("/srv/raas/current");
        let args = |list: &[&str]| -> Vec<OsString> { list.iter().map(OsString::from).collect() };
        let got = with_absolute_config_path(
            args(&[
                "raasd",
                "-c",
                "a.toml",
                "-w",
                "2",
                "--config=b.toml",
                "-cc.toml",
                "--config",
                "/etc/d.toml",
            ]),
            base,
        );
        assert_eq!(
            got,
            args(&[
                "raasd",
                "-c",
                "/srv/raas/current/a.toml",
                "-w",
                "2",
                "--config=/srv/raas/current/b.toml",
                "-c/srv/raas/current/c.toml",
                "--config",
                "/etc/d.toml"
            ])
        );
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
