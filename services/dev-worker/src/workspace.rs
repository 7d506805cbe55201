//! Task workspaces: the directory a dev task's executor works in.
//!
//! [`Workspace::prepare`] makes a fresh directory holding the plan's base
//! snapshot (copied from the worker's [`SnapshotCache`], so every replica
//! sees the same tree for the same snapshot id) and, over it, the current
//! artifacts of every task the task depends on, transitively. It remembers
//! the hash of every file it wrote.
//!
//! After the executor returns, [`Workspace::changes`] compares the tree
//! with what was materialised: every path written, created or deleted, plus
//! the executor's own `other_files`. [`Rules::judge`] then decides each
//! change: the task's own path is its result; another path is accepted
//! only when the task declares it (`writes:` globs), it is not a base file
//! and not another task's file, and it is a plain relative path; every
//! other change is rejected. Nothing is dropped silently: the worker logs
//! and records every decision (`devfleet_store::extra_files`); accepted files
//! join the plan's tree.
//!
//! The directory is removed when the [`Workspace`] is dropped.

pub use devfleet_store::extra_files::Decision;
use devfleet_store::snapshot::SnapshotCache;
use devfleet_store::{content_hash, StoreError, TaskStore};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A prepared task workspace (removed on drop).
pub struct Workspace {
    dir: tempfile::TempDir,
    /// Path → content hash of every file written by [`Workspace::prepare`].
    materialised: BTreeMap<String, String>,
}

/// One change an executor made to its workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub path: String,
    /// The new text; `None` for a deletion.
    #[serde(skip)]
    pub text: Option<String>,
    pub deleted: bool,
}

impl Workspace {
    /// A fresh directory under `root` holding the snapshot `base` (if any)
    /// and `files` (path → text, the dependencies' artifacts) over it.
    pub async fn prepare(
        store: &dyn TaskStore,
        cache: &SnapshotCache,
        root: &Path,
        base: Option<&str>,
        files: &BTreeMap<String, String>,
    ) -> Result<Self, StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::Backend(format!("{what}: {e}"));
        std::fs::create_dir_all(root).map_err(|e| io("creating the workspace root", e))?;
        let dir = tempfile::Builder::new()
            .prefix("task-")
            .tempdir_in(root)
            .map_err(|e| io("creating a workspace", e))?;
        let mut materialised = BTreeMap::new();
        if let Some(id) = base {
            let tree = cache.materialise(store, id).await?;
            copy_tree(&tree, dir.path(), &mut materialised)
                .map_err(|e| io("copying the base snapshot", e))?;
        }
        for (path, text) in files {
            let target = dir.path().join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("writing a dependency", e))?;
            }
            std::fs::write(&target, text).map_err(|e| io("writing a dependency", e))?;
            materialised.insert(path.clone(), content_hash(text.as_bytes()));
        }
        Ok(Self { dir, materialised })
    }

    /// The workspace directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every change against what was materialised: files written or
    /// created (with their text; a file that is not UTF-8 is reported with
    /// lossy text) and files deleted, sorted by path, followed by the
    /// executor's `reported` changes that the tree does not already show.
    /// Symlinks and other non-files are reported as written with no text.
    pub fn changes(&self, reported: &BTreeMap<String, Option<String>>) -> Vec<Change> {
        let mut found = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut found);
        let mut out = Vec::new();
        for (path, entry) in &found {
            let changed = match (entry, self.materialised.get(path)) {
                (Found::File(bytes), Some(hash)) => &content_hash(bytes) != hash,
                _ => true,
            };
            if changed {
                out.push(Change {
                    path: path.clone(),
                    text: match entry {
                        Found::File(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                        Found::Other => None,
                    },
                    deleted: false,
                });
            }
        }
        for path in self.materialised.keys() {
            if !found.contains_key(path) {
                out.push(Change {
                    path: path.clone(),
                    text: None,
                    deleted: true,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        for (path, text) in reported {
            if !out.iter().any(|c| &c.path == path) {
                out.push(Change {
                    path: path.clone(),
                    text: text.clone(),
                    deleted: text.is_none(),
                });
            }
        }
        out
    }
}

/// What the tree walk found at a path.
enum Found {
    File(Vec<u8>),
    /// A symlink, socket, fifo… (never followed, never accepted).
    Other,
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Found>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(root, &path, out);
            continue;
        }
        let rel = relative(root, &path);
        let found = if kind.is_file() {
            std::fs::read(&path).map_or(Found::Other, Found::File)
        } else {
            Found::Other
        };
        out.insert(rel, found);
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn copy_tree(
    from: &Path,
    to: &Path,
    materialised: &mut BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut found = BTreeMap::new();
    walk(from, from, &mut found);
    for (rel, entry) in found {
        let Found::File(bytes) = entry else { continue };
        let target = to.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, &bytes)?;
        materialised.insert(rel, content_hash(&bytes));
    }
    Ok(())
}

/// What a task may change besides its own file.
pub struct Rules {
    /// The task's own path.
    pub own: String,
    /// Its `writes:` globs, compiled.
    writes: GlobSet,
    /// Files of the base snapshot.
    pub base_files: BTreeSet<String>,
    /// Every task's path in the plan.
    pub task_paths: BTreeSet<String>,
}

impl Rules {
    /// Rules for task `own` with its `writes` globs (validated with the
    /// plan; a glob that does not compile matches nothing).
    pub fn new(
        own: &str,
        writes: &[String],
        base_files: BTreeSet<String>,
        task_paths: BTreeSet<String>,
    ) -> Self {
        let mut set = GlobSetBuilder::new();
        for glob in writes {
            if let Ok(g) = GlobBuilder::new(glob).literal_separator(true).build() {
                set.add(g);
            }
        }
        Self {
            own: own.to_owned(),
            writes: set.build().unwrap_or_else(|_| GlobSet::empty()),
            base_files,
            task_paths,
        }
    }

    /// Decides every change but the task's own path (see the module docs).
    pub fn judge(&self, changes: &[Change]) -> Vec<Decision> {
        changes
            .iter()
            .filter(|c| c.path != self.own)
            .map(|c| {
                let reason = self.rejection(c);
                Decision {
                    path: c.path.clone(),
                    deleted: c.deleted,
                    accepted: reason.is_none(),
                    reason: reason.unwrap_or_default(),
                    // (stored by the worker once it keeps the change)
                    artifact: None,
                }
            })
            .collect()
    }

    fn rejection(&self, change: &Change) -> Option<String> {
        if let Err(reason) = devfleet_protocol::plan::validate_path(&change.path) {
            return Some(format!("not a path inside the workspace: {reason}"));
        }
        if !change.deleted && change.text.is_none() {
            return Some("not a regular file (a symlink or special file)".into());
        }
        if self.base_files.contains(&change.path) {
            return Some("a file of the base snapshot".into());
        }
        if self.task_paths.contains(&change.path) {
            return Some("another task's file".into());
        }
        if !self.writes.is_match(&change.path) {
            return Some("not declared in the task's `writes:`".into());
        }
        None
    }
}

/// The workspace directory root under a worker's work directory.
pub fn workspaces_root(work_dir: &Path) -> PathBuf {
    work_dir.join("workspaces")
}

/// The snapshot cache root under a worker's work directory.
pub fn snapshots_root(work_dir: &Path) -> PathBuf {
    work_dir.join("snapshots")
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_store::memory::MemoryStore;
    use devfleet_store::snapshot;

    async fn prepared(store: &MemoryStore, root: &Path) -> Workspace {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("lib")).unwrap();
        std::fs::write(base.path().join("lib/util.py"), "def util(): pass\n").unwrap();
        let id = snapshot::build(base.path(), snapshot::Limits::default())
            .unwrap()
            .store(store)
            .await
            .unwrap();
        let cache = SnapshotCache::new(root.join("snapshots"), 2);
        let deps = BTreeMap::from([("app/db.py".to_string(), "DB = 1\n".to_string())]);
        Workspace::prepare(store, &cache, &root.join("ws"), Some(&id), &deps)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_workspace_holds_the_base_and_the_dependencies() {
        let store = MemoryStore::new();
        let root = tempfile::tempdir().unwrap();
        let ws = prepared(&store, root.path()).await;
        assert_eq!(
            std::fs::read_to_string(ws.path().join("lib/util.py")).unwrap(),
            "def util(): pass\n"
        );
        assert_eq!(
            std::fs::read_to_string(ws.path().join("app/db.py")).unwrap(),
            "DB = 1\n"
        );
        assert!(
            ws.changes(&BTreeMap::new()).is_empty(),
            "nothing changed yet"
        );
        let dir = ws.path().to_path_buf();
        drop(ws);
        assert!(!dir.exists(), "removed on drop");
    }

    #[tokio::test]
    async fn changes_are_detected_and_judged() {
        let store = MemoryStore::new();
        let root = tempfile::tempdir().unwrap();
        let ws = prepared(&store, root.path()).await;
        let p = ws.path();
        std::fs::create_dir_all(p.join("app/migrations")).unwrap();
        std::fs::write(p.join("app/api.py"), "own\n").unwrap();
        std::fs::write(p.join("app/migrations/0001.py"), "m\n").unwrap();
        std::fs::write(p.join("notes.txt"), "undeclared\n").unwrap();
        std::fs::write(p.join("lib/util.py"), "edited base\n").unwrap();
        std::fs::remove_file(p.join("app/db.py")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("app/migrations/link.py")).unwrap();
        // Hostile paths an executor reports.
        let reported = BTreeMap::from([
            ("../x".to_string(), Some("escape".to_string())),
            ("/etc/cron.d/x".to_string(), Some("abs".to_string())),
        ]);
        let changes = ws.changes(&reported);
        let rules = Rules::new(
            "app/api.py",
            &["app/migrations/**".to_string(), "lib/*.py".to_string()],
            BTreeSet::from(["lib/util.py".to_string()]),
            BTreeSet::from(["app/api.py".to_string(), "app/db.py".to_string()]),
        );
        let decisions: Vec<(String, bool, String)> = rules
            .judge(&changes)
            .into_iter()
            .map(|d| (d.path, d.accepted, d.reason))
            .collect();
        let get = |path: &str| {
            decisions
                .iter()
                .find(|d| d.0 == path)
                .unwrap_or_else(|| panic!("{path} not reported: {decisions:?}"))
                .clone()
        };
        assert!(get("app/migrations/0001.py").1, "declared: accepted");
        assert!(get("notes.txt").2.contains("writes"), "{decisions:?}");
        assert!(get("lib/util.py").2.contains("base"), "{decisions:?}");
        assert!(get("app/db.py").2.contains("another task"), "{decisions:?}");
        assert!(get("app/migrations/link.py").2.contains("symlink"));
        assert!(get("../x").2.contains("'..'"), "{decisions:?}");
        assert!(get("/etc/cron.d/x").2.contains("absolute"), "{decisions:?}");
        assert!(
            decisions.iter().all(|d| d.0 != "app/api.py"),
            "the own path is the result, not a change to judge"
        );
        assert_eq!(decisions.iter().filter(|d| d.1).count(), 1);
        assert!(changes
            .iter()
            .any(|c| c.path == "app/api.py" && c.text.as_deref() == Some("own\n")));
    }
}
