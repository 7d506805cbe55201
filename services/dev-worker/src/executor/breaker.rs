//! A circuit breaker per provider/model, shared by every replica through
//! the store, counting executor runs only (a cache hit never calls a model).
//!
//! Closed: calls go to the model. Each failed call (the server stayed busy
//! or unreachable, or refused the request; not a reply cut off or a prompt
//! over the window) takes a token from the bucket `breaker:<target>`
//! (holding `failures - 1`, refilled over `window`); the failure that finds it
//! empty opens the breaker: the record `open` (collection `breakers`)
//! lives for `cooldown`, and while it does every replica sends to the
//! fallback model. When it has expired the breaker is half-open: the one
//! caller that removes the `probe` record (compare-and-delete) calls the
//! model; the others keep using the fallback. A failed probe opens the
//! breaker again at once (its failure bucket is still empty); a successful
//! one leaves it closed.

use devfleet_store::{BucketRate, BucketStep, SharedStore};
use std::time::Duration;

const COLLECTION: &str = "breakers";

/// How many failures within which window open the breaker, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    pub failures: u64,
    #[serde(with = "secs")]
    pub window: Duration,
    #[serde(with = "secs")]
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        }
    }
}

mod secs {
    use serde::Deserialize as _;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let s = f64::deserialize(d)?;
        std::time::Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom)
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Breaker {
    store: SharedStore,
    /// `provider/model`.
    target: String,
    policy: BreakerPolicy,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("target", &self.target)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Breaker {
    pub fn new(store: SharedStore, target: String, policy: BreakerPolicy) -> Self {
        Self {
            store,
            target,
            policy,
        }
    }

    /// Whether this call may go to the model (closed, or this caller won
    /// the half-open probe). A store error counts as closed.
    pub async fn allows(&self) -> bool {
        let open = self.store.kv_get(COLLECTION, &self.open_key()).await;
        match open {
            Ok(Some(_)) => false,
            Ok(None) => match self.store.kv_get(COLLECTION, &self.probe_key()).await {
                Ok(Some(v)) => self
                    .store
                    .kv_delete_if(COLLECTION, &self.probe_key(), &v)
                    .await
                    .unwrap_or(true),
                _ => true,
            },
            Err(e) => {
                tracing::warn!(error = %e, target = %self.target, "breaker state unreadable; calling the model");
                true
            }
        }
    }

    /// Records a failed call; opens the breaker when the failures in the
    /// window reach the policy's count.
    pub async fn failed(&self) {
        // The bucket holds one failure fewer than the policy's count: the
        // failure that finds it empty is the last one allowed.
        let rate = BucketRate {
            capacity: self.policy.failures.saturating_sub(1).max(1),
            window: self.policy.window,
        };
        let bucket = format!("breaker:{}", self.target);
        let step = if self.policy.failures <= 1 {
            Ok(Some(Duration::ZERO))
        } else {
            self.store
                .token_bucket(&bucket, rate, BucketStep::Take(1))
                .await
        };
        match step {
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::warn!(target = %self.target, cooldown = ?self.policy.cooldown, "circuit breaker opened; using the fallback model");
                let open = self
                    .store
                    .kv_put(
                        COLLECTION,
                        &self.open_key(),
                        "open",
                        Some(self.policy.cooldown),
                    )
                    .await;
                let probe = self
                    .store
                    .kv_put(COLLECTION, &self.probe_key(), "probe", None)
                    .await;
                if let Err(e) = open.and(probe) {
                    tracing::warn!(error = %e, "cannot record the open breaker");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count the failure for the breaker"),
        }
    }

    fn open_key(&self) -> String {
        format!("open:{}", self.target)
    }

    fn probe_key(&self) -> String {
        format!("probe:{}", self.target)
    }
}
