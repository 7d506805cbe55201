//! The dependency graph: cycles, batches, critical path, priorities.
//!
//! Nodes are file indices `0..n`; an edge `(a, b)` means "a imports b", so b
//! must be built first. Cycles are the strongly connected components with
//! more than one file (petgraph's Kosaraju). For everything that needs a DAG,
//! each component is collapsed into one *unit* whose estimate is the sum of
//! its files'; every file of a unit shares the unit's batch and priority.
//!
//! - **batch** of a unit: 0 with no dependencies, else 1 + the largest
//!   batch among its dependencies (topological layers);
//! - **priority** of a unit: its estimate plus the largest priority among
//!   the units that import it — the longest remaining path to a sink,
//!   including itself, weighted by estimate;
//! - **critical path**: starts at the unit of highest priority and follows,
//!   at each step, the importer of highest priority; its length is the
//!   starting priority. Ties go to the unit holding the smallest path.

use crate::EdgeKind;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{HashSet, VecDeque};

/// Graph facts about every file of an analysis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphInfo {
    /// Components with more than one file, each sorted, ordered by first file.
    pub cycles: Vec<Vec<usize>>,
    /// Files per topological layer, each sorted.
    pub batches: Vec<Vec<usize>>,
    /// Layer of every file.
    pub batch_of: Vec<u32>,
    /// Priority of every file.
    pub priority: Vec<u64>,
    /// Length (sum of estimates) and files, first to build first.
    pub critical_path: (u64, Vec<usize>),
    /// Largest number of importers of one file, and that file.
    pub max_fan_in: (usize, Option<usize>),
    /// Largest number of imports of one file, and that file.
    pub max_fan_out: (usize, Option<usize>),
}

/// Strongly connected components with more than one node, each sorted,
/// ordered by their smallest node.
pub fn cycles(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = components(n, edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .collect();
    out.sort();
    out
}

fn components(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut g: DiGraph<(), ()> = DiGraph::with_capacity(n, edges.len());
    for _ in 0..n {
        g.add_node(());
    }
    for &(a, b) in edges {
        if a < n && b < n {
            g.add_edge(NodeIndex::new(a), NodeIndex::new(b), ());
        }
    }
    // Kosaraju rather than Tarjan: petgraph's Tarjan recurses once per node
    // on a path and overflows the stack on a long import chain; Kosaraju runs
    // on petgraph's iterative DFS.
    petgraph::algo::kosaraju_scc(&g)
        .into_iter()
        .map(|scc| {
            let mut files: Vec<usize> = scc.into_iter().map(NodeIndex::index).collect();
            files.sort_unstable();
            files
        })
        .collect()
}

/// Computes cycles, batches, priorities and the critical path.
///
/// `edges` must be deduplicated and free of self-loops; `estimates[i]` is
/// file i's cost.
pub fn analyze(n: usize, edges: &[(usize, usize)], estimates: &[u32]) -> GraphInfo {
    let mut units = components(n, edges);
    // Deterministic unit numbering: by smallest file.
    units.sort_unstable_by_key(|u| u.first().copied().unwrap_or(usize::MAX));
    let mut unit_of = vec![0usize; n];
    for (k, unit) in units.iter().enumerate() {
        for &f in unit {
            unit_of[f] = k;
        }
    }
    let weight: Vec<u64> = units
        .iter()
        .map(|u| {
            u.iter()
                .map(|&f| u64::from(estimates.get(f).copied().unwrap_or(1)))
                .sum()
        })
        .collect();

    let m = units.len();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); m];
    let mut importers: Vec<Vec<usize>> = vec![Vec::new(); m];
    let mut seen = HashSet::new();
    for &(a, b) in edges {
        let (ua, ub) = (unit_of[a], unit_of[b]);
        if ua != ub && seen.insert((ua, ub)) {
            deps[ua].push(ub);
            importers[ub].push(ua);
        }
    }

    // Kahn's algorithm: dependencies before their importers.
    let mut missing: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut queue: VecDeque<usize> = (0..m).filter(|&k| missing[k] == 0).collect();
    let mut order = Vec::with_capacity(m);
    while let Some(k) = queue.pop_front() {
        order.push(k);
        for &i in &importers[k] {
            missing[i] -= 1;
            if missing[i] == 0 {
                queue.push_back(i);
            }
        }
    }

    let mut batch = vec![0u32; m];
    for &k in &order {
        batch[k] = deps[k].iter().map(|&d| batch[d] + 1).max().unwrap_or(0);
    }
    let mut priority = vec![0u64; m];
    for &k in order.iter().rev() {
        let after = importers[k].iter().map(|&i| priority[i]).max().unwrap_or(0);
        priority[k] = weight[k].saturating_add(after);
    }

    // Higher priority first; ties to the unit with the smallest file.
    let better = |a: usize, b: usize| {
        priority[a] > priority[b] || (priority[a] == priority[b] && units[a][0] < units[b][0])
    };
    let mut critical = Vec::new();
    let mut length = 0;
    if let Some(mut current) = (0..m).reduce(|a, b| if better(b, a) { b } else { a }) {
        length = priority[current];
        loop {
            critical.extend_from_slice(&units[current]);
            match importers[current]
                .iter()
                .copied()
                .reduce(|a, b| if better(b, a) { b } else { a })
            {
                Some(next) => current = next,
                None => break,
            }
        }
    }

    let depth = batch.iter().max().map_or(0, |&b| b as usize + 1);
    let mut batches: Vec<Vec<usize>> = vec![Vec::new(); if n == 0 { 0 } else { depth }];
    let mut batch_of = vec![0u32; n];
    let mut file_priority = vec![0u64; n];
    for f in 0..n {
        let k = unit_of[f];
        batch_of[f] = batch[k];
        file_priority[f] = priority[k];
        batches[batch[k] as usize].push(f);
    }

    let mut fan_in = vec![0usize; n];
    let mut fan_out = vec![0usize; n];
    for &(a, b) in edges {
        fan_out[a] += 1;
        fan_in[b] += 1;
    }
    let max_of = |v: &[usize]| {
        v.iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .fold(
                (0, None),
                |best, (i, &c)| if c > best.0 { (c, Some(i)) } else { best },
            )
    };

    GraphInfo {
        cycles: units.iter().filter(|u| u.len() > 1).cloned().collect(),
        batches,
        batch_of,
        priority: file_priority,
        critical_path: (length, critical),
        max_fan_in: max_of(&fan_in),
        max_fan_out: max_of(&fan_out),
    }
}

/// Makes a plan's graph acyclic by dropping parsed edges.
///
/// While a cycle remains: in each strongly connected component, take the
/// shortest cycle through its smallest file and drop that cycle's weakest
/// non-explicit edge (type before dynamic before import; ties to the
/// smallest `(from, to)`). Explicit `depends_on` edges are never dropped: a
/// cycle made only of them is returned as `Err`, its files in order with the
/// first repeated at the end. Returns the dropped edges, sorted.
pub fn break_cycles(
    n: usize,
    edges: &mut Vec<(usize, usize, EdgeKind)>,
) -> Result<Vec<(usize, usize, EdgeKind)>, Vec<usize>> {
    let mut dropped = Vec::new();
    loop {
        let plain: Vec<(usize, usize)> = edges.iter().map(|&(a, b, _)| (a, b)).collect();
        let sccs = cycles(n, &plain);
        if sccs.is_empty() {
            dropped.sort();
            return Ok(dropped);
        }
        let mut successors: Vec<Vec<(usize, EdgeKind)>> = vec![Vec::new(); n];
        for &(a, b, kind) in edges.iter() {
            successors[a].push((b, kind));
        }
        for s in successors.iter_mut() {
            s.sort_unstable();
        }
        let mut remove = HashSet::new();
        for scc in &sccs {
            let cycle = shortest_cycle(scc, &successors);
            let weakest = cycle
                .iter()
                .filter(|e| e.2 != EdgeKind::Explicit)
                .min_by_key(|e| (e.2.strength(), e.0, e.1));
            match weakest {
                Some(&edge) => {
                    remove.insert((edge.0, edge.1));
                    dropped.push(edge);
                }
                None => {
                    let mut files: Vec<usize> = cycle.iter().map(|e| e.0).collect();
                    files.push(cycle.first().map_or(scc[0], |e| e.0));
                    return Err(files);
                }
            }
        }
        edges.retain(|e| !remove.contains(&(e.0, e.1)));
    }
}

/// The shortest cycle through `scc[0]` inside the component (breadth-first).
fn shortest_cycle(
    scc: &[usize],
    successors: &[Vec<(usize, EdgeKind)>],
) -> Vec<(usize, usize, EdgeKind)> {
    let start = scc[0];
    let inside: HashSet<usize> = scc.iter().copied().collect();
    let mut came_from: std::collections::HashMap<usize, (usize, EdgeKind)> =
        std::collections::HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(u) = queue.pop_front() {
        for &(v, kind) in &successors[u] {
            if !inside.contains(&v) {
                continue;
            }
            if v == start {
                let mut cycle = vec![(u, v, kind)];
                let mut at = u;
                while at != start {
                    let Some(&(prev, k)) = came_from.get(&at) else {
                        break;
                    };
                    cycle.push((prev, at, k));
                    at = prev;
                }
                cycle.reverse();
                return cycle;
            }
            if v != start && !came_from.contains_key(&v) {
                came_from.insert(v, (u, kind));
                queue.push_back(v);
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_gives_layers_priorities_and_critical_path() {
        // 0 imports 1 imports 2; 3 imports 2.
        let info = analyze(4, &[(0, 1), (1, 2), (3, 2)], &[1, 2, 3, 10]);
        assert_eq!(info.batches, vec![vec![2], vec![1, 3], vec![0]]);
        assert_eq!(info.batch_of, vec![2, 1, 0, 1]);
        // priority(2) = 3 + max(p1 = 2 + 1, p3 = 10) = 13
        assert_eq!(info.priority, vec![1, 3, 13, 10]);
        assert_eq!(info.critical_path, (13, vec![2, 3]));
        assert_eq!(info.max_fan_in, (2, Some(2)));
        assert!(info.cycles.is_empty());
    }

    #[test]
    fn cycles_collapse_into_one_unit() {
        // 0 -> 1 -> 2 -> 1 (cycle {1,2}); 2 -> 3.
        let info = analyze(4, &[(0, 1), (1, 2), (2, 1), (2, 3)], &[1, 1, 1, 1]);
        assert_eq!(info.cycles, vec![vec![1, 2]]);
        assert_eq!(info.batch_of, vec![2, 1, 1, 0]);
        assert_eq!(info.priority, vec![1, 3, 3, 4]);
        assert_eq!(info.critical_path, (4, vec![3, 1, 2, 0]));
    }

    #[test]
    fn empty_and_isolated_graphs() {
        let info = analyze(0, &[], &[]);
        assert!(info.batches.is_empty());
        assert_eq!(info.critical_path, (0, vec![]));
        let info = analyze(3, &[], &[2, 5, 5]);
        assert_eq!(info.batches, vec![vec![0, 1, 2]]);
        // Tie on priority 5: the smaller file wins.
        assert_eq!(info.critical_path, (5, vec![1]));
    }

    #[test]
    fn break_cycles_drops_the_weakest_parsed_edge() {
        let mut edges = vec![
            (0, 1, EdgeKind::Import),
            (1, 2, EdgeKind::Type),
            (2, 0, EdgeKind::Import),
            (2, 3, EdgeKind::Import),
        ];
        let dropped = break_cycles(4, &mut edges).unwrap();
        assert_eq!(dropped, vec![(1, 2, EdgeKind::Type)]);
        assert_eq!(edges.len(), 3);
        assert!(cycles(4, &edges.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>()).is_empty());
    }

    #[test]
    fn break_cycles_keeps_explicit_edges() {
        let mut edges = vec![(0, 1, EdgeKind::Explicit), (1, 0, EdgeKind::Import)];
        assert_eq!(
            break_cycles(2, &mut edges).unwrap(),
            vec![(1, 0, EdgeKind::Import)]
        );
        let mut edges = vec![
            (0, 1, EdgeKind::Explicit),
            (1, 2, EdgeKind::Explicit),
            (2, 0, EdgeKind::Explicit),
        ];
        assert_eq!(break_cycles(3, &mut edges), Err(vec![0, 1, 2, 0]));
    }

    #[test]
    fn long_chain_does_not_overflow_the_stack() {
        let n = 200_000;
        let edges: Vec<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
        let info = analyze(n, &edges, &vec![1; n]);
        assert_eq!(info.batches.len(), n);
        assert_eq!(info.critical_path.0, n as u64);
    }
}
