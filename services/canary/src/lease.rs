//! Ownership of a deployment among canary replicas: a lease per deployment
//! in the kv collection [`LEASES`], with a TTL and background renewal.
//!
//! The store offers put-if-absent but no compare-and-set, so a lease is a
//! series of **epochs**: key `<deployment>#<epoch>`, value
//! `{"owner", "expires_ms"}`. The current lease is the highest epoch.
//!
//! * Acquiring writes epoch `n + 1` with put-if-absent, only when epoch `n`
//!   is missing, expired, or our own: of replicas racing for one deployment
//!   exactly one wins the new key.
//! * Only the winner of an epoch ever writes its key, so renewing is a plain
//!   put, done every third of the TTL by a background task, while the lease
//!   is still valid by the holder's own clock; after writing, the holder
//!   checks that no later epoch exists.
//! * The holder treats the lease as valid only until `last renewal start +
//!   TTL - TTL/4`, so it stops acting before any other replica can see the
//!   lease expired, provided replica clocks agree within TTL/4. A holder
//!   that cannot renew in time (store down, process stalled) loses the lease
//!   and stops driving; the next owner resumes from the record.
//! * Releasing (shutdown) marks the epoch expired so another replica takes
//!   over at its next scan; a finished deployment's keys are deleted.

use crate::record::LEASES;
use devfleet_store::SharedStore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LeaseValue {
    owner: String,
    expires_ms: i64,
}

fn key(deployment: &str, epoch: u64) -> String {
    format!("{deployment}#{epoch:012}")
}

fn parse_key(key: &str) -> Option<(&str, u64)> {
    let (deployment, epoch) = key.rsplit_once('#')?;
    Some((deployment, epoch.parse().ok()?))
}

/// One consistent read of every lease, for a scan.
#[derive(Debug, Default)]
pub struct LeaseTable {
    /// deployment → epoch → value (unparseable values are treated as expired).
    entries: BTreeMap<String, BTreeMap<u64, Option<LeaseValue>>>,
}

impl LeaseTable {
    /// Reads the lease collection.
    pub async fn read(store: &SharedStore) -> anyhow::Result<Self> {
        let mut entries: BTreeMap<String, BTreeMap<u64, Option<LeaseValue>>> = BTreeMap::new();
        for (k, v) in store.kv_list(LEASES).await? {
            let Some((deployment, epoch)) = parse_key(&k) else {
                tracing::warn!(key = %k, "ignoring a malformed canary lease key");
                continue;
            };
            entries
                .entry(deployment.to_owned())
                .or_default()
                .insert(epoch, serde_json::from_str(&v).ok());
        }
        Ok(Self { entries })
    }

    /// The owner and expiry of a live lease on `deployment`, if any.
    pub fn holder(&self, deployment: &str, now_ms: i64) -> Option<(&str, i64)> {
        let (_, value) = self.entries.get(deployment)?.iter().next_back()?;
        let value = value.as_ref()?;
        (value.expires_ms >= now_ms).then_some((value.owner.as_str(), value.expires_ms))
    }

    fn latest_epoch(&self, deployment: &str) -> u64 {
        self.entries
            .get(deployment)
            .and_then(|e| e.keys().next_back().copied())
            .unwrap_or(0)
    }

    fn older_keys(&self, deployment: &str, than: u64) -> Vec<String> {
        self.entries
            .get(deployment)
            .map(|e| {
                e.keys()
                    .filter(|&&epoch| epoch < than)
                    .map(|&epoch| key(deployment, epoch))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keys of leases on deployments not in `active` that expired more than
    /// `grace` ago: leftovers of finished deployments, safe to delete.
    pub fn stale_keys(
        &self,
        active: &HashSet<String>,
        now_ms: i64,
        grace: Duration,
    ) -> Vec<String> {
        let cutoff = now_ms - grace.as_millis() as i64;
        let mut out = Vec::new();
        for (deployment, epochs) in &self.entries {
            if active.contains(deployment) {
                continue;
            }
            for (&epoch, value) in epochs {
                if value.as_ref().is_none_or(|v| v.expires_ms < cutoff) {
                    out.push(key(deployment, epoch));
                }
            }
        }
        out
    }
}

/// Acquires leases for one replica.
#[derive(Clone)]
pub struct Leases {
    store: SharedStore,
    owner: String,
    ttl: Duration,
}

impl Leases {
    /// Leases owned by `owner` (unique among live replicas), lasting `ttl`.
    pub fn new(store: SharedStore, owner: String, ttl: Duration) -> Self {
        Self { store, owner, ttl }
    }

    /// The replica these leases belong to.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Takes the lease on `deployment` when nobody else holds a live one;
    /// `None` when someone does or another replica won the race.
    pub async fn try_acquire(
        &self,
        table: &LeaseTable,
        deployment: &str,
    ) -> anyhow::Result<Option<Lease>> {
        let now = devfleet_protocol::now_ms();
        if let Some((owner, _)) = table.holder(deployment, now) {
            if owner != self.owner {
                return Ok(None);
            }
            // Our own live lease that no driver of ours holds (a driver
            // that stopped on an error): take a new epoch at once.
        }
        let epoch = table.latest_epoch(deployment) + 1;
        let started = Instant::now();
        let value = LeaseValue {
            owner: self.owner.clone(),
            expires_ms: now + self.ttl.as_millis() as i64,
        };
        let won = self
            .store
            .kv_put_new(
                LEASES,
                &key(deployment, epoch),
                &serde_json::to_string(&value)?,
            )
            .await?;
        if !won {
            return Ok(None);
        }
        for old in table.older_keys(deployment, epoch) {
            if let Err(e) = self.store.kv_delete(LEASES, &old).await {
                tracing::debug!(key = %old, error = %e, "could not delete an old lease epoch");
            }
        }
        Ok(Some(Lease::start(
            self.clone(),
            deployment.to_owned(),
            epoch,
            started,
        )))
    }

    fn valid_span(&self) -> Duration {
        self.ttl - self.ttl / 4
    }

    /// One renewal; false when the lease is lost.
    async fn renew(
        &self,
        deployment: &str,
        epoch: u64,
        valid_until: Instant,
    ) -> anyhow::Result<bool> {
        if Instant::now() >= valid_until {
            return Ok(false);
        }
        let successor = key(deployment, epoch + 1);
        if self.store.kv_get(LEASES, &successor).await?.is_some() {
            return Ok(false);
        }
        let value = LeaseValue {
            owner: self.owner.clone(),
            expires_ms: devfleet_protocol::now_ms() + self.ttl.as_millis() as i64,
        };
        self.store
            .kv_put(
                LEASES,
                &key(deployment, epoch),
                &serde_json::to_string(&value)?,
                None,
            )
            .await?;
        Ok(self.store.kv_get(LEASES, &successor).await?.is_none())
    }
}

/// A held lease. A background task renews it; [`Lease::lost`] is cancelled
/// when renewal fails for good. Drop stops renewing (the lease then expires).
pub struct Lease {
    leases: Leases,
    deployment: String,
    epoch: u64,
    valid_until: Arc<Mutex<Instant>>,
    lost: CancellationToken,
    stop: CancellationToken,
}

impl Lease {
    fn start(leases: Leases, deployment: String, epoch: u64, started: Instant) -> Self {
        let valid_until = Arc::new(Mutex::new(started + leases.valid_span()));
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let lease = Self {
            leases: leases.clone(),
            deployment: deployment.clone(),
            epoch,
            valid_until: valid_until.clone(),
            lost: lost.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(keep(leases, deployment, epoch, valid_until, lost, stop));
        lease
    }

    /// True while this replica may act for the deployment.
    pub fn is_valid(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < self.deadline()
    }

    fn deadline(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancelled once the lease is lost.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The epoch won; a later epoch means another replica took over.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Gives the lease up so another replica can take over at once.
    pub async fn release(self) {
        self.stop.cancel();
        if !self.is_valid() {
            return;
        }
        let value = LeaseValue {
            owner: self.leases.owner.clone(),
            expires_ms: 0,
        };
        let text = serde_json::to_string(&value).unwrap_or_default();
        if let Err(e) = self
            .leases
            .store
            .kv_put(LEASES, &key(&self.deployment, self.epoch), &text, None)
            .await
        {
            tracing::warn!(deployment = %self.deployment, error = %e, "could not release the lease; it will expire");
        }
    }

    /// Deletes every lease key of a finished deployment.
    pub async fn clear(self) {
        self.stop.cancel();
        let store = &self.leases.store;
        let prefix = format!("{}#", self.deployment);
        match store.kv_list(LEASES).await {
            Ok(entries) => {
                for (k, _) in entries {
                    if k.starts_with(&prefix) {
                        if let Err(e) = store.kv_delete(LEASES, &k).await {
                            tracing::debug!(key = %k, error = %e, "could not delete a lease key");
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not list leases to clear them"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn keep(
    leases: Leases,
    deployment: String,
    epoch: u64,
    valid_until: Arc<Mutex<Instant>>,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let every = leases.ttl / 3;
    let mut wait = every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let deadline = *valid_until.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        match leases.renew(&deployment, epoch, deadline).await {
            Ok(true) => {
                *valid_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    started + leases.valid_span();
                wait = every;
            }
            Ok(false) => {
                tracing::warn!(%deployment, epoch, "lost the lease; another replica drives this deployment now");
                lost.cancel();
                return;
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    tracing::warn!(%deployment, error = %format!("{e:#}"), "lease expired while the store was unreachable");
                    lost.cancel();
                    return;
                }
                tracing::debug!(%deployment, error = %format!("{e:#}"), "lease renewal failed; retrying");
                wait = (every / 4).max(Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_store::memory::MemoryStore;

    fn store() -> SharedStore {
        Arc::new(MemoryStore::new())
    }

    #[tokio::test]
    async fn only_one_replica_wins_a_free_deployment() {
        let store = store();
        let a = Leases::new(store.clone(), "a".into(), Duration::from_secs(10));
        let b = Leases::new(store.clone(), "b".into(), Duration::from_secs(10));
        let table = LeaseTable::read(&store).await.unwrap();
        // Both saw the same (empty) table: the put-if-absent decides.
        let la = a.try_acquire(&table, "d1").await.unwrap();
        let lb = b.try_acquire(&table, "d1").await.unwrap();
        assert!(la.is_some() && lb.is_none());
        let table = LeaseTable::read(&store).await.unwrap();
        assert_eq!(
            table.holder("d1", devfleet_protocol::now_ms()).unwrap().0,
            "a"
        );
        assert!(b.try_acquire(&table, "d1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn released_lease_is_taken_over_at_once_and_the_old_holder_is_fenced() {
        let store = store();
        let a = Leases::new(store.clone(), "a".into(), Duration::from_secs(10));
        let b = Leases::new(store.clone(), "b".into(), Duration::from_secs(10));
        let table = LeaseTable::read(&store).await.unwrap();
        let la = a.try_acquire(&table, "d1").await.unwrap().unwrap();
        la.release().await;
        let table = LeaseTable::read(&store).await.unwrap();
        let lb = b.try_acquire(&table, "d1").await.unwrap().unwrap();
        assert_eq!(lb.epoch(), 2);
        // A stale holder of epoch 1 renewing now finds epoch 2.
        let far = Instant::now() + Duration::from_secs(60);
        assert!(!a.renew("d1", 1, far).await.unwrap());
        assert!(b.renew("d1", 2, far).await.unwrap());
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_and_the_holder_knows_it_lost() {
        let store = store();
        let ttl = Duration::from_millis(300);
        let a = Leases::new(store.clone(), "a".into(), ttl);
        let b = Leases::new(store.clone(), "b".into(), ttl);
        let table = LeaseTable::read(&store).await.unwrap();
        let la = a.try_acquire(&table, "d1").await.unwrap().unwrap();
        assert!(la.is_valid());
        // Stop renewing (as a stalled process would) and let it run out.
        la.stop.cancel();
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert!(
            !la.is_valid(),
            "holder must stop acting before others may take over"
        );
        let table = LeaseTable::read(&store).await.unwrap();
        assert!(table.holder("d1", devfleet_protocol::now_ms()).is_none());
        let lb = b.try_acquire(&table, "d1").await.unwrap().unwrap();
        assert!(lb.is_valid());
        // Old epochs are cleaned up by the winner.
        let keys: Vec<_> = store
            .kv_list(LEASES)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![key("d1", 2)]);
    }

    #[tokio::test]
    async fn renewal_keeps_a_lease_alive_past_its_ttl() {
        let store = store();
        let ttl = Duration::from_millis(300);
        let a = Leases::new(store.clone(), "a".into(), ttl);
        let b = Leases::new(store.clone(), "b".into(), ttl);
        let table = LeaseTable::read(&store).await.unwrap();
        let la = a.try_acquire(&table, "d1").await.unwrap().unwrap();
        tokio::time::sleep(ttl * 3).await;
        assert!(la.is_valid());
        let table = LeaseTable::read(&store).await.unwrap();
        assert!(b.try_acquire(&table, "d1").await.unwrap().is_none());
        la.clear().await;
        assert!(store.kv_list(LEASES).await.unwrap().is_empty());
    }

    #[test]
    fn stale_keys_skip_active_and_recent() {
        let mut table = LeaseTable::default();
        let v = |expires_ms| {
            Some(LeaseValue {
                owner: "a".into(),
                expires_ms,
            })
        };
        table
            .entries
            .entry("done".into())
            .or_default()
            .insert(3, v(0));
        table
            .entries
            .entry("live".into())
            .or_default()
            .insert(1, v(0));
        table
            .entries
            .entry("recent".into())
            .or_default()
            .insert(1, v(9_500));
        let active: HashSet<String> = ["live".to_owned()].into();
        assert_eq!(
            table.stale_keys(&active, 10_000, Duration::from_secs(1)),
            vec![key("done", 3)]
        );
    }
}
