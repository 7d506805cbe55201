//! The analyzer end to end: fixture trees written to temporary directories,
//! analyzed through the public API, and plans. One file on purpose: every
//! `tests/*.rs` is its own linked binary.

use devfleet_analysis::{analyze_dir, analyze_plan, report, Analysis, EdgeKind, Format, Options};
use devfleet_protocol::{Plan, PlanError};
use proptest::prelude::*;
use std::path::Path;

/// Writes `files` (path, content) under a new temporary directory.
fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (path, content) in files {
        write(dir.path(), path, content.as_bytes());
    }
    dir
}

fn write(root: &Path, path: &str, content: &[u8]) {
    let full = root.join(path);
    std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
    std::fs::write(full, content).expect("write");
}

fn analyze(dir: &tempfile::TempDir) -> Analysis {
    analyze_dir(dir.path(), &Options::default()).expect("analysis")
}

/// The edges as `(from, to, kind)`.
fn edges(a: &Analysis) -> Vec<(String, String, EdgeKind)> {
    a.edges()
        .iter()
        .map(|e| (a.path(e.from).to_string(), a.path(e.to).to_string(), e.kind))
        .collect()
}

fn edge(a: &Analysis, from: &str, to: &str) -> Option<EdgeKind> {
    edges(a)
        .into_iter()
        .find(|(f, t, _)| f == from && t == to)
        .map(|(_, _, k)| k)
}

#[test]
fn python_imports_follow_python_resolution() {
    let dir = tree(&[
        ("pkg/__init__.py", "from .core import run\n"),
        ("pkg/core.py", "import os\nfrom pkg import util\nfrom pkg.models import Model\n"),
        ("pkg/util.py", "def helper():\n    from . import models  # function-level import\n"),
        ("pkg/models.py", "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.core import run\nclass Model: ...\n"),
        ("pkg/compat.py", "try:\n    import ujson as json\nexcept ImportError:\n    from pkg import fallback_json as json\n"),
        ("pkg/fallback_json.py", ""),
        ("pkg/plugins.py", "import importlib\nmod = importlib.import_module('pkg.extra')\nname = importlib.import_module(variable)\n"),
        ("pkg/extra.py", ""),
        ("pkg/sub/__init__.py", ""),
        ("pkg/sub/deep.py", "from ..core import run\nfrom ... import outside\n"),
    ]);
    let a = analyze(&dir);
    assert_eq!(
        edge(&a, "pkg/__init__.py", "pkg/core.py"),
        Some(EdgeKind::Import)
    );
    assert_eq!(
        edge(&a, "pkg/core.py", "pkg/util.py"),
        Some(EdgeKind::Import),
        "submodule named by from-import"
    );
    assert_eq!(
        edge(&a, "pkg/core.py", "pkg/models.py"),
        Some(EdgeKind::Import)
    );
    assert_eq!(
        edge(&a, "pkg/util.py", "pkg/models.py"),
        Some(EdgeKind::Import),
        "imports inside functions count"
    );
    assert_eq!(
        edge(&a, "pkg/models.py", "pkg/core.py"),
        Some(EdgeKind::Type),
        "TYPE_CHECKING imports are type edges"
    );
    assert_eq!(
        edge(&a, "pkg/compat.py", "pkg/fallback_json.py"),
        Some(EdgeKind::Import),
        "ImportError fallbacks count"
    );
    assert_eq!(
        edge(&a, "pkg/plugins.py", "pkg/extra.py"),
        Some(EdgeKind::Dynamic)
    );
    assert_eq!(
        edge(&a, "pkg/sub/deep.py", "pkg/core.py"),
        Some(EdgeKind::Import),
        "relative import two levels up"
    );
    assert_eq!(a.external("pkg/core.py"), ["os"]);
    assert_eq!(a.external("pkg/compat.py"), ["ujson"]);
    assert_eq!(
        a.external("pkg/sub/deep.py"),
        ["...outside"],
        "a relative import above the top package leaves the tree"
    );
    assert!(
        a.external("pkg/models.py")
            .iter()
            .all(|m| m != "__future__"),
        "__future__ is ignored"
    );
    assert_eq!(a.external("pkg/models.py"), ["typing"]);
    // A cycle: core -> util -> models -(type)-> core.
    assert_eq!(
        a.cycles(),
        vec![vec!["pkg/core.py", "pkg/models.py", "pkg/util.py"]]
    );
}

#[test]
fn namespace_packages_src_layout_and_scripts() {
    let dir = tree(&[
        ("src/app/__init__.py", ""),
        ("src/app/core.py", "from app import settings\n"),
        ("src/app/settings.py", ""),
        (
            "tests/test_core.py",
            "from app.core import x\nimport helpers\nimport nsp.tools.knife\n",
        ),
        ("tests/helpers.py", ""),
        ("nsp/tools/knife.py", "from nsp.tools import fork\n"),
        ("nsp/tools/fork.py", ""),
        ("email/send.py", "import email.utils\n"),
    ]);
    let a = analyze(&dir);
    assert_eq!(
        edge(&a, "src/app/core.py", "src/app/settings.py"),
        Some(EdgeKind::Import)
    );
    assert_eq!(
        edge(&a, "tests/test_core.py", "src/app/core.py"),
        Some(EdgeKind::Import),
        "src/ is an import root"
    );
    assert_eq!(
        edge(&a, "tests/test_core.py", "tests/helpers.py"),
        Some(EdgeKind::Import),
        "a script sees its siblings"
    );
    assert_eq!(
        edge(&a, "tests/test_core.py", "nsp/tools/knife.py"),
        Some(EdgeKind::Import),
        "namespace packages"
    );
    assert_eq!(
        edge(&a, "nsp/tools/knife.py", "nsp/tools/fork.py"),
        Some(EdgeKind::Import)
    );
    assert_eq!(
        a.external("email/send.py"),
        ["email.utils"],
        "a namespace folder does not hide the stdlib"
    );
}

#[test]
fn strings_comments_docstrings_and_templates_are_never_imports() {
    // Every decoy names a file that exists, so a false positive would be an edge.
    let dir = tree(&[
        ("decoy.py", ""),
        ("decoy.ts", ""),
        (
            "main.py",
            "\"\"\"Docs: import decoy\n\"\"\"\n# import decoy\ns = 'from decoy import x'\nf = f\"{'import decoy'} {x:>{w}}\"\nb = '''\nimport decoy\n'''\n",
        ),
        (
            "main.ts",
            "// import d from './decoy'\n/* require('./decoy') */\nconst s = \"import d from './decoy'\";\nconst t = `import('./decoy') ${`${\"require('./decoy')\"}`}`;\nconst re = /import x from '.\\/decoy'/g;\nexport const n = 1;\n",
        ),
        (
            "view.jsx",
            "export const V = () => <p title=\"import d from './decoy'\">Don't import './decoy' — {`require('./decoy')`}</p>;\n",
        ),
    ]);
    let a = analyze(&dir);
    assert!(a.edges().is_empty(), "unexpected edges: {:?}", edges(&a));
}

#[test]
fn js_and_ts_import_forms_and_resolution() {
    let dir = tree(&[
        (
            "tsconfig.json",
            "{ // comments are allowed\n \"compilerOptions\": { \"baseUrl\": \".\", \"paths\": { \"@lib/*\": [\"src/lib/*\"] }, }, }\n",
        ),
        (
            "src/main.ts",
            "import { a } from './a.js';\nimport type { T } from './types';\nexport * from './reexport';\nexport { b } from './b';\nimport './side-effect';\nconst c = require('./c');\nconst lazy = () => import('./lazy');\nimport { util } from '@lib/util';\nimport React from 'react';\nimport data from './data.json';\n",
        ),
        ("src/a.ts", ""),
        ("src/types.ts", ""),
        ("src/reexport/index.ts", ""),
        ("src/b.tsx", "export const B = () => <div>{'hi'}</div>;\n"),
        ("src/side-effect.js", ""),
        ("src/c.cjs", ""),
        ("src/lazy.mts", ""),
        ("src/lib/util.ts", ""),
        ("src/data.json", "{}"),
        ("web/app.jsx", "import { B } from '../src/b';\nexport default () => <B />;\n"),
    ]);
    let a = analyze(&dir);
    let m = "src/main.ts";
    assert_eq!(
        edge(&a, m, "src/a.ts"),
        Some(EdgeKind::Import),
        "'./a.js' names the .ts source"
    );
    assert_eq!(edge(&a, m, "src/types.ts"), Some(EdgeKind::Type));
    assert_eq!(
        edge(&a, m, "src/reexport/index.ts"),
        Some(EdgeKind::Import),
        "export * from, index.ts"
    );
    assert_eq!(edge(&a, m, "src/b.tsx"), Some(EdgeKind::Import));
    assert_eq!(edge(&a, m, "src/side-effect.js"), Some(EdgeKind::Import));
    assert_eq!(
        edge(&a, m, "src/c.cjs"),
        None,
        "require('./c') never completes to .cjs"
    );
    assert_eq!(
        edge(&a, m, "src/lib/util.ts"),
        Some(EdgeKind::Import),
        "tsconfig paths"
    );
    assert_eq!(
        edge(&a, "web/app.jsx", "src/b.tsx"),
        Some(EdgeKind::Import),
        "JSX file"
    );
    assert_eq!(a.external(m), ["react"]);
    assert_eq!(a.unresolved(m), ["./c", "./lazy"], "nor './lazy' to .mts");
    assert_eq!(a.edges().len(), 7);
}

#[test]
fn cycles_batches_critical_path_and_priorities_on_a_known_graph() {
    // a -> b -> c, d -> c, c <-> e (cycle), f alone. Tiny files: estimate 1 each.
    let dir = tree(&[
        ("a.py", "import b\n"),
        ("b.py", "import c\n"),
        ("c.py", "import e\n"),
        ("d.py", "import c\n"),
        ("e.py", "import c\n"),
        ("f.py", ""),
    ]);
    let a = analyze(&dir);
    assert_eq!(a.cycles(), vec![vec!["c.py", "e.py"]]);
    assert_eq!(
        a.batches(),
        vec![
            vec!["c.py", "e.py", "f.py"],
            vec!["b.py", "d.py"],
            vec!["a.py"]
        ]
    );
    // The cycle unit weighs 2, then b (1), then a (1).
    assert_eq!(a.critical_path().length, 4);
    assert_eq!(a.critical_path().files, ["c.py", "e.py", "b.py", "a.py"]);
    assert_eq!(a.priority("c.py"), Some(4));
    assert_eq!(a.priority("d.py"), Some(1));
    assert_eq!(a.priority("f.py"), Some(1));
    let s = a.stats();
    assert_eq!(
        (s.files, s.edges, s.cycles, s.depth, s.width, s.max_fan_in),
        (6, 5, 1, 3, 3, 3)
    );
}

#[test]
fn json_has_exactly_the_documented_shape() {
    let dir = tree(&[("a.py", "import b\nimport os\n"), ("b.py", "")]);
    let a = analyze(&dir);
    let text = report::render(&a, Format::Json, "x");
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let keys: Vec<&str> = value
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "files",
        "edges",
        "external",
        "cycles",
        "batches",
        "critical_path",
        "priorities",
        "stats",
    ];
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    assert!(
        text.find("\"files\"") < text.find("\"edges\"")
            && text.find("\"priorities\"") < text.find("\"stats\""),
        "DESIGN.md order"
    );
    assert_eq!(value["files"], serde_json::json!(["a.py", "b.py"]));
    assert_eq!(
        value["edges"],
        serde_json::json!([{"from": "a.py", "to": "b.py", "kind": "import"}])
    );
    assert_eq!(value["external"], serde_json::json!({"a.py": ["os"]}));
    assert_eq!(value["cycles"], serde_json::json!([]));
    assert_eq!(value["batches"], serde_json::json!([["b.py"], ["a.py"]]));
    assert_eq!(
        value["critical_path"],
        serde_json::json!({"length": 2, "files": ["b.py", "a.py"]})
    );
    assert_eq!(
        value["priorities"],
        serde_json::json!({"a.py": 1, "b.py": 2})
    );
    assert_eq!(value["stats"]["files"], 2);
    assert_eq!(value["stats"]["edges"], 1);
    // Deterministic: a second run prints the same bytes.
    assert_eq!(report::render(&analyze(&dir), Format::Json, "x"), text);
}

#[test]
fn parallel_walk_gives_the_same_analysis_as_one_thread() {
    let mut files: Vec<(String, String)> = Vec::new();
    for d in 0..12 {
        files.push((format!("pkg/d{d}/__init__.py"), String::new()));
        for m in 0..8 {
            let next = (d + 1) % 12;
            files.push((
                format!("pkg/d{d}/m{m}.py"),
                format!("from pkg.d{next} import m{m}\nimport os\n"),
            ));
        }
        files.push((
            format!("web/d{d}/index.ts"),
            format!("export * from '../d{}';\n", (d + 5) % 12),
        ));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let dir = tree(&refs);
    let render = |threads: usize| {
        let opts = Options {
            threads,
            ..Options::default()
        };
        report::render(
            &analyze_dir(dir.path(), &opts).expect("analysis"),
            Format::Json,
            "x",
        )
    };
    let one = render(1);
    assert!(
        one.contains("\"to\": \"pkg/d1/m3.py\""),
        "the fixture has edges"
    );
    for threads in [2, 4, 16] {
        assert_eq!(render(threads), one, "{threads} threads");
    }
}

#[test]
fn text_and_dot_reports() {
    let dir = tree(&[
        ("a.py", "import b\n"),
        ("b.py", "import a\n"),
        ("c\"q.py", "import a\n"),
    ]);
    let a = analyze(&dir);
    let text = report::render(&a, Format::Text, "fixture");
    for needle in [
        "fixture: 3 files (3 Python)",
        "Cycles: 1",
        "Critical path: length 3",
        "Batches: 2",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let dot = report::render(&a, Format::Dot, "fixture");
    assert!(dot.starts_with("digraph devfleet {") && dot.trim_end().ends_with('}'));
    assert!(dot.contains("cluster_cycle_0") && dot.contains("\"c\\\"q.py\" -> \"a.py\""));
    // Graphviz must accept it, when it is installed.
    if let Ok(mut child) = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(dot.as_bytes())
            .expect("write dot");
        let out = child.wait_with_output().expect("dot runs");
        assert!(
            out.status.success(),
            "dot rejected the graph: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("<svg"));
    }
}

#[test]
fn bad_input_is_skipped_with_warnings_and_never_panics() {
    let dir = tree(&[
        ("good.py", "import binary\nimport latin\nimport huge\n"),
        ("deep.ts", ""),
    ]);
    let root = dir.path();
    write(root, "binary.py", b"import os\0\x01\x02\xff");
    write(root, "latin.js", b"import x from './good';\n// caf\xe9\n");
    write(
        root,
        "coded.py",
        b"# -*- coding: latin-1 -*-\nimport good\ns = 'caf\xe9'\n",
    );
    let mut huge = b"import good\n".to_vec();
    huge.resize(10 * 1024 * 1024 + 1, b'#');
    write(root, "huge.py", &huge);
    write(
        root,
        "deep.ts",
        format!(
            "{}{}import './good';",
            "(".repeat(500_000),
            "[{`${".repeat(100_000)
        )
        .as_bytes(),
    );
    write(
        root,
        "nested.py",
        format!("x = {}\nimport good\n", "[".repeat(1_000_000)).as_bytes(),
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root, root.join("loop")).expect("symlink");
        std::os::unix::fs::symlink(root.join("missing"), root.join("broken.py")).expect("symlink");
    }
    let a = analyze(&dir);
    let warned = |path: &str, what: &str| {
        a.warnings()
            .iter()
            .any(|w| w.path == path && w.message.contains(what))
    };
    assert!(warned("binary.py", "binary"), "{:?}", a.warnings());
    assert!(warned("latin.js", "UTF-8"), "{:?}", a.warnings());
    assert!(warned("huge.py", "limit"), "{:?}", a.warnings());
    #[cfg(unix)]
    {
        assert!(
            warned("loop", "symbolic link to a directory of the tree"),
            "{:?}",
            a.warnings()
        );
        assert!(
            warned("broken.py", "broken symbolic link"),
            "{:?}",
            a.warnings()
        );
    }
    assert_eq!(a.stats().skipped_files, 3);
    // Skipped files stay nodes, so imports of them still resolve.
    assert_eq!(edge(&a, "good.py", "binary.py"), Some(EdgeKind::Import));
    assert_eq!(edge(&a, "good.py", "huge.py"), Some(EdgeKind::Import));
    assert_eq!(
        edge(&a, "coded.py", "good.py"),
        Some(EdgeKind::Import),
        "a declared encoding is scanned"
    );
    assert!(a.files().iter().all(|f| !f.path.starts_with("loop/")));
}

#[cfg(unix)]
#[test]
fn links_to_outside_directories_are_followed_and_loops_end() {
    let outside = tree(&[("lib.py", "import app\n")]);
    let dir = tree(&[("app.py", "import vendor.lib\nimport again.lib\n")]);
    let link = |target: &Path, at: &Path| std::os::unix::fs::symlink(target, at).expect("symlink");
    link(outside.path(), &dir.path().join("vendor"));
    link(outside.path(), &dir.path().join("again"));
    // A loop through the outside directory: back into the tree, and to itself.
    link(dir.path(), &outside.path().join("back"));
    link(outside.path(), &outside.path().join("self"));
    let a = analyze(&dir);
    let paths: Vec<&str> = a.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["again/lib.py", "app.py", "vendor/lib.py"],
        "{:?}",
        a.warnings()
    );
    assert_eq!(edge(&a, "app.py", "vendor/lib.py"), Some(EdgeKind::Import));
    assert_eq!(edge(&a, "vendor/lib.py", "app.py"), Some(EdgeKind::Import));
    let warned = |path: &str, what: &str| {
        a.warnings()
            .iter()
            .any(|w| w.path == path && w.message.contains(what))
    };
    for link in ["again", "vendor"] {
        assert!(
            warned(&format!("{link}/back"), "of the tree"),
            "{:?}",
            a.warnings()
        );
        assert!(
            warned(&format!("{link}/self"), "loop"),
            "{:?}",
            a.warnings()
        );
    }
}

#[test]
fn missing_root_is_an_error_naming_it() {
    let err = analyze_dir(
        Path::new("/nonexistent/devfleet-analyzer"),
        &Options::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/devfleet-analyzer"),
        "{err}"
    );
}

const PLAN: &str = r#"
name: shop
tasks:
  - path: shop/__init__.py
    spec: package
  - path: shop/models.py
    spec: models
    content: |
      from shop.db import Base
      from legacy.money import Money
      import requests
    estimate: 3
  - path: shop/api.py
    spec: api
    content: |
      from shop.models import Order
      from shop.views import render
    depends_on: [shop/auth.py]
  - path: shop/views.py
    spec: views
    content: |
      from typing import TYPE_CHECKING
      if TYPE_CHECKING:
          from shop.api import App
  - path: shop/auth.py
    spec: auth
  - path: shop/db.py
    spec: db
    content: "import sqlite3\n"
"#;

#[test]
fn plan_analysis_with_base_explicit_edges_and_a_broken_cycle() {
    let base = tree(&[("legacy/__init__.py", ""), ("legacy/money.py", "")]);
    let plan = Plan::parse(PLAN).expect("plan");
    let a = analyze_plan(&plan, Some(base.path())).expect("analysis");
    assert_eq!(a.files().len(), 6, "base files are not tasks");
    assert_eq!(a.dependencies("shop/models.py"), ["shop/db.py"]);
    assert!(
        a.external("shop/models.py")
            .iter()
            .all(|m| !m.starts_with("legacy")),
        "base modules resolve"
    );
    assert_eq!(a.external("shop/models.py"), ["requests"]);
    assert_eq!(
        edge(&a, "shop/api.py", "shop/auth.py"),
        Some(EdgeKind::Explicit)
    );
    // api -> views -(type)-> api: the type edge is dropped and reported.
    assert_eq!(a.dependencies("shop/views.py"), Vec::<&str>::new());
    assert_eq!(a.cycles(), vec![vec!["shop/api.py", "shop/views.py"]]);
    assert_eq!(a.dropped_edges().len(), 1);
    assert!(a
        .warnings()
        .iter()
        .any(|w| w.path == "shop/views.py" && w.message.contains("cycle")));

    let tasks = a.to_analyzed_tasks(&plan);
    assert_eq!(
        tasks.iter().map(|t| t.path.as_str()).collect::<Vec<_>>()[..2],
        ["shop/__init__.py", "shop/models.py"]
    );
    let api = tasks.iter().find(|t| t.path == "shop/api.py").expect("api");
    assert_eq!(
        api.depends_on,
        ["shop/auth.py", "shop/models.py", "shop/views.py"]
    );
    let db = tasks.iter().find(|t| t.path == "shop/db.py").expect("db");
    assert_eq!((db.batch, db.estimate), (0, 1));
    // db (1) -> models (3) -> api (1): the longest remaining path from db.
    assert_eq!(db.priority, 5);
    assert_eq!(
        a.critical_path().files,
        ["shop/db.py", "shop/models.py", "shop/api.py"]
    );
    assert_eq!(a.critical_path_length(), 5);
}

#[test]
fn bad_plans_are_rejected_naming_the_task() {
    let unknown = Plan {
        tasks: vec![],
        ..Plan::parse("name: x\ntasks:\n  - { path: a.py, spec: s }\n").expect("plan")
    };
    assert_eq!(
        analyze_plan(&unknown, None).unwrap_err(),
        PlanError::NoTasks
    );
    let mut plan = Plan::parse("name: x\ntasks:\n  - { path: a.py, spec: s, depends_on: [b.py] }\n  - { path: b.py, spec: s }\n")
        .expect("plan");
    plan.tasks[0].depends_on = vec!["ghost.py".into()];
    assert!(matches!(
        analyze_plan(&plan, None),
        Err(PlanError::UnknownDependency { task, dependency }) if task == "a.py" && dependency == "ghost.py"
    ));
    plan.tasks[0].depends_on.clear();
    plan.tasks[1].path = "a.py".into();
    assert!(
        matches!(analyze_plan(&plan, None), Err(PlanError::DuplicatePath { task }) if task == "a.py")
    );
    plan.tasks[1].path = "../escape.py".into();
    assert!(
        matches!(analyze_plan(&plan, None), Err(PlanError::InvalidPath { task, .. }) if task == "../escape.py")
    );
    let cyclic = Plan::parse(
        "name: x\ntasks:\n  - { path: a.py, spec: s, depends_on: [b.py] }\n  - { path: b.py, spec: s, depends_on: [a.py] }\n",
    )
    .expect("plan");
    assert_eq!(
        analyze_plan(&cyclic, None).unwrap_err(),
        PlanError::Cycle {
            files: vec!["a.py".into(), "b.py".into(), "a.py".into()]
        }
    );
}

#[test]
fn a_base_at_the_filesystem_root_or_with_too_many_files_rejects_the_plan() {
    use devfleet_protocol::plan::MAX_BASE_ENTRIES;
    let plan =
        Plan::parse("name: x\nbase: repo\ntasks:\n  - { path: a.py, spec: s }\n").expect("plan");
    let deep = tempfile::tempdir().expect("temp dir");
    let climbing = deep.path().join("../".repeat(64));
    for root in [Path::new("/"), climbing.as_path()] {
        match analyze_plan(&plan, Some(root)) {
            Err(PlanError::InvalidBase { reason, .. }) => {
                assert!(reason.contains("filesystem root"), "{reason}")
            }
            other => panic!("{}: expected InvalidBase, got {other:?}", root.display()),
        }
    }
    let big = tempfile::tempdir().expect("temp dir");
    for i in 0..=MAX_BASE_ENTRIES {
        std::fs::write(big.path().join(format!("f{i}")), b"").expect("write");
    }
    match analyze_plan(&plan, Some(big.path())) {
        Err(e @ PlanError::InvalidBase { .. }) => {
            assert!(e.to_string().contains(&MAX_BASE_ENTRIES.to_string()), "{e}")
        }
        other => panic!("expected InvalidBase, got {other:?}"),
    }
    std::fs::remove_file(big.path().join("f0")).expect("remove");
    analyze_plan(&plan, Some(big.path())).expect("a base at the limit is fine");
}

/// Inputs made of the characters that switch lexer states, so random cases
/// reach nested strings, templates, JSX and regexes, not just plain text.
fn tricky_source() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "import ",
        "from ",
        " x ",
        ".",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        "'",
        "\"",
        "'''",
        "\"\"\"",
        "`",
        "${",
        "f\"",
        "rb'",
        "#",
        "//",
        "/*",
        "*/",
        "/",
        "\\",
        "\n",
        "    ",
        "<div>",
        "</div>",
        "<",
        ">",
        "=>",
        "require(",
        "export * from ",
        "if TYPE_CHECKING:",
        "import_module(",
        ",",
        ";",
        ":",
        "é",
        "\0",
        "\r\n",
        "type ",
        "=",
    ]);
    prop::collection::vec(pieces, 0..200).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scanners_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = devfleet_analysis::scanner::python::scan(&text);
        for dialect in [
            devfleet_analysis::scanner::js::Dialect::JavaScript,
            devfleet_analysis::scanner::js::Dialect::TypeScript,
            devfleet_analysis::scanner::js::Dialect::Tsx,
        ] {
            let _ = devfleet_analysis::scanner::js::scan(&text, dialect);
        }
    }

    #[test]
    fn scanners_never_panic_on_tricky_sources(src in tricky_source()) {
        let py = devfleet_analysis::scanner::python::scan(&src);
        // Whatever was found has a line inside the text.
        let lines = src.lines().count().max(1) as u32 + 1;
        prop_assert!(py.iter().all(|i| i.line >= 1 && i.line <= lines));
        for dialect in [
            devfleet_analysis::scanner::js::Dialect::JavaScript,
            devfleet_analysis::scanner::js::Dialect::TypeScript,
            devfleet_analysis::scanner::js::Dialect::Tsx,
        ] {
            let js = devfleet_analysis::scanner::js::scan(&src, dialect);
            prop_assert!(js.iter().all(|i| i.line >= 1 && i.line <= lines));
        }
    }

    #[test]
    fn an_import_after_balanced_code_is_always_found(prefix in tricky_source()) {
        // Whatever came before, once every construct is closed on its own
        // line, a plain import statement must be seen. Here the prefix is
        // confined to a comment, so it is balanced by construction.
        let py = format!("# {}\nimport target\n", prefix.replace(['\n', '\r'], " "));
        prop_assert_eq!(devfleet_analysis::scanner::python::scan(&py).last().map(|i| i.module.clone()), Some("target".to_string()));
        let js = format!("// {}\nimport t from './target';\n", prefix.replace(['\n', '\r'], " "));
        let found = devfleet_analysis::scanner::js::scan(&js, devfleet_analysis::scanner::js::Dialect::Tsx);
        prop_assert_eq!(found.last().map(|i| i.specifier.clone()), Some("./target".to_string()));
    }
}
