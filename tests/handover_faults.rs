//! The hand-over when something goes wrong in the middle: a sender or a receiver
//! stopped (SIGSTOP: a debugger, swapping, CPU throttling) or killed at the worst
//! moment, receivers at --max-conns, a batch nobody takes. Each connection must end
//! with exactly one owner (read from /proc: exactly one process holds its socket) or
//! with its client told; a stalled worker delays only its own clients.

mod common;

use std::time::{Duration, Instant};

use common::crowd::{Crowd, Exchange};
use common::*;
use nix::sys::signal::Signal;

/// Longer than any timeout of the hand-over (a batch is taken back after 1 s).
const STALL: Duration = Duration::from_secs(3);
/// How long a client of a worker that runs may wait for a reply.
const PROMPT: Duration = Duration::from_secs(1);

/// Spins until `cond` (no sleep: the moment matters), or panics after SOON.
fn catch(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < SOON, "never saw {what}");
    }
}

/// Every open client of `crowd` answers, and its socket is held by exactly one of
/// the processes of `s` (master and workers).
fn assert_each_served_by_one(s: &Server, crowd: &mut Crowd) {
    let failed = crowd.exchange_all(SOON);
    assert!(
        failed.is_empty(),
        "{} clients failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let mut pids = vec![s.pid()];
    pids.extend(children_of(s.pid()));
    let holders = crowd.holders(&pids);
    let wrong: Vec<&(usize, Vec<i32>)> = holders.iter().filter(|(_, h)| h.len() != 1).collect();
    assert!(
        wrong.is_empty(),
        "{} connections not held by exactly one process: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// `-w 2` with `count` clients; worker[1] retires (TTOU) while worker[0], which
/// stays, is stopped, so the batches wait in the queue; once they are out, the
/// sender is stopped in turn, and worker[0] continued: it takes and claims them, and
/// nobody answers its claims. Returns the server, the clients, which clients each
/// worker had, (receiver, sender) pids, and the guard of the stopped sender.
#[allow(clippy::type_complexity)]
fn claims_pending_with_the_sender_stopped(
    count: usize,
) -> (Server, Crowd, (Vec<usize>, Vec<usize>), (i32, i32), Stopped) {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "0"]);
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);
    let (receiver, sender) = (workers[0].pid, workers[1].pid);
    let mut crowd = Crowd::open(s.addr(), count);
    assert!(crowd.exchange_all(SOON).is_empty());
    let had = (crowd.held_by(receiver), crowd.held_by(sender));
    assert!(
        had.1.len() > count / 4,
        "connections did not spread: {had:?}"
    );
    let mut stopped = Stopped::new();
    stopped.stop(receiver);
    let sender_sockets = socket_fd_count(sender);
    s.signal(Signal::SIGTTOU);
    // Each batch sent leaves the sender one more socket (its end of the batch's
    // settle pair), until the batch is settled a second later.
    catch("the sender offer a batch", || {
        socket_fd_count(sender) > sender_sockets
    });
    stopped.stop(sender);
    let receiver_sockets = socket_fd_count(receiver);
    stopped.cont(receiver);
    wait_until("worker[0] to claim the batches", SOON, || {
        socket_fd_count(receiver) > receiver_sockets
    });
    (s, crowd, had, (receiver, sender), stopped)
}

#[test]
fn a_sender_stopped_mid_hand_over_loses_nothing_and_stalls_nobody_else() {
    let (s, mut crowd, (on_receiver, _), (receiver, sender), mut stopped) =
        claims_pending_with_the_sender_stopped(1000);
    let claimed = crowd
        .holders(&[receiver, sender])
        .iter()
        .filter(|(_, h)| h.len() == 2)
        .count();
    assert!(claimed > 0, "no claim is pending");
    // Long past every timeout: worker[0]'s own clients are answered promptly.
    let start = Instant::now();
    while start.elapsed() < STALL {
        for &i in &on_receiver {
            assert_eq!(
                crowd.exchange(i, PROMPT),
                Exchange::Ok,
                "client {i} of worker[0]"
            );
        }
    }
    stopped.cont(sender);
    wait_until("the retiring worker to finish", SOON, || !alive(sender));
    assert_each_served_by_one(&s, &mut crowd);
    eprintln!("{claimed} connections were claimed and waiting when the sender stopped");
}

#[test]
fn a_receiver_killed_right_after_taking_a_batch_ends_only_its_connections() {
    let (s, mut crowd, (on_receiver, on_sender), (receiver, sender), mut stopped) =
        claims_pending_with_the_sender_stopped(400);
    signal_pid(receiver, Signal::SIGKILL);
    wait_until("worker[0] to be gone", SOON, || !alive(receiver));
    stopped.cont(sender);
    // Its own clients end; the sender's, which it had claimed, stay with the sender.
    for &i in &on_receiver {
        assert!(
            matches!(crowd.exchange(i, SOON), Exchange::Closed(_)),
            "client {i}"
        );
        crowd.close(i);
    }
    for &i in &on_sender {
        assert_eq!(
            crowd.exchange(i, SOON),
            Exchange::Ok,
            "client {i} of the sender"
        );
    }
    assert_each_served_by_one(&s, &mut crowd);
}

#[test]
fn a_receiver_stopped_during_a_hup_delays_only_its_own_clients() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "0"]);
    s.wait_for_log("all 2 workers accepting", SOON);
    let mut crowd = Crowd::open(s.addr(), 600);
    assert!(crowd.exchange_all(SOON).is_empty());
    // A new worker is stopped as soon as it appears. If it was quick enough to claim
    // every batch first, all clients are its own and there is nobody else to check:
    // let it go and try another HUP.
    let mut checked = 0;
    for _ in 0..5 {
        let old: std::collections::BTreeSet<i32> = children_of(s.pid()).into_iter().collect();
        s.signal(Signal::SIGHUP);
        let mut stopped = 0;
        catch("a new worker", || {
            stopped = children_of(s.pid())
                .into_iter()
                .find(|p| !old.contains(p))
                .unwrap_or(0);
            stopped != 0
        });
        let mut guard = Stopped::new();
        guard.stop(stopped);
        // While it is stopped, every client it does not hold is served.
        let start = Instant::now();
        while start.elapsed() < STALL {
            let held = crowd.held_by(stopped);
            if held.len() == crowd.len() {
                break;
            }
            for i in 0..crowd.len() {
                if !held.contains(&i) {
                    assert_eq!(crowd.exchange(i, PROMPT), Exchange::Ok, "client {i}");
                    checked += 1;
                }
            }
        }
        guard.cont(stopped);
        // Settled: every connection with exactly one process. (A batch whose wake-up
        // went to the stopped worker may have gone back to its sender, which serves
        // it on: its old worker may stay.)
        wait_until("every connection to have one holder", SOON, || {
            let mut pids = vec![s.pid()];
            pids.extend(children_of(s.pid()));
            crowd.holders(&pids).iter().all(|(_, h)| h.len() == 1)
        });
        assert_each_served_by_one(&s, &mut crowd);
        if checked > 0 {
            break;
        }
    }
    assert!(
        checked > 0,
        "the stopped receiver held every client in 5 HUPs"
    );
}

#[test]
fn receivers_at_max_conns_take_the_connections_of_a_retiring_worker() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--max-conns", "100"]);
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);
    let mut crowd = Crowd::open(s.addr(), 150);
    assert!(crowd.exchange_all(SOON).is_empty());
    s.signal(Signal::SIGTTOU);
    wait_until("worker[1] to hand over and exit", SOON, || {
        !alive(workers[1].pid)
    });
    assert_each_served_by_one(&s, &mut crowd);
    assert_eq!(crowd.held_by(workers[0].pid).len(), 150);
    s.wait_for_log("above --max-conns 100", SOON);
    assert_eq!(s.count_log("not taken in time"), 0, "{}", s.log());
}

#[test]
fn a_batch_nobody_takes_is_served_until_its_clients_leave() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "0"]);
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);
    let (stopped, retiring) = (workers[0].pid, workers[1].pid);
    let mut crowd = Crowd::open(s.addr(), 200);
    assert!(crowd.exchange_all(SOON).is_empty());
    let kept = crowd.held_by(retiring);
    assert!(!kept.is_empty());
    // worker[0], the only one to stay, is stopped: nobody can take the batch.
    let mut guard = Stopped::new();
    guard.stop(stopped);
    s.signal(Signal::SIGTTOU);
    s.wait_for_log("not taken in time, served here to their end", SOON);
    // Served on, for as long as they stay (not answered and closed).
    assert_stays("the retiring worker to serve its clients", STALL, || {
        kept.iter()
            .all(|&i| crowd.exchange(i, PROMPT) == Exchange::Ok)
            && alive(retiring)
    });
    for &i in &kept {
        crowd.close(i);
    }
    wait_until(
        "the retiring worker to exit once its clients left",
        SOON,
        || !alive(retiring),
    );
    guard.cont(stopped);
    assert_each_served_by_one(&s, &mut crowd);
}
