//! The `edgeward:host/workload` interface, linked into every module.
//!
//! Each store holds a [`WorkloadCtx`]: the module's [`ModuleIdentity`] (or
//! none, for embedders that start modules without one; then every call but
//! `whoami` returns `unavailable`). Calls that may need the HSM (issuing a
//! certificate) run on tokio's blocking pool so a slow TPM never stalls the
//! scheduler; the rest are plain function calls.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::loglimit::LogLimiter;
use super::meter::Call;
use edgeward_trust::identity::{Credentials, IdentityError, IdentityHandle, ModuleIdentity};

/// Host bindings generated from `wit/` (world `edgeward:host/agent`: the
/// module world and `management`, which only the agent is linked with; see
/// `api::agent`).
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "agent",
        imports: {
            "edgeward:host/management": async,
            "edgeward:host/workload.identity-certificate": async,
            "edgeward:host/workload.server-certificate": async,
            "edgeward:host/workload.sign": async,
            "edgeward:host/workload.token": async,
            "edgeward:host/workload.validate-token": async,
        },
    });
}

use bindings::edgeward::host::{types, workload};

/// The per-store state behind the `workload` interface.
#[derive(Debug, Clone)]
pub struct WorkloadCtx {
    identity: Option<Arc<IdentityHandle>>,
    program: String,
    /// Internal errors the module triggers are logged within this budget.
    log: Arc<LogLimiter>,
    meter: Arc<super::meter::ModuleMeter>,
}

impl WorkloadCtx {
    /// State for a module with `identity`; `program` names it when there is
    /// none; its calls are counted by `meter`.
    pub fn new(
        identity: Option<Arc<IdentityHandle>>,
        program: &str,
        meter: Arc<super::meter::ModuleMeter>,
    ) -> Self {
        Self {
            identity,
            program: program.to_owned(),
            log: Arc::new(LogLimiter::new(program, "workload errors")),
            meter,
        }
    }

    /// The identity if it already exists (never blocks).
    fn ready(&self) -> Option<&Arc<ModuleIdentity>> {
        self.identity
            .as_deref()
            .and_then(IdentityHandle::get_if_ready)
    }

    /// The identity, made on first use if deferred (which may block on the
    /// HSM once; the async calls do that on the blocking pool instead).
    fn identity(&self) -> Result<Arc<ModuleIdentity>, types::Error> {
        self.identity
            .as_deref()
            .ok_or_else(no_identity)?
            .get()
            .map_err(|e| self.wit(e))
    }
}

/// Adds `edgeward:host/workload` (and `types`) to `linker`: only those,
/// not the whole `module` world (its `wasi:config/store` is
/// `wasmtime-wasi-config`'s, linked beside it).
///
/// # Errors
///
/// When the names are already defined.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut WorkloadCtx,
) -> wasmtime::Result<()> {
    workload::add_to_linker::<T, HasSelf<WorkloadCtx>>(linker, get)
}

fn no_identity() -> types::Error {
    types::Error::Unavailable("this module was started without a workload identity".into())
}

impl WorkloadCtx {
    /// The WIT error for `e`; internal details are logged (within the
    /// module's budget), never handed to the module.
    fn wit(&self, e: IdentityError) -> types::Error {
        to_wit(e, &self.log)
    }
}

fn to_wit(e: IdentityError, log: &LogLimiter) -> types::Error {
    match e {
        IdentityError::NotPermitted(m) => types::Error::NotPermitted(m),
        IdentityError::InvalidArgument(m) => types::Error::InvalidArgument(m),
        IdentityError::Unavailable(m) => types::Error::Unavailable(m),
        other => {
            // Details stay in the host log.
            if log.allow() {
                tracing::error!(error = %other, "workload call failed");
            }
            types::Error::Internal(
                "the host could not complete the call; see the daemon log".into(),
            )
        }
    }
}

fn credentials(c: Credentials) -> workload::Credentials {
    workload::Credentials {
        certificate_chain: c.certificate_chain,
        private_key: c.private_key.to_string(),
        expires_at: c.expires_at,
    }
}

/// Runs `f` on the module's identity on the blocking pool.
async fn blocking<R: Send + 'static>(
    ctx: &WorkloadCtx,
    f: impl FnOnce(&ModuleIdentity) -> Result<R, IdentityError> + Send + 'static,
) -> Result<R, types::Error> {
    let handle = ctx.identity.clone().ok_or_else(no_identity)?;
    match tokio::task::spawn_blocking(move || f(handle.get()?.as_ref())).await {
        Ok(r) => r.map_err(|e| ctx.wit(e)),
        Err(e) => Err(ctx.wit(IdentityError::Internal(format!("blocking task: {e}")))),
    }
}

impl types::Host for WorkloadCtx {}

impl workload::Host for WorkloadCtx {
    fn whoami(&mut self) -> workload::Identity {
        self.meter.call(Call::Whoami);
        match self.identity() {
            Ok(id) => {
                let w = id.whoami();
                workload::Identity {
                    module_name: w.module_name.clone(),
                    device_id: w.device_id.clone(),
                    generation_id: w.generation_id.clone(),
                    digest: w.digest.clone(),
                    spiffe_id: w.spiffe_id.clone(),
                }
            }
            // No identity (logged where it failed): the program name only.
            Err(_) => workload::Identity {
                module_name: self.program.clone(),
                device_id: String::new(),
                generation_id: String::new(),
                digest: String::new(),
                spiffe_id: String::new(),
            },
        }
    }

    async fn token(
        &mut self,
        audience: Vec<String>,
        ttl_seconds: u32,
    ) -> Result<String, types::Error> {
        self.meter.call(Call::Token);
        // Signed by the in-memory working key: inline. Only when that key
        // must be made or replaced first (an HSM signature, a file write)
        // does the call move to the blocking pool.
        if let Some(id) = self.ready()
            && id.service().tokens().can_issue_now(ttl_seconds)
        {
            return id.token(&audience, ttl_seconds).map_err(|e| self.wit(e));
        }
        blocking(self, move |id| id.token(&audience, ttl_seconds)).await
    }

    async fn validate_token(
        &mut self,
        token: String,
        audience: String,
    ) -> Result<workload::Claims, types::Error> {
        self.meter.call(Call::ValidateToken);
        // Known keys are in memory: inline. An unknown `kid` may re-read the
        // published keys from disk: blocking pool.
        let c = match self.ready() {
            Some(id) if id.service().tokens().can_validate_now(&token) => id
                .validate_token(&token, &audience)
                .map_err(|e| self.wit(e))?,
            _ => blocking(self, move |id| id.validate_token(&token, &audience)).await?,
        };
        Ok(workload::Claims {
            subject: c.subject,
            audience: c.audience,
            issued_at: c.issued_at,
            expires_at: c.expires_at,
            digest: c.digest,
        })
    }

    async fn identity_certificate(&mut self) -> Result<workload::Credentials, types::Error> {
        self.meter.call(Call::IdentityCertificate);
        // The current leaf is in memory: inline. Issuing or renewing one is
        // an HSM signature: blocking pool.
        if let Some(leaf) = self.ready().and_then(|id| id.leaf_if_current()) {
            return Ok(credentials(Credentials::from(leaf.as_ref())));
        }
        blocking(self, |id| id.identity_certificate())
            .await
            .map(credentials)
    }

    async fn server_certificate(
        &mut self,
        common_name: String,
        alt_names: Vec<String>,
    ) -> Result<workload::Credentials, types::Error> {
        self.meter.call(Call::ServerCertificate);
        blocking(self, move |id| {
            id.server_certificate(&common_name, &alt_names)
        })
        .await
        .map(credentials)
    }

    fn trust_bundle(&mut self) -> Result<String, types::Error> {
        self.meter.call(Call::TrustBundle);
        Ok(self.identity()?.trust_bundle())
    }

    async fn sign(&mut self, data: Vec<u8>) -> Result<Vec<u8>, types::Error> {
        self.meter.call(Call::Sign);
        edgeward_trust::identity::check_size(
            "data",
            data.len(),
            edgeward_trust::identity::MAX_SIGN_INPUT,
        )
        .map_err(|e| self.wit(e))?;
        // The leaf is current almost always: sign inline, no thread hop.
        if let Some(leaf) = self.ready().and_then(|id| id.leaf_if_current()) {
            return edgeward_trust::identity::sign_with(&leaf, &data).map_err(|e| self.wit(e));
        }
        blocking(self, move |id| id.sign(&data)).await
    }

    fn encrypt(
        &mut self,
        plaintext: Vec<u8>,
        associated_data: Vec<u8>,
    ) -> Result<Vec<u8>, types::Error> {
        self.meter.call(Call::Encrypt);
        self.identity()?
            .encrypt(&plaintext, &associated_data)
            .map_err(|e| self.wit(e))
    }

    fn decrypt(
        &mut self,
        ciphertext: Vec<u8>,
        associated_data: Vec<u8>,
    ) -> Result<Vec<u8>, types::Error> {
        self.meter.call(Call::Decrypt);
        self.identity()?
            .decrypt(&ciphertext, &associated_data)
            .map_err(|e| self.wit(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workload::Host as _;

    #[tokio::test]
    async fn without_an_identity_only_whoami_answers() {
        let mut ctx = WorkloadCtx::new(None, "bare", Arc::default());
        assert_eq!(ctx.whoami().module_name, "bare");
        assert!(ctx.whoami().spiffe_id.is_empty());
        let unavailable =
            |r: Result<_, types::Error>| matches!(r, Err(types::Error::Unavailable(_)));
        assert!(unavailable(ctx.token(vec!["a".into()], 5).await.map(drop)));
        assert!(unavailable(
            ctx.validate_token("a.b.c".into(), "a".into())
                .await
                .map(drop)
        ));
        assert!(unavailable(ctx.trust_bundle().map(drop)));
        assert!(unavailable(ctx.encrypt(vec![1], vec![]).map(drop)));
        assert!(unavailable(ctx.decrypt(vec![1], vec![]).map(drop)));
    }
}
