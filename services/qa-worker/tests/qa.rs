//! The qa-worker on real RabbitMQ and Redis: hostile checks are contained,
//! and integration shards run in parallel.

use devfleet_bus::ConsumeOptions;
use devfleet_contracts::integration::{IntegrationTally, TallyState};
use devfleet_protocol::{
    now_ms, queues, IntegrationResult, IntegrationStep, Message, PlanStatus, QaResult, QaWork,
};
use devfleet_qa_worker::{CheckSpec, Config};
use devfleet_runtime::Connections;
use devfleet_store::extra_files::{self, Decision};
use devfleet_store::{NewTask, PlanRecord};
use devfleet_testkit::{amqp_url, redis_url, unique, within};
use std::collections::BTreeMap;
use std::io::Read as _;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const SOON: Duration = Duration::from_secs(120);

async fn connections(name: &str) -> Connections {
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

/// Creates a plan whose tasks are all built with the given contents.
async fn built_plan(
    c: &Connections,
    files: &[(&str, String)],
) -> (String, BTreeMap<String, String>) {
    let plan_id = unique("plan");
    let now = now_ms();
    c.store
        .create_plan(
            PlanRecord::new(&plan_id, "qa-test", PlanStatus::Running, now),
            files
                .iter()
                .map(|(path, _)| NewTask {
                    path: (*path).into(),
                    spec: "s".into(),
                    content: None,
                    depends_on: vec![],
                    priority: 1,
                    estimate: 1,
                    executor: None,
                })
                .collect(),
        )
        .await
        .unwrap();
    let mut artifacts = BTreeMap::new();
    for (path, text) in files {
        c.store
            .claim(&plan_id, path, "dev", None, Duration::from_secs(60))
            .await
            .unwrap();
        let hash = c.store.put_artifact(text.as_bytes()).await.unwrap();
        c.store
            .mark_built(
                &plan_id,
                path,
                &devfleet_store::Fence::holder("dev", 1),
                &hash,
            )
            .await
            .unwrap();
        artifacts.insert(path.to_string(), hash);
    }
    (plan_id, artifacts)
}

fn start(config: Config) -> (CancellationToken, JoinSet<anyhow::Result<()>>) {
    let stop = CancellationToken::new();
    let mut set = JoinSet::new();
    set.spawn(devfleet_qa_worker::run(config, stop.clone()));
    (stop, set)
}

async fn stop(stop: CancellationToken, mut set: JoinSet<anyhow::Result<()>>) {
    stop.cancel();
    while let Some(r) = set.join_next().await {
        r.expect("worker panicked").expect("worker failed");
    }
}

/// Sends QA work for each path and collects the results by path.
async fn check(
    c: &Connections,
    plan_id: &str,
    artifacts: &BTreeMap<String, String>,
    paths: &[&str],
) -> BTreeMap<String, QaResult> {
    let mut results = c
        .consume(queues::QA_RESULTS, ConsumeOptions::default())
        .await
        .unwrap();
    for path in paths {
        c.publish(
            queues::WORK_QA,
            QaWork {
                plan_id: plan_id.into(),
                path: (*path).into(),
                attempt: 1,
                artifact: artifacts[*path].clone(),
            },
        )
        .await
        .unwrap();
    }
    let mut out = BTreeMap::new();
    within("every QA result", SOON, async {
        while out.len() < paths.len() {
            let (env, delivery) = results.next_envelope().await.unwrap().unwrap();
            delivery.ack().await.unwrap();
            if let Message::QaResult(r) = env.message {
                out.insert(r.path.clone(), r);
            }
        }
    })
    .await;
    out
}

fn hostile_config(c: &Connections, check_timeout: Duration) -> Config {
    let mut config = Config::new(c.clone());
    config.concurrency = 2;
    config.check_timeout = check_timeout;
    config.sandbox.limits.processes = 32;
    config.sandbox.limits.cpu_seconds = 20;
    config.sandbox.limits.memory_bytes = 512 * 1024 * 1024;
    config.sandbox.uid_base = Some(HOSTILE_UID_BASE);
    // Run the file itself: it is the hostile part.
    config.checks = vec![
        CheckSpec {
            name: "run".into(),
            extensions: vec!["py".into()],
            run: "python3 {file}".into(),
            optional: false,
            timeout_seconds: None,
        },
        CheckSpec {
            name: "ruff".into(),
            extensions: vec!["py".into()],
            run: "devfleet-no-such-linter {file}".into(),
            optional: true,
            timeout_seconds: None,
        },
    ];
    config
}

/// Sandbox uids of the hostile test's worker (other tests use the default base).
const HOSTILE_UID_BASE: u32 = 3_500_000;

fn sandbox_uid_processes() -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(mut f) = std::fs::File::open(entry.path().join("status")) else {
            continue;
        };
        let mut s = String::new();
        if f.read_to_string(&mut s).is_err() {
            continue;
        }
        let uid = s
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if uid.is_some_and(|u| (HOSTILE_UID_BASE..HOSTILE_UID_BASE + 1_000).contains(&u)) {
            let state = s.lines().find(|l| l.starts_with("State:")).unwrap_or("");
            left.push(format!("{} {state}", s.lines().next().unwrap_or("")));
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_checks_are_contained_and_the_worker_lives_on() {
    let c = connections("hostile").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let outside = std::env::temp_dir().join(unique("qa-escape"));
    std::fs::create_dir_all(&outside).unwrap();
    let target = outside.join("pwned");
    // Writable by anyone on the host: only the sandbox can stop the write.
    std::process::Command::new("chmod")
        .arg("777")
        .arg(&outside)
        .status()
        .unwrap();

    let files = vec![
        (
            "net.py",
            format!(
                "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
            ),
        ),
        (
            "escape.py",
            format!("open({:?}, 'w').write('x')\nprint('escaped')\n", target.display().to_string()),
        ),
        (
            "forkbomb.py",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n".to_owned(),
        ),
        ("spin.py", "while True:\n    pass\n".to_owned()),
        ("good.py", "print('fine')\n".to_owned()),
        ("NOTES.md", "# notes\n".to_owned()),
    ];
    let (plan_id, artifacts) = built_plan(&c, &files).await;
    let (stop_token, set) = start(hostile_config(&c, Duration::from_secs(4)));

    let results = check(
        &c,
        &plan_id,
        &artifacts,
        &["net.py", "escape.py", "forkbomb.py", "spin.py"],
    )
    .await;
    let status = |path: &str| results[path].checks[0].status.clone();
    for (path, r) in &results {
        println!(
            "{path}: passed={} {}",
            r.passed,
            r.diagnostics
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    assert!(!results["net.py"].passed);
    assert!(
        listener.accept().is_err(),
        "nothing reached the host's loopback"
    );
    assert!(!results["escape.py"].passed);
    assert!(
        !target.exists(),
        "nothing was written outside the workspace"
    );
    assert!(!results["forkbomb.py"].passed, "{}", status("forkbomb.py"));
    assert_eq!(status("spin.py"), "timeout");
    assert!(results["spin.py"].diagnostics.contains("timed out"));
    // The kernel tears a killed PID namespace down asynchronously.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while !sandbox_uid_processes().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "processes outlived their checks: {:?}",
        sandbox_uid_processes()
    );

    // The worker lives on and still tells good from bad.
    let results = check(&c, &plan_id, &artifacts, &["good.py", "NOTES.md"]).await;
    let good = &results["good.py"];
    assert!(good.passed, "{good:?}");
    assert_eq!(good.checks[0].status, "passed");
    assert_eq!(
        good.checks[1].status, "skipped",
        "a missing optional linter is recorded"
    );
    assert!(good.checks[1].output.contains("not installed"));
    let notes = &results["NOTES.md"];
    assert!(notes.passed);
    assert_eq!(notes.checks.len(), 1);
    assert_eq!(notes.checks[0].name, "none");
    assert_eq!(
        notes.checks[0].status, "skipped",
        "unchecked files are never silently passed"
    );
    assert!(notes.checks[0].output.contains(".md"));

    stop(stop_token, set).await;
    std::fs::remove_dir_all(&outside).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_checks_find_syntax_errors_with_dependencies_materialised() {
    let c = connections("defaults").await;
    let files = vec![
        ("pkg/__init__.py", String::new()),
        (
            "pkg/ok.py",
            "from pkg import util\n\nVALUE = util.twice(2)\n".to_owned(),
        ),
        (
            "pkg/util.py",
            "def twice(x):\n    return 2 * x\n".to_owned(),
        ),
        ("pkg/bad.py", "def broken(:\n    pass\n".to_owned()),
        ("web/app.js", "const x = ;\n".to_owned()),
    ];
    let (plan_id, artifacts) = built_plan(&c, &files).await;
    let mut config = Config::new(c.clone());
    config.concurrency = 2;
    let (stop_token, set) = start(config);
    let results = check(
        &c,
        &plan_id,
        &artifacts,
        &["pkg/ok.py", "pkg/bad.py", "web/app.js"],
    )
    .await;
    for (path, r) in &results {
        for ch in &r.checks {
            println!(
                "check {path} {} {} {} ms",
                ch.name, ch.status, ch.duration_ms
            );
        }
    }
    assert!(results["pkg/ok.py"].passed, "{:?}", results["pkg/ok.py"]);
    let bad = &results["pkg/bad.py"];
    assert!(!bad.passed);
    assert!(
        bad.diagnostics.contains("SyntaxError"),
        "{}",
        bad.diagnostics
    );
    assert!(
        bad.diagnostics.contains("pkg/bad.py"),
        "diagnostics name the file: {}",
        bad.diagnostics
    );
    let js = &results["web/app.js"];
    assert!(!js.passed, "{js:?}");
    assert!(js.diagnostics.contains("SyntaxError"), "{}", js.diagnostics);
    stop(stop_token, set).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integration_shards_run_in_parallel() {
    let c = connections("integration").await;
    let runner = "import os, time\ni = int(os.environ['DEVFLEET_SHARD_INDEX'])\nn = int(os.environ['DEVFLEET_SHARD_COUNT'])\ntime.sleep(2)\nprint(f'shard {i} of {n} done')\n";
    let (plan_id, _) = built_plan(
        &c,
        &[
            ("run_shard.py", runner.to_owned()),
            ("app.py", "x = 1\n".to_owned()),
        ],
    )
    .await;
    // An extra file app.py's task was allowed to write (`writes:`) is in
    // the integration tree; a rejected one is not.
    let seed = c.store.put_artifact(b"seeded\n").await.unwrap();
    let decision = |path: &str, accepted: bool, artifact: Option<String>| Decision {
        path: path.into(),
        deleted: false,
        accepted,
        reason: if accepted {
            String::new()
        } else {
            "not declared".into()
        },
        artifact,
    };
    extra_files::record(
        c.store.as_ref(),
        &plan_id,
        "app.py",
        &[
            decision("data/seed.txt", true, Some(seed.clone())),
            decision("data/rejected.txt", false, Some(seed)),
        ],
    )
    .await
    .unwrap();
    let steps = vec![
        IntegrationStep {
            requires: Vec::new(),
            name: "reads-extra".into(),
            run: "python3 -c \"import os; print(open('data/seed.txt').read().strip(), os.path.exists('data/rejected.txt'))\"".into(),
            shard: None,
            timeout_seconds: None,
        },
        IntegrationStep {
            requires: Vec::new(),
            name: "suite".into(),
            run: "python3 run_shard.py".into(),
            shard: Some(3),
            timeout_seconds: Some(60),
        },
        IntegrationStep {
            requires: Vec::new(),
            name: "fails".into(),
            run: "python3 -c 'raise SystemExit(3)'".into(),
            shard: None,
            timeout_seconds: None,
        },
        IntegrationStep {
            requires: Vec::new(),
            name: "needs-a-tool".into(),
            run: "no-such-tool --all".into(),
            shard: None,
            timeout_seconds: None,
        },
    ];
    let work = devfleet_contracts::integration::shards(&plan_id, &steps);
    assert_eq!(work.len(), 6);
    let mut config = Config::new(c.clone());
    config.concurrency = 4;
    let (stop_token, set) = start(config);
    let mut results = c
        .consume(queues::INTEGRATION_RESULTS, ConsumeOptions::default())
        .await
        .unwrap();
    for w in &work {
        c.publish(queues::WORK_INTEGRATION, w.clone())
            .await
            .unwrap();
    }
    let mut tally = IntegrationTally::new(&plan_id, &work);
    let mut spans: Vec<(i64, i64)> = Vec::new();
    let mut got: Vec<IntegrationResult> = Vec::new();
    within("every shard's result", SOON, async {
        while matches!(tally.state(), TallyState::Pending { .. }) {
            let (env, delivery) = results.next_envelope().await.unwrap().unwrap();
            let received = now_ms();
            delivery.ack().await.unwrap();
            if let Message::IntegrationResult(r) = env.message {
                if r.step == "suite" {
                    spans.push((received - r.duration_ms as i64, received));
                }
                got.push(r.clone());
                tally.record(r);
            }
        }
    })
    .await;
    for r in &got {
        println!(
            "{} {}/{} passed={} {} ms",
            r.step,
            r.shard_index + 1,
            r.shard_count,
            r.passed,
            r.duration_ms
        );
    }
    let suite: Vec<&IntegrationResult> = got.iter().filter(|r| r.step == "suite").collect();
    assert!(suite.iter().all(|r| r.passed), "{suite:?}");
    for (i, r) in suite.iter().enumerate() {
        assert!(
            r.output
                .contains(&format!("shard {} of 3 done", r.shard_index)),
            "{i}: {}",
            r.output
        );
    }
    // Overlap: the last shard started before the first one ended.
    let latest_start = spans.iter().map(|s| s.0).max().unwrap();
    let earliest_end = spans.iter().map(|s| s.1).min().unwrap();
    let wall = spans.iter().map(|s| s.1).max().unwrap() - spans.iter().map(|s| s.0).min().unwrap();
    let sum: i64 = spans.iter().map(|s| s.1 - s.0).sum();
    println!("integration: wall {wall} ms for {sum} ms of shards");
    assert!(
        latest_start < earliest_end,
        "shards overlapped in time: {spans:?}"
    );
    assert_eq!(tally.state(), TallyState::Failed, "one step failed");
    let summary = tally.failure_summary(4_000);
    assert!(
        summary.contains("'fails'") && summary.contains("exit 3"),
        "{summary}"
    );
    let extra = got.iter().find(|r| r.step == "reads-extra").unwrap();
    assert!(
        extra.passed && extra.output.contains("seeded False"),
        "{}",
        extra.output
    );
    let missing = got.iter().find(|r| r.step == "needs-a-tool").unwrap();
    assert!(!missing.passed);
    assert!(
        missing
            .output
            .contains("runs `no-such-tool`, which is not installed on this qa-worker"),
        "{}",
        missing.output
    );
    stop(stop_token, set).await;
}

/// A check that says it started (a file in its workspace) and then waits
/// for the test to let it finish (another file).
const WAITS_FOR_GO: &str = "import os, time\nopen('started', 'w').close()\nwhile not os.path.exists('go'):\n    time.sleep(0.2)\nprint('finished')\n";

/// A worker that runs each `.py` file, one at a time, with its workspaces
/// in a folder of the test's own, and this shutdown grace.
fn draining_config(c: &Connections, grace: Duration) -> Config {
    let mut config = Config::new(c.clone());
    config.concurrency = 1;
    config.shutdown_grace = grace;
    config.work_dir = std::env::temp_dir().join(unique("qa-drain"));
    config.checks = vec![CheckSpec {
        name: "run".into(),
        extensions: vec!["py".into()],
        run: "python3 {file}".into(),
        optional: false,
        timeout_seconds: Some(600),
    }];
    config
}

/// Waits until a check of the worker wrote `started` in its workspace;
/// returns the workspace (on the host).
async fn started_workspace(work_dir: &std::path::Path) -> std::path::PathBuf {
    devfleet_testkit::wait_for("the check to start", SOON, || async {
        std::fs::read_dir(work_dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|ws| ws.join("started").exists())
    })
    .await
}

fn qa_work(plan_id: &str, artifacts: &BTreeMap<String, String>, path: &str) -> QaWork {
    QaWork {
        plan_id: plan_id.into(),
        path: path.into(),
        attempt: 1,
        artifact: artifacts[path].clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_shutdown_a_running_check_finishes_within_the_grace_and_no_new_work_is_taken() {
    let c = connections("drain").await;
    let files = vec![
        ("slow.py", WAITS_FOR_GO.to_owned()),
        ("next.py", "print('next')\n".to_owned()),
    ];
    let (plan_id, artifacts) = built_plan(&c, &files).await;
    let config = draining_config(&c, Duration::from_secs(600));
    let work_dir = config.work_dir.clone();
    let mut results = c
        .consume(queues::QA_RESULTS, ConsumeOptions::default())
        .await
        .unwrap();
    let (stop_token, mut set) = start(config);
    c.publish(queues::WORK_QA, qa_work(&plan_id, &artifacts, "slow.py"))
        .await
        .unwrap();
    let workspace = started_workspace(&work_dir).await;
    // Waiting for the only slot: must not be taken once shutdown begins.
    c.publish(queues::WORK_QA, qa_work(&plan_id, &artifacts, "next.py"))
        .await
        .unwrap();

    stop_token.cancel();
    std::fs::write(workspace.join("go"), "").unwrap();
    let result = within("the running check's result", SOON, async {
        loop {
            let (env, delivery) = results.next_envelope().await.unwrap().unwrap();
            delivery.ack().await.unwrap();
            if let Message::QaResult(r) = env.message {
                return r;
            }
        }
    })
    .await;
    assert_eq!(result.path, "slow.py");
    assert!(result.passed, "{result:?}");
    within("the worker to stop", SOON, async {
        while let Some(r) = set.join_next().await {
            r.expect("worker panicked").expect("worker failed");
        }
    })
    .await;

    // The finished check was acked; the waiting work is still queued.
    let mut work = c
        .consume(queues::WORK_QA, ConsumeOptions::default())
        .await
        .unwrap();
    let (env, delivery) = within("the untaken work", SOON, work.next_envelope())
        .await
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    let Message::QaWork(left) = env.message else {
        panic!("unexpected {env:?}")
    };
    assert_eq!(left.path, "next.py");
    let _ = std::fs::remove_dir_all(&work_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_still_running_when_the_grace_ends_is_killed_and_its_work_handed_back() {
    let c = connections("handback").await;
    let (plan_id, artifacts) = built_plan(&c, &[("slow.py", WAITS_FOR_GO.to_owned())]).await;
    let config = draining_config(&c, Duration::from_secs(1));
    let work_dir = config.work_dir.clone();
    let (stop_token, set) = start(config);
    c.publish(queues::WORK_QA, qa_work(&plan_id, &artifacts, "slow.py"))
        .await
        .unwrap();
    let workspace = started_workspace(&work_dir).await;
    within("the worker to stop", SOON, stop(stop_token, set)).await;
    assert!(
        !workspace.exists(),
        "the check was killed and its workspace removed"
    );
    // Handed back, neither passed nor failed: delivered again, unsettled.
    let mut work = c
        .consume(queues::WORK_QA, ConsumeOptions::default())
        .await
        .unwrap();
    let (env, delivery) = within("the handed-back work", SOON, work.next_envelope())
        .await
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    let Message::QaWork(back) = env.message else {
        panic!("unexpected {env:?}")
    };
    assert_eq!(back.path, "slow.py");
    let mut results = c
        .consume(queues::QA_RESULTS, ConsumeOptions::default())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), results.next_envelope())
            .await
            .is_err(),
        "no verdict was published for the killed check"
    );
    let _ = std::fs::remove_dir_all(&work_dir);
}

#[tokio::test]
async fn a_worker_whose_sandbox_cannot_start_refuses_to_run() {
    let mut config = Config::new(Connections::in_memory());
    config.sandbox.bwrap = Some("/bin/false".into());
    let err = devfleet_qa_worker::run(config.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.downcast_ref::<devfleet_qa_worker::Unavailable>()
            .is_some(),
        "{err:#}"
    );
    assert!(
        err.to_string()
            .contains("DEVFLEET_QA_ALLOW_UNSANDBOXED=true"),
        "{err:#}"
    );

    // Opted out, it runs (until told to stop).
    config.sandbox.allow_unsandboxed = true;
    let stop = CancellationToken::new();
    stop.cancel();
    devfleet_qa_worker::run(config, stop).await.unwrap();
}
