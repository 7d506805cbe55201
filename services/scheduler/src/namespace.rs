//! Namespaces: keeping one deployment's (or one test's) work apart from
//! another's on a shared broker and store.
//!
//! Queue names are fixed constants in `devfleet_protocol::queues`. A
//! non-empty namespace prefixes every work-queue name a service uses
//! (`ns.work.dev`) and every store collection it keeps (`ns.workers`), so two
//! stacks sharing one RabbitMQ never take each other's messages. The empty
//! namespace (the default) uses the names unchanged. Every service of one
//! stack must be given the same namespace (`DEVFLEET_NAMESPACE`).
//!
//! This lives in the scheduler crate only until it moves to
//! `devfleet-runtime`; the dev-worker uses it from here.

use anyhow::Context as _;
use devfleet_store::SharedStore;
use std::fmt;
use std::sync::Arc;

/// Longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;

/// A validated queue-name prefix. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Namespace(String);

/// Why a namespace was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid namespace '{namespace}' (DEVFLEET_NAMESPACE): {reason}")]
pub struct NamespaceError {
    pub namespace: String,
    pub reason: String,
}

impl Namespace {
    /// The empty namespace: queue names as in `devfleet_protocol::queues`.
    pub fn none() -> Self {
        Self::default()
    }

    /// Checks a prefix: ASCII letters, digits, `-` and `_` only (so it is a
    /// valid part of an AMQP queue, a NATS stream and a Redis key), at most
    /// [`MAX_NAMESPACE_BYTES`]. The empty string is [`Namespace::none`].
    pub fn new(prefix: impl Into<String>) -> Result<Self, NamespaceError> {
        let prefix = prefix.into();
        let refuse = |reason: &str| NamespaceError {
            namespace: prefix.clone(),
            reason: reason.to_owned(),
        };
        if prefix.len() > MAX_NAMESPACE_BYTES {
            return Err(refuse(&format!("longer than {MAX_NAMESPACE_BYTES} bytes")));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(refuse("use only ASCII letters, digits, '-' and '_'"));
        }
        Ok(Self(prefix))
    }

    /// True for the empty namespace.
    pub fn is_none(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of a work queue in this namespace.
    pub fn queue(&self, queue: &str) -> String {
        self.prefixed(queue)
    }

    /// The name of a store key/value collection in this namespace.
    pub fn collection(&self, collection: &str) -> String {
        self.prefixed(collection)
    }

    fn prefixed(&self, name: &str) -> String {
        if self.0.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.0)
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl std::str::FromStr for Namespace {
    type Err = NamespaceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Namespace::new(s)
    }
}

/// Connects to the store under a key prefix other than the default one
/// (`DEVFLEET_STORE_PREFIX`): two stacks sharing one Redis need different
/// prefixes, as they need different namespaces on a shared broker.
/// `memory://` ignores the prefix. A stopgap until `ConnectArgs` carries it.
pub async fn connect_store(url: &str, prefix: &str) -> anyhow::Result<SharedStore> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let store = devfleet_store::redis::RedisStore::connect(url, prefix)
            .await
            .with_context(|| format!("connecting to Redis (DEVFLEET_REDIS_URL) with prefix '{prefix}'"))?;
        Ok(Arc::new(store))
    } else {
        devfleet_store::connect(url)
            .await
            .context("connecting to the store (DEVFLEET_REDIS_URL)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::queues;

    #[test]
    fn empty_namespace_keeps_the_protocol_names() {
        let ns = Namespace::none();
        assert_eq!(ns.queue(queues::WORK_DEV), "work.dev");
        assert_eq!(ns.collection("workers"), "workers");
    }

    #[test]
    fn namespace_prefixes_queues_and_collections() {
        let ns = Namespace::new("t-1a2b").unwrap();
        assert_eq!(ns.queue(queues::WORK_DEV), "t-1a2b.work.dev");
        assert_eq!(ns.collection("workers"), "t-1a2b.workers");
    }

    #[test]
    fn namespace_rejects_separators_and_wildcards() {
        for bad in ["a.b", "a b", "a*", "a>", "a:b", &"x".repeat(65)] {
            let err = Namespace::new(bad).unwrap_err();
            assert!(err.to_string().contains("DEVFLEET_NAMESPACE"), "{err}");
        }
        assert!(Namespace::new("").unwrap().is_none());
    }
}
