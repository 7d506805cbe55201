//! The queues and exchange the RabbitMQ backend declares, their names and
//! arguments. Declarations are idempotent and cached per connection, so
//! each is sent once per connection and again after a reconnect.
//!
//! * Work queue `q`: durable quorum queue; messages it gives up on (more
//!   than [`DELIVERY_LIMIT`] returns, i.e. a crash loop) are dead-lettered
//!   by the broker to its namespace's dead-letter queue
//!   ([`dead_letter_queue_for`]).
//! * Dead-letter queues ([`DEAD_LETTER_QUEUE`](crate::DEAD_LETTER_QUEUE), `<namespace>.devfleet.dlq`):
//!   durable quorum queues with an explicit `x-delivery-limit` of
//!   [`DEAD_LETTER_DELIVERY_LIMIT`] (in effect none): the DLQ indexer hands
//!   letters back unsettled, and RabbitMQ 4.x would otherwise apply its
//!   default limit of 20 and drop them (a dead-letter queue has nowhere
//!   further to send them). A queue declared before this argument existed
//!   keeps its old arguments (a redeclare with new ones would fail with
//!   PRECONDITION_FAILED, so declarations run on a channel of their own and
//!   that failure is logged, not fatal): set the limit by policy there,
//!   see docs/OPERATIONS.md.
//! * `devfleet.delay.<q>.<ms>`: durable quorum queue with message TTL `ms`
//!   that dead-letters expired messages back to `q`; holds retries.
//! * `devfleet.broadcast`: durable topic exchange; every listener binds its
//!   own exclusive, auto-delete queue to it.

use super::link::{close_in_background, op, short, Fault, Link, Session};
use crate::memory::DELIVERY_LIMIT;
use crate::{dead_letter_queue_for, is_dead_letter_queue};
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::ExchangeKind;
use std::time::Duration;

/// The topic exchange broadcasts go through.
pub(super) const BROADCAST_EXCHANGE: &str = "devfleet.broadcast";

/// Delays are rounded up to one of these (ms), so a retry never comes back
/// early and the number of delay queues per work queue stays small.
/// Longer delays round up to whole hours.
const DELAY_BUCKETS_MS: [u64; 14] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_800_000, 3_600_000,
];

/// The bucket a delay waits in: the smallest one at least as long.
pub(super) fn delay_bucket_ms(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    match DELAY_BUCKETS_MS.iter().find(|&&b| b >= ms) {
        Some(&b) => b,
        None => {
            const HOUR: u64 = 3_600_000;
            ms.div_ceil(HOUR).saturating_mul(HOUR)
        }
    }
}

/// The queue holding retries of `target` for `bucket_ms`.
pub(super) fn delay_queue_name(target: &str, bucket_ms: u64) -> String {
    format!("devfleet.delay.{target}.{bucket_ms}")
}

/// Every delay queue of `target` for delays up to an hour.
pub(super) fn delay_queue_names(target: &str) -> impl Iterator<Item = String> + '_ {
    DELAY_BUCKETS_MS
        .iter()
        .map(move |&bucket| delay_queue_name(target, bucket))
}

/// The AMQP binding key for a NATS-style pattern. A final `>` (one or more
/// tokens) becomes `#` (zero or more); listeners filter out the subject
/// that differs, `a` for `a.>`, with [`crate::subject_matches`].
pub(super) fn binding_key(pattern: &str) -> String {
    match pattern.strip_suffix('>') {
        Some(prefix) if prefix.is_empty() || prefix.ends_with('.') => format!("{prefix}#"),
        _ => pattern.to_owned(),
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args
}

/// Dead-letters to `routing_key` through the default exchange. The
/// at-least-once strategy keeps a message in its queue until the target
/// queue confirmed the copy (it requires `reject-publish` overflow).
fn dead_letter_to(args: &mut FieldTable, routing_key: &str) {
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(routing_key));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
}

/// Returns a dead letter may be handed back before a RabbitMQ 4.x quorum
/// queue drops it: high enough never to be reached. (RabbitMQ 3.x refuses
/// the `-1` that 4.x reads as "no limit".)
pub const DEAD_LETTER_DELIVERY_LIMIT: i64 = 1_000_000_000;

pub(super) fn dead_letter_queue_arguments() -> FieldTable {
    let mut args = quorum_arguments();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT),
    );
    args
}

fn work_queue_arguments(name: &str) -> FieldTable {
    let mut args = quorum_arguments();
    dead_letter_to(&mut args, &dead_letter_queue_for(name));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(DELIVERY_LIMIT)),
    );
    args
}

fn delay_queue_arguments(target: &str, bucket_ms: u64) -> FieldTable {
    let mut args = quorum_arguments();
    dead_letter_to(&mut args, target);
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(bucket_ms).unwrap_or(i64::MAX)),
    );
    args
}

/// Declares queue `name` on a channel of its own, once per connection. A
/// queue that exists with other arguments (declared by an older version)
/// is kept as it is, with a warning: the broker refuses the redeclare with
/// PRECONDITION_FAILED and closes that channel, not the caller's.
async fn declare(
    link: &Link,
    session: &Session,
    name: &str,
    arguments: FieldTable,
) -> Result<(), Fault> {
    if link.is_declared(session.generation, name) {
        return Ok(());
    }
    let own = link.open_channel().await?;
    let declared = op(
        "queue.declare",
        own.channel
            .queue_declare(short(name)?, QueueDeclareOptions::durable(), arguments),
    )
    .await;
    close_in_background(own.channel, "declared");
    match declared {
        Ok(_) => {}
        Err(Fault::Permanent(reason)) if reason.contains("PRECONDITION") => {
            tracing::warn!(
                queue = name,
                %reason,
                "the queue exists with older arguments; keeping it (see docs/OPERATIONS.md, 'RabbitMQ queue arguments')"
            );
        }
        Err(fault) => return Err(fault),
    }
    link.mark_declared(session.generation, name);
    Ok(())
}

/// Declares a work queue (or a dead-letter queue) and its namespace's
/// dead-letter queue.
pub(super) async fn declare_queue(link: &Link, session: &Session, name: &str) -> Result<(), Fault> {
    let dlq = dead_letter_queue_for(name);
    declare(link, session, &dlq, dead_letter_queue_arguments()).await?;
    if !is_dead_letter_queue(name) {
        declare(link, session, name, work_queue_arguments(name)).await?;
    }
    Ok(())
}

/// Declares the delay queue for retries of `target` after `bucket_ms`,
/// and `target` itself; returns the delay queue's name.
pub(super) async fn declare_delay_queue(
    link: &Link,
    session: &Session,
    target: &str,
    bucket_ms: u64,
) -> Result<String, Fault> {
    declare_queue(link, session, target).await?;
    let name = delay_queue_name(target, bucket_ms);
    declare(
        link,
        session,
        &name,
        delay_queue_arguments(target, bucket_ms),
    )
    .await?;
    Ok(name)
}

/// Declares the broadcast exchange.
pub(super) async fn declare_broadcast(link: &Link, session: &Session) -> Result<(), Fault> {
    let key = format!("exchange:{BROADCAST_EXCHANGE}");
    if link.is_declared(session.generation, &key) {
        return Ok(());
    }
    op(
        "exchange.declare",
        session.channel.exchange_declare(
            BROADCAST_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    link.mark_declared(session.generation, &key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_a_bucket() {
        assert_eq!(delay_bucket_ms(Duration::from_millis(1)), 100);
        assert_eq!(delay_bucket_ms(Duration::from_millis(100)), 100);
        assert_eq!(delay_bucket_ms(Duration::from_millis(101)), 250);
        assert_eq!(delay_bucket_ms(Duration::from_secs(3)), 5_000);
        assert_eq!(delay_bucket_ms(Duration::from_secs(3600)), 3_600_000);
        assert_eq!(delay_bucket_ms(Duration::from_secs(3601)), 7_200_000);
    }

    #[test]
    fn nats_patterns_become_binding_keys() {
        assert_eq!(binding_key("a.b"), "a.b");
        assert_eq!(binding_key("a.*.c"), "a.*.c");
        assert_eq!(binding_key("a.>"), "a.#");
        assert_eq!(binding_key(">"), "#");
        assert_eq!(binding_key("a>"), "a>");
    }
}
