//! The openai executor: an OpenAI-compatible chat completions API.
//!
//! `POST {base}/chat/completions` with the model, `max_tokens` and two
//! messages: a system prompt, and a user prompt holding the path and spec,
//! the skeleton (if any), the context, and for a fix the QA diagnostics and
//! the previous attempt ([`user_prompt`]). The file is the reply's first
//! fenced code block, else the whole reply ([`extract_file`]).
//!
//! **Context within a budget.** The prompt may use `context_tokens`
//! (estimated, see [`context::estimate_tokens`]); what the task's own part
//! leaves goes to its dependencies (transitive, nearest first) and the base
//! files it imports, whole while they fit, then outlined, then cut
//! ([`context::choose`]); the prompt lists which were which.
//!
//! **Failures.** A reply cut off by `finish_reason: length` is a retryable
//! failure, never a file. A prompt the server refuses as over its context
//! window is a non-retryable failure naming `DEVFLEET_OPENAI_CONTEXT_TOKENS`
//! (the budget is larger than the model's window). The HTTP side (retries
//! of 429/5xx honouring `Retry-After`, 401/403 and other 4xx failing for
//! good, the API key never shown) is the shared `devfleet-llm` client.
//!
//! **Usage.** Every run reports one [`Usage`]: the provider and model, the
//! tokens of the API's `usage` (estimated from the prompt and reply when the
//! server sends none), and the cost from the price table.

use super::breaker::Breaker;
use super::context::{self, estimate_tokens, Context, Inclusion, Source};
use super::rate_limit::RateLimiter;
use super::{ExecError, ExecInput, ExecOutput, Executor};
use async_trait::async_trait;
pub use devfleet_llm::{
    extract_file, ApiKey, ChatSettings as OpenAiSettings, DEFAULT_BASE_URL, DEFAULT_MODEL,
};
use devfleet_llm::{ChatClient, ChatMessage, LlmError};
use devfleet_protocol::{TaskClass, Usage};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The system prompt. Part of the executor identity (and so of cache keys).
pub const SYSTEM_PROMPT: &str = "You are a senior software engineer working on one file of a \
larger project. Write the complete file that is asked for, consistent with the files it \
depends on. Reply with the whole file in a single fenced code block and nothing else.";

/// Default prompt budget, tokens (`DEVFLEET_OPENAI_CONTEXT_TOKENS`).
pub const DEFAULT_CONTEXT_TOKENS: u64 = 16_000;
/// Default longest completion, tokens (`DEVFLEET_OPENAI_MAX_TOKENS`).
pub const DEFAULT_MAX_TOKENS: u32 = 4_096;

/// US dollars per million tokens, prompt and completion.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

impl Price {
    /// The cost of `tokens_in` prompt and `tokens_out` completion tokens.
    pub fn cost(&self, tokens_in: u64, tokens_out: u64) -> f64 {
        (tokens_in as f64 * self.input_per_million + tokens_out as f64 * self.output_per_million)
            / 1_000_000.0
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct OpenAi {
    client: ChatClient,
    provider: String,
    price: Price,
    context_tokens: u64,
    limiter: Option<RateLimiter>,
    breaker: Option<Breaker>,
    /// Called while the breaker is open.
    fallback: Option<Arc<OpenAi>>,
}

impl OpenAi {
    /// Builds the HTTP client (rustls), with no provider name, no price
    /// and the default prompt budget (see the `with_*` methods).
    pub fn new(settings: OpenAiSettings) -> Result<Self, String> {
        let agent = concat!("devfleet-dev-worker/", env!("CARGO_PKG_VERSION"));
        let client = ChatClient::new(settings, agent).map_err(|e| e.message)?;
        Ok(Self {
            client,
            provider: String::new(),
            price: Price::default(),
            context_tokens: DEFAULT_CONTEXT_TOKENS,
            limiter: None,
            breaker: None,
            fallback: None,
        })
    }

    /// Guards the model with a shared circuit breaker; while it is open
    /// runs go to `fallback` (or, without one, to the model regardless).
    pub fn with_breaker(mut self, breaker: Breaker, fallback: Option<OpenAi>) -> Self {
        self.breaker = Some(breaker);
        self.fallback = fallback.map(Arc::new);
        self
    }

    /// Paces every request through fleet-wide rate limits.
    pub fn with_limiter(mut self, limiter: Option<RateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// `provider/model`.
    pub fn target(&self) -> String {
        format!("{}/{}", self.provider, self.client.settings().model)
    }

    /// Names the provider (reported in usage) and its price for this model.
    pub fn with_provider(mut self, name: impl Into<String>, price: Price) -> Self {
        self.provider = name.into();
        self.price = price;
        self
    }

    /// Sets the prompt budget, in estimated tokens.
    pub fn with_context_tokens(mut self, tokens: u64) -> Self {
        self.context_tokens = tokens;
        self
    }

    /// The messages of one run, and the context they hold.
    fn messages(&self, input: &ExecInput) -> ([ChatMessage; 2], Context) {
        let own = estimate_tokens(SYSTEM_PROMPT) + estimate_tokens(&user_prompt(input, None));
        let context = context::choose(input, self.context_tokens.saturating_sub(own));
        let messages = [
            ChatMessage::system(SYSTEM_PROMPT),
            ChatMessage::user(user_prompt(input, Some(&context))),
        ];
        (messages, context)
    }

    fn usage(&self, tokens_in: u64, tokens_out: u64, estimated: bool) -> Usage {
        Usage {
            provider: self.provider.clone(),
            model: self.client.settings().model.clone(),
            tokens_in,
            tokens_out,
            cost_usd: self.price.cost(tokens_in, tokens_out),
            estimated,
        }
    }

    fn error(&self, e: LlmError) -> ExecError {
        if e.context_exceeded {
            return ExecError::fatal(format!(
                "{} (the prompt budget is {} estimated tokens: set \
                 DEVFLEET_OPENAI_CONTEXT_TOKENS, or the provider's context_tokens, below the \
                 model's context window minus the completion's max_tokens)",
                e.message, self.context_tokens
            ));
        }
        e.into()
    }
}

impl From<LlmError> for ExecError {
    fn from(e: LlmError) -> Self {
        ExecError {
            message: e.message,
            retryable: e.retryable,
            usage: Vec::new(),
        }
    }
}

#[async_trait]
impl Executor for OpenAi {
    fn identity(&self) -> String {
        let settings = self.client.settings();
        let prompt = hex::encode(Sha256::digest(SYSTEM_PROMPT.as_bytes()));
        format!(
            "openai/2:{}@{}:t={}:m={}:c={}:p={}",
            settings.model,
            settings.base_url.trim_end_matches('/'),
            settings.temperature,
            settings.max_tokens.unwrap_or(0),
            self.context_tokens,
            &prompt[..12]
        )
    }

    fn estimate(&self, input: &ExecInput) -> Option<Usage> {
        let (messages, _) = self.messages(input);
        let tokens_in = messages.iter().map(|m| estimate_tokens(&m.content)).sum();
        let tokens_out = u64::from(
            self.client
                .settings()
                .max_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS),
        );
        Some(self.usage(tokens_in, tokens_out, true))
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let Some(breaker) = &self.breaker else {
            return self.call(input).await.map_err(|(e, _)| e);
        };
        if let Some(fallback) = &self.fallback {
            if !breaker.allows().await {
                tracing::debug!(target = %self.target(), fallback = %fallback.target(), "breaker open; calling the fallback");
                return fallback.run(input).await;
            }
        }
        let result = self.call(input).await;
        if let Err((_, true)) = &result {
            breaker.failed().await;
        }
        result.map_err(|(e, _)| e)
    }
}

impl OpenAi {
    /// One run against this model. The error says whether it counts
    /// against the model's health (the server failed, not the reply).
    async fn call(&self, input: &ExecInput) -> Result<ExecOutput, (ExecError, bool)> {
        let (messages, context) = self.messages(input);
        if !context.is_empty() {
            tracing::debug!(
                whole = ?context.whole(),
                outlined = ?context.outlined(),
                cut = ?context.cut,
                budget = context.budget,
                "prompt context"
            );
        }
        let reply = match &self.limiter {
            None => self.client.complete(&messages).await,
            Some(limiter) => {
                let tokens = self
                    .estimate(input)
                    .map_or(0, |u| u.tokens_in + u.tokens_out);
                self.client
                    .complete_paced(
                        &messages,
                        || async move {
                            limiter.acquire(tokens).await.map_err(|e| LlmError {
                                message: e,
                                retryable: true,
                                context_exceeded: false,
                            })
                        },
                        |after| limiter.rate_limited(after),
                    )
                    .await
            }
        }
        .map_err(|e| {
            let counts = !e.context_exceeded;
            (self.error(e), counts)
        })?;
        // Spent whether or not the reply is usable: a failure carries it.
        let usage = match reply.usage {
            Some(u) => self.usage(u.prompt_tokens, u.completion_tokens, false),
            None => self.usage(
                messages.iter().map(|m| estimate_tokens(&m.content)).sum(),
                estimate_tokens(&reply.content),
                true,
            ),
        };
        if reply.finish_reason.as_deref() == Some("length") {
            return Err((
                ExecError::retryable(format!(
                    "the model's reply was cut off at its length limit (finish_reason: length, \
                 max_tokens {}); raise DEVFLEET_OPENAI_MAX_TOKENS (or the provider's \
                 max_tokens) if this repeats",
                    self.client
                        .settings()
                        .max_tokens
                        .map_or("unset".to_owned(), |m| m.to_string())
                ))
                .with_usage(vec![usage]),
                false,
            ));
        }
        let file = extract_file(&reply.content);
        if file.trim().is_empty() {
            return Err((
                ExecError::retryable("the model replied with an empty file")
                    .with_usage(vec![usage]),
                false,
            ));
        }
        Ok(ExecOutput {
            text: file,
            usage: vec![usage],
            ..ExecOutput::default()
        })
    }
}

/// The user message: what to write, what it builds on (`context`; `None`
/// leaves that part out, to measure the rest), and for a fix what went
/// wrong last time.
pub fn user_prompt(input: &ExecInput, context: Option<&Context>) -> String {
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
    if let Some(context) = context.filter(|c| !c.is_empty()) {
        p.push_str(&context_section(context));
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

/// The context part of the prompt: what was included whole, outlined and
/// cut, then the files nearest first.
fn context_section(context: &Context) -> String {
    let list = |paths: &[&str]| {
        if paths.is_empty() {
            "none".to_owned()
        } else {
            paths.join(", ")
        }
    };
    let cut: Vec<&str> = context.cut.iter().map(String::as_str).collect();
    let mut p = format!(
        "\nContext (files this one depends on and existing code it imports, nearest first; \
         budget {} tokens, about {} used):\n- included whole: {}\n- outlined (signatures \
         only): {}\n- cut (no room): {}\n",
        context.budget,
        context.used,
        list(&context.whole()),
        list(&context.outlined()),
        list(&cut),
    );
    for entry in &context.entries {
        let source = match entry.source {
            Source::Dependency if entry.distance <= 1 => "dependency, already written".to_owned(),
            Source::Dependency => format!(
                "indirect dependency (distance {}), already written",
                entry.distance
            ),
            Source::Base => "existing code".to_owned(),
        };
        let (how, text) = match &entry.inclusion {
            Inclusion::Whole(t) => ("", t),
            Inclusion::Outline(t) => (", outline", t),
        };
        p.push_str(&format!(
            "\n### {} ({source}{how})\n{}\n",
            entry.path,
            fence(text)
        ));
    }
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
        let p = user_prompt(&input, Some(&context::choose(&input, 10_000)));
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
        let plain = user_prompt(&test_input("app/b.py"), None);
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
            max_tokens: Some(100),
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

/// The executor against the test kit's scripted OpenAI-compatible server.
#[cfg(test)]
mod scripted {
    use super::*;
    use crate::executor::test_input;
    use devfleet_runtime::backoff::Backoff;
    use devfleet_testkit::openai::{Reply, Rule, ScriptedOpenAi};
    use std::time::Duration;

    fn executor(server: &ScriptedOpenAi, context_tokens: u64) -> OpenAi {
        OpenAi::new(OpenAiSettings {
            base_url: server.base_url(),
            model: "m1".into(),
            api_key: None,
            max_requests: 2,
            backoff: Backoff {
                base: Duration::from_millis(10),
                factor: 2.0,
                cap: Duration::from_millis(20),
                jitter: 0.0,
            },
            temperature: 0.0,
            max_tokens: Some(500),
        })
        .unwrap()
        .with_context_tokens(context_tokens)
        .with_provider(
            "local",
            Price {
                input_per_million: 2.0,
                output_per_million: 8.0,
            },
        )
    }

    /// c.py depends on b.py, which depends on a.py (distance 2); c.py
    /// imports the base file lib/util.py.
    fn chain() -> ExecInput {
        let mut input = test_input("app/c.py");
        input.dependencies.insert(
            "app/a.py".into(),
            format!(
                "class Grand:\n    def far_method(self):\n{}",
                "        GRAND_BODY = 1\n".repeat(100)
            ),
        );
        input.dependency_distance.insert("app/a.py".into(), 2);
        input.dependencies.insert(
            "app/b.py".into(),
            "from app.a import Grand\nPARENT_CODE = Grand()\n".into(),
        );
        input.dependency_distance.insert("app/b.py".into(), 1);
        input.base_files.insert(
            "lib/util.py".into(),
            "def base_helper():\n    return 'BASE_BODY'\n".into(),
        );
        input
    }

    #[tokio::test]
    async fn the_prompt_holds_transitive_dependencies_and_base_files_whole_within_the_budget() {
        let server = ScriptedOpenAi::start(vec![
            Rule::any().reply(Reply::file("app/c.py", "C = 1\n").usage(10, 2))
        ])
        .await;
        executor(&server, 100_000).run(&chain()).await.unwrap();
        let prompt = server.requests()[0].prompt();
        for needle in [
            "PARENT_CODE",
            "GRAND_BODY",
            "BASE_BODY",
            "indirect dependency (distance 2)",
        ] {
            assert!(prompt.contains(needle), "missing {needle} in {prompt}");
        }
        assert!(
            prompt.contains("- included whole: app/b.py, lib/util.py, app/a.py"),
            "{prompt}"
        );
        assert!(prompt.contains("- cut (no room): none"), "{prompt}");
        assert_eq!(server.requests()[0].body["max_tokens"], 500);
    }

    #[tokio::test]
    async fn past_the_budget_the_far_dependency_is_outlined() {
        let server = ScriptedOpenAi::start(vec![Rule::any()]).await;
        let input = chain();
        // Room for the task's own prompt and the near files, not for a.py.
        let own = estimate_tokens(SYSTEM_PROMPT) + estimate_tokens(&user_prompt(&input, None));
        executor(&server, own + 120).run(&input).await.unwrap();
        let prompt = server.requests()[0].prompt();
        assert!(
            prompt.contains("PARENT_CODE") && prompt.contains("BASE_BODY"),
            "{prompt}"
        );
        assert!(!prompt.contains("GRAND_BODY"), "{prompt}");
        assert!(prompt.contains("def far_method(self):"), "{prompt}");
        assert!(
            prompt.contains("- outlined (signatures only): app/a.py"),
            "{prompt}"
        );
    }

    #[tokio::test]
    async fn a_reply_cut_off_at_its_length_is_a_retryable_failure_not_a_file() {
        let server = ScriptedOpenAi::start(vec![Rule::any().reply(
            Reply::file("app/c.py", "def half(")
                .finish_reason("length")
                .usage(700, 64),
        )])
        .await;
        let err = executor(&server, 10_000).run(&chain()).await.unwrap_err();
        assert!(err.retryable, "{err}");
        // The cut-off reply was spent: the failure carries its usage.
        assert_eq!(err.usage.len(), 1, "{err:?}");
        assert_eq!((err.usage[0].tokens_in, err.usage[0].tokens_out), (700, 64));
        assert!(!err.usage[0].estimated);
        assert!(
            err.message.contains("finish_reason: length")
                && err.message.contains("DEVFLEET_OPENAI_MAX_TOKENS"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_prompt_over_the_context_window_fails_for_good_naming_the_budget() {
        let server = ScriptedOpenAi::start(vec![Rule::any().reply(Reply::raw(
            400,
            serde_json::json!({"error": {"message": "This model's maximum context length is 8192 tokens", "code": "context_length_exceeded"}}),
        ))])
        .await;
        let err = executor(&server, 10_000).run(&chain()).await.unwrap_err();
        assert!(!err.retryable, "{err}");
        assert!(
            err.message.contains("DEVFLEET_OPENAI_CONTEXT_TOKENS"),
            "{err}"
        );
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn usage_and_cost_are_what_the_server_reported_times_the_prices() {
        let server = ScriptedOpenAi::start(vec![
            Rule::any().reply(Reply::file("app/c.py", "C = 1\n").usage(1_000, 250))
        ])
        .await;
        let out = executor(&server, 10_000).run(&chain()).await.unwrap();
        assert_eq!(out.text, "C = 1\n");
        let (tokens_in, tokens_out) = server.usage_totals();
        assert_eq!((tokens_in, tokens_out), (1_000, 250));
        assert_eq!(
            out.usage,
            vec![Usage {
                provider: "local".into(),
                model: "m1".into(),
                tokens_in,
                tokens_out,
                cost_usd: (1_000.0 * 2.0 + 250.0 * 8.0) / 1e6,
                estimated: false,
            }]
        );
    }

    #[tokio::test]
    async fn without_reported_usage_it_is_estimated_and_the_estimate_covers_the_maximum_reply() {
        let server = ScriptedOpenAi::start(vec![Rule::any().reply(Reply::raw(
            200,
            serde_json::json!({"choices": [{"message": {"role": "assistant", "content": "```\nC = 1\n```"}, "finish_reason": "stop"}]}),
        ))])
        .await;
        let openai = executor(&server, 10_000);
        let input = chain();
        let out = openai.run(&input).await.unwrap();
        let usage = &out.usage[0];
        assert!(
            usage.estimated && usage.tokens_in > 0 && usage.tokens_out > 0,
            "{usage:?}"
        );
        let estimate = openai.estimate(&input).unwrap();
        assert_eq!(estimate.tokens_in, usage.tokens_in);
        assert_eq!(estimate.tokens_out, 500);
        assert_eq!(
            estimate.cost_usd,
            Price {
                input_per_million: 2.0,
                output_per_million: 8.0
            }
            .cost(estimate.tokens_in, 500)
        );
    }

    #[tokio::test]
    async fn a_breaker_opens_on_a_failing_model_and_traffic_moves_to_the_fallback() {
        use crate::executor::breaker::{Breaker, BreakerPolicy};
        let server = ScriptedOpenAi::start(vec![
            Rule::when_model("bad").reply(Reply::status(503)),
            Rule::when_model("good").reply(Reply::file("app/c.py", "C = 1\n").usage(5, 1)),
        ])
        .await;
        let store = devfleet_store::connect_with_prefix(
            &devfleet_testkit::redis_url(),
            &format!("devfleet:{}", devfleet_testkit::unique("t")),
        )
        .await
        .expect("Redis");
        let model = |name: &str| {
            OpenAi::new(OpenAiSettings {
                base_url: server.base_url(),
                model: name.into(),
                max_requests: 1,
                max_tokens: Some(100),
                ..OpenAiSettings::default()
            })
            .unwrap()
            .with_provider("local", Price::default())
        };
        let policy = BreakerPolicy {
            failures: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
        };
        let openai = model("bad").with_breaker(
            Breaker::new(store.clone(), "local/bad".into(), policy),
            Some(model("good")),
        );
        let input = chain();
        for _ in 0..2 {
            let err = openai.run(&input).await.unwrap_err();
            assert!(err.retryable, "{err}");
        }
        // Open now, for every replica sharing the store: a second executor
        // (another worker) goes to the fallback too.
        let out = openai.run(&input).await.unwrap();
        assert_eq!(out.usage[0].model, "good");
        let other = model("bad").with_breaker(
            Breaker::new(store, "local/bad".into(), policy),
            Some(model("good")),
        );
        other.run(&input).await.unwrap();
        let models: Vec<String> = server
            .requests()
            .iter()
            .map(|r| r.model().to_owned())
            .collect();
        assert_eq!(models, ["bad", "bad", "good", "good"]);
    }

    #[tokio::test]
    async fn a_429_drains_the_shared_request_bucket_for_every_replica() {
        use crate::executor::providers::Limits;
        use crate::executor::rate_limit::RateLimiter;
        use devfleet_store::{BucketRate, BucketStep};
        let server = ScriptedOpenAi::start(vec![
            Rule::any().times(1).reply(Reply::rate_limited(1)),
            Rule::any().reply(Reply::file("app/c.py", "C = 1\n")),
        ])
        .await;
        let store = devfleet_store::connect_with_prefix(
            &devfleet_testkit::redis_url(),
            &format!("devfleet:{}", devfleet_testkit::unique("t")),
        )
        .await
        .expect("Redis");
        let window = Duration::from_secs(60);
        let limits = Limits {
            requests_per_minute: Some(100),
            tokens_per_minute: None,
        };
        let limiter = RateLimiter::new(store.clone(), "local/m1".into(), limits, window);
        let openai = executor(&server, 10_000).with_limiter(limiter);
        openai.run(&chain()).await.unwrap();
        assert_eq!(server.requests().len(), 2);
        // Two requests of 100 would leave 98 tokens; the 429's Retry-After
        // emptied the bucket instead, so the next request (any replica's)
        // has to wait.
        let rate = BucketRate {
            capacity: 100,
            window,
        };
        let wait = store
            .token_bucket("rpm:local/m1", rate, BucketStep::Take(1))
            .await
            .unwrap();
        assert!(wait.is_some(), "the bucket was not drained");
    }

    #[tokio::test]
    async fn after_the_cooldown_one_probe_goes_to_the_model_and_its_success_closes_the_breaker() {
        use crate::executor::breaker::{Breaker, BreakerPolicy};
        // The model fails twice (opening the breaker), then recovers.
        let server = ScriptedOpenAi::start(vec![
            Rule::when_model("flaky").times(2).reply(Reply::status(503)),
            Rule::any().reply(Reply::file("app/c.py", "C = 1\n")),
        ])
        .await;
        let store = devfleet_store::connect_with_prefix(
            &devfleet_testkit::redis_url(),
            &format!("devfleet:{}", devfleet_testkit::unique("t")),
        )
        .await
        .expect("Redis");
        let model = |name: &str| {
            OpenAi::new(OpenAiSettings {
                base_url: server.base_url(),
                model: name.into(),
                max_requests: 1,
                ..OpenAiSettings::default()
            })
            .unwrap()
        };
        let policy = BreakerPolicy {
            failures: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(300),
        };
        let openai = model("flaky").with_breaker(
            Breaker::new(store, "x/flaky".into(), policy),
            Some(model("steady")),
        );
        let input = chain();
        openai.run(&input).await.unwrap_err();
        openai.run(&input).await.unwrap_err();
        // Open: runs go to the fallback until the cooldown is over and one
        // run probes the model.
        let seen = devfleet_testkit::wait_for("the probe", Duration::from_secs(30), || async {
            openai.run(&input).await.unwrap();
            let models: Vec<String> = server
                .requests()
                .iter()
                .map(|r| r.model().to_owned())
                .collect();
            (models.last().map(String::as_str) == Some("flaky")).then_some(models)
        })
        .await;
        // (Whether a fallback run came first depends on the machine's speed;
        // the other breaker test shows the open state.)
        assert_eq!(seen[..2], ["flaky", "flaky"]);
        assert!(
            seen[2..seen.len() - 1].iter().all(|m| m == "steady"),
            "{seen:?}"
        );
        // The probe succeeded: closed, the model is called again.
        openai.run(&input).await.unwrap();
        let last = server.requests().last().unwrap().model().to_owned();
        assert_eq!(last, "flaky");
    }
}
