//! `devfleet up` configures its embedded services from the same
//! `DEVFLEET_*` variables as their binaries: new names, deprecated names
//! (with a warning) and empty values (unset). Needs no servers: each case
//! stops at the settings check, before any service starts.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `devfleet up` with only `vars` among the `DEVFLEET_*` variables;
/// fails the test if it is still running after 30 s (settings were
/// accepted and the services started).
fn up(vars: &[(&str, &str)]) -> Output {
    up_with(&[], vars, Duration::from_secs(30))
}

/// Runs `devfleet up ARGS` with only `vars` among the `DEVFLEET_*`
/// variables; fails the test if it is still running after `limit`.
fn up_with(args: &[&str], vars: &[(&str, &str)], limit: Duration) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_devfleet"));
    command.arg("up").args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DEVFLEET_") {
            command.env_remove(key);
        }
    }
    command
        .env("DEVFLEET_GATEWAY_ADDR", "127.0.0.1:0")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("starting devfleet up");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("waiting for devfleet up").is_some() {
            return child
                .wait_with_output()
                .expect("reading devfleet up's output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child
                .wait_with_output()
                .expect("reading devfleet up's output");
            panic!(
                "devfleet up still ran after {limit:?} (accepted settings it should refuse?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn up_reads_the_scheduler_settings_from_the_environment() {
    let out = up(&[("DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS", "0")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS") && err.contains("positive"),
        "{err}"
    );
}

#[test]
fn up_accepts_a_deprecated_name_with_a_warning_naming_the_new_one() {
    // 0 ms is converted to 0 s, which the scheduler refuses: proof that the
    // old name reached the scheduler's setting.
    let out = up(&[("DEVFLEET_DISPATCH_LEASE_MS", "0")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("warning: DEVFLEET_DISPATCH_LEASE_MS is deprecated; use DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS"),
        "{err}"
    );
    assert!(
        err.contains("DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS") && err.contains("positive"),
        "{err}"
    );
}

#[test]
fn up_treats_an_empty_variable_as_unset() {
    // The empty dev-worker setting is skipped (its default applies); the
    // router's bad value, read after it, is what stops `up`.
    let out = up(&[
        ("DEVFLEET_DEV_MAX_SLOTS", ""),
        ("DEVFLEET_ROUTER_MAX_FAILURES", "0"),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("DEVFLEET_ROUTER_MAX_FAILURES"), "{err}");
    assert!(!err.contains("invalid value ''"), "{err}");
}

/// A bubblewrap that always fails: the QA sandbox cannot start.
const BROKEN_BWRAP: (&str, &str) = ("DEVFLEET_QA_BWRAP", "/bin/false");

#[test]
fn up_refuses_to_check_generated_code_without_a_sandbox() {
    let out = up(&[BROKEN_BWRAP, ("DEVFLEET_COMMAND", "cat")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the QA sandbox cannot start"), "{err}");
    assert!(err.contains("install bubblewrap"), "{err}");
    assert!(err.contains("DEVFLEET_QA_ALLOW_UNSANDBOXED=true"), "{err}");
    assert!(err.contains("the command executor"), "{err}");
}

#[test]
fn up_runs_only_the_plans_own_code_unsandboxed_and_says_so() {
    let plan = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/plan.yaml");
    let out = up_with(
        &["--plan", plan, "--exit-when-done"],
        &[BROKEN_BWRAP],
        Duration::from_secs(300),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("devfleet up: QA checks run WITHOUT a sandbox")
            && err.contains("code that came verbatim from the plan"),
        "{err}"
    );
}

#[test]
fn up_refuses_a_canary_profile_file_it_cannot_use_naming_the_variable() {
    let dir = std::env::temp_dir().join(format!("devfleet-up-profiles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("profiles.yaml");
    std::fs::write(&bad, "lb: { command: [set-weight, '{colour}'] }\n").unwrap();
    for (path, needle) in [
        (bad.to_str().unwrap(), "{colour}"),
        ("/nonexistent/profiles.yaml", "reading the canary profiles"),
    ] {
        let out = up(&[("DEVFLEET_CANARY_PROFILES", path)]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("DEVFLEET_CANARY_PROFILES") && err.contains(needle),
            "{path}: {err}"
        );
    }
    let bad_networks = up(&[("DEVFLEET_CANARY_ALLOWED_NETWORKS", "10.0.0.0/33")]);
    let err = stderr(&bad_networks);
    assert!(
        !bad_networks.status.success() && err.contains("DEVFLEET_CANARY_ALLOWED_NETWORKS"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
