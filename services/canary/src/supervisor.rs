//! The replica's main loop: runs the intake, and scans the store for
//! deployments that nobody drives, taking a lease on each and starting its
//! driver task.

use crate::handler::Handlers;
use crate::health::HealthClient;
use crate::lease::{LeaseTable, Leases};
use crate::record::ACTIVE;
use crate::Config;
use devfleet_runtime::Metrics;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What every task of a replica shares.
pub(crate) struct Ctx {
    pub config: Config,
    pub health: HealthClient,
    pub handlers: Handlers,
    pub metrics: Metrics,
    pub leases: Leases,
}

pub(crate) async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ctx = Arc::new(Ctx {
        health: HealthClient::new(config.health_timeout, config.allowed_networks.clone())?,
        handlers: Handlers::new(
            config.handler_timeout,
            config.profiles.clone(),
            config.connections.store.clone(),
        )?,
        metrics: config.connections.metrics(config.instance.clone()),
        leases: Leases::new(
            config.connections.store.clone(),
            config.instance.clone(),
            config.lease_ttl,
        ),
        config,
    });
    // Cancelled on shutdown, or when the intake dies: a replica that can
    // no longer take requests stops (and hands its deployments over)
    // rather than run half-deaf.
    let stop = shutdown.child_token();
    let wake = Arc::new(Notify::new());
    let mut intake = tokio::spawn(crate::intake::run(ctx.clone(), wake.clone(), stop.clone()));
    tracing::info!(instance = %ctx.config.instance, "canary running");

    let mut drivers: JoinSet<()> = JoinSet::new();
    let mut driving: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut intake_result = None;
    loop {
        reap(&mut drivers, &mut driving);
        if let Err(e) = scan(&ctx, &mut drivers, &mut driving, &stop).await {
            tracing::warn!(error = %format!("{e:#}"), "canary scan failed; retrying at the next one");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            result = &mut intake => {
                intake_result = Some(result);
                break;
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(ctx.config.scan_interval) => {}
        }
    }
    stop.cancel();
    // Drivers watch `stop`: each records its progress and releases its lease.
    while drivers.join_next().await.is_some() {}
    let result = match intake_result {
        Some(result) => result,
        None => intake.await,
    };
    match result {
        Ok(Ok(())) if shutdown.is_cancelled() => Ok(()),
        Ok(Ok(())) => Err(anyhow::anyhow!(
            "the deploy.requested consumer closed; stopping this canary replica"
        )),
        Ok(Err(e)) => Err(e.context("canary intake failed")),
        Err(e) => Err(anyhow::anyhow!("canary intake task failed: {e}")),
    }
}

fn reap(drivers: &mut JoinSet<()>, driving: &mut HashMap<tokio::task::Id, String>) {
    while let Some(done) = drivers.try_join_next_with_id() {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                tracing::error!(error = %e, "a deployment driver panicked; its deployment will be taken over");
                e.id()
            }
        };
        driving.remove(&id);
    }
}

async fn scan(
    ctx: &Arc<Ctx>,
    drivers: &mut JoinSet<()>,
    driving: &mut HashMap<tokio::task::Id, String>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let store = &ctx.config.connections.store;
    let active: HashSet<String> = store
        .kv_list(ACTIVE)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let table = LeaseTable::read(store).await?;
    let ours: HashSet<&String> = driving.values().collect();
    let mut started = Vec::new();
    for id in &active {
        if ours.contains(id) || shutdown.is_cancelled() {
            continue;
        }
        if let Some(lease) = ctx.leases.try_acquire(&table, id).await? {
            tracing::info!(deployment = %id, epoch = lease.epoch(), "took the lease; driving");
            let handle = drivers.spawn(crate::driver::drive(
                ctx.clone(),
                id.clone(),
                lease,
                shutdown.clone(),
            ));
            started.push((handle.id(), id.clone()));
        }
    }
    driving.extend(started);
    let grace = ctx.config.lease_ttl * 4;
    for key in table.stale_keys(&active, devfleet_protocol::now_ms(), grace) {
        let _ = store.kv_delete(crate::record::LEASES, &key).await;
    }
    Ok(())
}
