//! `devfleet`: the command-line interface and the embedded single-process mode.

use clap::{Parser, Subcommand};

mod analyze;
mod budget;
mod canary;
mod dlq;
#[cfg(test)]
mod env_doc;
mod gc;
mod publish;
mod report;
mod status;
mod tree_write;
mod up;
mod watch;

/// Run AI coding agents as a distributed, dependency-aware pipeline.
///
/// A plan of files goes in; an analyzer turns their imports into a DAG; a
/// scheduler releases each task the moment its dependencies are done; dev
/// workers write the files; QA checks them; a canary rolls the result out.
#[derive(Parser)]
#[command(name = "devfleet", version, propagate_version = true)]
#[command(after_help = "Examples:
  devfleet up --plan examples/hello/plan.yaml --exit-when-done
  devfleet analyze ./my-repo --format json
  devfleet publish plan.yaml --wait
  devfleet status
  devfleet watch --metrics task_progress,queue_status
  devfleet dlq list
  devfleet gc --dry-run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process over the in-memory bus and store.
    Up(up::UpArgs),
    /// Dependency analysis of a directory or a plan file.
    Analyze(analyze::AnalyzeArgs),
    /// Submit a plan to a running stack.
    Publish(publish::PublishArgs),
    /// Plan and task states, and a plan's tokens and cost.
    Status(status::StatusArgs),
    /// Write a plan's generated files to a folder.
    Pull(status::PullArgs),
    /// Subscribe to the metrics gateway and print live.
    Watch(watch::WatchArgs),
    /// The dead-letter queue: list, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Canary deployments on their own: start, status, rollback.
    Canary(canary::CanaryArgs),
    /// Show a plan's budget, or raise it and resume a plan that ran out.
    Budget(budget::BudgetArgs),
    /// Collect finished plans, expired cache entries, old dead letters and
    /// unreferenced artifacts now (schedulers also do it periodically).
    Gc(gc::GcArgs),
}

fn main() -> std::process::ExitCode {
    // Deprecated variable names and empty values are sorted out before
    // clap reads the environment (and before any other thread exists).
    if let Err(e) = devfleet_runtime::settings::apply_env_fixes() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    for warning in devfleet_runtime::settings::take_warnings() {
        eprintln!("warning: {warning}");
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Up(_)) && std::env::var_os("RUST_LOG").is_none() {
        // The embedded mode shows a progress bar and a report; service logs
        // would drown them. RUST_LOG=info brings the logs back. No other
        // thread exists yet, so changing the environment is sound.
        std::env::set_var("RUST_LOG", "warn");
    }
    let result = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run_async(cli.command)),
        Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_async(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Pull(args) => status::pull(args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Dlq(command) => dlq::run(command).await,
        Command::Canary(args) => canary::run(args).await,
        Command::Gc(args) => gc::run(args).await,
        Command::Budget(args) => budget::run(args).await,
        Command::Analyze(args) => analyze::run(&args).map(|()| std::process::ExitCode::SUCCESS),
    }
}
