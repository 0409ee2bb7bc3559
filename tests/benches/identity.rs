//! Workload-identity call cost, from inside a guest, against two baselines
//! measured in the same run:
//!
//! - **native**: the same operation called directly on the host's
//!   `ModuleIdentity` in this process (what the WIT call adds is the
//!   component-model boundary: lifting, lowering, copying);
//! - **http**: the same operation as an HTTP/1.1 request over a unix socket
//!   to a server process backed by the same host code (the container-era
//!   workload-API design: a keep-alive connection, JSON bodies, one request
//!   at a time). The client is native Rust in this process, so the figure
//!   leaves out whatever a guest-side HTTP stack would add.
//!
//! The guest (`identity-probe bench N`) runs under `edgeward run` and times
//! its own calls, in 5 rounds that visit every op in turn; each figure is the
//! median round. `whoami` is the SDK call (the identity is immutable per
//! instance, so the SDK asks once and keeps it); `whoami-wit` makes the WIT
//! call every time. With the TPM backend (a local swtpm) `token()` is measured
//! again: JWT working keys live in memory, so only one certificate per
//! rotation touches the TPM.
//!
//! The crypto targets compare the guest's rates with `openssl speed` run in
//! the same benchmark run, single core: `token()` and `sign(1 KiB)` against
//! `openssl speed ecdsap256` signing, `validate-token` against its verifying,
//! `encrypt(1 KiB)` against `openssl speed -evp aes-256-gcm -bytes 1024`
//! (each at least 0.5x).
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench identity`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use edgeward::identity::{IdentityConfig, IdentityService, ModuleIdentity};
use edgeward_tests::fixtures::Swtpm;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");
const N: u32 = 20_000;
const ROUNDS: usize = 5;
const OPS: [&str; 6] = [
    "whoami",
    "whoami-wit",
    "token",
    "validate",
    "sign",
    "encrypt",
];
const SERVE_ENV: &str = "EDGEWARD_BENCH_SERVE";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per-call nanoseconds of each op, one figure per round.
type Rounds = HashMap<String, Vec<f64>>;

/// Runs `sides` alternately `reps` times and returns each side's median per op.
fn alternate(reps: usize, sides: &mut [&mut dyn FnMut() -> Rounds]) -> Vec<HashMap<String, f64>> {
    let mut all: Vec<Rounds> = vec![HashMap::new(); sides.len()];
    for _ in 0..reps {
        for (i, side) in sides.iter_mut().enumerate() {
            for (op, v) in side() {
                all[i].entry(op).or_default().extend(v);
            }
        }
    }
    all.into_iter()
        .map(|r| r.into_iter().map(|(k, v)| (k, median(v))).collect())
        .collect()
}

/// Per-call nanoseconds of each op as the guest measured them, per round.
fn guest(state: &std::path::Path, config: Option<&std::path::Path>, n: u32) -> Rounds {
    let mut c = Command::new(EDGEWARD);
    c.arg("--state-dir").arg(state).arg("run");
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    let o = c
        .arg(edgeward_tests::guests::IDENTITY_PROBE)
        .args(["--", "bench", &n.to_string()])
        .env_remove("EDGEWARD_CONFIG")
        .output()
        .expect("run the identity probe");
    assert!(
        o.status.success(),
        "identity-probe bench failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut rounds: HashMap<String, Vec<f64>> = HashMap::new();
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let mut w = l
            .strip_prefix("bench ")
            .into_iter()
            .flat_map(|r| r.split(' '));
        if let (Some(op), Some(ns)) = (w.next(), w.next().and_then(|x| x.parse().ok())) {
            rounds.entry(op.to_owned()).or_default().push(ns);
        }
    }
    rounds
}

fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

/// The WIT `identity` record as the host builds it: owned strings.
fn whoami_owned(id: &ModuleIdentity) -> [String; 5] {
    let w = id.whoami();
    [
        w.module_name.clone(),
        w.device_id.clone(),
        w.generation_id.clone(),
        w.digest.clone(),
        w.spiffe_id.clone(),
    ]
}

/// The same ops on the host, same rounds and counts as the guest. The
/// native `whoami` reads the host's record (as the SDK's cached call does);
/// `whoami-wit` builds the owned record the WIT call returns.
fn native(id: &ModuleIdentity, n: u32) -> Rounds {
    let data = vec![7u8; 1024];
    let aud = vec!["bench".to_owned()];
    id.sign(&data).expect("first leaf");
    let tok = id.token(&aud, 300).expect("token");
    let heavy = (n / 20).max(1);
    let mut rounds: HashMap<String, Vec<f64>> = HashMap::new();
    for _ in 0..ROUNDS {
        let mut put = |op: &str, v: f64| rounds.entry(op.to_owned()).or_default().push(v);
        put(
            "whoami",
            per_call(n, || {
                std::hint::black_box(id.whoami());
            }),
        );
        put(
            "whoami-wit",
            per_call(n, || {
                std::hint::black_box(whoami_owned(id));
            }),
        );
        put(
            "token",
            per_call(heavy, || {
                std::hint::black_box(id.token(&aud, 60).ok());
            }),
        );
        put(
            "validate",
            per_call(heavy, || {
                std::hint::black_box(id.validate_token(&tok, "bench").ok());
            }),
        );
        put(
            "sign",
            per_call(heavy, || {
                std::hint::black_box(id.sign(&data).ok());
            }),
        );
        put(
            "encrypt",
            per_call(n, || {
                std::hint::black_box(id.encrypt(&data, b"").ok());
            }),
        );
    }
    rounds
}

async fn serve(
    id: Arc<ModuleIdentity>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = match path.as_str() {
        "/whoami" | "/whoami-wit" => {
            let w = id.whoami();
            serde_json::json!({
                "module_name": w.module_name, "device_id": w.device_id,
                "generation_id": w.generation_id, "digest": w.digest, "spiffe_id": w.spiffe_id,
            })
        }
        "/token" => serde_json::json!({ "token": id.token(&["bench".to_owned()], 60).ok() }),
        "/sign" => serde_json::json!({ "signature": id.sign(&body).ok() }),
        "/validate" => serde_json::json!({
            "claims": id
                .validate_token(&String::from_utf8_lossy(&body), "bench")
                .ok()
                .map(|c| c.subject)
        }),
        "/encrypt" => serde_json::json!({ "ciphertext": id.encrypt(&body, b"").ok() }),
        _ => serde_json::json!({ "error": "not found" }),
    };
    Ok(hyper::Response::new(Full::new(Bytes::from(
        json.to_string(),
    ))))
}

/// The workload-API server: serves `sock` until killed.
fn serve_forever(sock: &std::path::Path, state: &std::path::Path) {
    let hsm = edgeward::hsm::open(&Default::default(), state).expect("soft hsm");
    let svc = IdentityService::open(hsm, IdentityConfig::default(), state).expect("identity");
    let id = svc
        .ephemeral(
            "bench",
            &format!("sha256:{}", "ab".repeat(32)),
            &Default::default(),
        )
        .expect("identity");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(sock).expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let id = id.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| serve(id.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Median per-call nanoseconds over HTTP/1.1 on a unix socket (keep-alive)
/// to a server in a child process.
fn http(dir: &std::path::Path, n: u32) -> HashMap<String, f64> {
    let sock = dir.join("workload.sock");
    let state = dir.join("http-state");
    std::fs::create_dir_all(&state).expect("state dir");
    let mut server = Command::new(std::env::current_exe().expect("bench binary"))
        .env(
            SERVE_ENV,
            format!("{}\n{}", sock.display(), state.display()),
        )
        .spawn()
        .expect("spawn the HTTP server");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed().as_secs() < 30, "the HTTP server did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let m = rt.block_on(async move {
        let stream = tokio::net::UnixStream::connect(&sock)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let data = Bytes::from(vec![7u8; 1024]);
        let token = {
            let req = hyper::Request::post("http://localhost/token")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let resp = sender.send_request(req).await.expect("response");
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            Bytes::from(v["token"].as_str().expect("a token").to_owned())
        };
        let mut rounds: HashMap<String, Vec<f64>> = HashMap::new();
        for _ in 0..ROUNDS {
            for op in OPS {
                let body = match op {
                    "sign" | "encrypt" => data.clone(),
                    "validate" => token.clone(),
                    _ => Bytes::new(),
                };
                let mut call = async || {
                    let req = hyper::Request::post(format!("http://localhost/{op}"))
                        .body(Full::new(body.clone()))
                        .expect("request");
                    sender.ready().await.expect("connection ready");
                    let resp = sender.send_request(req).await.expect("response");
                    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
                    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
                    std::hint::black_box(v);
                };
                let reps = if matches!(op, "token" | "sign" | "validate") {
                    (n / 20).max(1)
                } else {
                    n / 4
                };
                for _ in 0..reps / 10 {
                    call().await;
                }
                let t = Instant::now();
                for _ in 0..reps {
                    call().await;
                }
                rounds
                    .entry(op.to_owned())
                    .or_default()
                    .push(t.elapsed().as_nanos() as f64 / f64::from(reps));
            }
        }
        rounds.into_iter().map(|(k, v)| (k, median(v))).collect()
    });
    let _ = server.kill();
    let _ = server.wait();
    m
}

/// `openssl speed` on one core: ECDSA P-256 signs and verifies per second,
/// AES-256-GCM 1 KiB encryptions per second.
struct OpensslRates {
    sign: f64,
    verify: f64,
    gcm_1k: f64,
}

fn openssl_speed(args: &[&str]) -> String {
    let o = Command::new("openssl")
        .arg("speed")
        .args(["-seconds", "3", "-mr"])
        .args(args)
        .output()
        .expect("openssl (Debian's openssl package; scripts/setup installs it)");
    assert!(o.status.success(), "openssl speed {args:?} failed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn openssl_rates() -> OpensslRates {
    let ec = openssl_speed(&["ecdsap256"]);
    let f4: Vec<f64> = ec
        .lines()
        .find_map(|l| l.strip_prefix("+F4:"))
        .expect("an ecdsap256 result line")
        .split(':')
        .filter_map(|x| x.parse().ok())
        .collect();
    let gcm = openssl_speed(&["-evp", "aes-256-gcm", "-bytes", "1024"]);
    let bytes_per_s: f64 = gcm
        .lines()
        .find_map(|l| l.strip_prefix("+F:"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|x| x.parse().ok())
        .expect("an aes-256-gcm result line");
    OpensslRates {
        sign: f4[f4.len() - 2],
        verify: f4[f4.len() - 1],
        gcm_1k: bytes_per_s / 1024.0,
    }
}

fn main() {
    if let Ok(spec) = std::env::var(SERVE_ENV) {
        let (sock, state) = spec.split_once('\n').expect("socket and state dir");
        serve_forever(std::path::Path::new(sock), std::path::Path::new(state));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let hsm = edgeward::hsm::open(&Default::default(), &state).expect("soft hsm");
    let svc = IdentityService::open(hsm, IdentityConfig::default(), &state).expect("identity");
    let id = svc
        .ephemeral(
            "bench",
            &format!("sha256:{}", "ab".repeat(32)),
            &Default::default(),
        )
        .expect("identity");

    // Guest and native alternate, three processes' worth of rounds each.
    let medians = alternate(
        3,
        &mut [&mut || guest(&state, None, N), &mut || native(&id, N)],
    );
    let (g, nat) = (&medians[0], &medians[1]);
    let h = http(dir.path(), N);

    println!(
        "identity calls, ns per call, median of {} rounds (guest = identity-probe under edgeward run)",
        3 * ROUNDS
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "op", "guest", "native", "http/uds", "guest/native", "http/guest"
    );
    for op in OPS {
        let get = |m: &HashMap<String, f64>, side: &str| {
            *m.get(op)
                .unwrap_or_else(|| panic!("no {side} figure for {op}: {m:?}"))
        };
        let (gv, nv, hv) = (get(g, "guest"), get(nat, "native"), get(&h, "http"));
        println!(
            "{op:<10} {gv:>12.0} {nv:>12.0} {hv:>12.0} {:>14.2} {:>14.1}",
            gv / nv,
            hv / gv
        );
    }
    for op in OPS {
        println!("identity_{op}_guest_vs_native ratio={:.2}", g[op] / nat[op]);
        println!("identity_{op}_http_vs_guest ratio={:.1}", h[op] / g[op]);
    }

    // Against openssl on the same machine, in the same run (one core).
    let ossl = openssl_rates();
    println!(
        "openssl speed (1 core): ecdsap256 sign {:.0}/s, verify {:.0}/s; aes-256-gcm 1 KiB {:.0}/s",
        ossl.sign, ossl.verify, ossl.gcm_1k
    );
    for (op, base, what) in [
        ("token", ossl.sign, "ecdsap256 sign"),
        ("sign", ossl.sign, "ecdsap256 sign"),
        ("validate", ossl.verify, "ecdsap256 verify"),
        ("encrypt", ossl.gcm_1k, "aes-256-gcm 1 KiB"),
    ] {
        let rate = 1e9 / g[op];
        println!(
            "identity_{op}_guest_vs_openssl ratio={:.2} (guest {rate:.0}/s, openssl {what} {base:.0}/s; target >= 0.5)",
            rate / base
        );
    }

    // token() on the TPM backend.
    let tpm = Swtpm::start();
    let tpm_state = dir.path().join("tpm-state");
    std::fs::create_dir_all(&tpm_state).expect("tpm state dir");
    let cfg = dir.path().join("tpm.toml");
    std::fs::write(
        &cfg,
        format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti()),
    )
    .expect("config");
    let medians = alternate(
        3,
        &mut [&mut || guest(&state, None, N / 4), &mut || {
            guest(&tpm_state, Some(&cfg), N / 4)
        }],
    );
    let (soft, t) = (&medians[0], &medians[1]);
    println!(
        "token ns/call: soft {:.0}, tpm {:.0}",
        soft["token"], t["token"]
    );
    println!(
        "identity_token_tpm_vs_soft ratio={:.2}",
        t["token"] / soft["token"]
    );
}
