//! What the workers have done, added up: the totals of `status` and the metrics.
//!
//! Owns the arithmetic and the JSON form (one owner for both masters of an upgrade:
//! the old one hands its totals on in this form, the new one reads it).

use serde::{Deserialize, Serialize};

/// What one worker had done when it ended (its scoreboard cell's counters).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    pub accepted: u64,
    pub taken_over: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// Since the master started; they survive rotations, and an upgrade hands them on.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    /// Accepted (a connection handed over is not counted again). The aliases read
    /// the totals a previous master of an older version hands on.
    #[serde(alias = "connections")]
    pub connections_accepted: u64,
    #[serde(alias = "bytes_in")]
    pub bytes_received: u64,
    #[serde(alias = "bytes_out")]
    pub bytes_sent: u64,
    /// Workers replaced, by reason: `reload`, `resize`, `recycled` (--max-requests,
    /// --max-worker-memory), `failed` (an error exit or a crash), `ended from
    /// outside` (a kill), `killed by the master` (heartbeat, stop deadline).
    pub restarts: std::collections::BTreeMap<String, u64>,
}

impl Totals {
    /// Adds one worker's counters: one gone, or (for `status`) one still serving.
    pub fn add_served(&mut self, served: &Served) {
        self.requests += served.requests;
        self.connections_accepted += served.accepted;
        self.bytes_received += served.bytes_received;
        self.bytes_sent += served.bytes_sent;
    }

    /// Adds the totals a previous master handed on.
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.connections_accepted += other.connections_accepted;
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
        for (reason, n) in &other.restarts {
            *self.restarts.entry(reason.clone()).or_default() += n;
        }
    }

    pub fn count_restart(&mut self, reason: &str) {
        *self.restarts.entry(reason.to_string()).or_default() += 1;
    }

    /// Whether no figure of `self` is below `earlier`'s.
    pub fn covers(&self, earlier: &Totals) -> bool {
        self.requests >= earlier.requests
            && self.connections_accepted >= earlier.connections_accepted
            && self.bytes_received >= earlier.bytes_received
            && self.bytes_sent >= earlier.bytes_sent
            && earlier
                .restarts
                .iter()
                .all(|(k, n)| self.restarts.get(k).is_some_and(|m| m >= n))
    }
}
