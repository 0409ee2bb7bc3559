//! Test guest: the management interface from the agent's side.
//!
//! - `hostile OPERATOR_MODULE`: tries what an agent may not do and prints
//!   one line per call, `NAME: ok ...` or `NAME: err <kind>: <message>`,
//!   then `done`.
//! - `watch`: prints `watching`, then `changed <unix µs>` each time its
//!   config directory changes (waits of 60 s; a timeout prints `timeout`).
//!   The time is in microseconds since the epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeward_sdk::management;

fn report<T: std::fmt::Debug>(what: &str, r: edgeward_sdk::Result<T>) {
    match r {
        Ok(v) => println!("{what}: ok {v:?}"),
        Err(e) => println!("{what}: err {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("hostile") => hostile(args.get(2).map_or("op", String::as_str)),
        Some("watch") => watch(),
        _ => {
            eprintln!("usage: agent-probe hostile OPERATOR_MODULE | watch");
            std::process::exit(2);
        }
    }
}

fn hostile(op: &str) {
    let zero = format!("sha256:{}", "0".repeat(64));
    report("list", management::list().map(|l| l.len()));
    report("stop-operator", management::stop(op));
    report("remove-operator", management::remove(op));
    report("start-operator", management::start(op));
    report("remove-self", management::remove("agent"));
    report("stop-self", management::stop("agent"));
    report("start-nobody", management::start("nobody"));
    report("bad-name", management::stop("../etc"));
    report("exits-bad-name", management::exits("a/b"));
    report("bad-digest", management::has_component("sha256:xyz"));
    report("bad-json", management::deploy("{not json", false));
    report(
        "host-path",
        management::deploy(
            &format!(
                r#"{{"version":"1","modules":[{{"name":"x","digest":"{zero}","file":"/etc/passwd"}}]}}"#
            ),
            false,
        ),
    );
    report(
        "host-dir",
        management::deploy(
            &format!(
                r#"{{"version":"1","modules":[{{"name":"x","digest":"{zero}","dirs":["/etc"]}}]}}"#
            ),
            false,
        ),
    );
    report(
        "not-stored",
        management::deploy(
            &format!(r#"{{"version":"1","modules":[{{"name":"x","digest":"{zero}"}}]}}"#),
            false,
        ),
    );
    let stored = management::put_component(b"not a component").unwrap_or_default();
    report(
        "claim-operator",
        management::deploy(
            &format!(r#"{{"version":"1","modules":[{{"name":"{op}","digest":"{stored}"}}]}}"#),
            false,
        ),
    );
    report(
        "not-a-component",
        management::deploy(
            &format!(r#"{{"version":"1","modules":[{{"name":"junk","digest":"{stored}"}}]}}"#),
            false,
        ),
    );
    report(
        "wait-too-long",
        management::wait_for_change(Duration::from_secs(25 * 3600)),
    );
    report(
        "wait-briefly",
        management::wait_for_change(Duration::from_millis(50)),
    );
    report(
        "list-after",
        management::list().map(|l| {
            l.into_iter()
                .map(|m| format!("{}={}", m.name, m.origin))
                .collect::<Vec<_>>()
        }),
    );
    println!("done");
}

fn watch() {
    println!("watching");
    loop {
        match management::wait_for_change(Duration::from_secs(60)) {
            Ok(true) => {
                let us = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros());
                println!("changed {us}");
            }
            Ok(false) => println!("timeout"),
            Err(e) => {
                println!("error {e}");
                return;
            }
        }
    }
}
