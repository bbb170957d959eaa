//! The binary upgrade's policy (USR2): when to start a successor, when to hand
//! over to it, when to roll back.
//!
//! The mechanism (executing the binary, passing the sockets, the readiness pipe) is
//! in [`crate::upgrade`]. Here: the pid file becomes FILE.oldbin while the successor
//! starts; once it reports ready, this master names it to systemd and retires; if it
//! exits or is not ready within [`UPGRADE_DEADLINE`], FILE.oldbin goes back to FILE
//! and this master serves on as if nothing happened.

use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::sys::signal::{Signal, kill};
use sd_notify::NotifyState;

use super::{Master, notify_systemd};
use crate::listeners::Inheritance;
use crate::pidfile::PidFile;
use crate::upgrade::{self, Readiness};

/// How long a successor master may take to be ready before the upgrade is rolled back.
pub(super) const UPGRADE_DEADLINE: Duration = Duration::from_secs(30);

impl Master {
    /// USR2: starts the binary installed at our path as a new master, handing it
    /// the listeners. It takes over once ready; if it fails, nothing changes here.
    pub(super) fn start_upgrade(&mut self) {
        if self.stopping.is_some() || self.successor.is_some() || self.predecessor.is_some() {
            warn!("SIGUSR2 ignored: an upgrade or a stop is already under way");
            return;
        }
        if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::rename_to_oldbin) {
            error!("upgrade aborted: {e}");
            return;
        }
        let sockets_fixed = self.inheritance == Inheritance::Systemd;
        let generation = self.generation + 1;
        match upgrade::start_successor(
            &self.exe,
            &self.args,
            &self.listeners,
            generation,
            sockets_fixed,
        ) {
            Ok(successor) => {
                info!(
                    "upgrade: started {} as pid {}",
                    self.exe.display(),
                    successor.pid
                );
                self.successor = Some((successor, Instant::now() + UPGRADE_DEADLINE));
                self.title.clear();
            }
            Err(e) => self.roll_back_upgrade(&format!("cannot start {}: {e}", self.exe.display())),
        }
    }

    /// The successor is ready: it owns the sockets and the pid file now. Retire.
    pub(super) fn hand_over(&mut self) {
        let Some((successor, _)) = self.successor.take() else {
            return;
        };
        info!(
            "upgrade: new master pid {} is ready; retiring",
            successor.pid
        );
        // systemd (NotifyAccess=main) hears only the main pid: name the successor
        // and vouch for its readiness in one message, before leaving.
        notify_systemd(&[
            NotifyState::MainPid(successor.pid.as_raw() as u32),
            NotifyState::Ready,
        ]);
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.remove();
        }
        self.handing_over = true;
        self.stop(false, "hand-over");
    }

    pub(super) fn roll_back_upgrade(&mut self, why: &str) {
        if let Some((successor, _)) = self.successor.take() {
            let _ = kill(successor.pid, Signal::SIGTERM);
        }
        // The pid file first: whoever acts on the log line finds it back in place.
        if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::rename_back) {
            error!("{e}");
        }
        error!("upgrade failed, rolling back: {why}");
        self.title.clear();
    }

    /// Watches the successor of an upgrade: ready, dead or late.
    pub(super) fn follow_upgrade(&mut self) {
        let Some((successor, deadline)) = &self.successor else {
            return;
        };
        match successor.readiness() {
            Readiness::Ready => self.hand_over(),
            Readiness::Failed => {
                self.roll_back_upgrade("the new master exited before it was ready")
            }
            Readiness::NotYet if Instant::now() >= *deadline => self.roll_back_upgrade(&format!(
                "the new master was not ready within {}s",
                UPGRADE_DEADLINE.as_secs()
            )),
            Readiness::NotYet => {}
        }
    }

    /// Everything serves: tell whoever waits for it.
    pub(super) fn announce_ready(&mut self) {
        if let Some(predecessor) = self.predecessor.take() {
            // The old master, still systemd's main pid, reports our readiness for us.
            self.systemd_ready = true;
            if let Some(path) = &self.config.pid {
                match PidFile::write(path, std::process::id()) {
                    Ok(pid_file) => self.pid_file = Some(pid_file),
                    Err(e) => error!("{e}"),
                }
            }
            if let Err(e) = predecessor.announce_ready() {
                warn!("cannot tell the old master that this one is ready: {e}");
            }
        }
        if !self.systemd_ready {
            self.systemd_ready = true;
            notify_systemd(&[NotifyState::Ready]);
        }
    }
}
