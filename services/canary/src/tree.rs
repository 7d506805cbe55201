//! The plan's built tree, written out for a command handler.
//!
//! A rollout ships what the pipeline built: before a command profile runs
//! for a plan's deployment, every task's artifact (and every extra file a
//! task was allowed to write, `devfleet_store::extra_files`) is read from the store
//! and written under a fresh directory, whose path the handler gets
//! (`DEVFLEET_DEPLOY_TREE`, `{tree}`). The directory is new and empty, the
//! paths were validated when the plan was submitted and are checked again
//! here, and files are created with `create_new`, so no path can leave it
//! or write through a link. A task that is not done, or whose artifact is
//! gone, is an error: a partial tree is never shipped.

use devfleet_store::{SharedStore, TaskState};
use std::path::Path;

/// Writes the plan's artifacts under `dest` (an existing empty directory);
/// returns the number of files.
pub async fn materialise(store: &SharedStore, plan_id: &str, dest: &Path) -> Result<usize, String> {
    let tasks = store
        .tasks(plan_id)
        .await
        .map_err(|e| format!("reading the tasks of plan '{plan_id}': {e}"))?;
    for task in &tasks {
        if task.state != TaskState::Done || task.artifact.is_none() {
            return Err(format!(
                "task '{}' of plan '{plan_id}' is {:?} with {}: the plan's tree is not complete",
                task.path,
                task.state,
                if task.artifact.is_some() {
                    "an artifact"
                } else {
                    "no artifact"
                }
            ));
        }
    }
    let refs: Vec<_> = tasks.iter().collect();
    let tree = devfleet_store::extra_files::plan_tree(store.as_ref(), &refs, None)
        .await
        .map_err(|e| format!("reading the tree of plan '{plan_id}': {e}"))?;
    let mut written = 0;
    for (path, file) in tree {
        devfleet_protocol::plan::validate_path(&path)
            .map_err(|e| format!("refusing to write '{path}': {e}"))?;
        let hash = &file.artifact;
        let bytes = store
            .artifact(hash)
            .await
            .map_err(|e| format!("reading the artifact of '{path}': {e}"))?
            .ok_or_else(|| format!("the artifact of '{path}' ({hash}) is gone"))?;
        let file = dest.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(|e| format!("creating {}: {e}", file.display()))?;
        std::io::Write::write_all(&mut out, &bytes)
            .map_err(|e| format!("writing {}: {e}", file.display()))?;
        written += 1;
    }
    Ok(written)
}
