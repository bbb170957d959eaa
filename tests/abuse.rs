//! Hostile input and resource limits: a line with no end, slowloris, a client that
//! never reads, descriptor exhaustion, random bytes, resets, half-closes, odd lines.
//!
//! Each case runs against `-w 1`, so that a well-behaved client (the canary, a
//! roundtrip every 50 ms) is certainly on the worker under attack; it must keep getting
//! correct replies, none slower than [`STARVED`]. After each case the server still
//! serves with the same worker (nobody crashed) and the worker's memory is back under a
//! bound.

mod common;

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use raasd::codec::{Unit, reverse_into};

const MIB: u64 = 1024 * 1024;
/// A worker's resident size once the abusive client is gone.
const RSS_AFTER: u64 = 64 * MIB;
/// A roundtrip of the well-behaved client slower than this means it was starved.
/// (Generous: a starved client waits for as long as the abuse lasts; a served one
/// waits for at most one turn of another connection, well under 0.5 s even in a
/// debug build, but a 2-core machine shared with other work can stretch that past
/// a second.)
const STARVED: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// /proc and the canary
// ---------------------------------------------------------------------------------------

/// VmRSS of a process, in bytes.
fn rss(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) of a process.
fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    // proc(5): utime and stime are fields 14 and 15; this slice starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

#[derive(Debug, Default)]
struct CanaryReport {
    rounds: u64,
    slowest: Duration,
    failures: Vec<String>,
}

/// A well-behaved client: one persistent connection, a roundtrip every 50 ms.
struct Canary {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<CanaryReport>>,
}

impl Canary {
    fn start(addr: SocketAddr) -> Canary {
        let mut c = LineClient::connect(addr).expect("the canary connects");
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(c.roundtrip("canary"), "yranac");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut report = CanaryReport::default();
            while !flag.load(Ordering::SeqCst) {
                let line = format!("canary {} noël 🇫🇷", report.rounds);
                let t = Instant::now();
                let reply = c.send_line(&line).and_then(|()| c.read_reply());
                let took = t.elapsed();
                report.slowest = report.slowest.max(took);
                match reply {
                    Ok(Some(r)) if r == format!("{}\n", reverse_graphemes(&line)).as_bytes() => {
                        report.rounds += 1;
                        if took >= STARVED {
                            report.failures.push(format!("{line:?} took {took:?}"));
                        }
                    }
                    other => {
                        report.failures.push(format!("{line:?}: {other:?}"));
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
            report
        });
        Canary {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the canary and asserts it was served all along.
    fn check(mut self, min_rounds: u64) {
        self.stop.store(true, Ordering::SeqCst);
        let report = self.thread.take().unwrap().join().expect("canary thread");
        eprintln!("canary: {report:?}");
        assert!(
            report.failures.is_empty(),
            "the well-behaved client suffered: {:?}",
            report.failures
        );
        assert!(
            report.rounds >= min_rounds,
            "the canary made only {} roundtrips: {report:?}",
            report.rounds
        );
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A `-w 1` server with extra arguments, its address and its worker.
fn server(extra: &[&str]) -> (Server, SocketAddr, Worker) {
    let mut args = vec!["-w", "1", "-l", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    let addr = s.addr();
    s.wait_for_log("1 worker accepting", SOON);
    let worker = s.wait_workers(1).remove(0);
    (s, addr, worker)
}

/// After a case: the same worker serves, nothing crashed, memory is back under bound.
fn assert_recovered(s: &Server, addr: SocketAddr, worker: &Worker) {
    assert_eq!(s.workers(), vec![worker.clone()], "the same single worker");
    assert_eq!(s.count_log("exited"), 0, "no worker exited");
    for i in 0..5 {
        let l = format!("after the abuse {i}");
        assert_eq!(roundtrip(addr, &l), reverse_ascii(&l));
    }
    let mut last = None;
    let ok = poll_until(SOON, || {
        last = rss(worker.pid);
        last.is_some_and(|r| r < RSS_AFTER)
    });
    assert!(
        ok,
        "the worker's RSS stays at {:?} MiB",
        last.map(|r| r / MIB)
    );
}

/// A deterministic PRNG (xorshift64*), for reproducible random input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The reply the protocol defines for one line (without its `\n`).
fn expected_reply(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match line.strip_suffix(b"\r") {
        Some(body) => {
            reverse_into(body, Unit::Graphemes, &mut out);
            out.extend_from_slice(b"\r\n");
        }
        None => {
            reverse_into(line, Unit::Graphemes, &mut out);
            out.push(b'\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

#[test]
fn a_10_mb_line_gets_err_and_is_closed_with_memory_bounded() {
    const SIZE: usize = 10 * 1024 * 1024;
    let (s, addr, worker) = server(&[]);
    let canary = Canary::start(addr);

    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < SIZE {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                // The server may end the conversation before all 10 MB are in.
                Err(_) => break,
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let mut reader = LineClient::new(stream);
    let mut peak = 0;
    let reply = thread::scope(|scope| {
        let reading = scope.spawn(|| {
            let first = reader.read_reply();
            let rest = reader.read_to_eof();
            (first, rest)
        });
        while !reading.is_finished() || !sender.is_finished() {
            peak = peak.max(rss(worker.pid).unwrap_or(0));
            thread::sleep(Duration::from_millis(5));
        }
        reading.join().expect("reader")
    });
    let sent = sender.join().expect("sender");
    eprintln!("sent {sent} bytes; worker RSS peak {} KiB", peak / 1024);
    match reply {
        (Ok(Some(first)), Ok(rest)) => {
            assert_eq!(
                String::from_utf8_lossy(&first),
                "ERR line too long (max 65536 bytes)\n"
            );
            assert!(rest.is_empty(), "bytes after the ERR line: {rest:?}");
        }
        other => panic!("want the ERR line then EOF, got {other:?}"),
    }
    assert!(
        peak < 32 * MIB,
        "the worker's RSS reached {} MiB during a 10 MB line",
        peak / MIB
    );
    // (The flood takes a fraction of a second: only a round or two overlap it.)
    canary.check(1);
    assert_recovered(&s, addr, &worker);
}

/// Opens `n` connections (blocking connects) with non-blocking sockets.
fn open_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect()
}

/// Whether the server has closed this (non-blocking) connection.
fn closed_by_server(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

#[test]
fn slowloris_connections_are_closed_by_the_line_timeout() {
    const N: usize = 1000;
    let (s, addr, worker) = server(&["--line-timeout", "2"]);
    let canary = Canary::start(addr);
    let mut conns = open_connections(addr, N);
    let mut first_byte: Vec<Option<Instant>> = vec![None; N];
    let mut closed_after: Vec<Option<Duration>> = vec![None; N];
    let start = Instant::now();
    // A byte every 0.5 s per connection, never a newline, until each is closed.
    while closed_after.iter().any(Option::is_none) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} of {N} slowloris connections still open after {:?}",
            closed_after.iter().filter(|c| c.is_none()).count(),
            start.elapsed()
        );
        for i in 0..N {
            if closed_after[i].is_some() {
                continue;
            }
            let began = *first_byte[i].get_or_insert_with(Instant::now);
            if closed_by_server(&mut conns[i]) || conns[i].write(b"x").is_err() {
                closed_after[i] = Some(began.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(500));
    }
    let earliest = closed_after.iter().flatten().min().unwrap();
    let latest = closed_after.iter().flatten().max().unwrap();
    eprintln!("slowloris closed between {earliest:?} and {latest:?} after their first byte");
    assert!(
        *earliest >= Duration::from_millis(1900),
        "a slowloris connection was closed {earliest:?} after its first byte, \
         before --line-timeout 2"
    );
    assert!(
        *latest <= Duration::from_millis(5000),
        "a slowloris connection lasted {latest:?} with --line-timeout 2"
    );
    drop(conns);
    canary.check(20);
    assert_recovered(&s, addr, &worker);
}

#[test]
fn silent_connections_are_closed_by_the_idle_timeout() {
    const N: usize = 200;
    let (s, addr, worker) = server(&["--idle-timeout", "2"]);
    // The canary talks every 50 ms: it is never idle for 2 s, so never closed.
    let canary = Canary::start(addr);
    let opened = Instant::now();
    let mut conns = open_connections(addr, N);
    let mut open = N;
    let mut closed = [false; N];
    while open > 0 {
        assert!(
            opened.elapsed() < Duration::from_secs(8),
            "{open} of {N} silent connections still open after {:?}",
            opened.elapsed()
        );
        for (i, c) in conns.iter_mut().enumerate() {
            if !closed[i] && closed_by_server(c) {
                closed[i] = true;
                open -= 1;
                assert!(
                    opened.elapsed() >= Duration::from_millis(1900),
                    "a silent connection was closed {:?} after it opened, before \
                     --idle-timeout 2",
                    opened.elapsed()
                );
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "silent connections all closed {:?} after opening",
        opened.elapsed()
    );
    canary.check(20);
    assert_recovered(&s, addr, &worker);
}

/// (tx_queue, rx_queue) of the TCP socket from `local` to `remote`, per /proc/net/tcp.
fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("IPv4 only"),
    };
    let (l, r) = (hex(local), hex(remote));
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && f[1] == l && f[2] == r {
            let (tx, rx) = f[4].split_once(':')?;
            Some((
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
            ))
        } else {
            None
        }
    })
}

/// Line `i` of the never-reading client: 100 bytes with the newline.
fn flood_line(i: usize) -> Vec<u8> {
    let mut l = format!("flood line {i:010} ").into_bytes();
    l.resize(99, b'.');
    l.push(b'\n');
    l
}

#[test]
fn a_client_that_never_reads_is_back_pressured_then_served_in_order() {
    const LIMIT: usize = 100 * 1024 * 1024;
    const LINE: usize = 100;
    let (s, addr, worker) = server(&[]);
    let canary = Canary::start(addr);
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nonblocking(true).unwrap();

    // Send lines without reading until 100 MB are sent or no byte goes out for 1 s.
    let mut sent = 0usize;
    let mut peak = 0;
    let mut last_progress = Instant::now();
    let mut line = flood_line(0);
    let mut in_line = 0; // bytes of `line` already sent
    let mut ticks = 0u32;
    while sent < LIMIT && last_progress.elapsed() < Duration::from_secs(1) {
        match (&stream).write(&line[in_line..]) {
            Ok(n) => {
                sent += n;
                in_line += n;
                if in_line == LINE {
                    in_line = 0;
                    line = flood_line(sent / LINE);
                }
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                peak = peak.max(rss(worker.pid).unwrap_or(0));
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("writing the flood after {sent} bytes: {e}"),
        }
        ticks += 1;
        if ticks.is_multiple_of(4096) {
            peak = peak.max(rss(worker.pid).unwrap_or(0));
        }
    }
    let (server_side_tx, server_side_rx) =
        tcp_queues(addr, stream.local_addr().unwrap()).expect("the server's socket");
    eprintln!(
        "back-pressured after {} MiB; server socket: {server_side_tx} bytes unsent, \
         {server_side_rx} unread; worker RSS peak {} KiB",
        sent / MIB as usize,
        peak / 1024
    );
    assert!(
        sent < LIMIT,
        "the server kept reading 100 MB from a client that reads nothing"
    );
    assert!(
        server_side_rx > 0,
        "the server's socket has nothing unread, yet the client cannot send: \
         who stopped reading?"
    );
    assert!(
        peak < 64 * MIB,
        "the worker's RSS reached {} MiB",
        peak / MIB
    );
    assert!(
        rss(worker.pid).unwrap() < 64 * MIB,
        "the worker's RSS is {} MiB",
        rss(worker.pid).unwrap() / MIB
    );

    // Now the client reads: every reply for what it sent, in order, then EOF.
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    let lines = sent.div_ceil(LINE);
    let mut writer = stream.try_clone().unwrap();
    // The rest of a line cut short, if any (with in_line 0, `line` is not begun).
    let rest = if in_line == 0 {
        Vec::new()
    } else {
        line[in_line..].to_vec()
    };
    let finishing = thread::spawn(move || {
        writer.write_all(&rest)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut reader = LineClient::new(stream);
    for i in 0..lines {
        let want: Vec<u8> = {
            let mut l = flood_line(i);
            l.pop();
            l.reverse();
            l.push(b'\n');
            l
        };
        match reader.read_reply() {
            Ok(Some(r)) if r == want => {}
            other => panic!(
                "reply {i} of {lines}: want {:?}, got {other:?}",
                String::from_utf8_lossy(&want)
            ),
        }
    }
    reader.expect_eof();
    finishing.join().unwrap().expect("finishing the last line");
    canary.check(20);
    assert_recovered(&s, addr, &worker);
}

/// Lowers the RLIMIT_NOFILE of a running process (prlimit(2)).
fn limit_descriptors(pid: i32, n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (the old-limit pointer is null).
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit({pid}): {}", io::Error::last_os_error());
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_floods_the_log_and_recovers() {
    const CLIENTS: usize = 2000;
    // A backlog that holds every client: connections beyond the descriptor limit wait
    // there, complete. (With a smaller one, hundreds of connects would sit in SYN_SENT
    // and their retransmissions, all timed alike, come in bursts that overflow the
    // loopback's input queue and delay the packets of unrelated tests.)
    let (s, addr, worker) = server(&["-b", "4096"]);
    // The worker's own descriptor limit, as `ulimit -n 256` would have set it; lowered
    // with prlimit because the test's server guard starts raasd directly.
    limit_descriptors(worker.pid, 256);
    let canary = Canary::start(addr);

    // Non-blocking connects: beyond the backlog, a connect would block for long.
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_nonblocking(true).unwrap();
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => panic!("connect: {e}"),
        }
        clients.push(sock);
    }
    s.wait_for_log("cannot accept", SOON);

    // Two seconds in that state: accepts keep failing, the worker must not spin.
    let cpu_before = cpu_time(worker.pid).unwrap();
    let lines_before = s.count_log("cannot accept");
    let window = Instant::now();
    assert_stays("the worker alive", Duration::from_secs(2), || {
        alive(worker.pid)
    });
    let cpu = cpu_time(worker.pid).unwrap() - cpu_before;
    let logged = s.count_log("cannot accept") - lines_before;
    let elapsed = window.elapsed();
    eprintln!(
        "out of descriptors for {elapsed:?}: {cpu:?} of CPU, {logged} `cannot accept` \
         lines; {} sockets open in the worker",
        socket_fd_count(worker.pid)
    );
    assert!(
        cpu < Duration::from_millis(500),
        "the worker used {cpu:?} of CPU in {elapsed:?} while out of descriptors"
    );
    assert!(
        logged as f64 <= elapsed.as_secs_f64() + 2.0,
        "{logged} `cannot accept` lines in {elapsed:?}: more than one a second"
    );
    canary.check(20);

    // The clients go away; the worker takes and closes what queued, then serves.
    drop(clients);
    let mut reply = None;
    let served = poll_until(SOON, || {
        reply = (|| -> io::Result<Option<Vec<u8>>> {
            let mut c = LineClient::connect(addr)?;
            c.stream()
                .set_read_timeout(Some(Duration::from_millis(500)))?;
            c.send_line("recovered")?;
            c.read_reply()
        })()
        .ok()
        .flatten();
        reply.as_deref() == Some(b"derevocer\n")
    });
    assert!(
        served,
        "no correct reply once the clients left; last: {reply:?}"
    );
    assert_recovered(&s, addr, &worker);
}

#[test]
fn ten_thousand_random_lines_get_their_reversal() {
    const LINES: usize = 10_000;
    let (s, addr, worker) = server(&[]);
    let canary = Canary::start(addr);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let pieces: [&[u8]; 12] = [
        b"\r",
        b"\0",
        b"\xff",
        b"\xc3",
        b"\xe2\x82",
        "é".as_bytes(),
        "e\u{301}".as_bytes(),
        "🇫🇷".as_bytes(),
        "👩‍👩‍👧".as_bytes(),
        "noël".as_bytes(),
        b"\xed\xa0\x80", // an encoded surrogate: invalid
        b"ab",
    ];
    let mut lines: Vec<Vec<u8>> = Vec::with_capacity(LINES);
    for _ in 0..LINES {
        let len = match rng.below(10) {
            0 => 0,
            1..=7 => rng.below(40),
            _ => rng.below(500),
        };
        let mut l = Vec::new();
        while (l.len() as u64) < len {
            if rng.below(3) == 0 {
                l.extend_from_slice(pieces[rng.below(pieces.len() as u64) as usize]);
            } else {
                let b = rng.below(256) as u8;
                if b != b'\n' {
                    l.push(b);
                }
            }
        }
        if rng.below(8) == 0 {
            l.push(b'\r');
        }
        lines.push(l);
    }
    let mut request = Vec::new();
    for l in &lines {
        request.extend_from_slice(l);
        request.push(b'\n');
    }
    let mut c = LineClient::connect(addr).expect("connect");
    let mut writer = c.stream().try_clone().unwrap();
    let sending = thread::spawn(move || {
        writer.write_all(&request)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut crlf = 0;
    for (i, line) in lines.iter().enumerate() {
        let want = expected_reply(line);
        crlf += usize::from(want.ends_with(b"\r\n"));
        match c.read_reply() {
            Ok(Some(r)) => assert!(r == want, "reply {i} to {line:?}: got {r:?}, want {want:?}"),
            other => panic!("reply {i} to {line:?}: {other:?}"),
        }
        // An independent oracle where the line is valid UTF-8.
        if let Ok(text) = std::str::from_utf8(line)
            && !text.ends_with('\r')
        {
            assert_eq!(want, format!("{}\n", reverse_graphemes(text)).as_bytes());
        }
    }
    c.expect_eof();
    sending.join().unwrap().expect("sending");
    assert!(crlf > 500, "the input had too few CRLF lines: {crlf}");
    canary.check(1);
    assert_recovered(&s, addr, &worker);
}

#[test]
fn resets_mid_reply_cost_nobody_else_anything() {
    const CLIENTS: usize = 50;
    let (s, addr, worker) = server(&[]);
    let canary = Canary::start(addr);
    let baseline_sockets = socket_fd_count(worker.pid);
    let mut request = Vec::new();
    for i in 0..5000 {
        request.extend_from_slice(format!("line {i} to be reset\n").as_bytes());
    }
    let mut good = LineClient::connect(addr).expect("connect");
    for i in 0..CLIENTS {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(&request).expect("send");
        // Some replies may be on their way: close with a reset, unread.
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        // Another client of the same worker, served between the resets.
        let l = format!("between resets {i}");
        let t = Instant::now();
        assert_eq!(good.roundtrip(&l), reverse_ascii(&l));
        assert!(t.elapsed() < STARVED, "{l:?} took {:?}", t.elapsed());
    }
    drop(good);
    let mut now = 0;
    let released = poll_until(SOON, || {
        now = socket_fd_count(worker.pid);
        now == baseline_sockets
    });
    assert!(
        released,
        "the worker holds {now} sockets, {baseline_sockets} before the resets"
    );
    canary.check(1);
    assert_recovered(&s, addr, &worker);
}

#[test]
fn a_half_close_still_gets_every_reply_then_eof() {
    let (s, addr, worker) = server(&[]);
    let canary = Canary::start(addr);
    let lines: Vec<String> = (0..1000).map(|i| format!("half-closed {i} é🇫🇷")).collect();
    let replies = send_lines(addr, &lines);
    assert_eq!(
        replies.len(),
        lines.len(),
        "a reply for each line, then EOF"
    );
    for (l, r) in lines.iter().zip(&replies) {
        assert_eq!(r, &reverse_graphemes(l));
    }
    canary.check(0);
    assert_recovered(&s, addr, &worker);
}

#[test]
fn empty_lines_lone_cr_and_nul_bytes_have_defined_replies() {
    const EMPTY: usize = 100_000;
    let (s, addr, worker) = server(&[]);
    let canary = Canary::start(addr);

    // A storm of empty lines: as many empty replies.
    let mut c = LineClient::connect(addr).expect("connect");
    let mut writer = c.stream().try_clone().unwrap();
    let sending = thread::spawn(move || {
        writer.write_all(&vec![b'\n'; EMPTY])?;
        writer.shutdown(Shutdown::Write)
    });
    let replies = c.read_to_eof().expect("the replies to the empty lines");
    sending.join().unwrap().expect("sending");
    assert_eq!(replies.len(), EMPTY, "one `\\n` per empty line");
    assert!(replies.iter().all(|&b| b == b'\n'));

    let cases: [(&[u8], &[u8]); 9] = [
        (b"\r\n", b"\r\n"),
        (b"\r\r\n", b"\r\r\n"),
        (b"\ra\n", b"a\r\n"),
        (b"\0\n", b"\0\n"),
        (b"a\0b\n", b"b\0a\n"),
        (b"\0\0\r\n", b"\0\0\r\n"),
        (b"\n", b"\n"),
        (b"\xff\0\xfe\n", b"\xfe\0\xff\n"),
        ("\0é\r\n".as_bytes(), "é\0\r\n".as_bytes()),
    ];
    let mut c = LineClient::connect(addr).expect("connect");
    for (request, want) in cases {
        c.send(request).unwrap();
        let got = c.read_reply().unwrap().expect("a reply");
        assert_eq!(got, want, "reply to {request:?}");
    }
    // A lone `\r` as the last line, without `\n`, at the end of input.
    c.send(b"\r").unwrap();
    c.shutdown_write();
    assert_eq!(
        c.read_to_eof().unwrap(),
        b"\r\n",
        "reply to a final lone \\r"
    );
    canary.check(0);
    assert_recovered(&s, addr, &worker);
}

#[test]
fn a_worker_at_max_conns_stops_accepting_without_spinning_and_resumes() {
    let (s, addr, worker) = server(&["--max-conns", "5"]);
    let mut held: Vec<LineClient<TcpStream>> = (0..5)
        .map(|i| {
            let mut c = LineClient::connect(addr).expect("connect");
            let line = format!("held {i}");
            assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
            c
        })
        .collect();
    // The sixth connects (the kernel queues it) but is not accepted while the worker
    // is full: its line gets no reply.
    let mut waiting = LineClient::connect(addr).expect("connect");
    waiting
        .stream()
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    waiting.send_line("queued").unwrap();
    let cpu_before = cpu_time(worker.pid).expect("worker cpu");
    let early = waiting.read_reply();
    assert!(
        early.is_err(),
        "a full worker must not accept: got {early:?} within 800 ms"
    );
    let spent = cpu_time(worker.pid).expect("worker cpu") - cpu_before;
    assert!(
        spent < Duration::from_millis(200),
        "a full worker must not spin: {spent:?} of CPU in 800 ms"
    );
    // One leaves: the queued connection is accepted and answered.
    drop(held.pop());
    waiting
        .stream()
        .set_read_timeout(Some(READ_TIMEOUT))
        .unwrap();
    assert_eq!(
        waiting.read_reply().expect("a reply once a place is free"),
        Some(b"deueuq\n".to_vec())
    );
    drop(held);
    drop(waiting);
    assert_recovered(&s, addr, &worker);
}
