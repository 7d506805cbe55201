//! The circuit-breaker contract between the router, which owns the
//! breakers of the `dev` and `qa` stages, and the dispatchers that honour
//! them (the scheduler for `dev`).
//!
//! * The newest transition of a stage is a record in [`TRANSITIONS`], key
//!   `<stage>.<generation>` (zero-padded), written put-if-absent by exactly
//!   one router replica; [`current`] reads it.
//! * The state is mirrored to [`BREAKER`] (key = the stage name) as
//!   [`BreakerState`] JSON; dispatchers read the mirror ([`published`]) and
//!   ask [`try_admit`] before each dispatch: closed → yes, open → no,
//!   half-open → only while probe permits from the state's `probe_counter`
//!   last; each attempt dispatched under a permit is recorded with
//!   [`mark_probe`], and only those attempts' outcomes decide a half-open
//!   breaker.
//!
//! The state machine that writes these records (window counts, opening,
//! probes) lives in the router (`devfleet_router::breaker`).

use devfleet_protocol::Stage;
use devfleet_store::{StoreError, StoreResult, TaskStore};
use serde::{Deserialize, Serialize};

/// Store collection holding each stage's current [`BreakerState`] (key
/// `dev` or `qa`): what the scheduler reads.
pub const BREAKER: &str = "breaker";
/// Store collection of breaker transitions (`<stage>.<generation>`).
pub const TRANSITIONS: &str = "breaker_transitions";

/// The stages that have breakers.
pub const STAGES: [Stage; 2] = [Stage::Dev, Stage::Qa];

/// Breaker phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Closed,
    Open,
    HalfOpen,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }
}

/// A stage's breaker state, as stored in [`BREAKER`] (JSON).
///
/// Contract for dispatchers: `closed` (or no record) → dispatch normally;
/// `open` → dispatch nothing to the stage; `half_open` → before each
/// dispatch take a permit with `incr(probe_counter, 1)` and dispatch only
/// if the result is `<= probes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerState {
    pub stage: Stage,
    pub state: Phase,
    /// Grows by one with every transition.
    pub generation: u64,
    /// When this state began (ms since the epoch).
    pub since_ms: i64,
    /// While open: when it goes half-open.
    #[serde(default)]
    pub until_ms: Option<i64>,
    /// Why, for people.
    pub reason: String,
    /// Error rate and volume of the window that caused the transition.
    pub error_rate: f64,
    pub volume: u64,
    /// Dispatches allowed while half-open.
    pub probes: u32,
    /// Store counter of half-open permits taken (this generation).
    pub probe_counter: String,
}

impl BreakerState {
    /// The state of a stage that never tripped.
    pub fn initial(stage: Stage) -> Self {
        Self {
            stage,
            state: Phase::Closed,
            generation: 0,
            since_ms: 0,
            until_ms: None,
            reason: "never tripped".into(),
            error_rate: 0.0,
            volume: 0,
            probes: 0,
            probe_counter: String::new(),
        }
    }
}

/// The store key of a stage's transition record of `generation`.
pub fn transition_key(stage: Stage, generation: u64) -> String {
    format!("{}.{generation:020}", stage.as_str())
}

pub(crate) fn corrupt(key: String, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key,
        reason: e.to_string(),
    }
}

/// The authoritative state of a stage (newest transition; closed if none).
pub async fn current(store: &dyn TaskStore, stage: Stage) -> StoreResult<BreakerState> {
    let prefix = format!("{}.", stage.as_str());
    let newest = store
        .kv_list(TRANSITIONS)
        .await?
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .max_by(|a, b| a.0.cmp(&b.0));
    match newest {
        None => Ok(BreakerState::initial(stage)),
        Some((k, json)) => {
            serde_json::from_str(&json).map_err(|e| corrupt(format!("{TRANSITIONS}/{k}"), e))
        }
    }
}

/// The published state of a stage from [`BREAKER`] (closed if none): what
/// dispatchers read.
pub async fn published(store: &dyn TaskStore, stage: Stage) -> StoreResult<BreakerState> {
    match store.kv_get(BREAKER, stage.as_str()).await? {
        None => Ok(BreakerState::initial(stage)),
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| corrupt(format!("{BREAKER}/{}", stage.as_str()), e)),
    }
}

/// The dispatcher side of the contract: may one more task be dispatched to
/// `stage` now? Closed: yes. Open: no. Half-open: only while probe permits
/// last (taking one).
pub async fn try_admit(store: &dyn TaskStore, stage: Stage) -> StoreResult<bool> {
    let state = published(store, stage).await?;
    admit_state(store, &state).await
}

/// [`try_admit`] for a state already read.
pub async fn admit_state(store: &dyn TaskStore, state: &BreakerState) -> StoreResult<bool> {
    match state.state {
        Phase::Closed => Ok(true),
        Phase::Open => Ok(false),
        Phase::HalfOpen => {
            let taken = store.incr(&state.probe_counter, 1).await?;
            Ok(taken <= i64::from(state.probes))
        }
    }
}

/// Store collection of the attempts dispatched as probes of a half-open
/// breaker (key [`probe_key`]): the router decides a half-open breaker on
/// the outcomes of these alone, not on stragglers dispatched before it
/// opened.
pub const PROBES: &str = "breaker_probes";

/// How long a probe record is kept: well past any half-open phase.
const PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// One attempt of one task at a stage: what a probe and an outcome name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt<'a> {
    pub plan_id: &'a str,
    pub path: &'a str,
    pub attempt: u32,
}

/// The [`PROBES`] key of `attempt` as a probe of `stage`'s half-open
/// generation `generation`.
pub fn probe_key(stage: Stage, generation: u64, attempt: Attempt<'_>) -> String {
    format!(
        "{}.{generation:020}|{}|{}|{}",
        stage.as_str(),
        attempt.plan_id,
        attempt.path,
        attempt.attempt
    )
}

/// Records that `attempt` was dispatched under a probe permit of `stage`'s
/// half-open generation `generation` (a dispatcher calls it after
/// [`try_admit`] said yes, before publishing), so its outcome decides the
/// breaker.
pub async fn mark_probe(
    store: &dyn TaskStore,
    stage: Stage,
    generation: u64,
    attempt: Attempt<'_>,
) -> StoreResult<()> {
    let key = probe_key(stage, generation, attempt);
    store.kv_put(PROBES, &key, "1", Some(PROBE_TTL)).await
}

/// True when `attempt` was dispatched as a probe of the half-open `state`.
pub async fn is_probe(
    store: &dyn TaskStore,
    state: &BreakerState,
    attempt: Attempt<'_>,
) -> StoreResult<bool> {
    let key = probe_key(state.stage, state.generation, attempt);
    Ok(store.kv_get(PROBES, &key).await?.is_some())
}
