//! The command executor: runs an agent CLI (or any program) per task, in
//! the task's workspace, in a sandbox.
//!
//! What runs comes from an agent profile ([`profile`]; `DEVFLEET_COMMAND_PROFILE`)
//! or a bare command line (`DEVFLEET_COMMAND`, split like a shell would but
//! never run through one). Placeholders in the profile's words are filled
//! per task, each word stays one argument.
//!
//! # What the agent gets
//!
//! * **Its working directory**: the task's workspace when the worker
//!   prepared one ([`ExecInput::workspace`]: the base snapshot plus the
//!   dependencies' files), edited in place; otherwise a fresh private
//!   scratch directory.
//! * **The prompt** ([`prompt`]), Markdown, in `$DEVFLEET_PROMPT_FILE`, and
//!   on stdin when the profile says `stdin: prompt` (`stdin: json`, the
//!   default, sends the task as JSON, an [`ExecInput`]; also always in
//!   `$DEVFLEET_TASK_FILE`). These files live in a private control
//!   directory outside the workspace, so they are never mistaken for
//!   changes to the project.
//! * **Variables**: `DEVFLEET_TASK_PATH`, `DEVFLEET_TASK_SPEC`,
//!   `DEVFLEET_TASK_ATTEMPT`, `DEVFLEET_TASK_CLASS`, `DEVFLEET_PLAN_ID`,
//!   `DEVFLEET_WORKSPACE`, `DEVFLEET_PROMPT_FILE`, `DEVFLEET_TASK_FILE`,
//!   `DEVFLEET_OUTPUT_FILE`, `DEVFLEET_USAGE_FILE`, plus `PATH`, `HOME`,
//!   `TMPDIR`, `LANG` and the profile's allow-list (`env:`) of the worker's
//!   variables: the environment is otherwise cleared.
//! * **The sandbox** ([`sandbox`]): bubblewrap with the network, the
//!   workspace and control directory writable, system paths read-only,
//!   its own PID namespace. Without it (the operator opted out) the same
//!   directories and variables apply, but nothing is isolated.
//!
//! # What counts as the result
//!
//! The task's file is `$DEVFLEET_OUTPUT_FILE` if the agent wrote it, else
//! `<workspace>/<path>` if it exists (a regular file inside the
//! workspace, not a link out of it); else stdout (as a plain program would
//! print the file) without a prepared workspace, or with one when the
//! profile says `stdout_is_file` (a bare `DEVFLEET_COMMAND` does) and
//! stdout is not empty; else the run failed (retryable: it did not write
//! its file). Other files it changed
//! in the workspace are the worker's business (it compares the workspace).
//! Usage: `$DEVFLEET_USAGE_FILE` if written (JSON `{"model", "tokens_in",
//! "tokens_out"}`, optional `"provider"`, `"cost_usd"`), else the
//! profile's per-run estimate (`estimated: true`), else none.
//!
//! Exit status 0 is success. Status 65 (`EX_DATAERR`: the task itself is
//! unworkable) is a non-retryable failure; any other status, a signal or
//! the profile's timeout is retryable. stdout and stderr are capped (4 MiB
//! by default); going over fails the attempt. The program runs in its own
//! process group, and the whole group (with the sandbox, its whole PID
//! namespace) is killed when the attempt ends, times out (the worker drops
//! the future) or the worker shuts down.

pub mod profile;
pub mod prompt;
pub mod sandbox;

use super::{ExecError, ExecInput, ExecOutput, Executor};
use async_trait::async_trait;
use devfleet_protocol::Usage;
use profile::{AgentProfile, StdinMode, Values};
use sandbox::AgentSandbox;
use serde::Deserialize;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Default cap on stdout, stderr and the output file, each.
pub const DEFAULT_OUTPUT_CAP: usize = 4 * 1024 * 1024;

/// Exit status meaning "do not retry" (sysexits `EX_DATAERR`).
pub const EXIT_NOT_RETRYABLE: i32 = 65;

/// How much of stderr goes into an error message.
const STDERR_TAIL_CHARS: usize = 2_000;

/// Largest usage file read.
const USAGE_FILE_CAP: usize = 64 * 1024;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    profile: AgentProfile,
    output_cap: usize,
    /// `None`: unsandboxed (the operator opted out, or a unit test).
    sandbox: Option<AgentSandbox>,
}

impl CommandExecutor {
    /// Splits a command line into program and arguments, shell-style
    /// (quotes and backslashes), without involving a shell; unsandboxed
    /// until [`CommandExecutor::sandboxed`].
    pub fn from_command_line(line: &str, output_cap: usize) -> Result<Self, String> {
        let words = shlex::split(line)
            .ok_or_else(|| format!("DEVFLEET_COMMAND '{line}' has unbalanced quotes"))?;
        if words.is_empty() {
            return Err("DEVFLEET_COMMAND is empty".to_owned());
        }
        Ok(Self::new(AgentProfile::from_words(words), output_cap))
    }

    /// Runs `profile`, unsandboxed until [`CommandExecutor::sandboxed`].
    pub fn new(profile: AgentProfile, output_cap: usize) -> Self {
        Self {
            profile,
            output_cap: output_cap.max(1),
            sandbox: None,
        }
    }

    /// Runs every attempt in `sandbox` (`None`: unsandboxed).
    pub fn sandboxed(mut self, sandbox: Option<AgentSandbox>) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Adds names to the profile's allow-list of variables.
    pub fn allow_env(mut self, names: impl IntoIterator<Item = String>) -> Self {
        for n in names {
            if !self.profile.env.contains(&n) {
                self.profile.env.push(n);
            }
        }
        self
    }

    /// The program and its arguments (with placeholders).
    pub fn words(&self) -> &[String] {
        &self.profile.command
    }

    /// The profile it runs.
    pub fn profile(&self) -> &AgentProfile {
        &self.profile
    }

    /// Whether attempts run in bubblewrap.
    pub fn is_sandboxed(&self) -> bool {
        self.sandbox.is_some()
    }

    /// The variables the agent runs with (see the module docs).
    fn environment(&self, input: &ExecInput, run: &Run, values: &Values) -> Vec<(String, String)> {
        let sandboxed = self.sandbox.is_some();
        let (home, tmp) = if sandboxed {
            (sandbox::SANDBOX_HOME.to_owned(), "/tmp".to_owned())
        } else {
            (
                run.control.path().join("home").display().to_string(),
                run.control.path().join("tmp").display().to_string(),
            )
        };
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), sandbox::DEFAULT_PATH.into()),
            ("HOME".into(), home),
            ("TMPDIR".into(), tmp),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        let devfleet = [
            ("DEVFLEET_TASK_PATH", input.path.clone()),
            ("DEVFLEET_TASK_SPEC", input.spec.clone()),
            ("DEVFLEET_TASK_ATTEMPT", input.attempt.to_string()),
            (
                "DEVFLEET_TASK_CLASS",
                format!("{:?}", input.class).to_lowercase(),
            ),
            ("DEVFLEET_PLAN_ID", input.plan_id.clone()),
            ("DEVFLEET_WORKSPACE", run.workspace.display().to_string()),
            (
                "DEVFLEET_PROMPT_FILE",
                run.prompt_file().display().to_string(),
            ),
            ("DEVFLEET_TASK_FILE", run.task_file().display().to_string()),
            (
                "DEVFLEET_OUTPUT_FILE",
                run.output_file().display().to_string(),
            ),
            (
                "DEVFLEET_USAGE_FILE",
                run.usage_file().display().to_string(),
            ),
        ];
        env.extend(devfleet.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let mut set = |k: &str, v: String| match env.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v,
            None => env.push((k.to_owned(), v)),
        };
        for name in &self.profile.env {
            if let Ok(v) = std::env::var(name) {
                set(name, v);
            }
        }
        for (k, v) in &self.profile.set_env {
            set(k, values.fill(v));
        }
        env
    }
}

/// The directories and files of one attempt.
struct Run {
    /// Prompt, task, output and usage files (removed on drop).
    control: ScratchDir,
    /// The agent's working directory (absolute).
    workspace: PathBuf,
    /// The scratch workspace when the worker prepared none (removed on drop).
    _scratch: Option<ScratchDir>,
    /// Set once the agent started: from then on a failed run has used
    /// something (what it reported, else the profile's estimate).
    started: AtomicBool,
}

impl Run {
    fn prompt_file(&self) -> PathBuf {
        self.control.path().join("prompt.md")
    }
    fn task_file(&self) -> PathBuf {
        self.control.path().join("task.json")
    }
    fn output_file(&self) -> PathBuf {
        self.control.path().join("output")
    }
    fn usage_file(&self) -> PathBuf {
        self.control.path().join("usage.json")
    }
}

/// What an agent may write to `$DEVFLEET_USAGE_FILE`.
#[derive(Debug, Deserialize)]
struct ReportedUsage {
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    tokens_in: u64,
    tokens_out: u64,
    #[serde(default)]
    cost_usd: f64,
}

#[async_trait]
impl Executor for CommandExecutor {
    fn identity(&self) -> String {
        let p = &self.profile;
        format!(
            "command/2:{}",
            serde_json::to_string(&(&p.command, format!("{:?}", p.stdin), &p.set_env))
                .unwrap_or_default()
        )
    }

    fn estimate(&self, _input: &ExecInput) -> Option<Usage> {
        self.profile.estimate()
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let run = self.prepare(input)?;
        let result = async {
            let attempt = self.attempt(input, &run);
            let out = match self.profile.timeout() {
                Some(limit) => tokio::time::timeout(limit, attempt).await.map_err(|_| {
                    ExecError::retryable(format!(
                        "agent '{}' timed out after {:?} (its profile's timeout_seconds) and was killed",
                        self.profile.name, limit
                    ))
                })?,
                None => attempt.await,
            }?;
            self.result_text(input, &run, out).await
        }
        .await;
        // An agent that started used something, whether or not it wrote
        // the file: a failure carries it too.
        let usage: Vec<Usage> = if run.started.load(Ordering::Relaxed) {
            self.usage(&run).await.into_iter().collect()
        } else {
            Vec::new()
        };
        match result {
            Ok(text) => Ok(ExecOutput {
                text,
                other_files: Default::default(),
                usage,
            }),
            Err(e) => Err(e.with_usage(usage)),
        }
    }
}

impl CommandExecutor {
    /// Creates the control directory (prompt and task files) and, without a
    /// prepared workspace, a scratch one.
    fn prepare(&self, input: &ExecInput) -> Result<Run, ExecError> {
        let scratch_err = |e: std::io::Error| {
            ExecError::retryable(format!("cannot create a scratch directory: {e}"))
        };
        let control = ScratchDir::create("devfleet-agent").map_err(scratch_err)?;
        let (workspace, scratch) = match &input.workspace {
            Some(w) => {
                let w = w.canonicalize().map_err(|e| {
                    ExecError::retryable(format!(
                        "the task workspace {} is unusable: {e}",
                        w.display()
                    ))
                })?;
                (w, None)
            }
            None => {
                let s = ScratchDir::create("devfleet-cmd").map_err(scratch_err)?;
                (s.path().to_path_buf(), Some(s))
            }
        };
        let run = Run {
            control,
            workspace,
            _scratch: scratch,
            started: AtomicBool::new(false),
        };
        let write = |path: PathBuf, bytes: &[u8]| {
            std::fs::write(&path, bytes)
                .map_err(|e| ExecError::retryable(format!("cannot write {}: {e}", path.display())))
        };
        let prompt = prompt::render(input, input.workspace.is_some());
        write(run.prompt_file(), prompt.as_bytes())?;
        let json = serde_json::to_vec(input)
            .map_err(|e| ExecError::fatal(format!("cannot encode the task as JSON: {e}")))?;
        write(run.task_file(), &json)?;
        if self.sandbox.is_none() {
            for d in ["home", "tmp"] {
                std::fs::create_dir(run.control.path().join(d)).map_err(scratch_err)?;
            }
        }
        Ok(run)
    }

    /// Starts the agent and waits for it: its stdout on success.
    async fn attempt(&self, input: &ExecInput, run: &Run) -> Result<Vec<u8>, ExecError> {
        let prompt = std::fs::read_to_string(run.prompt_file()).unwrap_or_default();
        let (prompt_file, task_file, output_file, usage_file) = (
            run.prompt_file(),
            run.task_file(),
            run.output_file(),
            run.usage_file(),
        );
        let values = Values {
            input,
            prompt: &prompt,
            prompt_file: &prompt_file,
            workspace: &run.workspace,
            task_file: &task_file,
            output_file: &output_file,
            usage_file: &usage_file,
        };
        let words: Vec<String> = self
            .profile
            .command
            .iter()
            .map(|w| values.fill(w))
            .collect();
        let env = self.environment(input, run, &values);
        let program = &words[0];
        let mut cmd = match &self.sandbox {
            Some(sb) => {
                let mut c = tokio::process::Command::new(sb.program());
                c.args(sb.args(
                    &run.workspace,
                    run.control.path(),
                    &self.profile.ro_binds,
                    &env,
                    &words,
                ));
                c.env_clear();
                c
            }
            None => {
                let mut c = tokio::process::Command::new(program);
                c.args(&words[1..])
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)));
                c
            }
        };
        let stdin_bytes = match self.profile.stdin {
            StdinMode::Json => Some(std::fs::read(&task_file).unwrap_or_default()),
            StdinMode::Prompt => Some(prompt.clone().into_bytes()),
            StdinMode::None => None,
        };
        cmd.current_dir(&run.workspace)
            .stdin(if stdin_bytes.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| ExecError::fatal(format!("cannot start '{program}': {e}")))?;
        // Declared after `child`, so dropped before it: the group goes first.
        let _group = ProcessGroup(child.id());
        run.started.store(true, Ordering::Relaxed);

        let stdin = child.stdin.take();
        let write_stdin = async move {
            if let (Some(mut stdin), Some(bytes)) = (stdin, stdin_bytes) {
                // A program that does not read its stdin is fine: ignore EPIPE.
                let _ = stdin.write_all(&bytes).await;
                let _ = stdin.shutdown().await;
            }
            Ok::<(), Overflow>(())
        };
        let cap = self.output_cap;
        let read_out = read_capped(child.stdout.take(), cap, "stdout");
        let read_err = read_capped(child.stderr.take(), cap, "stderr");
        let (_, stdout, stderr) =
            tokio::try_join!(write_stdin, read_out, read_err).map_err(|o| {
                ExecError::retryable(format!(
                    "'{program}' wrote more than {cap} bytes to {}",
                    o.0
                ))
            })?;
        let status = child
            .wait()
            .await
            .map_err(|e| ExecError::retryable(format!("waiting for '{program}' failed: {e}")))?;

        if !status.success() {
            let tail = tail(&String::from_utf8_lossy(&stderr), STDERR_TAIL_CHARS);
            let message = match status.code() {
                // bwrap itself reports a program it cannot exec as status 1
                // with this message: as unfixable as a failed spawn.
                Some(_) if self.sandbox.is_some() && tail.starts_with("bwrap: execvp") => {
                    // The agent itself never started.
                    run.started.store(false, Ordering::Relaxed);
                    return Err(ExecError::fatal(format!(
                        "cannot start '{program}' in the sandbox (is it installed, and its \
                         folder in the profile's ro_binds?): {tail}"
                    )));
                }
                Some(code) => format!("'{program}' exited with status {code}: {tail}"),
                None => format!("'{program}' was killed by a signal: {tail}"),
            };
            return Err(if status.code() == Some(EXIT_NOT_RETRYABLE) {
                ExecError::fatal(message)
            } else {
                ExecError::retryable(message)
            });
        }
        Ok(stdout)
    }

    /// The task's file: the output file, else the workspace's file, else
    /// (without a prepared workspace) stdout.
    async fn result_text(
        &self,
        input: &ExecInput,
        run: &Run,
        stdout: Vec<u8>,
    ) -> Result<String, ExecError> {
        let cap = self.output_cap;
        let name = &self.profile.name;
        let bytes = match read_output_file(&run.output_file(), cap).await? {
            Some(bytes) => bytes,
            None => match workspace_file(&run.workspace, &input.path, cap)? {
                Some(bytes) => bytes,
                None if input.workspace.is_none()
                    || (self.profile.stdout_is_file && !stdout.is_empty()) =>
                {
                    stdout
                }
                None => {
                    return Err(ExecError::retryable(format!(
                        "agent '{name}' exited successfully but did not write '{}' in its \
                         workspace (nor $DEVFLEET_OUTPUT_FILE)",
                        input.path
                    )))
                }
            },
        };
        String::from_utf8(bytes)
            .map_err(|_| ExecError::fatal(format!("'{name}' produced a file that is not UTF-8")))
    }

    /// What the agent reported, else the profile's estimate.
    async fn usage(&self, run: &Run) -> Option<Usage> {
        let path = run.usage_file();
        if let Ok(Some(bytes)) = read_output_file(&path, USAGE_FILE_CAP).await {
            match serde_json::from_slice::<ReportedUsage>(&bytes) {
                Ok(r) => {
                    return Some(Usage {
                        provider: r
                            .provider
                            .unwrap_or_else(|| self.profile.usage.provider.clone()),
                        model: r.model.unwrap_or_else(|| self.profile.model()),
                        tokens_in: r.tokens_in,
                        tokens_out: r.tokens_out,
                        cost_usd: r.cost_usd,
                        estimated: false,
                    })
                }
                Err(e) => tracing::warn!(
                    agent = %self.profile.name,
                    "ignoring a malformed $DEVFLEET_USAGE_FILE ({e}); using the profile's estimate"
                ),
            }
        }
        self.profile.estimate()
    }
}

/// `workspace/path` when it is a regular file inside the workspace (never
/// through a link out of it: the agent controls the workspace).
fn workspace_file(workspace: &Path, path: &str, cap: usize) -> Result<Option<Vec<u8>>, ExecError> {
    let rel = Path::new(path);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ExecError::fatal(format!(
            "the task path '{path}' is not relative to the workspace"
        )));
    }
    let full = workspace.join(rel);
    let Ok(real) = full.canonicalize() else {
        return Ok(None);
    };
    let meta = std::fs::symlink_metadata(&real)
        .map_err(|e| ExecError::retryable(format!("cannot read '{path}': {e}")))?;
    if !real.starts_with(workspace) || !meta.is_file() {
        return Err(ExecError::retryable(format!(
            "'{path}' in the workspace is not a regular file inside it (a link out of it, or a folder)"
        )));
    }
    if meta.len() > u64::try_from(cap).unwrap_or(u64::MAX) {
        return Err(ExecError::retryable(format!(
            "'{path}' is {} bytes; the limit is {cap}",
            meta.len()
        )));
    }
    std::fs::read(&real)
        .map(Some)
        .map_err(|e| ExecError::retryable(format!("cannot read '{path}': {e}")))
}

/// Which stream went over the cap.
#[derive(Debug)]
struct Overflow(&'static str);

async fn read_capped<R: AsyncRead + Unpin>(
    reader: Option<R>,
    cap: usize,
    name: &'static str,
) -> Result<Vec<u8>, Overflow> {
    let Some(reader) = reader else {
        return Ok(Vec::new());
    };
    let mut buf = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    // A read error (the child closed oddly) ends the stream; the exit
    // status says whether the attempt worked.
    let _ = reader.take(limit).read_to_end(&mut buf).await;
    if buf.len() > cap {
        return Err(Overflow(name));
    }
    Ok(buf)
}

async fn read_output_file(path: &Path, cap: usize) -> Result<Option<Vec<u8>>, ExecError> {
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    if !meta.is_file() {
        return Err(ExecError::fatal(
            "DEVFLEET_OUTPUT_FILE is not a regular file",
        ));
    }
    if meta.len() > u64::try_from(cap).unwrap_or(u64::MAX) {
        return Err(ExecError::retryable(format!(
            "the output file is {} bytes; the limit is {cap}",
            meta.len()
        )));
    }
    tokio::fs::read(path)
        .await
        .map(Some)
        .map_err(|e| ExecError::retryable(format!("cannot read the output file: {e}")))
}

fn tail(s: &str, max_chars: usize) -> String {
    let s = s.trim();
    let count = s.chars().count();
    if count <= max_chars {
        return s.to_owned();
    }
    let skip = count - max_chars;
    format!("…{}", s.chars().skip(skip).collect::<String>())
}

/// Kills a child's whole process group when dropped, so grandchildren an
/// agent started do not outlive the attempt.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: killpg has no memory-safety preconditions; the group
            // id is the child's pid (it was started with process_group(0)).
            // ESRCH (the group is already gone) is expected and ignored.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
    }
}

/// A private temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(prefix: &str) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        }
        #[cfg(not(unix))]
        std::fs::create_dir(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;
    use crate::executor::ExecInput;
    use std::time::{Duration, Instant};

    fn sh(script: &str) -> CommandExecutor {
        CommandExecutor::new(
            AgentProfile::from_words(vec!["sh".into(), "-c".into(), script.into()]),
            1024,
        )
    }

    #[test]
    fn command_lines_split_like_a_shell_without_one() {
        let c = CommandExecutor::from_command_line(r#"agent --say "hello world" 'a;b' $HOME"#, 10)
            .unwrap();
        assert_eq!(c.words(), ["agent", "--say", "hello world", "a;b", "$HOME"]);
        assert!(CommandExecutor::from_command_line("a 'b", 10).is_err());
        assert!(CommandExecutor::from_command_line("   ", 10).is_err());
    }

    #[tokio::test]
    async fn stdout_is_the_file_and_the_task_arrives_as_json_on_stdin() {
        let mut input = test_input("app/x.py");
        input.spec = "$(touch /tmp/pwned); `rm -rf /`".into();
        let out = sh("cat").run(&input).await.unwrap().text;
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["path"], "app/x.py");
        assert_eq!(json["spec"], input.spec);
    }

    #[tokio::test]
    async fn the_output_file_wins_over_stdout() {
        let out = sh(
            r#"echo noise; printf 'file for %s' "$DEVFLEET_TASK_PATH" > "$DEVFLEET_OUTPUT_FILE""#,
        )
        .run(&test_input("a.py"))
        .await
        .unwrap()
        .text;
        assert_eq!(out, "file for a.py");
    }

    #[tokio::test]
    async fn exit_status_decides_and_65_is_not_retryable() {
        let err = sh("echo broken >&2; exit 3")
            .run(&test_input("a.py"))
            .await
            .unwrap_err();
        assert!(err.retryable);
        assert!(
            err.message.contains("status 3") && err.message.contains("broken"),
            "{err}"
        );
        let err = sh("exit 65").run(&test_input("a.py")).await.unwrap_err();
        assert!(!err.retryable);
    }

    #[tokio::test]
    async fn a_failed_run_carries_what_the_agent_used_and_one_that_never_started_nothing() {
        let err = sh(r#"printf '{"model": "m1", "tokens_in": 120, "tokens_out": 30}' > "$DEVFLEET_USAGE_FILE"; exit 3"#)
            .run(&test_input("a.py"))
            .await
            .unwrap_err();
        assert!(err.retryable, "{err}");
        assert_eq!(err.usage.len(), 1, "{err:?}");
        let u = &err.usage[0];
        assert_eq!(
            (u.model.as_str(), u.tokens_in, u.tokens_out),
            ("m1", 120, 30)
        );
        assert!(!u.estimated);
        let c = CommandExecutor::from_command_line("/nonexistent/agent", 10).unwrap();
        let err = c.run(&test_input("a.py")).await.unwrap_err();
        assert!(err.usage.is_empty(), "never started: {err:?}");
    }

    #[tokio::test]
    async fn output_over_the_cap_fails_the_attempt() {
        let err = sh("head -c 5000 /dev/zero")
            .run(&test_input("a.py"))
            .await
            .unwrap_err();
        assert!(err.message.contains("more than 1024 bytes"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_program_is_not_retryable() {
        let c = CommandExecutor::from_command_line("/nonexistent/agent", 10).unwrap();
        let err = c.run(&test_input("a.py")).await.unwrap_err();
        assert!(
            !err.retryable && err.message.contains("cannot start"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_whole_process_group() {
        let dir = std::env::temp_dir().join(format!("devfleet-cmd-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let marker = dir.join("grandchild-alive");
        // The grandchild would write the marker after 1.5 s unless killed.
        let script = format!("(sleep 1.5; touch '{}') & sleep 30", marker.display());
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            sh(&script).run(&test_input("a.py")),
        )
        .await;
        assert!(r.is_err(), "should have timed out");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert!(!marker.exists(), "the grandchild outlived the attempt");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The directory holding `fake-agent.py` (bound read-only in the sandbox).
    fn agents_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/agents")
            .canonicalize()
            .unwrap()
    }

    /// `fake-agent.py` through a profile, in the real sandbox.
    fn fake_agent(extra: &str) -> CommandExecutor {
        let dir = agents_dir().display().to_string();
        let profile = AgentProfile::parse(&format!(
            "name: fake\ncommand: [/usr/bin/python3, '{dir}/fake-agent.py']\nstdin: prompt\n\
             ro_binds: ['{dir}']\n{extra}"
        ))
        .unwrap();
        let sandbox =
            AgentSandbox::detect(None, vec![]).expect("bwrap (scripts/test.sh installs it)");
        CommandExecutor::new(profile, 1 << 20).sandboxed(Some(sandbox))
    }

    /// A workspace holding a base file, and a task for `app/main.py` in it.
    fn workspace_task(spec: &str) -> (tempfile::TempDir, ExecInput) {
        let ws = tempfile::tempdir().unwrap();
        std::fs::create_dir(ws.path().join("lib")).unwrap();
        std::fs::write(ws.path().join("lib/util.py"), "X = 1\n").unwrap();
        let mut input = test_input("app/main.py");
        input.spec = spec.into();
        input.workspace = Some(ws.path().to_path_buf());
        (ws, input)
    }

    /// Whether a process whose command line holds `token` is running.
    fn running(token: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(token))
                .unwrap_or(false)
        })
    }

    /// Eventually (30 s bound) no process holds `token`.
    async fn none_left(token: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while running(token) {
            assert!(
                Instant::now() < deadline,
                "a process holding {token} outlived the task"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn a_sandboxed_agent_edits_its_workspace_in_place_and_reports_usage() {
        std::env::set_var("DEVFLEET_TEST_ALLOWED_KEY", "sk-allowed");
        std::env::set_var("DEVFLEET_TEST_SECRET", "sk-secret");
        let agent = fake_agent("env: [DEVFLEET_TEST_ALLOWED_KEY]");
        let (ws, input) = workspace_task(
            "the main module\nagent: env DEVFLEET_TEST_ALLOWED_KEY\nagent: env DEVFLEET_TEST_SECRET",
        );
        let out = agent.run(&input).await.unwrap();
        let on_disk = std::fs::read_to_string(ws.path().join("app/main.py")).unwrap();
        assert_eq!(out.text, on_disk, "the file is read from the workspace");
        for want in [
            "# prompt: # Task: write `app/main.py`",
            "# saw: lib/util.py",
            "# env DEVFLEET_TEST_ALLOWED_KEY=sk-allowed",
            "# env DEVFLEET_TEST_SECRET=(unset)",
        ] {
            assert!(out.text.contains(want), "{want} missing:\n{}", out.text);
        }
        let changelog = std::fs::read_to_string(ws.path().join("CHANGELOG.md")).unwrap();
        assert_eq!(changelog, "- fake-agent wrote app/main.py\n");
        assert_eq!(out.usage.len(), 1);
        assert_eq!(out.usage[0].model, "fake-1");
        assert!(!out.usage[0].estimated && out.usage[0].tokens_in > 0);
        assert!(
            out.other_files.is_empty(),
            "the worker, not the executor, diffs the workspace"
        );
    }

    #[tokio::test]
    async fn a_sandboxed_agent_cannot_write_outside_its_workspace() {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let read_only = agents_dir().join(format!("escaped-{token}"));
        let host_tmp = std::env::temp_dir().join(format!("escaped-{token}"));
        let (ws, input) = workspace_task(&format!(
            "agent: write-outside {}\nagent: write-outside {}",
            read_only.display(),
            host_tmp.display()
        ));
        let out = fake_agent("").run(&input).await.unwrap();
        assert!(
            out.text
                .contains(&format!("# outside {}: denied", read_only.display())),
            "{}",
            out.text
        );
        assert!(
            !read_only.exists() && !host_tmp.exists(),
            "a write escaped the sandbox"
        );
        drop(ws);
    }

    #[tokio::test]
    async fn a_background_child_does_not_outlive_the_agent() {
        let token = format!("devfleet-bg-{}", uuid::Uuid::new_v4().simple());
        let (_ws, input) = workspace_task(&format!("agent: spawn {token}"));
        let out = fake_agent("").run(&input).await.unwrap();
        assert!(
            out.text.contains(&format!("# spawned {token}")),
            "{}",
            out.text
        );
        none_left(&token).await;
    }

    #[tokio::test]
    async fn a_failing_agent_is_retryable_and_an_unworkable_task_is_not() {
        let agent = fake_agent("");
        let (_ws, mut input) = workspace_task("agent: fail-attempts 1");
        let err = agent.run(&input).await.unwrap_err();
        assert!(err.retryable, "{err}");
        assert!(
            err.message.contains("failing attempt 1 on purpose"),
            "{err}"
        );
        input.attempt = 2;
        let out = agent.run(&input).await.unwrap();
        assert!(out.text.contains("attempt 2"), "{}", out.text);
        let (_ws, input) = workspace_task("agent: fatal");
        let err = agent.run(&input).await.unwrap_err();
        assert!(
            !err.retryable && err.message.contains("unworkable"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_profile_timeout_kills_the_agent_and_its_children() {
        let token = format!("devfleet-slow-{}", uuid::Uuid::new_v4().simple());
        let agent = fake_agent("timeout_seconds: 1");
        let (ws, input) = workspace_task(&format!("agent: spawn {token}\nagent: sleep 120"));
        let err = agent.run(&input).await.unwrap_err();
        assert!(err.retryable && err.message.contains("timed out"), "{err}");
        none_left(&token).await;
        assert!(!ws.path().join("app/main.py").exists());
    }

    #[tokio::test]
    async fn without_a_workspace_the_agent_works_in_a_scratch_directory() {
        let mut input = test_input("pkg/mod.py");
        input.spec = "a module".into();
        let out = fake_agent("").run(&input).await.unwrap();
        assert!(
            out.text.starts_with("# written by fake-agent"),
            "{}",
            out.text
        );
        assert!(
            !out.text.contains("# saw:"),
            "an empty scratch directory: {}",
            out.text
        );
    }

    #[tokio::test]
    async fn a_bare_command_that_prints_its_file_works_in_a_workspace_too() {
        let ws = tempfile::tempdir().unwrap();
        let mut input = test_input("a.py");
        input.workspace = Some(ws.path().to_path_buf());
        let out = sh("echo 'x = 1'").run(&input).await.unwrap();
        assert_eq!(out.text, "x = 1\n");
        let err = sh("true").run(&input).await.unwrap_err();
        assert!(err.message.contains("did not write 'a.py'"), "{err}");
    }

    #[tokio::test]
    async fn an_agent_that_did_not_write_its_file_failed() {
        let ws = tempfile::tempdir().unwrap();
        let mut input = test_input("a.py");
        input.workspace = Some(ws.path().to_path_buf());
        let chatty = CommandExecutor::new(
            AgentProfile {
                stdout_is_file: false,
                ..AgentProfile::from_words(vec!["sh".into(), "-c".into(), "echo chatter".into()])
            },
            1024,
        );
        let err = chatty.run(&input).await.unwrap_err();
        assert!(
            err.retryable && err.message.contains("did not write 'a.py'"),
            "{err}"
        );
        let err = sh(r#"ln -s /etc/passwd "$DEVFLEET_TASK_PATH""#)
            .run(&input)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("not a regular file inside it"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_prompt_is_on_stdin_in_prompt_mode_and_in_variables() {
        let profile = AgentProfile::parse(
            "command: [sh, -c, 'cat > \"$DEVFLEET_OUTPUT_FILE\"; echo \"$DEVFLEET_TASK_SPEC|{path}\" >&2; exit 3']\nstdin: prompt",
        )
        .unwrap();
        let mut input = test_input("a.py");
        input.spec = "the spec".into();
        let err = CommandExecutor::new(profile.clone(), 1 << 20)
            .run(&input)
            .await
            .unwrap_err();
        assert!(err.message.contains("the spec|a.py"), "{err}");
        let mut ok = profile;
        ok.command[2] = "cat > \"$DEVFLEET_OUTPUT_FILE\"".into();
        let out = CommandExecutor::new(ok, 1 << 20).run(&input).await.unwrap();
        assert!(out.text.starts_with("# Task: write `a.py`"), "{}", out.text);
        assert!(out.text.contains("the spec"), "{}", out.text);
    }

    /// aider, installed from PyPI by scripts/test.sh, run through the
    /// shipped profile, in the sandbox, against the scripted server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aider_edits_the_workspace_through_the_shipped_profile() {
        use devfleet_testkit::openai::{Reply, Rule, ScriptedOpenAi};
        assert!(
            Path::new("/opt/devfleet-aider/bin/aider").exists(),
            "aider is missing: scripts/test.sh installs it (python3 -m venv /opt/devfleet-aider \
             && /opt/devfleet-aider/bin/pip install aider-chat)"
        );
        let written = "from lib.util import X\n\n\ndef main():\n    return X + 41\n";
        let server = ScriptedOpenAi::start(vec![
            Rule::any().reply(Reply::file("app/main.py", written).usage(900, 60))
        ])
        .await;
        std::env::set_var("OPENAI_API_BASE", server.base_url());
        std::env::set_var("OPENAI_API_KEY", "sk-scripted");
        std::env::set_var("AIDER_MODEL", "openai/scripted-coder");
        let profile = AgentProfile::load(&agents_dir().join("aider.yaml")).unwrap();
        let sandbox = AgentSandbox::detect(None, vec![]).expect("bwrap");
        let aider = CommandExecutor::new(profile, 1 << 20).sandboxed(Some(sandbox));
        let (ws, input) = workspace_task("main() returns 42 using lib.util.X");
        let out = aider.run(&input).await.unwrap();
        assert_eq!(out.text, written);
        assert_eq!(
            std::fs::read_to_string(ws.path().join("app/main.py")).unwrap(),
            written
        );
        let requests = server.requests();
        assert!(!requests.is_empty());
        assert!(
            requests
                .iter()
                .any(|r| r.prompt().contains("main() returns 42 using lib.util.X")),
            "aider sent the task prompt"
        );
        assert!(requests.iter().all(|r| r.model() == "scripted-coder"));
        let mut left: Vec<String> = std::fs::read_dir(ws.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["app", "lib"],
            "aider left no history in the workspace"
        );
        let usage = &out.usage[0];
        assert!(usage.estimated && usage.tokens_in == 4000, "{usage:?}");
    }
}
