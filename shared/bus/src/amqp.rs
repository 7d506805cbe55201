//! RabbitMQ backend of the [`Bus`], following RabbitMQ's reliability guide.
//!
//! * Publishes wait for a publisher confirm; messages are persistent and
//!   queues are durable quorum queues, so a confirmed message survives a
//!   broker restart.
//! * Consumers ack manually, each on its own channel with its prefetch;
//!   a consumer that goes away leaves its unacked messages to the broker,
//!   which redelivers them.
//! * Retries wait in per-delay TTL queues that dead-letter back to their
//!   queue; dead letters are confirmed copies in [`DEAD_LETTER_QUEUE`], and
//!   the broker itself dead-letters a message returned unsettled more than
//!   [`DELIVERY_LIMIT`](crate::memory::DELIVERY_LIMIT) times.
//! * Publishing and consuming use separate connections (flow control on
//!   one must not stall the other); both reconnect with backoff after the
//!   broker restarts. The queue layout is in `amqp/topology.rs`.

mod consumer;
mod headers;
mod link;
mod listener;
pub use listener::LISTENER_BUFFER;
pub use topology::DEAD_LETTER_DELIVERY_LIMIT;
mod publish;
mod topology;

use crate::{Bus, BusError, BusResult, ConsumeOptions, Consumer, Listener, MAX_PAYLOAD_BYTES};
use async_trait::async_trait;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use link::{op, short, Fault, Link};
use publish::{Destination, PUBLISH_DEADLINE};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long [`AmqpBus::connect`] keeps trying to reach the broker.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// A [`Bus`] on RabbitMQ. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct AmqpBus {
    url: String,
    publisher: Arc<Link>,
    consumers: Arc<Link>,
    closed: CancellationToken,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus")
            .field("url", &redact(&self.url))
            .field("closed", &self.closed.is_cancelled())
            .finish()
    }
}

/// The URL without its password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl AmqpBus {
    /// Connects to the broker at an `amqp://` or `amqps://` URL, retrying
    /// for up to 30 s while it is unreachable. Fails at once on a malformed
    /// URL or refused credentials.
    pub async fn connect(url: &str) -> BusResult<AmqpBus> {
        let connect_error = |reason: String| BusError::Connect {
            backend: "amqp",
            url: redact(url),
            reason,
        };
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|reason| BusError::InvalidUrl {
                url: redact(url),
                reason,
            })?;
        let closed = CancellationToken::new();
        let bus = AmqpBus {
            url: url.to_owned(),
            publisher: Arc::new(Link::new(url, "publisher", closed.clone())),
            consumers: Arc::new(Link::new(url, "consumer", closed.clone())),
            closed,
        };
        let deadline = Instant::now() + CONNECT_DEADLINE;
        for link in [&bus.publisher, &bus.consumers] {
            link.retry("connect", Some(deadline), || async {
                link.open_channel().await.map(drop)
            })
            .await
            .map_err(|fault| connect_error(fault.reason()))?;
        }
        bus.publisher
            .retry("connect", Some(deadline), || async {
                bus.publisher.publisher().await.map(drop)
            })
            .await
            .map_err(|fault| connect_error(fault.reason()))?;
        Ok(bus)
    }

    fn deadline() -> Instant {
        Instant::now() + PUBLISH_DEADLINE
    }

    /// Deletes a queue with its messages, and the queues holding its
    /// retries (delays up to an hour). Not part of [`Bus`]: queues are
    /// meant to live for good; this is for tests and tooling that create
    /// throwaway ones. Deleting a queue that does not exist succeeds.
    pub async fn delete_queue(&self, queue: &str) -> BusResult<()> {
        self.check_open()?;
        let delete_error = |reason: String| BusError::Backend {
            backend: "amqp",
            reason: format!("deleting '{queue}': {reason}"),
        };
        check_queue_name(queue).map_err(|f| bus_error(f, delete_error))?;
        let mut names = vec![queue.to_owned()];
        names.extend(topology::delay_queue_names(queue));
        for name in names {
            self.publisher
                .retry("delete queue", Some(Self::deadline()), || {
                    self.delete_once(&name)
                })
                .await
                .map_err(|f| bus_error(f, delete_error))?;
        }
        Ok(())
    }

    async fn delete_once(&self, queue: &str) -> Result<(), Fault> {
        // A channel of its own: a refused delete closes the channel it was
        // sent on, and that must not be the shared publishing one.
        let session = self.publisher.open_channel().await?;
        self.publisher.forget_declared(queue);
        let delete = session
            .channel
            .queue_delete(short(queue)?, QueueDeleteOptions::default());
        let result = match tokio::time::timeout(link::OP_TIMEOUT, delete).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if link::is_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(Fault::from(e)),
            Err(_) => Err(Fault::Timeout("queue.delete: no answer".to_owned())),
        };
        link::close_in_background(session.channel, "queue deleted");
        if let Err(fault) = &result {
            self.publisher.note(session.generation, fault).await;
        }
        result
    }
}

fn check_queue_name(queue: &str) -> Result<(), Fault> {
    crate::memory::check_queue_name(queue).map_err(Fault::Permanent)
}

/// Turns a fault into the caller's error, keeping `Closed` as such.
fn bus_error(fault: Fault, make: impl FnOnce(String) -> BusError) -> BusError {
    match fault {
        Fault::Closed => BusError::Closed,
        other => make(other.reason()),
    }
}

impl AmqpBus {
    fn check_open(&self) -> BusResult<()> {
        if self.closed.is_cancelled() {
            Err(BusError::Closed)
        } else {
            Ok(())
        }
    }

    /// Declares the queue and returns its ready-message count.
    async fn depth(&self, queue: &str) -> Result<u64, Fault> {
        let session = self.publisher.publisher().await?;
        let result = async {
            topology::declare_queue(&self.publisher, &session, queue).await?;
            let declared = op(
                "queue.declare",
                session.channel.queue_declare(
                    short(queue)?,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
            Ok(u64::from(declared.message_count()))
        }
        .await;
        if let Err(fault) = &result {
            self.publisher.note(session.generation, fault).await;
        }
        result
    }

    async fn purge_once(&self, queue: &str) -> Result<u64, Fault> {
        let session = self.publisher.publisher().await?;
        let result = async {
            topology::declare_queue(&self.publisher, &session, queue).await?;
            let purged = op(
                "queue.purge",
                session
                    .channel
                    .queue_purge(short(queue)?, QueuePurgeOptions::default()),
            )
            .await?;
            Ok(u64::from(purged))
        }
        .await;
        if let Err(fault) = &result {
            self.publisher.note(session.generation, fault).await;
        }
        result
    }
}

#[async_trait]
impl Bus for AmqpBus {
    fn backend(&self) -> &'static str {
        "amqp"
    }

    async fn publish(&self, queue: &str, payload: &[u8]) -> BusResult<()> {
        self.check_open()?;
        let publish_error = |reason: String| BusError::Publish {
            queue: queue.to_owned(),
            reason,
        };
        check_queue_name(queue).map_err(|f| bus_error(f, publish_error))?;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(BusError::TooLarge {
                queue: queue.to_owned(),
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let result = publish::publish(
            &self.publisher,
            &Destination::Queue(queue),
            payload,
            &FieldTable::default(),
        )
        .await;
        result.map_err(|fault| match fault {
            Fault::Timeout(_) => BusError::PublishTimeout {
                queue: queue.to_owned(),
                timeout: publish::CONFIRM_TIMEOUT,
            },
            other => bus_error(other, publish_error),
        })
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> BusResult<Consumer> {
        self.check_open()?;
        let consume_error = |reason: String| BusError::Consume {
            queue: queue.to_owned(),
            reason,
        };
        check_queue_name(queue).map_err(|f| bus_error(f, consume_error))?;
        let stream = consumer::AmqpStream::start(
            self.publisher.clone(),
            self.consumers.clone(),
            queue,
            options,
            Self::deadline(),
        )
        .await
        .map_err(|f| bus_error(f, consume_error))?;
        Ok(Consumer::new(queue, Box::new(stream)))
    }

    async fn queue_depth(&self, queue: &str) -> BusResult<u64> {
        self.check_open()?;
        let backend_error = |reason: String| BusError::Backend {
            backend: "amqp",
            reason: format!("depth of '{queue}': {reason}"),
        };
        self.publisher
            .retry("queue depth", Some(Self::deadline()), || self.depth(queue))
            .await
            .map_err(|f| bus_error(f, backend_error))
    }

    async fn purge(&self, queue: &str) -> BusResult<u64> {
        self.check_open()?;
        let backend_error = |reason: String| BusError::Backend {
            backend: "amqp",
            reason: format!("purging '{queue}': {reason}"),
        };
        self.publisher
            .retry("purge", Some(Self::deadline()), || self.purge_once(queue))
            .await
            .map_err(|f| bus_error(f, backend_error))
    }

    async fn broadcast(&self, subject: &str, payload: &[u8]) -> BusResult<()> {
        self.check_open()?;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(BusError::TooLarge {
                queue: subject.to_owned(),
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        publish::publish(
            &self.publisher,
            &Destination::Broadcast(subject),
            payload,
            &FieldTable::default(),
        )
        .await
        .map_err(|f| {
            bus_error(f, |reason| BusError::Backend {
                backend: "amqp",
                reason: format!("broadcast on '{subject}': {reason}"),
            })
        })
    }

    async fn listen(&self, pattern: &str) -> BusResult<crate::Listener> {
        self.check_open()?;
        let stream =
            listener::AmqpListener::start(self.consumers.clone(), pattern, Self::deadline())
                .await
                .map_err(|f| {
                    bus_error(f, |reason| BusError::Backend {
                        backend: "amqp",
                        reason: format!("listening on '{pattern}': {reason}"),
                    })
                })?;
        Ok(Listener::new(Box::new(stream)))
    }

    async fn close(&self) {
        self.closed.cancel();
        self.consumers.close().await;
        self.publisher.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
