//! The benchmark's results as one [`Summary`], printed as text for people or as one
//! JSON object (`--json`) for scripts; the field names are documented in raas(1).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::chaos::Mark;
use super::stats::{Counts, Stats};
use super::{BenchArgs, Mode};
use crate::addr::Addr;

#[derive(Serialize, Debug)]
pub struct Summary {
    pub mode: &'static str,
    pub addr: String,
    pub conns: u32,
    pub pipeline: u32,
    pub threads: usize,
    pub len: u32,
    pub unicode: bool,
    pub unit: &'static str,
    /// Seconds between the lines of one connection (idle mode only).
    pub interval_s: Option<f64>,
    pub duration_s: f64,
    pub requests: u64,
    pub replies: u64,
    pub rps: f64,
    pub reconnects: u64,
    pub errors: Errors,
    pub error_total: u64,
    pub latency_us: Latency,
    /// Chaos phases; empty without --chaos.
    pub phases: Vec<Phase>,
}

#[derive(Serialize, Debug, Default)]
pub struct Errors {
    pub mismatch: u64,
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub other: u64,
}

#[derive(Serialize, Debug, Default)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Serialize, Debug)]
pub struct Phase {
    pub index: usize,
    /// The signal that started the phase (none for the first).
    pub signal: Option<&'static str>,
    pub signal_error: Option<String>,
    pub start_s: f64,
    pub end_s: f64,
    pub requests: u64,
    pub replies: u64,
    pub reconnects: u64,
    pub errors: Errors,
}

impl Errors {
    fn of(c: &Counts) -> Errors {
        Errors {
            mismatch: c.mismatch,
            refused: c.refused,
            reset: c.reset,
            timeout: c.timeout,
            other: c.other,
        }
    }

    fn total(&self) -> u64 {
        self.mismatch + self.refused + self.reset + self.timeout + self.other
    }
}

impl Summary {
    pub fn new(
        args: &BenchArgs,
        addr: &Addr,
        threads: usize,
        stats: &Stats,
        marks: Option<&[Mark]>,
        elapsed: Duration,
    ) -> Summary {
        let total = stats.total();
        let h = &stats.latency_us;
        let latency = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
                mean: (h.mean() * 10.0).round() / 10.0,
            }
        };
        let duration_s = elapsed.as_secs_f64();
        let errors = Errors::of(&total);
        Summary {
            mode: args.mode.name(),
            addr: addr.to_string(),
            conns: args.conns,
            pipeline: args.pipeline,
            threads,
            len: args.len,
            unicode: args.unicode,
            unit: args.unit.name(),
            interval_s: (args.mode == Mode::Idle).then_some(args.interval),
            duration_s: round3(duration_s),
            requests: total.requests(),
            replies: total.replies,
            rps: (total.replies as f64 / duration_s.max(1e-9)).round(),
            reconnects: total.reconnects,
            error_total: errors.total(),
            errors,
            latency_us: latency,
            phases: marks.map_or_else(Vec::new, |m| phases(stats, m, duration_s)),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a summary always serialises")
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let text = if self.unicode { "unicode" } else { "ascii" };
        let shape = match self.mode {
            "persist" => format!("{} conns x pipeline {}", self.conns, self.pipeline),
            "idle" => format!(
                "{} conns, one line each per {} s",
                self.conns,
                self.interval_s.unwrap_or(0.0)
            ),
            _ => format!("{} concurrent", self.conns),
        };
        let _ = writeln!(
            s,
            "raas bench: {} mode, {shape}, {} threads, {}-byte {text} lines by {}, to {}",
            self.mode, self.threads, self.len, self.unit, self.addr
        );
        let _ = writeln!(s, "  duration   {:.2} s", self.duration_s);
        let _ = writeln!(
            s,
            "  requests   {} ({} replies, {:.0} replies/s)",
            self.requests, self.replies, self.rps
        );
        let _ = writeln!(
            s,
            "  errors     {} ({}); reconnects {}",
            self.error_total,
            errors_text(&self.errors),
            self.reconnects
        );
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "  latency    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.max)
        );
        if !self.phases.is_empty() {
            let _ = writeln!(
                s,
                "  chaos phases:\n    {:<5} {:<7} {:>7} {:>7} {:>10} {:>10} {:>10}  failures",
                "phase", "signal", "from_s", "to_s", "requests", "replies", "reconnects"
            );
            for p in &self.phases {
                let _ = writeln!(
                    s,
                    "    {:<5} {:<7} {:>7.2} {:>7.2} {:>10} {:>10} {:>10}  {}{}",
                    p.index,
                    p.signal.unwrap_or("-"),
                    p.start_s,
                    p.end_s,
                    p.requests,
                    p.replies,
                    p.reconnects,
                    errors_text(&p.errors),
                    p.signal_error
                        .as_deref()
                        .map_or(String::new(), |e| format!(" [{e}]")),
                );
            }
        }
        s
    }
}

fn phases(stats: &Stats, marks: &[Mark], end_s: f64) -> Vec<Phase> {
    (0..=marks.len())
        .map(|i| {
            let c = &stats.phases[i];
            let mark = i.checked_sub(1).map(|m| &marks[m]);
            Phase {
                index: i,
                signal: mark.map(|m| m.signal.name()),
                signal_error: mark.and_then(|m| m.error.clone()),
                start_s: round3(mark.map_or(0.0, |m| m.at.as_secs_f64())),
                end_s: round3(marks.get(i).map_or(end_s, |m| m.at.as_secs_f64())),
                requests: c.requests(),
                replies: c.replies,
                reconnects: c.reconnects,
                errors: Errors::of(c),
            }
        })
        .collect()
}

fn errors_text(e: &Errors) -> String {
    format!(
        "mismatch {}, refused {}, reset {}, timeout {}, other {}",
        e.mismatch, e.refused, e.reset, e.timeout, e.other
    )
}

/// A latency for people: µs below 10 ms, ms above.
fn us(v: u64) -> String {
    if v < 10_000 {
        format!("{v} us")
    } else {
        format!("{:.1} ms", v as f64 / 1000.0)
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_formatting() {
        assert_eq!(us(950), "950 us");
        assert_eq!(us(12_345), "12.3 ms");
    }
}
