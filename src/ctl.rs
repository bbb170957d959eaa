//! `raasd ctl`: the control socket's client.
//!
//! Owns the command line of `raasd ctl` and how replies are shown: it finds the
//! socket (`--control PATH`, or the `control` key of `-c CONFIG`), sends one command
//! line, and prints the JSON reply, or for `status` a table (`--json` for scripts).
//! The protocol itself is [`crate::console`]'s. Exit status: 0 when the server did
//! what was asked, 1 when it refused or could not be reached, 2 for a usage error.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Steer a running raasd through its control socket (--control).
#[derive(Parser, Debug)]
#[command(name = "raasd ctl", max_term_width = 80)]
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
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,

    /// status | workers N | reload | upgrade | stop [--quick] | reopen-logs
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    command: Vec<String>,
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
        (None, Some(file)) => {
            let args: Vec<OsString> = vec!["raasd".into(), "-c".into(), file.into()];
            match crate::config::load(&args) {
                Ok(config) => match config.control {
                    Some(path) => path,
                    None => {
                        eprintln!("raasd ctl: {} sets no control socket", file.display());
                        return 2;
                    }
                },
                Err(crate::config::LoadError::File(errors)) => {
                    eprintln!("raasd ctl: {}", errors.join("; "));
                    return 2;
                }
                Err(crate::config::LoadError::CommandLine(e)) => {
                    eprintln!("raasd ctl: {e}");
                    return 2;
                }
            }
        }
        (None, None) => {
            eprintln!("raasd ctl: say where the control socket is: --control PATH or -c CONFIG");
            return 2;
        }
    };
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
        s(&m["accepting_workers"]),
        s(&m["target_workers"]),
        match m["late_workers"].as_u64() {
            Some(late) if late > 0 => format!(", {late} late"),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "since start: {} requests on {} connections, {} bytes in, {} bytes out; restarts: {}",
        s(&t["requests"]),
        s(&t["connections"]),
        s(&t["bytes_in"]),
        s(&t["bytes_out"]),
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
        "{:>4} {:>7} {:>4} {:<10} {:>6} {:>10} {:>12} {:>12} {:>9} {:>8}",
        "slot",
        "pid",
        "gen",
        "state",
        "conns",
        "requests",
        "bytes in",
        "bytes out",
        "beat ms",
        "rss MiB"
    );
    for w in status["workers"].as_array().into_iter().flatten() {
        let rss = w["resident_bytes"]
            .as_u64()
            .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
        let _ = writeln!(
            out,
            "{:>4} {:>7} {:>4} {:<10} {:>6} {:>10} {:>12} {:>12} {:>9} {:>8}",
            s(&w["slot"]),
            s(&w["pid"]),
            s(&w["generation"]),
            s(&w["state"]),
            s(&w["connections"]),
            s(&w["requests"]),
            s(&w["bytes_in"]),
            s(&w["bytes_out"]),
            s(&w["heartbeat_age_ms"]),
            rss
        );
    }
    out
}
