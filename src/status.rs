//! `devfleet status` and `devfleet pull`: read plans, tasks and artifacts
//! from the store.

use anyhow::Context as _;
use devfleet_runtime::ConnectArgs;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  devfleet status
  devfleet status flask-todo-1a2b3c4d --json")]
pub struct StatusArgs {
    /// A plan id; without it, every plan is listed.
    plan_id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = args.connect.connect().await?.store;
    let Some(plan_id) = args.plan_id else {
        let plans = store.plans().await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plans)?);
        } else if plans.is_empty() {
            println!("no plans yet; submit one with `devfleet publish PLAN`");
        } else {
            println!(
                "{:<40} {:<12} {:>9} {:>6}",
                "PLAN", "STATUS", "DONE", "FAILED"
            );
            for p in plans {
                println!(
                    "{:<40} {:<12} {:>9} {:>6}",
                    p.id,
                    p.status.as_str(),
                    format!("{}/{}", p.done, p.total),
                    p.failed
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let plan = store
        .plan(&plan_id)
        .await?
        .with_context(|| format!("no plan '{plan_id}'; `devfleet status` lists them"))?;
    let tasks = store.tasks(&plan_id).await?;
    let usage = store.plan_usage(&plan_id).await?;
    let budget = store.budget(&plan_id).await?;
    let changes = workspace_changes(store.as_ref(), &plan_id, &tasks).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "plan": plan,
                "tasks": tasks,
                "usage": usage,
                "budget": budget,
                "workspace_changes": changes,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "plan {} ({}): {}, {}/{} done, {} failed, {} blocked",
        plan.id,
        plan.name,
        plan.status.as_str(),
        plan.done,
        plan.total,
        plan.failed,
        plan.blocked
    );
    if let Some(m) = &plan.message {
        println!("  {m}");
    }
    print!("{}", crate::report::usage_lines(&usage));
    if budget.limits.is_some() {
        for line in crate::budget::describe(&plan_id, &budget).lines() {
            println!("  {line}");
        }
    }
    println!(
        "{:<50} {:<8} {:>7} {:<4} {:>9} {:>10}  NOTE",
        "TASK", "STATE", "ATTEMPT", "PRIO", "TOKENS", "COST"
    );
    for t in tasks {
        let note = t
            .error
            .as_deref()
            .map(|e| {
                e.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(80)
                    .collect::<String>()
            })
            .unwrap_or_default();
        let used = usage.by_task.get(&t.path).copied().unwrap_or_default();
        println!(
            "{:<50} {:<8} {:>7} {:<4} {:>9} {:>10}  {}",
            t.path,
            t.state.as_str(),
            t.attempt,
            t.priority,
            used.tokens(),
            format!("${:.4}", used.cost_usd()),
            note
        );
    }
    if !changes.is_empty() {
        println!("workspace changes besides the tasks' own files:");
        for (task, decisions) in &changes {
            for d in decisions {
                let what = if d.deleted { "delete" } else { "write" };
                match d.accepted {
                    true => println!(
                        "  {task}: {what} {} accepted (declared in `writes:`)",
                        d.path
                    ),
                    false => println!("  {task}: {what} {} REJECTED: {}", d.path, d.reason),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The judged workspace changes of every task that made some, by task.
async fn workspace_changes(
    store: &dyn devfleet_store::TaskStore,
    plan_id: &str,
    tasks: &[devfleet_store::TaskRecord],
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<devfleet_store::extra_files::Decision>>>
{
    let mut out = std::collections::BTreeMap::new();
    for t in tasks {
        let decisions = devfleet_store::extra_files::decisions(store, plan_id, &t.path).await?;
        if !decisions.is_empty() {
            out.insert(t.path.clone(), decisions);
        }
    }
    Ok(out)
}

#[derive(clap::Args)]
#[command(after_help = "Example:
  devfleet pull flask-todo-1a2b3c4d --out ./generated")]
pub struct PullArgs {
    /// The plan whose files to write.
    plan_id: String,
    /// Folder to write into (created if missing; files are replaced;
    /// nothing is written through a symbolic link inside it, nor under
    /// `.git/`).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let store = args.connect.connect().await?.store;
    store
        .plan(&args.plan_id)
        .await?
        .with_context(|| format!("no plan '{}'", args.plan_id))?;
    let tasks = store.tasks(&args.plan_id).await?;
    let missing: Vec<&str> = tasks
        .iter()
        .filter(|t| t.artifact.is_none())
        .map(|t| t.path.as_str())
        .collect();
    let refs: Vec<_> = tasks.iter().collect();
    let tree = devfleet_store::extra_files::plan_tree(store.as_ref(), &refs, None).await?;
    let mut written = 0usize;
    let mut extra = 0usize;
    for (path, file) in tree {
        // Paths were validated at submission (and extra files when the
        // dev-worker judged them); check again before reading the
        // artifact, since the store is not ours to trust blindly.
        devfleet_protocol::plan::validate_path(&path)
            .map_err(|e| anyhow::anyhow!("refusing to write '{path}': {e}"))?;
        let hash = &file.artifact;
        let bytes = store
            .artifact(hash)
            .await?
            .with_context(|| format!("artifact {hash} of '{path}' is missing"))?;
        crate::tree_write::write_file(&args.out, &path, &bytes)?;
        written += 1;
        extra += usize::from(file.task != path);
    }
    println!(
        "wrote {written} files to {}{}",
        args.out.display(),
        if extra > 0 {
            format!(" ({extra} of them extra files tasks wrote under their `writes:`)")
        } else {
            String::new()
        }
    );
    if !missing.is_empty() {
        eprintln!(
            "{} tasks have no file yet: {}",
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
