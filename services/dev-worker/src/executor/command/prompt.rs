//! The task prompt an agent reads, rendered as Markdown: what to write
//! (path, spec, skeleton), what it builds on (the dependencies' text) and,
//! for a fix or a retry, what went wrong and the previous attempt.

use super::super::ExecInput;
use devfleet_protocol::TaskClass;
use std::fmt::Write as _;

/// The Markdown prompt for `input`. `in_workspace`: the dependencies are
/// files in the agent's working directory already, so they are listed by
/// path rather than quoted.
pub fn render(input: &ExecInput, in_workspace: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Task: write `{}`\n", input.path);
    if in_workspace {
        let _ = writeln!(
            s,
            "Your working directory is the project. Create or edit the file `{}` there \
             (edit files in place; do not only print them).\n",
            input.path
        );
    } else {
        let _ = writeln!(s, "Write the full text of the file `{}`.\n", input.path);
    }
    let _ = writeln!(s, "## Specification\n\n{}\n", input.spec.trim());
    if let Some(content) = &input.content {
        let _ = writeln!(
            s,
            "## Skeleton\n\nStart from (or complete) this text:\n\n{}\n",
            fenced(&input.path, content)
        );
    }
    if !input.dependencies.is_empty() {
        let _ = writeln!(s, "## Files it depends on\n");
        for (path, text) in &input.dependencies {
            if in_workspace {
                let _ = writeln!(s, "- `{path}`");
            } else {
                let _ = writeln!(s, "### `{path}`\n\n{}\n", fenced(path, text));
            }
        }
        s.push('\n');
    }
    if input.class == TaskClass::Fix || input.attempt > 1 {
        let what = if input.class == TaskClass::Fix {
            "Quality checks rejected the previous attempt"
        } else {
            "The previous attempt failed"
        };
        let _ = writeln!(s, "## Fix (attempt {})\n\n{what}:\n", input.attempt);
        if let Some(d) = &input.diagnostics {
            let _ = writeln!(s, "{}\n", fenced("", d));
        }
        if let Some(prev) = &input.previous {
            let _ = writeln!(
                s,
                "The previous attempt:\n\n{}\n",
                fenced(&input.path, prev)
            );
        }
    }
    s
}

/// `text` in a fence longer than any backtick run inside it.
fn fenced(path: &str, text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    let lang = match path.rsplit_once('.').map(|(_, e)| e) {
        Some("py") => "python",
        Some("js" | "mjs" | "cjs") => "javascript",
        Some("ts" | "tsx") => "typescript",
        Some("rs") => "rust",
        _ => "",
    };
    format!("{fence}{lang}\n{}\n{fence}", text.trim_end_matches('\n'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;

    #[test]
    fn a_fix_prompt_carries_everything_the_agent_needs() {
        let mut input = test_input("app/x.py");
        input.spec = "Adds two numbers".into();
        input.content = Some("def add(a, b): ...".into());
        input
            .dependencies
            .insert("app/y.py".into(), "Y = ```1```".into());
        input.class = TaskClass::Fix;
        input.attempt = 2;
        input.diagnostics = Some("E501 line too long".into());
        input.previous = Some("def add(a, b): return a - b".into());
        let p = render(&input, false);
        for want in [
            "# Task: write `app/x.py`",
            "Adds two numbers",
            "def add(a, b): ...",
            "### `app/y.py`",
            "````python\nY = ```1```\n````",
            "E501 line too long",
            "return a - b",
        ] {
            assert!(p.contains(want), "{want} missing from:\n{p}");
        }
        let p = render(&input, true);
        assert!(p.contains("- `app/y.py`") && !p.contains("Y = "), "{p}");
    }
}
