//! Answering the console: the master's status, its metrics, and the commands of
//! `raasd ctl`, which have the same effects as the signals.
//!
//! The sockets and the protocols are [`crate::console`]'s; here the master reads
//! its own state into a [`Status`] and dispatches a command to the verb a signal
//! would have called. Nothing here blocks: an `upgrade` is answered when it ends.

use std::time::Instant;

use log::debug;

use super::Master;
use super::handover::Upgrade;
use super::workers::{self, Life};
use crate::console::{
    self, ListenerStatus, MasterStatus, Request, Status, Totals, WorkerStatus, error_reply,
};
use crate::listeners::Listener;

impl Master {
    /// Serves the console's clients: takes the complete requests and answers them.
    pub(super) fn serve_console(&mut self) {
        let now = Instant::now();
        for (id, request) in self.console.serve(now) {
            let reply = match request {
                Request::Status => {
                    let status = self.status();
                    serde_json::to_string(&status).unwrap_or_else(|e| error_reply(&e.to_string()))
                }
                Request::Metrics => {
                    let status = self.status();
                    self.console.reply(id, 200, &console::metrics(&status), now);
                    continue;
                }
                Request::Livez => {
                    let (code, body) = match self.census().late {
                        0 => (200, "ok\n".to_string()),
                        late => (503, format!("{late} late\n")),
                    };
                    self.console.reply(id, code, &body, now);
                    continue;
                }
                Request::Readyz => {
                    let phase = self.phase();
                    let code = if phase.is_ready() { 200 } else { 503 };
                    self.console
                        .reply(id, code, &format!("{}\n", phase.name()), now);
                    continue;
                }
                Request::Workers(n) if self.stopping.is_some() => {
                    let _ = n;
                    error_reply("the server is stopping")
                }
                Request::Workers(n) => {
                    self.resize(n, "raasd ctl workers");
                    serde_json::json!({ "ok": true, "workers": n }).to_string()
                }
                Request::Reload => match self.reload() {
                    Ok(()) => {
                        serde_json::json!({ "ok": true, "generation": self.generation }).to_string()
                    }
                    Err(why) => error_reply(&format!("reload failed, nothing changed: {why}")),
                },
                Request::Upgrade => {
                    // Answered when the new master is ready or the upgrade rolled back
                    // (which may be at once: the binary cannot be started).
                    self.console.await_upgrade(id);
                    match self.start_upgrade() {
                        Ok(()) => continue,
                        Err(why) => error_reply(&why),
                    }
                }
                Request::Stop { quick } => {
                    let reply = serde_json::json!({ "ok": true, "stopping": if quick { "quick" } else { "graceful" } });
                    self.console.reply(id, 200, &reply.to_string(), now);
                    if quick {
                        self.stop(true, "raasd ctl stop");
                    } else {
                        self.stop_after_draining("raasd ctl stop");
                    }
                    continue;
                }
                Request::ReopenLogs => {
                    self.reopen_logs();
                    serde_json::json!({ "ok": true }).to_string()
                }
            };
            self.console.reply(id, 200, &reply, now);
        }
    }

    /// The status of the server, read now.
    pub(super) fn status(&mut self) -> Status {
        let now_epoch = super::epoch_seconds();
        let now = Instant::now();
        let now_ms = crate::scoreboard::monotonic_ms();
        let census = self.census();
        let state = self.phase().name();
        let mut totals: Totals = self.totals.clone();
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let mut worker_status = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let c = self.scoreboard.counters(w.cell);
            totals.requests += c.served;
            totals.connections_accepted += c.accepted;
            totals.bytes_received += c.bytes_in;
            totals.bytes_sent += c.bytes_out;
            let resident = std::fs::read_to_string(format!("/proc/{}/statm", w.pid))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|pages| pages * page);
            worker_status.push(WorkerStatus {
                slot: w.slot,
                pid: w.pid.as_raw(),
                generation: w.generation,
                state: match w.life {
                    Life::Starting => "starting",
                    Life::Accepting if self.is_late(w) => "late",
                    Life::Accepting => "accepting",
                    Life::Replacing => "replacing",
                    Life::Retiring => "retiring",
                    Life::Killed(_) => "killed",
                },
                started_at: now_epoch.saturating_sub(now.duration_since(w.spawned_at).as_secs()),
                connections: c.connections,
                requests: c.served,
                bytes_received: c.bytes_in,
                bytes_sent: c.bytes_out,
                heartbeat_age_ms: self.scoreboard.heartbeat_age_ms(w.cell, now_ms),
                resident_bytes: resident,
                sandbox: crate::sandbox::confinement(
                    w.sandbox,
                    crate::sandbox::availability().is_ok(),
                    crate::sandbox::kernel_mode(w.pid.as_raw()),
                )
                .word(),
            });
        }
        worker_status.sort_by_key(|w| (w.slot, w.pid));
        let listeners = self
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
                started_at: self.started_at,
                config_file: self.config.config.as_ref().map(|p| p.display().to_string()),
                generation: self.generation,
                workers_target: self.target,
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

/// Where an upgrade is, for [`Phase::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpgradeStep {
    Idle,
    Waiting,
    HandedOver,
}

/// What the master is doing, as `ctl status` says and `/readyz` decides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// At least one worker of the current generation accepts and beats in time.
    Serving,
    /// No worker is wanted (WINCH, `ctl workers 0`): the sockets stay open and
    /// connections wait in the accept queue.
    Paused,
    /// Workers are wanted but none accepts (starting, late or failing).
    Unavailable,
    /// A new master was started and is not ready yet; this one still serves.
    Upgrading,
    /// A new master took over; this one is on its way out.
    HandedOver,
    /// A graceful stop is coming (--drain-delay): the workers still accept, but
    /// /readyz fails so that load balancers stop sending.
    Draining,
    /// A stop has begun.
    Stopping,
}

impl Phase {
    /// Decides from the master's state: a pure rule, so that it is tested alone.
    pub(super) fn of(
        upgrade: UpgradeStep,
        (draining, stopping): (bool, bool),
        census: workers::Census,
        target: usize,
    ) -> Phase {
        match upgrade {
            UpgradeStep::HandedOver => Phase::HandedOver,
            _ if stopping => Phase::Stopping,
            _ if draining => Phase::Draining,
            _ if target == 0 => Phase::Paused,
            _ if census.accepting == 0 => Phase::Unavailable,
            UpgradeStep::Waiting => Phase::Upgrading,
            UpgradeStep::Idle => Phase::Serving,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Paused => "paused",
            Phase::Unavailable => "unavailable",
            Phase::Upgrading => "upgrading",
            Phase::HandedOver => "handed over",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        }
    }

    /// Whether `/readyz` says yes: new clients are welcome.
    pub(super) fn is_ready(self) -> bool {
        matches!(self, Phase::Serving | Phase::Upgrading)
    }
}

impl Master {
    /// The master's phase now.
    pub(super) fn phase(&self) -> Phase {
        let step = match self.upgrade {
            Upgrade::Idle => UpgradeStep::Idle,
            Upgrade::Waiting { .. } => UpgradeStep::Waiting,
            Upgrade::HandedOver { .. } => UpgradeStep::HandedOver,
        };
        Phase::of(
            step,
            (self.draining.is_some(), self.stopping.is_some()),
            self.census(),
            self.target,
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_says_serving_only_while_a_worker_serves() {
        let up = |accepting| workers::Census { accepting, late: 0 };
        let idle = UpgradeStep::Idle;
        assert_eq!(Phase::of(idle, (false, false), up(2), 2), Phase::Serving);
        assert_eq!(Phase::of(idle, (false, false), up(0), 0), Phase::Paused);
        assert_eq!(
            Phase::of(idle, (false, false), up(0), 2),
            Phase::Unavailable
        );
        assert_eq!(Phase::of(idle, (false, true), up(2), 2), Phase::Stopping);
        assert_eq!(Phase::of(idle, (false, true), up(0), 0), Phase::Stopping);
        let waiting = UpgradeStep::Waiting;
        assert_eq!(
            Phase::of(waiting, (false, false), up(1), 2),
            Phase::Upgrading
        );
        let handed = UpgradeStep::HandedOver;
        assert_eq!(
            Phase::of(handed, (false, true), up(2), 2),
            Phase::HandedOver
        );
        assert_eq!(Phase::of(idle, (true, false), up(2), 2), Phase::Draining);
        assert_eq!(Phase::of(idle, (true, true), up(2), 2), Phase::Stopping);
        assert!(Phase::Serving.is_ready() && Phase::Upgrading.is_ready());
        assert!(!Phase::Draining.is_ready() && !Phase::Paused.is_ready());
        assert_eq!(Phase::Paused.name(), "paused");
    }
}
