//! HTTP on the gateway's address: `/ws` (the WebSocket), `/metrics`,
//! `/healthz`, `/` (the dashboard) and the dashboard's JSON endpoints
//! `/api/overview`, `/api/plans` and `/api/plans/{id}`.
//!
//! With a token configured every route but `/healthz` requires it (401
//! otherwise); WebSocket upgrades also pass the Origin check (403) and the
//! connection limit (503).

use crate::auth;
use crate::connection;
use crate::gateway::Gateway;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use devfleet_store::TaskRecord;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// The dashboard page: self-contained HTML, CSS and JavaScript.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or wrong token.
    Unauthorized,
    /// WebSocket upgrade from an origin not allowed.
    Origin,
    /// WebSocket upgrade beyond `max_connections`.
    TooManyConnections,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::Unauthorized,
        Refusal::Origin,
        Refusal::TooManyConnections,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized",
            Refusal::Origin => "origin",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    fn response(self) -> Response {
        let (status, text) = match self {
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: pass it as Authorization: Bearer TOKEN or ?token=TOKEN \
                 (the gateway's DEVFLEET_GATEWAY_TOKEN)\n",
            ),
            Refusal::Origin => (
                StatusCode::FORBIDDEN,
                "WebSocket origin not allowed (see DEVFLEET_GATEWAY_ORIGINS)\n",
            ),
            Refusal::TooManyConnections => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many WebSocket connections (see DEVFLEET_GATEWAY_MAX_CONNECTIONS)\n",
            ),
        };
        let mut response = (status, text).into_response();
        if self == Refusal::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[derive(Clone)]
struct AppState {
    gateway: Arc<Gateway>,
    connections: TaskTracker,
}

/// The gateway's routes. WebSocket connections run on `tracker`; they end
/// when the hub's shutdown token is cancelled.
pub(crate) fn router(gateway: Arc<Gateway>, tracker: TaskTracker) -> Router {
    let state = AppState {
        gateway,
        connections: tracker,
    };
    let protected = Router::new()
        .route("/", get(dashboard))
        .route("/ws", get(websocket))
        .route("/metrics", get(metrics))
        .route("/api/overview", get(overview))
        .route("/api/plans", get(plans))
        .route("/api/plans/{id}", get(plan))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let gateway = &state.gateway;
    if !auth::token_ok(
        gateway.config.token.as_deref(),
        request.headers(),
        request.uri(),
    ) {
        gateway.refuse(Refusal::Unauthorized);
        tracing::debug!(path = %request.uri().path(), "refused: missing or wrong token");
        return Refusal::Unauthorized.response();
    }
    next.run(request).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn dashboard() -> Response {
    let mut response = Html(DASHBOARD).into_response();
    // The page is self-contained; the policy keeps it that way.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self' ws: wss:; img-src 'self' data:",
        ),
    );
    response
}

async fn websocket(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let gateway = state.gateway.clone();
    if !auth::origin_ok(&gateway.config.allowed_origins, &headers) {
        gateway.refuse(Refusal::Origin);
        return Refusal::Origin.response();
    }
    let Some(slot) = gateway.hub.reserve(gateway.config.max_connections) else {
        gateway.refuse(Refusal::TooManyConnections);
        return Refusal::TooManyConnections.response();
    };
    let limit = gateway.config.max_frame_bytes;
    let tracker = state.connections.clone();
    // The slot is held until the connection ends; if the upgrade fails,
    // the callback is dropped unrun and the slot with it.
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            // Tracked so `run` can wait for connections to say goodbye.
            tracker.track_future(async move {
                let _slot = slot;
                connection::serve(socket, gateway).await
            })
        })
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = crate::prometheus::render(&state.gateway);
    (
        [(header::CONTENT_TYPE, crate::exposition::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

async fn overview(State(state): State<AppState>) -> Response {
    let gateway = &state.gateway;
    let snapshot = gateway.snapshot();
    let now = devfleet_protocol::now_ms();
    let window = gateway.config.window.window.as_secs_f64().max(0.001);
    let stats = gateway.windows().summary(now, None);
    let errors = stats.get("error").map_or(0, |s| s.count);
    Json(json!({
        "timestamp": now,
        "snapshot": &*snapshot,
        "window_seconds": window,
        "error_rate_per_minute": errors as f64 * 60.0 / window,
        "stats": stats,
        "gateway": {
            "connections": gateway.hub.connected(),
            "instance": gateway.config.instance,
        },
    }))
    .into_response()
}

async fn plans(State(state): State<AppState>) -> Response {
    Json(json!({ "plans": &gateway_plans(&state.gateway) })).into_response()
}

fn gateway_plans(gateway: &Gateway) -> Vec<crate::snapshot::PlanSummary> {
    gateway.snapshot().plans.clone()
}

async fn plan(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let store = &state.gateway.connections.store;
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("plan '{id}' does not exist") })),
        )
            .into_response()
    };
    let record = match store.plan(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(),
        Err(e) => return store_error(&e),
    };
    let tasks = match store.tasks(&id).await {
        Ok(t) => t,
        Err(devfleet_store::StoreError::UnknownPlan { .. }) => return not_found(),
        Err(e) => return store_error(&e),
    };
    let critical_path = serde_json::from_str::<Value>(&record.detail)
        .ok()
        .and_then(|d| d.get("critical_path").cloned())
        .unwrap_or(Value::Array(vec![]));
    let layers = layers(&tasks);
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|t| {
            json!({
                "path": t.path,
                "state": t.state.as_str(),
                "depends_on": t.depends_on,
                "attempt": t.attempt,
                "priority": t.priority,
                "class": t.class.as_str(),
                "layer": layers.get(t.path.as_str()).copied().unwrap_or(0),
                "error": t.error.as_deref().map(|e| e.chars().take(300).collect::<String>()),
                "updated_ms": t.updated_ms,
            })
        })
        .collect();
    Json(json!({
        "plan": {
            "id": record.id,
            "name": record.name,
            "status": record.status.as_str(),
            "total": record.total,
            "done": record.done,
            "failed": record.failed,
            "blocked": record.blocked,
            "created_ms": record.created_ms,
            "updated_ms": record.updated_ms,
            "message": record.message,
            "critical_path": critical_path,
        },
        "tasks": tasks,
    }))
    .into_response()
}

fn store_error(e: &devfleet_store::StoreError) -> Response {
    tracing::warn!(error = %e, "store read for the dashboard failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": format!("store unavailable: {e}") })),
    )
        .into_response()
}

/// Topological layer of each task (0 = no dependency in the plan), for
/// drawing the DAG left to right. Tasks on a cycle go one layer past the rest.
fn layers(tasks: &[TaskRecord]) -> HashMap<&str, u32> {
    let known: HashMap<&str, &TaskRecord> = tasks.iter().map(|t| (t.path.as_str(), t)).collect();
    let mut indegree: HashMap<&str, usize> = HashMap::new();
    let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
    for t in tasks {
        let deps: Vec<&str> = t
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| known.contains_key(d))
            .collect();
        indegree.insert(t.path.as_str(), deps.len());
        for d in deps {
            dependents.entry(d).or_default().push(t.path.as_str());
        }
    }
    let mut layer: HashMap<&str, u32> = HashMap::new();
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| *p)
        .collect();
    while let Some(p) = ready.pop() {
        let l = *layer.entry(p).or_insert(0);
        for &d in dependents.get(p).map(Vec::as_slice).unwrap_or(&[]) {
            let entry = layer.entry(d).or_insert(0);
            *entry = (*entry).max(l + 1);
            if let Some(n) = indegree.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    ready.push(d);
                }
            }
        }
    }
    let max = layer.values().copied().max().unwrap_or(0);
    for t in tasks {
        if indegree.get(t.path.as_str()).copied().unwrap_or(0) > 0 {
            layer.insert(t.path.as_str(), max + 1);
        }
    }
    layer
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::TaskClass;
    use devfleet_store::TaskState;

    fn task(path: &str, deps: &[&str]) -> TaskRecord {
        TaskRecord {
            plan_id: "p".into(),
            path: path.into(),
            spec: String::new(),
            content: None,
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            dependents: vec![],
            priority: 0,
            estimate: 1,
            executor: None,
            state: TaskState::Pending,
            class: TaskClass::New,
            attempt: 0,
            lease_owner: None,
            lease_expires_ms: None,
            artifact: None,
            error: None,
            updated_ms: 0,
        }
    }

    #[test]
    fn layers_follow_the_longest_path() {
        let tasks = vec![
            task("a", &[]),
            task("b", &["a"]),
            task("c", &["a", "b"]),
            task("d", &["outside"]),
            task("x", &["y"]),
            task("y", &["x"]),
        ];
        let l = layers(&tasks);
        assert_eq!((l["a"], l["b"], l["c"], l["d"]), (0, 1, 2, 0));
        assert_eq!((l["x"], l["y"]), (3, 3));
    }
}
