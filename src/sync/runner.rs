//! Upstream's BoundedFrequencyRunner: syncs no more often than `min_interval` (with a burst of
//! two) and at least every `max_interval`.

use tokio::time::{Duration, Instant};

/// Decides when the next sync may run. Pure: the caller supplies the clock.
#[derive(Debug, Clone)]
pub struct BoundedFrequency {
    min_interval: Duration,
    max_interval: Duration,
    burst: u32,
    tokens: f64,
    last_refill: Instant,
    last_run: Instant,
}

impl BoundedFrequency {
    /// A runner allowing `burst` back-to-back runs, refilled one per `min_interval`.
    pub fn new(min_interval: Duration, max_interval: Duration, burst: u32, now: Instant) -> Self {
        BoundedFrequency {
            min_interval,
            max_interval,
            burst,
            tokens: f64::from(burst),
            last_refill: now,
            last_run: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.min_interval.is_zero() {
            self.tokens = f64::from(self.burst);
            return;
        }
        let elapsed = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.tokens =
            (self.tokens + elapsed / self.min_interval.as_secs_f64()).min(f64::from(self.burst));
        self.last_refill = now;
    }

    /// When a requested run may start (now, or after the rate limit allows it).
    pub fn next_allowed(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 || self.min_interval.is_zero() {
            now
        } else {
            let missing = 1.0 - self.tokens;
            now + self.min_interval.mul_f64(missing)
        }
    }

    /// When the periodic run is due if nothing is requested.
    pub fn periodic_deadline(&self) -> Instant {
        self.last_run + self.max_interval
    }

    /// Records a run starting at `now`.
    pub fn ran(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
        self.last_run = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_two_then_spaces_runs_by_min_interval() {
        let t0 = Instant::now();
        let mut r = BoundedFrequency::new(Duration::from_secs(1), Duration::from_secs(30), 2, t0);
        assert_eq!(r.next_allowed(t0), t0);
        r.ran(t0);
        assert_eq!(r.next_allowed(t0), t0);
        r.ran(t0);
        let next = r.next_allowed(t0);
        assert_eq!(next, t0 + Duration::from_secs(1));
        r.ran(next);
        // Half a period later only half a token is back.
        let t = next + Duration::from_millis(500);
        assert_eq!(r.next_allowed(t), t + Duration::from_millis(500));
        assert_eq!(r.periodic_deadline(), next + Duration::from_secs(30));
    }

    #[test]
    fn zero_min_interval_never_delays() {
        let t0 = Instant::now();
        let mut r = BoundedFrequency::new(Duration::ZERO, Duration::from_secs(30), 2, t0);
        for _ in 0..5 {
            r.ran(t0);
            assert_eq!(r.next_allowed(t0), t0);
        }
    }
}
