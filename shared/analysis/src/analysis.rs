//! [`Analysis`]: the result of analyzing a tree or a plan, and how it is
//! assembled from scanned imports.

use crate::graph::{self, GraphInfo};
use crate::resolve::js::JsResolver;
use crate::resolve::python::PyResolver;
use crate::resolve::{FastMap, FileSet, Target};
use crate::tree::{Imports, Listing, Scanned};
use crate::{EdgeKind, Language, Warning};
use devfleet_protocol::{AnalyzedTask, Plan};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// One file of the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    /// Relative to the analyzed root (or the plan's workspace), `/`-separated.
    pub path: String,
    /// `None` for files the analyzer does not read (a plan's README, say).
    pub language: Option<Language>,
    /// Relative cost: the task's `estimate`, else [`crate::default_estimate`].
    pub estimate: u32,
}

/// A dependency: `from` needs `to` first. Indices into [`Analysis::files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub kind: EdgeKind,
}

/// The longest chain of work, by estimate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CriticalPath {
    /// Sum of the estimates along it.
    pub length: u64,
    /// Its files, the first to build first; a cycle on the path contributes
    /// all its files.
    pub files: Vec<String>,
}

/// Counts that summarise an analysis; the `stats` object of the JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub files: usize,
    pub python_files: usize,
    pub javascript_files: usize,
    pub typescript_files: usize,
    pub edges: usize,
    pub import_edges: usize,
    pub type_edges: usize,
    pub dynamic_edges: usize,
    pub explicit_edges: usize,
    /// Distinct (file, module) pairs that resolve outside the tree.
    pub external_imports: usize,
    /// Distinct (file, module) pairs that should be in the tree but are not.
    pub unresolved_imports: usize,
    pub cycles: usize,
    pub files_in_cycles: usize,
    pub largest_cycle: usize,
    pub max_fan_in: usize,
    pub max_fan_in_file: Option<String>,
    pub max_fan_out: usize,
    pub max_fan_out_file: Option<String>,
    /// Number of batches (topological layers).
    pub depth: usize,
    /// Files in the largest batch.
    pub width: usize,
    /// Source files that could not be read or scanned (see the warnings).
    pub skipped_files: usize,
    /// Plan edges dropped to break cycles.
    pub dropped_edges: usize,
}

/// The dependency analysis of a tree or a plan.
///
/// Files are sorted by path and addressed by index; every list in it is in
/// a deterministic order, so two runs over the same input are identical.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub(crate) files: Vec<FileNode>,
    pub(crate) index: HashMap<String, usize>,
    pub(crate) edges: Vec<Edge>,
    pub(crate) external: Vec<Vec<String>>,
    pub(crate) unresolved: Vec<Vec<String>>,
    pub(crate) dropped: Vec<Edge>,
    pub(crate) graph: GraphInfo,
    pub(crate) critical_path: CriticalPath,
    pub(crate) stats: Stats,
    pub(crate) warnings: Vec<Warning>,
    /// Per file index: in-tree files that are not nodes (a plan's base
    /// files) which the file imports.
    pub(crate) base_imports: Vec<Vec<String>>,
}

impl Analysis {
    /// The files of the plan's base that `path` imports, sorted (empty for
    /// a directory analysis, where every file is a node).
    pub fn base_imports(&self, path: &str) -> &[String] {
        self.index_of(path)
            .and_then(|i| self.base_imports.get(i))
            .map_or(&[], Vec::as_slice)
    }

    /// Every file, sorted by path.
    pub fn files(&self) -> &[FileNode] {
        &self.files
    }

    /// The path of file `i`.
    pub fn path(&self, i: usize) -> &str {
        &self.files[i].path
    }

    /// The index of `path`, if it is a file of the analysis.
    pub fn index_of(&self, path: &str) -> Option<usize> {
        self.index.get(path).copied()
    }

    /// Every edge, sorted by `(from, to)`; one per pair, with the strongest kind.
    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    /// What `path` depends on, sorted.
    pub fn dependencies(&self, path: &str) -> Vec<&str> {
        let Some(i) = self.index_of(path) else {
            return Vec::new();
        };
        let start = self.edges.partition_point(|e| e.from < i);
        self.edges[start..]
            .iter()
            .take_while(|e| e.from == i)
            .map(|e| self.path(e.to))
            .collect()
    }

    /// Imports of `path` that lead outside the tree, sorted.
    pub fn external(&self, path: &str) -> &[String] {
        self.index_of(path).map_or(&[], |i| &self.external[i])
    }

    /// Imports of `path` that look internal but match no file, sorted.
    pub fn unresolved(&self, path: &str) -> &[String] {
        self.index_of(path).map_or(&[], |i| &self.unresolved[i])
    }

    /// Strongly connected components of more than one file. For a plan these
    /// are the cycles found before [`Analysis::dropped_edges`] broke them.
    pub fn cycles(&self) -> Vec<Vec<&str>> {
        self.graph
            .cycles
            .iter()
            .map(|c| c.iter().map(|&f| self.path(f)).collect())
            .collect()
    }

    /// Files per topological layer; layer 0 depends on nothing.
    pub fn batches(&self) -> Vec<Vec<&str>> {
        self.graph
            .batches
            .iter()
            .map(|b| b.iter().map(|&f| self.path(f)).collect())
            .collect()
    }

    /// The layer of `path`.
    pub fn batch(&self, path: &str) -> Option<u32> {
        self.index_of(path).map(|i| self.graph.batch_of[i])
    }

    /// The priority of `path`: the longest remaining path to a sink,
    /// including itself, by estimate. Higher runs first.
    pub fn priority(&self, path: &str) -> Option<u64> {
        self.index_of(path).map(|i| self.graph.priority[i])
    }

    pub fn critical_path(&self) -> &CriticalPath {
        &self.critical_path
    }

    /// Sum of estimates along the critical path.
    pub fn critical_path_length(&self) -> u64 {
        self.critical_path.length
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Files skipped, configs ignored, plan edges dropped: never fatal.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Plan edges removed to make the graph acyclic (empty for a directory).
    pub fn dropped_edges(&self) -> &[Edge] {
        &self.dropped
    }

    /// The plan's tasks with their analysis, in the plan's order.
    ///
    /// `depends_on` holds every kept edge (parsed and explicit); `executor`
    /// is the task's own, else the plan's default. A task missing from the
    /// analysis (another plan was passed) gets no dependencies, batch 0 and
    /// priority 0.
    pub fn to_analyzed_tasks(&self, plan: &Plan) -> Vec<AnalyzedTask> {
        plan.tasks
            .iter()
            .map(|task| {
                let i = self.index_of(&task.path);
                AnalyzedTask {
                    path: task.path.clone(),
                    spec: task.spec.clone(),
                    content: task.content.clone(),
                    depends_on: self
                        .dependencies(&task.path)
                        .into_iter()
                        .map(str::to_owned)
                        .collect(),
                    estimate: i.map_or(1, |i| self.files[i].estimate),
                    priority: i.map_or(0, |i| {
                        u32::try_from(self.graph.priority[i]).unwrap_or(u32::MAX)
                    }),
                    batch: i.map_or(0, |i| self.graph.batch_of[i]),
                    executor: task.executor.or(plan.executor),
                    base_imports: self.base_imports(&task.path).to_vec(),
                }
            })
            .collect()
    }
}

/// What [`assemble`] builds an [`Analysis`] from.
pub(crate) struct Input {
    /// Sorted by path.
    pub files: Vec<FileNode>,
    pub edges: Vec<Edge>,
    pub external: Vec<BTreeSet<String>>,
    pub unresolved: Vec<BTreeSet<String>>,
    pub warnings: Vec<Warning>,
    pub skipped: usize,
}

/// What [`resolve_all`] found: edges and, per file, the imports that left
/// the tree or matched nothing.
pub(crate) struct Resolved {
    pub edges: Vec<Edge>,
    pub external: Vec<BTreeSet<String>>,
    pub unresolved: Vec<BTreeSet<String>>,
    /// Configs (tsconfig.json) that could not be used.
    pub warnings: Vec<Warning>,
    /// Per file: targets in `set` that are not nodes (base files).
    pub base_imports: Vec<BTreeSet<String>>,
}

/// Resolves the scanned imports of `files` against `set`.
///
/// `imports[i]` belongs to `files[i]`. Targets that are files of `set` but
/// not nodes (a plan's base files) give no edge.
pub(crate) fn resolve_all(
    files: &[FileNode],
    imports: &[Imports],
    set: &FileSet,
    root_name: Option<&str>,
    read: &dyn Fn(&str) -> Option<String>,
) -> Resolved {
    let index: FastMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.as_str(), i))
        .collect();
    let python = PyResolver::new(set, root_name);
    let has_js = imports
        .iter()
        .any(|i| matches!(i, Imports::Js(v) if !v.is_empty()));
    let (js, warnings) = if has_js {
        let (r, w) = JsResolver::new(set, read);
        (Some(r), w)
    } else {
        (None, Vec::new())
    };
    let mut edges = Vec::new();
    let mut external = vec![BTreeSet::new(); files.len()];
    let mut unresolved = vec![BTreeSet::new(); files.len()];
    let mut base_imports = vec![BTreeSet::new(); files.len()];
    let mut targets = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let mut record = |target: Target, kind: EdgeKind| match target {
            Target::File(path) => {
                if let Some(&j) = index.get(path.as_str()) {
                    if j != i {
                        edges.push(Edge {
                            from: i,
                            to: j,
                            kind,
                        });
                    }
                } else {
                    base_imports[i].insert(path);
                }
            }
            Target::External(m) => {
                external[i].insert(m);
            }
            Target::Unresolved(m) => {
                unresolved[i].insert(m);
            }
            Target::Nothing => {}
        };
        match imports.get(i) {
            Some(Imports::Python(list)) => {
                for import in list {
                    targets.clear();
                    python.resolve(&file.path, import, &mut targets);
                    for target in targets.drain(..) {
                        record(target, import.kind);
                    }
                }
            }
            Some(Imports::Js(list)) => {
                if let Some(js) = &js {
                    for import in list {
                        record(js.resolve(&file.path, &import.specifier), import.kind);
                    }
                }
            }
            _ => {}
        }
    }
    Resolved {
        edges,
        external,
        unresolved,
        warnings,
        base_imports,
    }
}

/// Builds the analysis of a listed and scanned directory.
pub(crate) fn build_from_tree(root: &Path, listing: Listing, scanned: Scanned) -> Analysis {
    let set = listing.file_set();
    let mut files = Vec::new();
    let mut imports = Vec::new();
    for (file, found) in listing.files.iter().zip(scanned.imports) {
        let Some(language) = Language::from_path(&file.rel) else {
            continue;
        };
        files.push(FileNode {
            path: file.rel.clone(),
            language: Some(language),
            estimate: crate::plan::default_estimate(
                usize::try_from(file.size).unwrap_or(usize::MAX),
            ),
        });
        imports.push(found);
    }
    // Listings are sorted by path: configs are found without an index.
    let read = |rel: &str| {
        let i = listing
            .files
            .binary_search_by(|f| f.rel.as_str().cmp(rel))
            .ok()?;
        std::fs::read_to_string(&listing.files[i].abs).ok()
    };
    let root_name = std::fs::canonicalize(root)
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned));
    let Resolved {
        edges,
        external,
        unresolved,
        warnings: config_warnings,
        base_imports: _,
    } = resolve_all(&files, &imports, &set, root_name.as_deref(), &read);
    let mut warnings = listing.warnings;
    warnings.extend(scanned.warnings);
    warnings.extend(config_warnings);
    let input = Input {
        files,
        edges,
        external,
        unresolved,
        warnings,
        skipped: scanned.skipped,
    };
    assemble(input, Vec::new())
}

/// One edge per pair, keeping the strongest kind; sorted.
pub(crate) fn dedup_edges(mut edges: Vec<Edge>) -> Vec<Edge> {
    edges.sort_unstable_by(|a, b| {
        (a.from, a.to)
            .cmp(&(b.from, b.to))
            .then(b.kind.strength().cmp(&a.kind.strength()))
    });
    edges.dedup_by(|later, first| later.from == first.from && later.to == first.to);
    edges
}

/// Runs the graph analysis and fills in the statistics. `edges` must be
/// deduplicated and acyclic for plans; `cycles_before` replaces the
/// reported cycles when a plan's cycles were broken.
pub(crate) fn assemble(input: Input, dropped: Vec<Edge>) -> Analysis {
    let Input {
        files,
        edges,
        external,
        unresolved,
        warnings,
        skipped,
    } = input;
    let n = files.len();
    let edges = dedup_edges(edges);
    let plain: Vec<(usize, usize)> = edges.iter().map(|e| (e.from, e.to)).collect();
    let estimates: Vec<u32> = files.iter().map(|f| f.estimate).collect();
    let mut info = graph::analyze(n, &plain, &estimates);
    if !dropped.is_empty() {
        let mut all = plain.clone();
        all.extend(dropped.iter().map(|e| (e.from, e.to)));
        info.cycles = graph::cycles(n, &all);
    }
    let path = |i: usize| files[i].path.clone();
    let critical_path = CriticalPath {
        length: info.critical_path.0,
        files: info.critical_path.1.iter().map(|&i| path(i)).collect(),
    };
    let count_kind = |k: EdgeKind| edges.iter().filter(|e| e.kind == k).count();
    let count_lang = |l: Language| files.iter().filter(|f| f.language == Some(l)).count();
    let stats = Stats {
        files: n,
        python_files: count_lang(Language::Python),
        javascript_files: count_lang(Language::JavaScript),
        typescript_files: count_lang(Language::TypeScript),
        edges: edges.len(),
        import_edges: count_kind(EdgeKind::Import),
        type_edges: count_kind(EdgeKind::Type),
        dynamic_edges: count_kind(EdgeKind::Dynamic),
        explicit_edges: count_kind(EdgeKind::Explicit),
        external_imports: external.iter().map(BTreeSet::len).sum(),
        unresolved_imports: unresolved.iter().map(BTreeSet::len).sum(),
        cycles: info.cycles.len(),
        files_in_cycles: info.cycles.iter().map(Vec::len).sum(),
        largest_cycle: info.cycles.iter().map(Vec::len).max().unwrap_or(0),
        max_fan_in: info.max_fan_in.0,
        max_fan_in_file: info.max_fan_in.1.map(path),
        max_fan_out: info.max_fan_out.0,
        max_fan_out_file: info.max_fan_out.1.map(path),
        depth: info.batches.len(),
        width: info.batches.iter().map(Vec::len).max().unwrap_or(0),
        skipped_files: skipped,
        dropped_edges: dropped.len(),
    };
    let index = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.clone(), i))
        .collect();
    Analysis {
        base_imports: vec![Vec::new(); files.len()],
        files,
        index,
        edges,
        external: external
            .into_iter()
            .map(|s| s.into_iter().collect())
            .collect(),
        unresolved: unresolved
            .into_iter()
            .map(|s| s.into_iter().collect())
            .collect(),
        dropped,
        graph: info,
        critical_path,
        stats,
        warnings,
    }
}
