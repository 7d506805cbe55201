//! The edge of the plan lifecycle: [`advance`] reads what the pure state
//! machine ([`crate::lifecycle`]) needs from the store, calls
//! [`lifecycle::step`], and carries out the effects it returns, in order.
//!
//! Every handler that moves a plan on goes through here: a completion or
//! failure of its last task ([`crate::completion`]), an integration result
//! ([`crate::integration`]), and the router's report of a task's final
//! failure. The effects themselves are idempotent on the stage markers of
//! [`crate::stages`], so a redelivered event repairs what an interrupted
//! caller left undone and announces nothing twice.

use crate::completion::{announce_status, end_plan};
use crate::lifecycle::{self, Effect, Event, FailedTask, Phase, Stages, Tasks, Verdict};
use crate::stages::{Marker, PlanStages};
use crate::{deploy, integration, Shared};
use devfleet_contracts::integration::IntegrationTally;
use devfleet_protocol::{now_ms, PlanStatus};
use devfleet_runtime::consume::StepError;
use devfleet_store::{PlanRecord, TaskState};
use std::collections::VecDeque;

/// The lifecycle's view of a stored plan.
fn view(record: &PlanRecord, stages: &Result<PlanStages, String>) -> lifecycle::Plan {
    lifecycle::Plan {
        id: record.id.clone(),
        phase: Phase::of(record.status),
        stages: match stages {
            Ok(s) => Stages::Known {
                steps: s.integration.len(),
                shards: devfleet_contracts::integration::shards(&record.id, &s.integration).len(),
                deploy: s.deploy.as_ref().map(|d| d.stages.clone()),
            },
            Err(reason) => Stages::Unreadable(reason.clone()),
        },
    }
}

/// The plan's tasks once all are final, for [`Event::TasksFinished`]. The
/// task list is read only when some task failed (to name them).
pub(crate) async fn finished_tasks(
    shared: &Shared,
    record: &PlanRecord,
) -> Result<Tasks, StepError> {
    let failed = if record.failed > 0 {
        shared
            .connections
            .store
            .tasks(&record.id)
            .await?
            .into_iter()
            .filter(|t| t.state == TaskState::Failed)
            .map(|t| FailedTask {
                path: t.path,
                error: t.error,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Tasks {
        done: record.done,
        blocked: record.blocked,
        total: record.total,
        failed,
    })
}

/// Steps the lifecycle of the plan `record` (read from the store just
/// before) with `event` and carries out the effects. Safe to call any
/// number of times, concurrently too (see the module docs).
pub(crate) async fn advance(
    shared: &Shared,
    record: PlanRecord,
    event: Event,
) -> Result<(), StepError> {
    let stages = PlanStages::of(&record);
    let transition = lifecycle::step(&view(&record, &stages), &event);
    if transition.next != Phase::of(record.status) {
        tracing::debug!(
            plan_id = %record.id,
            from = ?Phase::of(record.status),
            to = ?transition.next,
            "plan lifecycle step"
        );
    }
    Edge {
        shared,
        record,
        stages,
        tally: None,
    }
    .perform(transition.effects)
    .await
}

/// Steps the lifecycle of an integrating plan with the tally of its
/// recorded integration results.
pub(crate) async fn advance_with_tally(
    shared: &Shared,
    record: PlanRecord,
) -> Result<(), StepError> {
    Edge {
        shared,
        stages: PlanStages::of(&record),
        record,
        tally: None,
    }
    .perform(vec![Effect::TallyIntegration])
    .await
}

/// What the effects of one [`advance`] share.
struct Edge<'a> {
    shared: &'a Shared,
    record: PlanRecord,
    stages: Result<PlanStages, String>,
    /// The integration tally, once [`Effect::TallyIntegration`] read it.
    tally: Option<IntegrationTally>,
}

impl Edge<'_> {
    async fn perform(mut self, effects: Vec<Effect>) -> Result<(), StepError> {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Announce { message } => {
                    let status = self.record.status;
                    announce_status(self.shared, &self.record, status, Some(message)).await;
                }
                Effect::Enter { phase, message } => self.enter(phase, message).await?,
                Effect::PublishShards => self.publish_shards().await?,
                Effect::TallyIntegration => {
                    // Follow-up effects run next, before anything queued.
                    for e in self.tally().await?.into_iter().rev() {
                        queue.push_front(e);
                    }
                }
                Effect::ClaimVerdict { passed } => {
                    if !self.claim_verdict(passed).await? {
                        return Ok(());
                    }
                }
                Effect::RequestDeploy => self.request_deploy().await?,
                Effect::End { phase, message } => {
                    if let Err(reason) = &self.stages {
                        tracing::error!(plan_id = %self.record.id, %reason, "cannot read the plan's later stages");
                    }
                    end_plan(self.shared, &self.record, phase.status(), message).await?;
                }
                Effect::EscalateIntegration => {
                    if let Some(tally) = &self.tally {
                        integration::escalate(self.shared, &self.record, tally).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Effect::Enter`]: once per phase, claimed with its marker.
    async fn enter(&mut self, phase: Phase, message: String) -> Result<(), StepError> {
        let store = self.shared.connections.store.as_ref();
        let marker = match phase {
            Phase::Integrating => Marker::Integrating,
            Phase::Deploying => Marker::Deploying,
            // The lifecycle enters only live phases after Running.
            Phase::Running | Phase::Succeeded | Phase::Failed => return Ok(()),
        };
        if marker
            .claim(store, &self.record.id, &now_ms().to_string())
            .await?
        {
            end_plan(self.shared, &self.record, phase.status(), Some(message)).await?;
        } else {
            // The caller that claimed the phase may have stopped before the
            // status; write it unless the plan has moved on since.
            let current = store.plan(&self.record.id).await?.map(|p| p.status);
            if current.is_some_and(|s| Phase::of(s).is_before(phase)) {
                store
                    .set_plan_status(&self.record.id, phase.status(), Some(message))
                    .await?;
            }
        }
        self.record.status = phase.status();
        Ok(())
    }

    fn stages(&self) -> Option<&PlanStages> {
        self.stages.as_ref().ok()
    }

    /// [`Effect::PublishShards`].
    async fn publish_shards(&self) -> Result<(), StepError> {
        let Some(stages) = self.stages() else {
            return Ok(());
        };
        integration::publish_shards(self.shared, &self.record.id, &stages.integration).await
    }

    /// [`Effect::TallyIntegration`]: the effects of the verdict so far.
    async fn tally(&mut self) -> Result<Vec<Effect>, StepError> {
        let Some(stages) = self.stages() else {
            return Ok(Vec::new());
        };
        let steps = stages.integration.clone();
        // The verdict is taken on the plan as it is now.
        let Some(record) = self.shared.connections.store.plan(&self.record.id).await? else {
            return Ok(Vec::new());
        };
        self.record = record;
        let (tally, verdict) = integration::tally(self.shared, &self.record.id, &steps).await?;
        if let Verdict::Pending { missing } = verdict {
            tracing::debug!(plan_id = %self.record.id, missing, "integration: waiting for shards");
        }
        self.tally = Some(tally);
        let transition = lifecycle::step(
            &view(&self.record, &self.stages),
            &Event::IntegrationTallied(verdict),
        );
        Ok(transition.effects)
    }

    /// [`Effect::ClaimVerdict`]: true when this caller carries out the
    /// verdict: it made the claim, or the caller that did stopped before
    /// moving the plan on (the plan is still Integrating; repeating the
    /// status write is harmless).
    async fn claim_verdict(&self, passed: bool) -> Result<bool, StepError> {
        let store = self.shared.connections.store.as_ref();
        let verdict = if passed { "passed" } else { "failed" };
        let act = Marker::Concluded
            .claim(store, &self.record.id, verdict)
            .await?
            || store
                .plan(&self.record.id)
                .await?
                .is_some_and(|p| p.status == PlanStatus::Integrating);
        if act {
            let shards = self.tally.as_ref().map_or(0, |t| t.failures().len());
            if passed {
                tracing::info!(plan_id = %self.record.id, "integration passed");
            } else {
                tracing::warn!(plan_id = %self.record.id, failed_shards = shards, "integration failed");
            }
        }
        Ok(act)
    }

    /// [`Effect::RequestDeploy`].
    async fn request_deploy(&self) -> Result<(), StepError> {
        match self.stages().and_then(|s| s.deploy.as_ref()) {
            Some(spec) => deploy::request(self.shared, &self.record.id, spec).await,
            None => Ok(()),
        }
    }
}
