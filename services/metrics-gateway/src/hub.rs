//! Fan-out of frames to connected clients.
//!
//! Every client has a bounded queue of frames and a subscription set. A
//! frame is offered to each subscribed client with a non-blocking
//! `try_send`; a client whose queue is full is disconnected as slow at
//! once. So publishing never waits on any client, and one slow client
//! costs the others nothing (the same policy as Centrifugo's per-client
//! queue limit).

use axum::extract::ws::Utf8Bytes;
use devfleet_protocol::MetricType;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The client closed it (close frame or EOF).
    ClientClosed,
    /// Its send queue was full: it does not read fast enough.
    SlowClient,
    /// No pong within the pong timeout.
    PongTimeout,
    /// A frame over the size limit, or a WebSocket protocol violation.
    ProtocolError,
    /// Writing to the socket failed.
    WriteError,
    /// The gateway is shutting down.
    Shutdown,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 6] = [
        DisconnectReason::ClientClosed,
        DisconnectReason::SlowClient,
        DisconnectReason::PongTimeout,
        DisconnectReason::ProtocolError,
        DisconnectReason::WriteError,
        DisconnectReason::Shutdown,
    ];

    /// The label used in `/metrics` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::SlowClient => "slow_client",
            DisconnectReason::PongTimeout => "pong_timeout",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::WriteError => "write_error",
            DisconnectReason::Shutdown => "shutdown",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

fn bit(metric_type: MetricType) -> u8 {
    let index = MetricType::ALL
        .iter()
        .position(|m| *m == metric_type)
        .unwrap_or(0);
    1 << index
}

/// One connected client as the hub sees it.
pub struct Client {
    pub connection_id: String,
    id: u64,
    tx: mpsc::Sender<Utf8Bytes>,
    subscriptions: AtomicU8,
    /// Cancelled when the connection must end; the reason is set first.
    kill: CancellationToken,
    reason: OnceLock<DisconnectReason>,
}

impl Client {
    /// Queues a frame without waiting. A full queue disconnects the client
    /// as slow; returns whether the frame was queued.
    pub fn offer(&self, frame: Utf8Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(DisconnectReason::SlowClient);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Ends the connection with `reason` (the first reason given wins).
    pub fn close(&self, reason: DisconnectReason) {
        let _ = self.reason.set(reason);
        self.kill.cancel();
    }

    /// Resolves once the connection must end.
    pub fn killed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.kill.cancelled()
    }

    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }

    pub fn reason(&self) -> Option<DisconnectReason> {
        self.reason.get().copied()
    }

    pub fn subscribe(&self, types: &[MetricType]) {
        let bits = types.iter().fold(0, |acc, t| acc | bit(*t));
        self.subscriptions.fetch_or(bits, Ordering::Relaxed);
    }

    pub fn unsubscribe(&self, types: &[MetricType]) {
        let bits = types.iter().fold(0, |acc, t| acc | bit(*t));
        self.subscriptions.fetch_and(!bits, Ordering::Relaxed);
    }

    pub fn subscribed(&self, metric_type: MetricType) -> bool {
        self.subscriptions.load(Ordering::Relaxed) & bit(metric_type) != 0
    }

    /// The subscription set, in protocol order.
    pub fn subscription_list(&self) -> Vec<MetricType> {
        MetricType::ALL
            .into_iter()
            .filter(|m| self.subscribed(*m))
            .collect()
    }
}

/// Counters the hub keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct HubCounters {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    disconnects: [AtomicU64; 6],
}

impl HubCounters {
    pub fn disconnects(&self, reason: DisconnectReason) -> u64 {
        self.disconnects[reason.index()].load(Ordering::Relaxed)
    }
}

/// A connection slot, taken with [`Hub::reserve`] when an upgrade is
/// accepted and given back when this is dropped (the connection ended, or
/// the upgrade never completed).
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The registry of connected clients.
pub struct Hub {
    clients: RwLock<HashMap<u64, Arc<Client>>>,
    /// Slots held: upgrades accepted and not yet ended, registered or not.
    slots: Arc<AtomicUsize>,
    next_id: AtomicU64,
    queue_capacity: usize,
    shutdown: CancellationToken,
    pub counters: HubCounters,
}

impl Hub {
    /// A hub whose clients queue at most `queue_capacity` frames; every
    /// client is killed when `shutdown` is cancelled.
    pub fn new(queue_capacity: usize, shutdown: CancellationToken) -> Self {
        Self {
            clients: RwLock::new(HashMap::new()),
            slots: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            shutdown,
            counters: HubCounters::default(),
        }
    }

    /// Takes one of `limit` connection slots, or `None` when all are held.
    /// Check and take are one atomic step, so however many upgrades race,
    /// at most `limit` connections are ever accepted (a count of registered
    /// clients would let every upgrade in flight past the check).
    pub fn reserve(&self, limit: usize) -> Option<Slot> {
        self.slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < limit).then_some(held + 1)
            })
            .ok()
            .map(|_| Slot(self.slots.clone()))
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.read().len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Client>>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (inserts and removes are single calls), so a poisoned lock is usable.
        self.clients.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Client>>> {
        self.clients.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a client. `first` (the welcome frame) is queued before the
    /// client can receive anything else.
    pub fn register(
        &self,
        first: impl FnOnce(&str) -> String,
    ) -> (Arc<Client>, mpsc::Receiver<Utf8Bytes>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection_id = format!("c-{id}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let client = Arc::new(Client {
            connection_id,
            id,
            tx,
            subscriptions: AtomicU8::new(0),
            kill: self.shutdown.child_token(),
            reason: OnceLock::new(),
        });
        client.offer(Utf8Bytes::from(first(&client.connection_id)));
        self.write().insert(id, client.clone());
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        (client, rx)
    }

    /// Removes a client and counts why it left.
    pub fn unregister(&self, client: &Client) {
        if self.write().remove(&client.id).is_some() {
            let reason = client.reason().unwrap_or(DisconnectReason::ClientClosed);
            self.counters.disconnects[reason.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Offers a frame to every client subscribed to `metric_type`; returns
    /// how many queued it. Never waits.
    pub fn publish(&self, metric_type: MetricType, frame: &Utf8Bytes) -> usize {
        let mut delivered = 0;
        for client in self.read().values() {
            if client.subscribed(metric_type) && !client.is_killed() && client.offer(frame.clone())
            {
                delivered += 1;
            }
        }
        self.counters
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_subscribed_clients_receive() {
        let hub = Hub::new(8, CancellationToken::new());
        let (a, mut ra) = hub.register(|id| format!("welcome {id}"));
        let (b, mut rb) = hub.register(|_| "welcome".into());
        assert!(ra.recv().await.unwrap().starts_with("welcome c-"));
        rb.recv().await.unwrap();
        a.subscribe(&[MetricType::Error, MetricType::Performance]);
        b.subscribe(&[MetricType::Performance]);
        assert_eq!(hub.publish(MetricType::Error, &"e".into()), 1);
        assert_eq!(hub.publish(MetricType::Performance, &"p".into()), 2);
        b.unsubscribe(&[MetricType::Performance]);
        assert_eq!(hub.publish(MetricType::Performance, &"p2".into()), 1);
        assert_eq!(ra.recv().await.unwrap(), "e");
        assert_eq!(ra.recv().await.unwrap(), "p");
        assert_eq!(ra.recv().await.unwrap(), "p2");
        assert_eq!(rb.recv().await.unwrap(), "p");
        assert!(rb.try_recv().is_err());
        assert_eq!(
            a.subscription_list(),
            vec![MetricType::Performance, MetricType::Error]
        );
    }

    #[tokio::test]
    async fn a_full_queue_kills_only_that_client() {
        let hub = Hub::new(2, CancellationToken::new());
        let (slow, _slow_rx) = hub.register(|_| "w".into());
        let (fast, mut fast_rx) = hub.register(|_| "w".into());
        slow.subscribe(&[MetricType::Error]);
        fast.subscribe(&[MetricType::Error]);
        for i in 0..10 {
            hub.publish(MetricType::Error, &format!("{i}").into());
            while let Ok(_frame) = fast_rx.try_recv() {}
        }
        assert_eq!(slow.reason(), Some(DisconnectReason::SlowClient));
        assert!(slow.is_killed());
        assert!(!fast.is_killed());
        hub.unregister(&slow);
        assert_eq!(hub.counters.disconnects(DisconnectReason::SlowClient), 1);
        assert_eq!(hub.connected(), 1);
    }

    #[tokio::test]
    async fn shutdown_kills_every_client() {
        let shutdown = CancellationToken::new();
        let hub = Hub::new(2, shutdown.clone());
        let (c, _rx) = hub.register(|_| "w".into());
        shutdown.cancel();
        // Bounded so a regression fails here instead of hanging the run.
        tokio::time::timeout(std::time::Duration::from_secs(10), c.killed())
            .await
            .expect("shutdown did not kill the client");
    }
}
