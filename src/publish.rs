//! `devfleet publish`: submit a plan, optionally wait for its outcome.

use anyhow::Context as _;
use devfleet_protocol::{queues, Plan, PlanStatus, PlanSubmitted};
use devfleet_runtime::{ConnectArgs, Connections};
use devfleet_store::{snapshot, PlanRecord, TaskState};
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

/// A plan read from a file, with its base snapshotted (not stored yet).
#[derive(Debug)]
pub struct PlanFile {
    pub plan: Plan,
    /// The snapshot of the plan's `base`, when it names one.
    pub base: Option<snapshot::Built>,
}

/// Reads and validates a plan file and snapshots its `base` (resolved
/// relative to the plan file's directory) in memory. A base that does not
/// exist, is not a directory or exceeds the snapshot limits
/// ([`snapshot::Limits`]) is an error here, before anything is created.
pub fn read_plan(path: &Path) -> anyhow::Result<PlanFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading plan {}", path.display()))?;
    let plan = Plan::parse(&text).with_context(|| format!("plan {} is invalid", path.display()))?;
    let base = match &plan.base {
        None => None,
        Some(base) => {
            let dir = path.parent().unwrap_or(Path::new(".")).join(base);
            let built = snapshot::build(&dir, snapshot::Limits::default())
                .with_context(|| format!("plan {}: its base cannot be used", path.display()))?;
            eprintln!(
                "base {}: {} files snapshotted, {} paths skipped (ignored, binary, oversize)",
                dir.display(),
                built.manifest.files.len(),
                built.manifest.skipped.len()
            );
            Some(built)
        }
    };
    Ok(PlanFile { plan, base })
}

/// Stores the plan's base snapshot (if any) and publishes the plan, with
/// the snapshot's id in `base_snapshot`, on `plans.submitted`; returns the
/// plan's new id.
pub async fn submit(connections: &Connections, file: PlanFile) -> anyhow::Result<String> {
    let PlanFile { mut plan, base } = file;
    if let Some(built) = base {
        let id = built
            .store(connections.store.as_ref())
            .await
            .context("storing the plan's base snapshot")?;
        plan.base_snapshot = Some(id);
    }
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

/// Polls the store until the plan reaches a final status, or is
/// `budget_exhausted` with no task running or in QA any more; `progress`
/// sees each change.
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
            // Out of budget: ended once the work that was running finished.
            if record.status == PlanStatus::BudgetExhausted
                && !connections
                    .store
                    .tasks(plan_id)
                    .await?
                    .iter()
                    .any(|t| matches!(t.state, TaskState::Leased | TaskState::Built))
            {
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

    fn plan_file(dir: &std::path::Path, base: &str) -> std::path::PathBuf {
        let path = dir.join("plans/plan.yaml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            format!("name: p\nbase: {base}\ntasks:\n  - {{ path: a.py, spec: a }}\n"),
        )
        .unwrap();
        path
    }

    #[test]
    fn the_base_is_resolved_relative_to_the_plan_file_and_snapshotted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("repo")).unwrap();
        std::fs::write(dir.path().join("repo/lib.py"), "X = 1\n").unwrap();
        let file = super::read_plan(&plan_file(dir.path(), "../repo")).unwrap();
        let built = file.base.expect("a snapshot");
        assert_eq!(built.manifest.files.keys().collect::<Vec<_>>(), ["lib.py"]);
        assert_eq!(file.plan.base_snapshot, None, "set when it is stored");
    }

    #[test]
    fn a_missing_base_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let err = super::read_plan(&plan_file(dir.path(), "../nowhere")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.contains("plan.yaml"), "names the plan: {text}");
    }
}
