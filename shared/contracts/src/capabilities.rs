//! Capabilities: what a worker can run, and what a piece of work needs.
//!
//! A worker announces its capabilities in its heartbeat record (see
//! [`crate::capacity::WorkerCapacity::capabilities`]): plain names such as
//! `python3`, `pytest`, `flask`, `claude`, `executor:command`, plus the
//! operator's labels (`gpu`, `eu`). Work names what it needs the same way
//! (a plan's and a task's `requires:`, the task's executor as
//! `executor:KIND`, and the programs its QA checks and integration steps
//! run, [`infer_from_command`]). A worker may take work when its
//! capabilities hold every requirement ([`missing`] is empty).
//!
//! The names are lower-case words of `a-z 0-9 . _ - :`; [`normalize`]
//! checks one and [`how_to_provide`] says, for a missing one, how an
//! operator provides it.

use devfleet_protocol::plan::{IntegrationStep, Plan};
use std::collections::BTreeSet;

/// The capability a worker has when executor `kind` is configured.
pub fn executor(kind: &str) -> String {
    format!("executor:{kind}")
}

/// A capability name, trimmed and lower-cased; an error names the problem
/// when it is empty, too long or holds other characters than
/// `a-z 0-9 . _ - :` (the rule plans are checked by).
pub fn normalize(name: &str) -> Result<String, String> {
    let name = name.trim().to_ascii_lowercase();
    devfleet_protocol::plan::validate_capability(&name)?;
    Ok(name)
}

/// What the dev task `path` of `plan` needs: the plan's and the task's
/// `requires:`, and the executor it names (its own, else the plan's) as
/// `executor:KIND`. A task that names no executor runs on any worker's
/// default. Sorted, without duplicates.
pub fn task_requirements(plan: &Plan, path: &str) -> Vec<String> {
    let task = plan.tasks.iter().find(|t| t.path == path);
    let executor = task.and_then(|t| t.executor).or(plan.executor);
    plan.requires
        .iter()
        .chain(task.into_iter().flat_map(|t| t.requires.iter()))
        .cloned()
        .chain(executor.map(|k| self::executor(k.as_str())))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// What an integration step needs: the plan's `requires:`, the step's,
/// and what its `run` program implies ([`infer_from_command`]).
pub fn step_requirements(plan: &Plan, step: &IntegrationStep) -> Vec<String> {
    plan.requires
        .iter()
        .chain(&step.requires)
        .cloned()
        .chain(infer_from_command(&step.run))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The requirements of `required` that `have` lacks, in order.
pub fn missing<'a>(
    required: impl IntoIterator<Item = &'a String>,
    have: &BTreeSet<String>,
) -> Vec<String> {
    required
        .into_iter()
        .filter(|r| !have.contains(r.as_str()))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// True when some worker of `fleet` (each a set of capabilities) has all
/// of `required`.
pub fn some_worker_has(fleet: &[BTreeSet<String>], required: &[String]) -> bool {
    fleet.iter().any(|have| missing(required, have).is_empty())
}

/// Python modules whose capability is "`python3` can import it"; the
/// program of the same name (e.g. `pytest` on PATH) is not needed.
pub const PYTHON_MODULES: &[&str] = &[
    "pytest",
    "flask",
    "django",
    "fastapi",
    "requests",
    "numpy",
    "pandas",
    "sqlalchemy",
];

/// Programs probed on PATH at start-up: toolchains, test runners, agent CLIs.
pub const PROGRAMS: &[&str] = &[
    "python3", "python", "pip", "pip3", "node", "npm", "npx", "yarn", "pnpm", "deno", "bun", "tsc",
    "cargo", "rustc", "go", "java", "javac", "mvn", "gradle", "ruby", "bundle", "php", "dotnet",
    "gcc", "g++", "cc", "clang", "make", "cmake", "git", "bash", "docker", "bwrap", "claude",
    "codex", "aider",
];

/// The capabilities a check or step running `command` needs, inferred from
/// the program it starts: `pytest -q` → `pytest`; `python3 -m pytest` →
/// `python3`, `pytest`; `python3 app.py` → `python3`; `npm test` → `npm`.
/// Leading `VAR=value` assignments and `env` are skipped; a relative or
/// absolute path (`./run.sh`) needs nothing (it ships with the work), and
/// shell built-ins are not programs. Only the first command of a pipeline
/// or `&&` chain is looked at: declare the others with `requires:`.
pub fn infer_from_command(command: &str) -> Vec<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let mut words = words
        .iter()
        .copied()
        .skip_while(|w| *w == "env" || (w.contains('=') && !w.starts_with('=')));
    let Some(program) = words.next() else {
        return Vec::new();
    };
    let program = program.trim_matches(|c| c == '"' || c == '\'');
    if program.contains('/') || program.is_empty() || SHELL_WORDS.contains(&program) {
        return Vec::new();
    }
    let program = program.to_ascii_lowercase();
    let mut needs = vec![program.clone()];
    if program.starts_with("python") {
        let rest: Vec<&str> = words.collect();
        if let Some(i) = rest.iter().position(|w| *w == "-m") {
            if let Some(module) = rest.get(i + 1) {
                let top = module.split('.').next().unwrap_or(module);
                needs.push(top.to_ascii_lowercase());
            }
        }
    }
    needs
        .into_iter()
        .filter_map(|n| normalize(&n).ok())
        .collect()
}

const SHELL_WORDS: &[&str] = &[
    "cd", "echo", "exit", "true", "false", "test", "[", "export", "set", "sh", "exec", ":",
];

/// One sentence telling an operator how to provide capability `name`.
pub fn how_to_provide(name: &str) -> String {
    if let Some(kind) = name.strip_prefix("executor:") {
        return match kind {
            "command" => "start a dev-worker with DEVFLEET_COMMAND set to the agent command".into(),
            "openai" => "start a dev-worker with DEVFLEET_OPENAI_BASE_URL (and a key) set".into(),
            other => format!("start a dev-worker that configures the {other} executor"),
        };
    }
    if PYTHON_MODULES.contains(&name) {
        return format!(
            "install it where workers run (`python3 -m pip install {name}`) and restart them"
        );
    }
    if PROGRAMS.contains(&name) {
        return format!("install `{name}` on a worker's PATH and restart it");
    }
    format!(
        "install `{name}` on a worker's PATH, or label a dev-worker with it \
         (DEVFLEET_DEV_LABELS={name})"
    )
}

/// The status line of work waiting for `missing` capabilities.
pub fn waiting_message(missing: &[String]) -> String {
    let how: Vec<String> = missing
        .iter()
        .map(|m| format!("{m}: {}", how_to_provide(m)))
        .collect();
    format!(
        "waiting for a worker with {}; {}",
        missing.join(", "),
        how.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn programs_are_inferred_from_commands() {
        assert_eq!(infer_from_command("pytest -q"), ["pytest"]);
        assert_eq!(
            infer_from_command("python3 -m pytest -q tests"),
            ["python3", "pytest"]
        );
        assert_eq!(infer_from_command("python3 app.py"), ["python3"]);
        assert_eq!(infer_from_command("npm test"), ["npm"]);
        assert_eq!(infer_from_command("CI=1 env X=2 go test ./..."), ["go"]);
        assert!(infer_from_command("./check.sh").is_empty());
        assert!(infer_from_command("echo hi").is_empty());
        assert!(infer_from_command("  ").is_empty());
    }

    #[test]
    fn missing_lists_what_a_worker_lacks() {
        let have = set(&["python3", "pytest"]);
        let need: Vec<String> = vec!["flask".into(), "python3".into(), "flask".into()];
        assert_eq!(missing(&need, &have), ["flask"]);
        assert!(some_worker_has(
            &[have.clone(), set(&["flask", "python3"])],
            &need
        ));
        assert!(!some_worker_has(&[have], &need));
        assert!(some_worker_has(&[set(&[])], &[]));
        assert!(!some_worker_has(&[], &[]));
    }

    #[test]
    fn a_task_needs_the_plans_and_its_own_requirements_and_its_executor() {
        let plan = Plan::parse(
            "name: p\nexecutor: command\nrequires: [python3]\ntasks:\n\
             - {path: a.py, spec: a, requires: [flask]}\n\
             - {path: b.py, spec: b, executor: builtin}\n\
             integration:\n- {name: unit, run: python3 -m pytest -q, requires: [gpu]}\n",
        )
        .unwrap();
        assert_eq!(
            task_requirements(&plan, "a.py"),
            ["executor:command", "flask", "python3"]
        );
        assert_eq!(
            task_requirements(&plan, "b.py"),
            ["executor:builtin", "python3"]
        );
        assert_eq!(
            step_requirements(&plan, &plan.integration[0]),
            ["gpu", "pytest", "python3"]
        );
    }

    #[test]
    fn bad_requirements_are_rejected_naming_the_place() {
        let err = Plan::parse("name: p\ntasks:\n- {path: a.py, spec: a, requires: [Flask]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("task 'a.py'") && err.contains("Flask"),
            "{err}"
        );
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(normalize(" GPU ").unwrap(), "gpu");
        assert_eq!(normalize("executor:command").unwrap(), "executor:command");
        assert!(normalize("").unwrap_err().contains("empty"));
        assert!(normalize("a b").unwrap_err().contains("' '"));
    }

    #[test]
    fn the_waiting_message_says_how_to_provide_each() {
        let m = waiting_message(&["flask".into(), "gpu".into(), "executor:command".into()]);
        assert!(m.contains("pip install flask"), "{m}");
        assert!(m.contains("DEVFLEET_DEV_LABELS"), "{m}");
        assert!(m.contains("DEVFLEET_COMMAND"), "{m}");
    }
}
