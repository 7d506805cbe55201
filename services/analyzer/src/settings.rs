//! The analyzer service's flags and environment variables: the one place
//! its settings and their defaults are written (see
//! `devfleet_runtime::settings` for the naming scheme).

use crate::service::Config;
use devfleet_runtime::Connections;

/// Analyzer settings (everything but the connections).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Plans analysed at once.
    #[arg(long, env = "DEVFLEET_ANALYZER_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u16,
}

devfleet_runtime::default_settings!(Settings);

impl Settings {
    /// The service configuration these settings describe.
    pub fn into_config(self, connections: Connections) -> Config {
        Config {
            connections,
            concurrency: self.concurrency.max(1),
            max_attempts: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::new(Connections::in_memory());
        assert_eq!(config.concurrency, 2);
    }
}
