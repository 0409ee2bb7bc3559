//! # edgeward-sdk
//!
//! The Rust API for modules that run under the edgeward daemon. Build your
//! module for `wasm32-wasip2`; a `fn main` becomes a command component that
//! edgeward measures, sandboxes and runs.
//!
//! [`identity`] is the module's workload identity: who it is, a SPIFFE
//! X509-SVID and JWT-SVIDs that prove it, signatures by its certificate's
//! key, and encryption bound to its registration.
//!
//! ```no_run
//! use std::time::Duration;
//! use edgeward_sdk::identity;
//!
//! # fn main() -> Result<(), edgeward_sdk::Error> {
//! let me = identity::whoami();
//! println!("I am {} ({})", me.spiffe_id, me.digest);
//!
//! // A JWT-SVID for a backend, valid for a minute.
//! let token = identity::token(&["https://backend.example"], Duration::from_secs(60))?;
//!
//! // Sign a reading; `identity::certificate()` verifies it.
//! let signature = identity::sign(b"21.5")?;
//!
//! // Seal data only this registration of this module can open.
//! let sealed = identity::encrypt(b"secret", b"config-v1")?;
//! assert_eq!(identity::decrypt(&sealed, b"config-v1")?, b"secret");
//! # let _ = (token, signature);
//! # Ok(())
//! # }
//! ```
//!
//! The raw bindings for the `edgeward:host` WIT package live in [`bindings`];
//! they are generated from the same `wit/` directory the host uses, so the
//! two can never disagree about the ABI.

use std::fmt;

/// Raw bindings generated from `wit/` (world `edgeward:host/module`).
///
/// Prefer the typed wrappers in [`identity`].
#[allow(missing_docs, unsafe_code, missing_debug_implementations, clippy::all)]
pub mod bindings {
    #[cfg(not(feature = "agent"))]
    wit_bindgen::generate!({
        world: "module",
        path: "../wit",
        with: { "wasi:config/store@0.2.0-rc.1": generate },
    });
    // The module world and `management` (a component imports only what it
    // uses: a module built with this feature but not calling `management`
    // imports what it would without).
    #[cfg(feature = "agent")]
    wit_bindgen::generate!({
        world: "agent",
        path: "../wit",
        with: { "wasi:config/store@0.2.0-rc.1": generate },
    });
}

/// The version of the WIT package this SDK was generated from.
pub const WIT_VERSION: &str = "edgeward:host@0.1.0";

/// An error the host returned. Every variant carries the host's message,
/// which names the offending argument for [`Error::InvalidArgument`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The module's registration does not allow this call.
    NotPermitted(String),
    /// An argument was malformed or outside its documented limits.
    InvalidArgument(String),
    /// The HSM or another backing service is not available; retry later.
    Unavailable(String),
    /// The host failed; details are in the daemon's log.
    Internal(String),
}

impl Error {
    /// The host's message.
    pub fn message(&self) -> &str {
        match self {
            Error::NotPermitted(m)
            | Error::InvalidArgument(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => m,
        }
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Error::NotPermitted(_) => "not permitted",
            Error::InvalidArgument(_) => "invalid argument",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal error",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for Error {}

impl From<bindings::edgeward::host::types::Error> for Error {
    fn from(e: bindings::edgeward::host::types::Error) -> Self {
        use bindings::edgeward::host::types::Error as E;
        match e {
            E::NotPermitted(m) => Error::NotPermitted(m),
            E::InvalidArgument(m) => Error::InvalidArgument(m),
            E::Unavailable(m) => Error::Unavailable(m),
            E::Internal(m) => Error::Internal(m),
        }
    }
}

impl From<bindings::wasi::config::store::Error> for Error {
    fn from(e: bindings::wasi::config::store::Error) -> Self {
        use bindings::wasi::config::store::Error as E;
        match e {
            E::Upstream(m) | E::Io(m) => Error::Unavailable(m),
        }
    }
}

/// The result of an identity call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The agent's API: the daemon's modules, read and changed through the same
/// service as the management socket (feature `agent`). Only the module
/// configured as the daemon's `[agent]` (name and pinned digest) is linked
/// with it; any other component that imports it is refused before it runs.
/// The agent reads every module and changes only its own (origin `agent`).
#[cfg(feature = "agent")]
pub mod management {
    use std::time::Duration;

    use super::Result;
    use crate::bindings::edgeward::host::management as wit;
    pub use wit::{ExitInfo, ModuleInfo, Plan};

    /// Every registered module, by name.
    ///
    /// # Errors
    ///
    /// The registry cannot be read.
    pub fn list() -> Result<Vec<ModuleInfo>> {
        Ok(wit::list_modules()?)
    }

    /// A module's recorded exits, oldest first (the last 100).
    ///
    /// # Errors
    ///
    /// No such module, or an invalid name.
    pub fn exits(name: &str) -> Result<Vec<ExitInfo>> {
        Ok(wit::module_exits(name)?)
    }

    /// Whether the daemon stores a component with `digest`
    /// (`sha256:<64 hex>`).
    ///
    /// # Errors
    ///
    /// A malformed digest.
    pub fn has_component(digest: &str) -> Result<bool> {
        Ok(wit::has_component(digest)?)
    }

    /// Stores a component; returns its digest.
    ///
    /// # Errors
    ///
    /// Over the size limit, or the store cannot be written.
    pub fn put_component(bytes: &[u8]) -> Result<String> {
        Ok(wit::put_component(bytes)?)
    }

    /// Reconciles the agent's modules with `deployment` (JSON: `version`
    /// and `modules`, each naming a stored component by `digest`); with
    /// `dry_run`, only the plan.
    ///
    /// # Errors
    ///
    /// An invalid deployment (named), a module another origin owns
    /// ([`crate::Error::NotPermitted`]), or a change refused (the message
    /// says what was applied before it).
    pub fn deploy(deployment: &str, dry_run: bool) -> Result<Plan> {
        Ok(wit::deploy(deployment, dry_run)?)
    }

    /// Starts one of the agent's modules.
    ///
    /// # Errors
    ///
    /// Not the agent's, no such module, or refused.
    pub fn start(name: &str) -> Result<()> {
        Ok(wit::start(name)?)
    }

    /// Stops one of the agent's modules.
    ///
    /// # Errors
    ///
    /// Not the agent's, or no such module.
    pub fn stop(name: &str) -> Result<()> {
        Ok(wit::stop(name)?)
    }

    /// Stops one of the agent's modules and deletes its registration.
    ///
    /// # Errors
    ///
    /// Not the agent's, or no such module.
    pub fn remove(name: &str) -> Result<()> {
        Ok(wit::remove(name)?)
    }

    /// Waits until something in the agent's config directory (`/config`)
    /// changes, or `timeout` (at most 24 h) passes; true if it changed
    /// since this last returned.
    ///
    /// # Errors
    ///
    /// A timeout over 24 h, or the directory is no longer watched.
    pub fn wait_for_change(timeout: Duration) -> Result<bool> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        Ok(wit::wait_for_change(ms)?)
    }
}

/// The module's own settings, as its registration gives them (`settings`
/// in its spec, `edgeward run --setting K=V`), through the standard
/// `wasi:config/store` interface. A module sees only its own; without any,
/// every key is absent.
///
/// ```no_run
/// let interval = edgeward_sdk::settings::get("interval_ms")?.unwrap_or("1000".into());
/// # Ok::<(), edgeward_sdk::Error>(())
/// ```
pub mod settings {
    use super::{Result, bindings::wasi::config::store};

    /// The value of `key`, if the module has that setting.
    ///
    /// # Errors
    ///
    /// The host's store is unavailable.
    pub fn get(key: &str) -> Result<Option<String>> {
        Ok(store::get(key)?)
    }

    /// Every setting, as (key, value) pairs in no particular order.
    ///
    /// # Errors
    ///
    /// The host's store is unavailable.
    pub fn all() -> Result<Vec<(String, String)>> {
        Ok(store::get_all()?)
    }
}

/// The module's workload identity.
///
/// Limits (the host returns [`Error::InvalidArgument`] beyond them):
/// 1-16 audiences of 1-256 bytes per token; tokens of at most 8 KiB to
/// validate; `sign` up to 1 MiB; `encrypt` up to 1 MiB of plaintext and
/// 64 KiB of associated data; server certificates with a 1-64 byte common
/// name and up to 16 DNS names or IP addresses (no wildcards), each of them
/// allowed by the module's registration ([`Error::NotPermitted`] otherwise).
pub mod identity {
    use std::time::Duration;

    use super::Result;
    use crate::bindings::edgeward::host::workload as wit;

    /// Who the module is.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Identity {
        /// The name it was registered under.
        pub module_name: String,
        /// The device the daemon runs on.
        pub device_id: String,
        /// Changes every time the module is (re-)registered.
        pub generation_id: String,
        /// `sha256:` + 64 hex digits of the component bytes that run.
        pub digest: String,
        /// `spiffe://<trust-domain>/device/<device-id>/module/<module-name>`.
        pub spiffe_id: String,
    }

    /// An X.509 certificate chain (PEM, leaf first) and the leaf's key.
    #[derive(Clone, PartialEq, Eq)]
    pub struct Credentials {
        /// PEM certificates, leaf first, up to (not including) the root.
        pub certificate_chain: String,
        /// PKCS#8 PEM of the leaf's private key.
        pub private_key: String,
        /// When the leaf expires (unix seconds).
        pub expires_at: u64,
    }

    impl std::fmt::Debug for Credentials {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Credentials")
                .field("certificate_chain", &self.certificate_chain)
                .field("private_key", &"[redacted]")
                .field("expires_at", &self.expires_at)
                .finish()
        }
    }

    /// The verified claims of a JWT-SVID.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Claims {
        /// The SPIFFE ID it was issued to.
        pub subject: String,
        /// Its audiences.
        pub audience: Vec<String>,
        /// Unix seconds.
        pub issued_at: u64,
        /// Unix seconds.
        pub expires_at: u64,
        /// The measurement of the module it was issued to.
        pub digest: String,
    }

    impl From<wit::Credentials> for Credentials {
        fn from(c: wit::Credentials) -> Self {
            Self {
                certificate_chain: c.certificate_chain,
                private_key: c.private_key,
                expires_at: c.expires_at,
            }
        }
    }

    /// The calling module's identity. Never fails.
    ///
    /// The identity cannot change while an instance runs (a new
    /// registration or component means a new instance), so the host is asked
    /// once and the answer kept: later calls are a pointer read.
    ///
    /// ```no_run
    /// let me = edgeward_sdk::identity::whoami();
    /// assert!(me.spiffe_id.ends_with(&format!("/module/{}", me.module_name)));
    /// ```
    pub fn whoami() -> &'static Identity {
        static ME: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
        ME.get_or_init(whoami_uncached)
    }

    /// Asks the host for the identity every time (one WIT call); see
    /// [`whoami`].
    pub fn whoami_uncached() -> Identity {
        let w = wit::whoami();
        Identity {
            module_name: w.module_name,
            device_id: w.device_id,
            generation_id: w.generation_id,
            digest: w.digest,
            spiffe_id: w.spiffe_id,
        }
    }

    /// A JWT-SVID (ES256) for `audience`, valid for `ttl` (whole seconds,
    /// clamped to the daemon's maximum, 5 minutes by default).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let jwt = edgeward_sdk::identity::token(&["mqtt.example"], Duration::from_secs(120))?;
    /// # Ok::<(), edgeward_sdk::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`super::Error::InvalidArgument`] for no audience, an empty or
    /// oversized one, or a zero `ttl`.
    pub fn token<S: AsRef<str>>(audience: &[S], ttl: Duration) -> Result<String> {
        let aud: Vec<String> = audience.iter().map(|a| a.as_ref().to_owned()).collect();
        let secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        Ok(wit::token(&aud, secs)?)
    }

    /// Verifies a JWT-SVID of this trust domain issued for `audience`.
    ///
    /// # Errors
    ///
    /// [`super::Error::InvalidArgument`] naming why the token was rejected
    /// (algorithm, unknown key, signature, trust domain, expiry, audience).
    pub fn validate_token(token: &str, audience: &str) -> Result<Claims> {
        let c = wit::validate_token(token, audience)?;
        Ok(Claims {
            subject: c.subject,
            audience: c.audience,
            issued_at: c.issued_at,
            expires_at: c.expires_at,
            digest: c.digest,
        })
    }

    /// The module's current X509-SVID (client and server auth). The host
    /// renews it past half its lifetime; fetch it again before `expires_at`.
    ///
    /// # Errors
    ///
    /// [`super::Error::Unavailable`] when the HSM cannot sign and no valid
    /// certificate exists.
    pub fn certificate() -> Result<Credentials> {
        Ok(wit::identity_certificate()?.into())
    }

    /// A server certificate for `common_name` and `alt_names` (DNS names or
    /// IP addresses), chained to the same CA, with a fresh key. The module's
    /// registration must allow every name (`server_names` in its config,
    /// `--server-name` for `edgeward run`).
    ///
    /// # Errors
    ///
    /// [`super::Error::InvalidArgument`] for a malformed name;
    /// [`super::Error::NotPermitted`] naming a name the registration does
    /// not allow; [`super::Error::Unavailable`] past the rate limit.
    pub fn server_certificate<S: AsRef<str>>(
        common_name: &str,
        alt_names: &[S],
    ) -> Result<Credentials> {
        let names: Vec<String> = alt_names.iter().map(|a| a.as_ref().to_owned()).collect();
        Ok(wit::server_certificate(common_name, &names)?.into())
    }

    /// PEM of the trust domain's root certificates.
    ///
    /// # Errors
    ///
    /// [`super::Error::Unavailable`] without an identity.
    pub fn trust_bundle() -> Result<String> {
        Ok(wit::trust_bundle()?)
    }

    /// ECDSA P-256 / SHA-256 signature (DER) of `data` by the key of the
    /// module's current certificate.
    ///
    /// # Errors
    ///
    /// [`super::Error::InvalidArgument`] above 1 MiB.
    pub fn sign(data: &[u8]) -> Result<Vec<u8>> {
        Ok(wit::sign(data)?)
    }

    /// Encrypts (AES-256-GCM) under a key bound to this module's name and
    /// registration. The output starts with a version byte.
    ///
    /// # Errors
    ///
    /// [`super::Error::InvalidArgument`] for oversized input.
    pub fn encrypt(plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>> {
        Ok(wit::encrypt(plaintext, associated_data)?)
    }

    /// Reverses [`encrypt`]; fails for data sealed by another module, an
    /// earlier registration, or with other associated data.
    ///
    /// # Errors
    ///
    /// [`super::Error::InvalidArgument`] when authentication fails.
    pub fn decrypt(ciphertext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>> {
        Ok(wit::decrypt(ciphertext, associated_data)?)
    }
}
