//! The `edgeward` binary, built inside the test package so integration
//! tests can run it through `CARGO_BIN_EXE_edgeward-under-test`. It is the
//! same one-line `main` as `host/src/main.rs`, plus one test seam the
//! shipped binary does not have: `EDGEWARD_TEST_RESOLVER` scripts name
//! resolution (`NAME=FIRST|THEN;…`: the first lookup of NAME answers FIRST,
//! every later one THEN), so a test can rebind a name between two lookups
//! without a DNS server.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;

#[derive(Debug)]
struct Scripted {
    answers: HashMap<String, (IpAddr, IpAddr)>,
    asked: Mutex<HashMap<String, usize>>,
}

impl edgeward::runtime::network::Resolver for Scripted {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + Sync + 'a>> {
        let n = self
            .asked
            .lock()
            .map(|mut a| {
                let c = a.entry(name.to_owned()).or_default();
                *c += 1;
                *c
            })
            .unwrap_or(1);
        let answer = self
            .answers
            .get(name)
            .map(|(first, then)| vec![if n == 1 { *first } else { *then }])
            .ok_or_else(|| std::io::Error::other(format!("{name}: not scripted")));
        Box::pin(async move { answer })
    }
}

fn scripted(spec: &str) -> Option<Scripted> {
    let mut answers = HashMap::new();
    for entry in spec.split(';').filter(|e| !e.is_empty()) {
        let (name, ips) = entry.split_once('=')?;
        let (first, then) = ips.split_once('|')?;
        answers.insert(name.to_owned(), (first.parse().ok()?, then.parse().ok()?));
    }
    Some(Scripted {
        answers,
        asked: Mutex::default(),
    })
}

fn main() -> std::process::ExitCode {
    if let Ok(spec) = std::env::var("EDGEWARD_TEST_RESOLVER") {
        let Some(r) = scripted(&spec) else {
            eprintln!("EDGEWARD_TEST_RESOLVER: expected NAME=IP|IP;...");
            return std::process::ExitCode::from(2);
        };
        edgeward::runtime::network::set_default_resolver(std::sync::Arc::new(r));
    }
    edgeward::cli::main()
}
