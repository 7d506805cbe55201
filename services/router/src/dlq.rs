//! The dead-letter index: everything an on-call engineer needs about work
//! that stopped, in the store collection [`DLQ`], and the operations behind
//! `devfleet dlq list | replay ID | purge`.
//!
//! Two kinds of entries:
//!
//! * **task**: the router gave up on a task (its failures reached the
//!   limit, or a failure was not retryable). The task is Failed in the store
//!   (its dependents Blocked); the entry holds the full failure history.
//!   Replay returns the task to the ready set with its attempts and history
//!   reset, unblocks its dependents, and reopens a failed plan.
//! * **message**: the bus dead-lettered a message (undecodable, or past its
//!   delivery limit) into its namespace's dead-letter queue
//!   (`devfleet.dlq`, or `<namespace>.devfleet.dlq`; see
//!   [`devfleet_bus::dead_letter_queue_for`]); the router's indexer moved it
//!   here with its [`DeadLetterInfo`] and payload. Replay publishes the
//!   payload again to the queue it came from.
//!
//! Entry ids are derived from their content, so indexing the same dead
//! letter twice (a redelivery) writes one entry.

use crate::history::{self, HistoryEntry};
use anyhow::Context as _;
use base64::Engine as _;
use devfleet_bus::{DeadLetterInfo, DEAD_LETTER_QUEUE};
use devfleet_protocol::{Envelope, PlanStatus};
use devfleet_runtime::Connections;
use devfleet_store::{StoreError, StoreResult, TaskState, TaskStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Store collection of the dead-letter index, keyed by entry id.
pub const DLQ: &str = "dlq";

/// Largest payload kept (and replayable) for a message entry, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DlqSource {
    /// The router dead-lettered a task.
    Task,
    /// The bus dead-lettered a message.
    Message,
}

impl DlqSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DlqSource::Task => "task",
            DlqSource::Message => "message",
        }
    }
}

/// One dead letter, as stored and as `devfleet dlq list --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    /// Short id for `devfleet dlq replay ID`.
    pub id: String,
    pub source: DlqSource,
    #[serde(default)]
    pub plan_id: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// Every failed attempt of the task (task entries).
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// Broker queue the message was dead-lettered from (message entries).
    #[serde(default)]
    pub queue: Option<String>,
    /// Deliveries or failed attempts before it was dead-lettered.
    pub attempts: u32,
    /// Message kind, when the payload decodes.
    #[serde(default)]
    pub kind: Option<String>,
    /// The message as it was, base64 (message entries up to
    /// [`MAX_PAYLOAD_BYTES`]; `None` beyond, which makes it unreplayable).
    #[serde(default)]
    pub payload: Option<String>,
    #[serde(default)]
    pub payload_bytes: usize,
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..6])
}

/// The id of a task dead letter: stable for one (task, final attempt).
pub fn task_entry_id(plan_id: &str, path: &str, attempt: u32) -> String {
    format!(
        "t-{}",
        short_hash(&[plan_id.as_bytes(), path.as_bytes(), &attempt.to_le_bytes()])
    )
}

/// The id of a bus dead letter: stable for one dead-lettering of a payload.
pub fn message_entry_id(payload: &[u8], info: Option<&DeadLetterInfo>) -> String {
    let (queue, at) = info.map(|i| (i.queue.as_str(), i.at_ms)).unwrap_or(("", 0));
    format!(
        "m-{}",
        short_hash(&[payload, queue.as_bytes(), &at.to_le_bytes()])
    )
}

/// Builds the entry for a bus dead letter.
pub fn message_entry(payload: &[u8], info: Option<&DeadLetterInfo>) -> DlqEntry {
    let decoded = Envelope::decode(payload);
    let (kind, plan_id, path, decode_note) = match &decoded {
        Ok(env) => (
            Some(env.kind().to_owned()),
            env.plan_id.clone(),
            env.task_id.clone(),
            None,
        ),
        Err(e) => (None, None, None, Some(e.to_string())),
    };
    let reason = match (info, decode_note) {
        (Some(i), _) => i.reason.clone(),
        (None, Some(note)) => format!("no dead-letter details; payload: {note}"),
        (None, None) => "no dead-letter details".to_owned(),
    };
    DlqEntry {
        id: message_entry_id(payload, info),
        source: DlqSource::Message,
        plan_id,
        path,
        reason,
        at_ms: info.map_or_else(devfleet_protocol::now_ms, |i| i.at_ms),
        history: Vec::new(),
        queue: info.map(|i| i.queue.clone()),
        attempts: info.map_or(0, |i| i.attempts),
        kind,
        payload: (payload.len() <= MAX_PAYLOAD_BYTES)
            .then(|| base64::engine::general_purpose::STANDARD.encode(payload)),
        payload_bytes: payload.len(),
    }
}

/// Writes an entry (replacing one with the same id).
pub async fn put(store: &dyn TaskStore, entry: &DlqEntry) -> StoreResult<()> {
    let json = serde_json::to_string(entry).map_err(|e| StoreError::Backend(e.to_string()))?;
    store.kv_put(DLQ, &entry.id, &json, None).await
}

/// Every entry, oldest first. Unreadable records are reported as entries
/// whose reason says so, never skipped silently.
pub async fn list(store: &dyn TaskStore) -> StoreResult<Vec<DlqEntry>> {
    let mut entries: Vec<DlqEntry> = store
        .kv_list(DLQ)
        .await?
        .into_iter()
        .map(|(id, json)| {
            serde_json::from_str(&json).unwrap_or_else(|e| DlqEntry {
                id,
                source: DlqSource::Message,
                plan_id: None,
                path: None,
                reason: format!("unreadable index record: {e}"),
                at_ms: 0,
                history: Vec::new(),
                queue: None,
                attempts: 0,
                kind: None,
                payload: None,
                payload_bytes: 0,
            })
        })
        .collect();
    entries.sort_by(|a, b| a.at_ms.cmp(&b.at_ms).then_with(|| a.id.cmp(&b.id)));
    Ok(entries)
}

/// One entry by id.
pub async fn get(store: &dyn TaskStore, id: &str) -> StoreResult<Option<DlqEntry>> {
    match store.kv_get(DLQ, id).await? {
        None => Ok(None),
        Some(json) => serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: format!("{DLQ}/{id}"),
                reason: e.to_string(),
            }),
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The task is back in the ready set (or waiting for its dependencies).
    Task { plan_id: String, path: String },
    /// The message was published again to its queue.
    Message { queue: String },
}

/// Replays one entry and removes it from the index.
///
/// A task entry: the task must still be Failed; it is replayed in the store
/// (attempts reset, dependents unblocked), its history and pending retry
/// forgotten, and a plan that had ended Failed is set Running again so the
/// scheduler finishes it. A message entry: its payload is published again
/// to the queue it was dead-lettered from.
pub async fn replay(connections: &Connections, id: &str) -> anyhow::Result<Replayed> {
    let store = connections.store.as_ref();
    let entry = get(store, id)
        .await?
        .with_context(|| format!("no dead letter '{id}'; `devfleet dlq list` shows them"))?;
    let replayed = match entry.source {
        DlqSource::Task => {
            let (Some(plan_id), Some(path)) = (entry.plan_id.clone(), entry.path.clone()) else {
                anyhow::bail!("dead letter '{id}' names no task");
            };
            replay_task(store, &plan_id, &path).await?;
            Replayed::Task { plan_id, path }
        }
        DlqSource::Message => {
            let queue = entry.queue.clone().with_context(|| {
                format!("dead letter '{id}' does not say which queue it came from")
            })?;
            let payload = entry.payload.as_deref().with_context(|| {
                format!(
                    "dead letter '{id}' is {} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit kept for replay",
                    entry.payload_bytes
                )
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(payload)
                .with_context(|| format!("dead letter '{id}' has a corrupt payload"))?;
            connections
                .bus
                .publish(&queue, &bytes)
                .await
                .with_context(|| format!("publishing dead letter '{id}' back to {queue}"))?;
            Replayed::Message { queue }
        }
    };
    store.kv_delete(DLQ, id).await?;
    Ok(replayed)
}

async fn replay_task(store: &dyn TaskStore, plan_id: &str, path: &str) -> anyhow::Result<()> {
    let task = store
        .task(plan_id, path)
        .await?
        .with_context(|| format!("task '{path}' of plan '{plan_id}' no longer exists"))?;
    if task.state != TaskState::Failed {
        anyhow::bail!(
            "task '{path}' of plan '{plan_id}' is {}, not failed: nothing to replay",
            task.state.as_str()
        );
    }
    // History first: if the replay below fails, the task is still Failed and
    // can be replayed again; the reverse order could leave a live task with
    // a full history that dead-letters it on its next failure.
    history::clear(store, plan_id, path).await?;
    store
        .kv_delete(crate::retry::RETRIES, &history::task_key(plan_id, path))
        .await?;
    store
        .replay(plan_id, path)
        .await
        .with_context(|| format!("replaying task '{path}' of plan '{plan_id}'"))?;
    if let Some(plan) = store.plan(plan_id).await? {
        if plan.status == PlanStatus::Failed {
            store
                .set_plan_status(
                    plan_id,
                    PlanStatus::Running,
                    Some(format!("{path} replayed from the dead-letter queue")),
                )
                .await?;
        }
    }
    Ok(())
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    /// Index entries removed.
    pub entries: usize,
    /// Messages removed from the namespace's dead-letter queue on the
    /// broker.
    pub bus_messages: u64,
}

/// Removes every index entry, and the messages still waiting in the
/// namespace's bus dead-letter queue.
pub async fn purge(connections: &Connections) -> anyhow::Result<Purged> {
    let store = connections.store.as_ref();
    let mut purged = Purged::default();
    for (id, _) in store.kv_list(DLQ).await? {
        if store.kv_delete(DLQ, &id).await? {
            purged.entries += 1;
        }
    }
    let queue = connections.queue(DEAD_LETTER_QUEUE);
    purged.bus_messages = connections
        .bus
        .purge(&queue)
        .await
        .with_context(|| format!("purging the bus dead-letter queue {queue}"))?;
    Ok(purged)
}

/// True when a bus dead letter from broker queue `queue` belongs to the
/// stack of `namespace` (every dead letter does for the empty namespace).
pub fn owns_queue(namespace: &str, queue: &str) -> bool {
    namespace.is_empty()
        || queue
            .strip_prefix(namespace)
            .is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::{Envelope, TaskDone};

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(task_entry_id("p", "a.py", 3), task_entry_id("p", "a.py", 3));
        assert_ne!(task_entry_id("p", "a.py", 3), task_entry_id("p", "a.py", 4));
        assert!(task_entry_id("p", "a.py", 3).starts_with("t-"));
    }

    #[test]
    fn message_entries_carry_what_decodes() {
        let env = Envelope::new(TaskDone {
            plan_id: "p1".into(),
            path: "x.py".into(),
            attempt: 1,
            artifact: "aa".into(),
        });
        let bytes = env.encode().unwrap();
        let info = DeadLetterInfo {
            queue: "ns.task.done".into(),
            reason: "gave up".into(),
            attempts: 5,
            at_ms: 42,
        };
        let e = message_entry(&bytes, Some(&info));
        assert_eq!(e.kind.as_deref(), Some("task.done"));
        assert_eq!(e.plan_id.as_deref(), Some("p1"));
        assert_eq!(e.path.as_deref(), Some("x.py"));
        assert_eq!(e.queue.as_deref(), Some("ns.task.done"));
        assert_eq!(e.attempts, 5);
        assert!(e.payload.is_some());

        let garbage = message_entry(b"\xc1garbage", None);
        assert!(garbage.kind.is_none());
        assert!(
            garbage.reason.contains("no dead-letter details"),
            "{}",
            garbage.reason
        );
    }

    #[test]
    fn namespaces_own_their_queues_only() {
        assert!(owns_queue("", "anything"));
        assert!(owns_queue("ns", "ns.task.built"));
        assert!(!owns_queue("ns", "ns2.task.built"));
        assert!(!owns_queue("ns", "conf-1"));
    }
}
