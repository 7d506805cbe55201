#!/usr/bin/env python3
"""Compare the analyzer's edges with a reference tool's on a real tree.

usage:
  compare-analyzer.py python DIR PACKAGE [--analyzer BIN]
      DIR holds the top-level package PACKAGE (e.g. an unzipped wheel);
      the reference is grimp (`pip install grimp`).
  compare-analyzer.py js DIR [--tsconfig FILE] [--analyzer BIN]
      every .ts/.tsx/.js/.jsx/.mjs/.cjs file under DIR; the reference is
      madge (`npm i madge typescript`; set NODE_PATH to its node_modules).

BIN is the analyzer (default: target/release/examples/analyze, built with
`cargo build --release -p devfleet-analysis --example analyze`). Prints the
agreement and every edge only one side has, grouped by the analyzer's edge
kind, so each difference can be explained in docs/ANALYZER.md. Exits 0.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BIN = os.path.join(HERE, "..", "target", "release", "examples", "analyze")


def ours(binary, root):
    """(edges {(from, to): kind}, files set) from the analyzer's JSON."""
    out = subprocess.run(
        [binary, root, "--format", "json", "--quiet"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out)
    edges = {(e["from"], e["to"]): e["kind"] for e in data["edges"]}
    return edges, set(data["files"])


def grimp_edges(root, package):
    """grimp's module graph mapped onto files: (edges, files, unmapped)."""
    import grimp  # noqa: PLC0415 - only needed for this mode

    sys.path.insert(0, root)
    graph = grimp.build_graph(package, cache_dir=None)

    def to_file(module):
        rel = module.replace(".", "/")
        for candidate in (rel + ".py", rel + "/__init__.py"):
            if os.path.isfile(os.path.join(root, candidate)):
                return candidate
        return None  # a namespace package: no file

    files = {}
    for module in graph.modules:
        files[module] = to_file(module)
    edges, unmapped = set(), []
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = files.get(module), files.get(imported)
            if a is None or b is None:
                unmapped.append((module, imported))
            else:
                edges.add((a, b))
    return edges, {f for f in files.values() if f}, unmapped


MADGE_SCRIPT = r"""
const madge = require('madge');
const [dir, tsConfig] = process.argv.slice(2);
const options = {
  baseDir: dir,
  fileExtensions: ['ts', 'tsx', 'js', 'jsx', 'mjs', 'cjs', 'mts', 'cts'],
  detectiveOptions: {
    ts: { mixedImports: true, skipTypeImports: false },
    tsx: { mixedImports: true, skipTypeImports: false },
    es6: { mixedImports: true, skipTypeImports: false },
  },
};
if (tsConfig) options.tsConfig = tsConfig;
madge(dir, options).then((res) => {
  process.stdout.write(JSON.stringify({ obj: res.obj(), skipped: res.skipped || [] }));
}).catch((err) => { console.error(err); process.exit(1); });
"""


def madge_edges(root, tsconfig):
    with tempfile.NamedTemporaryFile("w", suffix=".js", delete=False) as f:
        f.write(MADGE_SCRIPT)
        script = f.name
    try:
        args = ["node", script, root] + ([tsconfig] if tsconfig else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(script)
    data = json.loads(out)
    edges = set()
    for a, deps in data["obj"].items():
        for b in deps:
            edges.add((a, b))
    return edges, set(data["obj"].keys())


def report(name, mine, theirs, common_files, extra_note=""):
    """Prints agreement on the files both tools saw."""
    mine_in = {e: k for e, k in mine.items() if e[0] in common_files and e[1] in common_files}
    theirs_in = {e for e in theirs if e[0] in common_files and e[1] in common_files}
    both = set(mine_in) & theirs_in
    only_mine = sorted(set(mine_in) - theirs_in)
    only_theirs = sorted(theirs_in - set(mine_in))
    union = len(set(mine_in) | theirs_in)
    print(f"files seen by both: {len(common_files)}")
    print(f"edges: analyzer {len(mine_in)}, {name} {len(theirs_in)}, identical {len(both)}")
    if union:
        print(f"agreement (identical / union): {len(both) / union:.2%}")
    by_kind = Counter(mine_in[e] for e in only_mine)
    print(f"only analyzer: {len(only_mine)} {dict(by_kind)}")
    for e in only_mine:
        print(f"  + {e[0]} -> {e[1]} [{mine_in[e]}]")
    print(f"only {name}: {len(only_theirs)}")
    for e in only_theirs:
        print(f"  - {e[0]} -> {e[1]}")
    if only_mine and not only_theirs and all(mine_in[e] == "dynamic" for e in only_mine):
        print(f"identical apart from the analyzer's dynamic edges, which {name} does not detect")
    if extra_note:
        print(extra_note)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["python", "js"])
    parser.add_argument("dir")
    parser.add_argument("package", nargs="?")
    parser.add_argument("--tsconfig")
    parser.add_argument("--analyzer", default=DEFAULT_BIN)
    args = parser.parse_args()
    root = os.path.abspath(args.dir)
    mine, my_files = ours(args.analyzer, root)

    if args.mode == "python":
        if not args.package:
            parser.error("python mode needs PACKAGE")
        theirs, their_files, unmapped = grimp_edges(root, args.package)
        common = my_files & their_files
        print(f"analyzer files outside grimp's view: {len([f for f in my_files if f.endswith('.py') and f not in their_files and f.startswith(args.package + '/')])}")
        note = ""
        if unmapped:
            targets = Counter(b for _, b in unmapped)
            note = f"grimp edges to/from namespace packages (no file, not comparable): {len(unmapped)} {dict(targets)}"
        report("grimp", mine, theirs, common, note)
    else:
        theirs, their_files = madge_edges(root, args.tsconfig)
        common = my_files & their_files
        only = defaultdict(list)
        for f in my_files - their_files:
            only["analyzer"].append(f)
        for f in their_files - my_files:
            only["madge"].append(f)
        for side, files in only.items():
            print(f"files only {side} saw: {len(files)} {sorted(files)[:10]}")
        report("madge", mine, theirs, common)


if __name__ == "__main__":
    main()
