//! The `regex` crate's API as `tss-esapi` uses it, served by `regex-lite`.
//!
//! `tss-esapi` parses TCTI strings (`swtpm:host=…,port=…`) with four
//! anchored patterns, once, at start. The full `regex` crate brings about
//! 700 KB of engine code (its meta engine, DFAs, Aho–Corasick, Unicode
//! tables) into the key daemon, whose whole executable it hashes at every
//! start. `regex-lite`, from the same project, matches the same syntax
//! without Unicode classes (the patterns use none) in a fraction of the
//! code. `Cargo.lock` may name only `tss-esapi` as a dependent of this
//! crate: `host/hsm-hw/tests/regex_shim.rs` fails otherwise, so no other
//! crate gets the smaller engine unawares.

pub use regex_lite::*;
