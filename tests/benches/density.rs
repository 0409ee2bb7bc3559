//! Density benchmark: N long-running modules that each wake once a second
//! (sleeping on `wasi:clocks`), for N = 1,000 and 5,000, run the edgeward
//! way (`Runtime::start`: sandbox, limiter, epoch yielding, data-dir
//! preopen) and, as the baseline, by a bare wasmtime host (one `Store` per
//! module, same engine settings, the same preopen). Each side runs in its
//! own child process so RSS and CPU are its own. Prints time to start all N,
//! RSS per module and CPU while idle, each with its ratio to the bare host.
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench density`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edgeward::runtime::engine::{self, DEFAULT_MAX_WASM_STACK, EngineOptions};
use edgeward::runtime::{DirGrant, Output, Runtime, RuntimeOptions, SandboxSpec};
use edgeward_tests::bench::{cpu_ticks, proc_kib};
use edgeward_tests::guests;
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

const SETTLE: Duration = Duration::from_secs(3);
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// How often the scraped run renders its metrics.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(5);

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

fn rss_kib() -> u64 {
    proc_kib("self", "status", "VmRSS:")
}

fn engine_options(n: u32) -> EngineOptions {
    EngineOptions {
        max_instances: n,
        ceilings: Default::default(),
        max_memory: 64 << 20,
        pooling: None,
        max_wasm_stack: DEFAULT_MAX_WASM_STACK,
    }
}

/// Runs in the child: start `n` modules, report, idle, report.
fn child(mode: &str, n: usize) {
    edgeward::daemon::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let data = tempfile::tempdir().expect("tempdir");
    let started = Arc::new(AtomicUsize::new(0));
    let before = rss_kib();
    let t0;
    match mode {
        "edgeward" | "scraped" => {
            let runtime = Arc::new(
                Runtime::new(&RuntimeOptions {
                    engine: engine_options(n as u32),
                    state_dir: None,
                    cache_key: edgeward::runtime::cache::CacheKey::StateDir,
                })
                .expect("runtime"),
            );
            let module = Arc::new(
                runtime
                    .load_file(Path::new(guests::SANDBOX_PROBE), None)
                    .expect("load"),
            );
            let mut spec = SandboxSpec::new("ticker");
            spec.args.push("tick".into());
            spec.dirs.push(DirGrant {
                host: data.path().to_owned(),
                guest: "/data".into(),
                budgeted: true,
                read_only: false,
            });
            spec.output = Output::Discard;
            let spec = Arc::new(spec);
            t0 = Instant::now();
            for i in 0..n {
                let spec = if mode == "scraped" {
                    // Each module its own meter, as the daemon registers them.
                    let mut own = (*spec).clone();
                    own.meter = edgeward::daemon::metrics::meter(&format!("m{i}"));
                    Arc::new(own)
                } else {
                    spec.clone()
                };
                let (runtime, module, started) = (runtime.clone(), module.clone(), started.clone());
                rt.spawn(async move {
                    let exit = runtime
                        .start_with(&module, &spec, None, || {
                            started.fetch_add(1, Ordering::Relaxed);
                        })
                        .await;
                    eprintln!("module ended: {exit}");
                });
            }
            wait_started(&started, n, t0, mode);
            if mode == "scraped" {
                scraper(n);
            }
            report(mode, n, t0, before);
            std::mem::forget(runtime);
        }
        _ => {
            let (engine, _) = engine::build(&engine_options(n as u32)).expect("engine");
            let _ticker = engine::EpochTicker::start(&engine).expect("ticker");
            let component = Component::from_file(&engine, guests::SANDBOX_PROBE).expect("compile");
            let mut linker = Linker::<Bare>::new(&engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("link");
            let pre =
                CommandPre::new(linker.instantiate_pre(&component).expect("pre")).expect("command");
            t0 = Instant::now();
            for _ in 0..n {
                let (engine, pre, started) = (engine.clone(), pre.clone(), started.clone());
                let dir = data.path().to_owned();
                rt.spawn(async move {
                    let mut b = WasiCtx::builder();
                    b.args(&["ticker", "tick"]);
                    b.preopened_dir(&dir, "/data", FsPerms::ReadWrite)
                        .expect("preopen");
                    let mut store = Store::new(
                        &engine,
                        Bare {
                            ctx: b.build(),
                            table: ResourceTable::new(),
                        },
                    );
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_callback(|_| Ok(wasmtime::UpdateDeadline::Yield(1)));
                    let cmd = pre
                        .instantiate_async(&mut store)
                        .await
                        .expect("instantiate");
                    started.fetch_add(1, Ordering::Relaxed);
                    let _ = cmd.wasi_cli_run().call_run(&mut store).await;
                    eprintln!("module ended");
                });
            }
            wait_started(&started, n, t0, mode);
            report(mode, n, t0, before);
        }
    }
    std::process::exit(0);
}

/// Renders every module's metrics now (timed, printed) and then every
/// [`SCRAPE_INTERVAL`] on a thread of its own, as a Prometheus scraping the
/// daemon would make it.
fn scraper(n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let render = move || {
        edgeward::daemon::metrics::render_named(names.clone(), "bench", Duration::ZERO, |_| {
            Some("running".to_owned())
        })
    };
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let t = Instant::now();
        size = render().len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("SCRAPE n={n} ms={:.1} bytes={size}", times[times.len() / 2]);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(SCRAPE_INTERVAL);
            std::hint::black_box(render());
        }
    });
}

fn wait_started(started: &AtomicUsize, n: usize, t0: Instant, mode: &str) {
    while started.load(Ordering::Relaxed) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{mode}: only {} of {n} started",
            started.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn report(mode: &str, n: usize, t0: Instant, before: u64) {
    let start_ms = t0.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(SETTLE);
    let rss = rss_kib().saturating_sub(before);
    let hz = 100.0; // USER_HZ on Linux
    let c0 = cpu_ticks("self");
    let w0 = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let cpu_pct = (cpu_ticks("self") - c0) as f64 / hz / w0.elapsed().as_secs_f64() * 100.0;
    println!("RESULT mode={mode} n={n} start_ms={start_ms:.1} rss_kib={rss} cpu_pct={cpu_pct:.2}");
}

struct Figures {
    start_ms: f64,
    rss_kib: f64,
    cpu_pct: f64,
    /// One render of every module's metrics (the scraped mode).
    scrape_ms: f64,
    scrape_bytes: f64,
}

fn run_child(mode: &str, n: usize) -> Figures {
    let exe = std::env::current_exe().expect("exe");
    let out = std::process::Command::new(exe)
        .args(["--child", mode, &n.to_string()])
        .output()
        .expect("spawn child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| {
            panic!(
                "{mode} n={n} gave no result: {}\n{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let scrape = text.lines().find(|l| l.starts_with("SCRAPE")).unwrap_or("");
    let field_of = |line: &str, k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let field = |k: &str| field_of(line, k);
    Figures {
        start_ms: field("start_ms"),
        rss_kib: field("rss_kib"),
        cpu_pct: field("cpu_pct"),
        scrape_ms: field_of(scrape, "ms"),
        scrape_bytes: field_of(scrape, "bytes"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let mode = args.get(i + 1).expect("mode").clone();
        let n: usize = args.get(i + 2).and_then(|n| n.parse().ok()).expect("n");
        child(&mode, n);
        return;
    }
    for n in [1000usize, 5000] {
        let ours = run_child("edgeward", n);
        let bare = run_child("bare", n);
        let per = |f: &Figures| f.rss_kib / n as f64;
        println!(
            "density_n{n}_start ratio={:.2}   (edgeward {:.0} ms, bare {:.0} ms to start all {n})",
            ours.start_ms / bare.start_ms,
            ours.start_ms,
            bare.start_ms
        );
        println!(
            "density_n{n}_rss_per_module ratio={:.2}   (edgeward {:.1} KiB, bare {:.1} KiB; target <= 1.5)",
            per(&ours) / per(&bare),
            per(&ours),
            per(&bare)
        );
        println!(
            "density_n{n}_idle_cpu ratio={:.2}   (edgeward {:.1} %, bare {:.1} % of one core; target <= 1.5)",
            ours.cpu_pct / bare.cpu_pct,
            ours.cpu_pct,
            bare.cpu_pct
        );
        if n == 5000 {
            // The cost of metrics: the same run with every module's
            // metrics rendered every 5 s, against none.
            let scraped = run_child("scraped", n);
            println!(
                "metrics_n{n}_rss ratio={:.3}   (scraped every 5 s {:.0} KiB, none {:.0} KiB; target <= 1.05)",
                scraped.rss_kib / ours.rss_kib,
                scraped.rss_kib,
                ours.rss_kib
            );
            println!(
                "metrics_n{n}_idle_cpu ratio={:.3}   (scraped every 5 s {:.2} %, none {:.2} % of one core; target <= 1.05)",
                scraped.cpu_pct / ours.cpu_pct,
                scraped.cpu_pct,
                ours.cpu_pct
            );
            println!(
                "metrics_n{n}_scrape ms={:.1}   ({:.0} KiB of text for {n} modules; target < 100 ms)",
                scraped.scrape_ms,
                scraped.scrape_bytes / 1024.0
            );
        }
    }
}
