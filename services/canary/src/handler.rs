//! Calling the shift and rollback handlers.
//!
//! A command handler is split into words like a shell would (quotes and
//! backslashes), then `{weight}` and `{deployment}` are replaced inside
//! each word, and the program runs directly, never through a shell: no
//! value can add arguments, redirect or chain commands. A webhook handler
//! gets an HTTP POST of JSON. Either succeeds only on exit status 0 or an
//! HTTP 2xx within the timeout.

use devfleet_protocol::Handler;
use std::process::Stdio;
use std::time::Duration;

/// Bytes of a failed command's output kept in its error.
const OUTPUT_TAIL_BYTES: usize = 2000;

/// What a handler is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Shift,
    Rollback,
}

impl Action {
    /// The name used in webhook bodies and `DEVFLEET_CANARY_ACTION`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Shift => "shift",
            Action::Rollback => "rollback",
        }
    }
}

/// One handler invocation.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub action: Action,
    pub deployment: &'a str,
    pub plan_id: Option<&'a str>,
    /// Percentage of traffic for the new version (0 on rollback).
    pub weight: u8,
    /// Stage index (into `stages`).
    pub stage: usize,
    pub stages: &'a [u8],
}

/// Why a handler call failed. Variants name the command or URL.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    #[error("command '{command}' does not split into words: {reason}")]
    Split { command: String, reason: String },
    #[error("command '{command}' is empty")]
    Empty { command: String },
    #[error("cannot start '{program}': {reason}")]
    Spawn { program: String, reason: String },
    #[error("'{program}' did not finish within {timeout:?} and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("'{program}' exited with {status}: {output}")]
    Exit {
        program: String,
        status: String,
        output: String,
    },
    #[error("POST {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("POST {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// The argument vector of a command handler: split into words, then each
/// word's `{weight}` and `{deployment}` replaced.
pub fn command_argv(
    command: &str,
    weight: u8,
    deployment: &str,
) -> Result<Vec<String>, HandlerError> {
    let words = shell_words::split(command).map_err(|e| HandlerError::Split {
        command: command.to_owned(),
        reason: e.to_string(),
    })?;
    if words.first().is_none_or(|w| w.is_empty()) {
        return Err(HandlerError::Empty {
            command: command.to_owned(),
        });
    }
    let weight = weight.to_string();
    Ok(words
        .into_iter()
        .map(|w| {
            w.replace("{weight}", &weight)
                .replace("{deployment}", deployment)
        })
        .collect())
}

/// Runs handlers. Cheap to clone.
#[derive(Clone)]
pub struct Handlers {
    http: reqwest::Client,
    timeout: Duration,
}

impl Handlers {
    /// Handlers that give up (and kill a command) after `timeout`.
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the webhook HTTP client: {e}"))?;
        Ok(Self { http, timeout })
    }

    /// Calls `handler` once; returns a short description of what it did.
    pub async fn call(&self, handler: &Handler, call: &Call<'_>) -> Result<String, HandlerError> {
        match handler {
            Handler::Command { command } => self.run_command(command, call).await,
            Handler::Webhook { webhook } => self.post(webhook, call).await,
        }
    }

    async fn run_command(&self, command: &str, call: &Call<'_>) -> Result<String, HandlerError> {
        let argv = command_argv(command, call.weight, call.deployment)?;
        let program = argv[0].clone();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("DEVFLEET_CANARY_ACTION", call.action.as_str())
            .env("DEVFLEET_CANARY_DEPLOYMENT", call.deployment)
            .env("DEVFLEET_CANARY_WEIGHT", call.weight.to_string())
            .env("DEVFLEET_CANARY_STAGE", call.stage.to_string());
        if let Some(plan) = call.plan_id {
            cmd.env("DEVFLEET_CANARY_PLAN_ID", plan);
        }
        let child = cmd.spawn().map_err(|e| HandlerError::Spawn {
            program: program.clone(),
            reason: e.to_string(),
        })?;
        // Dropping the future on timeout drops the child, which kills it.
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| HandlerError::Timeout {
                program: program.clone(),
                timeout: self.timeout,
            })?
            .map_err(|e| HandlerError::Spawn {
                program: program.clone(),
                reason: e.to_string(),
            })?;
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
            if text.trim().is_empty() {
                text = String::from_utf8_lossy(&output.stdout).into_owned();
            }
            return Err(HandlerError::Exit {
                program,
                status: output.status.to_string(),
                output: tail(text.trim(), OUTPUT_TAIL_BYTES),
            });
        }
        Ok(format!("{} exited 0", argv.join(" ")))
    }

    async fn post(&self, url: &str, call: &Call<'_>) -> Result<String, HandlerError> {
        let body = serde_json::json!({
            "action": call.action.as_str(),
            "deployment": call.deployment,
            "plan_id": call.plan_id,
            "weight": call.weight,
            "stage": call.stage,
            "stages": call.stages,
        });
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| HandlerError::Request {
                url: url.to_owned(),
                reason: error_chain(&e),
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(HandlerError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
                body: tail(body.trim(), OUTPUT_TAIL_BYTES),
            });
        }
        Ok(format!("POST {url} answered {}", status.as_u16()))
    }
}

/// An error and its sources, `: `-separated (what went wrong at every
/// level of an HTTP failure: connect, TLS, DNS).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The last `max` bytes of `text` (on a character boundary).
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(weight: u8) -> Call<'static> {
        Call {
            action: Action::Shift,
            deployment: "web-1",
            plan_id: None,
            weight,
            stage: 0,
            stages: &[10, 100],
        }
    }

    #[test]
    fn placeholders_are_replaced_per_word_never_re_split() {
        let argv = command_argv(
            r#"./shift.sh --weight={weight} "name {deployment}" '$(rm -rf /)'"#,
            25,
            "web-1",
        )
        .unwrap();
        assert_eq!(
            argv,
            vec!["./shift.sh", "--weight=25", "name web-1", "$(rm -rf /)"]
        );
    }

    #[test]
    fn unbalanced_quotes_and_empty_commands_are_errors() {
        assert!(matches!(
            command_argv("x 'open", 1, "d"),
            Err(HandlerError::Split { .. })
        ));
        assert!(matches!(
            command_argv("   ", 1, "d"),
            Err(HandlerError::Empty { .. })
        ));
    }

    #[tokio::test]
    async fn command_runs_without_a_shell_and_gets_the_weight() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let handlers = Handlers::new(Duration::from_secs(10)).unwrap();
        // `;` would chain commands in a shell; here it is just an argument.
        let pwned = dir.path().join("pwned");
        let handler = Handler::Command {
            command: format!(
                "/bin/sh -c 'printf \"%s|%s|%s\" \"$1\" \"$2\" \"$DEVFLEET_CANARY_WEIGHT\" > {}' sh {{weight}} ';touch {}'",
                out.display(),
                pwned.display()
            ),
        };
        handlers.call(&handler, &call(50)).await.unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(written, format!("50|;touch {}|50", pwned.display()));
        assert!(!dir.path().join("pwned").exists());
    }

    #[tokio::test]
    async fn failing_command_reports_status_and_output() {
        let handlers = Handlers::new(Duration::from_secs(10)).unwrap();
        let handler = Handler::Command {
            command: "/bin/sh -c 'echo no route to lb >&2; exit 3'".into(),
        };
        let err = handlers.call(&handler, &call(10)).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no route to lb") && text.contains('3'),
            "{text}"
        );
    }

    #[tokio::test]
    async fn slow_command_is_killed_at_the_timeout() {
        let handlers = Handlers::new(Duration::from_millis(200)).unwrap();
        let handler = Handler::Command {
            command: "sleep 30".into(),
        };
        let err = handlers.call(&handler, &call(10)).await.unwrap_err();
        assert!(matches!(err, HandlerError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let handlers = Handlers::new(Duration::from_secs(1)).unwrap();
        let handler = Handler::Command {
            command: "/nonexistent/shift {weight}".into(),
        };
        let err = handlers.call(&handler, &call(10)).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/shift"), "{err}");
    }
}
