//! The dev-worker's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme). The binary parses
//! them from flags and environment, `devfleet up` from the environment,
//! and [`crate::Config::new`] takes their defaults.

use crate::executor::breaker::Breaker;
use crate::executor::command::profile::AgentProfile;
use crate::executor::command::sandbox::AgentSandbox;
use crate::executor::command::{CommandExecutor, DEFAULT_OUTPUT_CAP};
use crate::executor::openai::{
    ApiKey, OpenAi, OpenAiSettings, DEFAULT_BASE_URL, DEFAULT_CONTEXT_TOKENS, DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
};
use crate::executor::providers::{self, Defaults, ProvidersFile};
use crate::executor::rate_limit::RateLimiter;
use crate::executor::simulate::{Simulate, SimulateSettings};
use crate::executor::Executors;
use crate::{unique_instance, Config, ScalePolicy};
use anyhow::Context as _;
use devfleet_protocol::ExecutorKind;
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use devfleet_store::{nano_usd, BudgetLimits, SharedStore};
use std::path::PathBuf;
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
    /// Token budget of a plan that sets none (tokens in + out over all its
    /// executor runs); unset: no limit.
    #[arg(long, env = "DEVFLEET_DEV_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: Option<u64>,
    /// Cost budget, US dollars, of a plan that sets none; unset: no limit.
    #[arg(long, env = "DEVFLEET_DEV_DEFAULT_MAX_COST_USD")]
    pub default_max_cost_usd: Option<f64>,
    /// Directory for task workspaces and materialised base snapshots
    /// (default: `devfleet-dev-worker` in the system's temporary directory).
    #[arg(long, env = "DEVFLEET_DEV_WORK_DIR")]
    pub work_dir: Option<std::path::PathBuf>,
    /// Base snapshots kept materialised (least recently used evicted).
    #[arg(long, env = "DEVFLEET_DEV_SNAPSHOT_CACHE_KEEP", default_value_t = 8)]
    pub snapshot_cache_keep: usize,
    /// Operator labels this worker announces as capabilities, e.g. `gpu,eu`
    /// (work whose `requires:` names them runs only on labelled workers).
    #[arg(long, env = "DEVFLEET_DEV_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
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
    /// Agent profile (YAML: command with placeholders, stdin mode, variables,
    /// read-only paths, timeout, usage) for the command executor; see
    /// examples/agents/. Instead of DEVFLEET_COMMAND.
    #[arg(long, env = "DEVFLEET_COMMAND_PROFILE")]
    pub command_profile: Option<PathBuf>,
    /// Worker variables the agent may also see (comma-separated names; the
    /// environment is otherwise cleared).
    #[arg(long, env = "DEVFLEET_COMMAND_ENV", value_delimiter = ',')]
    pub command_env: Vec<String>,
    /// Host paths bound read-only into the agent sandbox (comma-separated),
    /// e.g. where the agent CLI is installed.
    #[arg(long, env = "DEVFLEET_COMMAND_RO_BINDS", value_delimiter = ',')]
    pub command_ro_binds: Vec<PathBuf>,
    /// The bubblewrap program for the agent sandbox (default: `bwrap` on the system PATH).
    #[arg(long, env = "DEVFLEET_COMMAND_BWRAP")]
    pub command_bwrap: Option<PathBuf>,
    /// Run agents without the sandbox when it cannot start (dangerous: the
    /// agent then runs with the worker's files and processes).
    #[arg(long, env = "DEVFLEET_COMMAND_ALLOW_UNSANDBOXED", default_value_t = false, action = clap::ArgAction::Set)]
    pub command_allow_unsandboxed: bool,
    /// Cap on the command's stdout, stderr and output file, in bytes.
    #[arg(long, alias = "command-output-cap", env = "DEVFLEET_COMMAND_OUTPUT_CAP_BYTES", default_value_t = DEFAULT_OUTPUT_CAP)]
    pub command_output_cap_bytes: usize,
    /// Providers file of the openai executor (YAML: providers, models,
    /// prices, limits, fallbacks); replaces the DEVFLEET_OPENAI_BASE_URL,
    /// _MODEL and _API_KEY settings.
    #[arg(long, env = "DEVFLEET_PROVIDERS")]
    pub providers: Option<std::path::PathBuf>,
    /// Window of the providers' rate limits (a minute; shorter in tests).
    #[arg(long, env = "DEVFLEET_RATE_WINDOW_SECONDS", default_value = "60", value_parser = seconds)]
    pub rate_window_seconds: Duration,
    /// Base URL of the OpenAI-compatible API.
    #[arg(long, env = "DEVFLEET_OPENAI_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub openai_base_url: String,
    /// Model name for the openai executor.
    #[arg(long, env = "DEVFLEET_OPENAI_MODEL", default_value = DEFAULT_MODEL)]
    pub openai_model: String,
    /// Prompt budget of the openai executor, in estimated tokens (bytes / 4):
    /// context past it is outlined, then cut.
    #[arg(long, env = "DEVFLEET_OPENAI_CONTEXT_TOKENS", default_value_t = DEFAULT_CONTEXT_TOKENS)]
    pub openai_context_tokens: u64,
    /// Longest completion the openai executor asks for (`max_tokens`).
    #[arg(long, env = "DEVFLEET_OPENAI_MAX_TOKENS", default_value_t = DEFAULT_MAX_TOKENS)]
    pub openai_max_tokens: u32,
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
        let executors = self
            .executors
            .build_with(ApiKey::from_env(), Some(connections.store.clone()))?;
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
            default_budget: BudgetLimits {
                max_tokens: self.default_max_tokens,
                max_cost_nusd: self.default_max_cost_usd.map(nano_usd),
            },
            default_max_cost_usd: self.default_max_cost_usd,
            work_dir: self
                .work_dir
                .unwrap_or_else(|| std::env::temp_dir().join("devfleet-dev-worker")),
            snapshot_cache_keep: self.snapshot_cache_keep.max(1),
            labels: self.labels,
            probe: true,
        }
    }
}

impl ExecutorArgs {
    /// The command executor, when `DEVFLEET_COMMAND_PROFILE` or
    /// `DEVFLEET_COMMAND` is set: sandboxed, or refused with the fix when the
    /// sandbox cannot start and the operator did not opt out.
    pub fn command_executor(&self) -> anyhow::Result<Option<CommandExecutor>> {
        let line = self.command.as_deref().filter(|l| !l.trim().is_empty());
        let command = match (&self.command_profile, line) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both DEVFLEET_COMMAND_PROFILE and DEVFLEET_COMMAND are set: set one (a profile's \
                 `command:` replaces DEVFLEET_COMMAND)"
            ),
            (Some(path), None) => {
                let profile = AgentProfile::load(path)
                    .map_err(anyhow::Error::msg)
                    .context("DEVFLEET_COMMAND_PROFILE")?;
                CommandExecutor::new(profile, self.command_output_cap_bytes)
            }
            (None, Some(line)) => {
                CommandExecutor::from_command_line(line, self.command_output_cap_bytes)
                    .map_err(anyhow::Error::msg)
                    .context("DEVFLEET_COMMAND")?
            }
            (None, None) => return Ok(None),
        };
        let names = self.command_env.iter().map(|n| n.trim().to_owned());
        let command = command.allow_env(names.filter(|n| !n.is_empty()));
        let sandbox = match AgentSandbox::detect(
            self.command_bwrap.as_deref(),
            self.command_ro_binds.clone(),
        ) {
            Ok(sandbox) => Some(sandbox),
            Err(unavailable) if self.command_allow_unsandboxed => {
                tracing::error!(
                    problem = %unavailable.0,
                    "agents will run WITHOUT a sandbox (DEVFLEET_COMMAND_ALLOW_UNSANDBOXED=true): \
                     no filesystem, process or network isolation; only a cleared environment \
                     and the timeout"
                );
                None
            }
            Err(unavailable) => return Err(unavailable.into()),
        };
        Ok(Some(command.sandboxed(sandbox)))
    }

    /// The executors these settings configure. `command` exists when
    /// `DEVFLEET_COMMAND` is set; `openai` when a key is set or the base URL
    /// points somewhere other than OpenAI (local servers need no key).
    pub fn build(&self) -> anyhow::Result<Executors> {
        self.build_with_key(ApiKey::from_env())
    }

    /// [`ExecutorArgs::build`] with the OpenAI key given rather than read.
    pub fn build_with_key(&self, api_key: Option<ApiKey>) -> anyhow::Result<Executors> {
        self.build_with(api_key, None)
    }

    /// [`ExecutorArgs::build_with_key`], with the store through which the
    /// providers' rate limits are shared (`None`: no limits are enforced).
    pub fn build_with(
        &self,
        api_key: Option<ApiKey>,
        store: Option<SharedStore>,
    ) -> anyhow::Result<Executors> {
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
        if let Some(command) = self.command_executor()? {
            executors = executors.with(ExecutorKind::Command, Arc::new(command));
        }
        let base_url = self.openai_base_url.trim_end_matches('/');
        if let Some(path) = &self.providers {
            let file = ProvidersFile::load(path)
                .map_err(anyhow::Error::msg)
                .context("DEVFLEET_PROVIDERS")?;
            let defaults = Defaults {
                context_tokens: self.openai_context_tokens,
                max_tokens: self.openai_max_tokens,
            };
            let (primary, fallback) = file.route().map_err(anyhow::Error::msg)?;
            let build = |target: providers::Target<'_>| {
                let limiter = store.clone().and_then(|store| {
                    RateLimiter::new(
                        store,
                        target.id(),
                        target.model.limits,
                        self.rate_window_seconds,
                    )
                });
                providers::executor(target, defaults, |v| std::env::var(v).ok())
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("DEVFLEET_PROVIDERS={}", path.display()))
                    .map(|e| e.with_limiter(limiter))
            };
            let mut openai = build(primary)?;
            if let Some(store) = store.clone() {
                let fallback = fallback.map(build).transpose()?;
                openai =
                    openai.with_breaker(Breaker::new(store, primary.id(), file.breaker), fallback);
            }
            executors = executors.with(ExecutorKind::Openai, Arc::new(openai));
        } else if api_key.is_some() || base_url != DEFAULT_BASE_URL {
            let openai = OpenAi::new(OpenAiSettings {
                base_url: base_url.to_owned(),
                model: self.openai_model.clone(),
                api_key,
                max_tokens: Some(self.openai_max_tokens),
                ..OpenAiSettings::default()
            })
            .map_err(anyhow::Error::msg)
            .context("configuring the openai executor")?
            .with_context_tokens(self.openai_context_tokens);
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
    fn the_command_executor_is_sandboxed_or_refused_unless_the_operator_opts_out() {
        let cli = Cli::try_parse_from(["dev-worker", "--command", "agent"]).unwrap();
        let command = cli.settings.executors.command_executor().unwrap().unwrap();
        assert!(command.is_sandboxed());
        let broken = [
            "dev-worker",
            "--command",
            "agent",
            "--command-bwrap",
            "/bin/false",
        ];
        let cli = Cli::try_parse_from(broken).unwrap();
        let err = cli.settings.executors.build().err().unwrap().to_string();
        assert!(err.contains("the agent sandbox cannot start"), "{err}");
        assert!(
            err.contains("DEVFLEET_COMMAND_ALLOW_UNSANDBOXED=true"),
            "{err}"
        );
        let opted_out = [&broken[..], &["--command-allow-unsandboxed", "true"]].concat();
        let cli = Cli::try_parse_from(opted_out).unwrap();
        let command = cli.settings.executors.command_executor().unwrap().unwrap();
        assert!(!command.is_sandboxed());
    }

    #[test]
    fn an_command_profile_configures_the_command_executor() {
        let dir = std::env::temp_dir().join(format!("devfleet-profile-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("agent.yaml");
        std::fs::write(
            &path,
            "command: [my-agent, '{prompt_file}']\nenv: [MY_KEY]\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let cli =
            Cli::try_parse_from(["dev-worker", "--command-profile", p, "--command-env", "A,B"])
                .unwrap();
        let command = cli.settings.executors.command_executor().unwrap().unwrap();
        assert_eq!(command.profile().name, "my-agent");
        assert_eq!(command.profile().env, ["MY_KEY", "A", "B"]);
        let both = ["dev-worker", "--command-profile", p, "--command", "x"];
        let err = Cli::try_parse_from(both)
            .unwrap()
            .settings
            .executors
            .build();
        assert!(err.err().unwrap().to_string().contains("set one"));
        std::fs::write(&path, "command: [a, '{nope}']").unwrap();
        let cli = Cli::try_parse_from(["dev-worker", "--command-profile", p]).unwrap();
        let err = format!("{:#}", cli.settings.executors.build().err().unwrap());
        assert!(
            err.contains("DEVFLEET_COMMAND_PROFILE") && err.contains("{nope}"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
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

    #[tokio::test]
    async fn a_providers_file_configures_the_model_its_prices_and_its_key_variable() {
        use devfleet_testkit::openai::{Reply, Rule, ScriptedOpenAi};
        let server = ScriptedOpenAi::start(vec![
            Rule::any().reply(Reply::file("a.py", "A = 1\n").usage(2_000_000, 500_000))
        ])
        .await;
        let dir = std::env::temp_dir().join(format!("devfleet-providers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("providers.yaml");
        std::fs::write(
            &path,
            format!(
                "default: local/coder\nproviders:\n  - name: local\n    base_url: {}\n    \
                 max_tokens: 321\n    models:\n      - name: coder\n        price: \
                 {{ input_per_million: 1.5, output_per_million: 4 }}\n",
                server.base_url()
            ),
        )
        .unwrap();
        let path_arg = path.to_str().unwrap();
        let cli = Cli::try_parse_from(["dev-worker", "--providers", path_arg]).unwrap();
        let executors = cli.settings.executors.build_with_key(None).unwrap();
        let (_, openai) = executors.resolve(Some("openai")).unwrap();
        let out = openai
            .run(&crate::executor::test_input("a.py"))
            .await
            .unwrap();
        assert_eq!(out.text, "A = 1\n");
        let usage = &out.usage[0];
        assert_eq!(
            (usage.provider.as_str(), usage.model.as_str()),
            ("local", "coder")
        );
        assert_eq!((usage.tokens_in, usage.tokens_out), (2_000_000, 500_000));
        assert_eq!(usage.cost_usd, 2.0 * 1.5 + 0.5 * 4.0);
        let request = &server.requests()[0];
        assert_eq!(request.model(), "coder");
        assert_eq!(request.body["max_tokens"], 321);

        std::fs::write(&path, "default: nope\nproviders: []\n").unwrap();
        let cli = Cli::try_parse_from(["dev-worker", "--providers", path_arg]).unwrap();
        let err = format!(
            "{:#}",
            cli.settings.executors.build_with_key(None).err().unwrap()
        );
        assert!(
            err.contains("DEVFLEET_PROVIDERS") && err.contains("provider/model"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
