//! Stopping and rotating: TERM and QUIT drain, INT stops at once, HUP replaces every
//! worker without a single failed request.

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn line_for(i: usize) -> String {
    format!("mid-stream line {i:04} ~ äöü")
}

/// A graceful stop (TERM or QUIT) while one client is mid-stream and another idles.
fn graceful_stop_drains(sig: Signal) {
    const LINES: usize = 1000;
    const READ_FIRST: usize = 10;
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--graceful-timeout", "20"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);

    // An idle persistent connection: it must be closed by the server, not block the stop.
    let mut idle = LineClient::connect(addr).expect("connect idle");
    assert_eq!(idle.roundtrip("idle"), "eldi");

    let mut c = LineClient::connect(addr).expect("connect");
    let mut request = Vec::new();
    for i in 0..LINES {
        request.extend_from_slice(line_for(i).as_bytes());
        request.push(b'\n');
    }
    c.send(&request).expect("writing 1000 lines");
    for i in 0..READ_FIRST {
        assert_eq!(c.read_line(), reverse_graphemes(&line_for(i)), "reply {i}");
    }

    s.signal(sig);

    for i in READ_FIRST..LINES {
        match c.read_reply() {
            Ok(Some(r)) => {
                let want = format!("{}\n", reverse_graphemes(&line_for(i)));
                assert!(
                    r == want.as_bytes(),
                    "reply {i} after {sig:?}: got {:?}, want {want:?}",
                    String::from_utf8_lossy(&r)
                );
            }
            Ok(None) => panic!("EOF after {sig:?} at reply {i} of {LINES}"),
            Err(e) => panic!("error after {sig:?} at reply {i} of {LINES}: {e}"),
        }
    }
    c.expect_eof();
    idle.expect_eof();

    let status = s.wait_exit(SOON);
    assert_eq!(
        status.code(),
        Some(0),
        "master exit status after {sig:?}: {status:?}"
    );
    let err = TcpStream::connect(addr).expect_err("the port must refuse after the stop");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    for w in &workers {
        assert_eq!(
            proc_state(w.pid),
            None,
            "worker[{}] pid {} is gone",
            w.slot,
            w.pid
        );
    }
    s.wait_output_closed(SOON);
}

#[test]
fn term_answers_every_line_read_then_exits_0() {
    graceful_stop_drains(Signal::SIGTERM);
}

#[test]
fn quit_answers_every_line_read_then_exits_0() {
    graceful_stop_drains(Signal::SIGQUIT);
}

#[test]
fn term_with_no_clients_exits_promptly() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let workers = s.wait_workers(3);
    let start = Instant::now();
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "an idle server took {:?} to stop on TERM",
        start.elapsed()
    );
    for w in &workers {
        assert_eq!(proc_state(w.pid), None, "worker pid {} is gone", w.pid);
    }
    let err = TcpStream::connect(addr).expect_err("refused after the stop");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn int_stops_master_and_workers_at_once() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0", "--graceful-timeout", "30"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let workers = s.wait_workers(3);
    // A connection mid-conversation does not delay a quick stop.
    let mut c = LineClient::connect(addr).expect("connect");
    assert_eq!(c.roundtrip("hold on"), "no dloh");
    c.send(b"unfinished line without newline").expect("send");

    let start = Instant::now();
    s.signal(Signal::SIGINT);
    s.wait_exit(Duration::from_secs(2));
    wait_until(
        "every worker to be gone after INT",
        Duration::from_secs(2),
        || workers.iter().all(|w| proc_state(w.pid).is_none()),
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let err = TcpStream::connect(addr).expect_err("refused after INT");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn hup_replaces_every_worker_without_a_failed_request() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0", "--graceful-timeout", "10"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let old = s.wait_workers(3);
    let load = common::load::Load::start(
        addr,
        common::load::LoadShape {
            persistent: 4,
            per_request: 4,
            ..Default::default()
        },
    );
    // About a second of traffic before the HUP.
    let started = Instant::now();
    wait_until(
        "a second of traffic before HUP",
        Duration::from_secs(10),
        || {
            load.assert_no_failure_yet("before HUP");
            started.elapsed() >= Duration::from_secs(1) && load.replies() >= 100
        },
    );
    let before_hup = load.replies();
    s.signal(Signal::SIGHUP);
    let hup_at = Instant::now();
    // A complete new set: same slots, no old pid among them, every old one gone.
    let mut now = Vec::new();
    let rotated = poll_until(SOON, || {
        load.assert_no_failure_yet("during the rotation");
        now = s.workers();
        now.iter().map(|w| w.slot).eq(0..3)
            && now.iter().all(|w| !old.iter().any(|o| o.pid == w.pid))
            && old.iter().all(|o| proc_state(o.pid).is_none())
    });
    let rotation_time = hup_at.elapsed();
    assert!(
        rotated,
        "no complete rotation within {SOON:?} of HUP; old {old:?}, now {now:?}"
    );
    s.wait_for_log_nth("all 3 workers accepting", 2, SOON);
    // About a second of traffic after the rotation.
    let after_rotation = load.replies();
    wait_until(
        "a second of traffic after the rotation",
        Duration::from_secs(10),
        || {
            load.assert_no_failure_yet("after the rotation");
            hup_at.elapsed() >= rotation_time + Duration::from_secs(1)
                && load.replies() >= after_rotation + 100
        },
    );
    let report = load.stop();
    eprintln!("HUP: {before_hup} replies before, rotation took {rotation_time:?}; {report}");
    report.assert_clean();
    let new = s.wait_workers(3);
    for (o, n) in old.iter().zip(&new) {
        assert_eq!(o.slot, n.slot);
        assert_eq!(title_core(&n.title), format!("raasd worker[{}]", n.slot));
        assert_ne!(o.pid, n.pid);
    }
    assert!(
        pid_set(&old).is_disjoint(&pid_set(&new)),
        "old {old:?} new {new:?}"
    );
    assert!(s.try_status().is_none(), "the master survives a HUP");
    assert!(report.ok >= 200);
}

#[test]
fn term_under_connect_per_request_load_resets_no_accepted_connection() {
    // Clients connecting for every request while the server stops: once the port is
    // closed a connect may be refused (the server is down), but a connection the
    // kernel completed must be answered, never reset.
    // Before the fix, 13 of 72 rounds cut a connection; 10 rounds catch it 86 % of the time.
    const ROUNDS: usize = 10;
    let mut resets = Vec::new();
    for round in 0..ROUNDS {
        let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
        let addr = s.addr();
        s.wait_for_log("all 2 workers accepting", SOON);
        let load = common::load::Load::start(
            addr,
            common::load::LoadShape {
                persistent: 0,
                per_request: 16,
                ..Default::default()
            },
        );
        load.wait_replies(500, SOON);
        s.signal(Signal::SIGTERM);
        assert_eq!(s.wait_exit(SOON).code(), Some(0));
        let report = load.stop();
        eprintln!("round {round}: {report}");
        resets.push(report.resets + report.errors + report.wrong + report.missing);
    }
    assert!(
        resets.iter().all(|&n| n == 0),
        "connections reset (or cut) by a stop, per round: {resets:?}"
    );
}
