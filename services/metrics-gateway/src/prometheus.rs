//! `/metrics`: the pipeline and the gateway in Prometheus text format.
//!
//! Rendered from the poller's last [`Snapshot`] and the gateway's own
//! counters, so a scrape never reads the store. Every family is written
//! even when it has no data yet (a counter at 0, an empty label set), so
//! alerts see zeros rather than gaps. The names are documented in
//! docs/GATEWAY.md.

use crate::exposition::{Exposition, Kind};
use crate::gateway::Gateway;
use crate::hub::DisconnectReason;
use devfleet_protocol::MetricType;
use std::sync::atomic::Ordering;

/// Renders the exposition text.
pub fn render(gateway: &Gateway) -> String {
    let s = gateway.snapshot();
    let mut e = Exposition::new();

    e.family(
        "devfleet_queue_depth",
        Kind::Gauge,
        "Messages waiting in a work queue.",
    );
    for q in &s.queues {
        if let Some(depth) = q.depth {
            e.sample("devfleet_queue_depth", &[("queue", &q.queue)], depth as f64);
        }
    }
    e.family(
        "devfleet_dlq_depth",
        Kind::Gauge,
        "Messages waiting in the dead-letter queue.",
    );
    if let Some(d) = s.dlq_depth {
        e.sample("devfleet_dlq_depth", &[], d as f64);
    }
    e.single(
        "devfleet_dlq_entries",
        Kind::Gauge,
        "Entries in the dead-letter index (store collection dlq).",
        s.dlq_entries as f64,
    );
    e.family(
        "devfleet_ready_tasks",
        Kind::Gauge,
        "Tasks in the ready set.",
    );
    if let Some(r) = s.ready {
        e.sample("devfleet_ready_tasks", &[], r as f64);
    }
    e.family("devfleet_plans", Kind::Gauge, "Plans by status.");
    for (status, n) in &s.plans_by_status {
        e.sample("devfleet_plans", &[("status", status)], *n as f64);
    }
    e.family(
        "devfleet_tasks",
        Kind::Gauge,
        "Tasks by state (tasks of tracked unfinished plans, counts of the others).",
    );
    for (state, n) in &s.tasks_by_state {
        e.sample("devfleet_tasks", &[("state", state)], *n as f64);
    }
    e.single(
        "devfleet_workers",
        Kind::Gauge,
        "Live dev-workers.",
        f64::from(s.workers.workers),
    );
    e.single(
        "devfleet_worker_slots",
        Kind::Gauge,
        "Concurrency slots over all live dev-workers.",
        s.workers.slots as f64,
    );
    e.single(
        "devfleet_worker_slots_busy",
        Kind::Gauge,
        "Slots running a task now.",
        s.workers.busy as f64,
    );
    let counter = |e: &mut Exposition, name: &str, help: &str, v: Option<i64>| {
        e.family(name, Kind::Counter, help);
        if let Some(v) = v {
            e.sample(name, &[], v.max(0) as f64);
        }
    };
    counter(
        &mut e,
        "devfleet_cache_hits_total",
        "Result cache hits (store counter cache_hits).",
        s.cache_hits,
    );
    counter(
        &mut e,
        "devfleet_cache_misses_total",
        "Result cache misses (store counter cache_misses).",
        s.cache_misses,
    );
    counter(
        &mut e,
        "devfleet_tasks_completed_total",
        "Tasks completed (store counter scheduler.tasks_completed).",
        s.tasks_completed,
    );
    e.family(
        "devfleet_llm_tokens_total",
        Kind::Counter,
        "Tokens of executor runs by model and direction (in: prompt, out: completion).",
    );
    for (model, u) in &s.usage {
        e.sample(
            "devfleet_llm_tokens_total",
            &[("model", model), ("direction", "in")],
            u.tokens_in as f64,
        );
        e.sample(
            "devfleet_llm_tokens_total",
            &[("model", model), ("direction", "out")],
            u.tokens_out as f64,
        );
    }
    e.family(
        "devfleet_llm_cost_usd_total",
        Kind::Counter,
        "Cost of executor runs by model, US dollars (from the price table).",
    );
    for (model, u) in &s.usage {
        e.sample(
            "devfleet_llm_cost_usd_total",
            &[("model", model)],
            u.cost_usd(),
        );
    }
    e.family(
        "devfleet_llm_calls_total",
        Kind::Counter,
        "Model calls (or agent runs) of executors by model.",
    );
    for (model, u) in &s.usage {
        e.sample(
            "devfleet_llm_calls_total",
            &[("model", model)],
            u.calls as f64,
        );
    }
    e.family(
        "devfleet_breaker_state",
        Kind::Gauge,
        "Circuit breaker state: 1 for the current state, 0 for the others.",
    );
    for b in &s.breakers {
        for state in ["closed", "open", "half_open"] {
            let v = if b.state == state { 1.0 } else { 0.0 };
            e.sample(
                "devfleet_breaker_state",
                &[("breaker", &b.name), ("state", state)],
                v,
            );
        }
    }
    e.family(
        "devfleet_canary_weight_ratio",
        Kind::Gauge,
        "Share of traffic on the canary, 0 to 1.",
    );
    for c in &s.canaries {
        if let Some(w) = c.weight {
            e.sample(
                "devfleet_canary_weight_ratio",
                &[("deployment", &c.id)],
                (w / 100.0).clamp(0.0, 1.0),
            );
        }
    }

    {
        let state = gateway.ingest_state();
        e.family(
            "devfleet_stage_duration_seconds",
            Kind::Histogram,
            "Durations reported in samples and events (duration_ms), by stage.",
        );
        for (stage, h) in &state.durations {
            e.histogram("devfleet_stage_duration_seconds", &[("stage", stage)], h);
        }
        e.family(
            "devfleet_gateway_frames_total",
            Kind::Counter,
            "Metric frames ingested, by metric type.",
        );
        for t in MetricType::ALL {
            let n = state.frames.get(&t).copied().unwrap_or(0);
            e.sample(
                "devfleet_gateway_frames_total",
                &[("metric_type", t.as_str())],
                n as f64,
            );
        }
        e.family(
            "devfleet_gateway_events_total",
            Kind::Counter,
            "Pipeline events ingested, by kind.",
        );
        for (kind, n) in &state.events {
            e.sample(
                "devfleet_gateway_events_total",
                &[("kind", kind)],
                *n as f64,
            );
        }
    }

    let windows = gateway.windows();
    let now = devfleet_protocol::now_ms();
    let window_s = gateway.config.window.window.as_secs_f64().max(0.001);
    e.single(
        "devfleet_error_rate_per_second",
        Kind::Gauge,
        "Error frames per second over the aggregation window.",
        windows.count(now, MetricType::Error.as_str()) as f64 / window_s,
    );
    e.single(
        "devfleet_gateway_series",
        Kind::Gauge,
        "Numeric series held in the aggregation windows.",
        windows.series() as f64,
    );
    e.single(
        "devfleet_gateway_series_dropped_total",
        Kind::Counter,
        "Numeric fields not aggregated because the series limit was reached.",
        windows.dropped_series() as f64,
    );
    drop(windows);

    let hub = &gateway.hub;
    e.single(
        "devfleet_gateway_connections",
        Kind::Gauge,
        "Open WebSocket connections.",
        hub.connected() as f64,
    );
    e.single(
        "devfleet_gateway_connections_accepted_total",
        Kind::Counter,
        "WebSocket connections accepted.",
        hub.counters.accepted.load(Ordering::Relaxed) as f64,
    );
    e.family(
        "devfleet_gateway_disconnects_total",
        Kind::Counter,
        "WebSocket connections ended, by reason.",
    );
    for r in DisconnectReason::ALL {
        e.sample(
            "devfleet_gateway_disconnects_total",
            &[("reason", r.as_str())],
            hub.counters.disconnects(r) as f64,
        );
    }
    e.family(
        "devfleet_gateway_refused_total",
        Kind::Counter,
        "Requests refused, by reason.",
    );
    for r in crate::http::Refusal::ALL {
        e.sample(
            "devfleet_gateway_refused_total",
            &[("reason", r.as_str())],
            gateway.refusals(r) as f64,
        );
    }
    e.single(
        "devfleet_gateway_frames_delivered_total",
        Kind::Counter,
        "Frames queued to clients (one per client per frame).",
        hub.counters.delivered.load(Ordering::Relaxed) as f64,
    );
    e.single(
        "devfleet_gateway_undecodable_total",
        Kind::Counter,
        "Broadcast messages that did not decode as envelopes.",
        gateway.counters.undecodable.load(Ordering::Relaxed) as f64,
    );
    e.single(
        "devfleet_gateway_poll_errors_total",
        Kind::Counter,
        "Store or bus reads of the poller that failed.",
        gateway.counters.poll_errors.load(Ordering::Relaxed) as f64,
    );
    e.single(
        "devfleet_gateway_last_poll_timestamp_seconds",
        Kind::Gauge,
        "When the poller last finished (Unix time; 0 before the first poll).",
        s.taken_ms as f64 / 1000.0,
    );
    e.finish()
}
