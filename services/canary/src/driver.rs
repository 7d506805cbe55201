//! Driving one deployment while holding its lease: the rollout state
//! machine.
//!
//! ```text
//!  progressing ── shift to stages[i] ── every check_seconds: read health
//!     │   healthy and stage time up → next stage (or promoted after the last)
//!     │   degraded / no traffic      → hold (rollback after hold_limit, if set)
//!     │   unhealthy, failure_limit failed reads, shift handler failed,
//!     │   or an operator's rollback  → rolling_back
//!  rolling_back ── rollback handler (retried until it succeeds) → rolled_back
//! ```
//!
//! Every decision is written to the record before the effect it leads to,
//! so whoever resumes the deployment redoes at most the last effect.

use crate::classify::{classify, pct};
use crate::control::{self, ControlRequest};
use crate::handler::{Action, Call, HandlerError};
use crate::health::QueryContext;
use crate::lease::Lease;
use crate::record::{self, Classification, DeploymentRecord, HealthCheck, Status, ACTIVE, CONTROL};
use crate::supervisor::Ctx;
use devfleet_protocol::metrics::DeploymentProgress;
use devfleet_protocol::{queues, DeployFinished, Escalation, Handler, HealthSource};
use devfleet_runtime::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Why a driver stops before the deployment is final.
#[derive(Debug)]
enum Stop {
    Shutdown,
    LeaseLost,
}

type Step<T = ()> = Result<T, Stop>;

/// Drives `id` until it is final, the lease is lost, or shutdown.
pub(crate) async fn drive(ctx: Arc<Ctx>, id: String, lease: Lease, shutdown: CancellationToken) {
    let span =
        tracing::info_span!("canary_deployment", deployment = %id, plan_id = tracing::field::Empty);
    async move {
        let record = match record::load(&ctx.config.connections.store, &id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::warn!("active deployment has no record; dropping it");
                let _ = ctx.config.connections.store.kv_delete(ACTIVE, &id).await;
                lease.clear().await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the deployment; leaving it to the next scan");
                lease.release().await;
                return;
            }
        };
        if let Some(plan) = &record.plan_id {
            tracing::Span::current().record("plan_id", plan.as_str());
        }
        let driver = Driver {
            ctx,
            lease,
            shutdown,
            record,
            last_tick: Instant::now(),
        };
        driver.run().await;
    }
    .instrument(span)
    .await
}

struct Driver {
    ctx: Arc<Ctx>,
    lease: Lease,
    shutdown: CancellationToken,
    record: DeploymentRecord,
    /// When the time watched at the current stage was last added up.
    last_tick: Instant,
}

enum Waited {
    Due,
    Control(ControlRequest),
}

impl Driver {
    async fn run(mut self) {
        if !self.record.status.is_final() {
            // "started" the first time a replica drives it, "resumed" after
            // a handover (crash, shutdown, lost lease).
            let event = if self.record.owner.is_none() {
                "started"
            } else {
                "resumed"
            };
            let detail = format!("driven by {}", self.ctx.config.instance);
            self.record
                .transition(event, Some(detail), devfleet_protocol::now_ms());
            if let Err(stop) = self.persist().await {
                return self.stop(stop).await;
            }
            tracing::info!(
                status = self.record.status.as_str(),
                stage = self.record.stage,
                weight = self.record.weight,
                elapsed_ms = self.record.stage_elapsed_ms,
                "driving deployment"
            );
        }
        loop {
            let step = match self.record.status {
                Status::Progressing => self.progress().await,
                Status::RollingBack => self.roll_back().await,
                Status::Promoted | Status::RolledBack => {
                    self.finish().await;
                    return;
                }
            };
            if let Err(stop) = step {
                return self.stop(stop).await;
            }
        }
    }

    async fn stop(mut self, stop: Stop) {
        match stop {
            Stop::LeaseLost => {
                tracing::warn!("stopped driving: the lease was lost");
            }
            Stop::Shutdown => {
                if self.record.status == Status::Progressing && self.record.shifted {
                    self.record.stage_elapsed_ms += self.last_tick.elapsed().as_millis() as u64;
                    self.last_tick = Instant::now();
                }
                if self.lease.is_valid() {
                    self.record.updated_ms = devfleet_protocol::now_ms();
                    if let Err(e) =
                        record::save(&self.ctx.config.connections.store, &self.record, None).await
                    {
                        tracing::warn!(error = %format!("{e:#}"), "could not record progress at shutdown");
                    }
                }
                tracing::info!(
                    stage = self.record.stage,
                    elapsed_ms = self.record.stage_elapsed_ms,
                    "shutting down; handing the deployment over"
                );
                self.lease.release().await;
            }
        }
    }

    // ---- progressing -------------------------------------------------------

    async fn progress(&mut self) -> Step {
        if let Some(request) = self.control().await {
            return self.manual_rollback(request).await;
        }
        if !self.record.shifted {
            return self.shift().await;
        }
        match self.wait_for_check().await? {
            Waited::Due => self.check().await,
            Waited::Control(request) => self.manual_rollback(request).await,
        }
    }

    async fn shift(&mut self) -> Step {
        if self.record.stage == 0 && self.record.weight == 0 {
            if let Err(reason) = self.preflight() {
                return self.refuse(reason).await;
            }
        }
        let weight = self.record.target_weight();
        let handler = self.record.spec.shift.clone();
        let attempts = self.ctx.config.handler_attempts;
        match self
            .call_handler(Action::Shift, &handler, weight, attempts)
            .await?
        {
            Ok(done) => {
                let now = devfleet_protocol::now_ms();
                self.record.weight = weight;
                self.record.shifted = true;
                self.record.last_error = None;
                self.record.transition("shifted", Some(done), now);
                // Measure the next interval from here, at the new weight
                // only (a slow handler would otherwise mix in old-weight
                // traffic).
                self.read_baseline().await;
                self.persist().await?;
                self.last_tick = Instant::now();
                tracing::info!(stage = self.record.stage, weight, "traffic shifted");
                self.emit("shifted", None).await;
                Ok(())
            }
            Err(e) => {
                let reason = format!("shift handler failed to set {weight}%: {e}");
                self.begin_rollback(reason, false).await
            }
        }
    }

    /// Reads a counter endpoint's baseline right after a shift, so the
    /// next check measures only traffic at the new weight. On failure the
    /// previous baseline stays (or the first check sets one).
    async fn read_baseline(&mut self) {
        if !matches!(self.record.spec.health, HealthSource::Url { .. }) {
            return;
        }
        let query = QueryContext {
            deployment: &self.record.id,
            check_seconds: self.record.spec.check_seconds,
        };
        if let Ok(reading) = self
            .ctx
            .health
            .read(&self.record.spec.health, &query, None)
            .await
        {
            if reading.counters.is_some() {
                self.record.counters = reading.counters;
            }
        }
    }

    async fn wait_for_check(&mut self) -> Step<Waited> {
        let due = self.last_tick + Duration::from_secs(self.record.spec.check_seconds);
        loop {
            let now = Instant::now();
            if now >= due {
                return Ok(Waited::Due);
            }
            let wake = due.min(now + self.ctx.config.control_poll);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.lease.lost().cancelled() => return Err(Stop::LeaseLost),
                _ = tokio::time::sleep_until(wake) => {}
            }
            if let Some(request) = self.control().await {
                return Ok(Waited::Control(request));
            }
        }
    }

    async fn check(&mut self) -> Step {
        let now = Instant::now();
        self.record.stage_elapsed_ms += now.duration_since(self.last_tick).as_millis() as u64;
        self.last_tick = now;
        let spec = &self.record.spec;
        let query = QueryContext {
            deployment: &self.record.id,
            check_seconds: spec.check_seconds,
        };
        let reading = self
            .ctx
            .health
            .read(&spec.health, &query, self.record.counters.as_ref())
            .await;
        let mut check = HealthCheck {
            at_ms: devfleet_protocol::now_ms(),
            stage: self.record.stage,
            weight: self.record.weight,
            classification: Classification::ReadFailed,
            error_rate: None,
            latency_p95_ms: None,
            requests: None,
            detail: None,
        };
        match reading {
            Ok(reading) => {
                let verdict = classify(&reading, &spec.thresholds);
                check.classification = verdict.classification;
                check.detail = Some(verdict.detail);
                check.error_rate = reading.error_rate;
                check.latency_p95_ms = reading.latency_p95_ms;
                check.requests = reading.requests;
                if reading.counters.is_some() {
                    self.record.counters = reading.counters;
                }
                self.record.consecutive_read_failures = 0;
            }
            Err(e) => {
                check.detail = Some(e.to_string());
                self.record.consecutive_read_failures += 1;
            }
        }
        match check.classification {
            Classification::Degraded | Classification::Inconclusive => {
                self.record.consecutive_holds += 1
            }
            Classification::Healthy | Classification::Unhealthy => {
                self.record.consecutive_holds = 0
            }
            Classification::ReadFailed | Classification::Baseline => {}
        }
        self.record.checks += 1;
        let classification = check.classification;
        let detail = check.detail.clone().unwrap_or_default();
        tracing::info!(
            stage = self.record.stage,
            weight = self.record.weight,
            classification = classification.as_str(),
            %detail,
            "health check"
        );
        self.record.push_check(check, self.ctx.config.history_limit);
        self.emit("check", None).await;

        let failures = self.record.consecutive_read_failures;
        let holds = self.record.consecutive_holds;
        let hold_limit = self.ctx.config.hold_limit;
        let weight = self.record.weight;
        match classification {
            Classification::Unhealthy => {
                let reason = format!("unhealthy at {weight}%: {detail}");
                self.begin_rollback(reason, false).await
            }
            Classification::ReadFailed if failures >= self.ctx.config.failure_limit => {
                let reason =
                    format!("{failures} health reads in a row failed at {weight}%; last: {detail}");
                self.begin_rollback(reason, false).await
            }
            Classification::Degraded | Classification::Inconclusive
                if hold_limit > 0 && holds >= hold_limit =>
            {
                let reason =
                    format!("stage held for {holds} checks in a row at {weight}%; last: {detail}");
                self.begin_rollback(reason, false).await
            }
            Classification::Healthy
                if self.record.stage_elapsed_ms
                    >= self.record.spec.stage_seconds.saturating_mul(1000) =>
            {
                self.advance().await
            }
            _ => self.persist().await,
        }
    }

    async fn advance(&mut self) -> Step {
        let now = devfleet_protocol::now_ms();
        if self.record.at_last_stage() {
            self.record.status = Status::Promoted;
            self.record.finished_ms = Some(now);
            self.record.transition("promoted", None, now);
            self.persist().await?;
            tracing::info!(weight = self.record.weight, "deployment promoted");
            self.emit("promoted", None).await;
            return Ok(());
        }
        let watched = self.record.stage_elapsed_ms as f64 / 1000.0;
        self.record.transition(
            "stage_passed",
            Some(format!("healthy after {watched:.1} s watched")),
            now,
        );
        self.record.stage += 1;
        self.record.shifted = false;
        self.record.stage_elapsed_ms = 0;
        self.record.consecutive_holds = 0;
        self.persist().await
    }

    /// Before any traffic moves: the plan's handlers must name profiles
    /// this canary has, with parameters they accept.
    fn preflight(&self) -> Result<(), String> {
        let spec = &self.record.spec;
        self.ctx
            .handlers
            .check(Action::Shift, &spec.shift)
            .map_err(|e| e.to_string())?;
        if let Some(rollback) = &spec.rollback {
            self.ctx
                .handlers
                .check(Action::Rollback, rollback)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Ends a deployment that cannot start: nothing was shifted, so there
    /// is nothing to roll back; the record says `rolled_back` at 0 % with
    /// the reason, and a plan's deployment reports it (the plan fails).
    async fn refuse(&mut self, reason: String) -> Step {
        let now = devfleet_protocol::now_ms();
        let reason = format!("refused before any traffic moved: {reason}");
        self.record.status = Status::RolledBack;
        self.record.weight = 0;
        self.record.reason = Some(reason.clone());
        self.record.finished_ms = Some(now);
        self.record.transition("refused", Some(reason.clone()), now);
        self.persist().await?;
        tracing::warn!(%reason, "deployment refused");
        self.emit("refused", Some(&reason)).await;
        Ok(())
    }

    // ---- rolling back ------------------------------------------------------

    async fn manual_rollback(&mut self, request: ControlRequest) -> Step {
        let reason = match &request.reason {
            Some(r) if !r.trim().is_empty() => format!("manual rollback: {r}"),
            _ => "manual rollback requested by an operator".to_owned(),
        };
        self.begin_rollback(reason, true).await
    }

    async fn begin_rollback(&mut self, reason: String, manual: bool) -> Step {
        let now = devfleet_protocol::now_ms();
        self.record.status = Status::RollingBack;
        self.record.reason = Some(reason.clone());
        self.record
            .transition("rollback_started", Some(reason.clone()), now);
        self.persist().await?;
        tracing::warn!(%reason, manual, "rolling back");
        self.emit("rollback_started", Some(&reason)).await;
        Ok(())
    }

    async fn roll_back(&mut self) -> Step {
        let handler = self
            .record
            .spec
            .rollback
            .clone()
            .unwrap_or_else(|| self.record.spec.shift.clone());
        // Traffic must come back: retry for as long as it takes.
        match self
            .call_handler(Action::Rollback, &handler, 0, u32::MAX)
            .await?
        {
            Ok(done) => {
                let now = devfleet_protocol::now_ms();
                self.record.weight = 0;
                self.record.status = Status::RolledBack;
                self.record.finished_ms = Some(now);
                self.record.last_error = None;
                self.record.transition("rolled_back", Some(done), now);
                self.persist().await?;
                let reason = self.record.reason.clone().unwrap_or_default();
                tracing::warn!(%reason, "deployment rolled back");
                self.emit("rolled_back", Some(&reason)).await;
                if let Some(plan_id) = self.record.plan_id.clone() {
                    self.ctx
                        .config
                        .connections
                        .event(Escalation {
                            plan_id,
                            path: None,
                            reason: format!(
                                "deployment '{}' rolled back: {reason}",
                                self.record.id
                            ),
                            history: Vec::new(),
                        })
                        .await;
                }
                Ok(())
            }
            Err(e) => {
                // Unreachable with unbounded attempts; keep the state.
                tracing::error!(error = %e, "rollback handler gave up");
                Ok(())
            }
        }
    }

    // ---- finishing ---------------------------------------------------------

    /// Cleans up after a final status; idempotent, so a replica resuming a
    /// deployment that died here finishes the job. A deployment of a plan
    /// first reports its outcome to the scheduler (`deploy.finished`),
    /// which alone ends plans; if that publish fails the deployment stays
    /// active and the next owner reports it again.
    async fn finish(self) {
        let store = &self.ctx.config.connections.store;
        let id = &self.record.id;
        if let Some(plan_id) = &self.record.plan_id {
            if let Err(e) = self.report_to_plan(plan_id).await {
                tracing::warn!(error = %format!("{e:#}"), "could not report the outcome to the plan; the next owner will");
                self.lease.release().await;
                return;
            }
        }
        if let Err(e) = store.kv_delete(ACTIVE, id).await {
            tracing::warn!(error = %e, "could not mark the deployment inactive; the next owner will");
            self.lease.release().await;
            return;
        }
        let _ = store.kv_delete(CONTROL, id).await;
        self.lease.clear().await;
    }

    /// Tells the scheduler how the plan's rollout ended.
    async fn report_to_plan(&self, plan_id: &str) -> anyhow::Result<()> {
        let promoted = self.record.status == Status::Promoted;
        let message = if promoted {
            format!("deployment '{}' promoted", self.record.id)
        } else {
            format!(
                "deployment '{}' rolled back: {}",
                self.record.id,
                self.record
                    .reason
                    .as_deref()
                    .unwrap_or("no reason recorded")
            )
        };
        self.ctx
            .config
            .connections
            .publish(
                queues::DEPLOY_FINISHED,
                DeployFinished {
                    plan_id: plan_id.to_owned(),
                    deployment_id: self.record.id.clone(),
                    promoted,
                    message,
                },
            )
            .await
    }

    // ---- helpers -----------------------------------------------------------

    /// Calls a handler up to `attempts` times with backoff; the inner
    /// result is the last outcome.
    async fn call_handler(
        &mut self,
        action: Action,
        handler: &Handler,
        weight: u8,
        attempts: u32,
    ) -> Step<Result<String, HandlerError>> {
        let backoff = Backoff::DEPLOY_CALL;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if !self.lease.is_valid() {
                return Err(Stop::LeaseLost);
            }
            let call = Call {
                action,
                deployment: &self.record.id,
                plan_id: self.record.plan_id.as_deref(),
                weight,
                stage: self.record.stage,
                stages: &self.record.spec.stages,
            };
            let outcome = self
                .ctx
                .handlers
                .call(handler, &call)
                .instrument(tracing::info_span!(
                    "handler",
                    action = action.as_str(),
                    weight
                ))
                .await;
            let error = match outcome {
                Ok(done) => return Ok(Ok(done)),
                Err(e) => e,
            };
            tracing::warn!(action = action.as_str(), weight, attempt, error = %error, "handler failed");
            self.record.last_error = Some(error.to_string());
            let now = devfleet_protocol::now_ms();
            self.record
                .transition("handler_failed", Some(error.to_string()), now);
            self.emit("handler_failed", Some(&error.to_string())).await;
            // A refused profile (unknown, bad params) will not change for a
            // shift; a rollback keeps trying, so a fixed configuration
            // takes traffic back.
            if attempt >= attempts || (action == Action::Shift && error.is_refusal()) {
                return Ok(Err(error));
            }
            // Let `status` show the failure while we wait.
            self.persist().await?;
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.lease.lost().cancelled() => return Err(Stop::LeaseLost),
                _ = tokio::time::sleep(backoff.delay(attempt)) => {}
            }
        }
    }

    async fn control(&self) -> Option<ControlRequest> {
        match control::pending(&self.ctx.config.connections.store, &self.record.id).await {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "could not read control requests");
                None
            }
        }
    }

    /// Writes the record, retrying store failures while the lease holds.
    async fn persist(&mut self) -> Step {
        let store = self.ctx.config.connections.store.clone();
        let retain = self
            .record
            .status
            .is_final()
            .then_some(self.ctx.config.retain);
        let mut attempt = 0;
        loop {
            if !self.lease.is_valid() {
                return Err(Stop::LeaseLost);
            }
            self.record.owner = Some(self.ctx.config.instance.clone());
            match record::save(&store, &self.record, retain).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %format!("{e:#}"), attempt, "could not write the deployment record; retrying");
                }
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.lease.lost().cancelled() => return Err(Stop::LeaseLost),
                _ = tokio::time::sleep(Backoff::default().delay(attempt)) => {}
            }
        }
    }

    async fn emit(&self, event: &str, reason: Option<&str>) {
        self.ctx
            .metrics
            .emit(metric_data(
                &self.record,
                event,
                reason,
                &self.ctx.config.instance,
            ))
            .await;
    }
}

/// The `deployment` metric sample for a record.
pub(crate) fn metric_data(
    record: &DeploymentRecord,
    event: &str,
    reason: Option<&str>,
    instance: &str,
) -> DeploymentProgress {
    let last = record.last_check.as_ref();
    DeploymentProgress {
        deployment_id: record.id.clone(),
        plan_id: record.plan_id.clone(),
        event: event.to_owned(),
        status: record.status.as_str().to_owned(),
        stage: record.stage as u64,
        stages: record.spec.stages.len() as u64,
        weight: record.weight.into(),
        target_weight: record.target_weight().into(),
        stage_elapsed_s: record.stage_elapsed_ms as f64 / 1000.0,
        classification: last.map(|c| c.classification.as_str().to_owned()),
        error_rate: last.and_then(|c| c.error_rate),
        error_rate_pct: last.and_then(|c| c.error_rate).map(pct),
        latency_p95_ms: last.and_then(|c| c.latency_p95_ms),
        requests: last.and_then(|c| c.requests),
        checks: record.checks,
        reason: reason.or(record.reason.as_deref()).map(str::to_owned),
        instance: instance.to_owned(),
    }
}
