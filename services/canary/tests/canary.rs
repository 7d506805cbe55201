//! The canary service against real servers: RabbitMQ carries
//! `deploy.requested`, Redis holds the records, a real HTTP service started
//! here (whose error rate and latency each test controls, under a real load
//! generator) is the deployment being watched, and a real Prometheus
//! scrapes it for the Prometheus health source.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use devfleet_bus::ConsumeOptions;
use devfleet_canary::record::{self, DeploymentRecord};
use devfleet_canary::{AllowList, Classification, Config, Profiles, Status};
use devfleet_protocol::{
    queues, DeployRequested, DeploySpec, Envelope, Handler, HealthSource, Message, Thresholds,
};
use devfleet_runtime::{BusKind, ConnectArgs, Connections};
use devfleet_testkit::{amqp_url, redis_url, unique, wait_for};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// The service under deployment.

const BOUNDS_MS: [f64; 9] = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0];

#[derive(Clone, Copy, Debug)]
struct Behaviour {
    /// Fraction of requests answered 500.
    error_rate: f64,
    latency_ms: u64,
}

const GOOD: Behaviour = Behaviour {
    error_rate: 0.0,
    latency_ms: 0,
};

#[derive(Default)]
struct Counts {
    requests: u64,
    errors: u64,
    /// Per bound of BOUNDS_MS, then +Inf; not cumulative here.
    buckets: [u64; 10],
    sum_seconds: f64,
    /// Bresenham accumulator: spreads errors evenly, so any window of n
    /// requests holds error_rate * n errors, give or take one.
    acc: f64,
}

#[derive(Default)]
struct AppState {
    behaviour: Mutex<Option<Behaviour>>,
    /// Behaviour switched to once the shift webhook sets at least this weight.
    bad_from_weight: Mutex<Option<(u8, Behaviour)>>,
    counts: Mutex<Counts>,
    /// Every webhook call: (deployment, action, weight).
    calls: Mutex<Vec<(String, String, u8)>>,
}

struct TestService {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: CancellationToken,
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestService {
    /// Starts the service and a load generator sending it ~200 requests/s.
    async fn start(behaviour: Behaviour) -> Self {
        let state = Arc::new(AppState::default());
        *state.behaviour.lock().unwrap() = Some(behaviour);
        let app = Router::new()
            .route("/work", get(work))
            .route("/stats", get(stats))
            .route("/metrics", get(prom_metrics))
            .route("/shift", post(shift))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        register_profile(format!(
            "hook-{}: {{ webhook: 'http://{addr}/shift' }}\n",
            addr.port()
        ));
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        for _ in 0..2 {
            let stop = stop.clone();
            let url = format!("http://{addr}/work");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                // Bounded: stops with the service, and after 5 minutes at most.
                let end = tokio::time::Instant::now() + Duration::from_secs(300);
                while !stop.is_cancelled() && tokio::time::Instant::now() < end {
                    let _ = client.get(&url).send().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        Self { addr, state, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = Some(behaviour);
    }

    fn bad_from_weight(&self, weight: u8, behaviour: Behaviour) {
        *self.state.bad_from_weight.lock().unwrap() = Some((weight, behaviour));
    }

    fn calls(&self, deployment: &str) -> Vec<(String, u8)> {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _, _)| d == deployment)
            .map(|(_, a, w)| (a.clone(), *w))
            .collect()
    }
}

async fn work(State(state): State<Arc<AppState>>) -> axum::http::StatusCode {
    let behaviour = state.behaviour.lock().unwrap().unwrap_or(GOOD);
    let started = std::time::Instant::now();
    if behaviour.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behaviour.latency_ms)).await;
    }
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    let mut c = state.counts.lock().unwrap();
    c.requests += 1;
    let bucket = BOUNDS_MS
        .iter()
        .position(|&b| ms <= b)
        .unwrap_or(BOUNDS_MS.len());
    c.buckets[bucket] += 1;
    c.sum_seconds += elapsed.as_secs_f64();
    c.acc += behaviour.error_rate;
    if c.acc >= 1.0 {
        c.acc -= 1.0;
        c.errors += 1;
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
    }
    axum::http::StatusCode::OK
}

fn cumulative(c: &Counts) -> Vec<u64> {
    c.buckets
        .iter()
        .scan(0u64, |acc, n| {
            *acc += n;
            Some(*acc)
        })
        .collect()
}

/// The JSON counter shape the canary documents.
async fn stats(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let c = state.counts.lock().unwrap();
    let mut buckets = serde_json::Map::new();
    for (i, n) in cumulative(&c).into_iter().enumerate() {
        let key = BOUNDS_MS
            .get(i)
            .map(|b| b.to_string())
            .unwrap_or_else(|| "+Inf".into());
        buckets.insert(key, n.into());
    }
    Json(serde_json::json!({
        "requests": c.requests,
        "errors": c.errors,
        "latency_buckets_ms": buckets,
    }))
}

/// Prometheus text format.
async fn prom_metrics(State(state): State<Arc<AppState>>) -> String {
    let c = state.counts.lock().unwrap();
    let mut out = String::new();
    out.push_str("# TYPE app_requests_total counter\n");
    out.push_str(&format!("app_requests_total {}\n", c.requests));
    out.push_str("# TYPE app_errors_total counter\n");
    out.push_str(&format!("app_errors_total {}\n", c.errors));
    out.push_str("# TYPE app_request_duration_seconds histogram\n");
    for (i, n) in cumulative(&c).into_iter().enumerate() {
        let le = BOUNDS_MS
            .get(i)
            .map(|b| (b / 1000.0).to_string())
            .unwrap_or_else(|| "+Inf".into());
        out.push_str(&format!(
            "app_request_duration_seconds_bucket{{le=\"{le}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "app_request_duration_seconds_sum {}\n",
        c.sum_seconds
    ));
    out.push_str(&format!(
        "app_request_duration_seconds_count {}\n",
        c.requests
    ));
    out
}

async fn shift(
    State(state): State<Arc<AppState>>,
    Json(body): Json<serde_json::Value>,
) -> axum::http::StatusCode {
    let deployment = body["deployment"].as_str().unwrap_or("").to_owned();
    let action = body["action"].as_str().unwrap_or("").to_owned();
    let weight = body["weight"].as_u64().unwrap_or(255) as u8;
    if action == "shift" {
        if let Some((from, bad)) = *state.bad_from_weight.lock().unwrap() {
            if weight >= from {
                *state.behaviour.lock().unwrap() = Some(bad);
            }
        }
    }
    state
        .calls
        .lock()
        .unwrap()
        .push((deployment, action, weight));
    axum::http::StatusCode::OK
}

// ---------------------------------------------------------------------------
// Canary harness.

fn connect_args(namespace: &str) -> ConnectArgs {
    ConnectArgs {
        bus: BusKind::Amqp,
        amqp_url: amqp_url(),
        nats_url: None,
        redis_url: redis_url(),
        namespace: namespace.to_owned(),
    }
}

async fn connections(namespace: &str) -> Connections {
    connect_args(namespace).connect().await.unwrap()
}

/// The handler profiles of this test process, as the operator's file
/// would hold them: every test service registers its shift webhook, every
/// command handler its command; replicas get them all.
static PROFILES: Mutex<String> = Mutex::new(String::new());

fn register_profile(yaml: String) {
    PROFILES.lock().unwrap().push_str(&yaml);
}

fn profiles() -> Profiles {
    Profiles::parse(&PROFILES.lock().unwrap()).unwrap()
}

/// The registered profiles in a file, for a canary process.
fn profiles_file(dir: &Path) -> PathBuf {
    let path = dir.join("profiles.yaml");
    std::fs::write(&path, PROFILES.lock().unwrap().as_bytes()).unwrap();
    path
}

fn fast_config(connections: Connections, instance: &str) -> Config {
    let mut config = Config::new(connections);
    config.profiles = Arc::new(profiles());
    config.allowed_networks = AllowList::loopback();
    config.instance = instance.to_owned();
    config.scan_interval = Duration::from_millis(200);
    config.lease_ttl = Duration::from_secs(3);
    config.control_poll = Duration::from_millis(200);
    config.handler_timeout = Duration::from_secs(10);
    config.health_timeout = Duration::from_secs(2);
    config
}

/// A canary replica running in this process; stopped on drop.
struct Replica {
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Replica {
    fn start(config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(devfleet_canary::run(config, shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn spec(stages: &[u8], stage_seconds: u64, shift: Handler, health: HealthSource) -> DeploySpec {
    DeploySpec {
        stages: stages.to_vec(),
        stage_seconds,
        check_seconds: 1,
        shift,
        rollback: None,
        health,
        thresholds: Thresholds::default(),
    }
}

/// The service's shift webhook profile (registered when it started).
fn webhook(service: &TestService) -> Handler {
    Handler::profile(format!("hook-{}", service.addr.port()))
}

fn json_health(service: &TestService) -> HealthSource {
    HealthSource::Url {
        url: service.url("/stats"),
    }
}

async fn request(connections: &Connections, id: &str, spec: DeploySpec) {
    request_for(connections, id, None, spec).await
}

async fn request_for(connections: &Connections, id: &str, plan_id: Option<&str>, spec: DeploySpec) {
    connections
        .publish(
            queues::DEPLOY_REQUESTED,
            DeployRequested {
                deployment_id: id.to_owned(),
                plan_id: plan_id.map(str::to_owned),
                spec,
            },
        )
        .await
        .unwrap();
}

async fn load(connections: &Connections, id: &str) -> Option<DeploymentRecord> {
    record::load(&connections.store, id).await.unwrap()
}

async fn wait_final(connections: &Connections, id: &str, timeout: Duration) -> DeploymentRecord {
    wait_for(&format!("deployment {id} to finish"), timeout, || async {
        load(connections, id).await.filter(|r| r.status.is_final())
    })
    .await
}

fn checks_at(record: &DeploymentRecord, stage: usize) -> Vec<Classification> {
    record
        .history
        .iter()
        .filter(|c| c.stage == stage)
        .map(|c| c.classification)
        .collect()
}

/// A shift command: a script that appends "<deployment> <weight>" to a log.
fn command_handler(dir: &Path, log_name: &str) -> (Handler, PathBuf) {
    let script = dir.join("shift.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"$1 $2\" >> \"$3\"\n").unwrap();
    let log = dir.join(log_name);
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "log-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    register_profile(format!(
        "{name}: {{ command: [/bin/sh, '{}', '{{deployment}}', '{{weight}}', '{}'] }}\n",
        script.display(),
        log.display()
    ));
    (Handler::profile(name), log)
}

fn logged_weights(log: &Path, id: &str) -> Vec<u8> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(d, _)| *d == id)
        .map(|(_, w)| w.trim().parse().unwrap())
        .collect()
}

/// Collects every `deployment` metric from the moment it is created. The
/// listener is drained all the time: broadcast is best effort, and a
/// listener left unread while other tests emit would drop samples.
struct MetricTap {
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricTap {
    async fn start(connections: &Connections) -> Self {
        let mut listener = connections
            .broadcast
            .listen("devfleet.metrics.deployment")
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some((_, payload)) = listener.next().await {
                if let Ok(envelope) = Envelope::decode(&payload) {
                    if let Message::Metric(metric) = envelope.message {
                        sink.lock().unwrap().push(metric.data);
                    }
                }
            }
        });
        Self { seen, task }
    }

    /// The first metric about `id` with `event`, waiting up to 20 s.
    async fn wait(&self, id: &str, event: &str) -> serde_json::Value {
        wait_for(
            &format!("a '{event}' deployment metric for {id}"),
            Duration::from_secs(20),
            || async {
                self.seen
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|m| m["deployment_id"] == id && m["event"] == event)
                    .cloned()
            },
        )
        .await
    }
}

impl Drop for MetricTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn healthy_rollout_is_promoted_through_every_stage_in_order() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let dir = tempfile::tempdir().unwrap();
    let (shift, log) = command_handler(dir.path(), "shift.log");
    let (rollback, rollback_log) = command_handler(dir.path(), "rollback.log");
    let mut spec = spec(&[10, 25, 50, 75, 100], 1, shift, json_health(&service));
    spec.rollback = Some(rollback);
    let replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("web");
    request(&connections, &id, spec).await;

    let rec = wait_final(&connections, &id, Duration::from_secs(60)).await;
    assert_eq!(rec.status, Status::Promoted, "{rec:#?}");
    assert_eq!(logged_weights(&log, &id), vec![10, 25, 50, 75, 100]);
    assert!(logged_weights(&rollback_log, &id).is_empty());
    assert_eq!(rec.weight, 100);
    for stage in 0..5 {
        let checks = checks_at(&rec, stage);
        assert_eq!(
            checks.last(),
            Some(&Classification::Healthy),
            "stage {stage} must end on a healthy check: {checks:?}"
        );
    }
    // A finished deployment is soon no longer active and holds no lease.
    wait_for(
        "the deployment to leave the active set",
        Duration::from_secs(10),
        || async {
            let active = connections.store.kv_get(record::ACTIVE, &id).await.unwrap();
            let leases = connections.store.kv_list(record::LEASES).await.unwrap();
            (active.is_none() && leases.iter().all(|(k, _)| !k.starts_with(&id))).then_some(())
        },
    )
    .await;
    replica.stop().await;
}

/// The canary ends no plan: it reports how a plan's rollout ended on
/// `deploy.finished`, and the scheduler ends the plan.
#[tokio::test]
async fn a_plans_rollout_reports_its_outcome_on_deploy_finished_and_ends_no_plan() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let good = TestService::start(GOOD).await;
    let bad = TestService::start(GOOD).await;
    bad.bad_from_weight(
        50,
        Behaviour {
            error_rate: 0.5,
            latency_ms: 0,
        },
    );
    let replica = Replica::start(fast_config(connections.clone(), "r1"));
    let (promoted, rolled_back) = (unique("web"), unique("web"));
    let shift = |s: &TestService| spec(&[50, 100], 1, webhook(s), json_health(s));
    request_for(&connections, &promoted, Some("plan-a"), shift(&good)).await;
    request_for(&connections, &rolled_back, Some("plan-b"), shift(&bad)).await;

    let mut reports = connections
        .consume(queues::DEPLOY_FINISHED, ConsumeOptions::default())
        .await
        .unwrap();
    let mut seen = std::collections::BTreeMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.len() < 2 {
            let (envelope, delivery) = reports.next_envelope().await.unwrap().unwrap();
            delivery.ack().await.unwrap();
            let Message::DeployFinished(report) = envelope.message else {
                panic!("not a deploy report: {}", envelope.kind());
            };
            seen.insert(report.deployment_id.clone(), report);
        }
    })
    .await
    .expect("two deploy.finished reports");
    let ok = &seen[&promoted];
    assert_eq!((ok.plan_id.as_str(), ok.promoted), ("plan-a", true));
    assert!(ok.message.contains("promoted"), "{ok:?}");
    let back = &seen[&rolled_back];
    assert_eq!((back.plan_id.as_str(), back.promoted), ("plan-b", false));
    assert!(
        back.message.contains("rolled back") && back.message.contains("error rate"),
        "{back:?}"
    );
    replica.stop().await;
}

/// A plan names a profile the operator never configured: the deployment
/// ends at once with a reason naming it and the fix, no handler runs, and
/// the plan hears of it (the scheduler then fails it).
#[tokio::test]
async fn an_unknown_profile_fails_the_deployment_and_reports_it_to_the_plan() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let mut reports = connections
        .consume(queues::DEPLOY_FINISHED, ConsumeOptions::default())
        .await
        .unwrap();
    let replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("web");
    let mut spec = spec(&[50, 100], 1, webhook(&service), json_health(&service));
    spec.shift = Handler::profile("curl-the-metadata-service");
    request_for(&connections, &id, Some("plan-u"), spec).await;

    let (envelope, delivery) =
        tokio::time::timeout(Duration::from_secs(30), reports.next_envelope())
            .await
            .expect("a deploy.finished report")
            .unwrap()
            .unwrap();
    delivery.ack().await.unwrap();
    let Message::DeployFinished(report) = envelope.message else {
        panic!("not a deploy report: {}", envelope.kind());
    };
    assert_eq!(
        (report.plan_id.as_str(), report.promoted),
        ("plan-u", false)
    );
    assert!(
        report.message.contains("'curl-the-metadata-service'")
            && report.message.contains("DEVFLEET_CANARY_PROFILES"),
        "{report:?}"
    );
    let rec = wait_final(&connections, &id, Duration::from_secs(10)).await;
    assert_eq!(
        (rec.status, rec.weight),
        (Status::RolledBack, 0),
        "{rec:#?}"
    );
    assert!(service.calls(&id).is_empty(), "no handler ran");
    replica.stop().await;
}

/// A rollout ships what the pipeline built: the profile's command finds the
/// plan's Done artifacts (from Redis) written out in `DEVFLEET_DEPLOY_TREE`,
/// at every stage.
#[tokio::test]
async fn a_plans_deployment_hands_its_built_tree_to_the_command() {
    use devfleet_protocol::PlanStatus;
    use devfleet_store::{Fence, NewTask, PlanRecord};
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let store = &connections.store;
    let plan_id = unique("plan");
    let files = [("app/main.py", "print('v2')\n"), ("VERSION", "2.0.0\n")];
    let tasks = files
        .iter()
        .map(|(path, _)| NewTask {
            path: path.to_string(),
            spec: "s".into(),
            content: None,
            depends_on: vec![],
            priority: 0,
            estimate: 1,
            executor: None,
        })
        .collect();
    let plan = PlanRecord::new(&plan_id, "p", PlanStatus::Deploying, 0);
    assert!(store.create_plan(plan, tasks).await.unwrap());
    for _ in files {
        let task = store
            .claim_next("test", Duration::from_secs(60))
            .await
            .unwrap()
            .expect("a ready task");
        let content = files.iter().find(|(p, _)| *p == task.path).unwrap().1;
        let hash = store.put_artifact(content.as_bytes()).await.unwrap();
        store
            .complete(&plan_id, &task.path, &Fence::of(&task), &hash)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let shipped = dir.path().join("shipped");
    register_profile(format!(
        "ship: {{ command: [/bin/sh, -c, 'echo \"$1 $(cat $DEVFLEET_DEPLOY_TREE/VERSION) $(cat {{tree}}/app/main.py)\" >> {}', sh, '{{weight}}'] }}\n",
        shipped.display()
    ));
    let replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("web");
    let spec = spec(
        &[50, 100],
        1,
        Handler::profile("ship"),
        json_health(&service),
    );
    request_for(&connections, &id, Some(&plan_id), spec).await;
    let rec = wait_final(&connections, &id, Duration::from_secs(30)).await;
    assert_eq!(rec.status, Status::Promoted, "{rec:#?}");
    assert_eq!(
        std::fs::read_to_string(&shipped).unwrap(),
        "50 2.0.0 print('v2')\n100 2.0.0 print('v2')\n"
    );
    replica.stop().await;
}

/// A plan's health URL outside the operator's allowed networks is never
/// read: the reads fail naming the setting, and the deployment rolls back.
#[tokio::test]
async fn a_health_url_outside_the_allowed_networks_is_refused() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let mut config = fast_config(connections.clone(), "r1");
    config.allowed_networks = "10.0.0.0/8".parse().unwrap();
    config.failure_limit = 2;
    let replica = Replica::start(config);
    let id = unique("web");
    request(
        &connections,
        &id,
        spec(&[50, 100], 1, webhook(&service), json_health(&service)),
    )
    .await;
    let rec = wait_final(&connections, &id, Duration::from_secs(30)).await;
    assert_eq!(rec.status, Status::RolledBack, "{rec:#?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("DEVFLEET_CANARY_ALLOWED_NETWORKS") && reason.contains("127.0.0.1"),
        "{reason}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn error_spike_at_the_second_stage_rolls_back_within_one_check() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let metrics = MetricTap::start(&connections).await;
    let service = TestService::start(GOOD).await;
    // The new version fails 20 % of requests once it gets 25 % of traffic.
    service.bad_from_weight(
        25,
        Behaviour {
            error_rate: 0.20,
            latency_ms: 0,
        },
    );
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("web");
    request(
        &connections,
        &id,
        spec(
            &[10, 25, 50, 75, 100],
            2,
            webhook(&service),
            json_health(&service),
        ),
    )
    .await;

    let rec = wait_final(&connections, &id, Duration::from_secs(60)).await;
    assert_eq!(rec.status, Status::RolledBack, "{rec:#?}");
    assert_eq!(
        service.calls(&id),
        vec![
            ("shift".to_owned(), 10),
            ("shift".to_owned(), 25),
            ("rollback".to_owned(), 0)
        ]
    );
    // The first check at 25 % saw the errors and rolled back.
    assert_eq!(checks_at(&rec, 1), vec![Classification::Unhealthy]);
    let reason = rec.reason.clone().unwrap();
    assert!(
        reason.contains("error rate") && reason.contains("25%"),
        "{reason}"
    );
    assert_eq!(rec.weight, 0);

    // The rollback was announced as a deployment metric with its reason.
    let announced = metrics.wait(&id, "rolled_back").await;
    assert_eq!(announced["status"], "rolled_back");
    assert!(announced["reason"].as_str().unwrap().contains("error rate"));
}

#[tokio::test]
async fn latency_over_the_limit_rolls_back() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(Behaviour {
        error_rate: 0.0,
        latency_ms: 300,
    })
    .await;
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("slow");
    request(
        &connections,
        &id,
        spec(&[10, 100], 5, webhook(&service), json_health(&service)),
    )
    .await;

    let rec = wait_final(&connections, &id, Duration::from_secs(60)).await;
    assert_eq!(rec.status, Status::RolledBack, "{rec:#?}");
    let reason = rec.reason.clone().unwrap();
    assert!(reason.contains("p95 latency"), "{reason}");
    let last = rec.last_check.unwrap();
    assert!(last.latency_p95_ms.unwrap() > 200.0, "{last:?}");
    assert_eq!(last.error_rate, Some(0.0));
    assert_eq!(
        service.calls(&id),
        vec![("shift".to_owned(), 10), ("rollback".to_owned(), 0)]
    );
}

#[tokio::test]
async fn degraded_stage_holds_past_its_time_and_advances_once_healthy() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(Behaviour {
        error_rate: 0.07,
        latency_ms: 0,
    })
    .await;
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("meh");
    request(
        &connections,
        &id,
        spec(&[10, 100], 1, webhook(&service), json_health(&service)),
    )
    .await;

    // Four degraded checks: four times the stage's one second, still at 10 %.
    let rec = wait_for("four degraded checks", Duration::from_secs(30), || async {
        load(&connections, &id).await.filter(|r| {
            r.history
                .iter()
                .filter(|c| c.classification == Classification::Degraded)
                .count()
                >= 4
        })
    })
    .await;
    assert_eq!(rec.status, Status::Progressing, "{rec:#?}");
    assert_eq!((rec.stage, rec.weight), (0, 10));
    assert!(rec.stage_elapsed_ms >= 4000, "{}", rec.stage_elapsed_ms);
    assert!(checks_at(&rec, 0)
        .iter()
        .all(|c| matches!(c, Classification::Degraded | Classification::Baseline)));
    assert_eq!(service.calls(&id), vec![("shift".to_owned(), 10)]);

    // Errors gone: the next healthy check advances, and the rollout ends promoted.
    service.set(GOOD);
    let rec = wait_final(&connections, &id, Duration::from_secs(30)).await;
    assert_eq!(rec.status, Status::Promoted, "{rec:#?}");
    assert_eq!(
        service.calls(&id),
        vec![("shift".to_owned(), 10), ("shift".to_owned(), 100)]
    );
}

#[tokio::test]
async fn failing_health_reads_roll_back_after_the_limit() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("blind");
    request(
        &connections,
        &id,
        spec(
            &[10, 100],
            1,
            webhook(&service),
            HealthSource::Url {
                url: format!("http://{closed}/stats"),
            },
        ),
    )
    .await;

    let rec = wait_final(&connections, &id, Duration::from_secs(30)).await;
    assert_eq!(rec.status, Status::RolledBack, "{rec:#?}");
    assert_eq!(
        checks_at(&rec, 0),
        vec![Classification::ReadFailed; 3],
        "rolls back at the third failed read, not before"
    );
    let reason = rec.reason.unwrap();
    assert!(
        reason.contains("3 health reads in a row failed"),
        "{reason}"
    );
    assert!(reason.contains(&closed.to_string()), "{reason}");
}

#[tokio::test]
async fn manual_rollback_takes_traffic_back_and_is_refused_once_final() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));
    let id = unique("manual");
    request(
        &connections,
        &id,
        spec(&[10, 100], 600, webhook(&service), json_health(&service)),
    )
    .await;
    wait_for("first shift", Duration::from_secs(20), || async {
        load(&connections, &id).await.filter(|r| r.shifted)
    })
    .await;

    let status =
        devfleet_canary::request_rollback(&connections.store, &id, Some("bad checkout".into()))
            .await
            .unwrap();
    assert_eq!(status, Status::Progressing);
    let rec = wait_final(&connections, &id, Duration::from_secs(20)).await;
    assert_eq!(rec.status, Status::RolledBack);
    assert_eq!(rec.reason.as_deref(), Some("manual rollback: bad checkout"));
    assert_eq!(
        service.calls(&id),
        vec![("shift".to_owned(), 10), ("rollback".to_owned(), 0)]
    );
    let again = devfleet_canary::request_rollback(&connections.store, &id, None).await;
    assert!(
        matches!(
            again,
            Err(devfleet_canary::ControlError::AlreadyFinal { .. })
        ),
        "{again:?}"
    );
    let unknown = devfleet_canary::request_rollback(&connections.store, "no-such", None).await;
    assert!(matches!(
        unknown,
        Err(devfleet_canary::ControlError::UnknownDeployment { .. })
    ));
}

#[tokio::test]
async fn duplicate_id_is_refused_and_many_deployments_run_independently() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let metrics = MetricTap::start(&connections).await;
    let good = TestService::start(GOOD).await;
    let bad = TestService::start(Behaviour {
        error_rate: 0.5,
        latency_ms: 0,
    })
    .await;
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));
    let a = unique("a");
    let b = unique("b");
    request(
        &connections,
        &a,
        spec(&[10, 50, 100], 1, webhook(&good), json_health(&good)),
    )
    .await;
    request(
        &connections,
        &b,
        spec(&[10, 50, 100], 1, webhook(&bad), json_health(&bad)),
    )
    .await;
    // Same id as `a`, different spec: refused.
    request(
        &connections,
        &a,
        spec(&[20, 100], 1, webhook(&good), json_health(&good)),
    )
    .await;

    let refused = metrics.wait(&a, "refused").await;
    assert!(
        refused["reason"].as_str().unwrap().contains("already used"),
        "{refused}"
    );

    let ra = wait_final(&connections, &a, Duration::from_secs(30)).await;
    let rb = wait_final(&connections, &b, Duration::from_secs(30)).await;
    assert_eq!(ra.status, Status::Promoted, "{ra:#?}");
    assert_eq!(ra.spec.stages, vec![10, 50, 100], "the first request wins");
    assert_eq!(rb.status, Status::RolledBack, "{rb:#?}");
    assert_eq!(
        good.calls(&a),
        vec![
            ("shift".to_owned(), 10),
            ("shift".to_owned(), 50),
            ("shift".to_owned(), 100)
        ]
    );
}

#[tokio::test]
async fn replicas_share_deployments_and_take_over_from_one_that_stops() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let r1 = Replica::start(fast_config(connections.clone(), "replica-1"));
    let r2 = Replica::start(fast_config(connections.clone(), "replica-2"));
    let ids: Vec<String> = (0..4).map(|i| unique(&format!("d{i}"))).collect();
    for id in &ids {
        request(
            &connections,
            id,
            spec(&[10, 50, 100], 2, webhook(&service), json_health(&service)),
        )
        .await;
    }
    // Wait until every deployment is driven, then stop replica-1.
    wait_for(
        "all deployments shifted",
        Duration::from_secs(20),
        || async {
            for id in &ids {
                load(&connections, id).await.filter(|r| r.shifted)?;
            }
            Some(())
        },
    )
    .await;
    r1.stop().await;

    for id in &ids {
        let rec = wait_final(&connections, id, Duration::from_secs(40)).await;
        assert_eq!(rec.status, Status::Promoted, "{rec:#?}");
        assert_eq!(rec.owner.as_deref(), Some("replica-2"));
        let weights: Vec<u8> = service.calls(id).into_iter().map(|(_, w)| w).collect();
        // Exactly one replica shifted each stage, in order, once.
        assert_eq!(weights, vec![10, 50, 100], "{id}: {weights:?}");
    }
    drop(r2);
}

/// Spawns the real `canary` binary on `namespace`, with the profiles in
/// `profiles` (a file) and loopback health sources allowed.
fn spawn_canary_process(namespace: &str, profiles: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_canary"))
        .env("DEVFLEET_CANARY_PROFILES", profiles)
        .env("DEVFLEET_CANARY_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")
        .env_remove("DEVFLEET_NATS_URL")
        .env("DEVFLEET_BUS", "amqp")
        .env("DEVFLEET_AMQP_URL", amqp_url())
        .env("DEVFLEET_REDIS_URL", redis_url())
        .env("DEVFLEET_NAMESPACE", namespace)
        .env("DEVFLEET_CANARY_SCAN_SECONDS", "0.2")
        .env("DEVFLEET_CANARY_LEASE_SECONDS", "2")
        .env("DEVFLEET_CANARY_CONTROL_POLL_SECONDS", "0.2")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn killed_canary_process_resumes_at_the_same_stage_with_its_time() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let dir = tempfile::tempdir().unwrap();
    let (shift, log) = command_handler(dir.path(), "shift.log");
    let id = unique("crash");
    let mut child = spawn_canary_process(&ns, &profiles_file(dir.path()));
    request(
        &connections,
        &id,
        spec(&[10, 25, 50, 75, 100], 4, shift, json_health(&service)),
    )
    .await;

    // Let it reach 50 % and watch it for two checks there.
    wait_for("two checks at 50 %", Duration::from_secs(60), || async {
        load(&connections, &id)
            .await
            .filter(|r| r.stage == 2 && checks_at(r, 2).len() >= 2)
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let at_kill = load(&connections, &id).await.unwrap();
    let checks_before = checks_at(&at_kill, 2).len();
    let shifts_before = logged_weights(&log, &id).len();
    assert_eq!(at_kill.stage, 2);
    assert!(at_kill.stage_elapsed_ms >= 2000);

    let mut child = spawn_canary_process(&ns, &profiles_file(dir.path()));
    let rec = wait_final(&connections, &id, Duration::from_secs(60)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    assert_eq!(rec.status, Status::Promoted, "{rec:#?}");
    let weights = logged_weights(&log, &id);
    let mut deduped = weights.clone();
    deduped.dedup();
    assert_eq!(deduped, vec![10, 25, 50, 75, 100], "{weights:?}");
    assert!(
        weights[shifts_before..].iter().all(|&w| w >= 50),
        "after the restart it must not start over: {weights:?}"
    );
    // The 4 s stage needed 4 one-second checks in all: the time watched
    // before the kill counted (starting over would need 4 more after it).
    let at_50 = checks_at(&rec, 2).len();
    assert!(
        checks_before >= 2 && at_50 < checks_before + 4,
        "{at_50} checks at 50 %, {checks_before} before the kill"
    );
    assert!(
        rec.transitions.iter().any(|t| t.event == "resumed"),
        "{rec:#?}"
    );
}

// ---------------------------------------------------------------------------
// Prometheus.

struct Prometheus {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Prometheus {
    /// Starts prometheus scraping `target` every second, on a free port.
    async fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: app\n    scrape_interval: 1s\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect(
                "the Debian package `prometheus` must be installed (scripts/test.sh installs it)",
            );
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            log,
        }
    }

    async fn query(&self, client: &reqwest::Client, q: &str) -> Option<f64> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", self.url)).unwrap();
        url.query_pairs_mut().append_pair("query", q);
        let body = client.get(url).send().await.ok()?.bytes().await.ok()?;
        let answer: serde_json::Value = serde_json::from_slice(&body).ok()?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
    }

    /// Waits until `q` gives a number satisfying `ok`; panics with
    /// Prometheus's log otherwise.
    async fn wait_until(&self, what: &str, q: &str, ok: impl Fn(f64) -> bool) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.query(&client, q).await {
                if ok(v) {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("timed out waiting for Prometheus: {what}\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

const ERROR_RATE: &str = "sum(rate(app_errors_total[5s])) / sum(rate(app_requests_total[5s]))";
const P95_MS: &str =
    "1000 * histogram_quantile(0.95, sum by (le) (rate(app_request_duration_seconds_bucket[5s])))";

#[tokio::test]
async fn prometheus_health_source_promotes_healthy_and_rolls_back_failing() {
    let ns = unique("canary");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let mut prometheus = Prometheus::start(service.addr).await;
    prometheus
        .wait_until("the error rate of the scraped service", ERROR_RATE, |v| {
            v == 0.0
        })
        .await;
    let health = HealthSource::Prometheus {
        prometheus: prometheus.url.clone(),
        error_rate: ERROR_RATE.into(),
        latency_p95_ms: P95_MS.into(),
    };
    let _replica = Replica::start(fast_config(connections.clone(), "r1"));

    let good = unique("prom-good");
    request(
        &connections,
        &good,
        spec(&[25, 100], 2, webhook(&service), health.clone()),
    )
    .await;
    let rec = wait_final(&connections, &good, Duration::from_secs(60)).await;
    assert_eq!(rec.status, Status::Promoted, "{rec:#?}");
    let last = rec.last_check.clone().unwrap();
    assert_eq!(last.error_rate, Some(0.0), "{last:?}");
    assert!(last.latency_p95_ms.unwrap() < 200.0, "{last:?}");

    // Now the service fails 30 % of requests, and Prometheus has seen it.
    service.set(Behaviour {
        error_rate: 0.30,
        latency_ms: 0,
    });
    prometheus
        .wait_until("the error rate to rise", ERROR_RATE, |v| v > 0.2)
        .await;
    let bad = unique("prom-bad");
    request(
        &connections,
        &bad,
        spec(&[25, 100], 2, webhook(&service), health),
    )
    .await;
    let rec = wait_final(&connections, &bad, Duration::from_secs(60)).await;
    assert_eq!(rec.status, Status::RolledBack, "{rec:#?}");
    assert!(
        rec.reason.as_deref().unwrap().contains("error rate"),
        "{rec:#?}"
    );
    assert_eq!(
        service.calls(&bad),
        vec![("shift".to_owned(), 25), ("rollback".to_owned(), 0)]
    );

    prometheus.child.start_kill().unwrap();
    prometheus.child.wait().await.unwrap();
}

// ---------------------------------------------------------------------------
// Benchmark (prints figures, asserts nothing about speed). Run by hand:
//   scripts/bench-canary.sh [N]   (benches/deployments.rs calls the function below)
// DEVFLEET_CANARY_BENCH_N sets the number of deployments (default 100).

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The canary benchmark (`benches/deployments.rs`, which includes this file
/// for its helpers; `scripts/bench-canary.sh` runs it). Not a test: it
/// prints figures and asserts nothing timed.
#[allow(dead_code)]
pub async fn bench_one_process_drives_many_deployments() {
    let n: usize = std::env::var("DEVFLEET_CANARY_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let ns = unique("canary-bench");
    let connections = connections(&ns).await;
    let service = TestService::start(GOOD).await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_canary_process(&ns, &profiles_file(dir.path()));
    let pid = child.id().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_idle_start = cpu_seconds(pid);
    let started = tokio::time::Instant::now();
    for i in 0..n {
        request(
            &connections,
            &format!("bench-{i}"),
            spec(&[10, 50, 100], 3, webhook(&service), json_health(&service)),
        )
        .await;
    }
    let records = wait_for(
        "every deployment to finish",
        Duration::from_secs(300),
        || async {
            let all = record::list(&connections.store).await.unwrap();
            (all.len() == n && all.iter().all(|r| r.status.is_final())).then_some(all)
        },
    )
    .await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_idle_start;
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    let promoted = records
        .iter()
        .filter(|r| r.status == Status::Promoted)
        .count();
    // How late each check fired: interval between consecutive checks at
    // one stage, minus the 1 s check interval.
    let mut lateness: Vec<f64> = Vec::new();
    for r in &records {
        for pair in r.history.windows(2) {
            if pair[0].stage == pair[1].stage {
                lateness.push((pair[1].at_ms - pair[0].at_ms) as f64 - 1000.0);
            }
        }
    }
    lateness.sort_by(f64::total_cmp);
    let checks: u64 = records.iter().map(|r| r.checks).sum();
    let durations: Vec<f64> = {
        let mut d: Vec<f64> = records
            .iter()
            .filter_map(|r| Some((r.finished_ms? - r.created_ms) as f64 / 1000.0))
            .collect();
        d.sort_by(f64::total_cmp);
        d
    };
    println!(
        "canary bench: {n} deployments, stages [10, 50, 100], 3 s per stage, checks every 1 s"
    );
    println!(
        "  promoted {promoted}/{n}; wall {wall:.1} s; {checks} checks; {} webhook calls",
        service.state.calls.lock().unwrap().len()
    );
    println!(
        "  per-deployment duration s: p50 {:.2} p95 {:.2} max {:.2} (ideal 9)",
        percentile(&durations, 0.5),
        percentile(&durations, 0.95),
        durations.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  check lateness ms: p50 {:.0} p95 {:.0} max {:.0}",
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.95),
        lateness.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  canary process CPU: {cpu:.2} s over {wall:.1} s ({:.1} % of one core); {:.2} ms CPU per check",
        100.0 * cpu / wall,
        1000.0 * cpu / checks.max(1) as f64
    );
}
