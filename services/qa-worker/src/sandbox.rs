//! Running untrusted check commands: bubblewrap isolation, resource limits,
//! a wall timeout, capped output.
//!
//! # What a sandboxed command gets
//!
//! * **bubblewrap** (`bwrap`, when found and working): new user, PID,
//!   network, IPC, UTS and cgroup namespaces (`--unshare-all`: no network,
//!   not even the host's loopback), `--die-with-parent`, `--new-session`; a
//!   read-only root made of `/usr` (and the `/bin`, `/lib*`, `/sbin`
//!   symlinks or binds), a few files of `/etc` (`passwd`, `group`,
//!   `ld.so.cache`, `alternatives`, …) and any extra read-only paths
//!   configured; a private `/proc` and minimal `/dev`; the workspace,
//!   bound at `/workspace`, is the only writable path. The environment is
//!   cleared (`PATH`, `HOME`, `TMPDIR`, `LANG` and the caller's variables).
//! * **resource limits** (`setrlimit` in the child before exec, inherited
//!   by everything it starts): CPU seconds, address space, processes, file
//!   size, open files, no core dumps.
//! * **a separate uid per slot** when the worker runs as root: each slot
//!   leases a uid from `uid_base` up that no other worker on the host holds
//!   (an exclusive `flock` on `$TMPDIR/devfleet-qa-uids/<uid>`), and the
//!   child drops to it (no supplementary groups) before exec, so
//!   the process limit counts only that slot's processes, the check cannot
//!   touch root-owned files, and every process left behind, even one that
//!   escaped the process group, is killed by uid when the run ends.
//! * **a wall timeout**: the process group is killed (and with bubblewrap
//!   the PID namespace dies with it).
//!
//! Without bubblewrap the limits, uid and timeout still apply but there is
//! no filesystem or network isolation; the worker logs that loudly at
//! start and reports it in its metrics.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Where the workspace appears inside the sandbox.
pub const SANDBOX_WORKSPACE: &str = "/workspace";

/// The `PATH` checks run with (inside the sandbox, and outside it without one).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Files and folders of `/etc` bound read-only when present.
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
];

/// Resource limits for one command.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// CPU time, seconds (RLIMIT_CPU; SIGKILL a second later).
    pub cpu_seconds: u64,
    /// Address space, bytes (RLIMIT_AS).
    pub memory_bytes: u64,
    /// Processes/threads of the slot's sandbox uid (RLIMIT_NPROC; applied
    /// only with per-slot uids, i.e. when the worker runs as root).
    pub processes: u64,
    /// Largest file it may write, bytes (RLIMIT_FSIZE).
    pub file_size_bytes: u64,
    /// Open files (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Output kept per stream (stdout, stderr), bytes; the rest is dropped.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_seconds: 60,
            memory_bytes: 2 * 1024 * 1024 * 1024,
            processes: 64,
            file_size_bytes: 64 * 1024 * 1024,
            open_files: 256,
            output_bytes: 64 * 1024,
        }
    }
}

/// Which isolation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// bubblewrap when it is installed and works, else limits only (logged loudly).
    Auto,
    /// bubblewrap or refuse to start.
    Bwrap,
    /// Limits and timeout only: no filesystem or network isolation.
    None,
}

/// Sandbox settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSettings {
    pub mode: SandboxMode,
    pub limits: Limits,
    /// First uid (and gid) of the per-slot sandbox users, used when running
    /// as root; `None` keeps the worker's own uid.
    pub uid_base: Option<u32>,
    /// Extra host paths bound read-only at the same place (toolchains
    /// outside `/usr`, e.g. `/opt/node`).
    pub extra_ro_binds: Vec<PathBuf>,
    /// `PATH` inside.
    pub path: String,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            mode: SandboxMode::Auto,
            limits: Limits::default(),
            uid_base: Some(3_000_000),
            extra_ro_binds: Vec::new(),
            path: DEFAULT_PATH.to_owned(),
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit status 0.
    Success,
    /// Non-zero exit status.
    Code(i32),
    /// Killed by a signal (e.g. 9 after the CPU limit).
    Signal(i32),
    /// Ran past the wall timeout and was killed.
    Timeout,
    /// Could not be started.
    SpawnFailed(String),
}

/// What a sandboxed command produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub exit: Exit,
    /// stdout then stderr, each capped.
    pub output: String,
    pub truncated: bool,
    pub duration: Duration,
}

impl Outcome {
    /// One line describing how it ended.
    pub fn describe(&self) -> String {
        match &self.exit {
            Exit::Success => "exit 0".into(),
            Exit::Code(c) => format!("exit {c}"),
            Exit::Signal(s) => format!("killed by signal {s}{}", signal_hint(*s)),
            Exit::Timeout => format!(
                "timed out after {:.1}s and was killed",
                self.duration.as_secs_f64()
            ),
            Exit::SpawnFailed(e) => format!("could not start: {e}"),
        }
    }
}

fn signal_hint(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => " (SIGKILL: CPU or memory limit, or killed)",
        libc::SIGXCPU => " (SIGXCPU: CPU time limit)",
        libc::SIGXFSZ => " (SIGXFSZ: file size limit)",
        libc::SIGSEGV => " (SIGSEGV: possibly the memory limit)",
        _ => "",
    }
}

/// A ready-to-use sandbox: the isolation found at start and the limits.
#[derive(Debug, Clone)]
pub struct Sandbox {
    settings: SandboxSettings,
    bwrap: Option<PathBuf>,
    /// The sandbox uid of each slot (only when running as root), leased
    /// host-wide for as long as this sandbox lives.
    uids: std::sync::Arc<Vec<UidLease>>,
}

/// How many uids above the base are tried when leasing.
const UID_RANGE: u32 = 65_536;

/// A uid this process uses for one slot: held through an exclusive `flock`
/// on `$TMPDIR/devfleet-qa-uids/<uid>`, so two workers on one host (or two
/// in one process) never share one. Released when dropped.
#[derive(Debug)]
struct UidLease {
    uid: u32,
    _lock: std::fs::File,
}

fn lease_uids(base: u32, count: usize) -> std::io::Result<Vec<UidLease>> {
    use std::os::fd::AsRawFd as _;
    let dir = std::env::temp_dir().join("devfleet-qa-uids");
    std::fs::create_dir_all(&dir)?;
    let mut leases = Vec::with_capacity(count);
    for uid in base..base.saturating_add(UID_RANGE) {
        if leases.len() == count {
            break;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(uid.to_string()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            leases.push(UidLease { uid, _lock: file });
        }
    }
    if leases.len() < count {
        return Err(std::io::Error::other(format!(
            "only {} free sandbox uids from {base} (DEVFLEET_QA_UID_BASE)",
            leases.len()
        )));
    }
    Ok(leases)
}

impl Sandbox {
    /// Finds bubblewrap per the mode and checks it works (a trial run of
    /// `/bin/true`), and leases a sandbox uid for each of `slots` slots when
    /// running as root. `SandboxMode::Bwrap` without a working bwrap is an
    /// error.
    pub async fn detect(settings: SandboxSettings, slots: usize) -> anyhow::Result<Sandbox> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let uids = match settings.uid_base.filter(|_| root) {
            Some(base) => lease_uids(base, slots.max(1))?,
            None => Vec::new(),
        };
        let mut sandbox = Sandbox {
            settings,
            bwrap: None,
            uids: std::sync::Arc::new(uids),
        };
        if sandbox.settings.mode == SandboxMode::None {
            return Ok(sandbox);
        }
        let found = find_program("bwrap", "/usr/local/bin:/usr/bin:/bin");
        let problem = match found {
            None => Some("bwrap (bubblewrap) is not installed".to_owned()),
            Some(path) => {
                sandbox.bwrap = Some(path);
                let dir = std::env::temp_dir().join(format!(
                    "devfleet-bwrap-probe-{}",
                    uuid::Uuid::new_v4().simple()
                ));
                let trial = async {
                    std::fs::create_dir_all(&dir)?;
                    sandbox.prepare_workspace(&dir, 0)?;
                    let out = sandbox
                        .run(0, &["true".to_owned()], &dir, &[], Duration::from_secs(20))
                        .await;
                    Ok::<_, std::io::Error>(out)
                }
                .await;
                let _ = std::fs::remove_dir_all(&dir);
                match trial {
                    Ok(o) if o.exit == Exit::Success => None,
                    Ok(o) => Some(format!(
                        "bwrap does not work here: {}: {}",
                        o.describe(),
                        o.output.trim()
                    )),
                    Err(e) => Some(format!("cannot try bwrap: {e}")),
                }
            }
        };
        if let Some(problem) = problem {
            sandbox.bwrap = None;
            if sandbox.settings.mode == SandboxMode::Bwrap {
                anyhow::bail!("DEVFLEET_QA_SANDBOX=bwrap but {problem}");
            }
            tracing::error!(
                %problem,
                "QA checks will run WITHOUT a sandbox: no filesystem or network isolation, \
                 only resource limits and timeouts. Install bubblewrap to fix this."
            );
        }
        Ok(sandbox)
    }

    /// `bwrap` or `none`: for logs and metrics.
    pub fn isolation(&self) -> &'static str {
        if self.bwrap.is_some() {
            "bwrap"
        } else {
            "none"
        }
    }

    pub fn settings(&self) -> &SandboxSettings {
        &self.settings
    }

    /// Where the workspace is seen by commands.
    pub fn workspace_inside(&self, host: &Path) -> PathBuf {
        if self.bwrap.is_some() {
            PathBuf::from(SANDBOX_WORKSPACE)
        } else {
            host.to_owned()
        }
    }

    fn ids(&self, slot: u32) -> Option<(u32, u32)> {
        self.uids.get(slot as usize).map(|l| (l.uid, l.uid))
    }

    /// Makes a workspace writable by the slot's sandbox user.
    pub fn prepare_workspace(&self, dir: &Path, slot: u32) -> std::io::Result<()> {
        let Some((uid, gid)) = self.ids(slot) else {
            return Ok(());
        };
        chown_tree(dir, uid, gid)
    }

    /// True when `program` can be found on the sandbox `PATH`.
    pub fn has_program(&self, program: &str) -> bool {
        find_program(program, &self.settings.path).is_some()
    }

    /// Runs `words` in `workspace` (a host directory prepared with
    /// [`Sandbox::prepare_workspace`]) on slot `slot`, with `env` added to
    /// the cleared environment. Never panics; every failure is an [`Exit`].
    pub async fn run(
        &self,
        slot: u32,
        words: &[String],
        workspace: &Path,
        env: &[(String, String)],
        wall: Duration,
    ) -> Outcome {
        let limits = self.settings.limits.clone();
        self.run_with(slot, words, workspace, env, wall, limits)
            .await
    }

    /// Like [`Sandbox::run`], with other limits.
    pub async fn run_with(
        &self,
        slot: u32,
        words: &[String],
        workspace: &Path,
        env: &[(String, String)],
        wall: Duration,
        limits: Limits,
    ) -> Outcome {
        let started = Instant::now();
        let Some((program, args)) = words.split_first() else {
            return Outcome {
                exit: Exit::SpawnFailed("empty command".into()),
                output: String::new(),
                truncated: false,
                duration: Duration::ZERO,
            };
        };
        let inside = self.workspace_inside(workspace);
        let mut base_env: Vec<(String, String)> = vec![
            ("PATH".into(), self.settings.path.clone()),
            ("HOME".into(), inside.display().to_string()),
            ("TMPDIR".into(), inside.display().to_string()),
            ("LANG".into(), "C.UTF-8".into()),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ];
        base_env.extend(env.iter().cloned());

        let mut cmd = match &self.bwrap {
            Some(bwrap) => {
                let mut c = tokio::process::Command::new(bwrap);
                c.args(self.bwrap_args(workspace, &base_env));
                c.arg("--").arg(program).args(args);
                c.env_clear();
                c
            }
            None => {
                let resolved = find_program(program, &self.settings.path)
                    .unwrap_or_else(|| PathBuf::from(program));
                let mut c = tokio::process::Command::new(resolved);
                c.args(args).current_dir(workspace).env_clear();
                for (k, v) in &base_env {
                    c.env(k, v);
                }
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let cap = limits.output_bytes;
        let ids = self.ids(slot);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls async-signal-safe functions (setrlimit, setgroups, setgid,
        // setuid) on values computed before the fork.
        unsafe {
            cmd.pre_exec(move || apply_limits(&limits, ids));
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome {
                    exit: Exit::SpawnFailed(format!("'{program}': {e}")),
                    output: String::new(),
                    truncated: false,
                    duration: started.elapsed(),
                }
            }
        };
        let pgid = child.id();
        // Kills the group if this future is dropped half-way (shutdown).
        let mut guard = GroupGuard(pgid);
        let out = tokio::spawn(read_capped(child.stdout.take(), cap));
        let err = tokio::spawn(read_capped(child.stderr.take(), cap));
        let exit = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(0), _) => Exit::Success,
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Code(-1),
                },
                Err(e) => Exit::SpawnFailed(format!("waiting for '{program}': {e}")),
            },
            _ = tokio::time::sleep(wall) => Exit::Timeout,
        };
        // Whatever ended it, nothing it started may outlive it. Done once,
        // right away: a process group id, like a pid, is reused later.
        kill_group(pgid);
        guard.0 = None;
        let _ = child.kill().await;
        if let Some((uid, _)) = ids {
            kill_uid(uid).await;
        }
        let grace = Duration::from_secs(2);
        let (so, st) = match tokio::time::timeout(grace, out).await {
            Ok(Ok(v)) => v,
            _ => (Vec::new(), false),
        };
        let (se, et) = match tokio::time::timeout(grace, err).await {
            Ok(Ok(v)) => v,
            _ => (Vec::new(), false),
        };
        let mut output = String::from_utf8_lossy(&so).into_owned();
        if !se.is_empty() {
            if !output.is_empty() && !output.ends_with('\n') {
                output.push('\n');
            }
            output.push_str(&String::from_utf8_lossy(&se));
        }
        if st || et {
            output.push_str("\n… (output truncated)");
        }
        Outcome {
            exit,
            output,
            truncated: st || et,
            duration: started.elapsed(),
        }
    }

    fn bwrap_args(&self, workspace: &Path, env: &[(String, String)]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/usr",
            "/usr",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            let p = Path::new(top);
            match std::fs::read_link(p) {
                Ok(target) => {
                    a.push("--symlink".into());
                    a.push(target.display().to_string());
                    a.push(top.into());
                }
                Err(_) if p.is_dir() => {
                    a.push("--ro-bind".into());
                    a.push(top.into());
                    a.push(top.into());
                }
                Err(_) => {}
            }
        }
        for etc in ETC_ENTRIES {
            a.push("--ro-bind-try".into());
            a.push((*etc).into());
            a.push((*etc).into());
        }
        for extra in &self.settings.extra_ro_binds {
            a.push("--ro-bind-try".into());
            a.push(extra.display().to_string());
            a.push(extra.display().to_string());
        }
        a.push("--bind".into());
        a.push(workspace.display().to_string());
        a.push(SANDBOX_WORKSPACE.into());
        a.push("--chdir".into());
        a.push(SANDBOX_WORKSPACE.into());
        a.push("--remount-ro".into());
        a.push("/".into());
        a.push("--clearenv".into());
        for (k, v) in env {
            a.push("--setenv".into());
            a.push(k.clone());
            a.push(v.clone());
        }
        a
    }
}

/// Runs in the child between fork and exec: only async-signal-safe calls.
fn apply_limits(limits: &Limits, ids: Option<(u32, u32)>) -> std::io::Result<()> {
    fn set(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
        let rl = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit with a valid pointer to an initialised struct.
        if unsafe { libc::setrlimit(resource, &rl) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    set(
        libc::RLIMIT_CPU,
        limits.cpu_seconds,
        limits.cpu_seconds.saturating_add(1),
    )?;
    set(libc::RLIMIT_AS, limits.memory_bytes, limits.memory_bytes)?;
    set(
        libc::RLIMIT_FSIZE,
        limits.file_size_bytes,
        limits.file_size_bytes,
    )?;
    set(libc::RLIMIT_NOFILE, limits.open_files, limits.open_files)?;
    set(libc::RLIMIT_CORE, 0, 0)?;
    if let Some((uid, gid)) = ids {
        // Counted per real uid: only meaningful for a uid of its own (the
        // worker's own uid also runs the worker's threads).
        set(libc::RLIMIT_NPROC, limits.processes, limits.processes)?;
        // SAFETY: plain syscalls on integers; order matters (groups and gid
        // while still privileged, uid last).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Kills a process group when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill with a negative pid signals that process group only;
        // the group was created for this command (process_group(0)).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Kills every process of a sandbox uid (escaped or leftover ones) by
/// becoming that uid in a short-lived child and signalling -1.
async fn kill_uid(uid: u32) {
    let mut cmd = tokio::process::Command::new("/bin/true");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec; setgroups/setgid/setuid
    // and kill are async-signal-safe. kill(-1) never signals the caller.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::kill(-1, libc::SIGKILL);
            Ok(())
        });
    }
    match cmd.status().await {
        Ok(_) => {}
        Err(e) => tracing::warn!(uid, error = %e, "cannot sweep the sandbox uid's processes"),
    }
}

async fn read_capped<R: AsyncRead + Unpin>(reader: Option<R>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut reader) = reader else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if room < n {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

/// Finds a program on a `PATH` (or as given when it contains a `/`).
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

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if dir.is_dir() && !dir.is_symlink() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_the_path() {
        assert!(find_program("sh", DEFAULT_PATH).is_some());
        assert!(find_program("definitely-not-a-program-xyz", DEFAULT_PATH).is_none());
        assert!(find_program("/bin/sh", "").is_some());
    }

    #[tokio::test]
    async fn output_is_capped_and_status_reported() {
        let settings = SandboxSettings {
            limits: Limits {
                output_bytes: 100,
                ..Limits::default()
            },
            ..SandboxSettings::default()
        };
        let sandbox = Sandbox::detect(settings, 8).await.unwrap();
        let dir = std::env::temp_dir().join(format!("qa-unit-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        sandbox.prepare_workspace(&dir, 7).unwrap();
        let words: Vec<String> = ["sh", "-c", "yes x | head -c 100000; exit 3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = sandbox
            .run(7, &words, &dir, &[], Duration::from_secs(20))
            .await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(out.exit, Exit::Code(3), "{}", out.output);
        assert!(out.truncated);
        assert!(out.output.len() < 200);
    }
}
