//! The crate graph ARCHITECTURE.md promises: services sit side by side on
//! one level above the shared crates. No service crate depends on another
//! service crate (dev-dependencies included), and no shared crate depends
//! on a service; only the root package (the CLI, the embedded mode and
//! these end-to-end tests) links services together.

use serde_json::Value;
use std::collections::BTreeMap;

/// Every workspace package's manifest folder (relative to the repository)
/// and the names of the workspace packages it depends on, of any kind.
fn workspace_graph() -> BTreeMap<String, (String, Vec<String>)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(crate::support::repo())
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let root = meta["workspace_root"].as_str().expect("workspace_root");
    let packages = meta["packages"].as_array().expect("packages");
    let names: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or_default().to_owned();
            let manifest = p["manifest_path"].as_str().unwrap_or_default();
            let dir = manifest
                .strip_prefix(root)
                .unwrap_or(manifest)
                .trim_start_matches('/')
                .trim_end_matches("Cargo.toml")
                .trim_end_matches('/')
                .to_owned();
            let deps = p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["name"].as_str())
                .filter(|d| names.contains(d))
                .map(str::to_owned)
                .collect();
            (name, (dir, deps))
        })
        .collect()
}

#[test]
fn services_depend_only_on_shared_crates() {
    let graph = workspace_graph();
    let kind = |name: &str| {
        let dir = &graph[name].0;
        if dir.starts_with("services/") {
            "service"
        } else if dir.starts_with("shared/") {
            "shared"
        } else {
            "root"
        }
    };
    let services = graph.keys().filter(|n| kind(n) == "service").count();
    assert!(
        services >= 7,
        "expected the services under services/: {graph:?}"
    );
    let mut wrong = Vec::new();
    for (name, (_, deps)) in &graph {
        for dep in deps {
            match (kind(name), kind(dep)) {
                ("service", "service") | ("shared", "service") | ("shared", "root") => {
                    wrong.push(format!("{name} depends on {dep}"))
                }
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken: {wrong:#?}");
}
