//! Checking deployment requests, and reading the file `devfleet canary
//! start` takes.
//!
//! A start file is either a deploy spec (the `deploy:` section of a plan,
//! at top level) with an optional `id` and `plan_id`, or a whole plan with
//! a `deploy:` section (its name becomes the prefix of a generated id).

use devfleet_protocol::{DeployRequested, DeploySpec, HealthSource, Plan};

/// Longest deployment id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 100;

/// Why a deployment request or start file was refused. Every variant names
/// the deployment (when known) and the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid deployment id '{id}': {reason}")]
    InvalidId { id: String, reason: String },
    #[error("deployment '{id}': invalid deploy spec: {reason}")]
    InvalidSpec { id: String, reason: String },
    #[error("invalid deploy spec: {reason}")]
    InvalidFileSpec { reason: String },
    #[error("not a valid deploy spec or plan: {0}")]
    Syntax(String),
    #[error("the plan '{plan}' has no deploy: section")]
    NoDeploySection { plan: String },
}

/// What a start file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct StartFile {
    /// The id given in the file (`id:`), if any.
    pub id: Option<String>,
    /// For a plan file, its name (a prefix for a generated id).
    pub name: Option<String>,
    pub plan_id: Option<String>,
    pub spec: DeploySpec,
}

/// Checks a deployment id: 1 to [`MAX_ID_BYTES`] bytes of ASCII letters,
/// digits, `.`, `_` and `-`, starting with a letter or digit. Ids become
/// store keys and command arguments, so nothing else is allowed.
pub fn validate_id(id: &str) -> Result<(), RequestError> {
    let refuse = |reason: &str| RequestError::InvalidId {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    if id.is_empty() {
        return Err(refuse("empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(refuse(&format!("longer than {MAX_ID_BYTES} bytes")));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(refuse("use only ASCII letters, digits, '.', '_' and '-'"));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(refuse("must start with a letter or a digit"));
    }
    Ok(())
}

/// Checks a spec beyond [`DeploySpec::validate`] (which checks the
/// handlers' profile names and params): the last stage is 100, health URLs
/// are http(s), Prometheus queries are not empty, the latency limit is
/// positive. Whether the profiles exist is up to the canary service that
/// runs the deployment (its operator owns them).
pub fn validate_spec(spec: &DeploySpec) -> Result<(), String> {
    spec.validate()?;
    if spec.stages.last() != Some(&100) {
        return Err(format!(
            "the last stage must be 100 (promotion), got {:?}",
            spec.stages
        ));
    }
    match &spec.health {
        HealthSource::Url { url } => validate_url("health.url", url)?,
        HealthSource::Prometheus {
            prometheus,
            error_rate,
            latency_p95_ms,
        } => {
            validate_url("health.prometheus", prometheus)?;
            if error_rate.trim().is_empty() {
                return Err("health.error_rate: the PromQL query is empty".into());
            }
            if latency_p95_ms.trim().is_empty() {
                return Err("health.latency_p95_ms: the PromQL query is empty".into());
            }
        }
    }
    let max = spec.thresholds.max_latency_ms;
    if !(max.is_finite() && max > 0.0) {
        return Err(format!(
            "thresholds.max_latency_ms must be a positive number, got {max}"
        ));
    }
    Ok(())
}

fn validate_url(what: &str, url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("{what} '{url}' is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{what} '{url}' must be an http:// or https:// URL"));
    }
    Ok(())
}

/// Checks a `deploy.requested` message: its id and its spec.
pub fn validate_request(request: &DeployRequested) -> Result<(), RequestError> {
    validate_id(&request.deployment_id)?;
    validate_spec(&request.spec).map_err(|reason| RequestError::InvalidSpec {
        id: request.deployment_id.clone(),
        reason,
    })
}

/// Parses a start file (YAML or JSON): a deploy spec with optional `id` and
/// `plan_id` at top level, or a plan with a `deploy:` section. The spec is
/// checked with [`validate_spec`]; the id (when given) with [`validate_id`].
pub fn parse_start_file(text: &str) -> Result<StartFile, RequestError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| RequestError::Syntax(e.to_string()))?;
    let serde_yaml::Value::Mapping(mut map) = value else {
        return Err(RequestError::Syntax(
            "expected a mapping (a deploy spec or a plan)".into(),
        ));
    };
    let file = if map.contains_key("tasks") || map.contains_key("deploy") {
        let plan = Plan::parse(text).map_err(|e| RequestError::Syntax(e.to_string()))?;
        let spec = plan.deploy.ok_or_else(|| RequestError::NoDeploySection {
            plan: plan.name.clone(),
        })?;
        StartFile {
            id: None,
            name: Some(plan.name),
            plan_id: None,
            spec,
        }
    } else {
        let id = take_string(&mut map, "id")?;
        let plan_id = take_string(&mut map, "plan_id")?;
        let spec: DeploySpec =
            devfleet_protocol::plan::from_yaml_value_strict(serde_yaml::Value::Mapping(map))
                .map_err(|e| RequestError::Syntax(e.to_string()))?;
        StartFile {
            id,
            name: None,
            plan_id,
            spec,
        }
    };
    if let Some(id) = &file.id {
        validate_id(id)?;
    }
    validate_spec(&file.spec).map_err(|reason| match &file.id {
        Some(id) => RequestError::InvalidSpec {
            id: id.clone(),
            reason,
        },
        None => RequestError::InvalidFileSpec { reason },
    })?;
    Ok(file)
}

fn take_string(map: &mut serde_yaml::Mapping, key: &str) -> Result<Option<String>, RequestError> {
    match map.remove(key) {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(serde_yaml::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RequestError::Syntax(format!(
            "'{key}' must be a string, got {other:?}"
        ))),
    }
}

/// A fresh id: `<prefix>-<8 hex>`, the prefix reduced to allowed characters
/// (`deploy` when nothing is left).
pub fn generate_id(prefix: Option<&str>) -> String {
    let cleaned: String = prefix
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let cleaned: String = cleaned.chars().take(MAX_ID_BYTES - 9).collect();
    let prefix = if cleaned.is_empty() {
        "deploy"
    } else {
        &cleaned
    };
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &suffix[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
id: web-7
stages: [10, 50, 100]
stage_seconds: 5
check_seconds: 1
shift: { profile: lb, params: { pool: web } }
health: { url: "http://127.0.0.1:9000/stats" }
"#;

    #[test]
    fn spec_file_with_an_id_parses() {
        let f = parse_start_file(SPEC).unwrap();
        assert_eq!(f.id.as_deref(), Some("web-7"));
        assert_eq!(f.spec.stages, vec![10, 50, 100]);
        assert_eq!(f.spec.stage_seconds, 5);
    }

    #[test]
    fn json_spec_without_id_takes_defaults() {
        let f = parse_start_file(
            r#"{"shift":{"profile":"lb"},"health":{"url":"http://127.0.0.1:1/s"}}"#,
        )
        .unwrap();
        assert_eq!(f.id, None);
        assert_eq!(f.spec.stages, vec![10, 25, 50, 75, 100]);
        assert_eq!(f.spec.stage_seconds, 300);
        assert_eq!(f.spec.check_seconds, 30);
    }

    #[test]
    fn plan_file_gives_its_deploy_section_and_name() {
        let f = parse_start_file(
            r#"
name: flask todo
tasks:
  - path: a.py
    spec: s
deploy:
  shift: { profile: lb }
  health: { prometheus: "http://127.0.0.1:9090", error_rate: "x", latency_p95_ms: "y" }
"#,
        )
        .unwrap();
        assert_eq!(f.name.as_deref(), Some("flask todo"));
        assert!(matches!(f.spec.health, HealthSource::Prometheus { .. }));
        let id = generate_id(f.name.as_deref());
        assert!(id.starts_with("flask-todo-"), "{id}");
        validate_id(&id).unwrap();
    }

    #[test]
    fn plan_without_deploy_section_is_refused_by_name() {
        let err = parse_start_file("name: p\ntasks:\n  - path: a.py\n    spec: s\n").unwrap_err();
        assert_eq!(err, RequestError::NoDeploySection { plan: "p".into() });
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse_start_file(&format!("{SPEC}colour: red\n")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "a b",
            "a;rm -rf /",
            "../x",
            "-x",
            "a:b",
            "a#1",
            &"x".repeat(101),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["web-1", "a.b_c", "9lives"] {
            validate_id(good).unwrap();
        }
    }

    #[test]
    fn spec_problems_are_named() {
        let cases = [
            ("stages: [10, 50]\n", "last stage must be 100"),
            ("stages: [50, 10, 100]\n", "rise strictly"),
            ("check_seconds: 0\n", "check_seconds"),
            (
                "thresholds: { degraded_error_rate: 0.2, rollback_error_rate: 0.1 }\n",
                "degraded_error_rate",
            ),
            ("thresholds: { max_latency_ms: 0 }\n", "max_latency_ms"),
        ];
        for (extra, needle) in cases {
            let text =
                format!("shift: {{ profile: x }}\nhealth: {{ url: \"http://h/s\" }}\n{extra}");
            let err = parse_start_file(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let raw = "shift: { command: \"sh -c env\" }\nhealth: { url: \"http://h/s\" }\n";
        let err = parse_start_file(raw).unwrap_err().to_string();
        assert!(err.contains("DEVFLEET_CANARY_PROFILES"), "{err}");
        let bad_url = "shift: { profile: x }\nhealth: { url: \"ftp://h\" }\n";
        assert!(parse_start_file(bad_url)
            .unwrap_err()
            .to_string()
            .contains("health.url"));
    }

    #[test]
    fn request_validation_names_the_deployment() {
        let f = parse_start_file(SPEC).unwrap();
        let mut spec = f.spec;
        spec.stages = vec![10, 20];
        let err = validate_request(&DeployRequested {
            deployment_id: "web-7".into(),
            plan_id: None,
            spec,
        })
        .unwrap_err();
        assert!(err.to_string().contains("web-7"), "{err}");
    }
}
