//! Bus throughput and latency: publish → consume → ack, per backend.
//!
//! Run with `scripts/bench-bus.sh` (starts the servers), or by hand with
//! `DEVFLEET_AMQP_URL`/`DEVFLEET_NATS_URL` exported:
//! `cargo bench -p devfleet-bus --bench throughput -- [MESSAGES] [BACKENDS]`.
//! Prints messages/s and p50/p99 publish-to-consume latency.

use devfleet_bus::{ConsumeOptions, SharedBus};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run(name: &str, bus: SharedBus, messages: usize) -> anyhow::Result<()> {
    let queue = format!("bench.{}", uuid::Uuid::new_v4().simple());
    let mut consumer = bus
        .consume(&queue, ConsumeOptions::default().prefetch(256))
        .await?;
    let publisher = {
        let bus = bus.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            // A few publishers in flight at once, as services publish concurrently.
            let mut set = tokio::task::JoinSet::new();
            let per = messages / 8;
            for w in 0..8 {
                let bus = bus.clone();
                let queue = queue.clone();
                let n = if w == 7 { messages - per * 7 } else { per };
                set.spawn(async move {
                    let mut payload = vec![0u8; 256];
                    for _ in 0..n {
                        payload[..8].copy_from_slice(&now_us().to_le_bytes());
                        bus.publish(&queue, &payload).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            anyhow::Ok(())
        })
    };
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(messages);
    while latencies.len() < messages {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("{name}: no message for 30 s"))?
            .ok_or_else(|| anyhow::anyhow!("{name}: consumer closed"))??;
        let sent = u64::from_le_bytes(delivery.payload[..8].try_into()?);
        latencies.push(now_us().saturating_sub(sent));
        delivery.ack().await?;
    }
    let elapsed = start.elapsed();
    publisher.await??;
    latencies.sort_unstable();
    println!(
        "{name:<8} {messages:>7} msgs  {:>9.0} msg/s  p50 {:>8.2} ms  p99 {:>8.2} ms",
        messages as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0,
    );
    let _ = bus.purge(&queue).await;
    bus.close().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let messages: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let backends = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "memory,amqp,nats".into());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        println!("publish -> consume -> ack, 256-byte messages, 8 concurrent publishers");
        for backend in backends.split(',') {
            let url = match backend {
                "memory" => "memory://".to_owned(),
                "amqp" => std::env::var("DEVFLEET_AMQP_URL")
                    .map_err(|_| anyhow::anyhow!("DEVFLEET_AMQP_URL is not set"))?,
                "nats" => std::env::var("DEVFLEET_NATS_URL")
                    .map_err(|_| anyhow::anyhow!("DEVFLEET_NATS_URL is not set"))?,
                other => anyhow::bail!("unknown backend {other}"),
            };
            let bus: SharedBus = devfleet_bus::connect(&url).await?;
            run(backend, Arc::clone(&bus), messages).await?;
        }
        Ok(())
    })
}
