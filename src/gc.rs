//! `devfleet gc`: collects finished plans, their records, expired cache
//! entries, old DLQ entries and unreferenced artifacts by hand. The rules
//! (and the periodic run every scheduler does) live in
//! `devfleet_scheduler::retention`.

use devfleet_runtime::settings::seconds;
use devfleet_runtime::ConnectArgs;
use devfleet_scheduler::retention;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  devfleet gc --dry-run
  devfleet gc --older-than 86400
  devfleet gc --older-than 0 --json

Running plans are never collected; an artifact goes only when no task of a
plan the store keeps and no kept cache entry references it.")]
pub struct GcArgs {
    /// Collect what finished (or was last written) more than this many
    /// seconds ago; 0 collects every finished plan.
    #[arg(long, value_name = "SECONDS", default_value = "604800", value_parser = seconds)]
    older_than: Duration,
    /// Only report what would be collected.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn run(args: GcArgs) -> anyhow::Result<ExitCode> {
    let store = args.connect.connect_store().await?;
    let cutoff = devfleet_protocol::now_ms().saturating_sub(args.older_than.as_millis() as i64);
    let collected = retention::collect(store.as_ref(), cutoff, args.dry_run).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&collected)?);
    } else {
        let verb = if args.dry_run {
            "would collect"
        } else {
            "collected"
        };
        println!(
            "{verb} {} finished plan(s) ({} record(s) keyed by them), {} DLQ entr(ies), \
             {} cache entr(ies), {} artifact(s)",
            collected.plans.len(),
            collected.plan_records,
            collected.dlq_entries,
            collected.cache_entries,
            collected.artifacts
        );
        for plan in &collected.plans {
            println!("  {plan}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::PlanStatus;
    use devfleet_store::{NewTask, PlanRecord};
    use devfleet_testkit::{redis_url, unique};

    fn args(connect: &ConnectArgs, dry_run: bool) -> GcArgs {
        GcArgs {
            older_than: Duration::ZERO,
            dry_run,
            json: true,
            connect: connect.clone(),
        }
    }

    #[test]
    fn retention_knows_the_routers_collections() {
        for collection in [
            devfleet_router::history::HISTORY,
            devfleet_router::retry::RETRIES,
            devfleet_router::QA_PARKED,
        ] {
            assert!(
                retention::PLAN_KEYED.contains(&collection),
                "{collection} is keyed by plan but retention does not collect it"
            );
        }
        assert_eq!(retention::DLQ_INDEX, devfleet_router::dlq::DLQ);
    }

    #[tokio::test]
    async fn gc_collects_finished_plans_and_leaves_running_ones() {
        <GcArgs as clap::Args>::augment_args(clap::Command::new("gc")).debug_assert();
        let connect = ConnectArgs {
            bus: devfleet_runtime::BusKind::Memory,
            amqp_url: String::new(),
            nats_url: None,
            redis_url: redis_url(),
            namespace: unique("gc"),
        };
        let store = connect.connect_store().await.unwrap();
        let task = NewTask::new("a.py", "s");
        for id in ["finished", "running"] {
            let plan = PlanRecord::new(id, id, PlanStatus::Running, devfleet_protocol::now_ms());
            assert!(store.create_plan(plan, vec![task.clone()]).await.unwrap());
        }
        store
            .set_plan_status("finished", PlanStatus::Failed, None)
            .await
            .unwrap();
        // The clock moves past the plan's last update.
        let updated = store.plan("finished").await.unwrap().unwrap().updated_ms;
        while devfleet_protocol::now_ms() <= updated {
            tokio::task::yield_now().await;
        }
        run(args(&connect, true)).await.unwrap();
        assert!(store.plan("finished").await.unwrap().is_some(), "a dry run");
        run(args(&connect, false)).await.unwrap();
        assert_eq!(store.plan("finished").await.unwrap(), None);
        assert!(store.plan("running").await.unwrap().is_some());
    }
}
