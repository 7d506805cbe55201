//! Python import scanner.
//!
//! A tokenizer that knows exactly what Python skips (comments, strings with
//! every prefix, triple quotes, f-strings whose replacement fields nest
//! strings and further f-strings as PEP 701 allows, backslash continuations)
//! feeds a small state machine that recognises:
//!
//! - `import a.b [as c], d` and `from [.]*a.b import x [as y], (z), *`, at any
//!   depth (inside functions, classes, `try`/`except ImportError` branches);
//! - the body of `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` (also
//!   `elif`), by indentation, whose imports get [`EdgeKind::Type`];
//! - `importlib.import_module("literal")` and `__import__("literal")` calls,
//!   which get [`EdgeKind::Dynamic`]; a relative literal only with
//!   `package=__name__` / `__package__` (any other package is a variable);
//! - `from __future__ import …`, which is dropped.
//!
//! `import` and `from` are hard keywords, so any such token outside a string
//! or comment really starts an import (`yield from` and `raise … from` never
//! reach `import` and are discarded).

use super::{is_ident_byte, number_end};
use crate::EdgeKind;
use memchr::{memchr, memchr3};

/// One import statement (or one dynamic import call) found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyImport {
    /// Leading dots of a relative import; 0 for an absolute one.
    pub level: u32,
    /// The dotted module after the dots; empty for `from . import x`.
    pub module: String,
    /// `from … import` names (`*` for a star import); empty for `import a.b`.
    pub names: Vec<String>,
    /// True for `from … import …`.
    pub from_import: bool,
    /// [`EdgeKind::Import`], [`EdgeKind::Type`] or [`EdgeKind::Dynamic`].
    pub kind: EdgeKind,
    /// 1-based line of the `import`/`from` keyword or the call.
    pub line: u32,
}

/// Every import in `src`, in source order. Never fails; never panics.
pub fn scan(src: &str) -> Vec<PyImport> {
    // Every import holds the text `import` (the keyword, `import_module`,
    // `__import__`), so nothing after its last occurrence can start one:
    // lexing stops there once the statement in progress is over. Imports sit
    // mostly at the top of a module; in Django this skips two thirds of the
    // bytes.
    // (A forward SIMD search for every occurrence beats memchr's reverse
    // search, which has no vectorised path.)
    let Some(last) = memchr::memmem::find_iter(src.as_bytes(), b"import").last() else {
        return Vec::new();
    };
    let mut lexer = Lexer::new(src);
    let mut parser = Parser::default();
    while let Some(token) = lexer.next_token() {
        parser.feed(token);
        if lexer.i > last + 6 && parser.between_statements() {
            break;
        }
    }
    parser.finish();
    parser.out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Name(&'a str),
    /// A string literal; its text when it is a plain literal without escapes.
    Str(Option<&'a str>),
    Op(u8),
    Number,
    /// End of a logical line.
    Newline,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    tok: Tok<'a>,
    line: u32,
    /// First token of a logical line.
    first: bool,
    /// Indentation column of the logical line (meaningful when `first`).
    indent: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Prefix {
    raw: bool,
    formatted: bool,
    bytes: bool,
}

impl Prefix {
    /// Parses a string prefix (`r`, `b`, `u`, `f`, `t`, `rb`, `fr`, … in any case).
    fn parse(word: &str) -> Option<Prefix> {
        let mut p = Prefix::default();
        let mut unicode = false;
        if word.is_empty() || word.len() > 2 {
            return None;
        }
        for c in word.bytes() {
            match c.to_ascii_lowercase() {
                b'r' if !p.raw => p.raw = true,
                b'b' if !p.bytes && !p.formatted => p.bytes = true,
                b'f' | b't' if !p.formatted && !p.bytes => p.formatted = true,
                b'u' if word.len() == 1 => unicode = true,
                _ => return None,
            }
        }
        let _ = unicode;
        Some(p)
    }
}

/// Frames of an f-string being skipped; kept on a heap stack.
#[derive(Debug, Clone, Copy)]
enum FFrame {
    /// Literal text of an f-string.
    Text { quote: u8, triple: bool, raw: bool },
    /// Inside `{…}`: an expression; `depth` counts open brackets.
    Expr { depth: u32 },
    /// After a top-level `:` in a replacement field: the format spec.
    Spec,
}

struct Lexer<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
    line: u32,
    /// Open brackets outside f-strings; newlines inside them are not logical.
    depth: u32,
    at_line_start: bool,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        let src = src.strip_prefix('\u{feff}').unwrap_or(src);
        Lexer {
            src,
            b: src.as_bytes(),
            i: 0,
            line: 1,
            depth: 0,
            at_line_start: true,
        }
    }

    fn peek(&self, ahead: usize) -> u8 {
        self.b.get(self.i + ahead).copied().unwrap_or(0)
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let Some(&c) = self.b.get(self.i) else {
                if !self.at_line_start {
                    self.at_line_start = true;
                    return Some(self.plain(Tok::Newline));
                }
                return None;
            };
            match c {
                b'\n' => {
                    self.i += 1;
                    let line = self.line;
                    self.line += 1;
                    if self.depth == 0 && !self.at_line_start {
                        self.at_line_start = true;
                        return Some(Token {
                            tok: Tok::Newline,
                            line,
                            first: false,
                            indent: 0,
                        });
                    }
                }
                b' ' | b'\t' | b'\r' | b'\x0c' => {
                    self.i += 1;
                    while matches!(self.b.get(self.i), Some(b' ')) {
                        self.i += 1;
                    }
                }
                b'#' => self.skip_comment(),
                b'\\' if self.peek(1) == b'\n' => {
                    self.i += 2;
                    self.line += 1;
                }
                b'\\' if self.peek(1) == b'\r' && self.peek(2) == b'\n' => {
                    self.i += 3;
                    self.line += 1;
                }
                _ => return Some(self.token(c)),
            }
        }
    }

    fn plain(&self, tok: Tok<'a>) -> Token<'a> {
        Token {
            tok,
            line: self.line,
            first: false,
            indent: 0,
        }
    }

    fn skip_comment(&mut self) {
        self.i = memchr(b'\n', &self.b[self.i..]).map_or(self.b.len(), |p| self.i + p);
    }

    /// Column of the token starting at `pos`, counting from its physical line.
    fn indent_before(&self, pos: usize) -> u32 {
        let start = self.b[..pos]
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |p| p + 1);
        let mut col: u32 = 0;
        for &c in &self.b[start..pos] {
            col = match c {
                b'\t' => (col / 8 + 1).saturating_mul(8),
                b'\x0c' => 0,
                _ => col.saturating_add(1),
            };
        }
        col
    }

    fn token(&mut self, c: u8) -> Token<'a> {
        let start = self.i;
        let line = self.line;
        let first = self.at_line_start;
        let indent = if first { self.indent_before(start) } else { 0 };
        self.at_line_start = false;
        let tok = match c {
            b'"' | b'\'' => self.string(Prefix::default()),
            b'0'..=b'9' => {
                self.number();
                Tok::Number
            }
            b'.' if self.peek(1).is_ascii_digit() => {
                self.number();
                Tok::Number
            }
            c if is_ident_byte(c) => {
                let mut end = start + 1;
                while end < self.b.len() && is_ident_byte(self.b[end]) {
                    end += 1;
                }
                let word = self.src.get(start..end).unwrap_or("");
                self.i = end;
                match self.b.get(end) {
                    Some(b'"' | b'\'') => match Prefix::parse(word) {
                        Some(prefix) => self.string(prefix),
                        None => Tok::Name(word),
                    },
                    _ => Tok::Name(word),
                }
            }
            b'(' | b'[' | b'{' => {
                self.depth += 1;
                self.i += 1;
                Tok::Op(c)
            }
            b')' | b']' | b'}' => {
                self.depth = self.depth.saturating_sub(1);
                self.i += 1;
                Tok::Op(c)
            }
            _ => {
                self.i += 1;
                Tok::Op(c)
            }
        };
        Token {
            tok,
            line,
            first,
            indent,
        }
    }

    fn number(&mut self) {
        self.i = number_end(self.b, self.i);
    }

    /// Lexes a string whose opening quote is at `self.i`.
    fn string(&mut self, prefix: Prefix) -> Tok<'a> {
        let quote = self.b[self.i];
        let triple = self.peek(1) == quote && self.peek(2) == quote;
        if prefix.formatted {
            self.skip_fstring(quote, triple, prefix.raw);
            return Tok::Str(None);
        }
        self.i += if triple { 3 } else { 1 };
        let content_start = self.i;
        let (content_end, escaped) = self.skip_plain(quote, triple);
        if prefix.bytes || escaped {
            return Tok::Str(None);
        }
        Tok::Str(self.src.get(content_start..content_end))
    }

    /// Skips the body of a non-f string starting at `self.i` (after the
    /// opening quotes). Returns where the content ends and whether it held a
    /// backslash. An unterminated single-quoted string ends before the
    /// newline, as Python's tokenizer gives up there too.
    fn skip_plain(&mut self, quote: u8, triple: bool) -> (usize, bool) {
        let mut escaped = false;
        loop {
            let rest = &self.b[self.i.min(self.b.len())..];
            let Some(p) = memchr3(quote, b'\\', b'\n', rest) else {
                self.i = self.b.len();
                return (self.b.len(), escaped);
            };
            let at = self.i + p;
            match self.b[at] {
                b'\\' => {
                    escaped = true;
                    if self.b.get(at + 1) == Some(&b'\n') {
                        self.line += 1;
                    }
                    self.i = (at + 2).min(self.b.len());
                }
                b'\n' => {
                    if !triple {
                        self.i = at;
                        return (at, escaped);
                    }
                    self.line += 1;
                    self.i = at + 1;
                }
                _ => {
                    if !triple {
                        self.i = at + 1;
                        return (at, escaped);
                    }
                    if self.b.get(at + 1) == Some(&quote) && self.b.get(at + 2) == Some(&quote) {
                        self.i = at + 3;
                        return (at, escaped);
                    }
                    self.i = at + 1;
                }
            }
        }
    }

    /// Skips an f-string (or t-string) whose opening quote is at `self.i`,
    /// including nested replacement fields, format specs and inner strings.
    fn skip_fstring(&mut self, quote: u8, triple: bool, raw: bool) {
        self.i += if triple { 3 } else { 1 };
        let mut stack = vec![FFrame::Text { quote, triple, raw }];
        while let Some(&top) = stack.last() {
            let Some(&c) = self.b.get(self.i) else {
                return;
            };
            match top {
                FFrame::Text { quote, triple, raw } => match c {
                    b'\\' => match self.peek(1) {
                        b'{' | b'}' => self.i += 1,
                        b'N' if !raw && self.peek(2) == b'{' => {
                            // `\N{NAME}` is an escape, not a replacement field.
                            let rest = &self.b[self.i..];
                            let close = memchr(b'}', rest).unwrap_or(rest.len());
                            let newline = memchr(b'\n', rest).unwrap_or(rest.len());
                            self.i += close.min(newline);
                        }
                        b'\n' => {
                            self.line += 1;
                            self.i += 2;
                        }
                        0 if self.i + 1 >= self.b.len() => self.i += 1,
                        _ => self.i += 2,
                    },
                    b'{' if self.peek(1) == b'{' => self.i += 2,
                    b'{' => {
                        self.i += 1;
                        stack.push(FFrame::Expr { depth: 0 });
                    }
                    b'}' if self.peek(1) == b'}' => self.i += 2,
                    b'\n' if !triple => return, // unterminated: recover at the newline
                    b'\n' => {
                        self.line += 1;
                        self.i += 1;
                    }
                    c if c == quote => {
                        if !triple {
                            self.i += 1;
                            stack.pop();
                        } else if self.peek(1) == quote && self.peek(2) == quote {
                            self.i += 3;
                            stack.pop();
                        } else {
                            self.i += 1;
                        }
                    }
                    _ => self.i += 1,
                },
                FFrame::Expr { depth } => match c {
                    b'\n' => {
                        self.line += 1;
                        self.i += 1;
                    }
                    b'#' => self.skip_comment(),
                    b'"' | b'\'' => {
                        let triple = self.peek(1) == c && self.peek(2) == c;
                        self.i += if triple { 3 } else { 1 };
                        self.skip_plain(c, triple);
                    }
                    c if is_ident_byte(c) => {
                        let start = self.i;
                        while self.i < self.b.len() && is_ident_byte(self.b[self.i]) {
                            self.i += 1;
                        }
                        let word = self.src.get(start..self.i).unwrap_or("");
                        if let (Some(&q @ (b'"' | b'\'')), Some(prefix)) =
                            (self.b.get(self.i), Prefix::parse(word))
                        {
                            let triple = self.peek(1) == q && self.peek(2) == q;
                            self.i += if triple { 3 } else { 1 };
                            if prefix.formatted {
                                stack.push(FFrame::Text {
                                    quote: q,
                                    triple,
                                    raw: prefix.raw,
                                });
                            } else {
                                self.skip_plain(q, triple);
                            }
                        }
                    }
                    b'(' | b'[' | b'{' => {
                        self.i += 1;
                        if let Some(FFrame::Expr { depth }) = stack.last_mut() {
                            *depth += 1;
                        }
                    }
                    b')' | b']' => {
                        self.i += 1;
                        if let Some(FFrame::Expr { depth }) = stack.last_mut() {
                            *depth = depth.saturating_sub(1);
                        }
                    }
                    b'}' => {
                        self.i += 1;
                        if depth == 0 {
                            stack.pop();
                        } else if let Some(FFrame::Expr { depth }) = stack.last_mut() {
                            *depth -= 1;
                        }
                    }
                    b':' if depth == 0 => {
                        self.i += 1;
                        stack.push(FFrame::Spec);
                    }
                    _ => self.i += 1,
                },
                FFrame::Spec => {
                    let enclosing = stack.iter().rev().find_map(|f| match f {
                        FFrame::Text { quote, triple, .. } => Some((*quote, *triple)),
                        _ => None,
                    });
                    let (quote, triple) = enclosing.unwrap_or((0, false));
                    match c {
                        b'{' => {
                            self.i += 1;
                            stack.push(FFrame::Expr { depth: 0 });
                        }
                        b'}' => {
                            self.i += 1;
                            stack.pop();
                            stack.pop();
                        }
                        b'\n' if !triple => return,
                        b'\n' => {
                            self.line += 1;
                            self.i += 1;
                        }
                        c if c == quote => {
                            // A malformed field: let the string's own frame end it.
                            stack.pop();
                            stack.pop();
                        }
                        _ => self.i += 1,
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Expecting a (first part of a) name.
    Name,
    /// After a name: `.`, `as`, `,` or the end.
    AfterName,
    /// After a `.` inside a dotted name.
    AfterDot,
    /// After `as`: expecting the alias.
    Alias,
    /// After the alias: `,` or the end.
    AfterAlias,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    /// After `if`/`elif` at the start of a line: is the test `[x.]TYPE_CHECKING`?
    IfHeader {
        indent: u32,
        last_is_tc: bool,
        expect_name: bool,
    },
    /// After `from`: dots and the dotted module.
    FromModule {
        level: u32,
        module: String,
        line: u32,
        expect_name: bool,
    },
    /// After `from … import`.
    FromNames {
        import: PyImport,
        paren: bool,
        step: Step,
    },
    /// After `import`.
    ImportNames {
        current: String,
        line: u32,
        step: Step,
    },
}

/// Progress through `import_module("…")` / `__import__("…")`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Call<'a> {
    #[default]
    None,
    Function,
    Open,
    Literal(&'a str, u32),
    /// A relative literal, then `,`: resolvable only against our own package.
    PackageArg(&'a str, u32),
    /// … then `package =`.
    PackageKeyword(&'a str, u32),
}

#[derive(Debug, Default)]
struct Parser<'a> {
    out: Vec<PyImport>,
    /// Indents of the enclosing `if TYPE_CHECKING:` headers.
    type_checking: Vec<u32>,
    /// The current line's `if TYPE_CHECKING:` header had its body on the same line.
    line_type_checking: bool,
    state: State,
    call: Call<'a>,
}

impl<'a> Parser<'a> {
    /// No statement or call in progress: what follows can only start anew.
    fn between_statements(&self) -> bool {
        matches!(self.state, State::Idle) && self.call == Call::None
    }

    fn kind(&self) -> EdgeKind {
        if self.line_type_checking || !self.type_checking.is_empty() {
            EdgeKind::Type
        } else {
            EdgeKind::Import
        }
    }

    fn feed(&mut self, t: Token<'a>) {
        if t.first {
            while self
                .type_checking
                .last()
                .is_some_and(|&top| top >= t.indent)
            {
                self.type_checking.pop();
            }
            self.line_type_checking = false;
        }
        if t.tok == Tok::Newline {
            self.finish();
            self.call = Call::None;
            return;
        }
        // A token that ends a statement is handed back to `Idle` once.
        for _ in 0..2 {
            if self.step(t) {
                return;
            }
        }
    }

    /// Ends whatever statement is in progress.
    fn finish(&mut self) {
        match std::mem::take(&mut self.state) {
            State::FromNames { import, .. } => self.push_from(import),
            State::ImportNames {
                current,
                line,
                step: Step::AfterName,
            } => self.push_import(current, line),
            _ => {}
        }
    }

    fn push_import(&mut self, module: String, line: u32) {
        if module == "__future__" || module.is_empty() {
            return;
        }
        self.out.push(PyImport {
            level: 0,
            module,
            names: Vec::new(),
            from_import: false,
            kind: self.kind(),
            line,
        });
    }

    fn push_from(&mut self, import: PyImport) {
        if import.names.is_empty() || (import.level == 0 && import.module == "__future__") {
            return;
        }
        self.out.push(import);
    }

    /// Handles one token; false when the token must be handled again by `Idle`.
    fn step(&mut self, t: Token<'a>) -> bool {
        let kind = self.kind();
        match &mut self.state {
            State::Idle => {
                match t.tok {
                    Tok::Name("import") => {
                        self.state = State::ImportNames {
                            current: String::new(),
                            line: t.line,
                            step: Step::Name,
                        }
                    }
                    Tok::Name("from") => {
                        self.state = State::FromModule {
                            level: 0,
                            module: String::new(),
                            line: t.line,
                            expect_name: true,
                        }
                    }
                    Tok::Name("if" | "elif") if t.first => {
                        self.state = State::IfHeader {
                            indent: t.indent,
                            last_is_tc: false,
                            expect_name: true,
                        }
                    }
                    _ => {}
                }
                self.track_call(t);
                true
            }
            State::IfHeader {
                indent,
                last_is_tc,
                expect_name,
            } => {
                match t.tok {
                    Tok::Name(n) if *expect_name => {
                        *last_is_tc = n == "TYPE_CHECKING";
                        *expect_name = false;
                    }
                    Tok::Op(b'.') if !*expect_name => *expect_name = true,
                    Tok::Op(b':') if !*expect_name && *last_is_tc => {
                        let indent = *indent;
                        self.type_checking.push(indent);
                        self.line_type_checking = true;
                        self.state = State::Idle;
                    }
                    _ => {
                        self.state = State::Idle;
                        return false;
                    }
                }
                true
            }
            State::FromModule {
                level,
                module,
                line,
                expect_name,
            } => {
                match t.tok {
                    Tok::Op(b'.') if module.is_empty() => *level += 1,
                    Tok::Op(b'.') if !*expect_name => {
                        module.push('.');
                        *expect_name = true;
                    }
                    Tok::Name("import") if !*expect_name || module.is_empty() => {
                        if *level == 0 && module.is_empty() {
                            self.state = State::Idle;
                            return true;
                        }
                        let import = PyImport {
                            level: *level,
                            module: std::mem::take(module),
                            names: Vec::new(),
                            from_import: true,
                            kind,
                            line: *line,
                        };
                        self.state = State::FromNames {
                            import,
                            paren: false,
                            step: Step::Name,
                        };
                    }
                    Tok::Name(n) if *expect_name && n != "import" => {
                        module.push_str(n);
                        *expect_name = false;
                    }
                    _ => {
                        // `yield from x`, `raise E from e`: not an import.
                        self.state = State::Idle;
                        return false;
                    }
                }
                true
            }
            State::FromNames {
                import,
                paren,
                step,
            } => {
                match (t.tok, *step) {
                    (Tok::Op(b'('), Step::Name) if import.names.is_empty() && !*paren => {
                        *paren = true
                    }
                    (Tok::Name("as"), Step::AfterName) => *step = Step::Alias,
                    (Tok::Name(n), Step::Name) => {
                        import.names.push(n.to_string());
                        *step = Step::AfterName;
                    }
                    (Tok::Op(b'*'), Step::Name) => {
                        import.names.push("*".to_string());
                        *step = Step::AfterName;
                    }
                    (Tok::Name(_), Step::Alias) => *step = Step::AfterAlias,
                    (Tok::Op(b','), Step::AfterName | Step::AfterAlias) => *step = Step::Name,
                    (Tok::Op(b')'), _) if *paren => self.finish(),
                    (Tok::Op(b';'), _) => self.finish(),
                    _ => {
                        self.finish();
                        return false;
                    }
                }
                true
            }
            State::ImportNames {
                current,
                line,
                step,
            } => {
                match (t.tok, *step) {
                    (Tok::Name(n), Step::Name) => {
                        current.clear();
                        current.push_str(n);
                        *step = Step::AfterName;
                    }
                    (Tok::Op(b'.'), Step::AfterName) => {
                        current.push('.');
                        *step = Step::AfterDot;
                    }
                    (Tok::Name(n), Step::AfterDot) => {
                        current.push_str(n);
                        *step = Step::AfterName;
                    }
                    (Tok::Name("as"), Step::AfterName) => {
                        let (module, line) = (std::mem::take(current), *line);
                        *step = Step::Alias;
                        self.push_import(module, line);
                    }
                    (Tok::Name(_), Step::Alias) => *step = Step::AfterAlias,
                    (Tok::Op(b','), Step::AfterName) => {
                        let (module, line) = (std::mem::take(current), *line);
                        *step = Step::Name;
                        self.push_import(module, line);
                    }
                    (Tok::Op(b','), Step::AfterAlias) => *step = Step::Name,
                    (Tok::Op(b';'), _) => self.finish(),
                    _ => {
                        self.finish();
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Follows `import_module(` / `__import__(` + a string literal + `)` or `,`.
    fn track_call(&mut self, t: Token<'a>) {
        self.call = match (self.call, t.tok) {
            (_, Tok::Name("import_module" | "__import__")) => Call::Function,
            (Call::Function, Tok::Op(b'(')) => Call::Open,
            (Call::Open, Tok::Str(Some(text))) => Call::Literal(text, t.line),
            (Call::Literal(text, line), Tok::Op(b',')) if text.starts_with('.') => {
                Call::PackageArg(text, line)
            }
            (Call::Literal(text, line), Tok::Op(b')' | b',')) => {
                if !text.starts_with('.') {
                    self.push_dynamic(text, line);
                }
                Call::None
            }
            (Call::PackageArg(text, line), Tok::Name("package")) => {
                Call::PackageKeyword(text, line)
            }
            (Call::PackageKeyword(text, line), Tok::Op(b'=')) => Call::PackageArg(text, line),
            (Call::PackageArg(text, line), Tok::Name("__name__" | "__package__")) => {
                self.push_dynamic(text, line);
                Call::None
            }
            _ => Call::None,
        };
    }

    fn push_dynamic(&mut self, text: &str, line: u32) {
        let module = text.trim_start_matches('.');
        let level = (text.len() - module.len()) as u32;
        let valid = !module.is_empty()
            && module
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(is_ident_byte));
        if !valid || (level == 0 && module == "__future__") {
            return;
        }
        self.out.push(PyImport {
            level,
            module: module.to_string(),
            names: Vec::new(),
            from_import: false,
            kind: EdgeKind::Dynamic,
            line,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(dots+module, names, kind)` for compact assertions.
    fn summary(src: &str) -> Vec<(String, Vec<String>, EdgeKind)> {
        scan(src)
            .into_iter()
            .map(|i| {
                (
                    format!("{}{}", ".".repeat(i.level as usize), i.module),
                    i.names,
                    i.kind,
                )
            })
            .collect()
    }

    fn modules(src: &str) -> Vec<String> {
        summary(src).into_iter().map(|s| s.0).collect()
    }

    #[test]
    fn plain_and_dotted_imports_with_aliases() {
        assert_eq!(
            modules("import a\nimport b.c as d, e.f\nimport  g  as  h ,  i"),
            ["a", "b.c", "e.f", "g", "i"]
        );
    }

    #[test]
    fn from_imports_relative_parenthesised_and_star() {
        let got = summary(
            "from . import x\nfrom ..pkg.mod import (a as b,\n  c, # note\n)\nfrom ... import *\nfrom .m import y; import z\n",
        );
        assert_eq!(got[0], (".".into(), vec!["x".into()], EdgeKind::Import));
        assert_eq!(
            got[1],
            (
                "..pkg.mod".into(),
                vec!["a".into(), "c".into()],
                EdgeKind::Import
            )
        );
        assert_eq!(got[2], ("...".into(), vec!["*".into()], EdgeKind::Import));
        assert_eq!(got[3], (".m".into(), vec!["y".into()], EdgeKind::Import));
        assert_eq!(got[4].0, "z");
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn backslash_continuations_join_lines() {
        assert_eq!(
            summary("from foo \\\n    import a, \\\n  b\nimport c, \\\n d\n"),
            vec![
                ("foo".into(), vec!["a".into(), "b".into()], EdgeKind::Import),
                ("c".into(), vec![], EdgeKind::Import),
                ("d".into(), vec![], EdgeKind::Import),
            ]
        );
    }

    #[test]
    fn imports_in_functions_and_try_except_count() {
        let src = "def f():\n    import a\n    class C:\n        from b import c\ntry:\n    import ujson as json\nexcept ImportError:\n    import json\n";
        assert_eq!(modules(src), ["a", "b", "ujson", "json"]);
    }

    #[test]
    fn type_checking_blocks_by_indentation() {
        let src = "import a\nif TYPE_CHECKING:\n    import b\n\n    # comment\n    from c import d\nelse:\n    import e\nif typing.TYPE_CHECKING: import f\nimport g\ndef h():\n    if TYPE_CHECKING:\n        import i\n    import j\n";
        let kinds: Vec<(String, EdgeKind)> = summary(src).into_iter().map(|s| (s.0, s.2)).collect();
        assert_eq!(
            kinds,
            vec![
                ("a".into(), EdgeKind::Import),
                ("b".into(), EdgeKind::Type),
                ("c".into(), EdgeKind::Type),
                ("e".into(), EdgeKind::Import),
                ("f".into(), EdgeKind::Type),
                ("g".into(), EdgeKind::Import),
                ("i".into(), EdgeKind::Type),
                ("j".into(), EdgeKind::Import),
            ]
        );
    }

    #[test]
    fn not_type_checking_and_other_conditions_are_runtime() {
        let src = "if not TYPE_CHECKING:\n    import a\nif TYPE_CHECKING or X:\n    import b\n";
        assert!(summary(src).iter().all(|s| s.2 == EdgeKind::Import));
    }

    #[test]
    fn future_imports_are_ignored() {
        assert_eq!(
            modules("from __future__ import annotations\nimport __future__\nimport x"),
            ["x"]
        );
    }

    #[test]
    fn strings_comments_and_docstrings_are_not_imports() {
        let src = r#"
"""Module docstring.
import fake1
"""
# import fake2
x = 'import fake3'
y = "from fake4 import z"
z = '''
from fake5 import q
'''
w = rb"import fake6" + Rb'\'import fake7'
s = "escaped \" import fake8"
def f():
    """import fake9"""
import real
"#;
        assert_eq!(modules(src), ["real"]);
    }

    #[test]
    fn fstrings_with_nested_quotes_and_fields_are_skipped() {
        let src = r#"
a = f"{x["import fake1"]} and {y:>{width}} {{import fake2}}"
b = f'''
{f"{'import fake3'}"}
import fake4
'''
c = f"{x!r:'^10} import fake5"
d = rf"\{x} import fake6"
e = f"{'\n'.join(items)} import fake7"
g = f"{
    value  # comment } import fake8
}"
import real
"#;
        assert_eq!(modules(src), ["real"]);
    }

    #[test]
    fn unterminated_string_recovers_at_end_of_line() {
        assert_eq!(
            modules("x = 'oops\nimport a\ny = f\"abc {x} \nimport b\n"),
            ["a", "b"]
        );
    }

    #[test]
    fn yield_from_and_raise_from_are_not_imports() {
        let src = "def g():\n    yield from items\n    raise E from err\nfrom x import y\n";
        assert_eq!(modules(src), ["x"]);
    }

    #[test]
    fn import_module_literals_are_dynamic() {
        let got = summary(
            "import importlib\nm = importlib.import_module('pkg.plugins')\nn = import_module(\".rel\", package=__name__)\no = __import__(\"os\")\np = import_module(name)\nq = import_module('a' + b)\nr = import_module('.mgmt', app.name)\n",
        );
        assert_eq!(got[0], ("importlib".into(), vec![], EdgeKind::Import));
        assert_eq!(got[1], ("pkg.plugins".into(), vec![], EdgeKind::Dynamic));
        assert_eq!(got[2], (".rel".into(), vec![], EdgeKind::Dynamic));
        assert_eq!(got[3], ("os".into(), vec![], EdgeKind::Dynamic));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn line_numbers_follow_physical_lines() {
        let got = scan("'''\n\n'''\nimport a\n\nfrom b import (\n c)\nimport d\n");
        let lines: Vec<u32> = got.iter().map(|i| i.line).collect();
        assert_eq!(lines, [4, 6, 8]);
    }

    #[test]
    fn semicolons_and_same_line_bodies() {
        assert_eq!(
            modules("import a; from b import c; from d import (e); from f import *\ntry: import g\nexcept ImportError: g = None\n"),
            ["a", "b", "d", "f", "g"]
        );
    }

    #[test]
    fn keywords_as_attribute_names_do_not_confuse() {
        // `print` call with `from`-like names inside brackets and a dict key.
        assert_eq!(
            modules("x = {'from': 1}\nprint(a, sep='')\nimport real"),
            ["real"]
        );
    }

    #[test]
    fn the_last_statement_is_read_to_its_end() {
        // Scanning stops after the last `import` text, but only once the
        // statement holding it is complete.
        assert_eq!(
            summary("x = 1\nfrom a import (\n    b,\n    c,\n)\ny = 2\n")[0].1,
            ["b", "c"]
        );
        assert_eq!(modules("import a, \\\n    b\nz = 3\n"), ["a", "b"]);
        assert_eq!(modules("m = import_module(\n  'late'\n)\n"), ["late"]);
        assert!(scan("x = 1\ndef f():\n    return 2\n").is_empty());
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let src = format!("{}\nimport a\n", "(".repeat(200_000));
        // Inside open brackets the newline is not logical: the import is swallowed,
        // exactly as Python would refuse it; the point is that nothing panics.
        let _ = scan(&src);
        let fs = format!("f\"{}\"\nimport b\n", "{f'".repeat(50_000));
        let _ = scan(&fs);
    }
}
