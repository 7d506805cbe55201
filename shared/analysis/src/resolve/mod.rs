//! Resolution: from an import as written to a file of the analyzed tree.
//!
//! Resolvers work on a [`FileSet`] of relative paths, never on the disk, so
//! the same code serves a directory and a plan (whose files do not exist
//! yet). Paths are `/`-separated and relative to the root; `""` is the root.

pub mod js;
pub mod python;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash (rustc's hasher): resolution hashes short, trusted path strings
/// tens of thousands of times per tree, where SipHash's DoS resistance buys
/// nothing and costs a measurable share of the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.hash = (self.hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(SEED);
        }
        for &byte in chunks.remainder() {
            self.hash = (self.hash.rotate_left(5) ^ u64::from(byte)).wrapping_mul(SEED);
        }
    }

    #[inline]
    fn write_u8(&mut self, byte: u8) {
        self.write(&[byte]);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A `HashSet` keyed by [`FxHasher`].
pub type FastSet<T> = HashSet<T, BuildHasherDefault<FxHasher>>;
/// A `HashMap` keyed by [`FxHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Where one import leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A source file of the tree: an edge.
    File(String),
    /// Outside the tree (standard library, a package, a path above the root).
    External(String),
    /// Looks like it belongs to the tree, but no file matches.
    Unresolved(String),
    /// Inside the tree but not a source file (a namespace package directory,
    /// a stylesheet or JSON file): no edge.
    Nothing,
}

/// The files (and so directories) an analysis can resolve imports to.
#[derive(Debug, Default, Clone)]
pub struct FileSet {
    files: FastSet<String>,
    dirs: FastSet<String>,
}

impl FileSet {
    /// A set of relative, `/`-separated file paths; their ancestor directories
    /// are derived.
    pub fn new(paths: impl IntoIterator<Item = String>) -> FileSet {
        let mut set = FileSet::default();
        for path in paths {
            set.insert(path);
        }
        set
    }

    /// Adds one file.
    pub fn insert(&mut self, path: String) {
        let mut dir = parent(&path);
        while !dir.is_empty() && self.dirs.insert(dir.to_string()) {
            dir = parent(dir);
        }
        self.files.insert(path);
    }

    pub fn is_file(&self, path: &str) -> bool {
        self.files.contains(path)
    }

    /// True for every directory holding a file at any depth, and the root.
    pub fn is_dir(&self, path: &str) -> bool {
        path.is_empty() || self.dirs.contains(path)
    }

    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The directory holding `path` (`""` for a top-level entry).
pub fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// `dir` joined with a relative path, with `.` and `..` folded; `None` when
/// the result would leave the root.
pub fn join(dir: &str, rel: &str) -> Option<String> {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_folds_dots_and_refuses_to_escape() {
        assert_eq!(join("a/b", "../c/./d").as_deref(), Some("a/c/d"));
        assert_eq!(join("", "x").as_deref(), Some("x"));
        assert_eq!(join("a", "../.."), None);
        assert_eq!(join("a/b", "./").as_deref(), Some("a/b"));
    }

    #[test]
    fn file_set_knows_ancestor_directories() {
        let set = FileSet::new(["a/b/c.py".to_string(), "d.ts".to_string()]);
        assert!(set.is_dir("a") && set.is_dir("a/b") && set.is_dir(""));
        assert!(!set.is_dir("a/b/c.py"));
        assert!(set.is_file("d.ts"));
        assert_eq!(parent("a/b/c.py"), "a/b");
        assert_eq!(parent("d.ts"), "");
    }
}
