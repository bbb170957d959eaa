//! The worker's sandbox: `no_new_privs` and a seccomp-bpf allowlist of the system
//! calls its loop makes, installed at the end of its set-up.
//!
//! Owns the allowlist, its compilation (once, in the master at start, with
//! `seccompiler`: the rust-vmm compiler Firecracker uses), the checks that it can be
//! used here, and its installation in a worker. It does not decide when a worker is
//! set up (the worker calls [`confine`] last) nor what a worker reports (the master
//! reads the kernel's `Seccomp:` field, [`kernel_mode`]).
//!
//! Order: the architecture is checked when the filter is compiled (x86_64 and
//! aarch64; elsewhere workers run unfiltered and the master says so at start, as it
//! does on a kernel without seccomp filters); in the worker `no_new_privs` is set,
//! then the filters are installed. The master is never filtered: it forks, executes
//! upgrades and reads `/proc`.
//!
//! By the time it calls [`confine`], a worker holds every descriptor it will ever
//! open itself: listeners, epoll set, signal pipe, control channel, nudge eventfd,
//! hand-over queue, scoreboard mapping, log files. Later ones arrive: clients by
//! `accept4`, handed-over connections and memfds by `recvmsg` (SCM_RIGHTS), a
//! reopened log file from the master over the control channel (USR1), so no `open`
//! is needed, and there is no path access left for Landlock to confine.
//!
//! Per call, what a worker gets:
//!
//! | calls | verdict | why |
//! |---|---|---|
//! | `read` `write` `readv` `writev` `recvfrom` `sendto` `recvmsg` `sendmsg` `close` `shutdown` `accept4` `epoll_wait` `epoll_pwait` `epoll_ctl` `lseek` `fstat` `statx` `getpeername` `getsockopt` `brk` `munmap` `mremap` `madvise` `clock_gettime` `gettimeofday` `clock_nanosleep` `nanosleep` `alarm` `setitimer` `getpid` `getppid` `gettid` `rt_sigreturn` `rt_sigprocmask` `sigaltstack` `restart_syscall` `futex` `sched_yield` `getrandom` `memfd_create` `exit` `exit_group` | allowed (`epoll_wait` `alarm` on x86_64 only: aarch64 has only the newer calls) | serving, hand-over, heartbeat, orphan alarm, logging, exit |
//! | `mmap` `mprotect` | allowed without `PROT_EXEC` | the allocator; no new executable memory |
//! | `fcntl` | allowed for `F_GETFL` `F_SETFL` `F_GETFD` `F_SETFD` `F_DUPFD_CLOEXEC` | non-blocking sockets, duplicated handles |
//! | `ioctl` | allowed for `FIONBIO` | the standard library's `set_nonblocking` |
//! | `socketpair` | allowed for `AF_UNIX` | the hand-over's settle pair |
//! | `tgkill` | allowed for `SIGABRT` | `abort()` ends the process as a crash the master recognises |
//! | `execve` `execveat` `fork` `vfork` `clone` `clone3` `ptrace` `process_vm_readv` `process_vm_writev` `connect` `mount` `umount2` `pivot_root` `chroot` `setns` `unshare` `open_tree` `move_mount` `fsopen` `fsconfig` `fsmount` `fspick` `name_to_handle_at` `open_by_handle_at` `bpf` `perf_event_open` `userfaultfd` `kexec_load` `kexec_file_load` `init_module` `finit_module` `delete_module` `reboot` `swapon` `swapoff` `keyctl` `add_key` `request_key` `personality` `iopl` `ioperm` | kill the process (`SECCOMP_RET_KILL_PROCESS`: the master sees SIGSYS) | nothing in a worker makes them; only an attacker would: stop it at once, loudly |
//! | any other call: `open` `openat` `socket` `bind` `setsockopt` `poll` `kill` `setuid` `seccomp` `prctl` `rt_sigaction` … | fails with `EPERM` | code on a rare path (a library that tries a file, a panic's backtrace) gets an error it handles instead of killing a worker that serves clients |
//! | any call through another ABI (i386 `int 0x80` on x86_64) | kill the process | the architecture check heads the filter |
//!
//! Two filters carry the two kinds of refusal (seccompiler gives each filter one
//! action for a match and one for a miss; the kernel applies the strictest answer
//! of all installed filters): the deadly list (match: kill, else allow), then the
//! allowlist (match: allow, else `EPERM`). A call allowed without conditions by both
//! is answered from the kernel's per-call cache (Linux ≥ 5.11) without running
//! either program, so the calls of the serving path cost nothing extra.

use std::fmt;
use std::io;
use std::sync::OnceLock;

/// How a worker runs, as `raasd ctl status` and the status JSON say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// Filtered: the kernel shows `Seccomp: 2`.
    Seccomp,
    /// `--sandbox off`.
    Off,
    /// `--sandbox on`, but this architecture or kernel cannot filter.
    Unavailable,
    /// `--sandbox on`, and the worker has not reached the end of its set-up yet.
    Pending,
}

impl Confinement {
    /// The word of the status: `seccomp`, `off`, `unavailable`, `pending`.
    pub fn word(self) -> &'static str {
        match self {
            Confinement::Seccomp => "seccomp",
            Confinement::Off => "off",
            Confinement::Unavailable => "unavailable",
            Confinement::Pending => "pending",
        }
    }
}

/// What the status says of a worker started with `wanted` (`--sandbox`) where the
/// filter is `available`, given the kernel's `Seccomp:` field of its
/// `/proc/PID/status` (None: unreadable).
pub fn confinement(wanted: bool, available: bool, kernel_mode: Option<u8>) -> Confinement {
    match (kernel_mode, wanted, available) {
        (Some(2), _, _) => Confinement::Seccomp,
        (_, false, _) => Confinement::Off,
        (_, true, false) => Confinement::Unavailable,
        (_, true, true) => Confinement::Pending,
    }
}

/// The `Seccomp:` field of `/proc/PID/status`: 0 none, 1 strict, 2 filter.
pub fn kernel_mode(pid: i32) -> Option<u8> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Why workers cannot be filtered here.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// The filter is written for x86_64 and aarch64 only.
    Architecture(&'static str),
    /// The kernel has no seccomp filters (or no `SECCOMP_RET_KILL_PROCESS`, 4.14).
    Kernel(String),
    /// The filter did not compile (a defect: the unit tests compile it).
    Compile(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::Architecture(arch) => {
                write!(f, "no seccomp filter for the {arch} architecture")
            }
            Unavailable::Kernel(why) => write!(f, "the kernel cannot filter system calls: {why}"),
            Unavailable::Compile(why) => write!(f, "the seccomp filter does not compile: {why}"),
        }
    }
}

/// Why a worker could not confine itself.
#[derive(Debug)]
pub struct InstallError(String);

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot install the sandbox: {}", self.0)
    }
}

impl std::error::Error for InstallError {}

impl From<InstallError> for io::Error {
    fn from(e: InstallError) -> io::Error {
        io::Error::other(e.to_string())
    }
}

/// The filter, compiled once per process (the master, before it forks: workers
/// inherit it compiled), or why there is none.
static FILTER: OnceLock<Result<filter::Filter, Unavailable>> = OnceLock::new();

/// Compiles the filter and checks the architecture and the kernel; the master
/// calls it at start, and warns when it fails.
pub fn availability() -> Result<(), &'static Unavailable> {
    compiled().map(|_| ())
}

/// The end of a worker's set-up: with `wanted`, sets `no_new_privs` and installs the
/// filter (`Seccomp`), or, where it is unavailable, runs on unfiltered
/// (`Unavailable`: the master warned at start). Without, `Off`.
pub fn confine(wanted: bool) -> Result<Confinement, InstallError> {
    if !wanted {
        return Ok(Confinement::Off);
    }
    match compiled() {
        Ok(filter) => {
            filter.install()?;
            Ok(Confinement::Seccomp)
        }
        Err(_) => Ok(Confinement::Unavailable),
    }
}

/// The filter, compiled on first use, or why there is none; tests install it in a
/// child of their own (Firecracker's way: perform each allowed call, and forbidden
/// ones).
pub fn compiled() -> Result<&'static filter::Filter, &'static Unavailable> {
    FILTER
        .get_or_init(filter::Filter::for_this_machine)
        .as_ref()
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod filter {
    //! The filter itself, on the architectures it is written for.

    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    use super::{InstallError, Unavailable};

    /// Calls allowed whatever their arguments.
    const ALLOWED: &[libc::c_long] = &[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_close,
        libc::SYS_shutdown,
        libc::SYS_accept4,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_setitimer,
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_gettid,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_getrandom,
        libc::SYS_memfd_create,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];

    /// x86_64 has the older calls too (glibc uses them; aarch64 has only the
    /// newer ones above).
    #[cfg(target_arch = "x86_64")]
    const ALLOWED_HERE: &[libc::c_long] = &[libc::SYS_epoll_wait, libc::SYS_alarm];
    #[cfg(target_arch = "aarch64")]
    const ALLOWED_HERE: &[libc::c_long] = &[];

    /// Calls that kill the worker.
    const DEADLY: &[libc::c_long] = &[
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_connect,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_personality,
    ];

    #[cfg(target_arch = "x86_64")]
    const DEADLY_HERE: &[libc::c_long] = &[
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_iopl,
        libc::SYS_ioperm,
    ];
    #[cfg(target_arch = "aarch64")]
    const DEADLY_HERE: &[libc::c_long] = &[];

    /// Every call the allowlist names, with or without conditions on its arguments
    /// (for the test that performs each).
    pub fn allowed_calls() -> Vec<i64> {
        let mut calls: Vec<i64> = ALLOWED.iter().chain(ALLOWED_HERE).copied().collect();
        calls.extend(
            allowed_with_arguments()
                .expect("compiles")
                .into_iter()
                .map(|(call, _)| call),
        );
        calls
    }

    /// Every call that kills the worker.
    pub fn deadly_calls() -> Vec<i64> {
        DEADLY.iter().chain(DEADLY_HERE).copied().collect()
    }

    /// The worker's two programs: the deadly list first, then the allowlist.
    #[derive(Debug)]
    pub struct Filter {
        deadly: BpfProgram,
        allowlist: BpfProgram,
    }

    impl Filter {
        /// Compiled for this machine, once its kernel is known to take it.
        pub(super) fn for_this_machine() -> Result<Filter, Unavailable> {
            let filter = Filter::compile().map_err(|e| Unavailable::Compile(e.to_string()))?;
            kill_process_available().map_err(|e| Unavailable::Kernel(crate::errors::plain(&e)))?;
            Ok(filter)
        }

        fn compile() -> Result<Filter, seccompiler::BackendError> {
            let arch: TargetArch = std::env::consts::ARCH.try_into()?;
            let deadly = SeccompFilter::new(
                deadly_calls()
                    .into_iter()
                    .map(|call| (call, vec![]))
                    .collect(),
                SeccompAction::Allow,
                SeccompAction::KillProcess,
                arch,
            )?;
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
                .iter()
                .chain(ALLOWED_HERE)
                .map(|&call| (call, vec![]))
                .collect();
            rules.extend(allowed_with_arguments()?);
            let allowlist = SeccompFilter::new(
                rules,
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                arch,
            )?;
            Ok(Filter {
                deadly: deadly.try_into()?,
                allowlist: allowlist.try_into()?,
            })
        }

        /// Sets `no_new_privs` and installs both programs in this process (which has
        /// one thread: a worker). The allowlist goes last, since it refuses the
        /// `seccomp` call itself.
        pub fn install(&self) -> Result<(), InstallError> {
            nix::sys::prctl::set_no_new_privs()
                .map_err(|e| InstallError(format!("no_new_privs: {e}")))?;
            for program in [&self.deadly, &self.allowlist] {
                seccompiler::apply_filter(program).map_err(|e| InstallError(e.to_string()))?;
            }
            Ok(())
        }
    }

    /// Calls allowed only with some arguments: one rule per allowed form.
    fn allowed_with_arguments() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
        let is = |index: u8, value: u64| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        };
        let one = |index: u8, value: u64| SeccompRule::new(vec![is(index, value)?]);
        let no_exec = || {
            SeccompRule::new(vec![SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                0,
            )?])
        };
        let fcntl = [
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_DUPFD_CLOEXEC,
        ]
        .into_iter()
        .map(|cmd| one(1, cmd as u64))
        .collect::<Result<Vec<_>, _>>()?;
        Ok(vec![
            (libc::SYS_mmap, vec![no_exec()?]),
            (libc::SYS_mprotect, vec![no_exec()?]),
            (libc::SYS_fcntl, fcntl),
            (libc::SYS_ioctl, vec![one(1, libc::FIONBIO)?]),
            (libc::SYS_socketpair, vec![one(0, libc::AF_UNIX as u64)?]),
            (libc::SYS_tgkill, vec![one(2, libc::SIGABRT as u64)?]),
        ])
    }

    /// Whether the kernel has seccomp filters with `SECCOMP_RET_KILL_PROCESS`.
    fn kill_process_available() -> std::io::Result<()> {
        let action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
        // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 the pointer names,
        // which lives on this stack for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_ACTION_AVAIL,
                0,
                &action as *const u32,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_filter_compiles_for_this_machine() {
            let filter = Filter::compile().expect("compiles");
            assert!(!filter.deadly.is_empty() && !filter.allowlist.is_empty());
        }

        #[test]
        fn no_call_is_both_allowed_and_deadly() {
            let allowed = allowed_calls();
            for call in deadly_calls() {
                assert!(!allowed.contains(&call), "call {call} is in both lists");
            }
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub mod filter {
    //! No filter is written for this architecture: workers run unfiltered.

    use super::{InstallError, Unavailable};

    #[derive(Debug)]
    pub struct Filter;

    impl Filter {
        pub(super) fn for_this_machine() -> Result<Filter, Unavailable> {
            Err(Unavailable::Architecture(std::env::consts::ARCH))
        }

        pub fn install(&self) -> Result<(), InstallError> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_word_follows_the_kernel_first() {
        assert_eq!(confinement(true, true, Some(2)), Confinement::Seccomp);
        // A worker started with the sandbox keeps it after a reload that turned it
        // off: the kernel's word counts, not the configuration's.
        assert_eq!(confinement(false, true, Some(2)), Confinement::Seccomp);
        assert_eq!(confinement(false, true, Some(0)), Confinement::Off);
        assert_eq!(confinement(false, false, None), Confinement::Off);
        assert_eq!(confinement(true, false, Some(0)), Confinement::Unavailable);
        // Not yet at the end of its set-up.
        assert_eq!(confinement(true, true, Some(0)), Confinement::Pending);
        assert_eq!(Confinement::Seccomp.word(), "seccomp");
    }

    #[test]
    fn the_masters_own_mode_is_readable() {
        // The test process is not filtered.
        assert_eq!(kernel_mode(std::process::id() as i32), Some(0));
    }
}
