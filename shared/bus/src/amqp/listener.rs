//! Listening to broadcasts: a private queue bound to the broadcast exchange.
//!
//! The queue is exclusive and auto-delete, so it vanishes with the
//! listener. Broadcasts sent while the connection is down are missed (best
//! effort); the listener binds a new queue after a reconnect.

use super::link::{close_in_background, op, short, Fault, Link, Pacer};
use super::topology::{self, BROADCAST_EXCHANGE};
use crate::{subject_matches, MessageStream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use std::sync::Arc;

struct Active {
    channel: Channel,
    consumer: lapin::Consumer,
}

async fn subscribe(link: &Link, pattern: &str) -> Result<Active, Fault> {
    let session = link.open_channel().await?;
    let result = async {
        topology::declare_broadcast(link, &session).await?;
        let queue = op(
            "queue.declare",
            session.channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        op(
            "queue.bind",
            session.channel.queue_bind(
                queue.name().clone(),
                BROADCAST_EXCHANGE.into(),
                short(&topology::binding_key(pattern))?,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        op(
            "basic.consume",
            session.channel.basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
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
            Err(fault)
        }
    }
}

/// The [`MessageStream`] of one broadcast listener.
pub(super) struct AmqpListener {
    link: Arc<Link>,
    pattern: String,
    active: Option<Active>,
    pacer: Pacer,
}

impl AmqpListener {
    /// Binds the listener's queue, retrying transient failures until
    /// `deadline`; broadcasts sent after this returns reach it.
    pub(super) async fn start(
        link: Arc<Link>,
        pattern: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Self, Fault> {
        let active = link
            .retry("listen", Some(deadline), || subscribe(&link, pattern))
            .await?;
        Ok(AmqpListener {
            link,
            pattern: pattern.to_owned(),
            active: Some(active),
            pacer: Pacer::new(),
        })
    }

    fn drop_active(&mut self) {
        if let Some(active) = self.active.take() {
            drop(active.consumer);
            close_in_background(active.channel, "listener closed");
        }
        self.pacer.failed();
    }
}

#[async_trait]
impl MessageStream for AmqpListener {
    async fn next(&mut self) -> Option<(String, Bytes)> {
        let closed = self.link.closed().clone();
        loop {
            if closed.is_cancelled() {
                return None;
            }
            let Some(active) = self.active.as_mut() else {
                if !self.pacer.wait(&closed).await {
                    return None;
                }
                match subscribe(&self.link, &self.pattern).await {
                    Ok(active) => {
                        self.active = Some(active);
                        self.pacer.succeeded();
                    }
                    Err(Fault::Closed) => return None,
                    Err(fault) => {
                        tracing::debug!(pattern = %self.pattern, reason = %fault.reason(), "listener resubscribe failed; retrying");
                        self.pacer.failed();
                    }
                }
                continue;
            };
            let item = tokio::select! {
                item = active.consumer.next() => item,
                _ = closed.cancelled() => return None,
            };
            match item {
                Some(Ok(delivery)) => {
                    let subject = delivery.routing_key.as_str();
                    if subject_matches(&self.pattern, subject) {
                        return Some((subject.to_owned(), Bytes::from(delivery.data)));
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(pattern = %self.pattern, error = %e, "listener lost its channel; binding again");
                    self.drop_active();
                }
                None => self.drop_active(),
            }
        }
    }
}

impl Drop for AmqpListener {
    fn drop(&mut self) {
        self.drop_active();
    }
}
