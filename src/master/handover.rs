//! The binary upgrade's policy (USR2): when to start a successor, when to hand
//! over to it, when to roll back.
//!
//! The mechanism (executing the binary, passing the sockets, the readiness pipe) is
//! in [`crate::upgrade`]. Here: the pid file becomes FILE.oldbin while the successor
//! starts; once it reports ready, this master names it to systemd and retires; if it
//! exits or is not ready within --upgrade-timeout, FILE.oldbin goes back to FILE
//! and this master serves on as if nothing happened; the successor's whole process
//! group is ended (TERM, then KILL after a grace), so that nothing it started keeps
//! the listen sockets. At its exit, the old master hands its totals on to the new one
//! (they, too, are its to hand over, like the sockets).

use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use sd_notify::NotifyState;

use super::{Master, notify_systemd};
use crate::console::Totals;
use crate::handoff;
use crate::listeners::Inheritance;
use crate::logging;
use crate::pidfile::{self, PidFile};
use crate::upgrade::{self, Readiness, Successor};

/// Where this master is in a binary upgrade, as the old master.
pub(super) enum Upgrade {
    /// None under way.
    Idle,
    /// A new master was started and has until `deadline` to say it is ready.
    Waiting {
        successor: Successor,
        deadline: Instant,
        started: Instant,
    },
    /// The new master took over: this one stops without removing what it now owns
    /// (the pid file, the unix socket files) and without telling systemd it stops.
    /// Its workers hand their connections to the new master's when that one takes
    /// them (it speaks our hand-over format), else they serve them to their end.
    HandedOver {
        connections_follow: bool,
        /// Told this master's totals when it exits.
        successor: Successor,
    },
}

impl Upgrade {
    /// When the successor must be ready by.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Upgrade::Waiting { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }
}

/// How long an abandoned successor's process group has, after TERM, before KILL.
const ABANDON_GRACE: Duration = Duration::from_secs(3);

/// A successor given up on (rolled back, or the upgrade abandoned by a stop): its
/// process group got TERM and gets KILL at `kill_at` if anything of it is left.
pub(super) struct Abandoned {
    group: Pid,
    pub(super) kill_at: Instant,
}

impl Master {
    /// USR2: starts the binary installed at our path as a new master, handing it
    /// the listeners. It takes over once ready; if it fails, nothing changes here.
    pub(super) fn start_upgrade(&mut self) -> Result<(), String> {
        let busy = !matches!(self.upgrade, Upgrade::Idle);
        if self.stopping.is_some() || busy || self.predecessor.is_some() {
            warn!("upgrade refused: an upgrade or a stop is already under way");
            return Err("an upgrade or a stop is already under way".to_string());
        }
        if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::rename_to_oldbin) {
            error!("upgrade aborted: {e}");
            return Err(format!("upgrade aborted: {e}"));
        }
        let sockets_fixed = self.inheritance == Inheritance::Systemd;
        let generation = self.generation + 1;
        match upgrade::start_successor(
            &self.origin.exe,
            &self.origin.args,
            (
                &self.listeners,
                self.coordination.handoff.as_ref(),
                &self.console,
            ),
            generation,
            sockets_fixed,
            &self.origin.start_dir,
        ) {
            Ok(successor) => {
                info!(
                    "upgrade: started {} as pid {}",
                    self.origin.exe.display(),
                    successor.pid
                );
                self.upgrade = Upgrade::Waiting {
                    successor,
                    deadline: Instant::now() + self.config.upgrade_timeout(),
                    started: Instant::now(),
                };
                self.title.shown.clear();
            }
            Err(e) => {
                self.roll_back_upgrade(&format!("cannot start {}: {e}", self.origin.exe.display()))
            }
        }
        Ok(())
    }

    /// The successor is ready: it owns the sockets and the pid file now. Retire.
    pub(super) fn hand_over(&mut self, hand_over_version: Option<u8>) {
        let connections_follow = self.config.handover
            && self.coordination.handoff.is_some()
            && hand_over_version == Some(handoff::VERSION);
        let Upgrade::Waiting {
            successor, started, ..
        } = std::mem::replace(&mut self.upgrade, Upgrade::Idle)
        else {
            return;
        };
        let successor_pid = successor.pid;
        self.upgrade = Upgrade::HandedOver {
            connections_follow,
            successor,
        };
        let reply = serde_json::json!({
            "ok": true,
            "upgrade": "handed over",
            "new_master": successor_pid.as_raw(),
            "ready_after_ms": started.elapsed().as_millis() as u64,
            "connections": if connections_follow { "handed over" } else { "drained" },
        });
        self.answer_upgrade_waiters(&reply.to_string());
        // New clients go to the new master, which holds the same sockets.
        self.console.close_listeners(false);
        info!(
            "upgrade: new master pid {} is ready; retiring, {}",
            successor_pid,
            if connections_follow {
                "handing the connections over to its workers"
            } else if self.config.handover {
                "draining the connections (it does not take them: another hand-over format)"
            } else {
                "draining the connections (--handover off)"
            }
        );
        // systemd (NotifyAccess=main) hears only the main pid: name the successor
        // and vouch for its readiness in one message, before leaving.
        notify_systemd(&[
            NotifyState::MainPid(successor_pid.as_raw() as u32),
            NotifyState::Ready,
        ]);
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.remove();
        }
        self.stop(false, "hand-over");
    }

    pub(super) fn roll_back_upgrade(&mut self, why: &str) {
        if let Upgrade::Waiting { successor, .. } =
            std::mem::replace(&mut self.upgrade, Upgrade::Idle)
        {
            self.abandon(successor.pid);
        }
        // The pid file first: whoever acts on the log line finds it back in place.
        if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::rename_back) {
            error!("{e}");
        }
        error!("upgrade failed, rolling back: {why}");
        self.title.shown.clear();
        self.answer_upgrade_waiters(&crate::console::error_reply(&format!("rolled back: {why}")));
    }

    /// Tells the `raasd ctl upgrade` clients waiting how the upgrade went.
    pub(super) fn answer_upgrade_waiters(&mut self, reply: &str) {
        self.console.answer_upgrade(reply, Instant::now());
    }

    /// Ends a successor that will not take over, with everything it started (its
    /// process group): TERM now, KILL after [`ABANDON_GRACE`].
    pub(super) fn abandon(&mut self, group: Pid) {
        upgrade::signal_group(group, Some(Signal::SIGTERM));
        self.abandoned = Some(Abandoned {
            group,
            kill_at: Instant::now() + ABANDON_GRACE,
        });
    }

    /// Once its grace is over (or at `exit`), kills what is left of an abandoned
    /// successor's process group, then makes sure nothing else holds the listen
    /// sockets: a process outside it that does would keep the port taken.
    pub(super) fn finish_abandoned_upgrade(&mut self, exiting: bool) {
        let Some(abandoned) = &self.abandoned else {
            return;
        };
        if !exiting && Instant::now() < abandoned.kill_at {
            return;
        }
        let group = abandoned.group;
        self.abandoned = None;
        if upgrade::signal_group(group, None) {
            warn!(
                "upgrade: processes of the abandoned new master's group {group} are still \
                 there; killing them"
            );
            upgrade::signal_group(group, Some(Signal::SIGKILL));
        }
        let mut ours: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
        ours.push(nix::unistd::getpid());
        for (pid, comm, addr) in upgrade::stray_holders(&self.listeners, &ours) {
            error!(
                "pid {pid} ({comm}), started by the failed upgrade outside its process \
                 group, still holds the listen socket {addr}: stop it, or the port stays \
                 taken after raasd stops"
            );
        }
    }

    /// Watches the successor of an upgrade: ready, dead or late.
    pub(super) fn follow_upgrade(&mut self) {
        let Upgrade::Waiting {
            successor,
            deadline,
            ..
        } = &self.upgrade
        else {
            return;
        };
        match successor.readiness() {
            Readiness::Ready(version) => self.hand_over(version),
            Readiness::Failed(None) => {
                self.roll_back_upgrade("the new master exited before it was ready")
            }
            Readiness::Failed(Some(why)) => {
                self.roll_back_upgrade(&format!("the new master could not start: {why}"))
            }
            Readiness::NotYet if Instant::now() >= *deadline => self.roll_back_upgrade(&format!(
                "the new master was not ready within {}s (--upgrade-timeout)",
                self.config.upgrade_timeout
            )),
            Readiness::NotYet => {}
        }
    }

    /// After an upgrade: the old master's totals, when it exits, join ours.
    pub(super) fn hear_farewell(&mut self) {
        let Some(farewell) = &mut self.farewell else {
            return;
        };
        match farewell.hear() {
            upgrade::Heard::NotYet => return,
            upgrade::Heard::Totals(json) => match serde_json::from_str::<Totals>(&json) {
                Ok(theirs) => {
                    info!(
                        "the old master's totals carried on: {} on {}",
                        logging::plural(theirs.requests, "request"),
                        logging::plural(theirs.connections_accepted, "connection")
                    );
                    self.totals.add(&theirs);
                }
                Err(e) => warn!("the old master's totals are unreadable ({e}): {json}"),
            },
            upgrade::Heard::Nothing => {
                warn!("the old master exited without handing on its totals; they restart here")
            }
        }
        self.farewell = None;
    }

    /// At exit after a hand-over: the successor carries our totals on.
    pub(super) fn hand_on_totals(&self) {
        if let Upgrade::HandedOver { successor, .. } = &self.upgrade {
            let json = serde_json::to_string(&self.totals).unwrap_or_default();
            if let Err(e) = successor.send_totals(&json) {
                warn!("cannot hand the totals on to pid {}: {e}", successor.pid);
            }
        }
    }

    /// Everything serves: tell whoever waits for it.
    pub(super) fn announce_ready(&mut self) {
        if let Some(predecessor) = self.predecessor.take() {
            // The old master, still systemd's main pid, reports our readiness for us.
            self.systemd.ready = true;
            if let Some(path) = &self.config.pid {
                match PidFile::write(path, std::process::id()) {
                    Ok(pid_file) => self.pid_file = Some(pid_file),
                    Err(e) => error!("{e}"),
                }
                if let Some(stale) = pidfile::remove_stale_oldbin(path) {
                    warn!(
                        "the old master died during the upgrade: removed its {}",
                        stale.display()
                    );
                }
            }
            let takes_connections = self.coordination.handoff.as_ref().map(|_| handoff::VERSION);
            match predecessor.announce_ready(takes_connections) {
                Ok(farewell) => self.farewell = Some(farewell),
                Err(e) => warn!("cannot tell the old master that this one is ready: {e}"),
            }
        }
        if !self.systemd.ready {
            self.systemd.ready = true;
            notify_systemd(&[NotifyState::Ready]);
        }
    }
}
