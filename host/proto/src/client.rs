//! The client: the key daemon as a backend of the HSM PAL.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use edgeward_hsm::{ErrorKind, Hsm, HsmError, KeyInfo, KeyKind, Op, Result};
use zeroize::Zeroizing;

use crate::{Bytes, Call, ErrorCode, Failure, Reply, Request, Response, VERSION};

/// How long one call may take (a TPM quote or a PKCS#11 key generation
/// takes a second or two; a stuck daemon must not hold the runtime).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The key daemon at a socket, as an HSM: every operation is a call, and
/// the daemon decides whether this process may make it.
#[derive(Debug)]
pub struct RemoteHsm {
    path: PathBuf,
    /// The key daemon's uid when it is neither root nor this user
    /// ([`KEYD_USER_ENV`]).
    keyd_uid: Option<u32>,
    backend: &'static str,
    keys_outside_state_dir: bool,
    conn: Mutex<Option<UnixStream>>,
}

/// Calls this process made to key daemons: (operation, result) -> count.
static CALLS: Mutex<BTreeMap<(&str, &str), u64>> = Mutex::new(BTreeMap::new());

/// How a call ended, for [`call_counts`]: `ok`, `refused` (the key daemon
/// refused it: not this caller's to ask), `unavailable` (no answer), or
/// `error` (any other failure).
fn count(op: Op, r: &Result<Reply>) {
    let result = match r {
        Ok(_) => "ok",
        Err(e) => match &e.kind {
            ErrorKind::Unavailable(_) => "unavailable",
            ErrorKind::Backend(m) if m.starts_with("refused by the key daemon") => "refused",
            _ => "error",
        },
    };
    if let Ok(mut c) = CALLS.lock() {
        *c.entry((op.label(), result)).or_default() += 1;
    }
}

/// The calls this process made to key daemons so far, by operation and
/// result (`ok`, `refused`, `unavailable`, `error`), in that order.
pub fn call_counts() -> Vec<(&'static str, &'static str, u64)> {
    CALLS
        .lock()
        .map(|c| c.iter().map(|(&(op, r), &n)| (op, r, n)).collect())
        .unwrap_or_default()
}

/// Names the key daemon's user when it runs under a user of its own,
/// neither root nor the runtime's (the packaged units: `edgeward-keyd`):
/// a socket answered by any other uid is refused. A name in /etc/passwd or
/// a uid.
pub const KEYD_USER_ENV: &str = "EDGEWARD_KEYD_USER";

/// [`KEYD_USER_ENV`]'s uid, if set: looked up once, on first use. A
/// process that confines itself (Landlock keeps /etc/passwd from it)
/// calls this first.
///
/// # Errors
///
/// No such user, or /etc/passwd cannot be read.
pub fn keyd_user() -> std::result::Result<Option<u32>, String> {
    static RESOLVED: std::sync::OnceLock<std::result::Result<Option<u32>, String>> =
        std::sync::OnceLock::new();
    RESOLVED
        .get_or_init(|| {
            let Some(name) = std::env::var_os(KEYD_USER_ENV).filter(|v| !v.is_empty()) else {
                return Ok(None);
            };
            resolve_keyd_user(&name.to_string_lossy())
                .map(Some)
                .map_err(|e| format!("{KEYD_USER_ENV}={e}"))
        })
        .clone()
}

/// The uid of the key daemon's user `name` (a name in /etc/passwd, not a
/// number; never an overflow id).
///
/// # Errors
///
/// Unknown, unreadable, or an overflow id: the message starts with `name`.
pub fn resolve_keyd_user(name: &str) -> std::result::Result<u32, String> {
    let uid = edgeward_hsm::state::user_uid(name)
        .map_err(|e| format!("{name}: /etc/passwd: {e}"))?
        .ok_or_else(|| format!("{name}: no such user in /etc/passwd (a name, not a number)"))?;
    // The overflow ids stand for "unmapped" in user namespaces: trusting
    // them would trust whoever is unmapped.
    if uid == 65534 || uid == u32::from(u16::MAX) || uid == u32::MAX {
        return Err(format!(
            "{name}: uid {uid} is the overflow id, not a service's"
        ));
    }
    Ok(uid)
}

/// The PAL's backend names, as `&'static str`.
fn static_backend(name: &str) -> Option<&'static str> {
    ["soft", "tpm", "pkcs11"].into_iter().find(|b| *b == name)
}

impl RemoteHsm {
    /// Connects to the key daemon at `path` and asks what it is.
    ///
    /// # Errors
    ///
    /// The daemon cannot be reached, speaks another version, or refuses.
    pub fn connect(path: &Path) -> Result<Self> {
        let keyd_uid = keyd_user()
            .map_err(|e| HsmError::new("keyd", Op::ListKeys, None, ErrorKind::Unavailable(e)))?;
        Self::connect_trusting(path, keyd_uid)
    }

    /// [`RemoteHsm::connect`], trusting `keyd_uid` (besides root and this
    /// user) to answer at `path` instead of the one [`keyd_user`] names.
    ///
    /// # Errors
    ///
    /// See [`RemoteHsm::connect`].
    pub fn connect_trusting(path: &Path, keyd_uid: Option<u32>) -> Result<Self> {
        let mut hsm = Self {
            path: path.to_owned(),
            keyd_uid,
            backend: "keyd",
            keys_outside_state_dir: false,
            conn: Mutex::new(None),
        };
        match hsm.call(Op::ListKeys, None, Call::Hello {})? {
            Reply::Hello {
                v,
                backend,
                keys_outside_state_dir,
            } => {
                if v != VERSION {
                    return Err(hsm.error(
                        Op::ListKeys,
                        None,
                        ErrorKind::Unavailable(format!(
                            "the key daemon at {} speaks protocol {v}, this build {VERSION}",
                            path.display()
                        )),
                    ));
                }
                hsm.backend = static_backend(&backend).ok_or_else(|| {
                    hsm.error(
                        Op::ListKeys,
                        None,
                        ErrorKind::Backend(format!("unknown backend {backend:?}")),
                    )
                })?;
                hsm.keys_outside_state_dir = keys_outside_state_dir;
                Ok(hsm)
            }
            other => Err(hsm.unexpected(Op::ListKeys, None, &other)),
        }
    }

    /// The socket it talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, op: Op, key: Option<&str>, kind: ErrorKind) -> HsmError {
        HsmError::new(self.backend, op, key, kind)
    }

    fn unexpected(&self, op: Op, key: Option<&str>, reply: &Reply) -> HsmError {
        self.error(
            op,
            key,
            ErrorKind::Backend(format!("the key daemon answered {reply:?}")),
        )
    }

    fn open(&self) -> std::io::Result<UnixStream> {
        let s = UnixStream::connect(&self.path)?;
        // The key daemon is root or this user: a socket someone else put
        // at the path (a compromised runtime, over a directory it can
        // write) gets neither a plaintext nor a CSR.
        let server = rustix::net::sockopt::socket_peercred(&s)?.uid.as_raw();
        let me = rustix::process::geteuid().as_raw();
        if server != 0 && server != me && Some(server) != self.keyd_uid {
            return Err(std::io::Error::other(match self.keyd_uid {
                None => format!("it is answered by uid {server}, neither root nor this user"),
                Some(k) => format!(
                    "it is answered by uid {server}, neither root nor this user nor the key daemon's ({KEYD_USER_ENV}: uid {k})"
                ),
            }));
        }
        s.set_read_timeout(Some(CALL_TIMEOUT))?;
        s.set_write_timeout(Some(CALL_TIMEOUT))?;
        Ok(s)
    }

    /// One call. A connection kept from an earlier call that turns out
    /// closed (the daemon restarted) is replaced once, before the request
    /// is sent; a failure after it was sent is not retried, since the call
    /// may have happened.
    fn call(&self, op: Op, key: Option<&str>, call: Call) -> Result<Reply> {
        let r = self.call_once(op, key, call);
        count(op, &r);
        r
    }

    fn call_once(&self, op: Op, key: Option<&str>, call: Call) -> Result<Reply> {
        let unavailable = |e: String| {
            self.error(
                op,
                key,
                ErrorKind::Unavailable(format!("key daemon at {}: {e}", self.path.display())),
            )
        };
        let req = Request { v: VERSION, call };
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| unavailable("connection lock poisoned".into()))?;
        let reused = guard.is_some();
        let mut stream = match guard.take() {
            Some(s) => s,
            None => self.open().map_err(|e| unavailable(e.to_string()))?,
        };
        if let Err(e) = crate::write_frame(&mut stream, &req) {
            if !reused {
                return Err(unavailable(e.to_string()));
            }
            stream = self.open().map_err(|e| unavailable(e.to_string()))?;
            crate::write_frame(&mut stream, &req).map_err(|e| unavailable(e.to_string()))?;
        }
        let resp: Response = match crate::read_frame(&mut stream) {
            Ok(r) => r,
            Err(crate::FrameError::Closed)
                if reused && !matches!(req.call, Call::Extend { .. } | Call::Measure { .. }) =>
            {
                // Closed before answering: the daemon had gone away while
                // the connection sat idle and never saw the request.
                stream = self.open().map_err(|e| unavailable(e.to_string()))?;
                crate::write_frame(&mut stream, &req).map_err(|e| unavailable(e.to_string()))?;
                crate::read_frame(&mut stream).map_err(|e| unavailable(e.to_string()))?
            }
            Err(e) => return Err(unavailable(e.to_string())),
        };
        *guard = Some(stream);
        match resp {
            Response::Ok(r) => Ok(r),
            Response::Err(f) => Err(self.failure(op, key, f)),
        }
    }

    fn failure(&self, op: Op, key: Option<&str>, f: Failure) -> HsmError {
        let kind = match f.code {
            ErrorCode::KeyNotFound => ErrorKind::KeyNotFound,
            ErrorCode::WrongKeyKind => ErrorKind::WrongKeyKind,
            ErrorCode::AuthenticationFailed => ErrorKind::AuthenticationFailed,
            ErrorCode::NotSupported => ErrorKind::NotSupported,
            ErrorCode::InvalidArgument => ErrorKind::InvalidArgument(f.message),
            ErrorCode::Unavailable => ErrorKind::Unavailable(f.message),
            ErrorCode::Refused => {
                ErrorKind::Backend(format!("refused by the key daemon: {}", f.message))
            }
            ErrorCode::BadRequest => {
                ErrorKind::Backend(format!("the key daemon read a bad request: {}", f.message))
            }
            ErrorCode::Backend => ErrorKind::Backend(f.message),
        };
        self.error(op, key, kind)
    }

    fn bytes(&self, op: Op, key: Option<&str>, call: Call) -> Result<Vec<u8>> {
        match self.call(op, key, call)? {
            Reply::Bytes { value } => Ok(value.0),
            other => Err(self.unexpected(op, key, &other)),
        }
    }

    fn maybe(&self, op: Op, key: Option<&str>, call: Call) -> Result<Option<Vec<u8>>> {
        match self.call(op, key, call)? {
            Reply::Maybe { value } => Ok(value.map(|b| b.0)),
            other => Err(self.unexpected(op, key, &other)),
        }
    }

    fn done(&self, op: Op, key: Option<&str>, call: Call) -> Result<()> {
        match self.call(op, key, call)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(op, key, &other)),
        }
    }

    fn fixed(&self, op: Op, key: Option<&str>, v: Vec<u8>) -> Result<[u8; 32]> {
        <[u8; 32]>::try_from(v.as_slice()).map_err(|_| {
            self.error(
                op,
                key,
                ErrorKind::Backend(format!("a register of {} bytes", v.len())),
            )
        })
    }
}

impl RemoteHsm {
    /// Appends `events` to the key daemon's measurement log and extends
    /// the register with them, together.
    ///
    /// # Errors
    ///
    /// Refused, unreachable, or the log or register failed.
    pub fn measure(&self, events: Vec<serde_json::Value>) -> Result<()> {
        for chunk in events.chunks(crate::MAX_EVENTS) {
            self.done(
                Op::Extend,
                None,
                Call::Measure {
                    events: chunk.to_vec(),
                },
            )?;
        }
        Ok(())
    }

    /// Evidence over `nonce` (or `credential`'s secret), with this boot's
    /// log from record `from`: files by name.
    ///
    /// # Errors
    ///
    /// Refused, unreachable, or the evidence could not be gathered.
    pub fn evidence(
        &self,
        nonce: &[u8],
        credential: Option<(&[u8], &[u8])>,
        from: u64,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        match self.call(
            Op::Quote,
            None,
            Call::Evidence {
                nonce: Bytes(nonce.to_vec()),
                credential: credential.map(|(id_object, secret)| crate::Credential {
                    id_object: Bytes(id_object.to_vec()),
                    secret: Bytes(secret.to_vec()),
                }),
                from,
            },
        )? {
            Reply::Files { files } => Ok(files.into_iter().map(|f| (f.name, f.data.0)).collect()),
            other => Err(self.unexpected(Op::Quote, None, &other)),
        }
    }
}

impl Hsm for RemoteHsm {
    fn backend(&self) -> &'static str {
        self.backend
    }

    fn signing_key(&self, id: &str) -> Result<Vec<u8>> {
        let id = id.to_owned();
        self.bytes(
            Op::SigningKey,
            Some(&id),
            Call::SigningKey { id: id.clone() },
        )
    }

    fn attestation_key(&self, id: &str) -> Result<Vec<u8>> {
        let id = id.to_owned();
        self.bytes(
            Op::SigningKey,
            Some(&id),
            Call::AttestationKey { id: id.clone() },
        )
    }

    fn public_key(&self, id: &str) -> Result<Vec<u8>> {
        let id = id.to_owned();
        self.bytes(Op::PublicKey, Some(&id), Call::PublicKey { id: id.clone() })
    }

    fn sign_digest(&self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>> {
        self.bytes(
            Op::Sign,
            Some(id),
            Call::SignDigest {
                id: id.to_owned(),
                digest: Bytes(digest.to_vec()),
            },
        )
    }

    fn sign_certificate(&self, id: &str, tbs: &[u8]) -> Result<Vec<u8>> {
        self.bytes(
            Op::Sign,
            Some(id),
            Call::SignCertificate {
                id: id.to_owned(),
                tbs: Bytes(tbs.to_vec()),
            },
        )
    }

    fn aead_key(&self, id: &str) -> Result<()> {
        self.done(Op::AeadKey, Some(id), Call::AeadKey { id: id.to_owned() })
    }

    fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        self.bytes(
            Op::Encrypt,
            Some(id),
            Call::Encrypt {
                id: id.to_owned(),
                plaintext: Bytes(plaintext.to_vec()),
                aad: Bytes(aad.to_vec()),
            },
        )
    }

    fn decrypt(&self, id: &str, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.bytes(
            Op::Decrypt,
            Some(id),
            Call::Decrypt {
                id: id.to_owned(),
                ciphertext: Bytes(ciphertext.to_vec()),
                aad: Bytes(aad.to_vec()),
            },
        )
        .map(Zeroizing::new)
    }

    fn random(&self, buf: &mut [u8]) -> Result<()> {
        for chunk in buf.chunks_mut(1024) {
            let v = self.bytes(
                Op::Random,
                None,
                Call::Random {
                    len: chunk.len() as u32,
                },
            )?;
            if v.len() != chunk.len() {
                return Err(self.error(
                    Op::Random,
                    None,
                    ErrorKind::Backend(format!("{} random bytes, not {}", v.len(), chunk.len())),
                ));
            }
            chunk.copy_from_slice(&v);
        }
        Ok(())
    }

    fn extend(&self, digest: &[u8; 32]) -> Result<()> {
        self.extend_all(std::slice::from_ref(digest))
    }

    fn extend_all(&self, digests: &[[u8; 32]]) -> Result<()> {
        self.done(
            Op::Extend,
            None,
            Call::Extend {
                digests: digests.iter().map(|d| Bytes(d.to_vec())).collect(),
            },
        )
    }

    fn read_register(&self) -> Result<[u8; 32]> {
        let v = self.bytes(Op::ReadRegister, None, Call::ReadRegister {})?;
        self.fixed(Op::ReadRegister, None, v)
    }

    fn quote(&self, key: &str, nonce: &[u8]) -> Result<edgeward_hsm::Quote> {
        match self.call(
            Op::Quote,
            Some(key),
            Call::Quote {
                key: key.to_owned(),
                nonce: Bytes(nonce.to_vec()),
            },
        )? {
            Reply::Quote(q) => Ok(edgeward_hsm::Quote {
                backend: static_backend(&q.backend).unwrap_or(self.backend),
                register: self.fixed(Op::Quote, Some(key), q.register.0)?,
                nonce: q.nonce.0,
                message: q.message.0,
                signature: q.signature.0,
                public_key: q.public_key.0,
            }),
            other => Err(self.unexpected(Op::Quote, Some(key), &other)),
        }
    }

    fn attestation_public(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.maybe(
            Op::Quote,
            Some(id),
            Call::AttestationPublic { id: id.to_owned() },
        )
    }

    fn endorsement_certificate(&self) -> Result<Option<Vec<u8>>> {
        self.maybe(
            Op::EndorsementCertificate,
            None,
            Call::EndorsementCertificate {},
        )
    }

    fn activate_credential(
        &self,
        id: &str,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.bytes(
            Op::ActivateCredential,
            Some(id),
            Call::ActivateCredential {
                id: id.to_owned(),
                id_object: Bytes(id_object.to_vec()),
                secret: Bytes(encrypted_secret.to_vec()),
            },
        )
        .map(Zeroizing::new)
    }

    fn certify(&self, key: &str, ak: &str, nonce: &[u8]) -> Result<edgeward_hsm::Certification> {
        match self.call(
            Op::Certify,
            Some(key),
            Call::Certify {
                key: key.to_owned(),
                ak: ak.to_owned(),
                nonce: Bytes(nonce.to_vec()),
            },
        )? {
            Reply::Certification {
                message,
                signature,
                public,
                ak_public,
            } => Ok(edgeward_hsm::Certification {
                message: message.0,
                signature: signature.0,
                public: public.0,
                ak_public: ak_public.0,
            }),
            other => Err(self.unexpected(Op::Certify, Some(key), &other)),
        }
    }

    fn keys(&self) -> Result<Vec<KeyInfo>> {
        match self.call(Op::ListKeys, None, Call::Keys {})? {
            Reply::Keys { keys } => keys
                .into_iter()
                .map(|k| {
                    let kind = match k.kind.as_str() {
                        "ecdsa-p256" => KeyKind::EcdsaP256,
                        "aes-256-gcm" => KeyKind::Aes256Gcm,
                        other => {
                            return Err(self.error(
                                Op::ListKeys,
                                None,
                                ErrorKind::Backend(format!("a key of unknown kind {other:?}")),
                            ));
                        }
                    };
                    Ok(KeyInfo {
                        id: k.id,
                        kind,
                        public_key: k.public_key.map(|b| b.0),
                    })
                })
                .collect(),
            other => Err(self.unexpected(Op::ListKeys, None, &other)),
        }
    }

    fn keys_outside_state_dir(&self) -> bool {
        self.keys_outside_state_dir
    }

    fn destroy_key(&self, id: &str) -> Result<bool> {
        match self.call(
            Op::DestroyKey,
            Some(id),
            Call::DestroyKey { id: id.to_owned() },
        )? {
            Reply::Existed { existed } => Ok(existed),
            other => Err(self.unexpected(Op::DestroyKey, Some(id), &other)),
        }
    }
}
