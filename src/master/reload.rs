//! Reloading (HUP) and reopening logs (USR1): the configuration and the log file
//! change under a running master.
//!
//! A reload re-reads the config file and the original command line and applies
//! what changed; the supervisor then rotates the workers onto it, generation by
//! generation. Anything
//! invalid — a bad key, an address that cannot be bound, an unknown user — changes
//! nothing: the error is logged and the running configuration stays.

use std::os::fd::AsFd;

use log::{error, info, warn};

use super::Master;
use crate::config::{self, Config, LoadError};
use crate::control::Command;
use crate::listeners::{self, Configured, Inheritance};
use crate::logging::{self, Log};
use crate::privileges::{self, Identity};
use crate::supervisor::Settings;

impl Master {
    /// HUP: re-reads the configuration (the file and the original command line)
    /// and applies what the shell owns (listeners, log level, identity, title);
    /// the supervisor rotates the workers onto the settings returned. An invalid
    /// configuration, or a new address that cannot be bound, changes nothing.
    pub(super) fn reload(&mut self) -> Result<Settings, String> {
        let config = match config::load(&self.origin.args) {
            Ok(config) => config,
            Err(LoadError::CommandLine(e)) => return Err(e.to_string()),
            Err(LoadError::File(errors)) => return Err(errors.join("; ")),
            Err(LoadError::Help(_)) => return Err("--help on the command line".to_string()),
        };
        let identity = privileges::resolve(config.user.as_deref(), config.group.as_deref())?;
        if config.pid != self.config.pid || config.log_file != self.config.log_file {
            warn!("reload: a changed pid or log-file takes effect at the next start or upgrade");
        }
        if self.sockets.inheritance == Inheritance::Systemd {
            if config.listen != self.config.listen {
                warn!("reload: listen addresses come from systemd; the listen setting is not used");
            }
        } else {
            self.rebind(&config, identity)?;
        }
        if let Err(e) = listeners::set_keepalive(
            self.sockets.listeners.iter().map(|c| &c.listener),
            config.tcp_keepalive,
        ) {
            warn!("reload: cannot set TCP keepalive on the listeners: {e}");
        }
        if config.max_conns != self.config.max_conns || config.listen != self.config.listen {
            super::warn_if_descriptors_fall_short(&config);
        }
        if config.handover && self.coordination.handoff.is_none() {
            match crate::handoff::Queue::new() {
                Ok(queue) => self.coordination.handoff = Some(queue),
                Err(e) => warn!("reload: cannot create the hand-over queue: {e}"),
            }
        }
        if config.name != self.config.name {
            self.title.name = super::leak_name(config.name.as_deref());
        }
        if config.sandbox && !self.config.sandbox {
            super::warn_if_unconfined(&config);
        }
        logging::set_level(config.log_level);
        logging::set_format(&config.log_format);
        self.identity = identity;
        let settings = super::settings_of(&config, self.coordination.handoff.is_some());
        self.config = config;
        Ok(settings)
    }

    /// Makes the listeners match `config`: kept addresses keep their very socket (no
    /// queued connection is lost), new ones are bound, removed ones are closed here
    /// (old workers keep their copies until they retire).
    pub(super) fn rebind(
        &mut self,
        config: &Config,
        identity: Option<Identity>,
    ) -> Result<(), String> {
        let mut current = std::mem::take(&mut self.sockets.listeners);
        let held: Vec<_> = current
            .iter()
            .map(|c| std::os::fd::AsRawFd::as_raw_fd(&c.listener.as_fd()))
            .collect();
        let opened = match listeners::open_all(&config.listen, config.backlog, &mut current) {
            Ok(opened) => opened,
            Err(e) => {
                self.sockets.listeners = current;
                return Err(e.to_string());
            }
        };
        // Bound by this reload: new addresses, and unix sockets whose file was removed.
        let fresh: Vec<&Configured> = opened
            .iter()
            .filter(|c| !held.contains(&std::os::fd::AsRawFd::as_raw_fd(&c.listener.as_fd())))
            .collect();
        if let Err(e) = listeners::set_socket_access(
            fresh.iter().map(|c| &c.listener),
            config.socket_mode,
            identity,
        ) {
            warn!("reload: {e}");
        }
        for removed in &current {
            info!("no longer listening on {}", removed.listener.local_addr());
        }
        listeners::remove_socket_files(current.iter().map(|c| &c.listener));
        for added in &fresh {
            info!("listening on {}", added.listener.local_addr());
        }
        self.sockets.listeners = opened;
        self.sockets.addresses = self
            .sockets
            .listeners
            .iter()
            .map(|c| c.listener.local_addr())
            .collect();
        Ok(())
    }

    /// USR1: the master reopens the log file and the access log, and passes each
    /// new file to every worker (which may not open files: see [`crate::sandbox`]).
    pub(super) fn reopen_logs(&mut self) {
        let owner = self
            .identity
            .map(|identity| (identity.uid.as_raw(), identity.gid.as_raw()));
        for log in [Log::Main, Log::Access] {
            match logging::reopen(log, owner) {
                Ok(None) => {}
                Ok(Some(file)) => {
                    info!("{} reopened", log.name());
                    let command = Command::LogTo(log, file);
                    for (_, channel) in &self.channels {
                        let _ = channel.send(&command);
                    }
                }
                Err(e) => {
                    // The log file is the one place that did not change: say it there too.
                    eprintln!("raasd: {e}; still logging to the old file");
                    error!("{e}; still logging to the old file");
                }
            }
        }
    }
}
