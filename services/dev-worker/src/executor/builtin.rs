//! The builtin executor: writes the task's `content` verbatim.
//!
//! For plans that already hold their files (templates, scaffolds, tests of
//! the pipeline itself). Its output depends on `content` alone, so a change
//! of spec reruns the task but, with identical output, no dependent.

use super::{ExecError, ExecInput, ExecOutput, Executor};
use async_trait::async_trait;

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

#[async_trait]
impl Executor for Builtin {
    fn identity(&self) -> String {
        "builtin/1".to_owned()
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        input.content.clone().map(ExecOutput::file).ok_or_else(|| {
            ExecError::fatal(format!(
                "task '{}' has no content: the builtin executor writes a task's `content` \
                 verbatim; give the task content, or choose another executor \
                 (executor: openai, command or simulate)",
                input.path
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;

    #[tokio::test]
    async fn writes_content_verbatim() {
        let mut input = test_input("a.py");
        input.content = Some("print('hi')\n".into());
        assert_eq!(Builtin.run(&input).await.unwrap().text, "print('hi')\n");
    }

    #[tokio::test]
    async fn no_content_is_a_clear_non_retryable_error() {
        let err = Builtin.run(&test_input("a.py")).await.unwrap_err();
        assert!(!err.retryable);
        assert!(
            err.message.contains("a.py") && err.message.contains("no content"),
            "{err}"
        );
    }
}
