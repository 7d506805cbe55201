//! Import scanners: hand-written lexers that find import statements without
//! building a syntax tree.
//!
//! Each scanner reads a whole file and returns the imports it names, in
//! source order. They skip comments, strings (every Python prefix,
//! triple-quoted, f-strings with nested replacement fields), docstrings, JS
//! template literals with nested `${}`, regular-expression literals and JSX
//! text exactly, so text that merely looks like an import is never taken for
//! one. Nesting is kept on heap stacks, never the call stack, so hostile input
//! (a million open brackets) cannot overflow it. Scanners never panic and
//! never fail: malformed code is scanned as far as it makes sense, the way a
//! tokenizer recovers at the end of a line.

pub mod js;
pub mod python;

/// Bytes that continue an identifier in both languages. Every non-ASCII byte
/// counts, so Unicode identifiers stay whole.
#[inline]
pub(crate) fn is_ident_byte(b: u8) -> bool {
    IDENT[b as usize]
}

/// The end of a number literal whose first byte is at `start`: digits,
/// letters (hex digits, suffixes), `_`, `.` and an exponent's sign, the
/// same in both languages (the scanners only skip numbers).
pub(crate) fn number_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while let Some(&c) = b.get(i) {
        let exponent_sign = (c == b'+' || c == b'-') && matches!(b[i - 1], b'e' | b'E');
        if is_ident_byte(c) || c == b'.' || exponent_sign {
            i += 1;
        } else {
            break;
        }
    }
    i
}

/// [`is_ident_byte`] as a table: one load instead of four comparisons in
/// the scanners' hottest loop.
static IDENT: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
        i += 1;
    }
    table
};
