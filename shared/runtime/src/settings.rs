//! How flags and environment variables become a service's settings: one
//! path for every binary and for `devfleet up`.
//!
//! Each service defines one `Settings` struct (`#[derive(clap::Args)]`
//! with `env` attributes); its defaults are written there once. Binaries
//! parse it with [`parse`], `devfleet up` with [`from_env`], and a
//! service's `Config::new` takes its defaults from [`defaults`] (the clap
//! defaults, no environment), so no literal default is written twice.
//!
//! # Naming scheme
//!
//! * Shared settings are `DEVFLEET_<NAME>` (`DEVFLEET_BUS`,
//!   `DEVFLEET_REDIS_URL`, ...); a service's own are
//!   `DEVFLEET_<SERVICE>_<NAME>` with the prefixes `ANALYZER`, `SCHEDULER`,
//!   `DEV` (dev-worker), `QA`, `ROUTER`, `CANARY` and `GATEWAY`. The
//!   executor settings (`DEVFLEET_EXECUTOR`, `DEVFLEET_COMMAND_*`,
//!   `DEVFLEET_OPENAI_*`, `DEVFLEET_SIMULATE_*`) are named for the
//!   executor they configure.
//! * Every duration is `..._SECONDS` and accepts fractions (`0.25`): one
//!   unit nobody has to look up, from the 20 ms dispatch tick to the week a
//!   canary record is kept. Sizes end in their unit (`_BYTES`, `_KB`,
//!   `_MB`, binary multiples).
//! * The names used before this scheme still work: [`RENAMED`] maps each
//!   to its new name (converting milliseconds to seconds where the unit
//!   changed) and a deprecation warning names the new variable.
//! * A variable set to the empty string counts as unset (clap alone would
//!   reject `DEVFLEET_MAX_SLOTS=` as an invalid value).

use clap::{ArgMatches, Command};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::Mutex;
use std::time::Duration;

/// How the value of a renamed variable converts to the new one's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    /// Same unit: the value is taken as is.
    Same,
    /// Milliseconds (an integer or decimal) to seconds.
    MillisToSeconds,
}

/// A variable that was renamed; the old name keeps working for now.
#[derive(Debug, Clone, Copy)]
pub struct Renamed {
    /// The name used before.
    pub old: &'static str,
    /// The name to use now.
    pub new: &'static str,
    pub convert: Convert,
}

const fn same(old: &'static str, new: &'static str) -> Renamed {
    Renamed {
        old,
        new,
        convert: Convert::Same,
    }
}

const fn millis(old: &'static str, new: &'static str) -> Renamed {
    Renamed {
        old,
        new,
        convert: Convert::MillisToSeconds,
    }
}

/// Every renamed variable (documented in docs/OPERATIONS.md, "Deprecated
/// names"). Remove an entry one release after its rename.
pub const RENAMED: &[Renamed] = &[
    // scheduler
    same(
        "DEVFLEET_DIRECT_ROUTING",
        "DEVFLEET_SCHEDULER_DIRECT_ROUTING",
    ),
    millis(
        "DEVFLEET_DISPATCH_LEASE_MS",
        "DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS",
    ),
    millis(
        "DEVFLEET_DISPATCH_TICK_MS",
        "DEVFLEET_SCHEDULER_DISPATCH_TICK_SECONDS",
    ),
    millis(
        "DEVFLEET_REAP_INTERVAL_MS",
        "DEVFLEET_SCHEDULER_REAP_INTERVAL_SECONDS",
    ),
    // dev-worker
    same("DEVFLEET_WORKER_INSTANCE", "DEVFLEET_DEV_INSTANCE"),
    same("DEVFLEET_MIN_SLOTS", "DEVFLEET_DEV_MIN_SLOTS"),
    same("DEVFLEET_MAX_SLOTS", "DEVFLEET_DEV_MAX_SLOTS"),
    same("DEVFLEET_SCALE_UP_TICKS", "DEVFLEET_DEV_SCALE_UP_TICKS"),
    same("DEVFLEET_SCALE_DOWN_TICKS", "DEVFLEET_DEV_SCALE_DOWN_TICKS"),
    millis("DEVFLEET_SCALE_TICK_MS", "DEVFLEET_DEV_SCALE_TICK_SECONDS"),
    millis("DEVFLEET_LEASE_MS", "DEVFLEET_DEV_LEASE_SECONDS"),
    same(
        "DEVFLEET_EXEC_TIMEOUT_SECS",
        "DEVFLEET_DEV_EXEC_TIMEOUT_SECONDS",
    ),
    same(
        "DEVFLEET_SHUTDOWN_GRACE_SECS",
        "DEVFLEET_DEV_SHUTDOWN_GRACE_SECONDS",
    ),
    millis(
        "DEVFLEET_HEARTBEAT_TTL_MS",
        "DEVFLEET_DEV_HEARTBEAT_TTL_SECONDS",
    ),
    same("DEVFLEET_CACHE", "DEVFLEET_DEV_CACHE"),
    same("DEVFLEET_CACHE_SALT", "DEVFLEET_DEV_CACHE_SALT"),
    same(
        "DEVFLEET_COMMAND_OUTPUT_CAP",
        "DEVFLEET_COMMAND_OUTPUT_CAP_BYTES",
    ),
    millis(
        "DEVFLEET_SIMULATE_UNIT_MS",
        "DEVFLEET_SIMULATE_UNIT_SECONDS",
    ),
    // qa-worker
    same(
        "DEVFLEET_QA_CHECK_TIMEOUT_SECS",
        "DEVFLEET_QA_CHECK_TIMEOUT_SECONDS",
    ),
    same(
        "DEVFLEET_QA_INTEGRATION_TIMEOUT_SECS",
        "DEVFLEET_QA_INTEGRATION_TIMEOUT_SECONDS",
    ),
    same("DEVFLEET_QA_CPU_SECS", "DEVFLEET_QA_CPU_SECONDS"),
    // router
    millis(
        "DEVFLEET_RETRY_BASE_MS",
        "DEVFLEET_ROUTER_RETRY_BASE_SECONDS",
    ),
    same("DEVFLEET_RETRY_FACTOR", "DEVFLEET_ROUTER_RETRY_FACTOR"),
    millis("DEVFLEET_RETRY_CAP_MS", "DEVFLEET_ROUTER_RETRY_CAP_SECONDS"),
    same("DEVFLEET_RETRY_JITTER", "DEVFLEET_ROUTER_RETRY_JITTER"),
    millis(
        "DEVFLEET_RETRY_LEASE_GRACE_MS",
        "DEVFLEET_ROUTER_RETRY_LEASE_GRACE_SECONDS",
    ),
    millis(
        "DEVFLEET_BREAKER_WINDOW_MS",
        "DEVFLEET_ROUTER_BREAKER_WINDOW_SECONDS",
    ),
    millis(
        "DEVFLEET_BREAKER_BUCKET_MS",
        "DEVFLEET_ROUTER_BREAKER_BUCKET_SECONDS",
    ),
    same(
        "DEVFLEET_BREAKER_MIN_VOLUME",
        "DEVFLEET_ROUTER_BREAKER_MIN_VOLUME",
    ),
    same(
        "DEVFLEET_BREAKER_THRESHOLD",
        "DEVFLEET_ROUTER_BREAKER_THRESHOLD",
    ),
    millis(
        "DEVFLEET_BREAKER_COOLDOWN_MS",
        "DEVFLEET_ROUTER_BREAKER_COOLDOWN_SECONDS",
    ),
    same("DEVFLEET_BREAKER_PROBES", "DEVFLEET_ROUTER_BREAKER_PROBES"),
    millis(
        "DEVFLEET_BREAKER_TICK_MS",
        "DEVFLEET_ROUTER_BREAKER_TICK_SECONDS",
    ),
    same("DEVFLEET_INDEX_BUS_DLQ", "DEVFLEET_ROUTER_INDEX_BUS_DLQ"),
    // metrics-gateway
    same(
        "DEVFLEET_GATEWAY_PING_INTERVAL",
        "DEVFLEET_GATEWAY_PING_INTERVAL_SECONDS",
    ),
    same(
        "DEVFLEET_GATEWAY_PONG_TIMEOUT",
        "DEVFLEET_GATEWAY_PONG_TIMEOUT_SECONDS",
    ),
    same("DEVFLEET_GATEWAY_WINDOW", "DEVFLEET_GATEWAY_WINDOW_SECONDS"),
    same(
        "DEVFLEET_GATEWAY_POLL_INTERVAL",
        "DEVFLEET_GATEWAY_POLL_INTERVAL_SECONDS",
    ),
];

/// What [`fix_env`] decided about the environment.
#[derive(Debug, Default, PartialEq)]
pub struct EnvFixes {
    /// Variables to remove (set to the empty string: they count as unset).
    pub remove: Vec<String>,
    /// Variables to set (a new name from a deprecated one).
    pub set: Vec<(String, String)>,
    /// One line per deprecated name in use, naming its replacement.
    pub warnings: Vec<String>,
}

/// A deprecated variable whose value cannot be converted.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{old} (deprecated; use {new}) must be a number of milliseconds, got '{value}'")]
pub struct BadRenamedValue {
    pub old: String,
    pub new: String,
    pub value: String,
}

/// Decides, from the variables `vars`, which `DEVFLEET_*` variables count
/// as unset (empty ones) and which new names deprecated ones stand for.
/// Pure, so it is tested without touching the process environment; see
/// [`apply_env_fixes`] for the effect.
pub fn fix_env<I, K, V>(vars: I) -> Result<EnvFixes, BadRenamedValue>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    let mut fixes = EnvFixes::default();
    let mut present = std::collections::BTreeMap::new();
    for (key, value) in vars {
        let (key, value) = (key.into(), value.into());
        let Some(key) = key.to_str() else { continue };
        if !key.starts_with("DEVFLEET_") {
            continue;
        }
        if value.is_empty() {
            fixes.remove.push(key.to_owned());
        } else {
            present.insert(key.to_owned(), value);
        }
    }
    for renamed in RENAMED {
        let Some(value) = present.get(renamed.old) else {
            continue;
        };
        if present.contains_key(renamed.new) {
            fixes.warnings.push(format!(
                "{} is deprecated and ignored because {} is set",
                renamed.old, renamed.new
            ));
            continue;
        }
        let value = value.to_string_lossy();
        let converted = match renamed.convert {
            Convert::Same => value.into_owned(),
            Convert::MillisToSeconds => {
                let ms: f64 = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| BadRenamedValue {
                        old: renamed.old.to_owned(),
                        new: renamed.new.to_owned(),
                        value: value.clone().into_owned(),
                    })?;
                format!("{}", ms / 1000.0)
            }
        };
        fixes.warnings.push(format!(
            "{} is deprecated; use {}={converted}",
            renamed.old, renamed.new
        ));
        fixes.set.push((renamed.new.to_owned(), converted));
    }
    Ok(fixes)
}

static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Applies [`fix_env`] to the process environment and keeps its warnings
/// for [`take_warnings`]. Call it first thing in `main`, before any other
/// thread exists (changing the environment is only sound then).
pub fn apply_env_fixes() -> Result<(), BadRenamedValue> {
    let fixes = fix_env(std::env::vars_os())?;
    for key in &fixes.remove {
        std::env::remove_var(key);
    }
    for (key, value) in &fixes.set {
        std::env::set_var(key, value);
    }
    WARNINGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(fixes.warnings);
    Ok(())
}

/// The deprecation warnings [`apply_env_fixes`] collected (once: they are
/// handed out to the first caller), to log after telemetry is set up.
pub fn take_warnings() -> Vec<String> {
    std::mem::take(&mut *WARNINGS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The arguments of a binary: environment fixed up ([`apply_env_fixes`]),
/// then flags and environment parsed by clap. Exits with clap's usage
/// error (status 2) on a bad value, like `Parser::parse`.
pub fn parse<A: clap::Parser>() -> A {
    if let Err(e) = apply_env_fixes() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    A::parse()
}

/// A service's settings from the environment alone (no flags), as the
/// binary `name` would read them; for `devfleet up`. Call
/// [`apply_env_fixes`] once before. Errors name the variable.
pub fn from_env<S: clap::Args>(name: &'static str) -> Result<S, clap::Error> {
    let matches = S::augment_args(Command::new(name)).try_get_matches_from([name])?;
    S::from_arg_matches(&matches)
}

/// Implements `Default` for a service's settings struct as its clap
/// defaults, reading no environment ([`defaults`]).
#[macro_export]
macro_rules! default_settings {
    ($settings:ty) => {
        impl Default for $settings {
            /// The clap defaults, no environment.
            fn default() -> Self {
                $crate::settings::defaults()
            }
        }
    };
}

/// A settings struct with every field at its clap default, reading no
/// environment: what `Config::new` starts from.
///
/// # Panics
/// If the struct has a required argument without a default (a bug in its
/// definition, caught by each service's `defaults_are_valid` test).
pub fn defaults<S: clap::Args>() -> S {
    let command = S::augment_args(Command::new("defaults")).mut_args(|a| a.env(None));
    let parsed = command
        .try_get_matches_from(["defaults"])
        .and_then(|matches: ArgMatches| S::from_arg_matches(&matches));
    match parsed {
        Ok(s) => s,
        Err(e) => panic!("settings without defaults: {e}"),
    }
}

/// Every environment variable the arguments of `command` and its
/// subcommands read (for the check against docs/OPERATIONS.md).
pub fn env_names(command: &Command) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for sub in command.get_subcommands() {
        names.extend(env_names(sub));
    }
    names
}

/// Value parser of every `..._SECONDS` setting: a non-negative number of
/// seconds, fractions allowed (`0.25`), an `s` suffix tolerated.
pub fn seconds(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    let number = trimmed.strip_suffix('s').unwrap_or(trimmed);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=1e10).contains(&value) {
        return Err(format!("'{s}' must be a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_variables_count_as_unset() {
        let fixes = fix_env([
            ("DEVFLEET_DEV_MAX_SLOTS", ""),
            ("DEVFLEET_BUS", "nats"),
            ("OTHER", ""),
        ])
        .unwrap();
        assert_eq!(fixes.remove, vec!["DEVFLEET_DEV_MAX_SLOTS".to_owned()]);
        assert!(fixes.set.is_empty() && fixes.warnings.is_empty());
    }

    #[test]
    fn a_deprecated_name_sets_the_new_one_with_a_warning() {
        let fixes = fix_env([("DEVFLEET_MAX_SLOTS", "4")]).unwrap();
        assert_eq!(
            fixes.set,
            vec![("DEVFLEET_DEV_MAX_SLOTS".to_owned(), "4".to_owned())]
        );
        assert_eq!(fixes.warnings.len(), 1);
        assert!(
            fixes.warnings[0].contains("DEVFLEET_MAX_SLOTS is deprecated")
                && fixes.warnings[0].contains("DEVFLEET_DEV_MAX_SLOTS"),
            "{:?}",
            fixes.warnings
        );
    }

    #[test]
    fn deprecated_milliseconds_become_seconds() {
        let fixes = fix_env([
            ("DEVFLEET_DISPATCH_TICK_MS", "20"),
            ("DEVFLEET_LEASE_MS", "30000"),
        ])
        .unwrap();
        let set: std::collections::BTreeMap<_, _> = fixes.set.into_iter().collect();
        assert_eq!(set["DEVFLEET_SCHEDULER_DISPATCH_TICK_SECONDS"], "0.02");
        assert_eq!(set["DEVFLEET_DEV_LEASE_SECONDS"], "30");
        assert_eq!(
            seconds(&set["DEVFLEET_SCHEDULER_DISPATCH_TICK_SECONDS"]),
            Ok(Duration::from_millis(20))
        );
        let err = fix_env([("DEVFLEET_LEASE_MS", "soon")]).unwrap_err();
        assert!(
            err.to_string().contains("DEVFLEET_DEV_LEASE_SECONDS"),
            "{err}"
        );
    }

    #[test]
    fn the_new_name_wins_over_the_old_one() {
        let fixes =
            fix_env([("DEVFLEET_MAX_SLOTS", "4"), ("DEVFLEET_DEV_MAX_SLOTS", "6")]).unwrap();
        assert!(fixes.set.is_empty());
        assert!(
            fixes.warnings[0].contains("ignored"),
            "{:?}",
            fixes.warnings
        );
    }

    #[test]
    fn an_empty_deprecated_name_is_just_unset() {
        let fixes = fix_env([("DEVFLEET_MAX_SLOTS", "")]).unwrap();
        assert_eq!(fixes.remove, vec!["DEVFLEET_MAX_SLOTS".to_owned()]);
        assert!(fixes.set.is_empty() && fixes.warnings.is_empty());
    }

    #[test]
    fn renamed_names_are_unique_and_follow_the_scheme() {
        let mut seen = BTreeSet::new();
        for r in RENAMED {
            assert!(seen.insert(r.old), "{} renamed twice", r.old);
            assert!(
                !r.new.ends_with("_MS") && !r.new.ends_with("_SECS"),
                "{}",
                r.new
            );
            assert!(
                RENAMED.iter().all(|other| other.old != r.new),
                "{} is both old and new",
                r.new
            );
        }
    }

    #[test]
    fn seconds_take_fractions_and_refuse_nonsense() {
        assert_eq!(seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(seconds("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert!(seconds("-1").is_err());
        assert!(seconds("250ms").is_err());
        assert!(seconds("").is_err());
    }

    #[derive(Debug, clap::Args)]
    struct Example {
        #[arg(long, env = "DEVFLEET_EXAMPLE_TICK_SECONDS", default_value = "0.5", value_parser = seconds)]
        tick: Duration,
        #[arg(long, env = "DEVFLEET_EXAMPLE_NAME")]
        name: Option<String>,
    }

    #[test]
    fn defaults_come_from_the_clap_attributes_and_names_are_collected() {
        let example: Example = defaults();
        assert_eq!(example.tick, Duration::from_millis(500));
        assert_eq!(example.name, None);
        let names = env_names(&<Example as clap::Args>::augment_args(Command::new("x")));
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["DEVFLEET_EXAMPLE_NAME", "DEVFLEET_EXAMPLE_TICK_SECONDS"]
        );
    }
}
