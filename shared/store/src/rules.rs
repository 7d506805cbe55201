//! Rules both backends share, so that [`crate::memory::MemoryStore`] and
//! [`crate::redis::RedisStore`] cannot drift apart: plan validation and the
//! derived dependency data, the ready-set order, the text of a blocked
//! task's cause, and the wall clock used where the trait passes no time.
//!
//! The Lua scripts under `redis/` restate [`ready_score`] and
//! [`blocked_cause`]; the conformance suite checks that both backends agree.

use crate::{Fence, NewTask, StoreError, StoreResult, TaskRecord, TaskState};
use devfleet_protocol::TaskClass;
use std::collections::{HashMap, HashSet};

/// A task ready to be written: `depends_on` without duplicates, plus what
/// the store derives from the whole plan.
#[derive(Debug, Clone)]
pub(crate) struct PreparedTask {
    pub task: NewTask,
    /// Paths of the tasks that depend on this one, in plan order.
    pub dependents: Vec<String>,
    /// Number of dependencies (all unfinished at creation).
    pub pending: u32,
}

/// Checks a plan id: it becomes part of store keys (`…:task:<plan>:<path>`,
/// ready members `<seq>|<plan>|<path>`), so it must be non-empty and free of
/// `:`, `|` and whitespace for those keys to be unambiguous.
pub(crate) fn check_plan_id(plan_id: &str) -> StoreResult<()> {
    let reason = if plan_id.is_empty() {
        "it is empty"
    } else if plan_id.contains([':', '|']) {
        "it contains ':' or '|'"
    } else if plan_id.chars().any(char::is_whitespace) {
        "it contains whitespace"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidPlanId {
        plan_id: plan_id.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Validates a plan's tasks and derives dependents and pending counts.
///
/// Rejects a duplicate path ([`StoreError::DuplicateTask`]) and a dependency
/// on a path that is not in the plan ([`StoreError::UnknownDependency`]; the
/// first offender in task order). Cycles are the analyzer's business: tasks
/// on a cycle are stored but never become ready.
pub(crate) fn prepare_tasks(plan_id: &str, tasks: Vec<NewTask>) -> StoreResult<Vec<PreparedTask>> {
    check_plan_id(plan_id)?;
    let mut index: HashMap<String, usize> = HashMap::with_capacity(tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        if index.insert(t.path.clone(), i).is_some() {
            return Err(StoreError::DuplicateTask {
                plan_id: plan_id.to_owned(),
                path: t.path.clone(),
            });
        }
    }
    let mut prepared: Vec<PreparedTask> = Vec::with_capacity(tasks.len());
    for mut task in tasks {
        let mut seen = HashSet::new();
        task.depends_on.retain(|d| seen.insert(d.clone()));
        if let Some(missing) = task.depends_on.iter().find(|d| !index.contains_key(*d)) {
            return Err(StoreError::UnknownDependency {
                plan_id: plan_id.to_owned(),
                path: task.path.clone(),
                dependency: missing.clone(),
            });
        }
        let pending = u32::try_from(task.depends_on.len()).unwrap_or(u32::MAX);
        prepared.push(PreparedTask {
            task,
            dependents: Vec::new(),
            pending,
        });
    }
    for i in 0..prepared.len() {
        for d in prepared[i].task.depends_on.clone() {
            // Every dependency was checked against `index` above.
            if let Some(&j) = index.get(&d) {
                let dependent = prepared[i].task.path.clone();
                prepared[j].dependents.push(dependent);
            }
        }
    }
    Ok(prepared)
}

/// Score of a ready task: class rank in the high 32 bits (fixes first),
/// inverted priority in the low 32 (higher priority first). Equal scores are
/// ordered by a sequence number taken when the task became ready (FIFO).
/// The value stays below 2^34, exact in a Redis sorted-set double.
pub(crate) fn ready_score(class: TaskClass, priority: u32) -> u64 {
    (u64::from(class.rank()) << 32) | u64::from(u32::MAX - priority)
}

/// The error recorded on a task blocked by the failure of `failed_path`.
pub(crate) fn blocked_cause(failed_path: &str, error: &str) -> String {
    format!("blocked by {failed_path}: {error}")
}

/// Checks a write's fence against the task (see "Fencing" on
/// [`crate::TaskStore`]): the attempt must be the task's and, when the
/// fence names an owner and the task is Leased, that owner must hold the
/// lease. `fencing.lua`'s `fence_holds` restates it.
pub(crate) fn check_fence(rec: &TaskRecord, fence: &Fence) -> StoreResult<()> {
    let owner_ok = match (&fence.owner, rec.state) {
        (Some(o), TaskState::Leased) => rec.lease_owner.as_deref() == Some(o.as_str()),
        _ => true,
    };
    if rec.attempt == fence.attempt && owner_ok {
        Ok(())
    } else {
        Err(stale(rec, fence))
    }
}

/// The [`StoreError::StaleClaim`] of a write with `fence` on `rec`.
pub(crate) fn stale(rec: &TaskRecord, fence: &Fence) -> StoreError {
    StoreError::StaleClaim {
        plan_id: rec.plan_id.clone(),
        path: rec.path.clone(),
        attempt: fence.attempt,
        owner: fence.owner.clone(),
        state: rec.state,
        current_attempt: rec.attempt,
        current_owner: rec.lease_owner.clone(),
    }
}

/// Milliseconds since the epoch by this machine's clock: the `updated_ms` of
/// transitions whose trait method takes no `now_ms`, and the clock of kv TTLs.
pub(crate) fn wall_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds of a duration as an i64 (saturating).
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One token-bucket step, both backends' rule (`redis/token_bucket.lua`
/// restates it): `(tokens, at_ms)` is the stored state (`None`: never
/// seen, full). Returns the new state and the wait (`None`: done).
pub fn token_bucket_step(
    state: Option<(f64, i64)>,
    now_ms: i64,
    rate: crate::BucketRate,
    step: crate::BucketStep,
) -> ((f64, i64), Option<std::time::Duration>) {
    let capacity = rate.capacity.max(1) as f64;
    let window_ms = (rate.window.as_millis() as f64).max(1.0);
    let per_ms = capacity / window_ms;
    let (tokens, at) = state.unwrap_or((capacity, now_ms));
    let tokens = (tokens + (now_ms - at).max(0) as f64 * per_ms).min(capacity);
    match step {
        crate::BucketStep::Take(n) => {
            let n = n as f64;
            let needed = n.min(capacity);
            if tokens >= needed {
                ((tokens - n, now_ms), None)
            } else {
                let wait_ms = ((needed - tokens) / per_ms).ceil().max(1.0);
                (
                    (tokens, now_ms),
                    Some(std::time::Duration::from_millis(wait_ms as u64)),
                )
            }
        }
        crate::BucketStep::Drain(d) => {
            let debt = d.as_millis() as f64 * per_ms;
            ((tokens.min(0.0) - debt, now_ms), None)
        }
    }
}

/// Most ready-set members of plans whose budget is exhausted that one
/// `claim_next` steps over (they stay in place) before it reports nothing
/// ready. `redis/claim_next.lua` uses the same bound.
pub(crate) const MAX_HELD_SCAN: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn task(path: &str, deps: &[&str]) -> NewTask {
        NewTask {
            path: path.into(),
            spec: String::new(),
            content: None,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            priority: 0,
            estimate: 1,
            executor: None,
        }
    }

    #[test]
    fn fixes_sort_before_new_work_and_higher_priority_first() {
        assert!(ready_score(TaskClass::Fix, 0) < ready_score(TaskClass::New, u32::MAX));
        assert!(ready_score(TaskClass::New, 9) < ready_score(TaskClass::New, 1));
        assert!(ready_score(TaskClass::New, 0) < (1 << 34));
    }

    #[test]
    fn prepare_derives_dependents_and_deduplicates_edges() {
        let p = prepare_tasks(
            "p1",
            vec![
                task("a", &[]),
                task("b", &["a", "a"]),
                task("c", &["a", "b"]),
            ],
        )
        .unwrap();
        assert_eq!(p[0].dependents, vec!["b", "c"]);
        assert_eq!(p[1].pending, 1);
        assert_eq!(p[2].pending, 2);
    }

    #[test]
    fn prepare_rejects_bad_plans() {
        assert!(matches!(
            prepare_tasks("p1", vec![task("a", &["zz"])]),
            Err(StoreError::UnknownDependency { ref dependency, .. }) if dependency == "zz"
        ));
        assert!(matches!(
            prepare_tasks("p1", vec![task("a", &[]), task("a", &[])]),
            Err(StoreError::DuplicateTask { .. })
        ));
        assert!(matches!(
            prepare_tasks("p:1", vec![]),
            Err(StoreError::InvalidPlanId { .. })
        ));
    }
}
