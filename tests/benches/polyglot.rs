//! Modules in other languages. Per toolchain (the Rust, Python and
//! JavaScript sensor samples, one reading each): `edgeward run`'s first
//! start (compiling), its cached start, and the peak RSS of each. Then the
//! daemon's peak RSS and time until every module is loaded, starting 10
//! cold Python modules (10 distinct components: the sample with a custom
//! section appended) against starting one, with the compile queue at its
//! default and unbounded. Prints `NAME ratio=X.XX` lines.
//!
//! The samples import `edgeward:host`, so `wasmtime run` cannot run them:
//! against `wasmtime run` (the CLI on PATH; `scripts/bench` installs the
//! lean one) the comparison uses a WASI-only program per toolchain, built
//! here with the toolchains `scripts/setup` installs (`tests/polyglot/
//! hello.py`, `hello.js`; for Rust the sandbox probe): first start without
//! a cache on both sides, cached start, peak RSS, runs alternating.
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench
//! polyglot`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeward_tests::bench::{alternating, measure_process, medians, which};
use edgeward_tests::guests;

const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");

fn run_cmd<'a>(state: &'a str, file: &'a str) -> Vec<&'a str> {
    vec![
        EDGEWARD,
        "--state-dir",
        state,
        "run",
        "--env",
        "COUNT=1",
        "--env",
        "INTERVAL_MS=1",
        file,
    ]
}

fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// `file` with a custom section appended: the same code, another digest.
fn variant(file: &str, i: usize, dir: &Path) -> String {
    let mut bytes = std::fs::read(file).expect("read the sample");
    let name = b"edgeward-bench";
    let payload = i.to_le_bytes();
    let mut body = Vec::new();
    leb128(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(&payload);
    bytes.push(0);
    leb128(body.len(), &mut bytes);
    bytes.extend_from_slice(&body);
    let path = dir.join(format!("py-sensor-{i}.wasm"));
    std::fs::write(&path, bytes).expect("write a variant");
    path.to_string_lossy().into_owned()
}

fn sha256(path: &str) -> String {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    let out = String::from_utf8_lossy(&o.stdout);
    format!("sha256:{}", out.split_whitespace().next().expect("hash"))
}

/// `VmHWM` of process `pid`, in KiB.
fn peak_rss(pid: u32) -> u64 {
    edgeward_tests::bench::proc_kib(&pid.to_string(), "status", "VmHWM:")
}

/// Starts a daemon on a fresh state dir with `files` as modules (each
/// takes one reading and exits), waits until every one has been loaded
/// and has run, and returns the time until all were loaded and the
/// daemon's peak RSS (KiB).
fn daemon_start(files: &[String], width: Option<u32>) -> (Duration, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = String::new();
    if let Some(w) = width {
        config.push_str(&format!("[runtime]\ncompile_concurrency = {w}\n\n"));
    }
    for (i, f) in files.iter().enumerate() {
        config.push_str(&format!(
            "[[module]]\nname = \"py{i}\"\nfile = \"{f}\"\ndigest = \"{}\"\nrestart = \"never\"\nenv = {{ COUNT = \"1\" }}\n\n",
            sha256(f)
        ));
    }
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("write the config");
    let began = Instant::now();
    let mut child = Command::new(EDGEWARD)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("daemon")
        .arg("--config")
        .arg(&path)
        .env("EDGEWARD_SOCKET", dir.path().join("api.sock"))
        .env_remove("EDGEWARD_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the daemon");
    let pid = child.id();
    let err = BufReader::new(child.stderr.take().expect("stderr"));
    let (mut loaded, mut exited, mut all_loaded) = (0, 0, Duration::ZERO);
    for line in err.lines() {
        let line = line.expect("read the daemon's log");
        if line.contains("module measured and loaded") {
            loaded += 1;
            if loaded == files.len() {
                all_loaded = began.elapsed();
            }
        }
        assert!(!line.contains("module refused"), "{line}");
        // restart = "never": each says so once it has exited.
        if line.contains("not restarting") {
            exited += 1;
        }
        if exited == files.len() {
            break;
        }
    }
    let peak = peak_rss(pid);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    (all_loaded, peak)
}

/// Builds the WASI-only programs into `dir`: (toolchain, component, args).
fn wasi_only(dir: &Path) -> Vec<(&'static str, String, Vec<&'static str>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let tools = root.join("target/toolchains");
    let wit = root.join("wit");
    let py = dir.join("hello-py.wasm");
    let o = Command::new(tools.join("python/bin/componentize-py"))
        .arg("-d")
        .arg(&wit)
        .args(["-w", "wasi:cli/command@0.2.12", "componentize", "-p"])
        .arg(root.join("tests/polyglot"))
        .arg("hello")
        .arg("-o")
        .arg(&py)
        .output()
        .expect("componentize-py (scripts/setup installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let js = dir.join("hello-js.wasm");
    // Without wasi:http, which the lean CLI does not link.
    let o = Command::new(tools.join("js/node_modules/.bin/componentize-js"))
        .arg("--wit")
        .arg(&wit)
        .args([
            "--world-name",
            "wasi:cli/command@0.2.12",
            "-d",
            "http",
            "fetch-event",
            "-o",
        ])
        .arg(&js)
        .arg(root.join("tests/polyglot/hello.js"))
        .output()
        .expect("componentize-js (scripts/setup installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    vec![
        ("rust", guests::SANDBOX_PROBE.to_owned(), vec!["args"]),
        ("python", py.to_string_lossy().into_owned(), vec![]),
        ("javascript", js.to_string_lossy().into_owned(), vec![]),
    ]
}

fn against_wasmtime() {
    let Some(wasmtime) = which("wasmtime") else {
        println!(
            "wasmtime_* skipped: no `wasmtime` CLI on PATH (scripts/bench installs the lean wasmtime-cli 48)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let state = state.to_str().expect("utf8");
    for (name, file, args) in wasi_only(dir.path()) {
        let mut ours_cold = vec![EDGEWARD, "--state-dir", state, "run", "--no-cache", &file];
        let mut base_cold = vec![wasmtime.as_str(), "run", "-C", "cache=n", &file];
        let mut ours = vec![EDGEWARD, "--state-dir", state, "run", &file];
        let mut base = vec![wasmtime.as_str(), "run", "-C", "cache=y", &file];
        if !args.is_empty() {
            ours_cold.push("--");
            ours.push("--");
        }
        for v in [&mut ours_cold, &mut base_cold, &mut ours, &mut base] {
            v.extend(&args);
        }
        let ((oc, ocm), (bc, bcm)) = alternating(3, &ours_cold, &base_cold);
        measure_process(&ours);
        measure_process(&base);
        let ((ow, owm), (bw, bwm)) = alternating(15, &ours, &base);
        println!(
            "{name} (WASI only): first start {:.0} vs {:.0} ms, {:.0} vs {:.0} MiB; cached start {:.1} vs {:.1} ms, {:.1} vs {:.1} MiB (edgeward vs wasmtime)",
            oc.as_secs_f64() * 1e3,
            bc.as_secs_f64() * 1e3,
            ocm as f64 / 1024.0,
            bcm as f64 / 1024.0,
            ow.as_secs_f64() * 1e3,
            bw.as_secs_f64() * 1e3,
            owm as f64 / 1024.0,
            bwm as f64 / 1024.0
        );
        println!(
            "wasmtime_{name}_first_start ratio={:.2}   (peak RSS {:.2})",
            oc.as_secs_f64() / bc.as_secs_f64(),
            ocm as f64 / bcm as f64
        );
        println!(
            "wasmtime_{name}_cached_start ratio={:.2}   (peak RSS {:.2})",
            ow.as_secs_f64() / bw.as_secs_f64(),
            owm as f64 / bwm as f64
        );
    }
}

fn main() {
    against_wasmtime();
    let samples = [
        ("rust", guests::TEMPERATURE_SENSOR),
        ("python", guests::PY_SENSOR),
        ("javascript", guests::JS_SENSOR),
    ];
    let mut cached_ms = Vec::new();
    for (name, file) in samples {
        let size = std::fs::metadata(file).expect("stat").len();
        let mut first: Vec<_> = (0..3)
            .map(|_| {
                let state = tempfile::tempdir().expect("tempdir");
                let st = state.path().to_str().expect("utf8").to_owned();
                measure_process(&run_cmd(&st, file))
            })
            .collect();
        let state = tempfile::tempdir().expect("tempdir");
        let st = state.path().to_str().expect("utf8").to_owned();
        measure_process(&run_cmd(&st, file));
        let mut cached: Vec<_> = (0..15)
            .map(|_| measure_process(&run_cmd(&st, file)))
            .collect();
        let (ft, fm) = medians(&mut first);
        let (ct, cm) = medians(&mut cached);
        println!(
            "{name}: {:.1} MB component; first start {:.0} ms, {:.0} MiB peak; cached start {:.1} ms, {:.1} MiB peak",
            size as f64 / 1e6,
            ft.as_secs_f64() * 1e3,
            fm as f64 / 1024.0,
            ct.as_secs_f64() * 1e3,
            cm as f64 / 1024.0
        );
        cached_ms.push((name, ct));
    }
    let rust = cached_ms[0].1.as_secs_f64();
    for (name, t) in &cached_ms[1..] {
        println!(
            "{name}_cached_start_vs_rust ratio={:.2}",
            t.as_secs_f64() / rust
        );
    }

    // The daemon, 10 cold Python modules against one.
    let dir = tempfile::tempdir().expect("tempdir");
    let files: Vec<String> = (0..10)
        .map(|i| variant(guests::PY_SENSOR, i, dir.path()))
        .collect();
    let (t1, m1) = daemon_start(&files[..1], None);
    let (t10, m10) = daemon_start(&files, None);
    let (tu, mu) = daemon_start(&files, Some(10));
    let width = edgeward::runtime::default_compile_concurrency();
    println!(
        "daemon, 1 cold python module: all loaded in {:.1} s, peak RSS {:.0} MiB",
        t1.as_secs_f64(),
        m1 as f64 / 1024.0
    );
    println!(
        "daemon, 10 cold python modules, compile_concurrency {width} (default here): all loaded in {:.1} s, peak RSS {:.0} MiB",
        t10.as_secs_f64(),
        m10 as f64 / 1024.0
    );
    println!(
        "daemon, 10 cold python modules, compile_concurrency 10: all loaded in {:.1} s, peak RSS {:.0} MiB",
        tu.as_secs_f64(),
        mu as f64 / 1024.0
    );
    println!(
        "daemon_peak_rss_10_vs_1 ratio={:.2}   (default queue; unbounded: {:.2})",
        m10 as f64 / m1 as f64,
        mu as f64 / m1 as f64
    );
}
