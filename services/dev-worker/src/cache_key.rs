//! The result cache key: what a task's output can depend on, hashed.
//!
//! SHA-256 over, each length-prefixed so no two inputs run together: a
//! format version, the worker's cache salt (`DEVFLEET_DEV_CACHE_SALT`), the
//! executor identity (which includes every setting that changes output),
//! the task's path, spec and content, and the path, artifact hash and
//! distance of each dependency, direct and transitive, in path order
//! (transitive ones reach the `openai` executor's prompt, so they must
//! reach the key). A fix also includes the diagnostics and the
//! previous artifact, so a fix never gets back the file that failed.
//!
//! Because dependencies enter by artifact hash, a change propagates exactly
//! as far as outputs change: a task whose dependency was regenerated to the
//! same bytes is still a cache hit.

use sha2::{Digest, Sha256};

/// Bump when the key layout changes.
const FORMAT: &str = "devfleet-cache/2";

/// One dependency of a task, as the key sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub path: String,
    /// Its artifact hash.
    pub artifact: String,
    /// 1 for a direct dependency, 2 for one of its dependencies, …
    pub distance: u32,
}

/// Everything a cache key covers.
#[derive(Debug, Clone, Copy)]
pub struct CacheKeyInput<'a> {
    pub salt: &'a str,
    pub executor: &'a str,
    pub path: &'a str,
    pub spec: &'a str,
    pub content: Option<&'a str>,
    /// Every dependency (direct and transitive), sorted by path.
    pub dependencies: &'a [Dependency],
    /// For a fix: the diagnostics and the previous artifact hash.
    pub fix: Option<(&'a str, Option<&'a str>)>,
}

/// The key, lowercase hex.
pub fn cache_key(input: &CacheKeyInput<'_>) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(FORMAT.as_bytes());
    field(input.salt.as_bytes());
    field(input.executor.as_bytes());
    field(input.path.as_bytes());
    field(input.spec.as_bytes());
    match input.content {
        Some(c) => {
            field(b"content");
            field(c.as_bytes());
        }
        None => field(b"no-content"),
    }
    field(&(input.dependencies.len() as u64).to_le_bytes());
    for d in input.dependencies {
        field(d.path.as_bytes());
        field(d.artifact.as_bytes());
        field(&d.distance.to_le_bytes());
    }
    match input.fix {
        Some((diagnostics, previous)) => {
            field(b"fix");
            field(diagnostics.as_bytes());
            field(previous.unwrap_or("").as_bytes());
        }
        None => field(b"new"),
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CacheKeyInput<'static> {
        CacheKeyInput {
            salt: "",
            executor: "builtin/1",
            path: "a.py",
            spec: "spec",
            content: Some("x"),
            dependencies: &[],
            fix: None,
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let k = cache_key(&base());
        assert_eq!(k, cache_key(&base()));
        let dep = |artifact: &str, distance| Dependency {
            path: "b.py".into(),
            artifact: artifact.into(),
            distance,
        };
        let deps = [dep("h1", 1)];
        let deps2 = [dep("h2", 1)];
        let deps3 = [dep("h1", 2)];
        let variants = [
            CacheKeyInput {
                salt: "s",
                ..base()
            },
            CacheKeyInput {
                executor: "simulate/1",
                ..base()
            },
            CacheKeyInput {
                path: "b.py",
                ..base()
            },
            CacheKeyInput {
                spec: "spec2",
                ..base()
            },
            CacheKeyInput {
                content: None,
                ..base()
            },
            CacheKeyInput {
                content: Some(""),
                ..base()
            },
            CacheKeyInput {
                dependencies: &deps,
                ..base()
            },
            CacheKeyInput {
                fix: Some(("diag", None)),
                ..base()
            },
        ];
        let mut keys: Vec<String> = variants.iter().map(cache_key).collect();
        keys.push(k);
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len());
        assert_ne!(
            cache_key(&CacheKeyInput {
                dependencies: &deps,
                ..base()
            }),
            cache_key(&CacheKeyInput {
                dependencies: &deps2,
                ..base()
            })
        );
        assert_ne!(
            cache_key(&CacheKeyInput {
                dependencies: &deps,
                ..base()
            }),
            cache_key(&CacheKeyInput {
                dependencies: &deps3,
                ..base()
            })
        );
    }

    #[test]
    fn fields_cannot_run_together() {
        let a = CacheKeyInput {
            path: "ab",
            spec: "c",
            ..base()
        };
        let b = CacheKeyInput {
            path: "a",
            spec: "bc",
            ..base()
        };
        assert_ne!(cache_key(&a), cache_key(&b));
    }
}
