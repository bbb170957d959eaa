//! Clients that never reconnect: what a plain client (nc, socat, a Ruby or Python
//! loop) sees when the server rotates its workers under it.
//!
//! [`Sticky::start`] opens one connection per kind and keeps it for the whole test:
//! - `pipelined`: sequence-numbered lines written in random-sized chunks (so lines
//!   split across writes, and across the moment of a hand-over), with up to 64 in
//!   flight, every reply checked in order;
//! - `not reading`: writes about 2 MB of lines without reading, so replies pile up
//!   beyond the socket buffers, then reads them all at the end;
//! - `idle`: one line at the start, one at the end, silence between;
//! - `blocking`: send a line, read its reply, again and again.
//!
//! Any end of file, reset, error, wrong or missing reply is a failure; each client
//! also checks at the end that its socket still has the local port it started with.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

const READ_TIMEOUT: Duration = Duration::from_secs(20);
const NOT_READING_LINES: u64 = 40_000;

/// The clients and what they found.
pub struct Sticky {
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

fn reversed(line: &str) -> String {
    line.chars().rev().collect()
}

fn connect(addr: SocketAddr) -> (TcpStream, u16) {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let port = stream.local_addr().unwrap().port();
    (stream, port)
}

/// Reads one `\n`-terminated reply; Err describes an end of file or an error.
fn read_reply(reader: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("end of file".into()),
        Ok(_) if line.ends_with('\n') => {
            line.pop();
            Ok(line)
        }
        Ok(_) => Err(format!("a reply cut short: {line:?}")),
        Err(e) => Err(format!("read: {e}")),
    }
}

impl Sticky {
    pub fn start(addr: SocketAddr) -> Sticky {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let ctx = || (stop.clone(), replies.clone(), failures.clone());
        let (s, r, f) = ctx();
        threads.push(thread::spawn(move || pipelined(addr, s, r, f)));
        let (s, r, f) = ctx();
        threads.push(thread::spawn(move || not_reading(addr, s, r, f)));
        let (s, r, f) = ctx();
        threads.push(thread::spawn(move || idle(addr, s, r, f)));
        let (s, r, f) = ctx();
        threads.push(thread::spawn(move || blocking(addr, s, r, f)));
        Sticky {
            stop,
            replies,
            failures,
            threads,
        }
    }

    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::SeqCst)
    }

    /// Waits until `more` replies have come since the call (the clients are busy).
    pub fn wait_more(&self, more: u64, deadline: Duration) {
        let target = self.replies() + more;
        let ok = super::poll_until(deadline, || {
            self.assert_no_failure_yet();
            self.replies() >= target
        });
        assert!(ok, "no {more} more replies within {deadline:?}");
    }

    pub fn assert_no_failure_yet(&self) {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        assert!(failures.is_empty(), "a client saw: {failures:?}");
    }

    /// Stops the clients (each finishes its checks) and asserts none saw anything
    /// go wrong.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("a client thread panicked");
        }
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        assert!(failures.is_empty(), "the clients saw: {failures:?}");
        self.replies.load(Ordering::SeqCst)
    }
}

fn fail(failures: &Mutex<Vec<String>>, what: String) {
    failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(what);
}

fn same_port(name: &str, stream: &TcpStream, port: u16, failures: &Mutex<Vec<String>>) {
    match stream.local_addr() {
        Ok(a) if a.port() == port => {}
        other => fail(
            failures,
            format!("{name}: local address now {other:?}, was port {port}"),
        ),
    }
}

fn pipelined(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let (stream, port) = connect(addr);
    let writer_stream = stream.try_clone().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let writer_sent = sent.clone();
    let writer_stop = stop.clone();
    let writer_failures = failures.clone();
    let done_writing = Arc::new(AtomicBool::new(false));
    let writer_done = done_writing.clone();
    let acked = Arc::new(AtomicU64::new(0));
    let writer_acked = acked.clone();
    let writer = thread::spawn(move || {
        let mut w = writer_stream;
        let mut seed: u64 = 0x9E3779B97F4A7C15;
        let mut pending: Vec<u8> = Vec::new();
        let mut n = 0u64;
        while !writer_stop.load(Ordering::SeqCst) {
            // At most 64 lines in flight.
            while n - writer_acked.load(Ordering::SeqCst) < 64 && pending.len() < 4096 {
                pending.extend_from_slice(format!("seq {n} abcdefghij\n").as_bytes());
                n += 1;
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let chunk = (1 + seed % 40) as usize;
            let chunk = chunk.min(pending.len());
            if chunk == 0 {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            if let Err(e) = w.write_all(&pending[..chunk]) {
                fail(&writer_failures, format!("pipelined: write: {e}"));
                break;
            }
            let lines = pending[..chunk].iter().filter(|&&b| b == b'\n').count();
            pending.drain(..chunk);
            writer_sent.fetch_add(lines as u64, Ordering::SeqCst);
            thread::sleep(Duration::from_micros(200));
        }
        // The rest of the last line, so every line sent is complete.
        let lines = pending.iter().filter(|&&b| b == b'\n').count();
        if w.write_all(&pending).is_ok() {
            writer_sent.fetch_add(lines as u64, Ordering::SeqCst);
        } else {
            fail(&writer_failures, "pipelined: final write".into());
        }
        writer_done.store(true, Ordering::SeqCst);
    });
    let mut reader = BufReader::new(stream);
    let mut expected = 0u64;
    loop {
        let all_sent = done_writing.load(Ordering::SeqCst);
        if all_sent && expected >= sent.load(Ordering::SeqCst) {
            break;
        }
        if expected >= sent.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        match read_reply(&mut reader) {
            Ok(reply) => {
                let want = reversed(&format!("seq {expected} abcdefghij"));
                if reply != want {
                    fail(
                        &failures,
                        format!("pipelined: reply {expected}: {reply:?}, want {want:?}"),
                    );
                    break;
                }
                expected += 1;
                acked.store(expected, Ordering::SeqCst);
                replies.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                fail(
                    &failures,
                    format!("pipelined: after {expected} replies: {e}"),
                );
                stop.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    let _ = writer.join();
    same_port("pipelined", reader.get_ref(), port, &failures);
}

fn not_reading(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let (stream, port) = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    // Written from a thread: once the server pauses reading (its replies unread beyond
    // --max-pending), the writes block until the end, when this client reads.
    let write = thread::spawn(move || {
        let mut batch = Vec::new();
        for n in 0..NOT_READING_LINES {
            batch
                .extend_from_slice(format!("unread {n:08} .........................\n").as_bytes());
            if batch.len() > 16 * 1024 {
                if writer.write_all(&batch).is_err() {
                    return false;
                }
                batch.clear();
            }
        }
        writer.write_all(&batch).is_ok()
    });
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
    let mut reader = BufReader::new(stream);
    for n in 0..NOT_READING_LINES {
        match read_reply(&mut reader) {
            Ok(reply) => {
                let want = reversed(&format!("unread {n:08} ........................."));
                if reply != want {
                    fail(&failures, format!("not reading: reply {n}: {reply:?}"));
                    return;
                }
                replies.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                fail(&failures, format!("not reading: after {n} replies: {e}"));
                return;
            }
        }
    }
    if !write.join().unwrap_or(false) {
        fail(&failures, "not reading: a write failed".into());
    }
    same_port("not reading", reader.get_ref(), port, &failures);
}

/// Sends `line`, reads its reply and checks it; false (with the failure recorded as
/// `who`'s) when anything went wrong.
fn roundtrip_checked(
    who: &str,
    stream: &TcpStream,
    reader: &mut BufReader<TcpStream>,
    line: &str,
    replies: &AtomicU64,
    failures: &Mutex<Vec<String>>,
) -> bool {
    if let Err(e) = (&*stream).write_all(format!("{line}\n").as_bytes()) {
        fail(failures, format!("{who}: write {line:?}: {e}"));
        return false;
    }
    match read_reply(reader) {
        Ok(reply) if reply == reversed(line) => {
            replies.fetch_add(1, Ordering::SeqCst);
            true
        }
        Ok(reply) => {
            fail(failures, format!("{who}: {reply:?} for {line:?}"));
            false
        }
        Err(e) => {
            fail(failures, format!("{who}: after {line:?}: {e}"));
            false
        }
    }
}

fn idle(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let (stream, port) = connect(addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut once =
        |line: &str| roundtrip_checked("idle", &stream, &mut reader, line, &replies, &failures);
    if !once("idle at the start") {
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
    if once("idle at the end") {
        same_port("idle", &stream, port, &failures);
    }
}

fn blocking(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let (stream, port) = connect(addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let line = format!("blocking {n}");
        if !roundtrip_checked("blocking", &stream, &mut reader, &line, &replies, &failures) {
            return;
        }
        n += 1;
        thread::sleep(Duration::from_millis(2));
    }
    same_port("blocking", &stream, port, &failures);
}
