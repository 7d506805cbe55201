//! `devfleet canary start FILE | status [ID] | rollback ID`: canary
//! deployments on their own.

use anyhow::Context as _;
use devfleet_canary::{record, DeploymentRecord, Status};
use devfleet_protocol::{queues, DeployRequested};
use devfleet_runtime::ConnectArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Canary deployments: start one, show them, roll one back.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  devfleet canary start deploy.yaml --id web-42 --wait
  devfleet canary status
  devfleet canary status web-42 --json
  devfleet canary rollback web-42 --reason 'checkout errors'")]
pub struct CanaryArgs {
    #[command(subcommand)]
    command: CanaryCommand,
}

#[derive(clap::Subcommand)]
enum CanaryCommand {
    /// Start a deployment from a deploy spec (YAML/JSON, optionally with
    /// `id:` and `plan_id:`) or from a plan file's `deploy:` section. Its
    /// handlers name profiles of the canary service (its
    /// DEVFLEET_CANARY_PROFILES file); with a plan id, command profiles get
    /// that plan's built files.
    Start(StartArgs),
    /// Every deployment's stage, weight and health; one deployment's history.
    Status(StatusArgs),
    /// Ask the canary service to roll a deployment back now.
    Rollback(RollbackArgs),
}

#[derive(clap::Args)]
struct StartArgs {
    /// Deploy spec or plan file (YAML or JSON).
    file: PathBuf,
    /// Deployment id (overrides `id:` in the file; default: generated).
    #[arg(long)]
    id: Option<String>,
    /// Plan the deployment belongs to (overrides `plan_id:` in the file).
    #[arg(long)]
    plan_id: Option<String>,
    /// Follow the deployment until it is promoted (exit 0) or rolled back (exit 1).
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit 2).
    #[arg(long, default_value_t = 7200)]
    timeout: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// A deployment id: show its transitions and health history.
    id: Option<String>,
    /// Print JSON (the stored records).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(clap::Args)]
struct RollbackArgs {
    /// The deployment to roll back.
    id: String,
    /// Why (kept in the record and shown by `status`).
    #[arg(long)]
    reason: Option<String>,
    /// Wait until the rollback handler has run (exit 0), or give up after --timeout.
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs a `devfleet canary` subcommand.
pub async fn run(args: CanaryArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CanaryCommand::Start(a) => start(a).await,
        CanaryCommand::Status(a) => status(a).await,
        CanaryCommand::Rollback(a) => rollback(a).await,
    }
}

async fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let file = devfleet_canary::parse_start_file(&text)
        .with_context(|| format!("in {}", args.file.display()))?;
    let id = match args.id.or(file.id) {
        Some(id) => id,
        None => devfleet_canary::request::generate_id(file.name.as_deref()),
    };
    let request = DeployRequested {
        deployment_id: id.clone(),
        plan_id: args.plan_id.or(file.plan_id),
        spec: file.spec,
    };
    devfleet_canary::validate_request(&request)?;
    let connections = args.connect.connect().await?;
    if let Some(existing) = record::load(&connections.store, &id).await? {
        anyhow::bail!(
            "deployment '{id}' already exists ({}); choose another id with --id",
            existing.status.as_str()
        );
    }
    connections
        .publish(queues::DEPLOY_REQUESTED, request)
        .await
        .context("publishing the deployment request")?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::json!({ "deployment_id": id }));
        } else {
            println!("requested deployment {id}; follow it with `devfleet canary status {id}`");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !args.json {
        eprintln!("requested deployment {id}; waiting for the canary service");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut last_seen = String::new();
    loop {
        if let Some(rec) = record::load(&connections.store, &id).await? {
            let line = progress_line(&rec);
            if line != last_seen && !args.json {
                eprintln!("{line}");
                last_seen = line;
            }
            if rec.status.is_final() {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&rec)?);
                }
                return Ok(if rec.status == Status::Promoted {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "gave up waiting after {} s; the deployment goes on",
                args.timeout
            );
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn progress_line(rec: &DeploymentRecord) -> String {
    let health = rec
        .last_check
        .as_ref()
        .map(|c| {
            format!(
                ", last check {}{}",
                c.classification.as_str(),
                c.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let reason = rec
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!(
        "{}: {} at stage {}/{} ({}%){health}{reason}",
        rec.id,
        rec.status.as_str(),
        rec.stage + 1,
        rec.spec.stages.len(),
        rec.weight
    )
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = args.connect.connect().await?.store;
    let Some(id) = args.id else {
        let records = record::list(&store).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&records)?);
        } else if records.is_empty() {
            println!("no deployments; start one with `devfleet canary start FILE`");
        } else {
            println!(
                "{:<28} {:<13} {:>5} {:>6} {:>8} {:>9}  {:<12} REASON",
                "DEPLOYMENT", "STATUS", "STAGE", "WEIGHT", "ERRORS", "P95 MS", "HISTORY"
            );
            for r in records {
                let last = r.last_check.as_ref();
                println!(
                    "{:<28} {:<13} {:>5} {:>5}% {:>8} {:>9}  {:<12} {}",
                    r.id,
                    r.status.as_str(),
                    format!("{}/{}", r.stage + 1, r.spec.stages.len()),
                    r.weight,
                    last.and_then(|c| c.error_rate)
                        .map(devfleet_canary::classify::pct)
                        .unwrap_or_else(|| "-".into()),
                    last.and_then(|c| c.latency_p95_ms)
                        .map(|p| format!("{p:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    r.history_letters(12),
                    r.reason.as_deref().unwrap_or("")
                );
            }
            println!("history: H healthy, D degraded, U unhealthy, I no traffic, F read failed, B baseline");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let rec = record::load(&store, &id)
        .await?
        .with_context(|| format!("no deployment '{id}'; `devfleet canary status` lists them"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", progress_line(&rec));
    println!(
        "  stages {:?}, {} s each, checks every {} s; {:.1} s watched at this stage; owner {}",
        rec.spec.stages,
        rec.spec.stage_seconds,
        rec.spec.check_seconds,
        rec.stage_elapsed_ms as f64 / 1000.0,
        rec.owner.as_deref().unwrap_or("-")
    );
    if let Some(e) = &rec.last_error {
        println!("  last handler error: {e}");
    }
    // Times relative to the request: readable without a calendar.
    let at = |ms: i64| format!("+{:.1}s", (ms - rec.created_ms) as f64 / 1000.0);
    println!("transitions (time since the request):");
    for t in &rec.transitions {
        println!(
            "  {:>9} {:<17} stage {} {:>3}%  {}",
            at(t.at_ms),
            t.event,
            t.stage + 1,
            t.weight,
            t.detail.as_deref().unwrap_or("")
        );
    }
    println!("health checks (latest {}):", rec.history.len());
    for c in &rec.history {
        println!(
            "  {:>9} stage {} {:>3}%  {:<12} {}",
            at(c.at_ms),
            c.stage + 1,
            c.weight,
            c.classification.as_str(),
            c.detail.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let store = args.connect.connect().await?.store;
    let status = devfleet_canary::request_rollback(&store, &args.id, args.reason).await?;
    println!(
        "rollback of {} requested (it was {}); the canary service applies it within a second or so",
        args.id,
        status.as_str()
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    loop {
        if let Some(rec) = record::load(&store, &args.id).await? {
            match rec.status {
                Status::RolledBack => {
                    println!("{}", progress_line(&rec));
                    return Ok(ExitCode::SUCCESS);
                }
                Status::Promoted => {
                    println!("{} was promoted before the rollback was applied", rec.id);
                    return Ok(ExitCode::FAILURE);
                }
                _ => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "not rolled back after {} s: is a canary service running? (`devfleet canary status {}`)",
                args.timeout, args.id
            );
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
