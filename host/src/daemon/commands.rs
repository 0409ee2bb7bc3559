//! Applies the management API's changes to the supervisor and the
//! registry, one at a time. A change is acknowledged (the reply sent) only
//! after the registry has committed it, so an acknowledged change survives
//! a crash; one that fails leaves the registry as it was.

use std::path::Path;

use axum::http::StatusCode;

use super::Supervisor;
use crate::api::{ApiError, Command, Request};
use crate::config::Config;
use crate::registry::{Desired, ModuleRecord, Origin};
use crate::spec::ModuleSpec;

/// Carries out `req` and replies.
pub(super) async fn apply(req: Request, sup: &mut Supervisor, config: &Config) {
    let by = req.by;
    let kind = match &req.command {
        Command::Update(..) | Command::Remove(..) => Kind::Changed,
        _ => Kind::Other,
    };
    let (result, reply) = match req.command {
        Command::Deploy(d, reply) => {
            let r = deploy(sup, *d, by).await;
            if let Err(e) = &r {
                tracing::info!(status = %e.status, by = ?by, "deployment not applied: {}", crate::runtime::escape::escape_str(&e.message));
            }
            let applied = r.is_ok();
            let _ = reply.send(r);
            if applied {
                sup.collect_garbage(&config.modules, GC_GRACE);
            }
            return;
        }
        Command::Add(spec, reply) => (add(sup, *spec, by).await, reply),
        Command::Update(spec, reply) => (update(sup, *spec, by).await, reply),
        Command::Start(name, reply) => (start(sup, &name, config, by).await, reply),
        Command::Stop(name, reply) if sup.is_agent(&name) => (
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "module {name:?} is the agent, which always runs: change [agent] in the config file"
                ),
            )),
            reply,
        ),
        Command::Stop(name, reply) => (stop(sup, &name, by).await, reply),
        Command::Restart(name, reply) => {
            let r = match stop(sup, &name, by).await {
                Ok(()) => start(sup, &name, config, by).await,
                Err(e) => Err(e),
            };
            (r, reply)
        }
        Command::Remove(name, reply) => (remove(sup, &name, by).await, reply),
        Command::Reset(name, reply) => (reset(sup, &name, config, by).await, reply),
    };
    if let Err(e) = &result {
        // The message can quote what a caller sent: escaped, so it cannot
        // forge log lines.
        tracing::info!(status = %e.status, by = ?by, "management request not carried out: {}", crate::runtime::escape::escape_str(&e.message));
    }
    let collect = result.is_ok() && matches!(kind, Kind::Changed);
    let _ = reply.send(result);
    // After the reply: the caller does not wait for the sweep.
    if collect {
        sup.collect_garbage(&config.modules, GC_GRACE);
    }
}

/// How old an unreferenced component or cache entry must be before a
/// sweep after a change deletes it: a younger one may be an upload whose
/// module is on its way.
const GC_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether a command can leave a component unreferenced.
enum Kind {
    Changed,
    Other,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "management change failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn record(sup: &Supervisor, name: &str) -> Result<ModuleRecord, ApiError> {
    sup.registry()
        .module(name)
        .map_err(internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no module {name:?}")))
}

/// The record of a module `by` may act on: each origin only its own, on
/// every route, as deployments are held (the operator also the config
/// file's, whose code and spec stay the file's to change). A module keeps
/// its origin's identity and sealed data, so another origin must never
/// replace, remove, start or stop it.
fn owned(sup: &Supervisor, name: &str, by: Origin) -> Result<ModuleRecord, ApiError> {
    let rec = record(sup, name)?;
    let mine = rec.origin == by || (by == Origin::Operator && rec.origin == Origin::Config);
    if !mine {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "module {name:?} belongs to the {}, not the {}",
                origin_name(rec.origin),
                origin_name(by)
            ),
        ));
    }
    Ok(rec)
}

fn origin_name(o: Origin) -> &'static str {
    match o {
        Origin::Config => "config file",
        Origin::Operator => "operator",
        Origin::Agent => "agent",
        Origin::Cloud => "cloud",
    }
}

/// Registers the new module (its origin: `by`), then starts it; a module
/// that cannot start is removed again, files and registration.
async fn add(sup: &mut Supervisor, spec: ModuleSpec, by: Origin) -> Result<(), ApiError> {
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let name = spec.name.as_str();
    if sup.registry().module(name).map_err(internal)?.is_some() {
        return Err(conflict(format!("module {name:?} exists")));
    }
    // A new module never inherits what another left under its name: its
    // identity registration (which opens that one's sealed data) or files.
    if sup
        .registry()
        .registration(name)
        .map_err(internal)?
        .is_some()
    {
        return Err(conflict(format!(
            "an identity registration named {name:?} is kept from an earlier module (it opens that module's sealed data): `edgeward deregister {name}` with the daemon stopped, or choose another name"
        )));
    }
    let data = super::records::module_dir(sup.state_dir(), name).join("data");
    if std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_some()) {
        return Err(conflict(format!(
            "{} holds files an earlier module {name:?} left: delete them, or choose another name",
            data.display()
        )));
    }
    // Registered first, so the identity its start creates belongs to a
    // registered module (a crash in between leaves a module that starts at
    // the next boot: the change wholly there); a refusal undoes it.
    let rec = ModuleRecord {
        spec: spec.to_raw(),
        origin: by,
        desired: Desired::Running,
        updated_at: crate::identity::unix_now(),
    };
    sup.registry().put_module(&rec).map_err(internal)?;
    if let Err(e) = sup.start(spec.clone()).await {
        let undo = delete_module(sup, &spec.name).await;
        if let Err(u) = undo {
            tracing::error!(module = %spec.name, error = %u.message, "cannot undo a refused add");
        }
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("module {:?} refused: {e:#}", spec.name),
        ));
    }
    tracing::info!(module = %spec.name, by = ?by, "module added through the management API");
    Ok(())
}

/// Reconciles `by`'s modules with a deployment: removals, then
/// updates, then additions, each one as its own command would. The
/// deployment is recorded as applied once every change is; a change that
/// fails stops the rest, and the answer names what was done.
async fn deploy(
    sup: &mut Supervisor,
    d: crate::api::CheckedDeployment,
    by: Origin,
) -> Result<crate::api::Plan, ApiError> {
    let records = sup.registry().modules().map_err(internal)?;
    let plan = crate::api::Plan::of(&d, &records, by)?;
    let mut done: Vec<String> = Vec::new();
    let failed = |done: &[String], what: String, e: ApiError| {
        ApiError::new(
            e.status,
            format!(
                "deployment {:?}: {what}: {} (applied before it: {})",
                d.deployment.version,
                e.message,
                if done.is_empty() {
                    "nothing".to_owned()
                } else {
                    done.join(", ")
                }
            ),
        )
    };
    for name in &plan.remove {
        remove(sup, name, by)
            .await
            .map_err(|e| failed(&done, format!("removing {name:?}"), e))?;
        done.push(format!("removed {name}"));
    }
    for spec in &d.specs {
        if plan.update.contains(&spec.name) {
            update(sup, spec.clone(), by)
                .await
                .map_err(|e| failed(&done, format!("updating {:?}", spec.name), e))?;
            done.push(format!("updated {}", spec.name));
        } else if plan.add.contains(&spec.name) {
            add(sup, spec.clone(), by)
                .await
                .map_err(|e| failed(&done, format!("adding {:?}", spec.name), e))?;
            done.push(format!("added {}", spec.name));
        }
    }
    let bytes = serde_json::to_vec(&d.deployment).map_err(internal)?;
    sup.registry()
        .put_meta(crate::api::deployment_key(by), &bytes)
        .map_err(internal)?;
    let canonical = serde_json::to_value(&d.deployment)
        .map_err(|e| e.to_string())
        .and_then(|v| crate::attest::jcs::canonical(&v));
    if let Ok(canonical) = canonical {
        sup.measure(serde_json::json!({
            "kind": "deployment",
            "origin": by,
            "version": d.deployment.version,
            "sha256": crate::measure::Digest::of(canonical.as_bytes()).to_string(),
            "signed_by": d.deployment.signed_by,
        }))
        .await;
    }
    tracing::info!(by = ?by, version = %crate::runtime::escape::escape_str(&d.deployment.version), added = plan.add.len(), updated = plan.update.len(), removed = plan.remove.len(), "deployment applied");
    Ok(plan)
}

/// Replaces an operator's module's spec; a running module is switched over
/// only once the new version is measured and compiled.
async fn update(sup: &mut Supervisor, spec: ModuleSpec, by: Origin) -> Result<(), ApiError> {
    let mut rec = owned(sup, &spec.name, by)?;
    if rec.origin == Origin::Config {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "module {:?} belongs to the config file: change it there",
                spec.name
            ),
        ));
    }
    if rec.desired == Desired::Running {
        let refused = |e: anyhow::Error| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("module {:?}: update refused: {e:#}", spec.name),
            )
        };
        if sup.spec(&spec.name).is_some() {
            sup.replace(spec.clone()).await.map_err(refused)?;
        } else {
            sup.start(spec.clone()).await.map_err(refused)?;
        }
    }
    rec.spec = spec.to_raw();
    rec.updated_at = crate::identity::unix_now();
    sup.registry().put_module(&rec).map_err(internal)?;
    tracing::info!(module = %spec.name, digest = %spec.digest, "module updated through the management API");
    Ok(())
}

/// Starts a registered module (nothing to do if it runs) and records that
/// it should run.
async fn start(
    sup: &mut Supervisor,
    name: &str,
    config: &Config,
    by: Origin,
) -> Result<(), ApiError> {
    let mut rec = owned(sup, name, by)?;
    if sup.spec(name).is_none() {
        let spec = rec
            .spec
            .clone()
            .validate(&|p: &Path| p.to_owned(), &config.runtime.ceilings)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        if rec.origin != Origin::Config {
            config.grants.check(&spec).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("module {name:?}: {e}"),
                )
            })?;
        }
        sup.start(spec).await.map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("module {name:?} refused: {e:#}"),
            )
        })?;
    }
    if rec.desired != Desired::Running {
        rec.desired = Desired::Running;
        rec.updated_at = crate::identity::unix_now();
        sup.registry().put_module(&rec).map_err(internal)?;
    }
    Ok(())
}

/// Stops a module (nothing to do if it does not run) and records that it
/// should not run.
async fn stop(sup: &mut Supervisor, name: &str, by: Origin) -> Result<(), ApiError> {
    let mut rec = owned(sup, name, by)?;
    sup.stop(name).await;
    if rec.desired != Desired::Stopped {
        rec.desired = Desired::Stopped;
        rec.updated_at = crate::identity::unix_now();
        sup.registry().put_module(&rec).map_err(internal)?;
    }
    Ok(())
}

/// Clears a module's backoff (it starts now if it was waiting to); one
/// that should run but is no longer supervised (it exited by its policy,
/// failed or was refused) is started again. A stopped module stays
/// stopped.
async fn reset(
    sup: &mut Supervisor,
    name: &str,
    config: &Config,
    by: Origin,
) -> Result<(), ApiError> {
    let rec = owned(sup, name, by)?;
    if rec.desired == Desired::Stopped || sup.reset(name) {
        return Ok(());
    }
    sup.stop(name).await;
    start(sup, name, config, by).await
}

/// Stops a module and deletes it with its identity registration. Modules
/// the config file owns are removed there.
async fn remove(sup: &mut Supervisor, name: &str, by: Origin) -> Result<(), ApiError> {
    let rec = owned(sup, name, by)?;
    if rec.origin == Origin::Config {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("module {name:?} belongs to the config file: remove it there"),
        ));
    }
    sup.stop(name).await;
    delete_module(sup, name).await?;
    tracing::info!(module = name, by = ?by, "module removed through the management API");
    Ok(())
}

/// Deletes a stopped module: its data, logs and status first (a failure
/// leaves it registered, for a retry), then its registration and identity,
/// in one transaction.
async fn delete_module(sup: &mut Supervisor, name: &str) -> Result<(), ApiError> {
    let dir = sup.state_dir().to_owned();
    let n = name.to_owned();
    let registry = sup.shared_registry();
    tokio::task::spawn_blocking(move || super::records::delete(&registry, &dir, &n))
        .await
        .map_err(internal)?
        .map_err(|e| internal(format!("cannot delete the module's files: {e}")))?;
    let registration = sup.registry().registration(name).map_err(internal)?;
    sup.registry().remove_module(name).map_err(internal)?;
    // Committed first: a crash here leaves a key no registration names,
    // destroyed at the next start.
    if let Some(rec) = registration {
        sup.measure(serde_json::json!({
            "kind": "registration-removed",
            "name": name,
            "generation": rec.generation_id,
        }))
        .await;
        sup.forget(rec).await;
    }
    Ok(())
}
