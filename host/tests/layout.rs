//! The code layout list (`host/edgeward.order`, written by
//! `scripts/orderfile`, handed to the linker by `host/link.rs`): one
//! function name per line, as a trace of this program's run path writes
//! them. A list from another program, a hand edit or a merge gone wrong
//! fails here. A list gone stale (names a build no longer has: lld skips
//! them) passes here and shows in the startup benchmark's peak memory.

use std::collections::HashSet;

const ORDER: &str = include_str!("../edgeward.order");

/// A Rust function's mangled name (legacy `_ZN…E` or v0 `_R…`, with the
/// `.N` suffix LTO gives a local copy), or a C or assembly routine's.
fn function_shaped(name: &str) -> bool {
    let base = match name.rsplit_once('.') {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => name,
    };
    if let Some(rest) = base.strip_prefix("_ZN") {
        return rest.ends_with('E') && rest.bytes().all(|c| c.is_ascii_graphic());
    }
    if let Some(rest) = base.strip_prefix("_R") {
        return !rest.is_empty() && rest.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
    }
    base.starts_with(|c: char| c == '_' || c.is_ascii_alphabetic())
        && base.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

#[test]
fn the_order_file_is_one_symbol_per_line_without_repeats() {
    let mut seen = HashSet::new();
    for (n, line) in ORDER.lines().enumerate() {
        assert!(
            function_shaped(line),
            "edgeward.order line {}: {line:?} is not a function's symbol name",
            n + 1
        );
        assert!(
            seen.insert(line),
            "edgeward.order line {}: {line} again",
            n + 1
        );
    }
    assert!(
        seen.len() > 1000,
        "edgeward.order: only {} names",
        seen.len()
    );
}

#[test]
fn the_order_file_is_a_trace_of_edgeward_run() {
    let lines: Vec<&str> = ORDER.lines().collect();
    // A trace starts where every process does.
    assert_eq!(
        lines.first(),
        Some(&"_start"),
        "edgeward.order: not a trace"
    );
    // It went through the run command and a cache load: this program's
    // run path, not another program's.
    for part in ["run_command", "deserialize", "blake3"] {
        assert!(
            lines.iter().any(|l| l.contains(part)),
            "edgeward.order names no function with {part:?} in its name"
        );
    }
    let run = lines.iter().position(|l| l.contains("run_command"));
    let main = lines.iter().position(|l| l.contains("8edgeward3cli4main"));
    assert!(
        main.is_some() && main < run,
        "edgeward.order: edgeward::cli::main does not come before the run command"
    );
}
