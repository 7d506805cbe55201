//! Connecting services to the real servers, each test in its own namespace.

use devfleet_runtime::{BusKind, ConnectArgs, Connections};
use devfleet_testkit::{amqp_url, nats_url, redis_url, unique};

/// Connections to the real RabbitMQ (work), NATS (broadcast) and Redis, in
/// a fresh namespace so parallel tests never see each other's work.
pub async fn real_connections(bus: BusKind) -> Connections {
    let args = ConnectArgs {
        bus,
        amqp_url: amqp_url(),
        nats_url: Some(nats_url()),
        redis_url: redis_url(),
        namespace: unique("e2e"),
    };
    args.connect()
        .await
        .expect("connecting to the test servers")
}
