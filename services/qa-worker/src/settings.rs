//! The qa-worker's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme).

use crate::checks::{self, CheckSpec};
use crate::sandbox::{Limits, SandboxMode, SandboxSettings, DEFAULT_PATH};
use crate::Config;
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use std::path::PathBuf;
use std::time::Duration;

/// QA worker settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Check configuration (YAML or JSON); replaces the default checks.
    #[arg(long, env = "DEVFLEET_QA_CHECKS")]
    pub checks: Option<PathBuf>,
    /// Isolation: auto (bubblewrap; without it, refuse unless
    /// --allow-unsandboxed), bwrap (required) or none (needs --allow-unsandboxed).
    #[arg(long, env = "DEVFLEET_QA_SANDBOX", value_enum, default_value = "auto")]
    pub sandbox: SandboxMode,
    /// DANGEROUS: run checks of generated code without a sandbox when
    /// bubblewrap cannot start (no filesystem or network isolation).
    #[arg(long, env = "DEVFLEET_QA_ALLOW_UNSANDBOXED", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_unsandboxed: bool,
    /// The bubblewrap program [default: bwrap on the system PATH].
    #[arg(long, env = "DEVFLEET_QA_BWRAP")]
    pub bwrap: Option<PathBuf>,
    /// On shutdown, how long running checks and shards get to finish before
    /// they are killed and their work handed back, in seconds.
    #[arg(long, env = "DEVFLEET_QA_SHUTDOWN_GRACE_SECONDS", default_value = "30", value_parser = seconds)]
    pub shutdown_grace_seconds: Duration,
    /// On RabbitMQ, a check or shard still running after this many seconds
    /// settles its delivery early (the watchdog redoes it if this worker
    /// dies); keep it below the broker's consumer_timeout (30 min default).
    #[arg(long, env = "DEVFLEET_QA_SETTLE_AFTER_SECONDS", default_value = "300", value_parser = seconds)]
    pub settle_after_seconds: Duration,
    /// Checks and integration shards run at once [default: CPUs, 2..8].
    #[arg(long, env = "DEVFLEET_QA_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Wall timeout of one check, in seconds.
    #[arg(long, alias = "check-timeout-secs", env = "DEVFLEET_QA_CHECK_TIMEOUT_SECONDS", default_value = "60", value_parser = seconds)]
    pub check_timeout_seconds: Duration,
    /// Wall timeout of one integration shard, in seconds (a step's
    /// `timeout_seconds` wins).
    #[arg(long, alias = "integration-timeout-secs", env = "DEVFLEET_QA_INTEGRATION_TIMEOUT_SECONDS", default_value = "600", value_parser = seconds)]
    pub integration_timeout_seconds: Duration,
    /// CPU time limit per process, whole seconds.
    #[arg(
        long,
        alias = "cpu-secs",
        env = "DEVFLEET_QA_CPU_SECONDS",
        default_value_t = 60
    )]
    pub cpu_seconds: u64,
    /// Address-space limit per process, MiB.
    #[arg(long, env = "DEVFLEET_QA_MEMORY_MB", default_value_t = 2048)]
    pub memory_mb: u64,
    /// Process limit per sandbox (when running as root: per-slot uids).
    #[arg(long, env = "DEVFLEET_QA_PROCESSES", default_value_t = 64)]
    pub processes: u64,
    /// Largest file a check may write, MiB.
    #[arg(long, env = "DEVFLEET_QA_FILE_SIZE_MB", default_value_t = 64)]
    pub file_size_mb: u64,
    /// Output kept per stream of a check, KiB.
    #[arg(long, env = "DEVFLEET_QA_OUTPUT_KB", default_value_t = 64)]
    pub output_kb: usize,
    /// First uid of the per-slot sandbox users when running as root.
    #[arg(long, env = "DEVFLEET_QA_UID_BASE", default_value_t = 3_000_000)]
    pub uid_base: u32,
    /// Extra read-only paths inside the sandbox (colon-separated), e.g. /opt/node.
    #[arg(long, env = "DEVFLEET_QA_RO_BINDS", value_delimiter = ':')]
    pub ro_binds: Vec<PathBuf>,
    /// PATH inside the sandbox.
    #[arg(long, env = "DEVFLEET_QA_PATH", default_value = DEFAULT_PATH)]
    pub path: String,
    /// Where temporary workspaces are created [default: the system temp dir].
    #[arg(long, env = "DEVFLEET_QA_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Longest diagnostics text carried to a fix task, KiB.
    #[arg(long, env = "DEVFLEET_QA_DIAGNOSTICS_KB", default_value_t = 8)]
    pub diagnostics_kb: usize,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe, reading the
    /// check file when one is named (checked by [`Config::validate`] when
    /// the service runs).
    pub fn into_config(self, connections: Connections) -> anyhow::Result<Config> {
        let checks = match &self.checks {
            Some(path) => checks::load(path)?,
            None => checks::default_checks(),
        };
        Ok(self.config(connections, checks))
    }

    /// The mapping from settings to configuration, given the checks.
    pub(crate) fn config(self, connections: Connections, checks: Vec<CheckSpec>) -> Config {
        const KIB: usize = 1024;
        const MIB: u64 = 1024 * 1024;
        Config {
            connections,
            instance: devfleet_runtime::instance_name("qa-worker"),
            checks,
            sandbox: SandboxSettings {
                mode: self.sandbox,
                limits: Limits {
                    cpu_seconds: self.cpu_seconds,
                    memory_bytes: self.memory_mb.saturating_mul(MIB),
                    processes: self.processes,
                    file_size_bytes: self.file_size_mb.saturating_mul(MIB),
                    output_bytes: self.output_kb.saturating_mul(KIB),
                    ..Limits::default()
                },
                uid_base: Some(self.uid_base),
                extra_ro_binds: self.ro_binds,
                path: self.path,
                bwrap: self.bwrap,
                allow_unsandboxed: self.allow_unsandboxed,
            },
            shutdown_grace: self.shutdown_grace_seconds,
            settle_after: self.settle_after_seconds,
            concurrency: self.concurrency.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .clamp(2, 8)
            }),
            check_timeout: self.check_timeout_seconds,
            integration_timeout: self.integration_timeout_seconds,
            work_dir: self.work_dir.unwrap_or_else(std::env::temp_dir),
            diagnostics_bytes: self.diagnostics_kb.saturating_mul(KIB),
            max_handler_attempts: 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_documented_ones() {
        let config = Config::new(Connections::in_memory());
        config.validate().unwrap();
        assert_eq!(config.sandbox, SandboxSettings::default());
        assert_eq!(config.check_timeout, Duration::from_secs(60));
        assert_eq!(config.integration_timeout, Duration::from_secs(600));
        assert_eq!(config.diagnostics_bytes, 8 * 1024);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert!(!config.sandbox.allow_unsandboxed, "fails closed by default");
        assert!((2..=8).contains(&config.concurrency));
    }
}
