//! Listen sockets: binding them in the master, accepting from them in the workers.
//!
//! Owns the socket options every listener gets (SO_REUSEADDR, the backlog,
//! non-blocking, close-on-exec) and the plain-words error a failed bind reports.
//! A `Listener` is inherited by every worker across fork; it never unlinks a unix
//! socket path on drop, because workers drop their copies while the master still
//! serves: only the master removes socket files, once, at exit.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::ListenAddr;
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

/// An io::Error in plain words: "address already in use", not
/// "Address already in use (os error 98)".
pub fn plain(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(cut) => &text[..cut],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Binds every address, or reports the first that fails; sockets bound before the
/// failure are closed (and their unix paths removed) as the partial list drops.
pub fn bind_all(addrs: &[ListenAddr], backlog: u32) -> Result<Vec<Listener>, BindError> {
    let mut bound = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match bind(addr, backlog) {
            Ok(listener) => bound.push(listener),
            Err(cause) => {
                remove_socket_files(&bound);
                return Err(BindError {
                    addr: addr.clone(),
                    cause: plain(&cause),
                });
            }
        }
    }
    Ok(bound)
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
                UnixListener::from(std::os::fd::OwnedFd::from(socket)),
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
pub fn set_socket_access(
    listeners: &[Listener],
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

/// Removes the socket files of unix listeners. Called by the master at its exit.
pub fn remove_socket_files(listeners: &[Listener]) {
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

    /// Accepts one connection, non-blocking like its listener.
    pub fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
        };
        stream.set_nonblocking()?;
        Ok(stream)
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
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true),
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }

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
    fn errors_read_as_plain_words() {
        let e = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(plain(&e), "address already in use");
    }

    #[test]
    fn a_port_in_use_is_reported_with_its_address() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::Tcp(taken.local_addr().unwrap());
        let err = bind_all(std::slice::from_ref(&addr), 16).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot listen on {addr}: address already in use")
        );
    }
}
