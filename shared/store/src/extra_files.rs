//! Files a task wrote besides its own: the workspace changes a dev-worker
//! judged, and the plan's tree with the accepted ones in it.
//!
//! An executor may change other paths of its workspace than the task's
//! file. The dev-worker judges each change (accepted only where the task's
//! `writes:` globs declare it, and never a base file or another task's
//! file), stores the text of each accepted one as an artifact, and records
//! every decision here, per task, once its result is recorded (a later
//! attempt replaces the record; one with no changes removes it).
//!
//! [`plan_tree`] is what every consumer of "the plan's files" reads (QA
//! workspaces, integration shards, `devfleet pull`, the canary's tree):
//! each task's artifact plus the accepted extra files of the tasks given,
//! applied in dependency order (a task after everything it depends on, so
//! a dependent's version of a path wins; independent tasks in path order)
//! with a deletion removing the path. `devfleet status` shows the
//! decisions, rejected ones with their reason.

use crate::{StoreResult, TaskRecord, TaskStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Store collection of the decisions, keyed `<plan_id>|<task path>` (a
/// JSON list of [`Decision`]).
pub const WORKSPACE_CHANGES: &str = "workspace_changes";

/// What became of one change an executor made to its workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub path: String,
    pub deleted: bool,
    pub accepted: bool,
    /// Why it was rejected (empty when accepted).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The stored text of an accepted file (none for a deletion or a
    /// rejected change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
}

fn key(plan_id: &str, task_path: &str) -> String {
    format!("{plan_id}|{task_path}")
}

/// Records (replaces) the decisions about task `task_path`'s workspace;
/// none removes the record.
pub async fn record(
    store: &dyn TaskStore,
    plan_id: &str,
    task_path: &str,
    decisions: &[Decision],
) -> StoreResult<()> {
    let key = key(plan_id, task_path);
    if decisions.is_empty() {
        store.kv_delete(WORKSPACE_CHANGES, &key).await?;
        return Ok(());
    }
    let json = serde_json::to_string(decisions).expect("decisions serialise");
    store.kv_put(WORKSPACE_CHANGES, &key, &json, None).await
}

/// The decisions about task `task_path`'s workspace (empty when it changed
/// nothing else, or the record is unreadable).
pub async fn decisions(
    store: &dyn TaskStore,
    plan_id: &str,
    task_path: &str,
) -> StoreResult<Vec<Decision>> {
    Ok(store
        .kv_get(WORKSPACE_CHANGES, &key(plan_id, task_path))
        .await?
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default())
}

/// One file of a plan's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Its artifact hash.
    pub artifact: String,
    /// The task that wrote it (its own path for a task's file).
    pub task: String,
}

/// The tasks of a plan that may write extra files (those declaring
/// `writes:`), from the plan record's `detail` (the analyzed plan); `None`
/// when the detail does not say (every task is then looked up).
pub fn writers(detail: &str) -> Option<BTreeSet<String>> {
    #[derive(Deserialize)]
    struct Detail {
        plan: PlanPart,
    }
    #[derive(Deserialize)]
    struct PlanPart {
        tasks: Vec<TaskPart>,
    }
    #[derive(Deserialize)]
    struct TaskPart {
        path: String,
        #[serde(default)]
        writes: Vec<String>,
    }
    let detail: Detail = serde_json::from_str(detail).ok()?;
    Some(
        detail
            .plan
            .tasks
            .into_iter()
            .filter(|t| !t.writes.is_empty())
            .map(|t| t.path)
            .collect(),
    )
}

/// The plan's files: every task in `tasks` with an artifact, plus the
/// accepted extra files of those tasks, by path (see the module docs for
/// the order). Tasks without an artifact are left out; the caller decides
/// whether that is an error. `writers` ([`writers`]), when known, spares
/// a store read per task that declares no `writes:` (the common case).
pub async fn plan_tree(
    store: &dyn TaskStore,
    tasks: &[&TaskRecord],
    writers: Option<&BTreeSet<String>>,
) -> StoreResult<BTreeMap<String, TreeFile>> {
    let mut tree = BTreeMap::new();
    for task in tasks {
        if let Some(artifact) = &task.artifact {
            tree.insert(
                task.path.clone(),
                TreeFile {
                    artifact: artifact.clone(),
                    task: task.path.clone(),
                },
            );
        }
    }
    for task in dependency_order(tasks) {
        if task.artifact.is_none() || writers.is_some_and(|w| !w.contains(&task.path)) {
            continue;
        }
        for d in decisions(store, &task.plan_id, &task.path).await? {
            if !d.accepted || tree.get(&d.path).is_some_and(|f| f.task == d.path) {
                // (a task's own file is never replaced: the judge rejects
                // it, and the check holds even for an old record)
                continue;
            }
            match (d.deleted, d.artifact) {
                (true, _) => {
                    tree.remove(&d.path);
                }
                (false, Some(artifact)) => {
                    tree.insert(
                        d.path,
                        TreeFile {
                            artifact,
                            task: task.path.clone(),
                        },
                    );
                }
                (false, None) => {}
            }
        }
    }
    Ok(tree)
}

/// `tasks` with each after every task of the list it depends on,
/// transitively (Kahn's algorithm, iterative: plans may be 20,000 deep);
/// among tasks free at the same time, path order. Tasks on a cycle (the
/// analyzer refuses those) come last, in path order.
fn dependency_order<'a>(tasks: &[&'a TaskRecord]) -> Vec<&'a TaskRecord> {
    let by_path: BTreeMap<&str, &'a TaskRecord> =
        tasks.iter().map(|t| (t.path.as_str(), *t)).collect();
    let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (path, task) in &by_path {
        let deps: BTreeSet<&str> = task
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| by_path.contains_key(d) && d != path)
            .collect();
        waiting.insert(path, deps.len());
        for d in deps {
            dependents.entry(d).or_default().push(path);
        }
    }
    let mut free: BTreeSet<&str> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| *p)
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    while let Some(path) = free.pop_first() {
        out.push(by_path[path]);
        waiting.remove(path);
        for d in dependents.get(path).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    free.insert(d);
                }
            }
        }
    }
    out.extend(waiting.keys().map(|p| by_path[p]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::{TaskClass, TaskState};

    fn task(path: &str, deps: &[&str], artifact: Option<&str>) -> TaskRecord {
        TaskRecord {
            plan_id: "p".into(),
            path: path.into(),
            spec: String::new(),
            content: None,
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            dependents: Vec::new(),
            priority: 0,
            estimate: 1,
            executor: None,
            state: TaskState::Done,
            class: TaskClass::New,
            attempt: 1,
            lease_owner: None,
            lease_expires_ms: None,
            artifact: artifact.map(str::to_owned),
            error: None,
            updated_ms: 0,
        }
    }

    fn accepted(path: &str, artifact: Option<&str>) -> Decision {
        Decision {
            path: path.into(),
            deleted: artifact.is_none(),
            accepted: true,
            reason: String::new(),
            artifact: artifact.map(str::to_owned),
        }
    }

    #[test]
    fn dependency_order_puts_dependencies_first_and_survives_a_deep_chain() {
        let (a, b, c) = (
            task("a", &["c"], None),
            task("b", &[], None),
            task("c", &[], None),
        );
        let order: Vec<&str> = dependency_order(&[&a, &b, &c])
            .iter()
            .map(|t| t.path.as_str())
            .collect();
        assert_eq!(order, ["b", "c", "a"]);
        let chain: Vec<TaskRecord> = (0..50_000)
            .map(|i| {
                let dep = format!("t{:05}", i + 1);
                let deps: Vec<&str> = if i < 49_999 {
                    vec![dep.as_str()]
                } else {
                    vec![]
                };
                task(&format!("t{i:05}"), &deps, None)
            })
            .collect();
        let refs: Vec<&TaskRecord> = chain.iter().collect();
        let order = dependency_order(&refs);
        assert_eq!(order.len(), 50_000);
        assert_eq!(order[0].path, "t49999");
        assert_eq!(order[49_999].path, "t00000");
    }

    #[tokio::test]
    async fn the_tree_holds_accepted_extra_files_a_dependent_wins_and_deletes() {
        let store = MemoryStore::new();
        let s: &dyn TaskStore = &store;
        let lib = task("lib.py", &[], Some("h-lib"));
        let app = task("app.py", &["lib.py"], Some("h-app"));
        let unbuilt = task("late.py", &[], None);
        record(
            s,
            "p",
            "lib.py",
            &[
                accepted("CHANGELOG.md", Some("h-log1")),
                accepted("docs/lib.md", Some("h-doc")),
                Decision {
                    path: "app.py".into(),
                    deleted: false,
                    accepted: true,
                    reason: String::new(),
                    artifact: Some("h-evil".into()),
                },
                Decision {
                    path: "setup.cfg".into(),
                    deleted: false,
                    accepted: false,
                    reason: "not declared in the task's `writes:`".into(),
                    artifact: None,
                },
            ],
        )
        .await
        .unwrap();
        record(
            s,
            "p",
            "app.py",
            &[
                accepted("CHANGELOG.md", Some("h-log2")),
                accepted("docs/lib.md", None),
            ],
        )
        .await
        .unwrap();
        record(s, "p", "late.py", &[accepted("late.txt", Some("h-late"))])
            .await
            .unwrap();
        let tree = plan_tree(s, &[&app, &lib, &unbuilt], None).await.unwrap();
        let files: Vec<(&str, &str, &str)> = tree
            .iter()
            .map(|(p, f)| (p.as_str(), f.artifact.as_str(), f.task.as_str()))
            .collect();
        assert_eq!(
            files,
            [
                ("CHANGELOG.md", "h-log2", "app.py"),
                ("app.py", "h-app", "app.py"),
                ("lib.py", "h-lib", "lib.py"),
            ],
            "the dependent's CHANGELOG wins, its deletion removes docs/lib.md, a task's own \
             file is never replaced, rejected and unbuilt tasks' changes stay out"
        );
        // Knowing who declares `writes:` spares the other tasks' reads, and
        // a task not declaring any contributes nothing.
        let only_lib = BTreeSet::from(["lib.py".to_owned()]);
        let tree = plan_tree(s, &[&app, &lib], Some(&only_lib)).await.unwrap();
        assert_eq!(tree["CHANGELOG.md"].artifact, "h-log1");
        assert!(tree.contains_key("docs/lib.md"));
        let detail = r#"{"plan": {"tasks": [{"path": "lib.py", "writes": ["docs/*"]}, {"path": "app.py"}]}}"#;
        assert_eq!(writers(detail), Some(only_lib));
        assert_eq!(writers("not json"), None);
        // No changes in a later attempt removes the record.
        record(s, "p", "app.py", &[]).await.unwrap();
        assert!(decisions(s, "p", "app.py").await.unwrap().is_empty());
        assert_eq!(decisions(s, "p", "lib.py").await.unwrap().len(), 4);
    }
}
