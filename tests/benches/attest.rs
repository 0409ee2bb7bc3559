//! What measuring costs, each against a baseline in the same run:
//!
//! - **re-measurement throughput**: reading and hashing a file as the
//!   watchdog does (`Digest::of_file`), in MB/s, against `openssl dgst
//!   -sha256` on the same file (target ≥ 0.9×); a 64 MiB file and the
//!   sample sensor;
//! - **watchdog share**: one integrity round over 100 running modules of
//!   100 distinct components (the probe with a custom section of its own
//!   each) (`Supervisor::audit`), as a share of the default 5 min interval;
//! - **daemon start-up, measuring on vs off** (soft backend, the release
//!   binary, one module, compiled cache warm): process start until the
//!   management socket answers (target ≤ 1.1×), and until the module runs,
//!   which waits for the binary's own hash and the configuration to be
//!   measured, with `[runtime] measure = true` against `false`; and the
//!   same through the measured launcher (`edgeward-keyd --launch`: the key
//!   daemon opens the HSM, hashes itself, the runtime's executable and
//!   configuration, then starts the runtime, as its own user when run as
//!   root) against the runtime started unmeasured; and what the measured
//!   launch costs besides the runtime's hash against the same launch told
//!   `--no-measure` (#22: <= 1.1x);
//! - **attest and attest verify latency**, soft and TPM (swtpm): the
//!   process `edgeward attest --nonce N --out DIR`, then `edgeward attest
//!   verify`, against the same process's floor (`edgeward --version`) and,
//!   on the TPM, tpm2-tools doing the comparable work (`tpm2_quote` with a
//!   loaded AK, then `tpm2_checkquote`).
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench
//! attest`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeward_tests::guests;

const ROUNDS: usize = 15;
const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// MB/s of `Measured::read` and of `openssl dgst -sha256` on `path`.
fn throughput(path: &Path) -> (f64, f64) {
    let mb = std::fs::metadata(path).expect("size").len() as f64 / 1e6;
    let (mut ours, mut openssl) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let d = edgeward::measure::Digest::of_file(path).expect("read");
        std::hint::black_box(d);
        ours.push(mb / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let o = Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(path)
            .output()
            .expect("openssl (scripts/setup installs it)");
        assert!(o.status.success());
        openssl.push(mb / t.elapsed().as_secs_f64());
    }
    (median(ours), median(openssl))
}

/// One GET on the daemon's socket: the response, or "" if it does not
/// answer yet.
fn get(sock: &Path, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut c) = std::os::unix::net::UnixStream::connect(sock) else {
        return String::new();
    };
    let _ = write!(
        c,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// How a start is measured.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Measured {
    Off,
    /// `[runtime] measure = true`: the runtime hashes itself.
    On,
    /// The key daemon launches the runtime, measured before it runs.
    Launched,
    /// The key daemon launches the runtime, neither measured
    /// (`--no-measure`, `[runtime] measure = false`).
    LaunchedOff,
}

/// The uid a launched runtime runs as when the bench runs as root.
const RUNTIME_UID: u32 = 64998;

/// A daemon start with one module: (ms until the management socket
/// answers, ms until the module runs). The state dir is kept across rounds
/// (its compiled cache warm; the log continues within the boot).
///
/// A launch also returns the two hashes the key daemon timed in it (its
/// own, the runtime's; zero when it was told not to hash), from its log.
fn startup(dir: &Path, how: Measured, round: usize) -> (f64, f64, [f64; 2]) {
    let measure = matches!(how, Measured::On | Measured::Launched);
    let state = dir.join(format!("state-{how:?}"));
    let run = dir.join(format!("run-{how:?}"));
    std::fs::create_dir_all(&run).expect("run dir");
    let sock = run.join(format!("s-{round}.sock"));
    let config = dir.join(format!("c-{how:?}.toml"));
    let probe = guests::SANDBOX_PROBE;
    std::fs::write(
        &config,
        format!(
            "[runtime]\nmeasure = {measure}\n\n[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
            edgeward::measure::Digest::of(&std::fs::read(probe).expect("probe"))
        ),
    )
    .expect("config");
    let boot = dir.join("boot_id");
    let mut cmd = if how == Measured::Launched {
        launcher(dir, &state, &run, &[])
    } else if how == Measured::LaunchedOff {
        launcher(dir, &state, &run, &["--no-measure"])
    } else {
        Command::new(EDGEWARD)
    };
    let launched = matches!(how, Measured::Launched | Measured::LaunchedOff);
    let t = Instant::now();
    let mut child = cmd
        .arg("--state-dir")
        .arg(&state)
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .env("EDGEWARD_SOCKET", &sock)
        .env("EDGEWARD_BOOT_ID_FILE", &boot)
        // A launching key daemon logs its hashes' times at info (the
        // runtime it launches logs at the same level, measured or not).
        .env("EDGEWARD_LOG", if launched { "info" } else { "warn" })
        .stdout(Stdio::null())
        .stderr(if launched {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("daemon");
    let log = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut hashes = [0.0; 2];
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let slot = if line.contains("the key daemon measured itself") {
                    0
                } else if line.contains("the runtime's executable measured") {
                    1
                } else {
                    continue;
                };
                hashes[slot] = line
                    .split("hash_ms=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|r| r.parse::<f64>().ok())
                    .expect("hash_ms in the key daemon's log line");
            }
            hashes
        })
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(&sock, "/v1/health").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_micros(500));
    }
    let api = t.elapsed().as_secs_f64() * 1e3;
    while !get(&sock, "/v1/modules/m").contains("\"state\":\"running\"") {
        assert!(Instant::now() < deadline, "the module did not start");
        std::thread::sleep(Duration::from_micros(500));
    }
    let module = t.elapsed().as_secs_f64() * 1e3;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    if how == Measured::On {
        assert!(
            state.join("measurements").exists(),
            "measuring daemon wrote no log"
        );
    }
    if how == Measured::Launched {
        assert!(
            dir.join("keyd-state/measurements").exists(),
            "the launcher wrote no log"
        );
    }
    let hashes = log.map_or([0.0; 2], |t| t.join().expect("log reader"));
    if how == Measured::Launched {
        assert!(
            hashes.iter().all(|h| *h > 0.0),
            "the launcher logged no hash times: {hashes:?}"
        );
    }
    (api, module, hashes)
}

/// `edgeward-keyd --launch EDGEWARD --` (arguments follow), with its state
/// and socket beside the runtime's; as root, the runtime runs as
/// [`RUNTIME_UID`], owning its state and socket directories.
fn launcher(dir: &Path, state: &Path, run: &Path, extra: &[&str]) -> Command {
    use std::os::unix::fs::PermissionsExt as _;
    let keyd = Path::new(EDGEWARD).with_file_name("edgeward-keyd");
    assert!(
        keyd.exists(),
        "{} is missing: cargo build --profile bench -p edgeward-keyd",
        keyd.display()
    );
    let keyd_run = dir.join("keyd-run");
    std::fs::create_dir_all(&keyd_run).expect("keyd run dir");
    std::fs::create_dir_all(state).expect("state");
    let root = rustix::process::geteuid().is_root();
    let mut cmd = Command::new(keyd);
    cmd.arg("--state")
        .arg(dir.join("keyd-state"))
        .arg("--socket")
        .arg(keyd_run.join("keyd.sock"))
        .args(["--device-id", "bench"]);
    if root {
        // The runtime's user reaches its files through the tempdir.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for d in [state, run] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
            std::os::unix::fs::chown(d, Some(RUNTIME_UID), Some(RUNTIME_UID)).expect("chown");
        }
        cmd.args(["--runtime-uid", &RUNTIME_UID.to_string()])
            .args(["--runtime-gid", &RUNTIME_UID.to_string()]);
    }
    cmd.args(extra).arg("--launch").arg(EDGEWARD).arg("--");
    cmd
}

fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("boot_id"), "bench-boot").expect("boot id");

    // re-measurement throughput
    let big = dir.path().join("big.bin");
    let mut bytes = vec![0u8; 64 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1];
    }
    std::fs::write(&big, &bytes).expect("big");
    let (ours, openssl) = throughput(&big);
    println!(
        "attest_remeasure_64mib ratio={:.2}   (edgeward {ours:.0} MB/s, openssl dgst -sha256 {openssl:.0} MB/s; target >= 0.9)",
        ours / openssl
    );
    let (ours, openssl) = throughput(Path::new(guests::TEMPERATURE_SENSOR));
    println!(
        "attest_remeasure_sensor ratio={:.2}   (edgeward {ours:.0} MB/s, openssl {openssl:.0} MB/s, a process each, on a {} KB component)",
        ours / openssl,
        std::fs::metadata(guests::TEMPERATURE_SENSOR)
            .expect("size")
            .len()
            / 1000
    );

    // one watchdog round over 100 modules
    let state = dir.path().join("watchdog");
    std::fs::create_dir_all(&state).expect("state");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let round = rt.block_on(async {
        let runtime = edgeward::runtime::Runtime::new(&edgeward::runtime::RuntimeOptions {
            engine: edgeward::runtime::EngineOptions {
                max_instances: 128,
                ceilings: Default::default(),
                max_memory: 64 << 20,
                pooling: None,
                max_wasm_stack: edgeward::runtime::engine::DEFAULT_MAX_WASM_STACK,
            },
            state_dir: Some(state.clone()),
            cache_key: edgeward::runtime::cache::CacheKey::StateDir,
        })
        .expect("runtime");
        let hsm = edgeward::hsm::open(&Default::default(), &state).expect("hsm");
        let identity = edgeward::identity::IdentityService::open(hsm, Default::default(), &state)
            .expect("identity");
        let registry = Arc::new(edgeward::registry::Registry::open(&state).expect("registry"));
        let mut sup =
            edgeward::daemon::Supervisor::new(Arc::new(runtime), identity, registry, &state, false)
                .expect("supervisor");
        let probe = std::fs::read(guests::SANDBOX_PROBE).expect("probe");
        for i in 0..100 {
            // A component of its own: the probe and a custom section.
            let name = format!("edgeward-bench-{i}");
            let mut bytes = probe.clone();
            bytes.push(0);
            bytes.push(u8::try_from(name.len() + 1).expect("short"));
            bytes.push(u8::try_from(name.len()).expect("short"));
            bytes.extend_from_slice(name.as_bytes());
            let file = state.join(format!("m{i:03}.wasm"));
            std::fs::write(&file, &bytes).expect("variant");
            let spec = edgeward::spec::RawModuleSpec {
                name: format!("m{i:03}"),
                file: Some(file),
                digest: edgeward::measure::Digest::of(&bytes).to_string(),
                args: vec!["tick".into()],
                ..Default::default()
            }
            .validate(&|p: &Path| p.to_owned(), &Default::default())
            .expect("spec");
            sup.start(spec).await.expect("start");
        }
        // Wall time: a round hashes on one blocking thread.
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let checked = sup.audit().await;
            assert_eq!(checked, 100);
            rounds.push(t.elapsed().as_secs_f64());
        }
        sup.stop_all().await;
        median(rounds)
    });
    let interval = edgeward::config::DEFAULT_INTEGRITY_INTERVAL.as_secs_f64();
    println!(
        "attest_watchdog_share percent={:.4}   (one round over 100 modules, 100 components and cache entries: {:.2} ms on one thread, every {interval:.0} s)",
        round / interval * 100.0,
        round * 1e3
    );

    attest_latency(dir.path());

    // daemon start-up, measuring on vs off (a warm-up round each first:
    // the compiled cache)
    for how in [
        Measured::Off,
        Measured::On,
        Measured::Launched,
        Measured::LaunchedOff,
    ] {
        startup(dir.path(), how, 999);
    }
    let (mut on, mut off, mut launched, mut launched_off) = (
        (Vec::new(), Vec::new(), Vec::new()),
        (Vec::new(), Vec::new(), Vec::new()),
        (Vec::new(), Vec::new(), Vec::new()),
        (Vec::new(), Vec::new(), Vec::new()),
    );
    for r in 0..ROUNDS {
        for (how, into) in [
            (Measured::Off, &mut off),
            (Measured::On, &mut on),
            (Measured::Launched, &mut launched),
            (Measured::LaunchedOff, &mut launched_off),
        ] {
            let (a, m, h) = startup(dir.path(), how, r);
            into.0.push(a);
            into.1.push(m);
            into.2.push(h);
        }
    }
    // The two hashes of a measured launch as the launcher does them (the
    // runtime's executable, the key daemon's own), alone: after the rounds,
    // each after a pause, so no exiting daemon shares the cores with them.
    let keyd_exe = Path::new(EDGEWARD).with_file_name("edgeward-keyd");
    let (mut exe_hash, mut keyd_hash) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        std::hint::black_box(
            edgeward::measure::Digest::of_file(Path::new(EDGEWARD)).expect("hash"),
        );
        exe_hash.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        std::hint::black_box(edgeward::measure::Digest::of_file(&keyd_exe).expect("hash"));
        keyd_hash.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The same, as the launches timed them.
    let (in_keyd, in_exe) = (
        median(launched.2.iter().map(|h| h[0]).collect()),
        median(launched.2.iter().map(|h| h[1]).collect()),
    );
    // Each launch less its own two hashes.
    let l_rest = median(
        launched
            .0
            .iter()
            .zip(&launched.2)
            .map(|(api, h)| api - h[0] - h[1])
            .collect(),
    );
    let (on_api, off_api, on_mod, off_mod) =
        (median(on.0), median(off.0), median(on.1), median(off.1));
    let (l_api, l_mod) = (median(launched.0), median(launched.1));
    let (lo_api, lo_mod) = (median(launched_off.0), median(launched_off.1));
    let (exe_hash, keyd_hash) = (median(exe_hash), median(keyd_hash));
    let exe = std::fs::metadata(EDGEWARD).expect("exe").len() as f64 / 1e6;
    println!(
        "attest_daemon_startup ratio={:.2}   (the management API answers: measuring {on_api:.1} ms, not measuring {off_api:.1} ms; target <= 1.1)",
        on_api / off_api
    );
    println!(
        "attest_daemon_first_module ratio={:.2}   (a module runs, after the executable ({exe:.1} MB) and config are measured: {on_mod:.1} ms vs {off_mod:.1} ms)",
        on_mod / off_mod
    );
    println!(
        "attest_launched_startup ratio={:.2}   (the management API answers, through the measured launcher (key daemon start, its own hash, the runtime's executable and config hashed): {l_api:.1} ms, unmeasured {off_api:.1} ms; target <= 1.1)",
        l_api / off_api
    );
    println!(
        "attest_launched_first_module ratio={:.2}   (a module runs: launched {l_mod:.1} ms vs unmeasured {off_mod:.1} ms)",
        l_mod / off_mod
    );
    // #22: what measuring adds besides the two hashes, against the same
    // launch unmeasured.
    println!(
        "attest_launched_rest ratio={:.2}   (the management API answers through the launcher, measured, less the two hashes it timed in that launch (medians {in_exe:.1} ms the runtime's, {in_keyd:.2} ms its own; alone {exe_hash:.1} and {keyd_hash:.2}): {l_rest:.1} ms, against the launcher told --no-measure: {lo_api:.1} ms; target <= 1.1)",
        l_rest / lo_api
    );
    println!(
        "attest_launched_unmeasured ratio={:.2}   (the launcher unmeasured against the runtime alone: {lo_api:.1} vs {off_api:.1} ms until the API answers, {lo_mod:.1} vs {off_mod:.1} ms until the module runs)",
        lo_api / off_api
    );
}

/// Median ms of running `cmd` (a fresh one each round).
fn timed(rounds: usize, mut cmd: impl FnMut() -> Command) -> f64 {
    let mut v = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let o = cmd().output().expect("run");
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median(v)
}

fn attest_latency(dir: &Path) {
    let boot = dir.join("boot_id");
    let floor = timed(ROUNDS, || {
        let mut c = Command::new(EDGEWARD);
        c.arg("--version");
        c
    });
    for backend in ["soft", "tpm"] {
        let tpm = (backend == "tpm").then(edgeward_tests::fixtures::Swtpm::start);
        let state = dir.join(format!("attest-{backend}"));
        let config = dir.join(format!("attest-{backend}.toml"));
        let hsm = tpm.as_ref().map_or(String::new(), |t| {
            format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", t.tcti())
        });
        std::fs::write(&config, &hsm).expect("config");
        let edgeward = |args: &[&str]| {
            let mut c = Command::new(EDGEWARD);
            c.arg("--state-dir")
                .arg(&state)
                .env("EDGEWARD_BOOT_ID_FILE", &boot)
                .env("EDGEWARD_SOCKET", dir.join("none.sock"))
                .args(args);
            c
        };
        // A log of a few events: three measured runs.
        for _ in 0..3 {
            let o = edgeward(&["run", "--measure", "--config"])
                .arg(&config)
                .arg(guests::SANDBOX_PROBE)
                .args(["--", "hello"])
                .output()
                .expect("run");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let ev = dir.join(format!("ev-{backend}"));
        let nonce = "00112233445566778899aabbccddeeff";
        let attest = timed(ROUNDS, || {
            let mut c = edgeward(&[
                "attest",
                "--nonce",
                nonce,
                "--out",
                ev.to_str().expect("utf-8"),
            ]);
            c.arg("--config").arg(&config);
            c
        });
        // The verifier's policy: this backend, its AK enrolled, the
        // measured module allowed (so every round verifies, as checked).
        let mut modules = String::new();
        for r in std::fs::read_to_string(ev.join("event.log"))
            .expect("event.log")
            .split('\u{1e}')
            .filter(|r| !r.trim().is_empty())
        {
            let r: serde_json::Value = serde_json::from_str(r).expect("a record");
            if r["content"]["kind"] == "module" {
                modules = format!(
                    "[modules]\n{:?} = [{:?}]\n",
                    r["content"]["name"].as_str().expect("name"),
                    r["content"]["digest"].as_str().expect("digest")
                );
            }
        }
        let policy = dir.join(format!("policy-{backend}.toml"));
        std::fs::write(
            &policy,
            format!(
                "backends = [\"{backend}\"]\naks = [\"{}\"]\n{modules}",
                ev.join("ak.pem").display()
            ),
        )
        .expect("write the policy");
        let device = edgeward::identity::default_device_id();
        let verify_args = [
            "attest",
            "verify",
            ev.to_str().expect("utf-8"),
            "--device",
            device.as_str(),
            "--nonce",
            nonce,
            "--policy",
            policy.to_str().expect("utf-8"),
        ];
        let o = edgeward(&verify_args).output().expect("attest verify");
        assert!(
            o.status.success(),
            "attest verify: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let verify = timed(ROUNDS, || {
            let mut c = edgeward(&verify_args);
            c.stdout(Stdio::null());
            c
        });
        let peer = tpm.as_ref().map(|t| {
            // tpm2-tools: an AK under a primary, made persistent once (no
            // resource manager: a loaded context would leak a slot per
            // process); then a quote and its check per round.
            let tools = dir.join("tools");
            std::fs::create_dir_all(&tools).expect("tools dir");
            let tcti = t.tcti();
            let sh = |script: &str| {
                let o = Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .current_dir(&tools)
                    .env("TPM2TOOLS_TCTI", &tcti)
                    .output()
                    .expect("sh");
                assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
            };
            sh("tpm2_createprimary -Q -C o -c prim.ctx && tpm2_create -Q -C prim.ctx -G ecc256:ecdsa-sha256:null -u ak.pub -r ak.priv -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign' && tpm2_flushcontext -t && tpm2_load -Q -C prim.ctx -u ak.pub -r ak.priv -c ak.ctx && tpm2_flushcontext -t && tpm2_readpublic -Q -c ak.ctx -f pem -o ak.pem && tpm2_evictcontrol -Q -C o -c ak.ctx 0x81000010 && tpm2_flushcontext -t");
            let quote = timed(ROUNDS, || {
                let mut c = Command::new("tpm2_quote");
                c.args(["-Q", "-c", "0x81000010", "-l", "sha256:13", "-q", nonce, "-m", "q.msg", "-s", "q.sig", "-o", "pcrs.bin"])
                    .current_dir(&tools)
                    .env("TPM2TOOLS_TCTI", &tcti);
                c
            });
            let check = timed(ROUNDS, || {
                let mut c = Command::new("tpm2_checkquote");
                c.args(["-u", "ak.pem", "-m", "q.msg", "-s", "q.sig", "-f", "pcrs.bin", "-g", "sha256", "-q", nonce])
                    .current_dir(&tools)
                    .stdout(Stdio::null());
                c
            });
            (quote, check)
        });
        match peer {
            None => println!(
                "attest_latency_{backend} ratio={:.2}   (attest {attest:.1} ms + verify {verify:.1} ms, against 2 x edgeward --version {floor:.1} ms)",
                (attest + verify) / (2.0 * floor)
            ),
            Some((quote, check)) => println!(
                "attest_latency_{backend} ratio={:.2}   (attest {attest:.1} ms + verify {verify:.1} ms, against tpm2_quote {quote:.1} ms + tpm2_checkquote {check:.1} ms on the same swtpm)",
                (attest + verify) / (quote + check)
            ),
        }
    }
}
