//! The registry's promise under `kill -9`: a stream of add, update and
//! remove requests, the daemon killed at 50 random moments; after each
//! restart every acknowledged change is there, the one in flight is there
//! whole or not at all, and the modules that run are the registered ones.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

/// One HTTP/1.1 request: `None` when the daemon went away mid-way.
fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut c = std::os::unix::net::UnixStream::connect(sock).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .ok()?;
    // An upload the daemon already holds is answered before its body is
    // read: the rest of the body may meet a closed socket.
    let _ = c.write_all(body);
    // An early answer may be followed by a reset (the rest of the body
    // met a closed socket): what arrived before it is the answer.
    let mut out = String::new();
    if c.read_to_string(&mut out).is_err() && !out.contains("\r\n\r\n") {
        return None;
    }
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned(),
    ))
}

/// A small deterministic generator (the seed is printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Module name -> digest, as acknowledged.
type Model = BTreeMap<String, String>;

#[derive(Debug, Clone)]
enum Op {
    Add(String, String),
    Update(String, String),
    Remove(String),
}

impl Op {
    fn apply(&self, m: &mut Model) {
        match self {
            Op::Add(n, d) | Op::Update(n, d) => {
                m.insert(n.clone(), d.clone());
            }
            Op::Remove(n) => {
                m.remove(n);
            }
        }
    }
}

/// What the daemon lists: name -> (digest, desired).
fn listed(sock: &Path) -> BTreeMap<String, (String, String)> {
    let (status, body) = http(sock, "GET", "/v1/modules", b"").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                (
                    m["digest"].as_str().unwrap().to_owned(),
                    m["state"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

fn start(s: &Scratch) -> Daemon {
    let sock = s.socket();
    let d = Daemon::start(s, "");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(&sock, "GET", "/v1/health", b"").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

#[test]
fn acknowledged_changes_survive_kill_9_at_any_moment() {
    let s = Scratch::new();
    let sock: PathBuf = s.socket();
    let components = [guests::SANDBOX_PROBE, guests::TEMPERATURE_SENSOR];
    let digests: Vec<String> = components.iter().map(|c| sha256sum(c)).collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut model = Model::new();
    let mut in_flight: Option<Op> = None;
    let mut acknowledged = 0usize;
    for round in 0..50 {
        let mut d = start(&s);
        // The registry matches what was acknowledged; the change that was
        // in flight is there whole or not at all.
        let now = listed(&sock);
        let mut after = model.clone();
        if let Some(op) = &in_flight {
            op.apply(&mut after);
        }
        let seen: Model = now
            .iter()
            .map(|(n, (d, _))| (n.clone(), d.clone()))
            .collect();
        assert!(
            seen == model || seen == after,
            "round {round} (seed {seed}): registry {seen:?}, acknowledged {model:?}, in flight {in_flight:?}"
        );
        model = seen;
        for (c, digest) in components.iter().zip(&digests) {
            let answer = http(
                &sock,
                "PUT",
                &format!("/v1/blobs/{digest}"),
                &std::fs::read(c).unwrap(),
            );
            assert!(matches!(answer, Some((200 | 201, _))), "upload: {answer:?}");
        }
        // A stream of changes from another thread until the daemon dies.
        let shared = Arc::new(Mutex::new((model.clone(), None::<Op>, 0usize)));
        let worker = {
            let (shared, sock, digests) = (shared.clone(), sock.clone(), digests.clone());
            let mut rng = Rng(rng.next(u64::MAX) | 1);
            std::thread::spawn(move || {
                loop {
                    let current = shared.lock().unwrap().0.clone();
                    let name = format!("m{}", rng.next(6));
                    let digest = digests[rng.next(2) as usize].clone();
                    let op = match current.get(&name) {
                        None => Op::Add(name.clone(), digest),
                        Some(_) if rng.next(3) == 0 => Op::Remove(name.clone()),
                        Some(old) => {
                            let other = digests.iter().find(|d| *d != old).unwrap().clone();
                            Op::Update(name.clone(), other)
                        }
                    };
                    shared.lock().unwrap().1 = Some(op.clone());
                    let spec = |d: &str| {
                        format!(r#"{{"name":"{name}","digest":"{d}","args":["tick"]}}"#)
                            .into_bytes()
                    };
                    let answer = match &op {
                        Op::Add(_, d) => http(&sock, "POST", "/v1/modules", &spec(d)),
                        Op::Update(n, d) => {
                            http(&sock, "PUT", &format!("/v1/modules/{n}"), &spec(d))
                        }
                        Op::Remove(n) => http(&sock, "DELETE", &format!("/v1/modules/{n}"), b""),
                    };
                    let Some((status, body)) = answer else {
                        return; // the daemon died with `op` in flight
                    };
                    assert!(matches!(status, 200 | 201 | 204), "{op:?}: {status} {body}");
                    let mut g = shared.lock().unwrap();
                    op.apply(&mut g.0);
                    g.1 = None;
                    g.2 += 1;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(30 + rng.next(400)));
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        worker.join().unwrap();
        let g = shared.lock().unwrap();
        model = g.0.clone();
        in_flight = g.1.clone();
        acknowledged += g.2;
    }
    // Last: the registry is as acknowledged, and what is registered runs.
    let d = start(&s);
    let now = listed(&sock);
    let seen: Model = now
        .iter()
        .map(|(n, (d, _))| (n.clone(), d.clone()))
        .collect();
    let mut after = model.clone();
    if let Some(op) = &in_flight {
        op.apply(&mut after);
    }
    assert!(
        seen == model || seen == after,
        "{seen:?} vs {model:?} / {in_flight:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = listed(&sock);
        if states.values().all(|(_, state)| state == "running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registered but not running: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "crash test: 50 kills, {acknowledged} acknowledged changes, {} modules registered at the end",
        seen.len()
    );
    let _ = d.terminate();
}
