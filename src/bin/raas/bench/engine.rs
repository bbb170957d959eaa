//! One load thread: an edge-triggered epoll loop driving many non-blocking client
//! connections ("slots"), each following the run's [`Mode`].
//!
//! A slot keeps its requests in flight in order, with their send times; a reply is
//! checked by comparing it with the precomputed reversal of its request. Requests
//! outstanding on a connection the server closed are sent again on a new one (a
//! reconnect, not a failure: that is what a graceful stop or rotation asks of a
//! client); refusals, resets, timeouts and wrong replies are counted as failures and
//! never stop the run. The loop is kept cheap because it shares the machine with
//! the server it measures: one clock read per wake-up, no allocation per request,
//! and a short read is taken to mean the socket is drained.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::Socket;

use super::Mode;
use super::payload::Payloads;
use super::stats::{Failure, Stats};
use crate::addr::Addr;
use crate::rng::Rng;

/// Wait before reconnecting after a failure (so a closed port is not hammered).
const RETRY_DELAY: Duration = Duration::from_millis(50);
/// How often request and connect deadlines are checked.
const SCAN_EVERY: Duration = Duration::from_millis(100);
const READ_SCRATCH: usize = 64 * 1024;
/// Bytes of an unfinished reply a slot may hold before the stream is declared garbage.
const MAX_PARTIAL: usize = 1 << 20;
const EVENTS: usize = 1024;

/// What every load thread reads and nobody changes.
pub struct Plan {
    pub addr: Addr,
    pub mode: Mode,
    pub pipeline: usize,
    pub timeout: Duration,
    pub interval: Duration,
    pub start: Instant,
    /// No new request after this.
    pub deadline: Option<Instant>,
    pub payloads: Payloads,
    pub phases: usize,
}

/// What the load threads, the chaos thread and the progress display share.
pub struct Shared {
    pub live_replies: AtomicU64,
    pub live_errors: AtomicU64,
    /// The chaos phase now (0 before the first signal).
    pub phase: AtomicUsize,
    /// Set once every load thread is done.
    pub finished: AtomicBool,
    /// Requests not yet issued, with --requests.
    budget: Option<AtomicU64>,
}

impl Shared {
    pub fn new(requests: Option<u64>) -> Shared {
        Shared {
            live_replies: AtomicU64::new(0),
            live_errors: AtomicU64::new(0),
            phase: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
            budget: requests.map(AtomicU64::new),
        }
    }

    fn budget_left(&self) -> bool {
        self.budget
            .as_ref()
            .is_none_or(|b| b.load(Ordering::Relaxed) > 0)
    }

    fn take_request(&self) -> bool {
        self.budget.as_ref().is_none_or(|b| {
            b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        })
    }
}

/// A request in flight: which payload, and when it was first sent.
#[derive(Clone, Copy)]
struct Req {
    payload: u32,
    sent: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// No socket: waiting for its timer to connect.
    Closed,
    Connecting {
        since: Instant,
    },
    Open,
}

struct Slot {
    socket: Option<Socket>,
    /// Bumped at each close, so a stale epoll event cannot reach the next socket.
    generation: u32,
    conn: Conn,
    /// When this slot's timer is due (the latest scheduled one wins).
    wake_at: Option<Instant>,
    out: Vec<u8>,
    written: usize,
    /// The start of a reply whose end has not arrived.
    partial: Vec<u8>,
    inflight: VecDeque<Req>,
    /// Requests the server closed on before answering, to send first on the next
    /// connection.
    resend: VecDeque<Req>,
    replies_on_conn: u64,
    /// When the current connection's connect began: in connect mode a request's
    /// latency counts from there.
    connect_began: Instant,
    next_payload: usize,
    /// The run is over for this slot.
    done: bool,
}

impl Slot {
    fn new(first_payload: usize, now: Instant) -> Slot {
        Slot {
            socket: None,
            generation: 0,
            conn: Conn::Closed,
            wake_at: None,
            out: Vec::new(),
            written: 0,
            partial: Vec::new(),
            inflight: VecDeque::new(),
            resend: VecDeque::new(),
            replies_on_conn: 0,
            connect_began: now,
            next_payload: first_payload,
            done: false,
        }
    }

    fn busy(&self) -> bool {
        !self.inflight.is_empty() || !self.resend.is_empty()
    }
}

fn token(slot: usize, generation: u32) -> u64 {
    slot as u64 | (u64::from(generation) << 32)
}

/// The failure a socket error counts as.
fn classify(err: &io::Error) -> Failure {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        // A unix socket whose file is gone, or whose backlog is full, refuses too.
        io::ErrorKind::NotFound | io::ErrorKind::WouldBlock => Failure::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => Failure::Reset,
        io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Other,
    }
}

/// Runs one load thread over `slots` connections until the run is over.
pub fn run_thread(
    plan: &Plan,
    shared: &Shared,
    slots: usize,
    index: usize,
) -> Result<Stats, String> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(|e| format!("creating an epoll instance: {e}"))?;
    let pool = plan.payloads.len();
    let mut engine = Engine {
        plan,
        shared,
        epoll,
        slots: (0..slots)
            .map(|i| Slot::new((i * 31 + index * 17) % pool, plan.start))
            .collect(),
        live: slots,
        timers: BinaryHeap::new(),
        stats: Stats::new(plan.phases),
        scratch: vec![0; READ_SCRATCH],
        rng: Rng::from_entropy(index as u64),
        now: Instant::now(),
        phase: 0,
        stopping_since: None,
        published: (0, 0),
    };
    engine.run();
    Ok(engine.stats)
}

struct Engine<'a> {
    plan: &'a Plan,
    shared: &'a Shared,
    epoll: Epoll,
    slots: Vec<Slot>,
    /// Slots not done yet.
    live: usize,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    stats: Stats,
    scratch: Vec<u8>,
    rng: Rng,
    /// The clock, read once per wake-up.
    now: Instant,
    phase: usize,
    /// When no more requests could be issued.
    stopping_since: Option<Instant>,
    /// Replies and errors already added to the shared progress counters.
    published: (u64, u64),
}

impl Engine<'_> {
    fn run(&mut self) {
        self.start_slots();
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let mut next_scan = self.now + SCAN_EVERY;
        loop {
            self.tick();
            if self.stopping_since.is_none() && !self.active() {
                self.stopping_since = Some(self.now);
            }
            if let Some(since) = self.stopping_since {
                self.retire_idle_slots();
                if self.live == 0 {
                    break;
                }
                // Timeouts bound the drain already; this only guards against a bug
                // leaving a slot waiting forever.
                if self.now >= since + self.plan.timeout * 2 + Duration::from_secs(1) {
                    self.abandon_all();
                    break;
                }
            }
            self.fire_timers();
            if self.now >= next_scan {
                self.scan_deadlines();
                next_scan = self.now + SCAN_EVERY;
            }
            self.publish();

            let wait = self.wait_time(next_scan);
            let n = match self.epoll.wait(&mut events, wait) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.stats
                        .other(self.phase, format!("waiting for events: {e}"));
                    self.abandon_all();
                    break;
                }
            };
            // Events are counted in the phase they were seen in, even if the chaos
            // thread moved it while this thread was waiting.
            self.tick();
            for ev in &events[..n] {
                let data = ev.data();
                let (i, generation) = ((data & 0xffff_ffff) as usize, (data >> 32) as u32);
                if self.slots[i].generation == generation && !self.slots[i].done {
                    self.on_event(i, ev.events());
                }
            }
        }
        self.publish();
    }

    /// Reads the clock and the chaos phase.
    fn tick(&mut self) {
        self.now = Instant::now();
        self.phase = self
            .shared
            .phase
            .load(Ordering::Relaxed)
            .min(self.plan.phases - 1);
    }

    /// Requests may still be issued (the budget is only taken when issuing).
    fn active(&self) -> bool {
        self.plan.deadline.is_none_or(|d| self.now < d) && self.shared.budget_left()
    }

    fn may_issue(&self) -> bool {
        self.active() && self.shared.take_request()
    }

    fn start_slots(&mut self) {
        // Idle connections are spread over the first interval (at most a second) so
        // thousands of connects and their first lines do not arrive in one burst.
        let spread = match self.plan.mode {
            Mode::Idle => self.plan.interval.min(Duration::from_secs(1)),
            _ => Duration::ZERO,
        };
        for i in 0..self.slots.len() {
            let at = self.plan.start + spread.mul_f64(self.rng.unit_f64());
            self.schedule(i, at);
        }
    }

    fn schedule(&mut self, i: usize, at: Instant) {
        self.slots[i].wake_at = Some(at);
        self.timers.push(Reverse((at, i)));
    }

    fn wait_time(&self, next_scan: Instant) -> u16 {
        let mut until = next_scan;
        if let Some(Reverse((t, _))) = self.timers.peek() {
            until = until.min(*t);
        }
        if let Some(d) = self.plan.deadline
            && d > self.now
        {
            until = until.min(d);
        }
        // Rounded up, so a timer is not polled for in a busy loop just before it is due.
        let ms = until
            .saturating_duration_since(self.now)
            .as_micros()
            .div_ceil(1000);
        ms.min(SCAN_EVERY.as_millis()) as u16
    }

    fn publish(&mut self) {
        let (replies, errors) = (self.stats.replies, self.stats.errors);
        if replies != self.published.0 {
            self.shared
                .live_replies
                .fetch_add(replies - self.published.0, Ordering::Relaxed);
        }
        if errors != self.published.1 {
            self.shared
                .live_errors
                .fetch_add(errors - self.published.1, Ordering::Relaxed);
        }
        self.published = (replies, errors);
    }

    fn fire_timers(&mut self) {
        while let Some(&Reverse((at, i))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            let slot = &mut self.slots[i];
            if slot.done || slot.wake_at != Some(at) {
                continue; // superseded
            }
            slot.wake_at = None;
            match slot.conn {
                Conn::Closed => self.connect(i),
                Conn::Open => self.idle_send(i),
                Conn::Connecting { .. } => {}
            }
        }
    }

    /// Idle mode: the slot's next line is due.
    fn idle_send(&mut self, i: usize) {
        if self.slots[i].inflight.is_empty() && self.may_issue() {
            self.issue(i);
            self.flush(i);
        }
    }

    fn connect(&mut self, i: usize) {
        if self.stopping_since.is_some() && !self.slots[i].busy() {
            self.finish(i);
            return;
        }
        let (socket, connected) = match self.plan.addr.connect_nonblocking() {
            Ok(pair) => pair,
            Err(e) => return self.connect_failed(i, &e),
        };
        let slot = &mut self.slots[i];
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        if let Err(e) = self
            .epoll
            .add(&socket, EpollEvent::new(flags, token(i, slot.generation)))
        {
            let msg = format!("registering a connection with epoll: {e}");
            self.stats.other(self.phase, msg);
            self.schedule(i, self.now + RETRY_DELAY);
            return;
        }
        slot.socket = Some(socket);
        slot.conn = Conn::Connecting { since: self.now };
        slot.connect_began = self.now;
        slot.replies_on_conn = 0;
        if connected {
            self.on_open(i);
        }
    }

    /// A connect failed: one request fails with it (a request waiting to be sent
    /// again, or a new one), and the slot retries after a pause.
    fn connect_failed(&mut self, i: usize, err: &io::Error) {
        self.close(i);
        if self.slots[i].resend.pop_front().is_none() {
            // Taken from the budget so a run of --requests against a dead server ends.
            let _ = self.shared.take_request();
        }
        self.count_failure(classify(err), 1, err);
        self.retry_later(i);
    }

    fn count_failure(&mut self, kind: Failure, n: u64, err: &io::Error) {
        if kind == Failure::Other {
            self.stats
                .first_other
                .get_or_insert_with(|| err.to_string());
        }
        self.stats.fail(self.phase, kind, n);
    }

    /// After a failure: try again later, or stop when there is nothing left to do.
    fn retry_later(&mut self, i: usize) {
        if self.active() || self.slots[i].busy() {
            self.schedule(i, self.now + RETRY_DELAY);
        } else {
            self.finish(i);
        }
    }

    fn on_event(&mut self, i: usize, flags: EpollFlags) {
        match self.slots[i].conn {
            Conn::Connecting { .. } => {
                let socket = self.slots[i]
                    .socket
                    .as_ref()
                    .expect("connecting slot has a socket");
                match socket.take_error() {
                    Ok(None) if flags.contains(EpollFlags::EPOLLOUT) => self.on_open(i),
                    Ok(None) => {}
                    Ok(Some(e)) | Err(e) => self.connect_failed(i, &e),
                }
            }
            Conn::Open => {
                let generation = self.slots[i].generation;
                let closing = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
                if flags.intersects(EpollFlags::EPOLLIN | closing) {
                    // A close that had already arrived raises no later edge: the
                    // short-read shortcut would miss it, so read to the end.
                    self.on_readable(i, flags.intersects(closing));
                }
                let slot = &self.slots[i];
                if flags.contains(EpollFlags::EPOLLOUT)
                    && slot.generation == generation
                    && slot.conn == Conn::Open
                {
                    self.flush(i);
                }
            }
            Conn::Closed => {}
        }
    }

    fn on_open(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.conn = Conn::Open;
        // Requests the last connection lost go first, keeping their first send time
        // so their latency includes the reconnect.
        while let Some(req) = slot.resend.pop_front() {
            slot.out
                .extend_from_slice(self.plan.payloads.request(req.payload as usize));
            slot.inflight.push_back(req);
        }
        match self.plan.mode {
            Mode::Idle => {
                if slot.inflight.is_empty() {
                    let at = self.now + self.plan.interval.mul_f64(self.rng.unit_f64());
                    self.schedule(i, at);
                }
            }
            Mode::Persist | Mode::Connect => self.fill(i),
        }
        self.flush(i);
    }

    /// Tops the slot's requests in flight up to its depth.
    fn fill(&mut self, i: usize) {
        let depth = match self.plan.mode {
            Mode::Persist => self.plan.pipeline,
            Mode::Connect | Mode::Idle => 1,
        };
        while self.slots[i].inflight.len() < depth && self.may_issue() {
            self.issue(i);
        }
    }

    fn issue(&mut self, i: usize) {
        let pool = self.plan.payloads.len();
        let slot = &mut self.slots[i];
        let p = slot.next_payload;
        slot.next_payload = (p + 1) % pool;
        slot.out.extend_from_slice(self.plan.payloads.request(p));
        let sent = match self.plan.mode {
            Mode::Connect => slot.connect_began,
            Mode::Persist | Mode::Idle => self.now,
        };
        slot.inflight.push_back(Req {
            payload: p as u32,
            sent,
        });
    }

    /// Writes what the slot has unsent, until done or the socket is full.
    fn flush(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(socket) = slot.socket.as_ref() else {
            return;
        };
        let mut socket: &Socket = socket;
        while slot.written < slot.out.len() {
            match socket.write(&slot.out[slot.written..]) {
                Ok(n) => slot.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.connection_failed(i, &e),
            }
        }
        slot.out.clear();
        slot.written = 0;
    }

    /// Reads and matches replies; `to_the_end` reads until EOF or EAGAIN instead of
    /// stopping at a short read.
    fn on_readable(&mut self, i: usize, to_the_end: bool) {
        loop {
            let slot = &mut self.slots[i];
            let Some(socket) = slot.socket.as_ref() else {
                return;
            };
            let mut socket: &Socket = socket;
            match socket.read(&mut self.scratch) {
                Ok(0) => return self.on_eof(i),
                Ok(n) => {
                    if let Err(msg) = self.take_replies(i, n) {
                        let lost = self.slots[i].inflight.len().max(1) as u64;
                        self.stats.first_other.get_or_insert(msg);
                        self.stats.fail(self.phase, Failure::Other, lost);
                        self.slots[i].inflight.clear();
                        self.close(i);
                        return self.retry_later(i);
                    }
                    if n < self.scratch.len() && !to_the_end {
                        break; // drained: the next arrival raises a new edge
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.connection_failed(i, &e),
            }
        }
        self.after_replies(i);
    }

    /// Matches the `n` bytes just read (after any unfinished reply) against the
    /// requests in flight.
    fn take_replies(&mut self, i: usize, n: usize) -> Result<(), String> {
        let Engine {
            slots,
            scratch,
            stats,
            plan,
            now,
            phase,
            ..
        } = self;
        let slot = &mut slots[i];
        let fresh = &scratch[..n];
        let used_before = slot.replies_on_conn;
        let unsolicited = if slot.partial.is_empty() {
            let (used, replies, unsolicited) = match_replies(
                &mut slot.inflight,
                fresh,
                &plan.payloads,
                stats,
                *now,
                *phase,
            );
            slot.partial.extend_from_slice(&fresh[used..]);
            slot.replies_on_conn += replies;
            unsolicited
        } else {
            slot.partial.extend_from_slice(fresh);
            let (used, replies, unsolicited) = match_replies(
                &mut slot.inflight,
                &slot.partial,
                &plan.payloads,
                stats,
                *now,
                *phase,
            );
            slot.partial.drain(..used);
            slot.replies_on_conn += replies;
            unsolicited
        };
        if unsolicited {
            return Err(format!(
                "{} sent data nobody asked for (after {used_before} replies on the connection)",
                plan.addr
            ));
        }
        if slot.partial.len() > MAX_PARTIAL {
            return Err(format!(
                "{} sent over {MAX_PARTIAL} bytes without ending the reply",
                plan.addr
            ));
        }
        Ok(())
    }

    /// What a slot does once its replies are in, by mode.
    fn after_replies(&mut self, i: usize) {
        match self.plan.mode {
            Mode::Persist => {
                self.fill(i);
                self.flush(i);
            }
            Mode::Connect => {
                if self.slots[i].inflight.is_empty() && self.slots[i].replies_on_conn > 0 {
                    // One request per connection: close, and start the next one.
                    self.close(i);
                    if self.active() {
                        self.connect(i);
                    } else {
                        self.finish(i);
                    }
                }
            }
            Mode::Idle => {
                let slot = &self.slots[i];
                if slot.inflight.is_empty() && slot.wake_at.is_none() {
                    self.schedule(i, self.now + self.plan.interval);
                }
            }
        }
    }

    /// The server closed the connection: requests it did not answer are sent again
    /// on a new one.
    fn on_eof(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let unanswered: Vec<Req> = slot.inflight.drain(..).collect();
        // A reply cut short by the close is simply asked for again.
        for req in unanswered.into_iter().rev() {
            slot.resend.push_front(req);
        }
        let fruitless = slot.replies_on_conn == 0;
        self.close(i);
        if self.slots[i].busy() || self.active() {
            self.stats.reconnect(self.phase);
            // Straight back, unless the connection was closed without answering
            // anything: then pause, so a server that only closes is not spun on.
            let delay = if fruitless {
                RETRY_DELAY
            } else {
                Duration::ZERO
            };
            self.schedule(i, self.now + delay);
        } else {
            self.finish(i);
        }
    }

    /// A reset, broken pipe or other error on an open connection: what was in flight
    /// failed with it.
    fn connection_failed(&mut self, i: usize, err: &io::Error) {
        let slot = &mut self.slots[i];
        let lost = (slot.inflight.len() + slot.resend.len()).max(1) as u64;
        slot.inflight.clear();
        slot.resend.clear();
        self.close(i);
        self.count_failure(classify(err), lost, err);
        self.retry_later(i);
    }

    /// Counts requests and connects that took longer than the timeout as failed,
    /// and starts their slots over.
    fn scan_deadlines(&mut self) {
        let timeout = self.plan.timeout;
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.done {
                continue;
            }
            let expired = match slot.conn {
                Conn::Connecting { since } => self.now >= since + timeout,
                Conn::Open => slot
                    .inflight
                    .front()
                    .is_some_and(|r| self.now >= r.sent + timeout),
                Conn::Closed => false,
            };
            if !expired {
                continue;
            }
            let slot = &mut self.slots[i];
            let lost = match slot.conn {
                Conn::Connecting { .. } => {
                    if slot.resend.pop_front().is_none() {
                        let _ = self.shared.take_request();
                    }
                    1
                }
                _ => {
                    let n = slot.inflight.len() as u64;
                    slot.inflight.clear();
                    n
                }
            };
            self.close(i);
            self.stats.fail(self.phase, Failure::Timeout, lost);
            self.retry_later(i);
        }
    }

    /// While stopping: slots with nothing in flight are done.
    fn retire_idle_slots(&mut self) {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if !slot.done && !slot.busy() {
                self.finish(i);
            }
        }
    }

    /// Gives up on everything still in flight, counting it as timed out.
    fn abandon_all(&mut self) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.done {
                continue;
            }
            let lost = (slot.inflight.len() + slot.resend.len()) as u64;
            if lost > 0 {
                self.stats.fail(self.phase, Failure::Timeout, lost);
            }
            self.finish(i);
        }
    }

    /// Closes the slot's connection, if any; what is in flight stays for the caller.
    fn close(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        // Dropping the socket closes it, which also removes it from the epoll set.
        slot.socket = None;
        slot.generation = slot.generation.wrapping_add(1);
        slot.conn = Conn::Closed;
        slot.out.clear();
        slot.written = 0;
        slot.partial.clear();
    }

    fn finish(&mut self, i: usize) {
        self.close(i);
        let slot = &mut self.slots[i];
        slot.inflight.clear();
        slot.resend.clear();
        slot.wake_at = None;
        if !slot.done {
            slot.done = true;
            self.live -= 1;
        }
    }
}

/// Takes the replies at the start of `data`: each must be exactly the expected reply
/// of the oldest request in flight. Returns the bytes used (whole replies only), the
/// replies taken, and whether data came with no request in flight.
fn match_replies(
    inflight: &mut VecDeque<Req>,
    data: &[u8],
    payloads: &Payloads,
    stats: &mut Stats,
    now: Instant,
    phase: usize,
) -> (usize, u64, bool) {
    let mut used = 0;
    let mut replies = 0;
    while used < data.len() {
        let Some(req) = inflight.front() else {
            return (data.len(), replies, true);
        };
        let rest = &data[used..];
        let expected = payloads.reply(req.payload as usize);
        if rest.len() >= expected.len() && rest[..expected.len()] == *expected {
            let latency = now.saturating_duration_since(req.sent).as_micros() as u64;
            stats.reply(phase, latency);
            used += expected.len();
        } else if let Some(end) = rest.iter().position(|&b| b == b'\n') {
            // A whole reply, but not the right one.
            stats.fail(phase, Failure::Mismatch, 1);
            used += end + 1;
        } else {
            break; // the rest of the reply has not arrived
        }
        inflight.pop_front();
        replies += 1;
    }
    (used, replies, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raasd::codec::Unit;

    #[test]
    fn replies_are_matched_in_order_and_mismatches_resync() {
        let payloads = Payloads::generate(4, 5, false, Unit::Graphemes);
        let now = Instant::now();
        let mut inflight: VecDeque<Req> = (0..3)
            .map(|p| Req {
                payload: p,
                sent: now,
            })
            .collect();
        let mut stats = Stats::new(1);
        let mut data = payloads.reply(0).to_vec();
        data.extend_from_slice(b"wrong, and longer\n");
        data.extend_from_slice(&payloads.reply(2)[..3]);
        let (used, replies, unsolicited) =
            match_replies(&mut inflight, &data, &payloads, &mut stats, now, 0);
        assert_eq!((used, replies, unsolicited), (6 + 18, 2, false));
        let t = stats.total();
        assert_eq!((t.replies, t.mismatch), (1, 1));
        assert_eq!(inflight.len(), 1);
        let (used, replies, _) = match_replies(
            &mut inflight,
            payloads.reply(2),
            &payloads,
            &mut stats,
            now,
            0,
        );
        assert_eq!((used, replies), (6, 1));
        let (_, _, unsolicited) =
            match_replies(&mut inflight, b"x\n", &payloads, &mut stats, now, 0);
        assert!(unsolicited);
    }

    #[test]
    fn budget_is_shared_and_runs_out() {
        let shared = Shared::new(Some(2));
        assert!(shared.take_request());
        assert!(shared.budget_left());
        assert!(shared.take_request());
        assert!(!shared.take_request());
        assert!(!shared.budget_left());
        assert!(Shared::new(None).take_request());
    }
}
