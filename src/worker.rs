//! The worker process: one epoll loop serving many clients.
//!
//! Owns everything a worker does after fork: its epoll set (created here, never
//! inherited, since an inherited epoll fd would be one instance shared with the
//! master and every sibling), accepting, serving connections, obeying the control
//! channel and stopping. It never decides anything about other workers.
//!
//! The epoll set holds every listen socket (EPOLLEXCLUSIVE, so one new connection
//! wakes one worker, not all), the control channel, this worker's own signal pipe,
//! and its clients (edge-triggered). EPOLLEXCLUSIVE always wakes the epoll instance
//! nearest the head of the listen socket's wait queue, so a worker that has just
//! accepted re-registers its listener, which moves it to the back of that queue: the
//! next connection wakes another worker and connections spread evenly. Under CPU
//! contention a busy worker is passed over for a sleeping one anyway, so a worker
//! that finds (in the scoreboard) that it holds well above its share of connections
//! also steps back from accepting for a moment.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::accept_gate::{AcceptGate, Nudge, OUT_OF_DESCRIPTORS, should_step_back};
use crate::config::Serving;
use crate::connection::{Connection, Ending, Traffic, Turn};
use crate::control::{Command, Report, WorkerEnd};
use crate::handoff::{self, ClaimOutcome, Incoming, Outgoing, Queue, Settled, Taken};
use crate::listeners::Listener;
use crate::process::Blocked;
use crate::scoreboard::{CellWriter, Counters, Scoreboard, monotonic_ms};
use crate::signals::SignalSet;
use crate::title;

mod life;
mod table;

use life::{Exit, Life};
use table::Table;

const CONTROL: u64 = u64::MAX;
const SIGNALS: u64 = u64::MAX - 1;
const NUDGE: u64 = u64::MAX - 2;
const HANDOFF: u64 = u64::MAX - 3;
/// Listener i has token LISTENERS - i; connection k has token k; the settle socket
/// of outgoing batch b has OUTGOING + b, of incoming claim c INCOMING + c.
const LISTENERS: u64 = u64::MAX - 4;
const OUTGOING: u64 = 1 << 48;
const INCOMING: u64 = 1 << 49;
/// Connections a retiring worker offers per loop pass, and batches a receiver takes
/// per pass: slices small enough that the other clients of both wait a few
/// milliseconds at most while thousands move.
const OFFER_PER_PASS: usize = 2 * handoff::MAX_BATCH;
const TAKE_PER_PASS: usize = 4;
/// Connections a receiver starts serving per pass (settle sockets are
/// level-triggered: a granted batch over the budget is read on the next pass).
const OWN_PER_PASS: usize = 2 * handoff::MAX_BATCH;
/// Connections a retiring worker has out of service (offered, not yet settled) at
/// most: a connection offered waits for its batch's settlement, so the fewer wait in
/// line ahead of it, the shorter its client's pause; those not offered yet are
/// served meanwhile.
const IN_FLIGHT: usize = 8 * handoff::MAX_BATCH;
/// How soon a retiring worker tries again when the hand-over queue was full.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(1);
/// How long a worker whose master died may take to finish.
const ORPHAN_DRAIN: Duration = Duration::from_millis(500);
/// The parent-death signal: it arms an alarm of [`ORPHAN_DEADLINE_SECS`], so an
/// orphaned worker is gone by then even if its loop never runs again. (Not TERM:
/// TERM from systemd means a graceful stop of up to --graceful-timeout.)
const ORPHAN_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR2;
const ORPHAN_DEADLINE_SECS: u32 = 1;
/// How long a stopping worker keeps its listen sockets after draining them, to drain
/// them once more before it closes them: during a stop of the whole server the master
/// has made them drop new handshakes, and a handshake already under way completes in
/// this time; closing the last copy of a listener would reset it.
const LISTENER_GRACE: Duration = Duration::from_millis(100);
const SCRATCH: usize = 64 * 1024;
const EVENTS: usize = 256;

/// The signals a worker answers itself: TERM and QUIT stop it gracefully (as when
/// systemd signals the whole control group), INT quickly (Ctrl-C in a terminal
/// signals the whole process group).
pub const SIGNALS_HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGQUIT, libc::SIGINT];

/// Runs a worker to its end; returns the exit status.
///
/// Signals are blocked on entry (see [`crate::process`]); they are released once this
/// worker's own handlers are installed, so none is lost or taken by the master's.
pub fn run(
    who: Who,
    listeners: Vec<Listener>,
    (nudge, handoff): (Nudge, Option<Queue>),
    control: WorkerEnd,
    serving: Serving,
    (board, cell): (&Scoreboard, usize),
    blocked: Blocked,
) -> i32 {
    match Worker::new(
        who,
        (listeners, nudge, handoff),
        control,
        serving,
        (board, cell),
        blocked,
    )
    .and_then(Worker::serve)
    {
        Ok(()) => 0,
        Err(e) => {
            log::error!("worker failed: {e}");
            1
        }
    }
}

/// Which worker this is (for its title) and whose.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub slot: usize,
    pub generation: u64,
    /// The master that forked it.
    pub master: nix::unistd::Pid,
    /// --name, shown in the title.
    pub name: Option<&'static str>,
}

struct Worker<'a> {
    who: Who,
    cell: CellWriter<'a>,
    tally: Tally,
    epoll: Epoll,
    listeners: Vec<Listener>,
    control: Option<WorkerEnd>,
    signals: SignalSet,
    table: Table<Connection>,
    serving: Serving,
    scratch: Vec<u8>,
    life: Life,
    /// Whether to accept now, for how long a pause lasts, and why.
    gate: AcceptGate,
    /// What is in the epoll set now.
    watching: Watching,
    nudge: Nudge,
    transfers: Transfers,
    title_shown: Option<Instant>,
}

/// This worker's counters over its life.
#[derive(Default)]
struct Tally {
    traffic: Traffic,
    accepted: u64,
    /// Connections taken over from retiring siblings.
    taken_over: u64,
    /// Once retiring by hand-over: connections handed over, and to which generations.
    handed_over: Option<(usize, Vec<u64>)>,
    /// Connections that came back from a hand-over (nobody took them).
    kept: usize,
    replacement_requested: bool,
}

/// Which of the shared sockets are in the epoll set.
#[derive(Default)]
struct Watching {
    listeners: bool,
    queue: bool,
}

/// The hand-over: the queue (None with --handover off), the batches this worker
/// offered (retiring) and those it claimed (in service), each until settled.
struct Transfers {
    queue: Option<Queue>,
    outgoing: Outgoing<Connection>,
    incoming: Incoming,
    /// Connections owned from claims in this loop pass.
    owned_this_pass: usize,
}

impl Transfers {
    fn settling(&self) -> bool {
        !self.outgoing.is_empty() || !self.incoming.is_empty()
    }
}

impl<'a> Worker<'a> {
    fn new(
        who: Who,
        (listeners, nudge, handoff): (Vec<Listener>, Nudge, Option<Queue>),
        control: WorkerEnd,
        serving: Serving,
        (board, cell): (&'a Scoreboard, usize),
        blocked: Blocked,
    ) -> io::Result<Worker<'a>> {
        let cell = board.writer(cell);
        // The loop notices the master's death by its channel's end of file and drains
        // for ORPHAN_DRAIN; the kernel's parent-death signal makes sure the worker is
        // gone even when the loop is wedged. (Set after privileges are dropped, which
        // clears it.) A master that died before this is noticed at once.
        let master = who.master.as_raw();
        crate::signals::exit_soon_when_orphaned(
            ORPHAN_SIGNAL as libc::c_int,
            master,
            ORPHAN_DEADLINE_SECS,
        )?;
        nix::sys::prctl::set_pdeathsig(ORPHAN_SIGNAL)?;
        if nix::unistd::getppid() != who.master {
            nix::unistd::alarm::set(ORPHAN_DEADLINE_SECS);
        }
        let signals = SignalSet::install(&SIGNALS_HANDLED)?;
        blocked.release();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            control.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, CONTROL),
        )?;
        epoll.add(signals.fd(), EpollEvent::new(EpollFlags::EPOLLIN, SIGNALS))?;
        epoll.add(
            nudge.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, NUDGE),
        )?;
        let mut worker = Worker {
            who,
            cell,
            tally: Tally::default(),
            epoll,
            listeners,
            control: Some(control),
            signals,
            table: Table::default(),
            serving,
            scratch: vec![0; SCRATCH],
            life: Life::Serving,
            gate: AcceptGate::default(),
            watching: Watching::default(),
            nudge,
            transfers: Transfers {
                queue: handoff,
                outgoing: Outgoing::default(),
                incoming: Incoming::default(),
                owned_this_pass: 0,
            },
            title_shown: None,
        };
        worker.update_accepting(Instant::now())?;
        // Last of the set-up: from here on the worker may only serve (crate::sandbox).
        crate::sandbox::confine(worker.serving.sandbox)?;
        Ok(worker)
    }

    fn serve(mut self) -> io::Result<()> {
        if let Some(control) = &self.control {
            control.send(Report::Ready)?;
        }
        info!("accepting connections");
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let mut next_tick = Instant::now() + self.serving.heartbeat;
        self.show_progress();
        loop {
            let wake_at = [
                self.gate.paused_until(),
                self.life.deadline(),
                self.life.listeners_close_at(),
                self.transfers.outgoing.next_deadline(),
            ]
            .into_iter()
            .flatten()
            .fold(next_tick, Instant::min);
            let timeout = if self.table.any_again() || self.may_offer_now() {
                Duration::ZERO
            } else if self.transfers.outgoing.has_unsent() {
                // The queue was full: try again soon.
                QUEUE_FULL_RETRY.min(wake_at.saturating_duration_since(Instant::now()))
            } else {
                wake_at.saturating_duration_since(Instant::now())
            };
            let ready = match self.epoll.wait(&mut events, epoll_timeout(timeout)) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now();
            self.transfers.owned_this_pass = 0;
            for event in &events[..ready] {
                self.dispatch(event, now)?;
            }
            let again = self.table.take_again();
            for &index in &again {
                self.serve_connection(index, now);
            }
            self.table.return_again(again);
            if !self.life.in_service() {
                self.go_on_retiring(now)?;
            }
            // Once per pass (relaxed stores, no system call): the console's status and
            // metrics read them.
            self.publish_counters();
            if self.gate.paused_until().is_some() {
                self.update_accepting(now)?;
            }
            if now >= next_tick {
                self.cell.beat(monotonic_ms());
                self.enforce_time_limits(now)?;
                self.show_progress();
                next_tick = now + self.serving.heartbeat;
            }
            if self.life.listeners_close_at().is_some_and(|at| now >= at) {
                self.close_listeners(now);
            }
            self.table.end_of_batch();
            // In service a worker never exits by itself: nothing to weigh.
            if !self.life.in_service() && self.done(now) {
                return Ok(());
            }
        }
    }

    /// Out of service: the next slice of the hand-over, the batches whose time is up,
    /// and the end of the hand-over once all is settled.
    fn go_on_retiring(&mut self, now: Instant) -> io::Result<()> {
        self.offer_a_slice(now)?;
        for settled in self.transfers.outgoing.expire(now) {
            self.settled(settled, now)?;
        }
        self.finish_retiring_if_settled(now);
        Ok(())
    }

    /// Whether the worker may exit now (nothing left, or its deadline), saying why.
    fn done(&self, now: Instant) -> bool {
        let holds_anything =
            self.table.open() > 0 || !self.listeners.is_empty() || self.transfers.settling();
        match self.life.may_exit(now, holds_anything) {
            Exit::No => false,
            Exit::Done => {
                info!("stopped");
                true
            }
            Exit::Deadline => {
                warn!(
                    "stopping with {} still open",
                    crate::logging::plural(
                        (self.table.open()
                            + self.transfers.outgoing.connections()
                            + self.transfers.incoming.connections()) as u64,
                        "connection"
                    )
                );
                true
            }
        }
    }

    fn dispatch(&mut self, event: &EpollEvent, now: Instant) -> io::Result<()> {
        match event.data() {
            SIGNALS => {
                for (signal, _) in self.signals.take() {
                    if signal == libc::SIGINT {
                        quick_exit();
                    }
                    self.stop(now, crate::signals::name(signal))?;
                }
            }
            CONTROL => self.obey_master(now)?,
            NUDGE => self.take_nudge(now)?,
            HANDOFF => self.take_over(now)?,
            token if token > LISTENERS - self.listeners.len() as u64 => {
                self.accept_from((LISTENERS - token) as usize, now)?;
            }
            token if token >= INCOMING => {
                if self.transfers.owned_this_pass >= OWN_PER_PASS {
                    return Ok(()); // level-triggered: the next pass reads it
                }
                let outcome = self
                    .transfers
                    .incoming
                    .on_ready((token - INCOMING) as usize);
                if let ClaimOutcome::Own(parcels) = outcome {
                    self.own_taken_over(parcels, now)?;
                }
            }
            token if token >= OUTGOING => {
                if let Some(settled) = self
                    .transfers
                    .outgoing
                    .on_ready((token - OUTGOING) as usize)
                {
                    self.settled(settled, now)?;
                }
            }
            index => {
                let index = index as usize;
                if let Some(connection) = self.table.get_mut(index) {
                    let flags = event.events();
                    let hung_up =
                        EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
                    if flags.intersects(EpollFlags::EPOLLIN | hung_up) {
                        connection.mark_readable(flags.intersects(hung_up));
                    }
                    self.serve_connection(index, now);
                }
            }
        }
        Ok(())
    }

    fn obey_master(&mut self, now: Instant) -> io::Result<()> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        let received = control.receive();
        for command in received.messages {
            match command {
                Command::QuickStop => quick_exit(),
                Command::GracefulStop => self.stop(now, "the master's request")?,
                Command::HandOver => self.retire(now)?,
                Command::LogTo(log, file) => {
                    // The master reopened it (USR1): a sandboxed worker cannot open files.
                    crate::logging::adopt(log, file);
                    info!("{} reopened", log.name());
                }
            }
        }
        if received.closed {
            // Level-triggered EOF would wake us forever: stop watching the channel.
            if let Some(control) = self.control.take() {
                let _ = self.epoll.delete(control.as_fd());
            }
            warn!("the master is gone");
            // Whatever happens to the loop now, the process ends in time.
            nix::unistd::alarm::set(ORPHAN_DEADLINE_SECS);
            self.stop(now, "the master's death")?;
            // Orphans must not hold the port for long: answer what was read, then go.
            if let Life::Stopping { deadline, .. } = &mut self.life {
                *deadline = (*deadline).min(now + ORPHAN_DRAIN);
            }
        }
        Ok(())
    }

    /// Puts the listeners in the poll set or takes them out, as accepting now calls
    /// for: not while stopping, not while out of descriptors (a listener that stays
    /// readable would spin the loop), not at --max-conns (so siblings accept instead).
    /// The hand-over queue is watched while in service and not stepped back: a
    /// connection handed over is not a new one, so --max-conns does not refuse it.
    fn update_accepting(&mut self, now: Instant) -> io::Result<()> {
        // A step back ends early once the siblings have caught up (a burst reached
        // them too): no need to wait.
        let (cell, mine) = (&self.cell, self.table.open() as u64);
        self.gate.resume_if_due(now, || {
            should_step_back(mine, cell.siblings_load(monotonic_ms()))
        });
        self.gate
            .set_full(self.table.open() >= self.serving.max_conns);
        self.cell.set_accept_state(
            !self.gate.is_stopping(),
            self.gate.accepts_from_ms(now, monotonic_ms()),
        );
        let wanted = self.gate.wants_listeners();
        if wanted != self.watching.listeners {
            self.watching.listeners = wanted;
            for (which, listener) in self.listeners.iter().enumerate() {
                if wanted {
                    self.epoll.add(listener.as_fd(), listener_interest(which))?;
                } else {
                    let _ = self.epoll.delete(listener.as_fd());
                }
            }
        }
        let takes = self.life.in_service() && !self.gate.stepped_back();
        if let Some(queue) = &self.transfers.queue
            && takes != self.watching.queue
        {
            self.watching.queue = takes;
            if takes {
                let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                self.epoll
                    .add(queue.rx(), EpollEvent::new(interest, HANDOFF))?;
            } else {
                let _ = self.epoll.delete(queue.rx());
            }
        }
        Ok(())
    }

    /// Accepts until the queue is empty or this worker is full.
    fn accept_from(&mut self, which: usize, now: Instant) -> io::Result<()> {
        let mut accepted = 0;
        while self.table.open() < self.serving.max_conns {
            match self.listeners[which].accept() {
                Ok(stream) => {
                    self.add_connection(Connection::new(stream, &self.serving, now))?;
                    accepted += 1;
                    // In a burst, stop at the share rather than drain the whole queue,
                    // and wake a sibling to take the rest.
                    if !self.gate.is_stopping() && self.holds_more_than_its_share() {
                        self.gate.step_back(now);
                        self.nudge.poke();
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    self.pause_accepting(now, &e);
                    break;
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    break;
                }
            }
        }
        self.tally.accepted += accepted;
        self.update_accepting(now)?;
        if accepted > 0 && self.watching.listeners {
            // To the back of the wait queue: the next connection wakes a sibling.
            let listener = &self.listeners[which];
            self.epoll.delete(listener.as_fd())?;
            self.epoll.add(listener.as_fd(), listener_interest(which))?;
        }
        Ok(())
    }

    /// EPOLLEXCLUSIVE wakes one worker for a burst, and under load a sleeping worker
    /// before a busy one, so one worker can collect far more connections than its
    /// siblings; [`should_step_back`] says when it holds more than its share.
    fn holds_more_than_its_share(&self) -> bool {
        should_step_back(
            self.table.open() as u64,
            self.cell.siblings_load(monotonic_ms()),
        )
    }

    fn pause_accepting(&mut self, now: Instant, error: &io::Error) {
        if self.gate.pause_for_descriptors(now) {
            warn!("cannot accept: {error}; pausing accepts for {OUT_OF_DESCRIPTORS:?}");
        }
    }

    /// Takes a few of the batches retiring workers handed over (the rest wait for
    /// the next pass: the queue is level-triggered), and claims each: it is served
    /// once its sender grants it ([`Worker::own_taken_over`]). Over its share, this
    /// worker steps back and nudges a sibling to take the rest.
    fn take_over(&mut self, now: Instant) -> io::Result<()> {
        for _ in 0..TAKE_PER_PASS {
            if !self.life.in_service() || self.gate.stepped_back() {
                break;
            }
            let Some(queue) = &self.transfers.queue else {
                break;
            };
            match self.transfers.incoming.take(queue, self.who.generation) {
                Ok(Taken::Claimed(key)) => {
                    let fd = self
                        .transfers
                        .incoming
                        .settle_fd(key)
                        .expect("just claimed");
                    let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
                    if let Err(e) = self
                        .epoll
                        .add(fd, EpollEvent::new(interest, INCOMING + key as u64))
                    {
                        // Without a wake-up for it, settle it now: the answer may be
                        // there already; if not, this claim waits for the next one.
                        warn!("cannot watch a hand-over settlement: {e}");
                    }
                }
                Ok(Taken::Refused) => warn!("refused a hand-over batch it could not read"),
                Ok(Taken::Empty) => break,
                Err(e) => {
                    warn!("cannot take handed-over connections: {e}");
                    break;
                }
            }
            if self.holds_more_than_its_share() {
                self.gate.step_back(now);
                self.nudge.poke();
                self.update_accepting(now)?;
                break;
            }
        }
        Ok(())
    }

    /// A batch this worker claimed is its own now: serve it.
    fn own_taken_over(&mut self, parcels: Vec<handoff::Parcel>, now: Instant) -> io::Result<()> {
        let took = parcels.len();
        self.transfers.owned_this_pass += took;
        // Claimed before this worker began to retire: they go on with the rest.
        if let Life::Retiring { cursor, .. } = &mut self.life {
            *cursor = 0;
        }
        for parcel in parcels {
            self.add_connection(Connection::resume(parcel, &self.serving, now))?;
        }
        if took == 0 {
            return Ok(());
        }
        self.tally.taken_over += took as u64;
        let max = self.serving.max_conns;
        if self.table.open() > max {
            info!(
                "took over {} (now {} open, above --max-conns {max}: they are not new ones)",
                crate::logging::plural(took as u64, "connection"),
                self.table.open()
            );
        } else {
            info!(
                "took over {}",
                crate::logging::plural(took as u64, "connection")
            );
        }
        self.update_accepting(now)?;
        self.title_shown = None;
        Ok(())
    }

    /// Retires by handing its connections over to the workers that stay: out of
    /// service first (no accepting, no taking over), then the connections are
    /// offered a slice per loop pass ([`Worker::offer_a_slice`]) while the rest are
    /// served; what nobody takes, and what cannot travel (a client that closed, a
    /// conversation ending), is served to its end here.
    fn retire(&mut self, now: Instant) -> io::Result<()> {
        if self.transfers.queue.is_none() {
            return self.stop(now, "the master's request");
        }
        if !self.life.retire(now, self.serving.graceful_timeout) {
            return Ok(());
        }
        info!("retiring: handing my connections over");
        self.gate.stop();
        self.update_accepting(now)?;
        let _ = self.epoll.delete(self.nudge.as_fd());
        self.listeners.clear();
        self.title_shown = None;
        Ok(())
    }

    /// Whether a retiring worker has connections it has not looked at yet.
    fn more_to_offer(&self) -> bool {
        matches!(self.life, Life::Retiring { cursor, .. } if cursor < self.table.capacity())
    }

    /// Whether it may offer more now: more to offer, and room in flight.
    fn may_offer_now(&self) -> bool {
        // As `offer_a_slice` decides: nothing is offered while the queue is full
        // (that waits QUEUE_FULL_RETRY, not a busy pass).
        self.more_to_offer()
            && !self.transfers.outgoing.has_unsent()
            && self.transfers.outgoing.connections() < IN_FLIGHT
    }

    /// Offers the next [`OFFER_PER_PASS`] connections that can travel, in batches,
    /// and sends what the queue takes.
    fn offer_a_slice(&mut self, now: Instant) -> io::Result<()> {
        let Life::Retiring { cursor, deadline } = self.life else {
            return Ok(());
        };
        if self.transfers.queue.is_none() {
            return Ok(());
        }
        let mut index = cursor;
        let mut batch: Vec<Connection> = Vec::new();
        let mut offered = 0;
        // Not while the queue is full: what is offered waits out of service.
        while !self.transfers.outgoing.has_unsent()
            && offered < OFFER_PER_PASS
            && self.transfers.outgoing.connections() + batch.len() < IN_FLIGHT
            && index < self.table.capacity()
        {
            let travels = self.table.get_mut(index).is_some_and(|c| c.can_travel(now));
            if travels {
                let connection = self.table.remove(index).expect("present");
                // Out of our epoll set before the batch goes: the receiver's copy
                // shares the open file, so our registration would follow it.
                let _ = self.epoll.delete(connection.stream().as_fd());
                batch.push(connection);
                offered += 1;
            }
            index += 1;
            if batch.len() == handoff::MAX_BATCH {
                self.offer_batch(std::mem::take(&mut batch), now)?;
            }
        }
        if !batch.is_empty() {
            self.offer_batch(batch, now)?;
        }
        self.life = Life::Retiring {
            cursor: index,
            deadline,
        };
        let queue = self.transfers.queue.as_ref().expect("checked above");
        let (sent, failed) = self.transfers.outgoing.send_pending(queue, now);
        for key in sent {
            let fd = self.transfers.outgoing.settle_fd(key).expect("just sent");
            let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
            if let Err(e) = self
                .epoll
                .add(fd, EpollEvent::new(interest, OUTGOING + key as u64))
            {
                // Its deadline still settles it.
                warn!("cannot watch a hand-over settlement: {e}");
            }
        }
        for settled in failed {
            self.settled(settled, now)?;
        }
        Ok(())
    }

    fn offer_batch(&mut self, batch: Vec<Connection>, now: Instant) -> io::Result<()> {
        match self.transfers.outgoing.offer(batch, now) {
            Ok(()) => Ok(()),
            Err((items, e)) => {
                warn!("hand-over: cannot make a socketpair: {e}; serving a batch here");
                self.keep(items, now)
            }
        }
    }

    /// A batch this worker offered is settled.
    fn settled(&mut self, settled: Settled<Connection>, now: Instant) -> io::Result<()> {
        match settled {
            Settled::Taken { items, generation } => {
                if crate::logging::access_log_enabled() {
                    for connection in &items {
                        log_access(connection, Ending::HandedOver);
                    }
                }
                // Our copies close here; the receiver's live on.
                let count = items.len();
                drop(items);
                let (total, to) = self.tally.handed_over.get_or_insert_with(Default::default);
                *total += count;
                if !to.contains(&generation) {
                    to.push(generation);
                    to.sort_unstable();
                }
                self.title_shown = None;
                Ok(())
            }
            Settled::Kept(connections) => self.keep(connections, now),
        }
    }

    /// Connections nobody took: served here to their end (or stopped with the rest
    /// if a stop has begun).
    fn keep(&mut self, connections: Vec<Connection>, _now: Instant) -> io::Result<()> {
        self.tally.kept += connections.len();
        for mut connection in connections {
            connection.stay_here();
            self.add_connection(connection)?;
        }
        Ok(())
    }

    /// Once every connection was offered and every batch settled: says how the
    /// hand-over went, and serves what stayed to its end.
    fn finish_retiring_if_settled(&mut self, _now: Instant) {
        if !matches!(self.life, Life::Retiring { .. })
            || self.more_to_offer()
            || self.transfers.settling()
        {
            return;
        }
        self.life.finish_retiring();
        let (taken, to) = self.tally.handed_over.clone().unwrap_or_default();
        let to: Vec<String> = to.iter().map(u64::to_string).collect();
        let kept = self.tally.kept;
        if taken == 0 && kept == 0 {
            info!("no connection to hand over");
        } else if kept == 0 {
            info!(
                "handed over {} to gen {}",
                crate::logging::plural(taken as u64, "connection"),
                to.join(", ")
            );
        } else {
            warn!(
                "handed over {} to gen {}; {kept} of {} not taken in time, served here to their end",
                crate::logging::plural(taken as u64, "connection"),
                if to.is_empty() {
                    "-".to_string()
                } else {
                    to.join(", ")
                },
                taken + kept
            );
        }
        // What stayed is served to its end, not cut short as a stop would.
        info!("stopping gracefully on hand-over");
        self.cell.set_connections(self.table.open() as u64);
        self.title_shown = None;
        self.show_progress();
    }

    /// A sibling stepped back from a burst: take what is left in the accept queues.
    fn take_nudge(&mut self, now: Instant) -> io::Result<()> {
        self.nudge.drain();
        self.update_accepting(now)?;
        if self.gate.wants_listeners() {
            for which in 0..self.listeners.len() {
                self.accept_from(which, now)?;
            }
        }
        if self.watching.queue {
            self.take_over(now)?;
        }
        Ok(())
    }

    fn add_connection(&mut self, mut connection: Connection) -> io::Result<()> {
        let index = self.table.vacant();
        let interest = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        if let Err(e) = self.epoll.add(
            connection.stream().as_fd(),
            EpollEvent::new(interest, index as u64),
        ) {
            warn!("cannot watch a new connection: {e}");
            return Ok(());
        }
        if self.life.is_stopping() {
            connection.stop(Instant::now());
        }
        self.table.insert_at(index, connection);
        self.cell.set_connections(self.table.open() as u64);
        debug!("accepted a connection ({} open)", self.table.open());
        Ok(())
    }

    fn serve_connection(&mut self, index: usize, now: Instant) {
        let Some(connection) = self.table.get_mut(index) else {
            return;
        };
        let before = connection.traffic();
        let turn = connection.serve(&mut self.scratch, now);
        let traffic = connection.traffic() - before;
        self.count(traffic);
        match turn {
            Turn::Wait => {}
            Turn::Again => self.table.again(index),
            Turn::Close => self.close(index),
        }
    }

    fn count(&mut self, traffic: Traffic) {
        let tally = &mut self.tally;
        tally.traffic.served += traffic.served;
        tally.traffic.bytes_in += traffic.bytes_in;
        tally.traffic.bytes_out += traffic.bytes_out;
        let limit_reached = self
            .serving
            .max_requests
            .is_some_and(|max| tally.traffic.served >= max);
        if limit_reached && !tally.replacement_requested {
            tally.replacement_requested = true;
            info!(
                "served {} requests; asking to be replaced",
                tally.traffic.served
            );
            if let Some(control) = &self.control {
                let _ = control.send(Report::ReplaceMe);
            }
        }
    }

    /// This worker's counters, in its scoreboard cell.
    fn publish_counters(&self) {
        self.cell.publish(&Counters {
            connections: self.table.open() as u64,
            accepted: self.tally.accepted,
            served: self.tally.traffic.served,
            bytes_in: self.tally.traffic.bytes_in,
            bytes_out: self.tally.traffic.bytes_out,
            taken_over: self.tally.taken_over,
        });
    }

    /// Publishes the counters for the master and shows them in the title: memory
    /// writes only, no system call.
    fn show_progress(&mut self) {
        self.publish_counters();
        let now = Instant::now();
        if self
            .title_shown
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        self.title_shown = Some(now);
        let (slot, generation) = (self.who.slot, self.who.generation);
        let mut text = format!(
            "raasd worker[{slot}]{} gen {generation}: {} conns, {} requests",
            title::name_part(self.who.name),
            self.table.open(),
            self.tally.traffic.served
        );
        if self.tally.taken_over > 0 {
            text += &format!(", took over {}", self.tally.taken_over);
        }
        if let Some((count, to)) = &self.tally.handed_over {
            let to: Vec<String> = to.iter().map(u64::to_string).collect();
            text += &format!(", handed over {count} to gen {}", to.join(","));
        }
        title::set(&text);
    }

    fn close(&mut self, index: usize) {
        // Closing the socket removes it from the epoll set: it is never duplicated.
        if let Some(connection) = self.table.remove(index) {
            if crate::logging::access_log_enabled() {
                log_access(&connection, connection.ending());
            }
            self.cell.set_connections(self.table.open() as u64);
            if !self.watching.listeners && self.table.open() + 1 == self.serving.max_conns {
                let _ = self.update_accepting(Instant::now());
            }
        }
    }

    fn enforce_time_limits(&mut self, now: Instant) -> io::Result<()> {
        self.update_accepting(now)?;
        for index in 0..self.table.capacity() {
            let Some(connection) = self.table.get_mut(index) else {
                continue;
            };
            match connection.is_overdue(now) {
                Some(Turn::Close) => self.close(index),
                Some(_) => self.serve_connection(index, now),
                None => {}
            }
        }
        Ok(())
    }

    /// Graceful stop: take what waits in the accept queue, close the listeners, then
    /// answer every client what it has sent and close it. Batches on their way keep
    /// settling; what comes back or is granted is stopped the same way.
    fn stop(&mut self, now: Instant, why: &str) -> io::Result<()> {
        let graceful = self.serving.graceful_timeout;
        if !self.life.stop(now, graceful, LISTENER_GRACE) {
            return Ok(());
        }
        info!("stopping gracefully on {why}");
        self.gate.stop();
        // A nudge woken here would be lost to the siblings that still serve.
        let _ = self.epoll.delete(self.nudge.as_fd());
        self.drain_accept_queues(now);
        self.update_accepting(now)?;
        for index in 0..self.table.capacity() {
            if let Some(connection) = self.table.get_mut(index) {
                connection.stop(now);
                self.serve_connection(index, now);
            }
        }
        Ok(())
    }
}

impl Worker<'_> {
    /// Accepts what waits in the accept queues (while stopping: to serve it).
    fn drain_accept_queues(&mut self, now: Instant) {
        for which in 0..self.listeners.len() {
            if let Err(e) = self.accept_from(which, now) {
                warn!("draining the accept queue: {e}");
            }
        }
    }

    /// The last drain of the listen sockets of a stopping worker, then their close.
    fn close_listeners(&mut self, now: Instant) {
        self.drain_accept_queues(now);
        self.listeners.clear();
        self.life.listeners_closed();
    }
}

/// The access log's line for a connection that ends here.
fn log_access(connection: &Connection, ending: Ending) {
    let peer = match connection.stream() {
        crate::listeners::Stream::Tcp(s) => {
            s.peer_addr().map_or("?".to_string(), |a| a.to_string())
        }
        crate::listeners::Stream::Unix(_) => "unix".to_string(),
    };
    let traffic = connection.traffic();
    crate::logging::access(&crate::logging::Access {
        peer: &peer,
        duration_ms: connection.opened.elapsed().as_millis() as u64,
        requests: traffic.served,
        bytes_received: traffic.bytes_in,
        bytes_sent: traffic.bytes_out,
        end: ending.name(),
    });
}

fn listener_interest(which: usize) -> EpollEvent {
    EpollEvent::new(
        EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
        LISTENERS - which as u64,
    )
}

fn epoll_timeout(timeout: Duration) -> EpollTimeout {
    // Round up, so a wait for 0.4 ms is not a busy loop of zero-timeout waits.
    let millis = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128);
    EpollTimeout::try_from(millis as i32).unwrap_or(EpollTimeout::NONE)
}

fn quick_exit() -> ! {
    info!("quick stop");
    std::process::exit(0)
}
