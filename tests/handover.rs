//! Live connection hand-over: clients that never reconnect see no end of file, no
//! reset, every reply exactly once and in order, through reloads, resizes,
//! recycling and binary upgrades; the fallbacks (a stop meanwhile, --handover off, a successor of another format) drain as before,
//! losing nothing; and no descriptor leaks.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::time::Duration;

use common::load::{Load, LoadShape};
use common::sticky::Sticky;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Descriptors a process has open.
fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn hup_five_times_moves_every_connection_live() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--graceful-timeout", "10"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let clients = Sticky::start(addr);
    clients.wait_more(300, SOON);
    for round in 1..=5 {
        let old = s.wait_workers(2);
        s.signal(Signal::SIGHUP);
        s.wait_for_log_nth("all 2 workers accepting", round + 1, SOON);
        wait_until("the old workers to be gone", SOON, || {
            clients.assert_no_failure_yet();
            old.iter().all(|w| !alive(w.pid))
        });
        clients.wait_more(200, SOON);
    }
    assert!(s.count_log("handed over ") >= 5, "{}", s.log());
    let replies = clients.finish();
    eprintln!("{replies} replies through 5 HUPs");
    assert_eq!(s.count_log("not taken in time"), 0, "{}", s.log());
}

#[test]
fn ttin_ttou_five_times_moves_every_connection_live() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--graceful-timeout", "10"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let clients = Sticky::start(addr);
    clients.wait_more(300, SOON);
    for round in 1..=5 {
        s.signal(Signal::SIGTTIN);
        s.wait_for_log_nth("SIGTTIN: workers: 2 -> 3", round, SOON);
        s.wait_workers(3);
        clients.wait_more(100, SOON);
        s.signal(Signal::SIGTTOU);
        s.wait_for_log_nth("SIGTTOU: workers: 3 -> 2", round, SOON);
        s.wait_workers(2);
        clients.wait_more(100, SOON);
    }
    clients.finish();
    assert_eq!(s.count_log("not taken in time"), 0, "{}", s.log());
}

#[test]
fn max_requests_recycling_moves_every_connection_live() {
    let s = Server::start(&[
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--max-requests",
        "500",
        "--max-requests-jitter",
        "100",
    ]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let clients = Sticky::start(addr);
    wait_until("six workers recycled", Duration::from_secs(30), || {
        clients.assert_no_failure_yet();
        s.count_log("reached --max-requests; replacing it") >= 6
    });
    clients.finish();
    assert!(s.count_log("handed over ") >= 1, "{}", s.log());
}

#[test]
fn usr2_moves_every_connection_to_the_new_masters_workers() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let clients = Sticky::start(addr);
    clients.wait_more(300, SOON);
    s.signal(Signal::SIGUSR2);
    let started = s.wait_for_log("upgrade: started ", SOON);
    let new_pid: i32 = started
        .rsplit_once("as pid ")
        .unwrap()
        .1
        .trim()
        .parse()
        .unwrap();
    let line = s.wait_for_log("is ready; retiring", SOON);
    assert!(line.contains("handing the connections over"), "{line}");
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    clients.wait_more(300, SOON);
    let new_workers = wait_workers_of(new_pid, 2);
    clients.finish();
    assert!(s.count_log("to gen 2") >= 1, "{}", s.log());
    let held: usize = new_workers.iter().map(|w| socket_fd_count(w.pid)).sum();
    assert!(
        held >= 4,
        "the new workers hold the 4 connections: {held} sockets"
    );
    kill(Pid::from_raw(new_pid), Signal::SIGTERM).unwrap();
    wait_until("the new master to exit", SOON, || !alive(new_pid));
}

/// A load whose clients may reconnect (a drain closes connections): what the
/// fallbacks are held to — nothing lost, nothing failed.
fn reconnecting_load(addr: std::net::SocketAddr) -> Load {
    Load::start(
        addr,
        LoadShape {
            persistent: 8,
            per_request: 2,
            ..LoadShape::default()
        },
    )
}

#[test]
fn with_handover_off_connections_are_drained_as_before() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--handover", "off"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let load = reconnecting_load(addr);
    load.wait_replies(300, SOON);
    s.signal(Signal::SIGHUP);
    s.wait_for_log_nth("all 2 workers accepting", 2, SOON);
    load.wait_replies(300, SOON);
    let report = load.stop();
    report.assert_clean();
    assert!(
        report.retries > 0,
        "a drain makes clients reconnect: {report}"
    );
    assert_eq!(s.count_log("handed over"), 0);
    assert!(s.count_log("draining its connections") >= 2);
}

/// `-w 2` under load; worker[0] (the only one to stay) is stopped with SIGSTOP, then
/// TTOU retires worker[1], whose hand-over has nobody to take it.
fn retire_worker_1_while_worker_0_is_stopped() -> (Server, std::net::SocketAddr, Load, Vec<Worker>)
{
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let load = reconnecting_load(addr);
    load.wait_replies(300, SOON);
    let workers = s.wait_workers(2);
    signal_pid(workers[0].pid, Signal::SIGSTOP);
    wait_until("worker[0] to be stopped", SOON, || {
        matches!(proc_state(workers[0].pid), Some('T' | 't'))
    });
    s.signal(Signal::SIGTTOU);
    (s, addr, load, workers)
}

#[test]
fn term_during_a_hand_over_drains_everything_and_exits() {
    let (s, _addr, load, workers) = retire_worker_1_while_worker_0_is_stopped();
    s.wait_for_log("retiring: handing my connections over", SOON);
    // worker[1] waits for a taker that cannot come: stop the server meanwhile.
    s.signal(Signal::SIGTERM);
    s.wait_for_log("SIGTERM: graceful stop", SOON);
    signal_pid(workers[0].pid, Signal::SIGCONT);
    assert_eq!(s.wait_exit(SOON).code(), Some(0), "{}", s.log());
    let report = load.stop();
    eprintln!("load: {report}");
    assert_eq!(
        report.resets + report.wrong + report.missing + report.timeouts + report.errors,
        0,
        "{report}"
    );
}

#[test]
fn usr2_to_a_binary_of_another_hand_over_format_drains_instead() {
    // The "new binary" drops the hand-over queue it is offered (as a binary that
    // does not know this format would) and says it takes no connections.
    let dir = temp_path("handover-format");
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let exe = dir.join("raasd");
    let copied = Command::new("cp").arg(BIN).arg(&exe).status().expect("cp");
    assert!(copied.success());
    let s = Server::start_program(&exe, &["-w", "2", "-l", "127.0.0.1:0"], &[], |_| {});
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let load = reconnecting_load(addr);
    load.wait_replies(300, SOON);
    let script = format!("#!/bin/sh\nunset RAASD_HANDOFF\nexec {BIN} \"$@\" --handover off\n");
    install_script(&exe, &script);
    s.signal(Signal::SIGUSR2);
    let line = s.wait_for_log("is ready; retiring", SOON);
    assert!(line.contains("draining the connections"), "{line}");
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    load.wait_replies(300, SOON);
    let report = load.stop();
    report.assert_clean();
    assert!(report.retries > 0, "the old workers drained: {report}");
}

#[test]
fn twenty_hand_overs_leak_no_descriptor() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let clients = Sticky::start(addr);
    clients.wait_more(200, SOON);
    let baseline_master = fd_count(s.pid());
    let baseline_workers: Vec<usize> = s.wait_workers(2).iter().map(|w| fd_count(w.pid)).collect();
    for round in 1..=10 {
        s.signal(Signal::SIGHUP);
        s.wait_for_log_nth("all 2 workers accepting", round + 1, SOON);
        wait_until("one generation only", SOON, || {
            clients.assert_no_failure_yet();
            s.workers().len() == 2
        });
        clients.wait_more(50, SOON);
    }
    // 20 retiring workers handed their connections over; the totals are back.
    let workers = s.wait_workers(2);
    let per_worker: BTreeMap<i32, usize> =
        workers.iter().map(|w| (w.pid, fd_count(w.pid))).collect();
    let total: usize = per_worker.values().sum();
    assert_eq!(
        fd_count(s.pid()),
        baseline_master,
        "the master's descriptors"
    );
    assert_eq!(
        total,
        baseline_workers.iter().sum::<usize>(),
        "the workers' descriptors: now {per_worker:?}, before {baseline_workers:?}"
    );
    clients.finish();
}
