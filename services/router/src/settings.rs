//! The router's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme).

use crate::{BreakerSettings, Config};
use devfleet_runtime::backoff::Backoff;
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use std::time::Duration;

/// Router settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// The failure (counted across retries and fixes) that dead-letters a task.
    #[arg(long, env = "DEVFLEET_ROUTER_MAX_FAILURES", default_value_t = 3)]
    pub max_failures: u32,
    /// Seconds before the first retry.
    #[arg(long, env = "DEVFLEET_ROUTER_RETRY_BASE_SECONDS", default_value = "1", value_parser = seconds)]
    pub retry_base_seconds: Duration,
    /// Growth of the delay per failure.
    #[arg(long, env = "DEVFLEET_ROUTER_RETRY_FACTOR", default_value_t = 2.0)]
    pub retry_factor: f64,
    /// Longest retry delay, in seconds.
    #[arg(long, env = "DEVFLEET_ROUTER_RETRY_CAP_SECONDS", default_value = "60", value_parser = seconds)]
    pub retry_cap_seconds: Duration,
    /// Share of the delay that is random (0 = none, 0.5 = up to half shorter).
    #[arg(long, env = "DEVFLEET_ROUTER_RETRY_JITTER", default_value_t = 0.5)]
    pub retry_jitter: f64,
    /// Seconds past its retry delay the router holds a failed task.
    #[arg(long, env = "DEVFLEET_ROUTER_RETRY_LEASE_GRACE_SECONDS", default_value = "30", value_parser = seconds)]
    pub retry_lease_grace_seconds: Duration,
    /// Sliding window of the circuit breakers, in seconds.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_WINDOW_SECONDS", default_value = "60", value_parser = seconds)]
    pub breaker_window_seconds: Duration,
    /// Granularity of the breaker window, in seconds.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_BUCKET_SECONDS", default_value = "5", value_parser = seconds)]
    pub breaker_bucket_seconds: Duration,
    /// Outcomes the window must hold before its error rate can open a breaker.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_MIN_VOLUME", default_value_t = 10)]
    pub breaker_min_volume: u64,
    /// Error share above which a breaker opens.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_THRESHOLD", default_value_t = 0.5)]
    pub breaker_threshold: f64,
    /// Seconds a breaker stays open before probes are let through.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_COOLDOWN_SECONDS", default_value = "30", value_parser = seconds)]
    pub breaker_cooldown_seconds: Duration,
    /// Dispatches let through while half-open.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_PROBES", default_value_t = 2)]
    pub breaker_probes: u32,
    /// Seconds between looks at breaker timers and parked QA work.
    #[arg(long, env = "DEVFLEET_ROUTER_BREAKER_TICK_SECONDS", default_value = "0.25", value_parser = seconds)]
    pub breaker_tick_seconds: Duration,
    /// Handlers in flight per consumed queue.
    #[arg(long, env = "DEVFLEET_ROUTER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Index the bus dead-letter queue into the store (`devfleet dlq list`).
    #[arg(long, env = "DEVFLEET_ROUTER_INDEX_BUS_DLQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub index_bus_dlq: bool,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe (checked by
    /// [`Config::validate`] when the service runs).
    pub fn into_config(self, connections: Connections) -> Config {
        Config {
            connections,
            instance: devfleet_runtime::instance_name("router"),
            backoff: Backoff {
                base: self.retry_base_seconds,
                factor: self.retry_factor,
                cap: self.retry_cap_seconds,
                jitter: self.retry_jitter,
            },
            max_failures: self.max_failures,
            retry_lease_grace: self.retry_lease_grace_seconds,
            breaker: BreakerSettings {
                window: self.breaker_window_seconds,
                bucket: self.breaker_bucket_seconds,
                min_volume: self.breaker_min_volume,
                threshold: self.breaker_threshold,
                cooldown: self.breaker_cooldown_seconds,
                probes: self.breaker_probes,
            },
            breaker_tick: self.breaker_tick_seconds,
            handler_concurrency: self.concurrency,
            max_handler_attempts: 20,
            index_bus_dlq: self.index_bus_dlq,
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
        assert_eq!(config.max_failures, 3);
        assert_eq!(config.backoff.base, Duration::from_secs(1));
        assert_eq!(config.backoff.cap, Duration::from_secs(60));
        assert_eq!(config.retry_lease_grace, Duration::from_secs(30));
        // The breaker's defaults agree with the breaker's own.
        assert_eq!(config.breaker, BreakerSettings::default());
        assert_eq!(config.breaker_tick, Duration::from_millis(250));
        assert!(config.index_bus_dlq);
    }
}
