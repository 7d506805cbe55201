//! The canary service: progressive rollout with measured health and
//! automatic rollback.
//!
//! A deployment starts from a `deploy.requested` message (published by the
//! scheduler once integration passed, or by `devfleet canary start`). The
//! intake records it in the store and acks; then one replica takes a lease
//! on it and drives it: shift traffic to each stage's weight through the
//! shift handler, read health every check interval, hold while degraded,
//! advance when the stage's time is up and the last check was healthy,
//! promote after the last stage, and roll back through the rollback
//! handler when a check is unhealthy, health reads keep failing, or an
//! operator asks (`devfleet canary rollback ID`).
//!
//! Guarantees:
//! * Every deployment runs in its own task; they do not wait on each other.
//! * The record in the store (kv collection `canary`) is rewritten at every
//!   transition and check before the next effect, so a replica that dies is
//!   replaced by another (or by itself restarted) that resumes the
//!   deployment at its stage with the time already watched in it.
//! * At most one replica drives a deployment at a time (see [`lease`]).
//! * Handlers may be called again with the same weight after a crash, so
//!   they must be idempotent ("set the weight to N", not "add N").
//!
//! See `docs/CANARY.md` for the operator's view.

use devfleet_runtime::Connections;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub mod classify;
pub mod control;
mod driver;
pub mod egress;
pub mod handler;
pub mod health;
mod intake;
pub mod lease;
pub mod profile;
pub mod record;
pub mod request;
pub mod settings;
mod supervisor;
mod tree;

pub use control::{request_rollback, ControlError};
pub use egress::AllowList;
pub use profile::Profiles;
pub use record::{Classification, DeploymentRecord, HealthCheck, Status};
pub use request::{parse_start_file, validate_request, RequestError, StartFile};

/// Settings of the canary service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Lease owner and metrics source; must be unique among live replicas
    /// (the default, `canary@host-pid`, is).
    pub instance: String,
    /// How often a replica looks for deployments nobody drives (new ones,
    /// or ones whose replica died). New deployments accepted by this
    /// replica are picked up at once.
    pub scan_interval: Duration,
    /// Lifetime of a deployment lease; renewed every third of it. A dead
    /// replica's deployments are taken over after at most this long plus
    /// one scan interval.
    pub lease_ttl: Duration,
    /// Health reads in a row that may fail before an automatic rollback.
    pub failure_limit: u32,
    /// Checks in a row that may hold a stage (degraded or no traffic)
    /// before an automatic rollback; 0 holds for ever.
    pub hold_limit: u32,
    /// Longest a shift or rollback handler may run (a command is killed).
    pub handler_timeout: Duration,
    /// Tries of a shift handler before the deployment is rolled back. The
    /// rollback handler is retried until it succeeds.
    pub handler_attempts: u32,
    /// Longest one health read may take (never longer than the check
    /// interval).
    pub health_timeout: Duration,
    /// Health checks kept in each deployment's history.
    pub history_limit: usize,
    /// How long a finished deployment's record is kept; its id can be used
    /// again after that.
    pub retain: Duration,
    /// How often a driven deployment looks for an operator request.
    pub control_poll: Duration,
    /// Deliveries of one `deploy.requested` message that fail on the store
    /// before it is dead-lettered.
    pub max_attempts: u32,
    /// The handler profiles plans may name (operator-owned).
    pub profiles: Arc<Profiles>,
    /// Networks plans' health URLs may connect to.
    pub allowed_networks: AllowList,
}

impl Config {
    /// Defaults for a service on `connections` (those of
    /// [`settings::Settings`], no environment).
    pub fn new(connections: Connections) -> Self {
        settings::Settings::default().defaults_config(connections)
    }

    /// Checks the settings; errors name the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            (
                "scan interval (DEVFLEET_CANARY_SCAN_SECONDS)",
                self.scan_interval,
            ),
            ("lease TTL (DEVFLEET_CANARY_LEASE_SECONDS)", self.lease_ttl),
            (
                "handler timeout (DEVFLEET_CANARY_HANDLER_TIMEOUT_SECONDS)",
                self.handler_timeout,
            ),
            (
                "health timeout (DEVFLEET_CANARY_HEALTH_TIMEOUT_SECONDS)",
                self.health_timeout,
            ),
            (
                "control poll (DEVFLEET_CANARY_CONTROL_POLL_SECONDS)",
                self.control_poll,
            ),
            ("retention (DEVFLEET_CANARY_RETAIN_SECONDS)", self.retain),
        ];
        for (name, value) in positive {
            anyhow::ensure!(!value.is_zero(), "{name} must be more than 0");
        }
        anyhow::ensure!(
            self.lease_ttl >= Duration::from_millis(300),
            "lease TTL (DEVFLEET_CANARY_LEASE_SECONDS) must be at least 0.3 s"
        );
        anyhow::ensure!(
            self.failure_limit >= 1,
            "failure limit (DEVFLEET_CANARY_FAILURE_LIMIT) must be at least 1"
        );
        anyhow::ensure!(
            self.handler_attempts >= 1,
            "handler attempts (DEVFLEET_CANARY_HANDLER_ATTEMPTS) must be at least 1"
        );
        anyhow::ensure!(!self.instance.is_empty(), "instance name must not be empty");
        Ok(())
    }
}

/// Runs the service until `shutdown` is cancelled: consumes
/// `deploy.requested` and drives deployments. On shutdown each driven
/// deployment records the time watched in its stage and releases its lease,
/// so another replica continues it at once.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    supervisor::run(config, shutdown).await
}
