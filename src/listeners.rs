//! Listen sockets: binding them in the master, accepting from them in the workers.
//!
//! Owns the socket options every listener gets (SO_REUSEADDR, the backlog,
//! non-blocking, close-on-exec) and the error a failed bind reports.
//! A `Listener` is inherited by every worker across fork; it never unlinks a unix
//! socket path on drop, because workers drop their copies while the master still
//! serves: only the master removes socket files, once, at exit.
//!
//! Listeners can also arrive already bound, by descriptor: from the previous master
//! during a binary upgrade (the format is [`crate::upgrade`]'s) or from systemd socket
//! activation (`LISTEN_PID`, `LISTEN_FDS`). Adopting one never binds, so no connection
//! is refused while the socket changes hands.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use crate::config::ListenAddr;
use crate::errors::plain;
use crate::privileges::Identity;

/// A bound, listening, non-blocking socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Why binding failed, worded for the operator.
#[derive(Debug)]
pub struct BindError {
    pub addr: ListenAddr,
    pub cause: String,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.cause)
    }
}

impl std::error::Error for BindError {}

/// A listener and the address it was configured as (which, for port 0, differs
/// from the address bound). Reloads match addresses by the configured form.
#[derive(Debug)]
pub struct Configured {
    pub addr: ListenAddr,
    pub listener: Listener,
}

/// Opens a listener for every address: the one in `inherited` with that address when
/// there is one, else a new bind. On failure, sockets bound here are closed and
/// their unix paths removed; inherited ones go back to `inherited`.
pub fn open_all(
    addrs: &[ListenAddr],
    backlog: u32,
    inherited: &mut Vec<Configured>,
) -> Result<Vec<Configured>, BindError> {
    let mut opened: Vec<(Configured, bool)> = Vec::with_capacity(addrs.len());
    // Closed only once every bind is done, so that no new socket reuses a number
    // the caller still knows as an old one.
    let mut stale = Vec::new();
    for addr in addrs {
        if let Some(at) = inherited.iter().position(|c| &c.addr == addr) {
            let kept = inherited.swap_remove(at);
            if !kept.listener.socket_file_is_gone() {
                opened.push((kept, false));
                continue;
            }
            // Its file was removed (a clean-up script, a tmpfiles rule): clients can
            // no longer reach it, so it is bound anew; workers that still hold the old
            // one keep serving it until they retire.
            log::warn!(
                "{} was removed: binding it again",
                kept.listener.local_addr()
            );
            stale.push(kept);
        }
        match bind(addr, backlog) {
            Ok(listener) => opened.push((
                Configured {
                    addr: addr.clone(),
                    listener,
                },
                true,
            )),
            Err(cause) => {
                for (configured, bound_here) in opened {
                    if bound_here {
                        remove_socket_files([&configured.listener]);
                    } else {
                        inherited.push(configured);
                    }
                }
                return Err(BindError {
                    addr: addr.clone(),
                    cause: plain(&cause),
                });
            }
        }
    }
    drop(stale);
    Ok(opened
        .into_iter()
        .map(|(configured, _)| configured)
        .collect())
}

/// Where inherited listeners came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inheritance {
    /// None were passed: bind everything.
    Nothing,
    /// A previous raasd master handed them over for an upgrade.
    Upgrade,
    /// systemd socket activation: serve exactly these.
    Systemd,
}

/// The sockets systemd passed (socket activation: `LISTEN_PID`, `LISTEN_FDS`),
/// adopted; empty when it passed none.
pub fn systemd_sockets() -> Result<Vec<Configured>, String> {
    let fds = sd_notify::listen_fds().map_err(|e| format!("socket activation: {e}"))?;
    let mut adopted = Vec::new();
    for fd in fds {
        let listener = adopt(fd, &ListenAddr::Tcp(([0, 0, 0, 0], 0).into()))
            .map_err(|e| format!("socket activation: cannot adopt fd {fd}: {}", plain(&e)))?;
        let addr = match &listener {
            Listener::Unix(_, path) => ListenAddr::Unix(path.clone()),
            Listener::Tcp(l) => ListenAddr::Tcp(l.local_addr().map_err(|e| e.to_string())?),
        };
        adopted.push(Configured { addr, listener });
    }
    Ok(adopted)
}

/// Takes ownership of a listening stream socket passed by descriptor number
/// (`addr` names a unix socket whose address the kernel does not report).
pub fn adopt(fd: RawFd, addr: &ListenAddr) -> io::Result<Listener> {
    let owned = crate::process::take_inherited_fd(fd)?;
    if !nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)? {
        return Err(io::Error::other("not a listening socket"));
    }
    let socket = Socket::from(owned);
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    if local.is_unix() {
        let path = match (local.as_pathname(), addr) {
            (Some(path), _) => path.to_path_buf(),
            (None, ListenAddr::Unix(path)) => path.clone(),
            (None, _) => PathBuf::new(),
        };
        Ok(Listener::Unix(
            UnixListener::from(OwnedFd::from(socket)),
            path,
        ))
    } else {
        Ok(Listener::Tcp(socket.into()))
    }
}

/// Lets the listeners survive exec (for a binary upgrade), or makes them
/// close-on-exec again.
pub fn set_inheritable(listeners: &[Configured], inheritable: bool) -> io::Result<()> {
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    for c in listeners {
        fcntl(c.listener.as_fd(), FcntlArg::F_SETFD(flags))?;
    }
    Ok(())
}

fn bind(addr: &ListenAddr, backlog: u32) -> io::Result<Listener> {
    let backlog = backlog.min(i32::MAX as u32) as i32;
    match addr {
        ListenAddr::Tcp(sa) => {
            // socket2 creates sockets close-on-exec.
            let socket = Socket::new(Domain::for_address(*sa), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            // Accepted sockets inherit TCP_NODELAY: replies are written in batches
            // already, and Nagle would hold back the tail of a pipelined burst.
            socket.set_tcp_nodelay(true)?;
            socket.bind(&SockAddr::from(*sa))?;
            socket.listen(backlog)?;
            socket.set_nonblocking(true)?;
            Ok(Listener::Tcp(socket.into()))
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            socket.listen(backlog)?;
            socket.set_nonblocking(true)?;
            Ok(Listener::Unix(
                UnixListener::from(OwnedFd::from(socket)),
                path.clone(),
            ))
        }
    }
}

/// A socket file left by a process that died is in the way of bind; one that still
/// answers belongs to a live server and must not be stolen.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::from(io::ErrorKind::AddrInUse)),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Gives unix sockets their mode (--socket-mode) and, when workers run as another
/// user, that user as owner, so the clients meant to connect can.
pub fn set_socket_access<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    mode: u32,
    owner: Option<Identity>,
) -> Result<(), String> {
    for listener in listeners {
        let Listener::Unix(_, path) = listener else {
            continue;
        };
        let fail =
            |what: &str, e: io::Error| format!("cannot {what} {}: {}", path.display(), plain(&e));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("set the mode of", e))?;
        if let Some(owner) = owner {
            std::os::unix::fs::chown(path, Some(owner.uid.as_raw()), Some(owner.gid.as_raw()))
                .map_err(|e| fail("set the owner of", e))?;
        }
    }
    Ok(())
}

/// Sets TCP keepalive (--tcp-keepalive: probes after `secs` of silence, every
/// `secs`/4 (at least 1 s), 4 of them; 0 = off) on the TCP listeners. Accepted
/// connections inherit it from their listener, so no accept pays a system call for
/// it; a listener kept across a reload or an upgrade gets the new setting here.
pub fn set_keepalive<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    secs: u64,
) -> io::Result<()> {
    for listener in listeners {
        let Listener::Tcp(tcp) = listener else {
            continue;
        };
        let socket = SockRef::from(tcp);
        if secs == 0 {
            socket.set_keepalive(false)?;
            continue;
        }
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(secs))
            .with_interval(std::time::Duration::from_secs((secs / 4).max(1)))
            .with_retries(4);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    Ok(())
}

/// Before a stop of the whole server: TCP listeners stop taking new connections but
/// keep those already queued. A socket filter drops incoming SYNs (so no handshake
/// starts; the client's retry finds the port closed and is refused), while the ACKs
/// that complete handshakes already under way still get through. The workers then
/// drain the accept queues and close: closing a listener resets whatever is still
/// queued, so nothing may join the queue after the last drain. (Unix listeners get
/// the same from the removal of their socket file.)
pub fn refuse_new_connections<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
) -> io::Result<()> {
    use socket2::SockFilter;
    // Classic BPF over the TCP header: drop a segment whose SYN is set and ACK not.
    const LD_B_ABS: u16 = 0x30;
    const ALU_AND_K: u16 = 0x54;
    const JMP_JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let drop_syns = [
        SockFilter::new(LD_B_ABS, 0, 0, 13),    // A = TCP flags
        SockFilter::new(ALU_AND_K, 0, 0, 0x12), // A &= SYN | ACK
        SockFilter::new(JMP_JEQ_K, 0, 1, 0x02), // SYN alone?
        SockFilter::new(RET_K, 0, 0, 0),        // drop it
        SockFilter::new(RET_K, 0, 0, u32::MAX), // keep everything else
    ];
    for listener in listeners {
        if let Listener::Tcp(tcp) = listener {
            SockRef::from(tcp).attach_filter(&drop_syns)?;
        }
    }
    Ok(())
}

/// Removes the socket files of unix listeners. Called by the master at its exit.
pub fn remove_socket_files<'a>(listeners: impl IntoIterator<Item = &'a Listener>) {
    for listener in listeners {
        if let Listener::Unix(_, path) = listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// The address actually bound (the real port when 0 was asked for).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a: SocketAddr| a.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// For a unix listener: its socket file no longer exists at its path.
    pub fn socket_file_is_gone(&self) -> bool {
        match self {
            Listener::Unix(_, path) => {
                std::fs::symlink_metadata(path).map_or(true, |meta| !meta.file_type().is_socket())
            }
            Listener::Tcp(_) => false,
        }
    }

    /// Accepts one connection, non-blocking like its listener.
    pub fn accept(&self) -> io::Result<Stream> {
        // accept4 makes the socket non-blocking and close-on-exec in the same call:
        // one system call per connection fewer than accept + ioctl.
        let (socket, _) = SockRef::from(self).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
        Ok(match self {
            Listener::Tcp(_) => Stream::Tcp(socket.into()),
            Listener::Unix(..) => Stream::Unix(UnixStream::from(OwnedFd::from(socket))),
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

/// An accepted client connection.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_reported_with_its_address() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::Tcp(taken.local_addr().unwrap());
        let err = open_all(std::slice::from_ref(&addr), 16, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot listen on {addr}: address already in use")
        );
    }
}
