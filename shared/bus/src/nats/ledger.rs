//! One consumer's book of the deliveries it handed out and that are not
//! settled yet, shared by the consumer and its deliveries.
//!
//! It makes a NATS consumer behave like the other backends when it or a
//! delivery is dropped in-process: the unsettled messages are handed back
//! (a NAK) instead of waiting out `ack_wait`, and a
//! delivery of a closed consumer can no longer be settled (its message was
//! handed back and may be with another consumer already). It also counts
//! the unsettled deliveries against `prefetch`, and remembers which
//! messages were recently acked, so a stale copy of one of them still in
//! the inbox is not handed out again.

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Acked stream sequences remembered to recognise stale copies.
const REMEMBERED_ACKS: usize = 4096;

pub(super) struct Ledger {
    state: Mutex<State>,
    /// Signalled when a delivery is settled or dropped: room for a pull.
    pub(super) freed: Notify,
}

struct State {
    next_id: u64,
    /// Unsettled deliveries: id → the ack subject of the message.
    unsettled: HashMap<u64, Subject>,
    /// Stream sequences acked recently: those messages are gone from the
    /// stream, so any copy still arriving is stale.
    acked: HashSet<u64>,
    acked_order: VecDeque<u64>,
}

impl Ledger {
    pub(super) fn new() -> Self {
        Ledger {
            state: Mutex::new(State {
                next_id: 0,
                unsettled: HashMap::new(),
                acked: HashSet::new(),
                acked_order: VecDeque::new(),
            }),
            freed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Each critical section is one map update; a panic cannot leave
        // the state half-changed, so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deliveries handed out and not settled.
    pub(super) fn unsettled(&self) -> usize {
        self.state().unsettled.len()
    }

    /// Records a delivery being handed out; its id for [`Ledger::settle`].
    pub(super) fn hand_out(&self, ack_subject: Subject) -> u64 {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        state.unsettled.insert(id, ack_subject);
        id
    }

    /// Takes delivery `id` off the book: true if it was still unsettled,
    /// false if its consumer was dropped and handed it back already.
    pub(super) fn settle(&self, id: u64) -> bool {
        let removed = self.state().unsettled.remove(&id).is_some();
        self.freed.notify_one();
        removed
    }

    /// Takes delivery `id` off the book when it is dropped unsettled; its
    /// ack subject, to hand it back, unless that happened already.
    pub(super) fn drop_unsettled(&self, id: u64) -> Option<Subject> {
        let subject = self.state().unsettled.remove(&id);
        self.freed.notify_one();
        subject
    }

    /// Closes the book as its consumer goes: the ack subjects of every
    /// unsettled delivery, to hand them back.
    pub(super) fn close(&self) -> Vec<Subject> {
        let mut state = self.state();
        state
            .unsettled
            .drain()
            .map(|(_, subject)| subject)
            .collect()
    }

    /// Remembers that stream sequence `sequence` was acked.
    pub(super) fn acked(&self, sequence: u64) {
        let mut state = self.state();
        if state.acked.insert(sequence) {
            state.acked_order.push_back(sequence);
        }
        while state.acked_order.len() > REMEMBERED_ACKS {
            if let Some(old) = state.acked_order.pop_front() {
                state.acked.remove(&old);
            }
        }
    }

    /// True if stream sequence `sequence` was acked recently, so a copy of
    /// it now is stale.
    pub(super) fn was_acked(&self, sequence: u64) -> bool {
        self.state().acked.contains(&sequence)
    }
}

/// Hands messages back for redelivery after `delay` (normally zero): a NAK
/// to each ack subject, sent in the background (this runs from `Drop`).
/// With no runtime left, the server redelivers them after `ack_wait`.
pub(super) fn hand_back(client: &Client, subjects: Vec<Subject>, delay: Duration) {
    if subjects.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let client = client.clone();
    let nak = Bytes::from(AckKind::Nak(Some(delay)));
    runtime.spawn(async move {
        for subject in subjects {
            if let Err(e) = client.publish(subject, nak.clone()).await {
                tracing::debug!(error = %e, "nats: handing back a delivery failed; ack_wait will");
            }
        }
        // Send them now rather than with the next batch of traffic.
        if let Err(e) = client.flush().await {
            tracing::debug!(error = %e, "nats: flushing hand-backs failed");
        }
    });
}
