//! What the master measures of its workers for the supervisor: resident memory
//! (--max-worker-memory) and whether the kernel's OOM killer struck.
//!
//! Owns the process table reader and the OOM counter; it decides nothing: the
//! figures go to [`crate::supervisor`] as events.

use super::oom::OomCounter;
use crate::supervisor::Pid;

pub(super) struct Probes {
    system: sysinfo::System,
    /// The OOM killer's count in our memory cgroup.
    oom: OomCounter,
}

impl Probes {
    pub fn new() -> Result<Probes, String> {
        Ok(Probes {
            system: sysinfo::System::new()
                .map_err(|e| format!("cannot read process information: {e}"))?,
            oom: OomCounter::of_this_process(),
        })
    }

    /// The resident bytes of those of `pids` still there.
    pub fn resident(&mut self, pids: &[Pid]) -> Vec<(Pid, u64)> {
        let of = |pid: &Pid| sysinfo::Pid::from_u32(pid.0 as u32);
        let wanted: Vec<sysinfo::Pid> = pids.iter().map(of).collect();
        self.system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&wanted),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        pids.iter()
            .filter_map(|pid| Some((*pid, self.system.process(of(pid))?.memory())))
            .collect()
    }

    /// Whether the memory cgroup's OOM kill count rose since the previous worker's
    /// exit (read on every exit, so that a rise is never blamed on a later one).
    pub fn oom_kill_count_rose(&mut self) -> bool {
        self.oom.rose()
    }
}
