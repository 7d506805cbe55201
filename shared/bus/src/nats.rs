//! NATS bus (placeholder; being written).
pub struct NatsBus;
impl NatsBus { pub fn new() -> Self { NatsBus } }
