//! The operator's console: `raasd ctl` over the control socket, the status JSON, the
//! Prometheus endpoint, and a console that no client can use to stall supervision.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `-w 2` with a control socket in `dir`, running a copy of the binary there (which an
/// upgrade test may replace); returns the socket, the copy and the server once all
/// its workers accept.
fn start_a_copy(dir: &Path) -> (PathBuf, PathBuf, Server) {
    let socket = dir.join("ctl.sock");
    let exe = dir.join("raasd");
    let copied = Command::new("cp").arg(BIN).arg(&exe).status().expect("cp");
    assert!(copied.success());
    let s = Server::start_program(
        &exe,
        &[
            "-w",
            "2",
            "-l",
            "127.0.0.1:0",
            "--control",
            socket.to_str().unwrap(),
        ],
        &[],
        |_| {},
    );
    s.wait_for_log("all 2 workers accepting", SOON);
    (socket, exe, s)
}

fn start(socket: &Path, extra: &[&str]) -> Server {
    let socket = socket.to_str().unwrap();
    let mut args = vec!["-w", "2", "-l", "127.0.0.1:0", "--control", socket];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    s.wait_for_log("all 2 workers accepting", SOON);
    s
}

#[test]
fn status_adds_up_to_the_replies_clients_received() {
    let (dir, _cleanup) = dir("ctl-status");
    let socket = dir.join("ctl.sock");
    let s = start(&socket, &[]);
    let addr = s.addr();
    let mut clients: Vec<LineClient<TcpStream>> = (0..4)
        .map(|_| LineClient::connect(addr).expect("connect"))
        .collect();
    let mut replies = 0u64;
    let mut bytes = 0u64;
    for (c, client) in clients.iter_mut().enumerate() {
        for i in 0..25 {
            let line = format!("client {c} line {i}");
            assert_eq!(client.roundtrip(&line), reverse_ascii(&line));
            replies += 1;
            bytes += line.len() as u64 + 1;
        }
    }
    let st = status(&socket);
    assert_eq!(st["master"]["pid"], s.pid(), "{st}");
    assert_eq!(st["master"]["workers_target"], 2);
    assert_eq!(st["master"]["workers_accepting"], 2);
    assert_eq!(st["master"]["state"], "serving");
    assert_eq!(st["totals"]["requests"], replies, "{st}");
    assert_eq!(st["totals"]["bytes_received"], bytes, "{st}");
    assert_eq!(st["totals"]["bytes_sent"], bytes, "{st}");
    assert_eq!(st["totals"]["connections_accepted"], 4);
    let workers = st["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let open: u64 = workers
        .iter()
        .map(|w| w["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(open, 4);
    let pids: Vec<i64> = workers.iter().map(|w| w["pid"].as_i64().unwrap()).collect();
    let live: Vec<i64> = s.wait_workers(2).iter().map(|w| w.pid as i64).collect();
    assert_eq!(pids, live);
    assert_eq!(st["listeners"][0]["address"], addr.to_string());
    assert_eq!(st["listeners"][0]["queue"], 0);
    // Totals survive a rotation.
    s.signal(Signal::SIGHUP);
    s.wait_for_log_nth("all 2 workers accepting", 2, SOON);
    wait_until("the old generation to be gone", SOON, || {
        s.workers().len() == 2
    });
    let after = status(&socket);
    assert!(
        after["totals"]["requests"].as_u64().unwrap() >= replies,
        "{after}"
    );
    assert_eq!(after["totals"]["restarts"]["reload"], 2, "{after}");
    // The table for a person.
    let (code, table, _) = ctl(&socket, &["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("generation 2, serving: 2/2 workers accepting"),
        "{table}"
    );
}

#[test]
fn workers_n_sets_exactly_n_without_a_signal() {
    let (dir, _cleanup) = dir("ctl-workers");
    let socket = dir.join("ctl.sock");
    let s = start(&socket, &[]);
    let (code, out, _) = ctl(&socket, &["workers", "5"]);
    assert_eq!((code, out.trim()), (0, r#"{"ok":true,"workers":5}"#));
    s.wait_workers(5);
    let (code, _, _) = ctl(&socket, &["workers", "2"]);
    assert_eq!(code, 0);
    s.wait_workers(2);
    assert_eq!(s.count_log("raasd ctl workers: workers: 5 -> 2"), 1);
    // Bad input gets a clear error and exit status 2 (usage) before anything is sent.
    let (code, _, err) = ctl(&socket, &["workers", "lots"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a worker count"), "{err}");
    let (code, _, err) = ctl(&socket, &["dance"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown command 'dance'"), "{err}");
    // Unreachable: exit 1.
    let (code, _, err) = ctl(&dir.join("nothing.sock"), &["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// `ctl workers 0`: the master keeps its sockets but nobody serves, and status says
/// so; a TTOU then, or at 1 worker, is logged as ignored rather than dropped.
#[test]
fn with_no_workers_status_says_paused_and_ttou_says_why_it_is_ignored() {
    let (dir, _cleanup) = dir("ctl-paused");
    let socket = dir.join("ctl.sock");
    let s = start(&socket, &[]);
    let (code, _, _) = ctl(&socket, &["workers", "0"]);
    assert_eq!(code, 0);
    s.wait_workers(0);
    let st = status(&socket);
    assert_eq!(st["master"]["state"], "paused", "{st}");
    let (_, table, _) = ctl(&socket, &["status"]);
    assert!(table.contains("paused: 0/0 workers accepting"), "{table}");
    s.signal(Signal::SIGTTOU);
    s.wait_for_log("SIGTTOU ignored: no workers", SOON);
    let (code, _, _) = ctl(&socket, &["workers", "1"]);
    assert_eq!(code, 0);
    s.wait_for_log("1 worker accepting", SOON);
    wait_until("status serving", SOON, || {
        status(&socket)["master"]["state"] == "serving"
    });
    s.signal(Signal::SIGTTOU);
    s.wait_for_log("SIGTTOU ignored: 1 worker", SOON);
}

/// The totals are the old master's to hand over, like the sockets: after `ctl upgrade`
/// they go on from where they were, and a connection the new workers took over counts
/// in their exit line.
#[test]
fn totals_go_on_across_an_upgrade_and_taken_over_connections_count() {
    let (dir, _cleanup) = dir("ctl-totals");
    let (socket, _exe, s) = start_a_copy(&dir);
    let addr = s.addr();
    for i in 0..10 {
        let l = format!("before {i}");
        assert_eq!(roundtrip(addr, &l), reverse_ascii(&l));
    }
    let mut stays = LineClient::connect(addr).expect("connect");
    assert_eq!(stays.roundtrip("stays"), "syats");
    wait_until("11 requests in the totals", SOON, || {
        status(&socket)["totals"]["requests"] == 11
    });
    let (code, out, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(code, 0, "{out} {err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    let new_pid = reply["new_master"].as_i64().unwrap() as i32;
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    // The connection moved to a new worker, live.
    for i in 0..3 {
        let l = format!("after {i}");
        assert_eq!(stays.roundtrip(&l), reverse_ascii(&l));
    }
    let mut last = serde_json::Value::Null;
    let carried = poll_until(SOON, || {
        last = status(&socket);
        last["totals"]["requests"] == 14
    });
    assert!(carried, "the totals did not go on from 11 to 14: {last}");
    assert_eq!(last["totals"]["connections_accepted"], 11, "{last}");
    // A reload in the new master: the worker that took the connection over says so.
    kill(Pid::from_raw(new_pid), Signal::SIGHUP).unwrap();
    s.wait_for_log("after 3 requests on 1 connection", SOON);
    kill(Pid::from_raw(new_pid), Signal::SIGTERM).unwrap();
    wait_until("the new master to exit", SOON, || !alive(new_pid));
}

/// `raasd ctl -c FILE` needs only the `control` key: a file the server would refuse
/// (after a failed reload) still leads to the socket, and a relative path is the
/// file's directory's. Wrong input says what is wrong.
#[test]
fn ctl_finds_the_socket_in_any_config_file_and_says_what_is_wrong() {
    let (dir, _cleanup) = dir("ctl-lenient");
    let socket = dir.join("ctl.sock");
    let _s = start(&socket, &[]);
    let file = dir.join("raasd.toml");
    std::fs::write(
        &file,
        "control = \"ctl.sock\"\nbogus = 1\nworkers = \"many\"\n",
    )
    .unwrap();
    // Run from elsewhere: the path is the file's directory's, not the working one's.
    let out = Command::new(BIN)
        .args(["ctl", "-c"])
        .arg(&file)
        .args(["status", "--json"])
        .current_dir("/")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    assert!(stdout.contains("\"workers_accepting\":2"), "{stdout}");
    // `workers` without its count.
    let (code, _, err) = ctl(&socket, &["workers"]);
    assert_eq!(code, 2);
    assert!(err.contains("workers N"), "{err}");
    // Something that is not a socket where the socket should be.
    let (code, _, err) = ctl(&dir, &["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is a directory, not a control socket"),
        "{err}"
    );
    let (code, _, err) = ctl(&file, &["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is a file, not a control socket"), "{err}");
    // A timeout of 0 is a usage error that says what is allowed.
    let (code, _, err) = ctl(&socket, &["--timeout", "0", "status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn upgrade_reports_the_hand_over_and_then_a_rollback_with_its_reason() {
    let (dir, _cleanup) = dir("ctl-upgrade");
    let (socket, exe, s) = start_a_copy(&dir);
    let (code, out, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(code, 0, "{out} {err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["upgrade"], "handed over", "{reply}");
    let new_pid = reply["new_master"].as_i64().unwrap() as i32;
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    // The new master answers on the same control socket.
    let st = status(&socket);
    assert_eq!(st["master"]["pid"], new_pid);
    assert_eq!(st["master"]["generation"], 2);

    // Now a "binary" that fails at once: the upgrade is rolled back, and said so.
    install_script(&exe, "#!/bin/sh\nexit 3\n");
    let (code, _, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("rolled back") && err.contains("the new master exited"),
        "{err}"
    );
    assert_eq!(status(&socket)["master"]["pid"], new_pid);
    kill(Pid::from_raw(new_pid), Signal::SIGTERM).unwrap();
    wait_until("the second master to exit", SOON, || !alive(new_pid));
}

#[test]
fn metrics_are_a_valid_prometheus_exposition() {
    let (dir, _cleanup) = dir("metrics");
    let socket = dir.join("ctl.sock");
    let metrics = free_loopback_addr();
    let s = start(&socket, &["--metrics", &metrics]);
    let addr = s.addr();
    for i in 0..10 {
        let l = format!("metric {i}");
        assert_eq!(roundtrip(addr, &l), reverse_ascii(&l));
    }
    // Workers publish their counters once per pass of their loop: the last reply can be
    // out a moment before its count is.
    let mut body = String::new();
    wait_until("the 10 requests in the metrics", SOON, || {
        let (code, head, text) = http_get(&metrics, "/metrics");
        assert_eq!(code, 200, "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        body = text;
        body.contains("\nraasd_requests_total 10\n")
    });
    let parsed = exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(parsed.sum("raasd_requests_total"), Some(10.0), "{body}");
    assert_eq!(parsed.sum("raasd_workers_target"), Some(2.0), "{body}");
    assert_eq!(
        parsed.sum("raasd_bytes_received_total"),
        Some(90.0),
        "{body}"
    );
    assert!(parsed.sum("raasd_listen_queue_length").is_some(), "{body}");
    assert!(parsed.sum("raasd_connections").is_some(), "{body}");
    assert_eq!(parsed.types["raasd_requests_total"], "counter");
    // Another page is a 404 that names the pages there are; another method a 400.
    let (code, _, response) = http_get(&metrics, "/");
    assert_eq!(code, 404, "{response}");
    assert!(
        response.contains("/metrics, /livez or /readyz"),
        "{response}"
    );
    let mut post = TcpStream::connect(&metrics).unwrap();
    post.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut post, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    // The start-up log says where the console is.
    s.wait_for_log(&format!("metrics at http://{metrics}/metrics"), SOON);
    s.wait_for_log("control socket at ", SOON);
}

/// The probes of load balancers and Kubernetes: `/livez` fails while a worker is
/// late, `/readyz` while no worker is wanted and from the first moment of a graceful
/// stop, while `--drain-delay` keeps the workers accepting for a while.
#[test]
fn livez_and_readyz_answer_and_drain_delay_keeps_serving_after_readyz_fails() {
    let (dir, _cleanup) = dir("probes");
    let socket = dir.join("ctl.sock");
    let metrics = free_loopback_addr();
    let s = start(
        &socket,
        &[
            "--metrics",
            &metrics,
            "--drain-delay",
            "3",
            "--timeout",
            "30",
        ],
    );
    let addr = s.addr();
    assert_eq!(http_get(&metrics, "/livez").0, 200);
    assert_eq!(http_get(&metrics, "/readyz").0, 200);
    // No worker wanted: not ready, but alive.
    assert_eq!(ctl(&socket, &["workers", "0"]).0, 0);
    let (code, _, body) = http_get(&metrics, "/readyz");
    assert_eq!((code, body.trim()), (503, "paused"));
    assert_eq!(http_get(&metrics, "/livez").0, 200);
    assert_eq!(ctl(&socket, &["workers", "2"]).0, 0);
    wait_until("ready again", SOON, || {
        http_get(&metrics, "/readyz").0 == 200
    });
    // A late worker: not alive.
    let victim = s.wait_workers(2)[0].pid;
    kill(Pid::from_raw(victim), Signal::SIGSTOP).unwrap();
    let late = poll_until(SOON, || http_get(&metrics, "/livez").0 == 503);
    kill(Pid::from_raw(victim), Signal::SIGCONT).unwrap();
    assert!(late, "/livez stayed 200 with a stopped worker");
    wait_until("alive again", SOON, || {
        http_get(&metrics, "/livez").0 == 200
    });
    // TERM: /readyz fails at once, and new connections are still served meanwhile.
    s.signal(Signal::SIGTERM);
    wait_until("/readyz to fail", SOON, || {
        http_get(&metrics, "/readyz").0 == 503
    });
    let (_, _, body) = http_get(&metrics, "/readyz");
    assert_eq!(body.trim(), "draining");
    assert_eq!(roundtrip(addr, "still served"), "devres llits");
    s.wait_for_log("draining for 3s", SOON);
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    assert_eq!(s.count_log("SIGTERM: graceful stop"), 1, "{}", s.log());
}

#[test]
fn hostile_console_clients_never_stall_supervision() {
    let (dir, _cleanup) = dir("ctl-hostile");
    let socket = dir.join("ctl.sock");
    let s = start(&socket, &["--timeout", "2"]);
    let addr = s.addr();
    // One that connects and says nothing; one that sends 100 kB of garbage; then a
    // thousand at once.
    let _silent = UnixStream::connect(&socket).unwrap();
    let mut garbage = UnixStream::connect(&socket).unwrap();
    let mut seed: u32 = 12345;
    let noise: Vec<u8> = (0..100_000)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8 | 1
        })
        .filter(|&b| b != b'\n')
        .collect();
    let _ = garbage.write_all(&noise);
    let crowd: Vec<UnixStream> = (0..1000)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    eprintln!("{} of 1000 connected", crowd.len());
    // Supervision goes on: a worker killed meanwhile is replaced.
    let victim = s.wait_workers(2)[0].clone();
    kill(Pid::from_raw(victim.pid), Signal::SIGKILL).unwrap();
    wait_until("the killed worker's replacement", SOON, || {
        let now = s.workers();
        now.len() == 2 && now.iter().all(|w| w.pid != victim.pid)
    });
    assert_eq!(roundtrip(addr, "served"), "devres");
    // The garbage got an error, not a hang.
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(&garbage).read_line(&mut answer);
    assert!(answer.contains("\"ok\":false"), "{answer:?}");
    drop(crowd);
    // And status still answers.
    wait_until("status to answer", SOON, || {
        ctl(&socket, &["status"]).0 == 0
    });
}

#[test]
fn another_user_cannot_use_the_control_socket() {
    let (dir, _cleanup) = dir("ctl-perms");
    let socket = dir.join("ctl.sock");
    let _s = start(&socket, &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket's mode");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let nobody: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .unwrap()
        .split(':')
        .collect();
    let (uid, gid): (u32, u32) = (nobody[2].parse().unwrap(), nobody[3].parse().unwrap());
    // A copy of raasd that nobody may execute (the build directory may be closed).
    let exe = dir.join("raasd");
    let copied = Command::new("cp").arg(BIN).arg(&exe).status().expect("cp");
    assert!(copied.success());
    let out = Command::new(&exe)
        .arg("ctl")
        .arg("--control")
        .arg(&socket)
        .arg("status")
        .uid(uid)
        .gid(gid)
        .output()
        .expect("raasd ctl as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn the_exposition_checker_refuses_what_the_format_does_not_allow() {
    let good = "# HELP a_total A \\\\ help.\n# TYPE a_total counter\na_total 3\n\
                # a comment\nb{x=\"q\\\"\",y=\"1\"} 2.5 1700000000000\nb{x=\"r\"} +Inf\n";
    let e = exposition::parse(good).unwrap();
    assert_eq!(e.sum("a_total"), Some(3.0));
    assert_eq!(e.value("b", &[("x", "q\"")]), Some(2.5));
    for bad in [
        "a 1",
        "a\n",
        "a one\n",
        "1a 1\n",
        "a{x=y} 1\n",
        "a{x=\"y} 1\n",
        "a{x=\"\\t\"} 1\n",
        "a{__x=\"y\"} 1\n",
        "a{x=\"1\",x=\"2\"} 1\n",
        "a 1\na 2\n",
        "a 1\nb 1\na 2\n",
        "a 1\n# TYPE a gauge\n",
        "# TYPE a gauge\n# TYPE a gauge\n",
        "# TYPE a meter\n",
        "a 1 soon\n",
        "a 1 2 3\n",
    ] {
        assert!(exposition::parse(bad).is_err(), "accepted {bad:?}");
    }
}
