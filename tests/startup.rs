//! Start-up: usage errors (exit 2), runtime errors (exit 1, one `raasd: ...` line, no
//! process left), `--help`, and the pid file.

mod common;

use std::fs;
use std::net::TcpListener;
use std::process::ExitStatus;

use common::*;
use nix::sys::signal::Signal;

/// Runs raasd expecting it to exit by itself; returns its status and its stderr, once
/// every process holding its output (any forked child included) is gone.
fn run_to_exit(args: &[&str]) -> (ExitStatus, Server) {
    let s = Server::start(args);
    let status = s.wait_exit(SOON);
    s.wait_output_closed(SOON);
    (status, s)
}

fn assert_usage_error(args: &[&str], mentions: &str) {
    let (status, s) = run_to_exit(args);
    assert_eq!(
        status.code(),
        Some(2),
        "raasd {args:?}: {status:?}\n{}",
        s.log()
    );
    let err = s.log();
    assert!(
        err.contains(mentions),
        "raasd {args:?}: stderr should mention {mentions:?}:\n{err}"
    );
    assert!(
        s.stdout().is_empty(),
        "raasd {args:?}: usage errors go to stderr, stdout has:\n{}",
        s.stdout()
    );
}

#[test]
fn port_in_use_is_one_line_and_exit_1() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (status, s) = run_to_exit(&["-w", "2", "-l", &listen]);
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert_eq!(
        s.log(),
        format!("raasd: cannot listen on 127.0.0.1:{port}: address already in use"),
        "stderr must be exactly that one line"
    );
    // run_to_exit also waited for stderr to be closed by every process: no forked
    // child is left holding it.
}

#[test]
fn port_in_use_as_second_listener_leaves_nothing_behind() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (status, s) = run_to_exit(&["-w", "2", "-l", "127.0.0.1:0", "-l", &listen]);
    assert_eq!(status.code(), Some(1), "{status:?}");
    let want = format!("raasd: cannot listen on 127.0.0.1:{port}: address already in use");
    assert!(
        s.log_lines().last() == Some(&want),
        "last stderr line should be {want:?}:\n{}",
        s.log()
    );
}

/// What is in `dir`, by name.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_failed_start_leaves_no_file_behind() {
    let (dir, _cleanup) = dir("failed-start");
    let pid = dir.join("r.pid");
    let control = dir.join("ctl.sock");
    let (pid, control) = (pid.to_str().unwrap(), control.to_str().unwrap());
    // The metrics port is taken: the pid file and the control socket were made first.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let metrics = taken.local_addr().unwrap().to_string();
    let (status, s) = run_to_exit(&[
        "-l",
        "127.0.0.1:0",
        "--pid",
        pid,
        "--control",
        control,
        "--metrics",
        &metrics,
    ]);
    assert_eq!(status.code(), Some(1), "{}", s.log());
    assert!(s.log().contains("cannot listen for metrics"), "{}", s.log());
    assert_eq!(entries(&dir), Vec::<String>::new(), "{}", s.log());
    // The control socket's directory does not exist: the pid file was made first.
    let missing = dir.join("missing").join("ctl.sock");
    let (status, s) = run_to_exit(&[
        "-l",
        "127.0.0.1:0",
        "--pid",
        pid,
        "--control",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(1), "{}", s.log());
    assert!(s.log().contains("cannot listen for control"), "{}", s.log());
    assert_eq!(entries(&dir), Vec::<String>::new(), "{}", s.log());
}

#[test]
fn unknown_flag_is_a_usage_error() {
    assert_usage_error(&["--frobnicate", "-l", "127.0.0.1:0"], "--frobnicate");
}

#[test]
fn zero_workers_is_a_usage_error() {
    assert_usage_error(&["-w", "0", "-l", "127.0.0.1:0"], "0");
    assert_usage_error(&["--workers", "0", "-l", "127.0.0.1:0"], "--workers");
}

#[test]
fn bad_values_are_usage_errors() {
    for (args, mentions) in [
        (&["-w", "many"][..], "many"),
        (&["-w", "-3"][..], "-3"),
        (&["--unit", "words"][..], "words"),
        (&["--max-line", "0"][..], "--max-line"),
        (&["--max-line", "lots"][..], "lots"),
        (&["--idle-timeout", "-1"][..], "-1"),
        (&["--graceful-timeout", "soon"][..], "soon"),
        (&["-b", "0"][..], "0"),
        (&["--log-level", "loud"][..], "loud"),
    ] {
        let mut all = args.to_vec();
        all.extend(["-l", "127.0.0.1:0"]);
        assert_usage_error(&all, mentions);
    }
}

#[test]
fn a_bad_listen_address_is_refused_naming_it() {
    for bad in ["nonsense", "unix:", "127.0.0.1:99999", "127.0.0.1"] {
        let (status, s) = run_to_exit(&["-w", "1", "-l", bad]);
        assert!(
            matches!(status.code(), Some(1 | 2)),
            "-l {bad}: exit status {status:?}"
        );
        let err = s.log();
        let named = if bad == "127.0.0.1:99999" {
            "99999"
        } else {
            bad
        };
        assert!(
            err.contains(named),
            "-l {bad}: stderr should name it:\n{err}"
        );
    }
}

#[test]
fn an_unusable_unix_path_is_a_runtime_error() {
    let dir = temp_path("no-such-dir");
    let listen = format!("unix:{}/raasd.sock", dir.display());
    let (status, s) = run_to_exit(&["-w", "1", "-l", &listen]);
    assert_eq!(status.code(), Some(1), "{status:?}");
    let lines = s.log_lines();
    assert_eq!(lines.len(), 1, "one line on stderr:\n{}", s.log());
    assert!(
        lines[0].starts_with("raasd: ") && lines[0].contains(&listen[5..]),
        "one `raasd: ...` line naming the path: {:?}",
        lines[0]
    );
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let (status, s) = run_to_exit(&["--help"]);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let help = s.stdout();
    // Each flag, and the default it must show (None: no fixed default to show).
    let flags: [(&str, Option<&str>, Option<&str>); 10] = [
        ("--workers", Some("-w"), Some("auto")),
        ("--listen", Some("-l"), Some("127.0.0.1:2200")),
        ("--backlog", Some("-b"), Some("1024")),
        ("--graceful-timeout", None, Some("30")),
        ("--max-line", None, Some("65536")),
        ("--idle-timeout", None, Some("60")),
        ("--unit", None, Some("graphemes")),
        ("--pid", None, None),
        ("--log-level", None, Some("info")),
        ("--help", Some("-h"), None),
    ];
    let lines: Vec<&str> = help.lines().collect();
    for (long, short, default) in flags {
        // The flag's block: from its line to the next line that starts another option.
        let start = lines
            .iter()
            .position(|l| {
                let t = l.trim_start();
                t.starts_with('-') && t.split([',', ' ', '=']).any(|w| w == long)
            })
            .unwrap_or_else(|| panic!("--help does not list {long}:\n{help}"));
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with('-'))
            .map_or(lines.len(), |p| start + 1 + p);
        let block = lines[start..end].join("\n");
        if let Some(short) = short {
            assert!(
                lines[start].contains(&format!("{short},"))
                    || lines[start].contains(&format!("{short} ")),
                "--help shows {long} without {short}:\n{block}"
            );
        }
        if let Some(default) = default {
            assert!(
                block.contains(default),
                "--help does not show the default {default:?} of {long}:\n{block}"
            );
        }
    }
    for unit in ["graphemes", "chars", "bytes"] {
        assert!(help.contains(unit), "--help names the unit {unit}");
    }
}

#[test]
fn pid_file_is_written_and_removed_and_a_live_one_refused() {
    let pid_path = temp_path("raasd.pid");
    let _cleanup = RemoveOnDrop(pid_path.clone());
    let pid_arg = pid_path.to_str().unwrap();
    let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0", "--pid", pid_arg]);
    let addr = s.addr();
    let want = format!("{}\n", s.pid());
    let mut content = None;
    poll_until(SOON, || {
        content = fs::read_to_string(&pid_path).ok();
        content.as_deref() == Some(want.as_str())
    });
    assert_eq!(content.as_deref(), Some(want.as_str()), "pid file content");

    // A second raasd with the same pid file is refused, and leaves the file alone.
    let (status, second) = run_to_exit(&["-w", "1", "-l", "127.0.0.1:0", "--pid", pid_arg]);
    assert_eq!(
        status.code(),
        Some(1),
        "second raasd: {status:?}\n{}",
        second.log()
    );
    let err = second.log();
    assert!(err.starts_with("raasd: "), "{err}");
    assert!(
        err.contains(pid_arg),
        "the message names the pid file:\n{err}"
    );
    assert!(
        err.contains(&s.pid().to_string()),
        "the message names the running pid {}:\n{err}",
        s.pid()
    );
    assert_eq!(
        fs::read_to_string(&pid_path).ok().as_deref(),
        Some(want.as_str()),
        "the refused raasd must not touch the pid file"
    );
    assert_eq!(roundtrip(addr, "first one"), "eno tsrif");

    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!exists(&pid_path), "the pid file is removed on exit");
}

#[test]
fn a_stale_pid_file_is_replaced() {
    let pid_path = temp_path("stale.pid");
    let _cleanup = RemoveOnDrop(pid_path.clone());
    // A pid that surely names no process: a child that has exited and been reaped.
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead = gone.id();
    gone.wait().expect("wait true");
    assert_eq!(proc_state(dead as i32), None);
    fs::write(&pid_path, format!("{dead}\n")).unwrap();

    let pid_arg = pid_path.to_str().unwrap();
    let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0", "--pid", pid_arg]);
    let addr = s.addr();
    let want = format!("{}\n", s.pid());
    wait_until("the stale pid file to be replaced", SOON, || {
        fs::read_to_string(&pid_path).ok().as_deref() == Some(want.as_str())
    });
    assert_eq!(roundtrip(addr, "fresh"), "hserf");
    s.signal(Signal::SIGQUIT);
    assert_eq!(s.wait_exit(SOON).code(), Some(0));
    assert!(!exists(&pid_path), "the pid file is removed on exit");
}

#[test]
fn the_pid_file_is_removed_after_int_too() {
    let pid_path = temp_path("int.pid");
    let _cleanup = RemoveOnDrop(pid_path.clone());
    let pid_arg = pid_path.to_str().unwrap();
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--pid", pid_arg]);
    s.addr();
    wait_until("the pid file", SOON, || exists(&pid_path));
    s.signal(Signal::SIGINT);
    s.wait_exit(SOON);
    assert!(!exists(&pid_path), "the pid file is removed on exit");
}

/// Runtime start-up failures: exit 1, exactly one `raasd: ...` line, nobody left behind.
fn assert_runtime_error(args: &[&str], line: &str) {
    let (status, s) = run_to_exit(args);
    assert_eq!(
        status.code(),
        Some(1),
        "raasd {args:?}: {status:?}\n{}",
        s.log()
    );
    assert_eq!(
        s.log(),
        line,
        "raasd {args:?}: stderr must be exactly that one line"
    );
}

#[test]
fn an_unwritable_pid_file_is_a_runtime_error() {
    assert_runtime_error(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--pid",
            "/nonexistent/dir/raasd.pid",
        ],
        "raasd: cannot write pid file /nonexistent/dir/raasd.pid: no such file or directory",
    );
}

#[test]
fn an_unopenable_log_file_is_a_runtime_error() {
    assert_runtime_error(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--log-file",
            "/nonexistent/dir/raasd.log",
        ],
        "raasd: cannot open log file /nonexistent/dir/raasd.log: no such file or directory",
    );
}

#[test]
fn a_missing_config_file_is_a_configuration_error() {
    assert_usage_error(
        &["-c", "/nonexistent/dir/raasd.toml"],
        "raasd: cannot read config file /nonexistent/dir/raasd.toml: no such file or directory",
    );
}

#[test]
fn an_unknown_user_is_a_runtime_error() {
    assert_runtime_error(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--user",
            "no-such-user-raasd",
        ],
        "raasd: unknown user 'no-such-user-raasd'",
    );
}

#[test]
fn check_config_prints_the_effective_configuration_or_every_error() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/raasd.toml");
    let (status, s) = run_to_exit(&["--check-config", "-c", example, "-w", "3"]);
    assert_eq!(status.code(), Some(0), "{}", s.log());
    let printed = s.stdout();
    for line in [
        "workers = 3",
        "listen = [\"127.0.0.1:2200\"]",
        "max-line = 65536",
    ] {
        assert!(
            printed.contains(line),
            "--check-config output lacks {line:?}:\n{printed}"
        );
    }

    let dir = std::env::temp_dir().join(format!("raasd-check-config-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    fs::write(
        &bad,
        "workers = 0\nbogus = 1\nunit = \"words\"\nmax_line = 10\n",
    )
    .unwrap();
    let (status, s) = run_to_exit(&["--check-config", "-c", bad.to_str().unwrap()]);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(status.code(), Some(2), "{}", s.log());
    // Every error, in the file's order, each with its line; a typo gets a suggestion.
    let log = s.log();
    let mut at = 0;
    for want in [
        "(line 1): key 'workers'",
        "(line 2): unknown key 'bogus'",
        "(line 3): key 'unit'",
        "(line 4): unknown key 'max_line'; did you mean 'max-line'?",
    ] {
        let found = log[at..].find(want).unwrap_or_else(|| {
            panic!("stderr should say {want:?} after the errors before:\n{log}")
        });
        at += found + want.len();
    }
    assert!(s.stdout().is_empty(), "nothing printed for an invalid file");
}

#[test]
fn working_directory_is_where_relative_paths_resolve() {
    let dir = temp_path("workdir");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let s = Server::start(&[
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "--working-directory",
        dir.to_str().unwrap(),
        "--pid",
        "raasd.pid",
    ]);
    s.wait_for_log("1 worker accepting", SOON);
    let pid_file = dir.join("raasd.pid");
    wait_until("the pid file in the working directory", SOON, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|t| t.trim() == s.pid().to_string())
    });

    let missing = temp_path("no-such-dir");
    let bad = Server::start(&[
        "-l",
        "127.0.0.1:0",
        "--working-directory",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(bad.wait_exit(SOON).code(), Some(1));
    bad.wait_for_log("cannot change into working directory", SOON);
}

#[test]
fn help_fits_80_columns() {
    for flag in ["-h", "--help"] {
        let out = std::process::Command::new(BIN)
            .arg(flag)
            .env_remove("COLUMNS")
            .output()
            .expect("raasd -h");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let widest = text.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(
            widest <= 80,
            "raasd {flag} is {widest} columns wide:\n{text}"
        );
        assert!(text.contains("--workers"), "{text}");
    }
}

/// The soft and hard `Max open files` of /proc/PID/limits.
fn open_file_limits(pid: i32) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace();
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

#[test]
fn the_open_file_limit_is_raised_and_a_shortfall_is_reported() {
    use std::os::unix::process::CommandExt;
    for (max_conns, warned) in [("1000", true), ("100", false)] {
        let s = Server::start_with(
            &["-w", "1", "-l", "127.0.0.1:0", "--max-conns", max_conns],
            &[],
            |cmd| {
                // SAFETY: setrlimit is a plain system call, async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        use nix::sys::resource::{Resource, setrlimit};
                        setrlimit(Resource::RLIMIT_NOFILE, 256, 512)?;
                        Ok(())
                    });
                }
            },
        );
        s.wait_for_log("1 worker accepting", SOON);
        let worker = s.wait_workers(1).remove(0);
        assert_eq!(
            open_file_limits(worker.pid),
            Some((512, 512)),
            "the worker's limits"
        );
        assert_eq!(
            s.count_log("open files per worker, but the limit is 512") == 1,
            warned,
            "--max-conns {max_conns}:\n{}",
            s.log()
        );
    }
}

#[test]
fn the_version_is_logged_at_start() {
    let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0"]);
    s.wait_for_log(
        &format!("raasd {} started", env!("CARGO_PKG_VERSION")),
        SOON,
    );
    s.wait_for_log("1 worker accepting", SOON);
}
