//! Worker health and governance: heartbeat timeouts, a master that was stopped,
//! crash-loop backoff, --max-requests and --max-worker-memory recycling, the death of
//! the master, dropping privileges, and the counters in the titles.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::load::{Load, LoadShape};
use common::*;
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `N conns` and `M requests` of a worker title `raasd worker[0] gen 1: 3 conns, 30 requests`.
fn title_counters(title: &str) -> Option<(u64, u64)> {
    // `N conns, M requests`, then maybe `, took over K` and `, handed over ...`.
    let status = title.split_once(": ")?.1;
    let mut parts = status.split(", ");
    let (conns, served) = (parts.next()?, parts.next()?);
    Some((
        conns.strip_suffix(" conns")?.parse().ok()?,
        served.strip_suffix(" requests")?.parse().ok()?,
    ))
}

/// The `Uid:` or `Gid:` line of /proc/PID/status as its four numbers
/// (real, effective, saved, filesystem).
fn proc_ids(pid: i32, key: &str) -> Option<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_whitespace()
        .map(|n| n.parse().ok())
        .collect()
}

/// The number between `before` and `after` in `line`.
fn number_between(line: &str, before: &str, after: &str) -> Option<u64> {
    let rest = &line[line.find(before)? + before.len()..];
    rest[..rest.find(after)?].trim().parse().ok()
}

/// A paced load of the shared harness: `persistent` clients sending `batch` lines
/// every `pause`, `per_request` clients connecting for a line every `pause`.
fn paced_load(
    addr: SocketAddr,
    persistent: usize,
    batch: usize,
    per_request: usize,
    pause: Duration,
) -> Load {
    Load::start(
        addr,
        LoadShape {
            persistent,
            per_request,
            depth: batch,
            pause,
            ..LoadShape::default()
        },
    )
}

// ---------------------------------------------------------------------------------------
// Heartbeat timeout
// ---------------------------------------------------------------------------------------

#[test]
fn a_stopped_worker_is_killed_and_replaced_after_the_timeout() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "1"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let before = s.wait_workers(2);
    let victim = before[1].pid;
    let mut stopped = Stopped::new();

    stopped.stop(victim);
    let stopped_at = Instant::now();
    let mut now = Vec::new();
    let replaced = poll_until(Duration::from_secs(5), || {
        now = s.workers();
        now.iter().any(|w| w.slot == 1 && w.pid != victim)
    });
    let took = stopped_at.elapsed();
    assert!(
        replaced,
        "worker[1] pid {victim}, stopped for {took:?} with --timeout 1, was not replaced; \
         workers: {now:?}"
    );
    // Its last beat was at most a heartbeat interval (250 ms) before the stop.
    assert!(
        took >= Duration::from_millis(700),
        "the stopped worker was replaced after {took:?}, before --timeout 1 could expire"
    );
    let line = s.wait_for_log(
        &format!("worker[1] pid {victim} missed its heartbeat"),
        SOON,
    );
    assert!(line.contains("killing it"), "{line:?}");
    wait_until("the stopped worker to be killed and reaped", SOON, || {
        proc_state(victim).is_none()
    });
    let after = s.wait_workers(2);
    assert_eq!(after[0], before[0], "worker[0] untouched");
    assert_eq!(title_core(&after[1].title), "raasd worker[1]");
    s.wait_for_log(&format!("spawned worker[1] pid {}", after[1].pid), SOON);
    for line in s.log_lines() {
        assert!(
            !line.contains("missed its heartbeat") || line.contains(&format!("pid {victim} ")),
            "a worker other than the stopped one was killed: {line:?}"
        );
    }
    for i in 0..10 {
        let l = format!("after the heartbeat kill {i}");
        assert_eq!(roundtrip(addr, &l), reverse_ascii(&l));
    }
    eprintln!("stopped worker replaced after {took:?}");
}

/// A stuck worker is killed once: one SIGKILL, one log line. (Between the kill and
/// the reaping, the master can wake up: the kernel closes a dying process's
/// descriptors, its control channel among them, before it becomes a zombie, and the
/// heartbeat is still stale then. The stuck worker here holds 2000 client connections,
/// whose closing widens that window.)
/// Milliseconds since the epoch of a log line's `[2026-11-27T18:18:47.860Z ...` stamp.
fn log_time_ms(line: &str) -> i64 {
    let stamp = line
        .strip_prefix('[')
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no time stamp in {line:?}"));
    let secs = parse_rfc3339_utc(stamp).unwrap_or_else(|| panic!("bad stamp {stamp:?}"));
    let millis: i64 = stamp
        .split_once('.')
        .and_then(|(_, f)| f.trim_end_matches('Z').parse().ok())
        .unwrap_or(0);
    secs * 1000 + millis
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn frozen_workers_show_late_and_are_killed_only_after_the_whole_timeout() {
    const TIMEOUT_MS: i64 = 2000;
    let s = Server::start(&["-w", "6", "-l", "127.0.0.1:0", "--timeout", "2"]);
    let addr = s.addr();
    s.wait_for_log("all 6 workers accepting", SOON);
    let workers = s.wait_workers(6);
    let mut stopped = Stopped::new();
    let mut frozen_at = BTreeMap::new();
    for w in &workers {
        frozen_at.insert(w.pid, unix_ms_now());
        stopped.stop(w.pid);
    }
    wait_title(
        s.pid(),
        &format!("raasd master gen 1: 0/6 workers, 6 late -w 6 {addr}"),
    );
    for w in &workers {
        let line = s.wait_for_log(&format!("pid {} missed its heartbeat", w.pid), SOON);
        let unresponsive = log_time_ms(&line) - frozen_at[&w.pid];
        assert!(
            unresponsive >= TIMEOUT_MS,
            "worker pid {} was killed {unresponsive} ms after it froze (--timeout 2): {line:?}",
            w.pid
        );
    }
    s.wait_for_log("all 6 workers accepting", SOON);
    wait_title(
        s.pid(),
        &format!("raasd master gen 1: 6/6 workers -w 6 {addr}"),
    );
}

/// One SIGSTOPped worker of two (`--timeout 30`): the title, `ctl status` and the
/// metrics agree that 1 worker accepts and 1 is late.
#[test]
fn a_late_worker_is_late_in_the_title_the_status_and_the_metrics() {
    let (dir, _cleanup) = dir("late");
    let socket = dir.join("ctl.sock");
    let metrics = free_loopback_addr();
    let sock = socket.to_str().unwrap();
    let s = Server::start(&[
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--timeout",
        "30",
        "--control",
        sock,
        "--metrics",
        &metrics,
    ]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let victim = s.wait_workers(2)[1].clone();
    let mut stopped = Stopped::new();
    stopped.stop(victim.pid);
    wait_title(
        s.pid(),
        &format!("raasd master gen 1: 1/2 workers, 1 late -w 2 {addr}"),
    );
    let st = status(&socket);
    assert_eq!(st["master"]["workers_accepting"], 1, "{st}");
    assert_eq!(st["master"]["workers_late"], 1, "{st}");
    let states: Vec<(i64, &str)> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["pid"].as_i64().unwrap(), w["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&(victim.pid as i64, "late")), "{st}");
    let (code, _, body) = http_get(&metrics, "/metrics");
    assert_eq!(code, 200);
    let m = exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(m.sum("raasd_workers_accepting"), Some(1.0), "{body}");
    assert_eq!(m.sum("raasd_workers_late"), Some(1.0), "{body}");
    let (_, table, _) = ctl(&socket, &["status"]);
    assert!(table.contains("1/2 workers accepting, 1 late"), "{table}");
    // Continued, it beats again and is counted again.
    stopped.cont(victim.pid);
    wait_title(
        s.pid(),
        &format!("raasd master gen 1: 2/2 workers -w 2 {addr}"),
    );
    assert_eq!(status(&socket)["master"]["workers_accepting"], 2);
}

#[test]
fn a_stuck_worker_is_killed_once() {
    let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0", "--timeout", "1"]);
    let addr = s.addr();
    s.wait_for_log("1 worker accepting", SOON);
    let victim = s.wait_workers(1).remove(0);
    let baseline = socket_fd_count(victim.pid);
    let clients: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    wait_until("2000 connections accepted", SOON, || {
        socket_fd_count(victim.pid) >= baseline + 2000
    });
    let mut stopped = Stopped::new();
    stopped.stop(victim.pid);
    wait_until("the stuck worker to be killed and reaped", SOON, || {
        proc_state(victim.pid).is_none()
    });
    let after = s.wait_workers(1);
    assert_ne!(after[0].pid, victim.pid);
    drop(clients);
    // Logged after the kill lines: the captured log holds them all then.
    s.wait_for_log(&format!("spawned worker[0] pid {}", after[0].pid), SOON);
    let kills: Vec<String> = s
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("missed its heartbeat"))
        .collect();
    assert_eq!(
        kills.len(),
        1,
        "pid {} was killed {} times for one missed heartbeat:\n{}",
        victim.pid,
        kills.len(),
        kills.join("\n")
    );
}

#[test]
fn idle_workers_are_never_killed_for_their_heartbeat() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "1"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let before = s.wait_workers(2);
    // Nothing must happen: that takes a window, here five timeouts long.
    assert_stays(
        "the same two idle workers, none killed",
        Duration::from_secs(5),
        || s.workers() == before && s.count_log("missed its heartbeat") == 0,
    );
    assert_eq!(roundtrip(addr, "still here"), "ereh llits");
}

#[test]
fn a_master_stopped_longer_than_the_timeout_kills_no_healthy_worker() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--timeout", "1"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let before = s.wait_workers(2);
    let mut stopped = Stopped::new();

    stopped.stop(s.pid());
    // The master being held up for longer than --timeout is the very situation under
    // test, so this sleep is the test's subject, not a synchronisation: 2.5 timeouts.
    thread::sleep(Duration::from_millis(2500));
    // The workers went on beating (and serving) meanwhile.
    assert_eq!(roundtrip(addr, "master asleep"), "peelsa retsam");
    stopped.cont(s.pid());

    s.wait_for_log("the master was held up", SOON);
    assert_stays(
        "the same workers and no heartbeat kill, 2 s after the master continued",
        Duration::from_secs(2),
        || s.workers() == before && s.count_log("missed its heartbeat") == 0,
    );
    assert_eq!(roundtrip(addr, "master awake"), "ekawa retsam");
}

/// As when the machine is suspended or the service's cgroup is frozen: master and
/// workers are all stopped for longer than --timeout, then all continue (the master
/// first, the harder order). Healthy workers must not be killed for the lost time.
#[test]
fn a_whole_frozen_tree_continued_kills_no_worker() {
    let s = Server::start(&["-w", "4", "-l", "127.0.0.1:0", "--timeout", "1"]);
    let addr = s.addr();
    s.wait_for_log("all 4 workers accepting", SOON);
    let before = s.wait_workers(4);
    let mut stopped = Stopped::new();

    stopped.stop(s.pid());
    for w in &before {
        stopped.stop(w.pid);
    }
    // The freeze itself is the subject: 2.5 timeouts long.
    thread::sleep(Duration::from_millis(2500));
    stopped.cont(s.pid());
    for w in &before {
        stopped.cont(w.pid);
    }

    assert_stays(
        "the same workers and no heartbeat kill, 2 s after the thaw",
        Duration::from_secs(2),
        || s.workers() == before && s.count_log("missed its heartbeat") == 0,
    );
    assert_eq!(roundtrip(addr, "thawed"), "dewaht");
}

// ---------------------------------------------------------------------------------------
// Crash-loop backoff
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ProbeReport {
    replies: u64,
    retries: u64,
    failures: Vec<String>,
    longest_silence: Duration,
}

/// Connects for every line, every ~20 ms, until stopped. A connection that ends in
/// EOF or a reset before its reply is retried (a worker is being SIGKILLed, and a
/// connection it had accepted dies with it); refused or wrong is a failure.
fn probe(addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<ProbeReport> {
    thread::spawn(move || {
        let mut report = ProbeReport::default();
        let mut last_reply = Instant::now();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let line = format!("probe {n}");
            let mut c = match LineClient::connect(addr) {
                Ok(c) => c,
                Err(e) => {
                    report.failures.push(format!("connect: {e}"));
                    break;
                }
            };
            let reply = c.send_line(&line).and_then(|()| c.read_reply());
            match reply {
                Ok(Some(r)) if r == format!("{}\n", reverse_ascii(&line)).as_bytes() => {
                    report.replies += 1;
                    report.longest_silence = report.longest_silence.max(last_reply.elapsed());
                    last_reply = Instant::now();
                }
                Ok(Some(r)) => {
                    report.failures.push(format!(
                        "wrong reply {:?} to {line:?}",
                        String::from_utf8_lossy(&r)
                    ));
                    break;
                }
                Ok(None) => report.retries += 1,
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    report.retries += 1
                }
                Err(e) => {
                    report.failures.push(format!("{line:?}: {e}"));
                    break;
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        report
    })
}

#[test]
fn a_crash_looping_slot_backs_off_while_the_others_serve() {
    const CRASHES: usize = 5;
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let before = s.wait_workers(3);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe(addr, stop.clone());

    let crash_lines = || {
        s.log_lines()
            .into_iter()
            .filter(|l| {
                l.contains("worker[1] pid ") && l.contains(" after its start; respawning in ")
            })
            .count()
    };
    // (victim, time from just before its SIGKILL to seeing its successor)
    let mut gaps: Vec<(i32, Duration)> = Vec::new();
    let mut killed: BTreeSet<i32> = BTreeSet::new();
    let mut victim = before[1].pid;
    loop {
        assert!(
            gaps.len() <= CRASHES + 1,
            "more kills than planned: {gaps:?}"
        );
        let t = Instant::now();
        // A crash (as if the worker aborted at start), not a kill from outside: only
        // a worker failing by itself makes its slot back off.
        signal_pid(victim, Signal::SIGABRT);
        killed.insert(victim);
        let mut next = None;
        wait_until("a new worker[1]", SOON, || {
            next = s
                .workers()
                .into_iter()
                .find(|w| w.slot == 1 && !killed.contains(&w.pid))
                .map(|w| w.pid);
            next.is_some()
        });
        gaps.push((victim, t.elapsed()));
        // The crash line is logged when the victim is reaped, before its respawn.
        if crash_lines() >= CRASHES {
            break;
        }
        victim = next.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let probed = prober.join().expect("the probe thread");

    let lines = s.log_lines();
    let mut delays = Vec::new();
    for &(pid, gap) in &gaps {
        let needle = format!("worker[1] pid {pid} exited unexpectedly (killed by SIGABRT)");
        let line = lines
            .iter()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no log line {needle:?}"));
        let Some(delay) = number_between(line, "respawning in ", " ms") else {
            // Only the first victim, started with the server, may have lived past the
            // crash window: then it is respawned at once, without a delay.
            assert_eq!(
                pid, before[1].pid,
                "a fresh worker killed at once: {line:?}"
            );
            continue;
        };
        let lived = number_between(line, ") ", " ms after its start").expect("lifetime");
        assert!(lived < 1000, "{line:?}");
        assert!(
            gap >= Duration::from_millis(delay),
            "worker[1] came back {gap:?} after the kill of {pid}, before the {delay} ms \
             delay its log line announced: {line:?}"
        );
        assert!(
            // (Generous: the machine may be loaded; without backoff it would be ~0.)
            gap < Duration::from_millis(delay + 2000),
            "worker[1] came back only {gap:?} after the kill of {pid} ({line:?})"
        );
        delays.push((delay, gap));
    }
    let announced: Vec<u64> = delays.iter().map(|d| d.0).collect();
    assert_eq!(
        announced,
        [100, 200, 400, 800, 1600],
        "respawn delays of the crash loop: {delays:?}"
    );
    let measured: Vec<Duration> = delays.iter().map(|d| d.1).collect();
    assert!(
        measured[CRASHES - 1] >= Duration::from_millis(1600) && measured[CRASHES - 1] > measured[0],
        "the gaps between respawns do not grow: {measured:?}"
    );
    eprintln!("crash-loop gaps: {measured:?}; probe: {probed:?}");

    // The other slots were not touched and served all along.
    let after = s.wait_workers(3);
    assert_eq!(after[0], before[0], "worker[0] untouched");
    assert_eq!(after[2], before[2], "worker[2] untouched");
    assert!(
        probed.failures.is_empty(),
        "the other workers failed a client: {:?}",
        probed.failures
    );
    assert!(probed.replies >= 20, "too few probes: {probed:?}");
    assert!(
        probed.longest_silence < Duration::from_secs(1),
        "a client went {:?} without a reply while worker[1] crash-looped",
        probed.longest_silence
    );
    s.wait_for_log("all 3 workers accepting", SOON);
    assert_eq!(roundtrip(addr, "recovered"), "derevocer");
}

#[test]
fn a_kill_storm_is_answered_by_respawning_at_once() {
    // What an OOM killer or a bad deploy script does: a random worker SIGKILLed every
    // 100 ms, for 2 s, while clients connect for every request.
    const KILLS: usize = 20;
    const EVERY: Duration = Duration::from_millis(100);
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    s.wait_workers(2);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe(addr, stop.clone());

    let mut killed: BTreeSet<i32> = BTreeSet::new();
    let mut empty_samples = 0;
    let mut samples = 0;
    let storm = Instant::now();
    for k in 0..KILLS {
        let workers: Vec<Worker> = s
            .workers()
            .into_iter()
            .filter(|w| !killed.contains(&w.pid))
            .collect();
        if let Some(victim) = workers.get(k % workers.len().max(1)) {
            signal_pid(victim.pid, Signal::SIGKILL);
            killed.insert(victim.pid);
        }
        // Sample, until the next kill is due, whether any worker is there at all.
        while storm.elapsed() < EVERY * (k as u32 + 1) {
            samples += 1;
            if s.workers().iter().all(|w| killed.contains(&w.pid)) {
                empty_samples += 1;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    let after_storm = Instant::now();
    s.wait_for_log("all 2 workers accepting", SOON);
    let restored = poll_until(SOON, || {
        let now = s.workers();
        now.len() == 2 && now.iter().all(|w| !killed.contains(&w.pid))
    });
    let took = after_storm.elapsed();
    stop.store(true, Ordering::SeqCst);
    let probed = prober.join().expect("the probe thread");
    eprintln!(
        "{} kills in {:?}: no worker at {empty_samples} of {samples} samples (5 ms apart); \
         count restored {took:?} after the storm; probe: {probed:?}",
        killed.len(),
        after_storm - storm
    );
    assert!(
        restored,
        "the worker count was not restored after the storm"
    );
    assert_eq!(
        s.count_log("respawning in"),
        0,
        "a worker killed from outside must be replaced at once, not after a delay"
    );
    assert_eq!(
        s.count_log("from outside raasd; respawning at once"),
        killed.len(),
        "every kill is logged as such"
    );
    assert!(
        probed.failures.is_empty(),
        "a client failed: {:?}",
        probed.failures
    );
    assert_eq!(roundtrip(addr, "after the storm"), "mrots eht retfa");
}

// ---------------------------------------------------------------------------------------
// Recycling: --max-requests and --max-worker-memory
// ---------------------------------------------------------------------------------------

/// Every replaced worker exits by itself (status 0), and every reply was correct.
fn assert_graceful_replacements(s: &Server, replaced: &[(usize, i32)]) {
    for &(slot, pid) in replaced {
        let line = s.wait_for_log(&format!("worker[{slot}] pid {pid} exited ("), SOON);
        assert!(
            line.contains("exited (exit status 0)"),
            "a replaced worker must drain and exit 0: {line:?}"
        );
    }
    assert_eq!(
        s.count_log("exited unexpectedly"),
        0,
        "no worker may die while being recycled"
    );
}

/// (slot, pid) of each master line containing `needle`
/// (`worker[S] pid P <needle>`).
fn replaced_workers(s: &Server, needle: &str) -> Vec<(usize, i32)> {
    s.log_lines()
        .iter()
        .filter(|l| l.contains(needle))
        .map(|l| {
            let slot = number_between(l, "] worker[", "] pid ").expect("slot") as usize;
            let pid = number_between(l, "] pid ", needle).expect("pid") as i32;
            (slot, pid)
        })
        .collect()
}

#[test]
fn max_requests_replaces_workers_without_failing_a_request() {
    const MAX: u64 = 100;
    const JITTER: u64 = 20;
    const REPLACEMENTS: usize = 4;
    /// What a worker may serve after crossing its limit, before it retires.
    const MARGIN: u64 = 60;
    let s = Server::start(&[
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--max-requests",
        "100",
        "--max-requests-jitter",
        "20",
    ]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    s.wait_workers(2);

    // About 120 requests a second: two pipelining clients (batches of 5 every 100 ms)
    // and two connecting for each line (every 100 ms), so that workers live a couple
    // of seconds and their titles are seen.
    let load = paced_load(addr, 2, 5, 2, Duration::from_millis(100));
    let pipelined_batch = 5;
    let mut max_served: BTreeMap<i32, u64> = BTreeMap::new();
    let record_titles = |max_served: &mut BTreeMap<i32, u64>| {
        for w in s.workers() {
            if let Some((_, served)) = title_counters(&w.title) {
                let m = max_served.entry(w.pid).or_default();
                *m = (*m).max(served);
            }
        }
    };
    let started = Instant::now();
    while s.count_log("reached --max-requests") < REPLACEMENTS {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} replacements in 30 s",
            s.count_log("reached --max-requests")
        );
        load.assert_no_failure_yet("while workers were recycled");
        record_titles(&mut max_served);
        thread::sleep(Duration::from_millis(20));
    }
    let report = load.stop();
    eprintln!(
        "max-requests load: {report} in {:?}; titles' max served: {max_served:?}",
        started.elapsed()
    );
    report.assert_clean();

    // Every replaced worker drains and exits; then exactly two remain.
    let replaced = replaced_workers(&s, " reached --max-requests");
    assert!(replaced.len() >= REPLACEMENTS, "{replaced:?}");
    assert_graceful_replacements(&s, &replaced);
    let replaced_pids: BTreeSet<i32> = replaced.iter().map(|r| r.1).collect();
    wait_until("the last replaced worker to be gone", SOON, || {
        replaced_pids.iter().all(|&p| !alive(p))
    });
    // (A worker may reach its limit just as the load stops: include it then.)
    let final_replaced = replaced_workers(&s, " reached --max-requests");
    assert_graceful_replacements(&s, &final_replaced);
    let live = s.wait_workers(2);

    // Each replaced worker asked for it between N and N + jitter requests (plus at
    // most the batches that were being answered when it crossed).
    let crossing_slack = pipelined_batch as u64 * 2;
    let mut asked_at = 0;
    for &(slot, pid) in &final_replaced {
        let line = s.wait_for_log(
            &format!("worker[{slot}] pid={pid}] served "),
            Duration::from_secs(1),
        );
        let n = number_between(&line, "] served ", " requests").expect("a count");
        assert!(
            (MAX..=MAX + JITTER + crossing_slack).contains(&n),
            "worker pid {pid} asked to be replaced after {n} requests \
             (--max-requests {MAX}, jitter {JITTER}): {line:?}"
        );
        asked_at += n;
    }
    // No title ever showed far more than the limit allows.
    for (pid, served) in &max_served {
        assert!(
            *served <= MAX + JITTER + MARGIN,
            "worker pid {pid}'s title showed {served} served (--max-requests {MAX} + {JITTER})"
        );
    }
    // The counters account for the replies: what the replaced workers had served when
    // they asked, plus what the live ones' titles show, is at most what the clients
    // got, and short of it by at most what the replaced ones served while retiring.
    let live_served = |ws: &[Worker]| -> u64 {
        ws.iter()
            .map(|w| {
                let title = cmdline_title(w.pid).unwrap_or_default();
                title_counters(&title).map_or(0, |c| c.1)
            })
            .sum()
    };
    let slack = final_replaced.len() as u64 * MARGIN;
    let mut counted = 0;
    let accounted = poll_until(Duration::from_secs(4), || {
        counted = asked_at + live_served(&live);
        report.ok <= counted + slack
    });
    assert!(
        accounted,
        "the clients got {} replies; the workers account for {counted} \
         ({asked_at} by {} replaced workers when they asked, the rest in live titles)",
        report.ok,
        final_replaced.len()
    );
    assert!(
        counted <= report.ok,
        "the workers' counters ({counted}) exceed the replies the clients got ({})",
        report.ok
    );
    assert_eq!(roundtrip(addr, "recycled"), "delcycer");
}

#[test]
fn max_worker_memory_replaces_workers_gracefully() {
    // 1 MiB is below any worker's resident size: every worker is replaced at each
    // 2 s sample, forever; clients must not notice.
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--max-worker-memory", "1"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let load = paced_load(addr, 2, 5, 1, Duration::from_millis(50));
    let started = Instant::now();
    while s.count_log("(limit 1 MiB); replacing it") < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {} memory replacements in 20 s",
            s.count_log("(limit 1 MiB); replacing it")
        );
        load.assert_no_failure_yet("while workers were recycled");
        thread::sleep(Duration::from_millis(20));
    }
    let report = load.stop();
    eprintln!("memory recycling load: {report}");
    report.assert_clean();
    assert!(report.ok > 50, "{report}");
    let replaced = replaced_workers(&s, " uses ");
    assert!(replaced.len() >= 3, "{replaced:?}");
    // Only those whose exit is logged by now, as more replacements keep coming.
    let replaced: Vec<(usize, i32)> = replaced.into_iter().take(3).collect();
    assert_graceful_replacements(&s, &replaced);
    assert_eq!(roundtrip(addr, "lean"), "nael");
}

// ---------------------------------------------------------------------------------------
// The master's death
// ---------------------------------------------------------------------------------------

#[test]
fn workers_are_gone_within_a_second_of_the_masters_sigkill() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0", "--graceful-timeout", "30"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let workers = s.wait_workers(3);
    let sockets = || -> usize { workers.iter().map(|w| socket_fd_count(w.pid)).sum() };
    let idle_sockets = sockets();
    // Clients that keep workers busy draining: one that has talked, one that never
    // sent a byte (a worker would give it a grace to send its first line).
    let mut talked = LineClient::connect(addr).expect("connect");
    let mut silent = LineClient::connect(addr).expect("connect");
    wait_until("both clients accepted", SOON, || {
        sockets() >= idle_sockets + 2
    });
    // A master dies at any moment, not just after its start: serve for half a second
    // first (a roundtrip every 50 ms).
    for i in 0..10 {
        let l = format!("talk {i}");
        assert_eq!(talked.roundtrip(&l), reverse_ascii(&l));
        thread::sleep(Duration::from_millis(50));
    }

    let killed_at = Instant::now();
    s.signal(Signal::SIGKILL);
    let mut left = Vec::new();
    // Measured up to 3 s, so that a failure says how long it took.
    let gone = poll_until(Duration::from_secs(3), || {
        left = workers
            .iter()
            .filter(|w| alive(w.pid))
            .map(|w| w.pid)
            .collect();
        left.is_empty()
    });
    let took = killed_at.elapsed();
    assert!(
        gone,
        "workers {left:?} still alive {took:?} after the master's SIGKILL"
    );
    eprintln!("workers gone {took:?} after the master's SIGKILL");
    let err = TcpStream::connect(addr).expect_err("the port must refuse once all are gone");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // The clients were closed, not left hanging.
    talked
        .read_to_eof()
        .expect("EOF for the client that talked");
    silent.read_to_eof().expect("EOF for the silent client");
    assert!(
        took <= Duration::from_secs(1),
        "the workers took {took:?} (more than 1 s) to go after the master's SIGKILL"
    );
}

#[test]
fn a_wedged_worker_is_gone_within_a_second_of_the_masters_sigkill() {
    // A worker wedged outside its loop never reads its channel nor its signal pipe:
    // here it blocks writing its log to a pipe nobody reads (4 KiB, filled by its
    // debug line per accepted connection). A unix listener, so that the address is
    // known without reading that log.
    let dir = temp_path("wedged");
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let socket = dir.join("raasd.sock");
    let (log_reader, log_writer) = nix::unistd::pipe().expect("pipe");
    nix::fcntl::fcntl(&log_writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).expect("F_SETPIPE_SZ");
    let listen = format!("unix:{}", socket.display());
    let s = Server::start_with(
        &[
            "-w",
            "1",
            "-l",
            &listen,
            "--log-level",
            "debug",
            "--timeout",
            "0",
        ],
        &[],
        move |cmd| {
            cmd.stderr(Stdio::from(log_writer));
        },
    );
    let worker = s.wait_workers(1).remove(0);
    let mut clients = Vec::new();
    let wedged = poll_until(SOON, || {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&socket) {
            clients.push(c);
        }
        fs::read_to_string(format!("/proc/{}/wchan", worker.pid))
            .is_ok_and(|w| w.contains("pipe_write"))
    });
    assert!(
        wedged,
        "the worker never blocked on its log pipe ({} clients)",
        clients.len()
    );

    let killed_at = Instant::now();
    s.signal(Signal::SIGKILL);
    // Measured up to 5 s, so that a failure says how long it took.
    let gone = poll_until(Duration::from_secs(5), || !alive(worker.pid));
    let took = killed_at.elapsed();
    drop(log_reader);
    assert!(
        gone,
        "the wedged worker {} still holds the socket {took:?} after the master's SIGKILL",
        worker.pid
    );
    eprintln!("wedged worker gone {took:?} after the master's SIGKILL");
    let err =
        std::os::unix::net::UnixStream::connect(&socket).expect_err("nothing may listen any more");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn a_worker_stopped_when_its_master_dies_goes_once_continued() {
    let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0", "--timeout", "0"]);
    let addr = s.addr();
    s.wait_for_log("1 worker accepting", SOON);
    let worker = s.wait_workers(1).remove(0);
    let mut stopped = Stopped::new();
    stopped.stop(worker.pid);
    s.signal(Signal::SIGKILL);
    wait_until("the master to be gone", SOON, || !alive(s.pid()));
    // (A debugger detaching, or the kernel's SIGCONT to an orphaned process group.)
    let continued = Instant::now();
    stopped.cont(worker.pid);
    let gone = poll_until(Duration::from_secs(5), || !alive(worker.pid));
    let took = continued.elapsed();
    assert!(
        gone,
        "the stopped worker still runs {took:?} after being continued"
    );
    eprintln!("stopped worker gone {took:?} after being continued");
    let err = TcpStream::connect(addr).expect_err("the port must refuse once it is gone");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

// ---------------------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------------------

/// nobody's uid and gid (from /etc/passwd), and the name of that group.
fn nobody() -> (u32, u32, String) {
    let passwd = fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("a user nobody in /etc/passwd")
        .split(':')
        .collect();
    let (uid, gid): (u32, u32) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
    let group = fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == gid.to_string())
        .unwrap_or_else(|| panic!("no group with gid {gid} in /etc/group"))[0]
        .to_owned();
    (uid, gid, group)
}

#[test]
fn workers_run_as_user_and_group_the_master_stays() {
    let (uid, gid, group) = nobody();
    assert!(
        nix::unistd::geteuid().is_root(),
        "the privilege tests run as root (as CI does): only root can switch users"
    );
    let s = Server::start(&[
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--user",
        "nobody",
        "--group",
        &group,
    ]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);
    for w in &workers {
        assert_eq!(proc_ids(w.pid, "Uid:"), Some(vec![uid; 4]), "Uid of {w:?}");
        assert_eq!(proc_ids(w.pid, "Gid:"), Some(vec![gid; 4]), "Gid of {w:?}");
        assert_eq!(
            proc_ids(w.pid, "Groups:"),
            Some(vec![gid]),
            "supplementary groups of {w:?}"
        );
    }
    let me = std::process::id() as i32;
    assert_eq!(
        proc_ids(s.pid(), "Uid:"),
        proc_ids(me, "Uid:"),
        "master's Uid"
    );
    assert_eq!(
        proc_ids(s.pid(), "Gid:"),
        proc_ids(me, "Gid:"),
        "master's Gid"
    );
    assert_eq!(
        proc_ids(s.pid(), "Uid:"),
        Some(vec![0; 4]),
        "the master stays root"
    );
    for i in 0..10 {
        let l = format!("served by nobody {i}");
        assert_eq!(roundtrip(addr, &l), reverse_ascii(&l));
    }
}

#[test]
fn switching_user_without_root_is_refused_at_start() {
    // raasd itself runs as nobody, asking to switch to root: a copy of the binary in
    // a directory nobody may enter, so that the test cannot skip for want of access.
    let (uid, gid, _) = nobody();
    let dir = temp_path("as-nobody");
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("raasd");
    let copied = Command::new("cp").arg(BIN).arg(&exe).status().expect("cp");
    assert!(copied.success());
    let s = Server::start_program(
        &exe,
        &["-w", "1", "-l", "127.0.0.1:0", "--user", "root"],
        &[],
        move |cmd| {
            cmd.uid(uid).gid(gid);
        },
    );
    let status = s.wait_exit(SOON);
    s.wait_output_closed(SOON);
    assert_eq!(status.code(), Some(1), "{status:?}; stderr: {}", s.log());
    assert!(
        s.log().contains("needs raasd to start as root"),
        "stderr: {}",
        s.log()
    );
}

// ---------------------------------------------------------------------------------------
// Titles
// ---------------------------------------------------------------------------------------

#[test]
fn the_title_counts_connections_and_requests() {
    let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("1 worker accepting", SOON);
    let worker = s.wait_workers(1)[0].clone();
    let mut clients: Vec<LineClient<TcpStream>> = (0..3)
        .map(|_| LineClient::connect(addr).expect("connect"))
        .collect();
    for (c, client) in clients.iter_mut().enumerate() {
        for i in 0..10 {
            let l = format!("conn {c} line {i}");
            assert_eq!(client.roundtrip(&l), reverse_ascii(&l));
        }
    }
    let title = || cmdline_title(worker.pid).unwrap_or_default();
    let mut seen = String::new();
    let ok = poll_until(Duration::from_secs(3), || {
        seen = title();
        seen.ends_with(": 3 conns, 30 requests")
    });
    assert!(ok, "title {seen:?}, want `3 conns, 30 requests`");
    drop(clients);
    let ok = poll_until(Duration::from_secs(3), || {
        seen = title();
        seen.ends_with(": 0 conns, 30 requests")
    });
    assert!(
        ok,
        "title {seen:?} after the clients closed, want `0 conns, 30 requests`"
    );
    assert_eq!(s.workers(), vec![worker]);
}

#[test]
fn a_worker_killed_by_the_oom_killer_is_named_so() {
    // raasd in a memory cgroup of 64 MiB; clients feed its worker incomplete lines
    // (allowed up to --max-line) until the kernel's OOM killer ends it.
    let cgroup = MemoryCgroup::new("oom", 64 << 20);
    let dir = temp_path("oom");
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let wrapper = dir.join("raasd-in-cgroup");
    install_script(
        &wrapper,
        &format!("#!/bin/sh\n{}\nexec {BIN} \"$@\"\n", cgroup.join_line()),
    );
    let s = Server::start_program(
        &wrapper,
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--max-line",
            "500000000",
            "--timeout",
            "0",
        ],
        &[],
        |_| {},
    );
    let addr = s.addr();
    s.wait_for_log("1 worker accepting", SOON);
    let victim = s.wait_workers(1)[0].pid;
    let chunk = vec![b'x'; 1 << 20];
    let mut clients: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for c in &clients {
        c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    }
    let start = Instant::now();
    'feed: while alive(victim) {
        assert!(
            start.elapsed() < SOON,
            "the worker outlived 10 s of feeding"
        );
        for c in &mut clients {
            if c.write_all(&chunk).is_err() {
                break 'feed;
            }
        }
    }
    wait_until("the worker to be gone", SOON, || !alive(victim));
    let line = s.wait_for_log("killed by the kernel's OOM killer", SOON);
    assert!(line.contains(&format!("pid {victim}")), "{line}");
    s.wait_workers(1);
}
