//! Process plumbing: fork, done the one safe way for a process with signal handlers,
//! and taking ownership of descriptors inherited across exec or passed in a message.
//!
//! Owns the `fork` call. Every signal is blocked across it, so that nothing is
//! delivered to the child before it has replaced its parent's signal set; the parent
//! unblocks at once, the child only when it says so through [`Blocked::release`].
//! Forking is refused unless the process has exactly one thread, because a child of
//! a threaded process may inherit locks held by threads that do not exist in it.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::unistd::{ForkResult, Pid};

/// In the child: signals are blocked until this is released.
#[must_use = "the child must release the signal mask once its parent's handlers are gone"]
pub struct Blocked {
    previous: SigSet,
}

impl Blocked {
    pub fn release(self) {
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.previous), None);
    }
}

pub enum Forked {
    Parent(Pid),
    Child(Blocked),
}

/// Forks with every signal blocked across the call.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork with {threads} threads running"
        )));
    }
    let mut previous = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut previous),
    )?;
    // SAFETY: the process has a single thread (checked above), so the child's copy of
    // memory holds no lock or state half-changed by another thread; the child runs
    // ordinary Rust code and leaves only through process::exit.
    let forked = unsafe { nix::unistd::fork() };
    match forked {
        Ok(ForkResult::Child) => Ok(Forked::Child(Blocked { previous })),
        Ok(ForkResult::Parent { child }) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
            Ok(Forked::Parent(child))
        }
        Err(errno) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
            Err(errno.into())
        }
    }
}

/// Takes ownership of a descriptor this process inherited by number (named in an
/// environment variable by whoever started it).
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::other(format!(
            "descriptor {fd} is a standard stream"
        )));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF when the
    // number is not open, which is checked before ownership is claimed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process to
    // own by its parent or systemd; callers take each number once, so it gets exactly
    // one owner, and nothing else in raasd uses inherited numbers.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(owned)
}

/// One message read without waiting from a unix socket.
pub struct Message {
    /// Bytes read into the caller's buffer.
    pub bytes: usize,
    /// The message or its descriptors did not fit.
    pub truncated: bool,
    /// The descriptors that came along (SCM_RIGHTS), owned, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Reads one message from `socket` into `buf`, with room in `space` for the
/// descriptors it may carry; EAGAIN when none waits.
pub fn receive_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    space: &mut [u8],
) -> nix::Result<Message> {
    let mut iov = [IoSliceMut::new(buf)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().into_iter().flatten() {
        if let ControlMessageOwned::ScmRights(passed) = cmsg {
            // SAFETY: the kernel has just installed these descriptors in this process
            // for this message (SCM_RIGHTS); nothing else knows their numbers, so each
            // gets exactly one owner here.
            fds.extend(
                passed
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(Message {
        bytes: message.bytes,
        truncated: message
            .flags
            .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC),
        fds,
    })
}

/// Removes environment variables that handed this process descriptors or state,
/// once they have been taken. Only while the process has one thread (as the master
/// has at start): otherwise they are left, which is harmless.
pub fn forget_environment(names: &[&str]) {
    if thread_count().ok() != Some(1) {
        return;
    }
    for name in names {
        // SAFETY: the process has a single thread (checked above), so nothing reads or
        // writes the environment concurrently with this removal.
        unsafe { std::env::remove_var(name) };
    }
}

fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))
}
