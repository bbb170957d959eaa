//! What a benchmark counts: replies, failures by kind and reconnects, per chaos phase,
//! and one latency histogram; each load thread keeps its own and they are merged at
//! the end, so the hot path never shares a cache line.

use hdrhistogram::Histogram;

/// Highest latency recorded exactly, in µs (an hour); longer ones are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Counters of one phase (or of the whole run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Correct replies.
    pub replies: u64,
    /// Replies that were not the reversal of their request.
    pub mismatch: u64,
    /// Connects the server refused.
    pub refused: u64,
    /// Requests lost to a connection reset (or broken pipe).
    pub reset: u64,
    /// Requests (or connects) not answered within --timeout.
    pub timeout: u64,
    /// Anything else: unexpected errors, replies nobody asked for.
    pub other: u64,
    /// Connections the server closed with requests outstanding, which were sent again
    /// on a new connection (not a failure).
    pub reconnects: u64,
}

impl Counts {
    pub fn errors(&self) -> u64 {
        self.mismatch + self.refused + self.reset + self.timeout + self.other
    }

    /// Requests that completed, well or not.
    pub fn requests(&self) -> u64 {
        self.replies + self.errors()
    }

    fn add(&mut self, o: &Counts) {
        self.replies += o.replies;
        self.mismatch += o.mismatch;
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.other += o.other;
        self.reconnects += o.reconnects;
    }
}

/// The kinds of failure, for counting one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Mismatch,
    Refused,
    Reset,
    Timeout,
    Other,
}

pub struct Stats {
    pub latency_us: Histogram<u64>,
    /// Phase 0 is before the first chaos signal; without chaos it is the whole run.
    pub phases: Vec<Counts>,
    /// Running totals over all phases, for the progress display.
    pub replies: u64,
    pub errors: u64,
    /// The first unexpected ("other") error, to show why they happened.
    pub first_other: Option<String>,
}

impl Stats {
    pub fn new(phases: usize) -> Stats {
        Stats {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
            phases: vec![Counts::default(); phases.max(1)],
            replies: 0,
            errors: 0,
            first_other: None,
        }
    }

    pub fn reply(&mut self, phase: usize, latency_us: u64) {
        self.phases[phase].replies += 1;
        self.replies += 1;
        self.latency_us
            .saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
    }

    pub fn fail(&mut self, phase: usize, kind: Failure, n: u64) {
        self.errors += n;
        let c = &mut self.phases[phase];
        match kind {
            Failure::Mismatch => c.mismatch += n,
            Failure::Refused => c.refused += n,
            Failure::Reset => c.reset += n,
            Failure::Timeout => c.timeout += n,
            Failure::Other => c.other += n,
        }
    }

    pub fn reconnect(&mut self, phase: usize) {
        self.phases[phase].reconnects += 1;
    }

    pub fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        for (mine, theirs) in self.phases.iter_mut().zip(&other.phases) {
            mine.add(theirs);
        }
        self.replies += other.replies;
        self.errors += other.errors;
        if self.first_other.is_none() {
            self.first_other.clone_from(&other.first_other);
        }
    }

    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        for p in &self.phases {
            t.add(p);
        }
        t
    }

    /// Counts an unexpected error that belongs to no request, keeping its message.
    pub fn other(&mut self, phase: usize, message: String) {
        self.fail(phase, Failure::Other, 1);
        self.first_other.get_or_insert(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_counts_and_latencies() {
        let mut a = Stats::new(2);
        a.reply(0, 100);
        a.fail(1, Failure::Reset, 3);
        let mut b = Stats::new(2);
        b.reply(1, 0);
        b.fail(1, Failure::Mismatch, 1);
        b.reconnect(1);
        a.merge(&b);
        let t = a.total();
        assert_eq!((t.replies, t.reset, t.mismatch, t.reconnects), (2, 3, 1, 1));
        assert_eq!(t.errors(), 4);
        assert_eq!(t.requests(), 6);
        assert_eq!(a.latency_us.len(), 2);
        assert_eq!(a.latency_us.min(), 1);
    }
}
