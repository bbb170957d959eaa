//! Log lines that say who speaks.
//!
//! Owns the logger set-up and the line format,
//! `[2026-11-23T16:27:57.123Z INFO  worker[2] pid=4242] accepting connections`,
//! written to stderr in one write per line so that the lines of the master and its
//! workers, which share stderr, never interleave mid-line. A forked worker calls
//! [`become_worker`] so its lines name its slot.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::LevelFilter;

const MASTER: usize = usize::MAX;

/// The worker slot of this process, or MASTER.
static SPEAKER: AtomicUsize = AtomicUsize::new(MASTER);

/// Starts logging: `level` when given, else RUST_LOG, else info.
pub fn init(level: Option<LevelFilter>) {
    let mut builder = match level {
        Some(level) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(level);
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    builder
        .format(|buf, record| {
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
        .target(env_logger::Target::Stderr)
        .init();
}

/// From now on this process's lines say `worker[slot]`.
pub fn become_worker(slot: usize) {
    SPEAKER.store(slot, Ordering::Relaxed);
}

/// `master` or `worker[N]`.
pub fn speaker() -> String {
    match SPEAKER.load(Ordering::Relaxed) {
        MASTER => "master".to_string(),
        slot => format!("worker[{slot}]"),
    }
}
