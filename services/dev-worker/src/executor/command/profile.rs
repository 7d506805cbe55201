//! Agent profiles: how one agent CLI is run (a YAML file named by
//! `DEVFLEET_COMMAND_PROFILE`; examples in `examples/agents/`).
//!
//! A profile names the command (words with `{placeholders}` filled per
//! task, each word stays one argument: nothing goes through a shell), what
//! the agent gets on stdin, which of the worker's variables it may see,
//! extra read-only paths for the sandbox (where the agent is installed),
//! a timeout, and how its usage is known.

use super::super::ExecInput;
use devfleet_protocol::Usage;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the agent reads on stdin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdinMode {
    /// The task as JSON (an [`ExecInput`]): for programs written for devfleet.
    #[default]
    Json,
    /// The rendered Markdown prompt.
    Prompt,
    /// Nothing (stdin is closed at once).
    None,
}

/// Usage reporting of a profile.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSettings {
    /// The provider name recorded with the usage.
    #[serde(default)]
    pub provider: String,
    /// The model recorded when the agent reports none (default: the
    /// profile's name).
    pub model: Option<String>,
    /// Tokens one run is assumed to use when the agent writes no
    /// `$DEVFLEET_USAGE_FILE` (recorded with `estimated: true`), and what
    /// [`crate::Executor::estimate`] reserves.
    pub estimate: Option<UsageEstimate>,
}

/// A per-run estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageEstimate {
    pub tokens_in: u64,
    pub tokens_out: u64,
    #[serde(default)]
    pub cost_usd: f64,
}

/// One agent CLI's profile. See the module docs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentProfile {
    /// For people, logs and usage records (default: the program's name).
    #[serde(default)]
    pub name: String,
    /// Program and arguments; placeholders: `{prompt_file}`, `{prompt}`,
    /// `{path}`, `{workspace}`, `{task_file}`, `{output_file}`,
    /// `{usage_file}`, `{control_dir}` (a private folder outside the
    /// workspace for the agent's own logs and history), `{attempt}`,
    /// `{plan_id}`.
    pub command: Vec<String>,
    #[serde(default)]
    pub stdin: StdinMode,
    /// Names of the worker's environment variables the agent may see (API
    /// keys, base URLs); every other variable is cleared.
    #[serde(default)]
    pub env: Vec<String>,
    /// Variables set to fixed values (templates allowed), after `env`.
    #[serde(default)]
    pub set_env: BTreeMap<String, String>,
    /// Host paths bound read-only, at the same place, in the sandbox
    /// (where the agent and its runtime are installed).
    #[serde(default)]
    pub ro_binds: Vec<PathBuf>,
    /// Longest one run may take (the worker's own limit still applies).
    pub timeout_seconds: Option<f64>,
    #[serde(default)]
    pub usage: UsageSettings,
    /// Whether what the agent prints is the file when it wrote neither
    /// `$DEVFLEET_OUTPUT_FILE` nor its file in the workspace: true for a
    /// bare `DEVFLEET_COMMAND` (a program that prints the file), false by
    /// default for profiles (agent CLIs print chatter, not files).
    #[serde(default)]
    pub stdout_is_file: bool,
}

/// Placeholders every profile word may use.
pub const PLACEHOLDERS: &[&str] = &[
    "prompt_file",
    "prompt",
    "path",
    "workspace",
    "task_file",
    "output_file",
    "usage_file",
    "control_dir",
    "attempt",
    "plan_id",
];

impl AgentProfile {
    /// Reads and checks a profile file; errors name the file and the problem.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the agent profile {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("agent profile {}: {e}", path.display()))
    }

    /// Parses and checks a profile.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut p: AgentProfile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if p.command.first().is_none_or(|w| w.trim().is_empty()) {
            return Err("`command` must name a program (a list of words)".to_owned());
        }
        for word in p.command.iter().chain(p.set_env.values()) {
            for name in placeholders_in(word) {
                if !PLACEHOLDERS.contains(&name.as_str()) {
                    return Err(format!(
                        "unknown placeholder {{{name}}} in '{word}'; known: {}",
                        PLACEHOLDERS.join(", ")
                    ));
                }
            }
        }
        for name in &p.env {
            if name.is_empty() || name.contains('=') {
                return Err(format!("`env` lists variable names; '{name}' is not one"));
            }
        }
        for bind in &p.ro_binds {
            if !bind.is_absolute() {
                return Err(format!(
                    "`ro_binds` paths must be absolute; '{}' is not",
                    bind.display()
                ));
            }
        }
        if let Some(t) = p.timeout_seconds {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!("`timeout_seconds` must be positive, got {t}"));
            }
        }
        if p.name.is_empty() {
            p.name = Path::new(&p.command[0])
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.command[0].clone());
        }
        Ok(p)
    }

    /// A profile for a bare command line (`DEVFLEET_COMMAND` without a
    /// profile): the task as JSON on stdin, no extra variables.
    pub fn from_words(words: Vec<String>) -> Self {
        let name = Path::new(&words[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            name,
            command: words,
            stdin: StdinMode::Json,
            env: Vec::new(),
            set_env: BTreeMap::new(),
            ro_binds: Vec::new(),
            timeout_seconds: None,
            usage: UsageSettings::default(),
            stdout_is_file: true,
        }
    }

    /// The run's own limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_seconds.map(Duration::from_secs_f64)
    }

    /// What [`crate::Executor::estimate`] reserves: the configured per-run
    /// estimate, if any.
    pub fn estimate(&self) -> Option<Usage> {
        self.usage.estimate.map(|e| Usage {
            provider: self.usage.provider.clone(),
            model: self.model(),
            tokens_in: e.tokens_in,
            tokens_out: e.tokens_out,
            cost_usd: e.cost_usd,
            estimated: true,
        })
    }

    /// The model recorded when the agent reports none.
    pub fn model(&self) -> String {
        self.usage
            .model
            .clone()
            .unwrap_or_else(|| self.name.clone())
    }
}

/// The values placeholders stand for in one run.
pub struct Values<'a> {
    pub input: &'a ExecInput,
    pub prompt: &'a str,
    pub prompt_file: &'a Path,
    pub workspace: &'a Path,
    pub task_file: &'a Path,
    pub output_file: &'a Path,
    pub usage_file: &'a Path,
}

impl Values<'_> {
    fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "prompt_file" => self.prompt_file.display().to_string(),
            "prompt" => self.prompt.to_owned(),
            "path" => self.input.path.clone(),
            "workspace" => self.workspace.display().to_string(),
            "task_file" => self.task_file.display().to_string(),
            "output_file" => self.output_file.display().to_string(),
            "usage_file" => self.usage_file.display().to_string(),
            "control_dir" => self
                .usage_file
                .parent()
                .unwrap_or(Path::new("/"))
                .display()
                .to_string(),
            "attempt" => self.input.attempt.to_string(),
            "plan_id" => self.input.plan_id.clone(),
            _ => return None,
        })
    }

    /// `word` with every `{placeholder}` replaced (unknown ones were
    /// refused when the profile was parsed; `{{`/`}}` are not special).
    pub fn fill(&self, word: &str) -> String {
        let mut out = String::with_capacity(word.len());
        let mut rest = word;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            match after.find('}').and_then(|end| {
                let name = &after[..end];
                self.get(name).map(|v| (v, end))
            }) {
                Some((value, end)) => {
                    out.push_str(&value);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

fn placeholders_in(word: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = word;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    found.push(name.to_owned());
                }
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;

    #[test]
    fn a_profile_parses_and_fills_its_placeholders() {
        let p = AgentProfile::parse(
            "command: [aider, --message-file, '{prompt_file}', '--', '{path}']\n\
             stdin: none\nenv: [OPENAI_API_KEY]\n\
             usage: { estimate: { tokens_in: 100, tokens_out: 20 } }\n",
        )
        .unwrap();
        assert_eq!(p.name, "aider");
        assert_eq!(p.stdin, StdinMode::None);
        let input = test_input("app/x.py");
        let v = Values {
            input: &input,
            prompt: "# Task",
            prompt_file: Path::new("/c/prompt.md"),
            workspace: Path::new("/w"),
            task_file: Path::new("/c/task.json"),
            output_file: Path::new("/c/output"),
            usage_file: Path::new("/c/usage.json"),
        };
        let words: Vec<String> = p.command.iter().map(|w| v.fill(w)).collect();
        assert_eq!(
            words,
            ["aider", "--message-file", "/c/prompt.md", "--", "app/x.py"]
        );
        assert_eq!(v.fill("{x} {path}}"), "{x} app/x.py}");
        let e = p.estimate().unwrap();
        assert!(e.estimated && e.tokens_in == 100 && e.model == "aider");
    }

    #[test]
    fn bad_profiles_say_what_is_wrong() {
        let err = AgentProfile::parse("command: [a, '{promt}']").unwrap_err();
        assert!(err.contains("unknown placeholder {promt}"), "{err}");
        let err = AgentProfile::parse("command: []").unwrap_err();
        assert!(err.contains("must name a program"), "{err}");
        let err = AgentProfile::parse("command: [a]\nro_binds: [opt/x]").unwrap_err();
        assert!(err.contains("absolute"), "{err}");
        let err = AgentProfile::parse("command: [a]\nstdin: file").unwrap_err();
        assert!(err.contains("unknown variant"), "{err}");
        let err = AgentProfile::parse("command: [a]\ntimeout: 3").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn the_shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agents");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let p = AgentProfile::load(&path).unwrap();
                names.push(p.name);
            }
        }
        names.sort();
        assert_eq!(names, ["aider", "claude-code", "codex", "my-agent"]);
    }
}
