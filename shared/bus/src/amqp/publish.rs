//! Publishing with publisher confirms, retried through reconnects.
//!
//! A publish returns `Ok` only once the broker confirmed the message (for
//! queues: persistent, on a quorum queue, so it survives a restart). Until
//! the deadline every failure is retried on a fresh channel or connection;
//! a retry after a lost confirm may store the message twice, which
//! at-least-once delivery allows.

use super::link::{op, short, Fault, Link};
use super::topology;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use std::time::Duration;
use tokio::time::Instant;

/// How long one publish keeps retrying through broker outages.
pub(super) const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

/// Longest wait for the confirm of one attempt.
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a message goes.
pub(super) enum Destination<'a> {
    /// A work queue, or the dead-letter queue.
    Queue(&'a str),
    /// The delay queue that returns it to `target` after `bucket_ms`.
    Delay { target: &'a str, bucket_ms: u64 },
    /// The broadcast exchange, with the subject as routing key.
    Broadcast(&'a str),
}

/// Publishes until confirmed, a permanent failure, or the deadline.
pub(super) async fn publish(
    link: &Link,
    destination: &Destination<'_>,
    payload: &[u8],
    headers: &FieldTable,
) -> Result<(), Fault> {
    let deadline = Instant::now() + PUBLISH_DEADLINE;
    link.retry("publish", Some(deadline), || {
        publish_once(link, destination, payload, headers)
    })
    .await
}

async fn publish_once(
    link: &Link,
    destination: &Destination<'_>,
    payload: &[u8],
    headers: &FieldTable,
) -> Result<(), Fault> {
    let session = link.publisher().await?;
    let result = async {
        let (exchange, routing_key, durable) = match destination {
            Destination::Queue(queue) => {
                topology::declare_queue(link, &session, queue).await?;
                ("", (*queue).to_owned(), true)
            }
            Destination::Delay { target, bucket_ms } => {
                let name =
                    topology::declare_delay_queue(link, &session, target, *bucket_ms).await?;
                ("", name, true)
            }
            Destination::Broadcast(subject) => {
                topology::declare_broadcast(link, &session).await?;
                (topology::BROADCAST_EXCHANGE, (*subject).to_owned(), false)
            }
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(if durable { 2 } else { 1 })
            .with_headers(headers.clone());
        // `mandatory` makes the broker return a message no queue took, so a
        // queue deleted behind our back is an error, not a silent loss.
        let options = BasicPublishOptions {
            mandatory: durable,
            ..BasicPublishOptions::default()
        };
        let confirm = op(
            "basic.publish",
            session.channel.basic_publish(
                exchange.into(),
                short(&routing_key)?,
                options,
                payload,
                properties,
            ),
        )
        .await?;
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Err(_) => Err(Fault::Timeout(format!(
                "not confirmed within {CONFIRM_TIMEOUT:?}"
            ))),
            Ok(Err(e)) => Err(Fault::from(e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                link.forget_declared(&routing_key);
                Err(Fault::Transient(format!(
                    "returned by the broker: {} {}",
                    returned.reply_code, returned.reply_text
                )))
            }
            Ok(Ok(Confirmation::Nack(_))) => Err(Fault::Transient(
                "the broker refused to store the message (nack)".to_owned(),
            )),
            Ok(Ok(Confirmation::NotRequested)) => Err(Fault::Permanent(
                "the publishing channel is not in confirm mode".to_owned(),
            )),
        }
    }
    .await;
    if let Err(fault) = &result {
        link.note(session.generation, fault).await;
    }
    result
}
