//! Live connection hand-over: a worker that retires passes its established
//! connections, with their state, to workers that stay.
//!
//! Owns the hand-over's wire format (versioned, [`VERSION`]) and both of its sides,
//! so that sender and receiver cannot disagree. It moves sockets and the bytes that
//! belong with them; it does not decide who retires (the master) nor how a
//! connection is served (the worker and `connection`).
//!
//! The channel is one `SOCK_SEQPACKET` socketpair per master, the [`Queue`], made
//! before the first fork and handed on to a successor across a binary upgrade: a
//! retiring worker writes to its `tx` end, and every worker in service holds its
//! `rx` end in its epoll set with EPOLLEXCLUSIVE, like a second accept queue, so
//! one receiver wakes per batch and connections spread as new ones do.
//!
//! A batch is one message: a header, then for each connection its kind, its unsent
//! replies and the incomplete line already read; the sockets travel as SCM_RIGHTS
//! (at most [`MAX_BATCH`], well under the kernel's 253), and so does a private
//! socketpair end on which the batch is settled. State larger than [`INLINE_MAX`]
//! goes in a memfd passed along, so a client that does not read its replies (up to
//! --max-pending of them) never blocks the queue. Bytes still in the kernel travel
//! with the socket itself.
//!
//! Exactly one process owns a connection at any time. The receiver writes `T`
//! (taken, with its generation) on the batch's socketpair and waits; the sender
//! answers `Y` and closes its copies, or — when no `T` came within [`TAKE_WITHIN`] —
//! `N`, and serves those connections to their end itself (the drain of a stop). A
//! receiver that does not understand the message answers `R`, and the sender drains.
//! The sender never calls `shutdown()` on a socket it passed: that would act on the
//! receiver's connection too; it removes it from its epoll set and closes its copy.

use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

use crate::listeners::Stream;

/// The version of the wire format. A successor that speaks another one (or none)
/// does not take the queue, and the old workers drain instead.
pub const VERSION: u8 = 1;
const MAGIC: &[u8; 7] = b"RAASDHO";
/// Connections per message.
pub const MAX_BATCH: usize = 64;
/// State bytes carried in the message itself; more goes in a memfd.
pub const INLINE_MAX: usize = 48 * 1024;
/// How long a sender waits for its batches to be taken before it serves them itself.
pub const TAKE_WITHIN: Duration = Duration::from_secs(1);
/// How long a receiver waits for the sender's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
const HEADER: usize = MAGIC.len() + 1 + 4 + 1;
const PER_CONNECTION: usize = 1 + 4 + 4;
const FLAG_MEMFD: u8 = 1;

/// One connection on its way: the socket, the replies not yet written, and the
/// incomplete line already read.
#[derive(Debug)]
pub struct Parcel {
    pub stream: Stream,
    pub unsent: Vec<u8>,
    pub partial_line: Vec<u8>,
}

/// The hand-over queue of a master and its workers.
#[derive(Debug)]
pub struct Queue {
    tx: OwnedFd,
    rx: OwnedFd,
}

/// The environment variable that hands the queue to a successor: `VERSION:rx,tx`.
pub const ENV: &str = "RAASD_HANDOFF";

impl Queue {
    pub fn new() -> io::Result<Queue> {
        let (tx, rx) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok(Queue { tx, rx })
    }

    /// The end receivers watch.
    pub fn rx(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Both ends, for a successor to inherit.
    pub fn descriptors(&self) -> [BorrowedFd<'_>; 2] {
        [self.rx.as_fd(), self.tx.as_fd()]
    }

    /// The [`ENV`] value naming this queue.
    pub fn env_value(&self) -> String {
        format!("{VERSION}:{},{}", self.rx.as_raw_fd(), self.tx.as_raw_fd())
    }

    /// The queue a predecessor handed over in `value`, if it speaks this version
    /// (otherwise it is left alone, and this master makes its own).
    pub fn inherited(value: &str) -> Result<Option<Queue>, String> {
        let Some((version, fds)) = value.split_once(':') else {
            return Err(format!("{ENV}: '{value}' is not VERSION:rx,tx"));
        };
        if version != VERSION.to_string() {
            return Ok(None);
        }
        let parse = |fd: &str| {
            fd.parse::<RawFd>()
                .map_err(|_| format!("{ENV}: bad descriptor '{fd}'"))
        };
        let (rx, tx) = fds
            .split_once(',')
            .ok_or_else(|| format!("{ENV}: '{value}' is not VERSION:rx,tx"))?;
        let (rx, tx) = (parse(rx)?, parse(tx)?);
        if rx == tx {
            return Err(format!("{ENV}: descriptor {rx} is named twice"));
        }
        let take = |fd| {
            crate::process::take_inherited_fd(fd)
                .map_err(|e| format!("{ENV}: descriptor {fd}: {}", crate::errors::plain(&e)))
        };
        let (rx, tx) = (take(rx)?, take(tx)?);
        for end in [&rx, &tx] {
            nix::fcntl::fcntl(
                end,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .map_err(|e| format!("{ENV}: {e}"))?;
        }
        Ok(Some(Queue { tx, rx }))
    }
}

/// What became of a hand-over.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Connections now served by other workers.
    pub taken: usize,
    /// The generations of the workers that took them.
    pub generations: Vec<u64>,
    /// Connections nobody took: the sender serves them to their end itself.
    pub back: Vec<Parcel>,
}

/// One batch under way: the sender's end of its private socketpair, the far end
/// (until sent), and its parcels until the batch is settled.
struct Offer {
    settle: UnixStream,
    far: Option<UnixStream>,
    parcels: Vec<Parcel>,
    sent: bool,
}

/// The sender's side: offers every parcel, in batches, and settles each batch as
/// taken or not within [`TAKE_WITHIN`]. Blocks for at most that long (the worker is
/// retiring: nothing else waits on it).
pub fn hand_over(queue: &Queue, parcels: Vec<Parcel>) -> Outcome {
    let mut outcome = Outcome::default();
    let mut offers: Vec<Offer> = Vec::new();
    let mut rest = parcels.into_iter().peekable();
    while rest.peek().is_some() {
        let batch: Vec<Parcel> = rest.by_ref().take(MAX_BATCH).collect();
        match UnixStream::pair().and_then(|(settle, far)| {
            settle.set_nonblocking(true)?;
            Ok((settle, far))
        }) {
            Ok((settle, far)) => offers.push(Offer {
                settle,
                far: Some(far),
                parcels: batch,
                sent: false,
            }),
            Err(e) => {
                log::warn!("hand-over: cannot make a socketpair: {e}; serving the batch here");
                outcome.back.extend(batch);
            }
        }
    }
    let deadline = Instant::now() + TAKE_WITHIN;
    loop {
        for offer in offers.iter_mut().filter(|o| !o.sent) {
            match offer.send(queue) {
                Ok(true) => offer.sent = true,
                Ok(false) => break, // the queue is full: wait until it drains
                Err(e) => {
                    log::warn!("hand-over: cannot send a batch: {e}; serving it here");
                    outcome.back.append(&mut offer.parcels);
                    offer.sent = true;
                }
            }
        }
        settle_answered(&mut offers, &mut outcome);
        if offers.is_empty() {
            return outcome;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        wait_for_answers(queue, &offers, deadline - now);
    }
    // Nobody took these in time: say so (a receiver that reads one later drops it),
    // and serve them here.
    for mut offer in offers {
        let _ = (&offer.settle).write_all(b"N");
        outcome.back.append(&mut offer.parcels);
    }
    outcome
}

impl Offer {
    /// Sends the batch as one message; false when the queue is full.
    fn send(&mut self, queue: &Queue) -> io::Result<bool> {
        let far = self.far.as_ref().expect("not sent yet");
        let state: usize = self
            .parcels
            .iter()
            .map(|p| p.unsent.len() + p.partial_line.len())
            .sum();
        let in_memfd = state > INLINE_MAX;
        let mut message = Vec::with_capacity(HEADER + PER_CONNECTION * self.parcels.len() + state);
        message.extend_from_slice(MAGIC);
        message.push(VERSION);
        message.extend_from_slice(&(self.parcels.len() as u32).to_le_bytes());
        message.push(if in_memfd { FLAG_MEMFD } else { 0 });
        for parcel in &self.parcels {
            message.push(match parcel.stream {
                Stream::Tcp(_) => 0,
                Stream::Unix(_) => 1,
            });
            message.extend_from_slice(&(parcel.unsent.len() as u32).to_le_bytes());
            message.extend_from_slice(&(parcel.partial_line.len() as u32).to_le_bytes());
        }
        let mut payload = Vec::with_capacity(state);
        for parcel in &self.parcels {
            payload.extend_from_slice(&parcel.unsent);
            payload.extend_from_slice(&parcel.partial_line);
        }
        let memfd = if in_memfd {
            let mut file = std::fs::File::from(nix::sys::memfd::memfd_create(
                "raasd-handoff",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )?);
            file.write_all(&payload)?;
            file.rewind()?;
            Some(OwnedFd::from(file))
        } else {
            message.extend_from_slice(&payload);
            None
        };
        let mut fds: Vec<RawFd> = Vec::with_capacity(self.parcels.len() + 2);
        fds.push(far.as_raw_fd());
        fds.extend(self.parcels.iter().map(|p| p.stream.as_fd().as_raw_fd()));
        fds.extend(memfd.as_ref().map(|m| m.as_raw_fd()));
        let sent = sendmsg::<()>(
            queue.tx.as_raw_fd(),
            &[IoSlice::new(&message)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
        match sent {
            Ok(_) => {
                // The receiver has its own copy now; ours goes, so that its end of file
                // tells the receiver when this process dies.
                self.far = None;
                Ok(true)
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Reads the answers that arrived; settles every batch that has one.
fn settle_answered(offers: &mut Vec<Offer>, outcome: &mut Outcome) {
    offers.retain_mut(|offer| {
        if !offer.sent {
            return true;
        }
        if offer.parcels.is_empty() {
            return false;
        }
        let mut answer = [0u8; 9];
        match (&offer.settle).read(&mut answer) {
            Ok(9) if answer[0] == b'T' => {
                let _ = (&offer.settle).write_all(b"Y");
                outcome.taken += offer.parcels.len();
                let generation = u64::from_le_bytes(answer[1..9].try_into().expect("8 bytes"));
                if !outcome.generations.contains(&generation) {
                    outcome.generations.push(generation);
                }
                // Our copies go; the receiver's live on.
                offer.parcels.clear();
                false
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            // Refused (`R`), a short answer, the receiver gone: serve them here.
            _ => {
                outcome.back.append(&mut offer.parcels);
                false
            }
        }
    });
}

fn wait_for_answers(queue: &Queue, offers: &[Offer], within: Duration) {
    let mut fds: Vec<PollFd> = offers
        .iter()
        .filter(|o| o.sent)
        .map(|o| PollFd::new(o.settle.as_fd(), PollFlags::POLLIN))
        .collect();
    if offers.iter().any(|o| !o.sent) {
        fds.push(PollFd::new(queue.tx.as_fd(), PollFlags::POLLOUT));
    }
    let millis = within.as_millis().clamp(1, 1000) as i32;
    let _ = poll(
        &mut fds,
        PollTimeout::try_from(millis).unwrap_or(PollTimeout::NONE),
    );
}

/// What a receiver found in the queue.
#[derive(Debug)]
pub enum Received {
    /// Nothing waits.
    Empty,
    /// A batch this worker now owns (empty when the sender had given up on it, or
    /// the message could not be read).
    Batch(Vec<Parcel>),
}

/// The receiver's side: takes one batch from the queue, if one waits, and settles it
/// with its sender (telling it `generation`, for its log). Waits for the sender's
/// answer, which comes at once unless the sender is gone or gave up.
pub fn receive(queue: &Queue, generation: u64) -> io::Result<Received> {
    let mut header = vec![0u8; HEADER + PER_CONNECTION * MAX_BATCH + INLINE_MAX];
    let mut space = nix::cmsg_space!([RawFd; MAX_BATCH + 2]);
    let (length, truncated, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let message = match recvmsg::<()>(
            queue.rx.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(message) => message,
            Err(nix::errno::Errno::EAGAIN) => return Ok(Received::Empty),
            Err(e) => return Err(e.into()),
        };
        let truncated = message
            .flags
            .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC);
        let mut fds: Vec<RawFd> = Vec::new();
        if let Ok(cmsgs) = message.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    fds.extend(received);
                }
            }
        }
        (message.bytes, truncated, fds)
    };
    // SAFETY: the kernel has just installed these descriptors in this process for
    // this message (SCM_RIGHTS); nothing else knows their numbers, so each gets
    // exactly one owner here.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if owned.is_empty() {
        return Ok(Received::Batch(Vec::new()));
    }
    let settle = UnixStream::from(owned.remove(0));
    let parcels = if truncated {
        None
    } else {
        decode(&header[..length], owned)
    };
    let Some(parcels) = parcels else {
        // Not ours to read: the sender serves them itself. Our copies close here.
        let _ = (&settle).write_all(b"R");
        return Ok(Received::Batch(Vec::new()));
    };
    let mut taken = [0u8; 9];
    taken[0] = b'T';
    taken[1..].copy_from_slice(&generation.to_le_bytes());
    // (A write error means the sender closed its end: its answer, if it gave one
    // before, is still there to read.)
    let _ = (&settle).write_all(&taken);
    let _ = settle.set_read_timeout(Some(ANSWER_WITHIN));
    let mut answer = [0u8; 1];
    Ok(match (&settle).read(&mut answer) {
        Ok(1) if answer[0] == b'Y' => Received::Batch(parcels),
        // The sender died without an answer: nobody else serves them.
        Ok(0) => Received::Batch(parcels),
        // `N` (it gave up before our answer), or no answer in time: its.
        _ => Received::Batch(Vec::new()),
    })
}

/// The parcels of a message, or None when it is not in this version's format.
fn decode(message: &[u8], mut fds: Vec<OwnedFd>) -> Option<Vec<Parcel>> {
    if message.len() < HEADER || &message[..MAGIC.len()] != MAGIC || message[MAGIC.len()] != VERSION
    {
        return None;
    }
    let count = u32::from_le_bytes(message[8..12].try_into().ok()?) as usize;
    let in_memfd = message[12] & FLAG_MEMFD != 0;
    if count == 0 || count > MAX_BATCH || fds.len() != count + usize::from(in_memfd) {
        return None;
    }
    let table = message.get(HEADER..HEADER + PER_CONNECTION * count)?;
    let entries: Vec<(u8, usize, usize)> = table
        .chunks_exact(PER_CONNECTION)
        .map(|e| {
            (
                e[0],
                u32::from_le_bytes(e[1..5].try_into().expect("4 bytes")) as usize,
                u32::from_le_bytes(e[5..9].try_into().expect("4 bytes")) as usize,
            )
        })
        .collect();
    let state: usize = entries.iter().map(|(_, out, line)| out + line).sum();
    let payload = if in_memfd {
        let mut file = std::fs::File::from(fds.pop()?);
        let mut payload = Vec::with_capacity(state);
        file.read_to_end(&mut payload).ok()?;
        payload
    } else {
        message.get(HEADER + PER_CONNECTION * count..)?.to_vec()
    };
    if payload.len() != state {
        return None;
    }
    let mut at = 0;
    let mut parcels = Vec::with_capacity(count);
    for ((kind, out, line), fd) in entries.into_iter().zip(fds) {
        let stream = match kind {
            0 => Stream::Tcp(std::net::TcpStream::from(fd)),
            1 => Stream::Unix(UnixStream::from(fd)),
            _ => return None,
        };
        parcels.push(Parcel {
            stream,
            unsent: payload[at..at + out].to_vec(),
            partial_line: payload[at + out..at + out + line].to_vec(),
        });
        at += out + line;
    }
    Some(parcels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// `count` connected TCP pairs: (the server side as a parcel stream, the client).
    fn connections(count: usize) -> Vec<(Stream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (0..count)
            .map(|_| {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (server, _) = listener.accept().unwrap();
                (Stream::Tcp(server), client)
            })
            .collect()
    }

    #[test]
    fn a_batch_arrives_with_its_state_and_the_sockets_still_talk() {
        let queue = Queue::new().unwrap();
        let mut clients = Vec::new();
        let mut parcels = Vec::new();
        for (i, (stream, client)) in connections(3).into_iter().enumerate() {
            clients.push(client);
            parcels.push(Parcel {
                stream,
                unsent: format!("reply {i}\n").into_bytes(),
                // One with a large state, to go through the memfd.
                partial_line: if i == 2 {
                    vec![b'x'; INLINE_MAX]
                } else {
                    b"half".to_vec()
                },
            });
        }
        let (outcome, received) = std::thread::scope(|scope| {
            let receiver = scope.spawn(|| {
                loop {
                    match receive(&queue, 7).unwrap() {
                        Received::Empty => std::thread::sleep(Duration::from_millis(1)),
                        Received::Batch(parcels) => return parcels,
                    }
                }
            });
            let outcome = hand_over(&queue, parcels);
            (outcome, receiver.join().unwrap())
        });
        assert_eq!((outcome.taken, outcome.generations.clone()), (3, vec![7]));
        assert!(outcome.back.is_empty());
        assert_eq!(received.len(), 3);
        assert_eq!(received[1].unsent, b"reply 1\n");
        assert_eq!(received[0].partial_line, b"half");
        assert_eq!(received[2].partial_line.len(), INLINE_MAX);
        for (parcel, client) in received.iter().zip(&mut clients) {
            (&parcel.stream).write_all(&parcel.unsent).unwrap();
            let mut line = vec![0u8; parcel.unsent.len()];
            client.read_exact(&mut line).unwrap();
            assert_eq!(line, parcel.unsent);
        }
    }

    #[test]
    fn a_batch_nobody_takes_comes_back_to_its_sender() {
        let queue = Queue::new().unwrap();
        let (stream, _client) = connections(1).pop().unwrap();
        let outcome = hand_over(
            &queue,
            vec![Parcel {
                stream,
                unsent: Vec::new(),
                partial_line: Vec::new(),
            }],
        );
        assert_eq!((outcome.taken, outcome.back.len()), (0, 1));
        // A receiver that reads it later is told it is not its to keep.
        match receive(&queue, 1).unwrap() {
            Received::Batch(parcels) => assert!(parcels.is_empty()),
            Received::Empty => panic!("the batch is still in the queue"),
        }
    }

    #[test]
    fn a_message_of_another_format_is_refused() {
        assert!(decode(b"RAASDHO\x02\x01\x00\x00\x00\x00", Vec::new()).is_none());
        assert!(decode(b"short", Vec::new()).is_none());
    }
}
