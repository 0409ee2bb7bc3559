//! The `regex` crate's API as `tss-esapi` uses it, served by `regex-lite`.
//!
//! `tss-esapi` parses TCTI strings (`swtpm:host=…,port=…`) with seven
//! small patterns, at start. The full `regex` crate brought 1.5 MB into the
//! key daemon (its meta engine, DFAs, Aho–Corasick, Unicode tables and
//! their relocations), whose whole executable it hashes at every start.
//! `regex-lite`, from the same project, matches the same syntax with
//! ASCII-only `\d \w \s \b (?i)` and no `\p{..}` (the patterns use none
//! of them) in a fraction of the code. `Cargo.lock` may name only
//! `tss-esapi` as a dependent of this crate:
//! `host/hsm-hw/tests/regex_shim.rs` fails otherwise, so no other crate
//! gets the smaller engine unawares.

pub use regex_lite::*;
