//! Analysis of a plan: its tasks are the files, imports are parsed from each
//! task's `content`, and `depends_on` adds explicit edges.
//!
//! Files under the plan's `base` take part in resolution (an import of a
//! base module is neither unresolved nor external) but are not tasks, so
//! they give no edge; the base is listed, never read, except for
//! `tsconfig.json`/`jsconfig.json` files that steer JS/TS resolution.
//!
//! A plan must be acyclic to be scheduled. Cycles are broken
//! deterministically by dropping parsed edges, weakest kind first (see
//! [`crate::graph::break_cycles`]); each dropped edge is reported as a
//! warning and in [`Analysis::dropped_edges`], and the cycles found stay in
//! [`Analysis::cycles`]. A cycle made only of explicit `depends_on` edges
//! cannot be broken and rejects the plan with [`PlanError::Cycle`].

use crate::analysis::{self, Analysis, Edge, FileNode, Input};
use crate::resolve::FileSet;
use crate::tree::{self, Imports};
use crate::{graph, AnalyzeError, EdgeKind, Language, Options, Warning};
use devfleet_protocol::plan::{MAX_BASE_CONFIG_BYTES, MAX_BASE_ENTRIES};
use devfleet_protocol::{Plan, PlanError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Bytes of content per estimate unit.
const BYTES_PER_ESTIMATE: usize = 2048;

/// The estimate of a file of `bytes` bytes when the plan gives none:
/// `max(1, ceil(bytes / 2048))` — one unit per 2 KiB (about 50 lines of
/// code), at least 1, so a task with no content costs 1.
pub fn default_estimate(bytes: usize) -> u32 {
    let units = bytes.div_ceil(BYTES_PER_ESTIMATE).max(1);
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// Analyzes `plan`; `base_dir` is where its `base` lives, if it has one.
///
/// Checks the plan first ([`Plan::validate`]: paths, duplicates, unknown
/// dependencies, sizes). A `base_dir` that resolves to the filesystem root
/// or holds more than [`MAX_BASE_ENTRIES`] files and directories rejects
/// the plan ([`PlanError::InvalidBase`]). An unreadable `base_dir` is a
/// warning, not an error: imports into it then count as external; callers
/// that can check the directory (the CLI does) should refuse it earlier.
pub fn analyze_plan(plan: &Plan, base_dir: Option<&Path>) -> Result<Analysis, PlanError> {
    plan.validate()?;
    let mut warnings = Vec::new();
    let mut base_files: HashMap<String, PathBuf> = HashMap::new();
    if let Some(dir) = base_dir {
        let invalid = |reason: String| PlanError::InvalidBase {
            base: dir.display().to_string(),
            reason,
        };
        if std::fs::canonicalize(dir).is_ok_and(|c| c.parent().is_none()) {
            return Err(invalid("resolves to the filesystem root".into()));
        }
        let options = Options {
            max_entries: MAX_BASE_ENTRIES,
            ..Options::default()
        };
        match tree::list(dir, &options) {
            Err(AnalyzeError::TooManyFiles { limit, .. }) => {
                return Err(invalid(format!(
                    "holds more than {limit} files and directories (the limit for a base)"
                )))
            }
            Ok(listing) => {
                warnings.extend(listing.warnings);
                for file in listing.files {
                    base_files.insert(file.rel, file.abs);
                }
            }
            Err(e) => warnings.push(Warning {
                path: dir.display().to_string(),
                message: format!("base not readable ({e}); imports into it count as external"),
            }),
        }
    }

    // Only resolution configs are read from the base, and only small ones.
    let read = |rel: &str| {
        base_files
            .get(rel)
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() <= MAX_BASE_CONFIG_BYTES))
            .and_then(|p| std::fs::read_to_string(p).ok())
    };
    let listed: Vec<&str> = base_files.keys().map(String::as_str).collect();
    analyze(plan, &listed, &read, warnings)
}

/// Analyzes `plan` over a base given as its file list (relative,
/// `/`-separated paths, e.g. a snapshot's manifest) and a reader of its
/// small text files (`read` is asked only for `tsconfig.json`/
/// `jsconfig.json` files, and may return `None`). Each task's imports of
/// base files are in [`Analysis::base_imports`].
pub fn analyze_plan_over(
    plan: &Plan,
    base_files: &[&str],
    read: &dyn Fn(&str) -> Option<String>,
) -> Result<Analysis, PlanError> {
    plan.validate()?;
    analyze(plan, base_files, read, Vec::new())
}

fn analyze(
    plan: &Plan,
    base_files: &[&str],
    read_base: &dyn Fn(&str) -> Option<String>,
    mut warnings: Vec<Warning>,
) -> Result<Analysis, PlanError> {
    let mut set = FileSet::default();
    for file in base_files {
        set.insert((*file).to_string());
    }
    let mut tasks: Vec<usize> = (0..plan.tasks.len()).collect();
    tasks.sort_by(|&a, &b| plan.tasks[a].path.cmp(&plan.tasks[b].path));
    let mut files = Vec::with_capacity(tasks.len());
    let mut imports = Vec::with_capacity(tasks.len());
    for &t in &tasks {
        let task = &plan.tasks[t];
        let content = task.content.as_deref().unwrap_or("");
        set.insert(task.path.clone());
        files.push(FileNode {
            path: task.path.clone(),
            language: Language::from_path(&task.path),
            estimate: task
                .estimate
                .unwrap_or_else(|| default_estimate(content.len())),
        });
        imports.push(if content.is_empty() {
            Imports::None
        } else {
            tree::scan_text(&task.path, content)
        });
    }

    let contents: HashMap<&str, &str> = plan
        .tasks
        .iter()
        .filter_map(|t| Some((t.path.as_str(), t.content.as_deref()?)))
        .collect();
    let read = |rel: &str| match contents.get(rel) {
        Some(text) => Some(text.to_string()),
        None => read_base(rel),
    };
    let analysis::Resolved {
        mut edges,
        external,
        unresolved,
        warnings: config_warnings,
        base_imports,
    } = analysis::resolve_all(&files, &imports, &set, None, &read);
    warnings.extend(config_warnings);

    let index: HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.as_str(), i))
        .collect();
    for task in &plan.tasks {
        let from = index[task.path.as_str()];
        for dep in &task.depends_on {
            // validate() guarantees every dependency is a task.
            if let Some(&to) = index.get(dep.as_str()) {
                edges.push(Edge {
                    from,
                    to,
                    kind: EdgeKind::Explicit,
                });
            }
        }
    }
    let edges = analysis::dedup_edges(edges);
    let mut tuples: Vec<(usize, usize, EdgeKind)> =
        edges.iter().map(|e| (e.from, e.to, e.kind)).collect();
    let dropped =
        graph::break_cycles(files.len(), &mut tuples).map_err(|cycle| PlanError::Cycle {
            files: cycle.iter().map(|&i| files[i].path.clone()).collect(),
        })?;
    let dropped: Vec<Edge> = dropped
        .into_iter()
        .map(|(from, to, kind)| Edge { from, to, kind })
        .collect();
    for edge in &dropped {
        warnings.push(Warning {
            path: files[edge.from].path.clone(),
            message: format!(
                "{} edge to {} dropped to break a dependency cycle",
                edge.kind, files[edge.to].path
            ),
        });
    }
    let kept = tuples
        .into_iter()
        .map(|(from, to, kind)| Edge { from, to, kind })
        .collect();
    let input = Input {
        files,
        edges: kept,
        external,
        unresolved,
        warnings,
        skipped: 0,
    };
    let mut analysis = analysis::assemble(input, dropped);
    analysis.base_imports = base_imports
        .into_iter()
        .map(|s| s.into_iter().collect())
        .collect();
    Ok(analysis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_estimate_is_one_per_2kib_and_at_least_one() {
        assert_eq!(default_estimate(0), 1);
        assert_eq!(default_estimate(1), 1);
        assert_eq!(default_estimate(2048), 1);
        assert_eq!(default_estimate(2049), 2);
        assert_eq!(default_estimate(1024 * 1024), 512);
    }

    fn plan(yaml: &str) -> Plan {
        Plan::parse(yaml).unwrap()
    }

    #[test]
    fn hello_example_plan() {
        let p = plan(
            r#"
name: hello
tasks:
  - path: hello/db.py
    spec: store
    content: "_DATA = {}\n"
  - path: hello/models.py
    spec: model
    content: "from hello import db\n"
  - path: hello/api.py
    spec: api
    content: "from hello.db import get\nfrom hello.models import Greeting\n"
    estimate: 5
  - path: hello/__init__.py
    spec: marker
"#,
        );
        let a = analyze_plan(&p, None).unwrap();
        assert_eq!(
            a.dependencies("hello/api.py"),
            ["hello/db.py", "hello/models.py"]
        );
        assert_eq!(a.dependencies("hello/models.py"), ["hello/db.py"]);
        assert_eq!(a.batch("hello/db.py"), Some(0));
        assert_eq!(a.batch("hello/api.py"), Some(2));
        assert_eq!(
            a.critical_path().files,
            ["hello/db.py", "hello/models.py", "hello/api.py"]
        );
        assert_eq!(a.critical_path_length(), 7);
        let tasks = a.to_analyzed_tasks(&p);
        assert_eq!(tasks[0].path, "hello/db.py");
        assert_eq!(tasks[0].priority, 7);
        assert_eq!(tasks[2].estimate, 5);
    }

    #[test]
    fn imports_resolve_into_a_listed_base_and_are_recorded_per_task() {
        let p = plan(
            r#"
name: over-base
tasks:
  - { path: app/api.py, spec: api, content: "from lib.util import helper\nimport app.models\nimport requests\n" }
  - { path: app/models.py, spec: models, content: "from lib import db\n" }
  - { path: web/main.ts, spec: ui, content: "import { x } from '@lib/x';\n" }
"#,
        );
        let base = [
            "lib/__init__.py",
            "lib/util.py",
            "lib/db.py",
            "app/__init__.py",
            "tsconfig.json",
            "src/x.ts",
        ];
        let read = |rel: &str| {
            (rel == "tsconfig.json").then(|| {
                r#"{"compilerOptions":{"baseUrl":".","paths":{"@lib/*":["src/*"]}}}"#.to_string()
            })
        };
        let a = analyze_plan_over(&p, &base, &read).unwrap();
        assert_eq!(a.dependencies("app/api.py"), ["app/models.py"]);
        assert_eq!(a.base_imports("app/api.py"), ["lib/util.py"]);
        assert_eq!(a.base_imports("app/models.py"), ["lib/db.py"]);
        assert_eq!(
            a.base_imports("web/main.ts"),
            ["src/x.ts"],
            "tsconfig read through `read`"
        );
        let tasks = a.to_analyzed_tasks(&p);
        let api = tasks.iter().find(|t| t.path == "app/api.py").unwrap();
        assert_eq!(api.base_imports, ["lib/util.py"]);
        // Without the base, the same imports are external and no task imports a base file.
        let bare = analyze_plan(&p, None).unwrap();
        assert!(bare.base_imports("app/api.py").is_empty());
    }

    #[test]
    fn import_cycle_is_broken_and_reported() {
        let p = plan(
            r#"
name: cyc
tasks:
  - { path: a.py, spec: a, content: "import b\n" }
  - { path: b.py, spec: b, content: "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n" }
"#,
        );
        let a = analyze_plan(&p, None).unwrap();
        assert_eq!(a.dependencies("a.py"), ["b.py"]);
        assert!(a.dependencies("b.py").is_empty());
        assert_eq!(a.cycles(), vec![vec!["a.py", "b.py"]]);
        assert_eq!(a.dropped_edges().len(), 1);
        assert_eq!(a.dropped_edges()[0].kind, EdgeKind::Type);
        assert!(a.warnings().iter().any(|w| w.message.contains("cycle")));
    }

    #[test]
    fn explicit_cycle_is_rejected_naming_the_files() {
        let p = plan(
            r#"
name: cyc
tasks:
  - { path: a.py, spec: a, depends_on: [b.py] }
  - { path: b.py, spec: b, depends_on: [a.py] }
"#,
        );
        match analyze_plan(&p, None) {
            Err(PlanError::Cycle { files }) => assert_eq!(files, ["a.py", "b.py", "a.py"]),
            other => panic!("expected a cycle error, got {other:?}"),
        }
    }
}
