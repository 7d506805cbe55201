//! The gateway's flags and environment variables: the one place its
//! settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme).

use crate::{Config, WindowConfig, DEFAULT_ADDR};
use devfleet_runtime::settings::seconds;
use devfleet_runtime::Connections;
use std::net::SocketAddr;
use std::time::Duration;

/// Gateway settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address to serve HTTP and WebSocket on.
    #[arg(long = "addr", env = "DEVFLEET_GATEWAY_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Comma-separated origins allowed to open the WebSocket ("*" for any;
    /// unset: same origin only). Required on a non-loopback address
    /// without a token.
    #[arg(
        long = "origins",
        env = "DEVFLEET_GATEWAY_ORIGINS",
        value_delimiter = ','
    )]
    pub origins: Vec<String>,
    /// Seconds between pings to each client.
    #[arg(long, alias = "ping-interval", env = "DEVFLEET_GATEWAY_PING_INTERVAL_SECONDS", default_value = "30", value_parser = seconds)]
    pub ping_interval_seconds: Duration,
    /// Seconds without a pong after which a client is dropped.
    #[arg(long, alias = "pong-timeout", env = "DEVFLEET_GATEWAY_PONG_TIMEOUT_SECONDS", default_value = "60", value_parser = seconds)]
    pub pong_timeout_seconds: Duration,
    /// Frames queued per client before it is dropped as slow.
    #[arg(long, env = "DEVFLEET_GATEWAY_CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,
    /// Largest frame a client may send, in bytes.
    #[arg(
        long,
        env = "DEVFLEET_GATEWAY_MAX_FRAME_BYTES",
        default_value_t = 65536
    )]
    pub max_frame_bytes: usize,
    /// Most WebSocket connections at once.
    #[arg(
        long,
        env = "DEVFLEET_GATEWAY_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
    /// Seconds of the aggregation window for stats.
    #[arg(long, alias = "window", env = "DEVFLEET_GATEWAY_WINDOW_SECONDS", default_value = "60", value_parser = seconds)]
    pub window_seconds: Duration,
    /// Slices of the window (it slides by one slice).
    #[arg(long, env = "DEVFLEET_GATEWAY_WINDOW_BUCKETS", default_value_t = 12)]
    pub window_buckets: usize,
    /// Sample values kept per slice and field for percentiles.
    #[arg(long, env = "DEVFLEET_GATEWAY_RESERVOIR", default_value_t = 128)]
    pub reservoir: usize,
    /// Most (metric type, field) series aggregated at once.
    #[arg(long, env = "DEVFLEET_GATEWAY_MAX_SERIES", default_value_t = 512)]
    pub max_series: usize,
    /// Seconds between reads of the store and bus.
    #[arg(long, alias = "poll-interval", env = "DEVFLEET_GATEWAY_POLL_INTERVAL_SECONDS", default_value = "2", value_parser = seconds)]
    pub poll_interval_seconds: Duration,
    /// Unfinished plans whose tasks are read each poll.
    #[arg(long, env = "DEVFLEET_GATEWAY_TRACKED_PLANS", default_value_t = 20)]
    pub tracked_plans: usize,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe (checked by
    /// [`Config::validate`] when the gateway runs), without a token: that
    /// comes from the environment ([`Config::with_token_from_env`]), never
    /// from a flag. An empty origin counts as none.
    pub fn into_config(self, connections: Connections) -> Config {
        Config {
            connections,
            addr: self.addr,
            listener: None,
            token: None,
            allowed_origins: self
                .origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            ping_interval: self.ping_interval_seconds,
            pong_timeout: self.pong_timeout_seconds,
            client_queue: self.client_queue,
            max_frame_bytes: self.max_frame_bytes,
            max_connections: self.max_connections,
            window: WindowConfig {
                window: self.window_seconds,
                buckets: self.window_buckets,
                reservoir: self.reservoir,
                max_series: self.max_series,
            },
            poll_interval: self.poll_interval_seconds,
            max_tracked_plans: self.tracked_plans,
            instance: devfleet_runtime::instance_name("metrics-gateway"),
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
        assert_eq!(config.addr.to_string(), DEFAULT_ADDR);
        assert_eq!(config.token, None);
        assert_eq!(config.ping_interval, Duration::from_secs(30));
        assert_eq!(config.pong_timeout, Duration::from_secs(60));
        assert_eq!(config.poll_interval, Duration::from_secs(2));
        let window = config.window;
        assert_eq!(
            (
                window.window,
                window.buckets,
                window.reservoir,
                window.max_series
            ),
            (Duration::from_secs(60), 12, 128, 512)
        );
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn durations_take_seconds_and_old_flag_spellings_still_parse() {
        use clap::Parser as _;
        let cli = Cli::try_parse_from([
            "metrics-gateway",
            "--ping-interval",
            "5",
            "--poll-interval-seconds",
            "0.5",
        ])
        .unwrap();
        assert_eq!(cli.settings.ping_interval_seconds, Duration::from_secs(5));
        assert_eq!(
            cli.settings.poll_interval_seconds,
            Duration::from_millis(500)
        );
        assert!(Cli::try_parse_from(["metrics-gateway", "--window-seconds", "-1"]).is_err());
    }

    #[test]
    fn there_is_no_token_flag() {
        use clap::Parser as _;
        // A flag's value is visible to every user of the host in `ps`.
        assert!(Cli::try_parse_from(["metrics-gateway", "--token", "s3cret"]).is_err());
    }
}
