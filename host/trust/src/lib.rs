//! # edgeward's trust core
//!
//! What holds the device's keys to account: the device CA and the JWT
//! authority ([`identity`]), the measurement log and the evidence a
//! verifier replays ([`attest`]), and the address classes module
//! certificates and grants are judged by ([`addrclass`]). It stands on the
//! HSM platform abstraction layer alone: no WebAssembly engine, no network
//! client or server, no HTTP, no registry. The key daemon is built from
//! this crate; the runtime reaches it through the wire protocol.

pub mod addrclass;
pub mod attest;
pub mod identity;

use edgeward_hsm as hsm;
use edgeward_hsm::{measure, state};
