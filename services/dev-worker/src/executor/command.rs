//! The command executor: runs a configured agent program per task.
//!
//! The command line comes from configuration (`DEVFLEET_COMMAND`, e.g.
//! `my-agent --model x`), split into words like a shell would, but never run
//! through a shell: nothing from a task (path, spec, content) ever becomes
//! part of a command line. The program gets:
//!
//! * the task as JSON on stdin (an [`ExecInput`]);
//! * `DEVFLEET_OUTPUT_FILE`, a path in a fresh private directory (also its
//!   working directory): if the program writes that file, it is the result,
//!   otherwise stdout is; plus `DEVFLEET_TASK_PATH`, `DEVFLEET_TASK_ATTEMPT`
//!   and `DEVFLEET_PLAN_ID` for convenience. It inherits the worker's
//!   environment otherwise.
//!
//! Exit status 0 is success. Status 65 (`EX_DATAERR`: the task itself is
//! unworkable) is a non-retryable failure; any other status or a signal is
//! retryable. stdout and stderr are capped (4 MiB by default); going over
//! fails the attempt. The program runs in its own process group, and the
//! whole group is killed when the attempt ends, times out (the worker drops
//! the future) or the worker shuts down.

use super::{ExecError, ExecInput, ExecOutput, Executor};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Default cap on stdout, stderr and the output file, each.
pub const DEFAULT_OUTPUT_CAP: usize = 4 * 1024 * 1024;

/// Exit status meaning "do not retry" (sysexits `EX_DATAERR`).
pub const EXIT_NOT_RETRYABLE: i32 = 65;

/// How much of stderr goes into an error message.
const STDERR_TAIL_CHARS: usize = 2_000;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    words: Vec<String>,
    output_cap: usize,
}

impl CommandExecutor {
    /// Splits a command line into program and arguments, shell-style
    /// (quotes and backslashes), without involving a shell.
    pub fn from_command_line(line: &str, output_cap: usize) -> Result<Self, String> {
        let words = shlex::split(line)
            .ok_or_else(|| format!("DEVFLEET_COMMAND '{line}' has unbalanced quotes"))?;
        if words.is_empty() {
            return Err("DEVFLEET_COMMAND is empty".to_owned());
        }
        Ok(Self {
            words,
            output_cap: output_cap.max(1),
        })
    }

    /// The program and its arguments.
    pub fn words(&self) -> &[String] {
        &self.words
    }
}

#[async_trait]
impl Executor for CommandExecutor {
    fn identity(&self) -> String {
        format!(
            "command/1:{}",
            serde_json::to_string(&self.words).unwrap_or_default()
        )
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let dir = ScratchDir::create()
            .map_err(|e| ExecError::retryable(format!("cannot create a scratch directory: {e}")))?;
        let output_file = dir.path().join("output");
        let stdin_json = serde_json::to_vec(input)
            .map_err(|e| ExecError::fatal(format!("cannot encode the task as JSON: {e}")))?;
        let program = &self.words[0];

        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.words[1..])
            .current_dir(dir.path())
            .env("DEVFLEET_OUTPUT_FILE", &output_file)
            .env("DEVFLEET_TASK_PATH", &input.path)
            .env("DEVFLEET_TASK_ATTEMPT", input.attempt.to_string())
            .env("DEVFLEET_PLAN_ID", &input.plan_id)
            .stdin(Stdio::piped())
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

        let stdin = child.stdin.take();
        let write_stdin = async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read its stdin is fine: ignore EPIPE.
                let _ = stdin.write_all(&stdin_json).await;
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
                Some(code) => format!("'{program}' exited with status {code}: {tail}"),
                None => format!("'{program}' was killed by a signal: {tail}"),
            };
            return Err(if status.code() == Some(EXIT_NOT_RETRYABLE) {
                ExecError::fatal(message)
            } else {
                ExecError::retryable(message)
            });
        }
        let bytes = match read_output_file(&output_file, cap).await? {
            Some(bytes) => bytes,
            None => stdout,
        };
        String::from_utf8(bytes)
            .map(ExecOutput::file)
            .map_err(|_| ExecError::fatal(format!("'{program}' produced a file that is not UTF-8")))
    }
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
    fn create() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("devfleet-cmd-{}", uuid::Uuid::new_v4()));
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
    use std::time::{Duration, Instant};

    fn sh(script: &str) -> CommandExecutor {
        CommandExecutor {
            words: vec!["sh".into(), "-c".into(), script.into()],
            output_cap: 1024,
        }
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
}
