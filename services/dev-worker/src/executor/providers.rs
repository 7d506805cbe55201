//! The providers file (`DEVFLEET_PROVIDERS`): every OpenAI-compatible
//! provider and model the `openai` executor may call, in one YAML file.
//!
//! ```yaml
//! default: openai/gpt-4o-mini          # provider/model the executor calls
//! providers:
//!   - name: openai
//!     base_url: https://api.openai.com/v1
//!     api_key_env: OPENAI_API_KEY      # the variable holding the key (omit for none)
//!     context_tokens: 100000           # prompt budget (default DEVFLEET_OPENAI_CONTEXT_TOKENS)
//!     max_tokens: 4096                 # longest completion (default DEVFLEET_OPENAI_MAX_TOKENS)
//!     models:
//!       - name: gpt-4o-mini
//!         price: { input_per_million: 0.15, output_per_million: 0.60 }
//!         limits: { requests_per_minute: 500, tokens_per_minute: 200000 }
//!         fallback: vllm/qwen2.5-coder # `model` of this provider or `provider/model`
//! ```
//!
//! [`ProvidersFile::load`] reads and checks it: unknown fields, a `default`
//! or `fallback` naming no configured model, duplicate names, and a key
//! variable that is unset for a model that may be called are errors naming
//! the file and the field. Without the file, `DEVFLEET_OPENAI_BASE_URL`,
//! `_MODEL` and `_API_KEY` describe one implicit provider (no prices, no
//! limits, no fallback).

use super::breaker::BreakerPolicy;
use super::openai::{ApiKey, OpenAi, OpenAiSettings, Price};
use serde::Deserialize;
use std::path::Path;

/// See the module docs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersFile {
    /// `provider/model` the executor calls.
    pub default: String,
    /// When the default model's circuit breaker opens (see
    /// [`super::breaker`]); defaults: 5 failures in 60 s, 30 s open.
    #[serde(default)]
    pub breaker: BreakerPolicy,
    pub providers: Vec<Provider>,
}

/// One OpenAI-compatible server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub base_url: String,
    /// The environment variable holding the API key; none: no key is sent.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub context_tokens: Option<u64>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    pub models: Vec<Model>,
}

/// One model of a provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: String,
    #[serde(default)]
    pub price: PriceSpec,
    #[serde(default)]
    pub limits: Limits,
    /// Called while this model's breaker is open: `model` of the same
    /// provider or `provider/model`.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Overrides the provider's prompt budget.
    #[serde(default)]
    pub context_tokens: Option<u64>,
    /// Overrides the provider's completion limit.
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSpec {
    #[serde(default)]
    pub input_per_million: f64,
    #[serde(default)]
    pub output_per_million: f64,
}

/// Fleet-wide limits of one model (all replicas together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

/// A model picked by name, with its provider.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub provider: &'a Provider,
    pub model: &'a Model,
}

impl Target<'_> {
    /// `provider/model`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.provider.name, self.model.name)
    }
}

/// Defaults the file may leave out.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub context_tokens: u64,
    pub max_tokens: u32,
}

impl ProvidersFile {
    /// Reads and checks the file at `path` (see the module docs).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the providers file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("providers file {}: {e}", path.display()))
    }

    /// Parses and checks the text of a providers file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ProvidersFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for p in &self.providers {
            if !names.insert(p.name.as_str()) {
                return Err(format!("provider '{}' is listed twice", p.name));
            }
            if p.name.is_empty() || p.name.contains('/') {
                return Err(format!(
                    "provider name '{}' must be non-empty and hold no '/'",
                    p.name
                ));
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(format!(
                    "provider '{}': base_url '{}' must start with http:// or https://",
                    p.name, p.base_url
                ));
            }
            let mut models = std::collections::BTreeSet::new();
            for m in &p.models {
                if !models.insert(m.name.as_str()) {
                    return Err(format!(
                        "provider '{}' lists model '{}' twice",
                        p.name, m.name
                    ));
                }
                if m.price.input_per_million < 0.0 || m.price.output_per_million < 0.0 {
                    return Err(format!(
                        "{}/{}: prices must not be negative",
                        p.name, m.name
                    ));
                }
                if let Some(fallback) = &m.fallback {
                    self.find(fallback, Some(&p.name))
                        .map_err(|e| format!("{}/{}: fallback: {e}", p.name, m.name))?;
                }
            }
        }
        self.find(&self.default, None)
            .map_err(|e| format!("default: {e}"))?;
        Ok(())
    }

    /// The model `name` (`provider/model`, or `model` of `within`).
    pub fn find(&self, name: &str, within: Option<&str>) -> Result<Target<'_>, String> {
        let (provider, model) = match (name.split_once('/'), within) {
            (Some((p, m)), _) => (p, m),
            (None, Some(p)) => (p, name),
            (None, None) => return Err(format!("'{name}' must name a model as provider/model")),
        };
        let provider = self
            .providers
            .iter()
            .find(|p| p.name == provider)
            .ok_or_else(|| format!("no provider named '{provider}' (in '{name}')"))?;
        let model = provider
            .models
            .iter()
            .find(|m| m.name == model)
            .ok_or_else(|| {
                format!(
                    "provider '{}' has no model '{model}' (in '{name}')",
                    provider.name
                )
            })?;
        Ok(Target { provider, model })
    }

    /// The default model and its fallback (if any).
    pub fn route(&self) -> Result<(Target<'_>, Option<Target<'_>>), String> {
        let primary = self.find(&self.default, None)?;
        let fallback = match &primary.model.fallback {
            Some(f) => Some(self.find(f, Some(&primary.provider.name))?),
            None => None,
        };
        Ok((primary, fallback))
    }
}

/// The executor for one model, its key read from `env` (the variable
/// `api_key_env` names; unset or empty is an error naming it).
pub fn executor(
    target: Target<'_>,
    defaults: Defaults,
    env: impl Fn(&str) -> Option<String>,
) -> Result<OpenAi, String> {
    let Target { provider, model } = target;
    let api_key = match &provider.api_key_env {
        Some(var) => Some(ApiKey::new(
            env(var)
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    format!(
                        "provider '{}' reads its API key from {var}, which is unset or empty",
                        provider.name
                    )
                })?,
        )),
        None => None,
    };
    let openai = OpenAi::new(OpenAiSettings {
        base_url: provider.base_url.trim_end_matches('/').to_owned(),
        model: model.name.clone(),
        api_key,
        max_tokens: Some(
            model
                .max_tokens
                .or(provider.max_tokens)
                .unwrap_or(defaults.max_tokens),
        ),
        ..OpenAiSettings::default()
    })?;
    Ok(openai
        .with_provider(
            provider.name.clone(),
            Price {
                input_per_million: model.price.input_per_million,
                output_per_million: model.price.output_per_million,
            },
        )
        .with_context_tokens(
            model
                .context_tokens
                .or(provider.context_tokens)
                .unwrap_or(defaults.context_tokens),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../../examples/providers.yaml");

    #[test]
    fn the_example_file_is_valid() {
        let file = ProvidersFile::parse(EXAMPLE).unwrap();
        let names: Vec<&str> = file.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["openai", "vllm", "llamacpp", "ollama"]);
        let (primary, fallback) = file.route().unwrap();
        assert_eq!(primary.id(), "openai/gpt-4o-mini");
        assert!(fallback.is_some());
    }

    #[test]
    fn bad_files_name_the_problem() {
        let base = "default: p/m\nproviders:\n  - name: p\n    base_url: http://x/v1\n    models:\n      - name: m\n";
        ProvidersFile::parse(base).unwrap();
        for (text, needle) in [
            (base.replace("default: p/m", "default: p/n"), "no model 'n'"),
            (base.replace("default: p/m", "default: m"), "provider/model"),
            (base.replace("http://x/v1", "x/v1"), "base_url"),
            (
                base.replace("- name: m\n", "- name: m\n        fallback: q/m\n"),
                "no provider named 'q'",
            ),
            (
                base.replace("- name: m\n", "- name: m\n        colour: red\n"),
                "unknown field",
            ),
        ] {
            let err = ProvidersFile::parse(&text).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn a_key_variable_that_is_unset_is_named() {
        let text = "default: p/m\nproviders:\n  - name: p\n    base_url: http://x/v1\n    api_key_env: MY_KEY\n    models:\n      - name: m\n";
        let file = ProvidersFile::parse(text).unwrap();
        let defaults = Defaults {
            context_tokens: 1000,
            max_tokens: 100,
        };
        let err = executor(file.route().unwrap().0, defaults, |_| None).unwrap_err();
        assert!(err.contains("MY_KEY"), "{err}");
        executor(file.route().unwrap().0, defaults, |_| Some("k".into())).unwrap();
    }
}
