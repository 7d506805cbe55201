//! Tests against the real NATS server in `DEVFLEET_NATS_URL` (never
//! skipped: a missing server is a failure). Each test uses its own queues;
//! the dead-letter queue is shared, so tests pick their own copies out of
//! it by payload and hand the others straight back.

use super::NatsBus;
use crate::{Bus, BusError, ConsumeOptions, Consumer, Delivery, RetryOutcome, DEAD_LETTER_QUEUE};
use devfleet_testkit::{nats_url, unique, wait_for, within};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

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

/// Takes this test's copy of `payload` out of the dead-letter queue,
/// handing every other test's copies back at once.
async fn take_dead_letter(bus: &NatsBus, payload: &[u8]) -> Delivery {
    let mut dlq = bus
        .consume(DEAD_LETTER_QUEUE, ConsumeOptions::default())
        .await
        .expect("consume the dead-letter queue");
    within("our copy in the dead-letter queue", WAIT, async {
        loop {
            let delivery = next(&mut dlq, "a dead letter").await;
            if delivery.payload.as_ref() == payload {
                return delivery;
            }
            delivery
                .retry(Duration::ZERO, "another test's dead letter")
                .await
                .expect("hand back another test's dead letter");
        }
    })
    .await
}

#[tokio::test]
async fn published_messages_are_delivered_once_acked_and_gone() {
    let bus = bus().await;
    let queue = unique("nats-basic");
    for i in 0..3 {
        bus.publish(&queue, format!("m{i}").as_bytes())
            .await
            .expect("publish");
    }
    assert_eq!(bus.queue_depth(&queue).await.expect("depth"), 3);
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut consumer, "a published message").await;
        assert_eq!(delivery.attempt, 1);
        assert_eq!(delivery.queue, queue);
        assert!(delivery.dead_letter.is_none());
        seen.push(String::from_utf8_lossy(&delivery.payload).into_owned());
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen, ["m0", "m1", "m2"]);
    wait_for("the queue to be empty", WAIT, || async {
        (bus.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await;
    // The next delivery is a new message, not one of the acked ones.
    bus.publish(&queue, b"m3").await.expect("publish");
    assert_eq!(next(&mut consumer, "m3").await.payload.as_ref(), b"m3");
}

#[tokio::test]
async fn retry_redelivers_after_the_delay_as_the_next_attempt() {
    let bus = bus().await;
    let queue = unique("nats-retry");
    bus.publish(&queue, b"again").await.expect("publish");
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default().max_attempts(5))
        .await
        .expect("consume");
    let first = next(&mut consumer, "the first delivery").await;
    assert_eq!(first.attempt, 1);
    let delay = Duration::from_millis(1500);
    let retried_at = Instant::now();
    let outcome = first.retry(delay, "not yet").await.expect("retry");
    assert_eq!(outcome, RetryOutcome::Scheduled);
    let second = next(&mut consumer, "the redelivery").await;
    assert!(
        retried_at.elapsed() >= delay,
        "redelivered after {:?}, before the {delay:?} delay",
        retried_at.elapsed()
    );
    assert_eq!(second.attempt, 2);
    assert_eq!(second.payload.as_ref(), b"again");
    second.ack().await.expect("ack");
}

#[tokio::test]
async fn retry_on_the_last_attempt_dead_letters_with_the_reason() {
    let bus = bus().await;
    let queue = unique("nats-last");
    let payload = unique("last-attempt");
    bus.publish(&queue, payload.as_bytes())
        .await
        .expect("publish");
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default().max_attempts(2))
        .await
        .expect("consume");
    let first = next(&mut consumer, "attempt 1").await;
    first.retry(Duration::ZERO, "flaky").await.expect("retry");
    let second = next(&mut consumer, "attempt 2").await;
    assert_eq!(second.attempt, 2);
    let outcome = second.retry(Duration::ZERO, "still flaky").await.expect("retry");
    assert_eq!(outcome, RetryOutcome::DeadLettered);
    let dead = take_dead_letter(&bus, payload.as_bytes()).await;
    let info = dead.dead_letter.clone().expect("dead-letter info");
    assert_eq!(info.queue, queue);
    assert_eq!(info.attempts, 2);
    assert!(info.reason.contains("still flaky"), "{}", info.reason);
    dead.ack().await.expect("ack the dead letter");
}

#[tokio::test]
async fn dead_letter_moves_the_message_with_its_reason() {
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
    let dead = take_dead_letter(&bus, payload.as_bytes()).await;
    let info = dead.dead_letter.clone().expect("dead-letter info");
    assert_eq!(info.queue, queue);
    assert_eq!(info.reason, "bad input:  line two");
    assert_eq!(info.attempts, 1);
    assert!(info.at_ms >= before, "at_ms {} < {before}", info.at_ms);
    assert_eq!(dead.queue, DEAD_LETTER_QUEUE);
    dead.ack().await.expect("ack the dead letter");
    wait_for("the original to be gone", WAIT, || async {
        (bus.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn unsettled_delivery_of_a_dropped_consumer_comes_back_after_ack_wait() {
    let bus = bus().await;
    let queue = unique("nats-drop");
    bus.publish(&queue, b"orphan").await.expect("publish");
    let options = ConsumeOptions::default().ack_wait(Duration::from_secs(1));
    let mut consumer = bus.consume(&queue, options.clone()).await.expect("consume");
    let delivery = next(&mut consumer, "the first delivery").await;
    assert_eq!(delivery.attempt, 1);
    drop(delivery);
    drop(consumer);
    let mut consumer = bus.consume(&queue, options).await.expect("consume again");
    let again = next(&mut consumer, "the redelivery").await;
    assert_eq!(again.payload.as_ref(), b"orphan");
    assert_eq!(again.attempt, 2);
    again.ack().await.expect("ack");
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
    let dead = take_dead_letter(&bus, payload.as_bytes()).await;
    let info = dead.dead_letter.clone().expect("dead-letter info");
    assert_eq!(info.queue, queue);
    assert!(info.reason.contains("max deliveries"), "{}", info.reason);
    assert_eq!(info.attempts, 2);
    dead.ack().await.expect("ack the dead letter");
    wait_for("the original to leave its stream", WAIT, || async {
        let stream = bus.inner.stream(&queue).await.ok()?;
        let info = stream.get_info().await.ok()?;
        (info.state.messages == 0).then_some(())
    })
    .await;
    drop(consumer);
}

#[tokio::test]
async fn prefetch_bounds_the_unsettled_deliveries_of_a_consumer() {
    let bus = bus().await;
    let queue = unique("nats-prefetch");
    for i in 0..3 {
        bus.publish(&queue, format!("p{i}").as_bytes())
            .await
            .expect("publish");
    }
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default().prefetch(2))
        .await
        .expect("consume");
    let a = next(&mut consumer, "p0").await;
    let b = next(&mut consumer, "p1").await;
    // A competing consumer gets the third: the first asked for no more
    // than its prefetch.
    let mut other = bus
        .consume(&queue, ConsumeOptions::default().prefetch(2))
        .await
        .expect("consume");
    let c = next(&mut other, "p2 on the other consumer").await;
    assert_eq!(c.payload.as_ref(), b"p2");
    for d in [a, b, c] {
        d.ack().await.expect("ack");
    }
}

#[tokio::test]
async fn queue_depth_counts_waiting_messages_and_purge_removes_them() {
    let bus = bus().await;
    let queue = unique("nats-purge");
    assert_eq!(bus.queue_depth(&queue).await.expect("depth"), 0);
    for i in 0..4 {
        bus.publish(&queue, format!("x{i}").as_bytes())
            .await
            .expect("publish");
    }
    assert_eq!(bus.queue_depth(&queue).await.expect("depth"), 4);
    assert_eq!(bus.purge(&queue).await.expect("purge"), 4);
    assert_eq!(bus.queue_depth(&queue).await.expect("depth"), 0);
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
    assert_ne!(super::stream_name(&dotted), super::stream_name(&underscored));
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
async fn broadcasts_reach_listeners_whose_pattern_matches() {
    let bus = bus().await;
    let root = unique("nats-bc");
    let mut one = bus.listen(&format!("{root}.*.cpu")).await.expect("listen");
    let mut all = bus.listen(&format!("{root}.>")).await.expect("listen");
    bus.broadcast(&format!("{root}.host1.mem"), b"m")
        .await
        .expect("broadcast");
    bus.broadcast(&format!("{root}.host1.cpu"), b"c")
        .await
        .expect("broadcast");
    let (subject, payload) = within("the cpu broadcast", WAIT, one.next())
        .await
        .expect("listener open");
    assert_eq!(subject, format!("{root}.host1.cpu"));
    assert_eq!(payload.as_ref(), b"c");
    let first = within("broadcast 1", WAIT, all.next()).await.expect("open");
    let second = within("broadcast 2", WAIT, all.next()).await.expect("open");
    assert_eq!(first.0, format!("{root}.host1.mem"));
    assert_eq!(second.0, format!("{root}.host1.cpu"));
    assert!(bus.broadcast(&format!("{root}.*"), b"x").await.is_err());
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
    assert!(within("consumer end", WAIT, consumer.next()).await.is_none());
    assert!(within("listener end", WAIT, listener.next()).await.is_none());
    assert!(matches!(
        bus.publish(&queue, b"x").await,
        Err(BusError::Closed)
    ));
    assert!(matches!(
        bus.consume(&queue, ConsumeOptions::default()).await,
        Err(BusError::Closed)
    ));
}

/// Restarts the test NATS server through the servers script.
async fn restart_nats() {
    let ctl = devfleet_testkit::require_env("DEVFLEET_SERVERS_CTL");
    let dir = devfleet_testkit::require_env("DEVFLEET_SERVERS_DIR");
    let status = tokio::process::Command::new(&ctl)
        .args(["restart", &dir, "nats"])
        .status()
        .await
        .unwrap_or_else(|e| panic!("running {ctl}: {e}"));
    assert!(status.success(), "{ctl} restart {dir} nats: {status}");
}

#[tokio::test]
async fn consumer_resumes_after_a_server_restart_and_nothing_is_lost() {
    let bus = bus().await;
    let queue = unique("nats-restart");
    let expected: BTreeSet<String> = (0..30).map(|i| format!("r{i:02}")).collect();
    for payload in expected.iter().take(20) {
        bus.publish(&queue, payload.as_bytes())
            .await
            .expect("publish");
    }
    let mut consumer = bus
        .consume(
            &queue,
            ConsumeOptions::default()
                .prefetch(4)
                .ack_wait(Duration::from_secs(2)),
        )
        .await
        .expect("consume");
    let mut acked = BTreeSet::new();
    while acked.len() < 10 {
        let delivery = next(&mut consumer, "a message before the restart").await;
        let payload = String::from_utf8_lossy(&delivery.payload).into_owned();
        delivery.ack().await.expect("ack before the restart");
        acked.insert(payload);
    }
    // Hold one unsettled across the restart: it must come back.
    let held = next(&mut consumer, "a message held across the restart").await;

    restart_nats().await;

    for payload in expected.iter().skip(20) {
        bus.publish(&queue, payload.as_bytes())
            .await
            .expect("publish after the restart");
    }
    drop(held);
    within("every message acked after the restart", Duration::from_secs(60), async {
        while acked != expected {
            let delivery = next(&mut consumer, "a message after the restart").await;
            let payload = String::from_utf8_lossy(&delivery.payload).into_owned();
            // An ack may fail while the client reconnects; the message then
            // comes back after ack_wait.
            if delivery.ack().await.is_ok() {
                acked.insert(payload);
            }
        }
    })
    .await;
    wait_for("the queue to be empty", WAIT, || async {
        (bus.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await;
}
