//! Serving under load: many concurrent pipelining clients, and how connections spread
//! over the workers.

mod common;

use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The two tests here run one at a time: the balance test measures how the server
/// spreads connections, which CPU contention from 100 client threads would distort.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn hundred_concurrent_clients_pipelining_hundred_lines_each() {
    const CLIENTS: usize = 100;
    const LINES: usize = 100;
    let _alone = one_at_a_time();
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let start = Instant::now();
    let barrier = std::sync::Barrier::new(CLIENTS);
    let results: Vec<Result<usize, String>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<usize, String> {
                    barrier.wait();
                    let mut c = LineClient::connect(addr).map_err(|e| format!("connect: {e}"))?;
                    // Unique, varied lines (some non-ASCII) so a mixed-up reply shows.
                    let lines: Vec<String> = (0..LINES)
                        .map(|i| format!("client {client:03} line {i:03} {}ü🇩🇪", "x".repeat(i % 7)))
                        .collect();
                    let mut request = Vec::new();
                    for l in &lines {
                        request.extend_from_slice(l.as_bytes());
                        request.push(b'\n');
                    }
                    c.send(&request).map_err(|e| format!("send: {e}"))?;
                    for (i, l) in lines.iter().enumerate() {
                        let want = format!("{}\n", reverse_graphemes(l));
                        match c.read_reply() {
                            Ok(Some(r)) if r == want.as_bytes() => {}
                            Ok(Some(r)) => {
                                return Err(format!(
                                    "client {client} reply {i}: got {:?}, want {want:?}",
                                    String::from_utf8_lossy(&r)
                                ));
                            }
                            Ok(None) => return Err(format!("client {client}: EOF at reply {i}")),
                            Err(e) => return Err(format!("client {client} reply {i}: {e}")),
                        }
                    }
                    c.shutdown_write();
                    match c.read_to_eof() {
                        Ok(rest) if rest.is_empty() => Ok(LINES),
                        Ok(rest) => Err(format!("client {client}: {} extra bytes", rest.len())),
                        Err(e) => Err(format!("client {client} waiting for EOF: {e}")),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed, e.g.: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let answered: usize = results.iter().map(|r| *r.as_ref().unwrap()).sum();
    assert_eq!(answered, CLIENTS * LINES);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "10,000 short lines took {:?}",
        start.elapsed()
    );
}

#[test]
fn persistent_connections_spread_evenly_over_two_workers() {
    const CONNS: usize = 100;
    let _alone = one_at_a_time();
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);
    let before: Vec<usize> = workers.iter().map(|w| socket_fd_count(w.pid)).collect();

    // One after another: each does one roundtrip (so a worker has accepted it) before
    // the next is opened; all are kept open. Before each connect both workers are back
    // in epoll_wait, so what is measured is how the server picks a worker, not which
    // worker the CPU scheduler happened to leave running.
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        wait_until("both workers to wait in epoll_wait", SOON, || {
            workers.iter().all(|w| sleeps_in_epoll_wait(w.pid))
        });
        let mut c = LineClient::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        let line = format!("connection {i}");
        assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
        conns.push(c);
    }

    let after: Vec<usize> = workers.iter().map(|w| socket_fd_count(w.pid)).collect();
    assert_eq!(
        s.wait_workers(2),
        workers,
        "the workers must not change while counting"
    );
    let held: Vec<isize> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| *a as isize - *b as isize)
        .collect();
    assert_eq!(
        held.iter().sum::<isize>(),
        CONNS as isize,
        "socket fds gained by the workers (before {before:?}, after {after:?})"
    );
    for (w, n) in workers.iter().zip(&held) {
        assert!(
            (35..=65).contains(n),
            "worker[{}] (pid {}) holds {n} of {CONNS} connections; all: {held:?}",
            w.slot,
            w.pid
        );
    }
    // Every connection is still served.
    for (i, c) in conns.iter_mut().enumerate() {
        let line = format!("again {i}");
        assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
    }
}

#[test]
fn a_burst_of_persistent_connections_spreads_from_the_first_ones() {
    let _alone = one_at_a_time();
    for (workers_n, conns_n, slack) in [(2usize, 8usize, 1isize), (3, 36, 3)] {
        let w_arg = workers_n.to_string();
        let s = Server::start(&["-w", &w_arg, "-l", "127.0.0.1:0"]);
        let addr = s.addr();
        s.wait_for_log(&format!("all {workers_n} workers accepting"), SOON);
        let workers = s.wait_workers(workers_n);
        let before: Vec<usize> = workers.iter().map(|w| socket_fd_count(w.pid)).collect();
        wait_until("every worker to wait in epoll_wait", SOON, || {
            workers.iter().all(|w| sleeps_in_epoll_wait(w.pid))
        });
        // All at once: the kernel completes them into the accept queue before a
        // worker has run.
        let mut conns: Vec<LineClient<std::net::TcpStream>> = (0..conns_n)
            .map(|i| LineClient::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}")))
            .collect();
        let mut held: Vec<isize> = Vec::new();
        wait_until("every connection accepted", SOON, || {
            held = workers
                .iter()
                .zip(&before)
                .map(|(w, b)| socket_fd_count(w.pid) as isize - *b as isize)
                .collect();
            held.iter().sum::<isize>() == conns_n as isize
        });
        // What the step back promises: no worker keeps more than its share (+ slack)
        // of a burst. (Fewer is not a fault: a worker the scheduler left out while the
        // burst was taken — seen on a loaded 2-core machine as [8, 14, 14] — gets the
        // next connections; the bound on the others still leaves it a part.)
        let share = (conns_n / workers_n) as isize;
        for (w, n) in workers.iter().zip(&held) {
            assert!(
                (1..=share + slack).contains(n),
                "-w {workers_n}, {conns_n} connections at once: worker[{}] holds {n} \
                 (want 1 to {share} + {slack}); all: {held:?}",
                w.slot
            );
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let line = format!("burst {i}");
            assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
        }
    }
}
