//! The one consume loop every devfleet service uses for its queues.
//!
//! [`Consume`] reads a queue with a bounded number of handlers in flight,
//! runs each handler in a span linked to the publisher's trace, and settles
//! the delivery with the [`Settlement`] the handler returned: ack once the
//! effect is durable, retry with backoff on a transient failure, redeliver
//! after a chosen delay (a wait, not a failure), dead-letter what can never
//! succeed, or hand it back unsettled.
//!
//! # Options
//!
//! * **Concurrency** ([`Consume::concurrency`], [`Consume::slots`]): how
//!   many handlers run at once. [`Slots`] can be resized while the loop
//!   runs (the dev-worker's autoscaler does) and shared by several loops
//!   (the qa-worker's two queues share its sandbox slots). By default a
//!   delivery is only taken when a slot is free, so the credit the broker
//!   sees follows the slot count.
//! * **Read-ahead** ([`Consume::read_ahead`]): hold up to `n` deliveries
//!   (the prefetch) and let those beyond the free slots wait for one; they
//!   are counted in [`SlotCounts::waiting`]. On shutdown the waiting ones
//!   are handed back at once.
//! * **Raw deliveries** ([`Consume::run_raw`]): the handler gets the
//!   payload bytes and dead-letter information instead of a decoded
//!   envelope (the DLQ indexer, which must see undecodable messages too).
//! * **Early settlement** ([`Inflight::settle_now`]): a handler may settle
//!   its delivery as soon as its effect is durable (a claim recorded in the
//!   store) and go on working; what it returns afterwards is then ignored,
//!   so a delivery is never settled twice.
//! * **Long work vs the broker's deadline** (see
//!   [`devfleet_bus::Deadline`]): while a handler runs, the loop extends
//!   its delivery every [`extend_every`] of the queue's `ack_wait` (NATS:
//!   in-progress acks), so work longer than `ack_wait` is not redelivered
//!   while it runs. RabbitMQ's `consumer_timeout` cannot be extended: a
//!   handler whose work is guarded by the store (a claim with a lease)
//!   calls [`Inflight::guarded`], which acks the delivery at once on such a
//!   bus, and the lease (renewed while working, reaped when the worker
//!   dies) takes over the broker's role.
//! * **Shutdown grace** ([`Consume::grace`]): on shutdown no new delivery
//!   is taken; in-flight handlers get the grace period to finish and
//!   settle, then the unfinished ones are dropped and their deliveries
//!   handed back (unsettled, so the broker redelivers them). The grace is
//!   [`SHUTDOWN_GRACE`] unless the service sets its own (the dev-worker's
//!   is a setting); Kubernetes' `terminationGracePeriodSeconds` must
//!   exceed it (`scripts/validate-deploy.sh` checks). Only then is the
//!   consumer closed, so nothing in flight is redelivered early.
//! * **Backoff** ([`Consume::backoff`]): the delay of [`Settlement::Retry`]
//!   and of consumer restarts; [`Backoff::HANDLER`] by default.
//!
//! # From errors to settlements
//!
//! Handlers turn what went wrong into a settlement with
//! [`Settlement::from_store_error`], [`Settlement::from_publish_error`] or
//! [`StepError::settlement`]; this table is the whole mapping (each row is
//! a unit test below):
//!
//! | cause                                                        | settlement            | why |
//! |--------------------------------------------------------------|-----------------------|-----|
//! | `StoreError::Backend`, `StoreError::Connect`                 | `Retry` with backoff  | transient: the store is down or slow |
//! | `StoreError::InvalidState`, `StoreError::StaleClaim`        | `Ack`                 | the transition no longer applies, or the claim is over: the message is stale, the task moved on |
//! | any other `StoreError` (unknown task/plan, corrupt record …) | `DeadLetter`          | redelivering cannot make it succeed |
//! | a publish failed ([`StepError::Publish`])                    | `Retry` with backoff  | the broker did not confirm; it may next time |
//! | the message can never be handled ([`StepError::Invalid`])    | `DeadLetter`          | |
//! | a message kind the queue does not carry ([`unexpected`])     | `DeadLetter`          | |
//! | [`Settlement::HandBack`], or the shutdown grace ran out      | left unsettled        | the broker redelivers it to another consumer |
//!
//! A `Retry` past the queue's [`ConsumeOptions::max_attempts`] dead-letters
//! instead (the bus decides that). An undecodable message is dead-lettered
//! by the bus before any handler sees it (except in raw mode).

use crate::backoff::Backoff;
use crate::Connections;
use bytes::Bytes;
use devfleet_bus::{
    BusError, BusResult, ConsumeOptions, Consumer, DeadLetterInfo, Deadline, Delivery, RetryOutcome,
};
use devfleet_protocol::Envelope;
use devfleet_store::StoreError;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// What to do with a delivery once its handler returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The effect is durable (or there was nothing to do).
    Ack,
    /// A transient failure; redeliver after a backoff (dead-lettered past
    /// the queue's attempt limit).
    Retry(String),
    /// Redeliver after exactly this delay (not a failure: a wait).
    Delay(Duration, String),
    /// It can never succeed; move it to the dead-letter queue.
    DeadLetter(String),
    /// Leave it unsettled: the broker redelivers it (at once, to any
    /// consumer) and its attempt count says nothing about failures.
    HandBack(String),
}

impl Settlement {
    /// Settlement for a store error (see the table in the module docs):
    /// transient backend errors are retried, a transition that no longer
    /// applies means the message is stale (acked), and anything else (a
    /// message about nothing that exists, a corrupt record) is
    /// dead-lettered.
    pub fn from_store_error(what: &str, err: StoreError) -> Settlement {
        match err {
            StoreError::Backend(_) | StoreError::Connect { .. } => {
                Settlement::Retry(format!("{what}: {err}"))
            }
            StoreError::InvalidState { .. } | StoreError::StaleClaim { .. } => {
                tracing::warn!(error = %err, "{what}: stale message, nothing to do");
                Settlement::Ack
            }
            _ => Settlement::DeadLetter(format!("{what}: {err}")),
        }
    }

    /// Settlement for a failed publish: always retried (the broker either
    /// confirms or not).
    pub fn from_publish_error(what: &str, err: anyhow::Error) -> Settlement {
        Settlement::Retry(format!("{what}: {err:#}"))
    }
}

/// Why a step of a handler did not finish. `?` converts a [`StoreError`]
/// into it; [`StepError::settlement`] says what becomes of the delivery.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The store failed or refused the step.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A message could not be published (not confirmed by the broker).
    #[error("{0:#}")]
    Publish(anyhow::Error),
    /// The message cannot be handled, now or ever.
    #[error("{0}")]
    Invalid(String),
}

impl StepError {
    /// The settlement of a delivery whose handler stopped at this error
    /// (the table in the module docs).
    pub fn settlement(self, what: &str) -> Settlement {
        match self {
            StepError::Store(e) => Settlement::from_store_error(what, e),
            StepError::Publish(e) => Settlement::from_publish_error(what, e),
            StepError::Invalid(reason) => Settlement::DeadLetter(format!("{what}: {reason}")),
        }
    }
}

/// Handler slots: how many handlers run at once, resizable while running
/// and shareable between loops.
///
/// Shrinking never interrupts a running handler; it only keeps new ones
/// from starting until enough have finished.
#[derive(Debug)]
pub struct Slots {
    counts: Mutex<SlotCounts>,
    changed: Notify,
    observer: Option<Arc<Notify>>,
}

/// A look at [`Slots`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotCounts {
    /// Handlers allowed at once.
    pub capacity: u32,
    /// Handlers running.
    pub busy: u32,
    /// Deliveries held, waiting for a slot (read-ahead only).
    pub waiting: u32,
}

/// A slot in use; released on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
}

impl Slots {
    /// `capacity` slots (at least one).
    pub fn new(capacity: u32) -> Arc<Self> {
        Self::build(capacity, None)
    }

    /// Like [`Slots::new`]; `observer` is notified (`notify_one`) whenever
    /// the counts change, e.g. to refresh a capacity record.
    pub fn observed(capacity: u32, observer: Arc<Notify>) -> Arc<Self> {
        Self::build(capacity, Some(observer))
    }

    fn build(capacity: u32, observer: Option<Arc<Notify>>) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(SlotCounts {
                capacity: capacity.max(1),
                busy: 0,
                waiting: 0,
            }),
            changed: Notify::new(),
            observer,
        })
    }

    fn counts(&self) -> MutexGuard<'_, SlotCounts> {
        // The counts stay consistent even if a holder panicked.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touched(&self) {
        self.changed.notify_waiters();
        if let Some(o) = &self.observer {
            o.notify_one();
        }
    }

    /// Waits for a free slot, counted as waiting meanwhile. Cancel-safe.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        struct Waiting<'a>(&'a Slots);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                let mut c = self.0.counts();
                c.waiting = c.waiting.saturating_sub(1);
                drop(c);
                self.0.touched();
            }
        }
        self.counts().waiting += 1;
        self.touched();
        let _waiting = Waiting(self);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut c = self.counts();
                if c.busy < c.capacity {
                    c.busy += 1;
                    return Slot {
                        slots: self.clone(),
                    };
                }
            }
            notified.await;
        }
    }

    /// Resizes (at least one); running handlers keep their slots.
    pub fn set_capacity(&self, capacity: u32) {
        self.counts().capacity = capacity.max(1);
        self.touched();
    }

    /// The current counts.
    pub fn snapshot(&self) -> SlotCounts {
        *self.counts()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut c = self.slots.counts();
            c.busy = c.busy.saturating_sub(1);
        }
        self.slots.touched();
    }
}

/// A delivery as [`Consume::run_raw`] hands it over: not decoded.
#[derive(Debug, Clone)]
pub struct RawDelivery {
    pub payload: Bytes,
    /// The broker queue it came from.
    pub queue: String,
    /// 1 on first delivery.
    pub attempt: u32,
    /// Set on messages read from the dead-letter queue.
    pub dead_letter: Option<DeadLetterInfo>,
}

/// The handler's hold on its delivery: its attempt, and ways to settle it
/// before the handler returns.
#[derive(Clone)]
pub struct Inflight {
    delivery: Arc<tokio::sync::Mutex<Option<Delivery>>>,
    attempt: u32,
    deadline: Deadline,
    backoff: Backoff,
}

/// The timer of [`Inflight::guard_after`]; dropping it stops the timer.
pub struct GuardTimer(tokio::task::JoinHandle<()>);

impl Drop for GuardTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Inflight {
    fn new(delivery: Delivery, backoff: Backoff) -> Self {
        Self {
            attempt: delivery.attempt,
            deadline: delivery.deadline(),
            delivery: Arc::new(tokio::sync::Mutex::new(Some(delivery))),
            backoff,
        }
    }

    async fn take(&self) -> Option<Delivery> {
        self.delivery.lock().await.take()
    }

    /// The delivery attempt (1 on first delivery).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Settles the delivery now (e.g. once a claim is durable in the store,
    /// so a long-running handler does not hold it); the settlement the
    /// handler returns later is then ignored. Returns `false` if it was
    /// settled already.
    pub async fn settle_now(&self, settlement: Settlement) -> bool {
        match self.take().await {
            Some(delivery) => {
                settle_with(delivery, settlement, &self.backoff).await;
                true
            }
            None => false,
        }
    }

    /// Declares the work guarded outside the broker from now on: a claim
    /// with a lease is durable in the store (an expired lease gets the
    /// work redone), or something else re-announces it if this worker
    /// dies. On a bus whose deadline cannot be extended
    /// ([`Deadline::Fixed`], RabbitMQ's `consumer_timeout`) the delivery is
    /// acked now, so work that outlives the broker's deadline is not
    /// redelivered and run a second time; what the handler returns later is
    /// then ignored. On other buses nothing changes: the loop keeps an
    /// [`Deadline::Extendable`] deadline extended and the handler's
    /// settlement applies. Returns `true` if it settled the delivery now.
    pub async fn guarded(&self) -> bool {
        match self.deadline {
            Deadline::Fixed => {
                tracing::debug!("work guarded by the store; settling its delivery now");
                self.settle_now(Settlement::Ack).await
            }
            Deadline::Extendable | Deadline::None => false,
        }
    }

    /// Like [`Inflight::guarded`], but only once the work has run for
    /// `after`: short work keeps its broker delivery (a worker that dies is
    /// redelivered at once), and only work that may approach a fixed
    /// deadline is settled early. The timer stops when the returned guard
    /// is dropped (keep it alive for the work's duration).
    pub fn guard_after(&self, after: Duration) -> GuardTimer {
        let inflight = self.clone();
        GuardTimer(tokio::spawn(async move {
            tokio::time::sleep(after).await;
            inflight.guarded().await;
        }))
    }

    /// Extends an [`Deadline::Extendable`] delivery every `every` until it
    /// is settled; never returns (pending once settled or when there is
    /// nothing to extend).
    async fn keep_alive(&self, every: Duration) -> std::convert::Infallible {
        if self.deadline != Deadline::Extendable {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(every).await;
            let held = self.delivery.lock().await;
            let Some(delivery) = held.as_ref() else {
                drop(held);
                return std::future::pending().await;
            };
            if let Err(e) = delivery.extend().await {
                // The next one may get through before the deadline.
                tracing::warn!(error = %e, "extending a delivery's deadline failed");
            }
        }
    }

    /// Settles with what the handler returned, unless settled early.
    async fn finish(&self, settlement: Settlement) {
        match self.take().await {
            Some(delivery) => settle_with(delivery, settlement, &self.backoff).await,
            None if settlement != Settlement::Ack => {
                tracing::warn!(
                    ?settlement,
                    "delivery settled early; the store's lease or a re-announcement redoes the work, not the broker"
                );
            }
            None => {}
        }
    }
}

/// How often a handler's [`Deadline::Extendable`] delivery is extended: a
/// third of `ack_wait` (so two extensions may be lost), at least 100 ms;
/// 10 s for the server's default (zero).
pub fn extend_every(ack_wait: Duration) -> Duration {
    if ack_wait.is_zero() {
        return Duration::from_secs(10);
    }
    (ack_wait / 3).max(Duration::from_millis(100))
}

/// Where a consume loop reads and how: the options of [`Consume`] in one
/// struct, for loops that need nothing else (see [`consume`]).
pub struct Source {
    pub connections: Connections,
    /// Logical queue (namespace applied by [`Connections`]).
    pub queue: &'static str,
    /// Consumer options; the prefetch is set to `concurrency`.
    pub options: ConsumeOptions,
    /// Handlers in flight at most (at least one).
    pub concurrency: usize,
}

/// The shutdown grace of a consume loop that sets none: in-flight
/// handlers get this long to finish before their deliveries are handed
/// back. Kept below Kubernetes' default `terminationGracePeriodSeconds`
/// (30 s), with room to close connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// A consume loop being configured; [`Consume::run`] or
/// [`Consume::run_raw`] runs it. See the module docs for the options.
pub struct Consume {
    connections: Connections,
    queue: String,
    options: ConsumeOptions,
    slots: Arc<Slots>,
    read_ahead: Option<u32>,
    backoff: Backoff,
    grace: Duration,
}

impl Consume {
    /// A loop on a logical queue (namespace applied by [`Connections`]):
    /// one handler at a time, default consumer options,
    /// [`Backoff::HANDLER`], and a shutdown grace of [`SHUTDOWN_GRACE`].
    pub fn new(connections: Connections, queue: &str) -> Self {
        Self {
            connections,
            queue: queue.to_owned(),
            options: ConsumeOptions::default(),
            slots: Slots::new(1),
            read_ahead: None,
            backoff: Backoff::HANDLER,
            grace: SHUTDOWN_GRACE,
        }
    }

    /// Consumer options (attempt limit, ack wait). The prefetch is set by
    /// the loop: the slot count at start, or the read-ahead.
    pub fn options(mut self, options: ConsumeOptions) -> Self {
        self.options = options;
        self
    }

    /// At most `n` handlers at once (at least one), fixed.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.slots = Slots::new(u32::try_from(n).unwrap_or(u32::MAX));
        self
    }

    /// Handlers run in these slots, which the caller may resize or share
    /// with other loops.
    pub fn slots(mut self, slots: Arc<Slots>) -> Self {
        self.slots = slots;
        self
    }

    /// Hold up to `n` deliveries (the prefetch), those beyond the free
    /// slots waiting for one, instead of taking a delivery only when a slot
    /// is free. Use it with slots that grow, so a larger count has work.
    pub fn read_ahead(mut self, n: u32) -> Self {
        self.read_ahead = Some(n.max(1));
        self
    }

    /// The backoff of retried deliveries and consumer restarts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// On shutdown, give in-flight handlers this long to finish; then drop
    /// them and hand their deliveries back. `Duration::ZERO` hands them
    /// back at once.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Consumes until `shutdown`, running `handler` on each envelope and
    /// settling its delivery with the returned [`Settlement`] (unless the
    /// handler settled it early through its [`Inflight`]).
    ///
    /// Undecodable messages are dead-lettered by the bus. Returns an error
    /// only when the bus is closed for good while the loop was meant to
    /// run on; broker outages are ridden out (the consumer is restarted
    /// with backoff).
    pub async fn run<S, H, Fut>(
        self,
        state: Arc<S>,
        shutdown: CancellationToken,
        handler: H,
    ) -> anyhow::Result<()>
    where
        S: Send + Sync + 'static,
        H: Fn(Arc<S>, Envelope, Inflight) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Settlement> + Send + 'static,
    {
        self.run_loop::<Envelope, S, H, Fut>(state, shutdown, handler)
            .await
    }

    /// Like [`Consume::run`], but the handler gets every delivery as it
    /// came, undecoded ([`RawDelivery`]).
    pub async fn run_raw<S, H, Fut>(
        self,
        state: Arc<S>,
        shutdown: CancellationToken,
        handler: H,
    ) -> anyhow::Result<()>
    where
        S: Send + Sync + 'static,
        H: Fn(Arc<S>, RawDelivery, Inflight) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Settlement> + Send + 'static,
    {
        self.run_loop::<RawDelivery, S, H, Fut>(state, shutdown, handler)
            .await
    }

    async fn run_loop<I, S, H, Fut>(
        self,
        state: Arc<S>,
        shutdown: CancellationToken,
        handler: H,
    ) -> anyhow::Result<()>
    where
        I: Input,
        S: Send + Sync + 'static,
        H: Fn(Arc<S>, I, Inflight) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Settlement> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let queue = self.connections.queue(&self.queue);
        let prefetch = self
            .read_ahead
            .unwrap_or_else(|| self.slots.snapshot().capacity);
        let options = self
            .options
            .clone()
            .prefetch(u16::try_from(prefetch).unwrap_or(u16::MAX));
        let backoff = self.backoff;
        let tracker = TaskTracker::new();
        // Cancelled when the grace period ran out: unfinished handlers are
        // dropped and their deliveries handed back.
        let hard_stop = CancellationToken::new();
        // Kept open until every in-flight handler settled its delivery.
        let mut consumer: Option<Consumer> = None;
        let mut failures = 0u32;
        let result = 'outer: loop {
            let mut current = match consumer.take() {
                Some(c) => c,
                None => {
                    let attempt = tokio::select! {
                        _ = shutdown.cancelled() => break 'outer Ok(()),
                        c = self.connections.bus.consume(&queue, options.clone()) => c,
                    };
                    match attempt {
                        Ok(c) => c,
                        Err(BusError::Closed) => {
                            break 'outer Err(anyhow::anyhow!(
                                "the bus closed while consuming {queue}"
                            ))
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(%queue, error = %e, "cannot start consumer; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'outer Ok(()),
                                _ = tokio::time::sleep(backoff.delay(failures)) => {}
                            }
                            continue;
                        }
                    }
                }
            };
            // Without read-ahead, a delivery is only taken into a free slot.
            let slot = match self.read_ahead {
                Some(_) => None,
                None => tokio::select! {
                    _ = shutdown.cancelled() => { consumer = Some(current); break 'outer Ok(()) }
                    s = self.slots.acquire() => Some(s),
                },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => { consumer = Some(current); break 'outer Ok(()) }
                n = I::next(&mut current) => n,
            };
            match next {
                None => {
                    // The consumer closed under us: start a new one, unless
                    // the bus itself is gone (the next `consume` says so).
                    drop(current);
                    failures += 1;
                    tracing::warn!(%queue, "consumer closed; restarting it");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer Ok(()),
                        _ = tokio::time::sleep(backoff.delay(failures)) => {}
                    }
                }
                Some(Err(e)) => {
                    failures += 1;
                    tracing::warn!(%queue, error = %e, "consume error");
                    consumer = Some(current);
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer Ok(()),
                        _ = tokio::time::sleep(backoff.delay(failures)) => {}
                    }
                }
                Some(Ok((input, delivery))) => {
                    failures = 0;
                    consumer = Some(current);
                    let job = Job {
                        state: state.clone(),
                        handler: handler.clone(),
                        slots: self.slots.clone(),
                        shutdown: shutdown.clone(),
                        hard_stop: hard_stop.clone(),
                        backoff,
                        extend_every: extend_every(options.ack_wait),
                    };
                    tracker.spawn(job.run(input, delivery, slot));
                }
            }
        };
        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                %queue,
                running = tracker.len(),
                "shutdown grace ran out; handing back unfinished deliveries"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
        // Closing the consumer returns every unsettled delivery to the broker.
        drop(consumer);
        result
    }
}

/// What a loop hands its handlers: a decoded envelope or a raw delivery.
trait Input: Sized + Send + 'static {
    fn next(
        consumer: &mut Consumer,
    ) -> impl Future<Output = Option<BusResult<(Self, Delivery)>>> + Send + '_;
    fn span(&self, delivery: &Delivery) -> tracing::Span;
}

impl Input for Envelope {
    fn next(
        consumer: &mut Consumer,
    ) -> impl Future<Output = Option<BusResult<(Self, Delivery)>>> + Send + '_ {
        consumer.next_envelope()
    }

    fn span(&self, delivery: &Delivery) -> tracing::Span {
        let span = tracing::info_span!(
            "handle",
            kind = self.kind(),
            plan_id = self.plan_id.as_deref().unwrap_or(""),
            path = self.task_id.as_deref().unwrap_or(""),
            attempt = self.attempt,
            delivery_attempt = delivery.attempt,
            queue = %delivery.queue,
        );
        devfleet_telemetry::set_parent(&span, self.traceparent.as_deref());
        span
    }
}

impl Input for RawDelivery {
    async fn next(consumer: &mut Consumer) -> Option<BusResult<(Self, Delivery)>> {
        consumer.next().await.map(|r| {
            r.map(|d| {
                let raw = RawDelivery {
                    payload: d.payload.clone(),
                    queue: d.queue.clone(),
                    attempt: d.attempt,
                    dead_letter: d.dead_letter.clone(),
                };
                (raw, d)
            })
        })
    }

    fn span(&self, delivery: &Delivery) -> tracing::Span {
        tracing::info_span!(
            "handle_raw",
            delivery_attempt = delivery.attempt,
            queue = %delivery.queue,
            bytes = delivery.payload.len(),
        )
    }
}

/// One delivery's task, with what it needs from the loop.
struct Job<S, H> {
    state: Arc<S>,
    handler: Arc<H>,
    slots: Arc<Slots>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    backoff: Backoff,
    extend_every: Duration,
}

impl<S, H> Job<S, H> {
    async fn run<I, Fut>(self, input: I, delivery: Delivery, slot: Option<Slot>)
    where
        I: Input,
        H: Fn(Arc<S>, I, Inflight) -> Fut,
        Fut: Future<Output = Settlement>,
    {
        let span = input.span(&delivery);
        let slot = match slot {
            Some(s) => s,
            None => tokio::select! {
                s = self.slots.acquire() => s,
                _ = self.shutdown.cancelled() => {
                    let _entered = span.enter();
                    tracing::debug!("shutting down: handing back a delivery that waited for a slot");
                    drop(delivery);
                    return;
                }
            },
        };
        let inflight = Inflight::new(delivery, self.backoff);
        let handler = self.handler;
        let hard_stop = self.hard_stop;
        let state = self.state;
        let every = self.extend_every;
        async move {
            let settlement = tokio::select! {
                s = handler(state, input, inflight.clone()) => s,
                _ = hard_stop.cancelled() => Settlement::HandBack("the shutdown grace ran out".into()),
                never = inflight.keep_alive(every) => match never {},
            };
            inflight.finish(settlement).await;
        }
        .instrument(span)
        .await;
        drop(slot);
    }
}

/// Consumes `source` until `shutdown` with a handler that needs nothing
/// but the envelope: [`Consume`] with a fixed concurrency and the default
/// shutdown grace ([`SHUTDOWN_GRACE`]).
pub async fn consume<S, H, Fut>(
    source: Source,
    state: Arc<S>,
    shutdown: CancellationToken,
    handler: H,
) -> anyhow::Result<()>
where
    S: Send + Sync + 'static,
    H: Fn(Arc<S>, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Settlement> + Send + 'static,
{
    Consume::new(source.connections, source.queue)
        .options(source.options)
        .concurrency(source.concurrency)
        .run(state, shutdown, move |s, e, _| handler(s, e))
        .await
}

/// Settles a delivery with [`Backoff::HANDLER`] for retries; see
/// [`settle_with`].
pub async fn settle(delivery: Delivery, settlement: Settlement) {
    settle_with(delivery, settlement, &Backoff::HANDLER).await
}

/// Settles a delivery; a retry waits `backoff`'s delay for its attempt. A
/// failure to settle is logged (the broker redelivers an unsettled
/// message, so handlers must be idempotent).
pub async fn settle_with(delivery: Delivery, settlement: Settlement, backoff: &Backoff) {
    let queue = delivery.queue.clone();
    let attempt = delivery.attempt;
    let result = match settlement {
        Settlement::Ack => delivery.ack().await,
        Settlement::Retry(reason) => {
            tracing::warn!(%reason, attempt, "handler failed; retrying later");
            match delivery.retry(backoff.delay(attempt), &reason).await {
                Ok(RetryOutcome::DeadLettered) => {
                    tracing::error!(%reason, attempt, "gave up; message dead-lettered");
                    Ok(())
                }
                Ok(RetryOutcome::Scheduled) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Settlement::Delay(delay, reason) => {
            tracing::debug!(%reason, ?delay, "redelivering later");
            delivery.retry(delay, &reason).await.map(drop)
        }
        Settlement::DeadLetter(reason) => {
            tracing::error!(%reason, "dead-lettering message");
            delivery.dead_letter(&reason).await
        }
        Settlement::HandBack(reason) => {
            tracing::debug!(%reason, "handing the delivery back unsettled");
            drop(delivery);
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::warn!(%queue, error = %e, "settling a delivery failed; it will be redelivered");
    }
}

/// Dead-letters a message of a kind this queue does not carry.
pub fn unexpected(envelope: &Envelope, queue: &str) -> Settlement {
    Settlement::DeadLetter(format!(
        "unexpected message kind '{}' on {queue}",
        envelope.kind()
    ))
}

#[cfg(test)]
mod tests;
