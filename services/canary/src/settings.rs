//! The canary's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme).

use crate::egress::AllowList;
use crate::profile::Profiles;
use crate::Config;
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Canary settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Lease owner name; unique among live replicas [default: canary@HOST-PID].
    #[arg(long, env = "DEVFLEET_CANARY_INSTANCE")]
    pub instance: Option<String>,
    /// Seconds between scans for deployments nobody drives.
    #[arg(long, env = "DEVFLEET_CANARY_SCAN_SECONDS", default_value = "2", value_parser = seconds)]
    pub scan_seconds: Duration,
    /// Seconds a deployment lease lasts; renewed every third of it.
    #[arg(long, env = "DEVFLEET_CANARY_LEASE_SECONDS", default_value = "15", value_parser = seconds)]
    pub lease_seconds: Duration,
    /// Failed health reads in a row before an automatic rollback.
    #[arg(long, env = "DEVFLEET_CANARY_FAILURE_LIMIT", default_value_t = 3)]
    pub failure_limit: u32,
    /// Checks in a row a stage may hold (degraded or no traffic) before an
    /// automatic rollback; 0 holds for ever.
    #[arg(long, env = "DEVFLEET_CANARY_HOLD_LIMIT", default_value_t = 0)]
    pub hold_limit: u32,
    /// Seconds a shift or rollback handler may run.
    #[arg(long, env = "DEVFLEET_CANARY_HANDLER_TIMEOUT_SECONDS", default_value = "60", value_parser = seconds)]
    pub handler_timeout_seconds: Duration,
    /// Tries of the shift handler before rolling back.
    #[arg(long, env = "DEVFLEET_CANARY_HANDLER_ATTEMPTS", default_value_t = 3)]
    pub handler_attempts: u32,
    /// Seconds one health read may take (capped at the check interval).
    #[arg(long, env = "DEVFLEET_CANARY_HEALTH_TIMEOUT_SECONDS", default_value = "10", value_parser = seconds)]
    pub health_timeout_seconds: Duration,
    /// Health checks kept per deployment.
    #[arg(long, env = "DEVFLEET_CANARY_HISTORY", default_value_t = 200)]
    pub history: usize,
    /// Seconds a finished deployment's record is kept.
    #[arg(long, env = "DEVFLEET_CANARY_RETAIN_SECONDS", default_value = "604800", value_parser = seconds)]
    pub retain_seconds: Duration,
    /// Seconds between looks for an operator's rollback request.
    #[arg(long, env = "DEVFLEET_CANARY_CONTROL_POLL_SECONDS", default_value = "1", value_parser = seconds)]
    pub control_poll_seconds: Duration,
    /// YAML file of the handler profiles plans may name (operator-owned:
    /// the programs and webhooks that shift traffic) [default: none, so
    /// every deployment fails naming this setting].
    #[arg(long, env = "DEVFLEET_CANARY_PROFILES")]
    pub profiles: Option<PathBuf>,
    /// Comma-separated IP networks (`10.0.0.0/8,::1/128`) that plans'
    /// health and Prometheus URLs may connect to, checked on the resolved
    /// address and every redirect [default: none].
    #[arg(long, env = "DEVFLEET_CANARY_ALLOWED_NETWORKS", default_value = "")]
    pub allowed_networks: AllowList,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe (checked by
    /// [`Config::validate`] when the service runs); reads the profile file.
    pub fn into_config(self, connections: Connections) -> anyhow::Result<Config> {
        let profiles = match &self.profiles {
            Some(path) => Profiles::load(path)?,
            None => Profiles::default(),
        };
        Ok(self.config_with(connections, profiles))
    }

    /// The configuration of settings that name no file (the defaults).
    pub(crate) fn defaults_config(self, connections: Connections) -> Config {
        self.config_with(connections, Profiles::default())
    }

    fn config_with(self, connections: Connections, profiles: Profiles) -> Config {
        Config {
            connections,
            instance: self
                .instance
                .unwrap_or_else(|| devfleet_runtime::instance_name("canary")),
            scan_interval: self.scan_seconds,
            lease_ttl: self.lease_seconds,
            failure_limit: self.failure_limit,
            hold_limit: self.hold_limit,
            handler_timeout: self.handler_timeout_seconds,
            handler_attempts: self.handler_attempts,
            health_timeout: self.health_timeout_seconds,
            history_limit: self.history,
            retain: self.retain_seconds,
            control_poll: self.control_poll_seconds,
            max_attempts: 10,
            profiles: Arc::new(profiles),
            allowed_networks: self.allowed_networks,
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
        assert_eq!(config.scan_interval, Duration::from_secs(2));
        assert_eq!(config.lease_ttl, Duration::from_secs(15));
        assert_eq!(config.retain, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.history_limit, 200);
    }
}
