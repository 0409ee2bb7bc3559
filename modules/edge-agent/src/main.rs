//! Sample edgeward agent: keeps the daemon's agent-owned modules in line
//! with a deployment manifest in its config directory.
//!
//! The daemon preopens the agent's `config_dir` read-only as `/config` and
//! watches it. The manifest (`/config/deployment.toml`, or the `manifest`
//! setting) is what `edgeward deploy` takes: a `version` and `[[module]]`
//! tables whose `file` is relative to `/config` and whose `digest`, if
//! given, pins it. On start and after every change to the directory (the
//! host answers `wait-for-change`, no polling; once an hour regardless, to
//! undo drift), the agent stores each component the daemon does not hold
//! yet and deploys the manifest, which adds, updates and removes the
//! agent's modules (never the operator's or the config file's). Each
//! outcome is one JSON line on stdout:
//!
//! ```text
//! {"agent":"reconciled","version":"7","add":["s2"],"update":["s1"],"remove":[],"unchanged":[]}
//! {"agent":"refused","version":"8","error":"not permitted: ..."}
//! ```
//!
//! A missing or unreadable manifest changes nothing (the modules keep
//! running); a manifest with no modules removes them all. A signature
//! beside it (`deployment.toml.sig`, from `edgeward sign`) is sent along:
//! a daemon with `[signatures] manifests = "require"` refuses the manifest
//! without one.

use std::process::ExitCode;
use std::time::Duration;

use edgeward_sdk::{management, settings};
use serde_json::{Map, Value, json};

/// Where the daemon preopens the agent's config directory.
const CONFIG: &str = "/config";
/// Reconcile at least this often, changes or not.
const RESYNC: Duration = Duration::from_secs(3600);

fn main() -> ExitCode {
    let manifest = match settings::get("manifest") {
        Ok(Some(m)) if !m.is_empty() && !m.contains('/') && m != ".." => m,
        Ok(Some(m)) => {
            eprintln!("edge-agent: setting manifest = {m:?}: a file name in {CONFIG}");
            return ExitCode::from(2);
        }
        Ok(None) => "deployment.toml".to_owned(),
        Err(e) => {
            eprintln!("edge-agent: settings: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = format!("{CONFIG}/{manifest}");
    loop {
        println!("{}", reconcile(&path));
        if let Err(e) = management::wait_for_change(RESYNC) {
            eprintln!("edge-agent: cannot wait for changes: {e}");
            return ExitCode::FAILURE;
        }
    }
}

/// Reads the manifest and deploys it; the outcome as a JSON line.
fn reconcile(path: &str) -> Value {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return json!({"agent": "waiting", "error": format!("{path}: {e}; nothing changed")});
        }
    };
    let (version, mut deployment) = match deployment(path, &text) {
        Ok(d) => d,
        Err(e) => return json!({"agent": "refused", "error": e}),
    };
    // Signed (`edgeward sign --key K deployment.toml` wrote the .sig
    // beside it): the manifest goes as signed, and the daemon applies what
    // the signature covers; the components were stored above.
    let sig_path = format!("{path}.sig");
    match std::fs::read(&sig_path) {
        Ok(sig) => {
            use base64ct::Encoding as _;
            deployment = json!({
                "manifest": text,
                "signature": base64ct::Base64::encode_string(&sig),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return json!({"agent": "refused", "version": version, "error": format!("{sig_path}: {e}")});
        }
    }
    match management::deploy(&deployment.to_string(), false) {
        Ok(plan) => json!({
            "agent": "reconciled",
            "version": plan.version,
            "add": plan.add,
            "update": plan.update,
            "remove": plan.remove,
            "unchanged": plan.unchanged,
        }),
        Err(e) => json!({"agent": "refused", "version": version, "error": e.to_string()}),
    }
}

/// The manifest as the management service takes it: each `file` stored
/// (unless its pinned digest already is) and replaced by its digest.
fn deployment(path: &str, text: &str) -> Result<(String, Value), String> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| format!("{path}: {e}"))?;
    let mut doc = serde_json::to_value(doc).map_err(|e| format!("{path}: {e}"))?;
    let Some(doc) = doc.as_object_mut() else {
        return Err(format!("{path}: not a table"));
    };
    let version = match doc.remove("version") {
        Some(Value::String(v)) => v,
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(format!("{path}: version: missing (a string or number)")),
    };
    let modules = match doc.remove("module") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(format!("{path}: module: expected [[module]] tables")),
    };
    let policy = doc.remove("signature_policy");
    let publishers = doc.remove("publishers");
    // What a signature binds the deployment to (the daemon checks them).
    let target = doc.remove("target");
    let expires = doc.remove("expires");
    if let Some(k) = doc.keys().next() {
        return Err(format!("{path}: unknown key {k:?}"));
    }
    let modules = modules
        .into_iter()
        .map(|m| match m {
            Value::Object(m) => stored(m),
            _ => Err(format!("{path}: module: expected [[module]] tables")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut d = json!({"version": version, "modules": modules});
    if let Some(p) = policy {
        d["signature_policy"] = p;
    }
    if let Some(p) = publishers {
        d["publishers"] = p;
    }
    if let Some(t) = target {
        d["target"] = t;
    }
    if let Some(e) = expires {
        d["expires"] = e;
    }
    Ok((version, d))
}

/// One module table with its `file` stored and named by digest.
fn stored(mut m: Map<String, Value>) -> Result<Value, String> {
    let name = m
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    let pinned = m.get("digest").and_then(Value::as_str).map(str::to_owned);
    let Some(file) = m.remove("file") else {
        return Ok(Value::Object(m));
    };
    let Some(file) = file.as_str() else {
        return Err(format!("module {name:?}: file: expected a string"));
    };
    let known = match &pinned {
        Some(d) => management::has_component(d).map_err(|e| format!("module {name:?}: {e}"))?,
        None => false,
    };
    if !known {
        let at = format!("{CONFIG}/{file}");
        let bytes = std::fs::read(&at).map_err(|e| format!("module {name:?}: {at}: {e}"))?;
        let digest =
            management::put_component(&bytes).map_err(|e| format!("module {name:?}: {e}"))?;
        if let Some(p) = &pinned
            && *p != digest
        {
            return Err(format!(
                "module {name:?}: {at} is {digest}, the manifest pins {p}"
            ));
        }
        m.insert("digest".into(), Value::String(digest));
    }
    Ok(Value::Object(m))
}
