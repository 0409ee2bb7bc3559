//! # edgeward-sdk
//!
//! The Rust API for modules that run under the edgeward daemon. Build your
//! module for `wasm32-wasip2`; a `fn main` becomes a command component that
//! edgeward measures, sandboxes and runs.
//!
//! The raw bindings for the `edgeward:host` WIT package live in [`bindings`];
//! they are generated from the same `wit/` directory the host uses, so the
//! two can never disagree about the ABI.

/// Raw bindings generated from `wit/` (world `edgeward:host/module`).
///
/// Prefer the typed wrappers in this crate where they exist.
#[allow(missing_docs, unsafe_code, missing_debug_implementations, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "module",
        path: "../wit",
    });
}

/// The version of the WIT package this SDK was generated from.
pub const WIT_VERSION: &str = "edgeward:host@0.1.0";
