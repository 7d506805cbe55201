//! The scheduler service: keeps every plan's tasks in the priority store,
//! hands each to a dev-worker the moment its dependencies are done, and
//! takes each plan through its integration and deploy stages.
//!
//! # What it does
//!
//! * **Intake** ([`intake`]): consumes `plans.analyzed`, creates the plan and
//!   all its tasks in one store step (a redelivered plan creates nothing
//!   twice), then acks. Tasks without dependencies are Ready at once.
//! * **Dispatch** ([`dispatch`]): claims the best Ready task (fix before new,
//!   then longest remaining path, then FIFO) as [`capacity::DISPATCH_OWNER`]
//!   and publishes it on `work.dev`, but only while the dispatched work no
//!   worker has taken yet fits in the free slots the dev-workers advertise
//!   ([`capacity`]), and only as far as the router's `dev` circuit breaker
//!   allows ([`dev_breaker`]). A broker backlog therefore never holds work
//!   in an order the store would no longer choose.
//! * **Completion** ([`completion`]): consumes `task.done` (from the
//!   router), completes the task (idempotently) and so releases its
//!   dependents in the same store step; consumes `task.finally_failed` (the
//!   router gave up on a task).
//! * **The plan lifecycle** ([`lifecycle`], one pure state machine; its
//!   effects are carried out in `effects`): when the last task of a plan
//!   is final the plan fails (some task failed), or moves to its
//!   integration stage ([`integration`]: `work.integration` out,
//!   `integration.results` in), then to its deploy stage (`deploy`:
//!   `deploy.requested`, after which the canary decides the outcome), or
//!   succeeds. Only the scheduler ends plans (the canary settles a
//!   Deploying one).
//! * **Leases** ([`reaper`]): returns tasks whose lease expired (a worker
//!   died, or a dispatched message was never taken) to Ready.
//! * **Stranded work** ([`watchdog`]): re-announces what a process that
//!   stopped between a store write and its publish left behind (a task
//!   Built with no QA in flight, a plan whose stage never moved on, an
//!   integration with shards that never reported).
//! * **Retention** ([`retention`]): collects finished plans, their records,
//!   expired cache entries and unreferenced artifacts after the retention
//!   period.
//! * **The direct seam** ([`direct_router`], off by default): for tests and
//!   setups without a router, `task.built` completes a task and
//!   `task.failed` fails it.
//!
//! # Guarantees
//!
//! * At-least-once in, idempotent effects: every delivery is acked only after
//!   its store transition; a redelivery finds the transition done and acks.
//! * A task is completed at most once (the store decides), and every task of
//!   a created plan ends Done, Failed or Blocked as long as some dev-worker
//!   and some scheduler keep running.
//! * A plan enters each later stage once (a put-if-absent marker in the
//!   store, [`stages`]); an integration result counts once per shard.
//! * Any number of scheduler replicas may run: each transition is atomic in
//!   the store. The dispatch credit is computed per replica, so N replicas
//!   may together overshoot it by up to N−1 rounds of free slots; the
//!   overshoot waits in `work.dev` and costs priority accuracy, not safety.

use devfleet_bus::ConsumeOptions;
use devfleet_protocol::queues;
use devfleet_runtime::consume::{consume, Source};
use devfleet_runtime::{Connections, Metrics};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub mod capability_wait;
pub mod completion;
mod deploy;
pub mod dev_breaker;
pub mod direct_router;
pub mod dispatch;
mod effects;
pub mod intake;
pub mod integration;
pub mod lifecycle;
mod plan_trace;
pub mod reaper;
pub mod retention;
pub mod settings;
pub mod stages;
#[cfg(test)]
mod test_plans;
pub mod watchdog;

/// Store counter of tasks this pipeline completed: it grows by
/// exactly one per task that became Done, however often `task.done` or
/// `task.built` was delivered.
pub const TASKS_COMPLETED: &str = "scheduler.tasks_completed";

/// Settings of the scheduler service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Name of this replica in metrics and logs.
    pub instance: String,
    /// Complete `task.built` and fail `task.failed` here, standing in for
    /// the router (see [`direct_router`]). Default false: the router owns
    /// those queues. Only for tests and setups that run no router; never
    /// together with one.
    pub direct_routing: bool,
    /// How long a dispatched task may wait for a worker to take it over
    /// before the reaper makes it Ready again. Must exceed the time a
    /// message can sit in `work.dev` (short: dispatch is credit-limited).
    pub dispatch_lease: Duration,
    /// How often the dispatcher re-reads worker capacity while work is
    /// waiting for a slot.
    pub dispatch_tick: Duration,
    /// How often it looks when there was nothing to dispatch (it is also
    /// woken by new plans, completions and reaped leases).
    pub idle_tick: Duration,
    /// How often expired leases are returned to Ready.
    pub reap_interval: Duration,
    /// How often the watchdog looks for stranded work ([`watchdog`]).
    pub watchdog_interval: Duration,
    /// How long a task may stay Built, or a plan in one stage, with nothing
    /// happening before the watchdog announces it again.
    pub watchdog_stall: Duration,
    /// How long finished plans and their records, cache entries and
    /// artifacts are kept ([`retention`]); `None` keeps them for ever.
    pub retention: Option<Duration>,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// Handlers in flight per consumed queue.
    pub handler_concurrency: usize,
    /// Deliveries of one message (transient failures) before it is
    /// dead-lettered.
    pub max_handler_attempts: u32,
    /// How long a task whose requirements no live dev-worker meets waits
    /// for one before it fails ([`capability_wait`]).
    pub capability_wait: Duration,
}

impl Config {
    /// Defaults that work on loopback (those of [`settings::Settings`],
    /// no environment).
    pub fn new(connections: Connections) -> Self {
        settings::Settings::default().into_config(connections)
    }

    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.dispatch_lease.is_zero(),
            "--dispatch-lease-seconds (DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS) must be positive"
        );
        anyhow::ensure!(
            !self.dispatch_tick.is_zero() && !self.idle_tick.is_zero(),
            "--dispatch-tick-seconds (DEVFLEET_SCHEDULER_DISPATCH_TICK_SECONDS) must be positive"
        );
        anyhow::ensure!(
            !self.reap_interval.is_zero(),
            "--reap-interval-seconds (DEVFLEET_SCHEDULER_REAP_INTERVAL_SECONDS) must be positive"
        );
        anyhow::ensure!(
            !self.watchdog_interval.is_zero() && !self.watchdog_stall.is_zero(),
            "--watchdog-interval-seconds (DEVFLEET_SCHEDULER_WATCHDOG_INTERVAL_SECONDS) and \
             --watchdog-stall-seconds (DEVFLEET_SCHEDULER_WATCHDOG_STALL_SECONDS) must be positive"
        );
        anyhow::ensure!(
            !self.retention_interval.is_zero(),
            "--retention-interval-seconds (DEVFLEET_SCHEDULER_RETENTION_INTERVAL_SECONDS) must be positive"
        );
        Ok(())
    }
}

/// What every part of the running scheduler shares.
pub(crate) struct Shared {
    pub connections: Connections,
    pub metrics: Metrics,
    /// Wakes the dispatcher: a plan was created, a task released or reaped.
    pub wake: Notify,
    pub traces: plan_trace::PlanTraces,
    pub dispatch_lease: Duration,
    pub dispatch_tick: Duration,
    pub idle_tick: Duration,
    pub reap_interval: Duration,
    pub watchdog_interval: Duration,
    pub watchdog_stall: Duration,
    pub max_handler_attempts: u32,
    pub capability_wait: Duration,
}

#[cfg(test)]
impl Shared {
    /// The shared state of a scheduler that runs no loops (unit tests
    /// drive the handlers directly).
    pub(crate) fn for_tests(connections: Connections) -> Arc<Shared> {
        let config = Config::new(connections.clone());
        Arc::new(Shared {
            metrics: connections.metrics("scheduler-test"),
            connections,
            wake: Notify::new(),
            traces: plan_trace::PlanTraces::default(),
            dispatch_lease: config.dispatch_lease,
            dispatch_tick: config.dispatch_tick,
            idle_tick: config.idle_tick,
            reap_interval: config.reap_interval,
            watchdog_interval: config.watchdog_interval,
            watchdog_stall: config.watchdog_stall,
            max_handler_attempts: config.max_handler_attempts,
            capability_wait: config.capability_wait,
        })
    }
}

/// Runs the service until `shutdown` is cancelled, then finishes the
/// handlers in flight and returns. If any part fails for good (the bus was
/// closed under it), the others are stopped and the error returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let shared = Arc::new(Shared {
        metrics: config.connections.metrics(config.instance.clone()),
        connections: config.connections.clone(),
        wake: Notify::new(),
        traces: plan_trace::PlanTraces::default(),
        dispatch_lease: config.dispatch_lease,
        dispatch_tick: config.dispatch_tick,
        idle_tick: config.idle_tick,
        reap_interval: config.reap_interval,
        watchdog_interval: config.watchdog_interval,
        watchdog_stall: config.watchdog_stall,
        max_handler_attempts: config.max_handler_attempts,
        capability_wait: config.capability_wait,
    });
    tracing::info!(
        instance = %config.instance,
        namespace = %config.connections.namespace,
        direct_routing = config.direct_routing,
        "scheduler starting"
    );
    let stop = shutdown.child_token();
    let n = config.handler_concurrency;
    let mut parts = JoinSet::new();
    let s = &shared;
    let options = ConsumeOptions::default().max_attempts(s.max_handler_attempts);
    let source = |queue: &'static str, concurrency: usize| Source {
        connections: s.connections.clone(),
        queue,
        options: options.clone(),
        concurrency,
    };
    parts.spawn(consume(
        source(queues::PLANS_ANALYZED, n.min(4)),
        s.clone(),
        stop.clone(),
        intake::handle,
    ));
    parts.spawn(consume(
        source(queues::TASK_DONE, n),
        s.clone(),
        stop.clone(),
        completion::handle_done,
    ));
    parts.spawn(consume(
        source(queues::TASK_FINALLY_FAILED, n),
        s.clone(),
        stop.clone(),
        completion::handle_finally_failed,
    ));
    parts.spawn(consume(
        source(queues::DEPLOY_FINISHED, n.min(4)),
        s.clone(),
        stop.clone(),
        deploy::handle_finished,
    ));
    parts.spawn(consume(
        source(queues::INTEGRATION_RESULTS, n),
        s.clone(),
        stop.clone(),
        integration::handle_result,
    ));
    if config.direct_routing {
        parts.spawn(consume(
            source(queues::TASK_BUILT, n),
            s.clone(),
            stop.clone(),
            direct_router::handle_built,
        ));
        parts.spawn(consume(
            source(queues::TASK_FAILED, n),
            s.clone(),
            stop.clone(),
            direct_router::handle_failed,
        ));
    }
    parts.spawn(dispatch::run(s.clone(), stop.clone()));
    parts.spawn(reaper::run(s.clone(), stop.clone()));
    parts.spawn(watchdog::run(s.clone(), stop.clone()));
    if let Some(keep) = config.retention {
        parts.spawn(retention::run(
            s.connections.store.clone(),
            keep,
            config.retention_interval,
            stop.clone(),
        ));
    }

    let mut result = Ok(());
    while let Some(joined) = parts.join_next().await {
        let outcome = joined
            .map_err(|e| anyhow::anyhow!("a scheduler task panicked: {e}"))
            .and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "scheduler part failed; stopping");
            if result.is_ok() {
                result = Err(e);
            }
        }
        // Whatever ended first, the rest stop too.
        stop.cancel();
    }
    tracing::info!("scheduler stopped");
    result
}
