//! `--chaos PID`: sends the script's signals to a raasd master, one per interval, and
//! moves the phase clock the load threads count by, so failures can be told apart
//! per signal.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::engine::Shared;

/// A signal named as on the command line: `HUP`, `sighup`, `SIGTTIN`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChaosSignal(pub Signal);

impl FromStr for ChaosSignal {
    type Err = String;

    fn from_str(s: &str) -> Result<ChaosSignal, String> {
        let upper = s.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&full)
            .map(ChaosSignal)
            .map_err(|_| format!("'{s}' is not a signal name (e.g. HUP, TTIN, TTOU)"))
    }
}

impl ChaosSignal {
    /// The name without its SIG prefix.
    pub fn name(self) -> &'static str {
        let full = self.0.as_str();
        full.strip_prefix("SIG").unwrap_or(full)
    }
}

/// One signal sent: when (since the start of the load), and whether it failed.
#[derive(Clone, Debug)]
pub struct Mark {
    pub signal: ChaosSignal,
    pub at: Duration,
    pub error: Option<String>,
}

/// Sends `script[i]` at `start + (i + 1) * interval`; stops early when the load is
/// over. Returns what was sent.
pub fn run(
    pid: i32,
    script: &[ChaosSignal],
    interval: Duration,
    start: Instant,
    shared: &Shared,
) -> Vec<Mark> {
    let mut marks = Vec::with_capacity(script.len());
    for (i, &signal) in script.iter().enumerate() {
        let due = start + interval * (i as u32 + 1);
        loop {
            if shared.finished.load(Ordering::SeqCst) {
                return marks;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            thread::sleep((due - now).min(Duration::from_millis(50)));
        }
        // The phase moves first: on a busy machine this thread may not run again
        // for milliseconds after the kill, and the server's reaction belongs to the
        // new phase.
        shared.phase.store(i + 1, Ordering::SeqCst);
        let at = start.elapsed();
        let error = kill(Pid::from_raw(pid), signal.0)
            .err()
            .map(|e| format!("sending SIG{} to pid {pid}: {e}", signal.name()));
        if let Some(e) = &error {
            eprintln!("raas bench: {e}");
        }
        marks.push(Mark { signal, at, error });
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signal_names() {
        assert_eq!(
            "HUP".parse::<ChaosSignal>(),
            Ok(ChaosSignal(Signal::SIGHUP))
        );
        assert_eq!(
            "sigttin".parse::<ChaosSignal>(),
            Ok(ChaosSignal(Signal::SIGTTIN))
        );
        assert_eq!(ChaosSignal(Signal::SIGTTOU).name(), "TTOU");
        assert!("NOPE".parse::<ChaosSignal>().is_err());
    }
}
