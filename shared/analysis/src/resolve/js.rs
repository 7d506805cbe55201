//! JavaScript / TypeScript import resolution, following Node and TypeScript.
//!
//! - Relative specifiers (`./x`, `../x`) resolve against the importer's
//!   directory; one that climbs above the root is external.
//! - A TypeScript importer's `./x.js` names `./x.ts` (or `.tsx`, `.d.ts`)
//!   first, as TypeScript's resolver does (`.jsx`→`.tsx`, `.mjs`→`.mts`,
//!   `.cjs`→`.cts` likewise); a JavaScript importer tries that after the exact
//!   file.
//! - An extensionless specifier tries, in order, `.ts .tsx .d.ts .js .jsx`
//!   for TypeScript importers (`.js .jsx` first for JavaScript importers);
//!   `.mjs .cjs .mts .cts` files resolve only when named, then a directory's `package.json` entry point
//!   (`types`/`typings`, then `main`, for TypeScript importers; `main` for
//!   JavaScript ones), then its `index.*` in the same order.
//! - Bare specifiers go through the nearest `tsconfig.json` (or
//!   `jsconfig.json`) above the importer, with `extends` followed inside the
//!   tree: `compilerOptions.paths` (longest matching prefix; `*` wildcards;
//!   each substitution tried in turn), then `compilerOptions.baseUrl`. What
//!   is still unresolved is an external package (`react`, `node:fs`).
//! - A specifier naming a non-source file of the tree (`./styles.css`,
//!   `./data.json`) is no edge.

use super::{join, parent, FastMap, FileSet, Target};
use crate::Warning;

/// TypeScript's path mapping for the files under one config's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathMapping {
    /// `baseUrl`, relative to the root.
    pub base_url: Option<String>,
    /// `paths` patterns with their substitutions, already relative to the root.
    pub paths: Vec<(String, Vec<String>)>,
}

/// Resolves JS/TS specifiers against a [`FileSet`].
#[derive(Debug)]
pub struct JsResolver<'a> {
    files: &'a FileSet,
    /// Directory of a tsconfig/jsconfig → its merged mapping.
    configs: FastMap<String, PathMapping>,
    /// Directory of a `package.json` → its entry points, root-relative.
    packages: FastMap<String, PackageEntry>,
}

/// The entry points a directory's `package.json` declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PackageEntry {
    /// `types` (or `typings`): what TypeScript importers load.
    types: Option<String>,
    /// `main`: what Node loads.
    main: Option<String>,
}

/// Extensions an extensionless specifier completes to. `.mjs .cjs .mts
/// .cts` are never completed (Node's ESM and TypeScript both require them
/// spelled out); they resolve when named.
const TS_ORDER: &[&str] = &[".ts", ".tsx", ".d.ts", ".js", ".jsx"];
const JS_ORDER: &[&str] = &[".js", ".jsx", ".ts", ".tsx", ".d.ts"];

/// TypeScript's output-extension → source-extension substitutions.
const SUBSTITUTIONS: &[(&str, &[&str])] = &[
    (".js", &[".ts", ".tsx", ".d.ts"]),
    (".jsx", &[".tsx", ".d.ts"]),
    (".mjs", &[".mts", ".d.mts"]),
    (".cjs", &[".cts", ".d.cts"]),
];

fn is_ts_importer(path: &str) -> bool {
    path.ends_with(".ts")
        || path.ends_with(".tsx")
        || path.ends_with(".mts")
        || path.ends_with(".cts")
}

fn is_source(path: &str) -> bool {
    crate::Language::from_path(path).is_some_and(|l| l != crate::Language::Python)
}

impl<'a> JsResolver<'a> {
    /// Indexes `files` and loads every `tsconfig.json`/`jsconfig.json` among
    /// them through `read` (relative path → text). Configs that cannot be
    /// read or parsed are reported and ignored.
    pub fn new(files: &'a FileSet, read: &dyn Fn(&str) -> Option<String>) -> (Self, Vec<Warning>) {
        let mut warnings = Vec::new();
        let mut config_files: Vec<&str> = files
            .files()
            .filter(|p| {
                let name = p.rsplit('/').next().unwrap_or(p);
                name == "tsconfig.json" || name == "jsconfig.json"
            })
            .collect();
        // tsconfig.json wins over jsconfig.json in the same directory.
        config_files.sort_by_key(|p| (parent(p).to_string(), !p.ends_with("tsconfig.json")));
        let mut configs = FastMap::default();
        for path in config_files {
            let dir = parent(path).to_string();
            if configs.contains_key(&dir) {
                continue;
            }
            match load_config(files, read, path, 0) {
                Ok(mapping) => {
                    configs.insert(dir, mapping);
                }
                Err(message) => warnings.push(Warning {
                    path: path.to_string(),
                    message,
                }),
            }
        }
        let mut packages = FastMap::default();
        for path in files.files() {
            let name = path.rsplit('/').next().unwrap_or(path);
            if name != "package.json" {
                continue;
            }
            // A package.json that is not JSON only loses its entry points.
            let Some(value) =
                read(path).and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            else {
                continue;
            };
            let dir = parent(path);
            let field = |key: &str| {
                value
                    .get(key)
                    .and_then(|v| v.as_str())
                    .and_then(|p| join(dir, p))
            };
            packages.insert(
                dir.to_string(),
                PackageEntry {
                    types: field("types").or_else(|| field("typings")),
                    main: field("main"),
                },
            );
        }
        (
            JsResolver {
                files,
                configs,
                packages,
            },
            warnings,
        )
    }

    /// The mapping that applies to files in `dir`: the nearest config above.
    fn mapping_for(&self, mut dir: &str) -> Option<&PathMapping> {
        loop {
            if let Some(m) = self.configs.get(dir) {
                return Some(m);
            }
            if dir.is_empty() {
                return None;
            }
            dir = parent(dir);
        }
    }

    /// Where `specifier`, imported by `importer`, leads.
    pub fn resolve(&self, importer: &str, specifier: &str) -> Target {
        let spec = specifier.split(['?', '#']).next().unwrap_or(specifier);
        let ts = is_ts_importer(importer);
        let dir = parent(importer);
        if spec == "." || spec == ".." || spec.starts_with("./") || spec.starts_with("../") {
            return match join(dir, spec) {
                Some(path) => self
                    .resolve_path(&path, ts)
                    .unwrap_or_else(|| Target::Unresolved(specifier.to_string())),
                None => Target::External(specifier.to_string()),
            };
        }
        if spec.is_empty() || spec.starts_with('/') || spec.contains(':') || spec.starts_with('#') {
            return Target::External(specifier.to_string());
        }
        if let Some(mapping) = self.mapping_for(dir) {
            if let Some(target) = self.resolve_mapped(mapping, spec, ts) {
                return target;
            }
        }
        Target::External(specifier.to_string())
    }

    fn resolve_mapped(&self, mapping: &PathMapping, spec: &str, ts: bool) -> Option<Target> {
        // The longest pattern prefix wins; an exact pattern counts as its length.
        let mut best: Option<(usize, &str, &Vec<String>)> = None;
        for (pattern, substitutions) in &mapping.paths {
            let captured = match pattern.split_once('*') {
                None if pattern == spec => Some(""),
                None => None,
                Some((prefix, suffix)) => {
                    if spec.len() >= prefix.len() + suffix.len()
                        && spec.starts_with(prefix)
                        && spec.ends_with(suffix)
                    {
                        Some(&spec[prefix.len()..spec.len() - suffix.len()])
                    } else {
                        None
                    }
                }
            };
            if let Some(captured) = captured {
                let rank = pattern.find('*').unwrap_or(pattern.len() + 1);
                if best.is_none_or(|(r, _, _)| rank > r) {
                    best = Some((rank, captured, substitutions));
                }
            }
        }
        if let Some((_, captured, substitutions)) = best {
            for substitution in substitutions {
                let path = substitution.replacen('*', captured, 1);
                if let Some(target) = self.resolve_path(&path, ts) {
                    return Some(target);
                }
            }
        }
        let base = mapping.base_url.as_deref()?;
        let path = join(base, spec)?;
        self.resolve_path(&path, ts)
    }

    /// A root-relative path as Node/TypeScript would complete it.
    fn resolve_path(&self, path: &str, ts: bool) -> Option<Target> {
        self.resolve_path_at(path, ts, 0)
    }

    /// `redirects` counts `package.json` entry points followed, so two
    /// packages naming each other cannot loop.
    fn resolve_path_at(&self, path: &str, ts: bool, redirects: u32) -> Option<Target> {
        let found = |p: String| -> Target {
            if is_source(&p) {
                Target::File(p)
            } else {
                Target::Nothing
            }
        };
        let substituted = || {
            SUBSTITUTIONS.iter().find_map(|(from, tos)| {
                let stem = path.strip_suffix(from)?;
                tos.iter()
                    .map(|to| format!("{stem}{to}"))
                    .find(|candidate| self.files.is_file(candidate))
            })
        };
        if ts {
            if let Some(p) = substituted() {
                return Some(Target::File(p));
            }
        }
        if self.files.is_file(path) {
            return Some(found(path.to_string()));
        }
        if !ts {
            if let Some(p) = substituted() {
                return Some(Target::File(p));
            }
        }
        let order = if ts { TS_ORDER } else { JS_ORDER };
        for ext in order {
            let candidate = format!("{path}{ext}");
            if self.files.is_file(&candidate) {
                return Some(Target::File(candidate));
            }
        }
        if self.files.is_dir(path) {
            // A directory's package.json: `types`/`typings` for TypeScript
            // importers, then `main`.
            if let Some(entry) = self.packages.get(path).filter(|_| redirects < 4) {
                let entries = if ts {
                    [entry.types.as_deref(), entry.main.as_deref()]
                } else {
                    [entry.main.as_deref(), None]
                };
                for entry in entries.into_iter().flatten() {
                    if let Some(target) = self.resolve_path_at(entry, ts, redirects + 1) {
                        return Some(target);
                    }
                }
            }
            for ext in order {
                let candidate = if path.is_empty() {
                    format!("index{ext}")
                } else {
                    format!("{path}/index{ext}")
                };
                if self.files.is_file(&candidate) {
                    return Some(Target::File(candidate));
                }
            }
        }
        None
    }
}

/// Loads one config and the chain it `extends`, merged (the child's keys win).
fn load_config(
    files: &FileSet,
    read: &dyn Fn(&str) -> Option<String>,
    path: &str,
    depth: u32,
) -> Result<PathMapping, String> {
    if depth > 16 {
        return Err("`extends` chain deeper than 16 (a loop?)".into());
    }
    let text = read(path).ok_or("cannot be read")?;
    let value: serde_json::Value =
        serde_json::from_str(&strip_jsonc(&text)).map_err(|e| format!("not valid JSON: {e}"))?;
    let dir = parent(path);
    let mut mapping = PathMapping::default();
    let mut paths_dir: Option<String> = None;
    let extends: Vec<&str> = match value.get("extends") {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    for parent_spec in extends {
        if !parent_spec.starts_with('.') {
            continue; // a package's shared config: outside the tree
        }
        let Some(base) = join(dir, parent_spec) else {
            continue;
        };
        let candidates = [
            base.clone(),
            format!("{base}.json"),
            format!("{base}/tsconfig.json"),
        ];
        if let Some(file) = candidates.iter().find(|c| files.is_file(c)) {
            let inherited = load_config(files, read, file, depth + 1)?;
            if inherited.base_url.is_some() {
                mapping.base_url = inherited.base_url;
            }
            if !inherited.paths.is_empty() {
                mapping.paths = inherited.paths;
            }
        }
    }
    let options = value.get("compilerOptions");
    if let Some(base_url) = options
        .and_then(|o| o.get("baseUrl"))
        .and_then(|v| v.as_str())
    {
        mapping.base_url = join(dir, base_url);
    }
    if let Some(paths) = options
        .and_then(|o| o.get("paths"))
        .and_then(|v| v.as_object())
    {
        paths_dir = Some(dir.to_string());
        mapping.paths = paths
            .iter()
            .map(|(pattern, subs)| {
                let subs = subs
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                (pattern.clone(), subs)
            })
            .collect();
    }
    // Substitutions are relative to baseUrl when set, else to the config
    // that declared them; inherited ones were made root-relative already.
    if let Some(declared_in) = paths_dir {
        let base = mapping.base_url.clone().unwrap_or(declared_in);
        for (_, subs) in &mut mapping.paths {
            *subs = subs.iter().filter_map(|s| join(&base, s)).collect();
        }
    }
    Ok(mapping)
}

/// JSON with comments and trailing commas (tsconfig's dialect) → JSON.
pub fn strip_jsonc(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut last_copy = 0;
    let mut pending_comma: Option<usize> = None; // index in `out` of a comma that may trail
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                pending_comma = None;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') || b.get(i + 1) == Some(&b'*') => {
                out.push_str(&text[last_copy..i]);
                if b[i + 1] == b'/' {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                } else {
                    i += 2;
                    while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                        i += 1;
                    }
                    i += 2;
                }
                i = i.min(b.len());
                last_copy = i;
                out.push(' ');
                continue;
            }
            b',' => {
                out.push_str(&text[last_copy..i]);
                pending_comma = Some(out.len());
                out.push(',');
                i += 1;
                last_copy = i;
                continue;
            }
            b'}' | b']' => {
                if let Some(at) = pending_comma.take() {
                    out.push_str(&text[last_copy..i]);
                    out.replace_range(at..at + 1, " ");
                    last_copy = i;
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => pending_comma = None,
        }
        i += 1;
    }
    out.push_str(&text[last_copy.min(text.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolver_with(
        files: &[&str],
        configs: &[(&str, &str)],
    ) -> (FileSet, HashMap<String, String>) {
        let mut all: Vec<String> = files.iter().map(|s| s.to_string()).collect();
        all.extend(configs.iter().map(|(p, _)| p.to_string()));
        let texts = configs
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        (FileSet::new(all), texts)
    }

    fn resolve(files: &[&str], configs: &[(&str, &str)], importer: &str, spec: &str) -> Target {
        let (set, texts) = resolver_with(files, configs);
        let read = |p: &str| texts.get(p).cloned();
        let (resolver, warnings) = JsResolver::new(&set, &read);
        assert!(warnings.is_empty(), "{warnings:?}");
        resolver.resolve(importer, spec)
    }

    fn file(p: &str) -> Target {
        Target::File(p.into())
    }

    const TREE: &[&str] = &[
        "src/a.ts",
        "src/b.tsx",
        "src/util/index.ts",
        "src/types.d.ts",
        "src/legacy.js",
        "src/both.js",
        "src/both.ts",
        "src/styles.css",
        "lib/x.mjs",
    ];

    #[test]
    fn relative_with_extensions_and_index() {
        assert_eq!(resolve(TREE, &[], "src/a.ts", "./b"), file("src/b.tsx"));
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "./util"),
            file("src/util/index.ts")
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "./types"),
            file("src/types.d.ts")
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "./legacy"),
            file("src/legacy.js")
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "../lib/x.mjs"),
            file("lib/x.mjs")
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "./styles.css"),
            Target::Nothing
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "./missing"),
            Target::Unresolved("./missing".into())
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "../../up"),
            Target::External("../../up".into())
        );
    }

    #[test]
    fn js_specifier_names_the_ts_source() {
        assert_eq!(resolve(TREE, &[], "src/a.ts", "./a.js"), file("src/a.ts"));
        assert_eq!(resolve(TREE, &[], "src/a.ts", "./b.js"), file("src/b.tsx"));
        // A TS importer prefers the source, a JS importer the file it named.
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "./both.js"),
            file("src/both.ts")
        );
        assert_eq!(
            resolve(TREE, &[], "src/legacy.js", "./both.js"),
            file("src/both.js")
        );
        assert_eq!(
            resolve(TREE, &[], "src/legacy.js", "./both"),
            file("src/both.js")
        );
    }

    #[test]
    fn directory_package_json_entry_points() {
        let files = &[
            "es6/HKT/package.json",
            "HKT.d.ts",
            "HKT.js",
            "es6/Alt.d.ts",
            "es6/alt.js",
        ];
        let configs = [(
            "es6/HKT/package.json",
            r#"{"typings": "../../HKT.d.ts", "main": "../../HKT.js"}"#,
        )];
        assert_eq!(
            resolve(files, &configs, "es6/Alt.d.ts", "./HKT"),
            file("HKT.d.ts")
        );
        assert_eq!(
            resolve(files, &configs, "es6/alt.js", "./HKT"),
            file("HKT.js")
        );
    }

    #[test]
    fn bare_specifiers_are_external_without_config() {
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "react"),
            Target::External("react".into())
        );
        assert_eq!(
            resolve(TREE, &[], "src/a.ts", "node:fs"),
            Target::External("node:fs".into())
        );
    }

    #[test]
    fn tsconfig_paths_and_base_url() {
        let config = r#"{
            // comment
            "compilerOptions": {
                "baseUrl": "./src",
                "paths": { "@/*": ["*"], "@util": ["util/index.ts"], "@x/*": ["../lib/*", ], },
            },
        }"#;
        let configs = [("tsconfig.json", config)];
        assert_eq!(
            resolve(TREE, &configs, "src/a.ts", "@/b"),
            file("src/b.tsx")
        );
        assert_eq!(
            resolve(TREE, &configs, "src/a.ts", "@util"),
            file("src/util/index.ts")
        );
        assert_eq!(
            resolve(TREE, &configs, "src/a.ts", "@x/x.mjs"),
            file("lib/x.mjs")
        );
        assert_eq!(
            resolve(TREE, &configs, "src/a.ts", "util"),
            file("src/util/index.ts")
        );
        assert_eq!(
            resolve(TREE, &configs, "src/a.ts", "react"),
            Target::External("react".into())
        );
    }

    #[test]
    fn tsconfig_extends_inside_the_tree() {
        let base = r#"{ "compilerOptions": { "paths": { "~/*": ["./src/*"] } } }"#;
        let child = r#"{ "extends": "../tsconfig.base", "compilerOptions": { "strict": true } }"#;
        let configs = [("tsconfig.base.json", base), ("pkg/tsconfig.json", child)];
        let files = &["src/a.ts", "pkg/main.ts"];
        assert_eq!(
            resolve(files, &configs, "pkg/main.ts", "~/a"),
            file("src/a.ts")
        );
    }

    #[test]
    fn strip_jsonc_keeps_strings_intact() {
        let text = r#"{"a": "http://x/*y*/", /* c */ "b": [1, 2,], // d
        }"#;
        let v: serde_json::Value = serde_json::from_str(&strip_jsonc(text)).unwrap();
        assert_eq!(v["a"], "http://x/*y*/");
        assert_eq!(v["b"], serde_json::json!([1, 2]));
    }
}
