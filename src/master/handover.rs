//! The binary upgrade's mechanics (USR2), as the supervisor asks for them.
//!
//! When to start a successor, hand over or roll back is
//! [`crate::supervisor::Supervisor`]'s; executing the binary, passing the sockets and
//! the readiness pipe are [`crate::upgrade`]'s. Here, the master carries the steps
//! out: the pid file becomes FILE.oldbin while the successor starts, and back on a
//! rollback; the successor's readiness becomes an event; an abandoned successor's
//! whole process group is ended (TERM, then KILL after a grace), so that nothing it
//! started keeps the listen sockets; the totals go to the new master at our exit,
//! and come from the old one at its exit.

use log::{error, info, warn};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::Master;
use crate::handoff;
use crate::listeners::Inheritance;
use crate::pidfile::{self, PidFile};
use crate::supervisor::{self, Event, PidFileStep, Totals, Upgrade};
use crate::upgrade::{self, Readiness};

impl Master {
    /// Renames the pid file to FILE.oldbin and starts the binary installed at our
    /// path as a new master of `generation`, handing it the listeners.
    pub(super) fn start_successor(&mut self, generation: u64) -> Event {
        if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::rename_to_oldbin) {
            return Event::UpgradeAborted(e);
        }
        let sockets_fixed = self.sockets.inheritance == Inheritance::Systemd;
        match upgrade::start_successor(
            &self.origin.exe,
            &self.origin.args,
            (
                &self.sockets.listeners,
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
                let pid = super::core_pid(successor.pid);
                self.links.successor = Some(successor);
                Event::SuccessorStarted(pid)
            }
            Err(e) => Event::SuccessorNotStarted(format!(
                "cannot start {}: {e}",
                self.origin.exe.display()
            )),
        }
    }

    /// Watches the successor of an upgrade: ready or failed (late is the
    /// supervisor's to notice).
    pub(super) fn follow_upgrade(&mut self) {
        if !matches!(self.core.upgrade(), Upgrade::Waiting { .. }) {
            return;
        }
        let Some(successor) = &self.links.successor else {
            return;
        };
        let event = match successor.readiness() {
            Readiness::Ready(version) => Event::SuccessorReady {
                takes_connections: version == Some(handoff::VERSION),
            },
            Readiness::Failed(why) => Event::SuccessorFailed(why),
            Readiness::NotYet => return,
        };
        self.feed(event);
    }

    /// When `pid` is the successor being waited for: what it said before exiting.
    pub(super) fn successor_said(&self, pid: Pid) -> Option<String> {
        let successor = self.links.successor.as_ref()?;
        if successor.pid != pid || !matches!(self.core.upgrade(), Upgrade::Waiting { .. }) {
            return None;
        }
        match successor.readiness() {
            Readiness::Failed(why) => why,
            _ => None,
        }
    }

    /// Ends a successor that will not take over, with everything it started (its
    /// process group): TERM now; the supervisor asks for the KILL after a grace.
    pub(super) fn abandon(&mut self, group: supervisor::Pid) {
        upgrade::signal_group(Pid::from_raw(group.0), Some(Signal::SIGTERM));
        self.links.successor = None;
    }

    /// Kills what is left of an abandoned successor's process group, then makes
    /// sure nothing else holds the listen sockets: a process outside it that does
    /// would keep the port taken.
    pub(super) fn end_abandoned(&mut self, group: supervisor::Pid) {
        let group = Pid::from_raw(group.0);
        if upgrade::signal_group(group, None) {
            warn!(
                "upgrade: processes of the abandoned new master's group {group} are still \
                 there; killing them"
            );
            upgrade::signal_group(group, Some(Signal::SIGKILL));
        }
        let workers = self.core.workers().iter();
        let mut ours: Vec<Pid> = workers.map(|w| Pid::from_raw(w.pid.0)).collect();
        ours.push(nix::unistd::getpid());
        for (pid, comm, addr) in upgrade::stray_holders(&self.sockets.listeners, &ours) {
            error!(
                "pid {pid} ({comm}), started by the failed upgrade outside its process \
                 group, still holds the listen socket {addr}: stop it, or the port stays \
                 taken after raasd stops"
            );
        }
    }

    /// After an upgrade: the old master's totals, when it exits, join ours.
    pub(super) fn hear_farewell(&mut self) {
        let Some(farewell) = &mut self.links.farewell else {
            return;
        };
        let heard = match farewell.hear() {
            upgrade::Heard::NotYet => return,
            upgrade::Heard::Totals(json) => Some(json),
            upgrade::Heard::Nothing => None,
        };
        self.links.farewell = None;
        self.feed(Event::Farewell(heard));
    }

    /// At exit after a hand-over: the successor carries our totals on.
    pub(super) fn hand_on_totals(&self, totals: &Totals) {
        if let Some(successor) = &self.links.successor {
            let json = serde_json::to_string(totals).unwrap_or_default();
            if let Err(e) = successor.send_totals(&json) {
                warn!("cannot hand the totals on to pid {}: {e}", successor.pid);
            }
        }
    }

    /// Every slot serves: the old master of the upgrade that started this one hears
    /// it (and, still systemd's main pid, reports our readiness for us).
    pub(super) fn tell_predecessor_ready(&mut self) {
        let Some(predecessor) = self.links.predecessor.take() else {
            return;
        };
        let takes_connections = self.coordination.handoff.as_ref().map(|_| handoff::VERSION);
        match predecessor.announce_ready(takes_connections) {
            Ok(farewell) => self.links.farewell = Some(farewell),
            Err(e) => warn!("cannot tell the old master that this one is ready: {e}"),
        }
    }

    /// The pid file's steps: written once a new master serves, back from
    /// FILE.oldbin after a rollback, removed at exit or at the hand-over.
    pub(super) fn move_pid_file(&mut self, step: PidFileStep) {
        match step {
            PidFileStep::Write => {
                let Some(path) = &self.origin.pid_path else {
                    return;
                };
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
            PidFileStep::Back => {
                if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::rename_back) {
                    error!("{e}");
                }
            }
            PidFileStep::Remove => {
                if let Some(pid_file) = self.pid_file.take() {
                    pid_file.remove();
                }
            }
        }
    }
}
