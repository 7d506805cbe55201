//! Pipeline benchmark: tasks/s and READY→completed latency through the
//! scheduler and dev-workers over real RabbitMQ and Redis, with the
//! `simulate` executor at 0 ms, so what is measured is the pipeline itself
//! (store transitions, broker round trips, dispatch credit).
//!
//! usage: cargo bench --bench pipeline -- [TASKS] [WIDTH] [WORKERS] [SLOTS]
//!   TASKS    tasks in the plan (default 2000)
//!   WIDTH    independent chains (default 50): task i depends on task i-WIDTH
//!   WORKERS  in-process dev-workers (default 2)
//!   SLOTS    slots per worker, min = max (default 10)
//!
//! Needs DEVFLEET_AMQP_URL and DEVFLEET_REDIS_URL (`scripts/bench-pipeline.sh`
//! starts servers and sets them). A task's READY time is when its last
//! dependency completed (the plan's creation for roots); its completed time
//! is when the store made it Done. Both come from the store's records.

use devfleet_dev_worker::executor::simulate::{Simulate, SimulateSettings};
use devfleet_dev_worker::{Executors, ScalePolicy};
use devfleet_protocol::{queues, AnalyzedTask, ExecutorKind, Plan, PlanAnalyzed, PlanStatus};
use devfleet_runtime::Connections;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tasks = arg(1, 2000) as usize;
    let width = (arg(2, 50) as usize).max(1);
    let workers = arg(3, 2).max(1);
    let slots = u32::try_from(arg(4, 10)).unwrap_or(10).max(1);
    let amqp = std::env::var("DEVFLEET_AMQP_URL")?;
    let redis = std::env::var("DEVFLEET_REDIS_URL")?;
    let run_id = devfleet_testkit::unique("run");

    let bus = devfleet_bus::connect(&amqp).await?;
    let namespace = format!("bench-{run_id}");
    let store =
        devfleet_store::connect_with_prefix(&redis, &format!("devfleet:{namespace}")).await?;
    let connections = Connections {
        broadcast: bus.clone(),
        bus,
        store,
        namespace,
    };
    let shutdown = CancellationToken::new();
    let mut services = tokio::task::JoinSet::new();

    let mut scheduler = devfleet_scheduler::Config::new(connections.clone());
    // No router or QA here: what is measured is dispatch and completion, so
    // the scheduler completes built tasks itself.
    scheduler.direct_routing = true;
    scheduler.dispatch_tick = Duration::from_millis(5);
    services.spawn(devfleet_scheduler::run(scheduler, shutdown.clone()));
    for _ in 0..workers {
        let mut worker = devfleet_dev_worker::Config::new(connections.clone());
        worker.executors = Executors::new(ExecutorKind::Simulate).with(
            ExecutorKind::Simulate,
            Arc::new(Simulate::new(SimulateSettings {
                unit: Duration::ZERO,
                ..SimulateSettings::default()
            })),
        );
        worker.scale = ScalePolicy {
            min: slots,
            max: slots,
            ..ScalePolicy::default()
        };
        services.spawn(devfleet_dev_worker::run(worker, shutdown.clone()));
    }
    // Let the workers announce their capacity.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let name = |i: usize| format!("bench/f{i:05}.py");
    let analyzed: Vec<AnalyzedTask> = (0..tasks)
        .map(|i| AnalyzedTask {
            path: name(i),
            spec: format!("benchmark file {i}"),
            content: None,
            depends_on: if i >= width {
                vec![name(i - width)]
            } else {
                vec![]
            },
            estimate: 1,
            priority: u32::try_from((tasks - i).div_ceil(width)).unwrap_or(1),
            batch: u32::try_from(i / width).unwrap_or(0),
            executor: None,
            base_imports: Vec::new(),
        })
        .collect();
    let plan_id = format!("bench-{run_id}");
    let plan = PlanAnalyzed {
        plan_id: plan_id.clone(),
        plan: Plan {
            requires: Vec::new(),
            name: "bench".into(),
            base: None,
            base_snapshot: None,
            executor: Some(ExecutorKind::Simulate),
            tasks: vec![],
            integration: vec![],
            deploy: None,
            budget: None,
        },
        tasks: analyzed,
        critical_path_length: u64::try_from(tasks.div_ceil(width)).unwrap_or(0),
        critical_path: vec![],
    };
    let started = Instant::now();
    connections.publish(queues::PLANS_ANALYZED, plan).await?;
    let record = loop {
        if let Some(p) = connections.store.plan(&plan_id).await? {
            if p.status.is_final() {
                break p;
            }
        }
        if started.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("the plan did not finish within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    anyhow::ensure!(
        record.status == PlanStatus::Succeeded,
        "plan ended {:?}",
        record
    );

    let records = connections.store.tasks(&plan_id).await?;
    let done_ms: HashMap<&str, i64> = records
        .iter()
        .map(|t| (t.path.as_str(), t.updated_ms))
        .collect();
    let mut latencies: Vec<i64> = records
        .iter()
        .map(|t| {
            let ready = t
                .depends_on
                .iter()
                .filter_map(|d| done_ms.get(d.as_str()).copied())
                .max()
                .unwrap_or(record.created_ms);
            t.updated_ms - ready
        })
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let last_done = done_ms.values().copied().max().unwrap_or(record.created_ms);
    let span_ms = (last_done - record.created_ms).max(1);
    println!(
        "pipeline: {tasks} tasks ({width} chains of {}), {workers} worker(s) x {slots} slots, simulate 0 ms, amqp + redis",
        tasks.div_ceil(width)
    );
    println!(
        "  throughput {:.0} tasks/s ({} ms from plan created to last task done)",
        tasks as f64 * 1000.0 / span_ms as f64,
        span_ms
    );
    println!(
        "  READY->completed latency: p50 {} ms, p99 {} ms, max {} ms",
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(0)
    );
    shutdown.cancel();
    while let Some(joined) = services.join_next().await {
        joined??;
    }
    Ok(())
}
