//! The integration stage: a plan's `integration` commands, split into
//! shards that qa-workers run in parallel, and the pure helpers the
//! scheduler uses to send them ([`shards`]) and to judge the results
//! ([`IntegrationTally`]).
//!
//! # Sharding
//!
//! A step without `shard` is one shard. A step with `shard: N` is N shards;
//! each runs the command with `DEVFLEET_SHARD_INDEX` (0-based) and
//! `DEVFLEET_SHARD_COUNT` in its environment. When the command is pytest
//! (`pytest …`, `py.test …` or `python[3] -m pytest …`), the worker also
//! splits the test files itself: every `test_*.py` and `*_test.py` in the
//! workspace (hidden and `__pycache__` folders skipped), sorted by path,
//! goes to shard `i % N` for its position `i`, and the shard's files are
//! appended to the command. The split depends only on the file list, so
//! every worker computes the same one. A shard that gets no files passes
//! with a note. Other commands must split the work themselves from the two
//! variables (or run whole on every shard).

use devfleet_protocol::{IntegrationResult, IntegrationStep, IntegrationWork};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The integration work a plan's steps make: one item per shard of each step.
pub fn shards(plan_id: &str, steps: &[IntegrationStep]) -> Vec<IntegrationWork> {
    steps
        .iter()
        .flat_map(|step| {
            let count = step.shard.unwrap_or(1).max(1);
            (0..count).map(move |index| IntegrationWork {
                plan_id: plan_id.to_owned(),
                step: step.clone(),
                shard_index: index,
                shard_count: count,
            })
        })
        .collect()
}

/// The verdict of a plan's integration stage so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TallyState {
    /// Some shards have not reported.
    Pending { missing: usize },
    /// Every shard passed.
    Passed,
    /// Every shard reported and at least one failed.
    Failed,
}

/// Aggregates integration results for one plan: idempotent per (step,
/// shard), so redelivered results count once. Serialisable, but the
/// scheduler may as well rebuild it from the results it stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationTally {
    pub plan_id: String,
    /// (step name, shard index) → result; `None` until reported.
    expected: BTreeMap<String, Option<IntegrationResult>>,
}

fn slot_key(step: &str, shard: u32) -> String {
    format!("{step}#{shard}")
}

impl IntegrationTally {
    /// A tally expecting exactly these shards (as made by [`shards`]).
    pub fn new(plan_id: &str, work: &[IntegrationWork]) -> Self {
        Self {
            plan_id: plan_id.to_owned(),
            expected: work
                .iter()
                .map(|w| (slot_key(&w.step.name, w.shard_index), None))
                .collect(),
        }
    }

    /// Records a result; returns false (and changes nothing) for a result
    /// of another plan, of a shard not expected, or already recorded.
    pub fn record(&mut self, result: IntegrationResult) -> bool {
        if result.plan_id != self.plan_id {
            return false;
        }
        match self
            .expected
            .get_mut(&slot_key(&result.step, result.shard_index))
        {
            Some(slot @ None) => {
                *slot = Some(result);
                true
            }
            _ => false,
        }
    }

    pub fn state(&self) -> TallyState {
        let missing = self.expected.values().filter(|r| r.is_none()).count();
        if missing > 0 {
            TallyState::Pending { missing }
        } else if self.expected.values().flatten().all(|r| r.passed) {
            TallyState::Passed
        } else {
            TallyState::Failed
        }
    }

    /// The failed shards' results, in (step, shard) order.
    pub fn failures(&self) -> Vec<&IntegrationResult> {
        self.expected
            .values()
            .flatten()
            .filter(|r| !r.passed)
            .collect()
    }

    /// A message for the plan (and escalation) naming each failed shard
    /// with the end of its output, at most `max` bytes.
    pub fn failure_summary(&self, max: usize) -> String {
        let mut s = String::new();
        for r in self.failures() {
            let tail: String = {
                let lines: Vec<&str> = r.output.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            };
            s.push_str(&format!(
                "integration step '{}' shard {}/{} failed:\n{}\n",
                r.step,
                r.shard_index + 1,
                r.shard_count,
                tail
            ));
        }
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        s
    }
}

/// True when the command words run pytest.
pub fn is_pytest(words: &[String]) -> bool {
    let prog = |w: &str| {
        Path::new(w)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match words {
        [first, ..] if matches!(prog(first).as_str(), "pytest" | "py.test") => true,
        [first, m, module, ..] => {
            prog(first).starts_with("python") && m == "-m" && module == "pytest"
        }
        _ => false,
    }
}

/// True for pytest's default test file names.
pub fn is_test_file(path: &str) -> bool {
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.ends_with(".py") && (name.starts_with("test_") || name.ends_with("_test.py"))
}

/// The test files of shard `index` of `count`: sorted, then every
/// `count`-th starting at `index`.
pub fn shard_files(files: &[String], index: u32, count: u32) -> Vec<String> {
    let mut sorted: Vec<&String> = files.iter().filter(|f| is_test_file(f)).collect();
    sorted.sort();
    sorted.dedup();
    let count = count.max(1) as usize;
    sorted
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % count == index as usize)
        .map(|(_, f)| f.clone())
        .collect()
}

/// Every file under `root`, relative and `/`-separated, skipping hidden
/// folders and `__pycache__`.
pub fn list_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !name.starts_with('.') && name != "__pycache__" {
                    walk(root, &path, out);
                }
            } else if ft.is_file() {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(
                        rel.components()
                            .map(|c| c.as_os_str().to_string_lossy())
                            .collect::<Vec<_>>()
                            .join("/"),
                    );
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, shard: Option<u32>) -> IntegrationStep {
        IntegrationStep {
            name: name.into(),
            run: "python3 -m pytest -q".into(),
            shard,
            timeout_seconds: None,
        }
    }

    fn result(step: &str, shard: u32, count: u32, passed: bool) -> IntegrationResult {
        IntegrationResult {
            plan_id: "p".into(),
            step: step.into(),
            shard_index: shard,
            shard_count: count,
            passed,
            output: format!("out {step} {shard}"),
            duration_ms: 1,
        }
    }

    #[test]
    fn steps_become_one_work_item_per_shard() {
        let w = shards("p", &[step("unit", Some(3)), step("lint", None)]);
        assert_eq!(w.len(), 4);
        assert_eq!(
            w.iter()
                .map(|w| (w.step.name.as_str(), w.shard_index, w.shard_count))
                .collect::<Vec<_>>(),
            [
                ("unit", 0, 3),
                ("unit", 1, 3),
                ("unit", 2, 3),
                ("lint", 0, 1)
            ]
        );
    }

    #[test]
    fn tally_waits_for_every_shard_and_counts_each_once() {
        let work = shards("p", &[step("unit", Some(2)), step("lint", None)]);
        let mut t = IntegrationTally::new("p", &work);
        assert_eq!(t.state(), TallyState::Pending { missing: 3 });
        assert!(t.record(result("unit", 0, 2, true)));
        assert!(
            !t.record(result("unit", 0, 2, false)),
            "a duplicate changes nothing"
        );
        assert!(!t.record(result("other", 0, 1, true)), "unknown step");
        assert!(t.record(result("unit", 1, 2, true)));
        assert_eq!(t.state(), TallyState::Pending { missing: 1 });
        assert!(t.record(result("lint", 0, 1, false)));
        assert_eq!(t.state(), TallyState::Failed);
        assert!(t.failure_summary(1000).contains("'lint' shard 1/1"));
    }

    #[test]
    fn pytest_is_recognised() {
        let w = |s: &str| shlex::split(s).unwrap();
        assert!(is_pytest(&w("pytest -q")));
        assert!(is_pytest(&w("/usr/bin/python3 -m pytest -x")));
        assert!(!is_pytest(&w("python3 run_tests.py")));
        assert!(!is_pytest(&w("make test")));
    }

    #[test]
    fn test_files_split_deterministically_and_completely() {
        let files: Vec<String> = [
            "tests/test_b.py",
            "tests/test_a.py",
            "app/models.py",
            "tests/c_test.py",
            "tests/test_d.py",
            "tests/conftest.py",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s0 = shard_files(&files, 0, 2);
        let s1 = shard_files(&files, 1, 2);
        assert_eq!(s0, ["tests/c_test.py", "tests/test_b.py"]);
        assert_eq!(s1, ["tests/test_a.py", "tests/test_d.py"]);
        let mut reversed = files.clone();
        reversed.reverse();
        assert_eq!(
            shard_files(&reversed, 0, 2),
            s0,
            "order of discovery does not matter"
        );
        assert!(shard_files(&files, 5, 6).is_empty());
    }
}
