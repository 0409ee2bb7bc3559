//! # edgeward
//!
//! An edge security daemon that runs edge modules as WebAssembly components:
//! each module is measured (SHA-256 of its bytes), checked against its
//! registration, and run in a deny-by-default sandbox.
//!
//! The binary `edgeward` is thin glue over [`cli`]; everything testable lives
//! in this library.

pub mod api;
pub mod attest;
pub mod cli;
pub mod cloud;
pub mod components;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod grants;
pub mod identity;
pub mod keyd;
pub mod registry;
pub mod spec;

// The HSM platform abstraction layer, the state dir's file writes and the
// component measurement live in the bottom crate (`host/hsm`), which
// knows nothing above it; their old paths stay.
pub use edgeward_hsm as hsm;
pub use edgeward_hsm::{measure, state};
// The trust core (`host/trust`): authority, identities, measurement log.
pub use edgeward_trust::addrclass;
// The runtime (`host/runtime`): engine, cache, sandboxes, the WIT glue;
// it knows nothing of the daemon (management is a trait implemented here).
pub use edgeward_runtime as runtime;
pub use edgeward_runtime::{confine, units};

/// The runtime version (`runtime.platform.version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The wasmtime release modules run on (the workspace pins it exactly).
pub const WASMTIME_VERSION: &str = "48.0.8";

#[cfg(test)]
mod tests {
    /// [`super::WASMTIME_VERSION`] is the version the workspace builds.
    #[test]
    fn wasmtime_version_is_the_pinned_one() {
        let manifest = include_str!("../../Cargo.toml");
        assert!(
            manifest.contains(&format!(
                "wasmtime = {{ version = \"{}\"",
                super::WASMTIME_VERSION
            )),
            "update WASMTIME_VERSION"
        );
    }
}
