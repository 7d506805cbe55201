//! Reading health: error rate and p95 latency over one check interval.
//!
//! Two sources (see `docs/CANARY.md` for the exact shapes):
//!
//! * an HTTP JSON endpoint with **cumulative** counters,
//!   `{"requests": N, "errors": N, "latency_p95_ms": X}` and/or
//!   `"latency_buckets_ms": {"5": N, "10": N, …, "+Inf": N}`. The interval's
//!   error rate comes from the counter deltas against the previous read
//!   (the baseline, kept in the deployment record); with buckets the p95 is
//!   computed from the bucket deltas too, so it covers the interval only.
//!   A counter that went down means the service restarted: the new value is
//!   taken as the delta, as Prometheus's `rate()` does.
//! * Prometheus's query API: the two configured PromQL queries, each
//!   expected to give one number (`{deployment}` and `{interval}` in them
//!   are replaced first).
//!
//! Both come from the plan, so every request goes through the operator's
//! allow-list of networks ([`crate::egress`]).

use crate::egress::AllowList;
use crate::handler::error_chain;
use crate::record::{Bucket, Counters};
use devfleet_protocol::HealthSource;
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest health response read, in bytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What one read of a health source measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reading {
    /// Errors / requests over the interval; `None` when there were no
    /// requests (or Prometheus answered NaN).
    pub error_rate: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    /// Requests in the interval (counter endpoints only).
    pub requests: Option<u64>,
    /// The counters just read: the baseline of the next interval.
    pub counters: Option<Counters>,
    /// True when there was no baseline yet: this read only sets it.
    pub baseline_only: bool,
}

/// Why a health source could not be read. Variants name the URL or query.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HealthError {
    #[error("GET {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} gave an unusable answer: {reason}")]
    Invalid { url: String, reason: String },
    #[error("Prometheus query '{query}': {reason}")]
    Query { query: String, reason: String },
}

/// Placeholder values for Prometheus queries.
#[derive(Debug, Clone)]
pub struct QueryContext<'a> {
    pub deployment: &'a str,
    pub check_seconds: u64,
}

/// Reads health sources over HTTP. Cheap to clone.
#[derive(Clone)]
pub struct HealthClient {
    http: reqwest::Client,
    allow: AllowList,
    timeout: Duration,
}

impl HealthClient {
    /// A client whose reads give up after `timeout` and connect only to
    /// addresses in `allow`.
    pub fn new(timeout: Duration, allow: AllowList) -> anyhow::Result<Self> {
        let http = allow.client(timeout)?;
        Ok(Self {
            http,
            allow,
            timeout,
        })
    }

    /// Reads `source` once. For a counter endpoint, `previous` is the
    /// baseline; without one the reading only sets it.
    pub async fn read(
        &self,
        source: &HealthSource,
        ctx: &QueryContext<'_>,
        previous: Option<&Counters>,
    ) -> Result<Reading, HealthError> {
        // A read must not outlast its interval, or checks would pile up.
        let timeout = self
            .timeout
            .min(Duration::from_secs(ctx.check_seconds.max(1)));
        match source {
            HealthSource::Url { url } => {
                let body = self.get(url, timeout).await?;
                let counters = parse_counters(&body).map_err(|reason| HealthError::Invalid {
                    url: url.clone(),
                    reason,
                })?;
                Ok(interval_reading(previous, counters.0, counters.1))
            }
            HealthSource::Prometheus {
                prometheus,
                error_rate: error_rate_query,
                latency_p95_ms,
            } => {
                let errors_query = substitute(error_rate_query, ctx);
                let latency_query = substitute(latency_p95_ms, ctx);
                let (errors, latency) = tokio::join!(
                    self.prom_query(prometheus, &errors_query, timeout),
                    self.prom_query(prometheus, &latency_query, timeout),
                );
                let error_rate = errors?;
                let latency = latency?;
                if let Some(rate) = error_rate {
                    if !(0.0..=1.0).contains(&rate) {
                        return Err(HealthError::Query {
                            query: errors_query,
                            reason: format!(
                                "error rate {rate} is not a ratio in 0..=1 (divide errors by requests)"
                            ),
                        });
                    }
                }
                Ok(Reading {
                    error_rate,
                    latency_p95_ms: latency,
                    ..Reading::default()
                })
            }
        }
    }

    async fn get(&self, url: &str, timeout: Duration) -> Result<Vec<u8>, HealthError> {
        let request_error = |e: reqwest::Error| HealthError::Request {
            url: url.to_owned(),
            reason: error_chain(&e),
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| HealthError::Request {
            url: url.to_owned(),
            reason: format!("not a URL: {e}"),
        })?;
        self.allow
            .check_url(&parsed)
            .map_err(|reason| HealthError::Request {
                url: url.to_owned(),
                reason,
            })?;
        let mut response = self
            .http
            .get(parsed)
            .timeout(timeout)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(HealthError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(HealthError::Invalid {
                    url: url.to_owned(),
                    reason: format!("response larger than {MAX_BODY_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// One instant query; `Ok(None)` when Prometheus answered NaN (no data
    /// in the window, e.g. 0/0 without traffic).
    async fn prom_query(
        &self,
        base: &str,
        query: &str,
        timeout: Duration,
    ) -> Result<Option<f64>, HealthError> {
        let fail = |reason: String| HealthError::Query {
            query: query.to_owned(),
            reason,
        };
        let mut url = reqwest::Url::parse(base)
            .map_err(|e| fail(format!("bad Prometheus URL '{base}': {e}")))?;
        {
            let mut path = url.path().trim_end_matches('/').to_owned();
            path.push_str("/api/v1/query");
            url.set_path(&path);
        }
        url.query_pairs_mut().append_pair("query", query);
        self.allow
            .check_url(&url)
            .map_err(|reason| fail(format!("GET {base} refused: {reason}")))?;
        let response = self
            .http
            .get(url.clone())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| fail(format!("GET {base} failed: {}", error_chain(&e))))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| fail(format!("reading the answer failed: {}", error_chain(&e))))?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            fail(format!(
                "HTTP {} with a body that is not JSON: {e}",
                status.as_u16()
            ))
        })?;
        prom_scalar(&value).map_err(fail)
    }
}

/// Replaces `{deployment}` and `{interval}` (the check interval, e.g. `30s`).
pub fn substitute(query: &str, ctx: &QueryContext<'_>) -> String {
    query
        .replace("{deployment}", ctx.deployment)
        .replace("{interval}", &format!("{}s", ctx.check_seconds.max(1)))
}

/// The single number of a Prometheus query answer (a one-sample vector or
/// a scalar); `None` for NaN.
fn prom_scalar(answer: &serde_json::Value) -> Result<Option<f64>, String> {
    if answer.get("status").and_then(|s| s.as_str()) != Some("success") {
        let error = answer
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no error message");
        return Err(format!("Prometheus refused it: {error}"));
    }
    let data = answer
        .get("data")
        .ok_or("answer has no 'data'".to_owned())?;
    let kind = data
        .get("resultType")
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let result = data.get("result").ok_or("answer has no 'data.result'")?;
    let sample = match kind {
        "scalar" => result,
        "vector" => {
            let series = result.as_array().ok_or("'data.result' is not a list")?;
            match series.as_slice() {
                [] => {
                    return Err(
                        "no data (the query matched no series; check metric names and labels)"
                            .into(),
                    )
                }
                [one] => one.get("value").ok_or("series has no 'value'")?,
                many => {
                    return Err(format!(
                        "{} series; the query must give one number (wrap it in sum(...))",
                        many.len()
                    ))
                }
            }
        }
        other => {
            return Err(format!(
                "result type '{other}'; expected a vector or a scalar"
            ))
        }
    };
    let text = sample
        .get(1)
        .and_then(|v| v.as_str())
        .ok_or("sample is not [time, \"value\"]")?;
    let number: f64 = text
        .parse()
        .map_err(|_| format!("sample value '{text}' is not a number"))?;
    if number.is_nan() {
        return Ok(None);
    }
    if number.is_infinite() || number < 0.0 {
        return Err(format!("sample value {number} is not usable"));
    }
    Ok(Some(number))
}

#[derive(serde::Deserialize)]
struct CounterDoc {
    requests: u64,
    errors: u64,
    #[serde(default)]
    latency_p95_ms: Option<f64>,
    #[serde(default)]
    latency_buckets_ms: Option<BTreeMap<String, u64>>,
}

/// Parses a counter document: the counters and the endpoint's own p95.
fn parse_counters(body: &[u8]) -> Result<(Counters, Option<f64>), String> {
    let doc: CounterDoc = serde_json::from_slice(body).map_err(|e| {
        format!("expected {{\"requests\": N, \"errors\": N, \"latency_p95_ms\": X}}: {e}")
    })?;
    if doc.errors > doc.requests {
        return Err(format!(
            "errors ({}) exceed requests ({})",
            doc.errors, doc.requests
        ));
    }
    if let Some(p95) = doc.latency_p95_ms {
        if !(p95.is_finite() && p95 >= 0.0) {
            return Err(format!("latency_p95_ms {p95} is not a duration"));
        }
    }
    let mut buckets = Vec::new();
    if let Some(raw) = &doc.latency_buckets_ms {
        for (bound, &count) in raw {
            let le_ms = match bound.trim() {
                "+Inf" | "Inf" | "inf" | "+inf" => None,
                b => match b.parse::<f64>() {
                    Ok(v) if v.is_finite() && v >= 0.0 => Some(v),
                    _ => {
                        return Err(format!(
                            "latency_buckets_ms key '{bound}' is not a bound in ms or '+Inf'"
                        ))
                    }
                },
            };
            buckets.push(Bucket { le_ms, count });
        }
        buckets.sort_by(|a, b| match (a.le_ms, b.le_ms) {
            (None, None) => std::cmp::Ordering::Equal,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(_), None) => std::cmp::Ordering::Less,
            (Some(x), Some(y)) => x.total_cmp(&y),
        });
        if buckets.windows(2).any(|w| w[0].count > w[1].count) {
            return Err(
                "latency_buckets_ms must be cumulative (counts never fall as bounds rise)".into(),
            );
        }
    }
    if doc.latency_p95_ms.is_none() && buckets.is_empty() {
        return Err("neither latency_p95_ms nor latency_buckets_ms is present".into());
    }
    Ok((
        Counters {
            requests: doc.requests,
            errors: doc.errors,
            buckets,
        },
        doc.latency_p95_ms,
    ))
}

/// The interval's reading from the previous and current counters.
fn interval_reading(
    previous: Option<&Counters>,
    current: Counters,
    reported_p95: Option<f64>,
) -> Reading {
    let Some(prev) = previous else {
        return Reading {
            counters: Some(current),
            baseline_only: true,
            ..Reading::default()
        };
    };
    let reset = current.requests < prev.requests || current.errors < prev.errors;
    let (requests, errors) = if reset {
        (current.requests, current.errors)
    } else {
        (
            current.requests - prev.requests,
            current.errors - prev.errors,
        )
    };
    let error_rate = (requests > 0).then(|| errors as f64 / requests as f64);
    let latency_p95_ms = if current.buckets.is_empty() {
        reported_p95
    } else {
        let same_bounds = prev.buckets.len() == current.buckets.len()
            && prev
                .buckets
                .iter()
                .zip(&current.buckets)
                .all(|(a, b)| a.le_ms == b.le_ms && a.count <= b.count);
        let delta: Vec<Bucket> = if same_bounds && !reset {
            prev.buckets
                .iter()
                .zip(&current.buckets)
                .map(|(a, b)| Bucket {
                    le_ms: b.le_ms,
                    count: b.count - a.count,
                })
                .collect()
        } else {
            current.buckets.clone()
        };
        quantile(0.95, &delta).or(if requests > 0 { reported_p95 } else { None })
    };
    Reading {
        error_rate,
        latency_p95_ms,
        requests: Some(requests),
        counters: Some(current),
        baseline_only: false,
    }
}

/// The `q` quantile of cumulative buckets, interpolated linearly within
/// the bucket as Prometheus's `histogram_quantile` does; `None` without
/// observations. A rank in the `+Inf` bucket gives the highest finite bound.
pub fn quantile(q: f64, buckets: &[Bucket]) -> Option<f64> {
    let total = buckets.last()?.count;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for bucket in buckets {
        if bucket.count as f64 >= rank {
            let Some(upper) = bucket.le_ms else {
                return Some(lower);
            };
            if bucket.count == below {
                return Some(upper);
            }
            let fraction = (rank - below as f64) / (bucket.count - below) as f64;
            return Some(lower + (upper - lower) * fraction);
        }
        if let Some(upper) = bucket.le_ms {
            lower = upper;
        }
        below = bucket.count;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(le: Option<f64>, count: u64) -> Bucket {
        Bucket { le_ms: le, count }
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        // 100 observations: 50 <= 10 ms, 100 <= 100 ms.
        let buckets = [b(Some(10.0), 50), b(Some(100.0), 100), b(None, 100)];
        // rank 95 lies 45/50 of the way from 10 to 100.
        assert!((quantile(0.95, &buckets).unwrap() - 91.0).abs() < 1e-9);
        assert!((quantile(0.5, &buckets).unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(quantile(0.95, &[b(Some(10.0), 0), b(None, 0)]), None);
        // Everything beyond the last finite bound: that bound.
        assert_eq!(
            quantile(0.95, &[b(Some(10.0), 1), b(None, 100)]),
            Some(10.0)
        );
    }

    #[test]
    fn counters_parse_with_buckets_or_p95() {
        let (c, p95) = parse_counters(
            br#"{"requests": 10, "errors": 1, "latency_buckets_ms": {"+Inf": 10, "100": 9, "5": 2}}"#,
        )
        .unwrap();
        assert_eq!(p95, None);
        assert_eq!(
            c.buckets,
            vec![b(Some(5.0), 2), b(Some(100.0), 9), b(None, 10)]
        );
        let (_, p95) =
            parse_counters(br#"{"requests": 10, "errors": 0, "latency_p95_ms": 12.5, "extra": 1}"#)
                .unwrap();
        assert_eq!(p95, Some(12.5));
    }

    #[test]
    fn bad_counter_documents_say_why() {
        for (body, needle) in [
            (&br#"{"requests": 1}"#[..], "errors"),
            (
                br#"{"requests": 1, "errors": 2, "latency_p95_ms": 1}"#,
                "exceed",
            ),
            (br#"{"requests": 1, "errors": 0}"#, "neither"),
            (
                br#"{"requests": 1, "errors": 0, "latency_buckets_ms": {"5": 3, "+Inf": 1}}"#,
                "cumulative",
            ),
            (
                br#"{"requests": 1, "errors": 0, "latency_buckets_ms": {"fast": 1}}"#,
                "fast",
            ),
        ] {
            let err = parse_counters(body).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn interval_uses_counter_deltas() {
        let prev = Counters {
            requests: 1000,
            errors: 10,
            buckets: vec![b(Some(10.0), 990), b(Some(500.0), 1000), b(None, 1000)],
        };
        // 100 new requests, 20 errors, all slow (10..500 ms).
        let cur = Counters {
            requests: 1100,
            errors: 30,
            buckets: vec![b(Some(10.0), 990), b(Some(500.0), 1100), b(None, 1100)],
        };
        let r = interval_reading(Some(&prev), cur.clone(), Some(1.0));
        assert_eq!(r.requests, Some(100));
        assert!((r.error_rate.unwrap() - 0.2).abs() < 1e-9);
        // Interval p95 from deltas: 10 + 490 * 0.95 = 475.5, not the
        // cumulative view (which would be ~10) nor the reported 1.0.
        assert!((r.latency_p95_ms.unwrap() - 475.5).abs() < 1e-9);
        assert_eq!(r.counters, Some(cur));
        assert!(!r.baseline_only);
    }

    #[test]
    fn first_read_is_a_baseline_and_idle_interval_has_no_rate() {
        let c = Counters {
            requests: 5,
            errors: 0,
            buckets: vec![],
        };
        let r = interval_reading(None, c.clone(), Some(3.0));
        assert!(r.baseline_only);
        assert_eq!(r.error_rate, None);
        let idle = interval_reading(Some(&c), c.clone(), Some(3.0));
        assert_eq!(idle.requests, Some(0));
        assert_eq!(idle.error_rate, None);
        assert_eq!(idle.latency_p95_ms, Some(3.0));
    }

    #[test]
    fn counter_reset_counts_from_zero() {
        let prev = Counters {
            requests: 1000,
            errors: 100,
            buckets: vec![],
        };
        let cur = Counters {
            requests: 50,
            errors: 5,
            buckets: vec![],
        };
        let r = interval_reading(Some(&prev), cur, Some(2.0));
        assert_eq!(r.requests, Some(50));
        assert!((r.error_rate.unwrap() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn prometheus_answers() {
        let vector = |v: &str| {
            serde_json::json!({"status":"success","data":{"resultType":"vector",
                "result":[{"metric":{},"value":[1.5, v]}]}})
        };
        assert_eq!(prom_scalar(&vector("0.25")).unwrap(), Some(0.25));
        assert_eq!(prom_scalar(&vector("NaN")).unwrap(), None);
        let scalar = serde_json::json!({"status":"success","data":{"resultType":"scalar","result":[1.5,"7"]}});
        assert_eq!(prom_scalar(&scalar).unwrap(), Some(7.0));
        let empty =
            serde_json::json!({"status":"success","data":{"resultType":"vector","result":[]}});
        assert!(prom_scalar(&empty).unwrap_err().contains("no data"));
        let two = serde_json::json!({"status":"success","data":{"resultType":"vector",
            "result":[{"value":[1,"1"]},{"value":[1,"2"]}]}});
        assert!(prom_scalar(&two).unwrap_err().contains("sum("));
        let error = serde_json::json!({"status":"error","error":"parse error at char 3"});
        assert!(prom_scalar(&error).unwrap_err().contains("parse error"));
    }

    #[test]
    fn placeholders_are_substituted() {
        let ctx = QueryContext {
            deployment: "web-1",
            check_seconds: 30,
        };
        assert_eq!(
            substitute(r#"rate(x{app="{deployment}"}[{interval}])"#, &ctx),
            r#"rate(x{app="web-1"}[30s])"#
        );
    }
}
