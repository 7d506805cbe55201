//! Analyzed plans for the scheduler's unit tests.

use devfleet_protocol::{AnalyzedTask, Plan, PlanAnalyzed};

/// An analyzed task at `path` with spec `s`, no dependencies, the given
/// content and executor.
pub(crate) fn task(
    path: &str,
    content: Option<&str>,
    executor: Option<devfleet_protocol::ExecutorKind>,
) -> AnalyzedTask {
    AnalyzedTask {
        path: path.into(),
        spec: "s".into(),
        content: content.map(Into::into),
        depends_on: vec![],
        estimate: 1,
        priority: 1,
        batch: 0,
        executor,
        base_imports: Vec::new(),
    }
}

/// Plan `id` of one task at `path` (spec `s`, the given content) followed
/// by `stages_yaml` (its `integration:`/`deploy:` sections), as the
/// analyzer would announce it.
pub(crate) fn one_task(
    id: &str,
    path: &str,
    content: Option<&str>,
    stages_yaml: &str,
) -> PlanAnalyzed {
    let content_yaml = content
        .map(|c| format!(", content: '{c}'"))
        .unwrap_or_default();
    let plan = Plan::parse(&format!(
        "name: t\ntasks:\n  - {{ path: {path}, spec: s{content_yaml} }}\n{stages_yaml}"
    ))
    .unwrap();
    PlanAnalyzed {
        plan_id: id.into(),
        plan,
        tasks: vec![task(path, content, None)],
        critical_path_length: 1,
        critical_path: vec![path.into()],
    }
}
