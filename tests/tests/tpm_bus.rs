//! What crosses the TPM bus. A TCP relay between the TCTI and swtpm records
//! every command and response, and an eavesdropper tries to read the
//! secrets in them: the raw bytes, and the parameters of every
//! session-encrypted command and response it can derive a key for (an
//! unsalted, unbound session with empty authorization: KDFa over the empty
//! key and the nonces it saw). The sealed AEAD key and key blobs that the
//! `tpm` backend sends must stay unreadable; as a control, the same
//! eavesdropper reads the secret out of an unseal made in an unsalted
//! session (what tss-esapi's `execute_with_nullauth_session` starts).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};

use aes::cipher::{BlockEncrypt as _, KeyInit as _};
use edgeward::hsm::Hsm as _;
use edgeward_hsm_hw::tpm::{TpmConfig, TpmHsm, decode_blob, primary_template};
use edgeward_tests::fixtures::{Swtpm, free_port_pair};
use sha2::{Digest as _, Sha256};

/// One TCTI connection's bytes, each direction in order.
#[derive(Debug, Default, Clone)]
struct Conn {
    commands: Vec<u8>,
    responses: Vec<u8>,
}

/// Forwards `port` to swtpm's data port (recorded) and `port + 1` to its
/// control port.
struct Relay {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, sink: Option<(Arc<Mutex<Conn>>, bool)>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((conn, is_command)) = &sink {
            let mut c = conn.lock().unwrap();
            if *is_command {
                c.commands.extend_from_slice(&buf[..n]);
            } else {
                c.responses.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Relay {
    fn start(target: u16) -> Self {
        let port = free_port_pair();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>> = Arc::default();
        for (listen, to, record) in [(port, target, true), (port + 1, target + 1, false)] {
            let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
            let conns = conns.clone();
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { return };
                    let server = TcpStream::connect(("127.0.0.1", to)).unwrap();
                    let sink = record.then(|| {
                        let c = Arc::new(Mutex::new(Conn::default()));
                        conns.lock().unwrap().push(c.clone());
                        c
                    });
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let sink2 = sink.clone();
                    std::thread::spawn(move || pump(client, server, sink.map(|c| (c, true))));
                    std::thread::spawn(move || pump(s2, c2, sink2.map(|c| (c, false))));
                }
            });
        }
        Self { port, conns }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn connections(&self) -> Vec<Conn> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }
}

// ---- TPM 2.0 wire format, as far as the eavesdropper needs it ----------

const ST_SESSIONS: u16 = 0x8002;
const CC_CREATE: u32 = 0x153;
const CC_LOAD: u32 = 0x157;
const CC_UNSEAL: u32 = 0x15E;
const CC_START_AUTH_SESSION: u32 = 0x176;
const ATTR_DECRYPT: u8 = 0x20;
const ATTR_ENCRYPT: u8 = 0x40;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        let b = self.take(2);
        u16::from_be_bytes([b[0], b[1]])
    }
    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    fn tpm2b(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.take(n)
    }
}

/// Splits a byte stream into TPM packets (by the size in each header).
fn packets(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    while rest.len() >= 10 {
        let size = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
        if size < 10 || size > rest.len() {
            break;
        }
        out.push(&rest[..size]);
        rest = &rest[size..];
    }
    out
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// KDFa (TPM 2.0 part 1, 11.4.10.2) with SHA-256, for 256 bits.
fn kdfa(key: &[u8], label: &[u8], u: &[u8], v: &[u8]) -> [u8; 32] {
    hmac_sha256(
        key,
        &[
            &1u32.to_be_bytes(),
            label,
            &[0],
            u,
            v,
            &256u32.to_be_bytes(),
        ],
    )
}

/// AES-128-CFB decryption, as TPM parameter encryption uses it.
fn cfb_decrypt(key: &[u8], iv: &[u8], data: &[u8]) -> Vec<u8> {
    let aes = aes::Aes128::new_from_slice(key).unwrap();
    let mut prev: [u8; 16] = iv.try_into().unwrap();
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut ks = aes::Block::from(prev);
        aes.encrypt_block(&mut ks);
        out.extend(chunk.iter().zip(ks.iter()).map(|(c, k)| c ^ k));
        if chunk.len() == 16 {
            prev.copy_from_slice(chunk);
        }
    }
    out
}

/// What an eavesdropper reads out of the recording (the swtpm TCTI opens a
/// connection per command, so sessions span connections): every parameter
/// it can decrypt, with the index of the connection it came from, assuming
/// sessions that are neither salted nor bound, and that it knows the
/// object's authorization value `auth` (the strongest eavesdropper: one
/// who also read the state directory).
fn eavesdrop(conns: &[Conn], auth: &[u8]) -> Vec<(usize, Vec<u8>)> {
    // The TPM drops an auth value's trailing zeros before keying with it.
    let auth = &auth[..auth.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)];
    let mut plain = Vec::new();
    let mut nonce_tpm: HashMap<u32, Vec<u8>> = HashMap::new();
    let exchanges = conns.iter().enumerate().flat_map(|(i, c)| {
        packets(&c.commands)
            .into_iter()
            .zip(packets(&c.responses))
            .map(move |(cmd, rsp)| (i, cmd, rsp))
    });
    for (conn, cmd, rsp) in exchanges {
        let mut c = Reader(cmd);
        let tag = c.u16();
        c.u32();
        let cc = c.u32();
        let handles = match cc {
            CC_START_AUTH_SESSION => 2,
            CC_CREATE | CC_LOAD | CC_UNSEAL => 1,
            _ => continue,
        };
        c.take(4 * handles);
        // The command's sessions: (handle, nonceCaller, attributes).
        let mut sessions = Vec::new();
        if tag == ST_SESSIONS {
            let len = c.u32() as usize;
            let mut a = Reader(c.take(len));
            while !a.0.is_empty() {
                let h = a.u32();
                let nonce = a.tpm2b().to_vec();
                let attrs = a.u8();
                a.tpm2b();
                sessions.push((h, nonce, attrs));
            }
        }
        let params = c.0;
        if let Some((h, caller, attrs)) = sessions.first()
            && attrs & ATTR_DECRYPT != 0
            && cc != CC_START_AUTH_SESSION
            && let Some(older) = nonce_tpm.get(h)
        {
            let k = kdfa(auth, b"CFB", caller, older);
            let mut p = Reader(params);
            plain.push((conn, cfb_decrypt(&k[..16], &k[16..], p.tpm2b())));
        }
        let mut r = Reader(rsp);
        let rtag = r.u16();
        r.u32();
        if r.u32() != 0 {
            continue;
        }
        let rsp_handles = match cc {
            CC_START_AUTH_SESSION | CC_LOAD => 1,
            _ => 0,
        };
        let first_handle = r.u32();
        if rsp_handles == 0 {
            r = Reader(&rsp[10..]);
        }
        let params = if rtag == ST_SESSIONS {
            let len = r.u32() as usize;
            r.take(len)
        } else {
            r.0
        };
        if cc == CC_START_AUTH_SESSION {
            nonce_tpm.insert(first_handle, Reader(params).tpm2b().to_vec());
            continue;
        }
        // The response's sessions, in the command's order.
        let mut newer = Vec::new();
        while !r.0.is_empty() {
            let nonce = r.tpm2b().to_vec();
            let attrs = r.u8();
            r.tpm2b();
            newer.push((nonce, attrs));
        }
        for (i, ((h, caller, _), (nonce, attrs))) in sessions.iter().zip(&newer).enumerate() {
            if i == 0 && attrs & ATTR_ENCRYPT != 0 && matches!(cc, CC_CREATE | CC_UNSEAL) {
                let k = kdfa(auth, b"CFB", nonce, caller);
                plain.push((
                    conn,
                    cfb_decrypt(&k[..16], &k[16..], Reader(params).tpm2b()),
                ));
            }
            nonce_tpm.insert(*h, nonce.clone());
        }
    }
    plain
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secrets_never_cross_the_tpm_bus_readably() {
    let tpm = Swtpm::start();
    let relay = Relay::start(tpm.port());
    let state = tempfile::tempdir().unwrap();
    let config = TpmConfig {
        tcti: relay.tcti(),
        pcr: edgeward_hsm_hw::tpm::DEFAULT_PCR,
        boot_pcrs: None,
    };
    // The backend's work: create and unseal the AEAD key, create and use a
    // signing key; then a second open (a daemon restart) unseals again.
    {
        let hsm = TpmHsm::open(state.path(), config.clone()).unwrap();
        hsm.aead_key("master-encryption").unwrap();
        hsm.signing_key("device-ca").unwrap();
        hsm.sign_digest("device-ca", &[7u8; 32]).unwrap();
    }
    {
        let hsm = TpmHsm::open(state.path(), config.clone()).unwrap();
        let ct = hsm.encrypt("master-encryption", b"x", b"").unwrap();
        assert_eq!(
            &hsm.decrypt("master-encryption", &ct, b"").unwrap()[..],
            b"x"
        );
    }
    let backend_conns = relay.connections().len();
    assert!(
        backend_conns >= 2,
        "the relay saw {backend_conns} connections"
    );

    // The control: an unseal in an unsalted session, through the relay.
    let keys = state.path().join("hsm-tpm/keys");
    let (public, private) =
        decode_blob(&std::fs::read(keys.join("master-encryption.aead")).unwrap()).unwrap();
    let auth_value = std::sync::OnceLock::new();
    let secret = {
        use tss_esapi::interface_types::resource_handles::Hierarchy;
        let tcti = tss_esapi::TctiNameConf::from_str(&relay.tcti()).unwrap();
        let mut ctx = tss_esapi::Context::new(tcti).unwrap();
        let primary = ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(
                    Hierarchy::Owner,
                    primary_template().unwrap(),
                    None,
                    None,
                    None,
                    None,
                )
            })
            .unwrap()
            .key_handle;
        let h = ctx
            .execute_with_nullauth_session(|c| c.load(primary, private, public))
            .unwrap();
        // Another user of the TPM, without the state directory's secret,
        // cannot use the key: its auth value is not empty.
        let refused = ctx.execute_with_nullauth_session(|c| c.unseal(h.into()));
        assert!(
            refused.is_err(),
            "the sealed key opened without its auth value"
        );
        // The control holds the secret (it reads the state directory).
        let secret: [u8; 32] = std::fs::read(state.path().join("hsm-tpm/auth.secret"))
            .unwrap()
            .try_into()
            .unwrap();
        let auth = edgeward_hsm_hw::tpm::object_auth(&secret, "master-encryption");
        let _ = auth_value.set(auth.to_vec());
        ctx.tr_set_auth(
            h.into(),
            tss_esapi::structures::Auth::try_from(auth.to_vec()).unwrap(),
        )
        .unwrap();
        ctx.execute_with_nullauth_session(|c| c.unseal(h.into()))
            .unwrap()
            .value()
            .to_vec()
    };
    assert_eq!(secret.len(), 32);
    let conns = relay.connections();
    let read = eavesdrop(&conns, auth_value.get().unwrap());
    let control: Vec<&Vec<u8>> = read
        .iter()
        .filter(|(i, _)| *i >= backend_conns)
        .map(|(_, p)| p)
        .collect();
    assert!(
        control.iter().any(|p| contains(p, &secret)),
        "the eavesdropper must read an unsalted unseal (control); it read {} parameters",
        control.len()
    );

    // The backend's traffic: neither the AEAD key nor the signing key's
    // private blob, raw or decrypted.
    let (_, signing_private) =
        decode_blob(&std::fs::read(keys.join("device-ca.p256")).unwrap()).unwrap();
    let signing_private = signing_private.value().to_vec();
    for (i, conn) in conns[..backend_conns].iter().enumerate() {
        for raw in [&conn.commands, &conn.responses] {
            assert!(
                !contains(raw, &secret),
                "connection {i}: the AEAD key in the clear"
            );
            assert!(
                !contains(raw, &signing_private),
                "connection {i}: a key blob in the clear"
            );
        }
    }
    let mut decrypted = 0;
    for (i, p) in read.iter().filter(|(i, _)| *i < backend_conns) {
        decrypted += 1;
        assert!(
            !contains(p, &secret),
            "connection {i}: the eavesdropper read the AEAD key"
        );
        assert!(
            !contains(p, &signing_private),
            "connection {i}: the eavesdropper read a key blob"
        );
    }
    // The backend's commands were session-encrypted (the eavesdropper had
    // parameters to try), just not under a key it could derive.
    assert!(decrypted > 0, "no encrypted parameters seen");
}
