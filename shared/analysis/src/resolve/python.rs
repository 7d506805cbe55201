//! Python import resolution, following Python's own import system.
//!
//! **Import roots** (the `sys.path` entries a tree implies), tried in order:
//! 1. the importing file's own root: the first directory above it that is
//!    not a package (for a loose script, its own directory, as `python
//!    script.py` and pytest's rootdir insertion do);
//! 2. then, shallowest first: the tree root; the parent of every top-level
//!    package (a directory holding `__init__.py` whose parent holds none);
//!    every `src/` directory that holds Python code (src layouts).
//!
//! **Lookup** of a dotted name under a root follows `importlib`'s path finder:
//! a package (`name/__init__.py`) wins over a module (`name.py`), which wins
//! over a namespace portion (a directory with Python code but no
//! `__init__.py`). A regular package or module on any root wins over a
//! namespace portion on an earlier one (PEP 420), and a name found only as a
//! namespace portion that does not lead to a file is taken to be external
//! (a tree's `email/` folder does not hide the standard library's `email`).
//!
//! **Targets**, as grimp counts them: `import a.b.c` gives an edge to
//! `a/b/c.py` (or `a/b/c/__init__.py`), or, when that is missing, to its
//! parent `a.b`; `from a.b import x` to `a/b/x.py` when `x` is a submodule,
//! else to `a/b/__init__.py` (or `a/b.py`); `from . import x` resolves
//! against the importing file's directory. If the analyzed root is itself a
//! package, its name resolves to the root.

use super::{parent, FastSet, FileSet, Target};
use crate::scanner::python::PyImport;

/// What a dotted name is under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// A module or a regular package: the file to point at.
    File(String),
    /// A namespace package portion: a directory, no file.
    Namespace,
    Missing,
}

/// Resolves Python imports against a [`FileSet`].
#[derive(Debug)]
pub struct PyResolver<'a> {
    files: &'a FileSet,
    /// Directories holding `__init__.py` / `__init__.pyi`.
    packages: FastSet<String>,
    /// Directories holding Python files at any depth.
    py_dirs: FastSet<String>,
    roots: Vec<String>,
    /// The root's own name when the root is itself a package.
    root_package: Option<String>,
}

impl<'a> PyResolver<'a> {
    /// Indexes `files`. `root_name` is the analyzed directory's name, used
    /// when that directory is itself a package.
    pub fn new(files: &'a FileSet, root_name: Option<&str>) -> Self {
        let mut packages = FastSet::default();
        let mut py_dirs = FastSet::default();
        for path in files.files() {
            if !(path.ends_with(".py") || path.ends_with(".pyi")) {
                continue;
            }
            let dir = parent(path);
            let name = path.rsplit('/').next().unwrap_or(path);
            if name == "__init__.py" || name == "__init__.pyi" {
                packages.insert(dir.to_string());
            }
            let mut d = dir;
            while !d.is_empty() && py_dirs.insert(d.to_string()) {
                d = parent(d);
            }
        }
        let mut roots: Vec<String> = vec![String::new()];
        for dir in &packages {
            let up = parent(dir);
            if !dir.is_empty() && !packages.contains(up) {
                roots.push(up.to_string());
            }
        }
        for dir in &py_dirs {
            if dir == "src" || dir.ends_with("/src") {
                roots.push(dir.clone());
            }
        }
        roots.sort_by(|a, b| depth(a).cmp(&depth(b)).then_with(|| a.cmp(b)));
        roots.dedup();
        let root_package = if packages.contains("") {
            root_name.map(str::to_owned)
        } else {
            None
        };
        PyResolver {
            files,
            packages,
            py_dirs,
            roots,
            root_package,
        }
    }

    /// The global import roots, shallowest first.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// Every target of one import statement of `importer`, appended to `out`.
    pub fn resolve(&self, importer: &str, import: &PyImport, out: &mut Vec<Target>) {
        let parts: Vec<&str> = import.module.split('.').filter(|p| !p.is_empty()).collect();
        if import.level > 0 {
            let mut dir = Some(parent(importer));
            for _ in 1..import.level {
                dir = match dir {
                    Some(d) if !d.is_empty() => Some(parent(d)),
                    _ => None,
                };
            }
            let written = format!("{}{}", ".".repeat(import.level as usize), import.module);
            // Relative imports cannot climb above the top-level package.
            let dir = dir.filter(|d| !d.is_empty() || self.packages.contains(""));
            match dir {
                Some(dir) => {
                    self.resolve_in(dir, &parts, import, &written, out);
                }
                // Above the root: name what was imported (`...pkg`, not `...`).
                None if import.module.is_empty() => {
                    for name in &import.names {
                        out.push(Target::External(format!("{written}{name}")));
                    }
                }
                None => out.push(Target::External(written)),
            }
            return;
        }
        if parts.is_empty() {
            return;
        }
        if let Some(root_package) = &self.root_package {
            if parts[0] == root_package {
                self.resolve_in("", &parts[1..], import, &import.module, out);
                return;
            }
        }
        let own_root = self.own_root(importer);
        let mut namespace_roots: Vec<&str> = Vec::new();
        for root in std::iter::once(own_root).chain(self.roots.iter().map(String::as_str)) {
            match self.lookup(root, &parts[..1]) {
                Found::File(_) => {
                    self.resolve_in(root, &parts, import, &import.module, out);
                    return;
                }
                Found::Namespace if !namespace_roots.contains(&root) => namespace_roots.push(root),
                _ => {}
            }
        }
        for root in namespace_roots {
            let mut found = Vec::new();
            self.resolve_in(root, &parts, import, &import.module, &mut found);
            if found.iter().any(|t| matches!(t, Target::File(_))) {
                out.extend(found);
                return;
            }
        }
        out.push(Target::External(import.module.clone()));
    }

    /// The first directory above `importer` that is not a package.
    fn own_root<'p>(&self, importer: &'p str) -> &'p str {
        let mut dir = parent(importer);
        while !dir.is_empty() && self.packages.contains(dir) {
            dir = parent(dir);
        }
        dir
    }

    /// Resolves `parts` (and the imported names) under `root`.
    fn resolve_in(
        &self,
        root: &str,
        parts: &[&str],
        import: &PyImport,
        written: &str,
        out: &mut Vec<Target>,
    ) {
        let module = self.lookup(root, parts);
        if !import.from_import {
            match module {
                Found::File(file) => out.push(Target::File(file)),
                Found::Namespace => out.push(Target::Nothing),
                // grimp's rule: a missing `a.b.c` falls back to its parent `a.b`.
                Found::Missing => match parts.split_last() {
                    Some((_, up)) if !up.is_empty() => match self.lookup(root, up) {
                        Found::File(file) => out.push(Target::File(file)),
                        _ => out.push(Target::Unresolved(written.to_string())),
                    },
                    _ => out.push(Target::Unresolved(written.to_string())),
                },
            }
            return;
        }
        let mut child: Vec<&str> = parts.to_vec();
        for name in &import.names {
            if name != "*" {
                child.push(name);
                let found = self.lookup(root, &child);
                child.pop();
                match found {
                    Found::File(file) => {
                        out.push(Target::File(file));
                        continue;
                    }
                    Found::Namespace => {
                        out.push(Target::Nothing);
                        continue;
                    }
                    Found::Missing => {}
                }
            }
            match &module {
                Found::File(file) => out.push(Target::File(file.clone())),
                Found::Namespace => out.push(Target::Nothing),
                Found::Missing => out.push(Target::Unresolved(written.to_string())),
            }
        }
    }

    /// What `parts` names under `root` (the root itself for no parts).
    fn lookup(&self, root: &str, parts: &[&str]) -> Found {
        let mut base = String::with_capacity(root.len() + 32);
        base.push_str(root);
        for part in parts {
            if !base.is_empty() {
                base.push('/');
            }
            base.push_str(part);
        }
        if self.packages.contains(&base) {
            let init = if base.is_empty() {
                "__init__.py".to_string()
            } else {
                format!("{base}/__init__.py")
            };
            if self.files.is_file(&init) {
                return Found::File(init);
            }
            return Found::File(format!("{init}i"));
        }
        if !parts.is_empty() {
            for ext in [".py", ".pyi"] {
                let file = format!("{base}{ext}");
                if self.files.is_file(&file) {
                    return Found::File(file);
                }
            }
        }
        if base.is_empty() || self.py_dirs.contains(&base) {
            return Found::Namespace;
        }
        Found::Missing
    }
}

fn depth(dir: &str) -> usize {
    if dir.is_empty() {
        0
    } else {
        dir.matches('/').count() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scanner::python::scan;

    fn targets(files: &[&str], importer: &str, src: &str) -> Vec<Target> {
        let set = FileSet::new(files.iter().map(|s| s.to_string()));
        let resolver = PyResolver::new(&set, None);
        let mut out = Vec::new();
        for import in scan(src) {
            resolver.resolve(importer, &import, &mut out);
        }
        out
    }

    fn file(p: &str) -> Target {
        Target::File(p.into())
    }

    const PKG: &[&str] = &[
        "pkg/__init__.py",
        "pkg/a.py",
        "pkg/sub/__init__.py",
        "pkg/sub/b.py",
        "scripts/run.py",
        "scripts/helper.py",
    ];

    #[test]
    fn absolute_imports_and_grimp_parent_rule() {
        let got = targets(
            PKG,
            "pkg/a.py",
            "import pkg.sub.b\nimport pkg.sub.missing\nimport os.path\n",
        );
        assert_eq!(
            got,
            vec![
                file("pkg/sub/b.py"),
                file("pkg/sub/__init__.py"),
                Target::External("os.path".into())
            ]
        );
    }

    #[test]
    fn from_import_prefers_submodule_then_package() {
        let got = targets(
            PKG,
            "pkg/a.py",
            "from pkg.sub import b, attr\nfrom pkg import *\n",
        );
        assert_eq!(
            got,
            vec![
                file("pkg/sub/b.py"),
                file("pkg/sub/__init__.py"),
                file("pkg/__init__.py")
            ]
        );
    }

    #[test]
    fn relative_imports() {
        let got = targets(
            PKG,
            "pkg/sub/b.py",
            "from . import x\nfrom .. import a\nfrom ..a import f\nfrom ...up import z\n",
        );
        assert_eq!(
            got,
            vec![
                file("pkg/sub/__init__.py"),
                file("pkg/a.py"),
                file("pkg/a.py"),
                Target::External("...up".into()),
            ]
        );
    }

    #[test]
    fn loose_scripts_see_their_siblings() {
        assert_eq!(
            targets(PKG, "scripts/run.py", "import helper"),
            vec![file("scripts/helper.py")]
        );
        // ...but package modules do not see a sibling script's directory.
        assert_eq!(
            targets(PKG, "pkg/a.py", "import helper"),
            vec![Target::External("helper".into())]
        );
    }

    #[test]
    fn src_layout_and_namespace_packages() {
        let files = &[
            "src/app/__init__.py",
            "src/app/core.py",
            "tests/test_core.py",
            "ns/part/mod.py",
        ];
        assert_eq!(
            targets(files, "tests/test_core.py", "from app import core"),
            vec![file("src/app/core.py")]
        );
        assert_eq!(
            targets(files, "tests/test_core.py", "import ns.part.mod"),
            vec![file("ns/part/mod.py")]
        );
        assert_eq!(
            targets(files, "tests/test_core.py", "from ns.part import mod"),
            vec![file("ns/part/mod.py")]
        );
    }

    #[test]
    fn namespace_directory_does_not_hide_external_packages() {
        let files = &["email/send.py", "app.py"];
        assert_eq!(
            targets(files, "app.py", "import email.utils"),
            vec![Target::External("email.utils".into())]
        );
        assert_eq!(
            targets(files, "app.py", "import email.send"),
            vec![file("email/send.py")]
        );
    }

    #[test]
    fn regular_package_wins_over_module_file() {
        let files = &["x/__init__.py", "x.py", "main.py"];
        assert_eq!(
            targets(files, "main.py", "import x"),
            vec![file("x/__init__.py")]
        );
    }

    #[test]
    fn root_that_is_itself_a_package() {
        let set = FileSet::new(
            ["__init__.py", "utils.py", "sub/__init__.py", "sub/m.py"].map(String::from),
        );
        let resolver = PyResolver::new(&set, Some("mypkg"));
        let mut out = Vec::new();
        for import in scan("from mypkg.sub import m\nimport mypkg.utils\nfrom . import utils") {
            resolver.resolve("sub/m.py", &import, &mut out);
        }
        assert_eq!(
            out,
            vec![file("sub/m.py"), file("utils.py"), file("sub/__init__.py")]
        );
    }

    #[test]
    fn unresolved_in_tree_imports_are_reported() {
        assert_eq!(
            targets(PKG, "pkg/a.py", "from pkg.nothere.deeper import x"),
            vec![Target::Unresolved("pkg.nothere.deeper".into())]
        );
    }
}
