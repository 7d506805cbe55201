//! The ways a user runs devfleet, end to end: the native stack of
//! `scripts/stack.sh` (its own RabbitMQ, Redis and NATS, every service as
//! its own process) building the Flask example, and `devfleet up` running
//! an example plan in one process.

use crate::support::{fresh_bin_dir, repo, SERVICES};
use devfleet_testkit::{unique, wait_for, within};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The sandbox's PATH (qa-worker's default `DEVFLEET_QA_PATH`): the pulled
/// tests run with the same python3 the QA integration step uses.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").to_string()
}

/// A command with no inherited `DEVFLEET_*` settings (the test servers'
/// URLs must not leak into the stack under test).
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars() {
        if key.starts_with("DEVFLEET_") {
            command.env_remove(key);
        }
    }
    command.kill_on_drop(true).stdin(Stdio::null());
    command
}

async fn run(what: &str, limit: Duration, command: &mut Command) -> Output {
    let output = within(what, limit, command.output())
        .await
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    output
}

fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `export K=V` lines of the stack's env file.
fn read_env(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// A GET over plain HTTP/1.0: status code and body.
async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Takes the stack down, and stops the demo service, whatever happened.
struct StackGuard {
    state: PathBuf,
    service: Option<std::process::Child>,
}

impl Drop for StackGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo().join("scripts/stack.sh"))
            .arg("down")
            .env("DEVFLEET_STACK_DIR", &self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.service.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(root) = self.state.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn pids(state: &Path) -> Vec<i32> {
    std::fs::read_dir(state.join("run"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|p| p.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[tokio::test]
async fn native_stack_builds_the_flask_example_and_its_tests_pass() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import flask, pytest"])
        .env("PATH", SANDBOX_PATH)
        .output()
        .expect("running python3");
    assert!(
        probe.status.success(),
        "the system python3 needs flask and pytest (the QA sandbox and this test use it): \
         apt-get install python3-flask python3-pytest\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let root = std::env::temp_dir().join(unique("devfleet-stack-e2e"));
    let state = root.join("stack");
    std::fs::create_dir_all(&root).unwrap();
    let mut guard = StackGuard {
        state: state.clone(),
        service: None,
    };

    // The demo service the plan's canary section reads, on a free port.
    let service_log = root.join("service.log");
    guard.service = Some(
        std::process::Command::new("python3")
            .arg(repo().join("examples/flask-todo/service.py"))
            .args(["--port", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&service_log).unwrap())
            .spawn()
            .expect("starting examples/flask-todo/service.py"),
    );
    let service_addr = wait_for(
        "the demo service to listen",
        Duration::from_secs(20),
        || {
            let log = std::fs::read_to_string(&service_log).unwrap_or_default();
            async move {
                log.lines()
                    .find_map(|l| l.strip_prefix("service: http://"))
                    .and_then(|l| l.strip_suffix("/stats"))
                    .map(str::to_owned)
            }
        },
    )
    .await;
    let plan = std::fs::read_to_string(repo().join("examples/flask-todo/plan.yaml"))
        .unwrap()
        .replace("127.0.0.1:9000", &service_addr);
    let plan_path = root.join("plan.yaml");
    std::fs::write(&plan_path, plan).unwrap();
    // The canary's operator-owned profile the plan names, aimed at the same
    // service.
    let profiles = std::fs::read_to_string(repo().join("examples/flask-todo/canary-profiles.yaml"))
        .unwrap()
        .replace("127.0.0.1:9000", &service_addr);
    let profiles_path = root.join("canary-profiles.yaml");
    std::fs::write(&profiles_path, profiles).unwrap();

    // Up: servers on free ports, debug binaries, the gateway on a free port.
    let gateway = free_addr();
    let mut up = clean_command(repo().join("scripts/stack.sh"));
    up.args(["up", "dev-worker=2"])
        .env("DEVFLEET_STACK_DIR", &state)
        .env("DEVFLEET_PROFILE", "debug")
        .env("DEVFLEET_CANARY_PROFILES", &profiles_path)
        .env("DEVFLEET_GATEWAY_ADDR", &gateway);
    if let Some(bin) = fresh_bin_dir() {
        up.env("DEVFLEET_BIN_DIR", bin);
    }
    let up = run("scripts/stack.sh up", Duration::from_secs(600), &mut up).await;
    assert!(up.status.success(), "stack.sh up failed:\n{}", text(&up));
    let exports = String::from_utf8_lossy(&up.stdout);
    assert!(
        exports.contains("export DEVFLEET_AMQP_URL=") && exports.contains(&gateway),
        "up prints the exports and the dashboard:\n{}",
        text(&up)
    );
    let env = read_env(&state.join("env"));
    let pids_up = pids(&state);
    assert_eq!(
        pids_up.len(),
        SERVICES.len() + 1,
        "one of each, two dev-workers"
    );

    let status = run(
        "scripts/stack.sh status",
        Duration::from_secs(60),
        clean_command(repo().join("scripts/stack.sh"))
            .arg("status")
            .env("DEVFLEET_STACK_DIR", &state),
    )
    .await;
    let status_text = text(&status);
    assert!(status.status.success(), "a process is dead:\n{status_text}");
    for service in SERVICES {
        assert!(
            status_text.contains(&format!("{service}.1")),
            "status lists {service}:\n{status_text}"
        );
    }
    assert!(
        status_text.contains("work.dev"),
        "status shows queue depths:\n{status_text}"
    );

    // Publish and wait, as a user would.
    let cli = || {
        let mut c = clean_command(env!("CARGO_BIN_EXE_devfleet"));
        c.envs(&env).current_dir(repo());
        c
    };
    let published = run(
        "devfleet publish --wait",
        Duration::from_secs(300),
        cli()
            .arg("publish")
            .arg(&plan_path)
            .args(["--wait", "--json", "--timeout", "240"]),
    )
    .await;
    assert!(
        published.status.success(),
        "the plan did not succeed:\n{}",
        text(&published)
    );
    let record: Value = serde_json::from_slice(&published.stdout).unwrap_or_else(|e| {
        panic!(
            "publish --json printed no JSON ({e}):\n{}",
            text(&published)
        )
    });
    let plan_id = [&record["id"], &record["plan_id"], &record["plan"]["id"]]
        .into_iter()
        .find_map(Value::as_str)
        .unwrap_or_else(|| panic!("no plan id in {record}"))
        .to_owned();

    // The plan's canary section ran its shift handler (shift.sh) up to 100 %
    // against the demo service before the plan counted as succeeded.
    let service_said = std::fs::read_to_string(&service_log).unwrap_or_default();
    assert!(
        service_said.contains("canary weight 100%"),
        "the canary never shifted all traffic; the demo service saw:\n{service_said}"
    );

    // Pull the files and run their own tests with the sandbox's python3.
    let out = root.join("out");
    let pulled = run(
        "devfleet pull",
        Duration::from_secs(60),
        cli().args(["pull", &plan_id, "--out"]).arg(&out),
    )
    .await;
    assert!(pulled.status.success(), "pull failed:\n{}", text(&pulled));
    for file in [
        "todo/__init__.py",
        "todo/models.py",
        "todo/routes.py",
        "tests/test_routes.py",
    ] {
        assert!(out.join(file).is_file(), "{file} was not pulled");
    }
    let pytest = run(
        "pytest on the pulled files",
        Duration::from_secs(120),
        clean_command("python3")
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(&out)
            .env("PATH", SANDBOX_PATH)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    )
    .await;
    assert!(
        pytest.status.success(),
        "the generated app's tests failed:\n{}",
        text(&pytest)
    );
    assert!(
        String::from_utf8_lossy(&pytest.stdout).contains("6 passed"),
        "{}",
        text(&pytest)
    );

    // The dashboard's API knows the plan and its tasks; the page is served.
    let gateway = env
        .get("DEVFLEET_GATEWAY_ADDR")
        .expect("gateway address")
        .clone();
    let (code, body) = http_get(&gateway, &format!("/api/plans/{plan_id}"))
        .await
        .expect("GET /api/plans/{id}");
    assert_eq!(code, 200, "{body}");
    let detail: Value = serde_json::from_str(&body).expect("plan JSON");
    assert_eq!(detail["plan"]["status"], "succeeded", "{detail}");
    assert_eq!(
        detail["tasks"].as_array().map(Vec::len),
        Some(10),
        "{detail}"
    );
    assert!(
        detail["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "done"),
        "{detail}"
    );
    wait_for("the plan in /api/plans", Duration::from_secs(30), || {
        let gateway = gateway.clone();
        let plan_id = plan_id.clone();
        async move {
            let (code, body) = http_get(&gateway, "/api/plans").await.ok()?;
            (code == 200 && body.contains(&plan_id)).then_some(())
        }
    })
    .await;
    let (code, page) = http_get(&gateway, "/").await.expect("GET /");
    assert_eq!(code, 200);
    assert!(
        page.contains("<html") || page.contains("<!doctype"),
        "the dashboard page"
    );

    // Scaling adds and removes replicas.
    let scaled = run(
        "scripts/stack.sh scale qa-worker 2",
        Duration::from_secs(120),
        clean_command(repo().join("scripts/stack.sh"))
            .args(["scale", "qa-worker", "2"])
            .env("DEVFLEET_STACK_DIR", &state),
    )
    .await;
    assert!(scaled.status.success(), "{}", text(&scaled));
    assert!(state.join("run/qa-worker.2.pid").is_file());
    let scaled = run(
        "scripts/stack.sh scale dev-worker 1",
        Duration::from_secs(120),
        clean_command(repo().join("scripts/stack.sh"))
            .args(["scale", "dev-worker", "1"])
            .env("DEVFLEET_STACK_DIR", &state),
    )
    .await;
    assert!(scaled.status.success(), "{}", text(&scaled));
    assert!(!state.join("run/dev-worker.2.pid").exists());

    // Down stops every process it started.
    let all = pids(&state);
    let down = run(
        "scripts/stack.sh down",
        Duration::from_secs(180),
        clean_command(repo().join("scripts/stack.sh"))
            .arg("down")
            .env("DEVFLEET_STACK_DIR", &state),
    )
    .await;
    assert!(down.status.success(), "{}", text(&down));
    let running: Vec<i32> = all.into_iter().filter(|p| alive(*p)).collect();
    assert!(running.is_empty(), "still running after down: {running:?}");
    drop(guard);
}

#[tokio::test]
async fn devfleet_up_runs_an_example_plan_and_reports() {
    let up = run(
        "devfleet up --plan examples/ts-lib/plan.yaml --exit-when-done",
        Duration::from_secs(300),
        clean_command(env!("CARGO_BIN_EXE_devfleet"))
            .args([
                "up",
                "--plan",
                "examples/ts-lib/plan.yaml",
                "--exit-when-done",
                "--timeout",
                "240",
            ])
            .env("DEVFLEET_GATEWAY_ADDR", free_addr())
            .current_dir(repo()),
    )
    .await;
    let report = text(&up);
    assert!(up.status.success(), "devfleet up failed:\n{report}");
    assert!(
        report.contains("ts-lib-"),
        "the report names the plan:\n{report}"
    );
    assert!(
        report.contains("succeeded"),
        "the report says it succeeded:\n{report}"
    );
    assert!(
        report.contains("9 done"),
        "the report counts the tasks:\n{report}"
    );
}
