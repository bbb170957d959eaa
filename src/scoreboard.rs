//! The scoreboard: what every worker is doing, readable without asking.
//!
//! Owns one anonymous shared memory map, made by the master before it forks any
//! worker: a 64-byte header, then cells of 128 bytes (two whole cache lines each, so
//! workers never contend; asserted at compile time; what siblings read of each other
//! is in the first line). The types say who writes what:
//! - the master, through [`Scoreboard`], claims a cell for a worker before forking
//!   it (stamping its heartbeat, so a worker slow to start is timed from its spawn),
//!   releases it when the worker is reaped, keeps the header's count of cells in use,
//!   and reads heartbeats and counters;
//! - a worker, through the [`CellWriter`] of its own cell, beats and publishes its
//!   counters and accept state with relaxed atomic stores, and reads its serving
//!   siblings' connection counts (to step back from accepting when it holds more
//!   than its share).
//!
//! No locks: every field is an independent counter or stamp. The map reserves
//! [`CELLS`] cells up front (twice the largest worker count, since a rotation briefly
//! runs two workers per slot); the kernel backs a page only when it is first touched,
//! so the resident size follows the worker count and TTIN needs no remapping.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};
use nix::time::{ClockId, clock_gettime};

use crate::config::MAX_WORKERS;

pub const CELLS: usize = 2 * MAX_WORKERS;

/// One worker's entry. All zeros is a valid, empty cell.
#[repr(C, align(64))]
#[derive(Default)]
struct Cell {
    /// 1 while the worker serves (from its start until it stops).
    serving: AtomicU64,
    /// From when (monotonic ms) the worker accepts: 0 while it does (or can be
    /// nudged to), a moment ahead while paused, u64::MAX while stopping or full.
    accepts_from_ms: AtomicU64,
    /// Milliseconds on the monotonic clock (shared by all processes) of the last beat.
    heartbeat_ms: AtomicU64,
    connections: AtomicU64,
    accepted: AtomicU64,
    served: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Connections taken over from retiring workers (live hand-over).
    taken_over: AtomicU64,
}

/// What precedes the cells.
#[repr(C, align(64))]
#[derive(Default)]
struct Header {
    /// One past the highest cell index the master has handed out.
    cells_in_use: AtomicU64,
}

const _: () = assert!(size_of::<Cell>() == 128, "a cell is two whole cache lines");
const _: () = assert!(size_of::<Header>() == 64);

/// A plain copy of a cell's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub connections: u64,
    pub accepted: u64,
    pub served: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub taken_over: u64,
}

impl Counters {
    /// What the supervisor adds to its totals when the worker is gone.
    pub fn served(&self) -> crate::supervisor::Served {
        crate::supervisor::Served {
            requests: self.served,
            accepted: self.accepted,
            taken_over: self.taken_over,
            bytes_received: self.bytes_in,
            bytes_sent: self.bytes_out,
        }
    }
}

/// See [`CellWriter::siblings_load`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub connections: u64,
    pub workers: u64,
    pub accepting: u64,
}

/// The map, as the master holds it (and every worker inherits it).
pub struct Scoreboard {
    map: NonNull<Header>,
}

const MAP_LEN: usize = size_of::<Header>() + CELLS * size_of::<Cell>();

impl Scoreboard {
    pub fn new() -> io::Result<Scoreboard> {
        let length = NonZeroUsize::new(MAP_LEN).expect("the map is not empty");
        // SAFETY: a new anonymous mapping overlaps nothing Rust owns; it is zero-filled
        // and page-aligned, and an all-zero Header or Cell (atomics only) is valid. MAP_SHARED
        // makes the workers' stores visible to the master after fork; every access
        // goes through atomics, so concurrent use from several processes is sound.
        let map = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(Scoreboard { map: map.cast() })
    }

    fn header(&self) -> &Header {
        // SAFETY: the header is at the start of the mapping, which lives as long as self.
        unsafe { self.map.as_ref() }
    }

    fn cell(&self, index: usize) -> &Cell {
        assert!(index < CELLS, "scoreboard cell {index} out of range");
        // SAFETY: the cells follow the header (both 64-byte aligned) and index is in
        // range, so the cell lies within the mapping, which lives as long as self.
        unsafe { self.map.add(1).cast::<Cell>().add(index).as_ref() }
    }

    /// The master, before forking the worker that will own cell `index`: an empty
    /// cell whose heartbeat is now.
    pub fn claim(&self, index: usize) {
        let cell = self.cell(index);
        cell.serving.store(0, Relaxed);
        cell.accepts_from_ms.store(u64::MAX, Relaxed);
        cell.heartbeat_ms.store(monotonic_ms(), Relaxed);
        for counter in [
            &cell.connections,
            &cell.accepted,
            &cell.served,
            &cell.bytes_in,
            &cell.bytes_out,
            &cell.taken_over,
        ] {
            counter.store(0, Relaxed);
        }
        self.header()
            .cells_in_use
            .fetch_max(index as u64 + 1, Relaxed);
    }

    /// The master, once the worker of cell `index` is gone: siblings stop counting it.
    pub fn release(&self, index: usize) {
        let cell = self.cell(index);
        cell.serving.store(0, Relaxed);
        cell.accepts_from_ms.store(u64::MAX, Relaxed);
        cell.connections.store(0, Relaxed);
    }

    /// Milliseconds since the last beat of cell `index`.
    pub fn heartbeat_age_ms(&self, index: usize, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.cell(index).heartbeat_ms.load(Relaxed))
    }

    /// The counters cell `index` last published.
    pub fn counters(&self, index: usize) -> Counters {
        let cell = self.cell(index);
        Counters {
            connections: cell.connections.load(Relaxed),
            accepted: cell.accepted.load(Relaxed),
            served: cell.served.load(Relaxed),
            bytes_in: cell.bytes_in.load(Relaxed),
            bytes_out: cell.bytes_out.load(Relaxed),
            taken_over: cell.taken_over.load(Relaxed),
        }
    }

    /// A worker, after fork: the writer of its own cell.
    pub fn writer(&self, index: usize) -> CellWriter<'_> {
        CellWriter { board: self, index }
    }
}

/// A worker's hold on its own cell: the only way to write one.
pub struct CellWriter<'a> {
    board: &'a Scoreboard,
    index: usize,
}

impl CellWriter<'_> {
    fn cell(&self) -> &Cell {
        self.board.cell(self.index)
    }

    pub fn beat(&self, now_ms: u64) {
        self.cell().heartbeat_ms.store(now_ms, Relaxed);
    }

    pub fn publish(&self, counters: &Counters) {
        let cell = self.cell();
        cell.connections.store(counters.connections, Relaxed);
        cell.accepted.store(counters.accepted, Relaxed);
        cell.served.store(counters.served, Relaxed);
        cell.bytes_in.store(counters.bytes_in, Relaxed);
        cell.bytes_out.store(counters.bytes_out, Relaxed);
        cell.taken_over.store(counters.taken_over, Relaxed);
    }

    /// The connection count alone, at once (siblings read it to balance).
    pub fn set_connections(&self, connections: u64) {
        self.cell().connections.store(connections, Relaxed);
    }

    /// Whether this worker serves, and from when it accepts (see [`Load`]).
    pub fn set_accept_state(&self, serving: bool, accepts_from_ms: u64) {
        let cell = self.cell();
        cell.serving.store(u64::from(serving), Relaxed);
        cell.accepts_from_ms.store(accepts_from_ms, Relaxed);
    }

    /// What the serving workers other than this one hold: connections, how many
    /// they are, and how many accept at `now_ms` (or would, as soon as they run).
    pub fn siblings_load(&self, now_ms: u64) -> Load {
        let in_use = (self.board.header().cells_in_use.load(Relaxed) as usize).min(CELLS);
        let mut load = Load::default();
        for index in (0..in_use).filter(|&i| i != self.index) {
            let cell = self.board.cell(index);
            if cell.serving.load(Relaxed) != 1 {
                continue;
            }
            load.connections += cell.connections.load(Relaxed);
            load.workers += 1;
            load.accepting += u64::from(cell.accepts_from_ms.load(Relaxed) <= now_ms);
        }
        load
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and no reference into
        // it outlives self (`cell` and `writer` borrow self).
        let _ = unsafe { munmap(self.map.cast(), MAP_LEN) };
    }
}

/// Milliseconds on CLOCK_MONOTONIC, the clock every process of the machine shares.
pub fn monotonic_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_publishes_and_the_master_and_siblings_read() {
        let board = Scoreboard::new().unwrap();
        board.claim(3);
        board.claim(4);
        let three = board.writer(3);
        three.publish(&Counters {
            connections: 1,
            accepted: 2,
            served: 3,
            bytes_in: 4,
            bytes_out: 5,
            taken_over: 6,
        });
        assert_eq!(board.counters(3).served, 3);
        assert_eq!(board.counters(4), Counters::default());
        assert!(board.heartbeat_age_ms(3, monotonic_ms()) < 1000);
        three.set_accept_state(true, 0);
        let four = board.writer(4);
        four.set_accept_state(true, u64::MAX);
        let load = four.siblings_load(monotonic_ms());
        assert_eq!((load.connections, load.workers, load.accepting), (1, 1, 1));
        // The one that is full is a serving sibling that does not accept.
        let load = three.siblings_load(monotonic_ms());
        assert_eq!((load.workers, load.accepting), (1, 0));
        board.release(3);
        assert_eq!(four.siblings_load(monotonic_ms()).workers, 0);
        board.claim(CELLS - 1);
    }
}
