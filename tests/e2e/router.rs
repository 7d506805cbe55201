//! The router with a real qa-worker on real RabbitMQ and Redis.
//!
//! The dev side (scheduler dispatch and dev-worker) is stood in for by a
//! small harness that follows the same store and message contracts: it
//! honours the `dev` circuit breaker before dispatching (claim as
//! `dispatch`, publish `work.dev`), takes the lease over as a worker, runs
//! an executor and publishes `task.built` / `task.failed`, and completes
//! `task.done` in the store. Each test has its own namespace and store
//! prefix.

use devfleet_bus::{ConsumeOptions, DEAD_LETTER_QUEUE};
use devfleet_contracts::breaker::{self, Phase};
use devfleet_protocol::{
    now_ms, queues, Envelope, Escalation, Message, PlanStatus, Stage, TaskBuilt, TaskClass,
    TaskFailed, TaskWork,
};
use devfleet_router::dlq::{self, DlqSource, Replayed};
use devfleet_router::{history, BreakerSettings};
use devfleet_runtime::{backoff::Backoff, Connections};
use devfleet_store::{ClaimOutcome, NewTask, PlanRecord, TaskState};
use devfleet_testkit::{amqp_url, redis_url, unique, wait_for, within};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const SOON: Duration = Duration::from_secs(60);

/// The `devfleet dlq` subcommand (the CLI module of the root package),
/// compiled here so its real code is driven against real servers.
#[path = "../../src/dlq.rs"]
#[allow(dead_code)] // only some of it is driven here
mod cli_dlq;

async fn connections(name: &str) -> Connections {
    devfleet_telemetry::init_for_tests();
    let bus = devfleet_bus::connect(&amqp_url()).await.expect("amqp");
    let store = devfleet_store::connect_with_prefix(&redis_url(), &unique("t"))
        .await
        .expect("redis");
    Connections {
        broadcast: bus.clone(),
        bus,
        store,
        namespace: unique(name),
    }
}

/// One executor call, as the harness saw it.
#[derive(Debug, Clone)]
struct Attempt {
    path: String,
    attempt: u32,
    class: TaskClass,
    diagnostics: Option<String>,
    previous: Option<String>,
    started_ms: i64,
    ended_ms: i64,
    ok: bool,
}

type Executor = Arc<dyn Fn(&Attempt) -> Result<String, String> + Send + Sync>;

/// The stand-in dev side.
struct Harness {
    connections: Connections,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    dispatches: Arc<Mutex<Vec<(i64, String)>>>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Harness {
    fn start(connections: &Connections, executor: Executor) -> Harness {
        let stop = CancellationToken::new();
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let dispatches = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        tasks.spawn(dispatcher(
            connections.clone(),
            dispatches.clone(),
            stop.clone(),
        ));
        tasks.spawn(dev_worker(
            connections.clone(),
            executor,
            attempts.clone(),
            stop.clone(),
        ));
        tasks.spawn(completer(connections.clone(), stop.clone()));
        Harness {
            connections: connections.clone(),
            attempts,
            dispatches,
            stop,
            tasks,
        }
    }

    fn attempts_of(&self, path: &str) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.path == path)
            .cloned()
            .collect()
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let _ = &self.connections;
    }
}

/// The scheduler's dispatch, reduced to the contract: honour the dev
/// breaker, claim as `dispatch`, publish `work.dev`.
async fn dispatcher(c: Connections, log: Arc<Mutex<Vec<(i64, String)>>>, stop: CancellationToken) {
    let store = c.store.clone();
    loop {
        let mut dispatched = false;
        // When the breaker was asked: a dispatch is judged by what the
        // breaker said then, not by when the publish finished.
        let asked_ms = now_ms();
        let state = breaker::published(store.as_ref(), Stage::Dev)
            .await
            .unwrap();
        if store.ready_len().await.unwrap_or(0) > 0
            && breaker::admit_state(store.as_ref(), &state).await.unwrap()
        {
            if let Some(t) = store
                .claim_next("dispatch", Duration::from_secs(30))
                .await
                .unwrap()
            {
                // Half-open: what is dispatched now is a probe (as the
                // scheduler records it).
                if state.state == Phase::HalfOpen {
                    let attempt = breaker::Attempt {
                        plan_id: &t.plan_id,
                        path: &t.path,
                        attempt: t.attempt,
                    };
                    breaker::mark_probe(store.as_ref(), Stage::Dev, state.generation, attempt)
                        .await
                        .unwrap();
                }
                log.lock().unwrap().push((asked_ms, t.path.clone()));
                c.publish(
                    queues::WORK_DEV,
                    TaskWork {
                        plan_id: t.plan_id,
                        path: t.path,
                        attempt: t.attempt,
                        class: t.class,
                    },
                )
                .await
                .unwrap();
                dispatched = true;
            }
        }
        if !dispatched {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }
}

/// A dev-worker: take the lease over, run the executor, record, announce.
async fn dev_worker(
    c: Connections,
    executor: Executor,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: CancellationToken,
) {
    let mut consumer = c
        .consume(queues::WORK_DEV, ConsumeOptions::default().prefetch(8))
        .await
        .unwrap();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            n = consumer.next_envelope() => n,
        };
        let (env, delivery) = next.unwrap().unwrap();
        let Message::TaskWork(work) = env.message else {
            panic!("not task work")
        };
        let store = &c.store;
        let claim = store
            .claim(
                &work.plan_id,
                &work.path,
                "dev-1",
                Some("dispatch"),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let ClaimOutcome::Claimed(task) = claim else {
            ack(delivery).await;
            continue;
        };
        let previous = match &task.artifact {
            Some(h) => store
                .artifact(h)
                .await
                .unwrap()
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            None => None,
        };
        let mut attempt = Attempt {
            path: task.path.clone(),
            attempt: task.attempt,
            class: task.class,
            diagnostics: task.error.clone(),
            previous,
            started_ms: now_ms(),
            ended_ms: 0,
            ok: false,
        };
        let outcome = executor(&attempt);
        attempt.ended_ms = now_ms();
        attempt.ok = outcome.is_ok();
        attempts.lock().unwrap().push(attempt);
        match outcome {
            Ok(text) => {
                let artifact = store.put_artifact(text.as_bytes()).await.unwrap();
                store
                    .mark_built(
                        &task.plan_id,
                        &task.path,
                        &devfleet_store::Fence::of(&task),
                        &artifact,
                    )
                    .await
                    .unwrap();
                c.publish(
                    queues::TASK_BUILT,
                    TaskBuilt {
                        plan_id: task.plan_id,
                        path: task.path,
                        attempt: task.attempt,
                        artifact,
                        cache_hit: false,
                        executor: "command".into(),
                        duration_ms: 1,
                        reannounced: false,
                    },
                )
                .await
                .unwrap();
            }
            Err(error) => {
                c.publish(
                    queues::TASK_FAILED,
                    TaskFailed {
                        plan_id: task.plan_id,
                        path: task.path,
                        attempt: task.attempt,
                        stage: Stage::Dev,
                        error,
                        retryable: true,
                    },
                )
                .await
                .unwrap();
            }
        }
        ack(delivery).await;
    }
}

/// Acks as a worker would. A channel the broker closed meanwhile (RabbitMQ
/// 3.10 can close a connection with INTERNAL_ERROR when a consumer subscribes
/// to a quorum queue whose replica is still starting) means the broker
/// redelivers the message, as it would to a real worker: the harness goes on.
async fn ack(delivery: devfleet_bus::Delivery) {
    if let Err(e) = delivery.ack().await {
        eprintln!("harness: ack lost ({e}); the broker redelivers");
    }
}

/// The scheduler's completion: `task.done` → complete in the store.
async fn completer(c: Connections, stop: CancellationToken) {
    let mut consumer = c
        .consume(queues::TASK_DONE, ConsumeOptions::default())
        .await
        .unwrap();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            n = consumer.next_envelope() => n,
        };
        let (env, delivery) = next.unwrap().unwrap();
        let Message::TaskDone(done) = env.message else {
            panic!("not task.done")
        };
        c.store
            .complete(
                &done.plan_id,
                &done.path,
                &devfleet_store::Fence::attempt(done.attempt),
                &done.artifact,
            )
            .await
            .unwrap();
        ack(delivery).await;
    }
}

/// Runs a program like the command executor would: the task's diagnostics
/// in `DEVFLEET_DIAGNOSTICS`, its attempt in `DEVFLEET_TASK_ATTEMPT`; stdout
/// is the file.
fn command_executor(script: &'static str) -> Executor {
    Arc::new(move |a: &Attempt| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env(
                "DEVFLEET_DIAGNOSTICS",
                a.diagnostics.clone().unwrap_or_default(),
            )
            .env("DEVFLEET_TASK_ATTEMPT", a.attempt.to_string())
            .env("DEVFLEET_TASK_PATH", &a.path)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
}

async fn create_plan(c: &Connections, tasks: &[(&str, &[&str])]) -> String {
    let plan_id = unique("plan");
    let now = now_ms();
    c.store
        .create_plan(
            PlanRecord::new(&plan_id, "router-test", PlanStatus::Running, now),
            tasks
                .iter()
                .map(|(path, deps)| NewTask {
                    path: (*path).into(),
                    spec: format!("write {path}"),
                    content: None,
                    depends_on: deps.iter().map(|d| d.to_string()).collect(),
                    priority: 1,
                    estimate: 1,
                    executor: Some("command".into()),
                })
                .collect(),
        )
        .await
        .unwrap();
    plan_id
}

async fn wait_state(c: &Connections, plan_id: &str, path: &str, state: TaskState) {
    let found = devfleet_testkit::poll_until(SOON, || async {
        let t = c.store.task(plan_id, path).await.unwrap()?;
        (t.state == state).then_some(())
    })
    .await;
    if found.is_none() {
        for t in c.store.tasks(plan_id).await.unwrap() {
            eprintln!(
                "{} {} attempt {} class {:?} owner {:?} error {:?}",
                t.path,
                t.state.as_str(),
                t.attempt,
                t.class,
                t.lease_owner,
                t.error
            );
        }
        panic!("timed out waiting for {path} to be {}", state.as_str());
    }
}

struct Services {
    stop: CancellationToken,
    set: JoinSet<anyhow::Result<()>>,
}

impl Services {
    fn start(router: devfleet_router::Config, qa: Option<devfleet_qa_worker::Config>) -> Self {
        let stop = CancellationToken::new();
        let mut set = JoinSet::new();
        set.spawn(devfleet_router::run(router, stop.clone()));
        if let Some(qa) = qa {
            set.spawn(devfleet_qa_worker::run(qa, stop.clone()));
        }
        Services { stop, set }
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while let Some(r) = self.set.join_next().await {
            r.expect("service panicked").expect("service failed");
        }
    }
}

fn router_config(c: &Connections) -> devfleet_router::Config {
    let mut config = devfleet_router::Config::new(c.clone());
    config.backoff = Backoff {
        base: Duration::from_millis(200),
        factor: 2.0,
        cap: Duration::from_secs(5),
        jitter: 0.5,
    };
    // The bus dead-letter queue is broker-wide; only the test about it
    // indexes it.
    config.index_bus_dlq = false;
    config
}

fn qa_config(c: &Connections) -> devfleet_qa_worker::Config {
    let mut config = devfleet_qa_worker::Config::new(c.clone());
    config.concurrency = 2;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syntax_error_goes_through_the_fix_loop_and_passes() {
    let c = connections("fixloop").await;
    let plan_id = create_plan(
        &c,
        &[("app/core.py", &[]), ("app/main.py", &["app/core.py"])],
    )
    .await;
    let services = Services::start(router_config(&c), Some(qa_config(&c)));
    // Writes a broken app/core.py until it is told what is wrong.
    let harness = Harness::start(
        &c,
        command_executor(
            r#"case "$DEVFLEET_TASK_PATH:$DEVFLEET_DIAGNOSTICS" in
                 app/main.py:*) printf 'from app.core import answer\nprint(answer())\n' ;;
                 *SyntaxError*) printf 'def answer():\n    return 42\n' ;;
                 *) printf 'def answer(:\n    return 42\n' ;;
               esac"#,
        ),
    );

    wait_state(&c, &plan_id, "app/main.py", TaskState::Done).await;
    let core = harness.attempts_of("app/core.py");
    assert_eq!(core.len(), 2, "one broken attempt, one fix: {core:?}");
    assert_eq!(core[0].class, TaskClass::New);
    assert_eq!(
        core[1].class,
        TaskClass::Fix,
        "the second attempt is a fix task"
    );
    let diagnostics = core[1].diagnostics.as_deref().unwrap_or("");
    assert!(
        diagnostics.contains("SyntaxError"),
        "the fix carries the QA diagnostics: {diagnostics}"
    );
    assert!(
        core[1]
            .previous
            .as_deref()
            .is_some_and(|p| p.contains("def answer(:")),
        "the previous artifact is available to the fix"
    );
    let history = history::read(c.store.as_ref(), &plan_id, "app/core.py")
        .await
        .unwrap();
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(history[0].stage, Stage::Qa);
    assert!(dlq::list(c.store.as_ref()).await.unwrap().is_empty());
    assert_eq!(harness.attempts_of("app/main.py").len(), 1);

    harness.stop().await;
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn always_failing_task_is_tried_three_times_with_growing_delays_then_dead_lettered_and_replayed(
) {
    let c = connections("dlq").await;
    let plan_id = create_plan(
        &c,
        &[("lib/flaky.py", &[]), ("lib/user.py", &["lib/flaky.py"])],
    )
    .await;
    // A connection of its own: RabbitMQ 3.10 sometimes closes a whole
    // connection (541 INTERNAL_ERROR) when a consumer subscribes to a quorum
    // queue still starting, and a best-effort broadcast sent while a
    // listener rebinds is lost. The services' consumers must not share it.
    let events_bus = devfleet_bus::connect(&amqp_url()).await.expect("amqp");
    let mut escalations = events_bus
        .listen(&devfleet_protocol::queues::event_subject("escalation"))
        .await
        .unwrap();
    let mut config = router_config(&c);
    let base = Duration::from_millis(400);
    config.backoff = Backoff {
        base,
        factor: 3.0,
        cap: Duration::from_secs(10),
        jitter: 0.25,
    };
    let services = Services::start(config.clone(), Some(qa_config(&c)));
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let harness = Harness::start(
        &c,
        Arc::new(move |a: &Attempt| {
            if h.load(Ordering::SeqCst) || a.path != "lib/flaky.py" {
                Ok("x = 1\n".into())
            } else {
                Err(format!("agent crashed on attempt {}", a.attempt))
            }
        }),
    );

    wait_state(&c, &plan_id, "lib/flaky.py", TaskState::Failed).await;
    let tries = harness.attempts_of("lib/flaky.py");
    assert_eq!(tries.len(), 3, "tried exactly three times: {tries:?}");
    let delay1 = tries[1].started_ms - tries[0].ended_ms;
    let delay2 = tries[2].started_ms - tries[1].ended_ms;
    println!("retry delays: {delay1} ms, {delay2} ms (base {base:?})");
    let floor = (base.as_millis() as f64 * (1.0 - config.backoff.jitter)) as i64;
    assert!(
        delay1 >= floor,
        "the first retry waits at least the jittered base: {delay1} < {floor}"
    );
    assert!(delay2 > delay1, "delays grow: {delay1} then {delay2}");
    assert!(
        delay2 >= 3 * floor,
        "the second waits at least factor × base: {delay2}"
    );

    // Dead-lettered with the full history; the dependent is blocked.
    let user = c
        .store
        .task(&plan_id, "lib/user.py")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.state, TaskState::Blocked);
    let entries = dlq::list(c.store.as_ref()).await.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(entry.source, DlqSource::Task);
    assert_eq!(entry.path.as_deref(), Some("lib/flaky.py"));
    assert_eq!(entry.history.len(), 3);
    assert!(entry.history.iter().all(|h| h.stage == Stage::Dev));
    assert!(
        entry.history[2].error.contains("attempt 3"),
        "{:?}",
        entry.history
    );
    assert!(
        entry.reason.contains("gave up after 3 failures"),
        "{}",
        entry.reason
    );
    // The router reports the dead letter to the scheduler, which alone
    // ends plans (none runs here, so the plan stays Running).
    let mut reports = c
        .consume(queues::TASK_FINALLY_FAILED, ConsumeOptions::default())
        .await
        .unwrap();
    let (report, delivery) = within("the dead-letter report", SOON, reports.next_envelope())
        .await
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    let Message::TaskFinallyFailed(report) = report.message else {
        panic!("not a dead-letter report: {report:?}")
    };
    assert_eq!(
        (
            report.plan_id.as_str(),
            report.path.as_str(),
            report.attempt
        ),
        (plan_id.as_str(), "lib/flaky.py", 3)
    );
    assert_eq!(report.reason, entry.reason);
    assert_eq!(report.dlq_id.as_deref(), Some(entry.id.as_str()));
    let plan = c.store.plan(&plan_id).await.unwrap().unwrap();
    assert_eq!(plan.status, PlanStatus::Running, "the router ends no plan");
    // A redelivered failure of the dead attempt reports it again, in case
    // the first report was lost (the scheduler ignores a repeat).
    c.publish(
        queues::TASK_FAILED,
        TaskFailed {
            plan_id: plan_id.clone(),
            path: "lib/flaky.py".into(),
            attempt: 3,
            stage: Stage::Dev,
            error: "agent crashed on attempt 3".into(),
            retryable: true,
        },
    )
    .await
    .unwrap();
    let (again, delivery) = within("the repeated report", SOON, reports.next_envelope())
        .await
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    let Message::TaskFinallyFailed(again) = again.message else {
        panic!("not a dead-letter report: {again:?}")
    };
    assert_eq!(again, report);
    assert_eq!(
        history::read(c.store.as_ref(), &plan_id, "lib/flaky.py")
            .await
            .unwrap()
            .len(),
        3,
        "a repeat adds no history"
    );

    let escalation: Escalation = within("the escalation event", SOON, async {
        loop {
            let (_, bytes) = escalations.next().await.expect("listener open");
            if let Ok(Envelope {
                message: Message::Escalation(e),
                ..
            }) = Envelope::decode(&bytes)
            {
                if e.plan_id == plan_id {
                    return e;
                }
            }
        }
    })
    .await;
    assert_eq!(escalation.path.as_deref(), Some("lib/flaky.py"));
    assert_eq!(escalation.history.len(), 3);
    assert!(escalation.reason.contains(&entry.id));

    // Replay: attempts reset, the task and its dependent finish.
    healthy.store(true, Ordering::SeqCst);
    let replayed = dlq::replay(&c, &entry.id).await.unwrap();
    assert_eq!(
        replayed,
        Replayed::Task {
            plan_id: plan_id.clone(),
            path: "lib/flaky.py".into()
        }
    );
    wait_state(&c, &plan_id, "lib/user.py", TaskState::Done).await;
    let tries = harness.attempts_of("lib/flaky.py");
    assert_eq!(tries.len(), 4);
    assert_eq!(tries[3].attempt, 1, "replay resets the attempts");
    assert!(dlq::list(c.store.as_ref()).await.unwrap().is_empty());
    assert!(history::read(c.store.as_ref(), &plan_id, "lib/flaky.py")
        .await
        .unwrap()
        .is_empty());
    let err = dlq::replay(&c, &entry.id).await.unwrap_err();
    assert!(err.to_string().contains("no dead letter"), "{err}");

    harness.stop().await;
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_storm_opens_the_breaker_pauses_dispatch_and_recovers_after_the_cooldown() {
    let c = connections("storm").await;
    let paths: Vec<String> = (0..8).map(|i| format!("svc/m{i}.py")).collect();
    let specs: Vec<(&str, &[&str])> = paths.iter().map(|p| (p.as_str(), &[][..])).collect();
    let plan_id = create_plan(&c, &specs).await;
    let mut config = router_config(&c);
    config.max_failures = 50;
    config.backoff.base = Duration::from_millis(100);
    config.backoff.cap = Duration::from_millis(300);
    let cooldown = Duration::from_millis(1500);
    config.breaker = BreakerSettings {
        window: Duration::from_secs(30),
        bucket: Duration::from_secs(1),
        min_volume: 5,
        threshold: 0.5,
        cooldown,
        probes: 1,
    };
    config.breaker_tick = Duration::from_millis(50);
    let services = Services::start(config, Some(qa_config(&c)));
    let storm = Arc::new(AtomicBool::new(true));
    let s = storm.clone();
    let harness = Harness::start(
        &c,
        Arc::new(move |_a: &Attempt| {
            if s.load(Ordering::SeqCst) {
                Err("model provider returned 503".into())
            } else {
                Ok("ok = True\n".into())
            }
        }),
    );

    let opened = wait_for("the dev breaker to open", SOON, || async {
        let s = breaker::published(c.store.as_ref(), Stage::Dev)
            .await
            .unwrap();
        (s.state == Phase::Open).then_some(s)
    })
    .await;
    assert!(opened.reason.contains("errors"), "{}", opened.reason);
    assert!(opened.volume >= 5 && opened.error_rate > 0.5, "{opened:?}");
    let qa = breaker::published(c.store.as_ref(), Stage::Qa)
        .await
        .unwrap();
    assert_eq!(qa.state, Phase::Closed, "the QA stage is unaffected");
    // The storm is over from now on; only probes may show it.
    storm.store(false, Ordering::SeqCst);

    let half_open = wait_for("the breaker to let a probe through", SOON, || async {
        let s = breaker::published(c.store.as_ref(), Stage::Dev)
            .await
            .unwrap();
        (s.state != Phase::Open).then_some(s)
    })
    .await;
    assert!(
        half_open.since_ms >= opened.since_ms + cooldown.as_millis() as i64,
        "half-open only after the cooldown"
    );
    // While open, nothing was dispatched. The state read above may already
    // be Closed (a probe can pass within milliseconds), so the open window
    // ends at the cooldown's end, before which it cannot have left Open.
    let open_end = opened
        .until_ms
        .unwrap_or(half_open.since_ms)
        .min(half_open.since_ms);
    let during_open: Vec<(i64, String)> = harness
        .dispatches
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t > opened.since_ms + 100 && *t < open_end)
        .cloned()
        .collect();
    assert!(
        during_open.is_empty(),
        "dispatched while open: {during_open:?}"
    );

    wait_for("the breaker to close", SOON, || async {
        let s = breaker::published(c.store.as_ref(), Stage::Dev)
            .await
            .unwrap();
        (s.state == Phase::Closed).then_some(())
    })
    .await;
    for p in &paths {
        wait_state(&c, &plan_id, p, TaskState::Done).await;
    }
    harness.stop().await;
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_messages_are_indexed_in_the_dlq_then_listed_and_purged_by_the_cli() {
    devfleet_telemetry::init_for_tests();
    // The subcommands' flags are well-formed (clap checks on build).
    <cli_dlq::DlqCommand as clap::Subcommand>::augment_subcommands(clap::Command::new("dlq"))
        .debug_assert();
    // Connected the way the CLI connects, so `devfleet dlq` sees this stack.
    let connect = devfleet_runtime::ConnectArgs {
        bus: devfleet_runtime::BusKind::Amqp,
        amqp_url: amqp_url(),
        nats_url: None,
        redis_url: redis_url(),
        namespace: unique("busdlq"),
    };
    let c = connect.connect().await.unwrap();
    let mut config = router_config(&c);
    config.index_bus_dlq = true;
    let services = Services::start(config, None);
    // Another namespace on the same broker dead-letters a message of its
    // own (no router runs there): it stays in that namespace's DLQ.
    let other = c.clone().with_namespace(unique("busdlq-other"));
    let other_queue = other.queue(queues::TASK_BUILT);
    other.bus.publish(&other_queue, b"other").await.unwrap();
    let mut consumer = other
        .consume(queues::TASK_BUILT, ConsumeOptions::default())
        .await
        .unwrap();
    let delivery = within("the other namespace's message", SOON, consumer.next())
        .await
        .unwrap()
        .unwrap();
    delivery.dead_letter("the other namespace's").await.unwrap();
    drop(consumer);
    let queue = c.queue(queues::TASK_BUILT);
    c.bus.publish(&queue, b"\x93not an envelope").await.unwrap();

    let entry = wait_for("the dead letter to be indexed", SOON, || async {
        dlq::list(c.store.as_ref())
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.source == DlqSource::Message)
    })
    .await;
    assert_eq!(entry.queue.as_deref(), Some(queue.as_str()));
    assert!(entry.reason.contains("undecodable"), "{}", entry.reason);
    assert!(entry.kind.is_none());
    assert!(entry.payload.is_some());

    let entries = dlq::list(c.store.as_ref()).await.unwrap();
    assert_eq!(
        entries.len(),
        1,
        "only this namespace's letter: {entries:?}"
    );
    let mut theirs = other
        .consume(DEAD_LETTER_QUEUE, ConsumeOptions::default())
        .await
        .unwrap();
    let letter = within("the other namespace's dead letter", SOON, theirs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&letter.payload[..], b"other");
    let info = letter.dead_letter.clone().expect("dead-letter info");
    assert_eq!(info.queue, other_queue);
    drop(letter);
    drop(theirs);

    let purged = dlq::purge(&c).await.unwrap();
    assert_eq!(purged.entries, 1);
    assert_eq!(purged.bus_messages, 0, "the indexer took it out already");
    assert!(dlq::list(c.store.as_ref()).await.unwrap().is_empty());
    let purged = dlq::purge(&other).await.unwrap();
    assert_eq!(
        (purged.entries, purged.bus_messages),
        (0, 1),
        "the other namespace's letter was in its own DLQ"
    );
    services.stop().await;
}

/// Concurrent outcomes of one router all count: a storm of exactly
/// `min_volume` errors handled at once opens the breaker (writes of this
/// replica's window record must not land out of order over Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_errors_all_count_and_open_the_breaker() {
    for round in 0..5 {
        let c = connections("storm").await;
        let breakers = Arc::new(devfleet_router::breaker::Breakers::new(
            c.clone(),
            format!("router-{round}"),
            BreakerSettings {
                window: Duration::from_secs(30),
                bucket: Duration::from_secs(30),
                min_volume: 24,
                threshold: 0.5,
                cooldown: Duration::from_secs(60),
                probes: 1,
            },
        ));
        let mut set = JoinSet::new();
        for i in 0..24 {
            let b = breakers.clone();
            set.spawn(async move {
                let path = format!("f{i}.py");
                let attempt = breaker::Attempt {
                    plan_id: "p",
                    path: &path,
                    attempt: 1,
                };
                b.record(Stage::Qa, attempt, false).await.unwrap()
            });
        }
        while set.join_next().await.transpose().unwrap().is_some() {}
        let state = breaker::current(c.store.as_ref(), Stage::Qa).await.unwrap();
        assert_eq!(state.state, Phase::Open, "round {round}: {state:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qa_errors_open_the_qa_breaker_which_parks_qa_work_until_a_probe_succeeds() {
    let c = connections("qabreaker").await;
    let paths = ["q/a.py", "q/b.py", "q/c.py", "q/d.py"];
    let specs: Vec<(&str, &[&str])> = paths.iter().map(|p| (*p, &[][..])).collect();
    let plan_id = create_plan(&c, &specs).await;
    let mut artifacts = std::collections::BTreeMap::new();
    for p in paths {
        let t = c
            .store
            .claim_next("dev-1", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let hash = c
            .store
            .put_artifact(format!("# {p}\n").as_bytes())
            .await
            .unwrap();
        c.store
            .mark_built(&plan_id, &t.path, &devfleet_store::Fence::of(&t), &hash)
            .await
            .unwrap();
        artifacts.insert(t.path.clone(), (t.attempt, hash));
    }
    let mut config = router_config(&c);
    config.max_failures = 10;
    config.backoff.base = Duration::from_millis(100);
    config.backoff.cap = Duration::from_millis(200);
    let cooldown = Duration::from_millis(1200);
    config.breaker = BreakerSettings {
        window: Duration::from_secs(30),
        bucket: Duration::from_secs(1),
        min_volume: 3,
        threshold: 0.5,
        cooldown,
        probes: 1,
    };
    config.breaker_tick = Duration::from_millis(50);
    let services = Services::start(config, None);
    let mut work_qa = c
        .consume(queues::WORK_QA, ConsumeOptions::default())
        .await
        .unwrap();
    let mut done = c
        .consume(queues::TASK_DONE, ConsumeOptions::default())
        .await
        .unwrap();

    // The checks of three files cannot run: a QA-stage error storm.
    for p in &paths[..3] {
        let (attempt, _) = &artifacts[*p];
        c.publish(
            queues::TASK_FAILED,
            TaskFailed {
                plan_id: plan_id.clone(),
                path: (*p).into(),
                attempt: *attempt,
                stage: Stage::Qa,
                error: "sandbox could not start".into(),
                retryable: true,
            },
        )
        .await
        .unwrap();
    }
    let opened = wait_for("the QA breaker to open", SOON, || async {
        let s = breaker::published(c.store.as_ref(), Stage::Qa)
            .await
            .unwrap();
        (s.state == Phase::Open).then_some(s)
    })
    .await;
    // A new build while open is parked, not dispatched.
    let (attempt, artifact) = artifacts["q/d.py"].clone();
    c.publish(
        queues::TASK_BUILT,
        TaskBuilt {
            plan_id: plan_id.clone(),
            path: "q/d.py".into(),
            attempt,
            artifact,
            cache_hit: false,
            executor: "command".into(),
            duration_ms: 1,
            reannounced: false,
        },
    )
    .await
    .unwrap();
    wait_for("d.py to be parked", SOON, || async {
        let parked = c.store.kv_list("qa_parked").await.unwrap();
        parked
            .iter()
            .any(|(k, _)| k.ends_with("|q/d.py"))
            .then_some(())
    })
    .await;

    // Act as the qa-worker: every QA request passes.
    let mut received: Vec<(i64, String)> = Vec::new();
    let mut finished = std::collections::BTreeSet::new();
    within("every task to pass QA", SOON, async {
        while finished.len() < paths.len() {
            tokio::select! {
                n = work_qa.next_envelope() => {
                    let (env, delivery) = n.unwrap().unwrap();
                    ack(delivery).await;
                    let Message::QaWork(w) = env.message else { panic!("not QA work") };
                    received.push((now_ms(), w.path.clone()));
                    c.publish(queues::QA_RESULTS, devfleet_protocol::QaResult {
                        plan_id: w.plan_id,
                        path: w.path,
                        attempt: w.attempt,
                        artifact: w.artifact,
                        passed: true,
                        diagnostics: String::new(),
                        checks: vec![],
                    }).await.unwrap();
                }
                n = done.next_envelope() => {
                    let (env, delivery) = n.unwrap().unwrap();
                    let Message::TaskDone(d) = env.message else { panic!("not task.done") };
                    c.store.complete(&d.plan_id, &d.path, &devfleet_store::Fence::attempt(d.attempt), &d.artifact).await.unwrap();
                    ack(delivery).await;
                    finished.insert(d.path);
                }
            }
        }
    })
    .await;
    let closed = breaker::published(c.store.as_ref(), Stage::Qa)
        .await
        .unwrap();
    assert_eq!(closed.state, Phase::Closed, "{closed:?}");
    let half_open_at = opened.until_ms.unwrap();
    let early: Vec<_> = received
        .iter()
        .filter(|(t, _)| *t > opened.since_ms + 100 && *t < half_open_at)
        .collect();
    assert!(
        early.is_empty(),
        "QA work dispatched while the breaker was open: {early:?}"
    );
    assert!(
        received.first().is_some_and(|(t, _)| *t >= half_open_at),
        "the first QA work after the storm is the half-open probe: {received:?}"
    );
    assert!(c.store.kv_list("qa_parked").await.unwrap().is_empty());
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_retry_survives_the_router_stopping_and_waits_its_delay() {
    let c = connections("retrystop").await;
    let plan_id = create_plan(&c, &[("once/flaky.py", &[])]).await;
    let mut config = router_config(&c);
    let base = Duration::from_millis(2500);
    config.backoff = Backoff {
        base,
        factor: 2.0,
        cap: Duration::from_secs(10),
        jitter: 0.2,
    };
    let services = Services::start(config.clone(), Some(qa_config(&c)));
    let harness = Harness::start(
        &c,
        Arc::new(|a: &Attempt| {
            if a.attempt == 1 {
                Err("first try fails".into())
            } else {
                Ok("fine = 1\n".into())
            }
        }),
    );
    // The retry is scheduled: the router holds the task, the ticket waits.
    wait_for("the retry to be scheduled", SOON, || async {
        let t = c.store.task(&plan_id, "once/flaky.py").await.unwrap()?;
        (t.lease_owner.as_deref() == Some(devfleet_router::ROUTER_OWNER)).then_some(())
    })
    .await;
    services.stop().await;
    let t = c
        .store
        .task(&plan_id, "once/flaky.py")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.state, TaskState::Leased, "held while no router runs");

    // Another router process (its own broker connection) takes over the
    // waiting ticket.
    let bus = devfleet_bus::connect(&amqp_url()).await.expect("amqp");
    let fresh = Connections {
        broadcast: bus.clone(),
        bus,
        ..c.clone()
    };
    let mut config = config.clone();
    config.connections = fresh.clone();
    let services = Services::start(config.clone(), Some(qa_config(&fresh)));
    wait_state(&c, &plan_id, "once/flaky.py", TaskState::Done).await;
    let tries = harness.attempts_of("once/flaky.py");
    assert_eq!(tries.len(), 2, "{tries:?}");
    let delay = tries[1].started_ms - tries[0].ended_ms;
    let floor = (base.as_millis() as f64 * (1.0 - config.backoff.jitter)) as i64;
    println!("retry across a router stop: {delay} ms (floor {floor} ms)");
    assert!(
        delay >= floor,
        "the retry still waited its delay: {delay} < {floor}"
    );
    harness.stop().await;
    services.stop().await;
}
