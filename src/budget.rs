//! `devfleet budget`: show a plan's budget, or raise it and resume a plan
//! that ran out of it.

use anyhow::Context as _;
use devfleet_protocol::PlanStatus;
use devfleet_runtime::ConnectArgs;
use devfleet_store::{nano_usd, BudgetLimits, BudgetState};
use std::process::ExitCode;

#[derive(clap::Args)]
#[command(
    after_help = "Without a limit, shows the plan's budget: limits, spent, reserved by
running work. With one, sets it (the other limit is kept) and, when the
plan is budget_exhausted, resumes it: dispatch continues, status running.

Examples:
  devfleet budget flask-todo-1a2b3c4d
  devfleet budget flask-todo-1a2b3c4d --max-tokens 400000
  devfleet budget flask-todo-1a2b3c4d --max-cost-usd 12.50"
)]
pub struct BudgetArgs {
    /// The plan.
    plan_id: String,
    /// New token limit (tokens in + out over all the plan's executor runs).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// New cost limit in US dollars.
    #[arg(long)]
    max_cost_usd: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn run(args: BudgetArgs) -> anyhow::Result<ExitCode> {
    if let Some(c) = args.max_cost_usd {
        anyhow::ensure!(
            c.is_finite() && c > 0.0,
            "--max-cost-usd must be a positive number of US dollars; got {c}"
        );
    }
    anyhow::ensure!(
        args.max_tokens != Some(0),
        "--max-tokens must be positive; leave it out to keep the current limit"
    );
    let store = args.connect.connect().await?.store;
    let plan = store
        .plan(&args.plan_id)
        .await?
        .with_context(|| format!("no plan '{}'; `devfleet status` lists them", args.plan_id))?;
    let mut resumed = false;
    if args.max_tokens.is_some() || args.max_cost_usd.is_some() {
        let current = store.budget(&plan.id).await?.limits.unwrap_or_default();
        let limits = BudgetLimits {
            max_tokens: args.max_tokens.or(current.max_tokens),
            max_cost_nusd: args.max_cost_usd.map(nano_usd).or(current.max_cost_nusd),
        };
        store.set_budget(&plan.id, limits).await?;
        if plan.status == PlanStatus::BudgetExhausted {
            store
                .set_plan_status(
                    &plan.id,
                    PlanStatus::Running,
                    Some("budget raised; running again".to_owned()),
                )
                .await?;
            resumed = true;
        }
    }
    let state = store.budget(&plan.id).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "plan_id": plan.id,
                "budget": state,
                "resumed": resumed,
            }))?
        );
    } else {
        print!("{}", describe(&plan.id, &state));
        if resumed {
            println!("  resumed: the plan runs again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The budget lines of `devfleet budget` (and of `devfleet status`).
pub fn describe(plan_id: &str, state: &BudgetState) -> String {
    let usd = |n: u64| format!("${:.6}", n as f64 / 1e9);
    let limit = |max: Option<u64>, show: &dyn Fn(u64) -> String| {
        max.map_or_else(|| "no limit".to_owned(), show)
    };
    let limits = state.limits.unwrap_or_default();
    format!(
        "budget of {plan_id}{}\n  tokens  {} spent, {} reserved, limit {}\n  cost    {} spent, {} reserved, limit {}\n",
        if state.limits.is_none() {
            " (none set: the workers' default applies)"
        } else {
            ""
        },
        state.spent.tokens,
        state.reserved.tokens,
        limit(limits.max_tokens, &|n| n.to_string()),
        usd(state.spent.cost_nusd),
        usd(state.reserved.cost_nusd),
        limit(limits.max_cost_nusd, &usd),
    )
}
