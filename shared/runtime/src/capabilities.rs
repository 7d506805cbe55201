//! Start-up probe of what this machine can run, for a worker's heartbeat.
//!
//! Looks for each of [`PROGRAMS`] on `PATH` (a file with an execute bit;
//! nothing is run), then, when `python3` is found, asks one `python3`
//! process which of [`PYTHON_MODULES`] it can import (`importlib.util.
//! find_spec`, which imports nothing; bounded by [`PYTHON_PROBE_TIMEOUT`]).
//! The result is added to the worker's configured executors and the
//! operator's labels ([`labels`]) to form its capabilities.

pub use devfleet_contracts::capabilities::{PROGRAMS, PYTHON_MODULES};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the Python module probe may take; past it, no module is counted.
pub const PYTHON_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Programs of [`PROGRAMS`] on `path` (a `PATH`-style list) and modules of
/// [`PYTHON_MODULES`] its `python3` imports. Blocking (about one Python
/// start-up); call it once at start.
pub fn probe(path: &str) -> BTreeSet<String> {
    let dirs: Vec<std::path::PathBuf> = std::env::split_paths(path).collect();
    let mut found: BTreeSet<String> = PROGRAMS
        .iter()
        .filter(|p| dirs.iter().any(|d| is_executable(&d.join(p))))
        .map(|p| p.to_string())
        .collect();
    if let Some(python) = dirs
        .iter()
        .map(|d| d.join("python3"))
        .find(|p| is_executable(p))
    {
        found.extend(python_modules(&python));
    }
    found
}

/// The probe of this process's `PATH`.
pub fn probe_this_host() -> BTreeSet<String> {
    probe(&std::env::var("PATH").unwrap_or_default())
}

/// Operator labels from a comma-separated list (`gpu,eu`); an error names
/// `variable` and the bad label.
pub fn labels(list: &[String], variable: &str) -> anyhow::Result<BTreeSet<String>> {
    list.iter()
        .flat_map(|l| l.split(','))
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            devfleet_contracts::capabilities::normalize(l)
                .map_err(|e| anyhow::anyhow!("{variable}: {e}"))
        })
        .collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// `find_spec` of a top-level name locates it without importing it.
const FIND_SPEC: &str = "import importlib.util, sys\n\
                         print('\\n'.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))";

fn python_modules(python: &Path) -> Vec<String> {
    let child = Command::new(python)
        .arg("-c")
        .arg(FIND_SPEC)
        .args(PYTHON_MODULES)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Vec::new();
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < PYTHON_PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("the Python module probe did not finish; counting no module");
                return Vec::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read as _;
        let _ = stdout.read_to_string(&mut out);
    }
    out.lines()
        .map(str::trim)
        .filter(|m| PYTHON_MODULES.contains(m))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_on_path_are_found_and_others_not() {
        let dir = std::env::temp_dir().join(format!("caps-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("aider");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("codex"), "not executable").unwrap();
        let found = probe(dir.to_str().unwrap());
        assert!(found.contains("aider"), "{found:?}");
        assert!(!found.contains("codex"), "{found:?}");
        assert!(!found.contains("python3"), "{found:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn python_modules_are_probed_with_the_python3_on_path() {
        // This machine's python3 has its standard library but not every
        // probed module; the probe must agree with python3 itself.
        let found = probe_this_host();
        let python = found.contains("python3");
        for m in PYTHON_MODULES {
            let importable = python
                && Command::new("python3")
                    .args(["-c", &format!("import {m}")])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            assert_eq!(found.contains(*m), importable, "{m}");
        }
    }

    #[test]
    fn labels_are_split_and_checked() {
        let l = labels(&["gpu, EU".into(), "".into()], "DEVFLEET_DEV_LABELS").unwrap();
        assert_eq!(l.into_iter().collect::<Vec<_>>(), ["eu", "gpu"]);
        let err = labels(&["a b".into()], "DEVFLEET_DEV_LABELS").unwrap_err();
        assert!(err.to_string().contains("DEVFLEET_DEV_LABELS"), "{err}");
    }
}
