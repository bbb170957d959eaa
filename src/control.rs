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
//! | master → worker | `l` + 1 descriptor | log to this file from now on (USR1: the master reopened `--log-file`) |
//! | master → worker | `a` + 1 descriptor | write the access log to this file from now on (USR1) |
//! | worker → master | `r` | ready: the listeners are in the worker's poll set |
//! | worker → master | `m` | replace me: this worker reached --max-requests |
//!
//! A descriptor travels as SCM_RIGHTS with its byte, one per message: a worker
//! sandboxed without `open` (see [`crate::sandbox`]) gets its reopened logs this way.
//! The kernel ends a read of a stream socket after the message that carries
//! descriptors, so the descriptor of a read belongs to its last byte.
//!
//! End of file means the other side is gone: for a worker, that the master died,
//! which it treats as a graceful stop.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use crate::logging::Log;
use crate::process;

/// What the master tells a worker.
#[derive(Debug)]
pub enum Command {
    GracefulStop,
    HandOver,
    QuickStop,
    /// Write `log` to this file from now on: the master has reopened it (USR1).
    LogTo(Log, File),
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
    /// Sends a command; an error means the worker is already gone (or, for a log
    /// file, its channel is full: it is wedged), which reaping will tell, so callers
    /// may ignore it.
    pub fn send(&self, command: &Command) -> io::Result<()> {
        let (byte, file) = match command {
            Command::GracefulStop => (b'g', None),
            Command::HandOver => (b'h', None),
            Command::QuickStop => (b'q', None),
            Command::LogTo(Log::Main, file) => (b'l', Some(file)),
            Command::LogTo(Log::Access, file) => (b'a', Some(file)),
        };
        let Some(file) = file else {
            return (&self.0).write_all(&[byte]);
        };
        let fds = [file.as_raw_fd()];
        sendmsg::<()>(
            self.0.as_raw_fd(),
            &[IoSlice::new(&[byte])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
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

    /// Reads every command waiting, with the descriptors that came along.
    pub fn receive(&self) -> Received<Command> {
        let mut received = Received {
            messages: Vec::new(),
            closed: false,
        };
        loop {
            let mut buf = [0u8; 64];
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let (length, mut files) =
                match process::receive_with_fds(self.0.as_fd(), &mut buf, &mut space) {
                    Ok(message) => (message.bytes, message.fds),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::EAGAIN) => return received,
                    Err(_) => {
                        received.closed = true;
                        return received;
                    }
                };
            if length == 0 {
                received.closed = true;
                return received;
            }
            let file = (files.len() == 1).then(|| File::from(files.remove(0)));
            received
                .messages
                .extend(decode_commands(&buf[..length], file));
        }
    }
}

/// The commands of one read; `file` came with its last byte. A log byte without
/// its descriptor (the kernel drops descriptors a full table cannot take) is
/// no command.
fn decode_commands(bytes: &[u8], mut file: Option<File>) -> Vec<Command> {
    let last = bytes.len().saturating_sub(1);
    bytes
        .iter()
        .enumerate()
        .filter_map(|(at, byte)| match byte {
            b'g' => Some(Command::GracefulStop),
            b'h' => Some(Command::HandOver),
            b'q' => Some(Command::QuickStop),
            b'l' if at == last => file.take().map(|f| Command::LogTo(Log::Main, f)),
            b'a' if at == last => file.take().map(|f| Command::LogTo(Log::Access, f)),
            _ => None,
        })
        .collect()
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
        master.send(&Command::GracefulStop).unwrap();
        master.send(&Command::QuickStop).unwrap();
        assert!(matches!(
            worker.receive().messages.as_slice(),
            [Command::GracefulStop, Command::QuickStop]
        ));
        worker.send(Report::Ready).unwrap();
        let got = master.receive();
        assert_eq!((got.messages, got.closed), (vec![Report::Ready], false));
        drop(master);
        assert!(worker.receive().closed);
    }

    #[test]
    fn log_files_travel_with_their_byte_and_land_in_the_right_log() {
        let dir = std::env::temp_dir().join(format!("raasd-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .unwrap()
        };
        let (master, worker) = channel().unwrap();
        master.send(&Command::GracefulStop).unwrap();
        master
            .send(&Command::LogTo(Log::Main, open("main.log")))
            .unwrap();
        master
            .send(&Command::LogTo(Log::Access, open("access.log")))
            .unwrap();
        master.send(&Command::QuickStop).unwrap();
        let mut got = worker.receive().messages;
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(matches!(got[0], Command::GracefulStop));
        assert!(matches!(got[3], Command::QuickStop));
        // Each received descriptor is the file that was sent: a write through it
        // lands there.
        for (at, log, name) in [(1, Log::Main, "main.log"), (2, Log::Access, "access.log")] {
            match &mut got[at] {
                Command::LogTo(l, file) if *l == log => file.write_all(name.as_bytes()).unwrap(),
                other => panic!("message {at}: {other:?}"),
            }
            assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), name);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_byte_without_its_descriptor_is_no_command() {
        assert!(decode_commands(b"l", None).is_empty());
        assert!(matches!(
            decode_commands(b"gl", None).as_slice(),
            [Command::GracefulStop]
        ));
    }
}
