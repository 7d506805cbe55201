//! The metrics gateway driven over real sockets: a real WebSocket client
//! (tokio-tungstenite), plain HTTP, `promtool`, NATS broadcast, and the
//! dashboard in headless Chromium.
//!
//! Most tests run the gateway on the in-memory bus and store (each test its
//! own); `samples_over_nats_broadcast_reach_clients` uses the NATS server
//! from `scripts/test.sh`. Tests bind port 0 before starting the gateway,
//! so no two runs race for an address.

use base64::Engine as _;
use devfleet_metrics_gateway::{run, Config};
use devfleet_protocol::{Envelope, MetricType, PlanStatus, Stage, TaskFailed};
use devfleet_runtime::Connections;
use devfleet_store::{NewTask, PlanRecord, TaskState};
use devfleet_testkit::{unique, wait_for, within};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const T: Duration = Duration::from_secs(10);

struct Gateway {
    addr: SocketAddr,
    connections: Connections,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    async fn start(connections: Connections, configure: impl FnOnce(&mut Config)) -> Self {
        devfleet_telemetry::init_for_tests();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::new(connections.clone()).with_listener(listener);
        config.poll_interval = Duration::from_millis(100);
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, shutdown.clone()));
        let gateway = Self {
            addr,
            connections,
            shutdown,
            task,
        };
        // Once it answers, its broadcast listeners are in place.
        assert_eq!(gateway.get("/healthz").await.0, 200);
        gateway
    }

    async fn memory(configure: impl FnOnce(&mut Config)) -> Self {
        Self::start(Connections::in_memory(), configure).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within("the gateway stops", T, self.task)
            .await
            .unwrap()
            .unwrap();
    }

    async fn emit_value(&self, metric_type: MetricType, data: Value) {
        self.connections
            .metrics("test")
            .emit_value(metric_type, data)
            .await;
    }

    async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path, &[]).await
    }

    async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until the `/metrics` sample `series` has a value accepted by `ok`.
    async fn wait_metric(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        wait_for(&format!("/metrics {series}"), T, || async {
            sample(&self.metrics().await, series).filter(|v| ok(*v))
        })
        .await
    }

    async fn ws(&self) -> (Ws, Value) {
        ws_connect(&format!("ws://{}/ws", self.addr), None)
            .await
            .unwrap()
    }
}

/// Raw HTTP/1.1 GET; returns status and body (handles chunked bodies).
async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within("an HTTP answer", T, stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    (status, body)
}

/// The value of one exposition sample, e.g. `devfleet_tasks{state="ready"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn ws_connect(
    url: &str,
    bearer: Option<&str>,
) -> Result<(Ws, Value), tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if let Some(token) = bearer {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
    }
    let (mut ws, _) = within(
        "WebSocket handshake",
        T,
        tokio_tungstenite::connect_async(request),
    )
    .await?;
    let welcome = next_json(&mut ws).await;
    Ok((ws, welcome))
}

async fn next_json(ws: &mut Ws) -> Value {
    within("the next frame", T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn subscribe(ws: &mut Ws, kind: &str, metrics: &[&str]) -> Value {
    send(ws, json!({ "type": kind, "metrics": metrics })).await;
    let ack = next_json(ws).await;
    assert_eq!(ack["type"], "subscriptions", "{ack}");
    ack
}

/// Reads until the connection ends; returns the close frame if one came.
async fn read_until_closed(ws: &mut Ws, timeout: Duration) -> Option<(u16, String)> {
    within("the server to close the connection", timeout, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(f))) => {
                    return f.map(|f| (u16::from(f.code), f.reason.to_string()))
                }
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
}

#[tokio::test]
async fn welcome_then_only_subscribed_metric_types_arrive() {
    let gw = Gateway::memory(|_| {}).await;
    let (mut ws, welcome) = gw.ws().await;
    assert_eq!(welcome["type"], "welcome");
    assert!(welcome["connection_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(welcome["metric_types"].as_array().unwrap().len(), 7);
    assert_eq!(welcome["ping_interval_seconds"], 30.0);
    assert_eq!(welcome["pong_timeout_seconds"], 60.0);

    let ack = subscribe(&mut ws, "subscribe", &["error", "performance"]).await;
    assert_eq!(ack["metrics"], json!(["performance", "error"]));
    gw.emit_value(MetricType::QueueStatus, json!({ "n": 0 }))
        .await;
    gw.emit_value(MetricType::Error, json!({ "n": 1 })).await;
    gw.emit_value(MetricType::WorkerStatus, json!({ "n": 2 }))
        .await;
    gw.emit_value(MetricType::Performance, json!({ "n": 3 }))
        .await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "metric");
    assert_eq!(first["metric_type"], "error");
    assert_eq!(first["source"], "test");
    assert_eq!(first["data"], json!({ "n": 1 }));
    assert!(first["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
    let second = next_json(&mut ws).await;
    assert_eq!(
        (second["metric_type"].as_str(), &second["data"]["n"]),
        (Some("performance"), &json!(3))
    );

    // Unsubscribing stops a type; the others keep coming.
    let ack = subscribe(&mut ws, "unsubscribe", &["error"]).await;
    assert_eq!(ack["metrics"], json!(["performance"]));
    gw.emit_value(MetricType::Error, json!({ "n": 4 })).await;
    gw.emit_value(MetricType::Performance, json!({ "n": 5 }))
        .await;
    let next = next_json(&mut ws).await;
    assert_eq!(
        (next["metric_type"].as_str(), &next["data"]["n"]),
        (Some("performance"), &json!(5))
    );

    // A bad request is answered with an error naming the problem; the
    // connection stays usable.
    send(
        &mut ws,
        json!({ "type": "subscribe", "metrics": ["error", "bogus"] }),
    )
    .await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert!(err["error"].as_str().unwrap().contains("'bogus'"), "{err}");
    send(&mut ws, json!({ "type": "stats" })).await;
    assert_eq!(next_json(&mut ws).await["type"], "stats");

    // Shutdown says goodbye with 1001 (going away) and `run` returns.
    gw.shutdown.cancel();
    let close = read_until_closed(&mut ws, T).await;
    assert_eq!(close.map(|c| c.0), Some(1001));
    within("the gateway stops", T, gw.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn client_that_never_answers_pings_is_dropped_after_the_pong_timeout() {
    let gw = Gateway::memory(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.pong_timeout = Duration::from_millis(400);
    })
    .await;
    // A reads its socket, so its WebSocket layer answers every ping.
    let (alive, _) = gw.ws().await;
    let (reader_tx, mut reader_rx) = tokio::sync::mpsc::channel::<Value>(16);
    let (mut alive_tx, mut alive_rx) = alive.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = alive_rx.next().await {
            if let Message::Text(t) = m {
                let _ = reader_tx
                    .send(serde_json::from_str(t.as_str()).unwrap())
                    .await;
            }
        }
    });
    // B never reads after the handshake: it never answers a ping.
    let (mut silent, _) = gw.ws().await;

    gw.wait_metric(
        r#"devfleet_gateway_disconnects_total{reason="pong_timeout"}"#,
        |v| v >= 1.0,
    )
    .await;
    // Its socket is closed (the close frame, code 1008, is lost when the
    // client's late pongs meet the closed socket and reset it).
    if let Some((code, reason)) = read_until_closed(&mut silent, T).await {
        assert_eq!(code, 1008, "{reason}");
    }

    // A has been connected longer than the timeout and is still served.
    alive_tx
        .send(Message::text(json!({ "type": "stats" }).to_string()))
        .await
        .unwrap();
    let stats = within("a stats answer", T, reader_rx.recv()).await.unwrap();
    assert_eq!(stats["type"], "stats");
    assert_eq!(
        sample(
            &gw.metrics().await,
            r#"devfleet_gateway_disconnects_total{reason="pong_timeout"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&gw.metrics().await, "devfleet_gateway_connections"),
        Some(1.0)
    );
    reader.abort();
    gw.stop().await;
}

#[tokio::test]
async fn slow_client_is_dropped_while_fast_clients_keep_receiving() {
    // Bursts stay well under the queue, so only a client that stopped
    // reading can fill it.
    let gw = Gateway::memory(|c| c.client_queue = 64).await;
    let (mut slow, _) = gw.ws().await;
    subscribe(&mut slow, "subscribe", &["performance"]).await;

    let mut fast = Vec::new();
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(Vec::<i64>::new());
    let progress_tx = std::sync::Arc::new(progress_tx);
    for i in 0..3 {
        let (mut ws, _) = gw.ws().await;
        subscribe(&mut ws, "subscribe", &["performance"]).await;
        let progress = progress_tx.clone();
        fast.push(tokio::spawn(async move {
            // Records the last sequence number seen; any gap fails the test.
            let mut expected = 0i64;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    let seq = v["data"]["seq"].as_i64().unwrap();
                    assert_eq!(seq, expected, "fast client {i} missed a frame");
                    expected += 1;
                    progress.send_modify(|p| {
                        if p.len() <= i {
                            p.resize(i + 1, -1);
                        }
                        p[i] = seq;
                    });
                }
            }
            expected
        }));
    }

    let pad = "x".repeat(8 * 1024);
    let mut seq = 0i64;
    let slow_dropped = r#"devfleet_gateway_disconnects_total{reason="slow_client"}"#;
    for _batch in 0..2000 {
        for _ in 0..16 {
            gw.emit_value(MetricType::Performance, json!({ "seq": seq, "pad": pad }))
                .await;
            seq += 1;
        }
        let last = seq - 1;
        let mut rx = progress_rx.clone();
        within(
            "fast clients to keep up",
            T,
            rx.wait_for(|p| p.len() == 3 && p.iter().all(|s| *s == last)),
        )
        .await
        .unwrap();
        if sample(&gw.metrics().await, slow_dropped) == Some(1.0) {
            break;
        }
    }
    assert_eq!(
        sample(&gw.metrics().await, slow_dropped),
        Some(1.0),
        "the slow client was never dropped"
    );
    // The fast clients saw every frame, in order, up to the end.
    assert_eq!(
        sample(&gw.metrics().await, "devfleet_gateway_connections"),
        Some(3.0)
    );
    // The slow client finds its connection closed once it reads its backlog.
    read_until_closed(&mut slow, Duration::from_secs(60)).await;
    gw.stop().await;
    for f in fast {
        assert_eq!(within("fast client ends", T, f).await.unwrap(), seq);
    }
}

#[tokio::test]
async fn connection_without_the_token_is_refused() {
    let gw = Gateway::memory(|c| c.token = Some("s3cret".into())).await;
    let url = format!("ws://{}/ws", gw.addr);
    for (url, bearer) in [
        (url.clone(), None),
        (format!("{url}?token=wrong"), None),
        (url.clone(), Some("wrong")),
    ] {
        match ws_connect(&url, bearer).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
            other => panic!("expected 401 for {url} {bearer:?}, got {other:?}"),
        }
    }
    let (_, welcome) = ws_connect(&format!("{url}?token=s3cret"), None)
        .await
        .unwrap();
    assert_eq!(welcome["type"], "welcome");
    let (_, welcome) = ws_connect(&url, Some("s3cret")).await.unwrap();
    assert_eq!(welcome["type"], "welcome");

    // The HTTP routes want it too, except the health check.
    assert_eq!(gw.get("/metrics").await.0, 401);
    assert_eq!(gw.get("/").await.0, 401);
    assert_eq!(gw.get("/healthz").await, (200, "ok\n".into()));
    let (status, body) = http_get(gw.addr, "/metrics", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &body,
            r#"devfleet_gateway_refused_total{reason="unauthorized"}"#
        ),
        Some(5.0)
    );

    // A browser page from another site may not open the stream.
    let mut request = format!("{url}?token=s3cret").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", HeaderValue::from_static("http://evil.example"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403 for a foreign origin, got {other:?}"),
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_under_concurrent_upgrades() {
    const LIMIT: usize = 3;
    let gw = Gateway::memory(|c| c.max_connections = LIMIT).await;
    let url = format!("ws://{}/ws", gw.addr);
    // Every handshake at once: each upgrade is checked before any of the
    // accepted ones has registered as a client.
    let attempts = futures::future::join_all((0..40).map(|_| ws_connect(&url, None))).await;
    let mut open = Vec::new();
    for attempt in attempts {
        match attempt {
            Ok((ws, welcome)) => {
                assert_eq!(welcome["type"], "welcome");
                open.push(ws);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
            Err(other) => panic!("expected a welcome or 503, got {other:?}"),
        }
    }
    assert_eq!(
        open.len(),
        LIMIT,
        "connections accepted over a limit of {LIMIT}"
    );
    // A connection that ends gives its slot back.
    let mut first = open.remove(0);
    first.close(None).await.unwrap();
    read_until_closed(&mut first, T).await;
    let (_again, welcome) = wait_for("a slot freed by the closed connection", T, || async {
        ws_connect(&url, None).await.ok()
    })
    .await;
    assert_eq!(welcome["type"], "welcome");
    gw.stop().await;
}

#[tokio::test]
async fn a_public_address_without_a_token_needs_an_origin_allow_list() {
    let config = |addr: &str, token: Option<&str>, origins: &[&str]| {
        let mut config = Config::new(Connections::in_memory());
        config.addr = addr.parse().unwrap();
        config.token = token.map(str::to_owned);
        config.allowed_origins = origins.iter().map(|o| o.to_string()).collect();
        config
    };
    let shutdown = CancellationToken::new();
    let err = run(config("0.0.0.0:0", None, &[]), shutdown.clone())
        .await
        .expect_err("a public gateway open to any site's pages");
    assert!(
        err.to_string().contains("DEVFLEET_GATEWAY_ORIGINS"),
        "{err}"
    );
    config("0.0.0.0:7070", Some("s3cret"), &[])
        .validate()
        .unwrap();
    config("0.0.0.0:7070", None, &["https://ops.example.com"])
        .validate()
        .unwrap();
    config("127.0.0.1:7070", None, &[]).validate().unwrap();
    config("[::1]:7070", None, &[]).validate().unwrap();
}

#[tokio::test]
async fn oversize_frames_end_the_connection() {
    let gw = Gateway::memory(|c| c.max_frame_bytes = 4096).await;
    let (mut ws, _) = gw.ws().await;
    send(
        &mut ws,
        json!({ "type": "stats", "pad": "x".repeat(10_000) }),
    )
    .await;
    read_until_closed(&mut ws, T).await;
    gw.wait_metric(
        r#"devfleet_gateway_disconnects_total{reason="protocol_error"}"#,
        |v| v == 1.0,
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn stats_report_windowed_avg_and_percentiles_of_known_samples() {
    let gw = Gateway::memory(|_| {}).await;
    let (mut ws, _) = gw.ws().await;
    subscribe(&mut ws, "subscribe", &["performance"]).await;
    for v in 1..=100 {
        gw.emit_value(
            MetricType::Performance,
            json!({ "duration_ms": v, "stage": "dev" }),
        )
        .await;
    }
    gw.emit_value(MetricType::Error, json!({ "n": 1 })).await;
    // Frames arrive after they were recorded: 100 frames means 100 samples.
    for _ in 0..100 {
        assert_eq!(next_json(&mut ws).await["type"], "metric");
    }
    send(
        &mut ws,
        json!({ "type": "stats", "metrics": ["performance"] }),
    )
    .await;
    let stats = next_json(&mut ws).await;
    assert_eq!(stats["type"], "stats");
    assert_eq!(stats["window_seconds"], 60.0);
    let perf = &stats["metrics"]["performance"];
    assert_eq!(perf["count"], 100);
    let d = &perf["fields"]["duration_ms"];
    assert_eq!(d["count"], 100);
    assert_eq!(d["avg"], 50.5);
    assert_eq!(d["p50"], 50.0);
    assert_eq!(d["p95"], 95.0);
    assert_eq!((&d["min"], &d["max"]), (&json!(1.0), &json!(100.0)));
    assert!(
        stats["metrics"].get("error").is_none(),
        "filtered to performance"
    );
    // The durations also feed the Prometheus histogram.
    let text = gw.metrics().await;
    assert_eq!(
        sample(
            &text,
            r#"devfleet_stage_duration_seconds_count{stage="dev"}"#
        ),
        Some(100.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"devfleet_stage_duration_seconds_bucket{stage="dev",le="0.05"}"#
        ),
        Some(50.0)
    );
    gw.stop().await;
}

#[tokio::test]
async fn undecodable_broadcasts_are_counted_not_fatal() {
    let gw = Gateway::memory(|_| {}).await;
    let (mut ws, _) = gw.ws().await;
    subscribe(&mut ws, "subscribe", &["performance"]).await;
    let bus = gw.connections.broadcast.clone();
    bus.broadcast("devfleet.metrics.performance", b"not an envelope")
        .await
        .unwrap();
    bus.broadcast("devfleet.events.task.built", &[0xc1])
        .await
        .unwrap();
    gw.emit_value(MetricType::Performance, json!({ "after": true }))
        .await;
    assert_eq!(next_json(&mut ws).await["data"]["after"], true);
    assert_eq!(
        sample(&gw.metrics().await, "devfleet_gateway_undecodable_total"),
        Some(2.0)
    );
    gw.stop().await;
}

#[tokio::test]
async fn events_reach_clients_with_their_trace_id() {
    let gw = Gateway::memory(|_| {}).await;
    let (mut ws, _) = gw.ws().await;
    subscribe(&mut ws, "subscribe", &["error"]).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let envelope = Envelope::new(TaskFailed {
        plan_id: "p1".into(),
        path: "app/models.py".into(),
        attempt: 2,
        stage: Stage::Dev,
        error: "boom".into(),
        retryable: true,
    })
    .with_traceparent(Some(format!("00-{trace}-00f067aa0ba902b7-01")));
    gw.connections
        .broadcast
        .broadcast("devfleet.events.task.failed", &envelope.encode().unwrap())
        .await
        .unwrap();
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["metric_type"], "error");
    assert_eq!(frame["source"], "event");
    assert_eq!(frame["data"]["event"], "task.failed");
    assert_eq!(frame["data"]["path"], "app/models.py");
    assert_eq!(frame["trace_id"], trace);
    gw.wait_metric(
        r#"devfleet_gateway_events_total{kind="task.failed"}"#,
        |v| v == 1.0,
    )
    .await;
    gw.stop().await;
}

fn new_task(path: &str, deps: &[&str]) -> NewTask {
    NewTask {
        path: path.into(),
        spec: format!("write {path}"),
        content: None,
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
        priority: 1,
        estimate: 1,
        executor: None,
    }
}

async fn create_plan(c: &Connections, name: &str, tasks: Vec<NewTask>) -> String {
    let id = unique("plan");
    let now = devfleet_protocol::now_ms();
    let created = c
        .store
        .create_plan(
            PlanRecord {
                detail: json!({ "critical_path": ["app/db.py", "app/models.py", "app/api.py", "app/main.py"] })
                    .to_string(),
                ..PlanRecord::new(&id, name, PlanStatus::Running, now)
            },
            tasks,
        )
        .await
        .unwrap();
    assert!(created);
    id
}

/// The fence of `claim`'s leases: every task is claimed once, by worker-1.
static WORKER_1: std::sync::LazyLock<devfleet_store::Fence> =
    std::sync::LazyLock::new(|| devfleet_store::Fence::holder("worker-1", 1));

async fn claim(c: &Connections, path: &str) {
    let lease = Duration::from_secs(600);
    let claimed = c
        .store
        .claim_next("worker-1", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.path, path);
}

#[tokio::test]
async fn task_state_changes_in_the_store_are_pushed() {
    let gw = Gateway::memory(|_| {}).await;
    let plan = create_plan(
        &gw.connections,
        "push",
        vec![new_task("a.py", &[]), new_task("b.py", &["a.py"])],
    )
    .await;
    let (mut ws, _) = gw.ws().await;
    subscribe(&mut ws, "subscribe", &["task_progress"]).await;
    // The poller has seen the plan once it counts its ready task.
    gw.wait_metric(r#"devfleet_tasks{state="ready"}"#, |v| v == 1.0)
        .await;
    claim(&gw.connections, "a.py").await;
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["data"]["event"], "task_state");
    assert_eq!(frame["data"]["plan_id"], plan.as_str());
    assert_eq!(frame["data"]["path"], "a.py");
    assert_eq!(frame["data"]["state"], "leased");
    assert_eq!(frame["data"]["previous"], "ready");
    gw.connections
        .store
        .complete(&plan, "a.py", &WORKER_1, "aa")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let f = next_json(&mut ws).await;
        seen.push((
            f["data"]["path"].as_str().unwrap().to_owned(),
            f["data"]["state"].as_str().unwrap().to_owned(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("a.py".into(), "done".into()),
            ("b.py".into(), "ready".into())
        ]
    );

    let (status, body) = gw.get(&format!("/api/plans/{plan}")).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["plan"]["status"], "running");
    assert_eq!(v["tasks"][1]["layer"], 1);
    assert_eq!(gw.get("/api/plans/nope").await.0, 404);
    gw.stop().await;
}

/// Puts one of everything the pipeline records in the store.
async fn seed_pipeline(c: &Connections) {
    let store = &c.store;
    store
        .kv_put(
            "breaker",
            "dev",
            r#"{"stage":"dev","state":"closed","reason":"never tripped"}"#,
            None,
        )
        .await
        .unwrap();
    store
        .kv_put(
            "breaker",
            "qa",
            r#"{"stage":"qa","state":"open","reason":"error rate 62% over 13 outcomes"}"#,
            None,
        )
        .await
        .unwrap();
    store
        .kv_put(
            "canary",
            "d-7f3a",
            &json!({
                "id": "d-7f3a", "status": "progressing", "stage": 1, "weight": 25,
                "spec": { "stages": [10, 25, 50, 75, 100] }, "updated_ms": devfleet_protocol::now_ms(),
            })
            .to_string(),
            None,
        )
        .await
        .unwrap();
    store
        .kv_put(
            "dlq",
            "t-1",
            &json!({
                "id": "t-1", "source": "task", "plan_id": "p", "path": "app/legacy.py",
                "reason": "gave up after 3 attempts: SyntaxError: invalid syntax (line 12)",
                "at_ms": devfleet_protocol::now_ms(), "attempts": 3, "payload": "AAAA",
            })
            .to_string(),
            None,
        )
        .await
        .unwrap();
    let far = devfleet_protocol::now_ms() + 3_600_000;
    for (name, slots, busy) in [("dev-worker@a", 6, 4), ("dev-worker@b", 4, 1)] {
        store
            .kv_put(
                "workers",
                name,
                &json!({ "slots": slots, "busy": busy, "waiting": 0, "at_ms": 0, "expires_ms": far }).to_string(),
                None,
            )
            .await
            .unwrap();
    }
    store.incr("cache_hits", 3).await.unwrap();
    store.incr("cache_misses", 9).await.unwrap();
}

/// Records the usage of one executor run of a plan's task.
async fn seed_usage(connections: &Connections, plan: &str) {
    let usage = devfleet_protocol::Usage {
        provider: "scripted".into(),
        model: "m1".into(),
        tokens_in: 120,
        tokens_out: 30,
        cost_usd: 0.25,
        estimated: false,
    };
    assert!(connections
        .store
        .record_usage(plan, "a.py", 1, &[usage])
        .await
        .unwrap());
}

#[tokio::test]
async fn metrics_endpoint_passes_promtool_check() {
    let promtool = which("promtool").unwrap_or_else(|| {
        panic!(
            "promtool is missing: install the Debian package `prometheus` (scripts/test.sh does)"
        )
    });
    let gw = Gateway::memory(|_| {}).await;
    seed_pipeline(&gw.connections).await;
    let plan = create_plan(
        &gw.connections,
        "prom",
        vec![new_task("a.py", &[]), new_task("b.py", &["a.py"])],
    )
    .await;
    claim(&gw.connections, "a.py").await;
    seed_usage(&gw.connections, &plan).await;
    gw.emit_value(
        MetricType::Performance,
        json!({ "stage": "analyze", "duration_ms": 42 }),
    )
    .await;
    gw.emit_value(
        MetricType::Error,
        json!({ "stage": "dev", "error": "x\"y\nz" }),
    )
    .await;
    gw.connections
        .metrics("canary")
        .emit_value(
            MetricType::Deployment,
            json!({ "deployment_id": "d-live", "weight": 50, "stage": 2 }),
        )
        .await;
    gw.wait_metric(
        r#"devfleet_canary_weight_ratio{deployment="d-live"}"#,
        |v| v == 0.5,
    )
    .await;
    gw.wait_metric(r#"devfleet_llm_calls_total{model="scripted/m1"}"#, |v| {
        v == 1.0
    })
    .await;

    let text = gw.metrics().await;
    let expect = [
        (r#"devfleet_queue_depth{queue="work.dev"}"#, 0.0),
        (r#"devfleet_tasks{state="leased"}"#, 1.0),
        (r#"devfleet_tasks{state="pending"}"#, 1.0),
        (r#"devfleet_plans{status="running"}"#, 1.0),
        ("devfleet_workers", 2.0),
        ("devfleet_worker_slots", 10.0),
        ("devfleet_worker_slots_busy", 5.0),
        ("devfleet_cache_hits_total", 3.0),
        ("devfleet_cache_misses_total", 9.0),
        (
            r#"devfleet_llm_tokens_total{model="scripted/m1",direction="in"}"#,
            120.0,
        ),
        (
            r#"devfleet_llm_tokens_total{model="scripted/m1",direction="out"}"#,
            30.0,
        ),
        (r#"devfleet_llm_cost_usd_total{model="scripted/m1"}"#, 0.25),
        (r#"devfleet_llm_calls_total{model="scripted/m1"}"#, 1.0),
        ("devfleet_dlq_entries", 1.0),
        (r#"devfleet_breaker_state{breaker="qa",state="open"}"#, 1.0),
        (
            r#"devfleet_breaker_state{breaker="qa",state="closed"}"#,
            0.0,
        ),
        (
            r#"devfleet_breaker_state{breaker="dev",state="closed"}"#,
            1.0,
        ),
        (r#"devfleet_canary_weight_ratio{deployment="d-7f3a"}"#, 0.25),
        (
            r#"devfleet_stage_duration_seconds_count{stage="analyze"}"#,
            1.0,
        ),
        (r#"devfleet_gateway_frames_total{metric_type="error"}"#, 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }

    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}\n---\n{text}"
    );
    drop(plan);
    gw.stop().await;
}

#[tokio::test]
async fn samples_over_nats_broadcast_reach_clients() {
    let nats = devfleet_testkit::nats_url();
    let mut connections = Connections::in_memory();
    connections.broadcast = devfleet_bus::connect(&nats).await.unwrap();
    let gw = Gateway::start(connections, |_| {}).await;
    let (mut ws, _) = gw.ws().await;
    subscribe(&mut ws, "subscribe", &["system_health"]).await;
    // Subjects are shared with any other run on this server: find ours.
    let source = unique("nats-test");
    gw.connections
        .metrics(&source)
        .emit_value(MetricType::SystemHealth, json!({ "cpu": 0.5 }))
        .await;
    gw.connections
        .broadcast
        .broadcast("devfleet.metrics.system_health", b"garbage")
        .await
        .unwrap();
    let frame = within("our sample over NATS", T, async {
        loop {
            let f = next_json(&mut ws).await;
            if f["source"] == source.as_str() {
                return f;
            }
        }
    })
    .await;
    assert_eq!(frame["data"]["cpu"], 0.5);
    gw.wait_metric("devfleet_gateway_undecodable_total", |v| v >= 1.0)
        .await;
    gw.connections.broadcast.close().await;
    gw.stop().await;
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A Chrome DevTools Protocol session on one page.
struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            request["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        within(&format!("CDP {method}"), T, async {
            loop {
                let v = next_json(&mut self.ws).await;
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "CDP {method}: {v}");
                    return v["result"].clone();
                }
            }
        })
        .await
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Task path → state as the page shows it.
    async fn node_states(&mut self) -> Vec<(String, String)> {
        let v = self
            .eval(
                "JSON.stringify([...document.querySelectorAll('#dag .node')]\
                 .map(n => [n.getAttribute('data-path'), n.getAttribute('data-state')]))",
            )
            .await;
        let mut states: Vec<(String, String)> =
            serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap();
        states.sort();
        states
    }

    async fn wait_states(&mut self, what: &str, expected: &[(&str, &str)]) {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let states = self.node_states().await;
            let ok = expected
                .iter()
                .all(|(p, s)| states.iter().any(|(sp, ss)| sp == p && ss == s));
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "page never showed {what}: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn dashboard_shows_a_running_plan_changing_state_in_chromium() {
    let chromium = which("chromium").unwrap_or_else(|| {
        panic!("chromium is missing: install the Debian package `chromium` (scripts/test.sh does)")
    });
    let gw = Gateway::memory(|_| {}).await;
    let c = gw.connections.clone();
    seed_pipeline(&c).await;
    let plan = create_plan(
        &c,
        "flask-todo",
        vec![
            new_task("app/db.py", &[]),
            new_task("app/config.py", &[]),
            new_task("app/models.py", &["app/db.py"]),
            new_task("app/auth.py", &["app/models.py", "app/config.py"]),
            new_task("app/api.py", &["app/models.py", "app/auth.py"]),
            new_task("app/views.py", &["app/models.py"]),
            new_task(
                "app/main.py",
                &["app/api.py", "app/views.py", "app/config.py"],
            ),
            new_task("tests/test_api.py", &["app/api.py"]),
        ],
    )
    .await;
    gw.emit_value(
        MetricType::Error,
        json!({ "stage": "qa", "error": "pytest failed" }),
    )
    .await;

    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    std::fs::create_dir_all(&profile).unwrap();
    let mut browser = tokio::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--window-size=1440,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{}/", gw.addr))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Chromium writes its DevTools port and browser path into the profile.
    let port_file = profile.join("DevToolsActivePort");
    let endpoint = wait_for(
        "chromium's DevTools endpoint",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&port_file).ok()?;
            let mut lines = text.lines();
            let port = lines.next()?.trim().to_owned();
            let path = lines.next()?.trim().to_owned();
            Some(format!("ws://127.0.0.1:{port}{path}"))
        },
    )
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
        .await
        .unwrap();
    let mut cdp = Cdp {
        ws,
        next_id: 0,
        session: None,
    };
    let targets = cdp.call("Target.getTargets", json!({})).await;
    let page = targets["targetInfos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .expect("a page target")["targetId"]
        .clone();
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({ "targetId": page, "flatten": true }),
        )
        .await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
    // A fixed viewport, so the screenshot is the same on every machine.
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1440, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await;

    // The page loaded, connected its stream, and drew the plan.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = cdp
            .eval("document.body.dataset.ws === 'open' && document.querySelectorAll('#dag .node').length")
            .await;
        if ready == json!(8) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dashboard not ready: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cdp.eval("document.querySelector('#dag').dataset.planId")
            .await,
        json!(plan)
    );
    cdp.wait_states(
        "the initial states",
        &[
            ("app/db.py", "ready"),
            ("app/config.py", "ready"),
            ("app/models.py", "pending"),
        ],
    )
    .await;

    // The test moves tasks through the store; the page follows without a reload.
    claim(&c, "app/db.py").await;
    cdp.wait_states("db leased", &[("app/db.py", "leased")])
        .await;
    c.store
        .complete(&plan, "app/db.py", &WORKER_1, "h1")
        .await
        .unwrap();
    cdp.wait_states(
        "db done, models ready",
        &[("app/db.py", "done"), ("app/models.py", "ready")],
    )
    .await;
    claim(&c, "app/config.py").await;
    c.store
        .complete(&plan, "app/config.py", &WORKER_1, "h2")
        .await
        .unwrap();
    claim(&c, "app/models.py").await;
    c.store
        .mark_built(&plan, "app/models.py", &WORKER_1, "h3")
        .await
        .unwrap();
    cdp.wait_states(
        "models in QA",
        &[("app/config.py", "done"), ("app/models.py", "built")],
    )
    .await;
    c.store
        .complete(&plan, "app/models.py", &WORKER_1, "h3")
        .await
        .unwrap();
    claim(&c, "app/auth.py").await;
    c.store
        .fail(&plan, "app/auth.py", &WORKER_1, "SyntaxError")
        .await
        .unwrap();
    claim(&c, "app/views.py").await;
    cdp.wait_states(
        "a failure blocking its dependents",
        &[
            ("app/models.py", "done"),
            ("app/auth.py", "failed"),
            ("app/api.py", "blocked"),
            ("app/main.py", "blocked"),
            ("app/views.py", "leased"),
        ],
    )
    .await;
    let updates = cdp.eval("Number(document.body.dataset.updates)").await;
    assert!(
        updates.as_f64().unwrap() >= 5.0,
        "updates applied in place: {updates}"
    );
    let log = cdp.eval("document.querySelector('#log').textContent").await;
    assert!(
        log.as_str().unwrap().contains("task_state"),
        "stream log: {log}"
    );
    let panels = cdp
        .eval(
            "[document.querySelector('[data-breaker=\"qa\"]')?.dataset.state, \
              document.querySelector('[data-deployment=\"d-7f3a\"]') !== null, \
              document.querySelector('#k-workers').textContent, \
              document.querySelectorAll('#dlq [data-dlq]').length]",
        )
        .await;
    assert_eq!(panels, json!(["open", true, "2", 1]));
    // The usage card follows the fleet's usage per model.
    seed_usage(&c, &plan).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let usage = cdp
            .eval("[document.querySelector('#k-usage').textContent, document.querySelector('#k-usage-sub').textContent]")
            .await;
        if usage == json!(["150 tok", "$0.2500 · scripted/m1 150"]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage card: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Let the transitions finish, then keep a screenshot for people.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let shot = cdp
        .call("Page.captureScreenshot", json!({ "format": "png" }))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let path = artifacts_dir().join("dashboard.png");
    std::fs::write(&path, png).unwrap();
    eprintln!("dashboard screenshot: {}", path.display());

    cdp.session = None;
    let _ =
        tokio::time::timeout(Duration::from_secs(5), cdp.call("Browser.close", json!({}))).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), browser.wait()).await;
    let _ = browser.kill().await;
    let _ = std::fs::remove_dir_all(&profile);
    assert_eq!(
        c.store
            .task(&plan, "app/api.py")
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Blocked
    );
    gw.stop().await;
}
