//! What the management plane costs, each against a baseline in the same
//! run (medians; the daemon is the release binary):
//!
//! - **list**: `GET /v1/modules` with 100 registered modules, a new
//!   connection per request (as the CLI makes them), against a bare axum
//!   handler answering the same bytes on a unix socket in this process;
//! - **churn**: an add (registry commit, compile from cache, start) and a
//!   remove (stop, commit) of one module, per pair;
//! - **change to first output**: `POST /v1/modules` of a cached module that
//!   prints one line, until that line is in its log, against starting the
//!   same cached module in-process (`Runtime::start`, to its exit: its one
//!   line printed). Target: at most 10 ms over the direct start;
//! - **change to first output through the agent**: a new version of the
//!   sample agent's manifest (one module more, its component stored) until
//!   the new module's line is in its log, against the same direct start;
//! - **change to the agent's wake-up**: a file written in the agent's
//!   config directory until the agent's `wait-for-change` returns (the
//!   time it prints; target: within 100 ms);
//! - **module list**: `edgeward module list` as a whole process, against
//!   `edgeward --version` (the process floor).
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench
//! management`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeward_tests::bench::{digest, http, module_spec, start_daemon};
use edgeward_tests::guests;

const ROUNDS: usize = 15;
const LISTS: usize = 200;
const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A bare axum handler answering `body` to every request, on `sock`.
fn bare_server(sock: &Path, body: Vec<u8>) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(sock).expect("bind") });
    let body = Arc::new(body);
    rt.spawn(async move {
        let app = axum::Router::new().route(
            "/v1/modules",
            axum::routing::get(move || {
                let body = body.clone();
                async move { ([("content-type", "application/json")], (*body).clone()) }
            }),
        );
        let _ = axum::serve(listener, app).await;
    });
    rt
}

fn requests_per_second(sock: &Path) -> f64 {
    let t = Instant::now();
    for _ in 0..LISTS {
        let (status, _) = http(sock, "GET", "/v1/modules", b"");
        assert_eq!(status, 200);
    }
    LISTS as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let sock = dir.path().join("api.sock");
    let probe = guests::SANDBOX_PROBE;
    let probe_digest = digest(EDGEWARD, probe);
    let _daemon = start_daemon(EDGEWARD, &state, &sock, None);
    let (status, _) = http(
        &sock,
        "PUT",
        &format!("/v1/blobs/{probe_digest}"),
        &std::fs::read(probe).expect("probe"),
    );
    assert!(matches!(status, 200 | 201));
    for i in 0..100 {
        let (status, body) = http(
            &sock,
            "POST",
            "/v1/modules",
            &module_spec(&format!("m{i:03}"), &probe_digest, r#""hello""#),
        );
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }

    // list
    let (_, listed) = http(&sock, "GET", "/v1/modules", b"");
    let bare_sock = dir.path().join("bare.sock");
    let _bare = bare_server(&bare_sock, listed.clone());
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours.push(requests_per_second(&sock));
        bare.push(requests_per_second(&bare_sock));
    }
    let (o, b) = (median(ours), median(bare));
    println!(
        "management_list_100 ratio={:.2}   (edgeward {o:.0} req/s, bare axum {b:.0} req/s; {} bytes each; ratio = bare/ours time)",
        b / o,
        listed.len()
    );

    // churn
    let mut pairs = Vec::new();
    for r in 0..ROUNDS * 2 {
        let name = format!("churn{r}");
        let t = Instant::now();
        let (s1, _) = http(
            &sock,
            "POST",
            "/v1/modules",
            &module_spec(&name, &probe_digest, r#""tick""#),
        );
        let (s2, _) = http(&sock, "DELETE", &format!("/v1/modules/{name}"), b"");
        pairs.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((s1, s2), (201, 204));
    }
    let churn = median(pairs);
    println!(
        "management_churn pair_ms={churn:.2}   (add + remove of one module: {:.0} pairs/s)",
        1e3 / churn
    );

    // change to first output, against a direct start in-process
    let rt = edgeward::runtime::Runtime::new(&edgeward::runtime::RuntimeOptions {
        engine: edgeward::runtime::EngineOptions {
            max_instances: 4,
            ceilings: Default::default(),
            max_memory: 64 << 20,
            pooling: None,
            max_wasm_stack: edgeward::runtime::engine::DEFAULT_MAX_WASM_STACK,
        },
        state_dir: Some(dir.path().join("direct")),
        cache_key: edgeward::runtime::cache::CacheKey::StateDir,
    })
    .expect("runtime");
    let measured = edgeward::measure::Measured::read(Path::new(probe)).expect("read");
    drop(rt.load(&measured).expect("warm the cache"));
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let (mut via_api, mut direct) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        let name = format!("first{r}");
        let log: PathBuf = state.join("modules").join(&name).join("log/output.log");
        let t = Instant::now();
        let (status, _) = http(
            &sock,
            "POST",
            "/v1/modules",
            &module_spec(&name, &probe_digest, r#""hello""#),
        );
        assert_eq!(status, 201);
        loop {
            if std::fs::read(&log).is_ok_and(|b| b.windows(5).any(|w| w == b"hello")) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no output in {}",
                log.display()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        via_api.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let module = rt.load(&measured).expect("cached");
        let mut sandbox = edgeward::runtime::SandboxSpec::new("direct");
        sandbox.args.push("hello".into());
        let exit = tokio_rt.block_on(rt.start(&module, &sandbox, None));
        assert!(exit.is_success(), "{exit}");
        direct.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (a, d) = (median(via_api), median(direct));
    println!(
        "management_change_to_first_output over_direct_ms={:.2}   (API {a:.2} ms, direct start {d:.2} ms; target <= 10 ms over)",
        a - d
    );
    let (agent, wake) = through_the_agent(dir.path(), probe, &probe_digest);
    println!(
        "management_agent_change_to_first_output over_direct_ms={:.2}   (agent {agent:.2} ms, direct start {d:.2} ms; target <= 10 ms over)",
        agent - d
    );
    println!(
        "management_agent_wake_ms={wake:.2}   (a file written in the agent's config directory until its wait-for-change returns; target <= 100 ms)"
    );

    // edgeward module list as a whole process
    let time = |args: &[&str]| {
        let mut v = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let out = Command::new(EDGEWARD)
                .args(args)
                .env("EDGEWARD_SOCKET", &sock)
                .env_remove("EDGEWARD_CONFIG")
                .output()
                .expect("spawn");
            assert!(out.status.success());
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        median(v)
    };
    let list = time(&["module", "list"]);
    let floor = time(&["--version"]);
    println!(
        "management_cli_list ratio={:.2}   (edgeward module list {list:.1} ms with 135 modules, edgeward --version {floor:.1} ms)",
        list / floor
    );
}

/// Replaces `name` in `dir` atomically (written aside, renamed over).
fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn wait_for_in(file: &Path, needle: &[u8], since: Instant) {
    loop {
        if std::fs::read(file).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "{} never in {}",
            String::from_utf8_lossy(needle),
            file.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Medians of: a manifest change to the new module's first output through
/// the sample agent; a file written to the agent-probe's wake-up.
fn through_the_agent(dir: &Path, probe: &str, probe_digest: &str) -> (f64, f64) {
    let conf = dir.join("agent-config");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::copy(probe, conf.join("probe.wasm")).expect("copy");
    let daemon_config = |agent: &str, args: &str| {
        let path = dir.join(format!("{args}.toml"));
        std::fs::write(
            &path,
            format!(
                "[agent]\nfile = \"{agent}\"\ndigest = \"{}\"\nconfig_dir = \"{}\"\nargs = [{args}]\n",
                digest(EDGEWARD, agent),
                conf.display()
            ),
        )
        .expect("config");
        path
    };
    let state = dir.join("agent-state");
    let sock = dir.join("agent.sock");
    let mut manifest = String::from("version = \"0\"\n");
    write_atomically(&conf, "deployment.toml", &manifest);
    let daemon = start_daemon(
        EDGEWARD,
        &state,
        &sock,
        Some(&daemon_config(guests::EDGE_AGENT, "")),
    );
    let agent_log = state.join("modules/agent/log/output.log");
    wait_for_in(&agent_log, b"\"version\":\"0\"", Instant::now());
    let mut times = Vec::new();
    for r in 1..=ROUNDS {
        let name = format!("agent{r}");
        manifest = manifest.replacen(
            &format!("version = \"{}\"", r - 1),
            &format!("version = \"{r}\""),
            1,
        );
        manifest.push_str(&format!(
            "\n[[module]]\nname = \"{name}\"\nfile = \"probe.wasm\"\ndigest = \"{probe_digest}\"\nargs = [\"hello\"]\nrestart = \"never\"\n"
        ));
        let log = state.join("modules").join(&name).join("log/output.log");
        let t = Instant::now();
        write_atomically(&conf, "deployment.toml", &manifest);
        wait_for_in(&log, b"hello", t);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(daemon);

    let state = dir.join("probe-state");
    let sock = dir.join("probe.sock");
    let _daemon = start_daemon(
        EDGEWARD,
        &state,
        &sock,
        Some(&daemon_config(guests::AGENT_PROBE, "\"watch\"")),
    );
    let probe_log = state.join("modules/agent/log/output.log");
    wait_for_in(&probe_log, b"watching", Instant::now());
    let changes = |text: &str| -> Vec<u128> {
        text.lines()
            .filter_map(|l| l.split("changed ").nth(1))
            .filter_map(|ms| ms.trim().parse().ok())
            .collect()
    };
    let mut wakes = Vec::new();
    for r in 0..ROUNDS {
        let before = changes(&std::fs::read_to_string(&probe_log).unwrap_or_default()).len();
        let written = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_micros();
        std::fs::write(conf.join("touched"), format!("{r}")).expect("touch");
        let t = Instant::now();
        let woke = loop {
            let seen = changes(&std::fs::read_to_string(&probe_log).unwrap_or_default());
            if seen.len() > before {
                break seen[before];
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the probe never woke"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        // Both in microseconds since the epoch.
        wakes.push((woke as f64 - written as f64) / 1e3);
        // Let the write's other events settle before the next round.
        std::thread::sleep(Duration::from_millis(50));
    }
    (median(times), median(wakes))
}
