#!/usr/bin/env bash
# Analyzer benchmark: whole-process wall time of the analyzer against grimp
# on Django's source, and against madge on a large TypeScript tree (the
# `effect` package's src/), with a check that the edges are the same.
#
# usage: scripts/bench-analyzer.sh [WORKDIR]
#   WORKDIR keeps the downloaded packages and tools between runs (default: a
#   temporary directory removed at exit). Needs python3 (venv), node/npm and
#   hyperfine (`apt-get install -y hyperfine`); packages come from PyPI and
#   npm through pip and npm. ANALYZER=path skips the release build and
#   benchmarks that binary instead.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

DJANGO_VERSION=${DJANGO_VERSION:-5.2.19}
EFFECT_VERSION=${EFFECT_VERSION:-4.1.0}
GRIMP_VERSION=${GRIMP_VERSION:-3.20}
MADGE_VERSION=${MADGE_VERSION:-8.0.0}
TYPESCRIPT_VERSION=${TYPESCRIPT_VERSION:-5.9.3}
RUNS=${RUNS:-20}

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ -n "${1:-}" ]]; then
    work=$(mkdir -p "$1" && cd "$1" && pwd)
else
    work=$(mktemp -d /tmp/devfleet-bench-analyzer.XXXXXX)
    trap 'rm -rf "$work"' EXIT
fi
trap 'exit 130' INT TERM
for tool in hyperfine python3 node npm; do
    command -v "$tool" >/dev/null || { echo "bench-analyzer: $tool is required" >&2; exit 2; }
done

analyzer=${ANALYZER:-}
if [[ -z "$analyzer" ]]; then
    cargo build --release -p devfleet-analysis --example analyze
    analyzer="$repo/target/release/examples/analyze"
fi
analyzer=$(cd "$(dirname "$analyzer")" && pwd)/$(basename "$analyzer")

cd "$work"
if [[ ! -x venv/bin/python ]]; then
    python3 -m venv venv
fi
venv/bin/pip install -q "grimp==$GRIMP_VERSION"
if [[ ! -d django/django ]]; then
    venv/bin/pip download -q --no-deps --dest dl "django==$DJANGO_VERSION"
    mkdir -p django && (cd django && python3 -m zipfile -e ../dl/django-"$DJANGO_VERSION"-py3-none-any.whl .)
fi
if [[ ! -d node_modules/madge ]]; then
    npm init -y >/dev/null
    npm install --silent "madge@$MADGE_VERSION" "typescript@$TYPESCRIPT_VERSION"
fi
if [[ ! -d effect/package/src ]]; then
    mkdir -p effect && (cd effect && npm pack --silent "effect@$EFFECT_VERSION" >/dev/null && tar xzf effect-"$EFFECT_VERSION".tgz)
fi
export NODE_PATH="$work/node_modules"

cat > grimp-run.py <<'EOF'
# grimp, whole process: build the graph without a cache, print its edges.
import json, sys
import grimp
sys.path.insert(0, sys.argv[1])
graph = grimp.build_graph(sys.argv[2], cache_dir=None)
json.dump({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}, sys.stdout)
EOF
cat > madge-run.js <<'EOF'
// madge, whole process: build the graph, print it as JSON.
const madge = require('madge');
const dir = process.argv[2];
madge(dir, {
  baseDir: dir,
  fileExtensions: ['ts', 'tsx', 'js', 'jsx', 'mjs', 'cjs', 'mts', 'cts'],
  detectiveOptions: { ts: { mixedImports: true }, tsx: { mixedImports: true }, es6: { mixedImports: true } },
}).then((res) => process.stdout.write(JSON.stringify(res.obj())));
EOF

echo "== same edges?"
venv/bin/python "$repo/scripts/compare-analyzer.py" python django django --analyzer "$analyzer" | grep -v '^  [+-]'
"$repo/scripts/compare-analyzer.py" js effect/package/src --analyzer "$analyzer" | grep -v '^  [+-]'

echo "== Django $DJANGO_VERSION: analyzer vs grimp $GRIMP_VERSION"
hyperfine -N -w 3 -r "$RUNS" --export-markdown django.md \
    "$analyzer django --format json --quiet" \
    "venv/bin/python grimp-run.py django django"
echo "== effect $EFFECT_VERSION src/: analyzer vs madge $MADGE_VERSION"
hyperfine -N -w 1 -r "$(( RUNS < 5 ? RUNS : 5 ))" --export-markdown effect.md \
    "$analyzer effect/package/src --format json --quiet" \
    "node madge-run.js effect/package/src"
cat django.md effect.md
