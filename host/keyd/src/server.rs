//! The socket: one thread per connection (bounded), one frame at a time,
//! each call authorized by the caller's uid before the HSM sees it.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgeward_hsm::{ErrorKind, Hsm, HsmError, KeyKind};
use edgeward_proto::{
    Bytes, Call, ErrorCode, Failure, FrameError, Key, Quote, Reply, Request, Response, VERSION,
};

use crate::policy::{CA_KEY, Policy, Principal};

/// Connections served at once; more are closed at once (and logged,
/// rate-limited).
pub const MAX_CONNECTIONS: usize = 64;
/// Each frame must arrive whole within this long of the previous answer
/// (or of the connection): a silent or trickling connection is closed, and
/// the client reconnects.
pub const IDLE: Duration = Duration::from_secs(10);
/// The most random bytes one call returns.
pub const MAX_RANDOM: u32 = 1024;

/// Refusals and bad frames logged per window; the rest are counted and
/// summed up when the window ends, so a flood cannot fill the journal.
const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A rate limit on log lines.
#[derive(Debug)]
struct Throttle {
    state: Mutex<(Instant, u32, u64)>,
}

impl Throttle {
    fn new() -> Self {
        Self {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether to log this one; logs how many were held back when a new
    /// window starts.
    fn allow(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(s.0) >= LOG_WINDOW {
            if s.2 > 0 {
                tracing::warn!(suppressed = s.2, "more refusals than were logged");
            }
            *s = (now, 0, 0);
        }
        if s.1 < LOG_BURST {
            s.1 += 1;
            true
        } else {
            s.2 += 1;
            false
        }
    }
}

/// The measurement log the key daemon writes, and what evidence names.
#[derive(Debug)]
pub struct Measurements {
    /// This boot's log.
    pub log: edgeward_trust::attest::eventlog::EventLog,
    /// This boot.
    pub boot_id: String,
}

/// The key daemon's state.
#[derive(Debug)]
pub struct Server {
    hsm: Arc<dyn Hsm>,
    measurements: Option<Measurements>,
    policy: Policy,
    /// Connections of callers other than root (root's never wait behind
    /// them).
    connections: AtomicUsize,
    /// Refusals and bad frames logged, per principal: a stranger's flood
    /// does not hide the runtime's.
    throttles: [Throttle; 3],
    /// Whether this key daemon launched the runtime: then the runtime is
    /// the process it launched (a child of this process: it has no other),
    /// not every process of the runtime's uid, checked again at every
    /// frame (a connection handed to another process, or outliving the
    /// runtime, stops working), and its executable is measured by the
    /// launcher alone.
    launching: AtomicBool,
    /// A private key daemon's parent (0: none): the only process it
    /// serves; any other, whatever its uid, is a stranger.
    parent: std::sync::atomic::AtomicI32,
}

/// A connection's slot, given back however the connection ends.
struct Slot<'a>(Option<&'a AtomicUsize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads from `stream` until `deadline`, whatever the pace of the bytes.
struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl std::io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        std::io::Read::read(&mut self.stream, buf)
    }
}

/// Whether `pid` is a live child of this process (its parent in
/// `/proc/<pid>/stat`).
fn is_my_child(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let mut fields = stat.rsplit_once(") ").map(|(_, rest)| rest.split(' '));
    let state = fields.as_mut().and_then(Iterator::next);
    let parent = fields
        .as_mut()
        .and_then(Iterator::next)
        .and_then(|p| p.parse::<u32>().ok());
    // A zombie has exited: it is nobody's runtime any more.
    state != Some("Z") && parent == Some(std::process::id())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn failure(code: ErrorCode, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Err(failure(code, message))
}

fn from_hsm(e: &HsmError) -> Failure {
    let code = match &e.kind {
        ErrorKind::NotSupported => ErrorCode::NotSupported,
        ErrorKind::KeyNotFound => ErrorCode::KeyNotFound,
        ErrorKind::WrongKeyKind => ErrorCode::WrongKeyKind,
        ErrorKind::InvalidArgument(_) => ErrorCode::InvalidArgument,
        ErrorKind::AuthenticationFailed => ErrorCode::AuthenticationFailed,
        ErrorKind::Unavailable(_) => ErrorCode::Unavailable,
        ErrorKind::Backend(_) => ErrorCode::Backend,
    };
    failure(code, e.to_string())
}

fn bytes(v: Vec<u8>) -> Reply {
    Reply::Bytes { value: Bytes(v) }
}

/// The kinds only the key daemon writes: the log's baseline and the
/// launcher's own events. A caller's event of one of them, or naming the
/// key daemon as its launcher, is refused: the runtime adds to the
/// device's history but cannot pose as the launcher in it.
pub const RESERVED_KINDS: &[&str] = &["baseline", "key-daemon", "runtime-config", "runtime-exit"];

/// At least one event and at most [`edgeward_proto::MAX_EVENTS`], each an
/// object whose `kind` is a short string and not one of
/// [`RESERVED_KINDS`].
fn check_events(events: &[serde_json::Value]) -> Result<(), Failure> {
    if events.is_empty() || events.len() > edgeward_proto::MAX_EVENTS {
        return Err(failure(
            ErrorCode::InvalidArgument,
            format!(
                "{} events: 1 to {} a call",
                events.len(),
                edgeward_proto::MAX_EVENTS
            ),
        ));
    }
    for (i, e) in events.iter().enumerate() {
        let kind = e.get("kind").and_then(serde_json::Value::as_str);
        if !e.is_object() || kind.is_none_or(|k| k.is_empty() || k.len() > 64) {
            return Err(failure(
                ErrorCode::InvalidArgument,
                format!("event {i}: an object with a `kind` of 1-64 characters"),
            ));
        }
        if kind.is_some_and(|k| RESERVED_KINDS.contains(&k)) || e.get("launched_by").is_some() {
            return Err(failure(
                ErrorCode::Refused,
                format!(
                    "event {i}: {:?} events are the key daemon's own",
                    kind.unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

fn digest32(b: &Bytes, what: &str) -> Result<[u8; 32], Failure> {
    <[u8; 32]>::try_from(b.0.as_slice()).map_err(|_| {
        failure(
            ErrorCode::InvalidArgument,
            format!("{what} is {} bytes, not 32", b.0.len()),
        )
    })
}

impl Server {
    /// A server for `hsm` under `policy`, writing `measurements` (none on
    /// a backend without a register).
    pub fn new(hsm: Arc<dyn Hsm>, measurements: Option<Measurements>, policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            hsm,
            measurements,
            policy,
            connections: AtomicUsize::new(0),
            throttles: [Throttle::new(), Throttle::new(), Throttle::new()],
            launching: AtomicBool::new(false),
            parent: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// This key daemon is private to process `pid` (its parent): from now
    /// on it serves no other process.
    pub fn set_parent(&self, pid: i32) {
        self.parent.store(pid, Ordering::SeqCst);
    }

    /// This key daemon launches the runtime: from now on only its child
    /// is the runtime.
    pub fn set_launching(&self) {
        self.launching.store(true, Ordering::SeqCst);
    }

    /// Who the caller `uid` (process `pid`) is.
    fn principal(&self, uid: u32, pid: i32) -> Principal {
        let who = self.policy.principal(uid);
        let parent = self.parent.load(Ordering::SeqCst);
        if parent != 0 && pid != parent {
            return Principal::Stranger;
        }
        if who == Principal::Runtime && self.launching.load(Ordering::SeqCst) && !is_my_child(pid) {
            return Principal::Stranger;
        }
        who
    }

    fn throttle(&self, who: Principal) -> &Throttle {
        &self.throttles[match who {
            Principal::Root => 0,
            Principal::Runtime => 1,
            Principal::Stranger => 2,
        }]
    }

    /// Accepts connections until the listener fails.
    pub fn serve(self: &Arc<Self>, listener: &UnixListener) {
        for conn in listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    if self.throttle(Principal::Root).allow() {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Ok(cred) = rustix::net::sockopt::socket_peercred(&stream) else {
                continue;
            };
            let uid = cred.uid.as_raw();
            let pid = cred.pid.as_raw_nonzero().get();
            let who = self.principal(uid, pid);
            if who == Principal::Stranger {
                // Answered at once, nothing read: a stranger costs no
                // thread, no buffer and no parse.
                if self.throttle(who).allow() {
                    tracing::warn!(uid, "refused: not in the principal table");
                }
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = edgeward_proto::write_frame(
                    &mut &stream,
                    &fail(
                        ErrorCode::Refused,
                        "this uid is not in the key daemon's principal table",
                    ),
                );
                continue;
            }
            let counted = who != Principal::Root;
            if counted && self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                if self.throttle(who).allow() {
                    tracing::warn!(
                        uid,
                        max = MAX_CONNECTIONS,
                        "too many connections; one closed"
                    );
                }
                continue;
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("keyd-conn".into())
                .spawn(move || {
                    let _slot = Slot(counted.then_some(&me.connections));
                    me.connection(&stream, uid, pid, who);
                });
            if let Err(e) = spawned {
                if counted {
                    self.connections.fetch_sub(1, Ordering::SeqCst);
                }
                tracing::error!(error = %e, "cannot start a connection thread");
            }
        }
    }

    fn connection(&self, stream: &UnixStream, uid: u32, pid: i32, who: Principal) {
        let _ = stream.set_write_timeout(Some(IDLE));
        loop {
            if who == Principal::Runtime
                && self.launching.load(Ordering::SeqCst)
                && !is_my_child(pid)
            {
                // The runtime that connected has exited: whoever holds its
                // connection now is not the runtime.
                if self.throttle(who).allow() {
                    tracing::warn!(
                        uid,
                        pid,
                        "refused: the connection of a runtime that is gone; closed"
                    );
                }
                let _ = edgeward_proto::write_frame(
                    &mut &*stream,
                    &fail(ErrorCode::Refused, "the runtime that connected is gone"),
                );
                return;
            }
            let mut reader = Deadline {
                stream,
                deadline: Instant::now() + IDLE,
            };
            let (resp, close) = match edgeward_proto::read_frame::<Request>(&mut reader) {
                Err(FrameError::Closed) => return,
                Err(FrameError::Io(_)) => return,
                Err(e) => {
                    // Framing is lost after a bad frame: answer, then close.
                    if self.throttle(who).allow() {
                        tracing::warn!(uid, error = ?e.to_string(), "bad frame; connection closed");
                    }
                    (fail(ErrorCode::BadRequest, e.to_string()), true)
                }
                Ok(req) if req.v != VERSION => (
                    fail(
                        ErrorCode::BadRequest,
                        format!(
                            "protocol version {}; this key daemon speaks {VERSION}",
                            req.v
                        ),
                    ),
                    false,
                ),
                Ok(req) => (self.call(uid, who, req.call), false),
            };
            if edgeward_proto::write_frame(&mut &*stream, &resp).is_err() || close {
                return;
            }
        }
    }

    fn call(&self, uid: u32, who: Principal, call: Call) -> Response {
        // The launched runtime's executable is the launcher's to measure.
        if who == Principal::Runtime
            && self.launching.load(Ordering::SeqCst)
            && let Call::Measure { events } = &call
            && events.iter().any(|e| e["kind"] == "executable")
        {
            if self.throttle(who).allow() {
                tracing::warn!(
                    uid,
                    op = "measure",
                    "refused: an executable event from the launched runtime"
                );
            }
            return fail(
                ErrorCode::Refused,
                "the launched runtime's executable is measured by the key daemon",
            );
        }
        let ca_point = || self.hsm.public_key(CA_KEY).ok();
        if let Err(why) = self.policy.authorize(who, &call, unix_now(), &ca_point) {
            if self.throttle(who).allow() {
                // Debug formatting: whatever the caller put in a key id or
                // a name reaches the log escaped.
                tracing::warn!(uid, principal = ?who, op = call.name(), why = ?why, "refused");
            }
            return fail(ErrorCode::Refused, why);
        }
        match self.dispatch(call) {
            Ok(r) => Response::Ok(r),
            Err(f) => Response::Err(f),
        }
    }

    fn dispatch(&self, call: Call) -> Result<Reply, Failure> {
        let h = self.hsm.as_ref();
        let e = |e: HsmError| from_hsm(&e);
        Ok(match call {
            Call::Hello {} => Reply::Hello {
                v: VERSION,
                backend: h.backend().to_owned(),
                keys_outside_state_dir: h.keys_outside_state_dir(),
            },
            Call::SigningKey { id } => bytes(h.signing_key(&id).map_err(e)?),
            Call::AttestationKey { id } => bytes(h.attestation_key(&id).map_err(e)?),
            Call::PublicKey { id } => bytes(h.public_key(&id).map_err(e)?),
            Call::SignDigest { id, digest } => {
                let d = digest32(&digest, "the digest")?;
                bytes(h.sign_digest(&id, &d).map_err(e)?)
            }
            Call::SignCertificate { id, tbs } => bytes(h.sign_certificate(&id, &tbs.0).map_err(e)?),
            Call::AeadKey { id } => {
                h.aead_key(&id).map_err(e)?;
                Reply::Done
            }
            Call::Encrypt { id, plaintext, aad } => {
                bytes(h.encrypt(&id, &plaintext.0, &aad.0).map_err(e)?)
            }
            Call::Decrypt {
                id,
                ciphertext,
                aad,
            } => bytes(h.decrypt(&id, &ciphertext.0, &aad.0).map_err(e)?.to_vec()),
            Call::Random { len } => {
                if len > MAX_RANDOM {
                    return Err(failure(
                        ErrorCode::InvalidArgument,
                        format!("{len} random bytes asked; at most {MAX_RANDOM} a call"),
                    ));
                }
                let mut v = vec![0; len as usize];
                h.random(&mut v).map_err(e)?;
                bytes(v)
            }
            Call::Extend { digests } => {
                let ds = digests
                    .iter()
                    .map(|d| digest32(d, "a digest"))
                    .collect::<Result<Vec<_>, _>>()?;
                h.extend_all(&ds).map_err(e)?;
                Reply::Done
            }
            Call::ReadRegister {} => bytes(h.read_register().map_err(e)?.to_vec()),
            Call::Quote { key, nonce } => {
                let q = h.quote(&key, &nonce.0).map_err(e)?;
                Reply::Quote(Quote {
                    backend: q.backend.to_owned(),
                    register: Bytes(q.register.to_vec()),
                    nonce: Bytes(q.nonce),
                    message: Bytes(q.message),
                    signature: Bytes(q.signature),
                    public_key: Bytes(q.public_key),
                })
            }
            Call::AttestationPublic { id } => Reply::Maybe {
                value: h.attestation_public(&id).map_err(e)?.map(Bytes),
            },
            Call::EndorsementCertificate {} => Reply::Maybe {
                value: h.endorsement_certificate().map_err(e)?.map(Bytes),
            },
            Call::ActivateCredential {
                id,
                id_object,
                secret,
            } => bytes(
                h.activate_credential(&id, &id_object.0, &secret.0)
                    .map_err(e)?
                    .to_vec(),
            ),
            Call::Certify { key, ak, nonce } => {
                let c = h.certify(&key, &ak, &nonce.0).map_err(e)?;
                Reply::Certification {
                    message: Bytes(c.message),
                    signature: Bytes(c.signature),
                    public: Bytes(c.public),
                    ak_public: Bytes(c.ak_public),
                }
            }
            Call::Keys {} => Reply::Keys {
                keys: h
                    .keys()
                    .map_err(e)?
                    .into_iter()
                    .map(|k| Key {
                        id: k.id,
                        kind: match k.kind {
                            KeyKind::EcdsaP256 => "ecdsa-p256",
                            KeyKind::Aes256Gcm => "aes-256-gcm",
                        }
                        .to_owned(),
                        public_key: k.public_key.map(Bytes),
                    })
                    .collect(),
            },
            Call::DestroyKey { id } => Reply::Existed {
                existed: h.destroy_key(&id).map_err(e)?,
            },
            Call::Measure { events } => {
                check_events(&events)?;
                self.log()?
                    .log
                    .measure_all(h, events)
                    .map_err(|m| failure(ErrorCode::Backend, m))?;
                Reply::Done
            }
            Call::Evidence {
                nonce,
                credential,
                from,
            } => {
                use edgeward_trust::attest::evidence;
                let m = self.log()?;
                let credential = credential.map(|c| evidence::CredentialFile {
                    id_object: c.id_object.0,
                    secret: c.secret.0,
                });
                let files = evidence::gather(
                    h,
                    &m.log,
                    &evidence::Device {
                        id: &self.policy.device_id,
                        boot_id: &m.boot_id,
                    },
                    &nonce.0,
                    credential.as_ref(),
                    from,
                )
                .map_err(|m| failure(ErrorCode::Backend, m))?;
                Reply::Files {
                    files: files
                        .into_iter()
                        .map(|(name, data)| edgeward_proto::File {
                            name: name.to_owned(),
                            data: Bytes(data),
                        })
                        .collect(),
                }
            }
        })
    }

    /// Appends `events` to the log and extends the register with them (the
    /// launcher's own events); nothing on a backend without a register.
    ///
    /// # Errors
    ///
    /// The log or the register failed.
    pub fn measure(&self, events: Vec<serde_json::Value>) -> Result<(), String> {
        match &self.measurements {
            Some(m) => m.log.measure_all(self.hsm.as_ref(), events).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Releases what the HSM holds in its device (see
    /// [`edgeward_hsm::Hsm::close`]), as the key daemon exits.
    pub fn close(&self) {
        self.hsm.close();
    }

    /// Whether this key daemon keeps a measurement log.
    pub fn measures(&self) -> bool {
        self.measurements.is_some()
    }

    fn log(&self) -> Result<&Measurements, Failure> {
        self.measurements.as_ref().ok_or_else(|| {
            if self.hsm.backend() == "pkcs11" {
                failure(
                    ErrorCode::NotSupported,
                    "the pkcs11 backend has no measurement register",
                )
            } else {
                // The backend could; this key daemon was told not to.
                failure(
                    ErrorCode::Unavailable,
                    "this key daemon keeps no measurement log (started with --no-measure)",
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_my_child;

    #[test]
    fn only_a_live_child_is_the_launched_runtime() {
        let pid = |c: &std::process::Child| i32::try_from(c.id()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(is_my_child(pid(&child)));
        // Itself, its parent and init are not.
        assert!(!is_my_child(i32::try_from(std::process::id()).unwrap()));
        assert!(!is_my_child(1));
        // Exited (a zombie until reaped), then reaped: no longer.
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while is_my_child(pid(&child)) {
            assert!(
                std::time::Instant::now() < deadline,
                "a zombie is still a child"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!is_my_child(pid(&child)));
    }
}
