//! The tamper campaign: 1,000 random single-byte flips and truncations of a
//! small component's file and of its compiled-cache entry. A tampered
//! component is refused (its digest is not the pinned one); a tampered cache
//! entry is refused, removed and the pinned bytes recompiled. Nothing but
//! the pinned bytes ever runs. Prints the counts and the seed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use edgeward::measure::{Digest, Measured};
use edgeward::runtime::cache::Lookup;
use edgeward::runtime::engine::{DEFAULT_MAX_WASM_STACK, EngineOptions};
use edgeward::runtime::{Exit, Output, Runtime, RuntimeOptions, SandboxSpec};

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A single-byte flip (to a different value) or a truncation.
fn tamper(rng: &mut Rng, good: &[u8]) -> (Vec<u8>, &'static str) {
    let mut b = good.to_vec();
    if rng.below(4) == 0 {
        b.truncate(rng.below(good.len()));
        (b, "truncated")
    } else {
        let i = rng.below(b.len());
        b[i] ^= 1 + rng.below(255) as u8;
        (b, "flipped")
    }
}

async fn runs(rt: &Runtime, file: &Path, pinned: &Digest) -> bool {
    let m = rt.load_file(file, Some(pinned)).unwrap();
    assert_eq!(m.digest, *pinned, "only the pinned bytes are loaded");
    let mut spec = SandboxSpec::new("tamper");
    spec.output = Output::Inherit;
    matches!(rt.start(&m, &spec, None).await, Exit::Success)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tampers_never_run_anything_but_the_pinned_bytes() {
    let s = Scratch::new();
    let file = s.command_component(
        "small.wasm",
        r#"(func (export "run") (result i32) (i32.const 0))"#,
    );
    let good = std::fs::read(&file).unwrap();
    let file = Path::new(&file).to_owned();
    let pinned = Measured::read(&file).unwrap().digest;
    let rt = Runtime::new(&RuntimeOptions {
        engine: EngineOptions {
            max_instances: 2,
            ceilings: Default::default(),
            max_memory: 16 << 20,
            pooling: Some(false),
            max_wasm_stack: DEFAULT_MAX_WASM_STACK,
        },
        state_dir: Some(s.state()),
    })
    .unwrap();
    assert!(runs(&rt, &file, &pinned).await);
    let cache = rt.cache().unwrap();
    let entry = cache.entry_path(&pinned);
    let mut entry_good = std::fs::read(&entry).unwrap();

    let seed = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        u64::from_le_bytes(b) | 1
    };
    let mut rng = Rng(seed);
    let tampered_file = s.path().join("tampered.wasm");
    let (mut components, mut entries, mut recompiled) = (0u32, 0u32, 0u32);
    for i in 0..1000 {
        if i % 2 == 0 {
            let (bytes, how) = tamper(&mut rng, &good);
            std::fs::write(&tampered_file, &bytes).unwrap();
            match rt.load_file(&tampered_file, Some(&pinned)) {
                Ok(_) => panic!("seed {seed}: a {how} component was loaded"),
                Err(e) => assert!(format!("{e:#}").contains("digest"), "{e:#}"),
            }
            components += 1;
        } else {
            let (bytes, how) = tamper(&mut rng, &entry_good);
            std::fs::write(&entry, &bytes).unwrap();
            match cache.load(rt.engine(), &pinned) {
                Lookup::Rejected(_) => {}
                Lookup::Hit(_) => panic!("seed {seed}: a {how} cache entry was loaded"),
                Lookup::Miss => panic!("seed {seed}: a {how} cache entry was not even seen"),
            }
            assert!(!entry.exists(), "a refused entry is removed");
            entries += 1;
            if i % 50 == 1 {
                // Tamper again and load for real: refused, recompiled from
                // the pinned bytes, and what runs is those.
                std::fs::write(&entry, tamper(&mut rng, &entry_good).0).unwrap();
                let m = rt.load_file(&file, Some(&pinned)).unwrap();
                assert!(
                    matches!(m.source, edgeward::runtime::CodeSource::Recompiled(_)),
                    "seed {seed}: {:?}",
                    m.source
                );
                assert!(runs(&rt, &file, &pinned).await);
                recompiled += 1;
                entry_good = std::fs::read(&entry).unwrap();
            } else {
                std::fs::write(&entry, &entry_good).unwrap();
            }
        }
    }
    println!(
        "tamper campaign (seed {seed}): {components} tampered components refused, {entries} tampered cache entries refused and removed, {recompiled} of them recompiled from the pinned bytes and run; 0 ran anything else"
    );
    assert_eq!(components + entries, 1000);
}
