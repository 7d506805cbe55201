//! Sandbox slots: each check or shard in flight holds a slot number, which
//! maps to its own sandbox uid when running as root. How many run at once
//! is bounded by the consume loop's shared
//! [`Slots`](devfleet_runtime::consume::Slots), sized like this pool.

use std::sync::Mutex;

/// Free slot numbers.
pub(crate) struct SlotPool {
    free: Mutex<Vec<u32>>,
}

impl SlotPool {
    /// Slots `0..n`.
    pub(crate) fn new(n: u32) -> Self {
        Self {
            free: Mutex::new((0..n).rev().collect()),
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a free slot (slot 0 if, against the loop's bound, none is).
    pub(crate) fn take(&self) -> Slot<'_> {
        let n = self.free().pop().unwrap_or(0);
        Slot { pool: self, n }
    }
}

/// A slot in use; returned to the pool on drop.
pub(crate) struct Slot<'a> {
    pool: &'a SlotPool,
    /// The slot number (the sandbox uid offset).
    pub(crate) n: u32,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pool.free().push(self.n);
    }
}
