//! Reconnect delays: 100 ms doubling up to 5 s, each jittered by ±20 % so that many
//! clients cut off by the same restart do not come back in one burst, and the whole
//! sequence bounded by a total retry time.

use std::time::{Duration, Instant};

use crate::rng::Rng;

const INITIAL: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

pub struct Backoff {
    next: Duration,
    /// The first failure since the last success: the retry budget counts from here.
    failing_since: Option<Instant>,
    retry_for: Duration,
    rng: Rng,
}

impl Backoff {
    pub fn new(retry_for: Duration) -> Backoff {
        Backoff {
            next: INITIAL,
            failing_since: None,
            retry_for,
            rng: Rng::from_entropy(0),
        }
    }

    /// Something worked: the next failure starts from the shortest delay and a fresh
    /// retry budget.
    pub fn succeeded(&mut self) {
        self.next = INITIAL;
        self.failing_since = None;
    }

    /// An attempt failed at `now`: how long to wait before the next one, or `None`
    /// once the retry budget is spent.
    pub fn failed(&mut self, now: Instant) -> Option<Duration> {
        let since = *self.failing_since.get_or_insert(now);
        let left = self.retry_for.checked_sub(now - since)?;
        if left.is_zero() {
            return None;
        }
        let jitter = 0.8 + 0.4 * self.rng.unit_f64();
        let delay = self.next.mul_f64(jitter).min(left);
        self.next = (self.next * 2).min(MAX);
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(3600));
        let now = Instant::now();
        let mut bases = Vec::new();
        for _ in 0..10 {
            bases.push(b.next);
            let d = b.failed(now).unwrap();
            assert!(d >= b_min(bases[bases.len() - 1]) && d <= b_max(bases[bases.len() - 1]));
        }
        assert_eq!(bases[0], Duration::from_millis(100));
        assert_eq!(bases[1], Duration::from_millis(200));
        assert_eq!(bases[9], MAX);
    }

    fn b_min(d: Duration) -> Duration {
        d.mul_f64(0.8)
    }

    fn b_max(d: Duration) -> Duration {
        d.mul_f64(1.2)
    }

    #[test]
    fn gives_up_after_the_budget_and_resets_on_success() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(b.failed(t0).is_some());
        // Never waits past the budget.
        assert!(b.failed(t0 + Duration::from_millis(950)).unwrap() <= Duration::from_millis(50));
        assert!(b.failed(t0 + Duration::from_secs(1)).is_none());
        b.succeeded();
        assert!(b.failed(t0 + Duration::from_secs(5)).is_some());
        assert!(Backoff::new(Duration::ZERO).failed(t0).is_none());
    }
}
