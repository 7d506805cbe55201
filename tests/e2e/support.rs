//! Connecting services to the real servers, each test in its own namespace.

use devfleet_runtime::{BusKind, ConnectArgs, Connections};
use devfleet_testkit::{amqp_url, nats_url, redis_url, unique};
use std::path::{Path, PathBuf};

/// Connections to the real RabbitMQ (work), NATS (broadcast) and Redis, in
/// a fresh namespace so parallel tests never see each other's work.
pub async fn real_connections(bus: BusKind) -> Connections {
    let args = ConnectArgs {
        bus,
        amqp_url: amqp_url(),
        nats_url: Some(nats_url()),
        redis_url: redis_url(),
        namespace: unique("e2e"),
    };
    args.connect()
        .await
        .expect("connecting to the test servers")
}

/// Runs the `devfleet` CLI against the test servers in `connections`'
/// namespace (RabbitMQ bus); its stdout, after asserting it succeeded.
pub fn cli(connections: &Connections, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_devfleet"))
        .args(args)
        .env("DEVFLEET_AMQP_URL", amqp_url())
        .env("DEVFLEET_REDIS_URL", redis_url())
        .env("DEVFLEET_BUS", "amqp")
        .env("DEVFLEET_NAMESPACE", &connections.namespace)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "devfleet {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The service binaries, one process each (as `scripts/stack.sh` runs them).
pub const SERVICES: [&str; 7] = [
    "analyzer",
    "scheduler",
    "dev-worker",
    "qa-worker",
    "router",
    "canary",
    "metrics-gateway",
];

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn newest_source(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_source(&path)
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "toml" || e == "html")
        {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(newest)
        } else {
            continue;
        };
        newest = newest.max(time);
    }
    newest
}

/// The folder of this build's binaries when every service binary there is
/// newer than the sources (`scripts/test.sh` builds them all before the
/// tests); `None` when one is missing or stale.
pub fn fresh_bin_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_BIN_EXE_devfleet"))
        .parent()?
        .to_path_buf();
    let sources = ["services", "shared", "src"]
        .iter()
        .map(|d| newest_source(&repo().join(d)))
        .chain([newest_source(&repo().join("Cargo.lock"))])
        .max()?;
    SERVICES
        .iter()
        .all(|s| {
            std::fs::metadata(dir.join(s))
                .and_then(|m| m.modified())
                .is_ok_and(|built| built >= sources)
        })
        .then_some(dir)
}

/// The path of a service binary of this build (e.g. `dev-worker`), for
/// tests that run a service as its own process. Runs `cargo build
/// --workspace --bins` first (what `scripts/test.sh` runs before the tests,
/// so it is a no-op there), so a test never drives a stale binary.
pub fn service_binary(name: &str) -> PathBuf {
    // Once per test process: a test may spawn several workers.
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let built = *BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        std::process::Command::new(cargo)
            .args(["build", "-q", "--workspace", "--bins"])
            .current_dir(repo())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(built, "cargo build --workspace --bins failed");
    let dir = Path::new(env!("CARGO_BIN_EXE_devfleet"))
        .parent()
        .expect("the binaries' folder")
        .to_path_buf();
    dir.join(name)
}

/// Publishes an analyzed plan to the scheduler's intake queue.
pub async fn submit(connections: &Connections, plan: &devfleet_protocol::PlanAnalyzed) {
    connections
        .publish(devfleet_protocol::queues::PLANS_ANALYZED, plan.clone())
        .await
        .expect("publish plan");
}

/// Waits until the plan's record satisfies `check` (`what` names the wait
/// in the failure message, which also shows the plan and its tasks).
pub async fn plan_where(
    connections: &Connections,
    plan_id: &str,
    what: &str,
    timeout: std::time::Duration,
    check: impl Fn(&devfleet_store::PlanRecord) -> bool,
) -> devfleet_store::PlanRecord {
    let store = &connections.store;
    let found = devfleet_testkit::poll_until(timeout, || async {
        store
            .plan(plan_id)
            .await
            .ok()
            .flatten()
            .filter(|p| check(p))
    })
    .await;
    match found {
        Some(record) => record,
        None => {
            let record = store.plan(plan_id).await;
            let tasks = store.tasks(plan_id).await;
            panic!(
                "timed out after {timeout:?} waiting for plan {plan_id} to {what}\n\
                 plan: {record:#?}\ntasks: {tasks:#?}"
            );
        }
    }
}
