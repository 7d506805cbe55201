//! The openai executor: an OpenAI-compatible chat completions API.
//!
//! `POST {base}/chat/completions` with the model and two messages: a system
//! prompt, and a user prompt holding the path and spec, the skeleton (if
//! any), the generated code of every dependency, and for a fix the QA
//! diagnostics and the previous attempt ([`user_prompt`]). The file is the
//! reply's first fenced code block, else the whole reply
//! ([`extract_file`]).
//!
//! 429 and 5xx answers (and connection failures) are retried, waiting as
//! long as `Retry-After` says (capped) or else the shared backoff; 401/403
//! and other 4xx fail the attempt for good. The API key is sent as a bearer
//! token marked sensitive, and is never logged, Debug-printed or put in an
//! error message. Without a key no `Authorization` header is sent (local
//! OpenAI-compatible servers).

use super::{ExecError, ExecInput, Executor};
use async_trait::async_trait;
use devfleet_protocol::TaskClass;
use devfleet_runtime::backoff::Backoff;
use sha2::{Digest, Sha256};
use std::fmt;
use std::time::Duration;

/// The public OpenAI endpoint, the default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The default model.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Largest response body read.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The system prompt. Part of the executor identity (and so of cache keys).
pub const SYSTEM_PROMPT: &str = "You are a senior software engineer working on one file of a \
larger project. Write the complete file that is asked for, consistent with the files it \
depends on. Reply with the whole file in a single fenced code block and nothing else.";

/// An API key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// `DEVFLEET_OPENAI_API_KEY`, else `OPENAI_API_KEY`; empty counts as unset.
    pub fn from_env() -> Option<Self> {
        ["DEVFLEET_OPENAI_API_KEY", "OPENAI_API_KEY"]
            .into_iter()
            .filter_map(|v| std::env::var(v).ok())
            .find(|k| !k.trim().is_empty())
            .map(|k| Self(k.trim().to_owned()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where and how to call the API.
#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<ApiKey>,
    /// Requests per attempt, counting the first (429/5xx retries).
    pub max_requests: u32,
    /// Wait between retries when the server gives no `Retry-After`.
    pub backoff: Backoff,
    pub temperature: f32,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key: None,
            max_requests: 6,
            backoff: Backoff {
                base: Duration::from_secs(1),
                factor: 2.0,
                cap: Duration::from_secs(60),
                jitter: 0.5,
            },
            temperature: 0.2,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct OpenAi {
    client: reqwest::Client,
    settings: OpenAiSettings,
}

impl OpenAi {
    /// Builds the HTTP client (rustls).
    pub fn new(settings: OpenAiSettings) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .user_agent(concat!("devfleet-dev-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self { client, settings })
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.settings.base_url.trim_end_matches('/')
        )
    }

    /// One request; `Ok(Err(delay))` asks for a retry after `delay`.
    async fn request(
        &self,
        body: &serde_json::Value,
        attempt: u32,
    ) -> Result<Result<String, Duration>, ExecError> {
        let mut request = self.client.post(self.url()).json(body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(&key.0);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e.without_url(), "chat completions request failed");
                return Ok(Err(self.settings.backoff.delay(attempt)));
            }
        };
        let status = response.status();
        if status.as_u16() == 429 || status.is_server_error() {
            let delay = retry_after(response.headers())
                .unwrap_or_else(|| self.settings.backoff.delay(attempt))
                .min(MAX_RETRY_AFTER);
            tracing::warn!(
                status = status.as_u16(),
                ?delay,
                "chat completions busy; retrying"
            );
            return Ok(Err(delay));
        }
        let bytes = read_body(response).await?;
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(ExecError::fatal(format!(
                "the chat completions API refused the credentials ({status}); check \
                 DEVFLEET_OPENAI_API_KEY"
            )));
        }
        if !status.is_success() {
            return Err(ExecError::fatal(format!(
                "the chat completions API answered {status}: {}",
                excerpt(&bytes)
            )));
        }
        let reply: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ExecError::retryable(format!("the chat completions reply is not JSON: {e}"))
        })?;
        let content = reply
            .pointer("/choices/0/message/content")
            .and_then(|c| c.as_str())
            .ok_or_else(|| {
                ExecError::retryable(format!(
                    "the chat completions reply has no choices[0].message.content: {}",
                    excerpt(&bytes)
                ))
            })?;
        Ok(Ok(content.to_owned()))
    }
}

#[async_trait]
impl Executor for OpenAi {
    fn identity(&self) -> String {
        let prompt = hex::encode(Sha256::digest(SYSTEM_PROMPT.as_bytes()));
        format!(
            "openai/1:{}@{}:t={}:p={}",
            self.settings.model,
            self.settings.base_url.trim_end_matches('/'),
            self.settings.temperature,
            &prompt[..12]
        )
    }

    async fn run(&self, input: &ExecInput) -> Result<String, ExecError> {
        let body = serde_json::json!({
            "model": self.settings.model,
            "temperature": self.settings.temperature,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user_prompt(input)},
            ],
        });
        let requests = self.settings.max_requests.max(1);
        for attempt in 1..=requests {
            match self.request(&body, attempt).await? {
                Ok(reply) => {
                    let file = extract_file(&reply);
                    if file.trim().is_empty() {
                        return Err(ExecError::retryable("the model replied with an empty file"));
                    }
                    return Ok(file);
                }
                Err(delay) if attempt < requests => tokio::time::sleep(delay).await,
                Err(_) => {}
            }
        }
        Err(ExecError::retryable(format!(
            "the chat completions API stayed busy or unreachable for {requests} requests"
        )))
    }
}

/// `Retry-After` in seconds (the HTTP-date form falls back to the backoff).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, ExecError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        ExecError::retryable(format!("reading the reply failed: {}", e.without_url()))
    })? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ExecError::retryable(format!(
                "the reply is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut s: String = text.chars().take(500).collect();
    if text.chars().count() > 500 {
        s.push('…');
    }
    s
}

/// The user message: what to write, what it builds on, and for a fix what
/// went wrong last time.
pub fn user_prompt(input: &ExecInput) -> String {
    let mut p = format!(
        "Write the file `{}`.\n\nSpecification:\n{}\n",
        input.path, input.spec
    );
    if let Some(content) = &input.content {
        p.push_str(&format!(
            "\nStart from this skeleton (keep its imports and signatures):\n{}\n",
            fence(content)
        ));
    }
    if !input.dependencies.is_empty() {
        p.push_str("\nFiles it depends on, already written:\n");
        for (path, text) in &input.dependencies {
            p.push_str(&format!("\n### {path}\n{}\n", fence(text)));
        }
    }
    let is_fix = input.class == TaskClass::Fix;
    if is_fix || input.attempt > 1 {
        if let Some(diagnostics) = &input.diagnostics {
            p.push_str(&format!(
                "\nAttempt {} {}. Diagnostics:\n{}\n",
                input.attempt.saturating_sub(1).max(1),
                if is_fix {
                    "failed its checks"
                } else {
                    "failed"
                },
                fence(diagnostics)
            ));
        }
        if let Some(previous) = &input.previous {
            p.push_str(&format!(
                "\nThe previous attempt:\n{}\nFix it.\n",
                fence(previous)
            ));
        }
    }
    p.push_str("\nReply with the complete file in one fenced code block.\n");
    p
}

/// Wraps text in a fence longer than any backtick run inside it.
fn fence(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let ticks = "`".repeat(longest.max(2) + 1);
    let newline = if text.ends_with('\n') { "" } else { "\n" };
    format!("{ticks}\n{text}{newline}{ticks}")
}

/// The file in a model's reply: the first fenced code block (its info
/// string dropped), else the whole reply. Ends with a newline.
pub fn extract_file(reply: &str) -> String {
    let lines: Vec<&str> = reply.lines().collect();
    let open = lines.iter().position(|l| l.trim_start().starts_with("```"));
    let body = match open {
        Some(start) => {
            let opener = lines[start].trim_start();
            let ticks = opener.chars().take_while(|&c| c == '`').count();
            let closing = "`".repeat(ticks);
            let rest = &lines[start + 1..];
            let end = rest
                .iter()
                .position(|l| {
                    let t = l.trim();
                    t.starts_with(&closing) && t.chars().all(|c| c == '`')
                })
                .unwrap_or(rest.len());
            rest[..end].join("\n")
        }
        None => reply.trim().to_owned(),
    };
    if body.is_empty() {
        body
    } else {
        body + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    #[test]
    fn the_key_never_shows() {
        let key = ApiKey::new("sk-secret-123");
        let settings = OpenAiSettings {
            api_key: Some(key.clone()),
            ..OpenAiSettings::default()
        };
        let shown = format!("{key} {key:?} {settings:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn extracts_the_first_fenced_block_else_the_whole_reply() {
        let reply =
            "Here you go:\n```python\nimport os\nprint(os.getcwd())\n```\nand more\n```\nx\n```";
        assert_eq!(extract_file(reply), "import os\nprint(os.getcwd())\n");
        assert_eq!(extract_file("  just code  \n"), "just code\n");
        assert_eq!(extract_file("```\nunterminated\n"), "unterminated\n");
        let nested = "````md\n```py\nx\n```\n````";
        assert_eq!(extract_file(nested), "```py\nx\n```\n");
    }

    #[test]
    fn a_fix_prompt_carries_diagnostics_and_the_previous_attempt() {
        let mut input = test_input("app/b.py");
        input
            .dependencies
            .insert("app/a.py".into(), "A = 1\n".into());
        input.class = TaskClass::Fix;
        input.attempt = 2;
        input.diagnostics = Some("NameError: B".into());
        input.previous = Some("print(B)\n".into());
        let p = user_prompt(&input);
        for needle in [
            "app/b.py",
            "a spec",
            "### app/a.py",
            "A = 1",
            "NameError: B",
            "print(B)",
        ] {
            assert!(p.contains(needle), "missing {needle} in {p}");
        }
        let plain = user_prompt(&test_input("app/b.py"));
        assert!(!plain.contains("Diagnostics"));
    }

    /// One scripted HTTP/1.1 answer.
    struct Scripted {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    }

    /// A tiny HTTP/1.1 server: answers requests in order from `script`
    /// (one connection each) and records every request body and
    /// Authorization header.
    async fn serve(script: Vec<Scripted>) -> (String, Arc<Mutex<Vec<(String, Option<String>)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for answer in script {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                let mut auth = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "authorization" => auth = Some(value.trim().to_owned()),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).await.unwrap();
                log.lock()
                    .unwrap()
                    .push((String::from_utf8_lossy(&body).into_owned(), auth));
                let mut out = format!(
                    "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                    answer.status,
                    answer.body.len()
                );
                for (k, v) in &answer.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&answer.body);
                let mut stream = reader.into_inner();
                let _ = stream.write_all(out.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        (format!("http://{addr}/v1"), seen)
    }

    fn completion(content: &str) -> String {
        serde_json::json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        })
        .to_string()
    }

    fn executor(base_url: String) -> OpenAi {
        OpenAi::new(OpenAiSettings {
            base_url,
            model: "test-model".into(),
            api_key: Some(ApiKey::new("sk-test")),
            max_requests: 3,
            backoff: Backoff {
                base: Duration::from_millis(10),
                factor: 2.0,
                cap: Duration::from_millis(50),
                jitter: 0.0,
            },
            temperature: 0.0,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn openai_executor_returns_the_code_block_and_sends_dependency_code() {
        let (base, seen) = serve(vec![Scripted {
            status: 200,
            headers: vec![],
            body: completion("Sure.\n```python\nfrom app.a import A\nB = A + 1\n```"),
        }])
        .await;
        let mut input = test_input("app/b.py");
        input.spec = "B is A plus one".into();
        input
            .dependencies
            .insert("app/a.py".into(), "A = 41\n".into());
        let file = executor(base).run(&input).await.unwrap();
        assert_eq!(file, "from app.a import A\nB = A + 1\n");
        let seen = seen.lock().unwrap();
        let (body, auth) = &seen[0];
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["model"], "test-model");
        let prompt = body["messages"][1]["content"].as_str().unwrap();
        assert!(
            prompt.contains("A = 41") && prompt.contains("app/a.py"),
            "{prompt}"
        );
        assert!(prompt.contains("B is A plus one"), "{prompt}");
        assert_eq!(auth.as_deref(), Some("Bearer sk-test"));
    }

    #[tokio::test]
    async fn openai_executor_honours_retry_after_on_429_then_succeeds() {
        let (base, seen) = serve(vec![
            Scripted {
                status: 429,
                headers: vec![("retry-after", "1".into())],
                body: r#"{"error":{"message":"slow down"}}"#.into(),
            },
            Scripted {
                status: 200,
                headers: vec![],
                body: completion("```\nok\n```"),
            },
        ])
        .await;
        let started = std::time::Instant::now();
        let file = executor(base).run(&test_input("x.txt")).await.unwrap();
        assert_eq!(file, "ok\n");
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn openai_executor_retries_5xx_and_gives_up_retryably() {
        let busy = || Scripted {
            status: 503,
            headers: vec![],
            body: "{}".into(),
        };
        let (base, seen) = serve(vec![busy(), busy(), busy()]).await;
        let err = executor(base).run(&test_input("x.txt")).await.unwrap_err();
        assert!(err.retryable, "{err}");
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn openai_executor_fails_for_good_on_a_refused_key_without_showing_it() {
        let (base, _) = serve(vec![Scripted {
            status: 401,
            headers: vec![],
            body: r#"{"error":"bad key sk-test"}"#.into(),
        }])
        .await;
        let err = executor(base).run(&test_input("x.txt")).await.unwrap_err();
        assert!(!err.retryable);
        assert!(!err.message.contains("sk-test"), "{err}");
    }
}
