//! End-to-end tests: real services over real servers (RabbitMQ, NATS,
//! Redis started by `scripts/test.sh`). One test binary, one module per
//! area, so the slow link happens once.

mod agents;
mod analyzer;
mod architecture;
mod openai;
mod pipeline;
mod router;
mod stack;
mod support;
mod up_settings;
mod worker;
mod workspace;
