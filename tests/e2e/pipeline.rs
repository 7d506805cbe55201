//! The scheduler and dev-workers together, in one process, over real
//! RabbitMQ and Redis (plus NATS JetStream variants, and the in-memory
//! backends for the fast ones); and the whole pipeline with the real router
//! and qa-worker (integration and deploy stages, the dev circuit breaker).
//!
//! Tests of the scheduler and dev-workers alone run the scheduler's direct
//! seam (`direct_routing = true`): no router runs there, so the scheduler
//! stands in for it. Tests with a router run with the seam off, as deployed.
//!
//! Isolation on shared servers: every test runs in its own namespace
//! (`Connections::namespace`: prefixed queue names, and the Redis key prefix
//! `devfleet:<namespace>`), so tests running in parallel never take each
//! other's work. Broadcast metrics and events are not namespaced: tests
//! that listen filter by source instance or plan id.

use async_trait::async_trait;
use devfleet_bus::ConsumeOptions;
use devfleet_contracts::breaker::{self, BreakerState, Phase};
use devfleet_dev_worker::executor::simulate::{Simulate, SimulateSettings};
use devfleet_dev_worker::{ExecError, ExecInput, ExecOutput, Executor, Executors, ScalePolicy};
use devfleet_protocol::{
    queues, AnalyzedTask, DeployFinished, Envelope, ExecutorKind, IntegrationStep, Message, Plan,
    PlanAnalyzed, PlanStatus, Usage,
};
use devfleet_runtime::Connections;
use devfleet_scheduler::TASKS_COMPLETED;
use devfleet_store::{BudgetLimits, PlanRecord, TaskState, UsageTotals};
use devfleet_testkit::{unique, wait_for, within};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Backend {
    Memory,
    /// RabbitMQ + Redis from the environment.
    Real,
    /// NATS JetStream + Redis from the environment.
    Nats,
}

/// An executor that records the order in which tasks started.
struct Recording {
    inner: Arc<dyn Executor>,
    runs: Mutex<Vec<String>>,
}

impl Recording {
    fn new(inner: Arc<dyn Executor>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            runs: Mutex::new(Vec::new()),
        })
    }

    fn runs(&self) -> Vec<String> {
        self.runs.lock().unwrap().clone()
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.runs.lock().unwrap())
    }
}

#[async_trait]
impl Executor for Recording {
    fn identity(&self) -> String {
        self.inner.identity()
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        self.runs.lock().unwrap().push(input.path.clone());
        self.inner.run(input).await
    }
}

/// An executor that reports usage for every run (two models, tokens and
/// cost derived from the task) and keeps the totals it reported.
struct Metered {
    inner: Arc<dyn Executor>,
    reported: Mutex<BTreeMap<String, UsageTotals>>,
}

impl Metered {
    fn new(inner: Arc<dyn Executor>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            reported: Mutex::new(BTreeMap::new()),
        })
    }

    fn reported(&self) -> BTreeMap<String, UsageTotals> {
        self.reported.lock().unwrap().clone()
    }
}

#[async_trait]
impl Executor for Metered {
    fn identity(&self) -> String {
        format!("metered:{}", self.inner.identity())
    }

    /// The prompt (as reported after) plus a maximum completion of 10.
    fn estimate(&self, input: &ExecInput) -> Option<Usage> {
        Some(Usage {
            model: "estimate".into(),
            tokens_in: 100 + input.path.len() as u64,
            tokens_out: 10,
            estimated: true,
            ..Usage::default()
        })
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let mut output = self.inner.run(input).await?;
        let model = if input.path.len().is_multiple_of(2) {
            "even"
        } else {
            "odd"
        };
        let usage = Usage {
            provider: "scripted".into(),
            model: model.into(),
            tokens_in: 100 + input.path.len() as u64,
            tokens_out: 7 * u64::from(input.attempt),
            cost_usd: 0.000_125,
            estimated: false,
        };
        self.reported
            .lock()
            .unwrap()
            .entry(devfleet_store::usage_label(&usage))
            .or_default()
            .add(&UsageTotals::of(&usage));
        output.usage.push(usage);
        Ok(output)
    }
}

pub(crate) struct Stack {
    pub(crate) connections: Connections,
    shutdown: CancellationToken,
    services: JoinSet<anyhow::Result<()>>,
}

impl Stack {
    /// Connections in a fresh namespace: its own queues and, on Redis, its
    /// own key prefix (`devfleet:<namespace>`, as `ConnectArgs` makes it).
    pub(crate) async fn new(backend: Backend) -> Stack {
        match backend {
            Backend::Memory => {
                devfleet_telemetry::init_for_tests();
                Stack::with(Connections::in_memory().with_namespace(unique("t")))
            }
            Backend::Real => Stack::on_broker(&devfleet_testkit::amqp_url()).await,
            Backend::Nats => Stack::on_broker(&devfleet_testkit::nats_url()).await,
        }
    }

    /// Connections to the broker at `url` and the test Redis, in a fresh
    /// namespace.
    async fn on_broker(url: &str) -> Stack {
        devfleet_telemetry::init_for_tests();
        let namespace = unique("t");
        let bus = devfleet_bus::connect(url).await.expect("the broker");
        let store = devfleet_store::connect_with_prefix(
            &devfleet_testkit::redis_url(),
            &format!("devfleet:{namespace}"),
        )
        .await
        .expect("Redis");
        Stack::with(Connections {
            broadcast: bus.clone(),
            bus,
            store,
            namespace,
        })
    }

    fn with(connections: Connections) -> Stack {
        Stack {
            connections,
            shutdown: CancellationToken::new(),
            services: JoinSet::new(),
        }
    }

    fn scheduler_config(&self) -> devfleet_scheduler::Config {
        let mut config = devfleet_scheduler::Config::new(self.connections.clone());
        config.dispatch_tick = Duration::from_millis(10);
        config.reap_interval = Duration::from_millis(100);
        config.dispatch_lease = Duration::from_secs(5);
        config
    }

    /// The scheduler standing in for the router (no router runs).
    fn scheduler(&mut self) {
        let mut config = self.scheduler_config();
        config.direct_routing = true;
        self.services
            .spawn(devfleet_scheduler::run(config, self.shutdown.clone()));
    }

    /// The scheduler as deployed, the router and a qa-worker.
    pub(crate) fn routed_pipeline(&mut self) {
        self.routed_pipeline_with(|_| {});
    }

    /// [`Stack::routed_pipeline`] with the qa-worker's config changed by `qa`.
    fn routed_pipeline_with(&mut self, qa: impl FnOnce(&mut devfleet_qa_worker::Config)) {
        let config = self.scheduler_config();
        assert!(!config.direct_routing, "the seam is off by default");
        self.services
            .spawn(devfleet_scheduler::run(config, self.shutdown.clone()));
        let mut router = devfleet_router::Config::new(self.connections.clone());
        // The broker's dead-letter queue is shared by every test; this
        // test's router has no business with it.
        router.index_bus_dlq = false;
        self.services
            .spawn(devfleet_router::run(router, self.shutdown.clone()));
        let mut config = devfleet_qa_worker::Config::new(self.connections.clone());
        qa(&mut config);
        self.services
            .spawn(devfleet_qa_worker::run(config, self.shutdown.clone()));
    }

    pub(crate) fn worker(&mut self, executors: Executors, min: u32, max: u32) {
        self.worker_with(executors, min, max, |_| {});
    }

    /// [`Stack::worker`] with its config changed by `change`.
    fn worker_with(
        &mut self,
        executors: Executors,
        min: u32,
        max: u32,
        change: impl FnOnce(&mut devfleet_dev_worker::Config),
    ) {
        let mut config = devfleet_dev_worker::Config::new(self.connections.clone());
        config.executors = executors;
        config.scale = ScalePolicy {
            min,
            max,
            tick: Duration::from_millis(200),
            ..ScalePolicy::default()
        };
        config.lease = Duration::from_secs(3);
        config.heartbeat_ttl = Duration::from_secs(2);
        config.shutdown_grace = Duration::from_secs(5);
        change(&mut config);
        self.services
            .spawn(devfleet_dev_worker::run(config, self.shutdown.clone()));
    }

    pub(crate) async fn submit(&self, plan: &PlanAnalyzed) {
        crate::support::submit(&self.connections, plan).await
    }

    pub(crate) async fn finished(&self, plan_id: &str, timeout: Duration) -> PlanRecord {
        self.plan_where(plan_id, "end", timeout, |p| p.status.is_final())
            .await
    }

    /// Waits until the plan's record satisfies `check`.
    async fn plan_where(
        &self,
        plan_id: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&PlanRecord) -> bool,
    ) -> PlanRecord {
        crate::support::plan_where(&self.connections, plan_id, what, timeout, check).await
    }

    async fn counter(&self, name: &str) -> i64 {
        self.connections.store.counter(name).await.unwrap()
    }

    async fn states(&self, plan_id: &str) -> BTreeMap<String, TaskState> {
        self.connections
            .store
            .tasks(plan_id)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.path, t.state))
            .collect()
    }

    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        within("services to stop", Duration::from_secs(30), async {
            while let Some(joined) = self.services.join_next().await {
                joined.expect("service panicked").expect("service failed");
            }
        })
        .await;
    }
}

/// One task: path, dependencies, spec, content.
pub(crate) struct T {
    path: String,
    deps: Vec<String>,
    pub(crate) spec: String,
    content: Option<String>,
    priority: Option<u32>,
}

pub(crate) fn t<S: AsRef<str>>(path: impl Into<String>, deps: &[S]) -> T {
    let path = path.into();
    T {
        spec: format!("spec of {path}"),
        content: Some(format!("# {path}\n")),
        path,
        deps: deps.iter().map(|d| d.as_ref().to_owned()).collect(),
        priority: None,
    }
}

/// An analyzed plan. Tasks must come after their dependencies; priorities
/// default to the longest remaining path (every estimate 1), as the
/// analyzer computes them.
pub(crate) fn analyzed(tasks: Vec<T>, executor: ExecutorKind) -> PlanAnalyzed {
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.path.as_str(), i))
        .collect();
    let mut longest = vec![1u32; tasks.len()];
    for i in (0..tasks.len()).rev() {
        for d in &tasks[i].deps {
            let j = index[d.as_str()];
            longest[j] = longest[j].max(longest[i] + 1);
        }
    }
    let mut batch = vec![0u32; tasks.len()];
    for i in 0..tasks.len() {
        for d in &tasks[i].deps {
            batch[i] = batch[i].max(batch[index[d.as_str()]] + 1);
        }
    }
    let critical = longest.iter().copied().max().unwrap_or(0);
    let analyzed_tasks = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| AnalyzedTask {
            path: t.path.clone(),
            spec: t.spec.clone(),
            content: t.content.clone(),
            depends_on: t.deps.clone(),
            estimate: 1,
            priority: t.priority.unwrap_or(longest[i]),
            batch: batch[i],
            executor: None,
            base_imports: Vec::new(),
        })
        .collect();
    PlanAnalyzed {
        plan_id: unique("plan"),
        plan: Plan {
            requires: Vec::new(),
            name: "test".into(),
            base: None,
            base_snapshot: None,
            executor: Some(executor),
            tasks: vec![],
            integration: vec![],
            deploy: None,
            budget: None,
        },
        tasks: analyzed_tasks,
        critical_path_length: u64::from(critical),
        critical_path: vec![],
    }
}

/// A deep DAG: a backbone chain (every task but each fifth depends on the
/// one before) plus pseudo-random edges back up to 12 tasks.
fn deep_dag(n: usize) -> Vec<T> {
    let name = |i: usize| format!("src/m{i:03}.py");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| {
            let mut deps = BTreeSet::new();
            if i > 0 && i % 5 != 0 {
                deps.insert(name(i - 1));
            }
            if i > 1 {
                for _ in 0..(next() % 3) {
                    let back = 1 + (next() as usize % 12).min(i - 1);
                    deps.insert(name(i - back));
                }
            }
            t(name(i), &deps.into_iter().collect::<Vec<_>>())
        })
        .collect()
}

fn builtin_recorder() -> (Arc<Recording>, Executors) {
    let rec = Recording::new(Arc::new(devfleet_dev_worker::executor::builtin::Builtin));
    let executors = Executors::new(ExecutorKind::Builtin).with(ExecutorKind::Builtin, rec.clone());
    (rec, executors)
}

fn simulate_recorder() -> (Arc<Recording>, Executors) {
    let rec = Recording::new(Arc::new(Simulate::new(SimulateSettings {
        unit: Duration::ZERO,
        ..SimulateSettings::default()
    })));
    let executors =
        Executors::new(ExecutorKind::Simulate).with(ExecutorKind::Simulate, rec.clone());
    (rec, executors)
}

async fn deep_dag_completes_once(backend: Backend, n: usize) {
    let mut stack = Stack::new(backend).await;
    let (rec, executors) = builtin_recorder();
    stack.scheduler();
    stack.worker(executors.clone(), 4, 4);
    stack.worker(executors, 4, 4);
    let tasks = deep_dag(n);
    let deps: HashMap<String, Vec<String>> = tasks
        .iter()
        .map(|t| (t.path.clone(), t.deps.clone()))
        .collect();
    let plan = analyzed(tasks, ExecutorKind::Builtin);
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(240))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    assert_eq!(record.done as usize, n);

    let runs = rec.runs();
    assert_eq!(runs.len(), n, "every task runs exactly once");
    let position: HashMap<&str, usize> = runs
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    assert_eq!(position.len(), n, "no task ran twice");
    for (path, ds) in &deps {
        for d in ds {
            assert!(
                position[d.as_str()] < position[path.as_str()],
                "{path} started before its dependency {d}"
            );
        }
    }
    assert_eq!(stack.counter(TASKS_COMPLETED).await, n as i64);
    assert!(stack
        .states(&plan.plan_id)
        .await
        .values()
        .all(|s| *s == TaskState::Done));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deep_dag_of_300_tasks_completes_with_every_task_run_once() {
    deep_dag_completes_once(Backend::Real, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_deep_dag_completes_with_every_task_run_once() {
    deep_dag_completes_once(Backend::Nats, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_deep_dag_completes_with_every_task_run_once() {
    deep_dag_completes_once(Backend::Memory, 120).await;
}

async fn one_slot_follows_priority(backend: Backend) {
    let mut stack = Stack::new(backend).await;
    let (rec, executors) = simulate_recorder();
    stack.scheduler();
    stack.worker(executors, 1, 1);
    // Independent tasks with distinct priorities, listed in a scrambled order.
    let n = 40u32;
    let tasks: Vec<T> = (0..n)
        .map(|i| {
            let priority = (i * 17) % n + 1;
            let mut task = t(format!("p{priority:02}.py"), &[] as &[&str]);
            task.priority = Some(priority);
            task
        })
        .collect();
    let mut expected: Vec<(u32, String)> = tasks
        .iter()
        .map(|t| (t.priority.unwrap_or(0), t.path.clone()))
        .collect();
    expected.sort_by_key(|e| std::cmp::Reverse(e.0));
    let expected: Vec<String> = expected.into_iter().map(|(_, p)| p).collect();
    let plan = analyzed(tasks, ExecutorKind::Simulate);
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded);
    assert_eq!(rec.runs(), expected, "dispatch order must follow priority");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_slot_dispatch_order_equals_priority_order() {
    one_slot_follows_priority(Backend::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_one_slot_dispatch_order_equals_priority_order() {
    one_slot_follows_priority(Backend::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_one_slot_dispatch_order_equals_priority_order() {
    one_slot_follows_priority(Backend::Memory).await;
}

/// Every task downstream of `changed` (itself included).
fn downstream(tasks: &[T], changed: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::from([changed.to_owned()]);
    // Tasks are in dependency order, so one pass suffices.
    for t in tasks {
        if t.deps.iter().any(|d| set.contains(d)) {
            set.insert(t.path.clone());
        }
    }
    set
}

async fn reruns_hit_the_cache(backend: Backend) {
    let mut stack = Stack::new(backend).await;
    let (rec, executors) = simulate_recorder();
    stack.scheduler();
    stack.worker(executors, 4, 4);
    let build = || deep_dag(30);
    let total = build().len();

    let first = analyzed(build(), ExecutorKind::Simulate);
    stack.submit(&first).await;
    let r = stack
        .finished(&first.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(r.status, PlanStatus::Succeeded);
    assert_eq!(rec.take().len(), total);

    // The same plan again, under a new id: nothing runs.
    let hits_before = stack.counter(devfleet_dev_worker::CACHE_HITS).await;
    let second = analyzed(build(), ExecutorKind::Simulate);
    stack.submit(&second).await;
    let r = stack
        .finished(&second.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(r.status, PlanStatus::Succeeded);
    assert!(rec.take().is_empty(), "a re-run must be all cache hits");
    let hits = stack.counter(devfleet_dev_worker::CACHE_HITS).await - hits_before;
    assert_eq!(hits, total as i64);

    // One spec changes: exactly it and its downstream run again.
    let changed = "src/m012.py";
    let mut tasks = build();
    let expected = downstream(&tasks, changed);
    assert!(expected.len() > 1 && expected.len() < total, "{expected:?}");
    for t in &mut tasks {
        if t.path == changed {
            t.spec.push_str(" (now with logging)");
        }
    }
    let third = analyzed(tasks, ExecutorKind::Simulate);
    stack.submit(&third).await;
    let r = stack
        .finished(&third.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(r.status, PlanStatus::Succeeded);
    let reran: BTreeSet<String> = rec.take().into_iter().collect();
    assert_eq!(reran, expected);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rerun_is_all_cache_hits_and_a_changed_spec_reruns_exactly_its_downstream() {
    reruns_hit_the_cache(Backend::Real).await;
}

/// Usage totals per plan and model equal what the executor reported; a
/// re-run made of cache hits records none; the fleet's totals per model
/// equal the sum.
async fn usage_is_recorded_per_task_plan_and_model(backend: Backend) {
    let mut stack = Stack::new(backend).await;
    let metered = Metered::new(Arc::new(Simulate::new(SimulateSettings {
        unit: Duration::ZERO,
        ..SimulateSettings::default()
    })));
    let executors =
        Executors::new(ExecutorKind::Simulate).with(ExecutorKind::Simulate, metered.clone());
    stack.scheduler();
    stack.worker(executors.clone(), 4, 4);
    stack.worker(executors, 4, 4);
    let first = analyzed(deep_dag(24), ExecutorKind::Simulate);
    stack.submit(&first).await;
    let r = stack
        .finished(&first.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(r.status, PlanStatus::Succeeded);
    let store = &stack.connections.store;
    let usage = store.plan_usage(&first.plan_id).await.unwrap();
    let reported = metered.reported();
    assert_eq!(usage.by_model, reported, "the plan's usage per model");
    assert_eq!(usage.by_task.len(), 24, "every task's run is counted");
    assert_eq!(usage.total.calls, 24, "each run once");
    assert_eq!(usage.total.cost_nusd, 24 * 125_000);
    let path = "src/m007.py";
    assert_eq!(
        usage.by_task.get(path).map(|t| (t.tokens_in, t.tokens_out)),
        Some((100 + path.len() as u64, 7))
    );

    // The same plan again: all cache hits, no executor ran, no usage.
    let second = analyzed(deep_dag(24), ExecutorKind::Simulate);
    stack.submit(&second).await;
    let r = stack
        .finished(&second.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(r.status, PlanStatus::Succeeded);
    assert!(store.plan_usage(&second.plan_id).await.unwrap().is_empty());
    assert_eq!(metered.reported(), reported, "nothing ran again");
    assert_eq!(store.usage_by_model().await.unwrap(), reported);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_totals_equal_what_the_executor_reported_and_cache_hits_cost_nothing() {
    usage_is_recorded_per_task_plan_and_model(Backend::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_usage_totals_equal_what_the_executor_reported_and_cache_hits_cost_nothing() {
    usage_is_recorded_per_task_plan_and_model(Backend::Memory).await;
}

/// A plan runs out of its budget: the task that
/// does not fit is handed back, the plan ends `budget_exhausted` with
/// nothing failed or dead-lettered and the spend within the limit; `devfleet
/// budget` raises it and the plan then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_out_of_budget_ends_budget_exhausted_and_devfleet_budget_resumes_it() {
    let mut stack = Stack::new(Backend::Real).await;
    let metered = Metered::new(Arc::new(Simulate::new(SimulateSettings {
        unit: Duration::ZERO,
        ..SimulateSettings::default()
    })));
    let executors =
        Executors::new(ExecutorKind::Simulate).with(ExecutorKind::Simulate, metered.clone());
    stack.scheduler();
    // The workers' default (100 tokens) would stop the first call: the
    // plan's own budget wins over it.
    stack.worker_with(executors, 2, 2, |config| {
        config.default_budget = BudgetLimits {
            max_tokens: Some(100),
            max_cost_nusd: None,
        };
    });
    let chain: Vec<T> = (0..6)
        .map(|i| {
            let deps: Vec<String> = (i > 0)
                .then(|| format!("src/m{:03}.py", i - 1))
                .into_iter()
                .collect();
            t(format!("src/m{i:03}.py"), &deps)
        })
        .collect();
    let mut plan = analyzed(chain, ExecutorKind::Simulate);
    // Each run reports 111 + 7 = 118 tokens and reserves 111 + 10 = 121:
    // three runs fit in 400 (the fourth would need 354 + 121).
    plan.plan.budget = Some(devfleet_protocol::PlanBudget {
        max_tokens: Some(400),
        max_cost_usd: Some(10.0),
    });
    stack.submit(&plan).await;
    let paused = stack
        .plan_where(
            &plan.plan_id,
            "run out of budget",
            Duration::from_secs(120),
            |p| p.status == PlanStatus::BudgetExhausted,
        )
        .await;
    let message = paused.message.unwrap_or_default();
    assert!(
        message.contains("budget exhausted") && message.contains("devfleet budget"),
        "{message}"
    );
    let store = stack.connections.store.clone();
    let states = stack.states(&plan.plan_id).await;
    let done = states.values().filter(|s| **s == TaskState::Done).count();
    assert_eq!(done, 3, "{states:?}");
    assert_eq!(
        states["src/m003.py"],
        TaskState::Ready,
        "handed back: {states:?}"
    );
    assert!(
        !states
            .values()
            .any(|s| matches!(s, TaskState::Failed | TaskState::Blocked)),
        "{states:?}"
    );
    assert!(
        store.kv_list("dlq").await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    let budget = store.budget(&plan.plan_id).await.unwrap();
    assert_eq!(budget.spent.tokens, 3 * 118);
    assert_eq!(budget.reserved.tokens, 0);
    assert_eq!(
        store.plan_usage(&plan.plan_id).await.unwrap().total.calls,
        3
    );

    let cli = |args: &[&str]| crate::support::cli(&stack.connections, args);
    // `devfleet status` says what was spent against which limit.
    let status = cli(&["status", &plan.plan_id]);
    assert!(
        status.contains("budget_exhausted")
            && status.contains("usage       354 tokens")
            && status.contains("354 spent, 0 reserved, limit 400"),
        "{status}"
    );

    // Raised with the CLI: the plan runs again and succeeds.
    let stdout = cli(&["budget", &plan.plan_id, "--max-tokens", "2000"]);
    assert!(
        stdout.contains("limit 2000") && stdout.contains("resumed"),
        "{stdout}"
    );
    let r = stack
        .finished(&plan.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(r.status, PlanStatus::Succeeded, "{r:?}");
    let budget = store.budget(&plan.plan_id).await.unwrap();
    // The handed-back task ran as its attempt 2 (7 more tokens out).
    assert_eq!(
        (budget.spent.tokens, budget.reserved.tokens),
        (6 * 118 + 7, 0)
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_rerun_is_all_cache_hits_and_a_changed_spec_reruns_exactly_its_downstream() {
    reruns_hit_the_cache(Backend::Memory).await;
}

async fn failure_blocks_dependents(backend: Backend) {
    let mut stack = Stack::new(backend).await;
    let (_, executors) = builtin_recorder();
    stack.scheduler();
    stack.worker(executors, 2, 2);
    let a = "a.py".to_owned();
    let broken = "broken.py".to_owned();
    let mut no_content = t(&broken, &[&a]);
    no_content.content = None;
    let tasks = vec![
        t(&a, &[] as &[&str]),
        no_content,
        t("after_broken.py", &[&broken]),
        t("after_after.py", &["after_broken.py"]),
        t("independent.py", &[&a]),
        t("alone.py", &[] as &[&str]),
    ];
    let plan = analyzed(tasks, ExecutorKind::Builtin);
    stack.submit(&plan).await;
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Failed);
    let message = record.message.unwrap_or_default();
    assert!(
        message.contains("broken.py") && message.contains("no content"),
        "{message}"
    );
    let states = stack.states(&plan.plan_id).await;
    assert_eq!(states["broken.py"], TaskState::Failed);
    assert_eq!(states["after_broken.py"], TaskState::Blocked);
    assert_eq!(states["after_after.py"], TaskState::Blocked);
    for done in ["a.py", "independent.py", "alone.py"] {
        assert_eq!(states[done], TaskState::Done, "{done}");
    }
    let blocked = stack
        .connections
        .store
        .task(&plan.plan_id, "after_after.py")
        .await
        .unwrap()
        .unwrap();
    assert!(
        blocked.error.unwrap_or_default().contains("broken.py"),
        "the blocked task names the cause"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_task_blocks_its_dependents_and_fails_the_plan() {
    failure_blocks_dependents(Backend::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_a_failed_task_blocks_its_dependents_and_fails_the_plan() {
    failure_blocks_dependents(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_a_redelivered_plan_creates_and_runs_nothing_twice() {
    let mut stack = Stack::new(Backend::Memory).await;
    let (rec, executors) = builtin_recorder();
    stack.scheduler();
    stack.worker(executors, 2, 2);
    let plan = analyzed(deep_dag(10), ExecutorKind::Builtin);
    stack.submit(&plan).await;
    stack.submit(&plan).await;
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Succeeded);
    assert_eq!(record.total, 10);
    assert_eq!(rec.runs().len(), 10);
    assert_eq!(stack.counter(TASKS_COMPLETED).await, 10);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_a_worker_drops_messages_for_tasks_held_elsewhere_or_finished() {
    let mut stack = Stack::new(Backend::Memory).await;
    let (rec, executors) = builtin_recorder();
    // No scheduler: this test plays the dispatcher itself.
    stack.worker(executors, 2, 2);
    let plan = analyzed(
        vec![t("held.py", &[] as &[&str]), t("done.py", &[] as &[&str])],
        ExecutorKind::Builtin,
    );
    let store = stack.connections.store.clone();
    let tasks = devfleet_scheduler::intake::new_tasks(&plan);
    let record = PlanRecord::new(&plan.plan_id, "test", PlanStatus::Running, 0);
    assert!(store.create_plan(record, tasks).await.unwrap());
    // Another worker holds one task; the other is already finished.
    let outcome = store
        .claim(
            &plan.plan_id,
            "held.py",
            "someone-else",
            None,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, devfleet_store::ClaimOutcome::Claimed(_)));
    let finisher = store
        .claim(
            &plan.plan_id,
            "done.py",
            "finisher",
            None,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let devfleet_store::ClaimOutcome::Claimed(finisher) = finisher else {
        panic!("claiming done.py: {finisher:?}")
    };
    let fence = devfleet_store::Fence::of(&finisher);
    store
        .mark_built(&plan.plan_id, "done.py", &fence, "h")
        .await
        .unwrap();
    store
        .complete(&plan.plan_id, "done.py", &fence, "h")
        .await
        .unwrap();

    for path in ["held.py", "done.py"] {
        stack
            .connections
            .publish(
                queues::WORK_DEV,
                devfleet_protocol::TaskWork {
                    plan_id: plan.plan_id.clone(),
                    path: path.into(),
                    attempt: 1,
                    class: devfleet_protocol::TaskClass::New,
                },
            )
            .await
            .unwrap();
    }
    // Both messages are taken and acked without running anything.
    let bus = stack.connections.bus.clone();
    let queue = stack.connections.queue(queues::WORK_DEV);
    wait_for(
        "the worker to take both messages",
        Duration::from_secs(10),
        || {
            let bus = bus.clone();
            let queue = queue.clone();
            async move { (bus.queue_depth(&queue).await.ok()? == 0).then_some(()) }
        },
    )
    .await;
    // The worker's capacity record shows it idle again once it settled them.
    wait_for("the worker to be idle", Duration::from_secs(10), || {
        let store = store.clone();
        async move {
            let fleet = devfleet_contracts::capacity::read_fleet(
                store.as_ref(),
                devfleet_protocol::now_ms(),
            )
            .await
            .ok()?;
            (fleet.workers == 1 && fleet.busy == 0 && fleet.waiting == 0).then_some(())
        }
    })
    .await;
    assert!(rec.runs().is_empty(), "ran {:?}", rec.runs());
    let held = store.task(&plan.plan_id, "held.py").await.unwrap().unwrap();
    assert_eq!(held.lease_owner.as_deref(), Some("someone-else"));
    assert_eq!(held.state, TaskState::Leased);
    stack.stop().await;
}

// ---------------------------------------------------------------------
// The whole pipeline: scheduler (no direct seam) + dev-worker + router +
// qa-worker, and the stages after the tasks.
// ---------------------------------------------------------------------

/// Small Python files in a chain and a fan: valid for `py_compile`.
fn python_tasks(n: usize) -> Vec<T> {
    (0..n)
        .map(|i| {
            let path = format!("pkg/m{i:02}.py");
            let deps: Vec<String> = match i {
                0 => vec![],
                i if i % 4 == 0 => vec![format!("pkg/m{:02}.py", i - 4)],
                i => vec![format!("pkg/m{:02}.py", i - 1)],
            };
            let mut task = t(path, &deps);
            task.content = Some(format!("VALUE_{i} = {i}\n"));
            task
        })
        .collect()
}

fn step(name: &str, code: u8) -> IntegrationStep {
    IntegrationStep {
        requires: Vec::new(),
        name: name.into(),
        run: format!("python3 -c 'import sys; sys.exit({code})'"),
        shard: None,
        timeout_seconds: Some(60),
    }
}

fn with_stages(
    tasks: Vec<T>,
    integration: Vec<IntegrationStep>,
    deploy: Option<devfleet_protocol::DeploySpec>,
) -> PlanAnalyzed {
    let mut plan = analyzed(tasks, ExecutorKind::Builtin);
    plan.plan.integration = integration;
    plan.plan.deploy = deploy;
    plan
}

fn deploy_spec() -> devfleet_protocol::DeploySpec {
    Plan::parse(
        r#"
name: d
tasks: [{ path: a.py, spec: s }]
deploy:
  stages: [20, 100]
  stage_seconds: 5
  check_seconds: 1
  shift: { profile: lb, params: { pool: web } }
  health: { url: "http://127.0.0.1:9/stats" }
"#,
    )
    .expect("a valid deploy section")
    .deploy
    .expect("a deploy section")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integration_stage_fails_the_plan_naming_the_failing_step_and_succeeds_when_all_pass() {
    let mut stack = Stack::new(Backend::Real).await;
    let (_, executors) = builtin_recorder();
    stack.routed_pipeline();
    stack.worker(executors, 2, 4);
    let failing = with_stages(
        python_tasks(4),
        vec![step("passes", 0), step("exits-three", 3)],
        None,
    );
    let passing = with_stages(
        python_tasks(4),
        vec![step("first", 0), step("second", 0)],
        None,
    );
    stack.submit(&failing).await;
    stack.submit(&passing).await;

    let record = stack
        .finished(&failing.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Failed, "{record:?}");
    assert_eq!(record.done, 4, "every task passed; integration failed it");
    let message = record.message.unwrap_or_default();
    assert!(
        message.contains("'exits-three'"),
        "the failing step is named: {message}"
    );
    assert!(
        !message.contains("'passes'"),
        "the passing step is not: {message}"
    );
    let results = stack
        .connections
        .store
        .kv_list(&devfleet_scheduler::integration::results_collection(
            &failing.plan_id,
        ))
        .await
        .unwrap();
    let keys: Vec<&str> = results.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["exits-three#0", "passes#0"]);

    let record = stack
        .finished(&passing.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    assert_eq!(record.done, 4);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passing_integration_requests_a_deploy_and_a_plan_without_integration_deploys_at_once() {
    let mut stack = Stack::new(Backend::Real).await;
    let (_, executors) = builtin_recorder();
    stack.routed_pipeline();
    stack.worker(executors, 2, 4);
    let spec = deploy_spec();
    let integrated = with_stages(python_tasks(3), vec![step("ok", 0)], Some(spec.clone()));
    let direct = with_stages(python_tasks(3), vec![], Some(spec.clone()));
    // The test plays the canary: it takes the requests off deploy.requested.
    let mut requests = stack
        .connections
        .consume(queues::DEPLOY_REQUESTED, ConsumeOptions::default())
        .await
        .expect("consume deploy.requested");
    stack.submit(&integrated).await;
    stack.submit(&direct).await;

    let mut seen = BTreeMap::new();
    within("two deploy requests", Duration::from_secs(120), async {
        while seen.len() < 2 {
            let (envelope, delivery) = requests
                .next_envelope()
                .await
                .expect("the consumer is open")
                .expect("a decodable message");
            delivery.ack().await.expect("ack");
            let Message::DeployRequested(request) = envelope.message else {
                panic!("not a deploy request: {}", envelope.kind());
            };
            assert!(
                seen.insert(request.deployment_id.clone(), request)
                    .is_none(),
                "one request per plan"
            );
        }
    })
    .await;
    for plan in [&integrated, &direct] {
        let request = &seen[&plan.plan_id];
        assert_eq!(request.plan_id.as_deref(), Some(plan.plan_id.as_str()));
        assert_eq!(request.spec, spec);
        let record = stack.connections.store.plan(&plan.plan_id).await.unwrap();
        let record = record.expect("the plan");
        assert_eq!(record.status, PlanStatus::Deploying, "{record:?}");
        assert_eq!(record.done, 3);
    }
    // The canary's reports end the plans, through the scheduler only: the
    // promoted one succeeds, the rolled-back one fails with the reason (a
    // final plan stays final: the lifecycle's unit tests cover repeats).
    let report = |plan: &PlanAnalyzed, promoted: bool| DeployFinished {
        plan_id: plan.plan_id.clone(),
        deployment_id: plan.plan_id.clone(),
        promoted,
        message: if promoted {
            "deployment promoted".into()
        } else {
            "deployment rolled back: error rate 0.2 over 0.1".into()
        },
    };
    for (plan, promoted) in [(&integrated, true), (&direct, false)] {
        stack
            .connections
            .publish(queues::DEPLOY_FINISHED, report(plan, promoted))
            .await
            .expect("publish deploy.finished");
    }
    let ended = stack
        .finished(&integrated.plan_id, Duration::from_secs(60))
        .await;
    assert_eq!(ended.status, PlanStatus::Succeeded, "{ended:?}");
    let ended = stack
        .finished(&direct.plan_id, Duration::from_secs(60))
        .await;
    assert_eq!(ended.status, PlanStatus::Failed, "{ended:?}");
    assert!(
        ended
            .message
            .as_deref()
            .unwrap_or("")
            .contains("rolled back: error rate"),
        "{ended:?}"
    );
    // Only the plan with integration steps ran any.
    let store = &stack.connections.store;
    let ran = |id: &str| devfleet_scheduler::integration::results_collection(id);
    assert_eq!(
        store
            .kv_list(&ran(&integrated.plan_id))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .kv_list(&ran(&direct.plan_id))
        .await
        .unwrap()
        .is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthy_20_task_plan_completes_through_the_router_and_qa() {
    let mut stack = Stack::new(Backend::Real).await;
    let (rec, executors) = builtin_recorder();
    stack.routed_pipeline();
    stack.worker(executors, 2, 6);
    let plan = analyzed(python_tasks(20), ExecutorKind::Builtin);
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(180))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    assert_eq!(record.done, 20);
    let runs = rec.runs();
    assert_eq!(runs.len(), 20, "every task built once: {runs:?}");
    assert_eq!(stack.counter(TASKS_COMPLETED).await, 20);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_the_router_dead_letters_ends_its_plan_failed_by_the_scheduler() {
    let mut stack = Stack::new(Backend::Real).await;
    let (_, executors) = builtin_recorder();
    stack.routed_pipeline();
    stack.worker(executors, 1, 2);
    // The builtin executor fails a task without content as not retryable:
    // the router dead-letters it at once and blocks its dependent. No
    // completion follows, so only the router's report can end the plan.
    let mut broken = t("broken.py", &[] as &[&str]);
    broken.content = None;
    let plan = analyzed(
        vec![broken, t("after_broken.py", &["broken.py"])],
        ExecutorKind::Builtin,
    );
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Failed, "{record:?}");
    let task = stack
        .connections
        .store
        .task(&plan.plan_id, "broken.py")
        .await
        .unwrap()
        .unwrap();
    let reason = task.error.unwrap_or_default();
    assert!(
        reason.contains("not retryable") && reason.contains("no content"),
        "{reason}"
    );
    // The one wording of a plan failed by its tasks, wherever it failed.
    assert_eq!(
        record.message.as_deref(),
        Some(format!("1 task(s) failed: broken.py ({reason}); 1 blocked; 0 of 2 done").as_str())
    );
    stack.stop().await;
}

/// Writes the `dev` breaker record the router publishes.
async fn set_dev_breaker(stack: &Stack, phase: Phase, generation: u64, probes: u32) -> String {
    let mut state = BreakerState::initial(devfleet_protocol::Stage::Dev);
    state.state = phase;
    state.generation = generation;
    state.since_ms = devfleet_protocol::now_ms();
    state.reason = format!("set by the test ({})", phase.as_str());
    state.probes = probes;
    state.probe_counter = format!("breaker.dev.probes.{generation}");
    stack
        .connections
        .store
        .kv_put(
            breaker::BREAKER,
            "dev",
            &serde_json::to_string(&state).unwrap(),
            None,
        )
        .await
        .unwrap();
    state.probe_counter
}

/// Waits for `n` `queue_status` samples from `source` that satisfy `check`:
/// proof that the dispatcher ran that many once-a-second cycles so.
async fn status_samples(
    listener: &mut devfleet_bus::Listener,
    source: &str,
    n: usize,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    within(what, Duration::from_secs(30), async {
        let mut seen = 0;
        while seen < n {
            let (_, payload) = listener.next().await.expect("the listener is open");
            let Ok(envelope) = Envelope::decode(&payload) else {
                continue;
            };
            if let Message::Metric(m) = envelope.message {
                if m.source == source && check(&m.data) {
                    seen += 1;
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_breaker_open_dispatches_nothing_half_open_admits_exactly_the_probes_closed_resumes() {
    let mut stack = Stack::new(Backend::Real).await;
    let (rec, executors) = builtin_recorder();
    set_dev_breaker(&stack, Phase::Open, 1, 2).await;
    let mut listener = stack
        .connections
        .broadcast
        .listen(&queues::metric_subject(
            devfleet_protocol::MetricType::QueueStatus,
        ))
        .await
        .expect("listen for queue_status");
    // No router here: the scheduler completes built tasks itself, and the
    // test plays the router's breaker.
    let mut config = stack.scheduler_config();
    config.direct_routing = true;
    let source = unique("scheduler");
    config.instance = source.clone();
    stack
        .services
        .spawn(devfleet_scheduler::run(config, stack.shutdown.clone()));
    stack.worker(executors, 2, 2);
    let tasks: Vec<T> = (0..6)
        .map(|i| t(format!("f{i}.py"), &[] as &[&str]))
        .collect();
    let plan = analyzed(tasks, ExecutorKind::Builtin);
    stack.submit(&plan).await;

    // Open: cycle after cycle sees six Ready tasks and sends none.
    status_samples(
        &mut listener,
        &source,
        2,
        "two dispatch cycles holding six tasks behind the open breaker",
        |d| d["dev_breaker"] == "open" && d["ready_len"] == 6,
    )
    .await;
    assert!(
        rec.runs().is_empty(),
        "dispatched while open: {:?}",
        rec.runs()
    );
    assert!(stack
        .states(&plan.plan_id)
        .await
        .values()
        .all(|s| *s == TaskState::Ready));

    // Half-open with two probes: exactly two tasks go out.
    let counter = set_dev_breaker(&stack, Phase::HalfOpen, 2, 2).await;
    stack
        .plan_where(
            &plan.plan_id,
            "complete two probes",
            Duration::from_secs(30),
            |p| p.done >= 2,
        )
        .await;
    status_samples(
        &mut listener,
        &source,
        2,
        "two dispatch cycles holding four tasks while half-open",
        |d| d["dev_breaker"] == "half_open" && d["ready_len"] == 4,
    )
    .await;
    assert_eq!(rec.runs().len(), 2, "probes dispatched: {:?}", rec.runs());
    assert_eq!(
        stack.counter(&counter).await,
        3,
        "two permits granted, one refused, then no more asked"
    );
    let record = stack
        .connections
        .store
        .plan(&plan.plan_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((record.done, record.status), (2, PlanStatus::Running));

    // Closed: the rest goes out.
    set_dev_breaker(&stack, Phase::Closed, 3, 2).await;
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Succeeded);
    let mut runs = rec.runs();
    runs.sort();
    runs.dedup();
    assert_eq!(runs.len(), 6, "every task ran once");
    assert_eq!(rec.runs().len(), 6);
    stack.stop().await;
}

/// A RabbitMQ node of the test's own (`scripts/servers.sh up`, its own
/// ports and data) with `consumer_timeout = 60000`, and the channel tick
/// that checks it every second instead of every minute (RabbitMQ 3.10
/// checks the timeout on that tick only), so a delivery held unsettled for
/// a minute is taken back within about 61 s. Killed on drop.
struct TimeoutNode {
    dir: std::path::PathBuf,
    url: String,
}

impl TimeoutNode {
    fn start() -> TimeoutNode {
        let dir = std::env::temp_dir().join(unique("consumer-timeout"));
        std::fs::create_dir_all(dir.join("rabbitmq")).unwrap();
        // Five distinct free ports, held until all are picked.
        let held: Vec<std::net::TcpListener> = (0..5)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(held);
        let names = [
            "REDIS_PORT",
            "NATS_PORT",
            "RABBIT_PORT",
            "RABBIT_DIST_PORT",
            "EPMD_PORT",
        ];
        let file: String = names
            .iter()
            .zip(&ports)
            .map(|(name, port)| format!("{name}={port}\n"))
            .collect();
        std::fs::write(dir.join("ports"), file).unwrap();
        std::fs::write(
            dir.join("rabbitmq/rabbitmq.conf"),
            "disk_free_limit.absolute = 50MB\nlog.console = false\nconsumer_timeout = 60000\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("rabbitmq/advanced.config"),
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n",
        )
        .unwrap();
        let node = TimeoutNode {
            url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", ports[2]),
            dir,
        };
        let status = std::process::Command::new(crate::support::repo().join("scripts/servers.sh"))
            .args(["up", node.dir.to_str().unwrap(), "rabbitmq"])
            .status()
            .expect("running scripts/servers.sh");
        assert!(
            status.success(),
            "the test's own RabbitMQ node did not start"
        );
        node
    }
}

impl Drop for TimeoutNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new(crate::support::repo().join("scripts/servers.sh"))
            .args(["kill", self.dir.to_str().unwrap_or_default(), "rabbitmq"])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Long work vs RabbitMQ's `consumer_timeout`: an integration shard that
/// outlives it by 20 s runs exactly once and the plan succeeds (before the
/// fix the broker took the delivery back after a minute and a second
/// worker slot ran the shard again). The step appends a line to a file
/// each time it starts; the qa-worker runs it unsandboxed to reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_an_integration_shard_longer_than_rabbitmq_consumer_timeout_runs_exactly_once() {
    let node = TimeoutNode::start();
    let mut stack = Stack::on_broker(&node.url).await;
    let (_, executors) = builtin_recorder();
    stack.routed_pipeline_with(|qa| {
        qa.sandbox.mode = devfleet_qa_worker::SandboxMode::None;
        qa.sandbox.uid_base = None;
        qa.sandbox.allow_unsandboxed = true;
        // Settle well before the node's 60 s consumer_timeout.
        qa.settle_after = Duration::from_secs(10);
        // A slot for the shard and one waiting on each queue, so a
        // redelivery would be taken at once.
        qa.concurrency = 3;
    });
    stack.worker(executors, 1, 2);
    let starts = node.dir.join("starts");
    let step = IntegrationStep {
        requires: Vec::new(),
        name: "outlives-the-consumer-timeout".into(),
        run: format!("sh -c 'echo started >> {}; sleep 80'", starts.display()),
        shard: None,
        timeout_seconds: Some(200),
    };
    let plan = with_stages(python_tasks(2), vec![step], None);
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(240))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    let started = std::fs::read_to_string(&starts).unwrap_or_default();
    assert_eq!(
        started.lines().count(),
        1,
        "the shard ran exactly once: {started:?}"
    );
    stack.stop().await;
}
