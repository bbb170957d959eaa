//! A load harness: client threads that keep a server busy and check every reply.
//!
//! [`Load::start`] runs two kinds of clients against one address (TCP or unix) until
//! it is stopped:
//! - persistent clients, each with a few lines in flight on one connection
//!   (pipelined), re-sending on a new connection what the server did not answer;
//! - connect-per-request clients: connect, send one line, half-close, read the reply
//!   and the server's end of file.
//!
//! The rules are those of a well-behaved client of a server that rotates workers
//! (README, "The RAAS protocol"): a server that closes a connection answers every line
//! it read first, then shuts its write side down. So an end of file with lines still
//! unanswered is not a failure: the client reconnects and re-sends them (counted in
//! `retries`), and so is a broken pipe (EPIPE) on a write. Everything else is a
//! failure: a refused connect, a reset (ECONNRESET), a wrong or cut reply, a reply
//! that takes longer than the shape's `reply_timeout` (5 s by default), any other error, and a line that keeps
//! meeting end of file ([`MAX_EOFS_IN_A_ROW`]) without ever being answered.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::reverse_graphemes;

/// How long a client waits for one reply before it counts a timeout, by default.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connect may take (a full accept queue makes TCP connects hang).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reads block at most this long, so that a stop is noticed quickly.
const READ_SLICE: Duration = Duration::from_millis(100);
/// A line that meets end of file this many times in a row is given up (missing).
pub const MAX_EOFS_IN_A_ROW: u32 = 50;
/// After a failed connect, the client waits this long before the next attempt (the
/// failure is counted already; this only keeps a refusing port from being hammered).
const AFTER_FAILED_CONNECT: Duration = Duration::from_millis(20);
/// At most this many failure descriptions are kept for the report.
const SAMPLES: usize = 12;

/// Where the clients connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target::Tcp(addr)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How many clients of each kind, how many lines each persistent one keeps in
/// flight, and how long a reply may take.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    pub persistent: usize,
    pub per_request: usize,
    pub depth: usize,
    pub reply_timeout: Duration,
    /// A pause between batches (a persistent client's `depth` lines, one request of
    /// a connect-per-request client): zero to hammer, more for a paced load.
    pub pause: Duration,
}

impl Default for LoadShape {
    /// 20 persistent clients with 4 lines in flight each, 8 connect-per-request ones,
    /// replies within [`REPLY_TIMEOUT`].
    fn default() -> LoadShape {
        LoadShape {
            persistent: 20,
            per_request: 8,
            depth: 4,
            reply_timeout: REPLY_TIMEOUT,
            pause: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    resets: AtomicU64,
    wrong: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    missing: AtomicU64,
    retries: AtomicU64,
    connects: AtomicU64,
}

struct Shared {
    target: Target,
    reply_timeout: Duration,
    pause: Duration,
    stop: AtomicBool,
    counts: Counters,
    samples: Mutex<Vec<String>>,
}

/// What went wrong, for the counters.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Refused,
    Reset,
    Wrong,
    Timeout,
    Error,
    Missing,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn fail(&self, kind: Failure, what: String) {
        let c = &self.counts;
        let counter = match kind {
            Failure::Refused => &c.refused,
            Failure::Reset => &c.resets,
            Failure::Wrong => &c.wrong,
            Failure::Timeout => &c.timeouts,
            Failure::Error => &c.errors,
            Failure::Missing => &c.missing,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < SAMPLES {
            samples.push(format!("{kind:?}: {what}"));
        }
    }

    fn failures(&self) -> u64 {
        let c = &self.counts;
        [
            &c.refused,
            &c.resets,
            &c.wrong,
            &c.timeouts,
            &c.errors,
            &c.missing,
        ]
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum()
    }
}

/// Running clients; stopped (and joined) by [`Load::stop`] or on drop.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Load {
    /// Starts the clients; they connect at once.
    pub fn start(target: impl Into<Target>, shape: LoadShape) -> Load {
        let shared = Arc::new(Shared {
            target: target.into(),
            reply_timeout: shape.reply_timeout,
            pause: shape.pause,
            stop: AtomicBool::new(false),
            counts: Counters::default(),
            samples: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::with_capacity(shape.persistent + shape.per_request);
        for id in 0..shape.persistent {
            let shared = shared.clone();
            let depth = shape.depth.max(1);
            threads.push(
                thread::Builder::new()
                    .name(format!("load-persistent-{id}"))
                    .spawn(move || persistent_client(&shared, id, depth))
                    .expect("spawning a load thread"),
            );
        }
        for id in 0..shape.per_request {
            let shared = shared.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("load-per-request-{id}"))
                    .spawn(move || per_request_client(&shared, id))
                    .expect("spawning a load thread"),
            );
        }
        Load {
            shared,
            threads,
            started: Instant::now(),
        }
    }

    /// Correct replies so far.
    pub fn replies(&self) -> u64 {
        self.shared.counts.ok.load(Ordering::Relaxed)
    }

    /// Failures of any kind so far.
    pub fn failures(&self) -> u64 {
        self.shared.failures()
    }

    /// The counts so far (the clients keep running).
    pub fn report(&self) -> LoadReport {
        let c = &self.shared.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoadReport {
            target: self.shared.target.clone(),
            ok: get(&c.ok),
            refused: get(&c.refused),
            resets: get(&c.resets),
            wrong: get(&c.wrong),
            timeouts: get(&c.timeouts),
            errors: get(&c.errors),
            missing: get(&c.missing),
            retries: get(&c.retries),
            connects: get(&c.connects),
            elapsed: self.started.elapsed(),
            samples: self
                .shared
                .samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Panics with the report if any failure was counted so far.
    pub fn assert_no_failure_yet(&self, when: &str) {
        if self.failures() > 0 {
            panic!("load failures {when}: {}", self.report());
        }
    }

    /// Waits for `n` more correct replies than there are now. Panics with the report
    /// as soon as a failure is counted, or when `deadline` passes first.
    pub fn wait_replies(&self, n: u64, deadline: Duration) {
        let want = self.replies() + n;
        let start = Instant::now();
        loop {
            self.assert_no_failure_yet(&format!("while waiting for {n} replies"));
            if self.replies() >= want {
                return;
            }
            if start.elapsed() >= deadline {
                panic!(
                    "timed out after {:.1}s waiting for {n} more replies: {}",
                    deadline.as_secs_f64(),
                    self.report()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops every client, joins them, and returns the final counts.
    pub fn stop(mut self) -> LoadReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The counts of a load run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: Target,
    /// Correct replies.
    pub ok: u64,
    /// Connects that failed (refused, no such socket file, timed out).
    pub refused: u64,
    /// ECONNRESET on a read or a write.
    pub resets: u64,
    /// Replies that were not the line reversed, or were cut before their newline.
    pub wrong: u64,
    /// Replies that took longer than the shape's `reply_timeout`.
    pub timeouts: u64,
    /// Any other I/O error.
    pub errors: u64,
    /// Lines given up after [`MAX_EOFS_IN_A_ROW`] ends of file.
    pub missing: u64,
    /// Re-sends after an end of file or a broken pipe (not failures).
    pub retries: u64,
    /// Successful connects.
    pub connects: u64,
    pub elapsed: Duration,
    /// The first few failures, described.
    pub samples: Vec<String>,
}

impl LoadReport {
    pub fn failures(&self) -> u64 {
        self.refused + self.resets + self.wrong + self.timeouts + self.errors + self.missing
    }

    /// No failure of any kind, and at least one correct reply.
    pub fn is_clean(&self) -> bool {
        self.failures() == 0 && self.ok > 0
    }

    /// Asserts [`LoadReport::is_clean`]; prints the counts either way.
    pub fn assert_clean(&self) {
        eprintln!("load: {self}");
        assert!(self.is_clean(), "the load was not clean: {self}");
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in {:.2}s: {} ok, {} failed connects, {} resets, {} wrong, {} timeouts, \
             {} other errors, {} missing; {} retries, {} connects",
            self.target,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.refused,
            self.resets,
            self.wrong,
            self.timeouts,
            self.errors,
            self.missing,
            self.retries,
            self.connects
        )?;
        for s in &self.samples {
            write!(f, "\n    {s}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn connect(target: &Target, reply_timeout: Duration) -> io::Result<Conn> {
        let conn = match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Target::Unix(path) => Conn::Unix(UnixStream::connect(path)?),
        };
        match &conn {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(READ_SLICE))?;
                s.set_write_timeout(Some(reply_timeout))?;
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(READ_SLICE))?;
                s.set_write_timeout(Some(reply_timeout))?;
            }
        }
        Ok(conn)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects, counting a success or the failure; None on failure.
fn connect(shared: &Shared, who: &str) -> Option<Conn> {
    match Conn::connect(&shared.target, shared.reply_timeout) {
        Ok(c) => {
            shared.counts.connects.fetch_add(1, Ordering::Relaxed);
            Some(c)
        }
        Err(e) => {
            let kind = match e.kind() {
                ErrorKind::ConnectionRefused | ErrorKind::NotFound | ErrorKind::TimedOut => {
                    Failure::Refused
                }
                _ => Failure::Error,
            };
            shared.fail(kind, format!("{who}: connect to {}: {e}", shared.target));
            thread::sleep(AFTER_FAILED_CONNECT);
            None
        }
    }
}

/// What one wait for a reply ended with.
enum Reply {
    Line(Vec<u8>),
    /// End of file; `cut` when part of a reply came before it.
    Eof {
        cut: bool,
    },
    Stopped,
    Timeout,
    Failed(io::Error),
}

/// Reads one `\n`-terminated reply (returned without the `\n`), keeping what follows
/// in `inbuf` for the next one.
fn read_reply(conn: &mut Conn, inbuf: &mut Vec<u8>, shared: &Shared) -> Reply {
    let start = Instant::now();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(at) = inbuf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = inbuf.drain(..=at).collect();
            line.pop();
            return Reply::Line(line);
        }
        if shared.stopped() {
            return Reply::Stopped;
        }
        match conn.read(&mut chunk) {
            Ok(0) => {
                return Reply::Eof {
                    cut: !inbuf.is_empty(),
                };
            }
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if start.elapsed() >= shared.reply_timeout {
                    return Reply::Timeout;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Reply::Failed(e),
        }
    }
}

/// Counts an I/O error on a read or a write as a reset or another error.
fn io_failure(shared: &Shared, who: &str, what: &str, e: &io::Error) {
    let kind = if e.kind() == ErrorKind::ConnectionReset {
        Failure::Reset
    } else {
        Failure::Error
    };
    shared.fail(kind, format!("{who}: {what}: {e}"));
}

/// The line number `n` of client `who`: ASCII, accents and a flag, so that a server
/// reversing anything but grapheme clusters gets it wrong.
fn make_line(who: &str, n: u64) -> String {
    format!("{who} line {n} noe\u{308}l 🇧🇪 ~")
}

fn check_reply(shared: &Shared, who: &str, line: &str, reply: &[u8]) -> bool {
    let want = reverse_graphemes(line);
    if reply == want.as_bytes() {
        shared.counts.ok.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        shared.fail(
            Failure::Wrong,
            format!(
                "{who}: reply {:?} for {line:?}",
                String::from_utf8_lossy(reply)
            ),
        );
        false
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// One persistent connection with up to `depth` lines in flight.
fn persistent_client(shared: &Shared, id: usize, depth: usize) {
    let who = format!("p{id}");
    let mut conn: Option<Conn> = None;
    // Lines sent (or to be re-sent) and not answered yet, oldest first.
    let mut outstanding: VecDeque<String> = VecDeque::new();
    let mut inbuf = Vec::new();
    let mut next = 0u64;
    let mut eofs_in_a_row = 0u32;
    while !shared.stopped() {
        if outstanding.is_empty() && next > 0 && !shared.pause.is_zero() {
            thread::sleep(shared.pause);
        }
        let mut out = Vec::new();
        let c = match &mut conn {
            Some(c) => c,
            None => {
                let Some(c) = connect(shared, &who) else {
                    continue;
                };
                inbuf.clear();
                // A new connection: re-send what the last one left unanswered.
                for line in &outstanding {
                    out.extend_from_slice(line.as_bytes());
                    out.push(b'\n');
                }
                conn.insert(c)
            }
        };
        // Paced: a batch of `depth` lines, then a pause once all are answered.
        // Hammering: `depth` lines in flight at all times.
        let refill = shared.pause.is_zero() || outstanding.is_empty();
        while refill && outstanding.len() < depth {
            let line = make_line(&who, next);
            next += 1;
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
            outstanding.push_back(line);
        }
        if !out.is_empty() {
            match c.write_all(&out) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    // The server closed this connection: re-send on a new one.
                    shared.counts.retries.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                    continue;
                }
                Err(e) => {
                    io_failure(shared, &who, "write", &e);
                    conn = None;
                    continue;
                }
            }
        }
        match read_reply(c, &mut inbuf, shared) {
            Reply::Line(reply) => {
                let line = outstanding.pop_front().expect("a line in flight");
                eofs_in_a_row = 0;
                if !check_reply(shared, &who, &line, &reply) {
                    // Out of step with the server: start afresh.
                    outstanding.clear();
                    conn = None;
                }
            }
            Reply::Eof { cut } => {
                if cut {
                    shared.fail(
                        Failure::Wrong,
                        format!(
                            "{who}: end of file in the middle of a reply: {:?}",
                            String::from_utf8_lossy(&inbuf)
                        ),
                    );
                    outstanding.clear();
                } else {
                    shared.counts.retries.fetch_add(1, Ordering::Relaxed);
                    eofs_in_a_row += 1;
                    if eofs_in_a_row >= MAX_EOFS_IN_A_ROW {
                        shared.fail(
                            Failure::Missing,
                            format!(
                                "{who}: {} lines unanswered after {eofs_in_a_row} ends of file in a row",
                                outstanding.len()
                            ),
                        );
                        outstanding.clear();
                        eofs_in_a_row = 0;
                    }
                }
                conn = None;
            }
            Reply::Stopped => break,
            Reply::Timeout => {
                shared.fail(
                    Failure::Timeout,
                    format!(
                        "{who}: no reply within {:?} for {:?}",
                        shared.reply_timeout,
                        outstanding.front()
                    ),
                );
                outstanding.clear();
                conn = None;
            }
            Reply::Failed(e) => {
                io_failure(shared, &who, "read", &e);
                conn = None;
            }
        }
    }
}

/// One line per connection: connect, send, half-close, read the reply and EOF.
fn per_request_client(shared: &Shared, id: usize) {
    let who = format!("r{id}");
    let mut next = 0u64;
    'lines: while !shared.stopped() {
        if next > 0 && !shared.pause.is_zero() {
            thread::sleep(shared.pause);
        }
        let line = make_line(&who, next);
        next += 1;
        let mut request = line.clone().into_bytes();
        request.push(b'\n');
        for _attempt in 0..MAX_EOFS_IN_A_ROW {
            if shared.stopped() {
                break 'lines;
            }
            let Some(mut c) = connect(shared, &who) else {
                continue 'lines;
            };
            match c.write_all(&request) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    shared.counts.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => {
                    io_failure(shared, &who, "write", &e);
                    continue 'lines;
                }
            }
            if let Err(e) = c.shutdown_write() {
                io_failure(shared, &who, "shutdown(write)", &e);
                continue 'lines;
            }
            let mut inbuf = Vec::new();
            match read_reply(&mut c, &mut inbuf, shared) {
                Reply::Line(reply) => {
                    if check_reply(shared, &who, &line, &reply) {
                        // The server owes nothing more: it must close.
                        match read_reply(&mut c, &mut inbuf, shared) {
                            Reply::Eof { cut: false } | Reply::Stopped => {}
                            Reply::Eof { cut: true } | Reply::Line(_) => shared.fail(
                                Failure::Wrong,
                                format!(
                                    "{who}: bytes after the only reply: {:?}",
                                    String::from_utf8_lossy(&inbuf)
                                ),
                            ),
                            Reply::Timeout => shared.fail(
                                Failure::Timeout,
                                format!("{who}: no end of file after the reply"),
                            ),
                            Reply::Failed(e) => io_failure(shared, &who, "read EOF", &e),
                        }
                    }
                    continue 'lines;
                }
                Reply::Eof { cut: false } => {
                    shared.counts.retries.fetch_add(1, Ordering::Relaxed);
                }
                Reply::Eof { cut: true } => {
                    shared.fail(
                        Failure::Wrong,
                        format!(
                            "{who}: end of file in the middle of the reply: {:?}",
                            String::from_utf8_lossy(&inbuf)
                        ),
                    );
                    continue 'lines;
                }
                Reply::Stopped => break 'lines,
                Reply::Timeout => {
                    shared.fail(
                        Failure::Timeout,
                        format!(
                            "{who}: no reply within {:?} for {line:?}",
                            shared.reply_timeout
                        ),
                    );
                    continue 'lines;
                }
                Reply::Failed(e) => {
                    io_failure(shared, &who, "read", &e);
                    continue 'lines;
                }
            }
        }
        shared.fail(
            Failure::Missing,
            format!("{who}: {MAX_EOFS_IN_A_ROW} ends of file in a row for {line:?}"),
        );
    }
}
