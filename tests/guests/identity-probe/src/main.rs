//! Test guest for the `workload` interface. `identity-probe ACTION ARGS…`
//! prints one result per line, `ok <value>` or `err <variant>: <message>`,
//! so tests can tell a WIT error from a trap (a trap prints nothing more
//! and fails the run).
//!
//! Actions:
//! - `whoami`: the identity, one `key=value` per line;
//! - `token AUD… TTL`: a JWT-SVID;
//! - `validate TOKEN AUD`: the claims;
//! - `cert`: the X509-SVID chain, then `key` and `expires`;
//! - `server-cert CN NAME…`: a server certificate, likewise;
//! - `server-cert-burst N`: N server certificates as fast as possible;
//! - `bundle`: the trust bundle;
//! - `sign TEXT`: hex DER signature of TEXT, then the certificate that
//!   verifies it;
//! - `encrypt TEXT AAD` / `decrypt HEX AAD`;
//! - `vault`: seals a secret to `/data/secret` on first run; later runs
//!   open it and print it;
//! - `certs N MS`: N certificates MS apart, each with its signature over
//!   `reading-<i>`;
//! - `tokens N MS AUD`: N tokens for AUD, MS apart;
//! - `bad-input`: every documented bad-input case, one line each;
//! - `bench N`: per-call nanoseconds of whoami (SDK, cached), whoami-wit
//!   (one WIT call each), token, validate (a token of this module), sign(1
//!   KiB) and encrypt(1 KiB), in rounds.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use edgeward_sdk::{Error, identity};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn variant(e: &Error) -> &'static str {
    match e {
        Error::NotPermitted(_) => "not-permitted",
        Error::InvalidArgument(_) => "invalid-argument",
        Error::Unavailable(_) => "unavailable",
        Error::Internal(_) => "internal",
    }
}

fn report<T>(label: &str, r: Result<T, Error>, show: impl FnOnce(T) -> String) {
    match r {
        Ok(v) => println!("{label} ok {}", show(v)),
        Err(e) => println!("{label} err {}: {}", variant(&e), e.message()),
    }
}

fn print_credentials(c: &identity::Credentials) {
    print!("{}", c.certificate_chain);
    print!("{}", c.private_key);
    println!("expires {}", c.expires_at);
}

/// `ROUNDS` rounds, each timing every op in turn (so drift hits all ops
/// alike); one `bench OP NS` line per op and round.
fn bench(n: u32) {
    const ROUNDS: u32 = 5;
    let data = vec![7u8; 1024];
    let time = |calls: u32, f: &mut dyn FnMut()| {
        for _ in 0..(calls / 10).max(1) {
            f();
        }
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        t.elapsed().as_nanos() / u128::from(calls)
    };
    let heavy = (n / 20).max(1);
    let tok = identity::token(&["bench"], Duration::from_secs(300)).unwrap_or_default();
    for _ in 0..ROUNDS {
        let w = time(n, &mut || {
            std::hint::black_box(identity::whoami());
        });
        let wu = time(n, &mut || {
            std::hint::black_box(identity::whoami_uncached());
        });
        let t = time(heavy, &mut || {
            std::hint::black_box(identity::token(&["bench"], Duration::from_secs(60)).ok());
        });
        let v = time(heavy, &mut || {
            std::hint::black_box(identity::validate_token(&tok, "bench").ok());
        });
        let s = time(heavy, &mut || {
            std::hint::black_box(identity::sign(&data).ok());
        });
        let e = time(n, &mut || {
            std::hint::black_box(identity::encrypt(&data, b"").ok());
        });
        println!("bench whoami {w}");
        println!("bench whoami-wit {wu}");
        println!("bench token {t}");
        println!("bench validate {v}");
        println!("bench sign {s}");
        println!("bench encrypt {e}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match a(0) {
        "whoami" => {
            let me = identity::whoami();
            println!("module_name={}", me.module_name);
            println!("device_id={}", me.device_id);
            println!("generation_id={}", me.generation_id);
            println!("digest={}", me.digest);
            println!("spiffe_id={}", me.spiffe_id);
        }
        "token" => {
            let ttl: u64 = args.last().and_then(|t| t.parse().ok()).unwrap_or(60);
            let aud = &args[1..args.len().saturating_sub(1).max(1)];
            report(
                "token",
                identity::token(aud, Duration::from_secs(ttl)),
                |t| t,
            );
        }
        "validate" => report("validate", identity::validate_token(a(1), a(2)), |c| {
            format!(
                "sub={} aud={} iat={} exp={} digest={}",
                c.subject,
                c.audience.join(","),
                c.issued_at,
                c.expires_at,
                c.digest
            )
        }),
        "cert" => match identity::certificate() {
            Ok(c) => print_credentials(&c),
            Err(e) => println!("cert err {}: {}", variant(&e), e.message()),
        },
        "server-cert" => match identity::server_certificate(a(1), &args[2.min(args.len())..]) {
            Ok(c) => print_credentials(&c),
            Err(e) => println!("server-cert err {}: {}", variant(&e), e.message()),
        },
        "server-cert-burst" => {
            let n: u32 = a(1).parse().unwrap_or(1);
            for i in 0..n {
                report(
                    &format!("burst {i}"),
                    identity::server_certificate("burst.local", &["burst.local"]),
                    |c| c.expires_at.to_string(),
                );
            }
        }
        "bundle" => match identity::trust_bundle() {
            Ok(b) => print!("{b}"),
            Err(e) => println!("bundle err {}: {}", variant(&e), e.message()),
        },
        "sign" => {
            report("sign", identity::sign(a(1).as_bytes()), |s| hex(&s));
            if let Ok(c) = identity::certificate() {
                print!("{}", c.certificate_chain);
            }
        }
        "encrypt" => report(
            "encrypt",
            identity::encrypt(a(1).as_bytes(), a(2).as_bytes()),
            |c| hex(&c),
        ),
        "decrypt" => {
            let ct = unhex(a(1)).unwrap_or_default();
            report("decrypt", identity::decrypt(&ct, a(2).as_bytes()), |p| {
                String::from_utf8_lossy(&p).into_owned()
            });
        }
        "vault" => {
            let path = "/data/secret";
            match std::fs::read(path) {
                Ok(ct) => report("vault-open", identity::decrypt(&ct, b"vault"), |p| {
                    String::from_utf8_lossy(&p).into_owned()
                }),
                Err(_) => {
                    let secret = format!("secret-of-{}", identity::whoami().generation_id);
                    match identity::encrypt(secret.as_bytes(), b"vault") {
                        Ok(ct) => match std::fs::write(path, ct) {
                            Ok(()) => println!("vault-seal ok {secret}"),
                            Err(e) => println!("vault-seal err io: {e}"),
                        },
                        Err(e) => println!("vault-seal err {}: {}", variant(&e), e.message()),
                    }
                }
            }
        }
        "certs" => {
            let n: u32 = a(1).parse().unwrap_or(1);
            let ms: u64 = a(2).parse().unwrap_or(0);
            for i in 0..n {
                let msg = format!("reading-{i}");
                match (identity::certificate(), identity::sign(msg.as_bytes())) {
                    (Ok(c), Ok(sig)) => {
                        println!("certs {i} sig {}", hex(&sig));
                        println!("certs {i} expires {}", c.expires_at);
                        print!("{}", c.certificate_chain);
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        println!("certs {i} err {}: {}", variant(&e), e.message());
                    }
                }
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        "sign-loop" => {
            // Many workload calls, one line at the end (a soak).
            let n: u64 = a(1).parse().unwrap_or(1);
            let failed = (0..n)
                .filter(|i| identity::sign(&i.to_le_bytes()).is_err())
                .count();
            println!("sign-loop {n} calls, {failed} failed");
        }
        "tokens" => {
            let n: u32 = a(1).parse().unwrap_or(1);
            let ms: u64 = a(2).parse().unwrap_or(0);
            for i in 0..n {
                report(
                    &format!("tokens {i}"),
                    identity::token(&[a(3)], Duration::from_secs(60)),
                    |t| t,
                );
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        "bad-input" => {
            let none: [&str; 0] = [];
            let show_ok = |_| "unexpected".to_owned();
            report(
                "empty-audience",
                identity::token(&none, Duration::from_secs(60)),
                show_ok,
            );
            report(
                "empty-audience-string",
                identity::token(&[""], Duration::from_secs(60)),
                |_| "unexpected".into(),
            );
            report("ttl-zero", identity::token(&["a"], Duration::ZERO), |_| {
                "unexpected".into()
            });
            let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
            report(
                "too-many-audiences",
                identity::token(&many, Duration::from_secs(5)),
                |_| "unexpected".into(),
            );
            let long_aud = "x".repeat(257);
            report(
                "long-audience",
                identity::token(&[long_aud.as_str()], Duration::from_secs(5)),
                |_| "unexpected".into(),
            );
            let big = vec![0u8; (1 << 20) + 1];
            report("sign-oversized", identity::sign(&big), |_| {
                "unexpected".into()
            });
            report("encrypt-oversized", identity::encrypt(&big, b""), |_| {
                "unexpected".into()
            });
            report(
                "encrypt-aad-oversized",
                identity::encrypt(b"x", &big[..(64 << 10) + 1]),
                |_| "unexpected".into(),
            );
            report("decrypt-empty", identity::decrypt(b"", b""), |_| {
                "unexpected".into()
            });
            report(
                "decrypt-version",
                identity::decrypt(&[9u8; 40], b""),
                |_| "unexpected".into(),
            );
            report(
                "decrypt-truncated",
                identity::decrypt(&[1u8; 10], b""),
                |_| "unexpected".into(),
            );
            let mut ct = identity::encrypt(b"hello", b"aad").unwrap_or_default();
            if let Some(last) = ct.last_mut() {
                *last ^= 1;
            }
            report("decrypt-tampered", identity::decrypt(&ct, b"aad"), |_| {
                "unexpected".into()
            });
            let ct = identity::encrypt(b"hello", b"aad").unwrap_or_default();
            report(
                "decrypt-wrong-aad",
                identity::decrypt(&ct, b"other"),
                |_| "unexpected".into(),
            );
            report(
                "validate-garbage",
                identity::validate_token("not.a.token", "a"),
                |_| "unexpected".into(),
            );
            report(
                "validate-empty-audience",
                identity::validate_token("a.b.c", ""),
                |_| "unexpected".into(),
            );
            let huge = "a".repeat(9000);
            report(
                "validate-oversized",
                identity::validate_token(&huge, "a"),
                |_| "unexpected".into(),
            );
            report(
                "server-cert-empty-cn",
                identity::server_certificate("", &["a.example"]),
                |_| "unexpected".into(),
            );
            report(
                "server-cert-wildcard",
                identity::server_certificate("x", &["*.example.com"]),
                |_| "unexpected".into(),
            );
            report(
                "server-cert-bad-name",
                identity::server_certificate("x", &["bad name"]),
                |_| "unexpected".into(),
            );
            let names: Vec<String> = (0..17).map(|i| format!("h{i}.example")).collect();
            report(
                "server-cert-too-many",
                identity::server_certificate("x", &names),
                |_| "unexpected".into(),
            );
            println!("bad-input done");
        }
        "bench" => bench(a(1).parse().unwrap_or(1000)),
        other => {
            eprintln!("identity-probe: unknown action {other:?}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
