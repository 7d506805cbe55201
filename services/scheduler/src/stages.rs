//! What follows a plan's tasks: its `integration` steps and `deploy`
//! section, read from the analyzed plan kept with the plan record, and the
//! markers that make each stage transition happen once.
//!
//! # Markers
//!
//! A plan's later stages are entered from handlers that may run more than
//! once (a redelivered `task.done` finishes the plan again; two integration
//! results may arrive at once). Each transition is therefore claimed with a
//! put-if-absent record in the collection [`PLAN_STAGES`], key
//! `<plan_id>|<marker>`: the one caller that writes it makes the transition
//! and announces it; a later caller only repairs what an interrupted one
//! may have left undone (a status not yet written, work not yet published),
//! which is idempotent.

use devfleet_protocol::{DeploySpec, IntegrationStep};
use devfleet_store::{PlanRecord, StoreResult, TaskStore};
use serde::Deserialize;

/// Store collection of stage markers (see the module docs).
pub const PLAN_STAGES: &str = "plan_stages";

/// The stage transitions claimed with a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Running → Integrating.
    Integrating,
    /// Every integration shard was published (confirmed).
    IntegrationSent,
    /// The integration verdict was decided (value: `passed` or `failed`).
    Concluded,
    /// → Deploying.
    Deploying,
    /// `deploy.requested` was published (confirmed).
    DeploySent,
}

impl Marker {
    fn as_str(self) -> &'static str {
        match self {
            Marker::Integrating => "integrating",
            Marker::IntegrationSent => "integration_sent",
            Marker::Concluded => "concluded",
            Marker::Deploying => "deploying",
            Marker::DeploySent => "deploy_sent",
        }
    }

    fn key(self, plan_id: &str) -> String {
        format!("{plan_id}|{}", self.as_str())
    }

    /// Writes the marker if absent; true when this caller wrote it.
    pub async fn claim(
        self,
        store: &dyn TaskStore,
        plan_id: &str,
        value: &str,
    ) -> StoreResult<bool> {
        store
            .kv_put_new(PLAN_STAGES, &self.key(plan_id), value)
            .await
    }

    /// Writes the marker (whether or not it existed).
    pub async fn set(self, store: &dyn TaskStore, plan_id: &str, value: &str) -> StoreResult<()> {
        store
            .kv_put(PLAN_STAGES, &self.key(plan_id), value, None)
            .await
    }

    /// The marker's value, if written.
    pub async fn get(self, store: &dyn TaskStore, plan_id: &str) -> StoreResult<Option<String>> {
        store.kv_get(PLAN_STAGES, &self.key(plan_id)).await
    }
}

/// A plan's stages after its tasks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanStages {
    pub integration: Vec<IntegrationStep>,
    pub deploy: Option<DeploySpec>,
}

/// The parts of the stored analyzed plan (`PlanAnalyzed` JSON) needed here;
/// everything else (the tasks, with their content) is skipped unread.
#[derive(Deserialize)]
struct Detail {
    plan: DetailPlan,
}

#[derive(Deserialize)]
struct DetailPlan {
    #[serde(default)]
    integration: Vec<IntegrationStep>,
    #[serde(default)]
    deploy: Option<DeploySpec>,
}

impl PlanStages {
    /// Reads a plan record's stages. A record without detail (created by
    /// hand, not from `plans.analyzed`) has none; detail that is not the
    /// analyzed plan's JSON is an error naming the problem.
    pub fn of(plan: &PlanRecord) -> Result<PlanStages, String> {
        if plan.detail.trim().is_empty() {
            return Ok(PlanStages::default());
        }
        let detail: Detail = serde_json::from_str(&plan.detail).map_err(|e| {
            format!(
                "the stored analysis of plan '{}' cannot be read ({e}); its integration and deploy sections are unknown",
                plan.id
            )
        })?;
        Ok(PlanStages {
            integration: detail.plan.integration,
            deploy: detail.plan.deploy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::{Plan, PlanAnalyzed, PlanStatus};

    fn record(detail: String) -> PlanRecord {
        PlanRecord {
            detail,
            ..PlanRecord::new("p1", "n", PlanStatus::Running, 0)
        }
    }

    #[test]
    fn stages_come_from_the_analyzed_plan() {
        let plan: Plan = Plan::parse(
            r#"
name: x
tasks:
  - { path: a.py, spec: s, content: "x = 1" }
integration:
  - { name: unit, run: "python3 -m pytest -q", shard: 2 }
deploy:
  shift: { profile: lb }
  health: { url: "http://127.0.0.1:9000/stats" }
"#,
        )
        .unwrap();
        let analyzed = PlanAnalyzed {
            plan_id: "p1".into(),
            plan: plan.clone(),
            tasks: vec![],
            critical_path_length: 0,
            critical_path: vec![],
        };
        let stages = PlanStages::of(&record(serde_json::to_string(&analyzed).unwrap())).unwrap();
        assert_eq!(stages.integration, plan.integration);
        assert_eq!(stages.deploy, plan.deploy);
    }

    #[test]
    fn no_detail_means_no_stages_and_bad_detail_is_named() {
        assert_eq!(
            PlanStages::of(&record(String::new())).unwrap(),
            PlanStages::default()
        );
        let err = PlanStages::of(&record("{oops".into())).unwrap_err();
        assert!(
            err.contains("p1") && err.contains("cannot be read"),
            "{err}"
        );
    }
}
