//! The dev-worker's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme). The binary parses
//! them from flags and environment, `devfleet up` from the environment,
//! and [`crate::Config::new`] takes their defaults.

use crate::executor::command::{CommandExecutor, DEFAULT_OUTPUT_CAP};
use crate::executor::openai::{ApiKey, OpenAi, OpenAiSettings, DEFAULT_BASE_URL, DEFAULT_MODEL};
use crate::executor::simulate::{Simulate, SimulateSettings};
use crate::executor::Executors;
use crate::{unique_instance, Config, ScalePolicy};
use anyhow::Context as _;
use devfleet_protocol::ExecutorKind;
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use std::sync::Arc;
use std::time::Duration;

/// Dev-worker settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Name of this worker (lease owner); default `dev-worker@HOST-PID-RANDOM`.
    #[arg(long, env = "DEVFLEET_DEV_INSTANCE")]
    pub instance: Option<String>,
    /// Fewest concurrent tasks.
    #[arg(long, env = "DEVFLEET_DEV_MIN_SLOTS", default_value_t = 2)]
    pub min_slots: u32,
    /// Most concurrent tasks (also the prefetch).
    #[arg(long, env = "DEVFLEET_DEV_MAX_SLOTS", default_value_t = 10)]
    pub max_slots: u32,
    /// Ticks of backlog beyond free slots before scaling up.
    #[arg(long, env = "DEVFLEET_DEV_SCALE_UP_TICKS", default_value_t = 2)]
    pub scale_up_ticks: u32,
    /// Idle ticks before scaling down by one slot.
    #[arg(long, env = "DEVFLEET_DEV_SCALE_DOWN_TICKS", default_value_t = 10)]
    pub scale_down_ticks: u32,
    /// Seconds between autoscaling observations.
    #[arg(long, env = "DEVFLEET_DEV_SCALE_TICK_SECONDS", default_value = "1", value_parser = seconds)]
    pub scale_tick_seconds: Duration,
    /// Seconds a lease on a claimed task lasts (renewed every third of it).
    #[arg(long, env = "DEVFLEET_DEV_LEASE_SECONDS", default_value = "30", value_parser = seconds)]
    pub lease_seconds: Duration,
    /// Longest one executor run may take, in seconds.
    #[arg(long, alias = "exec-timeout-secs", env = "DEVFLEET_DEV_EXEC_TIMEOUT_SECONDS", default_value = "600", value_parser = seconds)]
    pub exec_timeout_seconds: Duration,
    /// Seconds running tasks get to finish on shutdown.
    #[arg(long, alias = "shutdown-grace-secs", env = "DEVFLEET_DEV_SHUTDOWN_GRACE_SECONDS", default_value = "30", value_parser = seconds)]
    pub shutdown_grace_seconds: Duration,
    /// Lifetime of the capacity record in the store, in seconds.
    #[arg(long, env = "DEVFLEET_DEV_HEARTBEAT_TTL_SECONDS", default_value = "10", value_parser = seconds)]
    pub heartbeat_ttl_seconds: Duration,
    /// Use the result cache.
    #[arg(long, env = "DEVFLEET_DEV_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache: bool,
    /// Mixed into every cache key; change it to stop reusing cached results.
    #[arg(long, env = "DEVFLEET_DEV_CACHE_SALT", default_value = "")]
    pub cache_salt: String,
    #[command(flatten)]
    pub executors: ExecutorArgs,
}

/// Executor settings. The OpenAI key is read from `DEVFLEET_OPENAI_API_KEY`
/// or `OPENAI_API_KEY` only, never from a flag (flags show in `ps`).
#[derive(Debug, Clone, clap::Args)]
pub struct ExecutorArgs {
    /// Executor for tasks whose plan names none: builtin, command, openai or simulate.
    #[arg(
        long = "executor",
        value_name = "KIND",
        env = "DEVFLEET_EXECUTOR",
        default_value = "builtin"
    )]
    pub default: ExecutorKind,
    /// Agent command line for the command executor (split like a shell, run without one).
    #[arg(long, env = "DEVFLEET_COMMAND")]
    pub command: Option<String>,
    /// Cap on the command's stdout, stderr and output file, in bytes.
    #[arg(long, alias = "command-output-cap", env = "DEVFLEET_COMMAND_OUTPUT_CAP_BYTES", default_value_t = DEFAULT_OUTPUT_CAP)]
    pub command_output_cap_bytes: usize,
    /// Base URL of the OpenAI-compatible API.
    #[arg(long, env = "DEVFLEET_OPENAI_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub openai_base_url: String,
    /// Model name for the openai executor.
    #[arg(long, env = "DEVFLEET_OPENAI_MODEL", default_value = DEFAULT_MODEL)]
    pub openai_model: String,
    /// Simulated seconds per unit of a task's estimate.
    #[arg(long, env = "DEVFLEET_SIMULATE_UNIT_SECONDS", default_value = "0.1", value_parser = seconds)]
    pub simulate_unit_seconds: Duration,
    /// Probability that a simulated attempt fails.
    #[arg(long, env = "DEVFLEET_SIMULATE_FAIL_RATE", default_value_t = 0.0)]
    pub simulate_fail_rate: f64,
    /// Attempts that always fail, e.g. `1,2`.
    #[arg(long, env = "DEVFLEET_SIMULATE_FAIL_ATTEMPTS", value_delimiter = ',')]
    pub simulate_fail_attempts: Vec<u32>,
    /// Seed of the simulated failure draw.
    #[arg(long, env = "DEVFLEET_SIMULATE_SEED", default_value_t = 0)]
    pub simulate_seed: u64,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe, with the
    /// executors they configure (the OpenAI key from the environment);
    /// checked by [`Config::validate`] when the service runs. Errors name
    /// the variable.
    pub fn into_config(self, connections: Connections) -> anyhow::Result<Config> {
        let executors = self.executors.build()?;
        Ok(self.config(connections, executors))
    }

    /// The mapping from settings to configuration, given the executors.
    pub(crate) fn config(self, connections: Connections, executors: Executors) -> Config {
        Config {
            connections,
            instance: self.instance.unwrap_or_else(unique_instance),
            executors,
            scale: ScalePolicy {
                min: self.min_slots,
                max: self.max_slots,
                up_after: self.scale_up_ticks,
                down_after: self.scale_down_ticks,
                tick: self.scale_tick_seconds,
            },
            lease: self.lease_seconds,
            exec_timeout: self.exec_timeout_seconds,
            shutdown_grace: self.shutdown_grace_seconds,
            heartbeat_ttl: self.heartbeat_ttl_seconds,
            cache: self.cache,
            cache_salt: self.cache_salt,
        }
    }
}

impl ExecutorArgs {
    /// The executors these settings configure. `command` exists when
    /// `DEVFLEET_COMMAND` is set; `openai` when a key is set or the base URL
    /// points somewhere other than OpenAI (local servers need no key).
    pub fn build(&self) -> anyhow::Result<Executors> {
        self.build_with_key(ApiKey::from_env())
    }

    /// [`ExecutorArgs::build`] with the OpenAI key given rather than read.
    pub fn build_with_key(&self, api_key: Option<ApiKey>) -> anyhow::Result<Executors> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.simulate_fail_rate),
            "DEVFLEET_SIMULATE_FAIL_RATE must lie in 0..=1, got {}",
            self.simulate_fail_rate
        );
        let mut executors = Executors::new(self.default).with(
            ExecutorKind::Simulate,
            Arc::new(Simulate::new(SimulateSettings {
                unit: self.simulate_unit_seconds,
                fail_rate: self.simulate_fail_rate,
                fail_attempts: self.simulate_fail_attempts.clone(),
                seed: self.simulate_seed,
            })),
        );
        if let Some(line) = self.command.as_deref().filter(|l| !l.trim().is_empty()) {
            let command = CommandExecutor::from_command_line(line, self.command_output_cap_bytes)
                .map_err(anyhow::Error::msg)
                .context("DEVFLEET_COMMAND")?;
            executors = executors.with(ExecutorKind::Command, Arc::new(command));
        }
        let base_url = self.openai_base_url.trim_end_matches('/');
        if api_key.is_some() || base_url != DEFAULT_BASE_URL {
            let openai = OpenAi::new(OpenAiSettings {
                base_url: base_url.to_owned(),
                model: self.openai_model.clone(),
                api_key,
                ..OpenAiSettings::default()
            })
            .map_err(anyhow::Error::msg)
            .context("configuring the openai executor")?;
            executors = executors.with(ExecutorKind::Openai, Arc::new(openai));
        }
        // The default must be runnable, or every plan without an executor fails.
        executors
            .resolve(None)
            .map_err(|e| anyhow::anyhow!("DEVFLEET_EXECUTOR={}: {e}", self.default.as_str()))?;
        Ok(executors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn flags_build_a_config() {
        let cli = Cli::try_parse_from([
            "dev-worker",
            "--min-slots",
            "1",
            "--max-slots",
            "1",
            "--executor",
            "simulate",
            "--simulate-fail-attempts",
            "1,3",
            "--command",
            "agent --x 'a b'",
        ])
        .unwrap();
        assert_eq!(cli.settings.executors.simulate_fail_attempts, vec![1, 3]);
        let executors = cli.settings.executors.build().unwrap();
        assert_eq!(executors.default_kind(), ExecutorKind::Simulate);
        assert!(executors.resolve(Some("command")).is_ok());
    }

    #[test]
    fn a_default_executor_that_cannot_run_is_refused_at_start() {
        let cli = Cli::try_parse_from(["dev-worker", "--executor", "command"]).unwrap();
        let err = cli.settings.executors.build().err().unwrap().to_string();
        assert!(
            err.contains("DEVFLEET_EXECUTOR") && err.contains("DEVFLEET_COMMAND"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cli = Cli::try_parse_from(["dev-worker", "--simulate-fail-rate", "2"]).unwrap();
        let err = cli.settings.executors.build().err().unwrap().to_string();
        assert!(err.contains("DEVFLEET_SIMULATE_FAIL_RATE"), "{err}");
        assert!(Cli::try_parse_from(["dev-worker", "--executor", "gpt"]).is_err());
    }

    #[test]
    fn defaults_are_valid_and_the_documented_ones() {
        let config = Config::new(Connections::in_memory());
        config.validate().unwrap();
        assert_eq!(config.scale, ScalePolicy::default());
        assert_eq!(config.lease, Duration::from_secs(30));
        assert_eq!(config.exec_timeout, Duration::from_secs(600));
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.heartbeat_ttl, Duration::from_secs(10));
        assert!(config.cache);
        assert_eq!(config.executors.default_kind(), ExecutorKind::Builtin);
    }
}
