//! `devfleet analyze` as a standalone program, for benchmarks and trying the
//! analyzer without building the whole CLI. It compiles the CLI's own module,
//! so both behave identically:
//!
//! ```sh
//! cargo run --release -p devfleet-analyzer --example analyze -- PATH --format json
//! ```

#[path = "../../../src/analyze.rs"]
mod analyze;

use clap::Parser;

/// Dependency analysis of a directory or a plan file.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: analyze::AnalyzeArgs,
}

fn main() -> anyhow::Result<()> {
    analyze::run(&Cli::parse().args)
}
