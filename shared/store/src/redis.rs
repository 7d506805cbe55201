//! The Redis [`TaskStore`]: shared by every scheduler and worker process.
//!
//! Every transition that touches more than one key (create_plan,
//! claim_next, claim, renew, reap_expired, mark_built, requeue, complete,
//! fail, replay, and the kv operations that prune expired records) is one
//! Lua script under `redis/`, so it is atomic against any number of
//! concurrent callers. Reads of several keys (`tasks`, `plans`) are scripts
//! too, so they see one consistent snapshot.
//!
//! Key layout (`P` = the prefix given to [`RedisStore::connect`]) is
//! described in `redis/common.lua`; in short: `P:plan:<id>` and
//! `P:task:<id>:<path>` hashes, the ready set `P:ready` (score = class and
//! priority, member `<seq:020>|<plan>|<path>` so equal scores are FIFO), the
//! lease set `P:leases` scored by expiry, `P:cache:<key>`,
//! `P:artifact:<sha256>` (with the last write times of cache entries and
//! artifacts in the zsets `P:cache_written` and `P:artifact_written`, for
//! retention), `P:counter:<name>`, and kv collections as hashes
//! `P:kv:<collection>` with the expiry of TTL'd keys in `P:kvexp:<collection>`
//! (pruned by the next operation that looks at them). Usage of executor
//! runs: `P:usage_model:<plan>`, `P:usage_task:<plan>` and the fleet's
//! `P:usage_models` hashes (fields `<metric>|<name>`), made idempotent by
//! the set `P:usage_runs:<plan>` (see `redis/record_usage.lua`); plan
//! budgets in `P:budget:<plan>` (limits, spent, reserved) with each run's
//! reservation in `P:budget_runs:<plan>` (see `redis/reserve_budget.lua`).
//!
//! Durability is Redis's: with `appendfsync always` a transition that
//! returned `Ok` survives a Redis restart.

use crate::rules::{millis, prepare_tasks, wall_ms};
use crate::{
    usage_label, BudgetLimits, BudgetState, ClaimOutcome, Completion, Failure, Fence, NewTask,
    PlanRecord, PlanUsage, Reservation, Spend, StoreError, StoreResult, TaskRecord, TaskState,
    TaskStore, UsageTotals,
};
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ErrorKind, RedisError, Script, ServerErrorKind};
use async_trait::async_trait;
use devfleet_protocol::{PlanStatus, TaskClass, Usage};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

const COMMON: &str = include_str!("redis/common.lua");

/// The scripts, each with the common prelude prepended. `Script` invokes
/// by SHA and loads the source on `NOSCRIPT`, so a restarted Redis (which
/// forgets loaded scripts) is handled transparently.
struct Scripts {
    create_plan: Script,
    claim_next: Script,
    claim: Script,
    renew: Script,
    reap_expired: Script,
    mark_built: Script,
    requeue: Script,
    complete: Script,
    fail: Script,
    replay: Script,
    tasks: Script,
    plans: Script,
    set_plan_status: Script,
    kv: Script,
    token_bucket: Script,
    delete_plan: Script,
    retention: Script,
    record_usage: Script,
    reserve_budget: Script,
    set_budget: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{COMMON}\n{body}"));
        Scripts {
            create_plan: s(include_str!("redis/create_plan.lua")),
            claim_next: s(include_str!("redis/claim_next.lua")),
            claim: s(include_str!("redis/claim.lua")),
            renew: s(include_str!("redis/renew.lua")),
            reap_expired: s(include_str!("redis/reap_expired.lua")),
            mark_built: s(include_str!("redis/mark_built.lua")),
            requeue: s(include_str!("redis/requeue.lua")),
            complete: s(include_str!("redis/complete.lua")),
            fail: s(include_str!("redis/fail.lua")),
            replay: s(include_str!("redis/replay.lua")),
            tasks: s(include_str!("redis/tasks.lua")),
            plans: s(include_str!("redis/plans.lua")),
            set_plan_status: s(include_str!("redis/set_plan_status.lua")),
            kv: s(include_str!("redis/kv.lua")),
            token_bucket: s(include_str!("redis/token_bucket.lua")),
            delete_plan: s(include_str!("redis/delete_plan.lua")),
            retention: s(include_str!("redis/retention.lua")),
            record_usage: s(include_str!("redis/record_usage.lua")),
            reserve_budget: s(include_str!("redis/reserve_budget.lua")),
            set_budget: s(include_str!("redis/set_budget.lua")),
        }
    }
}

/// The Redis task store.
///
/// Cloning is cheap and shares one multiplexed connection. The connection
/// is re-established in the background after it drops (a Redis restart);
/// while Redis is unreachable every call fails with
/// [`StoreError::Connect`] naming the URL (with any password masked), and
/// calls succeed again once it is back. There are no hidden retries: a
/// transition whose reply was lost may or may not have been applied, and
/// callers retry through their own backoff policy (complete, fail,
/// mark_built and create_plan are idempotent, so retrying them is safe).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    /// The URL as shown in errors: password masked.
    url: String,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The URL with the password of its user info replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reply may take. Generous: a script that times out on the
/// client may still have run on the server, so a short timeout would turn
/// slow-but-successful transitions into ambiguous failures.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

impl RedisStore {
    /// Connects to Redis at `url` (`redis://[:password@]host:port[/db]`);
    /// every key this store touches starts with `prefix:`, so stores with
    /// different prefixes on one Redis never see each other's data.
    ///
    /// Fails with [`StoreError::InvalidUrl`] for a malformed URL and with
    /// [`StoreError::Connect`] when Redis cannot be reached (after a few
    /// quick retries).
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisStore> {
        let shown = redact(url);
        let client = ::redis::Client::open(url).map_err(|e| StoreError::InvalidUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(5)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| StoreError::Connect {
                url: shown.clone(),
                reason: e.to_string(),
            })?;
        let store = RedisStore {
            conn,
            prefix: prefix.to_owned(),
            url: shown,
            scripts: Arc::new(Scripts::new()),
        };
        let _: String = store.cmd(::redis::cmd("PING")).await?;
        Ok(store)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// Maps a client error: anything about reaching Redis (I/O, a dropped
    /// connection, a timeout, a server still loading its data after a
    /// restart) is [`StoreError::Connect`]; the rest is a backend error.
    fn error(&self, e: RedisError) -> StoreError {
        let unreachable = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || matches!(
                e.kind(),
                ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain)
            );
        if unreachable {
            StoreError::Connect {
                url: self.url.clone(),
                reason: e.to_string(),
            }
        } else {
            StoreError::Backend(format!("redis at {}: {e}", self.url))
        }
    }

    async fn cmd<T: ::redis::FromRedisValue>(&self, cmd: ::redis::Cmd) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await.map_err(|e| self.error(e))
    }

    /// Runs a transaction whose replies are all ignored.
    async fn pipe(&self, p: ::redis::Pipeline) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        p.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs a script whose reply is `{'ok', '1' | '0'}`.
    async fn flag(&self, script: &Script, args: &[&str], what: &str) -> StoreResult<bool> {
        let reply: Vec<String> = self.run(script, args).await?;
        match (
            reply.first().map(String::as_str),
            reply.get(1).map(String::as_str),
        ) {
            (Some("ok"), Some(flag)) => Ok(flag == "1"),
            _ => Err(StoreError::Backend(format!(
                "redis at {}: unexpected reply {reply:?} to {what}",
                self.url
            ))),
        }
    }

    /// Runs a script with the prefix as `ARGV[1]` and then `args`.
    async fn run<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        args: &[&str],
    ) -> StoreResult<T> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix);
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(|e| self.error(e))
    }

    /// The error for a script reply that is not a success.
    /// The error of a fenced write's reply: [`StoreError::StaleClaim`] for
    /// `{'stale', state, attempt, owner}`, else as [`Self::reply_error`].
    fn fenced_error(
        &self,
        reply: &[String],
        plan_id: &str,
        path: &str,
        fence: &Fence,
        operation: &'static str,
    ) -> StoreError {
        if reply.first().map(String::as_str) != Some("stale") {
            return self.reply_error(reply, plan_id, path, operation);
        }
        let state = reply.get(1).and_then(|s| s.parse::<TaskState>().ok());
        let current_attempt = reply.get(2).and_then(|a| a.parse::<u32>().ok());
        let (Some(state), Some(current_attempt)) = (state, current_attempt) else {
            return self.corrupt_task(plan_id, path, "unreadable state or attempt");
        };
        StoreError::StaleClaim {
            plan_id: plan_id.to_owned(),
            path: path.to_owned(),
            attempt: fence.attempt,
            owner: fence.owner.clone(),
            state,
            current_attempt,
            current_owner: reply.get(3).filter(|o| !o.is_empty()).cloned(),
        }
    }

    /// Moves the store's clock (lease times) forward by `by` for every
    /// client of this prefix: a skew kept in Redis (`P:clock_skew_ms`),
    /// for tests of expiry. Nothing else sets it.
    pub async fn advance_clock(&self, by: Duration) -> StoreResult<()> {
        let mut c = ::redis::cmd("INCRBY");
        c.arg(self.key(&["clock_skew_ms"])).arg(millis(by));
        let _: i64 = self.cmd(c).await?;
        Ok(())
    }

    fn reply_error(
        &self,
        reply: &[String],
        plan_id: &str,
        path: &str,
        operation: &'static str,
    ) -> StoreError {
        match reply.first().map(String::as_str) {
            Some("unknown_task") => StoreError::UnknownTask {
                plan_id: plan_id.to_owned(),
                path: path.to_owned(),
            },
            Some("unknown_plan") => StoreError::UnknownPlan {
                plan_id: plan_id.to_owned(),
            },
            Some("state") => match reply.get(1).map(|s| s.parse::<TaskState>()) {
                Some(Ok(state)) => StoreError::InvalidState {
                    plan_id: plan_id.to_owned(),
                    path: path.to_owned(),
                    state,
                    operation,
                },
                _ => self.corrupt_task(plan_id, path, "unreadable state"),
            },
            _ => StoreError::Backend(format!(
                "redis at {}: unexpected reply {reply:?} to {operation} of '{path}' in plan '{plan_id}'",
                self.url
            )),
        }
    }

    /// Usage totals by name from a hash of `<metric>|<name>` fields.
    fn usage_fields(
        &self,
        key: &[&str],
        fields: HashMap<String, String>,
    ) -> StoreResult<BTreeMap<String, UsageTotals>> {
        let mut out: BTreeMap<String, UsageTotals> = BTreeMap::new();
        for (field, value) in fields {
            let corrupt = |reason: String| StoreError::Corrupt {
                key: self.key(key),
                reason,
            };
            let (metric, name) = field
                .split_once('|')
                .ok_or_else(|| corrupt(format!("field '{field}' is not <metric>|<name>")))?;
            let n: u64 = value
                .parse()
                .map_err(|_| corrupt(format!("field '{field}' holds '{value}', not a count")))?;
            let t = out.entry(name.to_owned()).or_default();
            match metric {
                "calls" => t.calls = n,
                "tokens_in" => t.tokens_in = n,
                "tokens_out" => t.tokens_out = n,
                "cost_nusd" => t.cost_nusd = n,
                "estimated" => t.estimated = n,
                other => return Err(corrupt(format!("unknown usage metric '{other}'"))),
            }
        }
        Ok(out)
    }

    fn corrupt_task(&self, plan_id: &str, path: &str, reason: &str) -> StoreError {
        StoreError::Corrupt {
            key: self.key(&["task", plan_id, path]),
            reason: reason.to_owned(),
        }
    }
}

/// Field/value pairs of a hash reply.
fn fields(pairs: &[String]) -> HashMap<&str, &str> {
    pairs
        .chunks_exact(2)
        .map(|kv| (kv[0].as_str(), kv[1].as_str()))
        .collect()
}

/// Reads a hash record, reporting missing or malformed fields as
/// [`StoreError::Corrupt`] at `key`.
struct Fields<'a> {
    key: String,
    map: HashMap<&'a str, &'a str>,
}

impl<'a> Fields<'a> {
    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            key: self.key.clone(),
            reason,
        }
    }
    fn text(&self, name: &str) -> StoreResult<String> {
        self.map
            .get(name)
            .map(|v| (*v).to_owned())
            .ok_or_else(|| self.corrupt(format!("missing field '{name}'")))
    }
    fn opt(&self, name: &str) -> Option<String> {
        self.map.get(name).map(|v| (*v).to_owned())
    }
    fn num<T: std::str::FromStr>(&self, name: &str) -> StoreResult<T> {
        let v = self.text(name)?;
        v.parse()
            .map_err(|_| self.corrupt(format!("field '{name}' is not a number: '{v}'")))
    }
    fn opt_num<T: std::str::FromStr>(&self, name: &str) -> StoreResult<Option<T>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| self.corrupt(format!("field '{name}' is not a number: '{v}'"))),
        }
    }
    fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> StoreResult<T> {
        let v = self.text(name)?;
        serde_json::from_str(&v).map_err(|e| self.corrupt(format!("field '{name}': {e}")))
    }
    /// A string enum stored by its serde name (`"fix"`, `"running"`).
    fn name<T: serde::de::DeserializeOwned>(&self, name: &str) -> StoreResult<T> {
        let v = self.text(name)?;
        serde_json::from_value(serde_json::Value::String(v.clone()))
            .map_err(|_| self.corrupt(format!("field '{name}' has unknown value '{v}'")))
    }
}

impl RedisStore {
    fn parse_task(&self, plan_id: &str, path: &str, pairs: &[String]) -> StoreResult<TaskRecord> {
        let f = Fields {
            key: self.key(&["task", plan_id, path]),
            map: fields(pairs),
        };
        let state = f.text("state")?;
        let state: TaskState = state.parse().map_err(|e: String| f.corrupt(e))?;
        Ok(TaskRecord {
            plan_id: f.text("plan_id")?,
            path: f.text("path")?,
            spec: f.text("spec")?,
            content: f.opt("content"),
            depends_on: f.json("depends_on")?,
            dependents: f.json("dependents")?,
            priority: f.num("priority")?,
            estimate: f.num("estimate")?,
            executor: f.opt("executor"),
            state,
            class: f.name::<TaskClass>("class")?,
            attempt: f.num("attempt")?,
            lease_owner: f.opt("lease_owner"),
            lease_expires_ms: f.opt_num("lease_expires_ms")?,
            artifact: f.opt("artifact"),
            error: f.opt("error"),
            updated_ms: f.num("updated_ms")?,
        })
    }

    fn parse_plan(&self, plan_id: &str, pairs: &[String]) -> StoreResult<PlanRecord> {
        let f = Fields {
            key: self.key(&["plan", plan_id]),
            map: fields(pairs),
        };
        Ok(PlanRecord {
            id: f.text("id")?,
            name: f.text("name")?,
            status: f.name::<PlanStatus>("status")?,
            total: f.num("total")?,
            done: f.num("done")?,
            failed: f.num("failed")?,
            blocked: f.num("blocked")?,
            created_ms: f.num("created_ms")?,
            updated_ms: f.num("updated_ms")?,
            detail: f.text("detail")?,
            message: f.opt("message"),
        })
    }

    /// A claimed task's record from an `{'ok', field, value, …}` reply.
    fn claimed(
        &self,
        reply: &[String],
        fallback_plan: &str,
        fallback_path: &str,
    ) -> StoreResult<TaskRecord> {
        let pairs = reply.get(1..).unwrap_or_default();
        let map = fields(pairs);
        let plan = map
            .get("plan_id")
            .copied()
            .unwrap_or(fallback_plan)
            .to_owned();
        let path = map.get("path").copied().unwrap_or(fallback_path).to_owned();
        self.parse_task(&plan, &path, pairs)
    }

    async fn kv(
        &self,
        op: &str,
        collection: &str,
        key: &str,
        value: &str,
        expires: &str,
    ) -> StoreResult<Vec<String>> {
        let now = wall_ms().to_string();
        let reply: Vec<String> = self
            .run(
                &self.scripts.kv,
                &[op, collection, key, value, &now, expires],
            )
            .await?;
        if reply.first().map(String::as_str) != Some("ok") {
            return Err(StoreError::Backend(format!(
                "redis at {}: unexpected reply {reply:?} to kv {op} of '{collection}/{key}'",
                self.url
            )));
        }
        Ok(reply)
    }
}

/// The plan and its tasks as handed to `create_plan.lua`. Numbers travel as
/// strings so Lua never formats them.
#[derive(Serialize)]
struct PlanPayload<'a> {
    name: &'a str,
    status: &'a str,
    total: String,
    created_ms: String,
    updated_ms: String,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    tasks: Vec<TaskPayload>,
}

#[derive(Serialize)]
struct TaskPayload {
    path: String,
    spec: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    executor: Option<String>,
    priority: String,
    estimate: String,
    pending: String,
    /// JSON text, stored as is.
    depends_on: String,
    /// JSON text, stored as is.
    dependents: String,
}

/// Limits as script arguments: the number, or `''` for no limit.
fn limit_args(limits: BudgetLimits) -> [String; 2] {
    let arg = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    [arg(limits.max_tokens), arg(limits.max_cost_nusd)]
}

fn to_json<T: Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("encoding for redis: {e}")))
}

#[async_trait]
impl TaskStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    /// Validation (unknown dependency, duplicate path, plan id) happens
    /// before anything is written; the write is one script that does
    /// nothing when the plan exists. The store sets `total` to the number
    /// of tasks and the done/failed/blocked counts to zero.
    async fn create_plan(&self, plan: PlanRecord, tasks: Vec<NewTask>) -> StoreResult<bool> {
        let prepared = prepare_tasks(&plan.id, tasks)?;
        let mut task_payloads = Vec::with_capacity(prepared.len());
        for p in prepared {
            task_payloads.push(TaskPayload {
                depends_on: to_json(&p.task.depends_on)?,
                dependents: to_json(&p.dependents)?,
                path: p.task.path,
                spec: p.task.spec,
                content: p.task.content,
                executor: p.task.executor,
                priority: p.task.priority.to_string(),
                estimate: p.task.estimate.to_string(),
                pending: p.pending.to_string(),
            });
        }
        let payload = to_json(&PlanPayload {
            name: &plan.name,
            status: plan.status.as_str(),
            total: task_payloads.len().to_string(),
            created_ms: plan.created_ms.to_string(),
            updated_ms: plan.updated_ms.to_string(),
            detail: &plan.detail,
            message: plan.message.as_deref(),
            tasks: task_payloads,
        })?;
        let reply: Vec<String> = self
            .run(&self.scripts.create_plan, &[&plan.id, &payload])
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(true),
            Some("exists") => Ok(false),
            _ => Err(self.reply_error(&reply, &plan.id, "", "create the plan")),
        }
    }

    async fn plan(&self, plan_id: &str) -> StoreResult<Option<PlanRecord>> {
        let mut c = ::redis::cmd("HGETALL");
        c.arg(self.key(&["plan", plan_id]));
        let pairs: Vec<String> = self.cmd(c).await?;
        if pairs.is_empty() {
            return Ok(None);
        }
        self.parse_plan(plan_id, &pairs).map(Some)
    }

    async fn plans(&self) -> StoreResult<Vec<PlanRecord>> {
        let reply: Vec<Vec<String>> = self.run(&self.scripts.plans, &[]).await?;
        reply
            .iter()
            .filter(|pairs| !pairs.is_empty())
            .map(|pairs| {
                let id = fields(pairs).get("id").copied().unwrap_or("?").to_owned();
                self.parse_plan(&id, pairs)
            })
            .collect()
    }

    async fn set_plan_status(
        &self,
        plan_id: &str,
        status: PlanStatus,
        message: Option<String>,
    ) -> StoreResult<()> {
        let now = wall_ms().to_string();
        let has = if message.is_some() { "1" } else { "0" };
        let reply: Vec<String> = self
            .run(
                &self.scripts.set_plan_status,
                &[
                    plan_id,
                    status.as_str(),
                    has,
                    message.as_deref().unwrap_or(""),
                    &now,
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(self.reply_error(&reply, plan_id, "", "set the plan status")),
        }
    }

    async fn task(&self, plan_id: &str, path: &str) -> StoreResult<Option<TaskRecord>> {
        let mut c = ::redis::cmd("HGETALL");
        c.arg(self.key(&["task", plan_id, path]));
        let pairs: Vec<String> = self.cmd(c).await?;
        if pairs.is_empty() {
            return Ok(None);
        }
        self.parse_task(plan_id, path, &pairs).map(Some)
    }

    async fn tasks(&self, plan_id: &str) -> StoreResult<Vec<TaskRecord>> {
        let reply: Vec<Vec<String>> = self.run(&self.scripts.tasks, &[plan_id]).await?;
        let status = reply.first().and_then(|s| s.first()).map(String::as_str);
        match status {
            Some("ok") => {}
            Some("unknown_plan") => {
                return Err(StoreError::UnknownPlan {
                    plan_id: plan_id.to_owned(),
                })
            }
            _ => {
                return Err(StoreError::Backend(format!(
                    "redis at {}: unexpected reply to tasks of plan '{plan_id}'",
                    self.url
                )))
            }
        }
        let mut tasks = reply
            .iter()
            .skip(1)
            .filter(|pairs| !pairs.is_empty())
            .map(|pairs| {
                let path = fields(pairs).get("path").copied().unwrap_or("?").to_owned();
                self.parse_task(plan_id, &path, pairs)
            })
            .collect::<StoreResult<Vec<_>>>()?;
        tasks.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(tasks)
    }

    async fn ready_len(&self) -> StoreResult<u64> {
        let mut c = ::redis::cmd("ZCARD");
        c.arg(self.key(&["ready"]));
        self.cmd(c).await
    }

    async fn claim_next(&self, owner: &str, lease: Duration) -> StoreResult<Option<TaskRecord>> {
        let lease = millis(lease).to_string();
        let reply: Vec<String> = self.run(&self.scripts.claim_next, &[owner, &lease]).await?;
        match reply.first().map(String::as_str) {
            Some("none") => Ok(None),
            Some("ok") => self.claimed(&reply, "?", "?").map(Some),
            _ => Err(self.reply_error(&reply, "?", "?", "claim the next task")),
        }
    }

    async fn claim(
        &self,
        plan_id: &str,
        path: &str,
        owner: &str,
        handoff_from: Option<&str>,
        lease: Duration,
    ) -> StoreResult<ClaimOutcome> {
        let lease = millis(lease).to_string();
        let handoff = if handoff_from.is_some() { "1" } else { "0" };
        let reply: Vec<String> = self
            .run(
                &self.scripts.claim,
                &[
                    plan_id,
                    path,
                    owner,
                    handoff,
                    handoff_from.unwrap_or(""),
                    &lease,
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => self
                .claimed(&reply, plan_id, path)
                .map(ClaimOutcome::Claimed),
            Some("held") => {
                let owner = reply.get(1).cloned().unwrap_or_default();
                let expires_ms = reply
                    .get(2)
                    .and_then(|e| e.parse().ok())
                    .ok_or_else(|| self.corrupt_task(plan_id, path, "unreadable lease expiry"))?;
                Ok(ClaimOutcome::Held { owner, expires_ms })
            }
            Some("state") => match reply.get(1).map(|s| s.parse::<TaskState>()) {
                Some(Ok(state)) => Ok(ClaimOutcome::NotClaimable(state)),
                _ => Err(self.corrupt_task(plan_id, path, "unreadable state")),
            },
            _ => Err(self.reply_error(&reply, plan_id, path, "claim it")),
        }
    }

    async fn renew(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        lease: Duration,
    ) -> StoreResult<bool> {
        let lease = millis(lease).to_string();
        let attempt = fence.attempt.to_string();
        let owner = fence.owner.as_deref().unwrap_or("");
        let reply: Vec<String> = self
            .run(
                &self.scripts.renew,
                &[plan_id, path, &attempt, owner, &lease],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(true),
            Some("lost") => Ok(false),
            _ => Err(self.reply_error(&reply, plan_id, path, "renew its lease")),
        }
    }

    async fn reap_expired(&self) -> StoreResult<Vec<(String, String)>> {
        let reply: Vec<String> = self.run(&self.scripts.reap_expired, &[]).await?;
        if reply.first().map(String::as_str) != Some("ok") {
            return Err(self.reply_error(&reply, "?", "?", "reap expired leases"));
        }
        Ok(reply[1..]
            .chunks_exact(2)
            .map(|pp| (pp[0].clone(), pp[1].clone()))
            .collect())
    }

    async fn mark_built(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        artifact: &str,
    ) -> StoreResult<()> {
        let now = wall_ms().to_string();
        let attempt = fence.attempt.to_string();
        let owner = fence.owner.as_deref().unwrap_or("");
        let reply: Vec<String> = self
            .run(
                &self.scripts.mark_built,
                &[plan_id, path, &attempt, owner, artifact, &now],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(self.fenced_error(&reply, plan_id, path, fence, "mark it built")),
        }
    }

    async fn requeue(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        class: TaskClass,
        error: Option<String>,
    ) -> StoreResult<()> {
        let now = wall_ms().to_string();
        let attempt = fence.attempt.to_string();
        let owner = fence.owner.as_deref().unwrap_or("");
        let has = if error.is_some() { "1" } else { "0" };
        let reply: Vec<String> = self
            .run(
                &self.scripts.requeue,
                &[
                    plan_id,
                    path,
                    &attempt,
                    owner,
                    class.as_str(),
                    has,
                    error.as_deref().unwrap_or(""),
                    &now,
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(self.fenced_error(&reply, plan_id, path, fence, "requeue it")),
        }
    }

    async fn complete(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        artifact: &str,
    ) -> StoreResult<Completion> {
        let now = wall_ms().to_string();
        let attempt = fence.attempt.to_string();
        let owner = fence.owner.as_deref().unwrap_or("");
        let reply: Vec<String> = self
            .run(
                &self.scripts.complete,
                &[plan_id, path, &attempt, owner, artifact, &now],
            )
            .await?;
        let newly_done = match reply.first().map(String::as_str) {
            Some("ok") => true,
            Some("noop") => false,
            _ => return Err(self.fenced_error(&reply, plan_id, path, fence, "complete it")),
        };
        let num = |i: usize| -> StoreResult<u32> {
            reply
                .get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: self.key(&["plan", plan_id]),
                    reason: "unreadable plan counts".into(),
                })
        };
        let mut released: Vec<String> = reply.iter().skip(4).cloned().collect();
        released.sort();
        Ok(Completion {
            newly_done,
            released,
            done: num(1)?,
            total: num(2)?,
            plan_finished: reply.get(3).map(String::as_str) == Some("1"),
        })
    }

    async fn fail(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        error: &str,
    ) -> StoreResult<Failure> {
        let now = wall_ms().to_string();
        let attempt = fence.attempt.to_string();
        let owner = fence.owner.as_deref().unwrap_or("");
        let reply: Vec<String> = self
            .run(
                &self.scripts.fail,
                &[plan_id, path, &attempt, owner, error, &now],
            )
            .await?;
        let newly_failed = match reply.first().map(String::as_str) {
            Some("ok") => true,
            Some("noop") => false,
            _ => return Err(self.fenced_error(&reply, plan_id, path, fence, "fail it")),
        };
        let mut blocked: Vec<String> = reply.iter().skip(2).cloned().collect();
        blocked.sort();
        Ok(Failure {
            newly_failed,
            blocked,
            plan_finished: reply.get(1).map(String::as_str) == Some("1"),
        })
    }

    async fn replay(&self, plan_id: &str, path: &str) -> StoreResult<()> {
        let now = wall_ms().to_string();
        let reply: Vec<String> = self
            .run(&self.scripts.replay, &[plan_id, path, &now])
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(self.reply_error(&reply, plan_id, path, "replay it")),
        }
    }

    async fn cache_get(&self, key: &str) -> StoreResult<Option<String>> {
        let mut c = ::redis::cmd("GET");
        c.arg(self.key(&["cache", key]));
        self.cmd(c).await
    }

    /// The entry and its write time (for retention) in one transaction.
    async fn cache_put(&self, key: &str, artifact: &str) -> StoreResult<()> {
        let mut p = ::redis::pipe();
        p.atomic()
            .cmd("SET")
            .arg(self.key(&["cache", key]))
            .arg(artifact)
            .ignore()
            .cmd("ZADD")
            .arg(self.key(&["cache_written"]))
            .arg(wall_ms())
            .arg(key)
            .ignore();
        self.pipe(p).await
    }

    /// Content-addressed: storing the same bytes twice writes once; the
    /// time they were last stored (for retention) is refreshed each time,
    /// in the same transaction.
    async fn put_artifact(&self, bytes: &[u8]) -> StoreResult<String> {
        let hash = crate::content_hash(bytes);
        let mut p = ::redis::pipe();
        p.atomic()
            .cmd("SET")
            .arg(self.key(&["artifact", &hash]))
            .arg(bytes)
            .arg("NX")
            .ignore()
            .cmd("ZADD")
            .arg(self.key(&["artifact_written"]))
            .arg(wall_ms())
            .arg(&hash)
            .ignore();
        self.pipe(p).await?;
        Ok(hash)
    }

    async fn artifact(&self, hash: &str) -> StoreResult<Option<Vec<u8>>> {
        let mut c = ::redis::cmd("GET");
        c.arg(self.key(&["artifact", hash]));
        self.cmd(c).await
    }

    async fn incr(&self, counter: &str, by: i64) -> StoreResult<i64> {
        let mut c = ::redis::cmd("INCRBY");
        c.arg(self.key(&["counter", counter])).arg(by);
        self.cmd(c).await
    }

    async fn counter(&self, counter: &str) -> StoreResult<i64> {
        let mut c = ::redis::cmd("GET");
        c.arg(self.key(&["counter", counter]));
        let v: Option<i64> = self.cmd(c).await?;
        Ok(v.unwrap_or(0))
    }

    async fn token_bucket(
        &self,
        bucket: &str,
        rate: crate::BucketRate,
        step: crate::BucketStep,
    ) -> StoreResult<Option<Duration>> {
        let (kind, amount) = match step {
            crate::BucketStep::Take(n) => ("take", n.to_string()),
            crate::BucketStep::Drain(d) => ("drain", millis(d).to_string()),
        };
        let capacity = rate.capacity.max(1).to_string();
        let window = millis(rate.window).max(1).to_string();
        let wait_ms: i64 = self
            .run(
                &self.scripts.token_bucket,
                &[bucket, &capacity, &window, kind, &amount],
            )
            .await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms as u64)))
    }

    async fn kv_put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<()> {
        let expires = ttl
            .map(|d| wall_ms().saturating_add(millis(d)).to_string())
            .unwrap_or_default();
        self.kv("put", collection, key, value, &expires).await?;
        Ok(())
    }

    async fn kv_put_new(&self, collection: &str, key: &str, value: &str) -> StoreResult<bool> {
        let reply = self.kv("put_new", collection, key, value, "").await?;
        Ok(reply.get(1).map(String::as_str) == Some("1"))
    }

    async fn kv_get(&self, collection: &str, key: &str) -> StoreResult<Option<String>> {
        let reply = self.kv("get", collection, key, "", "").await?;
        Ok(reply.get(1).cloned())
    }

    async fn kv_delete(&self, collection: &str, key: &str) -> StoreResult<bool> {
        let reply = self.kv("delete", collection, key, "", "").await?;
        Ok(reply.get(1).map(String::as_str) == Some("1"))
    }

    async fn kv_list(&self, collection: &str) -> StoreResult<Vec<(String, String)>> {
        let reply = self.kv("list", collection, "", "", "").await?;
        let mut all: Vec<(String, String)> = reply[1..]
            .chunks_exact(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        all.sort();
        Ok(all)
    }

    // Compare-and-delete and retention.

    async fn kv_delete_if(&self, collection: &str, key: &str, value: &str) -> StoreResult<bool> {
        let reply = self.kv("delete_if", collection, key, value, "").await?;
        Ok(reply.get(1).map(String::as_str) == Some("1"))
    }

    async fn delete_plan(&self, plan_id: &str, before_ms: i64) -> StoreResult<bool> {
        let before = before_ms.to_string();
        self.flag(
            &self.scripts.delete_plan,
            &[plan_id, &before],
            &format!("deleting plan '{plan_id}'"),
        )
        .await
    }

    async fn cache_entries(&self) -> StoreResult<Vec<crate::CacheEntry>> {
        let mut c = ::redis::cmd("ZRANGE");
        c.arg(self.key(&["cache_written"]))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let written: Vec<(String, i64)> = self.cmd(c).await?;
        let mut entries = Vec::with_capacity(written.len());
        // In batches, so a large cache is not one huge reply.
        for chunk in written.chunks(500) {
            let mut c = ::redis::cmd("MGET");
            for (key, _) in chunk {
                c.arg(self.key(&["cache", key]));
            }
            let artifacts: Vec<Option<String>> = self.cmd(c).await?;
            for ((key, written_ms), artifact) in chunk.iter().zip(artifacts) {
                if let Some(artifact) = artifact {
                    entries.push(crate::CacheEntry {
                        key: key.clone(),
                        artifact,
                        written_ms: *written_ms,
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn cache_delete(&self, key: &str, before_ms: i64) -> StoreResult<bool> {
        let before = before_ms.to_string();
        self.flag(
            &self.scripts.retention,
            &["cache", key, &before],
            &format!("deleting cache entry '{key}'"),
        )
        .await
    }

    async fn artifact_hashes(&self) -> StoreResult<Vec<(String, i64)>> {
        let mut c = ::redis::cmd("ZRANGE");
        c.arg(self.key(&["artifact_written"]))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let mut all: Vec<(String, i64)> = self.cmd(c).await?;
        all.sort();
        Ok(all)
    }

    async fn delete_artifact(&self, hash: &str, before_ms: i64) -> StoreResult<bool> {
        let before = before_ms.to_string();
        self.flag(
            &self.scripts.retention,
            &["artifact", hash, &before],
            &format!("deleting artifact '{hash}'"),
        )
        .await
    }

    async fn record_usage(
        &self,
        plan_id: &str,
        path: &str,
        attempt: u32,
        usage: &[Usage],
    ) -> StoreResult<bool> {
        let mut args = vec![
            plan_id.to_owned(),
            format!("{attempt}|{path}"),
            path.to_owned(),
        ];
        for u in usage {
            let t = UsageTotals::of(u);
            args.push(usage_label(u));
            for n in [t.calls, t.tokens_in, t.tokens_out, t.cost_nusd, t.estimated] {
                args.push(n.to_string());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply: Vec<String> = self.run(&self.scripts.record_usage, &args).await?;
        match (
            reply.first().map(String::as_str),
            reply.get(1).map(String::as_str),
        ) {
            (Some("ok"), Some(flag)) => Ok(flag == "1"),
            _ => Err(self.reply_error(&reply, plan_id, path, "record usage")),
        }
    }

    async fn plan_usage(&self, plan_id: &str) -> StoreResult<PlanUsage> {
        let mut p = ::redis::pipe();
        p.atomic()
            .hgetall(self.key(&["usage_model", plan_id]))
            .hgetall(self.key(&["usage_task", plan_id]));
        let mut conn = self.conn.clone();
        let (models, tasks): (HashMap<String, String>, HashMap<String, String>) =
            p.query_async(&mut conn).await.map_err(|e| self.error(e))?;
        let by_model = self.usage_fields(&["usage_model", plan_id], models)?;
        let by_task = self.usage_fields(&["usage_task", plan_id], tasks)?;
        let mut total = UsageTotals::default();
        for t in by_model.values() {
            total.add(t);
        }
        Ok(PlanUsage {
            total,
            by_model,
            by_task,
        })
    }

    async fn usage_by_model(&self) -> StoreResult<BTreeMap<String, UsageTotals>> {
        let mut c = ::redis::cmd("HGETALL");
        c.arg(self.key(&["usage_models"]));
        let fields: HashMap<String, String> = self.cmd(c).await?;
        self.usage_fields(&["usage_models"], fields)
    }

    async fn set_budget(&self, plan_id: &str, limits: BudgetLimits) -> StoreResult<()> {
        let [tokens, nusd] = limit_args(limits);
        let reply: Vec<String> = self
            .run(&self.scripts.set_budget, &[plan_id, &tokens, &nusd])
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(self.reply_error(&reply, plan_id, "", "set the budget")),
        }
    }

    async fn budget(&self, plan_id: &str) -> StoreResult<BudgetState> {
        let mut c = ::redis::cmd("HGETALL");
        c.arg(self.key(&["budget", plan_id]));
        let f: HashMap<String, String> = self.cmd(c).await?;
        let num = |name: &str| -> StoreResult<Option<u64>> {
            f.get(name)
                .map(|v| {
                    v.parse::<i64>()
                        .map(|n| n.max(0) as u64)
                        .map_err(|_| StoreError::Corrupt {
                            key: self.key(&["budget", plan_id]),
                            reason: format!("{name} is '{v}', not a number"),
                        })
                })
                .transpose()
        };
        let limits = match f.get("limits_set").map(String::as_str) {
            Some("1") => Some(BudgetLimits {
                max_tokens: num("max_tokens")?,
                max_cost_nusd: num("max_nusd")?,
            }),
            _ => None,
        };
        Ok(BudgetState {
            limits,
            spent: Spend {
                tokens: num("spent_tokens")?.unwrap_or(0),
                cost_nusd: num("spent_nusd")?.unwrap_or(0),
            },
            reserved: Spend {
                tokens: num("reserved_tokens")?.unwrap_or(0),
                cost_nusd: num("reserved_nusd")?.unwrap_or(0),
            },
        })
    }

    async fn reserve_budget(
        &self,
        plan_id: &str,
        path: &str,
        attempt: u32,
        expected: Spend,
        default: BudgetLimits,
    ) -> StoreResult<Reservation> {
        let member = format!("{attempt}|{path}");
        let (tokens, nusd) = (expected.tokens.to_string(), expected.cost_nusd.to_string());
        let [max_tokens, max_nusd] = limit_args(default);
        let reply: Vec<String> = self
            .run(
                &self.scripts.reserve_budget,
                &[plan_id, &member, &tokens, &nusd, &max_tokens, &max_nusd],
            )
            .await?;
        let field = |i: usize| reply.get(i).and_then(|v| v.parse::<u64>().ok());
        match reply.first().map(String::as_str) {
            Some("granted") => Ok(Reservation::Granted),
            Some("exhausted") => Ok(Reservation::Exhausted {
                limits: BudgetLimits {
                    max_tokens: field(1),
                    max_cost_nusd: field(2),
                },
                spent: Spend {
                    tokens: field(3).unwrap_or(0),
                    cost_nusd: field(4).unwrap_or(0),
                },
                reserved: Spend {
                    tokens: field(5).unwrap_or(0),
                    cost_nusd: field(6).unwrap_or(0),
                },
            }),
            _ => Err(self.reply_error(&reply, plan_id, path, "reserve budget")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_masks_only_the_password() {
        assert_eq!(redact("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(redact("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:p@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://u@h:1"), "redis://u@h:1");
    }
}
