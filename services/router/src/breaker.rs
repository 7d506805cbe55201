//! Circuit breakers per stage (`dev`, `qa`), shared by every router replica
//! through the store.
//!
//! # Behaviour (as resilience4j's time-based sliding window)
//!
//! * **Closed**: outcomes are counted in a sliding time window. When the
//!   window holds at least `min_volume` outcomes and the share of errors is
//!   above `threshold` (default 50 %), the breaker opens.
//! * **Open**: nothing is dispatched to the stage for `cooldown`. Outcomes
//!   that arrive meanwhile (work dispatched before it opened) are ignored.
//! * **Half-open**: `probes` dispatches are let through, each recorded as a
//!   probe of the half-open generation (`devfleet_contracts::breaker::
//!   mark_probe`). The first probe outcome decides: a success closes the
//!   breaker (with an empty window), a failure opens it again for another
//!   cooldown. Outcomes of anything else (work dispatched before the
//!   breaker opened, a cache hit) are ignored. If no probe outcome arrives
//!   within a cooldown, a fresh set of probes is let through.
//!
//! What counts: only outcomes of the current attempt of a task (stale
//! messages are not counted) that say whether the stage works. For `dev`,
//! a `task.built` whose executor ran is a success (a cache hit or a
//! re-announcement ran nothing) and a retryable `task.failed` (stage dev)
//! an error; for `qa`, a `qa.results` verdict (pass or fail: the stage
//! worked) is a success and a retryable `task.failed` (stage qa: the checks
//! could not run) an error. A non-retryable failure is the plan's fault (a
//! bad spec, a missing dependency), and a file that fails QA the code's:
//! neither opens a fleet-wide breaker.
//!
//! # Shared state
//!
//! * Every transition is a record in the collection [`TRANSITIONS`], key
//!   `<stage>.<generation>` (zero-padded), written with put-if-absent, so
//!   exactly one replica makes each transition; the newest generation is
//!   the state. Old records are pruned.
//! * The newest state is mirrored to the collection [`BREAKER`], key = the
//!   stage name, as [`BreakerState`] JSON: the contract the scheduler reads
//!   before dispatching (see `devfleet_contracts::breaker::try_admit`). Replicas repair a stale mirror.
//! * Window counts: each replica writes one record per (generation, time
//!   bucket) to `breaker_window.<stage>` with a TTL of the window; only it
//!   writes its records, so no increments are lost, and every replica sums
//!   all of them. A new generation starts an empty window.
//! * Half-open probes are permits from the store counter named in the
//!   state's `probe_counter` (one per half-open generation).

use devfleet_contracts::breaker::{
    admit_state, current, is_probe, mark_probe, published, transition_key, Attempt, BreakerState,
    Phase, BREAKER, STAGES, TRANSITIONS,
};
use devfleet_protocol::{metrics::BreakerHealth, now_ms, BreakerChanged, Stage};
use devfleet_runtime::Connections;
use devfleet_store::{StoreError, StoreResult, TaskStore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Transitions kept per stage.
const KEEP_TRANSITIONS: u64 = 16;

/// Breaker settings (one set for every stage).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Length of the sliding window.
    pub window: Duration,
    /// Granularity of the window.
    pub bucket: Duration,
    /// Outcomes the window must hold before the rate can open the breaker.
    pub min_volume: u64,
    /// Error share above which it opens (0.5 = more than half).
    pub threshold: f64,
    /// Time open before probes are let through.
    pub cooldown: Duration,
    /// Dispatches let through while half-open.
    pub probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            bucket: Duration::from_secs(5),
            min_volume: 10,
            threshold: 0.5,
            cooldown: Duration::from_secs(30),
            probes: 2,
        }
    }
}

impl BreakerSettings {
    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.window.is_zero() && !self.bucket.is_zero() && self.bucket <= self.window,
            "DEVFLEET_ROUTER_BREAKER_WINDOW_SECONDS must be positive and at least \
             DEVFLEET_ROUTER_BREAKER_BUCKET_SECONDS"
        );
        anyhow::ensure!(
            self.threshold > 0.0 && self.threshold < 1.0,
            "DEVFLEET_ROUTER_BREAKER_THRESHOLD must be between 0 and 1 (exclusive)"
        );
        anyhow::ensure!(
            self.min_volume >= 1,
            "DEVFLEET_ROUTER_BREAKER_MIN_VOLUME must be at least 1"
        );
        anyhow::ensure!(
            self.probes >= 1,
            "DEVFLEET_ROUTER_BREAKER_PROBES must be at least 1"
        );
        anyhow::ensure!(
            !self.cooldown.is_zero(),
            "DEVFLEET_ROUTER_BREAKER_COOLDOWN_SECONDS must be positive"
        );
        Ok(())
    }
}

/// Outcome counts of one window bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub ok: u64,
    pub err: u64,
}

impl Counts {
    pub fn volume(&self) -> u64 {
        self.ok + self.err
    }
    pub fn error_rate(&self) -> f64 {
        if self.volume() == 0 {
            0.0
        } else {
            self.err as f64 / self.volume() as f64
        }
    }
}

/// True when `counts` should open a closed breaker.
pub fn should_open(settings: &BreakerSettings, counts: Counts) -> bool {
    counts.volume() >= settings.min_volume && counts.error_rate() > settings.threshold
}

fn window_collection(stage: Stage) -> String {
    format!("breaker_window.{}", stage.as_str())
}

/// One replica's view of the breakers: records outcomes, moves the state
/// machine, and announces transitions.
pub struct Breakers {
    connections: Connections,
    instance: String,
    settings: BreakerSettings,
    /// This replica's counts per (stage, generation, bucket start).
    local: Mutex<HashMap<(Stage, u64, i64), Counts>>,
    /// Held from taking a count to its store write, so this replica's
    /// writes of one record land in the order of their counts (concurrent
    /// handlers could otherwise overwrite a count with an older, smaller
    /// one, and a storm would never reach the volume that opens the
    /// breaker).
    write: tokio::sync::Mutex<()>,
}

impl Breakers {
    pub fn new(connections: Connections, instance: String, settings: BreakerSettings) -> Self {
        Self {
            connections,
            instance,
            settings,
            local: Mutex::new(HashMap::new()),
            write: tokio::sync::Mutex::new(()),
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    fn store(&self) -> &dyn TaskStore {
        self.connections.store.as_ref()
    }

    /// Records the outcome of one attempt at `stage` and moves the breaker
    /// if it must. While half-open only a probe's outcome counts.
    pub async fn record(&self, stage: Stage, attempt: Attempt<'_>, ok: bool) -> StoreResult<()> {
        let state = current(self.store(), stage).await?;
        match state.state {
            Phase::Open => Ok(()),
            Phase::HalfOpen => {
                if !is_probe(self.store(), &state, attempt).await? {
                    tracing::debug!(
                        stage = stage.as_str(),
                        plan_id = attempt.plan_id,
                        path = attempt.path,
                        attempt = attempt.attempt,
                        "half-open: not a probe's outcome; ignored"
                    );
                    return Ok(());
                }
                if ok {
                    self.transition(
                        &state,
                        Phase::Closed,
                        "a probe succeeded".into(),
                        Counts::default(),
                    )
                    .await?;
                } else {
                    self.transition(
                        &state,
                        Phase::Open,
                        "a probe failed".into(),
                        Counts::default(),
                    )
                    .await?;
                }
                Ok(())
            }
            Phase::Closed => {
                self.count(stage, state.generation, ok).await?;
                if !ok {
                    let counts = self.window(stage, state.generation).await?;
                    if should_open(&self.settings, counts) {
                        let reason = format!(
                            "{} of the last {} {} outcomes within {:?} were errors ({:.0} % > {:.0} %)",
                            counts.err,
                            counts.volume(),
                            stage.as_str(),
                            self.settings.window,
                            counts.error_rate() * 100.0,
                            self.settings.threshold * 100.0
                        );
                        self.transition(&state, Phase::Open, reason, counts).await?;
                    }
                }
                Ok(())
            }
        }
    }

    /// May `attempt` be dispatched to `stage` now? When half-open this
    /// takes a probe permit and records the attempt as the probe.
    pub async fn admit(&self, stage: Stage, attempt: Attempt<'_>) -> StoreResult<bool> {
        let state = current(self.store(), stage).await?;
        let admitted = admit_state(self.store(), &state).await?;
        if admitted && state.state == Phase::HalfOpen {
            mark_probe(self.store(), stage, state.generation, attempt).await?;
        }
        Ok(admitted)
    }

    /// Time-driven transitions: open → half-open after the cooldown, a
    /// half-open breaker without any probe outcome for a cooldown gets fresh
    /// probes, and a stale [`BREAKER`] mirror is repaired. Returns the
    /// states after the step.
    pub async fn tick(&self) -> StoreResult<Vec<BreakerState>> {
        let mut out = Vec::new();
        for stage in STAGES {
            let mut state = current(self.store(), stage).await?;
            let now = now_ms();
            let cooldown_ms = self.settings.cooldown.as_millis() as i64;
            let next = match state.state {
                Phase::Open if state.until_ms.is_none_or(|u| now >= u) => Some((
                    Phase::HalfOpen,
                    format!(
                        "cooldown over: letting {} probe(s) through",
                        self.settings.probes
                    ),
                )),
                Phase::HalfOpen if now >= state.since_ms + cooldown_ms => Some((
                    Phase::HalfOpen,
                    "no probe outcome within a cooldown: letting fresh probes through".to_owned(),
                )),
                _ => None,
            };
            if let Some((phase, reason)) = next {
                if let Some(s) = self
                    .transition(&state, phase, reason, Counts::default())
                    .await?
                {
                    state = s;
                }
            } else if state.generation > 0 {
                let mirror = published(self.store(), stage).await.ok();
                if mirror.is_none_or(|m| m.generation < state.generation) {
                    self.mirror(&state).await?;
                }
            }
            out.push(state);
        }
        self.prune_local();
        Ok(out)
    }

    /// The current window counts of a stage (every replica's records).
    pub async fn window(&self, stage: Stage, generation: u64) -> StoreResult<Counts> {
        let now = now_ms();
        let window_ms = self.settings.window.as_millis() as i64;
        let bucket_ms = self.settings.bucket.as_millis().max(1) as i64;
        let mut total = Counts::default();
        for (key, json) in self.store().kv_list(&window_collection(stage)).await? {
            let mut parts = key.split('|');
            let (Some(g), Some(_instance), Some(start)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(g), Ok(start)) = (g.parse::<u64>(), start.parse::<i64>()) else {
                continue;
            };
            if g != generation || start + bucket_ms <= now - window_ms {
                continue;
            }
            if let Ok(c) = serde_json::from_str::<Counts>(&json) {
                total.ok += c.ok;
                total.err += c.err;
            }
        }
        Ok(total)
    }

    async fn count(&self, stage: Stage, generation: u64, ok: bool) -> StoreResult<()> {
        let bucket_ms = self.settings.bucket.as_millis().max(1) as i64;
        let start = now_ms().div_euclid(bucket_ms) * bucket_ms;
        let _ordered = self.write.lock().await;
        let counts = {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            let c = local.entry((stage, generation, start)).or_default();
            if ok {
                c.ok += 1;
            } else {
                c.err += 1;
            }
            *c
        };
        let key = format!("{generation}|{}|{start}", self.instance);
        let json =
            serde_json::to_string(&counts).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.store()
            .kv_put(
                &window_collection(stage),
                &key,
                &json,
                Some(self.settings.window + self.settings.bucket),
            )
            .await
    }

    fn prune_local(&self) {
        let horizon = now_ms() - (self.settings.window + self.settings.bucket).as_millis() as i64;
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        local.retain(|(_, _, start), _| *start >= horizon);
    }

    /// Moves `from` to `to` if no other replica has moved it since; returns
    /// the new state when this replica made the transition.
    async fn transition(
        &self,
        from: &BreakerState,
        to: Phase,
        reason: String,
        counts: Counts,
    ) -> StoreResult<Option<BreakerState>> {
        let generation = from.generation + 1;
        let now = now_ms();
        let stage = from.stage;
        let next = BreakerState {
            stage,
            state: to,
            generation,
            since_ms: now,
            until_ms: (to == Phase::Open).then(|| now + self.settings.cooldown.as_millis() as i64),
            reason: reason.clone(),
            error_rate: counts.error_rate(),
            volume: counts.volume(),
            probes: self.settings.probes,
            probe_counter: format!("breaker.{}.probes.{generation}", stage.as_str()),
        };
        let json = serde_json::to_string(&next).map_err(|e| StoreError::Backend(e.to_string()))?;
        if !self
            .store()
            .kv_put_new(TRANSITIONS, &transition_key(stage, generation), &json)
            .await?
        {
            return Ok(None);
        }
        self.mirror(&next).await?;
        if generation > KEEP_TRANSITIONS {
            let old = transition_key(stage, generation - KEEP_TRANSITIONS);
            self.store().kv_delete(TRANSITIONS, &old).await?;
        }
        match to {
            Phase::Open => {
                tracing::warn!(stage = stage.as_str(), %reason, "circuit breaker opened")
            }
            _ => {
                tracing::info!(stage = stage.as_str(), state = to.as_str(), %reason, "circuit breaker changed")
            }
        }
        self.connections
            .event(BreakerChanged {
                stage,
                state: to.as_str().to_owned(),
                reason: reason.clone(),
                error_rate: next.error_rate,
                volume: next.volume,
            })
            .await;
        self.emit_health(&next).await;
        Ok(Some(next))
    }

    async fn mirror(&self, state: &BreakerState) -> StoreResult<()> {
        let json = serde_json::to_string(state).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.store()
            .kv_put(BREAKER, state.stage.as_str(), &json, None)
            .await
    }

    /// Emits a `system_health` metric describing a breaker.
    pub async fn emit_health(&self, state: &BreakerState) {
        self.connections
            .metrics(self.instance.clone())
            .emit(BreakerHealth {
                stage: state.stage,
                state: state.state.as_str().to_owned(),
                open: state.state != Phase::Closed,
                reason: state.reason.clone(),
                error_rate: state.error_rate,
                volume: state.volume,
                since_ms: state.since_ms,
                until_ms: state.until_ms,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_contracts::breaker::{mark_probe, try_admit};

    /// Attempt 1 of task `path` of plan `p`.
    fn at(path: &str) -> Attempt<'_> {
        Attempt {
            plan_id: "p",
            path,
            attempt: 1,
        }
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: Duration::from_secs(10),
            bucket: Duration::from_secs(1),
            min_volume: 4,
            threshold: 0.5,
            cooldown: Duration::from_millis(200),
            probes: 1,
        }
    }

    #[test]
    fn opens_only_above_the_threshold_with_enough_volume() {
        let s = settings();
        assert!(
            !should_open(&s, Counts { ok: 0, err: 3 }),
            "below min volume"
        );
        assert!(
            !should_open(&s, Counts { ok: 2, err: 2 }),
            "50 % is not above 50 %"
        );
        assert!(should_open(&s, Counts { ok: 1, err: 3 }));
    }

    #[tokio::test]
    async fn storm_opens_cooldown_half_opens_probe_closes() {
        let c = Connections::in_memory();
        let b = Breakers::new(c.clone(), "r1".into(), settings());
        for i in 0..4 {
            b.record(Stage::Dev, at(&format!("e{i}")), false)
                .await
                .unwrap();
        }
        let s = current(c.store.as_ref(), Stage::Dev).await.unwrap();
        assert_eq!(s.state, Phase::Open);
        assert!(!try_admit(c.store.as_ref(), Stage::Dev).await.unwrap());
        assert!(
            b.admit(Stage::Qa, at("q")).await.unwrap(),
            "other stages are unaffected"
        );

        tokio::time::sleep(Duration::from_millis(250)).await;
        b.tick().await.unwrap();
        let s = published(c.store.as_ref(), Stage::Dev).await.unwrap();
        assert_eq!(s.state, Phase::HalfOpen);
        assert!(
            try_admit(c.store.as_ref(), Stage::Dev).await.unwrap(),
            "one probe"
        );
        assert!(
            !try_admit(c.store.as_ref(), Stage::Dev).await.unwrap(),
            "only one"
        );
        mark_probe(c.store.as_ref(), Stage::Dev, s.generation, at("probe"))
            .await
            .unwrap();

        // Outcomes of work dispatched before the breaker opened do not
        // decide it: only the probe's.
        b.record(Stage::Dev, at("straggler"), true).await.unwrap();
        b.record(Stage::Dev, at("e0"), true).await.unwrap();
        assert_eq!(
            current(c.store.as_ref(), Stage::Dev).await.unwrap().state,
            Phase::HalfOpen,
            "a straggler's success does not close it"
        );
        b.record(Stage::Dev, at("probe"), true).await.unwrap();
        let s = published(c.store.as_ref(), Stage::Dev).await.unwrap();
        assert_eq!(s.state, Phase::Closed);
        // A fresh window: one more error does not reopen it.
        b.record(Stage::Dev, at("late"), false).await.unwrap();
        assert_eq!(
            current(c.store.as_ref(), Stage::Dev).await.unwrap().state,
            Phase::Closed
        );
    }

    #[tokio::test]
    async fn a_failed_probe_reopens_and_replicas_share_state() {
        let c = Connections::in_memory();
        let a = Breakers::new(c.clone(), "r1".into(), settings());
        let b = Breakers::new(c.clone(), "r2".into(), settings());
        // Two replicas each see two errors: together they reach the volume.
        for i in 0..2 {
            let (x, y) = (format!("a{i}"), format!("b{i}"));
            a.record(Stage::Qa, at(&x), false).await.unwrap();
            b.record(Stage::Qa, at(&y), false).await.unwrap();
        }
        assert_eq!(
            current(c.store.as_ref(), Stage::Qa).await.unwrap().state,
            Phase::Open
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.tick().await.unwrap();
        b.tick().await.unwrap();
        let s = current(c.store.as_ref(), Stage::Qa).await.unwrap();
        assert_eq!(s.state, Phase::HalfOpen);
        assert_eq!(s.generation, 2, "one replica made the transition");
        b.record(Stage::Qa, at("a0"), false).await.unwrap();
        assert_eq!(
            current(c.store.as_ref(), Stage::Qa).await.unwrap().state,
            Phase::HalfOpen,
            "a straggler's failure does not reopen it"
        );
        assert!(a.admit(Stage::Qa, at("probe")).await.unwrap());
        b.record(Stage::Qa, at("probe"), false).await.unwrap();
        let s = current(c.store.as_ref(), Stage::Qa).await.unwrap();
        assert_eq!(s.state, Phase::Open);
        assert_eq!(s.reason, "a probe failed");
    }
}
