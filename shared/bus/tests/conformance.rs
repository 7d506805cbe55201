//! The bus conformance suite: one set of behaviours every backend must
//! show, written once as generic test functions over a [`SharedBus`].
//!
//! [`conformance_suite!`] turns the whole list into `#[tokio::test]`s for
//! one backend, in a module named after it (`memory::…`, `amqp::…`). To add
//! a backend, write an `async fn` returning something `Into<TestBus>` and
//! invoke the macro once (see "Backends" at the bottom).
//!
//! Real-server tests take their URLs from the environment
//! (`scripts/test.sh` exports them) and fail, never skip, without them.
//! Tests name their queues with [`TestBus::queue`], so a broker backend can
//! delete them once the test passed ([`TestBus::with_cleanup`]).
//! Tests whose names contain `restart` restart a shared broker; the test
//! script runs them alone, and [`gate`] keeps them from cutting the
//! broker away under other tests of this file if they do run together.

use bytes::Bytes;
use devfleet_bus::{
    Bus, BusError, ConsumeOptions, Consumer, DeadLetterInfo, Delivery, RetryOutcome, SharedBus,
    DEAD_LETTER_QUEUE, MAX_PAYLOAD_BYTES,
};
use devfleet_protocol::{messages::PlanRejected, Envelope};
use devfleet_testkit::{unique, wait_for, within};
use futures::future::BoxFuture;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(30);

/// How long a consumer must stay quiet to show nothing more is coming.
const QUIET: Duration = Duration::from_millis(500);

/// Prefix of every queue this suite creates; also marks stale dead letters.
const QUEUE_PREFIX: &str = "conf";

/// Removes the queues a test used, for backends whose queues outlive the
/// test (brokers). Gets the names [`TestBus::queue`] handed out.
pub type Cleanup = Arc<dyn Fn(Vec<String>) -> BoxFuture<'static, ()> + Send + Sync>;

/// A bus under test, plus whatever must live as long as the test and what
/// to clean up after it.
pub struct TestBus {
    bus: SharedBus,
    queues: Arc<Mutex<Vec<String>>>,
    cleanup: Option<Cleanup>,
    _hold: Option<Box<dyn Send>>,
}

impl TestBus {
    /// A bus that keeps `hold` (e.g. a [`gate::Shared`]) alive until the
    /// test ends.
    pub fn holding(bus: SharedBus, hold: impl Send + 'static) -> Self {
        TestBus {
            _hold: Some(Box::new(hold)),
            ..TestBus::from(bus)
        }
    }

    /// Runs `cleanup` with the test's queues once the test passed.
    pub fn with_cleanup(mut self, cleanup: Cleanup) -> Self {
        self.cleanup = Some(cleanup);
        self
    }

    /// A queue name no other test uses, cleaned up after the test.
    pub fn queue(&self) -> String {
        let name = unique(QUEUE_PREFIX);
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        name
    }

    /// `name`, cleaned up after the test like [`TestBus::queue`]'s.
    pub fn named(&self, name: String) -> String {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        name
    }

    /// What to run after the test, kept apart from the bus because the
    /// test consumes the bus.
    fn finisher(&self) -> impl std::future::Future<Output = ()> {
        let queues = self.queues.clone();
        let cleanup = self.cleanup.clone();
        async move {
            let names = std::mem::take(&mut *queues.lock().unwrap_or_else(|e| e.into_inner()));
            if let Some(cleanup) = cleanup {
                cleanup(names).await;
            }
        }
    }
}

impl From<SharedBus> for TestBus {
    fn from(bus: SharedBus) -> Self {
        TestBus {
            bus,
            queues: Arc::default(),
            cleanup: None,
            _hold: None,
        }
    }
}

impl std::ops::Deref for TestBus {
    type Target = SharedBus;
    fn deref(&self) -> &SharedBus {
        &self.bus
    }
}

/// Options used throughout: a short `ack_wait`, so backends that detect a
/// dead consumer by time (NATS) redeliver quickly; others ignore it.
fn options() -> ConsumeOptions {
    ConsumeOptions::default().ack_wait(Duration::from_secs(2))
}

async fn next(consumer: &mut Consumer) -> Delivery {
    within("the next delivery", SOON, consumer.next())
        .await
        .expect("consumer closed unexpectedly")
        .expect("consumer returned an error")
}

/// Asserts the consumer delivers nothing for [`QUIET`].
async fn assert_quiet(consumer: &mut Consumer, why: &str) {
    if let Ok(Some(item)) = tokio::time::timeout(QUIET, consumer.next()).await {
        panic!("{why}: got {item:?}");
    }
}

async fn wait_for_depth(bus: &SharedBus, queue: &str, depth: u64) {
    wait_for(&format!("depth of {queue} to be {depth}"), SOON, || async {
        (bus.queue_depth(queue).await.expect("queue_depth") == depth).then_some(())
    })
    .await
}

/// Finds this test's dead letter in the shared dead-letter queue and acks
/// it. Others' dead letters are held until then and handed back; stale ones
/// from earlier runs of this suite are cleared.
async fn take_dead_letter(bus: &SharedBus, queue: &str, payload: &[u8]) -> (DeadLetterInfo, u32) {
    let mut dlq = bus
        .consume(DEAD_LETTER_QUEUE, options().prefetch(1000))
        .await
        .expect("consume the dead-letter queue");
    let mut others = Vec::new();
    let stale_before = devfleet_protocol::now_ms() - 10 * 60 * 1000;
    let found = within(
        &format!("the dead letter from {queue}"),
        Duration::from_secs(60),
        async {
            loop {
                let delivery = next(&mut dlq).await;
                match delivery.dead_letter.clone() {
                    Some(info) if info.queue == queue && delivery.payload == payload => {
                        let attempt = delivery.attempt;
                        delivery.ack().await.expect("ack the dead letter");
                        return (info, attempt);
                    }
                    Some(info)
                        if info.queue.starts_with(QUEUE_PREFIX) && info.at_ms < stale_before =>
                    {
                        let _ = delivery.ack().await;
                    }
                    _ => others.push(delivery),
                }
            }
        },
    )
    .await;
    drop(others);
    found
}

// ---------------------------------------------------------------------------
// The behaviours
// ---------------------------------------------------------------------------

/// A published message is delivered once, as attempt 1, and an ack removes
/// it for good.
pub async fn publish_consume_ack_round_trip(bus: TestBus) {
    let queue = bus.queue();
    bus.publish(&queue, b"hello").await.expect("publish");
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.payload, Bytes::from_static(b"hello"));
    assert_eq!(delivery.queue, queue);
    assert_eq!(delivery.attempt, 1);
    assert!(delivery.dead_letter.is_none());
    delivery.ack().await.expect("ack");
    drop(consumer);

    let mut consumer = bus.consume(&queue, options()).await.expect("consume again");
    assert_quiet(&mut consumer, "an acked message came back").await;
    wait_for_depth(&bus, &queue, 0).await;
}

/// Two consumers on one queue share its messages; each gets each message
/// at most once.
pub async fn competing_consumers_split_the_messages(bus: TestBus) {
    let queue = bus.queue();
    let mut a = bus
        .consume(&queue, options().prefetch(5))
        .await
        .expect("consume a");
    let mut b = bus
        .consume(&queue, options().prefetch(5))
        .await
        .expect("consume b");
    let sent: BTreeSet<String> = (0..10).map(|i| format!("m{i}")).collect();
    for m in &sent {
        bus.publish(&queue, m.as_bytes()).await.expect("publish");
    }
    // Neither may hold more than 5 unsettled, so holding all 10 needs both.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(("a", next(&mut a).await));
    }
    for _ in 0..5 {
        held.push(("b", next(&mut b).await));
    }
    let got: BTreeSet<String> = held
        .iter()
        .map(|(_, d)| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    assert_eq!(
        got, sent,
        "every message exactly once across both consumers"
    );
    for (_, delivery) in held {
        delivery.ack().await.expect("ack");
    }
    assert_quiet(&mut a, "consumer a got a message twice").await;
    assert_quiet(&mut b, "consumer b got a message twice").await;
    wait_for_depth(&bus, &queue, 0).await;
}

/// A consumer never holds more unsettled deliveries than its prefetch;
/// settling one lets the next through.
pub async fn prefetch_bounds_unsettled_deliveries(bus: TestBus) {
    let queue = bus.queue();
    for i in 0..5 {
        bus.publish(&queue, format!("m{i}").as_bytes())
            .await
            .expect("publish");
    }
    let mut consumer = bus
        .consume(&queue, options().prefetch(2))
        .await
        .expect("consume");
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    assert_quiet(&mut consumer, "a third delivery beyond prefetch 2").await;
    wait_for_depth(&bus, &queue, 3).await;

    first.ack().await.expect("ack");
    let third = next(&mut consumer).await;
    for delivery in [second, third] {
        delivery.ack().await.expect("ack");
    }
    for _ in 0..2 {
        next(&mut consumer).await.ack().await.expect("ack");
    }
    wait_for_depth(&bus, &queue, 0).await;
}

/// Dropping a consumer hands its unsettled deliveries to another consumer,
/// as the next attempt; the dropped consumer's delivery can no longer be
/// acked.
pub async fn dropped_consumer_redelivers_its_unsettled_messages(bus: TestBus) {
    let queue = bus.queue();
    bus.publish(&queue, b"work").await.expect("publish");
    let mut first = bus.consume(&queue, options()).await.expect("consume");
    let stale = next(&mut first).await;
    assert_eq!(stale.attempt, 1);
    drop(first);

    let mut second = bus.consume(&queue, options()).await.expect("consume again");
    let again = next(&mut second).await;
    assert_eq!(again.payload, Bytes::from_static(b"work"));
    assert_eq!(again.attempt, 2, "a redelivery counts as the next attempt");
    assert!(
        stale.ack().await.is_err(),
        "acking a delivery of a dropped consumer must fail: it was redelivered"
    );
    again.ack().await.expect("ack");
    assert_quiet(&mut second, "an acked message came back").await;
}

/// `next()` may be cancelled (a `select!` or timeout around it) without
/// losing or delaying a message.
pub async fn cancelled_next_loses_no_message(bus: TestBus) {
    let queue = bus.queue();
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    for _ in 0..5 {
        let waited = tokio::time::timeout(Duration::from_millis(20), consumer.next()).await;
        assert!(waited.is_err(), "nothing was published yet: {waited:?}");
    }
    bus.publish(&queue, b"after cancels")
        .await
        .expect("publish");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.payload, Bytes::from_static(b"after cancels"));
    assert_eq!(delivery.attempt, 1);
    delivery.ack().await.expect("ack");
}

/// A delivery dropped without being settled comes back as the next attempt.
pub async fn dropped_delivery_is_redelivered(bus: TestBus) {
    let queue = bus.queue();
    bus.publish(&queue, b"work").await.expect("publish");
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.attempt, 1);
    drop(delivery);
    let again = next(&mut consumer).await;
    assert_eq!(again.payload, Bytes::from_static(b"work"));
    assert_eq!(again.attempt, 2);
    again.ack().await.expect("ack");
}

/// A retry comes back no sooner than its delay, as the next attempt.
pub async fn retry_waits_at_least_its_delay(bus: TestBus) {
    let queue = bus.queue();
    let delay = Duration::from_millis(700);
    bus.publish(&queue, b"later").await.expect("publish");
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    let retried_at = Instant::now();
    let outcome = delivery.retry(delay, "not yet").await.expect("retry");
    assert_eq!(outcome, RetryOutcome::Scheduled);
    let again = next(&mut consumer).await;
    let waited = retried_at.elapsed();
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert!(
        waited < Duration::from_secs(20),
        "redelivered only after {waited:?}"
    );
    assert_eq!(again.payload, Bytes::from_static(b"later"));
    assert_eq!(again.attempt, 2);
    again.ack().await.expect("ack");
    assert_quiet(&mut consumer, "an acked retry came back").await;
}

/// A retry on the last allowed attempt dead-letters the message with the
/// last error and its origin queue.
pub async fn retries_past_max_attempts_are_dead_lettered(bus: TestBus) {
    let queue = bus.queue();
    let payload = format!("poison-{queue}");
    bus.publish(&queue, payload.as_bytes())
        .await
        .expect("publish");
    let mut consumer = bus
        .consume(&queue, options().max_attempts(3))
        .await
        .expect("consume");
    for attempt in 1..=3u32 {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.attempt, attempt);
        let outcome = delivery
            .retry(
                Duration::from_millis(100),
                &format!("boom on attempt {attempt}"),
            )
            .await
            .expect("retry");
        let expected = if attempt < 3 {
            RetryOutcome::Scheduled
        } else {
            RetryOutcome::DeadLettered
        };
        assert_eq!(outcome, expected, "attempt {attempt}");
    }
    let (info, _) = take_dead_letter(&bus, &queue, payload.as_bytes()).await;
    assert_eq!(info.queue, queue);
    assert_eq!(info.attempts, 3);
    assert!(
        info.reason.contains("boom on attempt 3"),
        "reason: {}",
        info.reason
    );
    assert!(info.at_ms > 0);
    assert_quiet(&mut consumer, "a dead-lettered message came back").await;
    wait_for_depth(&bus, &queue, 0).await;
}

/// An explicit dead-letter records the origin queue, the reason and the
/// attempts made.
pub async fn dead_letter_records_origin_and_reason(bus: TestBus) {
    let queue = bus.queue();
    let payload = format!("bad-{queue}");
    bus.publish(&queue, payload.as_bytes())
        .await
        .expect("publish");
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    delivery
        .dead_letter("invalid plan reference")
        .await
        .expect("dead-letter");
    let (info, _) = take_dead_letter(&bus, &queue, payload.as_bytes()).await;
    assert_eq!(info.queue, queue);
    assert_eq!(info.reason, "invalid plan reference");
    assert_eq!(info.attempts, 1);
    assert_quiet(&mut consumer, "a dead-lettered message came back").await;
}

/// Each namespace's work queues dead-letter into the namespace's own
/// dead-letter queue (`<namespace>.devfleet.dlq`): two namespaces' dead
/// letters never mix.
pub async fn each_namespace_dead_letters_into_its_own_queue(bus: TestBus) {
    let namespaces = [unique(QUEUE_PREFIX), unique(QUEUE_PREFIX)];
    for ns in &namespaces {
        let queue = bus.named(format!("{ns}.{}", devfleet_protocol::queues::WORK_DEV));
        bus.named(format!("{ns}.{DEAD_LETTER_QUEUE}"));
        bus.publish(&queue, ns.as_bytes()).await.expect("publish");
        let mut consumer = bus.consume(&queue, options()).await.expect("consume");
        next(&mut consumer)
            .await
            .dead_letter("bad in its namespace")
            .await
            .expect("dead-letter");
    }
    for ns in &namespaces {
        let dlq = format!("{ns}.{DEAD_LETTER_QUEUE}");
        assert_eq!(
            devfleet_bus::dead_letter_queue_for(&format!("{ns}.work.dev")),
            dlq
        );
        let mut consumer = bus.consume(&dlq, options()).await.expect("consume");
        let letter = next(&mut consumer).await;
        assert_eq!(
            &letter.payload[..],
            ns.as_bytes(),
            "{dlq} holds its own letter"
        );
        let info = letter.dead_letter.clone().expect("dead-letter info");
        assert_eq!(info.queue, format!("{ns}.work.dev"));
        letter.ack().await.expect("ack");
        assert_quiet(&mut consumer, "another namespace's letter").await;
    }
}

/// An undecodable message read as an envelope goes to the dead-letter
/// queue at once, and the consumer moves on to the next valid envelope.
pub async fn undecodable_message_is_dead_lettered_and_skipped(bus: TestBus) {
    let queue = bus.queue();
    let garbage = format!("\u{1}not messagepack {queue}").into_bytes();
    let envelope = Envelope::new(PlanRejected {
        plan_id: queue.clone(),
        name: "conformance".into(),
        error: "none".into(),
    });
    bus.publish(&queue, &garbage)
        .await
        .expect("publish garbage");
    devfleet_bus::publish_envelope(bus.as_ref(), &queue, &envelope)
        .await
        .expect("publish envelope");
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    let (decoded, delivery) = within("the valid envelope", SOON, consumer.next_envelope())
        .await
        .expect("consumer closed")
        .expect("next_envelope");
    assert_eq!(decoded.id, envelope.id);
    delivery.ack().await.expect("ack");

    let (info, _) = take_dead_letter(&bus, &queue, &garbage).await;
    assert_eq!(info.queue, queue);
    assert!(
        info.reason.contains("undecodable"),
        "reason: {}",
        info.reason
    );
    assert_quiet(&mut consumer, "a dead-lettered message came back").await;
}

/// `queue_depth` counts waiting messages; `purge` removes them and says
/// how many.
pub async fn queue_depth_and_purge(bus: TestBus) {
    let queue = bus.queue();
    assert_eq!(
        bus.queue_depth(&queue).await.expect("depth of a new queue"),
        0
    );
    for i in 0..3 {
        bus.publish(&queue, format!("m{i}").as_bytes())
            .await
            .expect("publish");
    }
    wait_for_depth(&bus, &queue, 3).await;
    assert_eq!(bus.purge(&queue).await.expect("purge"), 3);
    wait_for_depth(&bus, &queue, 0).await;
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    assert_quiet(&mut consumer, "a purged message was delivered").await;
}

/// A message that keeps getting handed back unsettled (it crashes every
/// consumer) is dead-lettered after a bounded number of deliveries instead
/// of looping for ever.
pub async fn crash_looping_message_is_dead_lettered(bus: TestBus) {
    let queue = bus.queue();
    let payload = format!("crash-{queue}");
    bus.publish(&queue, payload.as_bytes())
        .await
        .expect("publish");
    let mut deliveries = 0;
    for _ in 0..40 {
        let mut consumer = bus.consume(&queue, options()).await.expect("consume");
        match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                deliveries += 1;
                // The "crash": the consumer goes away holding the message.
                drop(consumer);
                drop(delivery);
            }
            Ok(other) => panic!("consumer failed: {other:?}"),
            Err(_) => break,
        }
    }
    assert!(
        (2..40).contains(&deliveries),
        "delivered {deliveries} times; expected a bounded crash loop"
    );
    let (info, _) = take_dead_letter(&bus, &queue, payload.as_bytes()).await;
    eprintln!("dead-lettered after {deliveries} deliveries: {info:?}");
    assert_eq!(info.queue, queue);
    assert!(
        info.reason.to_lowercase().contains("deliver"),
        "reason should name the delivery limit: {}",
        info.reason
    );
}

/// Broadcasts reach the listeners whose pattern matches the subject, and
/// no others.
pub async fn broadcast_reaches_matching_listeners_only(bus: TestBus) {
    let root = unique(QUEUE_PREFIX);
    let mut all = bus.listen(&format!("{root}.>")).await.expect("listen >");
    let mut metrics = bus
        .listen(&format!("{root}.metrics.*"))
        .await
        .expect("listen *");
    let mut other = bus
        .listen(&format!("{root}.other.>"))
        .await
        .expect("listen other");
    let send = |subject: String, body: &'static str| {
        let bus = bus.bus.clone();
        async move {
            bus.broadcast(&subject, body.as_bytes())
                .await
                .expect("broadcast");
        }
    };
    send(root.clone(), "bare root").await;
    send(format!("{root}.metrics.cpu"), "cpu").await;
    send(format!("{root}.metrics.cpu.core0"), "core0").await;
    send(format!("{root}.metrics.mem"), "mem").await;
    send(format!("{root}.other.x"), "x").await;

    async fn received(listener: &mut devfleet_bus::Listener, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..n {
            let (subject, payload) = within("a broadcast", SOON, listener.next())
                .await
                .expect("listener closed");
            got.push(format!("{subject}={}", String::from_utf8_lossy(&payload)));
        }
        got
    }
    assert_eq!(
        received(&mut all, 4).await,
        [
            format!("{root}.metrics.cpu=cpu"),
            format!("{root}.metrics.cpu.core0=core0"),
            format!("{root}.metrics.mem=mem"),
            format!("{root}.other.x=x"),
        ],
        "'>' matches one or more tokens, not the bare prefix"
    );
    assert_eq!(
        received(&mut metrics, 2).await,
        [
            format!("{root}.metrics.cpu=cpu"),
            format!("{root}.metrics.mem=mem")
        ],
        "'*' matches exactly one token"
    );
    assert_eq!(received(&mut other, 1).await, [format!("{root}.other.x=x")]);
}

/// A payload over the limit is refused before anything is sent.
pub async fn oversized_payload_is_refused(bus: TestBus) {
    let queue = bus.queue();
    let payload = vec![0u8; MAX_PAYLOAD_BYTES + 1];
    match bus.publish(&queue, &payload).await {
        Err(BusError::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (MAX_PAYLOAD_BYTES + 1, MAX_PAYLOAD_BYTES));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// After `close`, consumers end and calls fail with `Closed`.
pub async fn closed_bus_refuses_work(bus: TestBus) {
    let queue = bus.queue();
    let mut consumer = bus.consume(&queue, options()).await.expect("consume");
    bus.close().await;
    assert!(within("the consumer to end", SOON, consumer.next())
        .await
        .is_none());
    assert!(matches!(
        bus.publish(&queue, b"late").await,
        Err(BusError::Closed)
    ));
}

/// Restarts a broker in the middle of a stream. Every confirmed message is
/// still delivered and acked; the same consumer waits across the outage
/// and carries on; publishes made during the outage are retried until the
/// broker is back; deliveries held from before the restart cannot be acked
/// (AMQP: their connection is gone) and come again; a listener resumes.
///
/// `server` names the server for `$DEVFLEET_SERVERS_CTL restart`; `url` is
/// its URL, used to see when it is down.
pub async fn restart_mid_stream_loses_no_confirmed_message(bus: TestBus, server: &str, url: &str) {
    let queue = bus.queue();
    let root = unique(QUEUE_PREFIX);
    let mut expected = BTreeSet::new();
    for i in 0..30 {
        let m = format!("m{i}");
        bus.publish(&queue, m.as_bytes()).await.expect("publish");
        expected.insert(m);
    }
    let mut listener = bus.listen(&format!("{root}.>")).await.expect("listen");
    let mut consumer = bus
        .consume(&queue, options().prefetch(5))
        .await
        .expect("consume");
    let mut acked = BTreeSet::new();
    for _ in 0..10 {
        let delivery = next(&mut consumer).await;
        acked.insert(String::from_utf8_lossy(&delivery.payload).into_owned());
        delivery.ack().await.expect("ack before the restart");
    }
    // A second consumer holds five deliveries unsettled through the restart.
    // It is not polled again, so it does not subscribe again either.
    let mut holder = bus
        .consume(&queue, options().prefetch(5))
        .await
        .expect("consume");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next(&mut holder).await);
    }

    let _exclusive = gate::exclusive().await;
    let restart = tokio::spawn(restart_server(server.to_owned()));
    let address = host_port(url);
    wait_for(&format!("{server} to go down"), SOON, || async {
        tokio::net::TcpStream::connect(&address)
            .await
            .err()
            .map(drop)
    })
    .await;

    // Published while the broker is down: retried until it is back.
    let during: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    expected.extend(during.iter().cloned());
    let publisher = {
        let bus = bus.bus.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            for m in during {
                bus.publish(&queue, m.as_bytes())
                    .await
                    .expect("publish during the outage");
            }
        })
    };

    // The consumer keeps going across the outage. Deliveries it received
    // before the connection dropped fail to ack and come again.
    within(
        "every confirmed message to be delivered across the restart",
        Duration::from_secs(120),
        async {
            while acked != expected {
                let delivery = next(&mut consumer).await;
                let payload = String::from_utf8_lossy(&delivery.payload).into_owned();
                assert!(expected.contains(&payload), "unexpected message {payload}");
                if delivery.ack().await.is_ok() {
                    acked.insert(payload);
                }
            }
        },
    )
    .await;
    within("the restart", Duration::from_secs(120), restart)
        .await
        .expect("restart task");
    within("publishes during the outage", SOON, publisher)
        .await
        .expect("publisher task");

    for delivery in held {
        let result = delivery.ack().await;
        if bus.backend() == "amqp" {
            assert!(
                result.is_err(),
                "an ack on a connection lost in the restart cannot succeed"
            );
        }
    }
    drop(holder);

    bus.publish(&queue, b"after")
        .await
        .expect("publish after the restart");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.payload, Bytes::from_static(b"after"));
    delivery.ack().await.expect("ack after the restart");
    wait_for_depth(&bus, &queue, 0).await;

    // Broadcasts are best effort, and the listener binds again in the
    // background: send until one arrives.
    let subject = format!("{root}.after");
    within("the listener to resume", SOON, async {
        loop {
            bus.broadcast(&subject, b"back").await.expect("broadcast");
            if let Ok(Some((got, _))) =
                tokio::time::timeout(Duration::from_millis(500), listener.next()).await
            {
                assert_eq!(got, subject);
                break;
            }
        }
    })
    .await;
}

/// `host:port` of a server URL such as `amqp://user:pw@127.0.0.1:5672/%2f`.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// Runs `$DEVFLEET_SERVERS_CTL restart $DEVFLEET_SERVERS_DIR <server>`.
async fn restart_server(server: String) {
    let ctl = devfleet_testkit::require_env("DEVFLEET_SERVERS_CTL");
    let dir = devfleet_testkit::require_env("DEVFLEET_SERVERS_DIR");
    let status = tokio::process::Command::new(&ctl)
        .args(["restart", &dir, &server])
        .status()
        .await
        .unwrap_or_else(|e| panic!("running {ctl}: {e}"));
    assert!(
        status.success(),
        "{ctl} restart {dir} {server} failed: {status}"
    );
}

/// Keeps broker restarts (exclusive) and the other real-server tests of
/// this file (shared) apart, across the processes nextest runs them in.
///
/// A directory-based reader/writer lock under `$DEVFLEET_SERVERS_DIR`:
/// each shared holder leaves a file named after its process in
/// `readers/`; a restart first creates `restarting/` (which stops new
/// readers), then waits for `readers/` to empty. Files of processes that
/// died are ignored, so a killed test cannot wedge the others.
mod gate {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    const POLL: Duration = Duration::from_millis(50);
    /// Longest wait before going ahead anyway (a wedged peer must not hang
    /// the suite; the worst case is the flaky test this gate prevents).
    const PATIENCE: Duration = Duration::from_secs(300);

    fn root() -> Option<PathBuf> {
        let dir = std::env::var_os("DEVFLEET_SERVERS_DIR")?;
        let root = Path::new(&dir).join("bus-conformance-gate");
        std::fs::create_dir_all(root.join("readers")).ok()?;
        Some(root)
    }

    fn alive(pid: &str) -> bool {
        Path::new("/proc").join(pid).exists()
    }

    /// True when `restarting/` exists and its owner is alive; removes it
    /// when the owner died.
    fn restart_in_progress(root: &Path) -> bool {
        let marker = root.join("restarting");
        match std::fs::read_to_string(marker.join("pid")) {
            Ok(pid) if !alive(pid.trim()) => {
                let _ = std::fs::remove_dir_all(&marker);
                false
            }
            Ok(_) => true,
            // Just created, pid not written yet; or absent.
            Err(_) => marker.exists(),
        }
    }

    /// Held by a test that needs the broker up throughout.
    pub struct Shared(PathBuf);

    impl Drop for Shared {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub async fn shared() -> Option<Shared> {
        let root = root()?;
        let started = std::time::Instant::now();
        loop {
            let name = format!("{}-{}", std::process::id(), uuid_like());
            let file = root.join("readers").join(name);
            std::fs::write(&file, b"").ok()?;
            if !restart_in_progress(&root) || started.elapsed() > PATIENCE {
                return Some(Shared(file));
            }
            let _ = std::fs::remove_file(&file);
            while restart_in_progress(&root) && started.elapsed() <= PATIENCE {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Held by a test that restarts a server.
    pub struct Exclusive(Option<PathBuf>);

    impl Drop for Exclusive {
        fn drop(&mut self) {
            if let Some(marker) = &self.0 {
                let _ = std::fs::remove_dir_all(marker);
            }
        }
    }

    pub async fn exclusive() -> Exclusive {
        let Some(root) = root() else {
            return Exclusive(None);
        };
        let marker = root.join("restarting");
        let started = std::time::Instant::now();
        while std::fs::create_dir(&marker).is_err() {
            restart_in_progress(&root);
            if started.elapsed() > PATIENCE {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let _ = std::fs::write(marker.join("pid"), std::process::id().to_string());
        while started.elapsed() <= PATIENCE {
            let busy = std::fs::read_dir(root.join("readers"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let pid = name.split('-').next().unwrap_or("").to_owned();
                    if alive(&pid) {
                        true
                    } else {
                        let _ = std::fs::remove_file(entry.path());
                        false
                    }
                });
            if !busy {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        Exclusive(Some(marker))
    }

    fn uuid_like() -> String {
        devfleet_testkit::unique("r")
    }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// Generates one `#[tokio::test]` per behaviour for a backend, in a module
/// named `$backend`. `$make` is an `async fn() -> impl Into<TestBus>` that
/// makes a fresh bus for each test.
macro_rules! conformance_suite {
    ($backend:ident, $make:path) => {
        mod $backend {
            use super::*;
            conformance_suite!(@tests $make;
                publish_consume_ack_round_trip,
                competing_consumers_split_the_messages,
                prefetch_bounds_unsettled_deliveries,
                dropped_consumer_redelivers_its_unsettled_messages,
                dropped_delivery_is_redelivered,
                cancelled_next_loses_no_message,
                retry_waits_at_least_its_delay,
                retries_past_max_attempts_are_dead_lettered,
                dead_letter_records_origin_and_reason,
                each_namespace_dead_letters_into_its_own_queue,
                undecodable_message_is_dead_lettered_and_skipped,
                queue_depth_and_purge,
                crash_looping_message_is_dead_lettered,
                broadcast_reaches_matching_listeners_only,
                oversized_payload_is_refused,
                closed_bus_refuses_work,
            );
        }
    };
    (@tests $make:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let bus: TestBus = $make().await.into();
                let finish = bus.finisher();
                within(
                    concat!(stringify!($test), " to finish"),
                    Duration::from_secs(240),
                    super::$test(bus),
                )
                .await;
                finish.await;
            }
        )*
    };
}

async fn memory_bus() -> TestBus {
    let bus: SharedBus = Arc::new(devfleet_bus::memory::MemoryBus::new());
    bus.into()
}

async fn amqp_bus() -> TestBus {
    let gate = gate::shared().await;
    TestBus {
        _hold: Some(Box::new(gate)),
        ..amqp_bus_ungated().await
    }
}

/// A RabbitMQ bus whose test deletes its queues when it passes.
async fn amqp_bus_ungated() -> TestBus {
    let url = devfleet_testkit::amqp_url();
    let bus = devfleet_bus::connect(&url)
        .await
        .expect("connect to RabbitMQ");
    // Its own connection: the test may have closed its bus.
    let cleanup: Cleanup = Arc::new(move |queues: Vec<String>| {
        let url = url.clone();
        Box::pin(async move {
            let result = async {
                let bus = devfleet_bus::amqp::AmqpBus::connect(&url).await?;
                for queue in &queues {
                    bus.delete_queue(queue).await?;
                }
                bus.close().await;
                Ok::<_, BusError>(())
            }
            .await;
            if let Err(e) = result {
                eprintln!("warning: test queues {queues:?} were not deleted: {e}");
            }
        })
    });
    TestBus::from(bus).with_cleanup(cleanup)
}

conformance_suite!(memory, memory_bus);
conformance_suite!(amqp, amqp_bus);
// Another backend: an `async fn` like `amqp_bus` and one
// `conformance_suite!(name, maker);` line (NATS is at the end of the file).

/// RabbitMQ-only: the broker restarts mid-stream. Named `restart` so that
/// `scripts/test.sh` runs it alone, after everything else.
mod amqp_restart {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_restart_mid_stream_loses_no_confirmed_message() {
        let url = devfleet_testkit::amqp_url();
        // Not gated as a reader: the test takes the gate exclusively itself.
        let bus = amqp_bus_ungated().await;
        let finish = bus.finisher();
        within(
            "the restart test to finish",
            Duration::from_secs(400),
            restart_mid_stream_loses_no_confirmed_message(bus, "rabbitmq", &url),
        )
        .await;
        finish.await;
    }
}

/// RabbitMQ-only: a listener that does not read holds a bounded backlog.
mod amqp_listener {
    use super::*;
    use devfleet_bus::amqp::LISTENER_BUFFER;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listener_that_falls_behind_keeps_the_newest_broadcasts_and_counts_the_rest() {
        let bus = amqp_bus().await;
        let root = unique("conf-backlog");
        let mut listener = bus.listen(&format!("{root}.>")).await.expect("listen");
        let extra = 500;
        let total = LISTENER_BUFFER + extra;
        let subject = format!("{root}.metrics.x");
        for i in 0..total {
            bus.broadcast(&subject, i.to_string().as_bytes())
                .await
                .expect("broadcast");
        }
        wait_for("the overflow to be counted", SOON, || {
            let dropped = listener.dropped();
            async move { (dropped == extra as u64).then_some(()) }
        })
        .await;
        let mut received = Vec::new();
        while let Ok(Some((_, payload))) = tokio::time::timeout(QUIET, listener.next()).await {
            received.push(String::from_utf8(payload.to_vec()).unwrap());
        }
        assert_eq!(received.len(), LISTENER_BUFFER, "the buffer's worth");
        assert_eq!(
            received.first().map(String::as_str),
            Some(extra.to_string().as_str()),
            "the oldest were dropped"
        );
        assert_eq!(
            received.last().map(String::as_str),
            Some((total - 1).to_string().as_str())
        );
        assert_eq!(listener.dropped(), extra as u64);
    }
}

/// RabbitMQ-only: the arguments dead-letter queues are declared with.
mod amqp_dead_letter_queues {
    use super::*;
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    async fn channel() -> (lapin::Connection, lapin::Channel) {
        let url = devfleet_testkit::amqp_url();
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("connect with lapin");
        let channel = connection.create_channel().await.expect("a channel");
        (connection, channel)
    }

    fn quorum(limit: Option<i64>) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        if let Some(limit) = limit {
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        }
        args
    }

    async fn declare(name: &str, args: FieldTable) -> lapin::Result<()> {
        let (connection, channel) = channel().await;
        let result = channel
            .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await
            .map(drop);
        let _ = connection.close(200, "done".into()).await;
        result
    }

    /// A new dead-letter queue gets an explicit `x-delivery-limit` (so
    /// RabbitMQ 4.x does not apply its default of 20): the broker refuses a
    /// redeclare without it, and accepts one with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_dead_letter_queue_is_declared_with_an_explicit_delivery_limit() {
        let bus = amqp_bus().await;
        let ns = unique(QUEUE_PREFIX);
        let queue = bus.named(format!("{ns}.{}", devfleet_protocol::queues::WORK_DEV));
        let dlq = bus.named(format!("{ns}.{DEAD_LETTER_QUEUE}"));
        bus.publish(&queue, b"x").await.expect("publish");
        let limit = devfleet_bus::amqp::DEAD_LETTER_DELIVERY_LIMIT;
        declare(&dlq, quorum(Some(limit)))
            .await
            .expect("the same arguments are accepted");
        let err = declare(&dlq, quorum(None))
            .await
            .expect_err("a redeclare without the limit is refused");
        assert!(err.to_string().contains("PRECONDITION"), "{err}");
    }

    /// A dead-letter queue declared by an older version (no limit) is kept:
    /// work queues of its namespace still work, and their dead letters
    /// still land there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_dead_letter_queue_without_the_limit_is_kept_and_used() {
        let bus = amqp_bus().await;
        let ns = unique(QUEUE_PREFIX);
        let queue = bus.named(format!("{ns}.{}", devfleet_protocol::queues::WORK_DEV));
        let dlq = bus.named(format!("{ns}.{DEAD_LETTER_QUEUE}"));
        declare(&dlq, quorum(None)).await.expect("an old-style DLQ");
        bus.publish(&queue, b"old").await.expect("publish");
        let mut consumer = bus.consume(&queue, options()).await.expect("consume");
        next(&mut consumer)
            .await
            .dead_letter("kept")
            .await
            .expect("dead-letter into the old queue");
        let mut letters = bus.consume(&dlq, options()).await.expect("consume the DLQ");
        let letter = next(&mut letters).await;
        assert_eq!(&letter.payload[..], b"old");
        letter.ack().await.expect("ack");
    }
}

/// RabbitMQ-only behaviours of connecting.
mod amqp_connect {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_credentials_fail_at_connect_without_retrying() {
        let url = devfleet_testkit::amqp_url();
        let bad = format!("amqp://devfleet-nobody:wrong@{}/%2f", host_port(&url));
        let started = Instant::now();
        let err = within("connect to fail", SOON, devfleet_bus::connect(&bad))
            .await
            .map(drop)
            .expect_err("connecting with bad credentials must fail");
        assert!(matches!(err, BusError::Connect { .. }), "{err}");
        assert!(!err.to_string().contains("wrong"), "password leaked: {err}");
        eprintln!("failed after {:?}: {err}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------
// NATS JetStream
// ---------------------------------------------------------------------------

async fn nats_bus() -> TestBus {
    let url = devfleet_testkit::nats_url();
    let gate = gate::shared().await;
    let bus = devfleet_bus::connect(&url).await.expect("connect to NATS");
    TestBus::holding(bus, gate)
}

conformance_suite!(nats, nats_bus);

/// NATS-only: the server restarts mid-stream. Named `restart` so that
/// `scripts/test.sh` runs it alone, after everything else.
mod nats_restart {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_restart_mid_stream_loses_no_confirmed_message() {
        let url = devfleet_testkit::nats_url();
        let bus: SharedBus = devfleet_bus::connect(&url).await.expect("connect to NATS");
        within(
            "the restart test to finish",
            Duration::from_secs(400),
            restart_mid_stream_loses_no_confirmed_message(bus.into(), "nats", &url),
        )
        .await;
    }
}
