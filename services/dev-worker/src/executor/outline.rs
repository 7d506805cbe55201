//! Outlines: the signatures of a file, for context that does not fit whole.
//!
//! The analyzer's scanners read only imports, so this is a small line-based
//! extractor per language. Python keeps imports, decorators and `def` /
//! `async def` / `class` lines (any indent, so methods show under their
//! class); JavaScript/TypeScript keeps imports and the lines that open an
//! exported or top-level declaration (`export`, `function`, `class`,
//! `interface`, `type`, `enum`, `const … =>`). Other files have no outline
//! (they are cut when they do not fit whole).

/// The outline of `text` by the language of `path`, or `None` when the
/// language is not one this knows or nothing in the file is a signature.
pub fn outline(path: &str, text: &str) -> Option<String> {
    let keep: fn(&str) -> bool = match path.rsplit_once('.').map(|(_, e)| e) {
        Some("py" | "pyi") => python_line,
        Some("js" | "jsx" | "mjs" | "cjs" | "ts" | "tsx" | "mts" | "cts") => js_line,
        _ => return None,
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| keep(l))
        .map(|l| l.trim_end())
        .collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines.join("\n") + "\n")
}

fn python_line(line: &str) -> bool {
    let t = line.trim_start();
    let top = t.len() == line.len();
    t.starts_with("def ")
        || t.starts_with("async def ")
        || t.starts_with("class ")
        || t.starts_with('@')
        || (top && (t.starts_with("import ") || t.starts_with("from ")))
}

fn js_line(line: &str) -> bool {
    let t = line.trim_start();
    let top = t.len() == line.len();
    if !top {
        return false;
    }
    const OPENERS: [&str; 10] = [
        "export ",
        "import ",
        "function ",
        "async function ",
        "class ",
        "abstract class ",
        "interface ",
        "type ",
        "enum ",
        "declare ",
    ];
    OPENERS.iter().any(|o| t.starts_with(o))
        || ((t.starts_with("const ") || t.starts_with("let ")) && t.contains("=>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_outline_keeps_imports_classes_and_defs() {
        let src = "import os\nfrom app.db import Base\n\nX = 1\n\n@dataclass\nclass Todo(Base):\n    \"\"\"doc\"\"\"\n    def done(self) -> bool:\n        return self.flag\n\nasync def load(id: int):\n    pass\n";
        assert_eq!(
            outline("app/models.py", src).unwrap(),
            "import os\nfrom app.db import Base\n@dataclass\nclass Todo(Base):\n    def done(self) -> bool:\nasync def load(id: int):\n"
        );
    }

    #[test]
    fn js_outline_keeps_top_level_declarations() {
        let src = "import { a } from './a';\nexport function add(x, y) {\n  return x + y;\n}\nconst helper = (x) => x * 2;\nclass Store {\n  get() {}\n}\nexport type Id = string;\n";
        assert_eq!(
            outline("src/lib.ts", src).unwrap(),
            "import { a } from './a';\nexport function add(x, y) {\nconst helper = (x) => x * 2;\nclass Store {\nexport type Id = string;\n"
        );
    }

    #[test]
    fn unknown_languages_and_files_without_signatures_have_none() {
        assert_eq!(outline("README.md", "# title\n"), None);
        assert_eq!(outline("a.py", "X = 1\n"), None);
    }
}
