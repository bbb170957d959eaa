//! Server addresses as the user writes them (`HOST:PORT`, `[V6]:PORT`, `unix:PATH`) and
//! opening client sockets to them, blocking or not.
//!
//! A host name is resolved once, when the address is parsed, so a bad name is a usage
//! error and a benchmark never resolves in its hot loop.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// Where a RAAS server listens.
#[derive(Clone, Debug)]
pub struct Addr {
    /// As written on the command line, for messages.
    text: String,
    target: Target,
}

#[derive(Clone, Debug)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Addr, String> {
        let target = if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, as in unix:/run/raasd.sock".into());
            }
            Target::Unix(PathBuf::from(path))
        } else {
            // `:PORT`, as raasd's --listen takes it: this machine.
            let host_port = match s.strip_prefix(':') {
                Some(port) => format!("127.0.0.1:{port}"),
                None => s.to_string(),
            };
            let resolved = host_port
                .to_socket_addrs()
                .map_err(|e| format!("'{s}' is not HOST:PORT or unix:PATH ({e})"))?
                .next()
                .ok_or_else(|| format!("'{s}' resolves to no address"))?;
            if resolved.port() == 0 {
                return Err(format!("'{s}' has port 0, which no server listens on"));
            }
            Target::Tcp(resolved)
        };
        Ok(Addr {
            text: s.to_owned(),
            target,
        })
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Addr {
    fn sock_addr(&self) -> io::Result<(Domain, SockAddr)> {
        Ok(match &self.target {
            Target::Tcp(sa) => (Domain::for_address(*sa), SockAddr::from(*sa)),
            Target::Unix(path) => (Domain::UNIX, SockAddr::unix(path)?),
        })
    }

    fn is_tcp(&self) -> bool {
        matches!(self.target, Target::Tcp(_))
    }

    /// A connected blocking socket, or the error of the attempt.
    pub fn connect(&self, timeout: Duration) -> io::Result<Socket> {
        let (domain, sa) = self.sock_addr()?;
        let socket = Socket::new(domain, Type::STREAM, None)?;
        socket.connect_timeout(&sa, timeout)?;
        if self.is_tcp() {
            // Lines are written as they come; Nagle would hold a lone short line back
            // until the previous reply's ACK.
            socket.set_tcp_nodelay(true)?;
        }
        Ok(socket)
    }

    /// Starts a non-blocking connect: `Ok((socket, true))` when already connected,
    /// `Ok((socket, false))` when the result comes later (writable, then `take_error`).
    pub fn connect_nonblocking(&self) -> io::Result<(Socket, bool)> {
        let (domain, sa) = self.sock_addr()?;
        let socket = Socket::new(domain, Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        if self.is_tcp() {
            socket.set_tcp_nodelay(true)?;
        }
        match socket.connect(&sa) {
            Ok(()) => Ok((socket, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((socket, false)),
            Err(e) => Err(e),
        }
    }
}

/// A connect error as a person reads it: "connection refused by ADDR", ...
pub fn describe_connect_error(addr: &Addr, err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => format!("connection refused by {addr}"),
        io::ErrorKind::NotFound => format!("no socket at {addr}"),
        io::ErrorKind::TimedOut => format!("connecting to {addr} timed out"),
        _ => format!("cannot connect to {addr}: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        let a: Addr = "127.0.0.1:2200".parse().unwrap();
        assert!(a.is_tcp());
        assert_eq!(a.to_string(), "127.0.0.1:2200");
        let u: Addr = "unix:/tmp/x.sock".parse().unwrap();
        assert!(!u.is_tcp());
        assert!("[::1]:80".parse::<Addr>().is_ok());
        // `:PORT`, as raasd --listen takes it: this machine.
        let local: Addr = ":2200".parse().unwrap();
        assert!(local.is_tcp());
        assert_eq!(local.to_string(), ":2200");
    }

    #[test]
    fn rejects_bad_addresses() {
        assert!("unix:".parse::<Addr>().is_err());
        assert!("127.0.0.1".parse::<Addr>().is_err());
        assert!("127.0.0.1:0".parse::<Addr>().is_err());
        assert!("127.0.0.1:99999".parse::<Addr>().is_err());
    }
}
