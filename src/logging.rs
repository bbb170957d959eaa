//! Log lines that say who speaks.
//!
//! Owns the logger set-up, the line format,
//! `[2026-11-23T16:27:57.123Z INFO  worker[2] pid=4242] accepting connections`,
//! and the log destination: stderr, or `--log-file` opened in append mode and
//! reopened on demand (USR1, after logrotate moved it: by the master, which passes
//! the new file to its workers, see [`adopt`]). Every line is one write, so
//! the lines of the master and its workers, which share the destination, never
//! interleave mid-line. A forked worker calls [`become_worker`] so its lines name
//! its slot and generation. With `--log-format json` every line, of the log and of
//! the access log, is one JSON object instead: `ts`, `level`, `pid`, `msg`, `worker`
//! and `generation` on a worker's lines, and the figures a line carries as the
//! `log` crate's key-values (`requests`, `connections`, `cause`, ...).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::LevelFilter;

const MASTER: usize = usize::MAX;

/// The worker slot of this process, or MASTER.
static SPEAKER: AtomicUsize = AtomicUsize::new(MASTER);

/// A worker's generation (0 in the master).
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether lines are JSON objects (`--log-format json`).
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--log-format`: "json" makes every line of the log and the access log a JSON
/// object; anything else is the text format. Before [`init`]; a reload may change it.
pub fn set_format(format: &str) {
    JSON.store(format == "json", Ordering::Relaxed);
}

/// A JSON log line's fields, in the order written (the common ones first).
struct JsonLine(Vec<(String, serde_json::Value)>);

impl JsonLine {
    /// `ts`, `level`, `pid`, `role`, for a worker `worker` and `generation`, `msg`.
    fn new(level: &str, msg: &str) -> JsonLine {
        let mut line = JsonLine(Vec::with_capacity(8));
        line.insert("ts", rfc3339_millis(std::time::SystemTime::now()).into());
        line.insert("level", level.into());
        line.insert("pid", std::process::id().into());
        match SPEAKER.load(Ordering::Relaxed) {
            MASTER => line.insert("role", "master".into()),
            slot => {
                line.insert("role", "worker".into());
                line.insert("worker", slot.into());
                line.insert("generation", GENERATION.load(Ordering::Relaxed).into());
            }
        }
        line.insert("msg", msg.into());
        line
    }

    /// Adds a field; a name already there is replaced (the common fields win over a
    /// record's key-value of the same name only by coming first in the line).
    fn insert(&mut self, key: &str, value: serde_json::Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    /// The line, without its newline.
    fn text(&self) -> String {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// A JSON value for a figure: a number when it reads as one.
fn json_value(text: &str) -> serde_json::Value {
    text.parse::<u64>()
        .map(serde_json::Value::from)
        .or_else(|_| text.parse::<i64>().map(serde_json::Value::from))
        .unwrap_or_else(|_| text.into())
}

/// The log file and its path, when logging to a file.
static LOG_FILE: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

/// The access log (--access-log) and its path: one line per closed connection.
static ACCESS_LOG: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

/// Opens the access log (the master, before forking: workers inherit it).
pub fn open_access_log(path: &Path) -> Result<(), String> {
    let file = open(path, Log::Access)?;
    *ACCESS_LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some((path.to_path_buf(), file));
    ACCESS_LOG_ON.store(true, Ordering::Relaxed);
    Ok(())
}

/// Set once the access log is open: read on every closed connection, so without
/// taking the lock.
static ACCESS_LOG_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether there is an access log to write to.
pub fn access_log_enabled() -> bool {
    ACCESS_LOG_ON.load(Ordering::Relaxed)
}

/// One closed connection, as the access log tells it.
pub struct Access<'a> {
    pub peer: &'a str,
    pub duration_ms: u64,
    pub requests: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// How it ended (`client closed`, `idle`, …).
    pub end: &'a str,
}

/// Appends one line to the access log, stamped and signed like the log's lines,
/// in one write (so lines of several workers never interleave).
pub fn access(a: &Access) {
    let mut guard = ACCESS_LOG.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, file)) = guard.as_mut() {
        let line = if JSON.load(Ordering::Relaxed) {
            let mut line = JsonLine::new("INFO", "connection closed");
            line.insert("peer", a.peer.into());
            line.insert("duration_ms", a.duration_ms.into());
            line.insert("requests", a.requests.into());
            line.insert("bytes_received", a.bytes_received.into());
            line.insert("bytes_sent", a.bytes_sent.into());
            line.insert("end", a.end.into());
            format!("{}\n", line.text())
        } else {
            format!(
                "{} {} pid={} peer={} duration_ms={} requests={} bytes_received={} \
                 bytes_sent={} end=\"{}\"\n",
                rfc3339_millis(std::time::SystemTime::now()),
                speaker(),
                std::process::id(),
                a.peer,
                a.duration_ms,
                a.requests,
                a.bytes_received,
                a.bytes_sent,
                a.end
            )
        };
        let _ = file.write_all(line.as_bytes());
    }
}

/// `2026-11-27T19:34:12.345Z`.
fn rfc3339_millis(at: std::time::SystemTime) -> String {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Starts logging to `file` (or stderr): `level` when given, else RUST_LOG, else info.
pub fn init(level: Option<LevelFilter>, file: Option<&Path>) -> Result<(), String> {
    let target = match file {
        Some(path) => {
            let opened = open(path, Log::Main)?;
            *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((path.to_path_buf(), opened));
            env_logger::Target::Pipe(Box::new(FileWriter))
        }
        None => env_logger::Target::Stderr,
    };
    // A plain level (from --log-level, or RUST_LOG=debug) is applied as the global
    // maximum, which a reload can change either way; RUST_LOG with per-module
    // directives is handed to env_logger and fixed for the life of the process.
    let rust_log = std::env::var("RUST_LOG").ok();
    let plain_rust_log = rust_log
        .as_deref()
        .map_or(Some(LevelFilter::Info), |v| v.trim().parse().ok());
    let mut builder = env_logger::Builder::new();
    match plain_rust_log {
        Some(base) => {
            BASE_LEVEL.store(base as usize, Ordering::Relaxed);
            builder.filter_level(LevelFilter::Trace);
        }
        None => {
            builder.parse_filters(rust_log.as_deref().unwrap_or_default());
        }
    }
    builder
        .format(|buf, record| {
            if JSON.load(Ordering::Relaxed) {
                let mut line = JsonLine::new(record.level().as_str(), &record.args().to_string());
                let _ = record.key_values().visit(&mut Fields(&mut line));
                return writeln!(buf, "{}", line.text());
            }
            writeln!(
                buf,
                "[{} {:<5} {} pid={}] {}",
                buf.timestamp_millis(),
                record.level(),
                speaker(),
                std::process::id(),
                record.args()
            )
        })
        .target(target)
        .try_init()
        .map_err(|e| e.to_string())?;
    set_level(level);
    Ok(())
}

/// Applies `--log-level`, or, when it is not set, goes back to RUST_LOG's level
/// (when RUST_LOG is a plain level; per-module directives stay as they are).
pub fn set_level(level: Option<LevelFilter>) {
    let base = LEVELS.get(BASE_LEVEL.load(Ordering::Relaxed)).copied();
    if let Some(level) = level.or(base) {
        log::set_max_level(level);
    }
}

/// LevelFilter by its number (`LevelFilter as usize`).
const LEVELS: [LevelFilter; 6] = [
    LevelFilter::Off,
    LevelFilter::Error,
    LevelFilter::Warn,
    LevelFilter::Info,
    LevelFilter::Debug,
    LevelFilter::Trace,
];

/// The level RUST_LOG (or the default, info) gave, when it was a plain level;
/// out of LEVELS' range when it was not.
static BASE_LEVEL: AtomicUsize = AtomicUsize::new(usize::MAX);

/// One of the two logs a process writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// `--log-file`.
    Main,
    /// `--access-log`.
    Access,
}

impl Log {
    fn file(self) -> &'static Mutex<Option<(PathBuf, File)>> {
        match self {
            Log::Main => &LOG_FILE,
            Log::Access => &ACCESS_LOG,
        }
    }

    /// `log file`, `access log`.
    pub fn name(self) -> &'static str {
        match self {
            Log::Main => "log file",
            Log::Access => "access log",
        }
    }
}

/// Reopens `log` at its path (USR1, in the master): after a rotation, lines go to
/// the new file. Returns a copy of the new file's descriptor for the workers, which
/// may not open files (they are sandboxed) and get it over their control channel;
/// None when this log is not written to a file. `owner` is the workers' user: the
/// file the master creates then belongs to them, as nginx does.
pub fn reopen(log: Log, owner: Option<(u32, u32)>) -> Result<Option<File>, String> {
    let mut guard = log.file().lock().unwrap_or_else(|e| e.into_inner());
    let Some((path, file)) = guard.as_mut() else {
        return Ok(None);
    };
    let opened = open(path, log)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&opened, Some(uid), Some(gid)).map_err(|e| {
            format!(
                "cannot give {} {} to the workers' user: {}",
                log.name(),
                path.display(),
                crate::errors::plain(&e)
            )
        })?;
    }
    let copy = opened.try_clone().map_err(|e| {
        format!(
            "cannot pass {} {} on: {}",
            log.name(),
            path.display(),
            crate::errors::plain(&e)
        )
    })?;
    *file = opened;
    Ok(Some(copy))
}

/// Writes `log` to `file` from now on (a worker, given the file the master
/// reopened). A log this process does not write is left alone.
pub fn adopt(log: Log, file: File) {
    let mut guard = log.file().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, current)) = guard.as_mut() {
        *current = file;
    }
}

fn open(path: &Path, log: Log) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            format!(
                "cannot open {} {}: {}",
                log.name(),
                path.display(),
                crate::errors::plain(&e)
            )
        })
}

/// Writes whole records to the current log file.
struct FileWriter;

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some((_, file)) => file.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub use crate::supervisor::plural;

/// Writes a line the supervisor decided on, with its fields (the JSON format
/// shows them; the plain one shows the text).
pub fn write_line(line: &crate::supervisor::Line) {
    use log::kv::{Error, Key, Source, Value, VisitSource};
    struct Fields<'a>(&'a [(&'static str, crate::supervisor::Field)]);
    impl Source for Fields<'_> {
        fn visit<'kvs>(&'kvs self, visitor: &mut dyn VisitSource<'kvs>) -> Result<(), Error> {
            for (key, field) in self.0 {
                let value = match field {
                    crate::supervisor::Field::Int(n) => Value::from(*n),
                    crate::supervisor::Field::Text(text) => Value::from(text.as_str()),
                };
                visitor.visit_pair(Key::from_str(key), value)?;
            }
            Ok(())
        }
    }
    if line.level > log::max_level() {
        return;
    }
    log::logger().log(
        &log::Record::builder()
            .level(line.level)
            .target("raasd::master")
            .module_path_static(Some("raasd::master"))
            .args(format_args!("{}", line.text))
            .key_values(&Fields(&line.fields))
            .build(),
    );
}

/// A record's key-values, into a JSON line.
struct Fields<'a>(&'a mut JsonLine);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let value = match value.to_u64() {
            Some(n) => serde_json::Value::from(n),
            None => json_value(&value.to_string()),
        };
        self.0.insert(key.as_str(), value);
        Ok(())
    }
}

/// From now on this process's lines say `worker[slot]` (and in JSON its generation).
pub fn become_worker(slot: usize, generation: u64) {
    SPEAKER.store(slot, Ordering::Relaxed);
    GENERATION.store(generation, Ordering::Relaxed);
}

/// `master` or `worker[N]`.
pub fn speaker() -> String {
    match SPEAKER.load(Ordering::Relaxed) {
        MASTER => "master".to_string(),
        slot => format!("worker[{slot}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_rfc3339_utc_with_milliseconds() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_807_194_123);
        assert_eq!(rfc3339_millis(at), "2026-11-27T19:19:54.123Z");
        assert_eq!(
            rfc3339_millis(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn figures_read_as_json_numbers() {
        assert_eq!(json_value("12"), serde_json::json!(12));
        assert_eq!(json_value("x"), serde_json::json!("x"));
    }
}
