//! The one exponential backoff policy: reconnect loops and task retries
//! both use it, so delays are configured and reasoned about in one place.

use std::time::Duration;

/// Exponential backoff with full jitter: attempt `n` (1-based) waits a
/// random time in `[delay/2, delay]` where `delay = min(cap, base * factor^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub factor: f64,
    pub cap: Duration,
    /// 0.0 = no jitter; 1.0 = the delay may shrink to 0. Default 0.5.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            factor: 2.0,
            cap: Duration::from_secs(60),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The consume loop's policy ([`crate::consume`]): the delay before a
    /// delivery whose handler failed transiently is redelivered, and
    /// between attempts to restart a consumer. Every service's consumers
    /// use it unless they pass their own to
    /// [`Consume::backoff`](crate::consume::Consume::backoff).
    pub const HANDLER: Backoff = Backoff {
        base: Duration::from_millis(200),
        factor: 2.0,
        cap: Duration::from_secs(30),
        jitter: 0.5,
    };

    /// For what recovers slower than a broker or the store: retrying a
    /// failed task (the router's default), calls to remote services (an
    /// LLM API, a deployment handler).
    pub const SLOW: Backoff = Backoff {
        base: Duration::from_secs(1),
        factor: 2.0,
        cap: Duration::from_secs(60),
        jitter: 0.5,
    };

    /// The scheduler's dispatch loop after a failed round: quick to resume
    /// once the store is back, since dispatch gates all work.
    pub const DISPATCH: Backoff = Backoff {
        base: Duration::from_millis(100),
        factor: 2.0,
        cap: Duration::from_secs(10),
        jitter: 0.5,
    };

    /// The canary's calls to a deployment handler (shift, rollback), which
    /// a rollback repeats until it succeeds.
    pub const DEPLOY_CALL: Backoff = Backoff {
        base: Duration::from_secs(1),
        factor: 2.0,
        cap: Duration::from_secs(30),
        jitter: 0.5,
    };

    /// The un-jittered delay before attempt `attempt + 1`, after `attempt` failures.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.base.as_secs_f64() * exp).min(self.cap.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The jittered delay after `attempt` failures; `random` is in `[0, 1)`.
    pub fn delay_with(&self, attempt: u32, random: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let j = self.jitter.clamp(0.0, 1.0);
        ceiling.mul_f64(1.0 - j * random.clamp(0.0, 1.0))
    }

    /// The jittered delay after `attempt` failures.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, pseudo_random())
    }
}

fn pseudo_random() -> f64 {
    // Jitter only needs to de-synchronise replicas, not be unpredictable.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = nanos as u64 ^ (std::process::id() as u64) << 32;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x % 1_000_000) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(5),
            jitter: 0.0,
        };
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(2), Duration::from_secs(2));
        assert_eq!(b.ceiling(3), Duration::from_secs(4));
        assert_eq!(b.ceiling(4), Duration::from_secs(5));
        assert_eq!(b.ceiling(400), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_within_half() {
        let b = Backoff::default();
        for r in [0.0, 0.3, 0.99] {
            let d = b.delay_with(3, r);
            assert!(d <= b.ceiling(3) && d >= b.ceiling(3) / 2, "{d:?}");
        }
    }
}
