//! `devfleet up`: every service in one process over the in-memory bus and
//! store. Each service reads the same `DEVFLEET_*` variables as its binary
//! (its `Settings`, parsed from the environment alone: `up`'s flags are its
//! own).

use crate::publish;
use anyhow::Context as _;
use devfleet_protocol::PlanStatus;
use devfleet_runtime::Connections;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  devfleet up --plan examples/hello/plan.yaml --exit-when-done
  devfleet up            # run until Ctrl-C; publish plans from another terminal")]
pub struct UpArgs {
    /// Submit this plan once the services are up.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Exit when the plan ends (exit status 0 only if it succeeded).
    #[arg(long, requires = "plan")]
    exit_when_done: bool,
    /// Give up on --exit-when-done after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let _telemetry = devfleet_telemetry::init("devfleet-up")?;
    let plan = args.plan.as_deref().map(publish::read_plan).transpose()?;
    let connections = Connections::in_memory();
    let shutdown = devfleet_runtime::shutdown_on_signals();
    let (mut services, gateway) = spawn_services(&connections, &shutdown).await?;
    eprintln!("devfleet up: all services running in one process (in-memory bus and store)");
    eprintln!("  dashboard: http://{gateway}/   metrics: http://{gateway}/metrics");

    let outcome = match plan {
        Some(plan) => {
            let plan_id = publish::submit(&connections, plan).await?;
            eprintln!("submitted plan {plan_id}");
            if args.exit_when_done {
                let progress = crate::report::PlanProgress::new(&plan_id);
                let waited = tokio::select! {
                    r = publish::wait_for_plan(&connections, &plan_id, Duration::from_secs(args.timeout), |r| progress.update(r)) => Some(r),
                    _ = shutdown.cancelled() => None,
                };
                progress.finish();
                let outcome = match waited {
                    Some(record) => {
                        let record = record?;
                        let report =
                            crate::report::PlanReport::load(&connections, &plan_id).await?;
                        println!("{report}");
                        Some(record.status == PlanStatus::Succeeded)
                    }
                    None => Some(false),
                };
                shutdown.cancel();
                outcome
            } else {
                None
            }
        }
        None => None,
    };
    if outcome.is_none() {
        shutdown.cancelled().await;
    }
    while let Some(joined) = services.join_next().await {
        joined.context("a service panicked")??;
    }
    Ok(match outcome {
        Some(false) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// A service's settings from the environment; the error names the service
/// and the variable.
fn settings<S: clap::Args>(service: &'static str) -> anyhow::Result<S> {
    devfleet_runtime::settings::from_env(service)
        .map_err(|e| anyhow::anyhow!("reading the {service} settings from the environment: {e}"))
}

/// Starts every service's `run` on the shared connections, each configured
/// from the environment like its binary and checked before any starts;
/// returns the gateway's address.
async fn spawn_services(
    connections: &Connections,
    shutdown: &CancellationToken,
) -> anyhow::Result<(JoinSet<anyhow::Result<()>>, std::net::SocketAddr)> {
    let c = || connections.clone();
    let analyzer = settings::<devfleet_analyzer::settings::Settings>("analyzer")?.into_config(c());
    let mut scheduler =
        settings::<devfleet_scheduler::settings::Settings>("scheduler")?.into_config(c());
    // The router runs here, so the scheduler's direct seam stays off.
    scheduler.direct_routing = false;
    let dev_worker = settings::<devfleet_dev_worker::Settings>("dev-worker")?.into_config(c())?;
    let router = settings::<devfleet_router::settings::Settings>("router")?.into_config(c());
    let mut qa_worker =
        settings::<devfleet_qa_worker::settings::Settings>("qa-worker")?.into_config(c())?;
    let mut canary = settings::<devfleet_canary::settings::Settings>("canary")?.into_config(c())?;
    // One machine: plans' health sources are on loopback unless the operator
    // said otherwise.
    if canary.allowed_networks.is_empty() {
        canary.allowed_networks = devfleet_canary::AllowList::loopback();
    }
    let gateway = settings::<devfleet_metrics_gateway::Settings>("metrics-gateway")?
        .into_config(c())
        .with_token_from_env()
        .context("metrics-gateway settings")?;
    scheduler.validate().context("scheduler settings")?;
    dev_worker.validate().context("dev-worker settings")?;
    router.validate().context("router settings")?;
    qa_worker.validate().context("qa-worker settings")?;
    canary.validate().context("canary settings")?;
    gateway.validate().context("metrics-gateway settings")?;
    qa_sandbox(&mut qa_worker.sandbox, &dev_worker.executors).await?;

    let s = || shutdown.clone();
    let mut set = JoinSet::new();
    set.spawn(devfleet_analyzer::service::run(analyzer, s()));
    set.spawn(devfleet_scheduler::run(scheduler, s()));
    set.spawn(devfleet_dev_worker::run(dev_worker, s()));
    set.spawn(devfleet_router::run(router, s()));
    set.spawn(devfleet_qa_worker::run(qa_worker, s()));
    set.spawn(devfleet_canary::run(canary, s()));
    let addr = gateway.addr;
    set.spawn(devfleet_metrics_gateway::run(gateway, s()));
    Ok((set, addr))
}

/// Decides whether the embedded qa-worker may run checks without a sandbox.
///
/// It may only when nothing it checks is generated: the dev-worker's only
/// executors are `builtin` (a task's `content`, verbatim) and `simulate`
/// (a file naming the task), so QA runs code that came verbatim from the
/// plan itself; `up` then says so. With an executor that writes generated
/// code (`command`, `openai`) and no working sandbox it refuses, with the
/// sandbox's error naming the fix. An operator's explicit
/// `DEVFLEET_QA_ALLOW_UNSANDBOXED=true` stands either way.
async fn qa_sandbox(
    sandbox: &mut devfleet_qa_worker::SandboxSettings,
    executors: &devfleet_dev_worker::Executors,
) -> anyhow::Result<()> {
    use devfleet_protocol::ExecutorKind;
    if sandbox.allow_unsandboxed {
        return Ok(());
    }
    let err = match devfleet_qa_worker::Sandbox::detect(sandbox.clone(), 1).await {
        Ok(_) => return Ok(()),
        Err(err) => err,
    };
    let Some(unavailable) = err.downcast_ref::<devfleet_qa_worker::Unavailable>() else {
        return Err(err.context("qa-worker sandbox"));
    };
    let mut generated: Vec<&str> = executors
        .kinds()
        .filter(|k| !matches!(k, ExecutorKind::Builtin | ExecutorKind::Simulate))
        .map(ExecutorKind::as_str)
        .collect();
    generated.sort_unstable();
    if !generated.is_empty() {
        anyhow::bail!(
            "{unavailable}.\n`devfleet up` is configured with the {} executor (DEVFLEET_COMMAND, \
             DEVFLEET_OPENAI_*), which writes generated code, so it will not check that code \
             without a sandbox",
            generated.join(" and ")
        );
    }
    eprintln!(
        "devfleet up: QA checks run WITHOUT a sandbox ({}): allowed only because the executors \
         here (builtin, simulate) write nothing but the plan's own content, so checks run only \
         code that came verbatim from the plan. Install bubblewrap to sandbox them (docs/QA.md).",
        unavailable.problem
    );
    sandbox.allow_unsandboxed = true;
    Ok(())
}
