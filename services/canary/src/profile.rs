//! Handler profiles: the programs and webhooks the operator lets plans use.
//!
//! A plan never names a program or a URL to shift traffic with; it names a
//! profile of this file (`DEVFLEET_CANARY_PROFILES`) and fills the
//! parameters the profile declares:
//!
//! ```yaml
//! lb:                                  # profile name
//!   command: [/usr/local/bin/set-weight, "--pool={pool}", "{weight}", "{tree}"]
//!   params:
//!     pool: { values: [web-eu, web-us] }   # required, one of these
//!     region: { default: eu }               # optional
//!   env: { KUBECONFIG: /etc/devfleet/kubeconfig }   # fixed values
//!   pass_env: [LB_TOKEN]                 # taken from the canary's environment
//! lb-hook:
//!   webhook: https://lb.internal/weights
//! ```
//!
//! A command is an argument vector, never a shell line: a placeholder is
//! replaced inside its word and a value can never become another argument.
//! Placeholders are the built-ins ([`BUILTINS`]) and the profile's declared
//! parameters; any other `{name}` is an error when the file is loaded. A
//! plan's parameter values are checked by the plan format (safe characters,
//! no leading `-`), then here against the declaration.

use devfleet_protocol::plan::{validate_param_name, validate_param_value};
use devfleet_protocol::Handler;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Placeholders every command profile may use.
pub const BUILTINS: [&str; 6] = ["weight", "deployment", "stage", "action", "plan_id", "tree"];

/// One declared parameter of a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamRule {
    /// Used when the plan gives none; without it the parameter is required.
    #[serde(default)]
    pub default: Option<String>,
    /// When set, the only values a plan may give.
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

/// What a profile runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A program and its arguments (templates).
    Command(Vec<String>),
    /// An HTTP POST of JSON to this URL.
    Webhook(String),
}

/// One profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub action: Action,
    pub params: BTreeMap<String, ParamRule>,
    /// Fixed environment variables for a command.
    pub env: BTreeMap<String, String>,
    /// Variables a command gets from the canary's own environment.
    pub pass_env: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileDoc {
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, Option<ParamRule>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    pass_env: Vec<String>,
}

/// Why a profile file, or a plan's use of a profile, was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("canary profiles: {0}")]
    Syntax(String),
    #[error("canary profile '{profile}': {reason}")]
    Invalid { profile: String, reason: String },
    #[error("{what} names profile '{profile}', which the canary does not have ({known}); an operator adds it to the file of DEVFLEET_CANARY_PROFILES")]
    Unknown {
        what: String,
        profile: String,
        known: String,
    },
    #[error("{what} (profile '{profile}'): {reason}")]
    BadParams {
        what: String,
        profile: String,
        reason: String,
    },
}

/// Every profile the canary knows, by name. Cheap to share behind an `Arc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profiles {
    profiles: BTreeMap<String, Profile>,
}

impl Profiles {
    /// Reads a profile file (YAML or JSON).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "reading the canary profiles {} (DEVFLEET_CANARY_PROFILES): {e}",
                path.display()
            )
        })?;
        Self::parse(&text)
            .map_err(|e| anyhow::anyhow!("{} (DEVFLEET_CANARY_PROFILES): {e}", path.display()))
    }

    /// Parses profiles and checks each (names, placeholders, params).
    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let docs: Option<BTreeMap<String, ProfileDoc>> =
            serde_yaml::from_str(text).map_err(|e| ProfileError::Syntax(e.to_string()))?;
        let mut profiles = BTreeMap::new();
        for (name, doc) in docs.unwrap_or_default() {
            let invalid = |reason: String| ProfileError::Invalid {
                profile: name.clone(),
                reason,
            };
            Handler::profile(name.clone())
                .validate()
                .map_err(&invalid)?;
            let mut params = BTreeMap::new();
            for (key, rule) in doc.params {
                validate_param_name(&key).map_err(&invalid)?;
                let rule = rule.unwrap_or_default();
                for value in rule.default.iter().chain(rule.values.iter().flatten()) {
                    validate_param_value(&key, value).map_err(&invalid)?;
                }
                if BUILTINS.contains(&key.as_str()) {
                    return Err(invalid(format!("param '{key}' is a built-in placeholder")));
                }
                params.insert(key, rule);
            }
            let action = match (doc.command, doc.webhook) {
                (Some(argv), None) => {
                    if argv.first().is_none_or(|p| p.is_empty()) {
                        return Err(invalid("command is empty".into()));
                    }
                    for word in &argv {
                        for placeholder in placeholders(word) {
                            if !BUILTINS.contains(&placeholder) && !params.contains_key(placeholder)
                            {
                                return Err(invalid(format!(
                                    "command uses {{{placeholder}}}, which is neither a built-in ({}) nor a declared param",
                                    BUILTINS.join(", ")
                                )));
                            }
                        }
                    }
                    Action::Command(argv)
                }
                (None, Some(url)) => {
                    let parsed = reqwest::Url::parse(&url)
                        .map_err(|e| invalid(format!("webhook '{url}' is not a URL: {e}")))?;
                    if !matches!(parsed.scheme(), "http" | "https") {
                        return Err(invalid(format!("webhook '{url}' must be http(s)")));
                    }
                    Action::Webhook(url)
                }
                _ => {
                    return Err(invalid(
                        "give exactly one of command: [argv...] or webhook: URL".into(),
                    ))
                }
            };
            profiles.insert(
                name,
                Profile {
                    action,
                    params,
                    env: doc.env,
                    pass_env: doc.pass_env,
                },
            );
        }
        Ok(Profiles { profiles })
    }

    /// Adds the profiles of `other` (its names win).
    pub fn extend(&mut self, other: Profiles) {
        self.profiles.extend(other.profiles);
    }

    /// Resolves a plan's handler: the profile, and every declared parameter's
    /// value (the plan's, else the default). `what` names the handler in
    /// errors (`deploy.shift`).
    pub fn resolve(
        &self,
        what: &str,
        handler: &Handler,
    ) -> Result<(&Profile, BTreeMap<String, String>), ProfileError> {
        let Some(profile) = self.profiles.get(&handler.profile) else {
            let known = if self.profiles.is_empty() {
                "it has none".to_owned()
            } else {
                format!(
                    "it has: {}",
                    self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(ProfileError::Unknown {
                what: what.to_owned(),
                profile: handler.profile.clone(),
                known,
            });
        };
        let bad = |reason: String| ProfileError::BadParams {
            what: what.to_owned(),
            profile: handler.profile.clone(),
            reason,
        };
        handler.validate().map_err(&bad)?;
        if let Some(unknown) = handler
            .params
            .keys()
            .find(|k| !profile.params.contains_key(*k))
        {
            return Err(bad(format!(
                "param '{unknown}' is not declared by the profile (it takes: {})",
                profile
                    .params
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut values = BTreeMap::new();
        for (key, rule) in &profile.params {
            let value = match (handler.params.get(key), &rule.default) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => return Err(bad(format!("param '{key}' is required"))),
            };
            if let Some(allowed) = &rule.values {
                if !allowed.contains(&value) {
                    return Err(bad(format!(
                        "param '{key}' must be one of {}, got '{value}'",
                        allowed.join(", ")
                    )));
                }
            }
            values.insert(key.clone(), value);
        }
        Ok((profile, values))
    }
}

/// The `{name}` placeholders of a word (names of `[a-z_][a-z0-9_]*`; other
/// braces are literal text).
fn placeholders(word: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = word;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) if is_name(&after[..end]) => {
                found.push(&after[..end]);
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    found
}

fn is_name(text: &str) -> bool {
    text.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Replaces every placeholder of `word` by its value in one pass (a value
/// is never scanned again). `value` returns `None` for a placeholder it
/// cannot fill, which is an error naming it.
pub fn fill(word: &str, value: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) if is_name(&after[..end]) => {
                let name = &after[..end];
                out.push_str(&value(name).ok_or_else(|| format!("{{{name}}} has no value here"))?);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
lb:
  command: [/bin/lb, "--pool={pool}", "{weight}", "{region}", "{ not a placeholder }"]
  params:
    pool: { values: [web-eu, web-us] }
    region: { default: eu }
hook:
  webhook: http://lb.internal/w
"#;

    #[test]
    fn a_plan_fills_declared_params_only() {
        let profiles = Profiles::parse(FILE).unwrap();
        let (profile, values) = profiles
            .resolve(
                "deploy.shift",
                &Handler::profile("lb").param("pool", "web-us"),
            )
            .unwrap();
        assert!(matches!(profile.action, Action::Command(_)));
        assert_eq!(values["pool"], "web-us");
        assert_eq!(values["region"], "eu");
        for (handler, needle) in [
            (Handler::profile("lb"), "param 'pool' is required"),
            (
                Handler::profile("lb").param("pool", "web-cn"),
                "must be one of",
            ),
            (
                Handler::profile("lb")
                    .param("pool", "web-eu")
                    .param("cmd", "x"),
                "not declared",
            ),
            (
                Handler::profile("lb").param("pool", "-rf"),
                "must not start with '-'",
            ),
            (Handler::profile("nope"), "does not have (it has: hook, lb)"),
        ] {
            let err = profiles
                .resolve("deploy.shift", &handler)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.contains("deploy.shift"),
                "{handler:?}: {err}"
            );
        }
    }

    #[test]
    fn bad_profiles_are_named_when_loaded() {
        for (text, needle) in [
            ("a: { command: [x, '{colour}'] }", "{colour}"),
            ("a: { command: [] }", "empty"),
            ("a: { command: [x], webhook: 'http://h' }", "exactly one"),
            ("a: { webhook: 'file:///etc/passwd' }", "http(s)"),
            ("a: { command: [x], params: { weight: {} } }", "built-in"),
            ("a: { command: [x], shell: true }", "shell"),
            ("A: { command: [x] }", "not a profile name"),
        ] {
            let err = Profiles::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn the_shipped_profile_files_load_and_the_flask_plan_names_its_profile() {
        let deploy = Profiles::parse(include_str!("../../../deploy/canary-profiles.yaml")).unwrap();
        assert_eq!(deploy, Profiles::default());
        let flask = Profiles::parse(include_str!(
            "../../../examples/flask-todo/canary-profiles.yaml"
        ))
        .unwrap();
        let plan =
            devfleet_protocol::Plan::parse(include_str!("../../../examples/flask-todo/plan.yaml"))
                .unwrap();
        let deploy = plan.deploy.expect("the flask example deploys");
        let (profile, _) = flask.resolve("deploy.shift", &deploy.shift).unwrap();
        assert!(
            matches!(&profile.action, Action::Command(argv) if argv.contains(&"{weight}".to_owned()))
        );
    }

    #[test]
    fn placeholders_fill_in_one_pass() {
        let value = |n: &str| match n {
            "a" => Some("{b}".to_owned()),
            "b" => Some("B".to_owned()),
            _ => None,
        };
        assert_eq!(fill("x={a},{b} {z", &value).unwrap(), "x={b},B {z");
        assert!(fill("{c}", &value).unwrap_err().contains("{c}"));
    }
}
