//! The integration stage as a qa-worker runs it: a plan's `integration`
//! commands, split into shards that qa-workers run in parallel. The
//! scheduler's side of the contract (making the shards, judging their
//! results) is `devfleet_contracts::integration`.
//!
//! # Sharding
//!
//! A step without `shard` is one shard. A step with `shard: N` is N shards;
//! each runs the command with `DEVFLEET_SHARD_INDEX` (0-based) and
//! `DEVFLEET_SHARD_COUNT` in its environment. When the command is pytest
//! (`pytest …`, `py.test …` or `python[3] -m pytest …`), the worker also
//! splits the test files itself: every `test_*.py` and `*_test.py` in the
//! workspace (hidden and `__pycache__` folders skipped), sorted by path,
//! goes to shard `i % N` for its position `i`, and the shard's files are
//! appended to the command. The split depends only on the file list, so
//! every worker computes the same one. A shard that gets no files passes
//! with a note. Other commands must split the work themselves from the two
//! variables (or run whole on every shard).

use std::path::Path;

/// True when the command words run pytest.
pub fn is_pytest(words: &[String]) -> bool {
    let prog = |w: &str| {
        Path::new(w)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match words {
        [first, ..] if matches!(prog(first).as_str(), "pytest" | "py.test") => true,
        [first, m, module, ..] => {
            prog(first).starts_with("python") && m == "-m" && module == "pytest"
        }
        _ => false,
    }
}

/// True for pytest's default test file names.
pub fn is_test_file(path: &str) -> bool {
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.ends_with(".py") && (name.starts_with("test_") || name.ends_with("_test.py"))
}

/// The test files of shard `index` of `count`: sorted, then every
/// `count`-th starting at `index`.
pub fn shard_files(files: &[String], index: u32, count: u32) -> Vec<String> {
    let mut sorted: Vec<&String> = files.iter().filter(|f| is_test_file(f)).collect();
    sorted.sort();
    sorted.dedup();
    let count = count.max(1) as usize;
    sorted
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % count == index as usize)
        .map(|(_, f)| f.clone())
        .collect()
}

/// Every file under `root`, relative and `/`-separated, skipping hidden
/// folders and `__pycache__`.
pub fn list_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !name.starts_with('.') && name != "__pycache__" {
                    walk(root, &path, out);
                }
            } else if ft.is_file() {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(
                        rel.components()
                            .map(|c| c.as_os_str().to_string_lossy())
                            .collect::<Vec<_>>()
                            .join("/"),
                    );
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytest_is_recognised() {
        let w = |s: &str| shlex::split(s).unwrap();
        assert!(is_pytest(&w("pytest -q")));
        assert!(is_pytest(&w("/usr/bin/python3 -m pytest -x")));
        assert!(!is_pytest(&w("python3 run_tests.py")));
        assert!(!is_pytest(&w("make test")));
    }

    #[test]
    fn test_files_split_deterministically_and_completely() {
        let files: Vec<String> = [
            "tests/test_b.py",
            "tests/test_a.py",
            "app/models.py",
            "tests/c_test.py",
            "tests/test_d.py",
            "tests/conftest.py",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s0 = shard_files(&files, 0, 2);
        let s1 = shard_files(&files, 1, 2);
        assert_eq!(s0, ["tests/c_test.py", "tests/test_b.py"]);
        assert_eq!(s1, ["tests/test_a.py", "tests/test_d.py"]);
        let mut reversed = files.clone();
        reversed.reverse();
        assert_eq!(
            shard_files(&reversed, 0, 2),
            s0,
            "order of discovery does not matter"
        );
        assert!(shard_files(&files, 5, 6).is_empty());
    }
}
