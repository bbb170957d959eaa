//! The workers' sandbox: every worker is filtered (`Seccomp: 2`, `NoNewPrivs: 1`),
//! the master never is, `--sandbox off` filters nobody; and the filter itself,
//! tested as Firecracker tests its own: in a child process with the worker's filter
//! installed, every allowed call is performed and must succeed, and forbidden ones
//! must fail with EPERM or kill the child, as the table in src/sandbox.rs says.

mod common;

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::ForkResult;

// ---------------------------------------------------------------------------------------
// The processes
// ---------------------------------------------------------------------------------------

/// A numeric field of /proc/PID/status (`Seccomp`, `NoNewPrivs`).
fn proc_status_field(pid: i32, field: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
}

/// Seccomp mode and NoNewPrivs of a process.
fn confinement(pid: i32) -> (Option<u32>, Option<u32>) {
    (
        proc_status_field(pid, "Seccomp"),
        proc_status_field(pid, "NoNewPrivs"),
    )
}

fn start(socket: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["-w", "3", "-l", "127.0.0.1:0", "--control"];
    args.push(socket.to_str().unwrap());
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    s.wait_for_log("all 3 workers accepting", SOON);
    s
}

/// Every worker of the status shows `word` in the JSON and the table.
fn assert_status_says(socket: &Path, word: &str, workers: usize) {
    let st = status(socket);
    let listed = st["workers"].as_array().expect("workers");
    assert_eq!(listed.len(), workers, "{st}");
    for w in listed {
        assert_eq!(w["sandbox"], word, "{st}");
    }
    let (code, table, _) = ctl(socket, &["status"]);
    assert_eq!(code, 0);
    let rows: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.contains("sandbox"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), workers, "{table}");
    for row in rows {
        assert!(row.ends_with(&format!(" {word}")), "{table}");
    }
}

#[test]
fn every_worker_is_filtered_and_the_master_is_not() {
    let dir = temp_path("sandbox-on");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let socket = dir.join("ctl.sock");
    let s = start(&socket, &[]);
    for w in s.wait_workers(3) {
        assert_eq!(
            confinement(w.pid),
            (Some(2), Some(1)),
            "worker pid {}",
            w.pid
        );
    }
    assert_eq!(confinement(s.pid()), (Some(0), Some(0)), "the master");
    assert_eq!(roundtrip(s.addr(), "sandboxed"), "dexobdnas");
    assert_status_says(&socket, "seccomp", 3);
    // A worker spawned later, and a new generation, are filtered too.
    s.signal(Signal::SIGTTIN);
    s.wait_for_log("all 4 workers accepting", SOON);
    s.signal(Signal::SIGHUP);
    s.wait_for_log("rotating workers: generation 2", SOON);
    s.wait_for_log_nth("all 3 workers accepting", 2, SOON);
    wait_until("the old generation to be gone", SOON, || {
        s.workers().len() == 3
    });
    for w in s.wait_workers(3) {
        assert_eq!(
            confinement(w.pid),
            (Some(2), Some(1)),
            "worker pid {}",
            w.pid
        );
    }
    assert_eq!(confinement(s.pid()), (Some(0), Some(0)), "the master");
    assert_eq!(roundtrip(s.addr(), "again"), "niaga");
}

#[test]
fn with_sandbox_off_no_worker_is_filtered() {
    let dir = temp_path("sandbox-off");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let socket = dir.join("ctl.sock");
    let s = start(&socket, &["--sandbox", "off"]);
    for w in s.wait_workers(3) {
        assert_eq!(
            confinement(w.pid),
            (Some(0), Some(0)),
            "worker pid {}",
            w.pid
        );
    }
    assert_eq!(confinement(s.pid()), (Some(0), Some(0)), "the master");
    assert_eq!(roundtrip(s.addr(), "free"), "eerf");
    assert_status_says(&socket, "off", 3);
}

// ---------------------------------------------------------------------------------------
// The filter, call by call
// ---------------------------------------------------------------------------------------

/// What a call must do under the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Succeeds.
    Succeeds,
    /// Allowed, and fails for its own reason (never EPERM).
    FailsWith(i32),
    /// Refused: EPERM.
    Refused,
    /// The process is killed (SIGSYS).
    Kills,
}

/// What the child's call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed(i32),
    Killed(Signal),
    Other(i32),
}

impl Outcome {
    fn meets(self, expect: Expect) -> bool {
        match (self, expect) {
            (Outcome::Succeeded, Expect::Succeeds) => true,
            (Outcome::Failed(e), Expect::FailsWith(want)) => e == want,
            (Outcome::Failed(e), Expect::Refused) => e == libc::EPERM,
            (Outcome::Killed(Signal::SIGSYS), Expect::Kills) => true,
            _ => false,
        }
    }
}

/// Descriptors a worker would hold when its filter goes in: made in the child
/// before the filter is installed.
struct Fixture {
    /// A stream pair with bytes waiting at `stream.0`.
    stream: (UnixStream, UnixStream),
    /// A datagram pair for descriptors (as the hand-over queue).
    seqpacket: (OwnedFd, OwnedFd),
    listener: TcpListener,
    /// Connected to `listener`, not yet accepted.
    client: TcpStream,
    epoll: OwnedFd,
    memfd: std::fs::File,
    /// An anonymous mapping of two pages.
    map: usize,
}

const PAGE: usize = 4096;

impl Fixture {
    fn new() -> Fixture {
        use std::io::Write;
        let stream = UnixStream::pair().unwrap();
        (&stream.1).write_all(&[b'x'; 256]).unwrap();
        stream.0.set_nonblocking(true).unwrap();
        let seqpacket = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let epoll = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::empty())
            .unwrap()
            .0;
        let mut memfd = std::fs::File::from(
            nix::sys::memfd::memfd_create("probe", nix::sys::memfd::MFdFlags::empty()).unwrap(),
        );
        memfd.write_all(b"state").unwrap();
        // tgkill(SIGABRT) is allowed: pending, not delivered, so the child reports.
        nix::sys::signal::SigSet::from(Signal::SIGABRT)
            .thread_block()
            .unwrap();
        let map = sys(
            libc::SYS_mmap,
            &[
                0,
                2 * PAGE,
                (libc::PROT_READ | libc::PROT_WRITE) as usize,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize,
                usize::MAX,
            ],
        )
        .unwrap() as usize;
        Fixture {
            stream,
            seqpacket,
            listener,
            client,
            epoll,
            memfd,
            map,
        }
    }
}

/// A system call by number with raw arguments: its return value, or its errno.
/// `syscall(nr, args…)`, the arguments not given being 0.
fn sys(nr: libc::c_long, args: &[usize]) -> Result<i64, i32> {
    let mut a = [0usize; 6];
    a[..args.len()].copy_from_slice(args);
    // SAFETY: each probe passes arguments valid for its call: pointers into buffers
    // and structures that live across the call, descriptors of its fixture, or
    // nothing; the calls that end or duplicate the process run in a child made for it.
    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if rc == -1 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc as i64)
    }
}

type Call = fn(&Fixture) -> Result<i64, i32>;

/// One call performed under the filter, and what it must do.
struct Probe {
    name: &'static str,
    nr: libc::c_long,
    expect: Expect,
    call: Call,
}

/// Forks; the child builds the fixture, installs the worker's filter, performs the
/// call and exits with what it did. The child is reaped here.
fn perform(probe: &Probe) -> Outcome {
    let filter = raasd::sandbox::compiled().expect("the filter is available here");
    // SAFETY: the child only builds its fixture (glibc's malloc is fork-safe), sets
    // limits, installs the filter and makes raw system calls before _exit; it never
    // returns into the test harness.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            // A panic here must end the child, never return into the test harness.
            let code = std::panic::catch_unwind(|| {
                let fixture = Fixture::new();
                // No core file from a kill; no probe may hang.
                let _ =
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
                nix::unistd::alarm::set(10);
                if filter.install().is_err() {
                    return 99;
                }
                let result = (probe.call)(&fixture);
                // Not dropped: a probe may have closed one of its descriptors.
                std::mem::forget(fixture);
                match result {
                    Ok(_) => 0,
                    Err(errno) => 100 + errno.clamp(0, 150),
                }
            })
            .unwrap_or(98);
            // SAFETY: _exit ends the child at once, without running the harness's code.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, 0) => Outcome::Succeeded,
            WaitStatus::Exited(_, code) if code >= 100 => Outcome::Failed(code - 100),
            WaitStatus::Exited(_, code) => Outcome::Other(code),
            WaitStatus::Signaled(_, signal, _) => Outcome::Killed(signal),
            other => panic!("{}: {other:?}", probe.name),
        },
    }
}

/// Ends a duplicate of the process at once (a fork-like call that was not stopped
/// came back as the new process).
fn end_if_duplicate(result: Result<i64, i32>) -> Result<i64, i32> {
    if result == Ok(0) {
        // SAFETY: _exit ends this duplicate at once.
        unsafe { libc::_exit(77) };
    }
    result
}

fn buf_of(bytes: &mut [u8]) -> (usize, usize) {
    (bytes.as_mut_ptr() as usize, bytes.len())
}

/// sendmsg of one byte with a descriptor (as the hand-over and the control channel).
fn send_fd(f: &Fixture) -> Result<i64, i32> {
    let fds = [f.memfd.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        f.seqpacket.0.as_raw_fd(),
        &[io::IoSlice::new(b"h")],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map(|n| n as i64)
    .map_err(|e| e as i32)
}

fn allowed_probes() -> Vec<Probe> {
    use libc::*;
    let p = |name, nr, call: Call| Probe {
        name,
        nr,
        expect: Expect::Succeeds,
        call,
    };
    let mut probes = vec![
        p("read", SYS_read, |f| {
            let mut b = [0u8; 8];
            let (at, n) = buf_of(&mut b);
            sys(SYS_read, &[f.stream.0.as_raw_fd() as usize, at, n])
        }),
        p("write", SYS_write, |f| {
            sys(
                SYS_write,
                &[f.stream.0.as_raw_fd() as usize, b"w".as_ptr() as usize, 1],
            )
        }),
        p("readv", SYS_readv, |f| {
            let mut b = [0u8; 8];
            let iov = [iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }];
            sys(
                SYS_readv,
                &[f.stream.0.as_raw_fd() as usize, iov.as_ptr() as usize, 1],
            )
        }),
        p("writev", SYS_writev, |f| {
            let iov = [iovec {
                iov_base: b"v".as_ptr() as *mut c_void,
                iov_len: 1,
            }];
            sys(
                SYS_writev,
                &[f.stream.0.as_raw_fd() as usize, iov.as_ptr() as usize, 1],
            )
        }),
        p("recvfrom", SYS_recvfrom, |f| {
            let mut b = [0u8; 8];
            let (at, n) = buf_of(&mut b);
            sys(SYS_recvfrom, &[f.stream.0.as_raw_fd() as usize, at, n])
        }),
        p("sendto", SYS_sendto, |f| {
            sys(
                SYS_sendto,
                &[
                    f.stream.0.as_raw_fd() as usize,
                    b"s".as_ptr() as usize,
                    1,
                    MSG_NOSIGNAL as usize,
                ],
            )
        }),
        p("sendmsg (SCM_RIGHTS)", SYS_sendmsg, send_fd),
        p("recvmsg (SCM_RIGHTS)", SYS_recvmsg, |f| {
            send_fd(f)?;
            let mut b = [0u8; 8];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [io::IoSliceMut::new(&mut b)];
            let m = nix::sys::socket::recvmsg::<()>(
                f.seqpacket.1.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| e as i32)?;
            match m.cmsgs().map_err(|e| e as i32)?.next() {
                Some(nix::sys::socket::ControlMessageOwned::ScmRights(fds)) if fds.len() == 1 => {
                    Ok(0)
                }
                _ => Err(EBADMSG),
            }
        }),
        p("close", SYS_close, |f| {
            sys(SYS_close, &[f.client.as_raw_fd() as usize])
        }),
        p("shutdown", SYS_shutdown, |f| {
            sys(
                SYS_shutdown,
                &[f.client.as_raw_fd() as usize, SHUT_WR as usize],
            )
        }),
        p("accept4", SYS_accept4, |f| {
            // The connection may take a moment to reach the accept queue.
            for _ in 0..1000 {
                match sys(
                    SYS_accept4,
                    &[
                        f.listener.as_raw_fd() as usize,
                        0,
                        0,
                        (SOCK_NONBLOCK | SOCK_CLOEXEC) as usize,
                    ],
                ) {
                    Err(EAGAIN) => {
                        sys(SYS_sched_yield, &[])?;
                    }
                    other => return other,
                }
            }
            Err(EAGAIN)
        }),
        p("epoll_ctl", SYS_epoll_ctl, |f| {
            let mut event = epoll_event {
                events: EPOLLIN as u32,
                u64: 7,
            };
            sys(
                SYS_epoll_ctl,
                &[
                    f.epoll.as_raw_fd() as usize,
                    EPOLL_CTL_ADD as usize,
                    f.stream.0.as_raw_fd() as usize,
                    &mut event as *mut _ as usize,
                ],
            )
        }),
        p("epoll_pwait", SYS_epoll_pwait, |f| {
            let mut events = [epoll_event { events: 0, u64: 0 }; 4];
            sys(
                SYS_epoll_pwait,
                &[
                    f.epoll.as_raw_fd() as usize,
                    events.as_mut_ptr() as usize,
                    4,
                    0,
                    0,
                    8,
                ],
            )
        }),
        p("lseek", SYS_lseek, |f| {
            sys(
                SYS_lseek,
                &[f.memfd.as_raw_fd() as usize, 0, SEEK_SET as usize],
            )
        }),
        p("fstat", SYS_fstat, |f| {
            let mut st = std::mem::MaybeUninit::<stat>::uninit();
            sys(
                SYS_fstat,
                &[f.memfd.as_raw_fd() as usize, st.as_mut_ptr() as usize],
            )
        }),
        p("statx (AT_EMPTY_PATH)", SYS_statx, |f| {
            let mut st = std::mem::MaybeUninit::<statx>::uninit();
            sys(
                SYS_statx,
                &[
                    f.memfd.as_raw_fd() as usize,
                    c"".as_ptr() as usize,
                    AT_EMPTY_PATH as usize,
                    STATX_SIZE as usize,
                    st.as_mut_ptr() as usize,
                ],
            )
        }),
        p("getpeername", SYS_getpeername, |f| {
            let mut addr = std::mem::MaybeUninit::<sockaddr_storage>::uninit();
            let mut len = std::mem::size_of::<sockaddr_storage>() as socklen_t;
            sys(
                SYS_getpeername,
                &[
                    f.client.as_raw_fd() as usize,
                    addr.as_mut_ptr() as usize,
                    &mut len as *mut _ as usize,
                ],
            )
        }),
        p("getsockopt", SYS_getsockopt, |f| {
            let mut value: c_int = 0;
            let mut len = std::mem::size_of::<c_int>() as socklen_t;
            sys(
                SYS_getsockopt,
                &[
                    f.client.as_raw_fd() as usize,
                    SOL_SOCKET as usize,
                    SO_ERROR as usize,
                    &mut value as *mut _ as usize,
                    &mut len as *mut _ as usize,
                ],
            )
        }),
        p("brk", SYS_brk, |_| sys(SYS_brk, &[])),
        p("mmap (read, write)", SYS_mmap, |_| {
            sys(
                SYS_mmap,
                &[
                    0,
                    PAGE,
                    (PROT_READ | PROT_WRITE) as usize,
                    (MAP_PRIVATE | MAP_ANONYMOUS) as usize,
                    usize::MAX,
                ],
            )
        }),
        p("mprotect (read)", SYS_mprotect, |f| {
            sys(SYS_mprotect, &[f.map, PAGE, PROT_READ as usize])
        }),
        p("madvise", SYS_madvise, |f| {
            sys(SYS_madvise, &[f.map, PAGE, MADV_DONTNEED as usize])
        }),
        p("mremap", SYS_mremap, |f| {
            sys(SYS_mremap, &[f.map, 2 * PAGE, PAGE])
        }),
        p("munmap", SYS_munmap, |f| {
            sys(SYS_munmap, &[f.map, 2 * PAGE])
        }),
        p("clock_gettime", SYS_clock_gettime, |_| {
            let mut t = timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            sys(
                SYS_clock_gettime,
                &[CLOCK_MONOTONIC as usize, &mut t as *mut _ as usize],
            )
        }),
        p("gettimeofday", SYS_gettimeofday, |_| {
            let mut t = timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            sys(SYS_gettimeofday, &[&mut t as *mut _ as usize])
        }),
        p("clock_nanosleep", SYS_clock_nanosleep, |_| {
            let t = timespec {
                tv_sec: 0,
                tv_nsec: 1000,
            };
            sys(
                SYS_clock_nanosleep,
                &[CLOCK_MONOTONIC as usize, 0, &t as *const _ as usize],
            )
        }),
        p("nanosleep", SYS_nanosleep, |_| {
            let t = timespec {
                tv_sec: 0,
                tv_nsec: 1000,
            };
            sys(SYS_nanosleep, &[&t as *const _ as usize])
        }),
        p("setitimer", SYS_setitimer, |_| {
            let t = itimerval {
                it_interval: timeval {
                    tv_sec: 0,
                    tv_usec: 0,
                },
                it_value: timeval {
                    tv_sec: 9,
                    tv_usec: 0,
                },
            };
            sys(
                SYS_setitimer,
                &[ITIMER_REAL as usize, &t as *const _ as usize],
            )
        }),
        p("getpid", SYS_getpid, |_| sys(SYS_getpid, &[])),
        p("getppid", SYS_getppid, |_| sys(SYS_getppid, &[])),
        p("gettid", SYS_gettid, |_| sys(SYS_gettid, &[])),
        p("rt_sigprocmask", SYS_rt_sigprocmask, |_| {
            let mut old = std::mem::MaybeUninit::<[u64; 1]>::uninit();
            sys(
                SYS_rt_sigprocmask,
                &[SIG_BLOCK as usize, 0, old.as_mut_ptr() as usize, 8],
            )
        }),
        p("sigaltstack", SYS_sigaltstack, |_| {
            let mut old = std::mem::MaybeUninit::<stack_t>::uninit();
            sys(SYS_sigaltstack, &[0, old.as_mut_ptr() as usize])
        }),
        p("futex", SYS_futex, |_| {
            let word: u32 = 0;
            sys(
                SYS_futex,
                &[
                    &word as *const _ as usize,
                    (FUTEX_WAKE | FUTEX_PRIVATE_FLAG) as usize,
                    1,
                ],
            )
        }),
        p("sched_yield", SYS_sched_yield, |_| {
            sys(SYS_sched_yield, &[])
        }),
        p("getrandom", SYS_getrandom, |_| {
            let mut b = [0u8; 16];
            let (at, n) = buf_of(&mut b);
            sys(SYS_getrandom, &[at, n])
        }),
        p("memfd_create", SYS_memfd_create, |_| {
            sys(
                SYS_memfd_create,
                &[c"raasd-handoff".as_ptr() as usize, MFD_CLOEXEC as usize],
            )
        }),
        p("fcntl F_GETFL", SYS_fcntl, |f| {
            sys(
                SYS_fcntl,
                &[f.stream.0.as_raw_fd() as usize, F_GETFL as usize],
            )
        }),
        p("fcntl F_SETFL", SYS_fcntl, |f| {
            sys(
                SYS_fcntl,
                &[
                    f.stream.0.as_raw_fd() as usize,
                    F_SETFL as usize,
                    O_NONBLOCK as usize,
                ],
            )
        }),
        p("fcntl F_GETFD", SYS_fcntl, |f| {
            sys(
                SYS_fcntl,
                &[f.stream.0.as_raw_fd() as usize, F_GETFD as usize],
            )
        }),
        p("fcntl F_SETFD", SYS_fcntl, |f| {
            sys(
                SYS_fcntl,
                &[
                    f.stream.0.as_raw_fd() as usize,
                    F_SETFD as usize,
                    FD_CLOEXEC as usize,
                ],
            )
        }),
        p("fcntl F_DUPFD_CLOEXEC", SYS_fcntl, |f| {
            sys(
                SYS_fcntl,
                &[f.stream.0.as_raw_fd() as usize, F_DUPFD_CLOEXEC as usize],
            )
        }),
        p("ioctl FIONBIO", SYS_ioctl, |f| {
            let on: c_int = 1;
            sys(
                SYS_ioctl,
                &[
                    f.stream.0.as_raw_fd() as usize,
                    FIONBIO as usize,
                    &on as *const _ as usize,
                ],
            )
        }),
        p("socketpair AF_UNIX", SYS_socketpair, |_| {
            let mut pair = [0 as c_int; 2];
            sys(
                SYS_socketpair,
                &[
                    AF_UNIX as usize,
                    (SOCK_STREAM | SOCK_CLOEXEC) as usize,
                    0,
                    pair.as_mut_ptr() as usize,
                ],
            )
        }),
        p("tgkill SIGABRT", SYS_tgkill, |_| {
            let pid = sys(SYS_getpid, &[])?;
            let tid = sys(SYS_gettid, &[])?;
            sys(SYS_tgkill, &[pid as usize, tid as usize, SIGABRT as usize])
        }),
        p("exit_group", SYS_exit_group, |_| sys(SYS_exit_group, &[])),
        p("exit", SYS_exit, |_| sys(SYS_exit, &[])),
    ];
    // Called directly, restart_syscall finds nothing to restart: EINTR, not EPERM.
    probes.push(Probe {
        name: "restart_syscall",
        nr: SYS_restart_syscall,
        expect: Expect::FailsWith(EINTR),
        call: |_| sys(SYS_restart_syscall, &[]),
    });
    #[cfg(target_arch = "x86_64")]
    probes.extend([
        p("epoll_wait", SYS_epoll_wait, |f| {
            let mut events = [epoll_event { events: 0, u64: 0 }; 4];
            sys(
                SYS_epoll_wait,
                &[
                    f.epoll.as_raw_fd() as usize,
                    events.as_mut_ptr() as usize,
                    4,
                ],
            )
        }),
        p("alarm", SYS_alarm, |_| sys(SYS_alarm, &[9])),
    ]);
    probes
}

/// Forbidden calls, each with arguments that would work without the filter.
fn forbidden_probes() -> Vec<Probe> {
    use libc::*;
    let refused = |name, nr, call: Call| Probe {
        name,
        nr,
        expect: Expect::Refused,
        call,
    };
    let kills = |name, nr, call: Call| Probe {
        name,
        nr,
        expect: Expect::Kills,
        call,
    };
    let mut probes = vec![
        refused("openat", SYS_openat, |_| {
            sys(
                SYS_openat,
                &[
                    AT_FDCWD as usize,
                    c"/etc/passwd".as_ptr() as usize,
                    O_RDONLY as usize,
                ],
            )
        }),
        refused("openat (create)", SYS_openat, |_| {
            sys(
                SYS_openat,
                &[
                    AT_FDCWD as usize,
                    c"/tmp/raasd-sandbox-probe".as_ptr() as usize,
                    (O_WRONLY | O_CREAT) as usize,
                    0o600,
                ],
            )
        }),
        refused("socket AF_INET", SYS_socket, |_| {
            sys(SYS_socket, &[AF_INET as usize, SOCK_STREAM as usize])
        }),
        refused("socket AF_UNIX", SYS_socket, |_| {
            sys(SYS_socket, &[AF_UNIX as usize, SOCK_STREAM as usize])
        }),
        refused("socketpair AF_INET", SYS_socketpair, |_| {
            let mut pair = [0 as c_int; 2];
            sys(
                SYS_socketpair,
                &[
                    AF_INET as usize,
                    SOCK_STREAM as usize,
                    0,
                    pair.as_mut_ptr() as usize,
                ],
            )
        }),
        refused("mmap PROT_EXEC", SYS_mmap, |_| {
            sys(
                SYS_mmap,
                &[
                    0,
                    PAGE,
                    (PROT_READ | PROT_EXEC) as usize,
                    (MAP_PRIVATE | MAP_ANONYMOUS) as usize,
                    usize::MAX,
                ],
            )
        }),
        refused("mprotect PROT_EXEC", SYS_mprotect, |f| {
            sys(
                SYS_mprotect,
                &[f.map, PAGE, (PROT_READ | PROT_EXEC) as usize],
            )
        }),
        refused("fcntl F_SETOWN", SYS_fcntl, |f| {
            sys(
                SYS_fcntl,
                &[f.stream.0.as_raw_fd() as usize, F_SETOWN as usize, 1],
            )
        }),
        refused("ioctl TIOCSTI", SYS_ioctl, |f| {
            sys(
                SYS_ioctl,
                &[
                    f.stream.0.as_raw_fd() as usize,
                    TIOCSTI as usize,
                    b"x".as_ptr() as usize,
                ],
            )
        }),
        refused("setsockopt SO_REUSEADDR", SYS_setsockopt, |f| {
            let on: c_int = 1;
            sys(
                SYS_setsockopt,
                &[
                    f.listener.as_raw_fd() as usize,
                    SOL_SOCKET as usize,
                    SO_REUSEADDR as usize,
                    &on as *const _ as usize,
                    4,
                ],
            )
        }),
        refused("tgkill SIGTERM", SYS_tgkill, |_| {
            let pid = sys(SYS_getpid, &[])?;
            let tid = sys(SYS_gettid, &[])?;
            sys(SYS_tgkill, &[pid as usize, tid as usize, SIGTERM as usize])
        }),
        refused("kill", SYS_kill, |_| {
            sys(SYS_kill, &[sys(SYS_getppid, &[])? as usize])
        }),
        refused("bind", SYS_bind, |f| {
            let addr = sockaddr_in {
                sin_family: AF_INET as sa_family_t,
                sin_port: 0,
                sin_addr: in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            sys(
                SYS_bind,
                &[
                    f.listener.as_raw_fd() as usize,
                    &addr as *const _ as usize,
                    std::mem::size_of::<sockaddr_in>(),
                ],
            )
        }),
        refused("listen", SYS_listen, |f| {
            sys(SYS_listen, &[f.listener.as_raw_fd() as usize, 1])
        }),
        refused("prctl", SYS_prctl, |_| {
            sys(SYS_prctl, &[PR_SET_DUMPABLE as usize, 1])
        }),
        refused("seccomp", SYS_seccomp, |_| {
            sys(SYS_seccomp, &[SECCOMP_SET_MODE_STRICT as usize])
        }),
        refused("rt_sigaction", SYS_rt_sigaction, |_| {
            let mut old = std::mem::MaybeUninit::<[u8; 64]>::uninit();
            sys(
                SYS_rt_sigaction,
                &[SIGTERM as usize, 0, old.as_mut_ptr() as usize, 8],
            )
        }),
        refused("setuid", SYS_setuid, |_| sys(SYS_setuid, &[])),
        refused("chdir", SYS_chdir, |_| {
            sys(SYS_chdir, &[c"/".as_ptr() as usize])
        }),
        refused("unlinkat", SYS_unlinkat, |_| {
            sys(
                SYS_unlinkat,
                &[
                    AT_FDCWD as usize,
                    c"/tmp/raasd-sandbox-probe".as_ptr() as usize,
                ],
            )
        }),
        refused("newfstatat of a path", SYS_newfstatat, |_| {
            let mut st = std::mem::MaybeUninit::<stat>::uninit();
            sys(
                SYS_newfstatat,
                &[
                    AT_FDCWD as usize,
                    c"/etc/passwd".as_ptr() as usize,
                    st.as_mut_ptr() as usize,
                ],
            )
        }),
        refused("getsockname", SYS_getsockname, |f| {
            let mut addr = std::mem::MaybeUninit::<sockaddr_storage>::uninit();
            let mut len = std::mem::size_of::<sockaddr_storage>() as socklen_t;
            sys(
                SYS_getsockname,
                &[
                    f.listener.as_raw_fd() as usize,
                    addr.as_mut_ptr() as usize,
                    &mut len as *mut _ as usize,
                ],
            )
        }),
        refused("ftruncate", SYS_ftruncate, |f| {
            sys(SYS_ftruncate, &[f.memfd.as_raw_fd() as usize])
        }),
        kills("execve /bin/true", SYS_execve, |_| {
            let argv = [c"true".as_ptr(), std::ptr::null()];
            let envp: [*const c_char; 1] = [std::ptr::null()];
            sys(
                SYS_execve,
                &[
                    c"/bin/true".as_ptr() as usize,
                    argv.as_ptr() as usize,
                    envp.as_ptr() as usize,
                ],
            )
        }),
        kills("clone (as fork)", SYS_clone, |_| {
            end_if_duplicate(sys(SYS_clone, &[SIGCHLD as usize]))
        }),
        kills("connect 127.0.0.1", SYS_connect, |f| {
            let addr = sockaddr_in {
                sin_family: AF_INET as sa_family_t,
                sin_port: 9u16.to_be(),
                sin_addr: in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            sys(
                SYS_connect,
                &[
                    f.listener.as_raw_fd() as usize,
                    &addr as *const _ as usize,
                    std::mem::size_of::<sockaddr_in>(),
                ],
            )
        }),
        kills("ptrace PTRACE_TRACEME", SYS_ptrace, |_| {
            sys(SYS_ptrace, &[PTRACE_TRACEME as usize])
        }),
        kills("mount", SYS_mount, |_| {
            sys(
                SYS_mount,
                &[
                    c"none".as_ptr() as usize,
                    c"/nonexistent-raasd-probe".as_ptr() as usize,
                    c"tmpfs".as_ptr() as usize,
                ],
            )
        }),
    ];
    #[cfg(target_arch = "x86_64")]
    probes.extend([
        refused("open", SYS_open, |_| {
            sys(
                SYS_open,
                &[c"/etc/passwd".as_ptr() as usize, O_RDONLY as usize],
            )
        }),
        kills("fork", SYS_fork, |_| end_if_duplicate(sys(SYS_fork, &[]))),
    ]);
    probes
}

/// Runs probes in children and lists those whose outcome was not the expected one.
fn failures(probes: &[Probe]) -> Vec<String> {
    probes
        .iter()
        .filter_map(|probe| {
            let outcome = perform(probe);
            (!outcome.meets(probe.expect)).then(|| {
                format!(
                    "{} ({}): expected {:?}, got {outcome:?}",
                    probe.name, probe.nr, probe.expect
                )
            })
        })
        .collect()
}

#[test]
fn every_call_a_worker_makes_succeeds_under_its_filter() {
    let probes = allowed_probes();
    // Performed, each of them: only rt_sigreturn is left out (it returns from a
    // signal handler; every signal test of the suite makes it).
    for nr in raasd::sandbox::filter::allowed_calls() {
        assert!(
            nr == libc::SYS_rt_sigreturn || probes.iter().any(|p| p.nr == nr),
            "allowed call {nr} has no probe"
        );
    }
    let failed = failures(&probes);
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn forbidden_calls_fail_with_eperm_or_kill_the_worker() {
    let failed = failures(&forbidden_probes());
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn every_deadly_call_kills() {
    // Zero arguments: the filter decides by number alone.
    let failed: Vec<String> = raasd::sandbox::filter::deadly_calls()
        .into_iter()
        .filter_map(|nr| {
            let outcome = perform_by_number(nr);
            (outcome != Outcome::Killed(Signal::SIGSYS))
                .then(|| format!("call {nr}: got {outcome:?}"))
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// [`perform`] for a call given by number, with zero arguments.
fn perform_by_number(nr: libc::c_long) -> Outcome {
    thread_local! {
        static NR: std::cell::Cell<libc::c_long> = const { std::cell::Cell::new(0) };
    }
    NR.with(|n| n.set(nr));
    perform(&Probe {
        name: "by number",
        nr,
        expect: Expect::Kills,
        call: |_| end_if_duplicate(sys(NR.with(|n| n.get()), &[])),
    })
}

// ---------------------------------------------------------------------------------------
// What a sandboxed worker still does
// ---------------------------------------------------------------------------------------

#[test]
fn a_large_incomplete_line_moves_through_a_memfd_between_sandboxed_workers() {
    let dir = temp_path("sandbox-memfd");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let socket = dir.join("ctl.sock");
    let s = Server::start(&[
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "--graceful-timeout",
        "10",
        "--control",
        socket.to_str().unwrap(),
    ]);
    s.wait_for_log("1 worker accepting", SOON);
    let mut client = LineClient::connect(s.addr()).expect("connect");
    assert_eq!(client.roundtrip("before"), "erofeb");
    // More than the 48 KiB a hand-over message carries itself: the state goes in a
    // memfd, which the sender creates and writes and the receiver reads.
    let line: String = (0..60_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    client.send(line.as_bytes()).unwrap();
    wait_until("the worker to have read the incomplete line", SOON, || {
        status(&socket)["workers"][0]["bytes_received"].as_u64() >= Some(60_000 + 7)
    });
    let old = s.wait_workers(1);
    s.signal(Signal::SIGHUP);
    s.wait_for_log("handed over 1 connection to gen 2", SOON);
    s.wait_for_log("took over 1 connection", SOON);
    wait_until("the old worker to be gone", SOON, || !alive(old[0].pid));
    client.send(b"!\n").unwrap();
    let expected: String = format!("{line}!").chars().rev().collect();
    assert_eq!(client.read_line(), expected);
    for w in s.wait_workers(1) {
        assert_eq!(
            confinement(w.pid),
            (Some(2), Some(1)),
            "worker pid {}",
            w.pid
        );
    }
    assert_eq!(s.count_log("not taken in time"), 0, "{}", s.log());
}
