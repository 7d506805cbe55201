//! Fleet-wide rate limits of one provider/model.
//!
//! Every dev-worker replica calling a model takes from the same two token
//! buckets in the store ([`TaskStore::token_bucket`], one atomic step per
//! take): `rpm:<provider>/<model>` (one token per request, capacity
//! `requests_per_minute`) and `tpm:<provider>/<model>` (the request's
//! estimated tokens, prompt plus `max_tokens`; capacity `tokens_per_minute`).
//! A take that finds too few tokens sleeps for the time the store says and
//! tries again, so a call waits for its turn instead of failing. A 429
//! drains the request bucket for the server's `Retry-After`, so every
//! replica backs off, not just the one that was told. The window is a
//! minute (`DEVFLEET_RATE_WINDOW_SECONDS` shortens it for tests).

use super::providers::Limits;
use devfleet_store::{BucketRate, BucketStep, SharedStore};
use std::time::Duration;

/// See the module docs.
#[derive(Clone)]
pub struct RateLimiter {
    store: SharedStore,
    /// `provider/model`.
    target: String,
    limits: Limits,
    window: Duration,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("target", &self.target)
            .field("limits", &self.limits)
            .field("window", &self.window)
            .finish()
    }
}

impl RateLimiter {
    /// Limits of `target` (`provider/model`) per `window`, shared through
    /// `store`; `None` when the model has no limits.
    pub fn new(
        store: SharedStore,
        target: String,
        limits: Limits,
        window: Duration,
    ) -> Option<Self> {
        (limits.requests_per_minute.is_some() || limits.tokens_per_minute.is_some()).then_some(
            Self {
                store,
                target,
                limits,
                window,
            },
        )
    }

    /// Waits until one request of `tokens` estimated tokens may be sent.
    /// Errors only when the store cannot be reached.
    pub async fn acquire(&self, tokens: u64) -> Result<(), String> {
        if let Some(rpm) = self.limits.requests_per_minute {
            self.take(&format!("rpm:{}", self.target), rpm, 1).await?;
        }
        if let Some(tpm) = self.limits.tokens_per_minute {
            self.take(&format!("tpm:{}", self.target), tpm, tokens)
                .await?;
        }
        Ok(())
    }

    /// A 429: nobody sends to this model for `retry_after` (a tenth of the
    /// window when the server gave none).
    pub async fn rate_limited(&self, retry_after: Option<Duration>) {
        let Some(rpm) = self.limits.requests_per_minute else {
            return;
        };
        let drain = retry_after.unwrap_or(self.window / 10);
        if let Err(e) = self
            .store
            .token_bucket(
                &format!("rpm:{}", self.target),
                self.rate(rpm),
                BucketStep::Drain(drain),
            )
            .await
        {
            tracing::warn!(error = %e, target = %self.target, "cannot record the 429 in the rate limit");
        }
    }

    fn rate(&self, capacity: u64) -> BucketRate {
        BucketRate {
            capacity,
            window: self.window,
        }
    }

    async fn take(&self, bucket: &str, capacity: u64, n: u64) -> Result<(), String> {
        loop {
            let wait = self
                .store
                .token_bucket(bucket, self.rate(capacity), BucketStep::Take(n))
                .await
                .map_err(|e| format!("the rate limit of {} is unreadable: {e}", self.target))?;
            match wait {
                None => return Ok(()),
                Some(wait) => {
                    tracing::debug!(?wait, bucket, "rate limited; waiting for a token");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_store::memory::MemoryStore;
    use std::sync::Arc;

    #[tokio::test]
    async fn takes_wait_for_their_turn_instead_of_failing() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        let limiter = RateLimiter::new(
            store,
            "p/m".into(),
            Limits {
                requests_per_minute: Some(2),
                tokens_per_minute: None,
            },
            Duration::from_secs(60),
        )
        .unwrap();
        limiter.acquire(10).await.unwrap();
        limiter.acquire(10).await.unwrap();
        let third = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire(10).await }
        });
        tokio::task::yield_now().await;
        // The bucket refills one request in 30 s: the third is waiting.
        assert!(!third.is_finished());
        third.abort();
        assert!(RateLimiter::new(
            Arc::new(MemoryStore::new()),
            "p/m".into(),
            Limits::default(),
            Duration::from_secs(60)
        )
        .is_none());
    }
}
