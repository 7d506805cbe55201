//! Autoscaling a worker's slots on backlog and slot use, with hysteresis.
//!
//! Every tick the worker observes its slots, busy slots and the backlog
//! (`work.dev` depth + the store's ready set + deliveries it holds waiting
//! for a slot). [`Scaler::observe`] is the whole policy, a pure function of
//! those observations:
//!
//! * **Up fast**: when the backlog exceeds the free slots for `up_after`
//!   ticks in a row, grow at once to cover it (busy + backlog), capped at
//!   `max`.
//! * **Down slowly**: when there is no backlog and a slot is idle for
//!   `down_after` ticks in a row, shrink by one (never below `min`, nor
//!   below the busy count); the next step needs another `down_after` ticks.
//!
//! Anything in between resets both counters. Every replica sees the same
//! backlog and scales on it; the dispatcher's credit then spreads the work.

use crate::Worker;
use devfleet_protocol::{metrics::WorkerStatus, queues};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bounds and hysteresis of the autoscaler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalePolicy {
    pub min: u32,
    pub max: u32,
    /// Ticks of backlog beyond the free slots before growing.
    pub up_after: u32,
    /// Idle ticks before shrinking by one.
    pub down_after: u32,
    /// Time between observations.
    pub tick: Duration,
}

impl Default for ScalePolicy {
    fn default() -> Self {
        Self {
            min: 2,
            max: 10,
            up_after: 2,
            down_after: 10,
            tick: Duration::from_secs(1),
        }
    }
}

/// One look at the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub slots: u32,
    pub busy: u32,
    /// Tasks that could start now if there were slots.
    pub backlog: u64,
}

/// The policy's memory between ticks.
#[derive(Debug, Clone, Default)]
pub struct Scaler {
    pressure_ticks: u32,
    idle_ticks: u32,
}

impl Scaler {
    /// The slot count to use from now on.
    pub fn observe(&mut self, policy: &ScalePolicy, obs: Observation) -> u32 {
        let max = policy.max.max(policy.min);
        let slots = obs.slots.clamp(policy.min, max);
        let free = u64::from(slots.saturating_sub(obs.busy));
        if obs.backlog > free {
            self.idle_ticks = 0;
            self.pressure_ticks += 1;
            if self.pressure_ticks >= policy.up_after.max(1) && slots < max {
                self.pressure_ticks = 0;
                let want = u64::from(obs.busy).saturating_add(obs.backlog);
                let grown = want.clamp(u64::from(slots) + 1, u64::from(max));
                return u32::try_from(grown).unwrap_or(max);
            }
            return slots;
        }
        self.pressure_ticks = 0;
        if obs.backlog == 0 && obs.busy < slots {
            self.idle_ticks += 1;
            if self.idle_ticks >= policy.down_after.max(1) && slots > policy.min {
                self.idle_ticks = 0;
                return (slots - 1).max(policy.min).max(obs.busy);
            }
            return slots;
        }
        self.idle_ticks = 0;
        slots
    }
}

/// Observes and resizes every tick until `stop`; publishes `worker_status`.
pub(crate) async fn run(worker: Arc<Worker>, stop: CancellationToken) {
    let policy = worker.scale;
    let mut scaler = Scaler::default();
    let mut tick = tokio::time::interval(policy.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let depth = match worker.connections.queue_depth(queues::WORK_DEV).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read work.dev depth");
                0
            }
        };
        let ready = match worker.connections.store.ready_len().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the ready set size");
                0
            }
        };
        let counts = worker.slots.snapshot();
        let (slots, busy, waiting) = (counts.capacity, counts.busy, counts.waiting);
        let backlog = depth + ready + u64::from(waiting);
        let target = scaler.observe(
            &policy,
            Observation {
                slots,
                busy,
                backlog,
            },
        );
        if target != slots {
            tracing::info!(from = slots, to = target, busy, backlog, "scaling slots");
            worker.slots.set_capacity(target);
        }
        worker
            .metrics
            .emit(WorkerStatus {
                instance: worker.instance.clone(),
                slots: target.into(),
                busy: busy.into(),
                waiting: waiting.into(),
                backlog,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ScalePolicy = ScalePolicy {
        min: 2,
        max: 10,
        up_after: 2,
        down_after: 3,
        tick: Duration::from_secs(1),
    };

    fn obs(slots: u32, busy: u32, backlog: u64) -> Observation {
        Observation {
            slots,
            busy,
            backlog,
        }
    }

    #[test]
    fn grows_after_sustained_backlog_straight_to_what_is_needed() {
        let mut s = Scaler::default();
        assert_eq!(s.observe(&P, obs(2, 2, 5)), 2, "one tick is not enough");
        assert_eq!(s.observe(&P, obs(2, 2, 5)), 7);
        let mut s = Scaler::default();
        s.observe(&P, obs(2, 2, 50));
        assert_eq!(s.observe(&P, obs(2, 2, 50)), 10, "capped at max");
    }

    #[test]
    fn a_blip_of_backlog_does_not_grow() {
        let mut s = Scaler::default();
        assert_eq!(s.observe(&P, obs(2, 2, 5)), 2);
        assert_eq!(s.observe(&P, obs(2, 1, 0)), 2);
        assert_eq!(s.observe(&P, obs(2, 2, 5)), 2);
    }

    #[test]
    fn shrinks_one_step_per_idle_period_never_below_min_or_busy() {
        let mut s = Scaler::default();
        let mut slots = 6;
        let mut history = vec![];
        for _ in 0..30 {
            slots = s.observe(&P, obs(slots, 0, 0));
            history.push(slots);
        }
        assert_eq!(&history[..7], &[6, 6, 5, 5, 5, 4, 4]);
        assert_eq!(slots, 2);
        let mut s = Scaler::default();
        for _ in 0..3 {
            slots = s.observe(&P, obs(5, 4, 0));
        }
        assert_eq!(slots, 4);
    }

    #[test]
    fn full_slots_without_backlog_hold_steady() {
        let mut s = Scaler::default();
        for _ in 0..10 {
            assert_eq!(s.observe(&P, obs(4, 4, 0)), 4);
        }
    }

    #[test]
    fn min_equals_max_pins_the_count() {
        let pinned = ScalePolicy {
            min: 1,
            max: 1,
            ..P
        };
        let mut s = Scaler::default();
        for backlog in [0, 100, 100, 100, 0, 0, 0, 0] {
            assert_eq!(s.observe(&pinned, obs(1, 1, backlog)), 1);
        }
    }
}
