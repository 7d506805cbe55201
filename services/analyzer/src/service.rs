//! The analyzer service: consumes `plans.submitted`, publishes
//! `plans.analyzed`, or records the rejection.
//!
//! Stateless, so any number of replicas can share the queue. A rejected
//! plan is written to the store with status `rejected` and the error (so
//! `devfleet publish --wait` and `devfleet status` show why) and announced
//! as a `plan.rejected` event; the delivery is acked either way, since
//! analysing the same plan again gives the same answer.

use devfleet_bus::{BusError, ConsumeOptions};
use devfleet_protocol::metrics::{AnalyzeFailure, AnalyzeTiming};
use devfleet_protocol::plan::MAX_BASE_CONFIG_BYTES;
use devfleet_protocol::{
    queues, Envelope, Message, PlanAnalyzed, PlanRejected, PlanStatus, PlanSubmitted,
};
use devfleet_runtime::consume::{self, Consume, Inflight, Settlement, StepError};
use devfleet_runtime::{Connections, Metrics};
use devfleet_store::{snapshot, PlanRecord};
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Settings of the analyzer service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Plans analysed at once.
    pub concurrency: u16,
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
/// and settle before it returns (the consumer closes only then); a
/// delivery still unsettled when the process dies is redelivered to a
/// replica.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = config
        .connections
        .metrics(devfleet_runtime::instance_name("analyzer"));
    tracing::info!(
        "analyzer consuming {}",
        config.connections.queue(queues::PLANS_SUBMITTED)
    );
    let analyzer = Arc::new(Analyzer {
        config: config.clone(),
        metrics,
    });
    Consume::new(config.connections.clone(), queues::PLANS_SUBMITTED)
        .options(ConsumeOptions::default().max_attempts(config.max_attempts))
        .concurrency(usize::from(config.concurrency))
        .run(analyzer, shutdown, handle_envelope)
        .await
}

/// What the handlers share.
struct Analyzer {
    config: Config,
    metrics: Metrics,
}

async fn handle_envelope(
    analyzer: Arc<Analyzer>,
    envelope: Envelope,
    _inflight: Inflight,
) -> Settlement {
    let Message::PlanSubmitted(submitted) = envelope.message else {
        return consume::unexpected(&envelope, queues::PLANS_SUBMITTED);
    };
    let span = tracing::info_span!("analyze_plan", plan_id = %submitted.plan_id, name = %submitted.plan.name);
    match handle(&analyzer.config, &analyzer.metrics, submitted)
        .instrument(span)
        .await
    {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("handling the plan"),
    }
}

/// A plan's base as the analysis needs it: the snapshot's file list and
/// the text of its JS/TS resolution configs (the only files read).
type Base = (Vec<String>, HashMap<String, String>);

/// Reads the plan's base from its snapshot in the store (never from the
/// `base` path, which names a directory on the publisher's machine).
/// `Ok(Err(reason))` rejects the plan: a `base` without a snapshot, or a
/// snapshot the store does not hold.
async fn base_of(
    config: &Config,
    plan: &devfleet_protocol::Plan,
) -> Result<Result<Option<Base>, String>, StepError> {
    let store = config.connections.store.as_ref();
    let id = match (&plan.base_snapshot, &plan.base) {
        (None, None) => return Ok(Ok(None)),
        (None, Some(base)) => {
            return Ok(Err(format!(
                "base '{base}' has no snapshot: services never read a path named by a plan; \
                 submit the plan with `devfleet publish`, which snapshots the base into the store"
            )))
        }
        (Some(id), _) => id,
    };
    let Some(manifest) = snapshot::load(store, id).await? else {
        return Ok(Err(format!(
            "base snapshot {id} is not in the store (never stored, or collected): publish the plan again"
        )));
    };
    let mut configs = HashMap::new();
    for (path, entry) in &manifest.files {
        let name = path.rsplit('/').next().unwrap_or(path);
        if matches!(name, "tsconfig.json" | "jsconfig.json") && entry.size <= MAX_BASE_CONFIG_BYTES
        {
            if let Some(text) = snapshot::read_file(store, &manifest, path).await? {
                configs.insert(path.clone(), text);
            }
        }
    }
    Ok(Ok(Some((manifest.files.into_keys().collect(), configs))))
}

/// Analyses one plan and publishes the outcome. An error means the outcome
/// could not be made durable (settled by the runtime's table: a publish or
/// store outage is retried); a bad plan is not an error here.
async fn handle(
    config: &Config,
    metrics: &Metrics,
    submitted: PlanSubmitted,
) -> Result<(), StepError> {
    let PlanSubmitted { plan_id, plan } = submitted;
    let name = plan.name.clone();
    let started = std::time::Instant::now();
    let analysis = match base_of(config, &plan).await? {
        Err(error) => Err(error),
        Ok(base) => {
            let plan = plan.clone();
            tokio::task::spawn_blocking(move || {
                let (files, configs) = base.unwrap_or_default();
                let listed: Vec<&str> = files.iter().map(String::as_str).collect();
                let read = |rel: &str| configs.get(rel).cloned();
                devfleet_analysis::analyze_plan_over(&plan, &listed, &read)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| StepError::Invalid(format!("the analysis crashed: {e}")))?
        }
    };
    let outcome = match analysis {
        Ok(analysis) => {
            let tasks = analysis.to_analyzed_tasks(&plan);
            let critical = analysis.critical_path();
            let (critical_path_length, critical_path) = (critical.length, critical.files.clone());
            let count = tasks.len();
            let published = config
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
                .await;
            match published {
                Ok(()) => Ok(count),
                Err(e) => match e.downcast_ref::<BusError>() {
                    // It will never fit: a rejection, not a retry.
                    Some(BusError::TooLarge { size, limit, .. }) => Err(format!(
                        "the analyzed plan is {size} bytes as a message (its tasks with their \
                         dependencies); the bus carries at most {limit}: split the plan or \
                         shrink its contents"
                    )),
                    _ => return Err(StepError::Publish(e)),
                },
            }
        }
        Err(error) => Err(error),
    };
    match outcome {
        Ok(count) => {
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
            tracing::info!(%error, "plan rejected");
            let now = devfleet_protocol::now_ms();
            // Created without tasks: the store counts none.
            let record = PlanRecord {
                message: Some(error.clone()),
                ..PlanRecord::new(&plan_id, &name, PlanStatus::Rejected, now)
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
                    name,
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
