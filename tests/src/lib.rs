//! Shared pieces of edgeward's integration tests: the guest components
//! (built by `build.rs`) and helpers to run the `edgeward` binary.

/// Paths of the guest components, one constant per guest.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

pub mod bench;
pub mod fixtures;
pub mod fleet;
