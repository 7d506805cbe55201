//! The plan format: the files a project needs, each with a spec.
//!
//! A plan is YAML or JSON (JSON is parsed as YAML, its superset). Unknown
//! fields are errors when a plan is read from a file ([`Plan::parse`],
//! [`from_yaml_value_strict`]), so a typo never silently changes behaviour.
//! The same types travel inside messages, where unknown fields are ignored
//! instead (the crate's compatibility rule): the strictness is in the
//! parsing functions, not in the types. The untagged [`HealthSource`] is
//! the exception: its exact fields tell the shapes apart, so a field added
//! to one is a new shape (a breaking change).
//! [`Plan::parse`] checks everything that can be checked without the import
//! graph; cycles and parsed imports are the analyzer's job.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Largest `content` accepted for one task, in bytes.
pub const MAX_TASK_CONTENT_BYTES: usize = 1024 * 1024;
/// Largest number of tasks in one plan.
pub const MAX_TASKS: usize = 20_000;
/// Longest task path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// A plan as the user wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// For people; the plan id is generated at submission.
    pub name: String,
    /// Existing code the plan extends (imports may resolve there; its files are not tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Default executor for tasks that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorKind>,
    pub tasks: Vec<TaskDef>,
    /// Commands run after every file passed QA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub integration: Vec<IntegrationStep>,
    /// Canary rollout after integration passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeploySpec>,
}

/// One file of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDef {
    /// Relative `/`-separated path; no `..`, no absolute paths.
    pub path: String,
    /// What the file must do, for the executor.
    pub spec: String,
    /// Optional skeleton or full text; imports are parsed from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Explicit edges, merged with the parsed ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Relative cost; default derived from size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<u32>,
    /// Executor for this task only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorKind>,
}

/// Which executor writes a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Writes the task's `content`.
    Builtin,
    /// Runs a configured external agent command.
    Command,
    /// OpenAI-compatible chat completions.
    Openai,
    /// Takes time and fails on purpose, for demos and load tests.
    Simulate,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Builtin => "builtin",
            ExecutorKind::Command => "command",
            ExecutorKind::Openai => "openai",
            ExecutorKind::Simulate => "simulate",
        }
    }
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "builtin" => Ok(Self::Builtin),
            "command" => Ok(Self::Command),
            "openai" => Ok(Self::Openai),
            "simulate" => Ok(Self::Simulate),
            other => Err(format!(
                "unknown executor '{other}' (expected builtin, command, openai or simulate)"
            )),
        }
    }
}

/// One integration command, run after every file passed QA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationStep {
    pub name: String,
    /// Command line, split like a shell would but never run through one.
    pub run: String,
    /// Split a pytest run over this many workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// Canary rollout settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySpec {
    #[serde(default = "default_stages")]
    pub stages: Vec<u8>,
    #[serde(default = "default_stage_seconds")]
    pub stage_seconds: u64,
    #[serde(default = "default_check_seconds")]
    pub check_seconds: u64,
    pub shift: Handler,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Handler>,
    pub health: HealthSource,
    #[serde(default)]
    pub thresholds: Thresholds,
}

fn default_stages() -> Vec<u8> {
    vec![10, 25, 50, 75, 100]
}
fn default_stage_seconds() -> u64 {
    300
}
fn default_check_seconds() -> u64 {
    30
}

/// Longest handler profile name, in bytes.
pub const MAX_PROFILE_NAME_BYTES: usize = 64;
/// Most parameters one handler may give its profile.
pub const MAX_HANDLER_PARAMS: usize = 32;
/// Longest handler parameter name, in bytes.
pub const MAX_PARAM_NAME_BYTES: usize = 64;
/// Longest handler parameter value, in bytes.
pub const MAX_PARAM_VALUE_BYTES: usize = 256;

/// How traffic is shifted or rolled back: a named profile of the canary
/// service (operator-owned configuration) and the parameters the plan
/// fills in. A plan never names a program or a webhook itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HandlerDoc")]
pub struct Handler {
    /// Name of a profile configured on the canary (`DEVFLEET_CANARY_PROFILES`).
    pub profile: String,
    /// Values of parameters the profile declares.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

impl Handler {
    /// A handler naming `profile` with no parameters.
    pub fn profile(profile: impl Into<String>) -> Self {
        Self {
            profile: profile.into(),
            params: BTreeMap::new(),
        }
    }

    /// Adds a parameter.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }

    /// Checks the profile name and the parameters' names and values: names
    /// are `[a-z0-9_.-]` (parameters: `[a-z][a-z0-9_]*`), values are at
    /// most [`MAX_PARAM_VALUE_BYTES`] of ASCII letters, digits and
    /// `. _ - : / = , @ +`, and do not start with `-` (no value can pass
    /// for an option of the profile's program).
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.profile;
        if name.is_empty()
            || name.len() > MAX_PROFILE_NAME_BYTES
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        {
            return Err(format!(
                "profile '{name}' is not a profile name (1 to {MAX_PROFILE_NAME_BYTES} of a-z, 0-9, '_', '.', '-')"
            ));
        }
        if self.params.len() > MAX_HANDLER_PARAMS {
            return Err(format!(
                "{} params; the limit is {MAX_HANDLER_PARAMS}",
                self.params.len()
            ));
        }
        for (key, value) in &self.params {
            validate_param_name(key)?;
            validate_param_value(key, value)?;
        }
        Ok(())
    }
}

/// Checks a handler parameter name: `[a-z][a-z0-9_]*`, at most
/// [`MAX_PARAM_NAME_BYTES`].
pub fn validate_param_name(key: &str) -> Result<(), String> {
    let ok = key.len() <= MAX_PARAM_NAME_BYTES
        && key.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "param '{key}' is not a parameter name (a-z, then a-z, 0-9 or '_'; at most {MAX_PARAM_NAME_BYTES} bytes)"
        ))
    }
}

/// Checks a handler parameter value (see [`Handler::validate`]).
pub fn validate_param_value(key: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_PARAM_VALUE_BYTES {
        return Err(format!(
            "param '{key}' is longer than {MAX_PARAM_VALUE_BYTES} bytes"
        ));
    }
    if value.starts_with('-') {
        return Err(format!("param '{key}' must not start with '-'"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-:/=,@+".contains(&b))
    {
        return Err(format!(
            "param '{key}' value '{value}': use only ASCII letters, digits and . _ - : / = , @ +"
        ));
    }
    Ok(())
}

/// What a handler may be written as; turned into a [`Handler`] or an error
/// that says how to move a raw command or webhook into a profile.
#[derive(Deserialize)]
struct HandlerDoc {
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, String>,
    #[serde(default)]
    command: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    webhook: Option<serde::de::IgnoredAny>,
}

impl TryFrom<HandlerDoc> for Handler {
    type Error = String;
    fn try_from(doc: HandlerDoc) -> Result<Self, String> {
        let raw = if doc.command.is_some() {
            Some("command")
        } else if doc.webhook.is_some() {
            Some("webhook")
        } else {
            None
        };
        if let Some(raw) = raw {
            return Err(format!(
                "a plan cannot give the canary a `{raw}:` to run (it would run on the canary host \
                 with the canary's credentials); move it into a profile of the canary's \
                 operator-owned profile file (DEVFLEET_CANARY_PROFILES) and name that profile \
                 here: `{{ profile: NAME, params: {{...}} }}` (see docs/CANARY.md)"
            ));
        }
        let Some(profile) = doc.profile else {
            return Err(
                "a handler names a canary profile: `{ profile: NAME, params: {...} }`".into(),
            );
        };
        Ok(Handler {
            profile,
            params: doc.params,
        })
    }
}

/// Where health is read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum HealthSource {
    /// An HTTP JSON endpoint with cumulative counters.
    Url { url: String },
    /// Prometheus's query API.
    Prometheus {
        prometheus: String,
        error_rate: String,
        latency_p95_ms: String,
    },
}

/// Health classification thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    #[serde(default = "default_degraded")]
    pub degraded_error_rate: f64,
    #[serde(default = "default_rollback")]
    pub rollback_error_rate: f64,
    #[serde(default = "default_latency")]
    pub max_latency_ms: f64,
}

fn default_degraded() -> f64 {
    0.05
}
fn default_rollback() -> f64 {
    0.10
}
fn default_latency() -> f64 {
    200.0
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            degraded_error_rate: default_degraded(),
            rollback_error_rate: default_rollback(),
            max_latency_ms: default_latency(),
        }
    }
}

/// Reads a YAML value (e.g. a deploy spec from a file) refusing unknown
/// fields at any depth, as [`Plan::parse`] does for a whole plan.
pub fn from_yaml_value_strict<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
) -> Result<T, PlanError> {
    strict(value)
}

/// Deserializes, then refuses the first field the types do not know,
/// naming its path (e.g. `tasks.0.colour`).
fn strict<'de, T, D>(de: D) -> Result<T, PlanError>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    let mut unknown = Vec::new();
    // `?` marks an `Option` in the path: say `deploy.colour`, not `deploy.?.colour`.
    let value: T = serde_ignored::deserialize(de, |path| {
        unknown.push(path.to_string().replace(".?", "").replace("?.", ""))
    })
    .map_err(|e| PlanError::Syntax(e.to_string()))?;
    match unknown.first() {
        Some(path) => Err(PlanError::Syntax(format!("unknown field `{path}`"))),
        None => Ok(value),
    }
}

/// Why a plan was rejected. Every variant names the task and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("plan is not valid YAML/JSON: {0}")]
    Syntax(String),
    #[error("plan has an empty name")]
    EmptyName,
    #[error("plan has no tasks")]
    NoTasks,
    #[error("plan has {count} tasks; the limit is {limit}")]
    TooManyTasks { count: usize, limit: usize },
    #[error("task '{task}': invalid path: {reason}")]
    InvalidPath { task: String, reason: String },
    #[error("task '{task}': path appears more than once")]
    DuplicatePath { task: String },
    #[error("task '{task}': empty spec")]
    EmptySpec { task: String },
    #[error("task '{task}': content is {size} bytes; the limit is {limit}")]
    ContentTooLarge {
        task: String,
        size: usize,
        limit: usize,
    },
    #[error("task '{task}': depends on '{dependency}', which is not a task of this plan")]
    UnknownDependency { task: String, dependency: String },
    #[error("task '{task}': depends on itself")]
    SelfDependency { task: String },
    #[error("tasks form a dependency cycle that cannot be broken: {}", files.join(" -> "))]
    Cycle { files: Vec<String> },
    #[error("integration step '{step}': {reason}")]
    InvalidIntegration { step: String, reason: String },
    #[error("deploy: {0}")]
    InvalidDeploy(String),
}

impl Plan {
    /// Parses a YAML or JSON plan and checks it with [`Plan::validate`].
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        let plan: Plan = strict(serde_yaml::Deserializer::from_str(text))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Checks everything that needs no import graph: names, paths, sizes,
    /// duplicates, explicit dependencies and the deploy section.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.name.trim().is_empty() {
            return Err(PlanError::EmptyName);
        }
        if self.tasks.is_empty() {
            return Err(PlanError::NoTasks);
        }
        if self.tasks.len() > MAX_TASKS {
            return Err(PlanError::TooManyTasks {
                count: self.tasks.len(),
                limit: MAX_TASKS,
            });
        }
        let mut seen = HashSet::with_capacity(self.tasks.len());
        for task in &self.tasks {
            validate_path(&task.path).map_err(|reason| PlanError::InvalidPath {
                task: task.path.clone(),
                reason,
            })?;
            if !seen.insert(task.path.as_str()) {
                return Err(PlanError::DuplicatePath {
                    task: task.path.clone(),
                });
            }
            if task.spec.trim().is_empty() {
                return Err(PlanError::EmptySpec {
                    task: task.path.clone(),
                });
            }
            if let Some(content) = &task.content {
                if content.len() > MAX_TASK_CONTENT_BYTES {
                    return Err(PlanError::ContentTooLarge {
                        task: task.path.clone(),
                        size: content.len(),
                        limit: MAX_TASK_CONTENT_BYTES,
                    });
                }
            }
        }
        for task in &self.tasks {
            for dep in &task.depends_on {
                if dep == &task.path {
                    return Err(PlanError::SelfDependency {
                        task: task.path.clone(),
                    });
                }
                if !seen.contains(dep.as_str()) {
                    return Err(PlanError::UnknownDependency {
                        task: task.path.clone(),
                        dependency: dep.clone(),
                    });
                }
            }
        }
        for step in &self.integration {
            if step.name.trim().is_empty() || step.run.trim().is_empty() {
                return Err(PlanError::InvalidIntegration {
                    step: step.name.clone(),
                    reason: "name and run must not be empty".into(),
                });
            }
            if step.shard == Some(0) {
                return Err(PlanError::InvalidIntegration {
                    step: step.name.clone(),
                    reason: "shard must be at least 1".into(),
                });
            }
        }
        if let Some(deploy) = &self.deploy {
            deploy.validate().map_err(PlanError::InvalidDeploy)?;
        }
        Ok(())
    }
}

impl DeploySpec {
    /// Checks stages (rising, ending at 100), intervals and thresholds.
    pub fn validate(&self) -> Result<(), String> {
        if self.stages.is_empty() {
            return Err("stages must not be empty".into());
        }
        if self.stages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("stages must rise strictly, got {:?}", self.stages));
        }
        if self.stages.iter().any(|&s| s == 0 || s > 100) {
            return Err(format!("stages must lie in 1..=100, got {:?}", self.stages));
        }
        if self.check_seconds == 0 {
            return Err("check_seconds must be at least 1".into());
        }
        self.shift.validate().map_err(|e| format!("shift: {e}"))?;
        if let Some(rollback) = &self.rollback {
            rollback.validate().map_err(|e| format!("rollback: {e}"))?;
        }
        let t = &self.thresholds;
        if !(0.0..=1.0).contains(&t.degraded_error_rate)
            || !(0.0..=1.0).contains(&t.rollback_error_rate)
            || t.degraded_error_rate > t.rollback_error_rate
        {
            return Err(format!(
                "thresholds must satisfy 0 <= degraded_error_rate ({}) <= rollback_error_rate ({}) <= 1",
                t.degraded_error_rate, t.rollback_error_rate
            ));
        }
        Ok(())
    }
}

/// Checks that a task path stays inside the workspace.
///
/// Rejects absolute paths, `..` and `.` components, empty components,
/// backslashes, control characters and over-long paths.
pub fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("longer than {MAX_PATH_BYTES} bytes"));
    }
    if path.starts_with('/') {
        return Err("absolute paths are not allowed".into());
    }
    if path.contains('\\') {
        return Err("use '/' as the separator, not '\\'".into());
    }
    if path.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    if path.len() >= 2 && path.as_bytes()[1] == b':' {
        return Err("drive-letter paths are not allowed".into());
    }
    for component in path.split('/') {
        match component {
            "" => return Err("empty path component ('//' or trailing '/')".into()),
            "." => return Err("'.' components are not allowed".into()),
            ".." => return Err("'..' escapes the workspace".into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: flask-todo
executor: builtin
tasks:
  - path: app/models.py
    spec: "models"
    content: |
      from app.db import Base
    depends_on: [app/db.py]
    estimate: 3
  - path: app/db.py
    spec: "db"
integration:
  - name: unit
    run: python3 -m pytest -q
deploy:
  stages: [10, 50, 100]
  stage_seconds: 5
  check_seconds: 1
  shift: { profile: lb, params: { pool: web-eu } }
  rollback: { profile: lb-reset }
  health: { url: "http://127.0.0.1:9000/stats" }
  thresholds: { degraded_error_rate: 0.05, rollback_error_rate: 0.10, max_latency_ms: 200 }
"#;

    #[test]
    fn parses_the_documented_format() {
        let plan = Plan::parse(GOOD).unwrap();
        assert_eq!(plan.tasks.len(), 2);
        assert_eq!(plan.executor, Some(ExecutorKind::Builtin));
        let deploy = plan.deploy.unwrap();
        assert_eq!(deploy.stages, vec![10, 50, 100]);
        assert_eq!(deploy.shift, Handler::profile("lb").param("pool", "web-eu"));
        assert_eq!(deploy.rollback, Some(Handler::profile("lb-reset")));
        assert!(matches!(deploy.health, HealthSource::Url { .. }));
    }

    #[test]
    fn json_plans_parse_too() {
        let plan = Plan::parse(r#"{"name":"x","tasks":[{"path":"a.py","spec":"s"}]}"#).unwrap();
        assert_eq!(plan.tasks[0].path, "a.py");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = Plan::parse("name: x\ntasks:\n  - path: a.py\n    spec: s\n    colour: red\n")
            .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_at_every_depth_of_a_file() {
        // The types accept unknown fields (messages from newer versions);
        // reading a file must still refuse them wherever they are.
        for (typo, path) in [
            (
                "name: x
colour: red
",
                "colour",
            ),
            (
                "integration:
  - { name: u, run: r, colour: red }
",
                "integration.0.colour",
            ),
            (
                "deploy:
  colour: red
  shift: { profile: s }
  health: { url: u }
",
                "deploy.colour",
            ),
            (
                "deploy:
  shift: { profile: s }
  health: { url: u }
  thresholds: { colour: red }
",
                "deploy.thresholds.colour",
            ),
        ] {
            let text = format!(
                "{}tasks:\n  - {{ path: a.py, spec: s }}\n{typo}",
                if typo.starts_with("name") {
                    ""
                } else {
                    "name: x\n"
                }
            );
            let err = Plan::parse(&text).unwrap_err();
            assert!(err.to_string().contains(path), "{typo}: {err}");
        }
        let spec: serde_yaml::Value =
            serde_yaml::from_str("shift: { profile: s }\nhealth: { url: u }\nstage_secs: 3\n")
                .unwrap();
        let err = from_yaml_value_strict::<DeploySpec>(spec).unwrap_err();
        assert!(err.to_string().contains("stage_secs"), "{err}");
        // A handler's shape stays closed: an extra field is no known shape.
        let err = Plan::parse(
            "name: x\ntasks:\n  - { path: a.py, spec: s }\ndeploy:\n  shift: { profile: s, colour: red }\n  health: { url: u }\n",
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::Syntax(_)), "{err}");
    }

    #[test]
    fn a_plan_cannot_name_a_command_or_webhook_and_is_told_to_use_a_profile() {
        for raw in [
            "shift: { command: 'curl http://169.254.169.254/' }",
            "shift: { webhook: 'http://10.0.0.1/' }",
            "shift: { profile: ok }\n  rollback: { command: 'sh -c env' }",
        ] {
            let text = format!(
                "name: x\ntasks:\n  - {{ path: a.py, spec: s }}\ndeploy:\n  {raw}\n  health: {{ url: u }}\n"
            );
            let err = Plan::parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("DEVFLEET_CANARY_PROFILES") && err.contains("profile: NAME"),
                "{raw}: {err}"
            );
        }
    }

    #[test]
    fn handler_params_are_checked() {
        for (params, needle) in [
            ("{ weight: '--rm' }", "must not start with '-'"),
            ("{ x: 'a b' }", "use only"),
            ("{ x: '$(id)' }", "use only"),
            ("{ X: a }", "not a parameter name"),
        ] {
            let text = format!(
                "name: x\ntasks:\n  - {{ path: a.py, spec: s }}\ndeploy:\n  shift: {{ profile: p, params: {params} }}\n  health: {{ url: u }}\n"
            );
            let err = Plan::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{params}: {err}");
        }
        let err = Plan::parse(
            "name: x\ntasks:\n  - { path: a.py, spec: s }\ndeploy:\n  shift: { profile: 'Bad Name' }\n  health: { url: u }\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a profile name"), "{err}");
    }

    #[test]
    fn hostile_paths_name_the_task() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "./a",
            "C:x",
            "a\\b",
        ] {
            let text = format!("name: x\ntasks:\n  - path: '{bad}'\n    spec: s\n");
            match Plan::parse(&text) {
                Err(PlanError::InvalidPath { task, .. }) => assert_eq!(task, bad),
                other => panic!("{bad}: expected InvalidPath, got {other:?}"),
            }
        }
    }

    #[test]
    fn duplicate_and_unknown_dependencies_are_named() {
        let dup = "name: x\ntasks:\n  - {path: a.py, spec: s}\n  - {path: a.py, spec: t}\n";
        assert_eq!(
            Plan::parse(dup).unwrap_err(),
            PlanError::DuplicatePath {
                task: "a.py".into()
            }
        );
        let unknown = "name: x\ntasks:\n  - {path: a.py, spec: s, depends_on: [b.py]}\n";
        assert_eq!(
            Plan::parse(unknown).unwrap_err(),
            PlanError::UnknownDependency {
                task: "a.py".into(),
                dependency: "b.py".into()
            }
        );
    }

    #[test]
    fn oversize_content_is_rejected() {
        let plan = Plan {
            name: "x".into(),
            base: None,
            executor: None,
            tasks: vec![TaskDef {
                path: "a.py".into(),
                spec: "s".into(),
                content: Some("x".repeat(MAX_TASK_CONTENT_BYTES + 1)),
                depends_on: vec![],
                estimate: None,
                executor: None,
            }],
            integration: vec![],
            deploy: None,
        };
        assert!(matches!(
            plan.validate(),
            Err(PlanError::ContentTooLarge { .. })
        ));
    }

    #[test]
    fn falling_stages_are_rejected() {
        let text = GOOD.replace("[10, 50, 100]", "[50, 10]");
        assert!(matches!(
            Plan::parse(&text),
            Err(PlanError::InvalidDeploy(_))
        ));
    }
}
