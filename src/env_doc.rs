//! docs/OPERATIONS.md's configuration reference, checked against the code:
//! every variable a binary or `devfleet up` reads through clap is
//! documented, every documented `DEVFLEET_*` setting exists, and the table
//! of deprecated names is exactly the runtime's rename table.

use clap::CommandFactory as _;
use devfleet_runtime::settings::{env_names, RENAMED};
use std::collections::{BTreeMap, BTreeSet};

const DOC: &str = include_str!("../docs/OPERATIONS.md");

/// Read directly rather than through clap: the log format (the telemetry
/// crate), the OpenAI key and the gateway token (never flags, so they
/// cannot show in `ps`).
const DIRECT: &[&str] = &[
    "DEVFLEET_LOG_FORMAT",
    "DEVFLEET_OPENAI_API_KEY",
    devfleet_metrics_gateway::TOKEN_ENV,
    devfleet_metrics_gateway::TOKEN_FILE_ENV,
];

/// The settings of every embedded service, by binary name, as clap
/// commands: what `up` reads from the environment (and what the check of
/// docs/OPERATIONS.md collects).
fn service_commands() -> Vec<clap::Command> {
    fn command<S: clap::Args>(name: &'static str) -> clap::Command {
        S::augment_args(clap::Command::new(name))
    }
    vec![
        command::<devfleet_analyzer::settings::Settings>("analyzer"),
        command::<devfleet_scheduler::settings::Settings>("scheduler"),
        command::<devfleet_dev_worker::Settings>("dev-worker"),
        command::<devfleet_router::settings::Settings>("router"),
        command::<devfleet_qa_worker::settings::Settings>("qa-worker"),
        command::<devfleet_canary::settings::Settings>("canary"),
        command::<devfleet_metrics_gateway::Settings>("metrics-gateway"),
    ]
}

/// Every variable read through clap: the CLI's commands and every
/// service's settings (the binaries flatten the CLI's connection settings
/// and their service's settings, nothing else).
fn code_variables() -> BTreeSet<String> {
    let mut names = env_names(&crate::Cli::command());
    for command in service_commands() {
        names.extend(env_names(&command));
    }
    names
}

/// A table row's `DEVFLEET_*` names: those of its first and second cell.
type Row = (Vec<String>, Vec<String>);

/// The rows of each `###` subsection of the configuration reference, by
/// subsection title.
fn documented() -> BTreeMap<String, Vec<Row>> {
    let start = DOC
        .find("## Configuration reference")
        .expect("docs/OPERATIONS.md has a Configuration reference section");
    let end = DOC[start..]
        .find("### Variables devfleet sets for your commands")
        .map_or(DOC.len(), |i| start + i);
    let names = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| w.starts_with("DEVFLEET_"))
            .map(str::to_owned)
            .collect()
    };
    let mut sections: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    let mut title = String::new();
    for line in DOC[start..end].lines() {
        if let Some(t) = line.strip_prefix("### ") {
            title = t.trim().to_owned();
        } else if line.starts_with("| `") {
            let mut cells = line.split('|').skip(1);
            let first = names(cells.next().unwrap_or_default());
            let second = names(cells.next().unwrap_or_default());
            sections
                .entry(title.clone())
                .or_default()
                .push((first, second));
        }
    }
    sections
}

#[test]
fn every_variable_the_code_reads_is_documented() {
    let sections = documented();
    let doc: BTreeSet<String> = sections
        .iter()
        .filter(|(title, _)| title.as_str() != "Deprecated names")
        .flat_map(|(_, rows)| rows.iter().flat_map(|(first, _)| first.clone()))
        .collect();
    let missing: Vec<_> = code_variables()
        .into_iter()
        .chain(DIRECT.iter().map(|s| s.to_string()))
        .filter(|v| !doc.contains(v))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the code but not in docs/OPERATIONS.md's configuration reference: {missing:?}"
    );
}

#[test]
fn every_documented_setting_exists_in_the_code() {
    let code = code_variables();
    let sections = documented();
    let mut unknown = Vec::new();
    for (title, rows) in &sections {
        if title == "Deprecated names" {
            continue;
        }
        for (first, _) in rows {
            for name in first {
                if !code.contains(name) && !DIRECT.contains(&name.as_str()) {
                    unknown.push(format!("{title}: {name}"));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "documented in docs/OPERATIONS.md but read by no code: {unknown:?}"
    );
}

#[test]
fn the_deprecated_names_table_is_the_rename_table() {
    let code = code_variables();
    let documented: BTreeSet<(String, String)> = documented()
        .remove("Deprecated names")
        .expect("docs/OPERATIONS.md has a 'Deprecated names' table")
        .into_iter()
        .map(|(old, new)| match (old.as_slice(), new.as_slice()) {
            ([old], [new]) => (old.clone(), new.clone()),
            other => panic!("a deprecated-names row needs `OLD` | `NEW`: {other:?}"),
        })
        .collect();
    let renamed: BTreeSet<(String, String)> = RENAMED
        .iter()
        .map(|r| (r.old.to_owned(), r.new.to_owned()))
        .collect();
    assert_eq!(documented, renamed);
    for (old, new) in &renamed {
        assert!(
            code.contains(new),
            "{old} is renamed to {new}, which no code reads"
        );
        assert!(
            !code.contains(old),
            "{old} is deprecated but still read by clap"
        );
    }
}
