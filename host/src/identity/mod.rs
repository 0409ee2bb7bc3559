//! Workload identity: the trust core's ([`edgeward_trust::identity`]),
//! with the module registrations the daemon keeps in its registry
//! ([`registry`]).

pub use edgeward_trust::identity::*;

pub mod registry;
