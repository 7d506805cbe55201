//! Fan-out benchmark: many WebSocket clients on loopback, each subscribed
//! to `performance`, while samples are published on the in-memory bus at a
//! fixed rate. Prints, per publish rate: frames delivered per second (over
//! all clients), delivery latency (publish → client read) p50/p99/max, and
//! how many clients the gateway dropped as slow.
//!
//! Everything (publisher, gateway, clients) runs in this one process, so
//! the clients' own parsing competes with the gateway for the CPU: the
//! figures are a floor, not a ceiling.
//!
//! usage: cargo bench -p devfleet-metrics-gateway --bench ws_fanout -- [CLIENTS] [SECONDS] [RATES]
//!   CLIENTS  concurrent WebSocket clients (default 1000)
//!   SECONDS  length of each phase (default 5)
//!   RATES    comma-separated samples published per second (default 20,100,200)

use devfleet_metrics_gateway::{client, run, Config};
use devfleet_protocol::MetricType;
use devfleet_runtime::Connections;
use futures::StreamExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Latency samples per client and phase are capped (memory bound).
const MAX_SAMPLES_PER_CLIENT: usize = 4096;

struct Shared {
    epoch: Instant,
    delivered: AtomicU64,
    /// Latencies in µs, one vector per client, drained after each phase.
    latencies: Vec<Mutex<Vec<u32>>>,
    measuring: AtomicBool,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let clients: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let seconds: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    let rates: Vec<u64> = args
        .get(2)
        .map(|a| a.split(',').map(str::parse).collect::<Result<_, _>>())
        .transpose()?
        .unwrap_or_else(|| vec![20, 100, 200]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(clients, Duration::from_secs(seconds), &rates))
}

async fn bench(clients: usize, phase: Duration, rates: &[u64]) -> anyhow::Result<()> {
    let connections = Connections::in_memory();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut config = Config::new(connections.clone()).with_listener(listener);
    config.max_connections = clients + 10;
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(run(config, shutdown.clone()));

    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        delivered: AtomicU64::new(0),
        latencies: (0..clients).map(|_| Mutex::new(Vec::new())).collect(),
        measuring: AtomicBool::new(false),
    });
    let url = format!("ws://{addr}/ws");
    let started = Instant::now();
    let mut readers = Vec::with_capacity(clients);
    let closed = Arc::new(AtomicU64::new(0));
    for i in 0..clients {
        let (mut socket, _) = connect_retrying(&url).await?;
        client::subscribe(&mut socket, &url, &[MetricType::Performance]).await?;
        let shared = shared.clone();
        let closed = closed.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let now = shared.epoch.elapsed().as_micros() as u64;
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                if !shared.measuring.load(Ordering::Relaxed) {
                    continue;
                }
                if let Some(sent) = sent_us(text.as_str()) {
                    let mut l = shared.latencies[i]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if l.len() < MAX_SAMPLES_PER_CLIENT {
                        l.push(now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                    }
                }
            }
            closed.fetch_add(1, Ordering::Relaxed);
        }));
    }
    println!(
        "metrics-gateway fan-out: {clients} WebSocket clients connected and subscribed in {:.1} s (loopback, one process)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:>8} {:>10} {:>12} {:>14} {:>9} {:>9} {:>9} {:>9}",
        "rate/s", "published", "delivered", "delivered/s", "p50 ms", "p99 ms", "max ms", "dropped"
    );

    let metrics = connections.metrics("bench");
    let mut seq = 0u64;
    for &rate in rates {
        let tick = Duration::from_millis(10);
        let per_tick = rate as f64 * tick.as_secs_f64();
        let mut interval = tokio::time::interval(tick);
        let before = shared.delivered.load(Ordering::Relaxed);
        let closed_before = closed.load(Ordering::Relaxed);
        shared.measuring.store(true, Ordering::Relaxed);
        let begin = Instant::now();
        let mut published = 0u64;
        let mut owed = 0.0;
        while begin.elapsed() < phase {
            interval.tick().await;
            owed += per_tick;
            while owed >= 1.0 {
                let sent_us = shared.epoch.elapsed().as_micros() as u64;
                metrics
                    .emit_value(
                        MetricType::Performance,
                        serde_json::json!({ "stage": "bench", "seq": seq, "sent_us": sent_us }),
                    )
                    .await;
                seq += 1;
                published += 1;
                owed -= 1.0;
            }
        }
        // Let the last frames arrive (bounded), then measure.
        let expected = before
            + published * (clients as u64 - closed.load(Ordering::Relaxed).min(clients as u64));
        let grace = Instant::now();
        while shared.delivered.load(Ordering::Relaxed) < expected
            && grace.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = begin.elapsed().as_secs_f64();
        shared.measuring.store(false, Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed) - before;
        let mut all: Vec<u32> = Vec::new();
        for l in &shared.latencies {
            all.append(&mut l.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all.sort_unstable();
        let pct = |q: f64| {
            if all.is_empty() {
                f64::NAN
            } else {
                let rank = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len());
                f64::from(all[rank - 1]) / 1000.0
            }
        };
        println!(
            "{:>8} {:>10} {:>12} {:>14.0} {:>9.2} {:>9.2} {:>9.2} {:>9}",
            rate,
            published,
            delivered,
            delivered as f64 / elapsed,
            pct(0.50),
            pct(0.99),
            all.last().map_or(f64::NAN, |v| f64::from(*v) / 1000.0),
            closed.load(Ordering::Relaxed) - closed_before
        );
    }

    shutdown.cancel();
    gateway.await??;
    for r in readers {
        r.abort();
    }
    Ok(())
}

/// Connects, retrying briefly while the gateway starts.
async fn connect_retrying(url: &str) -> anyhow::Result<(client::Socket, serde_json::Value)> {
    let mut attempt = 0;
    loop {
        match client::connect(url, None).await {
            Ok(c) => return Ok(c),
            Err(e) if attempt < 50 => {
                attempt += 1;
                tracing::debug!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The `sent_us` field of a frame, found without parsing the whole JSON
/// (the clients share the CPU with the gateway they measure).
fn sent_us(text: &str) -> Option<u64> {
    let rest = &text[text.find("\"sent_us\":")? + "\"sent_us\":".len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
