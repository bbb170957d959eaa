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
//! Exactly one process owns a connection at any time, and neither side ever waits
//! for the other: the batch is settled over its private socketpair by the two small
//! state machines of [`settle`] (the sender decides, the receiver obeys; a timeout
//! only ever gives up its own side's claim), driven from each worker's epoll loop by
//! [`Outgoing`] (the sender's batches) and [`Incoming`] (the receiver's claims). A
//! sender that stalls delays only the clients of its batches; a receiver that
//! stalls, only its own clients and those it claimed. The sender never calls
//! `shutdown()` on a socket it passed: that would act on the receiver's connection
//! too; it closes its copy.

pub mod settle;

use std::io::{self, IoSlice, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};

use crate::listeners::Stream;
use crate::process;

/// The version of the wire format. A successor that speaks another one (or none)
/// does not take the queue, and the old workers drain instead.
pub const VERSION: u8 = 2;
const MAGIC: &[u8; 7] = b"RAASDHO";
/// Connections per message.
pub const MAX_BATCH: usize = 64;
/// State bytes carried in the message itself; more goes in a memfd.
pub const INLINE_MAX: usize = 48 * 1024;
/// How long a sender waits for a batch to be claimed before it takes it back and
/// serves it itself. (Once claimed and granted, there is no deadline.)
pub const TAKE_WITHIN: Duration = Duration::from_secs(1);
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

/// What travels with a connection: its socket, the replies not yet written and the
/// incomplete line already read. The sender keeps its own type (a served
/// connection) while a batch is settled, so what comes back is served on as it was.
pub trait Travels {
    fn stream(&self) -> &Stream;
    fn unsent(&self) -> &[u8];
    fn partial_line(&self) -> &[u8];
}

impl Travels for Parcel {
    fn stream(&self) -> &Stream {
        &self.stream
    }
    fn unsent(&self) -> &[u8] {
        &self.unsent
    }
    fn partial_line(&self) -> &[u8] {
        &self.partial_line
    }
}

/// How a batch the sender offered was settled.
#[derive(Debug)]
pub enum Settled<T> {
    /// A worker of `generation` has them: the sender's copies are to close (by
    /// dropping them, never by `shutdown()`).
    Taken { items: Vec<T>, generation: u64 },
    /// Nobody took them (in time, or at all): the sender serves them on.
    Kept(Vec<T>),
}

/// One batch the sender offered: its end of the batch's private socketpair, the far
/// end until the batch is sent, the connections, and where the settlement stands
/// (None: not sent yet, the queue was full).
struct OutgoingBatch<T> {
    settle: UnixStream,
    far: Option<UnixStream>,
    items: Vec<T>,
    offer: Option<settle::Offer>,
    /// Until then a claim is awaited; then the sender takes the batch back.
    deadline: Instant,
    inbox: Vec<u8>,
}

/// The sender's side: the batches a retiring worker has offered and not yet
/// settled. It never blocks: the worker registers each sent batch's settle socket
/// in its epoll set ([`Outgoing::settle_fd`]) and calls [`Outgoing::on_ready`].
pub struct Outgoing<T> {
    batches: Vec<Option<OutgoingBatch<T>>>,
    unsent: usize,
}

impl<T> Default for Outgoing<T> {
    fn default() -> Self {
        Outgoing {
            batches: Vec::new(),
            unsent: 0,
        }
    }
}

impl<T: Travels> Outgoing<T> {
    /// Prepares a batch (at most [`MAX_BATCH`] connections); it is sent by
    /// [`Outgoing::send_pending`]. On error the connections are given back.
    pub fn offer(&mut self, items: Vec<T>, now: Instant) -> Result<(), (Vec<T>, io::Error)> {
        debug_assert!(items.len() <= MAX_BATCH);
        let pair = UnixStream::pair().and_then(|(settle, far)| {
            settle.set_nonblocking(true)?;
            Ok((settle, far))
        });
        let (settle, far) = match pair {
            Ok(pair) => pair,
            Err(e) => return Err((items, e)),
        };
        let batch = OutgoingBatch {
            settle,
            far: Some(far),
            items,
            offer: None,
            deadline: now + TAKE_WITHIN,
            inbox: Vec::new(),
        };
        put(&mut self.batches, batch);
        self.unsent += 1;
        Ok(())
    }

    /// Sends the batches not sent yet, in order, until the queue is full; returns
    /// the keys of those sent (whose settle sockets to watch) and the batches that
    /// could not be sent at all (kept).
    pub fn send_pending(&mut self, queue: &Queue, now: Instant) -> (Vec<usize>, Vec<Settled<T>>) {
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        for key in 0..self.batches.len() {
            if self.unsent == 0 {
                break;
            }
            let Some(batch) = self.batches[key].as_mut() else {
                continue;
            };
            if batch.offer.is_some() {
                continue;
            }
            match batch.send(queue) {
                Ok(true) => {
                    batch.offer = Some(settle::Offer::Offered);
                    // The deadline counts from when a receiver could first see it.
                    batch.deadline = now + TAKE_WITHIN;
                    self.unsent -= 1;
                    sent.push(key);
                }
                Ok(false) => break,
                Err(e) => {
                    log::warn!("hand-over: cannot send a batch: {e}; serving it here");
                    self.unsent -= 1;
                    let batch = self.batches[key].take().expect("present");
                    failed.push(Settled::Kept(batch.items));
                }
            }
        }
        (sent, failed)
    }

    /// The settle socket of batch `key`, to watch for input.
    pub fn settle_fd(&self, key: usize) -> Option<BorrowedFd<'_>> {
        self.batches.get(key)?.as_ref().map(|b| b.settle.as_fd())
    }

    /// Reads what the receiver wrote on batch `key` and settles it if that decides it.
    pub fn on_ready(&mut self, key: usize) -> Option<Settled<T>> {
        let batch = self.batches.get_mut(key)?.as_mut()?;
        let input = batch.read_input();
        self.apply(key, input)
    }

    /// Settles every sent batch whose deadline passed (reading a late claim first:
    /// a claim already there is granted) and every unsent one whose time is up.
    pub fn expire(&mut self, now: Instant) -> Vec<Settled<T>> {
        let mut settled = Vec::new();
        for key in 0..self.batches.len() {
            let Some(batch) = self.batches[key].as_mut() else {
                continue;
            };
            if batch.deadline > now {
                continue;
            }
            match batch.offer {
                None => {
                    self.unsent -= 1;
                    let batch = self.batches[key].take().expect("present");
                    settled.push(Settled::Kept(batch.items));
                }
                Some(settle::Offer::Offered) => {
                    let input = batch.read_input().or(Some(settle::SenderInput::Deadline));
                    settled.extend(self.apply(key, input));
                }
                Some(settle::Offer::Granted { .. }) => {}
            }
        }
        settled
    }

    /// The next moment [`Outgoing::expire`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.batches
            .iter()
            .flatten()
            .filter(|b| !matches!(b.offer, Some(settle::Offer::Granted { .. })))
            .map(|b| b.deadline)
            .min()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.iter().all(Option::is_none)
    }

    pub fn has_unsent(&self) -> bool {
        self.unsent > 0
    }

    /// Connections in batches not settled yet.
    pub fn connections(&self) -> usize {
        self.batches.iter().flatten().map(|b| b.items.len()).sum()
    }

    fn apply(&mut self, key: usize, input: Option<settle::SenderInput>) -> Option<Settled<T>> {
        let batch = self.batches[key].as_mut()?;
        let offer = batch.offer?;
        match settle::sender_step(offer, input?) {
            settle::SenderStep::Wait(offer) => {
                batch.offer = Some(offer);
                None
            }
            settle::SenderStep::Grant { generation } => {
                if (&batch.settle).write_all(&[settle::GRANT]).is_ok() {
                    batch.offer = Some(settle::Offer::Granted { generation });
                    // Its ack may already be there.
                    return self.on_ready(key);
                }
                // Gone before it could read the grant: as if it closed first.
                let after = settle::Offer::Granted { generation };
                match settle::sender_step(after, settle::SenderInput::Closed) {
                    settle::SenderStep::Keep { .. } => {
                        let batch = self.batches[key].take().expect("present");
                        Some(Settled::Kept(batch.items))
                    }
                    step => unreachable!("a closed receiver after a grant: {step:?}"),
                }
            }
            settle::SenderStep::Keep { tell } => {
                if tell {
                    let _ = (&batch.settle).write_all(&[settle::KEEP]);
                }
                let batch = self.batches[key].take().expect("present");
                Some(Settled::Kept(batch.items))
            }
            settle::SenderStep::Taken { generation } => {
                let batch = self.batches[key].take().expect("present");
                Some(Settled::Taken {
                    items: batch.items,
                    generation,
                })
            }
        }
    }
}

impl<T: Travels> OutgoingBatch<T> {
    /// The next input the receiver's bytes make, if any.
    fn read_input(&mut self) -> Option<settle::SenderInput> {
        let mut buf = [0u8; 64];
        loop {
            let (input, used) = settle::parse_for_sender(&self.inbox);
            if let Some(input) = input {
                self.inbox.drain(..used);
                return Some(input);
            }
            match (&self.settle).read(&mut buf) {
                Ok(0) => return Some(settle::SenderInput::Closed),
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset: the receiver died with our grant unread.
                Err(_) => return Some(settle::SenderInput::Closed),
            }
        }
    }

    /// Sends the batch as one message; false when the queue is full.
    fn send(&mut self, queue: &Queue) -> io::Result<bool> {
        let far = self.far.as_ref().expect("not sent yet");
        let state: usize = self
            .items
            .iter()
            .map(|p| p.unsent().len() + p.partial_line().len())
            .sum();
        let in_memfd = state > INLINE_MAX;
        let mut message = Vec::with_capacity(HEADER + PER_CONNECTION * self.items.len() + state);
        message.extend_from_slice(MAGIC);
        message.push(VERSION);
        message.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        message.push(if in_memfd { FLAG_MEMFD } else { 0 });
        for item in &self.items {
            message.push(match item.stream() {
                Stream::Tcp(_) => 0,
                Stream::Unix(_) => 1,
            });
            message.extend_from_slice(&(item.unsent().len() as u32).to_le_bytes());
            message.extend_from_slice(&(item.partial_line().len() as u32).to_le_bytes());
        }
        let memfd = if in_memfd {
            let mut file = std::fs::File::from(nix::sys::memfd::memfd_create(
                "raasd-handoff",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )?);
            for item in &self.items {
                file.write_all(item.unsent())?;
                file.write_all(item.partial_line())?;
            }
            file.rewind()?;
            Some(OwnedFd::from(file))
        } else {
            for item in &self.items {
                message.extend_from_slice(item.unsent());
                message.extend_from_slice(item.partial_line());
            }
            None
        };
        let mut fds: Vec<RawFd> = Vec::with_capacity(self.items.len() + 2);
        fds.push(far.as_raw_fd());
        fds.extend(self.items.iter().map(|p| p.stream().as_fd().as_raw_fd()));
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
                // The message holds its own copy now; ours goes, so that its end of
                // file tells the receiver when this process dies.
                self.far = None;
                Ok(true)
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// A batch a receiver took and claimed: held, not served, until its sender decides.
struct Claim {
    settle: UnixStream,
    parcels: Vec<Parcel>,
}

/// What became of a claim.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// No answer yet.
    Pending,
    /// Ours to serve.
    Own(Vec<Parcel>),
    /// The sender kept them; our copies are closed.
    Dropped,
}

/// What a receiver found in the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Nothing waits.
    Empty,
    /// A batch, claimed: watch [`Incoming::settle_fd`] of this key.
    Claimed(usize),
    /// A message it could not read: refused, its sender serves it.
    Refused,
}

/// The receiver's side: the batches this worker took from the queue and claimed,
/// until their senders answer. It never blocks and never gives a claim up on a
/// timeout: a stalled sender only delays the clients of its own batch.
#[derive(Default)]
pub struct Incoming {
    claims: Vec<Option<Claim>>,
}

impl Incoming {
    /// Takes one batch from the queue, if one waits, and claims it for a worker of
    /// `generation`.
    pub fn take(&mut self, queue: &Queue, generation: u64) -> io::Result<Taken> {
        let (settle, parcels) = match receive(queue)? {
            None => return Ok(Taken::Empty),
            Some((Some(settle), Some(parcels))) => (settle, parcels),
            Some((settle, _)) => {
                // Not ours to read: the sender serves them itself. Our copies close here.
                if let Some(settle) = settle {
                    let _ = (&settle).write_all(&[settle::REFUSE]);
                }
                return Ok(Taken::Refused);
            }
        };
        let _ = settle.set_nonblocking(true);
        // (A write error means the sender closed its end: its answer, if it gave one,
        // is still there to read; if not, it died undecided.)
        let _ = (&settle).write_all(&settle::claim(generation));
        let claim = Claim { settle, parcels };
        Ok(Taken::Claimed(put(&mut self.claims, claim)))
    }

    /// The settle socket of claim `key`, to watch for the sender's answer.
    pub fn settle_fd(&self, key: usize) -> Option<BorrowedFd<'_>> {
        self.claims.get(key)?.as_ref().map(|c| c.settle.as_fd())
    }

    /// Reads the sender's answer to claim `key`, if it came.
    pub fn on_ready(&mut self, key: usize) -> ClaimOutcome {
        let Some(Some(claim)) = self.claims.get(key) else {
            return ClaimOutcome::Pending;
        };
        let mut answer = [0u8; 1];
        let input = match (&claim.settle).read(&mut answer) {
            Ok(1) => settle::parse_for_receiver(answer[0]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return ClaimOutcome::Pending;
            }
            // End of file or a reset with no answer.
            _ => settle::ReceiverInput::Closed,
        };
        let claim = self.claims[key].take().expect("present");
        match settle::receiver_step(input) {
            settle::ReceiverStep::Own => {
                let _ = (&claim.settle).write_all(&[settle::ACK]);
                ClaimOutcome::Own(claim.parcels)
            }
            settle::ReceiverStep::Drop => ClaimOutcome::Dropped,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.claims.iter().all(Option::is_none)
    }

    /// Connections claimed and not yet answered.
    pub fn connections(&self) -> usize {
        self.claims.iter().flatten().map(|c| c.parcels.len()).sum()
    }
}

/// Puts `value` in the first free slot; returns its key (the epoll token's offset).
/// A key is reused at once: an event still queued for the old one only reads a
/// socket that has nothing, which changes nothing.
fn put<T>(slots: &mut Vec<Option<T>>, value: T) -> usize {
    match slots.iter().position(Option::is_none) {
        Some(key) => {
            slots[key] = Some(value);
            key
        }
        None => {
            slots.push(Some(value));
            slots.len() - 1
        }
    }
}

/// One message from the queue: the settle socket and the parcels, either None when
/// the message could not be read; None when the queue is empty.
#[allow(clippy::type_complexity)]
fn receive(queue: &Queue) -> io::Result<Option<(Option<UnixStream>, Option<Vec<Parcel>>)>> {
    let mut header = vec![0u8; HEADER + PER_CONNECTION * MAX_BATCH + INLINE_MAX];
    let mut space = nix::cmsg_space!([RawFd; MAX_BATCH + 2]);
    let message = match process::receive_with_fds(queue.rx.as_fd(), &mut header, &mut space) {
        Ok(message) => message,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (length, truncated, mut owned) = (message.bytes, message.truncated, message.fds);
    if owned.is_empty() {
        return Ok(Some((None, None)));
    }
    let settle = UnixStream::from(owned.remove(0));
    let parcels = if truncated {
        None
    } else {
        decode(&header[..length], owned)
    };
    Ok(Some((Some(settle), parcels)))
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
    //! Both sides driven by hand in one thread over real sockets: every step of the
    //! settlement can be taken, delayed or skipped (a stall), or a side dropped (a
    //! death) exactly where a test wants.

    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// `count` connected TCP pairs as parcels, and their clients.
    fn connections(count: usize) -> (Vec<Parcel>, Vec<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (0..count)
            .map(|i| {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (server, _) = listener.accept().unwrap();
                let parcel = Parcel {
                    stream: Stream::Tcp(server),
                    unsent: format!("reply {i}\n").into_bytes(),
                    // One with a large state, to go through the memfd.
                    partial_line: if i == 2 {
                        vec![b'x'; INLINE_MAX]
                    } else {
                        b"half".to_vec()
                    },
                };
                (parcel, client)
            })
            .unzip()
    }

    /// Sends one batch of `count` and returns the sender and the batch's key.
    fn offered(queue: &Queue, count: usize) -> (Outgoing<Parcel>, usize, Vec<TcpStream>) {
        let (parcels, clients) = connections(count);
        let mut outgoing = Outgoing::default();
        let now = Instant::now();
        outgoing.offer(parcels, now).map_err(|(_, e)| e).unwrap();
        let (sent, failed) = outgoing.send_pending(queue, now);
        assert!(failed.is_empty());
        assert_eq!(sent.len(), 1);
        (outgoing, sent[0], clients)
    }

    fn claimed(queue: &Queue, incoming: &mut Incoming) -> usize {
        match incoming.take(queue, 7).unwrap() {
            Taken::Claimed(key) => key,
            other => panic!("took {other:?}"),
        }
    }

    #[test]
    fn a_batch_arrives_with_its_state_and_the_sockets_still_talk() {
        let queue = Queue::new().unwrap();
        let (mut outgoing, out_key, mut clients) = offered(&queue, 3);
        let mut incoming = Incoming::default();
        let in_key = claimed(&queue, &mut incoming);
        // Nothing is decided until the sender reads the claim.
        assert!(matches!(incoming.on_ready(in_key), ClaimOutcome::Pending));
        assert!(
            outgoing.on_ready(out_key).is_none(),
            "granted, not yet acked"
        );
        let ClaimOutcome::Own(received) = incoming.on_ready(in_key) else {
            panic!("the grant was not read")
        };
        match outgoing.on_ready(out_key) {
            Some(Settled::Taken { items, generation }) => {
                assert_eq!((items.len(), generation), (3, 7));
            }
            other => panic!("{other:?}"),
        }
        assert!(outgoing.is_empty() && incoming.is_empty());
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
    fn a_batch_nobody_claims_in_time_comes_back_and_a_late_claim_is_told_so() {
        let queue = Queue::new().unwrap();
        let (mut outgoing, _, _clients) = offered(&queue, 1);
        let deadline = outgoing.next_deadline().expect("a deadline while offered");
        assert!(outgoing.expire(Instant::now()).is_empty(), "not yet");
        let settled = outgoing.expire(deadline);
        assert!(matches!(settled.as_slice(), [Settled::Kept(p)] if p.len() == 1));
        let mut incoming = Incoming::default();
        let key = claimed(&queue, &mut incoming);
        assert!(matches!(incoming.on_ready(key), ClaimOutcome::Dropped));
    }

    #[test]
    fn a_stalled_sender_delays_only_its_batch_and_a_claim_never_times_out() {
        let queue = Queue::new().unwrap();
        let (mut outgoing, out_key, _clients) = offered(&queue, 2);
        let mut incoming = Incoming::default();
        let key = claimed(&queue, &mut incoming);
        // The sender does not run for a long while: the receiver only polls.
        for _ in 0..1000 {
            assert!(matches!(incoming.on_ready(key), ClaimOutcome::Pending));
        }
        // It comes back after its deadline: the claim that waits is granted.
        let late = Instant::now() + TAKE_WITHIN * 10;
        assert!(outgoing.expire(late).is_empty());
        assert!(matches!(incoming.on_ready(key), ClaimOutcome::Own(p) if p.len() == 2));
        assert!(matches!(
            outgoing.on_ready(out_key),
            Some(Settled::Taken { .. })
        ));
    }

    #[test]
    fn a_receiver_that_dies_after_claiming_leaves_the_batch_to_its_sender() {
        let queue = Queue::new().unwrap();
        let (mut outgoing, out_key, _clients) = offered(&queue, 2);
        let mut incoming = Incoming::default();
        claimed(&queue, &mut incoming);
        drop(incoming);
        // It reads the claim and grants, then sees the end before any ack.
        let settled = outgoing
            .on_ready(out_key)
            .or_else(|| outgoing.on_ready(out_key));
        assert!(matches!(settled, Some(Settled::Kept(p)) if p.len() == 2));
    }

    #[test]
    fn a_receiver_that_dies_after_the_grant_but_before_reading_it_leaves_it_too() {
        let queue = Queue::new().unwrap();
        let (mut outgoing, out_key, _clients) = offered(&queue, 1);
        let mut incoming = Incoming::default();
        claimed(&queue, &mut incoming);
        assert!(outgoing.on_ready(out_key).is_none(), "granted");
        drop(incoming);
        assert!(matches!(outgoing.on_ready(out_key), Some(Settled::Kept(_))));
    }

    #[test]
    fn a_sender_that_dies_undecided_leaves_the_batch_to_its_receiver() {
        let queue = Queue::new().unwrap();
        let (outgoing, _, _clients) = offered(&queue, 2);
        drop(outgoing);
        let mut incoming = Incoming::default();
        let key = claimed(&queue, &mut incoming);
        assert!(matches!(incoming.on_ready(key), ClaimOutcome::Own(p) if p.len() == 2));
    }

    #[test]
    fn a_message_of_another_format_is_refused_and_the_sender_keeps() {
        assert!(decode(b"RAASDHO\x01\x01\x00\x00\x00\x00", Vec::new()).is_none());
        assert!(decode(b"short", Vec::new()).is_none());
        // A receiver that cannot read a batch refuses it: the sender keeps it.
        let queue = Queue::new().unwrap();
        let (far_settle, far) = UnixStream::pair().unwrap();
        let (_parcels, _clients) = connections(1);
        sendmsg::<()>(
            queue.tx.as_raw_fd(),
            &[IoSlice::new(b"RAASDHO\x01garbage")],
            &[ControlMessage::ScmRights(&[far.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(far);
        let mut incoming = Incoming::default();
        assert_eq!(incoming.take(&queue, 1).unwrap(), Taken::Refused);
        let mut answer = [0u8; 1];
        (&far_settle).read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], settle::REFUSE);
        assert_eq!(incoming.take(&queue, 1).unwrap(), Taken::Empty);
    }

    #[test]
    fn a_full_queue_keeps_the_batch_unsent_until_its_time_is_up() {
        let queue = Queue::new().unwrap();
        let mut outgoing: Outgoing<Parcel> = Outgoing::default();
        let now = Instant::now();
        let mut sent_total = 0;
        // Fill the queue with one-connection batches until it refuses one.
        let mut clients = Vec::new();
        loop {
            let (parcels, c) = connections(1);
            clients.extend(c);
            outgoing.offer(parcels, now).map_err(|(_, e)| e).unwrap();
            let (sent, failed) = outgoing.send_pending(&queue, now);
            assert!(failed.is_empty());
            sent_total += sent.len();
            if outgoing.has_unsent() {
                break;
            }
            assert!(sent_total < 100_000, "the queue never filled");
        }
        let settled = outgoing.expire(now + TAKE_WITHIN);
        // Every batch comes back: the unsent one, and the sent ones nobody claimed.
        let kept: usize = settled
            .iter()
            .map(|s| match s {
                Settled::Kept(p) => p.len(),
                Settled::Taken { .. } => panic!("nobody took"),
            })
            .sum();
        assert_eq!(kept, sent_total + 1);
        assert!(outgoing.is_empty() && !outgoing.has_unsent());
    }
}
