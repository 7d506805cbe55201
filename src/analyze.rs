//! `devfleet analyze PATH [--format text|json|dot]`: the dependency analysis
//! of a directory or a plan file, printed to stdout.
//!
//! A PATH that is a directory is analyzed as a code tree; a file ending in
//! `.yaml`, `.yml` or `.json` is read as a plan (its `base` resolved against
//! the plan file's directory). Warnings (skipped files, edges dropped to break
//! a plan's cycles) go to stderr so stdout stays machine-readable.

use anyhow::{bail, Context, Result};
use devfleet_analysis::{analyze_dir, analyze_plan, report, Analysis, Format, Options};
use devfleet_protocol::Plan;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `devfleet analyze`.
#[derive(Debug, Clone, clap::Args)]
pub struct AnalyzeArgs {
    /// A source directory, or a plan file (.yaml, .yml or .json).
    pub path: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Threads that read and scan files (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not print warnings to stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A report to read at a glance.
    Text,
    /// The JSON object documented in DESIGN.md.
    Json,
    /// Graphviz DOT (`dot -Tsvg`).
    Dot,
}

impl From<OutputFormat> for Format {
    fn from(f: OutputFormat) -> Format {
        match f {
            OutputFormat::Text => Format::Text,
            OutputFormat::Json => Format::Json,
            OutputFormat::Dot => Format::Dot,
        }
    }
}

/// Runs the analysis and prints it.
pub fn run(args: &AnalyzeArgs) -> Result<()> {
    let path = &args.path;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let (analysis, subject) = if meta.is_dir() {
        let opts = Options {
            threads: args.threads.unwrap_or(0),
            ..Options::default()
        };
        let analysis =
            analyze_dir(path, &opts).with_context(|| format!("analyzing {}", path.display()))?;
        (analysis, path.display().to_string())
    } else if is_plan_file(path) {
        analyze_plan_file(path)?
    } else {
        bail!(
            "{} is neither a directory nor a plan file (.yaml, .yml, .json)",
            path.display()
        );
    };
    if !args.quiet {
        for warning in analysis.warnings() {
            eprintln!("warning: {warning}");
        }
    }
    let rendered = report::render(&analysis, args.format.into(), &subject);
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(rendered.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // `devfleet analyze … | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the report to stdout"),
    }
}

fn is_plan_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn analyze_plan_file(path: &Path) -> Result<(Analysis, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading plan {}", path.display()))?;
    let plan = Plan::parse(&text).with_context(|| format!("parsing plan {}", path.display()))?;
    let base = plan.base.as_ref().map(|b| {
        let dir = path.parent().unwrap_or(Path::new("."));
        dir.join(b)
    });
    if let Some(base) = &base {
        if !base.is_dir() {
            bail!(
                "plan {}: base {} is not a directory",
                path.display(),
                base.display()
            );
        }
    }
    let analysis = analyze_plan(&plan, base.as_deref())
        .with_context(|| format!("analyzing plan {}", path.display()))?;
    Ok((analysis, format!("plan {}", plan.name)))
}
