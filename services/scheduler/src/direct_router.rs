//! The direct seam: the scheduler standing in for the router, for tests
//! and setups that run no router. Off by default.
//!
//! With `Config::direct_routing` (`--direct-routing true`,
//! `DEVFLEET_SCHEDULER_DIRECT_ROUTING=true`), the scheduler itself consumes what the
//! router normally consumes:
//!
//! * `task.built` is treated as `task.done`: the task is completed through
//!   the same path ([`crate::completion`]), so its dependents are released.
//!   There is no QA stage.
//! * `task.failed` fails the task for good: its dependents are Blocked with
//!   the cause, independent tasks still finish, and the plan ends Failed.
//!   There are no retries, no dead-letter entries and no circuit breaker
//!   outcomes (a `dev` breaker state in the store is still obeyed).
//!
//! The router (`devfleet-router`) owns `task.built` and `task.failed` in a
//! real deployment (QA, retries with backoff, dead-lettering, fix tasks) and
//! publishes `task.done`. Never enable this seam where a router runs: both
//! would compete for the same messages.

use crate::completion;
use crate::Shared;
use devfleet_protocol::{queues, Envelope, Message};
use devfleet_runtime::consume::{self, Settlement};
use std::sync::Arc;

/// `task.built` → complete the task as if QA had passed it.
pub(crate) async fn handle_built(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::TaskBuilt(built) => {
            match completion::complete(
                &shared,
                &built.plan_id,
                &built.path,
                built.attempt,
                &built.artifact,
            )
            .await
            {
                Ok(()) => Settlement::Ack,
                Err(e) => e.settlement("completing the built task"),
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
            match completion::fail(
                &shared,
                &failed.plan_id,
                &failed.path,
                failed.attempt,
                &error,
            )
            .await
            {
                Ok(()) => Settlement::Ack,
                Err(e) => e.settlement("failing the task"),
            }
        }
        _ => consume::unexpected(&envelope, queues::TASK_FAILED),
    }
}
