//! The agent sandbox: bubblewrap around an agent CLI.
//!
//! Agent CLIs run commands their model chooses, so each run gets:
//!
//! * **network** (`--share-net`): the agent must reach its provider;
//! * **filesystem**: a read-only root made of `/usr` (and the `/bin`,
//!   `/lib*`, `/sbin` links), the parts of `/etc` that programs and TLS
//!   need, the operator's and the profile's extra read-only paths (where
//!   the agent is installed); a private `/proc`, a minimal `/dev`, a tmpfs
//!   `/tmp` (holding `HOME`); writable only the task's workspace and the
//!   run's control directory (prompt, output and usage files), each at its
//!   host path;
//! * **processes**: new PID, user, IPC, UTS and cgroup namespaces,
//!   `--die-with-parent` and `--new-session`: when the agent exits or is
//!   killed, everything it started dies with its PID namespace;
//! * **environment**: cleared, then `PATH`, `HOME`, `TMPDIR`, `LANG`, the
//!   devfleet variables and the profile's allow-list.
//!
//! [`AgentSandbox::detect`] tries it at start-up by running `true` in it;
//! when that fails the worker refuses to start with the fix in the error,
//! unless the operator opted out (`DEVFLEET_COMMAND_ALLOW_UNSANDBOXED=true`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Where `bwrap` is looked for.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `PATH` inside the sandbox unless the profile sets one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `HOME` inside the sandbox (on its private `/tmp`).
pub const SANDBOX_HOME: &str = "/tmp/home";

/// Files and folders of `/etc` bound read-only when present: users, the
/// dynamic linker, name resolution and TLS roots.
const ETC_ENTRIES: &[&str] = &[
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/python3",
    "/etc/python3.11",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/gitconfig",
];

/// bubblewrap, found and tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSandbox {
    bwrap: PathBuf,
    /// Operator-configured read-only paths (`DEVFLEET_COMMAND_RO_BINDS`).
    extra_ro_binds: Vec<PathBuf>,
}

/// The sandbox cannot start and unsandboxed runs are not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the agent sandbox cannot start: {0}. Agent CLIs run commands their model chooses, so the \
     dev-worker refuses to run the command executor unsandboxed. To fix it: install bubblewrap \
     (Debian/Ubuntu: apt-get install bubblewrap; or point DEVFLEET_COMMAND_BWRAP at it) and allow \
     unprivileged user namespaces (see docs/QA.md for the kernel settings). Or, knowing that the \
     agent then runs with the worker's files and processes, opt out with \
     DEVFLEET_COMMAND_ALLOW_UNSANDBOXED=true"
)]
pub struct Unavailable(pub String);

impl AgentSandbox {
    /// Finds `bwrap` (or uses `bwrap`) and tries it; the error says what
    /// failed and how to fix it.
    pub fn detect(bwrap: Option<&Path>, extra_ro_binds: Vec<PathBuf>) -> Result<Self, Unavailable> {
        let bwrap = match bwrap {
            Some(p) if is_executable(p) => p.to_path_buf(),
            Some(p) => {
                return Err(Unavailable(format!(
                    "DEVFLEET_COMMAND_BWRAP={} is not an executable file",
                    p.display()
                )))
            }
            None => find_program("bwrap", SYSTEM_PATH)
                .ok_or_else(|| Unavailable("bwrap (bubblewrap) is not installed".to_owned()))?,
        };
        let sandbox = Self {
            bwrap,
            extra_ro_binds,
        };
        let dir = std::env::temp_dir().join(format!(
            "devfleet-agent-probe-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let trial = std::fs::create_dir(&dir).and_then(|()| {
            let args = sandbox.args(&dir, &dir, &[], &[], &["true".to_owned()]);
            std::process::Command::new(&sandbox.bwrap)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
        });
        let _ = std::fs::remove_dir_all(&dir);
        match trial {
            Ok(out) if out.status.success() => Ok(sandbox),
            Ok(out) => Err(Unavailable(format!(
                "a trial run of `true` in bwrap failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            Err(e) => Err(Unavailable(format!("cannot try bwrap: {e}"))),
        }
    }

    /// The program to start.
    pub fn program(&self) -> &Path {
        &self.bwrap
    }

    /// bubblewrap's arguments to run `command` with `workspace` (its
    /// working directory) and `control` writable, `ro_binds` (the
    /// profile's) visible, and exactly `env` set.
    pub fn args(
        &self,
        workspace: &Path,
        control: &Path,
        ro_binds: &[PathBuf],
        env: &[(String, String)],
        command: &[String],
    ) -> Vec<String> {
        let mut a: Vec<String> = [
            "--unshare-all",
            "--share-net",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/usr",
            "/usr",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--dir",
            SANDBOX_HOME,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            let p = Path::new(top);
            match std::fs::read_link(p) {
                Ok(target) => {
                    a.extend(["--symlink".into(), target.display().to_string(), top.into()])
                }
                Err(_) if p.is_dir() => a.extend(["--ro-bind".into(), top.into(), top.into()]),
                Err(_) => {}
            }
        }
        let ro = ETC_ENTRIES
            .iter()
            .map(PathBuf::from)
            .chain(self.extra_ro_binds.iter().cloned())
            .chain(ro_binds.iter().cloned());
        for p in ro {
            let p = p.display().to_string();
            a.extend(["--ro-bind-try".into(), p.clone(), p]);
        }
        for rw in [workspace, control] {
            let p = rw.display().to_string();
            a.extend(["--bind".into(), p.clone(), p]);
        }
        a.extend(["--chdir".into(), workspace.display().to_string()]);
        a.extend(["--remount-ro".into(), "/".into(), "--clearenv".into()]);
        for (k, v) in env {
            a.extend(["--setenv".into(), k.clone(), v.clone()]);
        }
        a.push("--".into());
        a.extend(command.iter().cloned());
        a
    }
}

/// The first executable `program` on `path` (or `program` itself when it
/// holds a `/`).
pub fn find_program(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_that_cannot_start_is_refused_with_the_fix() {
        let err = AgentSandbox::detect(Some(Path::new("/bin/false")), vec![]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("trial run"), "{msg}");
        assert!(msg.contains("apt-get install bubblewrap"), "{msg}");
        assert!(
            msg.contains("DEVFLEET_COMMAND_ALLOW_UNSANDBOXED=true"),
            "{msg}"
        );
        let err = AgentSandbox::detect(Some(Path::new("/nonexistent/bwrap")), vec![]).unwrap_err();
        assert!(err.0.contains("DEVFLEET_COMMAND_BWRAP"), "{err}");
    }

    #[test]
    fn bubblewrap_works_here() {
        // scripts/test.sh installs bubblewrap: the sandboxed tests need it.
        AgentSandbox::detect(None, vec![]).expect("bwrap must work on test machines");
    }
}
