//! What a module uses, counted while it runs, for the daemon's metrics
//! (`GET /v1/metrics`): CPU time, linear memory, handles, disk, output and
//! workload calls. Counting is a relaxed atomic add on paths the module
//! already takes; nothing here allocates per call or takes a lock a module
//! can contend on (the disk budgets are read only when scraped).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::disk::DiskBudget;

/// The workload calls, by their WIT names, in [`ModuleMeter::calls`] order.
pub const WORKLOAD_CALLS: [&str; 9] = [
    "whoami",
    "token",
    "validate-token",
    "identity-certificate",
    "server-certificate",
    "trust-bundle",
    "sign",
    "encrypt",
    "decrypt",
];

/// A workload call (index into [`WORKLOAD_CALLS`]).
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Call {
    /// `whoami`
    Whoami,
    /// `token`
    Token,
    /// `validate-token`
    ValidateToken,
    /// `identity-certificate`
    IdentityCertificate,
    /// `server-certificate`
    ServerCertificate,
    /// `trust-bundle`
    TrustBundle,
    /// `sign`
    Sign,
    /// `encrypt`
    Encrypt,
    /// `decrypt`
    Decrypt,
}

/// Exit outcomes, as exit records name them, in [`ModuleMeter::exits`]
/// order.
pub const EXIT_KINDS: [&str; 5] = ["success", "failure", "trap", "timeout", "setup-failed"];

/// One module's counters. Shared by its starts (a restart carries on
/// counting) and read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct ModuleMeter {
    starts: AtomicU64,
    cpu_ns: AtomicU64,
    memory: AtomicU64,
    handles: AtomicU64,
    output_bytes: AtomicU64,
    output_lines: AtomicU64,
    exits: [AtomicU64; EXIT_KINDS.len()],
    calls: [AtomicU64; WORKLOAD_CALLS.len()],
    disks: Mutex<Vec<Arc<DiskBudget>>>,
}

/// A reading of a [`ModuleMeter`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// Starts counted by this meter.
    pub starts: u64,
    /// CPU time its code (and the host calls answered inline) took.
    pub cpu: Duration,
    /// Bytes of linear memory its running instance holds (0 when not
    /// running).
    pub memory: u64,
    /// Handles its running instance held when last sampled (0 when not
    /// running).
    pub handles: u64,
    /// Bytes its budgeted directories hold.
    pub disk: u64,
    /// Bytes and lines it wrote to stdout and stderr.
    pub output_bytes: u64,
    /// Lines (a final line without a newline counts when flushed).
    pub output_lines: u64,
    /// Exits by kind ([`EXIT_KINDS`] order).
    pub exits: [u64; EXIT_KINDS.len()],
    /// Workload calls by operation ([`WORKLOAD_CALLS`] order).
    pub calls: [u64; WORKLOAD_CALLS.len()],
}

impl ModuleMeter {
    /// Adds CPU time.
    pub fn add_cpu(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.cpu_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A start.
    pub fn started(&self) {
        self.starts.fetch_add(1, Ordering::Relaxed);
    }

    /// An instance's linear memory grew (or, negative, was let go). Each
    /// instance adds and takes back its own share, so an old instance
    /// that ends after its replacement started does not zero the new
    /// one's.
    pub fn add_memory(&self, delta: i64) {
        add_signed(&self.memory, delta);
    }

    /// An instance's handle count changed by `delta`.
    pub fn add_handles(&self, delta: i64) {
        add_signed(&self.handles, delta);
    }

    /// Output written.
    pub fn add_output(&self, bytes: u64, lines: u64) {
        self.output_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.output_lines.fetch_add(lines, Ordering::Relaxed);
    }

    /// A workload call.
    pub fn call(&self, call: Call) {
        self.calls[call as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An exit, by its record's outcome (an unknown one is not counted).
    pub fn exited(&self, outcome: &str) {
        if let Some(i) = EXIT_KINDS.iter().position(|k| *k == outcome) {
            self.exits[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The budgets of the running instance's directories (replacing the
    /// previous start's).
    pub fn set_disks(&self, budgets: Vec<Arc<DiskBudget>>) {
        if let Ok(mut d) = self.disks.lock() {
            *d = budgets;
        }
    }

    /// The counters now.
    pub fn read(&self) -> Reading {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let disk = self.disks.lock().map_or(0, |d| {
            d.iter()
                .map(|b| b.usage().0)
                .fold(0u64, u64::saturating_add)
        });
        Reading {
            starts: load(&self.starts),
            cpu: Duration::from_nanos(load(&self.cpu_ns)),
            memory: load(&self.memory),
            handles: load(&self.handles),
            disk,
            output_bytes: load(&self.output_bytes),
            output_lines: load(&self.output_lines),
            exits: std::array::from_fn(|i| load(&self.exits[i])),
            calls: std::array::from_fn(|i| load(&self.calls[i])),
        }
    }
}

/// Adds `delta` to a gauge, never below zero.
fn add_signed(gauge: &AtomicU64, delta: i64) {
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(if delta >= 0 {
            v.saturating_add(delta.unsigned_abs())
        } else {
            v.saturating_sub(delta.unsigned_abs())
        })
    });
}

/// The runtime's own counters, for the whole process.
#[derive(Debug)]
pub struct RuntimeCounters {
    /// Compilations running now.
    pub compiling: AtomicU64,
    /// Loads waiting for a place in the compile queue.
    pub compile_waiting: AtomicU64,
    /// Compilations done (successful or not).
    pub compiles: AtomicU64,
    /// Loads answered by the compiled-artifact cache.
    pub cache_hits: AtomicU64,
    /// Loads the cache could not answer (compiled instead).
    pub cache_misses: AtomicU64,
    /// Cache entries refused (failed authentication or did not fit).
    pub cache_rejected: AtomicU64,
}

/// This process's [`RuntimeCounters`].
pub static RUNTIME: RuntimeCounters = RuntimeCounters {
    compiling: AtomicU64::new(0),
    compile_waiting: AtomicU64::new(0),
    compiles: AtomicU64::new(0),
    cache_hits: AtomicU64::new(0),
    cache_misses: AtomicU64::new(0),
    cache_rejected: AtomicU64::new(0),
};

/// Adds one to `counter`.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// This thread's CPU time so far (zero if the clock cannot be read).
pub fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_reads_back() {
        let m = ModuleMeter::default();
        m.add_cpu(Duration::from_millis(3));
        m.add_cpu(Duration::from_millis(4));
        m.started();
        m.add_memory(65536);
        m.add_memory(65536);
        m.add_handles(7);
        m.add_output(10, 2);
        m.call(Call::Sign);
        m.call(Call::Sign);
        m.call(Call::Decrypt);
        m.exited("trap");
        m.exited("no-such-kind");
        let r = m.read();
        assert_eq!(r.cpu, Duration::from_millis(7));
        assert_eq!((r.starts, r.memory, r.handles), (1, 131072, 7));
        assert_eq!((r.output_bytes, r.output_lines), (10, 2));
        assert_eq!(r.calls[Call::Sign as usize], 2);
        assert_eq!(r.calls[Call::Decrypt as usize], 1);
        assert_eq!(WORKLOAD_CALLS[Call::Decrypt as usize], "decrypt");
        assert_eq!(
            WORKLOAD_CALLS[Call::ValidateToken as usize],
            "validate-token"
        );
        assert_eq!(r.exits, [0, 0, 1, 0, 0]);
        m.add_memory(-131072);
        m.add_handles(-7);
        assert_eq!((m.read().memory, m.read().handles), (0, 0));
        m.add_handles(-1);
        assert_eq!(m.read().handles, 0, "never below zero");
    }

    #[test]
    fn the_thread_clock_moves_with_work() {
        let t0 = thread_cpu();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu() > t0, "{x}");
    }
}
