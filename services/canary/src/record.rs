//! The deployment record: everything a canary replica needs to resume a
//! rollout, kept as JSON in the store's kv collection [`RECORDS`].
//!
//! The record is rewritten at every transition and every health check, so
//! a replica that takes a deployment over (after a crash or a restart)
//! continues at the recorded stage with the time already spent in it.

use devfleet_protocol::DeploySpec;
use devfleet_store::SharedStore;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Deployment records, by deployment id.
pub const RECORDS: &str = "canary";
/// Ids of deployments that are not final yet (value unused): what replicas scan.
pub const ACTIVE: &str = "canary.active";
/// Ownership leases, one key per deployment and epoch (see `lease.rs`).
pub const LEASES: &str = "canary.lease";
/// Operator requests (manual rollback), by deployment id.
pub const CONTROL: &str = "canary.control";

/// Where a deployment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Moving through the stages.
    Progressing,
    /// A rollback was decided and recorded; the rollback handler has not
    /// succeeded yet (it is retried until it does).
    RollingBack,
    /// Reached the last stage healthy: final.
    Promoted,
    /// Traffic was taken back: final.
    RolledBack,
}

impl Status {
    /// The name shown by `status` and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Progressing => "progressing",
            Status::RollingBack => "rolling_back",
            Status::Promoted => "promoted",
            Status::RolledBack => "rolled_back",
        }
    }

    /// True once the deployment can change no more.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Promoted | Status::RolledBack)
    }
}

/// The verdict of one health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// Error rate below the degraded threshold and p95 within the limit.
    Healthy,
    /// Error rate between the thresholds: the stage holds.
    Degraded,
    /// Error rate over the rollback threshold or p95 over the limit.
    Unhealthy,
    /// No requests in the interval: nothing to judge; the stage holds.
    Inconclusive,
    /// The health source could not be read.
    ReadFailed,
    /// First read of a counter endpoint: it only sets the baseline.
    Baseline,
}

impl Classification {
    /// The name shown by `status` and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Healthy => "healthy",
            Classification::Degraded => "degraded",
            Classification::Unhealthy => "unhealthy",
            Classification::Inconclusive => "inconclusive",
            Classification::ReadFailed => "read_failed",
            Classification::Baseline => "baseline",
        }
    }

    /// One letter for compact histories: H D U I F B.
    pub fn letter(self) -> char {
        match self {
            Classification::Healthy => 'H',
            Classification::Degraded => 'D',
            Classification::Unhealthy => 'U',
            Classification::Inconclusive => 'I',
            Classification::ReadFailed => 'F',
            Classification::Baseline => 'B',
        }
    }
}

/// One upper bound of a cumulative latency histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound in milliseconds; `None` is `+Inf`.
    pub le_ms: Option<f64>,
    /// Observations `<= le_ms`, cumulative since the service started.
    pub count: u64,
}

/// Cumulative counters last read from a JSON health endpoint: the baseline
/// the next interval is measured against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    /// Sorted by bound, `+Inf` last; empty when the endpoint has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<Bucket>,
}

/// One health check, as kept in a deployment's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub at_ms: i64,
    /// Stage index (into the spec's `stages`) the check was made at.
    pub stage: usize,
    pub weight: u8,
    pub classification: Classification,
    /// Errors / requests over the interval (0..=1); `None` without traffic
    /// or when the read failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p95_ms: Option<f64>,
    /// Requests in the interval (counter sources only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Why it was classified so, or why the read failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A change of stage, weight or status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: i64,
    /// `accepted`, `started`, `resumed`, `shifted`, `stage_passed`,
    /// `handler_failed`, `rollback_started`, `rolled_back`, `promoted`.
    pub event: String,
    pub stage: usize,
    pub weight: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Everything known about one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// Envelope id of the `deploy.requested` message that created it, so a
    /// redelivery of that message is recognised.
    pub request_id: String,
    pub spec: DeploySpec,
    pub status: Status,
    /// Index into `spec.stages` of the current stage.
    pub stage: usize,
    /// Weight (%) the shift handler last confirmed; 0 before the first shift
    /// and after a rollback.
    pub weight: u8,
    /// True once the shift handler confirmed `spec.stages[stage]`.
    pub shifted: bool,
    /// Time watched at the current stage, summed over every replica that
    /// drove it (time with no replica alive does not count).
    pub stage_elapsed_ms: u64,
    /// Health checks made, over the whole deployment.
    pub checks: u64,
    pub consecutive_read_failures: u32,
    /// Consecutive checks that held the stage (degraded or inconclusive).
    pub consecutive_holds: u32,
    /// Baseline of a counter health endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<HealthCheck>,
    /// The latest checks, oldest first (bounded).
    #[serde(default)]
    pub history: Vec<HealthCheck>,
    /// Stage, weight and status changes, oldest first (bounded).
    #[serde(default)]
    pub transitions: Vec<Transition>,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last handler failure (cleared when a handler succeeds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The replica driving it, as of the last write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
}

/// Transitions kept per record; older ones are dropped.
const MAX_TRANSITIONS: usize = 100;

impl DeploymentRecord {
    /// A fresh record at the first stage, nothing shifted yet.
    pub fn new(
        id: String,
        plan_id: Option<String>,
        request_id: String,
        spec: DeploySpec,
        now_ms: i64,
    ) -> Self {
        let mut record = Self {
            id,
            plan_id,
            request_id,
            spec,
            status: Status::Progressing,
            stage: 0,
            weight: 0,
            shifted: false,
            stage_elapsed_ms: 0,
            checks: 0,
            consecutive_read_failures: 0,
            consecutive_holds: 0,
            counters: None,
            last_check: None,
            history: Vec::new(),
            transitions: Vec::new(),
            reason: None,
            last_error: None,
            owner: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            finished_ms: None,
        };
        record.transition("accepted", None, now_ms);
        record
    }

    /// The weight of the current stage (what the stage shifts to).
    pub fn target_weight(&self) -> u8 {
        self.spec.stages.get(self.stage).copied().unwrap_or(100)
    }

    /// True at the last stage.
    pub fn at_last_stage(&self) -> bool {
        self.stage + 1 >= self.spec.stages.len()
    }

    /// Appends a transition at the current stage and weight.
    pub fn transition(&mut self, event: &str, detail: Option<String>, now_ms: i64) {
        self.transitions.push(Transition {
            at_ms: now_ms,
            event: event.to_owned(),
            stage: self.stage,
            weight: self.weight,
            detail,
        });
        if self.transitions.len() > MAX_TRANSITIONS {
            let excess = self.transitions.len() - MAX_TRANSITIONS;
            self.transitions.drain(..excess);
        }
        self.updated_ms = now_ms;
    }

    /// Records a check as the last one and in the bounded history.
    pub fn push_check(&mut self, check: HealthCheck, history_limit: usize) {
        self.updated_ms = check.at_ms;
        self.history.push(check.clone());
        if self.history.len() > history_limit.max(1) {
            let excess = self.history.len() - history_limit.max(1);
            self.history.drain(..excess);
        }
        self.last_check = Some(check);
    }

    /// The last `n` classifications as letters (see [`Classification::letter`]).
    pub fn history_letters(&self, n: usize) -> String {
        let skip = self.history.len().saturating_sub(n);
        self.history
            .iter()
            .skip(skip)
            .map(|c| c.classification.letter())
            .collect()
    }

    /// Parses a stored record; errors name the key.
    pub fn from_json(key: &str, text: &str) -> anyhow::Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("corrupt canary record '{key}' in the store: {e}"))
    }
}

/// Reads one deployment.
pub async fn load(store: &SharedStore, id: &str) -> anyhow::Result<Option<DeploymentRecord>> {
    match store.kv_get(RECORDS, id).await? {
        Some(text) => Ok(Some(DeploymentRecord::from_json(id, &text)?)),
        None => Ok(None),
    }
}

/// Every deployment, in id order. A corrupt record is an error naming it.
pub async fn list(store: &SharedStore) -> anyhow::Result<Vec<DeploymentRecord>> {
    store
        .kv_list(RECORDS)
        .await?
        .into_iter()
        .map(|(key, text)| DeploymentRecord::from_json(&key, &text))
        .collect()
}

/// Writes a record; `retain` makes a final one expire after that long.
pub async fn save(
    store: &SharedStore,
    record: &DeploymentRecord,
    retain: Option<Duration>,
) -> anyhow::Result<()> {
    let text = serde_json::to_string(record)?;
    store.kv_put(RECORDS, &record.id, &text, retain).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::{Handler, HealthSource, Thresholds};

    pub(crate) fn spec() -> DeploySpec {
        DeploySpec {
            stages: vec![10, 50, 100],
            stage_seconds: 1,
            check_seconds: 1,
            shift: Handler::profile("lb"),
            rollback: None,
            health: HealthSource::Url {
                url: "http://127.0.0.1:1/stats".into(),
            },
            thresholds: Thresholds::default(),
        }
    }

    fn check(c: Classification) -> HealthCheck {
        HealthCheck {
            at_ms: 1,
            stage: 0,
            weight: 10,
            classification: c,
            error_rate: None,
            latency_p95_ms: None,
            requests: None,
            detail: None,
        }
    }

    #[test]
    fn record_round_trips_through_json() {
        let mut r = DeploymentRecord::new("d1".into(), Some("p".into()), "m".into(), spec(), 5);
        r.push_check(check(Classification::Healthy), 10);
        r.counters = Some(Counters {
            requests: 3,
            errors: 1,
            buckets: vec![
                Bucket {
                    le_ms: Some(5.0),
                    count: 2,
                },
                Bucket {
                    le_ms: None,
                    count: 3,
                },
            ],
        });
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(DeploymentRecord::from_json("d1", &text).unwrap(), r);
    }

    #[test]
    fn history_is_bounded_and_keeps_the_latest() {
        let mut r = DeploymentRecord::new("d1".into(), None, "m".into(), spec(), 5);
        for c in [
            Classification::Healthy,
            Classification::Degraded,
            Classification::Unhealthy,
        ] {
            r.push_check(check(c), 2);
        }
        assert_eq!(r.history.len(), 2);
        assert_eq!(r.history_letters(10), "DU");
        assert_eq!(
            r.last_check.as_ref().unwrap().classification,
            Classification::Unhealthy
        );
    }

    #[test]
    fn corrupt_record_names_its_key() {
        let err = DeploymentRecord::from_json("web-1", "{").unwrap_err();
        assert!(err.to_string().contains("web-1"), "{err}");
    }

    #[test]
    fn target_weight_follows_the_stage() {
        let mut r = DeploymentRecord::new("d".into(), None, "m".into(), spec(), 0);
        assert_eq!(r.target_weight(), 10);
        assert!(!r.at_last_stage());
        r.stage = 2;
        assert_eq!(r.target_weight(), 100);
        assert!(r.at_last_stage());
    }
}
