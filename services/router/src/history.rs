//! A task's failure history: every failed attempt (dev error, QA verdict,
//! QA infrastructure error) with its error and diagnostics.
//!
//! Kept in the store collection [`HISTORY`] under [`task_key`], as one JSON
//! array per task. The number of entries is the task's failure count across
//! retries and the fix loop; the router dead-letters the task when it
//! reaches the configured maximum. Appending is idempotent per
//! `(attempt, stage)`, so a redelivered message never counts twice.

use devfleet_protocol::{AttemptRecord, Stage};
use devfleet_store::{StoreError, StoreResult, TaskStore};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Store collection of failure histories, keyed by [`task_key`].
pub const HISTORY: &str = "history";

/// Longest error or diagnostics text kept per entry, in bytes.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;

/// Most entries kept per task (the oldest are dropped beyond it).
pub const MAX_ENTRIES: usize = 50;

/// How long a finished (done) task's history is kept.
pub const DONE_HISTORY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The store key of one task: `plan_id|path`. Plan ids never contain `|`
/// (the store refuses them), so the first `|` separates the two.
pub fn task_key(plan_id: &str, path: &str) -> String {
    format!("{plan_id}|{path}")
}

/// Splits a [`task_key`] into plan id and path.
pub fn split_task_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('|')
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The store attempt number that failed.
    pub attempt: u32,
    pub stage: Stage,
    /// One-line summary.
    pub error: String,
    /// Full (trimmed) diagnostics: QA check output, or the dev error text.
    #[serde(default)]
    pub diagnostics: Option<String>,
    pub at_ms: i64,
}

impl HistoryEntry {
    /// The protocol form carried by escalations (diagnostics folded into
    /// the error text).
    pub fn to_record(&self) -> AttemptRecord {
        let error = match &self.diagnostics {
            Some(d) if !d.is_empty() && d != &self.error => {
                format!("{}\n{}", self.error, trim_text(d, 2_000))
            }
            _ => self.error.clone(),
        };
        AttemptRecord {
            attempt: self.attempt,
            stage: self.stage,
            error,
            at_ms: self.at_ms,
        }
    }
}

use devfleet_protocol::trim_text;

/// Reads a task's history (empty when none).
pub async fn read(
    store: &dyn TaskStore,
    plan_id: &str,
    path: &str,
) -> StoreResult<Vec<HistoryEntry>> {
    let key = task_key(plan_id, path);
    match store.kv_get(HISTORY, &key).await? {
        None => Ok(Vec::new()),
        Some(json) => serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
            key: format!("{HISTORY}/{key}"),
            reason: e.to_string(),
        }),
    }
}

/// Appends an entry unless one for the same attempt and stage is already
/// there; returns the history after the step.
pub async fn append(
    store: &dyn TaskStore,
    plan_id: &str,
    path: &str,
    mut entry: HistoryEntry,
) -> StoreResult<Vec<HistoryEntry>> {
    let mut history = read(store, plan_id, path).await?;
    if history
        .iter()
        .any(|e| e.attempt == entry.attempt && e.stage == entry.stage)
    {
        return Ok(history);
    }
    entry.error = trim_text(&entry.error, MAX_TEXT_BYTES);
    entry.diagnostics = entry.diagnostics.map(|d| trim_text(&d, MAX_TEXT_BYTES));
    history.push(entry);
    if history.len() > MAX_ENTRIES {
        let drop = history.len() - MAX_ENTRIES;
        history.drain(..drop);
    }
    write(store, plan_id, path, &history, None).await?;
    Ok(history)
}

/// Writes a history (with an expiry, for finished tasks).
pub async fn write(
    store: &dyn TaskStore,
    plan_id: &str,
    path: &str,
    history: &[HistoryEntry],
    ttl: Option<Duration>,
) -> StoreResult<()> {
    let json = serde_json::to_string(history).map_err(|e| StoreError::Backend(e.to_string()))?;
    store
        .kv_put(HISTORY, &task_key(plan_id, path), &json, ttl)
        .await
}

/// Forgets a task's history (replay starts counting again).
pub async fn clear(store: &dyn TaskStore, plan_id: &str, path: &str) -> StoreResult<()> {
    store
        .kv_delete(HISTORY, &task_key(plan_id, path))
        .await
        .map(drop)
}

/// The newest QA diagnostics in a history, if any.
pub fn last_qa_diagnostics(history: &[HistoryEntry]) -> Option<&str> {
    history
        .iter()
        .rev()
        .find(|e| e.stage == Stage::Qa && e.diagnostics.is_some())
        .and_then(|e| e.diagnostics.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_store::memory::MemoryStore;

    fn entry(attempt: u32, stage: Stage) -> HistoryEntry {
        HistoryEntry {
            attempt,
            stage,
            error: format!("boom {attempt}"),
            diagnostics: None,
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn a_redelivered_failure_counts_once() {
        let store = MemoryStore::new();
        let h = append(&store, "p", "a.py", entry(1, Stage::Dev))
            .await
            .unwrap();
        assert_eq!(h.len(), 1);
        let h = append(&store, "p", "a.py", entry(1, Stage::Dev))
            .await
            .unwrap();
        assert_eq!(h.len(), 1);
        let h = append(&store, "p", "a.py", entry(1, Stage::Qa))
            .await
            .unwrap();
        assert_eq!(h.len(), 2);
        clear(&store, "p", "a.py").await.unwrap();
        assert!(read(&store, "p", "a.py").await.unwrap().is_empty());
    }

    #[test]
    fn task_keys_split_at_the_first_bar() {
        let k = task_key("plan-1", "a|b.py");
        assert_eq!(split_task_key(&k), Some(("plan-1", "a|b.py")));
    }
}
