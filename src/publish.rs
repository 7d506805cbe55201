//! `devfleet publish`: submit a plan, optionally wait for its outcome.

use anyhow::Context as _;
use devfleet_protocol::{queues, Plan, PlanStatus, PlanSubmitted};
use devfleet_runtime::{ConnectArgs, Connections};
use devfleet_store::PlanRecord;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  devfleet publish examples/hello/plan.yaml
  devfleet publish plan.yaml --wait --json")]
pub struct PublishArgs {
    /// Plan file, YAML or JSON.
    plan: PathBuf,
    /// Show progress until the plan ends; exit 0 only if it succeeded.
    #[arg(long)]
    wait: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let plan = read_plan(&args.plan)?;
    let connections = args.connect.connect().await?;
    let plan_id = submit(&connections, plan).await?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::json!({ "plan_id": plan_id }));
        } else {
            println!("submitted plan {plan_id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let progress = (!args.json).then(|| crate::report::PlanProgress::new(&plan_id));
    let record = wait_for_plan(
        &connections,
        &plan_id,
        Duration::from_secs(args.timeout),
        |r| {
            if let Some(p) = &progress {
                p.update(r);
            }
        },
    )
    .await;
    if let Some(p) = &progress {
        p.finish();
    }
    let record = record?;
    let report = crate::report::PlanReport::load(&connections, &plan_id).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(if record.status == PlanStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads and validates a plan file.
pub fn read_plan(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading plan {}", path.display()))?;
    Plan::parse(&text).with_context(|| format!("plan {} is invalid", path.display()))
}

/// Publishes a plan on `plans.submitted`; returns its new id.
pub async fn submit(connections: &Connections, plan: Plan) -> anyhow::Result<String> {
    let plan_id = new_plan_id(&plan.name);
    connections
        .publish(
            queues::PLANS_SUBMITTED,
            PlanSubmitted {
                plan_id: plan_id.clone(),
                plan,
            },
        )
        .await?;
    Ok(plan_id)
}

/// A readable, unique plan id: the name's slug and 8 random hex digits.
fn new_plan_id(name: &str) -> String {
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let slug: String = slug.chars().take(40).collect();
    let id = uuid::Uuid::new_v4().simple().to_string();
    if slug.is_empty() {
        format!("plan-{}", &id[..8])
    } else {
        format!("{slug}-{}", &id[..8])
    }
}

/// Polls the store until the plan reaches a final status; `progress` sees
/// each change.
pub async fn wait_for_plan(
    connections: &Connections,
    plan_id: &str,
    timeout: Duration,
    mut progress: impl FnMut(&PlanRecord),
) -> anyhow::Result<PlanRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<(PlanStatus, u32, u32)> = None;
    loop {
        if let Some(record) = connections.store.plan(plan_id).await? {
            let key = (record.status, record.done, record.failed);
            if last != Some(key) {
                progress(&record);
                last = Some(key);
            }
            if record.status.is_final() {
                return Ok(record);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "plan {plan_id} did not finish within {timeout:?}; `devfleet status {plan_id}` shows where it is"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plan_ids_are_slugged_and_unique() {
        let a = super::new_plan_id("Flask Todo!");
        let b = super::new_plan_id("Flask Todo!");
        assert!(a.starts_with("flask-todo-"), "{a}");
        assert_ne!(a, b);
        assert!(super::new_plan_id("!!!").starts_with("plan-"));
    }
}
