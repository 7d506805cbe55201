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

// Upper bounds on every field that sizes work, checked by
// [`Plan::validate`] before anything is created. Together they keep a valid
// plan inside the messages that carry it: `plans.submitted` holds the plan
// and `plans.analyzed` the plan plus a copy of its tasks, so
// 2 × [`MAX_PLAN_BYTES`] plus per-task overhead stays under the bus's
// 16 MiB envelope (`MAX_ENVELOPE_BYTES`); the analyzer still measures the
// analyzed message and rejects a plan whose parsed dependencies push it over.

/// Largest `content` accepted for one task, in bytes.
pub const MAX_TASK_CONTENT_BYTES: usize = 1024 * 1024;
/// Largest `spec` accepted for one task, in bytes.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Largest number of tasks in one plan.
pub const MAX_TASKS: usize = 20_000;
/// Longest task path (and `base`) accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest plan `name` and integration step `name`, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest total of the plan's text, in bytes: every task's path, spec,
/// content and `depends_on` entries, plus the integration commands.
pub const MAX_PLAN_BYTES: usize = 6 * 1024 * 1024;
/// Largest `estimate` of one task (priorities, sums of estimates along a
/// path of up to [`MAX_TASKS`] tasks, stay far below `u32::MAX`).
pub const MAX_ESTIMATE: u32 = 100_000;
/// Most integration steps in one plan.
pub const MAX_INTEGRATION_STEPS: usize = 32;
/// Most shards one integration step may be split into.
pub const MAX_SHARDS: u32 = 256;
/// Longest `timeout_seconds` of an integration step: one day.
pub const MAX_TIMEOUT_SECONDS: u64 = 24 * 60 * 60;
/// Most files and directories in a plan's `base` (checked where the base
/// is listed: the analyzer and `devfleet analyze`).
pub const MAX_BASE_ENTRIES: usize = 100_000;
/// Largest base file read to steer resolution (`tsconfig.json`,
/// `jsconfig.json`), in bytes.
pub const MAX_BASE_CONFIG_BYTES: u64 = 1024 * 1024;

/// A plan as the user wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// For people; the plan id is generated at submission.
    pub name: String,
    /// Existing code the plan extends (imports may resolve there; its files are not tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Id of the base's snapshot in the store (the hash of its manifest),
    /// set by the publisher from `base`; services read the base only
    /// through it, never from the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
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
    /// Capabilities a worker must have to run any of the plan's work (`python3`, `flask`,
    /// `gpu`, …; see docs/AGENTS.md "Capabilities").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// What the plan's executor runs may use in all; when the next call
    /// does not fit, the plan ends `budget_exhausted` (see docs/AGENTS.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<PlanBudget>,
}

/// A plan's budget: either limit or both.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlanBudget {
    /// Tokens in + out over all the plan's executor runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Cost in US dollars (from the executors' price tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl PlanBudget {
    /// Checks that it sets a limit and that each is positive.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens.is_none() && self.max_cost_usd.is_none() {
            return Err(
                "set max_tokens, max_cost_usd or both (or leave budget out for no limit)".into(),
            );
        }
        if self.max_tokens == Some(0) {
            return Err("max_tokens must be positive".into());
        }
        if let Some(c) = self.max_cost_usd {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!(
                    "max_cost_usd must be a positive number of US dollars; got {c}"
                ));
            }
        }
        Ok(())
    }
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
    /// Globs (`*` within a path component, `**` across them) of other
    /// paths the task's executor may write in its workspace besides
    /// `path`; changes elsewhere are reported and not accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writes: Vec<String>,
    /// Capabilities a worker must have to run this task (added to the plan's) (`python3`, `flask`,
    /// `gpu`, …; see docs/AGENTS.md "Capabilities").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
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
    /// Capabilities a worker must have to run this step, besides what its `run` program implies (`python3`, `flask`,
    /// `gpu`, …; see docs/AGENTS.md "Capabilities").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
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
    #[error("plan name is {size} bytes; the limit is {limit}")]
    NameTooLong { size: usize, limit: usize },
    #[error("plan is {size} bytes of text (paths, specs, contents, depends_on and integration commands); the limit is {limit}")]
    PlanTooLarge { size: usize, limit: usize },
    #[error("plan has no tasks")]
    NoTasks,
    #[error("plan has {count} tasks; the limit is {limit}")]
    TooManyTasks { count: usize, limit: usize },
    #[error("task '{task}': invalid path: {reason}")]
    InvalidPath { task: String, reason: String },
    #[error("task '{task}': writes glob '{glob}': {reason}")]
    InvalidWrites {
        task: String,
        glob: String,
        reason: String,
    },
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
    #[error("task '{task}': spec is {size} bytes; the limit is {limit}")]
    SpecTooLarge {
        task: String,
        size: usize,
        limit: usize,
    },
    #[error("task '{task}': estimate is {estimate}; the limit is {limit}")]
    EstimateTooLarge {
        task: String,
        estimate: u32,
        limit: u32,
    },
    #[error("task '{task}': depends on '{dependency}', which is not a task of this plan")]
    UnknownDependency { task: String, dependency: String },
    #[error("task '{task}': depends on itself")]
    SelfDependency { task: String },
    #[error("tasks form a dependency cycle that cannot be broken: {}", files.join(" -> "))]
    Cycle { files: Vec<String> },
    #[error("plan has {count} integration steps; the limit is {limit}")]
    TooManyIntegrationSteps { count: usize, limit: usize },
    #[error("integration step '{step}': {reason}")]
    InvalidIntegration { step: String, reason: String },
    #[error("base '{base}': {reason}")]
    InvalidBase { base: String, reason: String },
    #[error("deploy: {0}")]
    InvalidDeploy(String),
    #[error("budget: {0}")]
    InvalidBudget(String),
    #[error("{place}: requires: {reason}")]
    InvalidRequirement { place: String, reason: String },
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
        if self.name.len() > MAX_NAME_BYTES {
            return Err(PlanError::NameTooLong {
                size: self.name.len(),
                limit: MAX_NAME_BYTES,
            });
        }
        if let Some(id) = &self.base_snapshot {
            let hex = id.len() == 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(PlanError::InvalidBase {
                    base: id.clone(),
                    reason: "base_snapshot must be a snapshot id (64 lowercase hex digits), \
                             as `devfleet publish` sets it"
                        .into(),
                });
            }
        }
        if let Some(base) = &self.base {
            validate_base(base).map_err(|reason| PlanError::InvalidBase {
                base: base.clone(),
                reason,
            })?;
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
            if task.writes.len() > MAX_WRITES {
                return Err(PlanError::InvalidWrites {
                    task: task.path.clone(),
                    glob: task.writes[MAX_WRITES].clone(),
                    reason: format!("more than {MAX_WRITES} writes globs"),
                });
            }
            for glob in &task.writes {
                validate_writes_glob(glob).map_err(|reason| PlanError::InvalidWrites {
                    task: task.path.clone(),
                    glob: glob.clone(),
                    reason,
                })?;
            }
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
            if task.spec.len() > MAX_SPEC_BYTES {
                return Err(PlanError::SpecTooLarge {
                    task: task.path.clone(),
                    size: task.spec.len(),
                    limit: MAX_SPEC_BYTES,
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
            if let Some(estimate) = task.estimate.filter(|&e| e > MAX_ESTIMATE) {
                return Err(PlanError::EstimateTooLarge {
                    task: task.path.clone(),
                    estimate,
                    limit: MAX_ESTIMATE,
                });
            }
        }
        let size = self.text_bytes();
        if size > MAX_PLAN_BYTES {
            return Err(PlanError::PlanTooLarge {
                size,
                limit: MAX_PLAN_BYTES,
            });
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
        if self.integration.len() > MAX_INTEGRATION_STEPS {
            return Err(PlanError::TooManyIntegrationSteps {
                count: self.integration.len(),
                limit: MAX_INTEGRATION_STEPS,
            });
        }
        for step in &self.integration {
            step.validate()
                .map_err(|reason| PlanError::InvalidIntegration {
                    step: step.name.clone(),
                    reason,
                })?;
        }
        if let Some(deploy) = &self.deploy {
            deploy.validate().map_err(PlanError::InvalidDeploy)?;
        }
        if let Some(budget) = &self.budget {
            budget.validate().map_err(PlanError::InvalidBudget)?;
        }
        let places = std::iter::once(("plan".to_owned(), &self.requires))
            .chain(
                self.tasks
                    .iter()
                    .map(|t| (format!("task '{}'", t.path), &t.requires)),
            )
            .chain(
                self.integration
                    .iter()
                    .map(|s| (format!("integration step '{}'", s.name), &s.requires)),
            );
        for (place, names) in places {
            for name in names {
                validate_capability(name).map_err(|reason| PlanError::InvalidRequirement {
                    place: place.clone(),
                    reason,
                })?;
            }
        }
        Ok(())
    }
}

/// Most bytes of one capability name.
pub const MAX_CAPABILITY_BYTES: usize = 64;

/// Checks a capability name: 1..=64 bytes of lower-case letters, digits
/// and `. _ - :`. The error is the reason, naming the name.
pub fn validate_capability(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a capability name is empty".into());
    }
    if name.len() > MAX_CAPABILITY_BYTES {
        return Err(format!(
            "capability '{name}' is {} bytes; the limit is {MAX_CAPABILITY_BYTES}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | ':'))
    }) {
        return Err(format!(
            "capability '{name}' holds '{c}': use lower-case letters, digits and . _ - :"
        ));
    }
    Ok(())
}

impl Plan {
    /// Bytes of text the plan carries: what [`MAX_PLAN_BYTES`] bounds.
    pub fn text_bytes(&self) -> usize {
        let tasks: usize = self
            .tasks
            .iter()
            .map(|t| {
                t.path.len()
                    + t.spec.len()
                    + t.content.as_ref().map_or(0, String::len)
                    + t.depends_on.iter().map(String::len).sum::<usize>()
            })
            .sum();
        let steps: usize = self
            .integration
            .iter()
            .map(|s| s.name.len() + s.run.len())
            .sum();
        self.name.len() + self.base.as_ref().map_or(0, String::len) + tasks + steps
    }
}

impl IntegrationStep {
    /// Checks the step on its own: a name and a command, `shard` in
    /// 1..=[`MAX_SHARDS`], `timeout_seconds` in 1..=[`MAX_TIMEOUT_SECONDS`].
    /// The error is the reason, naming the field and its limit.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.run.trim().is_empty() {
            return Err("name and run must not be empty".into());
        }
        if self.name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "name is {} bytes; the limit is {MAX_NAME_BYTES}",
                self.name.len()
            ));
        }
        match self.shard {
            Some(0) => return Err("shard must be at least 1".into()),
            Some(n) if n > MAX_SHARDS => {
                return Err(format!("shard is {n}; the limit is {MAX_SHARDS}"))
            }
            _ => {}
        }
        match self.timeout_seconds {
            Some(0) => return Err("timeout_seconds must be at least 1".into()),
            Some(n) if n > MAX_TIMEOUT_SECONDS => {
                return Err(format!(
                    "timeout_seconds is {n}; the limit is {MAX_TIMEOUT_SECONDS}"
                ))
            }
            _ => {}
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

/// Checks a plan's `base` as text: not empty, not over-long, no control
/// characters, and not the filesystem root (`/`, `//`, `/.`, `C:\`…),
/// which would have the analyzer list every file of its host. Where the
/// base is on disk, the analyzer also refuses one that resolves to the
/// root or holds too many files.
pub fn validate_base(base: &str) -> Result<(), String> {
    if base.trim().is_empty() {
        return Err("empty base".into());
    }
    if base.len() > MAX_PATH_BYTES {
        return Err(format!(
            "base is {} bytes; the limit is {MAX_PATH_BYTES}",
            base.len()
        ));
    }
    if base.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    let unrooted = match base.as_bytes() {
        [drive, b':', ..] if drive.is_ascii_alphabetic() => &base[2..],
        _ => base,
    };
    // Lexically: `/`, `//`, `/.`, `/a/..` all name the root.
    let depth = unrooted
        .split(['/', '\\'])
        .fold(0usize, |depth, c| match c {
            "" | "." => depth,
            ".." => depth.saturating_sub(1),
            _ => depth + 1,
        });
    if unrooted.starts_with(['/', '\\']) && depth == 0 {
        return Err("the filesystem root is not a base".into());
    }
    Ok(())
}

/// Checks that a task path stays inside the workspace.
///
/// Rejects absolute paths, `..` and `.` components, empty components,
/// backslashes, control characters, over-long paths, and `.git`
/// components (a file there would be git metadata, e.g. a hook, once the
/// tree is pulled into a repository).
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
            c if c.eq_ignore_ascii_case(".git") => {
                return Err("'.git' components are not allowed (git metadata)".into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// Most `writes` globs on one task.
pub const MAX_WRITES: usize = 64;

/// Checks one `writes` glob: a relative path pattern by the rules of
/// [`validate_path`] (no `..`, no absolute or `.git` paths) that
/// [`globset`] can compile.
pub fn validate_writes_glob(glob: &str) -> Result<(), String> {
    validate_path(glob)?;
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|_| ())
        .map_err(|e| format!("not a glob: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_globs_are_validated() {
        let mut plan = Plan::parse(GOOD).unwrap();
        plan.tasks[0].writes = vec!["app/migrations/**/*.py".into()];
        plan.validate().unwrap();
        for bad in ["../x/*", "/etc/*", "app/[", ".git/*"] {
            plan.tasks[0].writes = vec![bad.into()];
            match plan.validate() {
                Err(PlanError::InvalidWrites { glob, .. }) => assert_eq!(glob, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

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
            requires: Vec::new(),
            name: "x".into(),
            base: None,
            base_snapshot: None,
            executor: None,
            tasks: vec![TaskDef {
                requires: Vec::new(),
                path: "a.py".into(),
                spec: "s".into(),
                content: Some("x".repeat(MAX_TASK_CONTENT_BYTES + 1)),
                depends_on: vec![],
                estimate: None,
                executor: None,
                writes: Vec::new(),
            }],
            integration: vec![],
            deploy: None,
            budget: None,
        };
        assert!(matches!(
            plan.validate(),
            Err(PlanError::ContentTooLarge { .. })
        ));
    }

    /// A plan of `n` small tasks.
    fn tasks(n: usize) -> Plan {
        Plan {
            requires: Vec::new(),
            name: "x".into(),
            base: None,
            base_snapshot: None,
            executor: None,
            tasks: (0..n)
                .map(|i| TaskDef {
                    requires: Vec::new(),
                    path: format!("pkg/m{i}.py"),
                    spec: format!("module {i}"),
                    content: None,
                    depends_on: vec![],
                    estimate: None,
                    executor: None,
                    writes: Vec::new(),
                })
                .collect(),
            integration: vec![],
            deploy: None,
            budget: None,
        }
    }

    fn with_step(step: &str) -> Result<Plan, PlanError> {
        Plan::parse(&format!(
            "name: x\ntasks:\n  - {{ path: a.py, spec: s }}\nintegration:\n  - {step}\n"
        ))
    }

    #[test]
    fn integration_shards_and_timeouts_are_bounded_naming_field_and_limit() {
        for (step, field, limit) in [
            (
                "{ name: u, run: pytest, shard: 4294967295 }",
                "shard is 4294967295",
                MAX_SHARDS.to_string(),
            ),
            (
                "{ name: u, run: pytest, timeout_seconds: 18446744073709551615 }",
                "timeout_seconds is 18446744073709551615",
                MAX_TIMEOUT_SECONDS.to_string(),
            ),
            (
                "{ name: u, run: pytest, timeout_seconds: 0 }",
                "timeout_seconds must be at least 1",
                String::new(),
            ),
        ] {
            let err = with_step(step).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, PlanError::InvalidIntegration { ref step, .. } if step == "u"),
                "{text}"
            );
            assert!(text.contains(field) && text.contains(&limit), "{text}");
        }
        let at_limit = format!(
            "{{ name: u, run: pytest, shard: {MAX_SHARDS}, timeout_seconds: {MAX_TIMEOUT_SECONDS} }}"
        );
        with_step(&at_limit).unwrap();
        let mut plan = tasks(1);
        plan.integration = (0..=MAX_INTEGRATION_STEPS)
            .map(|i| IntegrationStep {
                requires: Vec::new(),
                name: format!("s{i}"),
                run: "true".into(),
                shard: None,
                timeout_seconds: None,
            })
            .collect();
        assert_eq!(
            plan.validate(),
            Err(PlanError::TooManyIntegrationSteps {
                count: MAX_INTEGRATION_STEPS + 1,
                limit: MAX_INTEGRATION_STEPS
            })
        );
    }

    #[test]
    fn task_count_spec_estimate_and_total_size_are_bounded() {
        tasks(MAX_TASKS).validate().unwrap();
        assert_eq!(
            tasks(MAX_TASKS + 1).validate(),
            Err(PlanError::TooManyTasks {
                count: MAX_TASKS + 1,
                limit: MAX_TASKS
            })
        );
        let mut plan = tasks(1);
        plan.tasks[0].spec = "s".repeat(MAX_SPEC_BYTES + 1);
        assert!(
            matches!(plan.validate(), Err(PlanError::SpecTooLarge { ref task, .. }) if task == "pkg/m0.py")
        );
        let mut plan = tasks(1);
        plan.tasks[0].estimate = Some(u32::MAX);
        let err = plan.validate().unwrap_err();
        assert!(err.to_string().contains(&MAX_ESTIMATE.to_string()), "{err}");
        // Each task under its own limit, together over the plan's.
        let mut plan = tasks(MAX_PLAN_BYTES / MAX_TASK_CONTENT_BYTES + 1);
        for task in &mut plan.tasks {
            task.content = Some("x".repeat(MAX_TASK_CONTENT_BYTES));
        }
        let err = plan.validate().unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::PlanTooLarge {
                    limit: MAX_PLAN_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        let mut plan = tasks(1);
        plan.name = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(matches!(
            plan.validate(),
            Err(PlanError::NameTooLong { .. })
        ));
    }

    #[test]
    fn the_filesystem_root_is_no_base() {
        for root in ["/", "//", "/.", "/./", "/tmp/..", "C:\\", "c:/", "\\"] {
            let mut plan = tasks(1);
            plan.base = Some(root.into());
            match plan.validate() {
                Err(PlanError::InvalidBase { base, reason }) => {
                    assert_eq!(base, root);
                    assert!(reason.contains("root"), "{reason}");
                }
                other => panic!("{root}: expected InvalidBase, got {other:?}"),
            }
        }
        for ok in ["./existing-repo", "repo", "/srv/repo", "../sibling"] {
            let mut plan = tasks(1);
            plan.base = Some(ok.into());
            plan.validate().unwrap();
        }
        let mut plan = tasks(1);
        plan.base = Some(String::new());
        assert!(matches!(
            plan.validate(),
            Err(PlanError::InvalidBase { .. })
        ));
    }

    #[test]
    fn git_metadata_paths_are_refused() {
        for bad in [".git/hooks/post-checkout", "a/.git/config", ".GIT/x"] {
            assert!(validate_path(bad).unwrap_err().contains(".git"), "{bad}");
        }
        validate_path(".gitignore").unwrap();
        validate_path("a/.github/workflows/ci.yml").unwrap();
    }

    #[test]
    fn a_budget_is_parsed_and_checked() {
        let with = |budget: &str| Plan::parse(&format!("{GOOD}budget: {budget}\n"));
        let plan = with("{ max_tokens: 200000, max_cost_usd: 2.5 }").unwrap();
        assert_eq!(
            plan.budget,
            Some(PlanBudget {
                max_tokens: Some(200_000),
                max_cost_usd: Some(2.5)
            })
        );
        for (bad, says) in [
            ("{ max_tokens: 0 }", "max_tokens must be positive"),
            ("{ max_cost_usd: -1 }", "positive number of US dollars"),
            ("{}", "set max_tokens, max_cost_usd or both"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(
                err.contains("budget: ") && err.contains(says),
                "{bad}: {err}"
            );
        }
        let err = with("{ max_tokenz: 5 }").unwrap_err().to_string();
        assert!(err.contains("max_tokenz"), "{err}");
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
