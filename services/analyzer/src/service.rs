//! The analyzer service: consumes `plans.submitted`, publishes
//! `plans.analyzed`, or records the rejection.
//!
//! Stateless, so any number of replicas can share the queue. A rejected
//! plan is written to the store with status `rejected` and the error (so
//! `devfleet publish --wait` and `devfleet status` show why) and announced
//! as a `plan.rejected` event; the delivery is acked either way, since
//! analysing the same plan again gives the same answer.

use devfleet_bus::ConsumeOptions;
use devfleet_protocol::metrics::{AnalyzeFailure, AnalyzeTiming};
use devfleet_protocol::{queues, Message, PlanAnalyzed, PlanRejected, PlanStatus, PlanSubmitted};
use devfleet_runtime::{backoff::Backoff, Connections, Metrics};
use devfleet_store::PlanRecord;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Settings of the analyzer service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Plans analysed at once.
    pub concurrency: u16,
    /// Directory against which a plan's relative `base` is resolved (the
    /// base must be readable by this process; when it is not, imports into
    /// it are reported as external).
    pub workdir: Option<PathBuf>,
    /// Attempts at a plan whose outcome cannot be published before it is
    /// dead-lettered.
    pub max_attempts: u32,
}

impl Config {
    /// Defaults for a service on `connections` (those of
    /// [`crate::settings::Settings`], no environment).
    pub fn new(connections: Connections) -> Self {
        crate::settings::Settings::default().into_config(connections)
    }
}

/// Runs the analyzer until `shutdown` is cancelled. In-flight plans finish
/// before it returns; unsettled deliveries are redelivered to a replica.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = config
        .connections
        .metrics(devfleet_runtime::instance_name("analyzer"));
    let mut consumer = config
        .connections
        .consume(
            queues::PLANS_SUBMITTED,
            ConsumeOptions::default()
                .prefetch(config.concurrency)
                .max_attempts(config.max_attempts),
        )
        .await?;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(
        config.concurrency.max(1) as usize
    ));
    let mut inflight = tokio::task::JoinSet::new();
    tracing::info!(
        "analyzer consuming {}",
        config.connections.queue(queues::PLANS_SUBMITTED)
    );
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next_envelope() => next,
        };
        let (envelope, delivery) = match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "analyzer consumer error");
                continue;
            }
            Some(Ok(pair)) => pair,
        };
        let Message::PlanSubmitted(submitted) = envelope.message else {
            let reason = format!(
                "unexpected '{}' message on {}",
                envelope.message.kind(),
                queues::PLANS_SUBMITTED
            );
            if let Err(e) = delivery.dead_letter(&reason).await {
                tracing::warn!(error = %e, "dead-lettering failed");
            }
            continue;
        };
        let permit = limit.clone().acquire_owned().await?;
        let span = tracing::info_span!("analyze_plan", plan_id = %submitted.plan_id, name = %submitted.plan.name);
        devfleet_telemetry::set_parent(&span, envelope.traceparent.as_deref());
        let config = config.clone();
        let metrics = metrics.clone();
        inflight.spawn(
            async move {
                let attempt = delivery.attempt;
                let outcome = handle(&config, &metrics, submitted).await;
                let settled = match outcome {
                    Ok(()) => delivery.ack().await.map(|_| ()),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "plan could not be handled; retrying");
                        delivery
                            .retry(Backoff::default().delay(attempt), &format!("{e:#}"))
                            .await
                            .map(|_| ())
                    }
                };
                if let Err(e) = settled {
                    tracing::warn!(error = %e, "settling plans.submitted delivery failed; it will be redelivered");
                }
                drop(permit);
            }
            .instrument(span),
        );
        while inflight.try_join_next().is_some() {}
    }
    drop(consumer);
    while inflight.join_next().await.is_some() {}
    Ok(())
}

/// Analyses one plan and publishes the outcome. An error means the outcome
/// could not be made durable (the delivery is retried); a bad plan is not
/// an error here.
async fn handle(
    config: &Config,
    metrics: &Metrics,
    submitted: PlanSubmitted,
) -> anyhow::Result<()> {
    let PlanSubmitted { plan_id, plan } = submitted;
    let started = std::time::Instant::now();
    let base = match (&plan.base, &config.workdir) {
        (Some(base), Some(dir)) => Some(dir.join(base)),
        (Some(base), None) => Some(PathBuf::from(base)),
        _ => None,
    }
    .filter(|p| p.is_dir());
    let analysis = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || devfleet_analysis::analyze_plan(&plan, base.as_deref()))
            .await?
    };
    match analysis {
        Ok(analysis) => {
            let tasks = analysis.to_analyzed_tasks(&plan);
            let critical = analysis.critical_path();
            let (critical_path_length, critical_path) = (critical.length, critical.files.clone());
            let count = tasks.len();
            config
                .connections
                .publish(
                    queues::PLANS_ANALYZED,
                    PlanAnalyzed {
                        plan_id: plan_id.clone(),
                        plan,
                        tasks,
                        critical_path_length,
                        critical_path,
                    },
                )
                .await?;
            tracing::info!(
                tasks = count,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "plan analyzed"
            );
            metrics
                .emit(AnalyzeTiming {
                    plan_id: plan_id.clone(),
                    tasks: count as u64,
                    duration_ms: started.elapsed().as_millis() as u64,
                })
                .await;
        }
        Err(error) => {
            let error = error.to_string();
            tracing::info!(%error, "plan rejected");
            let now = devfleet_protocol::now_ms();
            let record = PlanRecord {
                id: plan_id.clone(),
                name: plan.name.clone(),
                status: PlanStatus::Rejected,
                total: plan.tasks.len() as u32,
                done: 0,
                failed: 0,
                blocked: 0,
                created_ms: now,
                updated_ms: now,
                detail: String::new(),
                message: Some(error.clone()),
            };
            config
                .connections
                .store
                .create_plan(record, Vec::new())
                .await?;
            config
                .connections
                .event(PlanRejected {
                    plan_id: plan_id.clone(),
                    name: plan.name.clone(),
                    error: error.clone(),
                })
                .await;
            metrics
                .emit(AnalyzeFailure {
                    plan_id: plan_id.clone(),
                    error: error.clone(),
                })
                .await;
        }
    }
    Ok(())
}
