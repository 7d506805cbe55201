//! Task slots: how many tasks a worker runs at once, resizable while
//! running (the autoscaler changes it).
//!
//! A semaphore whose size can shrink below the number of holders: shrinking
//! never interrupts a running task, it only stops new ones from starting
//! until enough have finished.

use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Debug)]
struct Counts {
    capacity: u32,
    busy: u32,
}

/// See the module docs.
#[derive(Debug)]
pub struct SlotPool {
    counts: Mutex<Counts>,
    changed: Notify,
}

/// A held slot; released on drop.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<SlotPool>,
}

impl SlotPool {
    pub fn new(capacity: u32) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(Counts { capacity, busy: 0 }),
            changed: Notify::new(),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a free slot. Cancel-safe.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut c = self.counts();
                if c.busy < c.capacity {
                    c.busy += 1;
                    return Slot { pool: self.clone() };
                }
            }
            notified.await;
        }
    }

    /// Resizes; running tasks keep their slots.
    pub fn set_capacity(&self, capacity: u32) {
        self.counts().capacity = capacity;
        self.changed.notify_waiters();
    }

    /// `(capacity, busy)`.
    pub fn snapshot(&self) -> (u32, u32) {
        let c = self.counts();
        (c.capacity, c.busy)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut c = self.pool.counts();
            c.busy = c.busy.saturating_sub(1);
        }
        self.pool.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn acquire_waits_for_a_release_and_follows_resizes() {
        let pool = SlotPool::new(1);
        let first = pool.acquire().await;
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        pool.set_capacity(2);
        let second = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pool.snapshot(), (2, 2));
        pool.set_capacity(1);
        drop(first);
        assert_eq!(pool.snapshot(), (1, 1));
        let third = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "shrunk pool must not hand out a slot");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .unwrap()
            .unwrap();
    }
}
