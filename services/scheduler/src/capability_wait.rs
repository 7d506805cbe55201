//! Dev tasks whose requirements no live dev-worker meets: parked, their
//! plan told what is missing, failed after the capability wait.
//!
//! A task's requirements are its plan's and its own `requires:` plus the
//! executor it names (`executor:KIND`), see
//! [`devfleet_contracts::capabilities::task_requirements`]; the workers'
//! capabilities come from their heartbeat records (the [`Fleet`] the
//! dispatcher reads each cycle).
//!
//! The dispatcher claims tasks in priority order without looking at their
//! requirements; before publishing, [`Waits::admit`] keeps back each task
//! no live worker's capabilities cover and *parks* it: the dispatcher keeps
//! the task's dispatch lease (renewed while parked, so no new attempt
//! starts and the reaper leaves it alone), and the plan's message becomes
//! "waiting for a worker with X; X: how to provide it" (shown by `devfleet
//! status`, `publish --wait` and the gateway's plan views). Each cycle
//! [`Waits::release`] hands back the parked tasks the fleet now covers, to
//! be published first; a task parked longer than the capability wait
//! (`DEVFLEET_SCHEDULER_CAPABILITY_WAIT_SECONDS`) fails with the message
//! (its dependents are blocked; the plan ends failed once the rest is
//! final).
//!
//! If this scheduler dies, the parked tasks' leases expire and the reaper
//! returns them to Ready, so another replica parks them again (their wait
//! starts over). The check is "some live worker has every requirement";
//! which worker takes a published task is the broker's choice, so in a
//! fleet where only some workers have a capability, run the others with
//! different namespaces or give every worker what the plans need.

use crate::Shared;
use devfleet_contracts::capabilities::{self, some_worker_has};
use devfleet_contracts::capacity::{Fleet, DISPATCH_OWNER};
use devfleet_protocol::Plan;
use devfleet_store::{ClaimOutcome, TaskRecord};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The plans' requirements (read once per plan from its record) and the
/// tasks parked by this dispatcher.
#[derive(Default)]
pub struct Waits {
    plans: HashMap<String, Option<Arc<Plan>>>,
    parked: Vec<Parked>,
}

struct Parked {
    task: TaskRecord,
    requires: Vec<String>,
    since: Instant,
    renewed: Instant,
}

#[derive(serde::Deserialize)]
struct Detail {
    plan: Plan,
}

impl Waits {
    /// Tasks parked now.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// What task `path` of plan `plan_id` requires (none when the plan's
    /// record holds no readable plan: nothing to wait for).
    async fn requirements(&mut self, shared: &Shared, plan_id: &str, path: &str) -> Vec<String> {
        if !self.plans.contains_key(plan_id) {
            let plan = match shared.connections.store.plan(plan_id).await {
                Ok(Some(record)) => serde_json::from_str::<Detail>(&record.detail)
                    .ok()
                    .map(|d| Arc::new(d.plan)),
                Ok(None) => None,
                // Not cached: asked again next time.
                Err(e) => {
                    tracing::warn!(plan_id, error = %e, "cannot read a plan's requirements");
                    return Vec::new();
                }
            };
            if self.plans.len() > 10_000 {
                self.plans.clear();
            }
            self.plans.insert(plan_id.to_owned(), plan);
        }
        match self.plans.get(plan_id) {
            Some(Some(plan)) => capabilities::task_requirements(plan, path),
            _ => Vec::new(),
        }
    }

    /// Of the tasks just claimed, those some live worker can run; the
    /// others are parked and their plans told what they wait for.
    pub(crate) async fn admit(
        &mut self,
        shared: &Shared,
        fleet: &Fleet,
        claimed: Vec<TaskRecord>,
    ) -> Vec<TaskRecord> {
        let mut runnable = Vec::with_capacity(claimed.len());
        for task in claimed {
            let requires = self.requirements(shared, &task.plan_id, &task.path).await;
            if requires.is_empty() || some_worker_has(&fleet.capabilities, &requires) {
                runnable.push(task);
                continue;
            }
            let missing = missing_in(fleet, &requires);
            let message = capabilities::waiting_message(&missing);
            tracing::info!(plan_id = %task.plan_id, path = %task.path, %message, "task parked");
            tell_plan(shared, &task.plan_id, Some(message)).await;
            let now = Instant::now();
            self.parked.push(Parked {
                task,
                requires,
                since: now,
                renewed: now,
            });
        }
        runnable
    }

    /// Parked tasks the fleet now covers (their dispatch lease renewed, to
    /// be published), at most `limit`; renews the others' leases and fails
    /// those parked longer than the capability wait.
    pub(crate) async fn release(
        &mut self,
        shared: &Shared,
        fleet: &Fleet,
        limit: u64,
    ) -> Vec<TaskRecord> {
        let mut released: Vec<TaskRecord> = Vec::new();
        let mut keep = Vec::with_capacity(self.parked.len());
        for p in std::mem::take(&mut self.parked) {
            let covered = some_worker_has(&fleet.capabilities, &p.requires);
            if covered && (released.len() as u64) < limit {
                if let Some(task) = reclaim(shared, &p.task).await {
                    released.push(task);
                }
                continue;
            }
            if !covered && p.since.elapsed() >= shared.capability_wait {
                let missing = missing_in(fleet, &p.requires);
                let error = format!(
                    "no live worker had {} for {}: {}",
                    missing.join(", "),
                    humantime(shared.capability_wait),
                    capabilities::waiting_message(&missing)
                );
                if let Err(e) = crate::completion::fail(
                    shared,
                    &p.task.plan_id,
                    &p.task.path,
                    p.task.attempt,
                    &error,
                )
                .await
                {
                    tracing::warn!(error = %e, path = %p.task.path, "cannot fail a parked task");
                }
                continue;
            }
            if p.renewed.elapsed() >= shared.dispatch_lease / 3 {
                // Lost (reaped, replayed): no longer ours to hold.
                if let Some(task) = reclaim(shared, &p.task).await {
                    keep.push(Parked {
                        task,
                        renewed: Instant::now(),
                        ..p
                    });
                }
                continue;
            }
            keep.push(p);
        }
        self.parked = keep;
        // A plan none of whose tasks waits any more is no longer waiting.
        let mut told = std::collections::HashSet::new();
        for t in &released {
            if !self.parked.iter().any(|p| p.task.plan_id == t.plan_id)
                && told.insert(t.plan_id.clone())
            {
                tell_plan(shared, &t.plan_id, None).await;
            }
        }
        released
    }
}

/// The requirements no single live worker has: those no worker has at
/// all, else (each is somewhere, never together) all of them.
fn missing_in(fleet: &Fleet, requires: &[String]) -> Vec<String> {
    let nowhere: Vec<String> = requires
        .iter()
        .filter(|r| !fleet.capabilities.iter().any(|c| c.contains(r.as_str())))
        .cloned()
        .collect();
    if nowhere.is_empty() {
        requires.to_vec()
    } else {
        nowhere
    }
}

/// Extends the dispatcher's lease on a parked task (attempt kept); `None`
/// when the task is no longer the dispatcher's.
async fn reclaim(shared: &Shared, task: &TaskRecord) -> Option<TaskRecord> {
    match shared
        .connections
        .store
        .claim(
            &task.plan_id,
            &task.path,
            DISPATCH_OWNER,
            None,
            shared.dispatch_lease,
        )
        .await
    {
        Ok(ClaimOutcome::Claimed(t)) if t.attempt == task.attempt => Some(t),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, path = %task.path, "cannot renew a parked task's lease");
            // Try again next cycle: keep it as it is.
            Some(task.clone())
        }
    }
}

/// Sets (or clears) a running plan's message, keeping its status.
async fn tell_plan(shared: &Shared, plan_id: &str, message: Option<String>) {
    let store = &shared.connections.store;
    let Ok(Some(plan)) = store.plan(plan_id).await else {
        return;
    };
    if plan.status.is_final() || plan.message == message {
        return;
    }
    // Only clear what this module wrote.
    if message.is_none()
        && !plan
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("waiting for a worker with"))
    {
        return;
    }
    if let Err(e) = store.set_plan_status(plan_id, plan.status, message).await {
        tracing::warn!(plan_id, error = %e, "cannot set the plan's waiting message");
    }
}

fn humantime(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}
