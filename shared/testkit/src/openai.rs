//! A scripted OpenAI-compatible HTTP server for tests of every LLM path.
//!
//! There is no network here, so the product's real HTTP client (and every
//! code path after it) talks to this server on loopback instead of a
//! provider. It answers `POST …/chat/completions` by **rules** tried in
//! order (the first whose matcher accepts the request and that has uses
//! left answers) and records **every request** (body, headers, time), so a
//! test can assert on the prompts it was sent and on usage totals.
//!
//! Without a matching rule the server answers with a default reply: the
//! file named on a `Path:` line of the last user message (or `file.txt`)
//! as a fenced code block holding a comment, with usage counted from the
//! lengths of the prompt and reply. `GET …/models` lists the models of the
//! rules plus `scripted`.
//!
//! ```no_run
//! # async fn f() {
//! use devfleet_testkit::openai::{Reply, Rule, ScriptedOpenAi};
//! let server = ScriptedOpenAi::start(vec![
//!     Rule::when_prompt_contains("flaky").times(1).reply(Reply::status(503)),
//!     Rule::any().reply(Reply::file("app.py", "print('hi')\n").usage(100, 20)),
//! ])
//! .await;
//! let base_url = server.base_url(); // http://127.0.0.1:PORT/v1
//! // … run the product against base_url …
//! assert_eq!(server.requests().len(), 2);
//! # }
//! ```

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a rule matches on.
#[derive(Clone)]
enum Matcher {
    Any,
    PromptContains(String),
    Model(String),
    Both(Box<Matcher>, Box<Matcher>),
}

impl Matcher {
    fn accepts(&self, request: &Recorded) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::PromptContains(needle) => request.prompt().contains(needle.as_str()),
            Matcher::Model(model) => request.model() == model,
            Matcher::Both(a, b) => a.accepts(request) && b.accepts(request),
        }
    }
}

/// One answer of the server.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    content: Option<String>,
    finish_reason: String,
    usage: Option<(u64, u64)>,
    headers: Vec<(String, String)>,
    delay: Duration,
    body: Option<Value>,
}

impl Reply {
    /// A 200 completion whose message is `content`, `finish_reason: stop`.
    pub fn text(content: impl Into<String>) -> Self {
        Self {
            status: 200,
            content: Some(content.into()),
            finish_reason: "stop".into(),
            usage: None,
            headers: Vec::new(),
            delay: Duration::ZERO,
            body: None,
        }
    }

    /// A 200 completion holding `text` as the file `path` in one fenced
    /// block (the form the `openai` executor and aider's `whole` edit
    /// format read).
    pub fn file(path: &str, text: &str) -> Self {
        Self::text(fenced(path, text))
    }

    /// An error status with an OpenAI-style error body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            content: None,
            finish_reason: String::new(),
            usage: None,
            headers: Vec::new(),
            delay: Duration::ZERO,
            body: Some(json!({
                "error": {"message": format!("scripted status {status}"), "type": "scripted"}
            })),
        }
    }

    /// A 429 with `Retry-After: seconds`.
    pub fn rate_limited(seconds: u64) -> Self {
        Self::status(429).header("retry-after", &seconds.to_string())
    }

    /// Sets `finish_reason` (e.g. `length` for a reply cut off).
    pub fn finish_reason(mut self, reason: &str) -> Self {
        self.finish_reason = reason.into();
        self
    }

    /// Reports this usage (`prompt_tokens`, `completion_tokens`) instead of
    /// the default count.
    pub fn usage(mut self, prompt_tokens: u64, completion_tokens: u64) -> Self {
        self.usage = Some((prompt_tokens, completion_tokens));
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Waits this long before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Answers with exactly this JSON body (and the status), nothing added.
    pub fn raw(status: u16, body: Value) -> Self {
        Self {
            body: Some(body),
            ..Self::status(status)
        }
    }
}

/// A matcher, the reply it gives, and how many times it may answer.
#[derive(Clone)]
pub struct Rule {
    matcher: Matcher,
    reply: Option<Reply>,
    times: Option<usize>,
    used: usize,
}

impl Rule {
    /// Matches every request.
    pub fn any() -> Self {
        Self::with(Matcher::Any)
    }

    /// Matches requests whose messages (any role) contain `needle`.
    pub fn when_prompt_contains(needle: &str) -> Self {
        Self::with(Matcher::PromptContains(needle.into()))
    }

    /// Matches requests for `model`.
    pub fn when_model(model: &str) -> Self {
        Self::with(Matcher::Model(model.into()))
    }

    /// Also requires the messages to contain `needle`.
    pub fn and_prompt_contains(mut self, needle: &str) -> Self {
        self.matcher = Matcher::Both(
            Box::new(self.matcher),
            Box::new(Matcher::PromptContains(needle.into())),
        );
        self
    }

    /// Answers at most `n` times, then lets later rules answer.
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }

    /// What this rule answers (without it: the default reply).
    pub fn reply(mut self, reply: Reply) -> Self {
        self.reply = Some(reply);
        self
    }

    fn with(matcher: Matcher) -> Self {
        Self {
            matcher,
            reply: None,
            times: None,
            used: 0,
        }
    }
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request path (`/v1/chat/completions`).
    pub path: String,
    /// The JSON body (`Value::Null` when it was not JSON).
    pub body: Value,
    /// Lower-cased header names and their values.
    pub headers: Vec<(String, String)>,
    /// When it arrived, relative to the server's start.
    pub at: Duration,
    /// The status the server answered.
    pub status: u16,
}

impl Recorded {
    /// The requested model.
    pub fn model(&self) -> &str {
        self.body["model"].as_str().unwrap_or("")
    }

    /// Every message's content, joined by blank lines.
    pub fn prompt(&self) -> String {
        self.body["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .filter_map(|m| message_text(&m["content"]))
                    .collect::<Vec<_>>()
                    .join("\n\n")
            })
            .unwrap_or_default()
    }

    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Text of a message `content`: a string, or the text parts of an array.
fn message_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

struct Inner {
    rules: Vec<Rule>,
    requests: Vec<Recorded>,
    started: Instant,
}

/// The running server; stops when dropped.
pub struct ScriptedOpenAi {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedOpenAi {
    fn drop(&mut self) {
        self._task.abort();
    }
}

impl ScriptedOpenAi {
    /// Starts the server on a free loopback port with these rules.
    pub async fn start(rules: Vec<Rule>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            rules,
            requests: Vec::new(),
            started: Instant::now(),
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .route("/models", get(models))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the scripted OpenAI server");
        let addr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            inner,
            _task: task,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, what `DEVFLEET_OPENAI_BASE_URL` (or
    /// `OPENAI_API_BASE`) takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Adds a rule, tried before the existing ones.
    pub fn push_front(&self, rule: Rule) {
        self.lock().rules.insert(0, rule);
    }

    /// Sum of `(prompt_tokens, completion_tokens)` of every 200 answer.
    pub fn usage_totals(&self) -> (u64, u64) {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.status == 200)
            .filter_map(|r| r.body.get("_answered_usage").cloned())
            .fold((0, 0), |(a, b), u| {
                (
                    a + u[0].as_u64().unwrap_or(0),
                    b + u[1].as_u64().unwrap_or(0),
                )
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A comment line in the language of `path` (by extension).
fn comment(path: &str) -> String {
    let ext = path.rsplit('.').next().unwrap_or("");
    let mark = match ext {
        "py" | "sh" | "rb" | "toml" | "yaml" | "yml" => "#",
        "js" | "ts" | "tsx" | "jsx" | "rs" | "go" | "java" | "c" | "h" | "cpp" => "//",
        _ => "#",
    };
    format!("{mark} written by the scripted model for {path}\n")
}

/// `path` on its own line, then `text` in a fenced block.
fn fenced(path: &str, text: &str) -> String {
    let text = if text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    };
    format!("{path}\n```\n{text}```\n")
}

/// The default reply: the file named on a `Path:` line of the prompt.
fn default_reply(request: &Recorded) -> Reply {
    let prompt = request.prompt();
    let path = prompt
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Path:")
                .or_else(|| l.trim().strip_prefix("path:"))
        })
        .map(|p| p.trim().trim_matches('`').to_owned())
        .unwrap_or_else(|| "file.txt".into());
    Reply::file(&path, &comment(&path))
}

/// Tokens as the server counts them by default: about four bytes a token.
fn count_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

async fn models(State(inner): State<Arc<Mutex<Inner>>>) -> Json<Value> {
    let inner = inner.lock().unwrap_or_else(|e| e.into_inner());
    let mut ids: Vec<String> = inner
        .rules
        .iter()
        .filter_map(|r| match &r.matcher {
            Matcher::Model(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    ids.push("scripted".into());
    Json(json!({
        "object": "list",
        "data": ids.iter().map(|id| json!({"id": id, "object": "model", "owned_by": "scripted"})).collect::<Vec<_>>(),
    }))
}

async fn chat(
    State(inner): State<Arc<Mutex<Inner>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let (reply, index) = {
        let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut request = Recorded {
            path: uri.path().to_owned(),
            body: body.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            at: inner.started.elapsed(),
            status: 0,
        };
        let rule = inner
            .rules
            .iter_mut()
            .find(|r| r.times.is_none_or(|n| r.used < n) && r.matcher.accepts(&request));
        let reply = match rule {
            Some(rule) => {
                rule.used += 1;
                rule.reply.clone()
            }
            None => None,
        }
        .unwrap_or_else(|| default_reply(&request));
        request.status = reply.status;
        inner.requests.push(request);
        (reply, inner.requests.len() - 1)
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let json_body = match (&reply.body, &reply.content) {
        (Some(raw), _) => raw.clone(),
        (None, content) => {
            let content = content.clone().unwrap_or_default();
            let prompt = Recorded {
                path: String::new(),
                body: body.clone(),
                headers: Vec::new(),
                at: Duration::ZERO,
                status: 0,
            }
            .prompt();
            let (prompt_tokens, completion_tokens) = reply
                .usage
                .unwrap_or_else(|| (count_tokens(&prompt), count_tokens(&content)));
            // Remember what was answered, for usage_totals.
            if let Some(r) = inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .requests
                .get_mut(index)
            {
                r.body["_answered_usage"] = json!([prompt_tokens, completion_tokens]);
            }
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            json!({
                "id": format!("chatcmpl-scripted-{index}"),
                "object": "chat.completion",
                "created": created,
                "model": body["model"].as_str().unwrap_or("scripted"),
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": reply.finish_reason,
                }],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            })
        }
    };
    let mut response = (status, Json(json_body)).into_response();
    for (name, value) in &reply.headers {
        if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(n, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(server: &ScriptedOpenAi, body: Value) -> (u16, Value, HeaderMap) {
        let client = reqwest::Client::new();
        let r = client
            .post(format!("{}/chat/completions", server.base_url()))
            .header("authorization", "Bearer sk-test")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.json().await.unwrap(), headers)
    }

    fn chat_body(model: &str, prompt: &str) -> Value {
        json!({"model": model, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": prompt}
        ]})
    }

    #[tokio::test]
    async fn rules_answer_in_order_within_their_uses_and_every_request_is_recorded() {
        let server = ScriptedOpenAi::start(vec![
            Rule::when_prompt_contains("flaky")
                .times(1)
                .reply(Reply::rate_limited(2)),
            Rule::when_model("big").reply(
                Reply::file("a.py", "x = 1")
                    .usage(10, 3)
                    .finish_reason("length"),
            ),
        ])
        .await;
        let (status, _, headers) = post(&server, chat_body("m", "flaky one")).await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "2");
        let (status, body, _) = post(&server, chat_body("big", "flaky again")).await;
        assert_eq!(status, 200);
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "a.py\n```\nx = 1\n```\n"
        );
        assert_eq!(body["usage"]["prompt_tokens"], 10);
        // No rule left for this one: the default reply names the path.
        let (status, body, _) = post(&server, chat_body("m", "Path: src/lib.rs\nSpec: x")).await;
        assert_eq!(status, 200);
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            content.starts_with("src/lib.rs\n```\n// written"),
            "{content}"
        );
        let requests = server.requests();
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].status, 429);
        assert_eq!(requests[1].model(), "big");
        assert!(requests[1].prompt().contains("be brief\n\nflaky again"));
        assert_eq!(requests[2].header("Authorization"), Some("Bearer sk-test"));
        let (tokens_in, tokens_out) = server.usage_totals();
        assert_eq!(
            tokens_in,
            10 + count_tokens("be brief\n\nPath: src/lib.rs\nSpec: x")
        );
        assert_eq!(tokens_out, 3 + count_tokens(content));
    }
}
