//! Which checks run on which files, from configuration.
//!
//! A check is a command line with `{file}` standing for the file's path
//! (relative to the workspace, which is the working directory), split like
//! a shell would but never run through one. Checks are chosen by file
//! extension. An `optional` check whose program is not installed is
//! recorded as `skipped` with the reason; a file no check applies to is
//! recorded as one `skipped` check named `none`. Nothing is passed
//! silently: the verdict lists what ran and what did not.
//!
//! The configuration file (`DEVFLEET_QA_CHECKS`, YAML or JSON) replaces the
//! defaults:
//!
//! ```yaml
//! checks:
//!   - name: py_compile
//!     extensions: [py]
//!     run: python3 -m py_compile {file}
//!   - name: ruff
//!     extensions: [py]
//!     run: ruff check --no-cache {file}
//!     optional: true
//!     timeout_seconds: 30
//! ```

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One configured check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// File extensions (without the dot) it applies to.
    pub extensions: Vec<String>,
    /// Command line; `{file}` is replaced by the file's relative path.
    pub run: String,
    /// Skip (recorded, with the reason) when the program is not installed.
    #[serde(default)]
    pub optional: bool,
    /// Wall timeout for this check; the worker's default when absent.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// The check configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    pub checks: Vec<CheckSpec>,
}

fn spec(name: &str, exts: &[&str], run: &str, optional: bool) -> CheckSpec {
    CheckSpec {
        name: name.into(),
        extensions: exts.iter().map(|e| e.to_string()).collect(),
        run: run.into(),
        optional,
        timeout_seconds: None,
    }
}

/// The default checks: Python `py_compile` and `ruff` (when installed),
/// JavaScript `node --check`, TypeScript `tsc --noEmit` (when installed).
pub fn default_checks() -> Vec<CheckSpec> {
    vec![
        spec("py_compile", &["py"], "python3 -m py_compile {file}", false),
        spec(
            "ruff",
            &["py"],
            "ruff check --no-cache --quiet {file}",
            true,
        ),
        spec(
            "node_check",
            &["js", "mjs", "cjs"],
            "node --check {file}",
            false,
        ),
        spec(
            "tsc",
            &["ts", "tsx", "mts", "cts"],
            "tsc --noEmit --skipLibCheck {file}",
            true,
        ),
    ]
}

/// Reads and validates a check configuration file.
pub fn load(path: &Path) -> anyhow::Result<Vec<CheckSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading QA checks from {}", path.display()))?;
    let file: ChecksFile = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing QA checks in {}", path.display()))?;
    for c in &file.checks {
        validate(c).with_context(|| format!("QA checks in {}", path.display()))?;
    }
    Ok(file.checks)
}

/// Checks one spec: a name, at least one extension, a command line that splits.
pub fn validate(c: &CheckSpec) -> anyhow::Result<()> {
    anyhow::ensure!(!c.name.trim().is_empty(), "a check has an empty name");
    anyhow::ensure!(
        !c.extensions.is_empty(),
        "check '{}' lists no extensions",
        c.name
    );
    let words = shlex::split(&c.run)
        .with_context(|| format!("check '{}': command line has unbalanced quotes", c.name))?;
    anyhow::ensure!(!words.is_empty(), "check '{}' has an empty command", c.name);
    Ok(())
}

/// The extension of a path, lowercased (`""` when none).
pub fn extension(path: &str) -> String {
    Path::new(path)
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

/// The checks that apply to `path`.
pub fn for_path<'a>(checks: &'a [CheckSpec], path: &str) -> Vec<&'a CheckSpec> {
    let ext = extension(path);
    checks
        .iter()
        .filter(|c| c.extensions.iter().any(|e| e.eq_ignore_ascii_case(&ext)))
        .collect()
}

/// The command words of a check for one file (`{file}` substituted per word,
/// so a path with spaces stays one argument).
pub fn command_for(check: &CheckSpec, file: &str) -> anyhow::Result<Vec<String>> {
    let words = shlex::split(&check.run)
        .with_context(|| format!("check '{}': command line has unbalanced quotes", check.name))?;
    Ok(words
        .into_iter()
        .map(|w| w.replace("{file}", file))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_chosen_by_extension() {
        let checks = default_checks();
        let names = |p: &str| {
            for_path(&checks, p)
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("app/models.py"), ["py_compile", "ruff"]);
        assert_eq!(names("web/app.JS"), ["node_check"]);
        assert_eq!(names("web/app.tsx"), ["tsc"]);
        assert!(names("README.md").is_empty());
        assert!(names("Makefile").is_empty());
    }

    #[test]
    fn file_is_substituted_per_word() {
        let c = spec("x", &["py"], "python3 -m py_compile {file}", false);
        assert_eq!(
            command_for(&c, "my dir/a.py").unwrap(),
            ["python3", "-m", "py_compile", "my dir/a.py"]
        );
    }

    #[test]
    fn config_files_are_validated() {
        let dir = std::env::temp_dir().join(format!("qa-checks-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "checks:\n  - name: sh\n    extensions: [sh]\n    run: sh -n {file}\n",
        )
        .unwrap();
        assert_eq!(load(&good).unwrap().len(), 1);
        let bad = dir.join("bad.yaml");
        std::fs::write(
            &bad,
            "checks:\n  - name: sh\n    extensions: []\n    run: sh -n {file}\n",
        )
        .unwrap();
        assert!(load(&bad).unwrap_err().to_string().contains("bad.yaml"));
        let typo = dir.join("typo.yaml");
        std::fs::write(
            &typo,
            "checks:\n  - name: sh\n    extension: [sh]\n    run: x\n",
        )
        .unwrap();
        assert!(load(&typo).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
