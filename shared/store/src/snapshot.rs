//! Base snapshots: a plan's existing code as content-addressed blobs.
//!
//! A plan's `base` is a directory on the publisher's machine; no service
//! reads it. The publisher turns it into a snapshot instead:
//!
//! * [`build`] walks the directory (respecting `.gitignore`, `.ignore` and
//!   `.git/info/exclude`, never entering `.git`, not following symlinks)
//!   and reads every text file into memory, within [`Limits`]. A base that
//!   does not exist, is not a directory, or exceeds a limit is an error
//!   before anything is stored. Files it leaves out are recorded in the
//!   manifest's `skipped` list with the reason (ignored, binary, oversize,
//!   symlink, unreadable).
//! * [`Built::store`] puts every file as an artifact blob (deduplicated by
//!   content hash) and then the [`Manifest`] itself, as JSON, as a blob.
//!   The snapshot id is the manifest blob's hash, so the same tree always
//!   has the same id, and a plan carries only that id (`base_snapshot`).
//! * Services read a snapshot with [`load`] and write it to disk with
//!   [`SnapshotCache::materialise`] (one directory per manifest hash,
//!   least recently used evicted).
//!
//! Blobs are ordinary artifacts, so retention keeps them exactly while a
//! plan that names the snapshot is kept (see the scheduler's retention).

use crate::{StoreError, StoreResult, TaskStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Most files a base snapshot holds (files it skips do not count).
pub const MAX_SNAPSHOT_FILES: usize = 20_000;
/// Largest file a snapshot holds, in bytes; larger files are skipped
/// (recorded as `oversize`), not rejected.
pub const MAX_SNAPSHOT_FILE_BYTES: u64 = 1024 * 1024;
/// Largest total of the files a snapshot holds, in bytes.
pub const MAX_SNAPSHOT_TOTAL_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes inspected to tell a binary file (one holding a NUL byte, or not
/// UTF-8) from a text file.
const BINARY_SNIFF_BYTES: usize = 8192;
/// Age after which a half-written cache directory counts as abandoned.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Limits a base must stay within (the defaults are the constants above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_files: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: MAX_SNAPSHOT_FILES,
            max_file_bytes: MAX_SNAPSHOT_FILE_BYTES,
            max_total_bytes: MAX_SNAPSHOT_TOTAL_BYTES,
        }
    }
}

/// The tree of a snapshot: sorted `/`-separated relative path → blob, plus
/// what was left out. Stored as JSON; its hash is the snapshot id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, FileEntry>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Artifact hash of the file's bytes.
    pub blob: String,
    pub size: u64,
}

/// A path the snapshot left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Relative path; a directory ends with `/` (its contents are not listed).
    pub path: String,
    pub reason: SkipReason,
}

/// Why a path is not in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipReason {
    /// Matched by `.gitignore`, `.ignore` or `.git/info/exclude` (or `.git` itself).
    Ignored,
    /// Holds a NUL byte or is not UTF-8.
    Binary,
    /// Larger than [`Limits::max_file_bytes`].
    Oversize,
    /// A symbolic link (never followed).
    Symlink,
    /// Could not be read.
    Unreadable,
}

/// Why a base cannot be snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("base {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("base {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("base {} holds more than {limit} files (not counting ignored ones); add the rest to .gitignore or point base at a smaller directory", path.display())]
    TooManyFiles { path: PathBuf, limit: usize },
    #[error("base {} holds more than {limit} bytes of files (not counting ignored ones); add large files to .gitignore or point base at a smaller directory", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("reading base {}: {message}", path.display())]
    Walk { path: PathBuf, message: String },
}

/// A snapshot built in memory, not stored yet.
#[derive(Debug, Clone)]
pub struct Built {
    pub manifest: Manifest,
    /// Blob hash → bytes (one entry per distinct content).
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl Built {
    /// The manifest as stored (deterministic JSON: maps are sorted).
    pub fn manifest_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.manifest).unwrap_or_default()
    }

    /// The snapshot id: the hash of [`Built::manifest_bytes`].
    pub fn id(&self) -> String {
        crate::content_hash(&self.manifest_bytes())
    }

    /// Stores every blob, then the manifest; returns the snapshot id.
    /// Storing the same snapshot again is harmless (blobs are
    /// content-addressed).
    pub async fn store(&self, store: &dyn TaskStore) -> StoreResult<String> {
        for bytes in self.blobs.values() {
            store.put_artifact(bytes).await?;
        }
        store.put_artifact(&self.manifest_bytes()).await
    }
}

/// Snapshots the directory `dir` in memory (see the module docs).
pub fn build(dir: &Path, limits: Limits) -> Result<Built, SnapshotError> {
    let meta = std::fs::metadata(dir).map_err(|_| SnapshotError::Missing {
        path: dir.to_path_buf(),
    })?;
    if !meta.is_dir() {
        return Err(SnapshotError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let walk_error = |e: &dyn std::fmt::Display| SnapshotError::Walk {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let walker = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .parents(false)
        .git_global(false)
        .require_git(false)
        .follow_links(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    let mut built = Built {
        manifest: Manifest::default(),
        blobs: BTreeMap::new(),
    };
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut total: u64 = 0;
    for entry in walker {
        let entry = entry.map_err(|e| walk_error(&e))?;
        let path = entry.path().to_path_buf();
        seen.insert(path.clone());
        let Some(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            dirs.push(path);
            continue;
        }
        let rel = relative(dir, &path);
        let skip = |reason| Skipped {
            path: rel.clone(),
            reason,
        };
        if kind.is_symlink() {
            built.manifest.skipped.push(skip(SkipReason::Symlink));
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        if size > limits.max_file_bytes {
            built.manifest.skipped.push(skip(SkipReason::Oversize));
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            built.manifest.skipped.push(skip(SkipReason::Unreadable));
            continue;
        };
        if is_binary(&bytes) {
            built.manifest.skipped.push(skip(SkipReason::Binary));
            continue;
        }
        if built.manifest.files.len() >= limits.max_files {
            return Err(SnapshotError::TooManyFiles {
                path: dir.to_path_buf(),
                limit: limits.max_files,
            });
        }
        total += bytes.len() as u64;
        if total > limits.max_total_bytes {
            return Err(SnapshotError::TooLarge {
                path: dir.to_path_buf(),
                limit: limits.max_total_bytes,
            });
        }
        let blob = crate::content_hash(&bytes);
        built.manifest.files.insert(
            rel,
            FileEntry {
                blob: blob.clone(),
                size: bytes.len() as u64,
            },
        );
        built.blobs.insert(blob, bytes);
    }
    // What the walk did not yield from a directory it entered was ignored.
    for d in dirs {
        let Ok(children) = std::fs::read_dir(&d) else {
            continue;
        };
        for child in children.flatten() {
            let path = child.path();
            if seen.contains(&path) {
                continue;
            }
            let mut rel = relative(dir, &path);
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                rel.push('/');
            }
            built.manifest.skipped.push(Skipped {
                path: rel,
                reason: SkipReason::Ignored,
            });
        }
    }
    built.manifest.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(built)
}

/// `path` relative to `root`, `/`-separated.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn is_binary(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(BINARY_SNIFF_BYTES)];
    head.contains(&0) || std::str::from_utf8(bytes).is_err()
}

/// Reads the manifest of snapshot `id` from the store; `Ok(None)` when no
/// such blob exists. A blob that is not a manifest is an error.
pub async fn load(store: &dyn TaskStore, id: &str) -> StoreResult<Option<Manifest>> {
    let Some(bytes) = store.artifact(id).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Backend(format!("blob {id} is not a snapshot manifest: {e}")))
}

/// A snapshot's file read back from the store as text (`None` when the
/// path is not in the manifest or its blob is gone).
pub async fn read_file(
    store: &dyn TaskStore,
    manifest: &Manifest,
    path: &str,
) -> StoreResult<Option<String>> {
    let Some(entry) = manifest.files.get(path) else {
        return Ok(None);
    };
    Ok(store
        .artifact(&entry.blob)
        .await?
        .and_then(|b| String::from_utf8(b).ok()))
}

/// Whether `id` looks like a snapshot id (a SHA-256 in lowercase hex).
pub fn is_snapshot_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Snapshots written to disk, one read-only-by-convention directory per
/// snapshot id under `root`, keeping the `keep` most recently used.
///
/// Any replica on any host materialises the same tree from the same id.
/// A directory is filled under a temporary name and renamed into place,
/// so a reader never sees a half-written tree; a crash leaves only a
/// temporary directory, removed by the next eviction pass.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    root: PathBuf,
    keep: usize,
}

impl SnapshotCache {
    /// A cache under `root` keeping at most `keep` snapshots (at least 1).
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> Self {
        Self {
            root: root.into(),
            keep: keep.max(1),
        }
    }

    /// The directory of snapshot `id`, written from the store if it is not
    /// cached yet; marks it most recently used and evicts the least
    /// recently used past `keep`. Errors when the manifest or a blob is
    /// missing from the store.
    pub async fn materialise(&self, store: &dyn TaskStore, id: &str) -> StoreResult<PathBuf> {
        if !is_snapshot_id(id) {
            return Err(StoreError::Backend(format!("'{id}' is not a snapshot id")));
        }
        let io = |what: &str, e: std::io::Error| StoreError::Backend(format!("{what}: {e}"));
        let dir = self.root.join(id);
        if !dir.is_dir() {
            let manifest = load(store, id)
                .await?
                .ok_or_else(|| StoreError::Backend(format!("snapshot {id} is not in the store")))?;
            let tmp = self.root.join(format!(".tmp-{id}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| io("creating the snapshot cache", e))?;
            for (path, entry) in &manifest.files {
                let bytes = store.artifact(&entry.blob).await?.ok_or_else(|| {
                    StoreError::Backend(format!(
                        "snapshot {id}: the blob of {path} is not in the store"
                    ))
                })?;
                let target = tmp.join(path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io("writing a snapshot", e))?;
                }
                std::fs::write(&target, bytes).map_err(|e| io("writing a snapshot", e))?;
            }
            if let Err(e) = std::fs::rename(&tmp, &dir) {
                // Another task of this process (or another process) won the race.
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.is_dir() {
                    return Err(io("placing a snapshot", e));
                }
            }
        }
        // The directory's mtime is its last use.
        let _ =
            std::fs::File::open(&dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        self.evict(id);
        Ok(dir)
    }

    /// Removes snapshots past the `keep` most recently used (never `current`)
    /// and leftovers of interrupted writes.
    fn evict(&self, current: &str) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut cached = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let used = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if name.starts_with(".tmp-") {
                // Left by a writer that died (a live one finishes in far less).
                if used.elapsed().is_ok_and(|age| age > STALE_TMP) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            } else if is_snapshot_id(&name) && name != current {
                cached.push((used, entry.path()));
            }
        }
        cached.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (_, path) in cached.into_iter().skip(self.keep - 1) {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn reasons(built: &Built) -> Vec<(String, SkipReason)> {
        built
            .manifest
            .skipped
            .iter()
            .map(|s| (s.path.clone(), s.reason))
            .collect()
    }

    #[test]
    fn gitignored_binary_and_oversize_files_are_skipped_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, ".gitignore", b"build/\n*.log\n");
        write(root, "app/main.py", b"import app.util\n");
        write(root, "app/util.py", b"X = 1\n");
        write(root, "app/debug.log", b"noise\n");
        write(root, "build/out.py", b"generated\n");
        write(root, ".git/HEAD", b"ref: refs/heads/main\n");
        write(root, "logo.png", b"\x89PNG\x00\x01");
        write(root, "big.txt", &vec![b'a'; 2000]);
        let limits = Limits {
            max_file_bytes: 1000,
            ..Limits::default()
        };
        let built = build(root, limits).unwrap();
        let files: Vec<&str> = built.manifest.files.keys().map(String::as_str).collect();
        assert_eq!(files, [".gitignore", "app/main.py", "app/util.py"]);
        assert_eq!(
            reasons(&built),
            [
                (".git/".to_string(), SkipReason::Ignored),
                ("app/debug.log".to_string(), SkipReason::Ignored),
                ("big.txt".to_string(), SkipReason::Oversize),
                ("build/".to_string(), SkipReason::Ignored),
                ("logo.png".to_string(), SkipReason::Binary),
            ]
        );
        let util = &built.manifest.files["app/util.py"];
        assert_eq!(util.size, 6);
        assert_eq!(built.blobs[&util.blob], b"X = 1\n");
    }

    #[test]
    fn the_id_depends_only_on_the_tree() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        // Written in different orders.
        write(a.path(), "x/1.py", b"one\n");
        write(a.path(), "y.py", b"two\n");
        write(b.path(), "y.py", b"two\n");
        write(b.path(), "x/1.py", b"one\n");
        let id_a = build(a.path(), Limits::default()).unwrap().id();
        assert_eq!(id_a, build(b.path(), Limits::default()).unwrap().id());
        assert!(is_snapshot_id(&id_a));
        write(b.path(), "y.py", b"changed\n");
        assert_ne!(id_a, build(b.path(), Limits::default()).unwrap().id());
    }

    #[test]
    fn a_base_over_the_limits_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            write(dir.path(), &format!("f{i}.py"), b"0123456789");
        }
        let few = Limits {
            max_files: 2,
            ..Limits::default()
        };
        let err = build(dir.path(), few).unwrap_err();
        assert!(
            matches!(err, SnapshotError::TooManyFiles { limit: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(".gitignore"),
            "says how to fix it: {err}"
        );
        let small = Limits {
            max_total_bytes: 25,
            ..Limits::default()
        };
        let err = build(dir.path(), small).unwrap_err();
        assert!(
            matches!(err, SnapshotError::TooLarge { limit: 25, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_missing_base_or_a_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(&dir.path().join("nope"), Limits::default()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        write(dir.path(), "file.py", b"x\n");
        let err = build(&dir.path().join("file.py"), Limits::default()).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
