//! The state one gateway shares between its ingest, its poller, its
//! WebSocket connections and its HTTP handlers.
//!
//! Every lock here is a plain mutex held for a few microseconds and never
//! across an `.await`, so no client and no scrape can stall ingestion.

use crate::exposition::{Histogram, LATENCY_BUCKETS};
use crate::http::Refusal;
use crate::hub::Hub;
use crate::snapshot::{Canary, Snapshot};
use crate::window::Windows;
use crate::Config;
use devfleet_protocol::{metrics::WorkerStatus, MetricType};
use devfleet_runtime::Connections;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

/// Most distinct `stage` labels of the latency histogram; more fold into `other`.
const MAX_STAGES: usize = 32;
/// Most workers and deployments remembered from metric samples.
const MAX_LIVE_ENTRIES: usize = 1000;

/// Shared state of a running gateway.
pub struct Gateway {
    pub config: Config,
    pub connections: Connections,
    pub hub: Hub,
    pub windows: Mutex<Windows>,
    pub ingest: Mutex<IngestState>,
    pub counters: IngestCounters,
    refused: [AtomicU64; 3],
    snapshot: RwLock<Arc<Snapshot>>,
}

/// Counts kept by the ingest loops.
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Broadcast messages that did not decode as envelopes.
    pub undecodable: AtomicU64,
    /// Decoded envelopes on a metrics subject that were not metrics.
    pub unexpected: AtomicU64,
    /// Store/bus reads of the poller that failed.
    pub poll_errors: AtomicU64,
}

/// What ingestion learned from the stream, beyond the windows.
#[derive(Debug)]
pub struct IngestState {
    /// Frames ingested per metric type, since start.
    pub frames: BTreeMap<MetricType, u64>,
    /// Events ingested per kind, since start.
    pub events: BTreeMap<&'static str, u64>,
    /// Latency histograms per stage, from samples with `duration_ms`.
    pub durations: BTreeMap<String, Histogram>,
    /// Latest `worker_status` sample per instance: (at_ms, body).
    pub workers: HashMap<String, (i64, WorkerStatus)>,
    /// Latest `deployment` sample or `deploy.requested` event per
    /// deployment id: (at_ms, what it said).
    pub deployments: HashMap<String, (i64, Canary)>,
}

impl IngestState {
    pub(crate) fn new() -> Self {
        Self {
            frames: BTreeMap::new(),
            events: BTreeMap::new(),
            durations: BTreeMap::new(),
            workers: HashMap::new(),
            deployments: HashMap::new(),
        }
    }

    /// Records one duration in the stage's histogram.
    pub fn observe_duration(&mut self, stage: &str, seconds: f64) {
        let stage = if self.durations.contains_key(stage) || self.durations.len() < MAX_STAGES {
            stage
        } else {
            "other"
        };
        self.durations
            .entry(stage.to_owned())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(seconds);
    }

    /// Remembers the latest sample of a worker or deployment, bounded.
    pub fn remember<T>(map: &mut HashMap<String, (i64, T)>, key: &str, at_ms: i64, value: T) {
        if !map.contains_key(key) && map.len() >= MAX_LIVE_ENTRIES {
            // Evict the stalest entry: O(n) but only on a full map.
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(key.to_owned(), (at_ms, value));
    }

    /// Forgets samples older than `max_age`.
    pub fn expire(&mut self, now_ms: i64, max_age: Duration) {
        let cutoff = now_ms - i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        self.workers.retain(|_, (t, _)| *t >= cutoff);
        self.deployments.retain(|_, (t, _)| *t >= cutoff);
    }
}

impl Gateway {
    pub fn new(config: Config, shutdown: tokio_util::sync::CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            connections: config.connections.clone(),
            hub: Hub::new(config.client_queue, shutdown),
            windows: Mutex::new(Windows::new(config.window)),
            ingest: Mutex::new(IngestState::new()),
            counters: IngestCounters::default(),
            refused: Default::default(),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            config,
        })
    }

    pub fn windows(&self) -> MutexGuard<'_, Windows> {
        // Poisoning would need a panic inside window code; the data stays
        // consistent per call, so carry on with it.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ingest_state(&self) -> MutexGuard<'_, IngestState> {
        self.ingest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a refused request.
    pub fn refuse(&self, refusal: Refusal) {
        self.refused[refusal.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused for `refusal`, since start.
    pub fn refusals(&self, refusal: Refusal) -> u64 {
        self.refused[refusal.index()].load(Ordering::Relaxed)
    }

    /// The latest poll of the store and bus.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_snapshot(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    /// The store collection or counter name for `name` in this namespace
    /// (the same `namespace.name` rule the work queues follow).
    pub fn store_name(&self, name: &str) -> String {
        self.connections.queue(name)
    }
}
