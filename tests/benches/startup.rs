//! Start-up benchmark: each edgeward figure against a bare-wasmtime baseline
//! measured in the same run, on the same component and engine. Prints
//! `NAME ratio=X.XX` lines (plus the absolute figures).
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench startup`).

use std::path::Path;
use std::time::{Duration, Instant};

use edgeward::measure::Measured;
use edgeward::runtime::{EngineOptions, Exit, Output, Runtime, RuntimeOptions, SandboxSpec};
use edgeward_tests::bench::{alternating, measure_process, which};
use edgeward_tests::guests;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

struct Bare {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Median of `n` timings of `f` (after `n / 10 + 1` warm-up runs).
fn median<F: FnMut() -> Duration>(n: usize, mut f: F) -> Duration {
    for _ in 0..n / 10 + 1 {
        f();
    }
    let mut v: Vec<Duration> = (0..n).map(|_| f()).collect();
    v.sort();
    v[n / 2]
}

/// Medians of `n` timings each of `a` and `b`, measured alternately so
/// that drift in the machine's speed affects both sides alike.
fn paired<A: FnMut() -> Duration, B: FnMut() -> Duration>(
    n: usize,
    mut a: A,
    mut b: B,
) -> (Duration, Duration) {
    for _ in 0..n / 10 + 1 {
        a();
        b();
    }
    let (mut va, mut vb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        va.push(a());
        vb.push(b());
    }
    va.sort();
    vb.sort();
    (va[n / 2], vb[n / 2])
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn report(name: &str, ours: Duration, base: Duration, target: f64) {
    let ratio = ours.as_secs_f64() / base.as_secs_f64();
    let verdict = if ratio <= target { "ok" } else { "OVER TARGET" };
    println!(
        "{name} ratio={ratio:.2}   (edgeward {:.1} µs, baseline {:.1} µs, target <= {target}: {verdict})",
        ours.as_secs_f64() * 1e6,
        base.as_secs_f64() * 1e6
    );
}

fn bare_pre(engine: &Engine, component: &Component) -> CommandPre<Bare> {
    let mut linker = Linker::<Bare>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("link wasi");
    CommandPre::new(linker.instantiate_pre(component).expect("pre")).expect("command")
}

async fn bare_run(engine: &Engine, pre: &CommandPre<Bare>) {
    let mut store = Store::new(
        engine,
        Bare {
            ctx: WasiCtx::builder().arg("probe").arg("args").build(),
            table: ResourceTable::new(),
        },
    );
    store.set_epoch_deadline(u64::MAX / 2);
    let cmd = pre
        .instantiate_async(&mut store)
        .await
        .expect("instantiate");
    cmd.wasi_cli_run()
        .call_run(&mut store)
        .await
        .expect("run")
        .expect("success");
}

fn main() {
    let component_path = guests::SANDBOX_PROBE;
    let state = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let runtime = Runtime::new(&RuntimeOptions {
        engine: EngineOptions {
            max_instances: 4,
            ceilings: Default::default(),
            max_memory: 64 << 20,
            pooling: None,
            max_wasm_stack: edgeward::runtime::engine::DEFAULT_MAX_WASM_STACK,
        },
        state_dir: Some(state.path().to_owned()),
        cache_key: edgeward::runtime::cache::CacheKey::StateDir,
    })
    .expect("runtime");
    let engine = runtime.engine().clone();
    println!("component: {component_path}");
    println!("allocator: {:?}", runtime.allocator());

    // --- warm start -------------------------------------------------------
    let module = runtime
        .load_file(Path::new(component_path), None)
        .expect("load");
    let mut spec = SandboxSpec::new("probe");
    spec.args.push("args".into());
    spec.output = Output::Discard;
    let component =
        Component::new(&engine, std::fs::read(component_path).expect("read")).expect("compile");
    let pre = bare_pre(&engine, &component);
    let n = 2000;
    let (ours, base) = paired(
        n,
        || {
            timed(|| {
                let exit = rt.block_on(runtime.start(&module, &spec, None));
                assert_eq!(exit, Exit::Success);
            })
        },
        || timed(|| rt.block_on(bare_run(&engine, &pre))),
    );
    report("warm_start", ours, base, 1.5);

    // --- first start: measure + compile + cache write ----------------------
    let entry = runtime.cache().expect("cache").entry_path(
        &Measured::read(Path::new(component_path))
            .expect("measure")
            .digest,
    );
    let n = 15;
    let bytes = std::fs::read(component_path).expect("read");
    let (ours, base) = paired(
        n,
        || {
            let _ = std::fs::remove_file(&entry);
            timed(|| {
                runtime
                    .load_file(Path::new(component_path), None)
                    .expect("load");
            })
        },
        || {
            timed(|| {
                Component::new(&engine, &bytes).expect("compile");
            })
        },
    );
    report("first_start", ours, base, 1.2);

    // --- cache load: MAC check + deserialize ------------------------------
    runtime
        .load_file(Path::new(component_path), None)
        .expect("populate cache");
    let digest = Measured::read(Path::new(component_path))
        .expect("measure")
        .digest;
    let serialized = state.path().join("bare.cwasm");
    std::fs::write(&serialized, component.serialize().expect("serialize")).expect("write");
    let n = 500;
    // Baseline: the same file read and deserialized without the MAC check.
    let (ours, base) = paired(
        n,
        || {
            timed(|| {
                let hit = runtime.cache().expect("cache").load(&engine, &digest);
                assert!(matches!(hit, edgeward::runtime::Lookup::Hit(..)));
            })
        },
        || {
            timed(|| {
                let bytes = std::fs::read(&serialized).expect("read");
                // SAFETY: the file was written just above by `serialize` on
                // this engine.
                #[allow(unsafe_code)]
                unsafe { Component::deserialize(&engine, &bytes) }.expect("deserialize");
            })
        },
    );
    // For reference: wasmtime's zero-copy path, which maps the file itself
    // and so cannot authenticate what it maps.
    let mapped = median(n, || {
        timed(|| {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            unsafe { Component::deserialize_file(&engine, &serialized) }.expect("deserialize");
        })
    });
    let mac_only = median(n, || {
        let bytes = std::fs::read(&serialized).expect("read");
        timed(|| {
            let mut m = blake3::Hasher::new_keyed(&[7u8; 32]);
            m.update(&bytes);
            std::hint::black_box(m.finalize());
        })
    });
    println!(
        "cache_load detail: {} KiB entry; BLAKE3 of it alone (the one pass a load makes) {:.1} µs; deserialize_file (unauthenticated mmap) {:.1} µs, ratio to it {:.2}",
        std::fs::metadata(&serialized).expect("meta").len() / 1024,
        mac_only.as_secs_f64() * 1e6,
        mapped.as_secs_f64() * 1e6,
        ours.as_secs_f64() / mapped.as_secs_f64()
    );
    report("cache_load", ours, base, 1.3);

    // --- whole process: edgeward run vs wasmtime run ------------------------
    process_comparison(component_path, state.path());
}

fn process_comparison(component: &str, state: &Path) {
    let edgeward = env!("CARGO_BIN_EXE_edgeward-under-test");
    let Some(wasmtime) = which("wasmtime") else {
        println!(
            "process_* skipped: no `wasmtime` CLI on PATH (scripts/bench installs wasmtime-cli 48)"
        );
        return;
    };
    let state = state.join("process");
    let state = state.to_str().expect("utf8");
    let ours_cmd = [
        edgeward,
        "--state-dir",
        state,
        "run",
        component,
        "--",
        "args",
    ];
    let base_cmd = [wasmtime.as_str(), "run", "-C", "cache=y", component, "args"];
    // Warm both caches.
    measure_process(&ours_cmd);
    measure_process(&base_cmd);
    let ((ot, om), (bt, bm)) = alternating(15, &ours_cmd, &base_cmd);
    report(
        "process_wall",
        ot.max(Duration::from_millis(1)),
        bt.max(Duration::from_millis(1)),
        1.2,
    );
    println!(
        "process_peak_rss ratio={:.2}   (edgeward {om} KiB, wasmtime {bm} KiB, target <= 1.2)",
        om as f64 / bm as f64
    );
}
