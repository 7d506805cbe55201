use super::*;
use devfleet_protocol::{queues, Message, TaskDone};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use tokio::sync::{mpsc, Semaphore};

const WITHIN: Duration = Duration::from_secs(10);

fn invalid_state() -> StoreError {
    StoreError::InvalidState {
        plan_id: "p".into(),
        path: "a".into(),
        state: devfleet_store::TaskState::Failed,
        operation: "complete it",
    }
}

// ---- the table, one test per row -------------------------------------------

#[test]
fn row_store_backend_and_connect_errors_retry() {
    assert!(matches!(
        Settlement::from_store_error("x", StoreError::Backend("down".into())),
        Settlement::Retry(_)
    ));
    let connect = StoreError::Connect {
        url: "redis://nowhere".into(),
        reason: "refused".into(),
    };
    assert!(matches!(
        Settlement::from_store_error("x", connect),
        Settlement::Retry(_)
    ));
}

#[test]
fn row_store_invalid_state_is_stale_and_acked() {
    assert_eq!(
        Settlement::from_store_error("x", invalid_state()),
        Settlement::Ack
    );
    let step: StepError = invalid_state().into();
    assert_eq!(step.settlement("x"), Settlement::Ack);
}

#[test]
fn row_other_store_errors_dead_letter() {
    let others = [
        StoreError::UnknownTask {
            plan_id: "p".into(),
            path: "a".into(),
        },
        StoreError::UnknownPlan {
            plan_id: "p".into(),
        },
        StoreError::Corrupt {
            key: "k".into(),
            reason: "bad json".into(),
        },
    ];
    for e in others {
        assert!(matches!(
            Settlement::from_store_error("x", e),
            Settlement::DeadLetter(_)
        ));
    }
}

#[test]
fn row_publish_errors_retry() {
    let publish = StepError::Publish(anyhow::anyhow!("no confirm"));
    assert_eq!(
        publish.settlement("publishing"),
        Settlement::Retry("publishing: no confirm".into())
    );
    let store: StepError = StoreError::Backend("down".into()).into();
    assert!(matches!(store.settlement("x"), Settlement::Retry(_)));
}

#[test]
fn row_invalid_messages_dead_letter() {
    assert_eq!(
        StepError::Invalid("no such shard".into()).settlement("routing"),
        Settlement::DeadLetter("routing: no such shard".into())
    );
}

#[test]
fn row_unexpected_kinds_dead_letter() {
    let envelope = Envelope::new(done("a"));
    assert!(matches!(
        unexpected(&envelope, queues::WORK_QA),
        Settlement::DeadLetter(_)
    ));
}

#[tokio::test]
async fn row_hand_back_leaves_the_delivery_to_be_redelivered() {
    let connections = Connections::in_memory().with_namespace("hand-back");
    connections
        .publish(queues::TASK_DONE, done("a"))
        .await
        .unwrap();
    let mut consumer = connections
        .consume(queues::TASK_DONE, ConsumeOptions::default())
        .await
        .unwrap();
    let (_, delivery) = consumer.next_envelope().await.unwrap().unwrap();
    settle(delivery, Settlement::HandBack("not mine".into())).await;
    let again = tokio::time::timeout(WITHIN, consumer.next_envelope())
        .await
        .expect("handed back, so redelivered")
        .unwrap()
        .unwrap();
    let Message::TaskDone(d) = again.0.message else {
        panic!("a task.done")
    };
    assert_eq!(d.path, "a");
}

// ---- the loop --------------------------------------------------------------

fn done(path: &str) -> TaskDone {
    TaskDone {
        plan_id: "p".into(),
        path: path.into(),
        attempt: 1,
        artifact: String::new(),
    }
}

async fn publish_done(connections: &Connections, paths: &[&str]) {
    for path in paths {
        connections
            .publish(queues::TASK_DONE, done(path))
            .await
            .unwrap();
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    tokio::time::timeout(WITHIN, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn drained(connections: &Connections) {
    tokio::time::timeout(WITHIN, async {
        while connections.queue_depth(queues::TASK_DONE).await.unwrap() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the queue to drain");
}

/// The path of the next task.done in the queue, read by a fresh consumer,
/// or `None` if nothing arrives within `wait`.
async fn next_path(connections: &Connections, wait: Duration) -> Option<String> {
    let mut consumer = connections
        .consume(queues::TASK_DONE, ConsumeOptions::default())
        .await
        .unwrap();
    let (envelope, delivery) = tokio::time::timeout(wait, consumer.next_envelope())
        .await
        .ok()?
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    match envelope.message {
        Message::TaskDone(d) => Some(d.path),
        _ => None,
    }
}

#[tokio::test]
async fn loop_settles_each_envelope_and_stops_on_shutdown() {
    let connections = Connections::in_memory().with_namespace("consume-test");
    publish_done(&connections, &["a", "b"]).await;
    let (seen, mut rx) = mpsc::unbounded_channel::<String>();
    let shutdown = CancellationToken::new();
    let source = Source {
        connections: connections.clone(),
        queue: queues::TASK_DONE,
        options: ConsumeOptions::default(),
        concurrency: 2,
    };
    let running = tokio::spawn(consume(
        source,
        Arc::new(seen),
        shutdown.clone(),
        |seen: Arc<mpsc::UnboundedSender<String>>, envelope: Envelope| async move {
            let Message::TaskDone(done) = envelope.message else {
                return unexpected(&envelope, queues::TASK_DONE);
            };
            let _ = seen.send(done.path.clone());
            if done.path == "a" {
                Settlement::Ack
            } else {
                Settlement::DeadLetter("b is never done".into())
            }
        },
    ));
    let mut paths = Vec::new();
    for _ in 0..2 {
        let path = tokio::time::timeout(WITHIN, rx.recv()).await.unwrap();
        paths.extend(path);
    }
    paths.sort();
    assert_eq!(paths, ["a", "b"]);
    drained(&connections).await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(WITHIN, running).await.unwrap();
    assert!(stopped.unwrap().is_ok());
}

/// Handlers that count themselves running and wait for a permit of `gate`.
struct Gated {
    running: AtomicU32,
    gate: Semaphore,
    calls: AtomicU32,
}

impl Gated {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            running: AtomicU32::new(0),
            gate: Semaphore::new(0),
            calls: AtomicU32::new(0),
        })
    }
    fn running(&self) -> u32 {
        self.running.load(Ordering::SeqCst)
    }
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn gated(g: Arc<Gated>, _envelope: Envelope, _inflight: Inflight) -> Settlement {
    g.calls.fetch_add(1, Ordering::SeqCst);
    g.running.fetch_add(1, Ordering::SeqCst);
    if let Ok(p) = g.gate.acquire().await {
        p.forget();
    }
    g.running.fetch_sub(1, Ordering::SeqCst);
    Settlement::Ack
}

#[tokio::test]
async fn resizing_the_slots_changes_how_many_handlers_run_at_once() {
    let connections = Connections::in_memory().with_namespace("resize");
    publish_done(&connections, &["a", "b", "c", "d", "e", "f"]).await;
    let g = Gated::new();
    let slots = Slots::new(1);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Consume::new(connections.clone(), queues::TASK_DONE)
            .slots(slots.clone())
            .read_ahead(6)
            .run(g.clone(), shutdown.clone(), gated),
    );
    eventually("one handler and five waiting", || {
        g.running() == 1 && slots.snapshot().waiting == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(g.running(), 1, "one slot runs one handler");

    slots.set_capacity(3);
    eventually("three handlers", || g.running() == 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(g.running(), 3, "three slots run three handlers");
    assert_eq!(
        slots.snapshot(),
        SlotCounts {
            capacity: 3,
            busy: 3,
            waiting: 3
        }
    );

    // Shrinking keeps the running ones; the next start only once they
    // are down to the new size.
    slots.set_capacity(1);
    g.gate.add_permits(1);
    eventually("two still running", || g.running() == 2 && g.calls() == 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(g.calls(), 3, "no start while over the shrunk capacity");
    g.gate.add_permits(2);
    eventually("the fourth handler", || g.calls() == 4).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(g.running(), 1, "one at a time again");
    g.gate.add_permits(3);
    eventually("all six handled", || g.calls() == 6 && g.running() == 0).await;
    shutdown.cancel();
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn without_read_ahead_a_delivery_is_only_taken_into_a_free_slot() {
    let connections = Connections::in_memory().with_namespace("credit");
    publish_done(&connections, &["a", "b", "c"]).await;
    let g = Gated::new();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Consume::new(connections.clone(), queues::TASK_DONE)
            .concurrency(1)
            .run(g.clone(), shutdown.clone(), gated),
    );
    eventually("one handler", || g.running() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        connections.queue_depth(queues::TASK_DONE).await.unwrap(),
        2,
        "the others stay in the queue for other consumers"
    );
    g.gate.add_permits(3);
    drained(&connections).await;
    shutdown.cancel();
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn raw_mode_hands_over_undecodable_payloads() {
    let connections = Connections::in_memory().with_namespace("raw");
    let queue = connections.queue(queues::TASK_DONE);
    connections
        .bus
        .publish(&queue, b"not an envelope")
        .await
        .unwrap();
    let (seen, mut rx) = mpsc::unbounded_channel::<RawDelivery>();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Consume::new(connections.clone(), queues::TASK_DONE).run_raw(
            Arc::new(seen),
            shutdown.clone(),
            |seen: Arc<mpsc::UnboundedSender<RawDelivery>>, raw, _| async move {
                let _ = seen.send(raw);
                Settlement::Ack
            },
        ),
    );
    let raw = tokio::time::timeout(WITHIN, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&raw.payload[..], b"not an envelope");
    assert_eq!(raw.queue, queue);
    assert_eq!(raw.attempt, 1);
    assert!(raw.dead_letter.is_none());
    drained(&connections).await;
    let dlq = connections
        .queue_depth(devfleet_bus::DEAD_LETTER_QUEUE)
        .await
        .unwrap();
    assert_eq!(
        dlq, 0,
        "raw mode does not dead-letter what it cannot decode"
    );
    shutdown.cancel();
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_early_settlement_is_the_only_one() {
    let connections = Connections::in_memory().with_namespace("early");
    publish_done(&connections, &["a"]).await;
    let calls = Arc::new(AtomicU32::new(0));
    let (second, mut second_rx) = mpsc::unbounded_channel::<bool>();
    let shutdown = CancellationToken::new();
    let quick_retry = Backoff {
        base: Duration::from_millis(1),
        factor: 1.0,
        cap: Duration::from_millis(1),
        jitter: 0.0,
    };
    let running = tokio::spawn({
        let calls = calls.clone();
        Consume::new(connections.clone(), queues::TASK_DONE)
            .backoff(quick_retry)
            .run(
                Arc::new(second),
                shutdown.clone(),
                move |second: Arc<mpsc::UnboundedSender<bool>>, _envelope, inflight: Inflight| {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        assert!(inflight.settle_now(Settlement::Ack).await);
                        let _ = second.send(inflight.settle_now(Settlement::Ack).await);
                        // Would redeliver at once, were it not settled already.
                        Settlement::Retry("too late".into())
                    }
                },
            )
    });
    let again = tokio::time::timeout(WITHIN, second_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!again, "a second early settlement is refused");
    drained(&connections).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "acked once, never retried");
    shutdown.cancel();
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        next_path(&connections, Duration::from_millis(100)).await,
        None
    );
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_handlers_before_closing_the_consumer() {
    let connections = Connections::in_memory().with_namespace("drain");
    publish_done(&connections, &["a", "b"]).await;
    let g = Gated::new();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Consume::new(connections.clone(), queues::TASK_DONE)
            .concurrency(2)
            .run(g.clone(), shutdown.clone(), gated),
    );
    eventually("two handlers", || g.running() == 2).await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!running.is_finished(), "in-flight handlers are waited for");
    g.gate.add_permits(2);
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(g.calls(), 2);
    assert_eq!(
        next_path(&connections, Duration::from_millis(200)).await,
        None,
        "both were acked before the consumer closed: nothing is redelivered"
    );
}

#[tokio::test]
async fn after_the_grace_period_unfinished_work_is_handed_back() {
    let connections = Connections::in_memory().with_namespace("grace");
    publish_done(&connections, &["a", "b", "c"]).await;
    let g = Gated::new();
    let slots = Slots::new(1);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Consume::new(connections.clone(), queues::TASK_DONE)
            .slots(slots.clone())
            .read_ahead(3)
            .grace(Duration::from_millis(100))
            .run(g.clone(), shutdown.clone(), gated),
    );
    eventually("one running, two waiting", || {
        g.running() == 1 && slots.snapshot().waiting == 2
    })
    .await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the loop stops once the grace ran out");
    stopped.unwrap().unwrap();
    assert_eq!(g.calls(), 1, "waiting deliveries are not started");
    assert_eq!(
        slots.snapshot(),
        SlotCounts {
            capacity: 1,
            busy: 0,
            waiting: 0
        }
    );
    let mut redelivered = Vec::new();
    while let Some(path) = next_path(&connections, Duration::from_millis(500)).await {
        redelivered.push(path);
    }
    redelivered.sort();
    assert_eq!(
        redelivered,
        ["a", "b", "c"],
        "the unfinished and the waiting ones are all handed back"
    );
}

#[tokio::test]
async fn a_grace_of_zero_hands_running_work_back_at_once() {
    let connections = Connections::in_memory().with_namespace("no-grace");
    publish_done(&connections, &["a"]).await;
    let g = Gated::new();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Consume::new(connections.clone(), queues::TASK_DONE)
            .grace(Duration::ZERO)
            .run(g.clone(), shutdown.clone(), gated),
    );
    eventually("the handler", || g.running() == 1).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(1), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        next_path(&connections, WITHIN).await.as_deref(),
        Some("a"),
        "redelivered"
    );
}

#[tokio::test]
async fn slots_wait_for_a_release_and_follow_resizes() {
    let slots = Slots::new(1);
    let first = slots.acquire().await;
    let waiting = tokio::spawn({
        let slots = slots.clone();
        async move { slots.acquire().await }
    });
    eventually("a waiter", || slots.snapshot().waiting == 1).await;
    assert!(!waiting.is_finished());
    slots.set_capacity(2);
    let second = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        slots.snapshot(),
        SlotCounts {
            capacity: 2,
            busy: 2,
            waiting: 0
        }
    );
    slots.set_capacity(1);
    drop(first);
    let third = tokio::spawn({
        let slots = slots.clone();
        async move { slots.acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !third.is_finished(),
        "a shrunk pool must not hand out a slot"
    );
    drop(second);
    tokio::time::timeout(Duration::from_secs(1), third)
        .await
        .unwrap()
        .unwrap();
}

// ---- long work vs the broker's deadline ------------------------------------

/// What the loop did to the deliveries of a [`Tracked`] bus, in order.
type Log = Arc<Mutex<Vec<&'static str>>>;

fn entries(log: &Log) -> Vec<&'static str> {
    log.lock().unwrap().clone()
}

/// A memory bus whose deliveries claim `deadline` and log what the loop
/// does to them (extend, ack, ...), so the settlement logic can be
/// checked without a broker's clock.
struct Tracked {
    inner: devfleet_bus::memory::MemoryBus,
    deadline: Deadline,
    log: Log,
}

struct TrackedStream {
    inner: Consumer,
    deadline: Deadline,
    log: Log,
}

struct TrackedSettle {
    inner: Delivery,
    deadline: Deadline,
    log: Log,
}

impl TrackedSettle {
    fn note(&self, what: &'static str) {
        self.log.lock().unwrap().push(what);
    }
}

#[async_trait::async_trait]
impl devfleet_bus::Settle for TrackedSettle {
    fn deadline(&self) -> Deadline {
        self.deadline
    }
    async fn extend(&self) -> BusResult<()> {
        self.note("extend");
        Ok(())
    }
    async fn ack(self: Box<Self>) -> BusResult<()> {
        self.note("ack");
        self.inner.ack().await
    }
    async fn redeliver(self: Box<Self>, delay: Duration, _next: u32) -> BusResult<()> {
        self.note("redeliver");
        self.inner.retry(delay, "retry").await.map(drop)
    }
    async fn dead_letter(self: Box<Self>, info: DeadLetterInfo) -> BusResult<()> {
        self.note("dead_letter");
        self.inner.dead_letter(&info.reason).await
    }
}

#[async_trait::async_trait]
impl devfleet_bus::DeliveryStream for TrackedStream {
    async fn next(&mut self) -> Option<BusResult<Delivery>> {
        let delivery = match self.inner.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(Delivery::new(
            delivery.queue.clone(),
            delivery.payload.clone(),
            delivery.attempt,
            delivery.dead_letter.clone(),
            0,
            Box::new(TrackedSettle {
                inner: delivery,
                deadline: self.deadline,
                log: self.log.clone(),
            }),
        )))
    }
}

#[async_trait::async_trait]
impl devfleet_bus::Bus for Tracked {
    fn backend(&self) -> &'static str {
        "tracked"
    }
    async fn publish(&self, queue: &str, payload: &[u8]) -> BusResult<()> {
        self.inner.publish(queue, payload).await
    }
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> BusResult<Consumer> {
        let inner = self.inner.consume(queue, options).await?;
        Ok(Consumer::new(
            queue,
            Box::new(TrackedStream {
                inner,
                deadline: self.deadline,
                log: self.log.clone(),
            }),
        ))
    }
    async fn queue_depth(&self, queue: &str) -> BusResult<u64> {
        self.inner.queue_depth(queue).await
    }
    async fn purge(&self, queue: &str) -> BusResult<u64> {
        self.inner.purge(queue).await
    }
    async fn broadcast(&self, subject: &str, payload: &[u8]) -> BusResult<()> {
        self.inner.broadcast(subject, payload).await
    }
    async fn listen(&self, pattern: &str) -> BusResult<devfleet_bus::Listener> {
        self.inner.listen(pattern).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

fn tracked(deadline: Deadline) -> (Connections, Log) {
    let log = Log::default();
    let bus: devfleet_bus::SharedBus = Arc::new(Tracked {
        inner: devfleet_bus::memory::MemoryBus::new(),
        deadline,
        log: log.clone(),
    });
    let connections = Connections {
        broadcast: bus.clone(),
        bus,
        ..Connections::in_memory()
    };
    (connections, log)
}

/// Runs one handler over a tracked bus with `ack_wait`; returns the log
/// once the handler ran, its delivery was settled and the loop stopped.
async fn run_tracked<F, Fut>(deadline: Deadline, ack_wait: Duration, handler: F) -> (Log, u32)
where
    F: Fn(Log, Inflight) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Settlement> + Send + 'static,
{
    let (connections, log) = tracked(deadline);
    publish_done(&connections, &["a"]).await;
    let calls = Arc::new(AtomicU32::new(0));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let calls = calls.clone();
        let handler = Arc::new(handler);
        Consume::new(connections.clone(), queues::TASK_DONE)
            .options(ConsumeOptions::default().ack_wait(ack_wait))
            .run(
                Arc::new(log.clone()),
                shutdown.clone(),
                move |log, _, inflight| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    handler.clone()(Log::clone(&log), inflight)
                },
            )
    });
    eventually("the delivery to be settled", || {
        entries(&log)
            .iter()
            .any(|e| ["ack", "redeliver", "dead_letter"].contains(e))
    })
    .await;
    drained(&connections).await;
    shutdown.cancel();
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (log, calls.load(Ordering::SeqCst))
}

#[tokio::test]
async fn an_extendable_delivery_is_extended_while_its_handler_runs_and_then_settled() {
    let (log, calls) = run_tracked(
        Deadline::Extendable,
        Duration::from_millis(300),
        |log, inflight: Inflight| async move {
            // Work "longer than ack_wait": until the loop extended three times.
            eventually("three extensions", || {
                entries(&log).iter().filter(|e| **e == "extend").count() >= 3
            })
            .await;
            assert!(!inflight.guarded().await, "an extendable delivery is kept");
            Settlement::Ack
        },
    )
    .await;
    let log = entries(&log);
    assert_eq!(calls, 1);
    assert_eq!(log.last(), Some(&"ack"), "{log:?}");
    assert_eq!(log.iter().filter(|e| **e == "ack").count(), 1, "{log:?}");
    assert!(log.iter().all(|e| ["extend", "ack"].contains(e)), "{log:?}");
}

#[tokio::test]
async fn a_guarded_delivery_on_a_fixed_deadline_is_acked_at_once_and_never_extended() {
    let (log, calls) = run_tracked(
        Deadline::Fixed,
        Duration::from_millis(300),
        |log, inflight: Inflight| async move {
            assert!(entries(&log).is_empty(), "nothing settled before the claim");
            assert!(inflight.guarded().await, "settled early");
            assert_eq!(entries(&log), ["ack"], "acked as soon as guarded");
            assert!(!inflight.guarded().await, "only once");
            // Later failures do not redeliver it: the store's lease redoes
            // the work if this worker dies.
            Settlement::Retry("after the early ack".into())
        },
    )
    .await;
    assert_eq!(calls, 1);
    assert_eq!(entries(&log), ["ack"]);
}

#[tokio::test]
async fn a_guard_timer_settles_only_work_that_outlives_it() {
    // Long work: the timer fires while the handler still runs.
    let (log, calls) = run_tracked(
        Deadline::Fixed,
        Duration::from_millis(300),
        |log, inflight: Inflight| async move {
            let _guard = inflight.guard_after(Duration::from_millis(50));
            eventually("the timer to settle the delivery", || {
                entries(&log) == ["ack"]
            })
            .await;
            Settlement::Retry("after the early ack".into())
        },
    )
    .await;
    assert_eq!(calls, 1);
    assert_eq!(entries(&log), ["ack"]);
    // Short work: the handler's own settlement applies, the timer is gone.
    let (log, calls) = run_tracked(
        Deadline::Fixed,
        Duration::from_millis(300),
        |log, inflight: Inflight| async move {
            let guard = inflight.guard_after(Duration::from_millis(200));
            drop(guard);
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(entries(&log).is_empty(), "{:?}", entries(&log));
            Settlement::DeadLetter("bad".into())
        },
    )
    .await;
    assert_eq!(calls, 1);
    assert_eq!(entries(&log), ["dead_letter"]);
}

#[tokio::test]
async fn without_guard_a_fixed_deadline_delivery_is_settled_by_the_handler() {
    let (log, calls) = run_tracked(
        Deadline::Fixed,
        Duration::from_millis(300),
        |log, _inflight: Inflight| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(entries(&log).is_empty(), "{:?}", entries(&log));
            Settlement::DeadLetter("bad".into())
        },
    )
    .await;
    assert_eq!(calls, 1);
    assert_eq!(entries(&log), ["dead_letter"]);
}

#[test]
fn extensions_come_three_times_per_ack_wait() {
    assert_eq!(
        extend_every(Duration::from_secs(30)),
        Duration::from_secs(10)
    );
    assert_eq!(
        extend_every(Duration::from_millis(30)),
        Duration::from_millis(100)
    );
    assert_eq!(extend_every(Duration::ZERO), Duration::from_secs(10));
}

/// On a real NATS server: a handler working three times its queue's
/// `ack_wait` runs once, and its delivery is acked.
#[tokio::test]
async fn on_nats_a_handler_longer_than_ack_wait_runs_exactly_once() {
    let url = std::env::var("DEVFLEET_NATS_URL").expect("DEVFLEET_NATS_URL (scripts/servers.sh)");
    let bus = devfleet_bus::connect(&url).await.expect("NATS");
    let connections = Connections {
        broadcast: bus.clone(),
        bus,
        ..Connections::in_memory()
    }
    .with_namespace(format!("long-{}", std::process::id()));
    connections
        .bus
        .purge(&connections.queue(queues::TASK_DONE))
        .await
        .ok();
    publish_done(&connections, &["long"]).await;
    let calls = Arc::new(AtomicU32::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let calls = calls.clone();
        Consume::new(connections.clone(), queues::TASK_DONE)
            .options(ConsumeOptions::default().ack_wait(Duration::from_secs(1)))
            .concurrency(2)
            .run(Arc::new(done_tx), shutdown.clone(), move |done, _, _| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let _ = done.send(());
                    Settlement::Ack
                }
            })
    });
    tokio::time::timeout(WITHIN, done_rx.recv())
        .await
        .expect("the handler to finish")
        .expect("the loop to run");
    tokio::time::timeout(WITHIN, async {
        while connections.queue_depth(queues::TASK_DONE).await.unwrap() != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the queue to drain");
    shutdown.cancel();
    tokio::time::timeout(WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "ran exactly once");
}

/// Every loop drains within a bounded time on shutdown unless its service
/// sets its own grace (scale-in: Kubernetes kills the pod after its
/// `terminationGracePeriodSeconds`, which validate-deploy checks against
/// this).
#[test]
fn a_loop_without_a_grace_of_its_own_gets_the_default_shutdown_grace() {
    let connections = Connections::in_memory();
    assert_eq!(
        Consume::new(connections.clone(), queues::TASK_DONE).grace,
        SHUTDOWN_GRACE
    );
    assert_eq!(
        Consume::new(connections, queues::TASK_DONE)
            .grace(Duration::ZERO)
            .grace,
        Duration::ZERO
    );
    assert!(
        SHUTDOWN_GRACE < Duration::from_secs(30),
        "below Kubernetes' default"
    );
}
