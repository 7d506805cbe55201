//! Renderings of an [`Analysis`]: the JSON contract of DESIGN.md, a text
//! report for people, and Graphviz DOT.

use crate::analysis::{Analysis, CriticalPath, Stats};
use crate::EdgeKind;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// Output formats of `devfleet analyze`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// A report a person reads at a glance.
    #[default]
    Text,
    /// One JSON object, as DESIGN.md specifies.
    Json,
    /// A Graphviz digraph.
    Dot,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "dot" => Ok(Format::Dot),
            other => Err(format!(
                "unknown format '{other}' (expected text, json or dot)"
            )),
        }
    }
}

/// Renders `analysis`; `subject` (the analyzed path or plan name) titles the
/// text report and the DOT graph.
pub fn render(analysis: &Analysis, format: Format, subject: &str) -> String {
    match format {
        Format::Text => text(analysis, subject),
        Format::Json => json(analysis),
        Format::Dot => dot(analysis, subject),
    }
}

#[derive(Serialize)]
struct JsonEdge<'a> {
    from: &'a str,
    to: &'a str,
    kind: EdgeKind,
}

/// The JSON object of DESIGN.md, field for field.
#[derive(Serialize)]
struct JsonReport<'a> {
    files: Vec<&'a str>,
    edges: Vec<JsonEdge<'a>>,
    external: BTreeMap<&'a str, &'a [String]>,
    cycles: Vec<Vec<&'a str>>,
    batches: Vec<Vec<&'a str>>,
    critical_path: &'a CriticalPath,
    priorities: BTreeMap<&'a str, u64>,
    stats: &'a Stats,
}

/// The JSON value of DESIGN.md: `files`, `edges` (`from`, `to`, `kind`),
/// `external` (file → modules, files with none left out), `cycles`,
/// `batches`, `critical_path` (`length`, `files`), `priorities` (file →
/// priority) and `stats`.
pub fn json_value(a: &Analysis) -> serde_json::Value {
    serde_json::to_value(json_report(a)).unwrap_or(serde_json::Value::Null)
}

fn json_report(a: &Analysis) -> JsonReport<'_> {
    JsonReport {
        files: a.files().iter().map(|f| f.path.as_str()).collect(),
        edges: a
            .edges()
            .iter()
            .map(|e| JsonEdge {
                from: a.path(e.from),
                to: a.path(e.to),
                kind: e.kind,
            })
            .collect(),
        external: a
            .files()
            .iter()
            .enumerate()
            .filter(|(i, _)| !a.external[*i].is_empty())
            .map(|(i, f)| (f.path.as_str(), a.external[i].as_slice()))
            .collect(),
        cycles: a.cycles(),
        batches: a.batches(),
        critical_path: a.critical_path(),
        priorities: a
            .files()
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.as_str(), a.graph.priority[i]))
            .collect(),
        stats: a.stats(),
    }
}

/// The JSON report pretty-printed, keys in DESIGN.md's order, with a final newline.
pub fn json(a: &Analysis) -> String {
    let mut out = serde_json::to_string_pretty(&json_report(a)).unwrap_or_default();
    out.push('\n');
    out
}

/// Up to `limit` items joined with ", ", then "… (+N more)".
fn list<'a>(items: impl IntoIterator<Item = &'a str>, limit: usize) -> String {
    let items: Vec<&str> = items.into_iter().collect();
    let mut out = items
        .iter()
        .take(limit)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > limit {
        let _ = write!(out, ", … (+{} more)", items.len() - limit);
    }
    out
}

/// The text report: summary, cycles, critical path, batches, then what was
/// dropped or could not be resolved.
pub fn text(a: &Analysis, subject: &str) -> String {
    let s = a.stats();
    let mut out = String::new();
    let mut languages = Vec::new();
    for (n, name) in [
        (s.python_files, "Python"),
        (s.typescript_files, "TypeScript"),
        (s.javascript_files, "JavaScript"),
    ] {
        if n > 0 {
            languages.push(format!("{n} {name}"));
        }
    }
    let other = s.files - s.python_files - s.typescript_files - s.javascript_files;
    if other > 0 {
        languages.push(format!("{other} other"));
    }
    let _ = writeln!(
        out,
        "{subject}: {} files ({})",
        s.files,
        if languages.is_empty() {
            "none".into()
        } else {
            languages.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  edges      {} ({} import, {} type, {} dynamic, {} explicit)",
        s.edges, s.import_edges, s.type_edges, s.dynamic_edges, s.explicit_edges
    );
    let _ = writeln!(
        out,
        "  imports    {} external, {} unresolved",
        s.external_imports, s.unresolved_imports
    );
    let fan = |n: usize, file: &Option<String>| match file {
        Some(f) => format!("{n} ({f})"),
        None => "0".into(),
    };
    let _ = writeln!(
        out,
        "  shape      depth {}, width {}, max fan-in {}, max fan-out {}",
        s.depth,
        s.width,
        fan(s.max_fan_in, &s.max_fan_in_file),
        fan(s.max_fan_out, &s.max_fan_out_file)
    );
    if s.skipped_files > 0 || !a.warnings().is_empty() {
        let _ = writeln!(
            out,
            "  warnings   {} ({} files not scanned)",
            a.warnings().len(),
            s.skipped_files
        );
    }

    let cycles = a.cycles();
    if cycles.is_empty() {
        let _ = writeln!(out, "\nCycles: none");
    } else {
        let _ = writeln!(
            out,
            "\nCycles: {} ({} files, largest {})",
            s.cycles, s.files_in_cycles, s.largest_cycle
        );
        for (k, cycle) in cycles.iter().enumerate().take(20) {
            let _ = writeln!(
                out,
                "  {:>2}. [{} files] {}",
                k + 1,
                cycle.len(),
                list(cycle.iter().copied(), 6)
            );
        }
        if cycles.len() > 20 {
            let _ = writeln!(out, "      … (+{} more cycles)", cycles.len() - 20);
        }
    }

    let cp = a.critical_path();
    let _ = writeln!(
        out,
        "\nCritical path: length {}, {} files (first to build first; estimates in parentheses)",
        cp.length,
        cp.files.len()
    );
    let cycle_of: HashMap<usize, usize> = a
        .graph
        .cycles
        .iter()
        .enumerate()
        .flat_map(|(k, c)| c.iter().map(move |&f| (f, k + 1)))
        .collect();
    for (k, file) in cp.files.iter().enumerate().take(40) {
        let i = a.index_of(file);
        let estimate = i.map_or(0, |i| a.files()[i].estimate);
        let arrow = if k == 0 { " " } else { "→" };
        let cycle = match i.and_then(|i| cycle_of.get(&i)) {
            Some(c) => format!(" [cycle {c}]"),
            None => String::new(),
        };
        let _ = writeln!(out, "  {arrow} {file} ({estimate}){cycle}");
    }
    if cp.files.len() > 40 {
        let _ = writeln!(out, "    … (+{} more)", cp.files.len() - 40);
    }

    let batches = a.batches();
    let _ = writeln!(
        out,
        "\nBatches: {} (files in a batch can be built in parallel)",
        batches.len()
    );
    for (k, batch) in batches.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {:>3}  {:>5} files  {}",
            k,
            batch.len(),
            list(batch.iter().copied(), 5)
        );
    }

    if !a.dropped_edges().is_empty() {
        let _ = writeln!(
            out,
            "\nEdges dropped to break cycles: {}",
            a.dropped_edges().len()
        );
        for e in a.dropped_edges() {
            let _ = writeln!(out, "  {} → {} ({})", a.path(e.from), a.path(e.to), e.kind);
        }
    }
    if s.unresolved_imports > 0 {
        let _ = writeln!(out, "\nUnresolved imports: {}", s.unresolved_imports);
        let mut shown = 0;
        for (i, f) in a.files().iter().enumerate() {
            if a.unresolved[i].is_empty() || shown >= 20 {
                continue;
            }
            shown += 1;
            let _ = writeln!(
                out,
                "  {}: {}",
                f.path,
                list(a.unresolved[i].iter().map(String::as_str), 5)
            );
        }
    }
    out
}

/// A DOT string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Graphviz digraph: an arrow from each file to what it imports (solid:
/// import, dashed: type, dotted: dynamic, bold blue: explicit), cycles
/// boxed in red clusters, the critical path filled orange with its links
/// drawn thick.
pub fn dot(a: &Analysis, subject: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph devfleet {{");
    let _ = writeln!(
        out,
        "  graph [rankdir=LR, fontname=\"Helvetica\", labelloc=t, label={}];",
        quote(&format!(
            "{subject}: {} files, {} edges, critical path {}",
            a.stats().files,
            a.stats().edges,
            a.critical_path().length
        ))
    );
    let _ = writeln!(
        out,
        "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#eef3fb\", fontname=\"Helvetica\", fontsize=10];"
    );
    let _ = writeln!(out, "  edge [color=\"#7a7a7a\", arrowsize=0.6];");
    // Step of the critical path each of its files belongs to: the files of
    // a cycle on the path share one step.
    let mut cycle_of = vec![usize::MAX; a.files().len()];
    for (k, cycle) in a.graph.cycles.iter().enumerate() {
        for &f in cycle {
            cycle_of[f] = k;
        }
    }
    let mut critical: HashMap<&str, usize> = HashMap::new();
    let mut step = 0;
    let mut previous: Option<usize> = None;
    for file in &a.critical_path().files {
        let Some(i) = a.index_of(file) else { continue };
        if let Some(p) = previous {
            if cycle_of[i] == usize::MAX || cycle_of[i] != cycle_of[p] {
                step += 1;
            }
        }
        previous = Some(i);
        critical.insert(file.as_str(), step);
    }
    let node = |out: &mut String, i: usize, indent: &str| {
        let f = &a.files()[i];
        let fill = if critical.contains_key(f.path.as_str()) {
            ", fillcolor=\"#ffd98e\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{indent}{} [tooltip={}{fill}];",
            quote(&f.path),
            quote(&format!(
                "batch {}, priority {}, estimate {}",
                a.graph.batch_of[i], a.graph.priority[i], f.estimate
            ))
        );
    };
    let mut in_cycle = vec![false; a.files().len()];
    for (k, cycle) in a.graph.cycles.iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_cycle_{k} {{");
        let _ = writeln!(
            out,
            "    label={}; color=\"#d9534f\"; style=dashed; fontcolor=\"#d9534f\";",
            quote(&format!("cycle {} ({} files)", k + 1, cycle.len()))
        );
        for &i in cycle {
            in_cycle[i] = true;
            node(&mut out, i, "    ");
        }
        let _ = writeln!(out, "  }}");
    }
    for (i, _) in in_cycle.iter().enumerate().filter(|(_, &c)| !c) {
        node(&mut out, i, "  ");
    }
    for e in a.edges() {
        let (from, to) = (a.path(e.from), a.path(e.to));
        let mut attrs: Vec<&str> = match e.kind {
            EdgeKind::Import => vec![],
            EdgeKind::Type => vec!["style=dashed"],
            EdgeKind::Dynamic => vec!["style=dotted"],
            EdgeKind::Explicit => vec!["style=bold", "color=\"#1f6fb2\""],
        };
        if let (Some(&f), Some(&t)) = (critical.get(from), critical.get(to)) {
            // Only the links of the path: from one step to the step before.
            if f == t + 1 {
                attrs.push("color=\"#e08a00\"");
                attrs.push("penwidth=2");
            }
        }
        if attrs.is_empty() {
            let _ = writeln!(out, "  {} -> {};", quote(from), quote(to));
        } else {
            let _ = writeln!(
                out,
                "  {} -> {} [{}];",
                quote(from),
                quote(to),
                attrs.join(", ")
            );
        }
    }
    let _ = writeln!(out, "}}");
    out
}
