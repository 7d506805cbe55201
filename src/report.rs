//! The final report of a plan and the live progress bar, shared by
//! `devfleet up` and `devfleet publish --wait`.

use devfleet_protocol::PlanAnalyzed;
use devfleet_runtime::Connections;
use devfleet_store::{BudgetState, PlanRecord, PlanUsage, UsageTotals};
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt::Write as _;
use std::time::Duration;

/// Everything worth knowing once a plan has ended.
#[derive(Debug, serde::Serialize)]
pub struct PlanReport {
    pub plan: PlanRecord,
    pub tasks: usize,
    /// Claims made over all tasks (1 per task when nothing was retried).
    pub attempts: u32,
    /// Tasks that needed more than one attempt.
    pub retried: usize,
    pub cache_hits: i64,
    pub cache_misses: i64,
    /// Tokens and cost of the plan's executor runs, in total, per model
    /// and per task (cache hits ran no executor and count nothing).
    pub usage: PlanUsage,
    /// The plan's budget: limits, spent, reserved by running work.
    pub budget: BudgetState,
    /// Dead-letter entries of this plan.
    pub dead_letters: Vec<String>,
    /// From submission to the final status.
    pub makespan_ms: i64,
    /// Files on the critical path and their summed estimates.
    pub critical_path_files: usize,
    pub critical_path_length: u64,
    /// Topological layers: the fewest sequential steps any schedule needs.
    pub depth: u32,
    /// Outcome of the integration stage, when the plan has one.
    pub integration: Option<String>,
    /// Outcome of the canary rollout, when the plan has one.
    pub canary: Option<String>,
}

impl PlanReport {
    /// Reads the report of `plan_id` from the store.
    pub async fn load(connections: &Connections, plan_id: &str) -> anyhow::Result<PlanReport> {
        let store = &connections.store;
        let plan = store
            .plan(plan_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no plan '{plan_id}'"))?;
        let tasks = store.tasks(plan_id).await?;
        let analyzed: Option<PlanAnalyzed> = serde_json::from_str(&plan.detail).ok();
        let (critical_path_files, critical_path_length, depth) = analyzed
            .as_ref()
            .map(|a| {
                (
                    a.critical_path.len(),
                    a.critical_path_length,
                    a.tasks.iter().map(|t| t.batch + 1).max().unwrap_or(0),
                )
            })
            .unwrap_or_default();
        let has_integration = analyzed
            .as_ref()
            .is_some_and(|a| !a.plan.integration.is_empty());
        let dead_letters = store
            .kv_list("dlq")
            .await?
            .into_iter()
            .filter_map(|(id, json)| {
                let v: serde_json::Value = serde_json::from_str(&json).ok()?;
                (v.get("plan_id")?.as_str()? == plan_id).then(|| {
                    let path = v.get("path").and_then(|p| p.as_str()).unwrap_or("-");
                    let reason = v.get("reason").and_then(|r| r.as_str()).unwrap_or("");
                    format!("{id} {path}: {reason}")
                })
            })
            .collect();
        let canary = store
            .kv_list("canary")
            .await?
            .into_iter()
            .find_map(|(id, json)| {
                let v: serde_json::Value = serde_json::from_str(&json).ok()?;
                (v.get("plan_id")?.as_str()? == plan_id).then(|| {
                    let status = v.get("status").and_then(|s| s.as_str()).unwrap_or("?");
                    let weight = v.get("weight").and_then(|w| w.as_u64()).unwrap_or(0);
                    format!("deployment {id}: {status} at {weight} %")
                })
            });
        let integration = if has_integration {
            let shards: usize = analyzed
                .as_ref()
                .map(|a| {
                    a.plan
                        .integration
                        .iter()
                        .map(|step| step.shard.unwrap_or(1).max(1) as usize)
                        .sum()
                })
                .unwrap_or(0);
            let results = store
                .kv_list(&devfleet_scheduler::integration::results_collection(
                    plan_id,
                ))
                .await?;
            let failed: Vec<String> = results
                .iter()
                .filter_map(|(key, json)| {
                    let v: serde_json::Value = serde_json::from_str(json).ok()?;
                    (!v.get("passed")?.as_bool()?).then(|| key.clone())
                })
                .collect();
            Some(if !failed.is_empty() {
                format!("failed: {}", failed.join(", "))
            } else if results.is_empty() {
                if plan.status.is_final() {
                    "not run".to_owned()
                } else {
                    "pending".to_owned()
                }
            } else if results.len() >= shards {
                format!("passed ({} shards)", results.len())
            } else {
                format!("running ({}/{shards} shards reported)", results.len())
            })
        } else {
            None
        };
        Ok(PlanReport {
            tasks: tasks.len(),
            attempts: tasks.iter().map(|t| t.attempt).sum(),
            retried: tasks.iter().filter(|t| t.attempt > 1).count(),
            cache_hits: store.counter(&format!("cache_hits:{plan_id}")).await?,
            cache_misses: store.counter(&format!("cache_misses:{plan_id}")).await?,
            usage: store.plan_usage(plan_id).await?,
            budget: store.budget(plan_id).await?,
            dead_letters,
            makespan_ms: plan.updated_ms - plan.created_ms,
            critical_path_files,
            critical_path_length,
            depth,
            integration,
            canary,
            plan,
        })
    }
}

impl std::fmt::Display for PlanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plan;
        let mut out = String::new();
        let _ = writeln!(out, "plan {} ({}): {}", p.id, p.name, p.status.as_str());
        if let Some(m) = &p.message {
            let _ = writeln!(out, "  {m}");
        }
        let _ = writeln!(
            out,
            "  tasks       {} done, {} failed, {} blocked of {}",
            p.done, p.failed, p.blocked, self.tasks
        );
        let _ = writeln!(
            out,
            "  attempts    {} ({} tasks retried or fixed)",
            self.attempts, self.retried
        );
        let _ = writeln!(
            out,
            "  cache       {} hits, {} misses",
            self.cache_hits, self.cache_misses
        );
        let _ = write!(out, "{}", usage_lines(&self.usage));
        if self.budget.limits.is_some() {
            for line in crate::budget::describe(&p.id, &self.budget).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(
            out,
            "  makespan    {:.2} s; critical path {} files (estimate {}), depth {} layers",
            self.makespan_ms as f64 / 1000.0,
            self.critical_path_files,
            self.critical_path_length,
            self.depth
        );
        if let Some(i) = &self.integration {
            let _ = writeln!(out, "  integration {i}");
        }
        if let Some(c) = &self.canary {
            let _ = writeln!(out, "  canary      {c}");
        }
        let _ = writeln!(out, "  dead letters {}", self.dead_letters.len());
        for d in &self.dead_letters {
            let _ = writeln!(out, "    {d}");
        }
        f.write_str(out.trim_end())
    }
}

/// `N tokens (in/out), $cost, C calls` of some totals.
pub fn usage_summary(t: &UsageTotals) -> String {
    let mut s = format!(
        "{} tokens ({} in, {} out), ${:.6}, {} calls",
        t.tokens(),
        t.tokens_in,
        t.tokens_out,
        t.cost_usd(),
        t.calls
    );
    if t.estimated > 0 {
        let _ = write!(s, " ({} estimated)", t.estimated);
    }
    s
}

/// The usage lines of a report or status: the total, then one line per
/// model (none when no executor reported usage).
pub fn usage_lines(usage: &PlanUsage) -> String {
    let mut out = String::new();
    if usage.is_empty() {
        let _ = writeln!(out, "  usage       none reported");
        return out;
    }
    let _ = writeln!(out, "  usage       {}", usage_summary(&usage.total));
    for (model, t) in &usage.by_model {
        let _ = writeln!(out, "    {model}: {}", usage_summary(t));
    }
    out
}

/// A progress bar for one plan on stderr (hidden when stderr is not a
/// terminal, so logs and pipes stay clean).
pub struct PlanProgress {
    bar: ProgressBar,
}

impl PlanProgress {
    pub fn new(plan_id: &str) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(plan_id.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar }
    }

    /// Shows a new state of the plan.
    pub fn update(&self, record: &PlanRecord) {
        self.bar.set_length(record.total as u64);
        self.bar.set_position(record.done as u64);
        let mut msg = record.status.as_str().to_owned();
        if record.failed + record.blocked > 0 {
            msg.push_str(&format!(
                ", {} failed, {} blocked",
                record.failed, record.blocked
            ));
        }
        self.bar.set_message(msg);
        if !self.bar.is_hidden() {
            return;
        }
        // Not a terminal: one line per change instead of a bar.
        eprintln!(
            "{}: {} ({}/{} done, {} failed)",
            record.id,
            record.status.as_str(),
            record.done,
            record.total,
            record.failed
        );
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::Usage;

    #[test]
    fn usage_lines_show_the_total_and_each_model() {
        let mut usage = PlanUsage::default();
        assert_eq!(usage_lines(&usage), "  usage       none reported\n");
        for (model, tokens_in, estimated) in [("gpt", 1000, false), ("claude", 20, true)] {
            let one = UsageTotals::of(&Usage {
                provider: String::new(),
                model: model.into(),
                tokens_in,
                tokens_out: 5,
                cost_usd: 0.5,
                estimated,
            });
            usage.total.add(&one);
            usage.by_model.insert(model.into(), one);
        }
        let text = usage_lines(&usage);
        assert!(
            text.starts_with(
                "  usage       1030 tokens (1020 in, 10 out), $1.000000, 2 calls (1 estimated)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("    gpt: 1005 tokens (1000 in, 5 out), $0.500000, 1 calls\n"),
            "{text}"
        );
        assert!(text.contains("    claude: 25 tokens"), "{text}");
    }
}
