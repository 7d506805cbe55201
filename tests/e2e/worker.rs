//! Dev-workers as real processes and under load, over real RabbitMQ and
//! Redis: a worker killed with SIGKILL mid-run, a worker paused (SIGSTOP)
//! past its lease, autoscaling, and handing work back on shutdown.
//!
//! The scheduler runs in this process; workers run either in-process or as
//! the `dev-worker` binary. Each test has its own namespace (queue prefix
//! and Redis key prefix), so tests sharing the servers never see each
//! other's work.

use devfleet_contracts::capacity::{WorkerCapacity, WORKERS};
use devfleet_dev_worker::{Executors, ScalePolicy};
use devfleet_protocol::{AnalyzedTask, ExecutorKind, Plan, PlanAnalyzed, PlanStatus};
use devfleet_runtime::Connections;
use devfleet_scheduler::TASKS_COMPLETED;
use devfleet_store::{PlanRecord, TaskState};
use devfleet_testkit::{amqp_url, redis_url, unique, wait_for, within};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

struct Stack {
    connections: Connections,
    shutdown: CancellationToken,
    services: JoinSet<anyhow::Result<()>>,
}

impl Stack {
    /// Connections in a fresh namespace: its own queues and Redis key prefix
    /// (`devfleet:<namespace>`), exactly what a `dev-worker` process started
    /// with `DEVFLEET_NAMESPACE=<namespace>` connects to.
    async fn real() -> Stack {
        devfleet_telemetry::init_for_tests();
        let namespace = unique("t");
        let bus = devfleet_bus::connect(&amqp_url()).await.expect("RabbitMQ");
        let store =
            devfleet_store::connect_with_prefix(&redis_url(), &format!("devfleet:{namespace}"))
                .await
                .expect("Redis");
        Stack {
            connections: Connections {
                broadcast: bus.clone(),
                bus,
                store,
                namespace,
            },
            shutdown: CancellationToken::new(),
            services: JoinSet::new(),
        }
    }

    fn scheduler(&mut self) {
        self.scheduler_with(|_| {});
    }

    /// [`Self::scheduler`] with settings changed by `edit`.
    fn scheduler_with(&mut self, edit: impl FnOnce(&mut devfleet_scheduler::Config)) {
        let mut config = devfleet_scheduler::Config::new(self.connections.clone());
        // These tests run no router: built tasks complete directly.
        config.direct_routing = true;
        config.dispatch_tick = Duration::from_millis(10);
        config.reap_interval = Duration::from_millis(100);
        config.dispatch_lease = Duration::from_secs(5);
        // A worker killed between recording a task Built and announcing it
        // leaves the task to the watchdog (on RabbitMQ the delivery was
        // acked at the claim): announce such tasks within seconds here.
        config.watchdog_interval = Duration::from_millis(250);
        config.watchdog_stall = Duration::from_secs(3);
        edit(&mut config);
        self.services
            .spawn(devfleet_scheduler::run(config, self.shutdown.clone()));
    }

    fn worker_config(
        &self,
        executors: Executors,
        scale: ScalePolicy,
    ) -> devfleet_dev_worker::Config {
        let mut config = devfleet_dev_worker::Config::new(self.connections.clone());
        config.executors = executors;
        config.scale = scale;
        config.lease = Duration::from_secs(1);
        config.heartbeat_ttl = Duration::from_secs(2);
        config
    }

    /// A `dev-worker` process on the same servers and namespace.
    fn spawn_process(&self, instance: &str, slots: u32) -> tokio::process::Child {
        self.spawn_process_with(instance, slots, &[])
    }

    /// [`Self::spawn_process`] with more (or overriding) variables.
    fn spawn_process_with(
        &self,
        instance: &str,
        slots: u32,
        extra: &[(&str, &str)],
    ) -> tokio::process::Child {
        tokio::process::Command::new(crate::support::service_binary("dev-worker"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DEVFLEET_BUS", "amqp")
            .env("DEVFLEET_AMQP_URL", amqp_url())
            .env("DEVFLEET_REDIS_URL", redis_url())
            .env("DEVFLEET_NAMESPACE", &self.connections.namespace)
            .env("DEVFLEET_DEV_INSTANCE", instance)
            .env("DEVFLEET_EXECUTOR", "simulate")
            .env("DEVFLEET_SIMULATE_UNIT_SECONDS", "0.1")
            .env("DEVFLEET_DEV_MIN_SLOTS", slots.to_string())
            .env("DEVFLEET_DEV_MAX_SLOTS", slots.to_string())
            .env("DEVFLEET_DEV_LEASE_SECONDS", "1.5")
            .env("DEVFLEET_DEV_HEARTBEAT_TTL_SECONDS", "1.5")
            .env("DEVFLEET_DEV_SHUTDOWN_GRACE_SECONDS", "10")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning the dev-worker binary")
    }

    async fn submit(&self, plan: &PlanAnalyzed) {
        crate::support::submit(&self.connections, plan).await
    }

    async fn finished(&self, plan_id: &str, timeout: Duration) -> PlanRecord {
        crate::support::plan_where(&self.connections, plan_id, "end", timeout, |p| {
            p.status.is_final()
        })
        .await
    }

    async fn capacity(&self, instance: &str) -> Option<WorkerCapacity> {
        let json = self
            .connections
            .store
            .kv_get(WORKERS, instance)
            .await
            .ok()
            .flatten()?;
        serde_json::from_str(&json).ok()
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        within("services to stop", Duration::from_secs(30), async {
            while let Some(joined) = self.services.join_next().await {
                joined.expect("service panicked").expect("service failed");
            }
        })
        .await;
    }
}

/// `n` tasks of estimate `estimate`; task `i` depends on task `i - width`,
/// so `width` chains run side by side.
fn chains(n: usize, width: usize, estimate: u32) -> PlanAnalyzed {
    let name = |i: usize| format!("pkg/f{i:03}.py");
    let tasks = (0..n)
        .map(|i| AnalyzedTask {
            path: name(i),
            spec: format!("file {i}"),
            content: None,
            depends_on: if i >= width {
                vec![name(i - width)]
            } else {
                vec![]
            },
            estimate,
            priority: u32::try_from((n - i).div_ceil(width)).unwrap_or(1),
            batch: u32::try_from(i / width).unwrap_or(0),
            executor: None,
            base_imports: Vec::new(),
        })
        .collect();
    PlanAnalyzed {
        plan_id: unique("plan"),
        plan: Plan {
            requires: Vec::new(),
            name: "worker-test".into(),
            base: None,
            base_snapshot: None,
            executor: Some(ExecutorKind::Simulate),
            tasks: vec![],
            integration: vec![],
            deploy: None,
            budget: None,
        },
        tasks,
        critical_path_length: u64::try_from(n.div_ceil(width)).unwrap_or(0),
        critical_path: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_dev_worker_mid_run_loses_nothing_and_completes_nothing_twice() {
    let mut stack = Stack::real().await;
    stack.scheduler();
    let victim = unique("victim");
    let survivor = unique("survivor");
    // The victim's tasks take seconds, so it is surely mid-run when killed.
    let mut killed =
        stack.spawn_process_with(&victim, 3, &[("DEVFLEET_SIMULATE_UNIT_SECONDS", "2")]);
    let mut other = stack.spawn_process(&survivor, 3);
    let plan = chains(48, 6, 2);
    stack.submit(&plan).await;

    // Wait until the victim is in the middle of tasks and some are done.
    let store = stack.connections.store.clone();
    let plan_id = plan.plan_id.clone();
    let victim_name = victim.clone();
    wait_for(
        "the victim to hold leases mid-run",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            let plan_id = plan_id.clone();
            let victim = victim_name.clone();
            async move {
                let tasks = store.tasks(&plan_id).await.ok()?;
                let done = tasks.iter().filter(|t| t.state == TaskState::Done).count();
                let held = tasks.iter().any(|t| held_by(t, &victim));
                (done >= 6 && held).then_some(())
            }
        },
    )
    .await;
    killed.start_kill().expect("SIGKILL");
    let status = within("the victim to die", Duration::from_secs(10), killed.wait())
        .await
        .expect("wait");
    assert!(!status.success(), "the victim was killed, not stopped");
    // What the victim held when it died (its leases outlive it briefly).
    let held: Vec<String> = store
        .tasks(&plan_id)
        .await
        .unwrap()
        .iter()
        .filter(|t| held_by(t, &victim))
        .map(|t| t.path.clone())
        .collect();
    assert!(!held.is_empty(), "the victim died holding tasks");

    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    assert_eq!(record.done, 48);
    let tasks = stack.connections.store.tasks(&plan.plan_id).await.unwrap();
    assert!(tasks.iter().all(|t| t.state == TaskState::Done));
    for path in &held {
        let t = tasks.iter().find(|t| &t.path == path).unwrap();
        assert!(
            t.attempt >= 2,
            "{path} was running on the killed worker and ran again"
        );
    }
    let completed = stack
        .connections
        .store
        .counter(TASKS_COMPLETED)
        .await
        .unwrap();
    assert_eq!(completed, 48, "each task completed exactly once");

    // The survivor stops cleanly on SIGTERM and removes its capacity record.
    let pid = other.id().expect("survivor pid");
    // SAFETY: sending a signal to our own child has no memory-safety concerns.
    unsafe {
        libc::kill(i32::try_from(pid).unwrap(), libc::SIGTERM);
    }
    let status = within(
        "the survivor to exit",
        Duration::from_secs(30),
        other.wait(),
    )
    .await
    .expect("wait");
    assert!(status.success(), "graceful exit: {status:?}");
    assert!(stack.capacity(&survivor).await.is_none());
    stack.stop().await;
}

fn held_by(task: &devfleet_store::TaskRecord, owner: &str) -> bool {
    task.state == TaskState::Leased && task.lease_owner.as_deref() == Some(owner)
}

/// Sends `signal` to a child process.
fn signal(child: &tokio::process::Child, signal: i32) {
    let pid = child.id().expect("the child is running");
    // SAFETY: sending a signal to our own child has no memory-safety concerns.
    let sent = unsafe { libc::kill(i32::try_from(pid).unwrap(), signal) };
    assert_eq!(sent, 0, "sending signal {signal} to {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_paused_past_its_lease_cannot_overwrite_the_worker_that_took_over() {
    let mut stack = Stack::real().await;
    stack.scheduler();
    // Each worker writes its own name, so the artifact says whose it is.
    let command = [
        ("DEVFLEET_EXECUTOR", "command"),
        (
            "DEVFLEET_COMMAND",
            r#"sh -c 'sleep 3; printf "built by %s" "$DEVFLEET_DEV_INSTANCE"'"#,
        ),
        // The agent's environment is cleared but for an allow-list.
        ("DEVFLEET_COMMAND_ENV", "DEVFLEET_DEV_INSTANCE"),
    ];
    let paused = unique("paused");
    let successor = unique("successor");
    let mut victim = stack.spawn_process_with(&paused, 1, &command);
    let mut plan = chains(1, 1, 1);
    plan.plan.executor = Some(ExecutorKind::Command);
    plan.tasks[0].executor = None;
    stack.submit(&plan).await;
    let store = stack.connections.store.clone();
    let path = plan.tasks[0].path.clone();
    let leased_by = |owner: String| {
        let (store, plan_id, path) = (store.clone(), plan.plan_id.clone(), path.clone());
        move || {
            let (store, plan_id, path, owner) =
                (store.clone(), plan_id.clone(), path.clone(), owner.clone());
            async move {
                let t = store.task(&plan_id, &path).await.ok()??;
                (t.lease_owner.as_deref() == Some(owner.as_str())).then_some(t)
            }
        }
    };
    let first = wait_for(
        "the first worker to run the task",
        Duration::from_secs(60),
        leased_by(paused.clone()),
    )
    .await;
    // Paused mid-run, far past its 1.5 s lease.
    signal(&victim, libc::SIGSTOP);
    let mut other = stack.spawn_process_with(&successor, 1, &command);
    let second = wait_for(
        "another worker to take the task over",
        Duration::from_secs(60),
        leased_by(successor.clone()),
    )
    .await;
    assert!(second.attempt > first.attempt, "a new attempt");
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");

    // The paused worker resumes with its build in hand, then drains and
    // exits: whatever it tried to record or announce changed nothing.
    signal(&victim, libc::SIGCONT);
    signal(&victim, libc::SIGTERM);
    let status = within(
        "the resumed worker to exit",
        Duration::from_secs(30),
        victim.wait(),
    )
    .await
    .expect("wait");
    assert!(status.success(), "graceful exit: {status:?}");

    let t = store.task(&plan.plan_id, &path).await.unwrap().unwrap();
    assert_eq!((t.state, t.attempt), (TaskState::Done, second.attempt));
    let artifact = store
        .artifact(t.artifact.as_deref().expect("an artifact"))
        .await
        .unwrap()
        .expect("the artifact is stored");
    assert_eq!(
        String::from_utf8_lossy(&artifact),
        format!("built by {successor}"),
        "the artifact is the successor's"
    );
    let completed = store.counter(TASKS_COMPLETED).await.unwrap();
    assert_eq!(completed, 1, "done exactly once");
    let plan_after = store.plan(&plan.plan_id).await.unwrap().unwrap();
    assert_eq!(plan_after.done, 1);
    signal(&other, libc::SIGTERM);
    within(
        "the successor to exit",
        Duration::from_secs(30),
        other.wait(),
    )
    .await
    .expect("wait");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn autoscaling_goes_up_under_backlog_and_down_when_idle() {
    let mut stack = Stack::real().await;
    stack.scheduler();
    let mut listener = stack
        .connections
        .broadcast
        .listen("devfleet.metrics.worker_status")
        .await
        .expect("listen");
    let executors = Executors::new(ExecutorKind::Simulate).with(
        ExecutorKind::Simulate,
        Arc::new(devfleet_dev_worker::executor::simulate::Simulate::new(
            devfleet_dev_worker::executor::simulate::SimulateSettings {
                unit: Duration::from_millis(100),
                ..Default::default()
            },
        )),
    );
    let scale = ScalePolicy {
        min: 2,
        max: 6,
        up_after: 2,
        down_after: 3,
        tick: Duration::from_millis(100),
    };
    let config = stack.worker_config(executors, scale);
    let instance = config.instance.clone();
    // Read metrics as they come (a slow listener may miss broadcasts).
    let metric_peak = Arc::new(AtomicU64::new(0));
    let peak_seen = metric_peak.clone();
    let watched = instance.clone();
    let reader = tokio::spawn(async move {
        while let Some((_, payload)) = listener.next().await {
            let Ok(env) = devfleet_protocol::Envelope::decode(&payload) else {
                continue;
            };
            if let devfleet_protocol::Message::Metric(m) = env.message {
                if m.data["instance"] == watched.as_str() {
                    let slots = m.data["slots"].as_u64().unwrap_or(0);
                    peak_seen.fetch_max(slots, Ordering::Relaxed);
                }
            }
        }
    });
    let _reader = tokio_util::task::AbortOnDropHandle::new(reader);
    stack
        .services
        .spawn(devfleet_dev_worker::run(config, stack.shutdown.clone()));
    // 36 independent tasks of 300 ms: far more than two slots can take.
    let plan = chains(36, 36, 3);
    stack.submit(&plan).await;

    let peak = wait_for(
        "slots to grow under the backlog",
        Duration::from_secs(30),
        || async {
            stack
                .capacity(&instance)
                .await
                .filter(|c| c.slots > 2)
                .map(|c| c.slots)
        },
    )
    .await;
    assert!(peak <= 6);
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Succeeded);
    wait_for(
        "slots to shrink back when idle",
        Duration::from_secs(30),
        || async {
            stack
                .capacity(&instance)
                .await
                .filter(|c| c.slots == 2)
                .map(|_| ())
        },
    )
    .await;

    // The slot count was published as a worker_status metric.
    wait_for(
        "a worker_status metric with more than 2 slots",
        Duration::from_secs(10),
        || async { (metric_peak.load(Ordering::Relaxed) > 2).then_some(()) },
    )
    .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_hands_back_unfinished_work_and_another_worker_finishes_it() {
    let mut stack = Stack::real().await;
    stack.scheduler();
    let slow = Executors::new(ExecutorKind::Simulate).with(
        ExecutorKind::Simulate,
        Arc::new(devfleet_dev_worker::executor::simulate::Simulate::new(
            devfleet_dev_worker::executor::simulate::SimulateSettings {
                unit: Duration::from_secs(20),
                ..Default::default()
            },
        )),
    );
    let pinned = ScalePolicy {
        min: 2,
        max: 2,
        ..ScalePolicy::default()
    };
    let mut first = stack.worker_config(slow, pinned);
    first.shutdown_grace = Duration::from_millis(200);
    let first_name = first.instance.clone();
    let first_stop = CancellationToken::new();
    let first_run = tokio::spawn(devfleet_dev_worker::run(first, first_stop.clone()));

    let plan = chains(2, 2, 1);
    stack.submit(&plan).await;
    let store = stack.connections.store.clone();
    let plan_id = plan.plan_id.clone();
    wait_for(
        "the first worker to hold both tasks",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            let plan_id = plan_id.clone();
            let owner = first_name.clone();
            async move {
                let tasks = store.tasks(&plan_id).await.ok()?;
                tasks
                    .iter()
                    .all(|t| t.lease_owner.as_deref() == Some(owner.as_str()))
                    .then_some(())
            }
        },
    )
    .await;
    first_stop.cancel();
    within(
        "the first worker to hand back and stop",
        Duration::from_secs(5),
        first_run,
    )
    .await
    .expect("join")
    .expect("clean stop");

    let fast = Executors::new(ExecutorKind::Simulate).with(
        ExecutorKind::Simulate,
        Arc::new(devfleet_dev_worker::executor::simulate::Simulate::new(
            devfleet_dev_worker::executor::simulate::SimulateSettings {
                unit: Duration::ZERO,
                ..Default::default()
            },
        )),
    );
    let second = stack.worker_config(fast, pinned);
    stack
        .services
        .spawn(devfleet_dev_worker::run(second, stack.shutdown.clone()));
    let record = stack.finished(&plan.plan_id, Duration::from_secs(30)).await;
    assert_eq!(record.status, PlanStatus::Succeeded);
    assert_eq!(record.done, 2);
    stack.stop().await;
}

/// A one-task simulate plan whose plan level requires `capability`.
fn requiring(capability: &str) -> PlanAnalyzed {
    let mut plan = chains(1, 1, 1);
    plan.plan.requires = vec![capability.to_owned()];
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_needing_a_capability_no_worker_has_waits_saying_so_then_runs_on_a_worker_that_has_it(
) {
    let mut stack = Stack::real().await;
    stack.scheduler();
    let label = "caps-test-gpu";
    let plain = unique("plain");
    let _plain = stack.spawn_process(&plain, 2);
    // The plain worker is live and announces what it has, but not the label.
    let record = wait_for("the plain worker's record", Duration::from_secs(60), || {
        stack.capacity(&plain)
    })
    .await;
    assert!(record
        .capabilities
        .contains(&"executor:simulate".to_owned()));
    assert!(!record.capabilities.contains(&label.to_owned()));
    let plan = requiring(label);
    stack.submit(&plan).await;

    let waiting = crate::support::plan_where(
        &stack.connections,
        &plan.plan_id,
        "say what it waits for",
        Duration::from_secs(60),
        |p| p.message.is_some(),
    )
    .await;
    let message = waiting.message.unwrap_or_default();
    assert!(
        message.contains("waiting for a worker with caps-test-gpu")
            && message.contains("DEVFLEET_DEV_LABELS=caps-test-gpu"),
        "{message}"
    );
    assert_eq!(waiting.status, PlanStatus::Running);
    // The plain worker is live and announces what it has, but not the label.
    let record = stack.capacity(&plain).await.expect("plain worker record");
    assert!(record
        .capabilities
        .contains(&"executor:simulate".to_owned()));
    assert!(!record.capabilities.contains(&label.to_owned()));
    let task = stack
        .connections
        .store
        .task(&plan.plan_id, &plan.tasks[0].path)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(task.state, TaskState::Done, "nobody could run it");
    assert_eq!(task.lease_owner.as_deref(), Some("dispatch"), "parked");

    let labelled = unique("labelled");
    let _labelled = stack.spawn_process_with(&labelled, 1, &[("DEVFLEET_DEV_LABELS", label)]);
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    assert_eq!(record.message, None, "no longer waiting");
    let caps = stack
        .capacity(&labelled)
        .await
        .expect("labelled worker record")
        .capabilities;
    assert!(caps.contains(&label.to_owned()), "{caps:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_whose_requirement_no_worker_meets_fails_after_the_capability_wait() {
    let mut stack = Stack::real().await;
    stack.scheduler_with(|c| c.capability_wait = Duration::from_secs(1));
    let config = stack.worker_config(
        Executors::new(ExecutorKind::Simulate),
        ScalePolicy {
            min: 1,
            max: 1,
            ..ScalePolicy::default()
        },
    );
    stack
        .services
        .spawn(devfleet_dev_worker::run(config, stack.shutdown.clone()));
    let plan = requiring("caps-test-never");
    stack.submit(&plan).await;
    let record = stack.finished(&plan.plan_id, Duration::from_secs(60)).await;
    assert_eq!(record.status, PlanStatus::Failed, "{record:?}");
    let task = stack
        .connections
        .store
        .task(&plan.plan_id, &plan.tasks[0].path)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(task.state, TaskState::Failed);
    let error = task.error.unwrap_or_default();
    assert!(
        error.contains("no live worker had caps-test-never")
            && error.contains("DEVFLEET_DEV_LABELS=caps-test-never"),
        "{error}"
    );
    stack.stop().await;
}
