//! RabbitMQ bus (placeholder; being written).
pub struct AmqpBus;
impl AmqpBus { pub fn new() -> Self { AmqpBus } }
