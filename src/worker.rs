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
use crate::handoff::{self, Queue};
use crate::listeners::Listener;
use crate::process::Blocked;
use crate::scoreboard::{CellWriter, Counters, Scoreboard, monotonic_ms};
use crate::signals::SignalSet;
use crate::title;

const CONTROL: u64 = u64::MAX;
const SIGNALS: u64 = u64::MAX - 1;
const NUDGE: u64 = u64::MAX - 2;
const HANDOFF: u64 = u64::MAX - 3;
/// Listener i has token LISTENERS - i; connection k has token k.
const LISTENERS: u64 = u64::MAX - 4;
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
    /// Totals over every connection this worker has served.
    traffic: Traffic,
    accepted: u64,
    replacement_requested: bool,
    epoll: Epoll,
    listeners: Vec<Listener>,
    control: Option<WorkerEnd>,
    signals: SignalSet,
    connections: Vec<Option<Connection>>,
    /// Free connection slots, and slots freed during the current batch of events
    /// (reused only after it, so a stale event in the batch cannot reach a new client).
    free: Vec<usize>,
    released: Vec<usize>,
    /// Connections that used up their turn with input still waiting.
    again: Vec<usize>,
    again_spare: Vec<usize>,
    open: usize,
    serving: Serving,
    scratch: Vec<u8>,
    /// Set once stopping: the moment the worker exits even with clients left.
    stop_deadline: Option<Instant>,
    /// While stopping: when the listen sockets get their last drain and are closed.
    listeners_close_at: Option<Instant>,
    /// The listeners are in the poll set.
    accepting: bool,
    /// The pause is a step back (over its share), which ends early once the share
    /// has caught up; a pause for want of descriptors does not.
    gate: AcceptGate,
    nudge: Nudge,
    /// Where connections of retiring siblings arrive, and where this worker's go
    /// when it retires (None with --handover off).
    handoff: Option<Queue>,
    /// Connections taken over from retiring siblings.
    taken_over: u64,
    /// Once retiring by hand-over: connections handed over, and to which generations.
    handed_over: Option<(usize, Vec<u64>)>,
    title_shown: Option<Instant>,
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
            traffic: Traffic::default(),
            accepted: 0,
            replacement_requested: false,
            epoll,
            listeners,
            control: Some(control),
            signals,
            connections: Vec::new(),
            free: Vec::new(),
            released: Vec::new(),
            again: Vec::new(),
            again_spare: Vec::new(),
            open: 0,
            serving,
            scratch: vec![0; SCRATCH],
            stop_deadline: None,
            listeners_close_at: None,
            accepting: false,
            gate: AcceptGate::default(),
            nudge,
            handoff,
            taken_over: 0,
            handed_over: None,
            title_shown: None,
        };
        worker.update_accepting(Instant::now())?;
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
                self.stop_deadline,
                self.listeners_close_at,
            ]
            .into_iter()
            .flatten()
            .fold(next_tick, Instant::min);
            let timeout = if self.again.is_empty() {
                wake_at.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let ready = match self.epoll.wait(&mut events, epoll_timeout(timeout)) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now();
            for event in &events[..ready] {
                self.dispatch(event, now)?;
            }
            // Swapped with a spare list, so no allocation per pass.
            let mut again =
                std::mem::replace(&mut self.again, std::mem::take(&mut self.again_spare));
            for index in again.drain(..) {
                self.serve_connection(index, now);
            }
            self.again_spare = again;
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
            if self.listeners_close_at.is_some_and(|at| now >= at) {
                self.close_listeners(now);
            }
            self.free.append(&mut self.released);
            if let Some(deadline) = self.stop_deadline {
                if self.open == 0 && self.listeners.is_empty() {
                    info!("stopped");
                    return Ok(());
                }
                if now >= deadline {
                    warn!(
                        "stopping with {} still open",
                        crate::logging::plural(self.open as u64, "connection")
                    );
                    return Ok(());
                }
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
            index => {
                let index = index as usize;
                if let Some(Some(connection)) = self.connections.get_mut(index) {
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
                Command::HandOver => self.hand_over_and_stop(now)?,
                Command::ReopenLogs => match crate::logging::reopen(None) {
                    Ok(()) => info!("log file reopened"),
                    Err(e) => {
                        // Also where the operator who sent USR1 may be looking.
                        eprintln!(
                            "raasd: worker[{}]: {e}; still logging to the old file",
                            self.who.slot
                        );
                        warn!("{e}; still logging to the old file");
                    }
                },
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
            self.stop_deadline = self.stop_deadline.map(|d| d.min(now + ORPHAN_DRAIN));
        }
        Ok(())
    }

    /// Puts the listeners in the poll set or takes them out, as accepting now calls
    /// for: not while stopping, not while out of descriptors (a listener that stays
    /// readable would spin the loop), not at --max-conns (so siblings accept instead).
    fn update_accepting(&mut self, now: Instant) -> io::Result<()> {
        // A step back ends early once the siblings have caught up (a burst reached
        // them too): no need to wait.
        let (cell, mine) = (&self.cell, self.open as u64);
        self.gate.resume_if_due(now, || {
            should_step_back(mine, cell.siblings_load(monotonic_ms()))
        });
        self.gate.set_full(self.open >= self.serving.max_conns);
        self.cell.set_accept_state(
            !self.gate.is_stopping(),
            self.gate.accepts_from_ms(now, monotonic_ms()),
        );
        let wanted = self.gate.wants_listeners();
        if wanted != self.accepting {
            self.accepting = wanted;
            for (which, listener) in self.listeners.iter().enumerate() {
                if wanted {
                    self.epoll.add(listener.as_fd(), listener_interest(which))?;
                } else {
                    let _ = self.epoll.delete(listener.as_fd());
                }
            }
            // Connections handed over are taken on the same terms as new ones.
            if let Some(queue) = &self.handoff {
                if wanted {
                    let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                    self.epoll
                        .add(queue.rx(), EpollEvent::new(interest, HANDOFF))?;
                } else {
                    let _ = self.epoll.delete(queue.rx());
                }
            }
        }
        Ok(())
    }

    /// Accepts until the queue is empty or this worker is full.
    fn accept_from(&mut self, which: usize, now: Instant) -> io::Result<()> {
        let mut accepted = 0;
        while self.open < self.serving.max_conns {
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
        self.accepted += accepted;
        self.update_accepting(now)?;
        if accepted > 0 && self.accepting {
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
        should_step_back(self.open as u64, self.cell.siblings_load(monotonic_ms()))
    }

    fn pause_accepting(&mut self, now: Instant, error: &io::Error) {
        if self.gate.pause_for_descriptors(now) {
            warn!("cannot accept: {error}; pausing accepts for {OUT_OF_DESCRIPTORS:?}");
        }
    }

    /// Takes the batches retiring workers handed over, while this worker accepts and
    /// holds no more than its share (then a sibling is nudged to take the rest).
    fn take_over(&mut self, now: Instant) -> io::Result<()> {
        let mut took = 0;
        while self.gate.wants_listeners() {
            let Some(queue) = &self.handoff else {
                break;
            };
            let parcels = match handoff::receive(queue, self.who.generation) {
                Ok(handoff::Received::Batch(parcels)) => parcels,
                Ok(handoff::Received::Empty) => break,
                Err(e) => {
                    warn!("cannot take handed-over connections: {e}");
                    break;
                }
            };
            for parcel in parcels {
                self.add_connection(Connection::resume(parcel, &self.serving, now))?;
                took += 1;
            }
            self.update_accepting(now)?;
            if self.holds_more_than_its_share() {
                self.gate.step_back(now);
                self.nudge.poke();
                self.update_accepting(now)?;
                break;
            }
        }
        if took > 0 {
            self.taken_over += took;
            info!("took over {}", crate::logging::plural(took, "connection"));
            self.title_shown = None;
            self.show_progress();
        }
        Ok(())
    }

    /// Retires by handing every connection it can over to the workers that stay:
    /// out of service first (no accepting, no taking over), then each connection is
    /// flushed and offered with its state; what nobody takes, and what cannot travel
    /// (a client that closed, a conversation ending), is served to its end here.
    fn hand_over_and_stop(&mut self, now: Instant) -> io::Result<()> {
        if self.gate.is_stopping() {
            return Ok(());
        }
        let Some(queue) = self.handoff.take() else {
            return self.stop(now, "the master's request");
        };
        info!("retiring: handing my connections over");
        self.gate.stop();
        self.update_accepting(now)?;
        let _ = self.epoll.delete(queue.rx());
        let _ = self.epoll.delete(self.nudge.as_fd());
        self.listeners.clear();
        let mut parcels = Vec::new();
        for index in 0..self.connections.len() {
            let travels = match self.connections[index].as_mut() {
                Some(connection) => connection.can_travel(now),
                None => continue,
            };
            if travels && let Some(connection) = self.connections[index].take() {
                if crate::logging::access_log_enabled() {
                    log_access(&connection, Ending::HandedOver);
                }
                let parcel = connection.into_parcel();
                // Out of our epoll set before our copy closes: the receiver's copy
                // shares the open file, so a close alone would leave it registered.
                let _ = self.epoll.delete(parcel.stream.as_fd());
                self.open -= 1;
                self.released.push(index);
                parcels.push(parcel);
            }
        }
        let offered = parcels.len();
        let outcome = handoff::hand_over(&queue, parcels);
        let back = outcome.back.len();
        let mut generations = outcome.generations.clone();
        generations.sort_unstable();
        let to: Vec<String> = generations.iter().map(u64::to_string).collect();
        if offered == 0 {
            info!("no connection to hand over");
        } else if back == 0 {
            info!(
                "handed over {} to gen {}",
                crate::logging::plural(outcome.taken as u64, "connection"),
                to.join(", ")
            );
        } else {
            warn!(
                "handed over {} to gen {}; {back} of {offered} not taken in time, served here to their end",
                crate::logging::plural(outcome.taken as u64, "connection"),
                if to.is_empty() {
                    "-".to_string()
                } else {
                    to.join(", ")
                }
            );
        }
        self.handed_over = Some((outcome.taken, generations));
        for parcel in outcome.back {
            self.add_connection(Connection::resume(parcel, &self.serving, now))?;
        }
        self.cell.set_connections(self.open as u64);
        self.title_shown = None;
        self.show_progress();
        self.stop(now, "hand-over")
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
        Ok(())
    }

    fn add_connection(&mut self, connection: Connection) -> io::Result<()> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.connections.push(None);
                self.connections.len() - 1
            }
        };
        let interest = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        if let Err(e) = self.epoll.add(
            connection.stream().as_fd(),
            EpollEvent::new(interest, index as u64),
        ) {
            self.released.push(index);
            warn!("cannot watch a new connection: {e}");
            return Ok(());
        }
        let stopping = self.stop_deadline.is_some();
        let slot = &mut self.connections[index];
        *slot = Some(connection);
        if stopping {
            slot.as_mut().expect("just set").stop(Instant::now());
        }
        self.open += 1;
        self.cell.set_connections(self.open as u64);
        debug!("accepted a connection ({} open)", self.open);
        Ok(())
    }

    fn serve_connection(&mut self, index: usize, now: Instant) {
        let Some(connection) = self.connections[index].as_mut() else {
            return;
        };
        let before = connection.traffic();
        let turn = connection.serve(&mut self.scratch, now);
        let traffic = connection.traffic() - before;
        self.count(traffic);
        match turn {
            Turn::Wait => {}
            Turn::Again => self.again.push(index),
            Turn::Close => self.close(index),
        }
    }

    fn count(&mut self, traffic: Traffic) {
        self.traffic.served += traffic.served;
        self.traffic.bytes_in += traffic.bytes_in;
        self.traffic.bytes_out += traffic.bytes_out;
        let limit_reached = self
            .serving
            .max_requests
            .is_some_and(|max| self.traffic.served >= max);
        if limit_reached && !self.replacement_requested {
            self.replacement_requested = true;
            info!(
                "served {} requests; asking to be replaced",
                self.traffic.served
            );
            if let Some(control) = &self.control {
                let _ = control.send(Report::ReplaceMe);
            }
        }
    }

    /// This worker's counters, in its scoreboard cell.
    fn publish_counters(&self) {
        self.cell.publish(&Counters {
            connections: self.open as u64,
            accepted: self.accepted,
            served: self.traffic.served,
            bytes_in: self.traffic.bytes_in,
            bytes_out: self.traffic.bytes_out,
            taken_over: self.taken_over,
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
            "raasd worker[{slot}]{} gen {generation}: {} conns, {} served",
            title::name_part(self.who.name),
            self.open,
            self.traffic.served
        );
        if self.taken_over > 0 {
            text += &format!(", took over {}", self.taken_over);
        }
        if let Some((count, to)) = &self.handed_over {
            let to: Vec<String> = to.iter().map(u64::to_string).collect();
            text += &format!(", handed over {count} to gen {}", to.join(","));
        }
        title::set(&text);
    }

    fn close(&mut self, index: usize) {
        // Closing the socket removes it from the epoll set: it is never duplicated.
        if let Some(connection) = self.connections[index].take() {
            if crate::logging::access_log_enabled() {
                log_access(&connection, connection.ending());
            }
            self.open -= 1;
            self.cell.set_connections(self.open as u64);
            self.released.push(index);
            if !self.accepting && self.open + 1 == self.serving.max_conns {
                let _ = self.update_accepting(Instant::now());
            }
        }
    }

    fn enforce_time_limits(&mut self, now: Instant) -> io::Result<()> {
        self.update_accepting(now)?;
        for index in 0..self.connections.len() {
            let Some(connection) = self.connections[index].as_mut() else {
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
    /// answer every client what it has sent and close it.
    fn stop(&mut self, now: Instant, why: &str) -> io::Result<()> {
        if self.stop_deadline.is_some() {
            return Ok(());
        }
        info!("stopping gracefully on {why}");
        self.stop_deadline = Some(now + self.serving.graceful_timeout);
        self.gate.stop();
        // A nudge woken here would be lost to the siblings that still serve.
        let _ = self.epoll.delete(self.nudge.as_fd());
        self.drain_accept_queues(now);
        self.update_accepting(now)?;
        self.listeners_close_at = Some(now + LISTENER_GRACE);
        for index in 0..self.connections.len() {
            if let Some(connection) = self.connections[index].as_mut() {
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
        self.listeners_close_at = None;
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
    crate::logging::access(&format!(
        "peer={peer} duration_ms={} lines={} bytes_in={} bytes_out={} end=\"{}\"",
        connection.opened.elapsed().as_millis(),
        traffic.served,
        traffic.bytes_in,
        traffic.bytes_out,
        ending.name()
    ));
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
