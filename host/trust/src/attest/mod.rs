//! The measurement log a verifier replays ([`eventlog`]), its canonical
//! event encoding ([`jcs`]), and the evidence that carries it with a quote
//! ([`evidence`], [`wire`]).

pub mod eventlog;
pub mod evidence;
pub mod jcs;
pub mod wire;
