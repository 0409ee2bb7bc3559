//! How the runtime confines itself: [`edgeward_confine`] (shared with the
//! key daemon), and the test seam that runs a simulated escape right
//! after it.

pub use edgeward_confine::*;

type Probe = fn();

static PROBE: std::sync::OnceLock<Probe> = std::sync::OnceLock::new();

/// Test seam: `probe` runs in the daemon's process right after it confines
/// itself (the tests' build registers a simulated escape; the shipped
/// binary registers nothing).
pub fn set_probe(probe: Probe) {
    let _ = PROBE.set(probe);
}

/// Runs the registered probe, if any.
pub fn run_probe() {
    if let Some(p) = PROBE.get() {
        p();
    }
}
