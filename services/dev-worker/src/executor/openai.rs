//! The openai executor: an OpenAI-compatible chat completions API.
//!
//! `POST {base}/chat/completions` with the model and two messages: a system
//! prompt, and a user prompt holding the path and spec, the skeleton (if
//! any), the generated code of every dependency, and for a fix the QA
//! diagnostics and the previous attempt ([`user_prompt`]). The file is the
//! reply's first fenced code block, else the whole reply
//! ([`extract_file`]).
//!
//! The HTTP side (retries of 429/5xx honouring `Retry-After`, 401/403 and
//! other 4xx failing for good, the API key never shown) is the shared
//! `devfleet-llm` client.

use super::{ExecError, ExecInput, ExecOutput, Executor};
use async_trait::async_trait;
pub use devfleet_llm::{
    extract_file, ApiKey, ChatSettings as OpenAiSettings, DEFAULT_BASE_URL, DEFAULT_MODEL,
};
use devfleet_llm::{ChatClient, ChatMessage, LlmError};
use devfleet_protocol::TaskClass;
use sha2::{Digest, Sha256};

/// The system prompt. Part of the executor identity (and so of cache keys).
pub const SYSTEM_PROMPT: &str = "You are a senior software engineer working on one file of a \
larger project. Write the complete file that is asked for, consistent with the files it \
depends on. Reply with the whole file in a single fenced code block and nothing else.";

/// See the module docs.
#[derive(Debug, Clone)]
pub struct OpenAi {
    client: ChatClient,
}

impl OpenAi {
    /// Builds the HTTP client (rustls).
    pub fn new(settings: OpenAiSettings) -> Result<Self, String> {
        let agent = concat!("devfleet-dev-worker/", env!("CARGO_PKG_VERSION"));
        let client = ChatClient::new(settings, agent).map_err(|e| e.message)?;
        Ok(Self { client })
    }
}

impl From<LlmError> for ExecError {
    fn from(e: LlmError) -> Self {
        ExecError {
            message: e.message,
            retryable: e.retryable,
        }
    }
}

#[async_trait]
impl Executor for OpenAi {
    fn identity(&self) -> String {
        let settings = self.client.settings();
        let prompt = hex::encode(Sha256::digest(SYSTEM_PROMPT.as_bytes()));
        format!(
            "openai/1:{}@{}:t={}:p={}",
            settings.model,
            settings.base_url.trim_end_matches('/'),
            settings.temperature,
            &prompt[..12]
        )
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let messages = [
            ChatMessage::system(SYSTEM_PROMPT),
            ChatMessage::user(user_prompt(input)),
        ];
        let reply = self.client.complete(&messages).await?;
        let file = extract_file(&reply.content);
        if file.trim().is_empty() {
            return Err(ExecError::retryable("the model replied with an empty file"));
        }
        Ok(ExecOutput::file(file))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;
    use devfleet_runtime::backoff::Backoff;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

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
        let file = executor(base).run(&input).await.unwrap().text;
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
        let file = executor(base).run(&test_input("x.txt")).await.unwrap().text;
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
