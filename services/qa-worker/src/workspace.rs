//! Temporary workspaces: a plan's generated files written out from the
//! store's artifacts, removed again when the [`Workspace`] is dropped.

use devfleet_store::{StoreResult, TaskRecord, TaskStore};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Component, Path, PathBuf};

/// Largest total size written into one workspace, in bytes.
pub const MAX_WORKSPACE_BYTES: u64 = 256 * 1024 * 1024;

/// A temporary directory holding files; deleted on drop.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// Creates an empty workspace under `parent`.
    pub fn create(parent: &Path) -> std::io::Result<Workspace> {
        let root = parent.join(format!("devfleet-qa-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root)?;
        Ok(Workspace { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `bytes` at the relative `path`, refusing anything that would
    /// land outside the workspace.
    pub fn write(&self, path: &str, bytes: &[u8]) -> std::io::Result<()> {
        let rel = safe_relative(path).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("path '{path}' is not a plain relative path"),
            )
        })?;
        let full = self.root.join(rel);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(full, bytes)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!(root = %self.root.display(), error = %e, "cannot remove a QA workspace");
        }
    }
}

/// `path` as a relative path of normal components only, or `None`.
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Why a workspace could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum MaterialiseError {
    #[error(transparent)]
    Store(#[from] devfleet_store::StoreError),
    #[error("writing the workspace: {0}")]
    Io(#[from] std::io::Error),
    #[error("artifact {hash} of '{path}' is missing from the store")]
    MissingArtifact { path: String, hash: String },
    #[error("the files are over {MAX_WORKSPACE_BYTES} bytes")]
    TooLarge,
}

/// Writes the plan's base snapshot (if its record names one) into
/// `workspace`, under the plan's own files (call it before
/// [`materialise`]). Base files are context only: they are not returned as
/// written, so checks never target them. A snapshot or blob missing from
/// the store is an error. Returns the tasks that declare `writes:` (for
/// [`materialise`]), when the plan's detail says.
pub async fn write_base(
    store: &dyn TaskStore,
    workspace: &Workspace,
    plan_id: &str,
) -> Result<Option<BTreeSet<String>>, MaterialiseError> {
    #[derive(serde::Deserialize)]
    struct Detail {
        plan: PlanPart,
    }
    #[derive(serde::Deserialize)]
    struct PlanPart {
        #[serde(default)]
        base_snapshot: Option<String>,
    }
    let Some(record) = store.plan(plan_id).await? else {
        return Ok(None);
    };
    let writers = devfleet_store::extra_files::writers(&record.detail);
    let Some(id) = serde_json::from_str::<Detail>(&record.detail)
        .ok()
        .and_then(|d| d.plan.base_snapshot)
    else {
        return Ok(writers);
    };
    let manifest = devfleet_store::snapshot::load(store, &id)
        .await?
        .ok_or_else(|| MaterialiseError::MissingArtifact {
            path: "(base snapshot manifest)".into(),
            hash: id.clone(),
        })?;
    for (path, entry) in &manifest.files {
        let bytes = store.artifact(&entry.blob).await?.ok_or_else(|| {
            MaterialiseError::MissingArtifact {
                path: path.clone(),
                hash: entry.blob.clone(),
            }
        })?;
        workspace.write(path, &bytes)?;
    }
    Ok(writers)
}

/// Every task `path` depends on, transitively (not including itself).
pub fn dependency_closure(tasks: &BTreeMap<String, TaskRecord>, path: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&str> = VecDeque::from([path]);
    while let Some(p) = queue.pop_front() {
        if let Some(t) = tasks.get(p) {
            for d in &t.depends_on {
                if d != path && seen.insert(d.clone()) {
                    queue.push_back(d);
                }
            }
        }
    }
    seen
}

/// Writes `file` (the artifact under check) and the plan's tree over the
/// given tasks (their current artifacts and the extra files they were
/// allowed to write, `devfleet_store::extra_files`); tasks without an
/// artifact yet are left out. Returns the paths written.
pub async fn materialise(
    store: &dyn TaskStore,
    workspace: &Workspace,
    file: Option<(&str, &str)>,
    others: impl IntoIterator<Item = &TaskRecord>,
    writers: Option<&BTreeSet<String>>,
) -> Result<Vec<String>, MaterialiseError> {
    let mut written = Vec::new();
    let mut total = 0u64;
    let mut put = |path: &str, bytes: &[u8]| -> Result<(), MaterialiseError> {
        total += bytes.len() as u64;
        if total > MAX_WORKSPACE_BYTES {
            return Err(MaterialiseError::TooLarge);
        }
        workspace.write(path, bytes)?;
        written.push(path.to_owned());
        Ok(())
    };
    let others: Vec<&TaskRecord> = others.into_iter().collect();
    for (path, entry) in devfleet_store::extra_files::plan_tree(store, &others, writers).await? {
        if Some(path.as_str()) == file.map(|f| f.0) {
            continue;
        }
        let bytes = fetch(store, &path, &entry.artifact).await?;
        put(&path, &bytes)?;
    }
    if let Some((path, hash)) = file {
        let bytes = fetch(store, path, hash).await?;
        put(path, &bytes)?;
    }
    Ok(written)
}

async fn fetch(store: &dyn TaskStore, path: &str, hash: &str) -> Result<Vec<u8>, MaterialiseError> {
    store
        .artifact(hash)
        .await?
        .ok_or_else(|| MaterialiseError::MissingArtifact {
            path: path.to_owned(),
            hash: hash.to_owned(),
        })
}

/// Every task of a plan by path.
pub async fn plan_tasks(
    store: &dyn TaskStore,
    plan_id: &str,
) -> StoreResult<BTreeMap<String, TaskRecord>> {
    Ok(store
        .tasks(plan_id)
        .await?
        .into_iter()
        .map(|t| (t.path.clone(), t))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_base_snapshot_is_written_under_the_plans_files() {
        use devfleet_store::memory::MemoryStore;
        use devfleet_store::{snapshot, PlanRecord};
        let store = MemoryStore::new();
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("lib")).unwrap();
        std::fs::write(base.path().join("lib/util.py"), "X = 1\n").unwrap();
        let id = snapshot::build(base.path(), snapshot::Limits::default())
            .unwrap()
            .store(&store)
            .await
            .unwrap();
        let detail = serde_json::json!({ "plan": { "base_snapshot": id } });
        let record = PlanRecord {
            detail: detail.to_string(),
            ..PlanRecord::new("p", "p", devfleet_protocol::PlanStatus::Running, 0)
        };
        store.create_plan(record, Vec::new()).await.unwrap();
        let parent = tempfile::tempdir().unwrap();
        let ws = Workspace::create(parent.path()).unwrap();
        write_base(&store, &ws, "p").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.root().join("lib/util.py")).unwrap(),
            "X = 1\n"
        );
        // A plan without a base writes nothing.
        let empty = Workspace::create(parent.path()).unwrap();
        write_base(&store, &empty, "unknown").await.unwrap();
        assert_eq!(std::fs::read_dir(empty.root()).unwrap().count(), 0);
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/../b"] {
            assert!(safe_relative(bad).is_none(), "{bad}");
        }
        assert_eq!(safe_relative("./a/b.py"), Some(PathBuf::from("a/b.py")));
    }

    #[test]
    fn workspaces_write_and_vanish() {
        let ws = Workspace::create(&std::env::temp_dir()).unwrap();
        let root = ws.root().to_owned();
        ws.write("pkg/a.py", b"x = 1\n").unwrap();
        assert!(root.join("pkg/a.py").exists());
        assert!(ws.write("../escape.py", b"").is_err());
        drop(ws);
        assert!(!root.exists());
    }
}
