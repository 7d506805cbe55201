//! Calling the shift and rollback handlers: the operator's profiles
//! ([`crate::profile`]) that a plan names.
//!
//! A command profile's argument vector has its placeholders replaced inside
//! each word and runs directly, never through a shell: no value can add
//! arguments, redirect or chain commands. It runs with a cleared
//! environment: `PATH`, `HOME` (a fresh directory of the call), the
//! `DEVFLEET_DEPLOY_*` variables, the profile's `env` and the variables it
//! passes through (`pass_env`), nothing else of the canary's (broker and
//! Redis URLs, keys). For a plan's deployment it gets the plan's built
//! tree ([`crate::tree`]). A webhook profile gets an HTTP POST of JSON.
//! Either succeeds only on exit status 0 or an HTTP 2xx within the timeout.

use crate::profile::{self, ProfileError, Profiles};
use devfleet_protocol::Handler;
use devfleet_store::SharedStore;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of a failed command's output kept in its error.
const OUTPUT_TAIL_BYTES: usize = 2000;

/// `PATH` of a command when the canary has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What a handler is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Shift,
    Rollback,
}

impl Action {
    /// The name used in webhook bodies and `DEVFLEET_DEPLOY_ACTION`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Shift => "shift",
            Action::Rollback => "rollback",
        }
    }

    /// The plan field the handler comes from, for errors.
    pub fn field(self) -> &'static str {
        match self {
            Action::Shift => "deploy.shift",
            Action::Rollback => "deploy.rollback",
        }
    }
}

/// One handler invocation.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub action: Action,
    pub deployment: &'a str,
    pub plan_id: Option<&'a str>,
    /// Percentage of traffic for the new version (0 on rollback).
    pub weight: u8,
    /// Stage index (into `stages`).
    pub stage: usize,
    pub stages: &'a [u8],
}

/// Why a handler call failed. Variants name the profile, command or URL.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("profile '{profile}': {reason}")]
    Template { profile: String, reason: String },
    #[error("profile '{profile}': the plan's tree could not be written: {reason}")]
    Tree { profile: String, reason: String },
    #[error("cannot start '{program}': {reason}")]
    Spawn { program: String, reason: String },
    #[error("'{program}' did not finish within {timeout:?} and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("'{program}' exited with {status}: {output}")]
    Exit {
        program: String,
        status: String,
        output: String,
    },
    #[error("POST {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("POST {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

impl HandlerError {
    /// Whether retrying cannot help: the plan names a profile the canary
    /// does not have, or parameters it refuses.
    pub fn is_refusal(&self) -> bool {
        matches!(self, HandlerError::Profile(_))
    }
}

/// Runs handlers. Cheap to clone.
#[derive(Clone)]
pub struct Handlers {
    http: reqwest::Client,
    timeout: Duration,
    profiles: Arc<Profiles>,
    store: SharedStore,
}

impl Handlers {
    /// Handlers of `profiles` that give up (and kill a command) after
    /// `timeout`, reading plans' trees from `store`.
    pub fn new(
        timeout: Duration,
        profiles: Arc<Profiles>,
        store: SharedStore,
    ) -> anyhow::Result<Self> {
        // The webhook URLs are the operator's (profiles), not a plan's, so
        // this client needs no allow-list.
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the webhook HTTP client: {e}"))?;
        Ok(Self {
            http,
            timeout,
            profiles,
            store,
        })
    }

    /// Checks that `handler` names a known profile with acceptable params,
    /// without calling it.
    pub fn check(&self, action: Action, handler: &Handler) -> Result<(), HandlerError> {
        self.profiles.resolve(action.field(), handler)?;
        Ok(())
    }

    /// Calls `handler` once; returns a short description of what it did.
    pub async fn call(&self, handler: &Handler, call: &Call<'_>) -> Result<String, HandlerError> {
        let (profile, params) = self.profiles.resolve(call.action.field(), handler)?;
        match &profile.action {
            profile::Action::Command(argv) => {
                self.run_command(&handler.profile, profile, argv, &params, call)
                    .await
            }
            profile::Action::Webhook(url) => self.post(&handler.profile, url, &params, call).await,
        }
    }

    async fn run_command(
        &self,
        name: &str,
        profile: &profile::Profile,
        template: &[String],
        params: &BTreeMap<String, String>,
        call: &Call<'_>,
    ) -> Result<String, HandlerError> {
        // A fresh directory per call: HOME, and the plan's tree under it.
        let scratch = tempfile::Builder::new()
            .prefix("devfleet-deploy-")
            .tempdir()
            .map_err(|e| HandlerError::Tree {
                profile: name.to_owned(),
                reason: format!("creating a directory: {e}"),
            })?;
        let tree = match call.plan_id {
            Some(plan_id) => {
                let dir = scratch.path().join("tree");
                std::fs::create_dir(&dir).map_err(|e| HandlerError::Tree {
                    profile: name.to_owned(),
                    reason: format!("creating {}: {e}", dir.display()),
                })?;
                crate::tree::materialise(&self.store, plan_id, &dir)
                    .await
                    .map_err(|reason| HandlerError::Tree {
                        profile: name.to_owned(),
                        reason,
                    })?;
                Some(dir.display().to_string())
            }
            None => None,
        };
        let argv = command_argv(template, params, call, tree.as_deref()).map_err(|reason| {
            HandlerError::Template {
                profile: name.to_owned(),
                reason,
            }
        })?;
        let program = argv[0].clone();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&argv[1..])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in &profile.env {
            cmd.env(key, value);
        }
        for key in &profile.pass_env {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd.env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        )
        .env("HOME", scratch.path())
        .envs(deploy_env(call, tree.as_deref(), params));
        let child = cmd.spawn().map_err(|e| HandlerError::Spawn {
            program: program.clone(),
            reason: e.to_string(),
        })?;
        // Dropping the future on timeout drops the child, which kills it.
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| HandlerError::Timeout {
                program: program.clone(),
                timeout: self.timeout,
            })?
            .map_err(|e| HandlerError::Spawn {
                program: program.clone(),
                reason: e.to_string(),
            })?;
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
            if text.trim().is_empty() {
                text = String::from_utf8_lossy(&output.stdout).into_owned();
            }
            return Err(HandlerError::Exit {
                program,
                status: output.status.to_string(),
                output: tail(text.trim(), OUTPUT_TAIL_BYTES),
            });
        }
        Ok(format!("profile {name}: {} exited 0", argv.join(" ")))
    }

    async fn post(
        &self,
        name: &str,
        url: &str,
        params: &BTreeMap<String, String>,
        call: &Call<'_>,
    ) -> Result<String, HandlerError> {
        let body = serde_json::json!({
            "action": call.action.as_str(),
            "profile": name,
            "deployment": call.deployment,
            "plan_id": call.plan_id,
            "weight": call.weight,
            "stage": call.stage,
            "stages": call.stages,
            "params": params,
        });
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| HandlerError::Request {
                url: url.to_owned(),
                reason: error_chain(&e),
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(HandlerError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
                body: tail(body.trim(), OUTPUT_TAIL_BYTES),
            });
        }
        Ok(format!(
            "profile {name}: POST {url} answered {}",
            status.as_u16()
        ))
    }
}

/// The argument vector of a command profile: each word's placeholders
/// replaced (built-ins and the resolved params), never re-split.
pub fn command_argv(
    template: &[String],
    params: &BTreeMap<String, String>,
    call: &Call<'_>,
    tree: Option<&str>,
) -> Result<Vec<String>, String> {
    let value = |name: &str| -> Option<String> {
        match name {
            "weight" => Some(call.weight.to_string()),
            "deployment" => Some(call.deployment.to_owned()),
            "stage" => Some(call.stage.to_string()),
            "action" => Some(call.action.as_str().to_owned()),
            "plan_id" => call.plan_id.map(str::to_owned),
            "tree" => tree.map(str::to_owned),
            other => params.get(other).cloned(),
        }
    };
    template
        .iter()
        .map(|word| {
            profile::fill(word, &value).map_err(|e| {
                if call.plan_id.is_none() {
                    format!(
                        "{e} (the deployment belongs to no plan, so it has no plan id nor tree)"
                    )
                } else {
                    e
                }
            })
        })
        .collect()
}

/// The documented variables of a command: `DEVFLEET_DEPLOY_ACTION`, `_ID`,
/// `_WEIGHT`, `_STAGE`, `_STAGES` (comma-separated), `_PLAN_ID` and `_TREE`
/// (for a plan's deployment), `_PARAM_<NAME>` per parameter.
fn deploy_env(
    call: &Call<'_>,
    tree: Option<&str>,
    params: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let stages: Vec<String> = call.stages.iter().map(u8::to_string).collect();
    let mut env = vec![
        ("DEVFLEET_DEPLOY_ACTION".into(), call.action.as_str().into()),
        ("DEVFLEET_DEPLOY_ID".into(), call.deployment.into()),
        ("DEVFLEET_DEPLOY_WEIGHT".into(), call.weight.to_string()),
        ("DEVFLEET_DEPLOY_STAGE".into(), call.stage.to_string()),
        ("DEVFLEET_DEPLOY_STAGES".into(), stages.join(",")),
    ];
    if let Some(plan) = call.plan_id {
        env.push(("DEVFLEET_DEPLOY_PLAN_ID".into(), plan.into()));
    }
    if let Some(tree) = tree {
        env.push(("DEVFLEET_DEPLOY_TREE".into(), tree.into()));
    }
    for (key, value) in params {
        env.push((
            format!("DEVFLEET_DEPLOY_PARAM_{}", key.to_ascii_uppercase()),
            value.clone(),
        ));
    }
    env
}

/// An error and its sources, `: `-separated (what went wrong at every
/// level of an HTTP failure: connect, TLS, DNS).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The last `max` bytes of `text` (on a character boundary).
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::PlanStatus;
    use devfleet_store::{NewTask, PlanRecord};

    fn call(weight: u8) -> Call<'static> {
        Call {
            action: Action::Shift,
            deployment: "web-1",
            plan_id: None,
            weight,
            stage: 0,
            stages: &[10, 100],
        }
    }

    fn handlers(profiles: &str, timeout: Duration) -> Handlers {
        let store = devfleet_runtime::Connections::in_memory().store;
        Handlers::new(timeout, Arc::new(Profiles::parse(profiles).unwrap()), store).unwrap()
    }

    fn words(argv: &[&str]) -> Vec<String> {
        argv.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn placeholders_are_replaced_per_word_never_re_split() {
        let params = BTreeMap::from([("pool".to_owned(), "web:eu".to_owned())]);
        let argv = command_argv(
            &words(&[
                "./shift.sh",
                "--weight={weight}",
                "name {deployment}",
                "{pool}",
                "$(rm -rf /)",
            ]),
            &params,
            &call(25),
            None,
        )
        .unwrap();
        assert_eq!(
            argv,
            vec![
                "./shift.sh",
                "--weight=25",
                "name web-1",
                "web:eu",
                "$(rm -rf /)"
            ]
        );
        // No plan, no tree: a profile that needs one says why it cannot run.
        let err = command_argv(&words(&["x", "{tree}"]), &params, &call(1), None).unwrap_err();
        assert!(err.contains("{tree}") && err.contains("no plan"), "{err}");
    }

    #[tokio::test]
    async fn command_runs_without_a_shell_and_gets_the_weight_and_params() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let profiles = format!(
            r#"
shift:
  command: [/bin/sh, -c, 'printf "%s|%s|%s|%s" "$1" "$2" "$DEVFLEET_DEPLOY_WEIGHT" "$DEVFLEET_DEPLOY_PARAM_POOL" > {}', sh, "{{weight}}", "{{pool}}"]
  params: {{ pool: {{}} }}
"#,
            out.display()
        );
        let handlers = handlers(&profiles, Duration::from_secs(10));
        // `;` or `$(...)` would run in a shell; here a value is one
        // argument, and a plan's params cannot even contain them.
        let handler = Handler::profile("shift").param("pool", "web-eu");
        handlers.call(&handler, &call(50)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "50|web-eu|50|web-eu"
        );
        let hostile = Handler::profile("shift").param("pool", ";touch /tmp/x");
        let err = handlers.call(&hostile, &call(50)).await.unwrap_err();
        assert!(err.is_refusal(), "{err}");
    }

    #[tokio::test]
    async fn a_command_sees_none_of_the_canarys_environment() {
        // A secret in the canary's environment (a broker URL with its
        // password, an API key) must not reach the handler.
        std::env::set_var("DEVFLEET_TEST_SECRET", "hunter2");
        std::env::set_var("LB_TOKEN", "passed-on-purpose");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let profiles = format!(
            "dump:\n  command: [/bin/sh, -c, 'env > {}']\n  env: {{ FIXED: yes }}\n  pass_env: [LB_TOKEN]\n",
            out.display()
        );
        let handlers = handlers(&profiles, Duration::from_secs(10));
        handlers
            .call(&Handler::profile("dump"), &call(10))
            .await
            .unwrap();
        let env = std::fs::read_to_string(&out).unwrap();
        assert!(!env.contains("hunter2"), "the secret leaked:\n{env}");
        let mut names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| !matches!(*k, "PWD" | "SHLVL" | "_" | "OLDPWD"))
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "DEVFLEET_DEPLOY_ACTION",
                "DEVFLEET_DEPLOY_ID",
                "DEVFLEET_DEPLOY_STAGE",
                "DEVFLEET_DEPLOY_STAGES",
                "DEVFLEET_DEPLOY_WEIGHT",
                "FIXED",
                "HOME",
                "LB_TOKEN",
                "PATH"
            ],
            "{env}"
        );
        assert!(env.contains("LB_TOKEN=passed-on-purpose"), "{env}");
    }

    /// The tree itself is tested against Redis (tests/canary.rs,
    /// `a_plans_deployment_hands_its_built_tree_to_the_command`); here: a
    /// plan whose tree is incomplete ships nothing.
    #[tokio::test]
    async fn an_incomplete_tree_is_never_handed_over() {
        let handlers = handlers(
            "p: { command: [/bin/true, '{tree}'] }\n",
            Duration::from_secs(10),
        );
        let plan = PlanRecord::new("plan-2", "p", PlanStatus::Deploying, 0);
        let task = NewTask {
            path: "a.py".into(),
            spec: "s".into(),
            content: None,
            depends_on: vec![],
            priority: 0,
            estimate: 1,
            executor: None,
        };
        handlers.store.create_plan(plan, vec![task]).await.unwrap();
        let mut c = call(10);
        c.plan_id = Some("plan-2");
        let err = handlers.call(&Handler::profile("p"), &c).await.unwrap_err();
        assert!(
            matches!(err, HandlerError::Tree { .. }) && err.to_string().contains("a.py"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unknown_profile_is_a_refusal_naming_it() {
        let handlers = handlers("a: { command: [/bin/true] }\n", Duration::from_secs(1));
        let err = handlers
            .call(&Handler::profile("curl-metadata"), &call(10))
            .await
            .unwrap_err();
        assert!(err.is_refusal());
        let text = err.to_string();
        assert!(
            text.contains("'curl-metadata'") && text.contains("DEVFLEET_CANARY_PROFILES"),
            "{text}"
        );
    }

    /// The error of calling profile `p` of `profiles` once.
    async fn call_error(profiles: &str, timeout: Duration) -> HandlerError {
        handlers(profiles, timeout)
            .call(&Handler::profile("p"), &call(10))
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn failing_command_reports_status_and_output() {
        let err = call_error(
            "p: { command: [/bin/sh, -c, 'echo no route to lb >&2; exit 3'] }\n",
            Duration::from_secs(10),
        )
        .await;
        let text = err.to_string();
        assert!(
            text.contains("no route to lb") && text.contains('3'),
            "{text}"
        );
    }

    #[tokio::test]
    async fn slow_command_is_killed_at_the_timeout() {
        let err = call_error(
            "p: { command: [sleep, '30'] }\n",
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(err, HandlerError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = call_error(
            "p: { command: [/nonexistent/shift, '{weight}'] }\n",
            Duration::from_secs(1),
        )
        .await;
        assert!(err.to_string().contains("/nonexistent/shift"), "{err}");
    }
}
