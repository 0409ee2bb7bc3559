//! The protocol between edgeward's key daemon (`edgeward-keyd`, the only
//! process that opens the HSM) and the processes that use its keys (the
//! runtime; root's CLI).
//!
//! One request, one response, over a unix stream socket. Each message is a
//! frame: a 4-byte big-endian length, then that many bytes of JSON (a
//! well-known encoding that every language reads). A frame is at most
//! [`MAX_FRAME`] bytes; a longer length prefix is refused before anything
//! is read. Every request names the protocol [`VERSION`]; binary fields are
//! base64 (standard, padded). Unknown fields, unknown operations and
//! malformed values are refused naming what was wrong.
//!
//! Who may ask for what is the key daemon's business (its principal table,
//! by the caller's uid from `SO_PEERCRED`); this crate only carries the
//! questions and answers. [`RemoteHsm`] is the client: to the runtime it is
//! just another backend of the HSM PAL.

use std::io::{Read, Write};

use base64ct::{Base64, Encoding as _};
use serde::{Deserialize, Serialize};

mod client;
pub mod journal;
pub mod notify;

pub use client::{KEYD_USER_ENV, RemoteHsm, call_counts, keyd_user, resolve_keyd_user};

/// Standard error for a log that may outlive its reader (a private key
/// daemon's parent gone, a journal restarted): a write that fails is
/// dropped. `tracing-subscriber` reports a failed write with `eprintln!`,
/// which panics the thread that logged.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts (4 MiB): an AEAD plaintext of
/// [`edgeward_hsm::MAX_AEAD_INPUT`] (1 MiB) and its associated data, in
/// base64, with room to spare.
pub const MAX_FRAME: usize = 4 << 20;

/// Bytes, base64 on the wire.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    // Lengths only: a secret never reaches a log through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Base64::encode_string(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Base64::decode_vec(&s)
            .map(Bytes)
            .map_err(|_| serde::de::Error::custom("not standard padded base64"))
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

/// A request: the protocol version and one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Must be [`VERSION`].
    pub v: u32,
    /// What is asked.
    pub call: Call,
}

/// The operations. Key ids follow the PAL's rules (1-64 of `a-z 0-9 . _ -`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Call {
    /// The backend's name and properties.
    Hello {},
    /// Create (if missing) and return the public point of a signing key.
    SigningKey {
        /// The key.
        id: String,
    },
    /// Create (if missing) and return an attestation key's public point.
    AttestationKey {
        /// The key.
        id: String,
    },
    /// The public point of an existing signing key.
    PublicKey {
        /// The key.
        id: String,
    },
    /// An ECDSA signature over a SHA-256 digest (keys whose every use is
    /// signing such digests: the broker client key, registrations' keys).
    SignDigest {
        /// The key.
        id: String,
        /// 32 bytes.
        digest: Bytes,
    },
    /// A signature over a certificate's `TBSCertificate` (DER), which the
    /// key daemon reads and holds to the key's policy before it signs (the
    /// device CA signs module leaves only).
    SignCertificate {
        /// The key.
        id: String,
        /// The DER `TBSCertificate`.
        tbs: Bytes,
    },
    /// Create an AEAD key if missing.
    AeadKey {
        /// The key.
        id: String,
    },
    /// AEAD encryption.
    Encrypt {
        /// The key.
        id: String,
        /// What to encrypt.
        plaintext: Bytes,
        /// Associated data.
        aad: Bytes,
    },
    /// AEAD decryption.
    Decrypt {
        /// The key.
        id: String,
        /// What `encrypt` returned.
        ciphertext: Bytes,
        /// Associated data.
        aad: Bytes,
    },
    /// Random bytes from the device.
    Random {
        /// How many (at most 1024).
        len: u32,
    },
    /// Extend the measurement register (root only: the runtime's events go
    /// through the log, never raw).
    Extend {
        /// 32-byte digests, in order.
        digests: Vec<Bytes>,
    },
    /// The measurement register's value.
    ReadRegister {},
    /// A quote of the register over a nonce (root only).
    Quote {
        /// The attestation key.
        key: String,
        /// The verifier's nonce.
        nonce: Bytes,
    },
    /// An attestation key's public area, where the device has one.
    AttestationPublic {
        /// The key.
        id: String,
    },
    /// The endorsement key's certificate, if the device holds one.
    EndorsementCertificate {},
    /// TPM2_ActivateCredential (root; the runtime for the `attestation`
    /// key, to enroll).
    ActivateCredential {
        /// The attestation key.
        id: String,
        /// TPM2B_ID_OBJECT contents.
        id_object: Bytes,
        /// TPM2B_ENCRYPTED_SECRET contents.
        secret: Bytes,
    },
    /// TPM2_Certify of a signing key by an attestation key over a nonce
    /// (enrollment proves the device CA key to the organisation: root;
    /// the runtime for the device CA key by `attestation`).
    Certify {
        /// The key certified.
        key: String,
        /// The attestation key that signs.
        ak: String,
        /// The organisation's nonce (at most 64 bytes).
        nonce: Bytes,
    },
    /// The keys the backend holds.
    Keys {},
    /// Destroy a key.
    DestroyKey {
        /// The key.
        id: String,
    },
    /// Append events to the measurement log and extend the register with
    /// them, together (the log and the register never disagree). At most
    /// [`MAX_EVENTS`] a call; each a JSON object with a string `kind`.
    Measure {
        /// The events' contents.
        events: Vec<serde_json::Value>,
    },
    /// Evidence over a verifier's nonce: the quote, the keys, this boot's
    /// log from record `from`, as files by name.
    Evidence {
        /// The verifier's nonce (at most 64 bytes).
        nonce: Bytes,
        /// A credential made for the EK and AK, whose secret is then
        /// quoted instead of the nonce.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<Credential>,
        /// The first log record to include.
        #[serde(default)]
        from: u64,
    },
}

/// The most events one `measure` call carries.
pub const MAX_EVENTS: usize = 256;

/// A credential (TPM2_MakeCredential's output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// TPM2B_ID_OBJECT's buffer.
    pub id_object: Bytes,
    /// TPM2B_ENCRYPTED_SECRET's buffer.
    pub secret: Bytes,
}

/// One file of evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Its name.
    pub name: String,
    /// Its bytes.
    pub data: Bytes,
}

impl Call {
    /// The operation's name on the wire (for logs and refusals).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello {} => "hello",
            Self::SigningKey { .. } => "signing-key",
            Self::AttestationKey { .. } => "attestation-key",
            Self::PublicKey { .. } => "public-key",
            Self::SignDigest { .. } => "sign-digest",
            Self::SignCertificate { .. } => "sign-certificate",
            Self::AeadKey { .. } => "aead-key",
            Self::Encrypt { .. } => "encrypt",
            Self::Decrypt { .. } => "decrypt",
            Self::Random { .. } => "random",
            Self::Extend { .. } => "extend",
            Self::ReadRegister {} => "read-register",
            Self::Quote { .. } => "quote",
            Self::AttestationPublic { .. } => "attestation-public",
            Self::EndorsementCertificate {} => "endorsement-certificate",
            Self::ActivateCredential { .. } => "activate-credential",
            Self::Certify { .. } => "certify",
            Self::Keys {} => "keys",
            Self::DestroyKey { .. } => "destroy-key",
            Self::Measure { .. } => "measure",
            Self::Evidence { .. } => "evidence",
        }
    }

    /// The key it names, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::SigningKey { id }
            | Self::AttestationKey { id }
            | Self::PublicKey { id }
            | Self::SignDigest { id, .. }
            | Self::SignCertificate { id, .. }
            | Self::AeadKey { id }
            | Self::Encrypt { id, .. }
            | Self::Decrypt { id, .. }
            | Self::AttestationPublic { id }
            | Self::ActivateCredential { id, .. }
            | Self::DestroyKey { id } => Some(id),
            Self::Quote { key, .. } | Self::Certify { key, .. } => Some(key),
            Self::Hello {}
            | Self::Random { .. }
            | Self::Extend { .. }
            | Self::ReadRegister {}
            | Self::EndorsementCertificate {}
            | Self::Keys {}
            | Self::Measure { .. }
            | Self::Evidence { .. } => None,
        }
    }
}

/// A key as `keys` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    /// Its id.
    pub id: String,
    /// `ecdsa-p256` or `aes-256-gcm`.
    pub kind: String,
    /// A signing key's public point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<Bytes>,
}

/// A quote as the PAL returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quote {
    /// The backend, which names the format.
    pub backend: String,
    /// The register quoted (32 bytes).
    pub register: Bytes,
    /// The nonce.
    pub nonce: Bytes,
    /// The signed message.
    pub message: Bytes,
    /// The signature.
    pub signature: Bytes,
    /// The attestation key's public point.
    pub public_key: Bytes,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// To `hello`.
    Hello {
        /// The protocol version the daemon speaks.
        v: u32,
        /// `soft`, `tpm` or `pkcs11`.
        backend: String,
        /// Whether keys live only in the device.
        keys_outside_state_dir: bool,
    },
    /// Bytes (a public point, a signature, a ciphertext, a plaintext, a
    /// register, random bytes).
    Bytes {
        /// The value.
        value: Bytes,
    },
    /// Maybe bytes (an attestation public area, an EK certificate).
    Maybe {
        /// The value, if there is one.
        #[serde(default)]
        value: Option<Bytes>,
    },
    /// Done, nothing to return.
    Done,
    /// Whether something was there (`destroy-key`).
    Existed {
        /// Whether it was.
        existed: bool,
    },
    /// The keys.
    Keys {
        /// Each key.
        keys: Vec<Key>,
    },
    /// A quote.
    Quote(Quote),
    /// A key's certification by an attestation key.
    Certification {
        /// The signed TPMS_ATTEST.
        message: Bytes,
        /// Its TPMT_SIGNATURE.
        signature: Bytes,
        /// The certified key's TPM2B_PUBLIC.
        public: Bytes,
        /// The attestation key's TPM2B_PUBLIC.
        ak_public: Bytes,
    },
    /// Evidence files.
    Files {
        /// Each file.
        files: Vec<File>,
    },
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The caller may not make this call (its uid, this key, this
    /// certificate).
    Refused,
    /// The request is malformed (frame, JSON, field, version).
    BadRequest,
    /// The HSM has no such key.
    KeyNotFound,
    /// The key is of another kind.
    WrongKeyKind,
    /// A bad argument (id syntax, sizes).
    InvalidArgument,
    /// Authentication of a ciphertext or stored key failed.
    AuthenticationFailed,
    /// The HSM cannot be reached (PIN, device, module).
    Unavailable,
    /// The backend cannot do it.
    NotSupported,
    /// Anything else the backend said.
    Backend,
}

/// A failed call: a code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
}

/// A response: exactly one of `ok` and `err`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    /// The call succeeded.
    Ok(Reply),
    /// It did not.
    Err(Failure),
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// The length prefix is over [`MAX_FRAME`].
    TooLong(u64),
    /// The connection ended inside a frame.
    Truncated,
    /// The bytes are not the expected JSON (serde's message).
    Malformed(String),
    /// Reading failed.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("the connection was closed"),
            Self::TooLong(n) => {
                write!(f, "a frame of {n} bytes is over the {MAX_FRAME}-byte limit")
            }
            Self::Truncated => f.write_str("the connection ended inside a frame"),
            Self::Malformed(e) => write!(f, "malformed frame: {e}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Writes `value` as one frame.
///
/// # Errors
///
/// Encoding (never for these types), a frame over [`MAX_FRAME`], or the
/// write.
pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {} bytes is over the {MAX_FRAME}-byte limit",
            body.len()
        )));
    }
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one frame and decodes it as `T`.
///
/// # Errors
///
/// See [`FrameError`].
pub fn read_frame<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let n = u64::from(u32::from_be_bytes(len));
    if n > MAX_FRAME as u64 {
        return Err(FrameError::TooLong(n));
    }
    let mut body = Vec::new();
    r.take(n).read_to_end(&mut body).map_err(FrameError::Io)?;
    if (body.len() as u64) < n {
        return Err(FrameError::Truncated);
    }
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn requests_round_trip() {
        for call in [
            Call::Hello {},
            Call::SignDigest {
                id: "cloud-client".into(),
                digest: Bytes(vec![7; 32]),
            },
            Call::Extend {
                digests: vec![Bytes(vec![1; 32])],
            },
            Call::Random { len: 16 },
        ] {
            let req = Request { v: VERSION, call };
            let mut buf = Vec::new();
            write_frame(&mut buf, &req).unwrap();
            let back: Request = read_frame(&mut buf.as_slice()).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn the_wire_form_is_plain_json() {
        let req = Request {
            v: 1,
            call: Call::SignDigest {
                id: "k".into(),
                digest: Bytes(vec![0; 3]),
            },
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":1,"call":{"op":"sign-digest","id":"k","digest":"AAAA"}}"#
        );
        let ok = Response::Ok(Reply::Done);
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":{"reply":"done"}}"#
        );
    }

    #[test]
    fn bad_frames_are_refused_naming_the_problem() {
        // Nothing at all: closed, not an error of the peer's.
        assert!(matches!(
            read_frame::<Request>(&mut [].as_slice()),
            Err(FrameError::Closed)
        ));
        // A length cut short, a body cut short.
        assert!(matches!(
            read_frame::<Request>(&mut [0u8, 0].as_slice()),
            Err(FrameError::Truncated)
        ));
        let mut short = frame(br#"{"v":1,"call":{"op":"hello"}}"#);
        short.truncate(10);
        assert!(matches!(
            read_frame::<Request>(&mut short.as_slice()),
            Err(FrameError::Truncated)
        ));
        // Over the limit: refused from the prefix alone.
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_frame::<Request>(&mut huge.as_slice()),
            Err(FrameError::TooLong(_))
        ));
        for (body, why) in [
            (&b"not json"[..], "expected"),
            (br#"{"v":1,"call":{"op":"format-disk"}}"#, "unknown variant"),
            (br#"{"v":1,"call":{"op":"hello","x":1}}"#, "unknown field"),
            (br#"{"v":1,"call":{"op":"random"}}"#, "missing field"),
            (
                br#"{"v":1,"call":{"op":"sign-digest","id":"k","digest":"!!"}}"#,
                "base64",
            ),
            (
                br#"{"v":1,"call":{"op":"hello"},"extra":true}"#,
                "unknown field",
            ),
            (br#"{"v":-1,"call":{"op":"hello"}}"#, "invalid value"),
        ] {
            match read_frame::<Request>(&mut frame(body).as_slice()) {
                Err(FrameError::Malformed(e)) => assert!(e.contains(why), "{e}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn secrets_do_not_reach_debug_output() {
        let call = Call::Encrypt {
            id: "k".into(),
            plaintext: Bytes(b"hunter2".to_vec()),
            aad: Bytes::default(),
        };
        let shown = format!("{call:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<7 bytes>"),
            "{shown}"
        );
    }
}
