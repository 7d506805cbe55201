//! Who may connect: the optional token and the Origin check.
//!
//! With a token configured, every request but `/healthz` must carry it,
//! as `Authorization: Bearer TOKEN` or as the query parameter `token`
//! (browsers cannot set headers on a WebSocket). The comparison takes the
//! same time whatever the mismatch. The Origin check applies to WebSocket
//! upgrades only (cross-site WebSocket hijacking); requests without an
//! Origin header (non-browser clients) pass it.
//!
//! The token is read from the environment or a file, never from a
//! command-line flag: a process's arguments are visible to every user of
//! the host (`ps`), its environment and a mode-0600 file are not.

use anyhow::Context as _;
use axum::http::{header, HeaderMap, Uri};

/// The variable holding the gateway token.
pub const TOKEN_ENV: &str = "DEVFLEET_GATEWAY_TOKEN";
/// The variable naming a file whose first line is the gateway token (a
/// mounted secret).
pub const TOKEN_FILE_ENV: &str = "DEVFLEET_GATEWAY_TOKEN_FILE";

/// The gateway token from the environment ([`TOKEN_ENV`] or the file
/// [`TOKEN_FILE_ENV`] names), for the gateway and its clients alike;
/// `None` when neither is set. Empty counts as unset; both set, or a file
/// that cannot be read, is an error naming the variable.
pub fn token_from_env() -> anyhow::Result<Option<String>> {
    let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    token_from(var(TOKEN_ENV), var(TOKEN_FILE_ENV))
}

/// [`token_from_env`] on given values of the two variables.
fn token_from(token: Option<String>, file: Option<String>) -> anyhow::Result<Option<String>> {
    match (token, file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("set one of {TOKEN_ENV} and {TOKEN_FILE_ENV}, not both")
        }
        (Some(token), None) => Ok(Some(token)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("reading the gateway token from {path} ({TOKEN_FILE_ENV})")
            })?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            anyhow::ensure!(
                !token.is_empty(),
                "{path} ({TOKEN_FILE_ENV}) holds no token"
            );
            Ok(Some(token))
        }
        (None, None) => Ok(None),
    }
}

/// True when `headers`/`uri` carry `expected` (or no token is required).
pub fn token_ok(expected: Option<&str>, headers: &HeaderMap, uri: &Uri) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim().to_owned());
    let query = uri.query().and_then(|q| query_param(q, "token"));
    [bearer, query]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
}

/// Whether a WebSocket upgrade from `origin` may proceed.
///
/// No Origin header: allowed. Allow-list containing `*`: any origin.
/// Non-empty allow-list: exact match of `scheme://host[:port]`. Empty
/// allow-list: same origin only (the Origin's host and port equal the
/// request's `Host`).
pub fn origin_ok(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let origin = origin.trim_end_matches('/');
    if !allowed.is_empty() {
        return allowed
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin));
    }
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin_host.eq_ignore_ascii_case(host)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The percent-decoded value of `name` in a query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn token_from_header_or_query() {
        let mut h = HeaderMap::new();
        assert!(token_ok(None, &h, &uri("/ws")));
        assert!(!token_ok(Some("s3cret"), &h, &uri("/ws")));
        assert!(token_ok(Some("s3cret"), &h, &uri("/ws?token=s3cret")));
        assert!(token_ok(
            Some("a b/+"),
            &h,
            &uri("/ws?x=1&token=a%20b%2F%2B")
        ));
        assert!(!token_ok(Some("s3cret"), &h, &uri("/ws?token=s3cre")));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(token_ok(Some("s3cret"), &h, &uri("/ws")));
        assert!(!token_ok(Some("other"), &h, &uri("/ws")));
    }

    #[test]
    fn the_token_comes_from_the_variable_or_a_file_never_both() {
        assert_eq!(token_from(None, None).unwrap(), None);
        assert_eq!(
            token_from(Some("s3cret".into()), None).unwrap().as_deref(),
            Some("s3cret")
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "f1le-token\n").unwrap();
        let path = file.display().to_string();
        assert_eq!(
            token_from(None, Some(path.clone())).unwrap().as_deref(),
            Some("f1le-token")
        );
        let both = token_from(Some("a".into()), Some(path)).unwrap_err();
        assert!(both.to_string().contains(TOKEN_FILE_ENV), "{both}");
        let missing =
            token_from(None, Some(dir.path().join("nope").display().to_string())).unwrap_err();
        assert!(
            format!("{missing:#}").contains(TOKEN_FILE_ENV),
            "{missing:#}"
        );
    }

    #[test]
    fn bad_percent_encoding_is_no_token() {
        assert_eq!(query_param("token=%zz", "token"), None);
        assert_eq!(query_param("token=%4", "token"), None);
        assert_eq!(query_param("token=%41", "token").as_deref(), Some("A"));
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7070"));
        assert!(origin_ok(&[], &h), "no Origin: not a browser");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7070"),
        );
        assert!(origin_ok(&[], &h), "same origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!origin_ok(&[], &h));
        assert!(origin_ok(&["http://evil.example".into()], &h));
        assert!(!origin_ok(&["http://good.example".into()], &h));
        assert!(origin_ok(&["*".into()], &h));
    }
}
