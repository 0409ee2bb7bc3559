//! Guest-controlled text made safe for a terminal and a log line: control
//! characters (C0 but tab, DEL, C1, and so ESC: ANSI/OSC sequences), carriage
//! returns and newlines, Unicode bidirectional overrides, and bytes that are
//! not UTF-8 are written as visible escapes (`\x1b`, `\r`, `\n`, `\u{202e}`).
//! A module can then neither forge a log line, nor redraw or retitle an
//! operator's terminal, nor reorder what it shows.

use std::borrow::Cow;
use std::fmt::Write as _;

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    let _ = match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    };
}

/// Appends `s` to `out`, escaping what [`needs_escape`] names, but newlines
/// when `keep_newlines`.
fn push_chars(out: &mut String, s: &str, keep_newlines: bool) {
    for c in s.chars() {
        if needs_escape(c) && !(keep_newlines && c == '\n') {
            push_escaped(out, c);
        } else {
            out.push(c);
        }
    }
}

/// `b` escaped: valid UTF-8 as [`push_chars`] does it, every other byte as
/// `\xNN` (borrowed when nothing needs it).
fn escape_text(b: &[u8], keep_newlines: bool) -> Cow<'_, [u8]> {
    let clean = |s: &str| {
        !s.chars()
            .any(|c| needs_escape(c) && !(keep_newlines && c == '\n'))
    };
    if std::str::from_utf8(b).is_ok_and(clean) {
        return Cow::Borrowed(b);
    }
    let mut out = String::with_capacity(b.len() + 16);
    for chunk in b.utf8_chunks() {
        push_chars(&mut out, chunk.valid(), keep_newlines);
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    Cow::Owned(out.into_bytes())
}

/// `s` with what a guest could abuse escaped (borrowed when nothing is).
/// Backslashes stay as they are: text that is already escaped (a module's
/// JSON, say) passes through unchanged, and only raw control characters,
/// which a terminal or a log reader would obey, are rewritten.
pub fn escape_str(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    push_chars(&mut out, s, false);
    Cow::Owned(out)
}

/// The bytes of a line a module wrote, escaped: valid UTF-8 as with
/// [`escape_str`], every other byte as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> Cow<'_, [u8]> {
    escape_text(b, false)
}

/// A file's bytes made safe to print on a terminal, for `edgeward logs`:
/// newlines stay (they separate the file's lines), every other control
/// character, bidi override and non-UTF-8 byte is escaped as above, so
/// text escaped when it was written is shown unchanged.
pub fn for_terminal(b: &[u8]) -> Cow<'_, [u8]> {
    escape_text(b, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_or_log_would_obey() {
        assert_eq!(escape_str("plain text\twith tab"), "plain text\twith tab");
        assert!(matches!(escape_str("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape_str("\x1b[2J\x1b]0;title\x07"),
            "\\x1b[2J\\x1b]0;title\\x07"
        );
        assert_eq!(
            escape_str("ok\r\n2026-01-01T00:00:00Z INFO forged"),
            "ok\\r\\n2026-01-01T00:00:00Z INFO forged"
        );
        assert_eq!(escape_str("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape_str("abc\u{202e}gnp.exe"), "abc\\u{202e}gnp.exe");
        // JSON with its own escapes passes through unchanged.
        let json = r#"{"cert":"-----BEGIN\nMII","q":"\"x\""}"#;
        assert!(matches!(escape_str(json), Cow::Borrowed(_)));
        assert_eq!(escape_str("\x7f"), "\\x7f");
        assert_eq!(&*escape_bytes(b"bad \xff\xfe byte"), b"bad \\xff\\xfe byte");
        assert_eq!(&*escape_bytes("é ok".as_bytes()), "é ok".as_bytes());
        // For the terminal: lines kept, already-escaped text unchanged.
        let logged = escape_bytes(b"a\x1b[31m \\ b").into_owned();
        assert_eq!(&*for_terminal(&logged), &logged[..]);
        assert_eq!(
            &*for_terminal(b"old\x1b[2J\nline\n"),
            b"old\\x1b[2J\nline\n"
        );
    }
}
