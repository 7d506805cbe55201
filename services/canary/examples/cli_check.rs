// TEMPORARY: compile-check of src/canary.rs (deleted before hand-off).
#[path = "../../../src/canary.rs"]
mod canary;
use clap::Parser;
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: canary::CanaryArgs,
}
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match canary::run(Cli::parse().args).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
