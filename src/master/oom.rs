//! Whether the kernel's OOM killer struck: the `oom_kill` count of this process's
//! memory cgroup.
//!
//! Owns finding the counter (cgroup v2 `memory.events`, or v1
//! `memory.oom_control`, both with an `oom_kill N` line) and remembering the last
//! count seen; it decides nothing. A worker killed by SIGKILL from outside while the
//! count rose was, with all likelihood, the OOM killer's victim (gunicorn added
//! "Perhaps out of memory?" after years of confused reports; this knows). Without a
//! readable counter (no memory controller, a cgroup namespace hiding it) it says
//! nothing, and the old words stay.

use std::path::{Path, PathBuf};

/// The OOM kill counter of this process's memory cgroup.
#[derive(Debug)]
pub(super) struct OomCounter {
    file: Option<PathBuf>,
    last: u64,
}

impl OomCounter {
    /// The counter of the cgroup this process is in now (workers are forked into
    /// it).
    pub fn of_this_process() -> OomCounter {
        let file = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| counter_file(&text, Path::new("/sys/fs/cgroup")))
            .filter(|f| read_count(f).is_some());
        let last = file.as_deref().and_then(read_count).unwrap_or(0);
        OomCounter { file, last }
    }

    /// Whether the count rose since the last call (or the start).
    pub fn rose(&mut self) -> bool {
        let Some(now) = self.file.as_deref().and_then(read_count) else {
            return false;
        };
        let rose = now > self.last;
        self.last = now;
        rose
    }
}

fn read_count(file: &Path) -> Option<u64> {
    parse_oom_kill(&std::fs::read_to_string(file).ok()?)
}

/// The `oom_kill N` count of a memory.events or memory.oom_control text.
pub(super) fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// Where the counter is, from /proc/self/cgroup's text and the cgroup mount point:
/// the v1 memory hierarchy's `memory.oom_control` if there is one, else the v2
/// (unified) group's `memory.events`.
pub(super) fn counter_file(proc_self_cgroup: &str, root: &Path) -> Option<PathBuf> {
    let mut v2 = None;
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some(root.join("memory").join(path).join("memory.oom_control"));
        }
        if controllers.is_empty() {
            // A hybrid system mounts the unified hierarchy at root/unified.
            let unified = if root.join("unified").is_dir() {
                root.join("unified")
            } else {
                root.to_path_buf()
            };
            v2 = Some(unified.join(path).join("memory.events"));
        }
    }
    v2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_read_from_either_version() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(parse_oom_kill(v1), Some(7));
        assert_eq!(parse_oom_kill("oom 1\n"), None);
    }

    #[test]
    fn the_file_follows_the_memory_controller_or_the_unified_group() {
        let root = Path::new("/nonexistent-cgroup-root");
        let v1 = "9:name=systemd:/\n4:memory:/a/b\n0::/\n";
        assert_eq!(
            counter_file(v1, root),
            Some(root.join("memory/a/b/memory.oom_control"))
        );
        let v2 = "0::/system.slice/raasd.service\n";
        assert_eq!(
            counter_file(v2, root),
            Some(root.join("system.slice/raasd.service/memory.events"))
        );
        assert_eq!(counter_file("", root), None);
    }
}
