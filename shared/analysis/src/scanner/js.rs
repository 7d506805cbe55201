//! JavaScript / TypeScript import scanner.
//!
//! A tokenizer with a heap stack of modes (code, template literal, JSX tag,
//! JSX children) feeds a state machine that recognises:
//!
//! - `import x, {a, type b} from "m"`, `import * as ns from "m"`, `import "m"`;
//! - `import type … from "m"` and imports whose every named specifier is
//!   `type`-qualified ([`EdgeKind::Type`]), `import x = require("m")`;
//! - `export * [as ns] from "m"`, `export {a} from "m"`, `export type {…} from "m"`;
//! - `require("m")` ([`EdgeKind::Import`]), `import("m")` ([`EdgeKind::Dynamic`])
//!   and `typeof import("m")` ([`EdgeKind::Type`]).
//!
//! Division and regular-expression literals are told apart from the previous
//! token (the classic rule: after an expression a `/` divides), with `)` and
//! `}` resolved by remembering what they closed (an `if (…)` condition, a
//! block or an object literal). JSX is recognised where an expression may
//! start (`<` followed by a name or `>`), in every file kind except plain
//! `.ts`, where `<T>x` is a type assertion; in `.tsx`, `<T,>` and
//! `<T extends …>` stay generics.

use super::{is_ident_byte, number_end};
use crate::EdgeKind;
use memchr::{memchr, memchr3};

/// One import found in a JS/TS file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsImport {
    /// The module specifier as written (`./util`, `react`, `@/lib/x`).
    pub specifier: String,
    /// [`EdgeKind::Import`], [`EdgeKind::Type`] or [`EdgeKind::Dynamic`].
    pub kind: EdgeKind,
    /// 1-based line of the specifier.
    pub line: u32,
}

/// Which dialect a file is written in; decides whether `<` may start JSX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `.js .mjs .cjs .jsx`: JSX allowed (React code often lives in `.js`).
    JavaScript,
    /// `.ts .mts .cts .d.ts`: no JSX; `<T>x` is a type assertion.
    TypeScript,
    /// `.tsx`: JSX, with `<T,>` / `<T extends U>` kept as generics.
    Tsx,
}

impl Dialect {
    /// The dialect for a file name, or `None` if it is not a JS/TS source.
    pub fn from_path(path: &str) -> Option<Dialect> {
        let ext = path.rsplit_once('.')?.1;
        match ext {
            "js" | "mjs" | "cjs" | "jsx" => Some(Dialect::JavaScript),
            "ts" | "mts" | "cts" => Some(Dialect::TypeScript),
            "tsx" => Some(Dialect::Tsx),
            _ => None,
        }
    }
}

/// Every import in `src`, in source order. Never fails; never panics.
pub fn scan(src: &str, dialect: Dialect) -> Vec<JsImport> {
    let mut lexer = Lexer::new(src, dialect);
    let mut recognizer = Recognizer::default();
    while let Some((tok, line)) = lexer.next_token() {
        recognizer.feed(tok, line);
    }
    recognizer.out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Name(&'a str),
    /// A quoted string; its text when it holds no escape.
    Str(Option<&'a str>),
    /// A punctuator: `.` also stands for `?.`, `…` for `...`.
    Op(u8),
    /// A number, template literal, regex or JSX element: an operand.
    Operand,
}

/// What the lexer is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// `{`: a block (regex may follow its `}`) or an object literal (it may not).
    Brace {
        block: bool,
    },
    /// `(`: `cond` when it holds an `if`/`while`/`for`/`with` head.
    Paren {
        cond: bool,
    },
    Bracket,
    /// `${` inside a template literal.
    TemplateExpr,
    /// `{` inside JSX.
    JsxExpr,
    /// Template literal text.
    Template,
    /// Inside `<Tag …>` or `</Tag>`.
    JsxTag {
        closing: bool,
    },
    /// Between `<Tag>` and `</Tag>`.
    JsxChildren,
}

struct Lexer<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
    line: u32,
    dialect: Dialect,
    stack: Vec<Frame>,
    /// True where an expression may start: `/` begins a regex, `<` may begin JSX.
    expr_allowed: bool,
    /// Previous code token was `if`/`while`/`for`/`with`.
    after_cond_keyword: bool,
    /// Previous code token means `{` opens a block (`)`, `=>`, `else`, a name…).
    brace_is_block: bool,
}

/// Keywords after which an expression (so a regex or JSX) may start.
fn keyword_allows_expr(word: &str) -> bool {
    matches!(
        word,
        "return"
            | "typeof"
            | "instanceof"
            | "in"
            | "of"
            | "new"
            | "delete"
            | "void"
            | "throw"
            | "case"
            | "do"
            | "else"
            | "yield"
            | "await"
            | "extends"
    )
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str, dialect: Dialect) -> Self {
        let src = src.strip_prefix('\u{feff}').unwrap_or(src);
        let mut lexer = Lexer {
            src,
            b: src.as_bytes(),
            i: 0,
            line: 1,
            dialect,
            stack: Vec::new(),
            expr_allowed: true,
            after_cond_keyword: false,
            brace_is_block: true,
        };
        if src.starts_with("#!") {
            lexer.skip_line();
        }
        lexer
    }

    fn peek(&self, ahead: usize) -> u8 {
        self.b.get(self.i + ahead).copied().unwrap_or(0)
    }

    fn skip_line(&mut self) {
        self.i = memchr(b'\n', &self.b[self.i..]).map_or(self.b.len(), |p| self.i + p);
    }

    /// Sets what may follow the token just produced.
    fn after(&mut self, expr_allowed: bool, brace_is_block: bool) {
        self.expr_allowed = expr_allowed;
        self.brace_is_block = brace_is_block;
        self.after_cond_keyword = false;
    }

    fn next_token(&mut self) -> Option<(Tok<'a>, u32)> {
        loop {
            let &c = self.b.get(self.i)?;
            match self.stack.last() {
                Some(Frame::Template) => self.template_text(),
                Some(Frame::JsxChildren) => self.jsx_children(),
                Some(&Frame::JsxTag { closing }) => self.jsx_tag(closing),
                _ => {
                    if let Some(tok) = self.code(c) {
                        return Some(tok);
                    }
                }
            }
        }
    }

    /// One step in code mode; a token when one was produced.
    fn code(&mut self, c: u8) -> Option<(Tok<'a>, u32)> {
        let line = self.line;
        match c {
            b'\n' => {
                self.line += 1;
                self.i += 1;
            }
            b' ' | b'\t' | b'\r' | b'\x0b' | b'\x0c' => {
                self.i += 1;
                while matches!(self.b.get(self.i), Some(b' ')) {
                    self.i += 1;
                }
            }
            b'/' if self.peek(1) == b'/' => self.skip_line(),
            b'/' if self.peek(1) == b'*' => self.skip_block_comment(),
            b'/' if self.expr_allowed => {
                self.skip_regex();
                self.after(false, false);
                return Some((Tok::Operand, line));
            }
            b'\'' | b'"' => {
                let tok = self.string(c);
                self.after(false, false);
                return Some((tok, line));
            }
            b'`' => {
                self.i += 1;
                self.stack.push(Frame::Template);
                return Some((Tok::Operand, line));
            }
            b'0'..=b'9' => {
                self.number();
                self.after(false, false);
                return Some((Tok::Operand, line));
            }
            b'.' if self.peek(1).is_ascii_digit() => {
                self.number();
                self.after(false, false);
                return Some((Tok::Operand, line));
            }
            b'.' if self.peek(1) == b'.' && self.peek(2) == b'.' => {
                self.i += 3;
                self.after(true, false);
                return Some((Tok::Op(b'~'), line));
            }
            b'?' if self.peek(1) == b'.' && !self.peek(2).is_ascii_digit() => {
                self.i += 2;
                self.after(false, false);
                return Some((Tok::Op(b'.'), line));
            }
            b'=' if self.peek(1) == b'>' => {
                self.i += 2;
                self.after(true, true);
                return Some((Tok::Op(b'>'), line));
            }
            b'+' | b'-' if self.peek(1) == c => {
                // Taken as postfix: after `x++` a `/` divides.
                self.i += 2;
                self.after(false, false);
                return Some((Tok::Op(c), line));
            }
            b'<' if self.peek(1) == b'!' && self.b[self.i..].starts_with(b"<!--") => {
                self.skip_line()
            }
            b'<' if self.expr_allowed
                && self.dialect != Dialect::TypeScript
                && self.jsx_starts() =>
            {
                self.i += 1;
                self.stack.push(Frame::JsxTag { closing: false });
            }
            b'{' => {
                self.i += 1;
                let block = self.brace_is_block;
                self.stack.push(Frame::Brace { block });
                self.after(true, true);
                return Some((Tok::Op(b'{'), line));
            }
            b'}' => {
                self.i += 1;
                return match self.close_brace() {
                    // Back in a template or JSX: no code token.
                    None => None,
                    Some(block) => {
                        self.after(block, true);
                        Some((Tok::Op(b'}'), line))
                    }
                };
            }
            b'(' => {
                self.i += 1;
                let cond = self.after_cond_keyword;
                self.stack.push(Frame::Paren { cond });
                self.after(true, false);
                return Some((Tok::Op(b'('), line));
            }
            b')' => {
                self.i += 1;
                let cond = self.close_paren();
                self.after(cond, true);
                return Some((Tok::Op(b')'), line));
            }
            b'[' => {
                self.i += 1;
                self.stack.push(Frame::Bracket);
                self.after(true, false);
                return Some((Tok::Op(b'['), line));
            }
            b']' => {
                self.i += 1;
                if self.stack.last() == Some(&Frame::Bracket) {
                    self.stack.pop();
                }
                self.after(false, false);
                return Some((Tok::Op(b']'), line));
            }
            c if is_ident_byte(c) || c == b'$' || c == b'\\' => {
                let start = self.i;
                self.i += 1;
                while self.i < self.b.len()
                    && (is_ident_byte(self.b[self.i]) || self.b[self.i] == b'$')
                {
                    self.i += 1;
                }
                let word = self.src.get(start..self.i).unwrap_or("");
                let keyword_expr = keyword_allows_expr(word);
                self.after(keyword_expr, !keyword_expr || matches!(word, "else" | "do"));
                self.after_cond_keyword = matches!(word, "if" | "while" | "for" | "with");
                return Some((Tok::Name(word), line));
            }
            _ => {
                self.i += 1;
                self.after(true, matches!(c, b';'));
                return Some((Tok::Op(c), line));
            }
        }
        None
    }

    /// Pops up to the `{` this `}` closes. `Some(block)` in code; `None` when
    /// it ended a `${…}` or a JSX `{…}` and text mode resumes.
    fn close_brace(&mut self) -> Option<bool> {
        let pos = self.stack.iter().rposition(|f| {
            matches!(
                f,
                Frame::Brace { .. }
                    | Frame::TemplateExpr
                    | Frame::JsxExpr
                    | Frame::Template
                    | Frame::JsxTag { .. }
                    | Frame::JsxChildren
            )
        });
        let Some(pos) = pos else {
            return Some(true); // unbalanced `}` at top level: ignore it
        };
        match self.stack[pos] {
            Frame::Brace { block } => {
                self.stack.truncate(pos);
                Some(block)
            }
            Frame::TemplateExpr | Frame::JsxExpr => {
                self.stack.truncate(pos);
                None
            }
            // A stray `}` cannot close a template or JSX element from code.
            _ => Some(true),
        }
    }

    /// Pops up to the `(` this `)` closes; true when it was a statement head.
    fn close_paren(&mut self) -> bool {
        // Brackets left open inside the parentheses close with them; braces do not.
        let pos = self
            .stack
            .iter()
            .rposition(|f| !matches!(f, Frame::Bracket));
        match pos.map(|p| (p, self.stack[p])) {
            Some((p, Frame::Paren { cond })) => {
                self.stack.truncate(p);
                cond
            }
            _ => false,
        }
    }

    fn skip_block_comment(&mut self) {
        let mut j = self.i + 2;
        loop {
            match memchr(b'*', self.b.get(j..).unwrap_or(&[])) {
                Some(p) => {
                    let star = j + p;
                    self.count_lines(j, star);
                    if self.b.get(star + 1) == Some(&b'/') {
                        self.i = star + 2;
                        return;
                    }
                    j = star + 1;
                }
                None => {
                    self.count_lines(j, self.b.len());
                    self.i = self.b.len();
                    return;
                }
            }
        }
    }

    fn count_lines(&mut self, from: usize, to: usize) {
        let slice = self.b.get(from..to).unwrap_or(&[]);
        self.line += memchr::memchr_iter(b'\n', slice).count() as u32;
    }

    fn number(&mut self) {
        self.i = number_end(self.b, self.i);
    }

    /// A quoted string starting at `self.i`. Ends at the closing quote or,
    /// unterminated, before the newline.
    fn string(&mut self, quote: u8) -> Tok<'a> {
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            let Some(p) = memchr3(quote, b'\\', b'\n', &self.b[self.i.min(self.b.len())..]) else {
                self.i = self.b.len();
                return Tok::Str(None);
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
                    self.i = at;
                    return Tok::Str(None);
                }
                _ => {
                    self.i = at + 1;
                    if escaped {
                        return Tok::Str(None);
                    }
                    return Tok::Str(self.src.get(start..at));
                }
            }
        }
    }

    /// A regex literal starting at the `/` at `self.i`.
    fn skip_regex(&mut self) {
        self.i += 1;
        let mut in_class = false;
        while let Some(&c) = self.b.get(self.i) {
            match c {
                b'\\' => {
                    if self.b.get(self.i + 1) == Some(&b'\n') {
                        break;
                    }
                    self.i += 2;
                    continue;
                }
                b'\n' => return, // not a regex after all; recover at the newline
                b'[' => in_class = true,
                b']' => in_class = false,
                b'/' if !in_class => {
                    self.i += 1;
                    while self.i < self.b.len() && is_ident_byte(self.b[self.i]) {
                        self.i += 1;
                    }
                    return;
                }
                _ => {}
            }
            self.i += 1;
        }
        self.i = self.i.min(self.b.len());
    }

    fn template_text(&mut self) {
        let Some(p) = memchr3(b'`', b'\\', b'$', &self.b[self.i..]) else {
            self.count_lines(self.i, self.b.len());
            self.i = self.b.len();
            return;
        };
        let at = self.i + p;
        self.count_lines(self.i, at);
        match self.b[at] {
            b'`' => {
                self.i = at + 1;
                self.stack.pop();
                self.after(false, false);
            }
            b'\\' => {
                if self.b.get(at + 1) == Some(&b'\n') {
                    self.line += 1;
                }
                self.i = (at + 2).min(self.b.len());
            }
            _ => {
                if self.b.get(at + 1) == Some(&b'{') {
                    self.i = at + 2;
                    self.stack.push(Frame::TemplateExpr);
                    self.after(true, false);
                } else {
                    self.i = at + 1;
                }
            }
        }
    }

    /// Is the `<` at `self.i` the start of a JSX element?
    fn jsx_starts(&self) -> bool {
        let next = self.peek(1);
        if next == b'>' {
            return true; // fragment
        }
        if !(next.is_ascii_alphabetic() || next == b'_' || next == b'$' || next >= 0x80) {
            return false;
        }
        if self.dialect != Dialect::Tsx {
            return true;
        }
        // In .tsx, `<T,>` and `<T extends U>` are generic parameters.
        let mut j = self.i + 1;
        while j < self.b.len() && (is_ident_byte(self.b[j]) || self.b[j] == b'$') {
            j += 1;
        }
        while j < self.b.len() && matches!(self.b[j], b' ' | b'\t' | b'\r' | b'\n') {
            j += 1;
        }
        let rest = &self.b[j.min(self.b.len())..];
        if rest.first() == Some(&b',') {
            return false;
        }
        if rest.starts_with(b"extends") {
            let after = rest.get(7).copied().unwrap_or(0);
            return is_ident_byte(after) || matches!(after, b'=' | b'>' | b'/');
        }
        true
    }

    fn jsx_children(&mut self) {
        let Some(p) = memchr3(b'<', b'{', b'\n', &self.b[self.i..]) else {
            self.i = self.b.len();
            return;
        };
        let at = self.i + p;
        match self.b[at] {
            b'\n' => {
                self.line += 1;
                self.i = at + 1;
            }
            b'{' => {
                self.i = at + 1;
                self.stack.push(Frame::JsxExpr);
                self.after(true, false);
            }
            _ => {
                if self.b.get(at + 1) == Some(&b'/') {
                    self.i = at + 2;
                    self.stack.push(Frame::JsxTag { closing: true });
                } else {
                    self.i = at + 1;
                    self.stack.push(Frame::JsxTag { closing: false });
                }
            }
        }
    }

    fn jsx_tag(&mut self, closing: bool) {
        let c = self.b[self.i];
        match c {
            b'\n' => {
                self.line += 1;
                self.i += 1;
            }
            b'>' => {
                self.i += 1;
                self.stack.pop();
                if closing {
                    if self.stack.last() == Some(&Frame::JsxChildren) {
                        self.stack.pop();
                    }
                    self.element_ended();
                } else {
                    self.stack.push(Frame::JsxChildren);
                }
            }
            b'/' if self.peek(1) == b'>' => {
                self.i += 2;
                self.stack.pop();
                self.element_ended();
            }
            b'/' if self.peek(1) == b'/' => self.skip_line(),
            b'/' if self.peek(1) == b'*' => self.skip_block_comment(),
            b'{' => {
                self.i += 1;
                self.stack.push(Frame::JsxExpr);
                self.after(true, false);
            }
            b'"' | b'\'' => {
                // Attribute strings have no escapes and may span lines.
                let rest = &self.b[self.i + 1..];
                let end = memchr(c, rest).map_or(self.b.len(), |p| self.i + 1 + p + 1);
                self.count_lines(self.i, end);
                self.i = end;
            }
            _ => self.i += 1,
        }
    }

    /// A JSX element closed: its parent's children resume, or code does.
    fn element_ended(&mut self) {
        if self.stack.last() != Some(&Frame::JsxChildren) {
            self.after(false, false);
        }
    }
}

/// Where the recognizer is inside an import-like construct.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Idle,
    /// After `import`.
    ImportStart { typeof_before: bool },
    /// Inside an import/export clause, waiting for `from`.
    Clause(Clause),
    /// After `from`: the specifier string.
    From { kind: EdgeKind },
    /// After `import x =`: `require ( "m" )`.
    ImportEquals { kind: EdgeKind },
    /// After `require` / `import`: `(` (step 0), the string (1), then `)` or
    /// `,` (2, the string waiting in `Recognizer::pending`).
    Call { kind: EdgeKind, step: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clause {
    /// `import type …` / `export type …`.
    type_only: bool,
    /// Inside `{ … }`.
    braces: bool,
    /// `{ … }` already closed: only `from` (or `,` after a default) may follow.
    closed: bool,
    /// A default or namespace binding: the import has a runtime part.
    runtime_binding: bool,
    /// Specifiers in braces, and how many are `type`-qualified.
    specifiers: u32,
    type_specifiers: u32,
    /// At the start of a specifier in braces.
    at_specifier: bool,
    /// The specifier just started with `type`.
    pending_type: bool,
    /// An `export` clause (no default bindings, no `=`).
    export: bool,
}

impl Clause {
    fn new(type_only: bool, export: bool) -> Self {
        Clause {
            type_only,
            braces: false,
            closed: false,
            runtime_binding: false,
            specifiers: 0,
            type_specifiers: 0,
            at_specifier: false,
            pending_type: false,
            export,
        }
    }

    fn kind(&self) -> EdgeKind {
        let all_typed =
            self.specifiers > 0 && self.type_specifiers == self.specifiers && !self.runtime_binding;
        if self.type_only || all_typed {
            EdgeKind::Type
        } else {
            EdgeKind::Import
        }
    }
}

#[derive(Debug, Default)]
struct Recognizer {
    out: Vec<JsImport>,
    state: State,
    /// The previous token was `.` / `?.`: `x.import(…)`, `x.require(…)` are not imports.
    after_dot: bool,
    /// The previous token was `typeof`.
    after_typeof: bool,
    /// A call's string argument, kept until its `)` or `,` proves it literal.
    pending: Option<(String, u32)>,
}

impl Recognizer {
    fn feed(&mut self, tok: Tok<'_>, line: u32) {
        // A token that ends a construct is looked at again from `Idle`.
        if !self.step(tok, line) {
            self.state = State::Idle;
            self.step(tok, line);
        }
        self.after_dot = tok == Tok::Op(b'.');
        self.after_typeof = tok == Tok::Name("typeof");
    }

    fn push(&mut self, specifier: &str, kind: EdgeKind, line: u32) {
        self.out.push(JsImport {
            specifier: specifier.to_string(),
            kind,
            line,
        });
    }

    /// Advances the state machine; false if `tok` must be retried from `Idle`.
    fn step(&mut self, tok: Tok<'_>, line: u32) -> bool {
        match self.state {
            State::Idle => {
                if !self.after_dot {
                    self.state = match tok {
                        Tok::Name("import") => State::ImportStart {
                            typeof_before: self.after_typeof,
                        },
                        Tok::Name("export") => State::Clause(Clause::new(false, true)),
                        Tok::Name("require") => State::Call {
                            kind: EdgeKind::Import,
                            step: 0,
                        },
                        _ => State::Idle,
                    };
                }
                true
            }
            State::ImportStart { typeof_before } => {
                self.state = match tok {
                    Tok::Op(b'(') => State::Call {
                        kind: if typeof_before {
                            EdgeKind::Type
                        } else {
                            EdgeKind::Dynamic
                        },
                        step: 1,
                    },
                    Tok::Str(Some(s)) => {
                        self.push(s, EdgeKind::Import, line);
                        State::Idle
                    }
                    Tok::Name("type" | "typeof") => State::Clause(Clause::new(true, false)),
                    Tok::Name(_) | Tok::Op(b'{' | b'*') => {
                        self.state = State::Clause(Clause::new(false, false));
                        return self.step(tok, line);
                    }
                    _ => return false,
                };
                true
            }
            State::Clause(mut clause) => {
                let keep = self.clause_step(&mut clause, tok);
                if let State::Clause(_) = self.state {
                    self.state = State::Clause(clause);
                }
                keep
            }
            State::From { kind } => {
                if let Tok::Str(Some(s)) = tok {
                    self.push(s, kind, line);
                    self.state = State::Idle;
                    return true;
                }
                false
            }
            State::ImportEquals { kind } => match tok {
                Tok::Name("require") => {
                    self.state = State::Call { kind, step: 0 };
                    true
                }
                _ => false,
            },
            State::Call { kind, step } => match (step, tok) {
                (0, Tok::Op(b'(')) => {
                    self.state = State::Call { kind, step: 1 };
                    true
                }
                (1, Tok::Str(Some(s))) => {
                    self.pending = Some((s.to_string(), line));
                    self.state = State::Call { kind, step: 2 };
                    true
                }
                // `import("x", { with: … })` takes options after a comma.
                (2, Tok::Op(b')' | b',')) => {
                    if let Some((specifier, line)) = self.pending.take() {
                        self.out.push(JsImport {
                            specifier,
                            kind,
                            line,
                        });
                    }
                    self.state = State::Idle;
                    true
                }
                _ => false,
            },
        }
    }

    /// One token of an import/export clause.
    fn clause_step(&mut self, clause: &mut Clause, tok: Tok<'_>) -> bool {
        if clause.closed {
            return match tok {
                Tok::Name("from") => {
                    self.state = State::From {
                        kind: clause.kind(),
                    };
                    true
                }
                _ => false,
            };
        }
        if clause.braces {
            match tok {
                Tok::Op(b'}') => {
                    if clause.pending_type {
                        // `{ type }`: a specifier named `type`.
                        clause.pending_type = false;
                    }
                    clause.braces = false;
                    clause.closed = true;
                }
                Tok::Op(b',') => {
                    clause.at_specifier = true;
                    clause.pending_type = false;
                }
                Tok::Name("type") if clause.at_specifier => {
                    clause.at_specifier = false;
                    clause.pending_type = true;
                    clause.specifiers += 1;
                }
                Tok::Name(n) => {
                    if clause.pending_type && n != "as" {
                        clause.type_specifiers += 1;
                    } else if clause.at_specifier {
                        clause.specifiers += 1;
                    }
                    clause.pending_type = false;
                    clause.at_specifier = false;
                }
                Tok::Str(_) => {
                    // `export { "a-b" as c }`: arbitrary module namespace names.
                    if clause.at_specifier {
                        clause.specifiers += 1;
                    }
                    clause.at_specifier = false;
                }
                _ => return false,
            }
            return true;
        }
        match tok {
            Tok::Op(b'{') => {
                clause.braces = true;
                clause.at_specifier = true;
            }
            Tok::Op(b'*') => clause.runtime_binding = true,
            Tok::Op(b',') if !clause.export => {}
            Tok::Name("from") => {
                self.state = State::From {
                    kind: clause.kind(),
                };
            }
            Tok::Name("as") => {}
            Tok::Name("type") if clause.export && !clause.type_only && !clause.runtime_binding => {
                // `export type { T } from …`; `export type T = …` falls out below.
                clause.type_only = true;
            }
            Tok::Name(_) if clause.export && !clause.runtime_binding => {
                // `export const`, `export default`, `export function`: no source.
                return false;
            }
            Tok::Name(_) => clause.runtime_binding = true,
            Tok::Op(b'=') if !clause.export => {
                let kind = if clause.type_only {
                    EdgeKind::Type
                } else {
                    EdgeKind::Import
                };
                self.state = State::ImportEquals { kind };
            }
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(src: &str, dialect: Dialect) -> Vec<(String, EdgeKind)> {
        scan(src, dialect)
            .into_iter()
            .map(|i| (i.specifier, i.kind))
            .collect()
    }

    fn names(src: &str, dialect: Dialect) -> Vec<String> {
        specs(src, dialect).into_iter().map(|s| s.0).collect()
    }

    use EdgeKind::{Dynamic, Import, Type};

    #[test]
    fn esm_import_forms() {
        let src = r#"
import a from "./a";
import * as b from './b'
import c, { d as e, f } from "./c";
import {
  g,
  h,
} from "./g";
import "./side-effect.css";
import def, * as ns from "./ns";
"#;
        assert_eq!(
            names(src, Dialect::JavaScript),
            ["./a", "./b", "./c", "./g", "./side-effect.css", "./ns"]
        );
    }

    #[test]
    fn export_from_forms() {
        let src = r#"
export * from "./all";
export * as ns from "./ns";
export { a, b as c } from "./named";
export { local };
export const x = 1;
export default function () {}
export type { T } from "./types";
export { "string name" as y } from "./strs";
"#;
        assert_eq!(
            specs(src, Dialect::TypeScript),
            vec![
                ("./all".into(), Import),
                ("./ns".into(), Import),
                ("./named".into(), Import),
                ("./types".into(), Type),
                ("./strs".into(), Import),
            ]
        );
    }

    #[test]
    fn type_imports_are_type_kind() {
        let src = r#"
import type { A } from "./a";
import { type B, type C } from "./bc";
import { type D, e } from "./de";
import F, { type G } from "./fg";
import type H from "./h";
import type * as I from "./i";
let t: typeof import("./j");
type K = import("./k").K;
"#;
        assert_eq!(
            specs(src, Dialect::TypeScript),
            vec![
                ("./a".into(), Type),
                ("./bc".into(), Type),
                ("./de".into(), Import),
                ("./fg".into(), Import),
                ("./h".into(), Type),
                ("./i".into(), Type),
                ("./j".into(), Type),
                ("./k".into(), Dynamic),
            ]
        );
    }

    #[test]
    fn require_dynamic_import_and_import_equals() {
        let src = r#"
const fs = require("fs");
const lazy = () => import('./lazy');
const withOpts = await import("./data.json", { with: { type: "json" } });
import path = require("path");
obj.require("not-me");
obj.import("not-me-either");
const u = import.meta.url;
const name = require(variable);
"#;
        assert_eq!(
            specs(src, Dialect::TypeScript),
            vec![
                ("fs".into(), Import),
                ("./lazy".into(), Dynamic),
                ("./data.json".into(), Dynamic),
                ("path".into(), Import),
            ]
        );
    }

    #[test]
    fn comments_strings_and_templates_are_not_imports() {
        let src = r#"
// import a from "fake1";
/* import b from "fake2"; require("fake3") */
const s = "import c from 'fake4'";
const t = `import d from "fake5" ${ `nested ${"require('fake6')"}` } import("fake7")`;
const u = `${ { a: `import e from "fake8"` }.a }`;
/**
 * require("fake9")
 */
import real from "./real";
"#;
        assert_eq!(names(src, Dialect::JavaScript), ["./real"]);
    }

    #[test]
    fn regex_literals_are_not_mistaken() {
        let src = r#"
const re = /import x from "fake1"/g;
const q = /['"`]/.test(s) ? a / b / c : /\/*require("fake2")/;
if (x) /`/.test(y);
const r = [/'/, /"/];
let d = a / 2; import real1 from "./one"; // ' unbalanced quote in comment
function f() {} /import("fake3")/.exec(z);
x = y / z /* comment */ / w; import real2 from "./two";
"#;
        assert_eq!(names(src, Dialect::JavaScript), ["./one", "./two"]);
    }

    #[test]
    fn jsx_text_and_attributes_are_not_imports() {
        let src = r#"
import React from "react";
export const App = () => (
  <div className="import x from 'fake1'" title="it's">
    Don't import anything from "fake2"; it's text.
    {items.map((i) => <Item key={i} label={`${i}`} />)}
    <>
      <Nested>{require("./real-in-jsx")}</Nested>
    </>
  </div>
);
const y = a < b && c > d;
import("./after");
"#;
        assert_eq!(
            names(src, Dialect::JavaScript),
            ["react", "./real-in-jsx", "./after"]
        );
    }

    #[test]
    fn tsx_generics_are_not_jsx() {
        let src = r#"
const id = <T,>(x: T) => x;
const f = <T extends object>(x: T): string => "import fake from 'x'";
import real from "./real";
const el = <Foo bar={1}>don't</Foo>;
import another from "./another";
"#;
        assert_eq!(names(src, Dialect::Tsx), ["./real", "./another"]);
    }

    #[test]
    fn typescript_angle_brackets_are_never_jsx() {
        let src = "const x = <Foo>bar; // it's\nimport real from './real';\nconst y = a < b;\n";
        assert_eq!(names(src, Dialect::TypeScript), ["./real"]);
    }

    #[test]
    fn keywords_as_property_names() {
        let src = "const o = { import: 1, require: 2, export: 3 };\nclass A { import() {} }\nimport ok from './ok';\n";
        assert_eq!(names(src, Dialect::TypeScript), ["./ok"]);
    }

    #[test]
    fn export_clause_followed_by_import_on_next_line() {
        let src = "export { a }\nimport './side'\nexport * from './b'\n";
        assert_eq!(names(src, Dialect::JavaScript), ["./side", "./b"]);
    }

    #[test]
    fn spread_of_require_counts() {
        assert_eq!(
            names(
                "module.exports = { ...require('./base') };",
                Dialect::JavaScript
            ),
            ["./base"]
        );
    }

    #[test]
    fn line_numbers() {
        let got = scan(
            "/*\n\n*/\nimport a from './a';\n`\n`\nrequire('./b')\n",
            Dialect::JavaScript,
        );
        assert_eq!(got.iter().map(|i| i.line).collect::<Vec<_>>(), [4, 7]);
    }

    #[test]
    fn hashbang_and_html_comments() {
        assert_eq!(
            names(
                "#!/usr/bin/env node\n<!-- import x from 'no'\nrequire('./yes')\n",
                Dialect::JavaScript
            ),
            ["./yes"]
        );
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let src = "(".repeat(300_000)
            + &"{".repeat(300_000)
            + &"`${".repeat(100_000)
            + &"<a>".repeat(100_000);
        let _ = scan(&src, Dialect::Tsx);
    }
}
