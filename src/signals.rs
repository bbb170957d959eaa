//! Signals as counted events on a self-pipe.
//!
//! Owns the only signal handlers raasd installs. A handler does two async-signal-safe
//! things and nothing else: it adds one to the counter of its signal and writes a byte
//! to a socketpair. The process's loop polls the read end and, awake, takes the counts.
//! Counting (not just flagging) matters: every TTIN the kernel delivers is one worker
//! more. (The kernel itself merges a signal sent again while the first is still
//! pending, so signals sent back-to-back in the same instant may count once.)
//!
//! Invariant: after fork the child must `uninstall` the parent's set before it
//! unblocks signals, or a signal meant for the child would be counted in memory it
//! ignores and would wake the parent's loop through the shared socket.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::c_int;
use signal_hook::SigId;

/// The signals of one process, each with its count of deliveries not yet taken.
pub struct SignalSet {
    signals: Vec<c_int>,
    counts: Arc<Vec<AtomicUsize>>,
    ids: Vec<SigId>,
    wake: UnixStream,
}

impl SignalSet {
    /// Installs handlers for `signals`.
    pub fn install(signals: &[c_int]) -> io::Result<SignalSet> {
        let (wake, waker) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let counts: Arc<Vec<AtomicUsize>> =
            Arc::new(signals.iter().map(|_| AtomicUsize::new(0)).collect());
        let mut ids = Vec::with_capacity(signals.len() * 2);
        for (index, &signal) in signals.iter().enumerate() {
            let counts = Arc::clone(&counts);
            // SAFETY: the action only does an atomic add on memory the registry keeps
            // alive (the Arc moves into the action); it neither allocates nor locks,
            // so it is async-signal-safe.
            let counter = unsafe {
                signal_hook::low_level::register(signal, move || {
                    counts[index].fetch_add(1, Ordering::SeqCst);
                })
            }?;
            ids.push(counter);
            // Registered after the counter, and actions run in registration order:
            // the loop is never woken before the count it wakes up for is there.
            ids.push(signal_hook::low_level::pipe::register(
                signal,
                waker.try_clone()?,
            )?);
        }
        Ok(SignalSet {
            signals: signals.to_vec(),
            counts,
            ids,
            wake,
        })
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Takes every delivery since the last call: (signal, times), in the order the
    /// signals were installed, leaving out signals not delivered.
    pub fn take(&self) -> Vec<(c_int, usize)> {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        self.signals
            .iter()
            .zip(self.counts.iter())
            .filter_map(|(&signal, count)| match count.swap(0, Ordering::SeqCst) {
                0 => None,
                times => Some((signal, times)),
            })
            .collect()
    }

    /// Removes this set's actions and closes its pipe. The signal-hook handler stays
    /// installed with no action, so these signals are ignored until another set
    /// claims them.
    pub fn uninstall(self) {
        for id in self.ids {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Makes the arrival of `signal` end this process within `secs` seconds, when by then
/// its parent is no longer `parent`: the action arms `alarm`, whose default action
/// ends the process wherever it is — wedged in a loop or blocked in a write — unless
/// the process exits first. Used with the parent-death signal, so that a worker never
/// outlives its master by more than that, whatever state its loop is in.
pub fn exit_soon_when_orphaned(signal: c_int, parent: libc::pid_t, secs: u32) -> io::Result<()> {
    // SAFETY: the action calls only getppid and alarm, both async-signal-safe
    // (signal-safety(7)); it captures two integers and neither allocates nor locks.
    unsafe {
        signal_hook::low_level::register(signal, move || {
            if libc::getppid() != parent {
                libc::alarm(secs);
            }
        })
    }?;
    Ok(())
}

/// The name of a signal for logs: "SIGHUP".
pub fn name(signal: c_int) -> &'static str {
    signal_hook::low_level::signal_name(signal).unwrap_or("signal")
}
