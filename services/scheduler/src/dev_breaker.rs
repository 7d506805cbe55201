//! The dispatcher's side of the router's `dev` circuit breaker.
//!
//! The router owns the breaker (`devfleet_contracts::breaker`): it counts
//! dev-stage outcomes, opens the breaker when too many fail, and publishes
//! the state in the store (collection `breaker`, key `dev`). Before each
//! dispatch round the scheduler reads that state and obeys it:
//!
//! * no record, or `closed`: dispatch as the credit allows;
//! * `open`: dispatch nothing;
//! * `half_open`: each dispatch takes a probe permit
//!   ([`devfleet_contracts::breaker::try_admit`], an `incr` of the state's
//!   `probe_counter`) and goes out only while the count is within `probes`.
//!   Permits are taken only for tasks that are Ready (never more than the
//!   ready set holds), so an idle dispatcher does not use up the probes, and
//!   once a generation's permits ran out this replica stops asking until the
//!   router moves the breaker on.
//!
//! Every change of the breaker this replica sees is logged and sent as a
//! `system_health` metric once, not on every tick.
//!
//! An unreadable record (not the JSON the router writes) is treated as
//! closed, with a warning: a corrupt record must not stop the pipeline for
//! good, and the router repairs the record on its next tick.

use devfleet_contracts::breaker::{self, BreakerState, Phase};
use devfleet_protocol::{metrics::DispatchHealth, Stage};
use devfleet_runtime::Metrics;
use devfleet_store::{StoreError, StoreResult, TaskStore};

/// What the breaker allows this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Dispatches allowed now (at most the number asked for).
    pub allowed: u64,
    /// The breaker's phase as read.
    pub phase: Phase,
    /// The breaker's generation as read: while half-open, the dispatches
    /// allowed are its probes ([`breaker::mark_probe`]).
    pub generation: u64,
}

impl Admission {
    /// True when the breaker, not the credit or the ready set, held work back.
    pub fn held(&self, wanted: u64) -> bool {
        self.phase != Phase::Closed && self.allowed < wanted
    }
}

/// One dispatcher's view of the `dev` breaker: what it last saw (to report
/// changes once) and which half-open generation's permits it used up.
#[derive(Debug, Default)]
pub struct DevBreaker {
    /// (phase, generation) last seen; `None` before the first read.
    seen: Option<(Phase, u64)>,
    /// The half-open generation whose permits ran out.
    exhausted: Option<u64>,
    /// The unreadable record last warned about.
    corrupt_warned: Option<String>,
}

impl DevBreaker {
    /// The phase last seen (closed before the first read).
    pub fn phase(&self) -> Phase {
        self.seen.map_or(Phase::Closed, |(p, _)| p)
    }

    /// How many of `wanted` dispatches the breaker allows now, taking a
    /// probe permit for each one allowed while half-open. Store errors are
    /// returned (the caller dispatches nothing and backs off).
    pub async fn admit(
        &mut self,
        store: &dyn TaskStore,
        metrics: &Metrics,
        wanted: u64,
    ) -> StoreResult<Admission> {
        let state = match breaker::published(store, Stage::Dev).await {
            Ok(state) => {
                self.corrupt_warned = None;
                state
            }
            Err(StoreError::Corrupt { key, reason }) => {
                if self.corrupt_warned.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(%key, %reason, "the dev circuit breaker record is unreadable; dispatching as if it were closed");
                    self.corrupt_warned = Some(reason);
                }
                BreakerState::initial(Stage::Dev)
            }
            Err(e) => return Err(e),
        };
        self.observe(metrics, &state).await;
        let allowed = match state.state {
            Phase::Closed => wanted,
            Phase::Open => 0,
            Phase::HalfOpen if self.exhausted == Some(state.generation) => 0,
            Phase::HalfOpen => {
                // A permit is only worth taking for a task that is there to
                // be dispatched: probes are few.
                let ready = if wanted == 0 {
                    0
                } else {
                    store.ready_len().await?
                };
                let mut allowed = 0;
                while allowed < wanted.min(ready) {
                    if breaker::try_admit(store, Stage::Dev).await? {
                        allowed += 1;
                    } else {
                        tracing::info!(
                            generation = state.generation,
                            probes = state.probes,
                            "dev circuit breaker half-open: every probe permit is taken; waiting for their outcome"
                        );
                        self.exhausted = Some(state.generation);
                        break;
                    }
                }
                allowed
            }
        };
        Ok(Admission {
            allowed,
            phase: state.state,
            generation: state.generation,
        })
    }

    /// Logs and reports a change of the breaker once.
    async fn observe(&mut self, metrics: &Metrics, state: &BreakerState) {
        let now = (state.state, state.generation);
        if self.seen == Some(now) {
            return;
        }
        let first = self.seen.is_none();
        self.seen = Some(now);
        if first && state.state == Phase::Closed {
            // The normal start: nothing to report.
            return;
        }
        let dispatch = match state.state {
            Phase::Closed => {
                tracing::info!(generation = state.generation, reason = %state.reason, "dev circuit breaker closed: dispatch resumes");
                "normal"
            }
            Phase::Open => {
                tracing::warn!(
                    generation = state.generation,
                    reason = %state.reason,
                    until_ms = state.until_ms,
                    "dev circuit breaker open: dispatch to dev-workers is paused"
                );
                "paused"
            }
            Phase::HalfOpen => {
                tracing::info!(
                    generation = state.generation,
                    probes = state.probes,
                    reason = %state.reason,
                    "dev circuit breaker half-open: dispatching probes only"
                );
                "probes"
            }
        };
        metrics
            .emit(DispatchHealth {
                stage: Stage::Dev,
                breaker: state.state.as_str().to_owned(),
                dispatch: dispatch.to_owned(),
                healthy: state.state == Phase::Closed,
                generation: state.generation,
                reason: state.reason.clone(),
                probes: state.probes,
                until_ms: state.until_ms,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_runtime::Connections;
    use devfleet_store::{NewTask, PlanRecord};

    fn state(phase: Phase, generation: u64, probes: u32) -> String {
        serde_json::json!({
            "stage": "dev",
            "state": phase.as_str(),
            "generation": generation,
            "since_ms": 0,
            "until_ms": null,
            "reason": "test",
            "error_rate": 0.0,
            "volume": 0,
            "probes": probes,
            "probe_counter": format!("breaker.dev.probes.{generation}"),
        })
        .to_string()
    }

    async fn with_ready(n: usize) -> Connections {
        let c = Connections::in_memory();
        let tasks = (0..n)
            .map(|i| NewTask {
                path: format!("f{i}.py"),
                spec: "s".into(),
                content: None,
                depends_on: vec![],
                priority: 1,
                estimate: 1,
                executor: None,
            })
            .collect();
        let plan = PlanRecord::new("p", "p", devfleet_protocol::PlanStatus::Running, 0);
        assert!(c.store.create_plan(plan, tasks).await.unwrap());
        c
    }

    #[tokio::test]
    async fn closed_or_missing_admits_all_open_admits_none() {
        let c = with_ready(5).await;
        let store = c.store.as_ref();
        let m = c.metrics("t");
        let mut b = DevBreaker::default();
        let a = b.admit(store, &m, 4).await.unwrap();
        assert_eq!((a.allowed, a.phase), (4, Phase::Closed), "no record");
        store
            .kv_put(breaker::BREAKER, "dev", &state(Phase::Open, 1, 2), None)
            .await
            .unwrap();
        let a = b.admit(store, &m, 4).await.unwrap();
        assert_eq!((a.allowed, a.phase), (0, Phase::Open));
        assert!(a.held(4));
        store
            .kv_put(breaker::BREAKER, "dev", &state(Phase::Closed, 3, 2), None)
            .await
            .unwrap();
        assert_eq!(b.admit(store, &m, 4).await.unwrap().allowed, 4);
    }

    #[tokio::test]
    async fn half_open_admits_exactly_the_probes_and_then_stops_asking() {
        let c = with_ready(5).await;
        let store = c.store.as_ref();
        let m = c.metrics("t");
        let mut b = DevBreaker::default();
        store
            .kv_put(breaker::BREAKER, "dev", &state(Phase::HalfOpen, 2, 2), None)
            .await
            .unwrap();
        assert_eq!(b.admit(store, &m, 1).await.unwrap().allowed, 1);
        assert_eq!(b.admit(store, &m, 5).await.unwrap().allowed, 1);
        assert_eq!(b.admit(store, &m, 5).await.unwrap().allowed, 0);
        // Three permits asked for (two granted, one refused), then no more.
        assert_eq!(store.counter("breaker.dev.probes.2").await.unwrap(), 3);
        assert_eq!(b.admit(store, &m, 5).await.unwrap().allowed, 0);
        assert_eq!(store.counter("breaker.dev.probes.2").await.unwrap(), 3);
        // Fresh probes (a new generation) are taken again.
        store
            .kv_put(breaker::BREAKER, "dev", &state(Phase::HalfOpen, 3, 2), None)
            .await
            .unwrap();
        assert_eq!(b.admit(store, &m, 5).await.unwrap().allowed, 2);
    }

    #[tokio::test]
    async fn half_open_takes_no_permit_for_work_that_is_not_there() {
        let c = with_ready(1).await;
        let store = c.store.as_ref();
        let m = c.metrics("t");
        let mut b = DevBreaker::default();
        store
            .kv_put(breaker::BREAKER, "dev", &state(Phase::HalfOpen, 4, 2), None)
            .await
            .unwrap();
        assert_eq!(b.admit(store, &m, 3).await.unwrap().allowed, 1);
        assert_eq!(store.counter("breaker.dev.probes.4").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_unreadable_record_counts_as_closed() {
        let c = with_ready(1).await;
        let store = c.store.as_ref();
        store
            .kv_put(breaker::BREAKER, "dev", "{not json", None)
            .await
            .unwrap();
        let a = DevBreaker::default()
            .admit(store, &c.metrics("t"), 2)
            .await
            .unwrap();
        assert_eq!((a.allowed, a.phase), (2, Phase::Closed));
    }
}
