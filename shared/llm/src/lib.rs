//! A client for OpenAI-compatible chat completions APIs (OpenAI, vLLM,
//! llama.cpp, Ollama, …), shared by everything in devfleet that talks to a
//! model: the dev-worker's `openai` executor today, the planner next.
//!
//! [`ChatClient::complete`] sends `POST {base}/chat/completions` with the
//! model, the temperature and the messages, and returns the first choice's
//! text with its `finish_reason` and the reported token [`Usage`].
//!
//! 429 and 5xx answers (and connection failures) are retried, waiting as
//! long as `Retry-After` says (capped) or else the settings' backoff; 401/403
//! and other 4xx fail for good ([`LlmError::retryable`] is false). The API
//! key is sent as a bearer token, and is never logged, Debug-printed or put
//! in an error message. Without a key no `Authorization` header is sent
//! (local OpenAI-compatible servers). Replies are read up to
//! [`MAX_RESPONSE_BYTES`].

use devfleet_runtime::backoff::Backoff;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

mod extract;

pub use extract::extract_file;

/// The public OpenAI endpoint, the default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The default model.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Largest response body read.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

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
pub struct ChatSettings {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<ApiKey>,
    /// Requests per call, counting the first (429/5xx retries).
    pub max_requests: u32,
    /// Wait between retries when the server gives no `Retry-After`.
    pub backoff: Backoff,
    pub temperature: f32,
    /// Longest completion asked for (`max_tokens`); `None` sends none (the
    /// server's default).
    pub max_tokens: Option<u32>,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key: None,
            max_requests: 6,
            backoff: Backoff::SLOW,
            temperature: 0.2,
            max_tokens: None,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Tokens a call used, as the server reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The first choice of a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatReply {
    pub content: String,
    /// `stop`, `length`, … as the server said (`None` if it did not).
    pub finish_reason: Option<String>,
    /// `None` when the server sent no `usage`.
    pub usage: Option<Usage>,
}

/// Why a call failed. The message never holds the API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LlmError {
    pub message: String,
    /// False when trying again cannot help (refused credentials, a 4xx).
    pub retryable: bool,
    /// The server refused the prompt as longer than the model's context
    /// window (`context_length_exceeded`): a smaller prompt is the fix.
    pub context_exceeded: bool,
}

impl LlmError {
    fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            context_exceeded: false,
        }
    }

    fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            context_exceeded: false,
        }
    }
}

/// See the crate docs. Cheap to clone (the HTTP client is shared).
#[derive(Debug, Clone)]
pub struct ChatClient {
    client: reqwest::Client,
    settings: ChatSettings,
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    messages: &'a [ChatMessage],
}

impl ChatClient {
    /// Builds the HTTP client (rustls). `user_agent` names the caller, e.g.
    /// `devfleet-dev-worker/0.1.0`.
    pub fn new(settings: ChatSettings, user_agent: &str) -> Result<Self, LlmError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .user_agent(user_agent)
            .build()
            .map_err(|e| LlmError::fatal(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { client, settings })
    }

    pub fn settings(&self) -> &ChatSettings {
        &self.settings
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.settings.base_url.trim_end_matches('/')
        )
    }

    /// Sends the conversation and returns the first choice, retrying busy
    /// and unreachable servers up to `max_requests` requests in all.
    pub async fn complete(&self, messages: &[ChatMessage]) -> Result<ChatReply, LlmError> {
        self.complete_paced(messages, || async { Ok(()) }, |_| async {})
            .await
    }

    /// [`ChatClient::complete`], calling `before` ahead of every request
    /// (retries too: a rate limiter waits there, or fails the call) and
    /// `rate_limited` with the `Retry-After` of every 429 (to drain a
    /// shared limiter), before the client's own wait.
    pub async fn complete_paced<B, BF, R, RF>(
        &self,
        messages: &[ChatMessage],
        before: B,
        rate_limited: R,
    ) -> Result<ChatReply, LlmError>
    where
        B: Fn() -> BF,
        BF: std::future::Future<Output = Result<(), LlmError>>,
        R: Fn(Option<Duration>) -> RF,
        RF: std::future::Future<Output = ()>,
    {
        let body = Request {
            model: &self.settings.model,
            temperature: self.settings.temperature,
            max_tokens: self.settings.max_tokens,
            messages,
        };
        let requests = self.settings.max_requests.max(1);
        for attempt in 1..=requests {
            before().await?;
            match self.request(&body, attempt).await? {
                Ok(reply) => return Ok(reply),
                Err(busy) => {
                    if busy.status == Some(429) {
                        rate_limited(busy.retry_after).await;
                    }
                    if attempt < requests {
                        tokio::time::sleep(busy.delay).await;
                    }
                }
            }
        }
        Err(LlmError::retryable(format!(
            "the chat completions API stayed busy or unreachable for {requests} requests"
        )))
    }

    /// One request; `Ok(Err(busy))` asks for a retry after `busy.delay`.
    async fn request(
        &self,
        body: &Request<'_>,
        attempt: u32,
    ) -> Result<Result<ChatReply, Busy>, LlmError> {
        let mut request = self.client.post(self.url()).json(body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(&key.0);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e.without_url(), "chat completions request failed");
                return Ok(Err(Busy {
                    status: None,
                    retry_after: None,
                    delay: self.settings.backoff.delay(attempt),
                }));
            }
        };
        let status = response.status();
        if status.as_u16() == 429 || status.is_server_error() {
            let after = retry_after(response.headers()).map(|d| d.min(MAX_RETRY_AFTER));
            let delay = after.unwrap_or_else(|| self.settings.backoff.delay(attempt));
            tracing::warn!(
                status = status.as_u16(),
                ?delay,
                "chat completions busy; retrying"
            );
            return Ok(Err(Busy {
                status: Some(status.as_u16()),
                retry_after: after,
                delay,
            }));
        }
        let bytes = read_body(response).await?;
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(LlmError::fatal(format!(
                "the chat completions API refused the credentials ({status}); check \
                 DEVFLEET_OPENAI_API_KEY"
            )));
        }
        if status.is_client_error() && is_context_exceeded(&bytes) {
            return Err(LlmError {
                context_exceeded: true,
                ..LlmError::fatal(format!(
                    "the model refused the prompt as longer than its context window \
                     ({status}): {}",
                    excerpt(&bytes)
                ))
            });
        }
        if !status.is_success() {
            return Err(LlmError::fatal(format!(
                "the chat completions API answered {status}: {}",
                excerpt(&bytes)
            )));
        }
        parse_reply(&bytes).map(Ok)
    }
}

/// A request to retry: the status (none: no answer), the server's
/// `Retry-After`, and the wait before the retry.
struct Busy {
    status: Option<u16>,
    retry_after: Option<Duration>,
    delay: Duration,
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<ReplyMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ReplyMessage {
    content: Option<String>,
}

/// Reads a chat completions reply body.
fn parse_reply(bytes: &[u8]) -> Result<ChatReply, LlmError> {
    let reply: Reply = serde_json::from_slice(bytes).map_err(|e| {
        LlmError::retryable(format!(
            "the chat completions reply is not JSON of the expected shape: {e}"
        ))
    })?;
    let choice = reply.choices.into_iter().next();
    let finish_reason = choice.as_ref().and_then(|c| c.finish_reason.clone());
    let content = choice
        .and_then(|c| c.message)
        .and_then(|m| m.content)
        .ok_or_else(|| {
            LlmError::retryable(format!(
                "the chat completions reply has no choices[0].message.content: {}",
                excerpt(bytes)
            ))
        })?;
    Ok(ChatReply {
        content,
        finish_reason,
        usage: reply.usage,
    })
}

/// Whether an error body says the prompt is over the context window: the
/// code OpenAI (and vLLM) send, or the wording of servers that send no code
/// (llama.cpp, Ollama: "exceeds the available context size", "maximum
/// context length").
fn is_context_exceeded(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    [
        "context_length_exceeded",
        "maximum context length",
        "context size",
        "context window",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// `Retry-After` in seconds (the HTTP-date form falls back to the backoff).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, LlmError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        LlmError::retryable(format!("reading the reply failed: {}", e.without_url()))
    })? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(LlmError::retryable(format!(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows() {
        let key = ApiKey::new("sk-secret-123");
        let settings = ChatSettings {
            api_key: Some(key.clone()),
            ..ChatSettings::default()
        };
        let shown = format!("{key} {key:?} {settings:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn a_reply_gives_content_finish_reason_and_usage() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],
            "usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        let reply = parse_reply(body).unwrap();
        assert_eq!(reply.content, "hi");
        assert_eq!(reply.finish_reason.as_deref(), Some("length"));
        assert_eq!(
            reply.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 3
            })
        );
    }

    #[test]
    fn a_reply_without_content_or_json_is_a_retryable_error() {
        let empty = parse_reply(br#"{"choices":[]}"#).unwrap_err();
        assert!(empty.retryable);
        assert!(empty.message.contains("choices[0].message.content"));
        let garbage = parse_reply(b"<html>").unwrap_err();
        assert!(garbage.retryable);
        assert!(garbage.message.contains("not JSON"));
        let no_usage = parse_reply(br#"{"choices":[{"message":{"content":"x"}}]}"#).unwrap();
        assert_eq!(no_usage.usage, None);
        assert_eq!(no_usage.finish_reason, None);
    }
}
