//! `devfleet watch`: the metrics gateway's live stream in the terminal.

use devfleet_metrics_gateway::client::{self, ClientError};
use devfleet_protocol::MetricType;
use serde_json::{json, Value};
use std::io::Write as _;
use std::process::ExitCode;

/// Subscribe to the metrics gateway and print what it streams.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  devfleet watch                                  # everything, as readable lines
  devfleet watch --metrics task_progress,error    # two metric types only
  devfleet watch --json | jq .data                # one JSON frame per line
  devfleet watch --stats                          # windowed count/avg/p50/p95, then exit
  DEVFLEET_GATEWAY_TOKEN=s3cret devfleet watch --url ws://10.0.0.5:7070/ws

The token, if the gateway needs one, is read from DEVFLEET_GATEWAY_TOKEN or
the file DEVFLEET_GATEWAY_TOKEN_FILE names, never from a flag (flags show in `ps`).

Metric types: task_progress, system_health, performance, queue_status,
worker_status, error, deployment.")]
pub struct WatchArgs {
    /// Metric types to show, comma-separated (default: all seven).
    #[arg(long, value_delimiter = ',', value_parser = parse_metric_type)]
    metrics: Vec<MetricType>,
    /// Gateway WebSocket URL (default: ws://$DEVFLEET_GATEWAY_ADDR/ws).
    #[arg(long)]
    url: Option<String>,
    /// Gateway address, used when --url is not given.
    #[arg(long, env = "DEVFLEET_GATEWAY_ADDR", default_value = devfleet_metrics_gateway::DEFAULT_ADDR)]
    addr: String,
    /// Print each frame as one line of JSON, exactly as the gateway sent it.
    #[arg(long)]
    json: bool,
    /// Print the gateway's windowed statistics once and exit.
    #[arg(long)]
    stats: bool,
}

fn parse_metric_type(s: &str) -> Result<MetricType, String> {
    s.trim().parse::<MetricType>().map_err(|e| {
        let all: Vec<&str> = MetricType::ALL.iter().map(|m| m.as_str()).collect();
        format!("{e} (expected one of {})", all.join(", "))
    })
}

/// Streams until Ctrl-C (exit 0) or until the gateway goes away (exit 1).
pub async fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| client::url_for(&args.addr));
    let token = devfleet_metrics_gateway::token_from_env()?;
    let (mut socket, welcome) = client::connect(&url, token.as_deref()).await?;
    let metrics = if args.metrics.is_empty() {
        MetricType::ALL.to_vec()
    } else {
        args.metrics.clone()
    };

    if args.stats {
        let request = json!({
            "type": "stats",
            "metrics": metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        });
        client::send_text(&mut socket, &url, request.to_string()).await?;
        loop {
            let frame = client::next_frame(&mut socket, &url).await?;
            if frame.get("type").and_then(Value::as_str) == Some("stats") {
                let text = if args.json {
                    format!("{frame}\n")
                } else {
                    stats_table(&frame)
                };
                let _ = write!(std::io::stdout().lock(), "{text}");
                return Ok(ExitCode::SUCCESS);
            }
        }
    }

    let set = client::subscribe(&mut socket, &url, &metrics).await?;
    if !args.json {
        eprintln!(
            "watching {url} (connection {}): {}; Ctrl-C to stop",
            welcome
                .get("connection_id")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            set.join(", ")
        );
    }
    let mut stdout = std::io::stdout().lock();
    loop {
        let frame = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            frame = client::next_frame(&mut socket, &url) => frame,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e @ ClientError::Closed { .. }) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => return Err(e.into()),
        };
        let line = if args.json {
            frame.to_string()
        } else {
            client::format_frame(&frame)
        };
        // A closed pipe (`| head`) ends the watch quietly.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// A table of the windowed statistics.
fn stats_table(frame: &Value) -> String {
    let window = frame
        .get("window_seconds")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let mut out = format!("windowed statistics over the last {window} s\n");
    out.push_str(&format!(
        "{:<32} {:>8} {:>12} {:>12} {:>12}\n",
        "metric.field", "count", "avg", "p50", "p95"
    ));
    let Some(Value::Object(types)) = frame.get("metrics") else {
        return out;
    };
    if types.is_empty() {
        out.push_str("(no samples in the window)\n");
    }
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    for (metric_type, summary) in types {
        out.push_str(&format!(
            "{:<32} {:>8}\n",
            metric_type,
            summary.get("count").and_then(Value::as_u64).unwrap_or(0)
        ));
        if let Some(Value::Object(fields)) = summary.get("fields") {
            for (field, s) in fields {
                out.push_str(&format!(
                    "  {:<30} {:>8} {:>12.3} {:>12.3} {:>12.3}\n",
                    field,
                    s.get("count").and_then(Value::as_u64).unwrap_or(0),
                    num(s, "avg"),
                    num(s, "p50"),
                    num(s, "p95"),
                ));
            }
        }
    }
    out
}
