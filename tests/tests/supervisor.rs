//! The supervisor, driven directly: one change at a time, without touching
//! the modules it does not name.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use edgeward::daemon::Supervisor;
use edgeward::daemon::records::{self, ModuleState};
use edgeward::runtime::engine::{DEFAULT_MAX_WASM_STACK, ModuleCeilings};
use edgeward::runtime::{EngineOptions, Runtime, RuntimeOptions};
use edgeward::spec::{ModuleSpec, RawModuleSpec};

fn spec(name: &str, file: &str, args: &[&str]) -> ModuleSpec {
    RawModuleSpec {
        name: name.into(),
        file: Some(file.into()),
        digest: sha256sum(file),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..RawModuleSpec::default()
    }
    .validate(&|p: &Path| p.to_owned(), &ModuleCeilings::default())
    .unwrap()
}

fn supervisor(state: &Path) -> Supervisor {
    std::fs::create_dir_all(state).unwrap();
    let rt = Runtime::new(&RuntimeOptions {
        engine: EngineOptions {
            max_instances: 8,
            ceilings: ModuleCeilings::default(),
            max_memory: 64 << 20,
            pooling: None,
            max_wasm_stack: DEFAULT_MAX_WASM_STACK,
        },
        state_dir: Some(state.to_owned()),
        cache_key: edgeward::runtime::cache::CacheKey::StateDir,
    })
    .unwrap();
    let hsm = edgeward::hsm::open(&Default::default(), state).unwrap();
    let identity =
        edgeward::identity::IdentityService::open(hsm, Default::default(), state).unwrap();
    let registry = Arc::new(edgeward::registry::Registry::open(state).unwrap());
    Supervisor::new(Arc::new(rt), identity, registry, state, false).unwrap()
}

fn state_of(sup: &Supervisor, name: &str) -> Option<ModuleState> {
    records::flush();
    records::read_statuses(sup.registry())
        .into_iter()
        .flatten()
        .find(|s| s.module == name)
        .map(|s| s.state)
}

/// Waits (up to 20 s) for `name`'s status to say running: a start returns
/// before the module's task has recorded it.
async fn running(sup: &Supervisor, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state_of(sup, name) != Some(ModuleState::Running) {
        assert!(std::time::Instant::now() < deadline, "{name} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_one_module_leaves_the_others_running() {
    let s = Scratch::new();
    let state = s.state();
    let mut sup = supervisor(&state);
    let probe = guests::SANDBOX_PROBE;
    sup.start(spec("a", probe, &["tick"])).await.unwrap();
    sup.start(spec("b", probe, &["tick"])).await.unwrap();
    // A second start of a running name is refused; nothing changes.
    let again = sup.start(spec("a", probe, &["tick"])).await.unwrap_err();
    assert!(again.to_string().contains("already running"), "{again}");
    assert_eq!(sup.names(), ["a", "b"]);
    running(&sup, "a").await;

    assert!(sup.stop("a").await);
    assert!(!sup.stop("a").await, "already stopped");
    assert_eq!(state_of(&sup, "a"), Some(ModuleState::Stopped));
    running(&sup, "b").await;
    assert_eq!(sup.names(), ["b"]);

    // Started again under the same name, with its registration kept.
    sup.start(spec("a", probe, &["tick"])).await.unwrap();
    running(&sup, "a").await;

    // A refusal (a digest that does not match) is recorded and returned.
    let mut bad = spec("c", probe, &["tick"]);
    bad.digest = sha256sum(guests::TEMPERATURE_SENSOR).parse().unwrap();
    let refused = sup.start(bad).await.unwrap_err();
    assert!(format!("{refused:#}").contains("digest"), "{refused:#}");
    assert_eq!(state_of(&sup, "c"), Some(ModuleState::Refused));

    // By digest alone, from the component store (stored once, when "a"
    // was first measured).
    let mut by_digest = spec("d", probe, &["tick"]);
    by_digest.file = None;
    sup.start(by_digest.clone()).await.unwrap();
    let stored = std::fs::read_dir(state.join("components")).unwrap().count();
    assert_eq!(stored, 1, "one copy for three modules");
    // A stored component altered on disk is refused, never run.
    assert!(sup.stop("d").await);
    let path = state.join("components").join(format!(
        "{}.wasm",
        by_digest.digest.to_string().replace(':', "-")
    ));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let refused = sup.start(by_digest).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("does not match"),
        "{refused:#}"
    );
    assert_eq!(state_of(&sup, "d"), Some(ModuleState::Refused));

    sup.stop_all().await;
    assert_eq!(state_of(&sup, "a"), Some(ModuleState::Stopped));
    assert_eq!(state_of(&sup, "b"), Some(ModuleState::Stopped));
    assert!(sup.names().is_empty());
}
