//! The `qa-worker` binary: configuration from flags and environment, then
//! [`devfleet_qa_worker::run`].

use clap::Parser;
use devfleet_qa_worker::{checks, Config, SandboxMode};
use devfleet_runtime::ConnectArgs;
use std::path::PathBuf;
use std::time::Duration;

/// devfleet qa-worker: sandboxed per-language checks and integration-test shards.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Check configuration (YAML or JSON); replaces the default checks.
    #[arg(long, env = "DEVFLEET_QA_CHECKS")]
    checks: Option<PathBuf>,
    /// Isolation: auto (bubblewrap when it works), bwrap (required) or none.
    #[arg(long, env = "DEVFLEET_QA_SANDBOX", value_enum, default_value = "auto")]
    sandbox: SandboxMode,
    /// Checks and integration shards run at once.
    #[arg(long, env = "DEVFLEET_QA_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Wall timeout of one check, seconds.
    #[arg(long, env = "DEVFLEET_QA_CHECK_TIMEOUT_SECS", default_value_t = 60)]
    check_timeout_secs: u64,
    /// Wall timeout of one integration shard, seconds (a step's
    /// `timeout_seconds` wins).
    #[arg(
        long,
        env = "DEVFLEET_QA_INTEGRATION_TIMEOUT_SECS",
        default_value_t = 600
    )]
    integration_timeout_secs: u64,
    /// CPU time limit per process, seconds.
    #[arg(long, env = "DEVFLEET_QA_CPU_SECS", default_value_t = 60)]
    cpu_secs: u64,
    /// Address-space limit per process, MiB.
    #[arg(long, env = "DEVFLEET_QA_MEMORY_MB", default_value_t = 2048)]
    memory_mb: u64,
    /// Process limit per sandbox (when running as root: per-slot uids).
    #[arg(long, env = "DEVFLEET_QA_PROCESSES", default_value_t = 64)]
    processes: u64,
    /// Largest file a check may write, MiB.
    #[arg(long, env = "DEVFLEET_QA_FILE_SIZE_MB", default_value_t = 64)]
    file_size_mb: u64,
    /// Output kept per stream of a check, KiB.
    #[arg(long, env = "DEVFLEET_QA_OUTPUT_KB", default_value_t = 64)]
    output_kb: usize,
    /// First uid of the per-slot sandbox users when running as root.
    #[arg(long, env = "DEVFLEET_QA_UID_BASE", default_value_t = 3_000_000)]
    uid_base: u32,
    /// Extra read-only paths inside the sandbox (colon-separated), e.g. /opt/node.
    #[arg(long, env = "DEVFLEET_QA_RO_BINDS", value_delimiter = ':')]
    ro_binds: Vec<PathBuf>,
    /// PATH inside the sandbox.
    #[arg(long, env = "DEVFLEET_QA_PATH", default_value = devfleet_qa_worker::sandbox::DEFAULT_PATH)]
    path: String,
    /// Where temporary workspaces are created.
    #[arg(long, env = "DEVFLEET_QA_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Longest diagnostics text carried to a fix task, KiB.
    #[arg(long, env = "DEVFLEET_QA_DIAGNOSTICS_KB", default_value_t = 8)]
    diagnostics_kb: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let checks = match &args.checks {
        Some(path) => checks::load(path)?,
        None => checks::default_checks(),
    };
    devfleet_runtime::serve(
        "qa-worker",
        &args.connect,
        |connections, shutdown| async move {
            let mut config = Config::new(connections);
            config.checks = checks;
            config.sandbox.mode = args.sandbox;
            if let Some(n) = args.concurrency {
                config.concurrency = n;
            }
            config.check_timeout = Duration::from_secs(args.check_timeout_secs);
            config.integration_timeout = Duration::from_secs(args.integration_timeout_secs);
            let limits = &mut config.sandbox.limits;
            limits.cpu_seconds = args.cpu_secs;
            limits.memory_bytes = args.memory_mb * 1024 * 1024;
            limits.processes = args.processes;
            limits.file_size_bytes = args.file_size_mb * 1024 * 1024;
            limits.output_bytes = args.output_kb * 1024;
            config.sandbox.uid_base = Some(args.uid_base);
            config.sandbox.extra_ro_binds = args.ro_binds.clone();
            config.sandbox.path = args.path.clone();
            if let Some(dir) = &args.work_dir {
                config.work_dir = dir.clone();
            }
            config.diagnostics_bytes = args.diagnostics_kb * 1024;
            devfleet_qa_worker::run(config, shutdown).await
        },
    )
    .await
}
