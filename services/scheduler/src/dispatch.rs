//! The dispatcher: Ready tasks → `work.dev`, in priority order, only as
//! fast as the dev-workers can take them.
//!
//! Each cycle reads the workers' capacity records and the `work.dev` depth,
//! computes the credit ([`crate::capacity::credit`]) and, for each unit of
//! it, claims the best Ready task as [`DISPATCH_OWNER`] with the dispatch
//! lease and publishes a [`TaskWork`]. Because nothing waits in the broker
//! beyond what free slots will take at once, the order in which workers
//! start tasks is the store's priority order, not the order messages piled
//! up in a queue.
//!
//! A cycle runs when woken (plan created, task completed, leases reaped)
//! and on a tick: short while work waits for slots (that is how freed slots
//! are noticed), longer when there was nothing to dispatch or the `dev`
//! circuit breaker held the work back.
//!
//! Before claiming, each cycle asks the router's `dev` circuit breaker
//! ([`crate::dev_breaker`]) how much of the credit it may use: all of it
//! when closed, none when open, one probe permit per task when half-open.
//!
//! Claimed tasks whose requirements no live worker meets are not
//! published but parked ([`crate::capability_wait`]); parked tasks the
//! fleet has come to cover go out first in a later cycle.
//!
//! If publishing fails the claimed task keeps its dispatch lease until the
//! reaper returns it to Ready; the dispatcher backs off before its next
//! cycle, so a broker outage strands at most one round of tasks (the free
//! slots) per backoff period, each for one dispatch lease.

use crate::capability_wait::Waits;
use crate::dev_breaker::DevBreaker;
use crate::Shared;
use devfleet_contracts::breaker::{self, Phase};
use devfleet_contracts::capacity::{self, Fleet, DISPATCH_OWNER};
use devfleet_protocol::{metrics::QueueStatus, now_ms, queues, Stage, TaskWork};
use devfleet_runtime::backoff::Backoff;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// A dispatch no worker record reflects counts against the credit until a
/// worker reports after it, or for at most this long (bounds the damage of
/// clock skew between machines, or of a worker that never reports).
const LEDGER_MAX_AGE_MS: i64 = 1_000;

/// Most tasks handed out in one dispatch round.
const MAX_ROUND: u64 = 64;

/// How often `queue_status` is emitted.
const STATUS_EVERY: Duration = Duration::from_secs(1);

const FAILURE_BACKOFF: Backoff = Backoff::DISPATCH;

/// This replica's recent dispatches that no worker capacity record may
/// reflect yet: a message taken off the queue leaves the queue depth before
/// its worker's next record counts it as waiting or busy.
#[derive(Debug, Default)]
pub struct Ledger {
    sent_ms: VecDeque<i64>,
}

impl Ledger {
    /// Notes a dispatch at `at_ms`.
    pub fn record(&mut self, at_ms: i64) {
        self.sent_ms.push_back(at_ms);
    }

    /// Forgets dispatches older than the newest worker record (a worker
    /// that took one has reported it by then, or it is still in the queue
    /// depth) and any older than `LEDGER_MAX_AGE_MS` (1 s).
    pub fn prune(&mut self, newest_report_ms: Option<i64>, now_ms: i64) {
        let floor = now_ms - LEDGER_MAX_AGE_MS;
        let floor = newest_report_ms.map_or(floor, |n| n.max(floor));
        while self.sent_ms.front().is_some_and(|&t| t <= floor) {
            self.sent_ms.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.sent_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent_ms.is_empty()
    }
}

/// How a dispatch cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CycleEnd {
    /// The ready set ran dry.
    NoReadyWork,
    /// The credit ran out (or was zero): work may be waiting for slots.
    CreditUsed,
    /// The `dev` circuit breaker held work back (open, or half-open with
    /// its probes taken).
    BreakerHeld,
}

/// Runs dispatch cycles until `shutdown`.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut ledger = Ledger::default();
    let mut breaker = DevBreaker::default();
    let mut waits = Waits::default();
    let mut failures = 0u32;
    let mut last_status: Option<Instant> = None;
    loop {
        let pause = match cycle(
            &shared,
            &mut ledger,
            &mut breaker,
            &mut waits,
            &mut last_status,
        )
        .await
        {
            Ok(CycleEnd::NoReadyWork | CycleEnd::BreakerHeld) => {
                failures = 0;
                shared.idle_tick
            }
            Ok(CycleEnd::CreditUsed) => {
                failures = 0;
                shared.dispatch_tick
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "dispatch cycle failed; backing off");
                FAILURE_BACKOFF.delay(failures)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn cycle(
    shared: &Shared,
    ledger: &mut Ledger,
    breaker: &mut DevBreaker,
    waits: &mut Waits,
    last_status: &mut Option<Instant>,
) -> anyhow::Result<CycleEnd> {
    let store = &shared.connections.store;
    let fleet = capacity::read_fleet(store.as_ref(), now_ms()).await?;
    let depth = shared.connections.queue_depth(queues::WORK_DEV).await?;
    ledger.prune(fleet.newest_at_ms, now_ms());
    let outstanding = depth + ledger.len() as u64;
    let mut credit = capacity::credit(&fleet, outstanding).min(MAX_ROUND);
    let mut end = CycleEnd::CreditUsed;
    // While half-open, what this round dispatches are the breaker's probes.
    let mut probes_of = None;
    if credit > 0 {
        let admission = breaker
            .admit(store.as_ref(), &shared.metrics, credit)
            .await?;
        if admission.held(credit) {
            end = CycleEnd::BreakerHeld;
        }
        credit = admission.allowed;
        probes_of = (admission.phase == Phase::HalfOpen).then_some(admission.generation);
    }
    // Parked tasks the fleet now covers go first, within the credit.
    let released = waits.release(shared, &fleet, credit).await;
    credit = credit.saturating_sub(released.len() as u64);
    // One round: claim the best `credit` tasks, then publish them. Claims
    // and publishes are issued concurrently (each is atomic on its own), so
    // a round costs about one store and one broker round trip; the tasks of
    // one round go to slots that are free at the same time.
    let claims = futures::future::join_all(
        (0..credit).map(|_| store.claim_next(DISPATCH_OWNER, shared.dispatch_lease)),
    )
    .await;
    let mut failure = None;
    let mut claimed = Vec::with_capacity(claims.len());
    for claim in claims {
        match claim {
            Ok(Some(task)) => claimed.push(task),
            Ok(None) => {
                if end != CycleEnd::BreakerHeld {
                    end = CycleEnd::NoReadyWork;
                }
            }
            Err(e) => failure = Some(anyhow::Error::from(e)),
        }
    }
    let claimed = {
        let admitted = waits.admit(shared, &fleet, claimed).await;
        let mut all = released;
        all.extend(admitted);
        all
    };
    if let Some(generation) = probes_of {
        for t in &claimed {
            let attempt = breaker::Attempt {
                plan_id: &t.plan_id,
                path: &t.path,
                attempt: t.attempt,
            };
            // Unmarked, the probe's outcome is ignored and the router lets
            // fresh probes through after a cooldown: slower, never wrong.
            if let Err(e) =
                breaker::mark_probe(store.as_ref(), Stage::Dev, generation, attempt).await
            {
                tracing::warn!(error = %e, path = %t.path, "cannot record a dev breaker probe");
            }
        }
    }
    let traces = futures::future::join_all(
        claimed
            .iter()
            .map(|t| shared.traces.lookup(store.as_ref(), &t.plan_id)),
    )
    .await;
    let publishes =
        futures::future::join_all(claimed.into_iter().zip(traces).map(|(task, trace)| {
            let span = tracing::info_span!(
                "dispatch",
                plan_id = %task.plan_id,
                path = %task.path,
                attempt = task.attempt,
                class = task.class.as_str(),
                priority = task.priority,
            );
            devfleet_telemetry::set_parent(&span, trace.as_deref());
            let work = TaskWork {
                plan_id: task.plan_id,
                path: task.path,
                attempt: task.attempt,
                class: task.class,
            };
            shared
                .connections
                .publish(queues::WORK_DEV, work)
                .instrument(span)
        }))
        .await;
    for published in publishes {
        match published {
            // Recorded once confirmed: later than the worker can have seen
            // it, so the ledger errs towards counting it too long.
            Ok(()) => ledger.record(now_ms()),
            Err(e) => failure = Some(e),
        }
    }
    if last_status.is_none_or(|t| t.elapsed() >= STATUS_EVERY) {
        *last_status = Some(Instant::now());
        emit_status(shared, &fleet, depth, ledger.len(), breaker.phase()).await;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(end),
    }
}

async fn emit_status(
    shared: &Shared,
    fleet: &Fleet,
    depth: u64,
    unreported: usize,
    breaker: devfleet_contracts::breaker::Phase,
) {
    let ready = match shared.connections.store.ready_len().await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the ready set size");
            return;
        }
    };
    shared
        .metrics
        .emit(QueueStatus {
            ready_len: ready,
            work_dev_depth: depth,
            dispatched_unreported: unreported as u64,
            workers: fleet.workers.into(),
            slots: fleet.slots.into(),
            busy: fleet.busy.into(),
            waiting: fleet.waiting.into(),
            free_slots: fleet.free.into(),
            dev_breaker: breaker.as_str().to_owned(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_forgets_what_a_worker_reported_since() {
        let mut l = Ledger::default();
        l.record(100);
        l.record(110);
        l.record(120);
        l.prune(Some(110), 130);
        assert_eq!(l.len(), 1);
        l.prune(None, 130);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn ledger_forgets_old_dispatches_even_without_reports() {
        let mut l = Ledger::default();
        l.record(100);
        l.prune(None, 100 + LEDGER_MAX_AGE_MS + 1);
        assert!(l.is_empty());
    }
}
