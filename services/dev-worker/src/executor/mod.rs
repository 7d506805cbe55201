//! Executors: what actually writes a file.
//!
//! An [`Executor`] turns one task ([`ExecInput`]: spec, content, attempt,
//! diagnostics of a failed try, and the generated text of every dependency)
//! into the text of the file. Four exist, one module each: [`builtin`]
//! (writes the task's `content`), [`command`] (an external agent program),
//! [`openai`] (an OpenAI-compatible chat completions API) and [`simulate`]
//! (takes time and fails on purpose, for demos and load tests).
//!
//! [`Executors`] maps each [`ExecutorKind`] to the instance this worker was
//! configured with; a task's (or its plan's) `executor` picks one, else the
//! worker's default (`DEVFLEET_EXECUTOR`). The dev-worker runs executors
//! under a timeout by dropping their future, so an executor must clean up
//! on drop (the command executor kills its process group).

use async_trait::async_trait;
use devfleet_protocol::{ExecutorKind, TaskClass, Usage};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

pub mod breaker;
pub mod builtin;
pub mod command;
pub mod context;
pub mod openai;
pub mod outline;
pub mod providers;
pub mod rate_limit;
pub mod simulate;

/// Everything an executor may use to write one file. Serialised as JSON on
/// the command executor's stdin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecInput {
    pub plan_id: String,
    /// The file to write, relative to the project root.
    pub path: String,
    pub spec: String,
    /// The skeleton or full text from the plan.
    pub content: Option<String>,
    /// Relative cost from the plan.
    pub estimate: u32,
    /// 1 for the first try.
    pub attempt: u32,
    /// `fix` when QA rejected the previous attempt.
    pub class: TaskClass,
    /// The QA diagnostics (for a fix) or the previous error (for a retry).
    pub diagnostics: Option<String>,
    /// The previous attempt's file, for a fix.
    pub previous: Option<String>,
    /// The generated text of every dependency, direct and transitive, by
    /// path.
    pub dependencies: BTreeMap<String, String>,
    /// How far each dependency is from the task in the dependency graph (1:
    /// a direct dependency; 2: a dependency of one, …). A path missing
    /// here counts as direct.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dependency_distance: BTreeMap<String, u32>,
    /// The base files the task imports (existing code), by path, as the
    /// plan's base snapshot holds them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub base_files: BTreeMap<String, String>,
    /// The task's workspace, prepared by the worker (base snapshot plus
    /// the dependencies' artifacts), in which an agent works; `None` when
    /// the worker prepared none (the executor makes its own scratch
    /// directory if it needs one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<PathBuf>,
}

/// What one executor run produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOutput {
    /// The text of the task's own file.
    pub text: String,
    /// Other paths the run changed, relative to the project root: the new
    /// text, or `None` for a file it deleted. The worker accepts them only
    /// where the task declares it writes them, and reports the rest.
    pub other_files: BTreeMap<String, Option<String>>,
    /// What the run used, one entry per model call (or agent run).
    pub usage: Vec<Usage>,
}

impl ExecOutput {
    /// Just the task's file, no other change, no usage (builtin, simulate).
    pub fn file(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }
}

/// Why an executor produced no file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    pub message: String,
    /// False when trying again cannot help (e.g. a builtin task without
    /// content, a command that cannot be started).
    pub retryable: bool,
    /// What the failed run used anyway (a reply cut off at its length, an
    /// agent that ran and failed): spent, so recorded and charged to the
    /// plan's budget like a success's.
    pub usage: Vec<Usage>,
}

impl ExecError {
    /// A failure another attempt may not repeat (timeouts, rate limits, a
    /// flaky agent).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            usage: Vec::new(),
        }
    }

    /// A failure every attempt would repeat.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            usage: Vec::new(),
        }
    }

    /// The same failure, with what the run used.
    pub fn with_usage(mut self, usage: Vec<Usage>) -> Self {
        self.usage = usage;
        self
    }
}

/// Writes one file.
#[async_trait]
pub trait Executor: Send + Sync {
    /// Names the executor and every setting that changes what it writes
    /// (model, program and arguments, prompt version). Part of the result
    /// cache key: change it and cached results are no longer reused.
    fn identity(&self) -> String;

    /// The most one run of `input` may use (prompt estimate plus the
    /// largest completion), reserved against the plan's budget before the
    /// run and reconciled with the reported usage after it. `None`: the
    /// executor spends nothing that is budgeted (builtin, simulate).
    fn estimate(&self, input: &ExecInput) -> Option<Usage> {
        let _ = input;
        None
    }

    /// Produces the file (and any other change, and what it used). Must be
    /// cancel-safe: the worker drops the future on timeout or shutdown.
    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError>;
}

/// The executors a worker can run, by kind, and its default kind.
#[derive(Clone)]
pub struct Executors {
    by_kind: HashMap<ExecutorKind, Arc<dyn Executor>>,
    default: ExecutorKind,
}

impl Executors {
    /// `builtin` and `simulate` (default settings); `command` and `openai`
    /// need settings and are added with [`Executors::with`].
    pub fn new(default: ExecutorKind) -> Self {
        let mut by_kind: HashMap<ExecutorKind, Arc<dyn Executor>> = HashMap::new();
        by_kind.insert(ExecutorKind::Builtin, Arc::new(builtin::Builtin));
        by_kind.insert(
            ExecutorKind::Simulate,
            Arc::new(simulate::Simulate::new(
                simulate::SimulateSettings::default(),
            )),
        );
        Self { by_kind, default }
    }

    /// Adds or replaces the executor of one kind.
    pub fn with(mut self, kind: ExecutorKind, executor: Arc<dyn Executor>) -> Self {
        self.by_kind.insert(kind, executor);
        self
    }

    /// Every kind this worker can run, in no particular order.
    pub fn kinds(&self) -> impl Iterator<Item = ExecutorKind> + '_ {
        self.by_kind.keys().copied()
    }

    /// The kind used for tasks that name none.
    pub fn default_kind(&self) -> ExecutorKind {
        self.default
    }

    /// Sets the kind used for tasks that name none.
    pub fn set_default(&mut self, kind: ExecutorKind) {
        self.default = kind;
    }

    /// The executor for a task whose record names `requested` (or none).
    /// A kind this worker was not configured for is a non-retryable error
    /// naming the variable to set.
    pub fn resolve(
        &self,
        requested: Option<&str>,
    ) -> Result<(ExecutorKind, Arc<dyn Executor>), ExecError> {
        let kind = match requested {
            Some(name) => name.parse::<ExecutorKind>().map_err(ExecError::fatal)?,
            None => self.default,
        };
        match self.by_kind.get(&kind) {
            Some(e) => Ok((kind, e.clone())),
            None => Err(ExecError::fatal(match kind {
                ExecutorKind::Command => {
                    "the task wants the command executor, but this worker has no DEVFLEET_COMMAND"
                        .to_owned()
                }
                ExecutorKind::Openai => "the task wants the openai executor, but this worker has \
                     no API key (DEVFLEET_OPENAI_API_KEY or OPENAI_API_KEY)"
                    .to_owned(),
                other => format!(
                    "executor '{}' is not configured on this worker",
                    other.as_str()
                ),
            })),
        }
    }
}

#[cfg(test)]
pub(crate) fn test_input(path: &str) -> ExecInput {
    ExecInput {
        plan_id: "p1".into(),
        path: path.into(),
        spec: "a spec".into(),
        content: None,
        estimate: 1,
        attempt: 1,
        class: TaskClass::New,
        diagnostics: None,
        previous: None,
        dependencies: BTreeMap::new(),
        dependency_distance: BTreeMap::new(),
        base_files: BTreeMap::new(),
        workspace: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_uses_the_task_kind_then_the_default() {
        let ex = Executors::new(ExecutorKind::Simulate);
        assert_eq!(ex.resolve(None).unwrap().0, ExecutorKind::Simulate);
        assert_eq!(
            ex.resolve(Some("builtin")).unwrap().0,
            ExecutorKind::Builtin
        );
    }

    #[test]
    fn unconfigured_kinds_name_the_variable_to_set() {
        let ex = Executors::new(ExecutorKind::Builtin);
        let err = ex.resolve(Some("command")).err().unwrap();
        assert!(!err.retryable);
        assert!(err.message.contains("DEVFLEET_COMMAND"), "{err}");
        let err = ex.resolve(Some("openai")).err().unwrap();
        assert!(err.message.contains("OPENAI_API_KEY"), "{err}");
        assert!(ex.resolve(Some("nope")).is_err());
    }
}
