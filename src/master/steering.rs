//! Answering the console: the master's status, its metrics, and the commands of
//! `raasd ctl`, which have the same effects as the signals.
//!
//! The sockets and the protocols are [`crate::console`]'s; here the master reads
//! the supervisor's state into a [`Status`] and hands a command to the supervisor,
//! as an event like a signal's. Nothing here blocks: an `upgrade` is answered when
//! it ends.

use std::time::Instant;

use log::debug;

use super::Master;
use crate::console::{
    self, ListenerStatus, MasterStatus, Request, Status, Totals, WorkerStatus, error_reply,
};
use crate::listeners::Listener;
use crate::supervisor::{Command, Event};

impl Master {
    /// Serves the console's clients: takes the complete requests; answers the
    /// questions here and hands the commands to the supervisor.
    pub(super) fn serve_console(&mut self) {
        let now = Instant::now();
        for (id, request) in self.console.serve(now) {
            let command = match request {
                Request::Status => {
                    let status = self.status();
                    let reply = serde_json::to_string(&status)
                        .unwrap_or_else(|e| error_reply(&e.to_string()));
                    self.console.reply(id, 200, &reply, now);
                    continue;
                }
                Request::Metrics => {
                    let status = self.status();
                    self.console.reply(id, 200, &console::metrics(&status), now);
                    continue;
                }
                Request::Livez => {
                    let (code, body) = match self.core.census().late {
                        0 => (200, "ok\n".to_string()),
                        late => (503, format!("{late} late\n")),
                    };
                    self.console.reply(id, code, &body, now);
                    continue;
                }
                Request::Readyz => {
                    let phase = self.core.phase();
                    let code = if phase.is_ready() { 200 } else { 503 };
                    self.console
                        .reply(id, code, &format!("{}\n", phase.name()), now);
                    continue;
                }
                Request::Workers(n) => Command::Workers(n),
                Request::Reload => Command::Reload,
                Request::Upgrade => Command::Upgrade,
                Request::Stop { quick } => Command::Stop { quick },
                Request::ReopenLogs => Command::ReopenLogs,
            };
            self.feed(Event::Console(id, command));
        }
    }

    /// The status of the server, read now.
    pub(super) fn status(&mut self) -> Status {
        let now_epoch = super::epoch_seconds();
        let now = Instant::now();
        let now_ms = crate::scoreboard::monotonic_ms();
        let census = self.core.census();
        let state = self.core.phase().name();
        let mut totals: Totals = self.core.totals().clone();
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let board = &self.coordination.scoreboard;
        let mut worker_status = Vec::with_capacity(self.core.workers().len());
        for w in self.core.workers() {
            let c = board.counters(w.cell);
            totals.add_served(&c.served());
            let resident = std::fs::read_to_string(format!("/proc/{}/statm", w.pid))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|pages| pages * page);
            worker_status.push(WorkerStatus {
                slot: w.slot,
                pid: w.pid.0,
                generation: w.generation,
                state: self.core.state_of(w),
                started_at: now_epoch
                    .saturating_sub(now.saturating_duration_since(w.spawned_at).as_secs()),
                connections: c.connections,
                requests: c.served,
                bytes_received: c.bytes_in,
                bytes_sent: c.bytes_out,
                heartbeat_age_ms: board.heartbeat_age_ms(w.cell, now_ms),
                resident_bytes: resident,
                sandbox: crate::sandbox::confinement(
                    w.sandbox,
                    crate::sandbox::availability().is_ok(),
                    crate::sandbox::kernel_mode(w.pid.0),
                )
                .word(),
            });
        }
        worker_status.sort_by_key(|w| (w.slot, w.pid));
        let listeners = self
            .sockets
            .listeners
            .iter()
            .map(|c| {
                let queue = accept_queue(&c.listener);
                ListenerStatus {
                    address: c.listener.local_addr(),
                    queue,
                    backlog: queue.map(|_| effective_backlog(self.config.backlog)),
                }
            })
            .collect();
        debug!("status asked for");
        Status {
            master: MasterStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION"),
                started_at: self.origin.started_at,
                config_file: self.config.config.as_ref().map(|p| p.display().to_string()),
                generation: self.core.generation(),
                workers_target: self.core.target(),
                workers_accepting: census.accepting,
                workers_late: census.late,
                state: state.to_string(),
                handover: self.config.handover && self.coordination.handoff.is_some(),
            },
            listeners,
            workers: worker_status,
            totals,
        }
    }
}

/// The accept queue's capacity: --backlog, capped by the kernel's somaxconn.
fn effective_backlog(backlog: u32) -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(backlog, |max| backlog.min(max))
}

/// How many connections wait in a TCP listener's accept queue, from
/// /proc/net/tcp{,6}, where a listening socket's line shows it as its receive queue.
fn accept_queue(listener: &Listener) -> Option<u32> {
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::MetadataExt;
    let Listener::Tcp(tcp) = listener else {
        return None;
    };
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", tcp.as_fd().as_raw_fd()))
        .ok()?
        .ino()
        .to_string();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() <= 9 {
                continue;
            }
            if f[3] != "0A" {
                // Listening sockets come first; the rest are connections.
                break;
            }
            if f[9] == inode {
                let (_, rx) = f[4].split_once(':')?;
                return u32::from_str_radix(rx, 16).ok();
            }
        }
    }
    None
}
