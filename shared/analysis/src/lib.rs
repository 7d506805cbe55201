//! The analyzer: turns a code tree or a plan into the dependency DAG that
//! everything else schedules from.
//!
//! The pipeline, one module per step:
//!
//! 1. [`tree`] walks a directory and scans its sources on every core
//!    (symlink loops, binary, invalid UTF-8 and huge files are skipped with a
//!    [`Warning`]).
//! 2. [`scanner`] finds imports with exact hand-written lexers for Python and
//!    JavaScript/TypeScript; no syntax tree is built.
//! 3. [`resolve`] maps each import to a file of the tree (Python's own rules;
//!    Node/TypeScript rules with `tsconfig.json` `baseUrl`/`paths`), to
//!    `external`, or to `unresolved`.
//! 4. [`graph`] finds cycles (strongly connected components, via petgraph),
//!    topological batches with each cycle collapsed into one unit, the
//!    critical path by estimate, a priority per file and statistics.
//! 5. [`report`] renders an [`Analysis`] as the JSON of DESIGN.md, a text
//!    report or Graphviz DOT.
//!
//! [`analyze_dir`] runs it over a directory, [`analyze_plan`] over a
//! [`devfleet_protocol::Plan`]. This crate's library does no network I/O and
//! keeps no state between calls.

pub mod analysis;
pub mod graph;
pub mod plan;
pub mod report;
pub mod resolve;
pub mod scanner;
pub mod tree;

pub use analysis::{Analysis, CriticalPath, Edge, FileNode, Stats};
pub use plan::{analyze_plan, analyze_plan_over, default_estimate};
pub use report::Format;

use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// What a dependency edge stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeKind {
    /// A runtime import (`import`, `from … import`, ESM, `require()`).
    Import,
    /// Needed only by the type checker (`if TYPE_CHECKING:`, `import type`).
    Type,
    /// Loaded at run time by a literal name (`importlib.import_module("x")`, `import("x")`).
    Dynamic,
    /// Declared in a plan's `depends_on`.
    Explicit,
}

impl EdgeKind {
    /// The name used in JSON and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Import => "import",
            EdgeKind::Type => "type",
            EdgeKind::Dynamic => "dynamic",
            EdgeKind::Explicit => "explicit",
        }
    }

    /// When one file reaches another several ways, the edge keeps the
    /// strongest kind: explicit > import > dynamic > type. Breaking a plan's
    /// cycle drops the weakest edges first.
    pub fn strength(self) -> u8 {
        match self {
            EdgeKind::Type => 0,
            EdgeKind::Dynamic => 1,
            EdgeKind::Import => 2,
            EdgeKind::Explicit => 3,
        }
    }
}

impl fmt::Display for EdgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Source languages the analyzer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// `.py`, `.pyi`.
    Python,
    /// `.js .mjs .cjs .jsx`.
    JavaScript,
    /// `.ts .mts .cts .tsx` (and `.d.ts`).
    TypeScript,
}

impl Language {
    /// The language of a file name, or `None` for anything else.
    pub fn from_path(path: &str) -> Option<Language> {
        let ext = path.rsplit_once('.')?.1;
        match ext {
            "py" | "pyi" => Some(Language::Python),
            "js" | "mjs" | "cjs" | "jsx" => Some(Language::JavaScript),
            "ts" | "mts" | "cts" | "tsx" => Some(Language::TypeScript),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
        }
    }
}

/// Largest file whose imports are scanned by default (10 MB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;

/// Directory names never entered by [`analyze_dir`]: VCS metadata, installed
/// dependencies and caches. Hidden directories (`.x`) and virtualenvs (a
/// directory holding `pyvenv.cfg`) are skipped as well.
pub const DEFAULT_SKIP_DIRS: &[&str] = &["node_modules", "__pycache__", "site-packages"];

/// How [`analyze_dir`] reads a tree.
#[derive(Debug, Clone)]
pub struct Options {
    /// Reader/scanner threads; 0 means one per core.
    pub threads: usize,
    /// Files larger than this are graph nodes but are not read.
    pub max_file_bytes: u64,
    /// Directory names not entered (see [`DEFAULT_SKIP_DIRS`]).
    pub skip_dirs: Vec<String>,
    /// Follow symbolic links to directories outside the tree (links into the
    /// tree and loops are skipped with a warning).
    pub follow_symlinks: bool,
    /// Files and directories [`tree::list`] takes before it gives up with
    /// [`AnalyzeError::TooManyFiles`] (a plan's base is bounded by it;
    /// unbounded by default).
    pub max_entries: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: 0,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            skip_dirs: DEFAULT_SKIP_DIRS.iter().map(|s| s.to_string()).collect(),
            follow_symlinks: true,
            max_entries: usize::MAX,
        }
    }
}

/// Something the analyzer skipped or could not do fully; never fatal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// The file or directory concerned, relative to the analyzed root when it
    /// is inside it.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a directory could not be analyzed at all.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} holds more than {limit} files and directories", path.display())]
    TooManyFiles { path: PathBuf, limit: usize },
}

/// Analyzes every Python, JavaScript and TypeScript file under `root`.
///
/// Blocks while it reads the tree on `opts.threads` threads. Fails only if
/// `root` itself cannot be listed; unreadable, binary, non-UTF-8 or
/// oversized files and symlink loops become [`Analysis::warnings`].
pub fn analyze_dir(root: &Path, opts: &Options) -> Result<Analysis, AnalyzeError> {
    let (listing, scanned) = tree::walk_and_scan(root, opts)?;
    Ok(analysis::build_from_tree(root, listing, scanned))
}
