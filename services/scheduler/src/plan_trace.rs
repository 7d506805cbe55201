//! Each plan's trace context, so the tasks the dispatcher hands out join
//! the trace of the plan (publish → analyzer → scheduler → dev-worker → …)
//! instead of each starting a trace of its own.
//!
//! The context of the `plans.analyzed` handler is kept in the store (small
//! record with a TTL, so any scheduler replica can find it) and cached in
//! memory. Best effort: a missing context only means a detached trace.

use devfleet_store::TaskStore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Store collection: plan id → W3C traceparent.
pub const PLAN_TRACES: &str = "plan_traces";

/// How long a plan's trace context is kept.
const TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Entries cached before the cache is cleared (plans are few; this only
/// bounds a long-running replica).
const MAX_CACHED: usize = 10_000;

/// See the module docs.
#[derive(Default)]
pub(crate) struct PlanTraces {
    cache: Mutex<HashMap<String, Option<String>>>,
}

impl PlanTraces {
    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache_put(&self, plan_id: &str, traceparent: Option<String>) {
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(plan_id.to_owned(), traceparent);
    }

    /// Records the context a plan was created in.
    pub(crate) async fn remember(
        &self,
        store: &dyn TaskStore,
        plan_id: &str,
        traceparent: Option<String>,
    ) {
        if let Some(tp) = &traceparent {
            if let Err(e) = store.kv_put(PLAN_TRACES, plan_id, tp, Some(TTL)).await {
                tracing::debug!(error = %e, "cannot keep the plan's trace context");
            }
        }
        self.cache_put(plan_id, traceparent);
    }

    /// The context a plan was created in, if known.
    pub(crate) async fn lookup(&self, store: &dyn TaskStore, plan_id: &str) -> Option<String> {
        if let Some(hit) = self.cache().get(plan_id) {
            return hit.clone();
        }
        let found = store.kv_get(PLAN_TRACES, plan_id).await.ok().flatten();
        self.cache_put(plan_id, found.clone());
        found
    }
}
