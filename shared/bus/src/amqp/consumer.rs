//! Consuming a work queue, and settling its deliveries.
//!
//! Each consumer has its own channel with `basic.qos(prefetch)` and manual
//! acks, so closing that channel (the consumer is dropped, or the
//! connection dies) makes the broker requeue exactly this consumer's
//! unacked messages. When the connection is lost the consumer quietly
//! subscribes again on a fresh one and carries on.

use super::headers;
use super::link::{close_in_background, op, short, Fault, Link, Pacer, Session, OP_TIMEOUT};
use super::publish::{publish, Destination};
use super::topology;
use crate::{
    dead_letter_queue_for, is_dead_letter_queue, BusError, BusResult, ConsumeOptions,
    DeadLetterInfo, Deadline, Delivery, DeliveryStream, Settle,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Channel};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A live subscription: the consumer's channel and its lapin consumer.
struct Active {
    channel: Channel,
    consumer: lapin::Consumer,
}

/// Opens a channel, sets prefetch, declares the queue and consumes it.
async fn subscribe(link: &Link, queue: &str, prefetch: u16) -> Result<Active, Fault> {
    let session: Session = link.open_channel().await?;
    let result = async {
        op(
            "basic.qos",
            session
                .channel
                .basic_qos(prefetch.max(1), BasicQosOptions::default()),
        )
        .await?;
        topology::declare_queue(link, &session, queue).await?;
        op(
            "basic.consume",
            session.channel.basic_consume(
                short(queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    }
    .await;
    match result {
        Ok(consumer) => Ok(Active {
            channel: session.channel,
            consumer,
        }),
        Err(fault) => {
            link.note(session.generation, &fault).await;
            close_in_background(session.channel, "subscribe failed");
            Err(fault)
        }
    }
}

/// The [`DeliveryStream`] of one RabbitMQ consumer.
pub(super) struct AmqpStream {
    publisher: Arc<Link>,
    consumer_link: Arc<Link>,
    queue: String,
    options: ConsumeOptions,
    active: Option<Active>,
    pacer: Pacer,
    /// Cleared when the consumer is dropped: its channel closes, which
    /// hands its unsettled deliveries back, so they need no nack.
    open: Arc<AtomicBool>,
}

impl AmqpStream {
    /// Subscribes, retrying transient failures until `deadline`.
    pub(super) async fn start(
        publisher: Arc<Link>,
        consumer_link: Arc<Link>,
        queue: &str,
        options: ConsumeOptions,
        deadline: tokio::time::Instant,
    ) -> Result<Self, Fault> {
        let active = consumer_link
            .retry("consume", Some(deadline), || {
                subscribe(&consumer_link, queue, options.prefetch)
            })
            .await?;
        Ok(AmqpStream {
            publisher,
            consumer_link,
            queue: queue.to_owned(),
            options,
            active: Some(active),
            pacer: Pacer::new(),
            open: Arc::new(AtomicBool::new(true)),
        })
    }

    fn drop_active(&mut self, why: &'static str) {
        if let Some(active) = self.active.take() {
            drop(active.consumer);
            close_in_background(active.channel, why);
        }
        self.pacer.failed();
    }

    fn delivery(&self, delivery: lapin::message::Delivery) -> Delivery {
        let attempt = headers::attempt(&delivery.properties, delivery.redelivered);
        let dead_letter = if is_dead_letter_queue(&self.queue) {
            headers::dead_letter_info(&delivery.properties)
        } else {
            None
        };
        let payload = Bytes::from(delivery.data);
        let settle = AmqpSettle {
            publisher: self.publisher.clone(),
            queue: self.queue.clone(),
            payload: payload.clone(),
            acker: delivery.acker,
            settled: false,
            consumer_open: self.open.clone(),
        };
        Delivery::new(
            self.queue.clone(),
            payload,
            attempt,
            dead_letter,
            self.options.max_attempts,
            Box::new(settle),
        )
    }
}

#[async_trait]
impl DeliveryStream for AmqpStream {
    async fn next(&mut self) -> Option<BusResult<Delivery>> {
        let closed = self.consumer_link.closed().clone();
        loop {
            if closed.is_cancelled() {
                return None;
            }
            if self.active.is_none() {
                if !self.pacer.wait(&closed).await {
                    return None;
                }
                match subscribe(&self.consumer_link, &self.queue, self.options.prefetch).await {
                    Ok(active) => {
                        tracing::info!(queue = %self.queue, "consumer subscribed again");
                        self.active = Some(active);
                        self.pacer.succeeded();
                    }
                    Err(Fault::Closed) => return None,
                    Err(Fault::Permanent(reason)) => {
                        self.pacer.failed();
                        return Some(Err(BusError::Consume {
                            queue: self.queue.clone(),
                            reason,
                        }));
                    }
                    Err(fault) => {
                        tracing::debug!(queue = %self.queue, reason = %fault.reason(), "resubscribe failed; retrying");
                        self.pacer.failed();
                        continue;
                    }
                }
            }
            let Some(active) = self.active.as_mut() else {
                continue;
            };
            let item = tokio::select! {
                item = active.consumer.next() => item,
                _ = closed.cancelled() => return None,
            };
            match item {
                Some(Ok(delivery)) => return Some(Ok(self.delivery(delivery))),
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %e, "consumer lost its channel; resubscribing");
                    self.drop_active("consumer failed");
                }
                None => {
                    tracing::warn!(queue = %self.queue, "consumer cancelled by the broker; resubscribing");
                    self.drop_active("consumer cancelled");
                }
            }
        }
    }
}

impl Drop for AmqpStream {
    fn drop(&mut self) {
        self.open.store(false, Ordering::SeqCst);
        self.drop_active("consumer dropped");
    }
}

/// Settles one RabbitMQ delivery. Dropping it unsettled requeues it.
struct AmqpSettle {
    publisher: Arc<Link>,
    queue: String,
    payload: Bytes,
    acker: Acker,
    settled: bool,
    consumer_open: Arc<AtomicBool>,
}

impl AmqpSettle {
    fn error(&self, reason: impl Into<String>) -> BusError {
        BusError::Settle {
            queue: self.queue.clone(),
            reason: reason.into(),
        }
    }

    /// Fails early when the delivery's channel is gone: the broker
    /// redelivers the message, so copying it now would only duplicate it.
    fn check_usable(&self) -> BusResult<()> {
        if self.acker.usable() {
            Ok(())
        } else {
            Err(self.error("its channel or connection is gone; the broker redelivers the message"))
        }
    }

    async fn ack_original(&self) -> BusResult<()> {
        match tokio::time::timeout(OP_TIMEOUT, self.acker.ack(BasicAckOptions::default())).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                Err(self
                    .error("its channel or connection is gone; the broker redelivers the message"))
            }
            Ok(Err(e)) => Err(self.error(format!("basic.ack: {e}"))),
            Err(_) => Err(self.error(format!("basic.ack not sent within {OP_TIMEOUT:?}"))),
        }
    }

    /// Publishes a copy (confirmed) and then acks the original, so the
    /// message is never in neither place.
    async fn move_to(
        &mut self,
        destination: Destination<'_>,
        headers: FieldTable,
    ) -> BusResult<()> {
        self.settled = true;
        self.check_usable()?;
        publish(&self.publisher, &destination, &self.payload, &headers)
            .await
            .map_err(|fault| match fault {
                Fault::Closed => BusError::Closed,
                other => self.error(other.reason()),
            })?;
        self.ack_original().await
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    /// RabbitMQ's `consumer_timeout` (node-wide in 3.10; no per-delivery
    /// extension exists).
    fn deadline(&self) -> Deadline {
        Deadline::Fixed
    }

    async fn ack(mut self: Box<Self>) -> BusResult<()> {
        self.settled = true;
        self.ack_original().await
    }

    async fn redeliver(mut self: Box<Self>, delay: Duration, next_attempt: u32) -> BusResult<()> {
        let queue = self.queue.clone();
        let destination = if delay.is_zero() {
            Destination::Queue(&queue)
        } else {
            Destination::Delay {
                target: &queue,
                bucket_ms: topology::delay_bucket_ms(delay),
            }
        };
        self.move_to(destination, headers::for_attempt(next_attempt))
            .await
    }

    async fn dead_letter(mut self: Box<Self>, info: DeadLetterInfo) -> BusResult<()> {
        let dlq = dead_letter_queue_for(&self.queue);
        self.move_to(Destination::Queue(&dlq), headers::for_dead_letter(&info))
            .await
    }
}

impl Drop for AmqpSettle {
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() || !self.consumer_open.load(Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let acker = self.acker.clone();
        runtime.spawn(async move {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = tokio::time::timeout(OP_TIMEOUT, acker.nack(requeue)).await;
        });
    }
}
