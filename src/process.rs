//! fork, done the one safe way for a process with signal handlers.
//!
//! Owns the `fork` call. Every signal is blocked across it, so that nothing is
//! delivered to the child before it has replaced its parent's signal set; the parent
//! unblocks at once, the child only when it says so through [`Blocked::release`].
//! Forking is refused unless the process has exactly one thread, because a child of
//! a threaded process may inherit locks held by threads that do not exist in it.

use std::io;

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

fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))
}
