//! The qa-worker's settings.

use crate::checks::{self, CheckSpec};
use crate::sandbox::{SandboxMode, SandboxSettings};
use devfleet_runtime::Connections;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of the qa-worker service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Name of this worker in metrics and logs.
    pub instance: String,
    /// The checks, by file extension.
    pub checks: Vec<CheckSpec>,
    pub sandbox: SandboxSettings,
    /// Checks and shards run at once.
    pub concurrency: usize,
    /// Wall timeout of one check (unless the check sets its own).
    pub check_timeout: Duration,
    /// Wall timeout of one integration shard (unless the step sets its own).
    pub integration_timeout: Duration,
    /// Where workspaces are created.
    pub work_dir: PathBuf,
    /// Longest diagnostics text put on a QA result (and so on a fix task).
    pub diagnostics_bytes: usize,
    /// On shutdown, how long running checks and shards get to finish;
    /// then they are killed and their deliveries handed back.
    pub shutdown_grace: Duration,
    /// On RabbitMQ, a check or shard still running after this settles its
    /// delivery early, so it does not outlive the broker's
    /// `consumer_timeout` and run twice; keep it below that timeout.
    pub settle_after: Duration,
    /// Deliveries of one message (transient failures) before it is
    /// dead-lettered.
    pub max_handler_attempts: u32,
}

impl Config {
    /// Defaults that work on loopback (those of
    /// [`crate::settings::Settings`], no environment).
    pub fn new(connections: Connections) -> Self {
        crate::settings::Settings::default().config(connections, checks::default_checks())
    }

    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.concurrency >= 1,
            "--concurrency (DEVFLEET_QA_CONCURRENCY) must be at least 1"
        );
        anyhow::ensure!(
            !self.check_timeout.is_zero() && !self.integration_timeout.is_zero(),
            "--check-timeout-seconds (DEVFLEET_QA_CHECK_TIMEOUT_SECONDS) and \
             --integration-timeout-seconds (DEVFLEET_QA_INTEGRATION_TIMEOUT_SECONDS) must be positive"
        );
        anyhow::ensure!(
            self.sandbox.mode != SandboxMode::None || self.sandbox.allow_unsandboxed,
            "--sandbox none (DEVFLEET_QA_SANDBOX=none) runs checks of generated code without \
             isolation; set --allow-unsandboxed (DEVFLEET_QA_ALLOW_UNSANDBOXED=true) to confirm"
        );
        for c in &self.checks {
            checks::validate(c)?;
        }
        Ok(())
    }
}
