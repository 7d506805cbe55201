//! Operator requests to a running deployment (manual rollback).
//!
//! A request is a record in the kv collection [`CONTROL`] under the
//! deployment id. It is kept apart from the deployment record so that the
//! replica rewriting the record at every check cannot overwrite it; the
//! driving replica polls it (every `control_poll`) and deletes it once the
//! deployment is final. Requests survive a replica crash: whoever takes the
//! deployment over sees them first.

use crate::record::{self, Status, CONTROL};
use devfleet_store::SharedStore;
use serde::{Deserialize, Serialize};

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Take traffic back now, whatever the health.
    Rollback,
}

/// A pending operator request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    pub action: ControlAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub requested_ms: i64,
}

/// Why a manual rollback was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no deployment '{id}' (`devfleet canary status` lists them)")]
    UnknownDeployment { id: String },
    #[error("deployment '{id}' is already {}: nothing to roll back", status.as_str())]
    AlreadyFinal { id: String, status: Status },
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// Asks the replica driving `id` to roll it back. Refused when the
/// deployment does not exist or is final. Returns the deployment's status
/// at the time of the request.
pub async fn request_rollback(
    store: &SharedStore,
    id: &str,
    reason: Option<String>,
) -> Result<Status, ControlError> {
    let record = record::load(store, id)
        .await?
        .ok_or_else(|| ControlError::UnknownDeployment { id: id.to_owned() })?;
    if record.status.is_final() {
        return Err(ControlError::AlreadyFinal {
            id: id.to_owned(),
            status: record.status,
        });
    }
    let request = ControlRequest {
        action: ControlAction::Rollback,
        reason,
        requested_ms: devfleet_protocol::now_ms(),
    };
    let text = serde_json::to_string(&request).map_err(anyhow::Error::from)?;
    store
        .kv_put(CONTROL, id, &text, None)
        .await
        .map_err(anyhow::Error::from)?;
    Ok(record.status)
}

/// The pending request for `id`, if any. A malformed one is logged and
/// treated as a rollback request (the safe reading of "someone asked").
pub(crate) async fn pending(
    store: &SharedStore,
    id: &str,
) -> anyhow::Result<Option<ControlRequest>> {
    let Some(text) = store.kv_get(CONTROL, id).await? else {
        return Ok(None);
    };
    Ok(Some(serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(deployment = %id, error = %e, "malformed control request; treating it as a rollback");
        ControlRequest {
            action: ControlAction::Rollback,
            reason: Some(format!("malformed control request: {text}")),
            requested_ms: devfleet_protocol::now_ms(),
        }
    })))
}
