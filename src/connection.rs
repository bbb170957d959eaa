//! One client connection inside a worker.
//!
//! Owns the connection's socket, its codec state and its unsent output, and the
//! rules for reading, writing and closing:
//! - reads go through the worker's shared scratch buffer straight into the codec, so
//!   a connection keeps no input buffer of its own, only an incomplete line;
//! - output is written in batches; when more than `--max-pending` bytes are unsent,
//!   reading pauses until the client drains it (back-pressure, memory bounded);
//! - a connection gets at most [`READS_PER_TURN`] reads per turn, so one fast sender
//!   cannot starve the other clients of its worker;
//! - a server-side close (line too long, stop) writes every reply, shuts the write
//!   side down and then lingers, discarding input until the client closes: closing
//!   with unread input would send a reset that can destroy replies still in flight.
//!
//! The socket is registered edge-triggered, so `readable` remembers that input may be
//! waiting until a read says EAGAIN.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::codec::Codec;
use crate::config::Serving;
use crate::handoff::{Parcel, Travels};
use crate::listeners::Stream;

/// Reads a connection may do before the others get their turn.
pub const READS_PER_TURN: usize = 16;
/// Unsent output that triggers a write in the middle of a read burst.
const WRITE_AT: usize = 64 * 1024;
/// Output capacity kept after a burst; more is returned to the allocator.
const KEEP_CAPACITY: usize = 16 * 1024;
/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// During a stop, how long a connection may take to send its first line or finish
/// the line it started.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// During a stop, how much more input a connection may send before it is finished
/// anyway: a client streaming without pause must not hold a stopping worker until
/// --graceful-timeout. (More than a socket's receive buffer: what was already
/// received when the stop began is answered.)
const STOP_READ_BUDGET: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading requests and writing replies.
    Open,
    /// No more reading: write what is owed, then close (after the client's EOF) or
    /// shut down and linger (when the server ends the conversation).
    Finishing { client_closed: bool },
    /// Write side shut down; discarding input until the client closes.
    Lingering { until: Instant },
}

/// What the worker should do with a connection after its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Wait for the next readiness event.
    Wait,
    /// It has more input ready: serve it again soon, after the others.
    Again,
    /// Close it.
    Close,
}

/// Why a connection ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    ClientClosed,
    IdleTimeout,
    LineTimeout,
    LineTooLong,
    Stop,
    HandedOver,
    /// A reset, a broken pipe, another error.
    Broken,
}

impl Ending {
    pub fn name(self) -> &'static str {
        match self {
            Ending::ClientClosed => "client closed",
            Ending::IdleTimeout => "idle timeout",
            Ending::LineTimeout => "line timeout",
            Ending::LineTooLong => "line too long",
            Ending::Stop => "stop",
            Ending::HandedOver => "handed over",
            Ending::Broken => "broken",
        }
    }
}

/// A connection's counters, or the difference between two readings of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub served: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            served: self.served - earlier.served,
            bytes_in: self.bytes_in - earlier.bytes_in,
            bytes_out: self.bytes_out - earlier.bytes_out,
        }
    }
}

pub struct Connection {
    stream: Stream,
    codec: Codec,
    out: Vec<u8>,
    written: usize,
    state: State,
    /// Input may be waiting (edge-triggered readiness not yet consumed).
    readable: bool,
    /// The socket reported end of file or an error: read until a read says so.
    hung_up: bool,
    last_active: Instant,
    /// When the incomplete line now buffered began (for --line-timeout).
    line_started: Option<Instant>,
    bytes_in: u64,
    bytes_out: u64,
    max_pending: usize,
    line_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    /// Set when the worker stops: the end of the grace this connection gets.
    stopping_grace: Option<Instant>,
    /// bytes_in when the stop began.
    bytes_in_at_stop: u64,
    /// When this worker got it (accepted or took it over).
    pub opened: Instant,
    /// Why it is ending, once that is known (the client closing, a limit, a stop).
    ending: Option<Ending>,
    /// A hand-over offered it and nobody took it: it is served here to its end.
    stays: bool,
}

impl Travels for Connection {
    fn stream(&self) -> &Stream {
        &self.stream
    }
    fn unsent(&self) -> &[u8] {
        &self.out[self.written..]
    }
    fn partial_line(&self) -> &[u8] {
        self.codec.pending()
    }
}

impl Connection {
    pub fn new(stream: Stream, serving: &Serving, now: Instant) -> Connection {
        Connection {
            stream,
            codec: Codec::new(serving.unit, serving.max_line),
            out: Vec::new(),
            written: 0,
            state: State::Open,
            readable: true,
            hung_up: false,
            last_active: now,
            line_started: None,
            bytes_in: 0,
            bytes_out: 0,
            max_pending: serving.max_pending,
            line_timeout: serving.line_timeout,
            idle_timeout: serving.idle_timeout,
            stopping_grace: None,
            bytes_in_at_stop: 0,
            opened: now,
            ending: None,
            stays: false,
        }
    }

    /// A connection handed over by another worker: its unsent replies come first,
    /// and the incomplete line it had read is the start of the next one.
    pub fn resume(parcel: Parcel, serving: &Serving, now: Instant) -> Connection {
        let mut connection = Connection::new(parcel.stream, serving, now);
        connection.out = parcel.unsent;
        if !parcel.partial_line.is_empty() {
            connection.line_started = Some(now);
            if connection
                .codec
                .feed(&parcel.partial_line, &mut connection.out)
                .is_err()
            {
                // Longer than this worker's --max-line (a reload lowered it).
                connection.end_conversation();
            }
        }
        connection
    }

    /// Writes what it can, then says whether the connection can travel to another
    /// worker: not when it is no longer a plain open conversation (the client closed,
    /// a line was too long, it is stopping or broken); it then stays here, to be
    /// served to its end.
    pub fn can_travel(&mut self, now: Instant) -> bool {
        self.state == State::Open
            && !self.stays
            && !self.hung_up
            && self.stopping_grace.is_none()
            && !self.codec.is_poisoned()
            && self.write_out(now).is_ok()
    }

    /// A hand-over offered it and nobody took it: it stays, served here to its
    /// end. It was out of the epoll set meanwhile: look for input at once.
    pub fn stay_here(&mut self) {
        self.stays = true;
        self.readable = true;
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The socket reported input; `hung_up` when it also reported the peer's end of
    /// file or an error, which only a read to the end will tell.
    pub fn mark_readable(&mut self, hung_up: bool) {
        self.readable = true;
        self.hung_up |= hung_up;
    }

    /// Why it ended (the client closing, unless something else came first).
    pub fn ending(&self) -> Ending {
        self.ending.unwrap_or(Ending::ClientClosed)
    }

    /// The worker is stopping: answer what has arrived, then finish.
    pub fn stop(&mut self, now: Instant) {
        if self.stopping_grace.is_none() {
            self.ending.get_or_insert(Ending::Stop);
            self.stopping_grace = Some(now + STOP_GRACE);
            self.bytes_in_at_stop = self.bytes_in;
            self.readable = true;
        }
    }

    /// Lines answered, bytes read and bytes written so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            served: self.codec.replies(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }

    fn pending(&self) -> usize {
        self.out.len() - self.written
    }

    /// Reads what is ready (within this turn's budget), answers it and writes.
    pub fn serve(&mut self, scratch: &mut [u8], now: Instant) -> Turn {
        match self.serve_io(scratch, now) {
            Ok(turn) => turn,
            // A reset or a broken pipe: the client is gone, nothing more to do.
            Err(_) => {
                self.ending.get_or_insert(Ending::Broken);
                Turn::Close
            }
        }
    }

    fn serve_io(&mut self, scratch: &mut [u8], now: Instant) -> io::Result<Turn> {
        if let State::Lingering { until } = self.state {
            return Ok(self.discard_input(scratch, now >= until));
        }
        let mut reads = 0;
        while self.readable && self.state == State::Open && self.pending() < self.max_pending {
            if reads == READS_PER_TURN {
                break;
            }
            match (&self.stream).read(scratch) {
                Ok(0) => {
                    self.readable = false;
                    // A last line without "\n" is still a request.
                    let _ = self.codec.finish(&mut self.out);
                    self.state = State::Finishing {
                        client_closed: true,
                    };
                }
                Ok(n) => {
                    reads += 1;
                    self.bytes_in += n as u64;
                    self.last_active = now;
                    let answered = self.codec.replies();
                    if self.codec.feed(&scratch[..n], &mut self.out).is_err() {
                        // The codec wrote the ERR line; the conversation is over.
                        self.ending.get_or_insert(Ending::LineTooLong);
                        self.end_conversation();
                    }
                    // The clock runs for the line now incomplete: it started in this
                    // read if a line was completed here, else it started earlier.
                    self.line_started = match self.codec.pending_len() {
                        0 => None,
                        _ if self.codec.replies() > answered => Some(now),
                        _ => self.line_started.or(Some(now)),
                    };
                    if self.pending() >= WRITE_AT {
                        self.write_out(now)?;
                    }
                    let streaming_through_stop = self.stopping_grace.is_some()
                        && self.bytes_in - self.bytes_in_at_stop >= STOP_READ_BUDGET;
                    if streaming_through_stop && self.state == State::Open {
                        self.end_conversation();
                    }
                    // A short read emptied the socket: edge-triggered readiness will
                    // report the next input, so the read that would say EAGAIN is saved.
                    if n < scratch.len() && !self.hung_up {
                        self.drained(now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.drained(now),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.write_out(now)?;
        if self.pending() == 0 {
            match self.state {
                State::Finishing {
                    client_closed: true,
                } => return Ok(Turn::Close),
                State::Finishing {
                    client_closed: false,
                } => {
                    self.stream.shutdown_write()?;
                    self.state = State::Lingering {
                        until: now + LINGER,
                    };
                    self.readable = true;
                    return Ok(self.discard_input(scratch, false));
                }
                _ => {}
            }
        }
        let more_input =
            self.readable && self.state == State::Open && self.pending() < self.max_pending;
        Ok(if more_input { Turn::Again } else { Turn::Wait })
    }

    /// The server ends the conversation: no more reading; the replies owed are
    /// written, then the write side is shut down and the connection lingers.
    fn end_conversation(&mut self) {
        self.state = State::Finishing {
            client_closed: false,
        };
    }

    /// No input waits: wait for the next edge, or finish if stopping.
    fn drained(&mut self, now: Instant) {
        self.readable = false;
        if self.stop_is_due(now) {
            self.end_conversation();
        }
    }

    /// While stopping: finish once nothing is half-received, or the grace is over.
    fn stop_is_due(&self, now: Instant) -> bool {
        match self.stopping_grace {
            None => false,
            Some(grace_end) => {
                let waiting_for_a_line = self.bytes_in == 0 || self.codec.pending_len() > 0;
                !waiting_for_a_line || now >= grace_end
            }
        }
    }

    fn write_out(&mut self, now: Instant) -> io::Result<()> {
        while self.written < self.out.len() {
            match (&self.stream).write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.bytes_out += n as u64;
                    self.last_active = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        if self.out.capacity() > KEEP_CAPACITY {
            self.out.shrink_to(KEEP_CAPACITY);
        }
        Ok(())
    }

    fn discard_input(&mut self, scratch: &mut [u8], give_up: bool) -> Turn {
        for _ in 0..READS_PER_TURN {
            match (&self.stream).read(scratch) {
                Ok(0) => return Turn::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return if give_up { Turn::Close } else { Turn::Wait };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Turn::Close,
            }
        }
        if give_up { Turn::Close } else { Turn::Again }
    }

    /// Called about once a second: whether a time limit calls for a turn now (the
    /// connection then closes, finishes or gives up lingering as its state says).
    pub fn is_overdue(&mut self, now: Instant) -> Option<Turn> {
        let exceeded = |since: Instant, limit: Option<Duration>| {
            limit.is_some_and(|limit| now.duration_since(since) >= limit)
        };
        match self.state {
            State::Lingering { until } if now >= until => Some(Turn::Close),
            State::Lingering { .. } => None,
            _ if exceeded(self.last_active, self.idle_timeout) => {
                self.ending.get_or_insert(Ending::IdleTimeout);
                Some(Turn::Close)
            }
            // A line trickling in a byte at a time (slowloris) is not idle, but it
            // must end some time: the replies owed are written, then it is closed.
            State::Open
                if self
                    .line_started
                    .is_some_and(|start| exceeded(start, self.line_timeout)) =>
            {
                self.ending.get_or_insert(Ending::LineTimeout);
                self.end_conversation();
                Some(Turn::Again)
            }
            State::Open if self.stopping_grace.is_some_and(|end| now >= end) => {
                self.readable = true;
                Some(Turn::Again)
            }
            _ => None,
        }
    }
}
