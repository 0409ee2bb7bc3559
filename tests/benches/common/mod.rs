//! What the latency benchmarks share: p50 and p99 of a call, after a
//! warm-up.

use std::time::{Duration, Instant};

/// A call's latency.
#[derive(Clone, Copy)]
pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
}

/// `f` run `n` times (after `n / 10 + 1` to warm up): its p50 and p99.
pub fn measure(n: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..n / 10 + 1 {
        f();
    }
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    Stats {
        p50: v[n / 2],
        p99: v[(n * 99 / 100).min(n - 1)],
    }
}

/// `d` in microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
