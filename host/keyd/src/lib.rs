//! edgeward's key daemon: the only process that opens the HSM. It holds the
//! device CA, the JWT authority, the broker client key, the attestation key
//! and the module data master key, and serves their use over a unix socket
//! to the callers its principal table names ([`policy`]), one small
//! versioned protocol ([`edgeward_proto`]) at a time ([`server`]). Given a
//! runtime to launch, it measures it and starts it as the runtime's user
//! ([`launch`]).
//!
//! It links no WebAssembly runtime, no compiler, no HTTP, MQTT or OCI code
//! and no async runtime: what can reach the keys is this crate, the PAL,
//! the protocol and an X.509 reader.

pub mod launch;
pub mod policy;
pub mod server;
