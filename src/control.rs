//! The control channel between the master and one worker.
//!
//! Owns the message format, so master and worker agree without reaching into each
//! other. The channel is a socketpair made before fork: the master keeps one end,
//! the worker the other. Messages are single bytes, so a read never splits one.
//!
//! | direction | byte | meaning |
//! |---|---|---|
//! | master → worker | `g` | graceful stop: drain the accept queue, answer, close, exit 0 |
//! | master → worker | `q` | quick stop: exit at once |
//! | master → worker | `h` | hand over: pass every connection it can to the workers that stay (see [`crate::handoff`]), serve the rest to their end, exit 0 |
//! | master → worker | `o` | reopen the log file (USR1) |
//! | worker → master | `r` | ready: the listeners are in the worker's poll set |
//! | worker → master | `m` | replace me: this worker reached --max-requests |
//!
//! End of file means the other side is gone: for a worker, that the master died,
//! which it treats as a graceful stop.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

/// What the master tells a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    GracefulStop,
    HandOver,
    QuickStop,
    ReopenLogs,
}

/// What a worker tells the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Ready,
    ReplaceMe,
}

/// What a read from the channel found.
#[derive(Debug, Default)]
pub struct Received<T> {
    pub messages: Vec<T>,
    /// The other end is closed.
    pub closed: bool,
}

/// The master's end of one worker's channel.
#[derive(Debug)]
pub struct MasterEnd(UnixStream);

/// A worker's end of its channel.
#[derive(Debug)]
pub struct WorkerEnd(UnixStream);

/// A new channel, both ends non-blocking and close-on-exec.
pub fn channel() -> io::Result<(MasterEnd, WorkerEnd)> {
    let (master, worker) = UnixStream::pair()?;
    master.set_nonblocking(true)?;
    worker.set_nonblocking(true)?;
    Ok((MasterEnd(master), WorkerEnd(worker)))
}

impl MasterEnd {
    /// Sends a command; an error means the worker is already gone, which reaping
    /// will tell, so callers may ignore it.
    pub fn send(&self, command: Command) -> io::Result<()> {
        let byte = match command {
            Command::GracefulStop => b'g',
            Command::HandOver => b'h',
            Command::QuickStop => b'q',
            Command::ReopenLogs => b'o',
        };
        (&self.0).write_all(&[byte])
    }

    pub fn receive(&self) -> Received<Report> {
        receive(&self.0, |byte| match byte {
            b'r' => Some(Report::Ready),
            b'm' => Some(Report::ReplaceMe),
            _ => None,
        })
    }
}

impl WorkerEnd {
    pub fn send(&self, report: Report) -> io::Result<()> {
        let byte = match report {
            Report::Ready => b'r',
            Report::ReplaceMe => b'm',
        };
        (&self.0).write_all(&[byte])
    }

    pub fn receive(&self) -> Received<Command> {
        receive(&self.0, |byte| match byte {
            b'g' => Some(Command::GracefulStop),
            b'h' => Some(Command::HandOver),
            b'q' => Some(Command::QuickStop),
            b'o' => Some(Command::ReopenLogs),
            _ => None,
        })
    }
}

fn receive<T>(mut stream: &UnixStream, decode: impl Fn(u8) -> Option<T>) -> Received<T> {
    let mut received = Received {
        messages: Vec::new(),
        closed: false,
    };
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                received.closed = true;
                return received;
            }
            Ok(n) => received
                .messages
                .extend(buf[..n].iter().copied().filter_map(&decode)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return received,
            Err(_) => {
                received.closed = true;
                return received;
            }
        }
    }
}

impl AsFd for MasterEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsFd for WorkerEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_reports_cross_and_eof_is_seen() {
        let (master, worker) = channel().unwrap();
        master.send(Command::GracefulStop).unwrap();
        master.send(Command::QuickStop).unwrap();
        assert_eq!(
            worker.receive().messages,
            vec![Command::GracefulStop, Command::QuickStop]
        );
        worker.send(Report::Ready).unwrap();
        let got = master.receive();
        assert_eq!((got.messages, got.closed), (vec![Report::Ready], false));
        drop(master);
        assert!(worker.receive().closed);
    }
}
