//! The integration-stage contract between the scheduler, which sends a
//! plan's integration steps as shards and judges their results, and the
//! qa-workers that run them: [`shards`] (one work item per shard of each
//! step) and [`IntegrationTally`] (the verdict so far, idempotent per
//! shard). How a qa-worker runs a shard lives in the qa-worker.

use devfleet_protocol::plan::MAX_SHARDS;
use devfleet_protocol::{IntegrationResult, IntegrationStep, IntegrationWork};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The integration work a plan's steps make: one item per shard of each step.
///
/// A shard count over [`MAX_SHARDS`] (which a checked plan never has: a
/// plan stored before the limit, or a bug) counts as [`MAX_SHARDS`], so
/// no message can make the scheduler allocate billions of work items.
pub fn shards(plan_id: &str, steps: &[IntegrationStep]) -> Vec<IntegrationWork> {
    steps
        .iter()
        .flat_map(|step| {
            let count = step.shard.unwrap_or(1).clamp(1, MAX_SHARDS);
            (0..count).map(move |index| IntegrationWork {
                plan_id: plan_id.to_owned(),
                step: step.clone(),
                shard_index: index,
                shard_count: count,
            })
        })
        .collect()
}

/// The verdict of a plan's integration stage so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TallyState {
    /// Some shards have not reported.
    Pending { missing: usize },
    /// Every shard passed.
    Passed,
    /// Every shard reported and at least one failed.
    Failed,
}

/// Aggregates integration results for one plan: idempotent per (step,
/// shard), so redelivered results count once. Serialisable, but the
/// scheduler may as well rebuild it from the results it stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationTally {
    pub plan_id: String,
    /// (step name, shard index) → result; `None` until reported.
    expected: BTreeMap<String, Option<IntegrationResult>>,
}

fn slot_key(step: &str, shard: u32) -> String {
    format!("{step}#{shard}")
}

impl IntegrationTally {
    /// A tally expecting exactly these shards (as made by [`shards`]).
    pub fn new(plan_id: &str, work: &[IntegrationWork]) -> Self {
        Self {
            plan_id: plan_id.to_owned(),
            expected: work
                .iter()
                .map(|w| (slot_key(&w.step.name, w.shard_index), None))
                .collect(),
        }
    }

    /// Records a result; returns false (and changes nothing) for a result
    /// of another plan, of a shard not expected, or already recorded.
    pub fn record(&mut self, result: IntegrationResult) -> bool {
        if result.plan_id != self.plan_id {
            return false;
        }
        match self
            .expected
            .get_mut(&slot_key(&result.step, result.shard_index))
        {
            Some(slot @ None) => {
                *slot = Some(result);
                true
            }
            _ => false,
        }
    }

    pub fn state(&self) -> TallyState {
        let missing = self.expected.values().filter(|r| r.is_none()).count();
        if missing > 0 {
            TallyState::Pending { missing }
        } else if self.expected.values().flatten().all(|r| r.passed) {
            TallyState::Passed
        } else {
            TallyState::Failed
        }
    }

    /// The failed shards' results, in (step, shard) order.
    pub fn failures(&self) -> Vec<&IntegrationResult> {
        self.expected
            .values()
            .flatten()
            .filter(|r| !r.passed)
            .collect()
    }

    /// A message for the plan (and escalation) naming each failed shard
    /// with the end of its output, at most `max` bytes.
    pub fn failure_summary(&self, max: usize) -> String {
        let mut s = String::new();
        for r in self.failures() {
            let tail: String = {
                let lines: Vec<&str> = r.output.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            };
            s.push_str(&format!(
                "integration step '{}' shard {}/{} failed:\n{}\n",
                r.step,
                r.shard_index + 1,
                r.shard_count,
                tail
            ));
        }
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, shard: Option<u32>) -> IntegrationStep {
        IntegrationStep {
            requires: Vec::new(),
            name: name.into(),
            run: "python3 -m pytest -q".into(),
            shard,
            timeout_seconds: None,
        }
    }

    fn result(step: &str, shard: u32, count: u32, passed: bool) -> IntegrationResult {
        IntegrationResult {
            plan_id: "p".into(),
            step: step.into(),
            shard_index: shard,
            shard_count: count,
            passed,
            output: format!("out {step} {shard}"),
            duration_ms: 1,
        }
    }

    #[test]
    fn steps_become_one_work_item_per_shard() {
        let w = shards("p", &[step("unit", Some(3)), step("lint", None)]);
        assert_eq!(w.len(), 4);
        assert_eq!(
            w.iter()
                .map(|w| (w.step.name.as_str(), w.shard_index, w.shard_count))
                .collect::<Vec<_>>(),
            [
                ("unit", 0, 3),
                ("unit", 1, 3),
                ("unit", 2, 3),
                ("lint", 0, 1)
            ]
        );
    }

    #[test]
    fn an_unchecked_shard_count_is_capped_not_allocated() {
        let w = shards("p", &[step("unit", Some(u32::MAX))]);
        assert_eq!(w.len(), MAX_SHARDS as usize);
        assert!(w.iter().all(|w| w.shard_count == MAX_SHARDS));
    }

    #[test]
    fn tally_waits_for_every_shard_and_counts_each_once() {
        let work = shards("p", &[step("unit", Some(2)), step("lint", None)]);
        let mut t = IntegrationTally::new("p", &work);
        assert_eq!(t.state(), TallyState::Pending { missing: 3 });
        assert!(t.record(result("unit", 0, 2, true)));
        assert!(
            !t.record(result("unit", 0, 2, false)),
            "a duplicate changes nothing"
        );
        assert!(!t.record(result("other", 0, 1, true)), "unknown step");
        assert!(t.record(result("unit", 1, 2, true)));
        assert_eq!(t.state(), TallyState::Pending { missing: 1 });
        assert!(t.record(result("lint", 0, 1, false)));
        assert_eq!(t.state(), TallyState::Failed);
        assert!(t.failure_summary(1000).contains("'lint' shard 1/1"));
    }
}
