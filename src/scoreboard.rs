//! The scoreboard: what every worker is doing, readable by the master without asking.
//!
//! Owns one anonymous shared memory map, made by the master before it forks any
//! worker, divided into 64-byte cells (one cache line each, so workers never contend).
//! Each live worker process has a cell of its own, given by the master at spawn; the
//! worker writes only its cell, with relaxed atomic stores, and the master only reads.
//! No locks: every field is an independent counter or stamp.
//!
//! A header before the cells says how many cells are in use, so a worker can look at
//! its serving siblings' connection counts (to step back from accepting when it holds
//! well above its fair share) without scanning the whole map.
//!
//! The map reserves [`CELLS`] cells up front (twice the largest worker count, since a
//! rotation briefly runs two workers per slot). Reserving is not using: the kernel
//! backs a page only when it is first touched, so the resident size follows the
//! worker count and TTIN past any initial count needs no remapping.

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
pub struct Cell {
    pub pid: AtomicU64,
    /// 1 while the worker serves (from its start until it stops).
    pub serving: AtomicU64,
    /// From when (monotonic ms) the worker accepts: 0 while it does, a moment ahead
    /// while it steps back, u64::MAX while it is full.
    pub accepts_from_ms: AtomicU64,
    pub generation: AtomicU64,
    /// Milliseconds on the monotonic clock (shared by all processes) of the last beat.
    pub heartbeat_ms: AtomicU64,
    pub connections: AtomicU64,
    pub accepted: AtomicU64,
    pub served: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A plain copy of a cell's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub connections: u64,
    pub accepted: u64,
    pub served: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Cell {
    /// Called by the master before forking the worker that will own the cell, so a
    /// worker slow to start is timed from its spawn.
    pub fn claim(&self, pid: u64, generation: u64) {
        self.pid.store(pid, Relaxed);
        self.serving.store(0, Relaxed);
        self.generation.store(generation, Relaxed);
        self.heartbeat_ms.store(monotonic_ms(), Relaxed);
        self.publish(&Counters::default());
    }

    /// Called by the master when the worker is gone.
    pub fn release(&self) {
        self.pid.store(0, Relaxed);
        self.serving.store(0, Relaxed);
        self.accepts_from_ms.store(u64::MAX, Relaxed);
        self.connections.store(0, Relaxed);
    }

    pub fn beat(&self, now_ms: u64) {
        self.heartbeat_ms.store(now_ms, Relaxed);
    }

    pub fn publish(&self, counters: &Counters) {
        self.connections.store(counters.connections, Relaxed);
        self.accepted.store(counters.accepted, Relaxed);
        self.served.store(counters.served, Relaxed);
        self.bytes_in.store(counters.bytes_in, Relaxed);
        self.bytes_out.store(counters.bytes_out, Relaxed);
    }

    pub fn counters(&self) -> Counters {
        Counters {
            connections: self.connections.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            served: self.served.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }

    /// Milliseconds since the last beat.
    pub fn heartbeat_age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.heartbeat_ms.load(Relaxed))
    }
}

/// What precedes the cells.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Header {
    /// One past the highest cell index the master has handed out.
    pub cells_in_use: AtomicU64,
}

/// See [`Scoreboard::siblings_load`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub connections: u64,
    pub workers: u64,
    pub accepting: u64,
}

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

    pub fn header(&self) -> &Header {
        // SAFETY: the header is at the start of the mapping, which lives as long as self.
        unsafe { self.map.as_ref() }
    }

    pub fn cell(&self, index: usize) -> &Cell {
        assert!(index < CELLS, "scoreboard cell {index} out of range");
        // SAFETY: the cells follow the header (both 64-byte aligned) and index is in
        // range, so the cell lies within the mapping, which lives as long as self.
        unsafe { self.map.add(1).cast::<Cell>().add(index).as_ref() }
    }

    /// What the serving workers other than `me` hold: connections, how many they
    /// are, and how many accept at `now_ms` (or would, as soon as they run).
    pub fn siblings_load(&self, me: &Cell, now_ms: u64) -> Load {
        let in_use = (self.header().cells_in_use.load(Relaxed) as usize).min(CELLS);
        let mut load = Load::default();
        for cell in (0..in_use).map(|i| self.cell(i)) {
            if std::ptr::eq(cell, me) || cell.serving.load(Relaxed) != 1 {
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
        // it outlives self (`cell` borrows self).
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
    fn cells_hold_what_was_published() {
        let board = Scoreboard::new().unwrap();
        board.cell(3).claim(42, 2);
        board.cell(3).publish(&Counters {
            connections: 1,
            accepted: 2,
            served: 3,
            bytes_in: 4,
            bytes_out: 5,
        });
        assert_eq!(board.cell(3).counters().served, 3);
        assert_eq!(board.cell(4).counters(), Counters::default());
        assert!(board.cell(3).heartbeat_age_ms(monotonic_ms()) < 1000);
        board.header().cells_in_use.store(5, Relaxed);
        board.cell(3).serving.store(1, Relaxed);
        board.cell(4).serving.store(1, Relaxed);
        board.cell(4).accepts_from_ms.store(u64::MAX, Relaxed);
        let load = board.siblings_load(board.cell(4), monotonic_ms());
        assert_eq!((load.connections, load.workers, load.accepting), (1, 1, 1));
        board.cell(CELLS - 1).claim(1, 1);
    }
}
