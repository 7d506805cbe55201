//! Memory-bounded time windows over metric samples: count, avg, min, max
//! and percentiles of every numeric field, per metric type.
//!
//! A window of `window` length is a ring of `buckets` time slices. Each
//! slice keeps exact count, sum, min and max, and a reservoir of at most
//! `reservoir` sample values (uniform reservoir sampling), so percentiles
//! are exact while a slice has seen no more than `reservoir` samples and
//! an unbiased estimate after. Slices older than the window are ignored
//! and reused. Memory is bounded by
//! `max_series × buckets × reservoir × 8` bytes plus the names, whatever the
//! sample rate: a field beyond `max_series` is not tracked (and counted in
//! [`Windows::dropped_series`]).
//!
//! Percentiles use the nearest-rank definition: p50 of `1..=100` is 50,
//! p95 is 95. Time is passed in (`now_ms`) so tests can move it.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Longest field name tracked; longer ones are skipped (they are not
/// metric fields but data that happens to be keyed).
const MAX_FIELD_NAME_BYTES: usize = 64;

/// Shape and bounds of the windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Length of the window.
    pub window: Duration,
    /// Time slices the window is cut into (the window slides by one slice).
    pub buckets: usize,
    /// Sample values kept per slice for percentiles.
    pub reservoir: usize,
    /// Most `(metric type, field)` series tracked at once.
    pub max_series: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            buckets: 12,
            reservoir: 128,
            max_series: 512,
        }
    }
}

impl WindowConfig {
    fn bucket_ms(&self) -> i64 {
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        (window_ms / self.buckets.max(1) as i64).max(1)
    }
}

/// Windowed summary of one numeric field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// Windowed summary of one metric type: how many samples, and each
/// numeric field's [`Summary`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeSummary {
    pub count: u64,
    pub fields: BTreeMap<String, Summary>,
}

/// Per-type sliding windows. Not thread-safe on its own; the gateway holds
/// it behind a mutex and never awaits while holding it.
#[derive(Debug)]
pub struct Windows {
    config: WindowConfig,
    types: BTreeMap<String, TypeWindow>,
    series: usize,
    dropped_series: u64,
}

#[derive(Debug)]
struct TypeWindow {
    counts: Vec<(i64, u64)>,
    fields: BTreeMap<String, Series>,
}

#[derive(Debug)]
struct Series {
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone)]
struct Bucket {
    /// Slice number (`now_ms / bucket_ms`); -1 when never used.
    epoch: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    reservoir: Vec<f64>,
    rng: u64,
}

impl Bucket {
    fn empty(seed: u64) -> Self {
        Self {
            epoch: -1,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            reservoir: Vec::new(),
            rng: seed | 1,
        }
    }

    fn reset(&mut self, epoch: i64) {
        self.epoch = epoch;
        self.count = 0;
        self.sum = 0.0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
        self.reservoir.clear();
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: plenty for reservoir sampling, no dependency.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn add(&mut self, value: f64, cap: usize) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if self.reservoir.len() < cap {
            self.reservoir.push(value);
        } else if cap > 0 {
            // Algorithm R: the n-th sample replaces a random slot with
            // probability cap/n, which keeps the reservoir uniform.
            let j = self.next_random() % self.count;
            if (j as usize) < cap {
                self.reservoir[j as usize] = value;
            }
        }
    }
}

impl Windows {
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            types: BTreeMap::new(),
            series: 0,
            dropped_series: 0,
        }
    }

    pub fn config(&self) -> WindowConfig {
        self.config
    }

    /// Series currently tracked.
    pub fn series(&self) -> usize {
        self.series
    }

    /// Fields not tracked because `max_series` was reached (since start).
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series
    }

    /// Records one sample of `metric_type` at `now_ms`: its count, and every
    /// finite numeric field of `data` (nested objects one level deep, as
    /// `outer.inner`).
    pub fn record(&mut self, now_ms: i64, metric_type: &str, data: &serde_json::Value) {
        let bucket_ms = self.config.bucket_ms();
        let epoch = now_ms.div_euclid(bucket_ms);
        let buckets = self.config.buckets.max(1);
        let tw = self
            .types
            .entry(metric_type.to_owned())
            .or_insert_with(|| TypeWindow {
                counts: vec![(-1, 0); buckets],
                fields: BTreeMap::new(),
            });
        let slot = &mut tw.counts[epoch.rem_euclid(buckets as i64) as usize];
        if slot.0 != epoch {
            *slot = (epoch, 0);
        }
        slot.1 += 1;

        let mut numeric = Vec::new();
        collect_numeric(data, "", 0, &mut numeric);
        for (field, value) in numeric {
            let known = tw.fields.contains_key(&field);
            if !known {
                if self.series >= self.config.max_series {
                    self.dropped_series += 1;
                    continue;
                }
                self.series += 1;
                let seed = seed_for(metric_type, &field);
                tw.fields.insert(
                    field.clone(),
                    Series {
                        buckets: vec![Bucket::empty(seed); buckets],
                    },
                );
            }
            if let Some(series) = tw.fields.get_mut(&field) {
                let bucket = &mut series.buckets[epoch.rem_euclid(buckets as i64) as usize];
                if bucket.epoch != epoch {
                    bucket.reset(epoch);
                }
                bucket.add(value, self.config.reservoir);
            }
        }
    }

    /// Summaries of every type with samples in the window ending at
    /// `now_ms`. `only` restricts the answer to some types.
    pub fn summary(&self, now_ms: i64, only: Option<&[&str]>) -> BTreeMap<String, TypeSummary> {
        let bucket_ms = self.config.bucket_ms();
        let newest = now_ms.div_euclid(bucket_ms);
        let oldest = newest - self.config.buckets.max(1) as i64 + 1;
        let live = |epoch: i64| epoch >= oldest && epoch <= newest;
        let mut out = BTreeMap::new();
        for (name, tw) in &self.types {
            if only.is_some_and(|o| !o.contains(&name.as_str())) {
                continue;
            }
            let count: u64 = tw
                .counts
                .iter()
                .filter(|(e, _)| live(*e))
                .map(|(_, c)| c)
                .sum();
            if count == 0 {
                continue;
            }
            let mut fields = BTreeMap::new();
            for (field, series) in &tw.fields {
                if let Some(s) = summarize(series.buckets.iter().filter(|b| live(b.epoch))) {
                    fields.insert(field.clone(), s);
                }
            }
            out.insert(name.clone(), TypeSummary { count, fields });
        }
        out
    }

    /// Samples of `metric_type` in the window ending at `now_ms`.
    pub fn count(&self, now_ms: i64, metric_type: &str) -> u64 {
        self.summary(now_ms, Some(&[metric_type]))
            .get(metric_type)
            .map_or(0, |s| s.count)
    }

    /// Forgets series with no sample in the window, so fields that stopped
    /// arriving free their room for new ones.
    pub fn prune(&mut self, now_ms: i64) {
        let bucket_ms = self.config.bucket_ms();
        let oldest = now_ms.div_euclid(bucket_ms) - self.config.buckets.max(1) as i64 + 1;
        let mut removed = 0;
        self.types.retain(|_, tw| {
            tw.fields.retain(|_, s| {
                let keep = s.buckets.iter().any(|b| b.epoch >= oldest && b.count > 0);
                if !keep {
                    removed += 1;
                }
                keep
            });
            !tw.fields.is_empty() || tw.counts.iter().any(|(e, c)| *e >= oldest && *c > 0)
        });
        self.series -= removed;
    }
}

fn seed_for(metric_type: &str, field: &str) -> u64 {
    // FNV-1a: a stable, cheap, non-zero seed per series.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in metric_type.bytes().chain([b'.']).chain(field.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn collect_numeric(
    value: &serde_json::Value,
    prefix: &str,
    depth: u8,
    out: &mut Vec<(String, f64)>,
) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    for (key, v) in map {
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if name.len() > MAX_FIELD_NAME_BYTES {
            continue;
        }
        match v {
            serde_json::Value::Number(n) => {
                if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                    out.push((name, f));
                }
            }
            serde_json::Value::Object(_) if depth == 0 => collect_numeric(v, &name, 1, out),
            _ => {}
        }
    }
}

fn summarize<'a>(buckets: impl Iterator<Item = &'a Bucket>) -> Option<Summary> {
    let mut count = 0u64;
    let mut sum = 0.0;
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    // (value, weight): each kept value stands for count/kept samples of its slice.
    let mut weighted: Vec<(f64, f64)> = Vec::new();
    for b in buckets {
        if b.count == 0 || b.reservoir.is_empty() {
            continue;
        }
        count += b.count;
        sum += b.sum;
        min = min.min(b.min);
        max = max.max(b.max);
        let weight = b.count as f64 / b.reservoir.len() as f64;
        weighted.extend(b.reservoir.iter().map(|&v| (v, weight)));
    }
    if count == 0 {
        return None;
    }
    weighted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    let pct = |q: f64| nearest_rank(&weighted, total, q);
    Some(Summary {
        count,
        avg: sum / count as f64,
        min,
        max,
        p50: pct(0.50),
        p95: pct(0.95),
        p99: pct(0.99),
    })
}

/// The smallest value whose cumulative weight reaches `q` of the total.
fn nearest_rank(sorted: &[(f64, f64)], total: f64, q: f64) -> f64 {
    let target = (q * total).max(f64::MIN_POSITIVE);
    let mut cumulative = 0.0;
    for &(value, weight) in sorted {
        cumulative += weight;
        // Tolerance for float error in q × total (0.95 × 100 is 94.999…).
        if cumulative >= target - 1e-9 {
            return value;
        }
    }
    sorted.last().map_or(0.0, |(v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> WindowConfig {
        WindowConfig {
            window: Duration::from_secs(10),
            buckets: 10,
            reservoir: 128,
            max_series: 8,
        }
    }

    #[test]
    fn exact_statistics_of_known_samples() {
        let mut w = Windows::new(config());
        for v in 1..=100 {
            w.record(
                1_000,
                "performance",
                &json!({ "duration_ms": v, "stage": "dev" }),
            );
        }
        let s = &w.summary(1_500, None)["performance"];
        assert_eq!(s.count, 100);
        let d = &s.fields["duration_ms"];
        assert_eq!(d.count, 100);
        assert_eq!(d.avg, 50.5);
        assert_eq!((d.min, d.max), (1.0, 100.0));
        assert_eq!((d.p50, d.p95, d.p99), (50.0, 95.0, 99.0));
        assert!(
            !s.fields.contains_key("stage"),
            "strings are not aggregated"
        );
    }

    #[test]
    fn samples_leave_the_window_as_time_moves() {
        let mut w = Windows::new(config());
        w.record(0, "error", &json!({ "n": 1 }));
        w.record(5_000, "error", &json!({ "n": 3 }));
        assert_eq!(w.count(9_999, "error"), 2);
        let s = &w.summary(9_999, None)["error"].fields["n"];
        assert_eq!(s.avg, 2.0);
        // At 10 s the first slice [0, 1 s) has left the 10 s window.
        assert_eq!(w.count(10_000, "error"), 1);
        assert_eq!(w.summary(10_000, None)["error"].fields["n"].avg, 3.0);
        assert!(w.summary(20_000, None).is_empty());
    }

    #[test]
    fn reused_slices_forget_their_old_samples() {
        let mut w = Windows::new(config());
        w.record(0, "performance", &json!({ "x": 100 }));
        // Same ring slot ten slices later.
        w.record(10_000, "performance", &json!({ "x": 1 }));
        let s = &w.summary(10_000, None)["performance"].fields["x"];
        assert_eq!((s.count, s.max), (1, 1.0));
    }

    #[test]
    fn memory_stays_bounded_under_many_samples() {
        let mut w = Windows::new(WindowConfig {
            reservoir: 16,
            ..config()
        });
        for i in 0..100_000u64 {
            w.record(0, "performance", &json!({ "x": i % 1000 }));
        }
        let series = &w.types["performance"].fields["x"];
        assert!(series.buckets.iter().all(|b| b.reservoir.len() <= 16));
        let s = &w.summary(0, None)["performance"].fields["x"];
        assert_eq!(s.count, 100_000);
        assert_eq!((s.min, s.max), (0.0, 999.0));
        assert!((s.avg - 499.5).abs() < 1e-6);
        // An estimate now; a uniform reservoir keeps it in range.
        assert!(s.p50 >= 0.0 && s.p50 <= 999.0);
    }

    #[test]
    fn series_beyond_the_limit_are_dropped_and_counted() {
        let mut w = Windows::new(config());
        let mut data = serde_json::Map::new();
        for i in 0..10 {
            data.insert(format!("f{i}"), json!(i));
        }
        w.record(0, "performance", &serde_json::Value::Object(data));
        assert_eq!(w.series(), 8);
        assert_eq!(w.dropped_series(), 2);
        w.prune(60_000);
        assert_eq!(w.series(), 0);
        assert!(w.summary(60_000, None).is_empty());
    }

    #[test]
    fn nested_fields_are_flattened_once_and_non_finite_skipped() {
        let mut w = Windows::new(config());
        w.record(
            0,
            "system_health",
            &json!({ "cpu": { "load": 0.5, "deep": { "x": 1 } }, "list": [1, 2] }),
        );
        let s = &w.summary(0, None)["system_health"];
        assert_eq!(s.fields.keys().collect::<Vec<_>>(), vec!["cpu.load"]);
    }

    #[test]
    fn only_filter_restricts_types() {
        let mut w = Windows::new(config());
        w.record(0, "error", &json!({}));
        w.record(0, "performance", &json!({}));
        let s = w.summary(0, Some(&["error"]));
        assert_eq!(s.keys().collect::<Vec<_>>(), vec!["error"]);
        assert_eq!(s["error"].count, 1);
    }
}
