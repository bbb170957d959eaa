//! The workers as the supervisor sees them, and the rules over the set.
//!
//! Owns each worker's life cycle ([`Life`]: an enum, so that "retiring but
//! accepting" or "killed and replaced" cannot be written down) and the plain
//! functions that decide over the set — which slots need a worker, which workers to
//! retire, whether every slot accepts — so that unit tests call them alone.
//!
//! A slot keeps its number across respawns and rotations; during a rotation (HUP) or
//! a replacement a slot briefly has two workers, the old one retired only once the
//! new one accepts.

use std::time::Instant;

use super::Pid;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Forked; has not yet reported that its listeners are in its poll set.
    Starting,
    /// Serving its slot.
    Accepting,
    /// Still serving, but to be replaced (it reached --max-requests, or outgrew
    /// --max-worker-memory): its slot gets a new worker, and it retires once that
    /// one accepts.
    Replacing,
    /// Told to stop; its exit is expected.
    Retiring,
    /// SIGKILLed by the master, for this reason; not reaped yet.
    Killed(&'static str),
}

/// One worker process.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    /// Its scoreboard cell.
    pub cell: usize,
    pub spawned_at: Instant,
    pub life: Life,
    /// It was started with --sandbox on.
    pub sandbox: bool,
    /// How old its heartbeat was at the last reading, in milliseconds.
    pub beat_age_ms: u64,
}

impl Worker {
    /// Serves its slot in `generation`: the one counted for the slot.
    pub fn is_current(&self, generation: u64) -> bool {
        self.generation == generation && matches!(self.life, Life::Starting | Life::Accepting)
    }

    /// Whether its exit, when it comes, was asked for.
    pub fn is_ending(&self) -> bool {
        matches!(self.life, Life::Retiring | Life::Killed(_))
    }
}

/// The worker serving `slot` in `generation`, if any.
pub fn current(workers: &[Worker], slot: usize, generation: u64) -> Option<&Worker> {
    workers
        .iter()
        .find(|w| w.slot == slot && w.is_current(generation))
}

/// The slots among `0..target` with no worker of `generation`.
pub fn slots_to_fill(workers: &[Worker], target: usize, generation: u64) -> Vec<usize> {
    (0..target)
        .filter(|&slot| current(workers, slot, generation).is_none())
        .collect()
}

/// The workers to retire now: those in a slot beyond `target`, and those of an
/// older generation or being replaced, once the current worker of their slot
/// accepts (never before: the slot must not go without a worker).
pub fn to_retire(workers: &[Worker], target: usize, generation: u64) -> Vec<Pid> {
    workers
        .iter()
        .filter(|w| !w.is_ending())
        .filter(|w| {
            w.slot >= target
                || ((w.generation < generation || w.life == Life::Replacing)
                    && current(workers, w.slot, generation)
                        .is_some_and(|c| c.life == Life::Accepting))
        })
        .map(|w| w.pid)
        .collect()
}

/// How the slots of `0..target` stand: the one count behind the title, the status
/// and the metrics, so that they never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Census {
    /// Slots whose current worker accepts and beats in time.
    pub accepting: usize,
    /// Slots whose current worker accepts but has missed its beats: not counted as
    /// accepting (it may be stopped, or stuck in a loop), not killed yet.
    pub late: usize,
}

/// Counts the slots of `0..target` in `generation`; `is_late` is the heartbeat rule.
pub fn census(
    workers: &[Worker],
    target: usize,
    generation: u64,
    is_late: impl Fn(&Worker) -> bool,
) -> Census {
    let mut census = Census::default();
    for slot in 0..target {
        match current(workers, slot, generation) {
            Some(w) if w.life == Life::Accepting && is_late(w) => census.late += 1,
            Some(w) if w.life == Life::Accepting => census.accepting += 1,
            _ => {}
        }
    }
    census
}

/// Whether every slot of `0..target` has an accepting worker of `generation`.
pub fn all_accepting(workers: &[Worker], target: usize, generation: u64) -> bool {
    target > 0
        && (0..target).all(|slot| {
            current(workers, slot, generation).is_some_and(|w| w.life == Life::Accepting)
        })
}

/// The first scoreboard cell of `0..cells` no worker holds.
pub fn free_cell(workers: &[Worker], cells: usize) -> Option<usize> {
    (0..cells).find(|&c| workers.iter().all(|w| w.cell != c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: i32, slot: usize, generation: u64, life: Life) -> Worker {
        Worker {
            pid: Pid(pid),
            slot,
            generation,
            cell: pid as usize,
            spawned_at: Instant::now(),
            life,
            sandbox: true,
            beat_age_ms: 0,
        }
    }

    fn pids(list: Vec<Pid>) -> Vec<i32> {
        list.into_iter().map(|p| p.0).collect()
    }

    #[test]
    fn a_rotation_retires_an_old_worker_only_once_its_successor_accepts() {
        let mut set = vec![
            worker(10, 0, 1, Life::Accepting),
            worker(11, 1, 1, Life::Accepting),
        ];
        assert_eq!(slots_to_fill(&set, 2, 2), vec![0, 1]);
        set.push(worker(20, 0, 2, Life::Starting));
        set.push(worker(21, 1, 2, Life::Starting));
        assert!(
            to_retire(&set, 2, 2).is_empty(),
            "not before the new ones accept"
        );
        set[2].life = Life::Accepting;
        assert_eq!(pids(to_retire(&set, 2, 2)), vec![10]);
        assert!(!all_accepting(&set, 2, 2));
        set[3].life = Life::Accepting;
        assert!(all_accepting(&set, 2, 2));
    }

    #[test]
    fn a_shrink_retires_the_slots_beyond_the_target_at_once() {
        let set = vec![
            worker(10, 0, 1, Life::Accepting),
            worker(11, 1, 1, Life::Starting),
            worker(12, 2, 1, Life::Accepting),
        ];
        assert_eq!(pids(to_retire(&set, 1, 1)), vec![11, 12]);
        assert!(slots_to_fill(&set, 1, 1).is_empty());
    }

    #[test]
    fn a_worker_being_replaced_leaves_its_slot_to_fill_and_retires_after() {
        let mut set = vec![worker(10, 0, 1, Life::Replacing)];
        assert_eq!(slots_to_fill(&set, 1, 1), vec![0]);
        assert!(to_retire(&set, 1, 1).is_empty());
        set.push(worker(11, 0, 1, Life::Accepting));
        assert_eq!(pids(to_retire(&set, 1, 1)), vec![10]);
    }

    #[test]
    fn ending_workers_are_neither_current_nor_retired_again() {
        let set = vec![
            worker(10, 0, 1, Life::Retiring),
            worker(11, 1, 1, Life::Killed("no heartbeat")),
        ];
        assert_eq!(slots_to_fill(&set, 2, 1), vec![0, 1]);
        assert!(to_retire(&set, 0, 1).is_empty());
        assert!(set.iter().all(Worker::is_ending));
    }

    #[test]
    fn a_late_worker_is_counted_as_late_not_as_accepting() {
        let ws = vec![
            worker(10, 0, 2, Life::Accepting),
            worker(11, 1, 2, Life::Accepting),
            worker(12, 2, 2, Life::Starting),
            worker(13, 1, 1, Life::Retiring),
        ];
        let late = |w: &Worker| w.pid.0 == 11;
        assert_eq!(
            census(&ws, 3, 2, late),
            Census {
                accepting: 1,
                late: 1
            }
        );
        assert_eq!(census(&ws, 3, 2, |_| false).accepting, 2);
        assert_eq!(census(&ws, 0, 2, |_| false), Census::default());
    }

    #[test]
    fn a_cell_is_free_once_no_worker_holds_it() {
        let ws = vec![
            worker(0, 0, 1, Life::Accepting),
            worker(2, 1, 1, Life::Retiring),
        ];
        assert_eq!(free_cell(&ws, 4), Some(1));
        assert_eq!(free_cell(&ws[..1], 1), None);
    }
}
