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
use devfleet_protocol::{
    queues, Envelope, Message, PlanAnalyzed, PlanRejected, PlanStatus, PlanSubmitted,
};
use devfleet_runtime::consume::{self, Consume, Inflight, Settlement, StepError};
use devfleet_runtime::{Connections, Metrics};
use devfleet_store::PlanRecord;
use std::path::PathBuf;
use std::sync::Arc;
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
    let base = match (&plan.base, &config.workdir) {
        (Some(base), Some(dir)) => Some(dir.join(base)),
        (Some(base), None) => Some(PathBuf::from(base)),
        _ => None,
    }
    .filter(|p| p.is_dir());
    let analysis = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || devfleet_analysis::analyze_plan(&plan, base.as_deref()))
            .await
            .map_err(|e| StepError::Invalid(format!("the analysis crashed: {e}")))?
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
        Err(error) => Err(error.to_string()),
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
