//! End-to-end tests of the `raas` client binary against real `raasd` servers: piping a
//! multi-megabyte input, surviving a server restart mid-stream, `raas bench` (clean
//! run, closed port, JSON fields, chaos) and exit statuses.
//!
//! Every process started here is stopped by pid in a guard's `Drop`, even when the test
//! fails; waits poll with a deadline instead of sleeping a fixed time.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::poll_until;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use raasd::codec::{Unit, reverse_into};

const RAAS: &str = env!("CARGO_BIN_EXE_raas");
/// Deadline for anything that should happen soon (start-up, exit, a short run).
const SOON: Duration = Duration::from_secs(20);

/// A `raas` client process, killed by pid when dropped (if it is still running).
struct Guard {
    child: Child,
    name: &'static str,
}

impl Guard {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit, killing it after `deadline`.
    fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let mut status = None;
        poll_until(deadline, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        match status {
            Some(s) => s,
            None => {
                let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
                let _ = self.child.wait();
                panic!("{} did not exit within {deadline:?}", self.name);
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // raasd stops its workers on TERM; a stuck process gets KILL.
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
            if !poll_until(Duration::from_secs(10), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
                let _ = self.child.wait();
            }
        }
    }
}

/// A raasd master with 2 workers on 127.0.0.1 (port 0 = any free one), in the shared
/// guard of `common` (stopped by pid with every process it started, its log printed
/// when the test fails).
struct Raasd {
    server: common::Server,
    port: u16,
}

impl Raasd {
    fn start(port: u16) -> Raasd {
        let listen = format!("127.0.0.1:{port}");
        let server = common::Server::start(&["-w", "2", "-l", &listen]);
        server.wait_for_log("all 2 workers accepting", SOON);
        let port = server.addr().port();
        Raasd { server, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Graceful stop (TERM), waiting for the master to exit.
    fn stop(&mut self) {
        self.server.signal(Signal::SIGTERM);
        let status = self.server.wait_exit(SOON);
        assert!(
            status.success(),
            "raasd exited with {status}; log:\n{}",
            self.server.log()
        );
    }
}

/// What a finished `raas` run printed.
struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `raas args...`, feeding `input` to stdin; killed if it takes longer than
/// `deadline`.
fn run_raas(args: &[&str], input: Vec<u8>, deadline: Duration) -> Run {
    let mut raas = Raas::spawn(args);
    let stdin = raas.stdin.take().expect("stdin");
    let feeder = thread::spawn(move || {
        let mut stdin = stdin;
        // raas may exit before reading everything (e.g. when it gives up).
        let _ = stdin.write_all(&input);
    });
    let run = raas.finish(deadline);
    let _ = feeder.join();
    run
}

/// A running `raas`, its output collected (and reply lines counted) as it comes.
struct Raas {
    guard: Guard,
    stdin: Option<ChildStdin>,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<String>,
    replies: Arc<AtomicUsize>,
}

impl Raas {
    fn spawn(args: &[&str]) -> Raas {
        let mut child = Command::new(RAAS)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning raas");
        let stdin = child.stdin.take();
        let mut out = child.stdout.take().expect("stdout piped");
        let mut err = child.stderr.take().expect("stderr piped");
        let replies = Arc::new(AtomicUsize::new(0));
        let count = replies.clone();
        let stdout = thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                count.fetch_add(lines, Ordering::SeqCst);
                all.extend_from_slice(&buf[..n]);
            }
            all
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Raas {
            guard: Guard {
                child,
                name: "raas",
            },
            stdin,
            stdout,
            stderr,
            replies,
        }
    }

    fn finish(mut self, deadline: Duration) -> Run {
        let status = self.guard.wait(deadline);
        Run {
            status,
            stdout: self.stdout.join().expect("stdout reader"),
            stderr: self.stderr.join().expect("stderr reader"),
        }
    }
}

/// A deterministic pseudo-random generator, so a failing input can be reproduced.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `lines` varied lines: ASCII, multi-codepoint graphemes, CRLF endings, empty lines.
fn make_input(lines: usize, seed: u64) -> Vec<u8> {
    const PIECES: &[&str] = &[
        "hello",
        " ",
        "world",
        "e\u{301}",
        "\u{1F1EB}\u{1F1F7}",
        "\u{6F22}\u{5B57}",
        "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
        "\u{915}\u{94D}\u{937}",
        "12345",
        "\t",
        "\u{E9}t\u{E9}",
        ",",
        "\u{1F44D}\u{1F3FD}",
    ];
    let mut rng = Lcg(seed);
    let mut out = Vec::new();
    for _ in 0..lines {
        for _ in 0..rng.below(40) {
            out.extend_from_slice(PIECES[rng.below(PIECES.len() as u64) as usize].as_bytes());
        }
        out.extend_from_slice(if rng.below(10) == 0 { b"\r\n" } else { b"\n" });
    }
    out
}

/// What a RAAS server must answer to `input` (a last line without "\n" included).
fn reference(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 1);
    let body = input.strip_suffix(b"\n").unwrap_or(input);
    if input.is_empty() {
        return out;
    }
    for line in body.split(|&b| b == b'\n') {
        match line.strip_suffix(b"\r") {
            Some(l) => {
                reverse_into(l, Unit::Graphemes, &mut out);
                out.extend_from_slice(b"\r\n");
            }
            None => {
                reverse_into(line, Unit::Graphemes, &mut out);
                out.push(b'\n');
            }
        }
    }
    out
}

/// Where the first difference is, for a readable failure on megabytes of output.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let line = want[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    format!(
        "output differs at byte {at} (reply line {line}); got {} bytes, want {}",
        got.len(),
        want.len()
    )
}

#[test]
fn streams_a_multi_megabyte_input_in_order() {
    let server = Raasd::start(0);
    let mut input = make_input(60_000, 1);
    input.extend_from_slice("last line without newline \u{1F1EF}\u{1F1F5}".as_bytes());
    assert!(input.len() > 3 << 20, "input is {} bytes", input.len());
    let want = reference(&input);

    let run = run_raas(&[&server.addr()], input, SOON);
    assert!(
        run.status.success(),
        "raas: {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    assert!(
        run.stdout == want,
        "{}",
        first_difference(&run.stdout, &want)
    );
}

/// `raasd --max-line 10`, and `(seq 1 1000; echo 12345678901) | raas`: the 1000 replies
/// are written, then the refusal of line 1001 is reported with its number, exit 1.
#[test]
fn an_err_reply_keeps_the_replies_before_it_and_names_its_line() {
    let server = common::Server::start(&["-w", "1", "-l", "127.0.0.1:0", "--max-line", "10"]);
    server.wait_for_log("1 worker accepting", SOON);
    let mut input: Vec<u8> = (1..=1000)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    input.extend_from_slice(b"12345678901\n");
    let want: Vec<u8> = (1..=1000)
        .flat_map(|i| format!("{}\n", common::reverse_ascii(&i.to_string())).into_bytes())
        .collect();
    let run = run_raas(&[&server.addr().to_string()], input, SOON);
    assert_eq!(run.status.code(), Some(1), "stderr: {}", run.stderr);
    assert!(
        run.stdout == want,
        "{}\nstderr: {}",
        first_difference(&run.stdout, &want),
        run.stderr
    );
    assert!(
        run.stderr.contains("line 1001") && run.stderr.contains("ERR line too long (max 10 bytes)"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("RAAS server?"), "{}", run.stderr);
}

#[test]
fn survives_a_server_restart_mid_stream() {
    let mut server = Raasd::start(0);
    let port = server.port;
    let input = make_input(40_000, 2);
    let want = reference(&input);
    let total_lines = want.iter().filter(|&&b| b == b'\n').count();

    let mut raas = Raas::spawn(&[&server.addr(), "--retry-for", "20"]);
    let stdin = raas.stdin.take().expect("stdin");
    let replies = raas.replies.clone();
    // The first half is fed slowly, in batches, so the stream is still going when the
    // server stops; the second half only once the old server is gone, so it can only
    // be answered after a reconnect.
    let (old_gone, wait_old_gone) = std::sync::mpsc::channel::<()>();
    let feeder = thread::spawn(move || {
        let mut stdin = stdin;
        let (first, second) = input.split_at(input.len() / 2);
        for batch in first.chunks(16 * 1024) {
            if stdin.write_all(batch).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(4));
        }
        if wait_old_gone.recv_timeout(SOON).is_ok() {
            let _ = stdin.write_all(second);
        }
    });
    assert!(
        poll_until(SOON, || replies.load(Ordering::SeqCst) >= total_lines / 8),
        "no progress before the restart"
    );
    server.stop();
    let _ = old_gone.send(());
    let restarted = Raasd::start(port);

    let run = raas.finish(SOON);
    let _ = feeder.join();
    assert!(
        run.status.success(),
        "raas: {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    assert!(
        run.stdout == want,
        "{}\nstderr:\n{}",
        first_difference(&run.stdout, &want),
        run.stderr
    );
    drop(restarted);
}

#[test]
fn gives_up_on_a_closed_port_with_status_1() {
    let port = closed_port();
    let addr = format!("127.0.0.1:{port}");
    let run = run_raas(&[&addr, "--retry-for", "0.5"], b"abc\n".to_vec(), SOON);
    assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("raas: connection refused by {addr}, retrying in")),
        "stderr:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("giving up"), "stderr:\n{}", run.stderr);
    assert!(run.stdout.is_empty());
}

#[test]
fn usage_errors_exit_with_status_2() {
    for args in [
        &["bench", "--mode", "connect", "--pipeline", "4"][..],
        &["bench", "--conns", "0"],
        &["not an address"],
        &["bench", "--chaos-script", "NOSUCHSIG"],
    ] {
        let run = run_raas(args, Vec::new(), SOON);
        assert_eq!(run.status.code(), Some(2), "raas {args:?}: {}", run.stderr);
    }
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// Runs `raas bench ARGS --json` and parses its one JSON object.
fn bench_json(args: &[&str]) -> (Run, serde_json::Value) {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.push("--json");
    let run = run_raas(&all, Vec::new(), SOON);
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    let json = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("bench output is not JSON ({e}): {text}\n{}", run.stderr));
    (run, json)
}

fn u(json: &serde_json::Value, pointer: &str) -> u64 {
    json.pointer(pointer)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no integer at {pointer} in {json}"))
}

#[test]
fn bench_loads_raasd_without_errors() {
    let server = Raasd::start(0);
    let run = run_raas(
        &[
            "bench",
            &server.addr(),
            "--duration",
            "2",
            "-c",
            "8",
            "-p",
            "4",
        ],
        Vec::new(),
        SOON,
    );
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}: {text}\n{}",
        run.status,
        run.stderr
    );
    assert!(text.contains("errors     0 "), "{text}");
    assert!(!text.contains("(0 replies"), "{text}");
    assert!(text.contains("latency    p50 "), "{text}");
}

#[test]
fn bench_json_has_the_documented_fields() {
    let server = Raasd::start(0);
    let (run, json) = bench_json(&[
        "--addr",
        &server.addr(),
        "--duration",
        "1",
        "--conns",
        "4",
        "--pipeline",
        "8",
        "--unicode",
        "--len",
        "120",
    ]);
    assert!(
        run.status.success(),
        "{}: {json}\n{}",
        run.status,
        run.stderr
    );
    for key in [
        "mode",
        "addr",
        "conns",
        "pipeline",
        "threads",
        "len",
        "unicode",
        "unit",
        "interval_s",
        "duration_s",
        "requests",
        "replies",
        "rps",
        "reconnects",
        "errors",
        "error_total",
        "latency_us",
        "phases",
    ] {
        assert!(json.get(key).is_some(), "no '{key}' in {json}");
    }
    for kind in ["mismatch", "refused", "reset", "timeout", "other"] {
        assert_eq!(u(&json, &format!("/errors/{kind}")), 0, "{json}");
    }
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(u(&json, &format!("/latency_us/{q}")) > 0, "{json}");
    }
    assert_eq!(json["mode"], "persist");
    assert_eq!(json["unit"], "graphemes");
    assert_eq!(u(&json, "/conns"), 4);
    assert_eq!(u(&json, "/pipeline"), 8);
    assert!(u(&json, "/replies") > 0);
    assert_eq!(u(&json, "/requests"), u(&json, "/replies"));
    assert!(json["rps"].as_f64().unwrap() > 0.0);
    assert!(json["duration_s"].as_f64().unwrap() >= 1.0);
    assert_eq!(json["phases"].as_array().map(Vec::len), Some(0));
}

#[test]
fn bench_counts_refusals_on_a_closed_port() {
    let port = closed_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    for mode in ["persist", "connect"] {
        let (run, json) = bench_json(&[&addr, "--mode", mode, "-d", "0.5", "-c", "3"]);
        assert_eq!(run.status.code(), Some(1), "{json}\n{}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        assert_eq!(u(&json, "/replies"), 0, "{json}");
        assert!(u(&json, "/errors/refused") > 0, "{json}");
        assert_eq!(
            u(&json, "/error_total"),
            u(&json, "/errors/refused"),
            "{json}"
        );
    }
    // With a request budget the run ends on its own even though nothing answers.
    let (run, json) = bench_json(&[&addr, "--requests", "10", "-c", "2"]);
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(u(&json, "/requests"), 10, "{json}");
}

#[test]
fn bench_chaos_rotations_lose_nothing_and_move_every_connection() {
    // With hand-over (the default), reload, resize and upgrade move the connections:
    // not one reconnect. With --handover off they are drained: the clients reconnect
    // and re-send, and still nothing fails.
    for (handover, script) in [("on", "HUP,TTIN,TTOU,USR2"), ("off", "HUP,TTIN,TTOU")] {
        let listen = "127.0.0.1:0";
        let server = common::Server::start(&["-w", "2", "-l", listen, "--handover", handover]);
        server.wait_for_log("all 2 workers accepting", SOON);
        let addr = server.addr().to_string();
        let pid = server.pid().to_string();
        let (run, json) = bench_json(&[
            &addr,
            "-c",
            "8",
            "-p",
            "4",
            "--chaos",
            &pid,
            "--chaos-script",
            script,
            "--chaos-interval",
            "0.5",
        ]);
        assert!(
            run.status.success(),
            "--handover {handover}: {}: {json}\n{}",
            run.status,
            run.stderr
        );
        let phases = json["phases"].as_array().expect("phases");
        assert_eq!(phases.len(), script.split(',').count() + 1, "{json}");
        assert_eq!(phases[1]["signal"], "HUP");
        assert_eq!(u(&json, "/error_total"), 0, "{json}");
        for p in phases {
            assert!(p["replies"].as_u64().unwrap() > 0, "{json}");
        }
        let reconnects: u64 = phases
            .iter()
            .map(|p| p["reconnects"].as_u64().unwrap())
            .sum();
        if handover == "on" {
            assert_eq!(reconnects, 0, "--handover on: {json}\n{}", server.log());
        } else {
            // The rotation closed connections with requests outstanding; they were
            // sent again rather than failed.
            assert!(u(&json, "/phases/1/reconnects") > 0, "{json}");
        }
    }
}
