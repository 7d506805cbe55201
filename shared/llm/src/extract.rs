//! Taking the file out of a model's reply.

/// The file in a model's reply: the first fenced code block (its info
/// string dropped), else the whole reply. Ends with a newline.
pub fn extract_file(reply: &str) -> String {
    let lines: Vec<&str> = reply.lines().collect();
    let open = lines.iter().position(|l| l.trim_start().starts_with("```"));
    let body = match open {
        Some(start) => {
            let opener = lines[start].trim_start();
            let ticks = opener.chars().take_while(|&c| c == '`').count();
            let closing = "`".repeat(ticks);
            let rest = &lines[start + 1..];
            let end = rest
                .iter()
                .position(|l| {
                    let t = l.trim();
                    t.starts_with(&closing) && t.chars().all(|c| c == '`')
                })
                .unwrap_or(rest.len());
            rest[..end].join("\n")
        }
        None => reply.trim().to_owned(),
    };
    if body.is_empty() {
        body
    } else {
        body + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_first_fenced_block_else_the_whole_reply() {
        let reply =
            "Here you go:\n```python\nimport os\nprint(os.getcwd())\n```\nand more\n```\nx\n```";
        assert_eq!(extract_file(reply), "import os\nprint(os.getcwd())\n");
        assert_eq!(extract_file("  just code  \n"), "just code\n");
        assert_eq!(extract_file("```\nunterminated\n"), "unterminated\n");
        let nested = "````md\n```py\nx\n```\n````";
        assert_eq!(extract_file(nested), "```py\nx\n```\n");
    }
}
