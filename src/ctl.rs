//! `raasd ctl`: the control socket's client.
//!
//! Owns the command line of `raasd ctl` and how replies are shown: it finds the
//! socket (`--control PATH`, or the `control` key of `-c CONFIG`), sends one command
//! line, and prints the JSON reply, or for `status` a table (`--json` for scripts).
//! Of a config file it reads only `control`, leniently: the operator asks for status
//! exactly when the file may be broken (after a failed reload).
//! The protocol itself is [`crate::console`]'s. Exit status: 0 when the server did
//! what was asked, 1 when it refused or could not be reached, 2 for a usage error.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

/// Steer a running raasd through its control socket (--control).
#[derive(Parser, Debug)]
#[command(name = "raasd ctl", bin_name = "raasd ctl", max_term_width = 80)]
struct Ctl {
    /// The control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    control: Option<PathBuf>,

    /// Find the control socket in this config file (its `control` key).
    #[arg(short = 'c', long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print the server's JSON reply as it is (for scripts).
    #[arg(long)]
    json: bool,

    /// How long to wait for the reply, in seconds (an upgrade waits for the new
    /// master: up to its --upgrade-timeout).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = parse_timeout)]
    timeout: u64,

    /// status | workers N | reload | upgrade | stop [--quick] | reopen-logs
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Whole seconds, at least 1 (a reply cannot come in no time).
fn parse_timeout(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(secs) if secs >= 1 => Ok(secs),
        _ => Err("a whole number of seconds, at least 1".to_string()),
    }
}

/// Runs `raasd ctl ARGS` (`args[0]` is "ctl"); returns the exit status.
pub fn run(args: &[OsString]) -> i32 {
    let ctl = match Ctl::try_parse_from(args) {
        Ok(ctl) => ctl,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // `--json` may come after the command too (`raasd ctl status --json`).
    let mut words = ctl.command;
    let mut json = ctl.json;
    if let Some(at) = words.iter().position(|w| w == "--json") {
        words.remove(at);
        json = true;
    }
    let command = words.join(" ");
    if let Err(why) = crate::console::parse_command(&command) {
        eprintln!("raasd ctl: {why}");
        return 2;
    }
    let path = match (&ctl.control, &ctl.config) {
        (Some(path), _) => path.clone(),
        (None, Some(file)) => match control_of_file(file) {
            Ok(path) => path,
            Err(e) => {
                eprintln!("raasd ctl: {e}");
                return 2;
            }
        },
        (None, None) => {
            eprintln!("raasd ctl: say where the control socket is: --control PATH or -c CONFIG");
            return 2;
        }
    };
    if let Some(what) = not_a_socket(&path) {
        eprintln!(
            "raasd ctl: cannot reach {}: it is {what}, not a control socket",
            path.display()
        );
        return 1;
    }
    let reply = match ask(&path, &command, Duration::from_secs(ctl.timeout)) {
        Ok(reply) => reply,
        Err(why) => {
            eprintln!("raasd ctl: cannot reach {}: {why}", path.display());
            return 1;
        }
    };
    let parsed: serde_json::Value = match serde_json::from_str(&reply) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("raasd ctl: the server answered something else than JSON: {reply}");
            return 1;
        }
    };
    let ok = parsed.get("ok").and_then(|v| v.as_bool()) != Some(false);
    if json {
        println!("{reply}");
    } else if let Some(error) = parsed.get("error").and_then(|e| e.as_str()) {
        eprintln!("raasd ctl: {error}");
    } else if command == "status" {
        print!("{}", status_table(&parsed));
    } else {
        println!("{reply}");
    }
    if ok { 0 } else { 1 }
}

/// Why `-c FILE` did not lead to a control socket.
#[derive(Debug, PartialEq, Eq)]
enum FindError {
    Unreadable { file: PathBuf, why: String },
    NotToml { file: PathBuf, why: String },
    NoControl { file: PathBuf },
    NotAPath { file: PathBuf },
}

impl std::fmt::Display for FindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FindError::Unreadable { file, why } => {
                write!(f, "cannot read {}: {why}", file.display())
            }
            FindError::NotToml { file, why } => write!(
                f,
                "{} is not TOML, so its control key cannot be read: {why}",
                file.display()
            ),
            FindError::NoControl { file } => write!(
                f,
                "{} sets no control socket: add control = \"/run/raasd/ctl.sock\" \
                 (and restart raasd), or give --control PATH",
                file.display()
            ),
            FindError::NotAPath { file } => {
                write!(f, "{}: control is not a string", file.display())
            }
        }
    }
}

/// The `control` key of config file `file`, and nothing else of it: other keys may
/// be wrong or unknown to this version. A relative path is the file's directory's
/// (or its `working-directory`'s, when the file sets one).
fn control_of_file(file: &Path) -> Result<PathBuf, FindError> {
    let text = std::fs::read_to_string(file).map_err(|e| FindError::Unreadable {
        file: file.to_path_buf(),
        why: crate::errors::plain(&e),
    })?;
    control_in(&text, file)
}

fn control_in(text: &str, file: &Path) -> Result<PathBuf, FindError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| FindError::NotToml {
            file: file.to_path_buf(),
            why: e.message().to_string(),
        })?;
    let control = match table.get("control") {
        None => {
            return Err(FindError::NoControl {
                file: file.to_path_buf(),
            });
        }
        Some(toml::Value::String(s)) => PathBuf::from(s),
        Some(_) => {
            return Err(FindError::NotAPath {
                file: file.to_path_buf(),
            });
        }
    };
    let file_dir = file.parent().unwrap_or(Path::new("."));
    let base = match table.get("working-directory") {
        Some(toml::Value::String(dir)) => file_dir.join(dir),
        _ => file_dir.to_path_buf(),
    };
    Ok(base.join(control))
}

/// What `path` is when it exists and is not a socket ("a directory", "a file").
fn not_a_socket(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path).ok()?.file_type();
    if kind.is_socket() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        Some("a file")
    }
}

/// Sends one command line and reads the one-line reply.
fn ask(path: &std::path::Path, command: &str, timeout: Duration) -> Result<String, String> {
    let plain = |e: std::io::Error| crate::errors::plain(&e);
    let mut stream = UnixStream::connect(path).map_err(plain)?;
    stream.set_read_timeout(Some(timeout)).map_err(plain)?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(plain)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(plain)?;
    if reply.is_empty() {
        return Err("the server closed the connection without a reply".to_string());
    }
    Ok(reply.trim_end().to_string())
}

/// `status` for a person.
fn status_table(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let m = &status["master"];
    let t = &status["totals"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "master pid {} (raasd {}), generation {}, {}: {}/{} workers accepting{}",
        s(&m["pid"]),
        s(&m["version"]),
        s(&m["generation"]),
        s(&m["state"]),
        s(&m["workers_accepting"]),
        s(&m["workers_target"]),
        match m["workers_late"].as_u64() {
            Some(late) if late > 0 => format!(", {late} late"),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "since start: {} requests on {} connections, {} bytes received, {} bytes sent; restarts: {}",
        s(&t["requests"]),
        s(&t["connections_accepted"]),
        s(&t["bytes_received"]),
        s(&t["bytes_sent"]),
        t["restarts"]
            .as_object()
            .map(|r| {
                let parts: Vec<String> = r.iter().map(|(k, v)| format!("{k} {v}")).collect();
                if parts.is_empty() {
                    "none".to_string()
                } else {
                    parts.join(", ")
                }
            })
            .unwrap_or_default()
    );
    let _ = writeln!(out, "{:<28} {:>7} {:>8}", "listener", "queue", "backlog");
    for l in status["listeners"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<28} {:>7} {:>8}",
            s(&l["address"]),
            s(&l["queue"]),
            s(&l["backlog"])
        );
    }
    let _ = writeln!(
        out,
        "{:>4} {:>7} {:>4} {:<10} {:>6} {:>10} {:>12} {:>12} {:>9} {:>8} sandbox",
        "slot",
        "pid",
        "gen",
        "state",
        "conns",
        "requests",
        "received",
        "sent",
        "beat ms",
        "rss MiB"
    );
    for w in status["workers"].as_array().into_iter().flatten() {
        let rss = w["resident_bytes"]
            .as_u64()
            .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
        let _ = writeln!(
            out,
            "{:>4} {:>7} {:>4} {:<10} {:>6} {:>10} {:>12} {:>12} {:>9} {:>8} {}",
            s(&w["slot"]),
            s(&w["pid"]),
            s(&w["generation"]),
            s(&w["state"]),
            s(&w["connections"]),
            s(&w["requests"]),
            s(&w["bytes_received"]),
            s(&w["bytes_sent"]),
            s(&w["heartbeat_age_ms"]),
            rss,
            s(&w["sandbox"])
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_control_key_is_read_and_relative_paths_are_the_files() {
        let file = Path::new("/etc/raasd/raasd.toml");
        let read = |text: &str| control_in(text, file);
        assert_eq!(
            read("control = \"ctl.sock\"\nbogus = 1\nworkers = \"x\""),
            Ok(PathBuf::from("/etc/raasd/ctl.sock"))
        );
        assert_eq!(
            read("control = \"/run/raasd/ctl.sock\""),
            Ok(PathBuf::from("/run/raasd/ctl.sock"))
        );
        assert_eq!(
            read("control = \"ctl.sock\"\nworking-directory = \"/srv/raasd\""),
            Ok(PathBuf::from("/srv/raasd/ctl.sock"))
        );
        assert!(matches!(
            read("workers = 2"),
            Err(FindError::NoControl { .. })
        ));
        assert!(matches!(
            read("control = 3"),
            Err(FindError::NotAPath { .. })
        ));
        assert!(matches!(read("control = "), Err(FindError::NotToml { .. })));
    }
}
