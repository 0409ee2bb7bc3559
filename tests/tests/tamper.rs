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
        cache_key: edgeward::runtime::cache::CacheKey::StateDir,
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
                Lookup::Hit(..) => panic!("seed {seed}: a {how} cache entry was loaded"),
                Lookup::Miss => panic!("seed {seed}: a {how} cache entry was not even seen"),
                Lookup::Unfit(e) => {
                    panic!("seed {seed}: a {how} cache entry was deserialized: {e}")
                }
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

/// The cache key wrapped by an HSM (as on TPM and PKCS#11; the soft HSM
/// stands in here, the daemon test in attest.rs uses swtpm): a clear
/// `cache.key` someone planted or left is deleted and not used, entries
/// MAC'd under it are refused; a wrapped key that does not unwrap is
/// replaced; a locked cache neither loads nor stores.
#[test]
fn a_wrapped_cache_key_ignores_a_planted_clear_one() {
    use edgeward::runtime::cache::CacheKey;
    let s = Scratch::new();
    let file = s.command_component(
        "small.wasm",
        r#"(func (export "run") (result i32) (i32.const 0))"#,
    );
    let file = Path::new(&file).to_owned();
    let pinned = Measured::read(&file).unwrap().digest;
    let runtime = |key: CacheKey| {
        Runtime::new(&RuntimeOptions {
            engine: EngineOptions {
                max_instances: 1,
                ceilings: Default::default(),
                max_memory: 16 << 20,
                pooling: Some(false),
                max_wasm_stack: DEFAULT_MAX_WASM_STACK,
            },
            state_dir: Some(s.state()),
            cache_key: key,
        })
        .unwrap()
    };
    // An entry made under a clear key (an attacker's, or from before).
    let clear = runtime(CacheKey::StateDir);
    clear.load_file(&file, Some(&pinned)).unwrap();
    assert!(s.state().join("cache.key").exists());
    let entry = clear.cache().unwrap().entry_path(&pinned);
    assert!(entry.exists());

    let hsm_dir = tempfile::tempdir().unwrap();
    let hsm = edgeward::hsm::soft::SoftHsm::open(hsm_dir.path()).unwrap();
    let wrapped = runtime(CacheKey::Hsm);
    let cache = wrapped.cache().unwrap();
    // Locked: no lookups, no stores.
    assert!(matches!(
        cache.load(wrapped.engine(), &pinned),
        Lookup::Miss
    ));
    cache.unlock(&hsm).unwrap();
    assert!(
        !s.state().join("cache.key").exists(),
        "the clear key is removed"
    );
    let sealed = std::fs::read(s.state().join("cache.key.wrapped")).unwrap();
    assert_ne!(
        sealed.len(),
        32,
        "the key is stored wrapped, not in the clear"
    );
    assert!(
        matches!(cache.load(wrapped.engine(), &pinned), Lookup::Rejected(_)),
        "an entry MAC'd under the clear key is refused"
    );
    let m = wrapped.load_file(&file, Some(&pinned)).unwrap();
    assert!(matches!(m.source, edgeward::runtime::CodeSource::Compiled));
    // Another process unwraps the same key: a hit.
    let again = runtime(CacheKey::Hsm);
    again.cache().unwrap().unlock(&hsm).unwrap();
    let m = again.load_file(&file, Some(&pinned)).unwrap();
    assert!(matches!(m.source, edgeward::runtime::CodeSource::Cache(_)));
    // A planted clear key next to the wrapped one changes nothing.
    std::fs::write(s.state().join("cache.key"), [7u8; 32]).unwrap();
    let planted = runtime(CacheKey::Hsm);
    planted.cache().unwrap().unlock(&hsm).unwrap();
    assert!(!s.state().join("cache.key").exists());
    let m = planted.load_file(&file, Some(&pinned)).unwrap();
    assert!(matches!(m.source, edgeward::runtime::CodeSource::Cache(_)));
    // A wrapped key altered on disk does not unwrap: a new key, the
    // entries rebuilt.
    let mut bad = sealed.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(s.state().join("cache.key.wrapped"), bad).unwrap();
    let replaced = runtime(CacheKey::Hsm);
    replaced.cache().unwrap().unlock(&hsm).unwrap();
    let m = replaced.load_file(&file, Some(&pinned)).unwrap();
    assert!(
        matches!(m.source, edgeward::runtime::CodeSource::Recompiled(_)),
        "{:?}",
        m.source
    );
}
