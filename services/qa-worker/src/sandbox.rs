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
//!   by everything it starts): CPU seconds, address space (per process),
//!   file size, open files, no core dumps; and a process limit (below).
//! * **a process limit that holds**: RLIMIT_NPROC counts the processes of
//!   a user, so it must not be set on the worker's own uid (it would count
//!   the worker's threads and every other slot's checks). As root each slot
//!   has a uid of its own (below). Not as root (every shipped image), the
//!   limit is set *inside* the sandbox's user namespace (`prlimit` run by
//!   bwrap before the command): the kernel counts processes per user
//!   namespace and uid, so it counts only that sandbox's processes, while
//!   the namespace as a whole stays under the worker's own limit.
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
//! # Failing closed
//!
//! [`Sandbox::detect`] tries the sandbox at start by running `true` in it
//! exactly as a check would run. When that fails (bwrap missing, user
//! namespaces blocked, …) the worker refuses to start, with an error naming
//! the fix ([`Unavailable`]), unless the operator opted out
//! (`DEVFLEET_QA_ALLOW_UNSANDBOXED=true`): then the limits, uid and timeout
//! still apply but there is no filesystem or network isolation (and, not
//! as root, no process limit); the worker logs that loudly at start and
//! reports it in its metrics.

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
    /// Processes and threads of one sandbox (RLIMIT_NPROC: as root on the
    /// slot's own uid, otherwise inside the sandbox's user namespace; not
    /// applied when running unsandboxed and not as root).
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
    /// bubblewrap; when it cannot start, refuse to start unless unsandboxed
    /// runs are allowed ([`SandboxSettings::allow_unsandboxed`]).
    Auto,
    /// bubblewrap or refuse to start, even when unsandboxed runs are allowed.
    Bwrap,
    /// Limits and timeout only, no filesystem or network isolation: only
    /// with [`SandboxSettings::allow_unsandboxed`].
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
    /// The bubblewrap program; `None` looks for `bwrap` on the system
    /// `PATH`.
    pub bwrap: Option<PathBuf>,
    /// Run checks without a sandbox when it cannot start (dangerous: the
    /// checks run generated code with the worker's filesystem and network).
    pub allow_unsandboxed: bool,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            mode: SandboxMode::Auto,
            limits: Limits::default(),
            uid_base: Some(3_000_000),
            extra_ro_binds: Vec::new(),
            path: DEFAULT_PATH.to_owned(),
            bwrap: None,
            allow_unsandboxed: false,
        }
    }
}

/// Where the system's own programs (`bwrap`, `prlimit`) are looked for.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The sandbox cannot start, and unsandboxed runs are not allowed: the
/// error names the problem and the fixes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the QA sandbox cannot start: {problem}{blocked}. QA checks run untrusted, generated code, \
     so the qa-worker refuses to run them unsandboxed. To fix it: install bubblewrap \
     (Debian/Ubuntu: apt-get install bubblewrap; or point DEVFLEET_QA_BWRAP at it) and allow \
     unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 where that exists, \
     user.max_user_namespaces > 0, and on Ubuntu 23.10+ kernel.apparmor_restrict_unprivileged_userns=0 \
     or an AppArmor profile for bwrap; in a container, seccomp and AppArmor profiles that allow \
     them, see docs/QA.md). Or, knowing that checks then run with the worker's files and network, \
     opt out with DEVFLEET_QA_ALLOW_UNSANDBOXED=true",
    blocked = blocked_clause(.blockers)
)]
pub struct Unavailable {
    /// What failed (bwrap missing, its trial run's error).
    pub problem: String,
    /// Kernel settings found blocking user namespaces ([`userns_blockers`]).
    pub blockers: Vec<String>,
}

fn blocked_clause(blockers: &[String]) -> String {
    if blockers.is_empty() {
        String::new()
    } else {
        format!(
            " (this platform blocks user namespaces: {})",
            blockers.join(", ")
        )
    }
}

/// The kernel settings under `proc_sys` (normally `/proc/sys`) that keep
/// unprivileged processes from creating user namespaces, each as
/// `name = value`; empty when none does (or none can be read).
pub fn userns_blockers(proc_sys: &Path) -> Vec<String> {
    let read = |rel: &str| {
        std::fs::read_to_string(proc_sys.join(rel))
            .ok()
            .map(|v| v.trim().to_owned())
    };
    let mut found = Vec::new();
    for (rel, name, blocking) in [
        (
            "kernel/unprivileged_userns_clone",
            "kernel.unprivileged_userns_clone",
            "0",
        ),
        ("user/max_user_namespaces", "user.max_user_namespaces", "0"),
        (
            "kernel/apparmor_restrict_unprivileged_userns",
            "kernel.apparmor_restrict_unprivileged_userns",
            "1",
        ),
    ] {
        if read(rel).as_deref() == Some(blocking) {
            found.push(format!("{name} = {blocking}"));
        }
    }
    found
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
    /// The resource limit it most likely ran into, named with its setting
    /// (see [`limit_reached`]).
    pub limit: Option<String>,
}

impl Outcome {
    /// One line describing how it ended (and which limit it hit, if any).
    pub fn describe(&self) -> String {
        let how = self.how();
        match &self.limit {
            Some(limit) => format!("{how}: {limit}"),
            None => how,
        }
    }

    fn how(&self) -> String {
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

/// The resource limit a command that did not succeed most likely ran
/// into, judged from how it ended and the messages runtimes print when a
/// limit refuses them (`fork`/thread creation refused with EAGAIN, failed
/// allocations); named with the setting that raises it.
pub fn limit_reached(exit: &Exit, output: &str, limits: &Limits) -> Option<String> {
    const MIB: u64 = 1024 * 1024;
    if matches!(exit, Exit::Success | Exit::SpawnFailed(_)) {
        return None;
    }
    let lower = output.to_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let processes = (lower.contains("fork")
        && any(&[
            "resource temporarily unavailable",
            "cannot fork",
            "can't fork",
        ]))
        || any(&["can't start new thread", "failed to spawn thread"]);
    let memory = any(&[
        "memoryerror",
        "cannot allocate memory",
        "out of memory",
        "bad_alloc",
        "memory allocation of",
    ]);
    if processes {
        Some(format!(
            "the process limit ({} processes per sandbox, DEVFLEET_QA_PROCESSES) was reached",
            limits.processes
        ))
    } else if memory {
        Some(format!(
            "the memory limit ({} MiB of address space per process, DEVFLEET_QA_MEMORY_MB) was reached",
            limits.memory_bytes / MIB
        ))
    } else if matches!(exit, Exit::Signal(libc::SIGXFSZ)) || lower.contains("file too large") {
        Some(format!(
            "the file size limit ({} MiB, DEVFLEET_QA_FILE_SIZE_MB) was reached",
            limits.file_size_bytes / MIB
        ))
    } else if matches!(exit, Exit::Signal(libc::SIGXCPU)) {
        Some(format!(
            "the CPU time limit ({} s per process, DEVFLEET_QA_CPU_SECONDS) was reached",
            limits.cpu_seconds
        ))
    } else {
        None
    }
}

/// A ready-to-use sandbox: the isolation found at start and the limits.
#[derive(Debug, Clone)]
pub struct Sandbox {
    settings: SandboxSettings,
    bwrap: Option<PathBuf>,
    /// `prlimit`, run inside bwrap to set the process limit in the
    /// sandbox's own user namespace (not running as root).
    prlimit: Option<PathBuf>,
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
    /// Finds bubblewrap per the mode and checks it works by running `true`
    /// in it exactly as a check would run; leases a sandbox uid for each of
    /// `slots` slots when running as root.
    ///
    /// Fails closed: a sandbox that cannot start is an [`Unavailable`]
    /// error, unless [`SandboxSettings::allow_unsandboxed`] is set and the
    /// mode is not [`SandboxMode::Bwrap`] (then checks run without
    /// isolation, logged loudly). [`SandboxMode::None`] needs that opt-out
    /// too.
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
            prlimit: None,
            uids: std::sync::Arc::new(uids),
        };
        let problem = match sandbox.settings.mode {
            SandboxMode::None => "DEVFLEET_QA_SANDBOX=none".to_owned(),
            SandboxMode::Auto | SandboxMode::Bwrap => match sandbox.try_bwrap(root).await {
                Ok(()) => return Ok(sandbox),
                Err(problem) => problem,
            },
        };
        sandbox.bwrap = None;
        sandbox.prlimit = None;
        let unavailable = Unavailable {
            problem,
            blockers: userns_blockers(Path::new("/proc/sys")),
        };
        if sandbox.settings.mode == SandboxMode::Bwrap {
            anyhow::bail!("DEVFLEET_QA_SANDBOX=bwrap: {unavailable}");
        }
        if !sandbox.settings.allow_unsandboxed {
            return Err(unavailable.into());
        }
        tracing::error!(
            problem = %unavailable.problem,
            blockers = %unavailable.blockers.join(", "),
            "QA checks will run WITHOUT a sandbox (DEVFLEET_QA_ALLOW_UNSANDBOXED=true): \
             no filesystem or network isolation{}, only resource limits and timeouts",
            if root { "" } else { " and no process limit" }
        );
        Ok(sandbox)
    }

    /// Sets up bubblewrap (and, not as root, `prlimit` for the process
    /// limit) and tries it; the error says what failed.
    async fn try_bwrap(&mut self, root: bool) -> Result<(), String> {
        let bwrap = match &self.settings.bwrap {
            Some(path) => {
                find_program(&path.display().to_string(), SYSTEM_PATH).ok_or_else(|| {
                    format!(
                        "DEVFLEET_QA_BWRAP={} is not an executable file",
                        path.display()
                    )
                })?
            }
            None => find_program("bwrap", SYSTEM_PATH)
                .ok_or_else(|| "bwrap (bubblewrap) is not installed".to_owned())?,
        };
        self.bwrap = Some(bwrap);
        if !root {
            self.prlimit = Some(find_program("prlimit", SYSTEM_PATH).ok_or_else(|| {
                "prlimit (util-linux), which sets the process limit inside the sandbox, \
                 is not installed"
                    .to_owned()
            })?);
        }
        let dir = std::env::temp_dir().join(format!(
            "devfleet-bwrap-probe-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let trial = async {
            std::fs::create_dir_all(&dir)?;
            self.prepare_workspace(&dir, 0)?;
            let out = self
                .run(0, &["true".to_owned()], &dir, &[], Duration::from_secs(20))
                .await;
            Ok::<_, std::io::Error>(out)
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        match trial {
            Ok(o) if o.exit == Exit::Success => Ok(()),
            Ok(o) => Err(format!(
                "a trial run of `true` in bwrap failed ({}): {}",
                o.describe(),
                o.output.trim()
            )),
            Err(e) => Err(format!("cannot try bwrap: {e}")),
        }
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
                limit: None,
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
                c.arg("--");
                if let Some(prlimit) = &self.prlimit {
                    // Set inside the new user namespace, so it counts only
                    // this sandbox's processes (module docs).
                    c.arg(prlimit)
                        .arg(format!("--nproc={0}:{0}", limits.processes))
                        .arg("--");
                }
                c.arg(program).args(args);
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
        let limits_seen = limits.clone();
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
                    limit: None,
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
        let limit = limit_reached(&exit, &output, &limits_seen);
        Outcome {
            exit,
            output,
            truncated: st || et,
            duration: started.elapsed(),
            limit,
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

    /// Settings whose bubblewrap is a program that always fails.
    fn broken_bwrap() -> SandboxSettings {
        SandboxSettings {
            bwrap: Some(PathBuf::from("/bin/false")),
            ..SandboxSettings::default()
        }
    }

    #[tokio::test]
    async fn a_sandbox_that_cannot_start_is_refused_with_the_fix() {
        let err = Sandbox::detect(broken_bwrap(), 1).await.unwrap_err();
        let unavailable = err.downcast_ref::<Unavailable>().expect("an Unavailable");
        assert!(unavailable.problem.contains("trial run"), "{err}");
        let message = err.to_string();
        for fix in [
            "install bubblewrap",
            "DEVFLEET_QA_BWRAP",
            "kernel.unprivileged_userns_clone=1",
            "user.max_user_namespaces",
            "kernel.apparmor_restrict_unprivileged_userns=0",
            "DEVFLEET_QA_ALLOW_UNSANDBOXED=true",
        ] {
            assert!(message.contains(fix), "'{fix}' missing from: {message}");
        }

        let missing = SandboxSettings {
            bwrap: Some(PathBuf::from("/nonexistent/bwrap")),
            ..SandboxSettings::default()
        };
        let err = Sandbox::detect(missing, 1).await.unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/bwrap is not an executable"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_operator_may_opt_out_of_the_sandbox_except_in_bwrap_mode() {
        let allowed = SandboxSettings {
            allow_unsandboxed: true,
            ..broken_bwrap()
        };
        let sandbox = Sandbox::detect(allowed.clone(), 1).await.unwrap();
        assert_eq!(sandbox.isolation(), "none");
        let dir = std::env::temp_dir().join(format!("qa-unit-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        sandbox.prepare_workspace(&dir, 0).unwrap();
        let out = sandbox
            .run(0, &["true".to_owned()], &dir, &[], Duration::from_secs(20))
            .await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(out.exit, Exit::Success, "{}", out.output);

        let required = SandboxSettings {
            mode: SandboxMode::Bwrap,
            ..allowed
        };
        let err = Sandbox::detect(required, 1).await.unwrap_err().to_string();
        assert!(err.starts_with("DEVFLEET_QA_SANDBOX=bwrap"), "{err}");

        let none = SandboxSettings {
            mode: SandboxMode::None,
            ..SandboxSettings::default()
        };
        let err = Sandbox::detect(none, 1).await.unwrap_err().to_string();
        assert!(err.contains("DEVFLEET_QA_ALLOW_UNSANDBOXED=true"), "{err}");
    }

    #[test]
    fn kernel_settings_that_block_user_namespaces_are_named() {
        let root =
            std::env::temp_dir().join(format!("qa-sysctl-{}", uuid::Uuid::new_v4().simple()));
        let write = |rel: &str, value: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, value).unwrap();
        };
        write("kernel/unprivileged_userns_clone", "1\n");
        write("user/max_user_namespaces", "15000\n");
        assert!(userns_blockers(&root).is_empty());
        write("kernel/unprivileged_userns_clone", "0\n");
        write("user/max_user_namespaces", "0\n");
        write("kernel/apparmor_restrict_unprivileged_userns", "1\n");
        assert_eq!(
            userns_blockers(&root),
            [
                "kernel.unprivileged_userns_clone = 0",
                "user.max_user_namespaces = 0",
                "kernel.apparmor_restrict_unprivileged_userns = 1"
            ]
        );
        std::fs::remove_dir_all(&root).unwrap();
        let err = Unavailable {
            problem: "bwrap failed".into(),
            blockers: vec!["user.max_user_namespaces = 0".into()],
        };
        assert!(err.to_string().contains(
            "bwrap failed (this platform blocks user namespaces: user.max_user_namespaces = 0)"
        ));
    }

    #[test]
    fn the_limit_a_command_ran_into_is_named_with_its_setting() {
        let limits = Limits::default();
        let named = |exit: Exit, output: &str| limit_reached(&exit, output, &limits);
        let fork = "  File \"b.py\", line 3, in <module>\n    os.fork()\nBlockingIOError: [Errno 11] Resource temporarily unavailable";
        assert!(named(Exit::Code(1), fork)
            .unwrap()
            .contains("DEVFLEET_QA_PROCESSES"));
        assert!(named(Exit::Timeout, "sh: 1: Cannot fork\n")
            .unwrap()
            .contains("64 processes"));
        assert!(named(Exit::Code(1), "MemoryError\n")
            .unwrap()
            .contains("2048 MiB"));
        assert!(named(Exit::Signal(libc::SIGXFSZ), "")
            .unwrap()
            .contains("DEVFLEET_QA_FILE_SIZE_MB"));
        assert_eq!(named(Exit::Code(1), "AssertionError\n"), None);
        assert_eq!(
            named(Exit::Success, "MemoryError"),
            None,
            "only failures hit limits"
        );
    }

    /// Limits of the outer cap every non-root test runs under: if the
    /// sandbox's own limits fail, these still keep the machine usable.
    const OUTER_PROCESSES: u64 = 256;
    const OUTER_ADDRESS_SPACE: u64 = 3 * 1024 * 1024 * 1024;
    /// The user the non-root tests run as when the tests run as root.
    const NOBODY: u32 = 65_534;

    /// Set in the environment of the re-executed test binary: the test then
    /// runs its body (the bomb) instead of spawning itself again.
    const CAPPED_CHILD: &str = "DEVFLEET_TEST_CAPPED_CHILD";

    /// Runs `body` as a non-root user (nobody, when the tests run as root)
    /// under the outer cap (`prlimit` on processes and address space, and a
    /// wall deadline): the test binary re-executes itself with only the test
    /// `name` selected and [`CAPPED_CHILD`] set, and that child runs `body`.
    /// The parent checks that the child ran the test and that it passed.
    fn capped_as_non_root(name: &str, body: impl FnOnce()) {
        use std::os::unix::process::CommandExt as _;
        if std::env::var_os(CAPPED_CHILD).is_some() {
            non_root::ensure_capped();
            body();
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let mut cmd = std::process::Command::new("prlimit");
        cmd.arg(format!("--nproc={OUTER_PROCESSES}"))
            .arg(format!("--as={OUTER_ADDRESS_SPACE}"))
            .arg("--")
            .arg(exe)
            .args([
                "--exact",
                &format!("sandbox::tests::{name}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("TMPDIR", "/tmp")
            .env("HOME", "/tmp")
            .env(CAPPED_CHILD, "1")
            .current_dir("/tmp")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        let mut child = cmd.spawn().expect("starting the capped test");
        let deadline = Instant::now() + Duration::from_secs(180);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}\n{stderr}");
        assert!(out.status.success(), "{name} failed: {stdout}\n{stderr}");
        assert!(stdout.contains("1 passed"), "{name} did not run: {stdout}");
    }

    /// Runs a bomb (an async body) on a runtime of its own.
    fn block_on(body: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body);
    }

    #[test]
    fn a_fork_bomb_as_a_non_root_user_stops_at_the_sandbox_process_limit() {
        capped_as_non_root(
            "a_fork_bomb_as_a_non_root_user_stops_at_the_sandbox_process_limit",
            || block_on(non_root::fork_bomb()),
        );
    }

    #[test]
    fn an_allocation_bomb_as_a_non_root_user_stops_at_the_memory_limit() {
        capped_as_non_root(
            "an_allocation_bomb_as_a_non_root_user_stops_at_the_memory_limit",
            || block_on(non_root::allocation_bomb()),
        );
    }

    /// The bombs, run only by the tests above in their capped child process.
    mod non_root {
        use super::super::*;
        use super::{OUTER_ADDRESS_SPACE, OUTER_PROCESSES};

        /// Refuses to go on unless this process is not root and runs under
        /// the outer cap: the bombs must never run bare.
        pub(super) fn ensure_capped() {
            let mut rl = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit into a valid struct; geteuid has no preconditions.
            let (nproc, root) = unsafe {
                libc::getrlimit(libc::RLIMIT_NPROC, &mut rl);
                (rl.rlim_cur, libc::geteuid() == 0)
            };
            let mut as_rl = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: as above.
            unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut as_rl) };
            assert!(
                !root && nproc <= OUTER_PROCESSES && as_rl.rlim_cur <= OUTER_ADDRESS_SPACE,
                "run only under the outer cap, by the non-root tests of sandbox::tests"
            );
        }

        async fn sandbox(limits: Limits) -> (Sandbox, PathBuf) {
            ensure_capped();
            let settings = SandboxSettings {
                mode: SandboxMode::Bwrap,
                limits,
                ..SandboxSettings::default()
            };
            let sandbox = Sandbox::detect(settings, 1).await.unwrap();
            let dir =
                std::env::temp_dir().join(format!("qa-bomb-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            (sandbox, dir)
        }

        fn words(w: &[&str]) -> Vec<String> {
            w.iter().map(|s| s.to_string()).collect()
        }

        /// Runs `script` as `bomb.py` in `dir` in the sandbox, printing what
        /// it did.
        async fn run_bomb(sandbox: &Sandbox, dir: &Path, script: &str) -> Outcome {
            std::fs::write(dir.join("bomb.py"), script).unwrap();
            let out = sandbox
                .run(
                    0,
                    &words(&["python3", "bomb.py"]),
                    dir,
                    &[],
                    Duration::from_secs(60),
                )
                .await;
            println!("{}\n{}", out.describe(), out.output);
            out
        }

        /// After a bomb, the worker lives on and can still run checks.
        async fn still_runs_checks(sandbox: &Sandbox, dir: &Path) {
            let ok = sandbox
                .run(
                    0,
                    &words(&["python3", "-c", "print('fine')"]),
                    dir,
                    &[],
                    Duration::from_secs(60),
                )
                .await;
            assert_eq!(ok.exit, Exit::Success, "{}", ok.output);
        }

        const FORK_BOMB: &str = "\
import os, sys, time
top = os.getpid()
while True:
    try:
        pid = os.fork()
    except OSError as e:
        if os.getpid() != top:
            time.sleep(60)
            os._exit(0)
        procs = len([p for p in os.listdir('/proc') if p.isdigit()])
        print(f'processes={procs}', flush=True)
        raise
";

        pub(super) async fn fork_bomb() {
            const LIMIT: u64 = 16;
            let (sandbox, dir) = sandbox(Limits {
                processes: LIMIT,
                ..Limits::default()
            })
            .await;
            // The worker holds more threads than a sandbox may have
            // processes: the limit must not count them.
            let (hold, held) = std::sync::mpsc::channel::<()>();
            let held = std::sync::Arc::new(std::sync::Mutex::new(held));
            let threads: Vec<_> = (0..2 * LIMIT)
                .map(|_| {
                    let held = held.clone();
                    std::thread::spawn(move || {
                        let _ = held.lock().map(|r| r.recv());
                    })
                })
                .collect();
            let out = run_bomb(&sandbox, &dir, FORK_BOMB).await;
            let procs: u64 = out
                .output
                .lines()
                .find_map(|l| l.strip_prefix("processes="))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no process count: {}", out.output));
            assert!(
                procs <= LIMIT,
                "{procs} processes in a sandbox limited to {LIMIT}"
            );
            assert_eq!(out.exit, Exit::Code(1), "{}", out.output);
            assert!(
                out.describe()
                    .contains("process limit (16 processes per sandbox, DEVFLEET_QA_PROCESSES)"),
                "{}",
                out.describe()
            );
            still_runs_checks(&sandbox, &dir).await;
            drop(hold);
            for t in threads {
                t.join().unwrap();
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }

        const ALLOCATION_BOMB: &str = "\
held = []
while len(held) < 64:
    held.append(bytearray(32 * 1024 * 1024))
    print(f'allocated={len(held) * 32}', flush=True)
";

        pub(super) async fn allocation_bomb() {
            const LIMIT_MIB: u64 = 256;
            let (sandbox, dir) = sandbox(Limits {
                memory_bytes: LIMIT_MIB * 1024 * 1024,
                ..Limits::default()
            })
            .await;
            let out = run_bomb(&sandbox, &dir, ALLOCATION_BOMB).await;
            let most: u64 = out
                .output
                .lines()
                .filter_map(|l| l.strip_prefix("allocated="))
                .filter_map(|n| n.trim().parse().ok())
                .max()
                .unwrap_or(0);
            assert!(
                most < LIMIT_MIB,
                "allocated {most} MiB under a {LIMIT_MIB} MiB limit"
            );
            assert_eq!(out.exit, Exit::Code(1), "{}", out.output);
            assert!(out.output.contains("MemoryError"), "{}", out.output);
            assert!(
                out.describe().contains(
                    "memory limit (256 MiB of address space per process, DEVFLEET_QA_MEMORY_MB)"
                ),
                "{}",
                out.describe()
            );
            still_runs_checks(&sandbox, &dir).await;
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
