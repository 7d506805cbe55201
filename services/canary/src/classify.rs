//! Turning a health reading into a verdict with the deployment's thresholds.
//!
//! * unhealthy: error rate over `rollback_error_rate`, or p95 over
//!   `max_latency_ms` → automatic rollback at once;
//! * degraded: error rate from `degraded_error_rate` up to
//!   `rollback_error_rate` → the stage holds;
//! * inconclusive: no requests in the interval → the stage holds (nothing
//!   to judge, so neither promote blind nor roll back a quiet service);
//! * healthy otherwise → the stage may advance once its time is up.

use crate::health::Reading;
use crate::record::Classification;
use devfleet_protocol::Thresholds;

/// A classification and the reason for it, in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub classification: Classification,
    pub detail: String,
}

/// Classifies one interval.
pub fn classify(reading: &Reading, thresholds: &Thresholds) -> Verdict {
    let verdict = |classification, detail: String| Verdict {
        classification,
        detail,
    };
    if reading.baseline_only {
        return verdict(
            Classification::Baseline,
            "first read: counters recorded as the baseline".into(),
        );
    }
    if let Some(rate) = reading.error_rate {
        if rate > thresholds.rollback_error_rate {
            return verdict(
                Classification::Unhealthy,
                format!(
                    "error rate {} over the rollback threshold {}",
                    pct(rate),
                    pct(thresholds.rollback_error_rate)
                ),
            );
        }
    }
    if let Some(p95) = reading.latency_p95_ms {
        if p95 > thresholds.max_latency_ms {
            return verdict(
                Classification::Unhealthy,
                format!(
                    "p95 latency {p95:.1} ms over the limit {} ms",
                    thresholds.max_latency_ms
                ),
            );
        }
    }
    let Some(rate) = reading.error_rate else {
        return verdict(
            Classification::Inconclusive,
            "no requests in the interval".into(),
        );
    };
    if rate >= thresholds.degraded_error_rate {
        return verdict(
            Classification::Degraded,
            format!(
                "error rate {} at or over the degraded threshold {}",
                pct(rate),
                pct(thresholds.degraded_error_rate)
            ),
        );
    }
    let latency = reading
        .latency_p95_ms
        .map(|p| format!(", p95 {p:.1} ms"))
        .unwrap_or_default();
    verdict(
        Classification::Healthy,
        format!("error rate {}{latency}", pct(rate)),
    )
}

/// A ratio as a percentage with two decimals.
pub fn pct(ratio: f64) -> String {
    format!("{:.2}%", ratio * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(rate: Option<f64>, p95: Option<f64>) -> Reading {
        Reading {
            error_rate: rate,
            latency_p95_ms: p95,
            requests: Some(100),
            ..Reading::default()
        }
    }

    fn class(rate: Option<f64>, p95: Option<f64>) -> Classification {
        classify(&reading(rate, p95), &Thresholds::default()).classification
    }

    #[test]
    fn thresholds_of_the_design() {
        assert_eq!(class(Some(0.0), Some(10.0)), Classification::Healthy);
        assert_eq!(class(Some(0.049), Some(10.0)), Classification::Healthy);
        assert_eq!(class(Some(0.05), Some(10.0)), Classification::Degraded);
        assert_eq!(class(Some(0.10), Some(10.0)), Classification::Degraded);
        assert_eq!(class(Some(0.101), Some(10.0)), Classification::Unhealthy);
        assert_eq!(class(Some(0.2), None), Classification::Unhealthy);
    }

    #[test]
    fn latency_over_the_limit_is_unhealthy_even_without_errors() {
        assert_eq!(class(Some(0.0), Some(200.0)), Classification::Healthy);
        let v = classify(&reading(Some(0.0), Some(250.0)), &Thresholds::default());
        assert_eq!(v.classification, Classification::Unhealthy);
        assert!(v.detail.contains("250.0 ms"), "{}", v.detail);
        // Degraded errors plus slow: the worse verdict wins.
        assert_eq!(class(Some(0.07), Some(500.0)), Classification::Unhealthy);
    }

    #[test]
    fn no_traffic_is_inconclusive_and_baseline_is_baseline() {
        assert_eq!(class(None, None), Classification::Inconclusive);
        let r = Reading {
            baseline_only: true,
            ..Reading::default()
        };
        assert_eq!(
            classify(&r, &Thresholds::default()).classification,
            Classification::Baseline
        );
    }

    #[test]
    fn unhealthy_detail_names_rate_and_threshold() {
        let v = classify(&reading(Some(0.2), Some(1.0)), &Thresholds::default());
        assert_eq!(
            v.detail,
            "error rate 20.00% over the rollback threshold 10.00%"
        );
    }
}
