//! A token bucket per hook: a sender may burst, then is held to a steady rate.
//!
//! Clock-free (the caller passes `now`) so it is tested without sleeping.

use std::time::{Duration, Instant};

/// `capacity` tokens, refilled continuously at `per_second`; one request takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: `requests` per `per`, bursts of up to `burst`.
    pub fn new(requests: u32, per: Duration, burst: u32, now: Instant) -> TokenBucket {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            capacity,
            per_second: f64::from(requests.max(1)) / per.as_secs_f64().max(1e-3),
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now.max(self.last);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_a_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 3, t0);
        for _ in 0..3 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        let wait = b.try_take(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(990) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(b.try_take(t0 + Duration::from_millis(500)).is_err());
        assert_eq!(b.try_take(t0 + Duration::from_millis(1001)), Ok(()));
        // A long pause refills to the burst size, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.try_take(later), Ok(()));
        }
        assert!(b.try_take(later).is_err());
    }

    #[test]
    fn a_slow_rate_reports_a_long_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, Duration::from_secs(3600), 1, t0);
        assert!(b.try_take(t0).is_ok());
        let wait = b.try_take(t0 + Duration::from_secs(600)).unwrap_err();
        assert!((wait.as_secs_f64() - 3000.0).abs() < 0.01, "{wait:?}");
    }
}
