//! The direct seam: stands in for the router until issue 5 replaces it.
//!
//! With `Config::direct_routing` (the default, `--direct-routing`,
//! `DEVFLEET_DIRECT_ROUTING`), the scheduler itself consumes what the router
//! will consume:
//!
//! * `task.built` is treated as `task.done`: the task is completed through
//!   the same path ([`crate::completion`]), so its dependents are released.
//!   There is no QA stage yet.
//! * `task.failed` fails the task for good: its dependents are Blocked with
//!   the cause, independent tasks still finish, and the plan ends Failed.
//!   There are no retries yet.
//!
//! **Replaced by the router in issue 5**, which owns `task.built` and
//! `task.failed` (QA, retries with backoff, dead-lettering, fix tasks) and
//! publishes `task.done`. Run the scheduler with `--direct-routing false`
//! once a router is deployed; then this module is not started.

use crate::completion;
use crate::consume::{self, Settlement};
use crate::Shared;
use devfleet_protocol::{queues, Envelope, Message};
use std::sync::Arc;

/// `task.built` → complete the task as if QA had passed it.
pub(crate) async fn handle_built(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::TaskBuilt(built) => {
            match completion::complete(&shared, &built.plan_id, &built.path, &built.artifact).await
            {
                Ok(()) => Settlement::Ack,
                Err(e) => Settlement::from_store_error("completing the built task", e),
            }
        }
        _ => consume::unexpected(&envelope, queues::TASK_BUILT),
    }
}

/// `task.failed` → fail the task for good (no retries before the router).
pub(crate) async fn handle_failed(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::TaskFailed(failed) => {
            let error = format!(
                "{} attempt {}: {}",
                failed.stage.as_str(),
                failed.attempt,
                failed.error
            );
            match completion::fail(&shared, &failed.plan_id, &failed.path, &error).await {
                Ok(()) => Settlement::Ack,
                Err(e) => Settlement::from_store_error("failing the task", e),
            }
        }
        _ => consume::unexpected(&envelope, queues::TASK_FAILED),
    }
}
