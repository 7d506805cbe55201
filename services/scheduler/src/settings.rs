//! The scheduler's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme).

use crate::Config;
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use std::time::Duration;

/// Scheduler settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Complete task.built and fail task.failed here, without QA or retries.
    /// Only for setups that run no router; never together with one.
    #[arg(long, env = "DEVFLEET_SCHEDULER_DIRECT_ROUTING", default_value_t = false, action = clap::ArgAction::Set)]
    pub direct_routing: bool,
    /// Seconds a dispatched task may wait for a worker before it is Ready again.
    #[arg(long, env = "DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS", default_value = "30", value_parser = seconds)]
    pub dispatch_lease_seconds: Duration,
    /// Seconds between re-reads of worker capacity while work waits for slots.
    #[arg(long, env = "DEVFLEET_SCHEDULER_DISPATCH_TICK_SECONDS", default_value = "0.02", value_parser = seconds)]
    pub dispatch_tick_seconds: Duration,
    /// Seconds between returns of expired leases to Ready.
    #[arg(long, env = "DEVFLEET_SCHEDULER_REAP_INTERVAL_SECONDS", default_value = "1", value_parser = seconds)]
    pub reap_interval_seconds: Duration,
    /// Seconds between the watchdog's looks for stranded work.
    #[arg(long, env = "DEVFLEET_SCHEDULER_WATCHDOG_INTERVAL_SECONDS", default_value = "30", value_parser = seconds)]
    pub watchdog_interval_seconds: Duration,
    /// Seconds a task may stay Built, or a plan in a stage, with nothing
    /// happening before the watchdog announces it again (more than the
    /// longest QA run of a task and the longest integration shard).
    #[arg(long, env = "DEVFLEET_SCHEDULER_WATCHDOG_STALL_SECONDS", default_value = "1800", value_parser = seconds)]
    pub watchdog_stall_seconds: Duration,
    /// Seconds finished plans (with their records), cache entries and
    /// unreferenced artifacts are kept; 0 keeps them for ever.
    #[arg(long, env = "DEVFLEET_SCHEDULER_RETENTION_SECONDS", default_value = "604800", value_parser = seconds)]
    pub retention_seconds: Duration,
    /// Seconds between retention runs.
    #[arg(long, env = "DEVFLEET_SCHEDULER_RETENTION_INTERVAL_SECONDS", default_value = "3600", value_parser = seconds)]
    pub retention_interval_seconds: Duration,
    /// Seconds a task whose requirements (`requires:`, its executor) no
    /// live dev-worker meets waits for one before it fails.
    #[arg(long, env = "DEVFLEET_SCHEDULER_CAPABILITY_WAIT_SECONDS", default_value = "600", value_parser = seconds)]
    pub capability_wait_seconds: Duration,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe (checked by
    /// [`Config::validate`] when the service runs).
    pub fn into_config(self, connections: Connections) -> Config {
        Config {
            connections,
            instance: devfleet_runtime::instance_name("scheduler"),
            direct_routing: self.direct_routing,
            dispatch_lease: self.dispatch_lease_seconds,
            dispatch_tick: self.dispatch_tick_seconds,
            idle_tick: Duration::from_millis(250),
            reap_interval: self.reap_interval_seconds,
            watchdog_interval: self.watchdog_interval_seconds,
            watchdog_stall: self.watchdog_stall_seconds,
            retention: (!self.retention_seconds.is_zero()).then_some(self.retention_seconds),
            retention_interval: self.retention_interval_seconds,
            capability_wait: self.capability_wait_seconds,
            handler_concurrency: 16,
            max_handler_attempts: 50,
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
        assert!(!config.direct_routing);
        assert_eq!(config.dispatch_lease, Duration::from_secs(30));
        assert_eq!(config.dispatch_tick, Duration::from_millis(20));
        assert_eq!(config.reap_interval, Duration::from_secs(1));
        assert_eq!(config.watchdog_interval, Duration::from_secs(30));
        assert_eq!(config.watchdog_stall, Duration::from_secs(1800));
        assert_eq!(config.retention, Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(config.retention_interval, Duration::from_secs(3600));
    }
}
