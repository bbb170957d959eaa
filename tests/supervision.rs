//! The master as a supervisor: worker processes, titles, log lines, TTIN/TTOU, and
//! respawning a worker that dies.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn three_workers_with_their_titles_and_comm_names() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let workers = s.wait_workers(3);
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w.slot, i);
        assert_eq!(
            title_core(&w.title),
            format!("raasd worker[{i}]"),
            "title of pid {}",
            w.pid
        );
        assert_eq!(
            proc_comm(w.pid).as_deref(),
            Some("raasd-worker"),
            "comm of {}",
            w.pid
        );
        assert_eq!(
            proc_ppid(w.pid),
            Some(s.pid()),
            "worker {} is the master's child",
            w.pid
        );
    }
    assert_eq!(
        children_of(s.pid()),
        pid_set(&workers).into_iter().collect::<Vec<_>>(),
        "the master's children are exactly its 3 workers"
    );
    let want = format!("raasd master -w 3 {addr}");
    let mut title = None;
    poll_until(SOON, || {
        title = cmdline_title(s.pid()).map(|t| title_core(&t));
        title.as_deref() == Some(want.as_str())
    });
    assert_eq!(
        title.as_deref(),
        Some(want.as_str()),
        "master title {:?}",
        cmdline_title(s.pid())
    );
    assert_eq!(proc_comm(s.pid()).as_deref(), Some("raasd-master"));
    assert_eq!(roundtrip(addr, "served"), "devres");
}

#[test]
fn auto_resolves_to_the_cpu_count_and_the_title_lists_every_address() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let s = Server::start(&["-l", "127.0.0.1:0", "-l", "127.0.0.1:0"]);
    s.wait_for_log_nth("listening on ", 2, SOON);
    let addrs = s.listen_addrs();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    s.wait_for_log(&format!("all {cpus} workers accepting"), SOON);
    s.wait_workers(cpus);
    let want = format!("raasd master -w {cpus} {} {}", addrs[0], addrs[1]);
    let mut title = None;
    poll_until(SOON, || {
        title = cmdline_title(s.pid()).map(|t| title_core(&t));
        title.as_deref() == Some(want.as_str())
    });
    assert_eq!(
        title.as_deref(),
        Some(want.as_str()),
        "master title {:?}",
        cmdline_title(s.pid())
    );
}

#[test]
fn log_lines_say_when_who_and_which_pid() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    s.wait_for_log("all 2 workers accepting", SOON);
    let workers = s.wait_workers(2);
    s.wait_for_log_nth("accepting connections", 2, SOON);
    let lines = s.log_lines();
    let master_tag = format!("master pid={}]", s.pid());
    for line in &lines {
        // `[TIME LEVEL WHO pid=PID] message`; WHO may hold brackets (`worker[0]`).
        let header = line
            .strip_prefix('[')
            .and_then(|l| {
                let pid_at = l.find(" pid=")?;
                Some(&l[..pid_at + l[pid_at..].find(']')?])
            })
            .unwrap_or_else(|| panic!("log line without a [header]: {line:?}"));
        let fields: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "header of {line:?}");
        let t = parse_rfc3339_utc(fields[0])
            .unwrap_or_else(|| panic!("not an RFC 3339 UTC time: {:?} in {line:?}", fields[0]));
        assert!(
            (t - now_unix()).abs() < 600,
            "time far from now (not UTC?): {line:?}"
        );
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&fields[1]),
            "level of {line:?}"
        );
        assert!(
            fields[2] == "master" || worker_slot(&format!("raasd {}", fields[2])).is_some(),
            "who of {line:?}"
        );
        assert!(fields[3].starts_with("pid="), "pid of {line:?}");
    }
    let listening: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("listening on "))
        .collect();
    assert!(listening[0].contains(&master_tag), "{:?}", listening[0]);
    assert!(listening[0].contains(" INFO"), "{:?}", listening[0]);
    let all = lines
        .iter()
        .find(|l| l.contains("all 2 workers accepting"))
        .unwrap();
    assert!(all.contains(&master_tag), "{all:?}");
    for w in &workers {
        let tag = format!("worker[{}] pid={}]", w.slot, w.pid);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&tag) && l.contains("accepting connections")),
            "no `accepting connections` line tagged {tag:?}"
        );
    }
}

#[test]
fn ttin_adds_a_worker_and_ttou_removes_the_highest_slot() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let three = s.wait_workers(3);

    s.signal(Signal::SIGTTIN);
    let four = s.wait_workers(4);
    assert_eq!(title_core(&four[3].title), "raasd worker[3]");
    assert_eq!(
        &four[..3],
        &three[..],
        "TTIN leaves the existing workers alone"
    );
    s.wait_for_log("all 4 workers accepting", SOON);

    s.signal(Signal::SIGTTOU);
    let back = s.wait_workers(3);
    assert_eq!(back, three, "TTOU retires worker[3] only");
    wait_until("the retired worker[3] to be reaped", SOON, || {
        proc_state(four[3].pid).is_none()
    });
    assert_eq!(roundtrip(addr, "three again"), "niaga eerht");
}

#[test]
fn ttou_never_goes_below_one_worker() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    s.wait_workers(3);
    s.signal(Signal::SIGTTOU);
    s.wait_workers(2);
    s.signal(Signal::SIGTTOU);
    let last = s.wait_workers(1);
    assert_eq!(title_core(&last[0].title), "raasd worker[0]");

    // More TTOUs at one worker: nothing may change. ("Nothing happens" needs a window.)
    for _ in 0..3 {
        s.signal(Signal::SIGTTOU);
    }
    assert_stays(
        "exactly worker[0] with the same pid",
        Duration::from_millis(500),
        || s.workers() == last,
    );
    assert_eq!(roundtrip(addr, "lonely"), "ylenol");
    assert!(s.try_status().is_none(), "the master is still running");

    // And the master still counts: TTIN after those TTOUs gives two workers.
    s.signal(Signal::SIGTTIN);
    let two = s.wait_workers(2);
    assert_eq!(two[0], last[0]);
    assert_stays("two workers", Duration::from_millis(200), || {
        s.workers().len() == 2
    });
}

#[test]
fn a_killed_worker_is_reaped_and_respawned_in_its_slot() {
    let s = Server::start(&["-w", "3", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 3 workers accepting", SOON);
    let before = s.wait_workers(3);
    let victim = before[1].pid;

    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill worker[1]");
    let killed_at = Instant::now();
    let mut now = Vec::new();
    let ok = poll_until(Duration::from_secs(1), || {
        now = s.workers();
        now.iter().any(|w| w.slot == 1 && w.pid != victim)
    });
    assert!(
        ok,
        "no new worker[1] within 1 s of SIGKILL to {victim}; workers: {now:?}"
    );
    let respawn_time = killed_at.elapsed();

    let mut zombies = Vec::new();
    let clean = poll_until(Duration::from_secs(1), || {
        zombies = children_of(s.pid())
            .into_iter()
            .filter(|&p| proc_state(p) == Some('Z'))
            .collect();
        zombies.is_empty() && proc_state(victim).is_none()
    });
    assert!(
        clean,
        "zombie children {zombies:?}; killed pid {victim} state {:?}",
        proc_state(victim)
    );

    let after = s.wait_workers(3);
    assert_eq!(title_core(&after[1].title), "raasd worker[1]");
    assert_ne!(after[1].pid, victim);
    assert_eq!(after[0], before[0], "worker[0] untouched");
    assert_eq!(after[2], before[2], "worker[2] untouched");
    assert!(alive(s.pid()) && s.try_status().is_none(), "master alive");
    assert_eq!(
        children_of(s.pid()).into_iter().collect::<BTreeSet<_>>(),
        pid_set(&after),
        "the master's children are its 3 workers"
    );
    s.wait_for_log_nth("accepting connections", 4, SOON);
    for i in 0..20 {
        let line = format!("after respawn {i}");
        assert_eq!(roundtrip(addr, &line), reverse_ascii(&line));
    }
    eprintln!("respawned in {respawn_time:?}");
}

#[test]
fn repeatedly_killed_workers_keep_being_replaced() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let mut seen = BTreeSet::new();
    for round in 0..5 {
        let ws = s.wait_workers(2);
        let victim = ws[round % 2].pid;
        assert!(seen.insert(victim), "pid {victim} reused as a worker");
        kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
        wait_until("the killed worker to be replaced", SOON, || {
            let now = s.workers();
            now.len() == 2 && !now.iter().any(|w| w.pid == victim)
        });
    }
    let line = "still serving";
    assert_eq!(roundtrip(addr, line), reverse_ascii(line));
    assert!(s.try_status().is_none(), "master alive");
}

#[test]
fn name_tells_instances_apart_and_counts_come_before_addresses() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--name", "web"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    wait_title(
        s.pid(),
        &format!("raasd master web gen 1: 2/2 workers -w 2 {addr}"),
    );
    for w in s.wait_workers(2) {
        assert!(
            w.title
                .starts_with(&format!("raasd worker[{}] web gen 1", w.slot)),
            "{w:?}"
        );
    }
    let bad = Server::start(&["-l", "127.0.0.1:0", "--name", "two words"]);
    assert_eq!(bad.wait_exit(SOON).code(), Some(2));
    bad.wait_output_closed(SOON);
    assert!(bad.log().contains("is not a name"), "{}", bad.log());
}

/// `--log-format json`: through a HUP, TTIN, TTOU, USR1 and a worker killed from
/// outside, every line of the log and of the access log is one JSON object with the
/// documented fields, and a line's figures are fields of their own.
#[test]
fn json_logs_are_one_object_a_line_through_every_signal() {
    let (dir, _cleanup) = dir("json-logs");
    let access = dir.join("access.log");
    let s = Server::start(&[
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--access-log",
        access.to_str().unwrap(),
    ]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    for i in 0..3 {
        let l = format!("json {i}");
        assert_eq!(roundtrip(addr, &l), reverse_ascii(&l));
    }
    s.signal(Signal::SIGHUP);
    s.wait_for_log_nth("all 2 workers accepting", 2, SOON);
    s.signal(Signal::SIGTTIN);
    s.wait_for_log("all 3 workers accepting", SOON);
    s.signal(Signal::SIGTTOU);
    s.wait_for_log("SIGTTOU: workers: 3 -> 2", SOON);
    s.signal(Signal::SIGUSR1);
    let victim = s.wait_workers(2)[0].pid;
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    s.wait_for_log(&format!("pid {victim}"), SOON);
    wait_until("the killed worker's replacement", SOON, || {
        let now = s.workers();
        now.len() == 2 && now.iter().all(|w| w.pid != victim)
    });
    s.signal(Signal::SIGTERM);
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    s.wait_output_closed(SOON);
    let lines = s.log_lines();
    assert!(lines.len() > 10, "{lines:?}");
    let mut figures = 0;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        let ts = v["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
        assert!(parse_rfc3339_utc(ts).is_some() && ts.len() == 24, "{line}");
        assert!(
            v["level"].is_string() && v["pid"].is_u64() && v["msg"].is_string(),
            "{line}"
        );
        if v["role"] == "worker" {
            assert!(v["worker"].is_u64() && v["generation"].is_u64(), "{line}");
        }
        if v["requests"].is_u64() && v["connections"].is_u64() {
            figures += 1;
        }
    }
    assert!(
        figures > 0,
        "no line with requests and connections as fields"
    );
    assert!(
        lines.iter().any(|l| l.contains(r#""cause":"SIGTTIN""#)),
        "no line with the signal as a field"
    );
    let access_log = std::fs::read_to_string(&access).unwrap();
    assert_eq!(access_log.lines().count(), 3, "{access_log}");
    for line in access_log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("access log line not JSON ({e}): {line}"));
        assert_eq!(v["requests"], 1, "{line}");
        assert!(v["peer"].is_string() && v["end"].is_string(), "{line}");
    }
}
