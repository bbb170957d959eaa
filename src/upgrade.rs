//! The mechanism of a binary upgrade (USR2): starting a successor master and hearing
//! that it is ready.
//!
//! Owns the hand-over protocol between an old master and the new one it executes:
//! the listen sockets pass by descriptor (close-on-exec cleared on exactly those,
//! named in `RAASD_LISTEN_FDS`), readiness comes back on a socketpair whose write
//! end is named in `RAASD_READY_FD` (`R` when ready, or `E` and the start-up error), and the generation count carries on
//! through `RAASD_GENERATION`. After the hand-over the same socketpair carries one
//! message the other way: when the old master exits, its totals (`T` and a JSON line),
//! which the new master adds to its own. The policy (when to upgrade, the pid file renames, the
//! rollback) belongs to the master.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::Pid;

use crate::config::ListenAddr;
use crate::handoff::Queue;
use crate::listeners::{self, Configured};

/// Names the listen sockets a new master inherits: `fd=address` pairs separated by
/// `;`, the address as configured (so that a reload matches it).
pub const LISTEN_FDS: &str = "RAASD_LISTEN_FDS";
pub const READY_FD: &str = "RAASD_READY_FD";
/// Names the console's sockets a new master inherits: `control=FD;metrics=FD`.
pub const CONSOLE_FDS: &str = "RAASD_CONSOLE_FDS";

/// The console sockets the previous master handed over: (name, descriptor).
pub fn inherited_console() -> Result<Vec<(String, std::os::fd::OwnedFd)>, String> {
    let Ok(spec) = std::env::var(CONSOLE_FDS) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, std::os::fd::OwnedFd)> = Vec::new();
    for pair in spec.split(';').filter(|p| !p.is_empty()) {
        let (name, fd) = pair
            .split_once('=')
            .ok_or_else(|| format!("{CONSOLE_FDS}: '{pair}' is not name=fd"))?;
        let fd: RawFd = fd
            .parse()
            .map_err(|_| format!("{CONSOLE_FDS}: bad descriptor '{fd}'"))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("{CONSOLE_FDS}: '{name}' is named twice"));
        }
        let owned = crate::process::take_inherited_fd(fd).map_err(|e| {
            format!(
                "{CONSOLE_FDS}: descriptor {fd}: {}",
                crate::errors::plain(&e)
            )
        })?;
        out.push((name.to_string(), owned));
    }
    Ok(out)
}
pub const GENERATION: &str = "RAASD_GENERATION";
/// Set when the listeners came from systemd: the successor serves exactly them too.
pub const SOCKETS_FIXED: &str = "RAASD_SOCKETS_FIXED";

/// A new master, started by this one, not yet known to be ready.
pub struct Successor {
    pub pid: Pid,
    ready: UnixStream,
}

/// What the successor's readiness pipe says.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    NotYet,
    /// Ready; with the version of the hand-over format it takes connections in.
    Ready(Option<u8>),
    /// It failed: with its start-up error when it could say it, or closed without a
    /// word (it died).
    Failed(Option<String>),
}

/// Executes `exe` with the original arguments, handing over the listeners.
pub fn start_successor(
    exe: &Path,
    args: &[OsString],
    (listeners, queue, console): (&[Configured], Option<&Queue>, &crate::console::Console),
    generation: u64,
    sockets_fixed: bool,
    start_dir: &Path,
) -> io::Result<Successor> {
    let (ready, ready_for_child) = UnixStream::pair()?;
    ready.set_nonblocking(true)?;
    fcntl(&ready_for_child, FcntlArg::F_SETFD(FdFlag::empty()))?;
    listeners::set_inheritable(listeners, true)?;
    let spec = listen_fds_spec(listeners);
    let mut command = Command::new(exe);
    if let Some(queue) = queue {
        for end in queue.descriptors() {
            fcntl(end, FcntlArg::F_SETFD(FdFlag::empty()))?;
        }
        command.env(crate::handoff::ENV, queue.env_value());
    } else {
        command.env_remove(crate::handoff::ENV);
    }
    // The console's sockets, so that `raasd ctl` and scrapers reach the new master
    // at the same addresses (a port can have only one listener).
    let console_fds = console.descriptors();
    for (_, fd) in &console_fds {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    }
    command.env(
        CONSOLE_FDS,
        console_fds
            .iter()
            .map(|(name, fd)| format!("{name}={}", fd.as_raw_fd()))
            .collect::<Vec<_>>()
            .join(";"),
    );
    if sockets_fixed {
        command.env(SOCKETS_FIXED, "1");
    } else {
        command.env_remove(SOCKETS_FIXED);
    }
    // A process group of its own: a rollback ends the successor with whatever it
    // started (a wrapper script that did not exec keeps the sockets in its children).
    command.process_group(0);
    // Started from the directory as the operator named it, so that relative paths
    // follow a `current` symlink switched since this master started.
    command.current_dir(start_dir).env("PWD", start_dir);
    let spawned = command
        .args(args.iter().skip(1))
        .env(LISTEN_FDS, spec)
        .env(READY_FD, ready_for_child.as_raw_fd().to_string())
        .env(GENERATION, generation.to_string())
        // Socket activation was ours; the successor inherits raasd's own hand-over.
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .spawn();
    // Whatever happened, no later child may inherit these.
    let _ = listeners::set_inheritable(listeners, false);
    for (_, fd) in &console_fds {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    for end in queue.iter().flat_map(|q| q.descriptors()) {
        let _ = fcntl(end, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    drop(ready_for_child);
    let child = spawned?;
    Ok(Successor {
        pid: Pid::from_raw(child.id() as i32),
        ready,
    })
}

impl Successor {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// At this master's exit after a hand-over: hands the successor its totals (one
    /// small message into an empty socket buffer: it does not block).
    pub fn send_totals(&self, totals_json: &str) -> io::Result<()> {
        let mut message = Vec::with_capacity(totals_json.len() + 2);
        message.push(b'T');
        message.extend_from_slice(totals_json.as_bytes());
        message.push(b'\n');
        (&self.ready).write_all(&message)
    }

    pub fn readiness(&self) -> Readiness {
        let mut said = [0u8; 4096];
        match (&self.ready).read(&mut said) {
            Ok(0) => Readiness::Failed(None),
            Ok(n) if said[0] == b'R' => Readiness::Ready((n > 1).then(|| said[1])),
            Ok(n) => Readiness::Failed(Some(
                String::from_utf8_lossy(&said[1..n]).trim_end().to_string(),
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Readiness::NotYet,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Readiness::NotYet,
            Err(_) => Readiness::Failed(None),
        }
    }
}

/// In a master started by an upgrade: the channel to tell the old master it is ready.
pub struct Predecessor {
    ready: UnixStream,
}

impl Predecessor {
    /// The old master's readiness pipe, when this master was started by an upgrade.
    pub fn from_environment() -> Result<Option<Predecessor>, String> {
        let Ok(value) = std::env::var(READY_FD) else {
            return Ok(None);
        };
        let fd: RawFd = value
            .parse()
            .map_err(|_| format!("{READY_FD}: bad descriptor '{value}'"))?;
        let owned = crate::process::take_inherited_fd(fd)
            .map_err(|e| format!("{READY_FD}: descriptor {fd}: {e}"))?;
        Ok(Some(Predecessor {
            ready: UnixStream::from(owned),
        }))
    }

    /// Tells the old master that this one serves, and in which hand-over format it
    /// takes connections (none: the old workers drain); the channel stays open for
    /// the old master's farewell.
    pub fn announce_ready(self, takes_connections: Option<u8>) -> io::Result<Farewell> {
        let mut message = vec![b'R'];
        message.extend(takes_connections);
        (&self.ready).write_all(&message)?;
        self.ready.set_nonblocking(true)?;
        Ok(Farewell {
            stream: self.ready,
            received: Vec::new(),
        })
    }

    /// Tells the old master why this one could not start (so that its log says it,
    /// not only this process's stderr); consumes the channel.
    pub fn announce_failure(self, why: &str) {
        let mut message = b"E".to_vec();
        message.extend(why.bytes().take(4000));
        let _ = (&self.ready).write_all(&message);
    }
}

/// In a master started by an upgrade, once ready: where the old master's totals come
/// from when it exits.
pub struct Farewell {
    stream: UnixStream,
    received: Vec<u8>,
}

/// What [`Farewell::hear`] heard.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    NotYet,
    /// The old master's totals, as JSON.
    Totals(String),
    /// It closed without them (it died), or said something else.
    Nothing,
}

impl Farewell {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Reads what has come, without blocking.
    pub fn hear(&mut self) -> Heard {
        let mut buf = [0u8; 4096];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return farewell_message(&self.received).unwrap_or(Heard::Nothing),
                Ok(n) => {
                    self.received.extend_from_slice(&buf[..n]);
                    if let Some(heard) = farewell_message(&self.received) {
                        return heard;
                    }
                    if self.received.len() > 64 * 1024 {
                        return Heard::Nothing;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Heard::NotYet,
                Err(_) => return Heard::Nothing,
            }
        }
    }
}

/// The farewell in `received`, once a whole line has come.
fn farewell_message(received: &[u8]) -> Option<Heard> {
    let end = received.iter().position(|&b| b == b'\n')?;
    Some(match received[..end].strip_prefix(b"T") {
        Some(json) => Heard::Totals(String::from_utf8_lossy(json).into_owned()),
        None => Heard::Nothing,
    })
}

/// The `RAASD_LISTEN_FDS` value naming `listeners`.
fn listen_fds_spec(listeners: &[Configured]) -> String {
    listeners
        .iter()
        .map(|c| format!("{}={}", c.listener.as_fd().as_raw_fd(), c.addr))
        .collect::<Vec<_>>()
        .join(";")
}

/// Parses a `RAASD_LISTEN_FDS` value; a descriptor named twice is refused (it would
/// get two owners).
fn parse_listen_fds(spec: &str) -> Result<Vec<(RawFd, ListenAddr)>, String> {
    let mut pairs: Vec<(RawFd, ListenAddr)> = Vec::new();
    for pair in spec.split(';').filter(|p| !p.is_empty()) {
        let (fd, addr) = pair
            .split_once('=')
            .ok_or_else(|| format!("{LISTEN_FDS}: '{pair}' is not fd=address"))?;
        let fd: RawFd = fd
            .parse()
            .map_err(|_| format!("{LISTEN_FDS}: bad descriptor '{fd}'"))?;
        let addr: ListenAddr = addr.parse().map_err(|e| format!("{LISTEN_FDS}: {e}"))?;
        if pairs.iter().any(|(seen, _)| *seen == fd) {
            return Err(format!("{LISTEN_FDS}: descriptor {fd} is named twice"));
        }
        pairs.push((fd, addr));
    }
    Ok(pairs)
}

/// The listen sockets the previous master handed over, adopted, and whether they
/// are fixed (systemd gave them to the first master: they stay the only ones); None
/// when this master was not started by an upgrade.
pub fn inherited_listeners() -> Result<Option<(bool, Vec<Configured>)>, String> {
    let Ok(spec) = std::env::var(LISTEN_FDS) else {
        return Ok(None);
    };
    let mut adopted = Vec::new();
    for (fd, addr) in parse_listen_fds(&spec)? {
        let listener = listeners::adopt(fd, &addr).map_err(|e| {
            format!(
                "cannot adopt inherited {addr} (fd {fd}): {}",
                crate::errors::plain(&e)
            )
        })?;
        adopted.push(Configured { addr, listener });
    }
    let fixed = std::env::var(SOCKETS_FIXED).is_ok_and(|v| v == "1");
    Ok(Some((fixed, adopted)))
}

/// The environment variables by which descriptors and state were handed to this
/// process: once taken, they are removed, so that nothing adopts a descriptor twice
/// and no child of ours inherits a stale name.
pub const HANDED_OVER_VARIABLES: [&str; 9] = [
    crate::handoff::ENV,
    CONSOLE_FDS,
    LISTEN_FDS,
    READY_FD,
    GENERATION,
    SOCKETS_FIXED,
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// Sends `signal` to every process of the group a successor leads; false when the
/// group has no process left.
pub fn signal_group(group: Pid, signal: Option<nix::sys::signal::Signal>) -> bool {
    nix::sys::signal::killpg(group, signal) != Err(nix::errno::Errno::ESRCH)
}

/// The processes, other than `ours`, that hold a descriptor of one of `listeners`
/// (found in /proc/PID/fd by the socket's inode): after a failed upgrade, anything
/// listed keeps the port taken when raasd stops.
pub fn stray_holders(listeners: &[Configured], ours: &[Pid]) -> Vec<(i32, String, String)> {
    use std::os::unix::fs::MetadataExt;
    let sockets: Vec<(String, &Configured)> = listeners
        .iter()
        .filter_map(|c| {
            let fd = c.listener.as_fd().as_raw_fd();
            let inode = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?.ino();
            Some((format!("socket:[{inode}]"), c))
        })
        .collect();
    let mut found = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return found;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if ours.iter().any(|p| p.as_raw() == pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some((_, c)) = sockets
                .iter()
                .find(|(name, _)| target.as_os_str() == name.as_str())
            {
                let comm = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
                found.push((pid, comm.trim_end().to_string(), c.listener.local_addr()));
                break;
            }
        }
    }
    found
}

/// The binary USR2 executes: the path raasd was started by, made absolute now (the
/// working directory may change) but with symlinks kept, so that switching a
/// `current -> v2` link upgrades to v2. A bare name is looked up in PATH.
pub fn binary_path(
    argv0: Option<&std::ffi::OsStr>,
    launch_dir: &Path,
) -> io::Result<std::path::PathBuf> {
    let Some(argv0) = argv0.map(Path::new) else {
        return std::env::current_exe();
    };
    if argv0.is_absolute() {
        return Ok(argv0.to_path_buf());
    }
    if argv0.components().count() > 1 {
        return Ok(launch_dir.join(argv0));
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(argv0))
        .find(|candidate| candidate.is_file())
        .map_or_else(std::env::current_exe, Ok)
}

/// The directory raasd was started in, as the operator named it: the shell's `$PWD`
/// when it is the current directory (the same file), else the physical one. With
/// symlinked releases (`current -> releases/1`), `$PWD` keeps the link's name, so a
/// later upgrade that starts from it follows the link to wherever it points then
/// (Unicorn does the same).
pub fn launch_directory() -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let physical = std::env::current_dir()?;
    let logical = std::env::var_os("PWD").map(std::path::PathBuf::from);
    let same_file = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    Ok(match logical {
        Some(dir) if dir.is_absolute() && same_file(&dir, &physical) => dir,
        _ => physical,
    })
}

/// The generation this master starts at: one more than its predecessor's.
pub fn starting_generation() -> u64 {
    std::env::var(GENERATION)
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_fds_format_parses_and_refuses_what_is_wrong() {
        let pairs = parse_listen_fds("5=127.0.0.1:2200;6=unix:/run/raasd/raasd.sock").unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(
            (pairs[0].0, pairs[0].1.to_string()),
            (5, "127.0.0.1:2200".to_string())
        );
        assert_eq!(pairs[1].1.to_string(), "unix:/run/raasd/raasd.sock");
        assert!(parse_listen_fds("").unwrap().is_empty());
        for (bad, says) in [
            ("5", "is not fd=address"),
            ("x=127.0.0.1:1", "bad descriptor"),
            ("5=nowhere", "RAASD_LISTEN_FDS"),
            ("5=127.0.0.1:1;5=127.0.0.1:2", "named twice"),
        ] {
            let err = parse_listen_fds(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_farewell_is_one_line_of_totals() {
        let (old, new) = UnixStream::pair().unwrap();
        new.set_nonblocking(true).unwrap();
        let mut farewell = Farewell {
            stream: new,
            received: Vec::new(),
        };
        assert_eq!(farewell.hear(), Heard::NotYet);
        (&old).write_all(b"T{\"requests\":").unwrap();
        assert_eq!(farewell.hear(), Heard::NotYet);
        (&old).write_all(b"3}\n").unwrap();
        assert_eq!(
            farewell.hear(),
            Heard::Totals("{\"requests\":3}".to_string())
        );
        assert_eq!(farewell_message(b"X\n"), Some(Heard::Nothing));
        drop(old);
        let (old, new) = UnixStream::pair().unwrap();
        drop(old);
        let mut farewell = Farewell {
            stream: new,
            received: Vec::new(),
        };
        assert_eq!(farewell.hear(), Heard::Nothing);
    }
}
