//! `Metrics::emit`: a typed body goes out on its type's subject, tagged
//! with the emitter's source, and reads back as the same struct.

use devfleet_protocol::metrics::{QaCheckTiming, WorkerStatus};
use devfleet_protocol::{queues, Envelope, Message, Metric, MetricType};
use devfleet_runtime::Connections;
use std::time::Duration;

async fn next_metric(listener: &mut devfleet_bus::Listener) -> (String, Metric) {
    let (subject, payload) = tokio::time::timeout(Duration::from_secs(5), listener.next())
        .await
        .expect("a metric within 5 s")
        .expect("the listener stays open");
    let Message::Metric(metric) = Envelope::decode(&payload).unwrap().message else {
        panic!("not a metric on {subject}");
    };
    (subject, metric)
}

#[tokio::test]
async fn a_typed_body_goes_out_under_its_own_type() {
    let connections = Connections::in_memory();
    let mut listener = connections
        .broadcast
        .listen("devfleet.metrics.>")
        .await
        .unwrap();
    let metrics = connections.metrics("dev-worker@a");
    let body = WorkerStatus {
        instance: "dev-worker@a".into(),
        slots: 4,
        busy: 1,
        waiting: 0,
        backlog: 2,
    };
    metrics.emit(body.clone()).await;
    let (subject, metric) = next_metric(&mut listener).await;
    assert_eq!(subject, queues::metric_subject(MetricType::WorkerStatus));
    assert_eq!(metric.metric_type, MetricType::WorkerStatus);
    assert_eq!(metric.source, "dev-worker@a");
    assert_eq!(metric.body::<WorkerStatus>().unwrap(), body);

    // A tagged body carries its tag on the wire.
    metrics
        .emit(QaCheckTiming {
            check: "ruff".into(),
            status: "passed".into(),
            duration_ms: 3,
            sandbox: "none".into(),
        })
        .await;
    let (subject, metric) = next_metric(&mut listener).await;
    assert_eq!(subject, queues::metric_subject(MetricType::Performance));
    assert_eq!(metric.data["stage"], "qa");

    // An untyped body (tests, forwarding) goes out as it is.
    metrics
        .emit_value(MetricType::Error, serde_json::json!({ "n": 1 }))
        .await;
    let (_, metric) = next_metric(&mut listener).await;
    assert_eq!(metric.metric_type, MetricType::Error);
    assert_eq!(metric.data, serde_json::json!({ "n": 1 }));
}
