//! Helpers for devfleet's tests.
//!
//! Real-server tests read their server URLs from the environment that
//! `scripts/test.sh` exports. A missing variable is a test failure with a
//! message saying how to run the suite, never a silent skip.

pub mod openai;

use std::future::Future;
use std::time::{Duration, Instant};

/// The URL in `var`, or a panic explaining that `scripts/test.sh` starts
/// the servers and exports it.
pub fn require_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs a real server. Run the suite with \
             scripts/test.sh, which installs and starts RabbitMQ, NATS and Redis and exports \
             DEVFLEET_AMQP_URL, DEVFLEET_NATS_URL and DEVFLEET_REDIS_URL."
        ),
    }
}

/// `DEVFLEET_AMQP_URL`, required.
pub fn amqp_url() -> String {
    require_env("DEVFLEET_AMQP_URL")
}

/// `DEVFLEET_NATS_URL`, required.
pub fn nats_url() -> String {
    require_env("DEVFLEET_NATS_URL")
}

/// `DEVFLEET_REDIS_URL`, required.
pub fn redis_url() -> String {
    require_env("DEVFLEET_REDIS_URL")
}

/// A name no other test run uses, for queues, key prefixes and plan ids.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// Polls `check` every 20 ms until it returns `Some`; `None` once `timeout`
/// passed (for waits that explain their own failure).
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `timeout` with `what` in the message.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Runs `fut`, panicking with `what` if it takes longer than `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {timeout:?}: {what}"),
    }
}
