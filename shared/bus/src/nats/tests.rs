//! Tests against the real NATS server in `DEVFLEET_NATS_URL` (never
//! skipped: a missing server is a failure). Each test uses its own queues;
//! the dead-letter queue is shared, so tests pick their own copies out of
//! it by payload and hand the others straight back.

use super::NatsBus;
use crate::{Bus, BusError, ConsumeOptions, Consumer, DeadLetterInfo, Delivery, DEAD_LETTER_QUEUE};
use devfleet_testkit::{nats_url, unique, wait_for, within};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

async fn bus() -> NatsBus {
    let url = nats_url();
    NatsBus::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn next(consumer: &mut Consumer, what: &str) -> Delivery {
    within(what, WAIT, consumer.next())
        .await
        .unwrap_or_else(|| panic!("consumer closed while waiting for {what}"))
        .unwrap_or_else(|e| panic!("error while waiting for {what}: {e}"))
}

/// Options for reading the shared dead-letter queue: the same as the
/// conformance suite's, as the durable has one `ack_wait` for everyone.
fn dlq_options() -> ConsumeOptions {
    ConsumeOptions::default()
        .prefetch(1000)
        .ack_wait(Duration::from_secs(2))
}

/// Takes this test's copy of `payload` out of the dead-letter queue and
/// acks it; other tests' copies are held meanwhile, then handed back.
async fn take_dead_letter(bus: &NatsBus, payload: &[u8]) -> (DeadLetterInfo, String) {
    let mut dlq = bus
        .consume(DEAD_LETTER_QUEUE, dlq_options())
        .await
        .expect("consume the dead-letter queue");
    let mut others = Vec::new();
    let found = within("our copy in the dead-letter queue", WAIT, async {
        loop {
            let delivery = next(&mut dlq, "a dead letter").await;
            if delivery.payload.as_ref() != payload {
                others.push(delivery);
                continue;
            }
            let info = delivery.dead_letter.clone().expect("dead-letter info");
            let queue = delivery.queue.clone();
            delivery.ack().await.expect("ack the dead letter");
            return (info, queue);
        }
    })
    .await;
    drop(others);
    found
}

#[tokio::test]
async fn dead_letter_reason_loses_the_line_breaks_headers_cannot_hold() {
    let bus = bus().await;
    let queue = unique("nats-dlq");
    let payload = unique("poison");
    bus.publish(&queue, payload.as_bytes())
        .await
        .expect("publish");
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let before = devfleet_protocol::now_ms();
    let delivery = next(&mut consumer, "the message").await;
    delivery
        .dead_letter("bad input:\r\nline two")
        .await
        .expect("dead-letter");
    let (info, from) = take_dead_letter(&bus, payload.as_bytes()).await;
    assert_eq!(info.queue, queue);
    assert_eq!(info.reason, "bad input:  line two");
    assert_eq!(info.attempts, 1);
    assert!(info.at_ms >= before, "at_ms {} < {before}", info.at_ms);
    assert_eq!(from, DEAD_LETTER_QUEUE);
    wait_for("the original to be gone", WAIT, || async {
        (bus.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_message_that_keeps_crashing_its_worker_is_dead_lettered() {
    let bus = bus().await;
    let queue = unique("nats-crash");
    let payload = unique("crasher");
    bus.publish(&queue, payload.as_bytes())
        .await
        .expect("publish");
    // Two attempts allowed; each "crash" drops the delivery unsettled.
    let options = ConsumeOptions::default()
        .max_attempts(2)
        .ack_wait(Duration::from_secs(1));
    let mut consumer = bus.consume(&queue, options).await.expect("consume");
    for attempt in 1..=2 {
        let delivery = next(&mut consumer, "a delivery to crash on").await;
        assert_eq!(delivery.attempt, attempt);
        drop(delivery);
    }
    // JetStream gives up on it only when it would deliver it again, so
    // keep a pull open while checking that no third delivery comes.
    let third = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await;
    assert!(third.is_err(), "delivered past max_deliver: {third:?}");
    let (info, _) = take_dead_letter(&bus, payload.as_bytes()).await;
    assert_eq!(info.queue, queue);
    assert!(info.reason.contains("max deliveries"), "{}", info.reason);
    assert_eq!(info.attempts, 2);
    wait_for("the original to leave its stream", WAIT, || async {
        let stream = bus.inner.stream(&queue).await.ok()?;
        let info = stream.get_info().await.ok()?;
        (info.state.messages == 0).then_some(())
    })
    .await;
    drop(consumer);
}

#[tokio::test]
async fn queues_with_similar_names_stay_apart() {
    let bus = bus().await;
    let base = unique("nats-names");
    let dotted = format!("{base}.a_b");
    let underscored = format!("{base}_a.b");
    bus.publish(&dotted, b"dotted").await.expect("publish");
    bus.publish(&underscored, b"underscored")
        .await
        .expect("publish");
    assert_ne!(
        super::stream_name(&dotted),
        super::stream_name(&underscored)
    );
    let mut consumer = bus
        .consume(&dotted, ConsumeOptions::default())
        .await
        .expect("consume");
    let d = next(&mut consumer, "the dotted message").await;
    assert_eq!(d.payload.as_ref(), b"dotted");
    d.ack().await.expect("ack");
    assert_eq!(bus.queue_depth(&underscored).await.expect("depth"), 1);
}

#[test]
fn stream_names_are_legal_distinct_and_bounded() {
    use super::stream_name;
    assert_eq!(stream_name("work.dev"), "DEVFLEET_Q_work_2Edev");
    assert_ne!(stream_name("a.b"), stream_name("a_b"));
    assert_ne!(stream_name("a_2Eb"), stream_name("a.b"));
    let long_a = format!("{}a", ".".repeat(199));
    let long_b = format!("{}b", ".".repeat(199));
    for long in [&long_a, &long_b] {
        let name = stream_name(long);
        assert!(name.len() <= 11 + 200, "{} bytes", name.len());
        assert!(!name.contains(['.', '*', '>', ' ']));
    }
    assert_ne!(stream_name(&long_a), stream_name(&long_b));
}

#[tokio::test]
async fn invalid_queue_names_and_oversized_payloads_are_rejected() {
    let bus = bus().await;
    let too_long = "q".repeat(crate::memory::MAX_QUEUE_NAME_BYTES + 1);
    for bad in ["", "a..b", "a.*", "a b", "q.>", too_long.as_str()] {
        assert!(
            matches!(bus.publish(bad, b"x").await, Err(BusError::Publish { .. })),
            "publish to {bad:?} should fail"
        );
    }
    let queue = unique("nats-large");
    let limit = bus.inner.payload_limit();
    let too_large = vec![0u8; limit + 1];
    match bus.publish(&queue, &too_large).await {
        Err(BusError::TooLarge { size, .. }) => assert_eq!(size, limit + 1),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    bus.publish(&queue, &vec![7u8; limit])
        .await
        .expect("a payload at the limit is accepted");
}

#[tokio::test]
async fn close_ends_consumers_and_listeners_and_rejects_calls() {
    let bus = bus().await;
    let queue = unique("nats-close");
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let mut listener = bus.listen(&format!("{queue}.>")).await.expect("listen");
    bus.close().await;
    assert!(within("consumer end", WAIT, consumer.next())
        .await
        .is_none());
    assert!(within("listener end", WAIT, listener.next())
        .await
        .is_none());
    assert!(matches!(
        bus.publish(&queue, b"x").await,
        Err(BusError::Closed)
    ));
    assert!(matches!(
        bus.consume(&queue, ConsumeOptions::default()).await,
        Err(BusError::Closed)
    ));
}

#[tokio::test]
async fn an_extended_delivery_outlives_its_ack_wait_without_being_redelivered() {
    let bus = bus().await;
    let queue = unique("nats-extend");
    bus.publish(&queue, b"long work").await.expect("publish");
    let options = ConsumeOptions::default().ack_wait(Duration::from_secs(1));
    let mut worker = bus.consume(&queue, options.clone()).await.expect("consume");
    let delivery = next(&mut worker, "the message").await;
    assert_eq!(delivery.deadline(), crate::Deadline::Extendable);
    // A second worker waits for a redelivery while the first works for
    // three times the ack_wait, extending the deadline as it goes.
    let mut other = bus.consume(&queue, options).await.expect("consume");
    let redelivered = tokio::time::timeout(Duration::from_secs(3), async {
        let extend = async {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                delivery.extend().await.expect("extend");
            }
        };
        tokio::select! {
            d = other.next() => d,
            never = extend => never,
        }
    })
    .await;
    assert!(
        redelivered.is_err(),
        "redelivered while being extended: {redelivered:?}"
    );
    delivery
        .ack()
        .await
        .expect("ack after the deadline was extended");
    wait_for("the message to be gone", WAIT, || async {
        (bus.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await;
}
