//! `devfleet dlq list | replay ID | purge`: the dead-letter queue.
//!
//! Reads and changes the DLQ index the router keeps in the store (tasks it
//! gave up on, and bus dead letters it indexed); the logic lives in
//! `devfleet_router::dlq`.

use anyhow::Context as _;
use devfleet_router::dlq::{self, DlqSource, Replayed};
use devfleet_runtime::ConnectArgs;
use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;

/// `devfleet dlq` subcommands.
#[derive(clap::Subcommand)]
#[command(after_help = "Examples:
  devfleet dlq list
  devfleet dlq list --json
  devfleet dlq replay t-3fa9c2d01b7e
  devfleet dlq purge --yes")]
pub enum DlqCommand {
    /// Every dead letter: dead-lettered tasks with their failure history,
    /// and messages the bus dead-lettered.
    List {
        /// Print JSON (every field, full histories).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Put one back: a task returns to the ready set with its attempts
    /// reset; a message is published again to its queue.
    Replay {
        /// The id `devfleet dlq list` shows.
        id: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Forget every dead letter, and empty the namespace's dead-letter
    /// queue on the broker (devfleet.dlq, or NAMESPACE.devfleet.dlq).
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// Runs a `devfleet dlq` subcommand.
pub async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List { json, connect } => list(json, &connect).await,
        DlqCommand::Replay { id, connect } => {
            let connections = connect.connect().await?;
            match dlq::replay(&connections, &id).await? {
                Replayed::Task { plan_id, path } => println!(
                    "replayed {id}: task {path} of plan {plan_id} is back with its attempts reset"
                ),
                Replayed::Message { queue } => {
                    println!("replayed {id}: message published again to {queue}")
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Purge { yes, connect } => {
            let connections = connect.connect().await?;
            let count = dlq::list(connections.store.as_ref()).await?.len();
            if !yes && !confirm(&format!("forget {count} dead letter(s)?"))? {
                println!("nothing purged");
                return Ok(ExitCode::FAILURE);
            }
            let purged = dlq::purge(&connections).await?;
            println!(
                "purged {} dead letter(s) from the index and {} message(s) from {}",
                purged.entries,
                purged.bus_messages,
                connections.queue(devfleet_bus::DEAD_LETTER_QUEUE)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list(json: bool, connect: &ConnectArgs) -> anyhow::Result<ExitCode> {
    let connections = connect.connect().await?;
    let entries = dlq::list(connections.store.as_ref()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("the dead-letter queue is empty");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<15} {:<8} {:<24} {:<32} {:>4}  REASON",
        "ID", "SOURCE", "PLAN", "TASK / QUEUE", "TRY"
    );
    for e in &entries {
        let what = match e.source {
            DlqSource::Task => e.path.clone().unwrap_or_default(),
            DlqSource::Message => format!(
                "{} ({})",
                e.queue.as_deref().unwrap_or("?"),
                e.kind.as_deref().unwrap_or("undecodable")
            ),
        };
        println!(
            "{:<15} {:<8} {:<24} {:<32} {:>4}  {}",
            e.id,
            e.source.as_str(),
            e.plan_id.as_deref().unwrap_or("-"),
            what,
            e.attempts,
            e.reason.lines().next().unwrap_or("")
        );
        for h in &e.history {
            println!(
                "{:<15}   attempt {} ({}): {}",
                "",
                h.attempt,
                h.stage.as_str(),
                h.error.lines().next().unwrap_or("")
            );
        }
    }
    println!("\n`devfleet dlq replay ID` puts one back; `--json` shows full diagnostics");
    Ok(ExitCode::SUCCESS)
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    print!("{question} [y/N] ");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the answer (use --yes when there is no terminal)")?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}
