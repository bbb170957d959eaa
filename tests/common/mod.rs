//! Shared helpers of the integration tests: a guard around one real `raasd` process
//! tree, readers of /proc, and a small line client.
//!
//! Every process a test starts is stopped by [`Server`]'s `Drop`, by pid, even when the
//! test panics; a panicking test also prints the server's captured log.

#![allow(dead_code)]

pub mod crowd;
pub mod exposition;
pub mod load;
pub mod sticky;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_raasd");

/// Default deadline for things that should happen "soon" (start-up, exit, ...).
pub const SOON: Duration = Duration::from_secs(10);

/// How long a client read may block before the test gives up on it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------

/// Polls `cond` every 10 ms until it is true or `deadline` has passed; returns whether
/// it became true.
pub fn poll_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` until it is true; panics with "timed out after Xs waiting for <what>".
pub fn wait_until(what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
    if !poll_until(deadline, cond) {
        panic!(
            "timed out after {:.1}s waiting for {what}",
            deadline.as_secs_f64()
        );
    }
}

/// Checks that `cond` holds at every poll for the whole of `window` (for "nothing
/// happens" assertions, which need a time window by nature); panics naming `what`.
pub fn assert_stays(what: &str, window: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < window {
        assert!(
            cond(),
            "{what} stopped holding after {:.2}s",
            start.elapsed().as_secs_f64()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(cond(), "{what} stopped holding at the end of the window");
}

/// Locks a mutex, poisoned or not (a panicking test must still be cleaned up).
fn lk<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------

/// The fields of /proc/PID/stat after the comm field (which is in parentheses and may
/// hold spaces): index 0 is the state, 1 the ppid, 19 the start time.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The state letter of a process (R, S, D, T, Z, ...), or None when it does not exist.
pub fn proc_state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The parent pid of a process.
pub fn proc_ppid(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The start time of a process (clock ticks since boot): with the pid, it names one
/// process for sure, whatever pid reuse happens.
pub fn proc_starttime(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// /proc/PID/comm without its newline.
pub fn proc_comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_owned())
}

/// Makes this test process the reaper of orphaned raasd processes (workers whose
/// master died or was killed, a master started by an upgrade whose parent left), and
/// reaps orphaned workers as they die. Without it they would be re-parented to init,
/// which in a container may never reap them: the tests would leave zombies behind.
/// Only `raasd-worker` zombies are reaped here: masters are the tests' own children
/// (their `Child::wait` must see their status) or are reaped by the guard that killed
/// them (`reap`).
pub fn adopt_orphans() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        thread::spawn(|| {
            let me = std::process::id() as i32;
            loop {
                for pid in children_of(me) {
                    if proc_state(pid) == Some('Z')
                        && proc_comm(pid).as_deref() == Some("raasd-worker")
                    {
                        reap(pid);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
    });
}

/// Collects `pid` if it is (or becomes, within 2 s) an exited child of this process.
pub fn reap(pid: i32) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    poll_until(Duration::from_secs(2), || {
        !matches!(
            waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        )
    });
}

/// True when the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z')
}

/// The session id of a process.
pub fn proc_session(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(3)?.parse().ok()
}

/// The process group of a process.
pub fn proc_pgrp(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Every process (zombies included) for which `which` holds.
pub fn processes_where(which: impl Fn(i32) -> bool) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| which(pid))
        .collect();
    out.sort_unstable();
    out
}

/// SIGKILLs every process of session `sid` (a server started by [`Server`] leads its
/// own) until none is alive, and reaps those that are this process's children.
pub fn kill_session(sid: i32) {
    poll_until(Duration::from_secs(2), || {
        let left = processes_where(|pid| proc_session(pid) == Some(sid));
        for &pid in &left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for &pid in &left {
            reap(pid);
        }
        !left.iter().any(|&pid| alive(pid))
    });
}

/// The test's side of a pseudo-terminal raasd runs on.
pub struct Terminal {
    master: std::os::fd::OwnedFd,
}

impl Terminal {
    /// Sets the window size, as a terminal emulator does when its window is resized:
    /// the kernel sends SIGWINCH to the terminal's foreground process group.
    pub fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points to a
        // live, initialized value; the descriptor is this terminal's, owned by self.
        let done = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(done, 0, "TIOCSWINSZ: {}", io::Error::last_os_error());
    }
}

/// The process title: /proc/PID/cmdline up to its first NUL, trimmed.
pub fn cmdline_title(pid: i32) -> Option<String> {
    let bytes = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Some(String::from_utf8_lossy(&bytes[..end]).trim().to_owned())
}

/// True when the process sleeps in epoll_wait (per /proc/PID/wchan; where the kernel
/// does not show wchan, a sleeping process counts).
pub fn sleeps_in_epoll_wait(pid: i32) -> bool {
    if proc_state(pid) != Some('S') {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/wchan")) {
        Ok(w) if !w.is_empty() && w != "0" => w.contains("epoll"),
        _ => true,
    }
}

/// The pids of every process whose parent is `pid` (zombies included).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if proc_ppid(child) == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// Entries of /proc/PID/fd that are sockets.
pub fn socket_fd_count(pid: i32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false)
        })
        .count()
}

/// The live worker children of `master` (a master the test may not have started
/// itself, such as one started by an upgrade), sorted by slot then pid.
pub fn workers_of(master: i32) -> Vec<Worker> {
    let mut out: Vec<Worker> = children_of(master)
        .into_iter()
        .filter(|&pid| alive(pid))
        .filter_map(|pid| {
            let title = cmdline_title(pid)?;
            let slot = worker_slot(&title)?;
            Some(Worker { pid, slot, title })
        })
        .collect();
    out.sort_by_key(|w| (w.slot, w.pid));
    out
}

/// Waits for exactly `n` workers of `master` in slots 0..n.
pub fn wait_workers_of(master: i32, n: usize) -> Vec<Worker> {
    let mut last = Vec::new();
    let ok = poll_until(SOON, || {
        last = workers_of(master);
        last.len() == n && last.iter().map(|w| w.slot).eq(0..n)
    });
    assert!(
        ok,
        "timed out waiting for {n} workers of {master} in slots 0..{n}; last seen {last:?}"
    );
    last
}

/// Waits until the title of `pid` is exactly `want`.
pub fn wait_title(pid: i32, want: &str) {
    let mut last = None;
    let ok = poll_until(SOON, || {
        last = cmdline_title(pid);
        last.as_deref() == Some(want)
    });
    assert!(ok, "title of {pid}: want {want:?}, last seen {last:?}");
}

/// The slot of a worker title `raasd worker[N]...`.
pub fn worker_slot(title: &str) -> Option<usize> {
    let rest = title.strip_prefix("raasd worker[")?;
    rest[..rest.find(']')?].parse().ok()
}

// ---------------------------------------------------------------------------------------
// The server guard
// ---------------------------------------------------------------------------------------

/// One worker process as seen in /proc.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: i32,
    pub slot: usize,
    /// The title as read (it is live: it carries counters that change).
    pub title: String,
}

/// A worker is the same worker when its pid and slot are (its title's counters move).
impl PartialEq for Worker {
    fn eq(&self, other: &Worker) -> bool {
        (self.pid, self.slot) == (other.pid, other.slot)
    }
}

impl Eq for Worker {}

/// The fixed part of a live process title: without the counters and the ` gen N`
/// generation, so `raasd worker[0] gen 2: 3 conns, 15 requests` gives
/// `raasd worker[0]` and `raasd master gen 1: 3/3 workers -w 3 127.0.0.1:80` gives
/// `raasd master -w 3 127.0.0.1:80`.
pub fn title_core(title: &str) -> String {
    let (head, tail) = title.split_once(": ").unwrap_or((title, ""));
    let words: Vec<&str> = head.split(' ').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "gen" && words.get(i + 1).is_some_and(|n| n.parse::<u64>().is_ok()) {
            i += 2;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    // A master's configuration follows its counters.
    if let Some(at) = tail.find(" -w ") {
        out.push(&tail[at + 1..]);
    }
    out.join(" ")
}

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    closed: AtomicBool,
}

fn capture(stream: impl Read + Send + 'static, out: Arc<Output>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    lk(&out.lines).push(line);
                }
            }
        }
        out.closed.store(true, Ordering::SeqCst);
    });
}

/// A running `raasd` (master and its workers), stopped by pid when dropped.
pub struct Server {
    child: Mutex<Child>,
    pid: i32,
    status: Mutex<Option<ExitStatus>>,
    stderr: Arc<Output>,
    stdout: Arc<Output>,
    /// Every worker (pid, start time) a test has seen, to stop it even if orphaned.
    seen: Mutex<Vec<(i32, u64)>>,
    args: Vec<String>,
}

impl Server {
    /// Starts `raasd` with exactly `args` (nothing is added; tests pass
    /// `-l 127.0.0.1:0`). RUST_LOG is removed from its environment so that the
    /// documented default level (info) applies.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with(args, env, |_| {})
    }

    /// Starts `raasd` as a shell would run it in a terminal: the test holds the
    /// terminal's other side, and raasd's process group is its foreground group, so
    /// a resize sends SIGWINCH to the master and every worker.
    pub fn start_on_terminal(args: &[&str]) -> (Server, Terminal) {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let terminal = Terminal { master: pty.master };
        let slave = pty.slave;
        let s = Server::start_with(args, &[], move |cmd| {
            cmd.stdin(Stdio::from(slave));
            // SAFETY: between fork and exec only async-signal-safe calls are made
            // (ioctl); descriptor 0 is the terminal given as stdin, and setsid has
            // already made the child a session leader without a terminal.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        });
        (s, terminal)
    }

    /// Like [`Server::start_with_env`]; `setup` may change the command further (its
    /// stdin, stderr, or what runs before exec). raasd always starts in a session of
    /// its own, without a controlling terminal (as under systemd or a daemonizing
    /// shell), so that how the tests are run never decides how it behaves, and so
    /// that the guard can stop every process of that session, by pid.
    pub fn start_with(
        args: &[&str],
        env: &[(&str, &str)],
        setup: impl FnOnce(&mut Command),
    ) -> Server {
        Server::start_program(Path::new(BIN), args, env, setup)
    }

    /// Like [`Server::start_with`], running `program` (a copy of raasd, so that a test
    /// can install another binary where it was started from).
    pub fn start_program(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        setup: impl FnOnce(&mut Command),
    ) -> Server {
        adopt_orphans();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: setsid is async-signal-safe, the only call between fork and exec
        // here; hooks added by `setup` run after it.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        setup(&mut cmd);
        // A binary a test has just written may briefly stay open for writing in a child
        // another test thread forks (ETXTBSY): try again for a moment.
        let started = Instant::now();
        let mut child = loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && started.elapsed() < SOON => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot start {}: {e}", program.display()),
            }
        };
        let stderr = Arc::new(Output::default());
        let stdout = Arc::new(Output::default());
        match child.stderr.take() {
            Some(pipe) => capture(pipe, stderr.clone()),
            None => stderr.closed.store(true, Ordering::SeqCst),
        }
        capture(child.stdout.take().unwrap(), stdout.clone());
        Server {
            pid: child.id() as i32,
            child: Mutex::new(child),
            status: Mutex::new(None),
            stderr,
            stdout,
            seen: Mutex::new(Vec::new()),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The captured stderr lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        lk(&self.stderr.lines).clone()
    }

    /// The captured stderr so far, one line each.
    pub fn log(&self) -> String {
        self.log_lines().join("\n")
    }

    /// The captured stdout so far.
    pub fn stdout(&self) -> String {
        lk(&self.stdout.lines).join("\n")
    }

    /// How many captured stderr lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        lk(&self.stderr.lines)
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The exit status if the master has exited (and reaps it then).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = lk(&self.status);
        if status.is_none() {
            *status = lk(&self.child).try_wait().ok().flatten();
        }
        *status
    }

    /// Waits for the `n`th stderr line containing `needle` and returns it. Fails early
    /// if the master has exited and its output is closed without such a line.
    pub fn wait_for_log_nth(&self, needle: &str, n: usize, deadline: Duration) -> String {
        let start = Instant::now();
        loop {
            // Read `closed` before the lines: if it was set, the lines are complete.
            let complete = self.stderr.closed.load(Ordering::SeqCst);
            let found = lk(&self.stderr.lines)
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if complete && self.try_status().is_some() {
                panic!(
                    "raasd exited ({:?}) without logging {n} line(s) containing {needle:?}",
                    self.try_status()
                );
            }
            if start.elapsed() >= deadline {
                panic!(
                    "timed out after {:.1}s waiting for {n} log line(s) containing {needle:?}",
                    deadline.as_secs_f64()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str, deadline: Duration) -> String {
        self.wait_for_log_nth(needle, 1, deadline)
    }

    /// Every address of a `listening on ` line, as written (unix ones as `unix:PATH`),
    /// once the first one is there.
    pub fn listen_addrs(&self) -> Vec<String> {
        self.wait_for_log("listening on ", SOON);
        self.log_lines()
            .iter()
            .filter_map(|l| {
                l.split_once("listening on ")
                    .map(|(_, a)| listen_text(a).to_owned())
            })
            .collect()
    }

    /// The address of the first TCP `listening on` line.
    pub fn addr(&self) -> SocketAddr {
        let line = self.wait_for_log("listening on ", SOON);
        let text = listen_text(line.split_once("listening on ").unwrap().1);
        text.parse().unwrap_or_else(|e| {
            panic!("cannot parse the address {text:?} of log line {line:?}: {e}")
        })
    }

    fn remember(&self, pid: i32) {
        if let Some(start) = proc_starttime(pid) {
            let mut seen = lk(&self.seen);
            if !seen.contains(&(pid, start)) {
                seen.push((pid, start));
            }
        }
    }

    /// The live worker children of the master (title `raasd worker[N]...`, not zombies),
    /// sorted by slot then pid.
    pub fn workers(&self) -> Vec<Worker> {
        let out = workers_of(self.pid);
        for w in &out {
            self.remember(w.pid);
        }
        out
    }

    /// Waits until there are exactly `n` live workers in slots 0..n and returns them.
    pub fn wait_workers(&self, n: usize) -> Vec<Worker> {
        let out = wait_workers_of(self.pid, n);
        for w in &out {
            self.remember(w.pid);
        }
        out
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig:?}): {e}", self.pid));
    }

    /// Waits for the master to exit and returns its status.
    pub fn wait_exit(&self, deadline: Duration) -> ExitStatus {
        let mut status = None;
        let ok = poll_until(deadline, || {
            status = self.try_status();
            status.is_some()
        });
        assert!(
            ok,
            "timed out after {:.1}s waiting for the master (pid {}) to exit",
            deadline.as_secs_f64(),
            self.pid
        );
        status.unwrap()
    }

    /// Waits until both output pipes are closed: the master and every process that
    /// inherited them (its workers) are gone or have closed them. Then the captured
    /// output is complete.
    pub fn wait_output_closed(&self, deadline: Duration) {
        wait_until(
            "raasd's stdout and stderr to be closed by every process",
            deadline,
            || {
                self.stderr.closed.load(Ordering::SeqCst)
                    && self.stdout.closed.load(Ordering::SeqCst)
            },
        );
    }

    fn kill_everything(&self) {
        let sigkill = |pid: i32| {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        };
        if self.try_status().is_none() {
            // Freeze the master so that it cannot fork a replacement between the scan of
            // its children and their killing.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGSTOP);
            poll_until(Duration::from_secs(1), || {
                matches!(proc_state(self.pid), None | Some('T' | 't' | 'Z'))
            });
            let workers = children_of(self.pid);
            for &child in &workers {
                sigkill(child);
            }
            sigkill(self.pid);
            let _ = lk(&self.child).wait();
            // Their master is gone, so they are this process's children now.
            for child in workers {
                reap(child);
            }
        }
        // Workers seen earlier that were orphaned (the same process: same start time).
        for &(pid, start) in lk(&self.seen).iter() {
            if proc_starttime(pid) == Some(start) {
                sigkill(pid);
                reap(pid);
            }
        }
        // Anything else still in the server's session: masters started by an
        // upgrade, and whatever they started in turn.
        kill_session(self.pid);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_everything();
        if thread::panicking() {
            // Give the reader threads a moment to take the last lines in.
            poll_until(Duration::from_millis(500), || {
                self.stderr.closed.load(Ordering::SeqCst)
            });
            eprintln!(
                "---- raasd {:?} (master pid {}) stderr ----",
                self.args, self.pid
            );
            for line in lk(&self.stderr.lines).iter() {
                eprintln!("{line}");
            }
            let out = self.stdout();
            if !out.is_empty() {
                eprintln!("---- raasd stdout ----\n{out}");
            }
            eprintln!("---- end of raasd output ----");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A line client over any stream (TCP or unix).
pub struct LineClient<S: Read + Write> {
    inner: BufReader<S>,
}

impl LineClient<TcpStream> {
    /// Connects over TCP with read and write timeouts of [`READ_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(LineClient::new(stream))
    }

    /// Closes the write side: the server sees EOF.
    pub fn shutdown_write(&self) {
        self.inner
            .get_ref()
            .shutdown(Shutdown::Write)
            .expect("shutdown(Write)");
    }
}

impl<S: Read + Write> LineClient<S> {
    pub fn new(stream: S) -> Self {
        LineClient {
            inner: BufReader::with_capacity(64 * 1024, stream),
        }
    }

    pub fn stream(&self) -> &S {
        self.inner.get_ref()
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.get_mut().write_all(bytes)
    }

    /// Writes `line` and a `\n`.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.send(&buf)
    }

    /// Reads one reply with its terminator; Ok(None) at EOF. A partial line before EOF
    /// is returned as it is (without a terminator).
    pub fn read_reply(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        match self.inner.read_until(b'\n', &mut buf)? {
            0 => Ok(None),
            _ => Ok(Some(buf)),
        }
    }

    /// Reads one `\n`-terminated reply and returns it without the `\n`; panics on EOF,
    /// error, or a missing terminator.
    pub fn read_line(&mut self) -> String {
        match self.read_reply() {
            Ok(Some(mut r)) => {
                assert_eq!(r.pop(), Some(b'\n'), "reply without a newline: {r:?}");
                String::from_utf8(r).expect("reply is UTF-8")
            }
            Ok(None) => panic!("EOF where a reply was expected"),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    /// Sends one line and returns its reply (without `\n`).
    pub fn roundtrip(&mut self, line: &str) -> String {
        self.send_line(line).expect("sending a line");
        self.read_line()
    }

    /// Reads everything up to EOF (the server must close).
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        self.inner.read_to_end(&mut rest)?;
        Ok(rest)
    }

    /// Asserts the next read is EOF (no more bytes, no error).
    pub fn expect_eof(&mut self) {
        match self.read_to_eof() {
            Ok(rest) if rest.is_empty() => {}
            Ok(rest) => panic!(
                "expected EOF, got {} more bytes: {:?}",
                rest.len(),
                String::from_utf8_lossy(&rest)
            ),
            Err(e) => panic!("expected EOF, got an error: {e}"),
        }
    }
}

/// Connects, sends one line, returns the reply (without `\n`).
pub fn roundtrip(addr: SocketAddr, line: &str) -> String {
    let mut c = LineClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.roundtrip(line)
}

/// Connects, writes every line (pipelined), half-closes, and reads replies to EOF.
/// Returns the replies without their `\n`.
pub fn send_lines(addr: SocketAddr, lines: &[String]) -> Vec<String> {
    let mut c = LineClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut buf = Vec::new();
    for l in lines {
        buf.extend_from_slice(l.as_bytes());
        buf.push(b'\n');
    }
    c.send(&buf).expect("sending lines");
    c.shutdown_write();
    let mut replies = Vec::new();
    while let Some(mut r) = c.read_reply().expect("reading replies") {
        assert_eq!(r.pop(), Some(b'\n'), "reply without a newline: {r:?}");
        replies.push(String::from_utf8(r).expect("reply is UTF-8"));
    }
    replies
}

/// Expected reply for an ASCII line.
pub fn reverse_ascii(s: &str) -> String {
    assert!(s.is_ascii());
    s.chars().rev().collect()
}

/// Expected reply for valid UTF-8 with the default unit: extended grapheme clusters in
/// reverse order (an oracle independent of the server's codec).
pub fn reverse_graphemes(s: &str) -> String {
    use unicode_segmentation::UnicodeSegmentation;
    s.graphemes(true).rev().collect()
}

// ---------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------

/// A fresh path in the temp dir, unique per test process and call; nothing is created.
pub fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "raasd-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Removes a file when dropped (test clean-up of temp files).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Removes a directory and everything in it when dropped.
pub struct RemoveDirOnDrop(pub PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Installs `script` as the executable at `path`, at once (written aside by a child
/// process, then renamed over: no descriptor open for writing leaks into a child
/// another test thread forks, which would make its exec fail with ETXTBSY).
pub fn install_script(path: &Path, script: &str) {
    let done = Command::new("sh")
        .arg("-c")
        .arg(r#"printf '%s' "$2" > "$1.new" && chmod 755 "$1.new" && mv -f "$1.new" "$1""#)
        .arg("sh")
        .arg(path)
        .arg(script)
        .status()
        .expect("sh");
    assert!(done.success(), "installing {}", path.display());
}

pub fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Seconds since the epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || !s.ends_with('Z') {
        return None;
    }
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = &s[19..s.len() - 1];
    if !(frac.is_empty()
        || (frac.starts_with('.')
            && frac[1..].bytes().all(|c| c.is_ascii_digit())
            && frac.len() > 1))
    {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A set of pids, for readable assertions.
pub fn pid_set(ws: &[Worker]) -> BTreeSet<i32> {
    ws.iter().map(|w| w.pid).collect()
}

/// A memory cgroup made for one test under the test process's own (v1 memory
/// controller, or v2), with a memory limit; removed on drop, after the processes in
/// it are gone (declare it before the [`Server`] that runs in it).
pub struct MemoryCgroup {
    pub dir: PathBuf,
}

impl MemoryCgroup {
    pub fn new(tag: &str, limit_bytes: u64) -> MemoryCgroup {
        let own = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let (base, v1) = own
            .lines()
            .find_map(|l| {
                let path = l.splitn(3, ':').nth(2)?.trim_start_matches('/');
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "memory"))
                    .then(|| (Path::new("/sys/fs/cgroup/memory").join(path), true))
            })
            .or_else(|| {
                let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
                Some((
                    Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')),
                    false,
                ))
            })
            .expect("a memory cgroup in /proc/self/cgroup");
        let dir = base.join(format!("raasd-test-{}-{tag}", std::process::id()));
        fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot make the cgroup {}: {e}", dir.display()));
        let cgroup = MemoryCgroup { dir };
        let (limit, swap) = if v1 {
            ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        } else {
            ("memory.max", "memory.swap.max")
        };
        fs::write(cgroup.dir.join(limit), limit_bytes.to_string())
            .unwrap_or_else(|e| panic!("cannot limit {}: {e}", cgroup.dir.display()));
        // No swap to escape to, where the kernel accounts it.
        let _ = fs::write(
            cgroup.dir.join(swap),
            if v1 {
                limit_bytes.to_string()
            } else {
                "0".into()
            },
        );
        cgroup
    }

    /// A shell line that moves the shell running it into this cgroup.
    pub fn join_line(&self) -> String {
        format!("echo $$ > '{}/cgroup.procs'", self.dir.display())
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Its processes are stopped by now; the kernel lets the group go once they
        // are reaped.
        poll_until(SOON, || fs::remove_dir(&self.dir).is_ok());
    }
}

/// The address after `listening on ` in a text or a JSON log line (where a quote
/// ends the message).
fn listen_text(after: &str) -> &str {
    after.split('"').next().unwrap_or(after).trim()
}

/// A loopback address with a port that was free a moment ago (for `--metrics`, which
/// takes no port 0).
pub fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().to_string()
}

/// One HTTP/1.1 `GET path` to `addr`: (status code, head, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (code, head.to_string(), body.to_string())
}

/// A directory of its own (mode 0755, so another user can reach a socket in it),
/// removed when the guard is dropped.
pub fn dir(tag: &str) -> (PathBuf, RemoveDirOnDrop) {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_path(tag);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    (dir.clone(), RemoveDirOnDrop(dir))
}

/// Runs `raasd ctl --control SOCKET ARGS...`: (exit code, stdout, stderr).
pub fn ctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--control")
        .arg(socket)
        .args(args)
        .output()
        .expect("raasd ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `raasd ctl status --json`, which must succeed.
pub fn status(socket: &Path) -> serde_json::Value {
    let (code, out, err) = ctl(socket, &["status", "--json"]);
    assert_eq!(code, 0, "raasd ctl status: {out} {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

/// Sends `sig` to `pid`, which must exist.
pub fn signal_pid(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig:?}): {e}"));
}

/// Continues and kills, when dropped, the processes a test stopped with SIGSTOP (if
/// they are still the same processes), so that a failing test leaves none behind.
pub struct Stopped(Vec<(i32, u64)>);

impl Default for Stopped {
    fn default() -> Self {
        Stopped::new()
    }
}

impl Stopped {
    pub fn new() -> Stopped {
        Stopped(Vec::new())
    }

    /// SIGSTOPs `pid` and remembers it; waits until the kernel shows it stopped.
    pub fn stop(&mut self, pid: i32) {
        let start = proc_starttime(pid).unwrap_or_else(|| panic!("no process {pid}"));
        self.0.push((pid, start));
        signal_pid(pid, Signal::SIGSTOP);
        wait_until(&format!("pid {pid} to be stopped"), SOON, || {
            matches!(proc_state(pid), Some('T' | 't'))
        });
    }

    /// SIGCONTs `pid` (the test's own continuation; the guard no longer kills it).
    pub fn cont(&mut self, pid: i32) {
        signal_pid(pid, Signal::SIGCONT);
        self.0.retain(|&(p, _)| p != pid);
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &(pid, start) in &self.0 {
            if proc_starttime(pid) == Some(start) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
    }
}
