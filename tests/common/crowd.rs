//! Many persistent clients at once, and who holds their connections.
//!
//! [`Crowd::open`] connects N clients that stay connected for the whole test;
//! [`Crowd::holders`] reads /proc (the server side of each connection in
//! /proc/net/tcp, then every process's /proc/PID/fd) to say which processes hold a
//! copy of each connection's socket: after a hand-over has settled, exactly one.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Persistent clients of one server.
pub struct Crowd {
    server: SocketAddr,
    /// None once closed by the test.
    clients: Vec<Option<BufReader<TcpStream>>>,
}

/// What one exchange found.
#[derive(Debug, PartialEq, Eq)]
pub enum Exchange {
    Ok,
    /// End of file or a reset: the server closed the connection.
    Closed(String),
    /// No reply within the timeout.
    Late,
    Wrong(String),
}

impl Crowd {
    pub fn open(server: SocketAddr, count: usize) -> Crowd {
        raise_descriptor_limit();
        let clients = (0..count)
            .map(|i| {
                let s = TcpStream::connect(server).unwrap_or_else(|e| panic!("connect {i}: {e}"));
                s.set_nodelay(true).unwrap();
                Some(BufReader::new(s))
            })
            .collect();
        Crowd { server, clients }
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Closes client `i` (the server sees it leave).
    pub fn close(&mut self, i: usize) {
        self.clients[i] = None;
    }

    /// One line and its reply on client `i`, waiting at most `within`.
    pub fn exchange(&mut self, i: usize, within: Duration) -> Exchange {
        let client = self.clients[i].as_mut().expect("an open client");
        let line = format!("client {i}");
        client.get_ref().set_read_timeout(Some(within)).unwrap();
        if let Err(e) = client.get_mut().write_all(format!("{line}\n").as_bytes()) {
            return Exchange::Closed(format!("write: {e}"));
        }
        let mut reply = String::new();
        match client.read_line(&mut reply) {
            Ok(0) => Exchange::Closed("end of file".into()),
            Ok(_) if reply.trim_end_matches('\n') == line.chars().rev().collect::<String>() => {
                Exchange::Ok
            }
            Ok(_) => Exchange::Wrong(reply),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Exchange::Late
            }
            Err(e) => Exchange::Closed(format!("read: {e}")),
        }
    }

    /// Every client exchanges once; the indices of those whose exchange was not Ok,
    /// with what they found.
    pub fn exchange_all(&mut self, within: Duration) -> Vec<(usize, Exchange)> {
        let open: Vec<usize> = (0..self.len())
            .filter(|&i| self.clients[i].is_some())
            .collect();
        open.into_iter()
            .map(|i| (i, self.exchange(i, within)))
            .filter(|(_, e)| *e != Exchange::Ok)
            .collect()
    }

    /// For each open client (by index), the processes among `pids` that hold its
    /// server-side socket.
    pub fn holders(&self, pids: &[i32]) -> Vec<(usize, Vec<i32>)> {
        let inodes = server_side_inodes(self.server.port());
        let held: Vec<(i32, HashSet<u64>)> = pids.iter().map(|&p| (p, socket_inodes(p))).collect();
        self.clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let port = c.as_ref()?.get_ref().local_addr().unwrap().port();
                let holders = match inodes.get(&port) {
                    Some(inode) => held
                        .iter()
                        .filter(|(_, set)| set.contains(inode))
                        .map(|(p, _)| *p)
                        .collect(),
                    None => Vec::new(),
                };
                Some((i, holders))
            })
            .collect()
    }

    /// The clients whose connection `pid` holds.
    pub fn held_by(&self, pid: i32) -> Vec<usize> {
        self.holders(&[pid])
            .into_iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, _)| i)
            .collect()
    }
}

/// The server side of each established connection to `port`: client port → inode.
fn server_side_inodes(port: u16) -> HashMap<u16, u64> {
    let mut out = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            let port_of = |a: &str| {
                a.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if port_of(f[1]) == Some(port)
                && let (Some(remote), Ok(inode)) = (port_of(f[2]), f[9].parse::<u64>())
            {
                out.insert(remote, inode);
            }
        }
    }
    out
}

/// The socket inodes in /proc/PID/fd.
fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let link = fs::read_link(e.path()).ok()?;
            let link = link.to_string_lossy();
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (a crowd needs one
/// descriptor per client).
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
