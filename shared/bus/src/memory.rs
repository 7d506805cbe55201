//! In-process bus (placeholder; being written).
pub struct MemoryBus;
impl MemoryBus { pub fn new() -> Self { MemoryBus } }
