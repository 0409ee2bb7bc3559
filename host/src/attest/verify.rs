//! `edgeward attest verify`: checks evidence ([`super::evidence`]) the way
//! a remote verifier does, with nothing from the device but the files:
//!
//! 1. the signature and its algorithms (ECDSA P-256 with SHA-256 only);
//! 2. the attestation structure (TPM-generated quote, or the soft label);
//! 3. the nonce (the verifier's, or the secret of its credential
//!    challenge);
//! 4. the PCR digest (the quoted digest is the hash of `pcrs.bin`'s value,
//!    for the PCR the evidence names);
//! 5. the log replays to the quoted value: a prefix must, and events
//!    appended after the quote are reported, as keylime does;
//! 6. the baseline (a register not at zero before the first event fails
//!    unless the policy allows it);
//! 7. the policy: each module's digest allowed for its name, or signed by
//!    an allowed publisher; allowed executables; incidents (integrity
//!    failures, refused signatures, rejected cache entries) fail;
//! 8. with `--ek-ca`: the EK certificate chains to the CA;
//! 9. with `--challenge`: the AK is the one the credential was made for
//!    (same name, same EK), a restricted signing key fixed to the TPM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::eventlog::{self, Record, hex_decode};
use super::evidence::parse_pcrs_bin;
use super::wire;
use crate::measure::hex;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Its name.
    pub name: &'static str,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// What a verifier holds: what it accepts, whatever the evidence says of
/// itself. Every field's default is the strict one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Backends accepted (default: `tpm` only). `soft` has no hardware
    /// root: its evidence is reported as unproven even when it passes.
    #[serde(default)]
    pub backends: Vec<String>,
    /// The register the log is extended into (default: the daemon's,
    /// 13). Never 16 to 23, which software or a locality can reset.
    #[serde(default)]
    pub pcr: Option<u32>,
    /// Enrolled attestation keys for this device: `ak.pem` files
    /// (relative to the policy file) or `sha256:HEX` of the key's
    /// SubjectPublicKeyInfo. Without one, the AK must be bound to a
    /// certified EK (`--challenge` with `--ek-ca`).
    #[serde(default)]
    pub aks: Vec<String>,
    /// Enrolled endorsement keys for this device: EK certificate files
    /// (PEM, relative to the policy file) or `sha256:HEX` of the EK's
    /// SubjectPublicKeyInfo. With any, the certified EK the AK is bound to
    /// must be one of them: the evidence is then this device's TPM, not
    /// just some genuine TPM.
    #[serde(default)]
    pub eks: Vec<String>,
    /// Accepted non-zero values (hex) of the register before edgeward's
    /// first event (something else extends it on this platform).
    #[serde(default)]
    pub baselines: Vec<String>,
    /// Replaced by `baselines`: refused with a message saying so.
    #[serde(default)]
    pub allow_baseline: Option<bool>,
    /// Allowed configuration digests (sha256:HEX, the `config` event's);
    /// when any are named, one must be measured before the modules.
    #[serde(default)]
    pub configs: Vec<String>,
    /// Accept integrity failures, refused signatures and rejected cache
    /// entries in the log.
    #[serde(default)]
    pub allow_incidents: bool,
    /// Allowed executables (sha256:HEX): the daemon's and the key daemon's;
    /// empty: any.
    #[serde(default)]
    pub executables: Vec<String>,
    /// Allowed publisher keys: key files (raw, PEM, DER, OpenSSH; relative
    /// to the policy file) or the hex of their raw encoding. A module
    /// signed by one passes whatever its digest.
    #[serde(default)]
    pub publishers: Vec<String>,
    /// Allowed digests (sha256:HEX) per module name.
    #[serde(default)]
    pub modules: BTreeMap<String, Vec<String>>,
}

impl Policy {
    /// Reads a policy file (TOML).
    ///
    /// # Errors
    ///
    /// It cannot be read or parsed, or a publisher key file cannot be
    /// read; named.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut p: Policy =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if p.allow_baseline.is_some() {
            return Err(format!(
                "{}: allow_baseline is replaced by baselines = [\"HEX\"]: name the values the register may hold before edgeward's first event",
                path.display()
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut aks = Vec::new();
        for a in &p.aks {
            if let Some(d) = a.strip_prefix("sha256:") {
                aks.push(format!("sha256:{}", d.to_ascii_lowercase()));
                continue;
            }
            let file = base.join(a);
            let pem = std::fs::read(&file)
                .map_err(|e| format!("{}: aks: {}: {e}", path.display(), file.display()))?;
            aks.push(
                ak_digest(&pem)
                    .map_err(|e| format!("{}: aks: {}: {e}", path.display(), file.display()))?,
            );
        }
        p.aks = aks;
        let mut eks = Vec::new();
        for e in &p.eks {
            eks.push(ek_digest(e, base).map_err(|m| format!("{}: eks: {m}", path.display()))?);
        }
        p.eks = eks;
        for b in &mut p.baselines {
            *b = b.trim().to_ascii_lowercase();
        }
        let mut keys = Vec::new();
        for k in &p.publishers {
            if hex_decode(k).is_some_and(|b| b.len() == 33) {
                keys.push(k.to_ascii_lowercase());
                continue;
            }
            let file = base.join(k);
            let pk = super::publisher::load_publishers(&[file]).map_err(|e| e.to_string())?;
            keys.extend(pk.iter().map(|k| hex(&k.to_bytes())));
        }
        p.publishers = keys;
        for list in p
            .modules
            .values_mut()
            .chain([&mut p.executables, &mut p.configs])
        {
            for d in list.iter_mut() {
                *d = normalize_digest(d);
            }
        }
        Ok(p)
    }
}

/// `sha256:HEX` of an EK named as `sha256:HEX` or by its certificate file
/// (PEM, relative to `base`): what a policy's `eks` holds.
///
/// # Errors
///
/// The file cannot be read or holds no certificate.
pub fn ek_digest(entry: &str, base: &Path) -> Result<String, String> {
    if let Some(d) = entry.strip_prefix("sha256:") {
        return Ok(format!("sha256:{}", d.to_ascii_lowercase()));
    }
    let file = base.join(entry);
    let pem = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let der = pem_certificates(&pem, &file.display().to_string())?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(format!(
        "sha256:{}",
        hex(&Sha256::digest(cert.public_key().raw))
    ))
}

/// `sha256:HEX` of an AK's SubjectPublicKeyInfo (DER), from its PEM: what
/// a policy's `aks` names.
///
/// # Errors
///
/// Not a P-256 public key in PEM.
pub fn ak_digest(pem: &[u8]) -> Result<String, String> {
    use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
    let text = std::str::from_utf8(pem).map_err(|_| "not text")?;
    let pk = p256::PublicKey::from_public_key_pem(text)
        .map_err(|e| format!("not a P-256 public key: {e}"))?;
    let der = pk.to_public_key_der().map_err(|e| e.to_string())?;
    Ok(format!("sha256:{}", hex(&Sha256::digest(der.as_bytes()))))
}

fn normalize_digest(d: &str) -> String {
    let d = d.trim().to_ascii_lowercase();
    if d.starts_with("sha256:") {
        d
    } else {
        format!("sha256:{d}")
    }
}

/// The verifier's record of a credential challenge (`edgeward attest
/// challenge`): the secret the device must recover, and which EK and AK
/// it was made for. Kept by the verifier; never sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// `edgeward-challenge/1`.
    pub format: String,
    /// The secret (hex): the evidence's quote must carry it as its nonce.
    pub secret: String,
    /// The AK's name (hex) the credential was made for.
    pub ak_name: String,
    /// SHA-256 (hex) of the EK certificate's SubjectPublicKeyInfo.
    pub ek_spki_sha256: String,
}

/// What to check evidence against.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The device the evidence must be from.
    pub device: Option<String>,
    /// The nonce the verifier sent.
    pub nonce: Option<Vec<u8>>,
    /// The verifier's policy.
    pub policy: Option<Policy>,
    /// Trusted EK CA certificates (DER).
    pub ek_ca: Option<Vec<Vec<u8>>>,
    /// The credential challenge the evidence answers.
    pub challenge: Option<Challenge>,
    /// Evidence of the same boot verified before: incremental evidence
    /// (`from` N) is checked as its log (event.full.log, else event.log)
    /// followed by the new records.
    pub previous: Option<PathBuf>,
}

/// The name of the whole log a verifier keeps beside incremental evidence
/// it has verified: the next `previous`.
pub const FULL_LOG: &str = "event.full.log";

/// How many records the evidence in `dir` (verified before) holds in all:
/// what the next incremental evidence starts from.
///
/// # Errors
///
/// Not evidence, or incremental evidence without its whole log.
pub fn records_held(dir: &Path) -> Result<u64, String> {
    let files = Files {
        dir: dir.to_owned(),
    };
    let e = read_evidence(&files)?;
    let log = if files.exists(FULL_LOG) {
        files.read(FULL_LOG)?
    } else if e.from == 0 {
        files.read("event.log")?
    } else {
        return Err(format!(
            "{}: incremental evidence without its {FULL_LOG} (was it verified?)",
            dir.display()
        ));
    };
    Ok(eventlog::parse(&log)?.len() as u64)
}

/// The whole log of `evidence` (incremental: the previous evidence's log,
/// then its records), and how many records the previous held.
fn whole_log(
    files: &Files,
    evidence: &Evidence,
    previous: Option<&Path>,
) -> Result<Vec<u8>, String> {
    let tail = files.read("event.log")?;
    if evidence.from == 0 {
        return Ok(tail);
    }
    let prev = previous.ok_or_else(|| {
        format!(
            "the evidence holds the log from record {} on: give the evidence verified before (--previous)",
            evidence.from
        )
    })?;
    let pf = Files {
        dir: prev.to_owned(),
    };
    let before = read_evidence(&pf).map_err(|e| format!("--previous: {e}"))?;
    if before.boot_id != evidence.boot_id || before.device != evidence.device {
        return Err(format!(
            "--previous is from device {} boot {}, this from device {} boot {}: ask for the whole log",
            before.device, before.boot_id, evidence.device, evidence.boot_id
        ));
    }
    let mut log = if pf.exists(FULL_LOG) {
        pf.read(FULL_LOG)?
    } else if before.from == 0 {
        pf.read("event.log")?
    } else {
        return Err(
            "--previous is incremental evidence without its event.full.log (was it verified?)"
                .into(),
        );
    };
    let held = eventlog::parse(&log)
        .map_err(|e| format!("--previous: {e}"))?
        .len() as u64;
    if held != evidence.from {
        return Err(format!(
            "--previous holds {held} records; this evidence continues from record {}",
            evidence.from
        ));
    }
    log.extend_from_slice(&tail);
    Ok(log)
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        std::fs::read(self.dir.join(name)).map_err(|e| format!("{name}: {e}"))
    }
    fn exists(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }
}

/// Checks the evidence in `dir`; every check is returned, passed or not.
pub fn verify(dir: &Path, expect: &Expect) -> Vec<Check> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, r: Result<String, String>| {
        let ok = r.is_ok();
        out.push(Check {
            name,
            ok,
            detail: r.unwrap_or_else(|e| e),
        });
        ok
    };
    let files = Files {
        dir: dir.to_owned(),
    };
    let evidence = match read_evidence(&files) {
        Ok(e) => e,
        Err(e) => {
            check("evidence", Err(e));
            return out;
        }
    };
    check(
        "evidence",
        Ok(format!(
            "{} backend, device {}, PCR {}, boot {}",
            evidence.backend, evidence.device, evidence.pcr, evidence.boot_id
        )),
    );
    // What is acceptable is the verifier's to say, never the evidence's.
    let default_policy = Policy::default();
    let policy = expect.policy.as_ref().unwrap_or(&default_policy);
    check(
        "device",
        match &expect.device {
            None => Err(
                "no device id to check against (--device): evidence from any device would pass"
                    .into(),
            ),
            Some(d) if *d == evidence.device => Ok(format!("the evidence is from {d}, as asked")),
            Some(d) => Err(format!(
                "the evidence is from device {:?}, not {d}: another device's answer",
                evidence.device
            )),
        },
    );
    let backends: Vec<&str> = if policy.backends.is_empty() {
        vec!["tpm"]
    } else {
        policy.backends.iter().map(String::as_str).collect()
    };
    check(
        "backend",
        if !backends.contains(&evidence.backend.as_str()) {
            Err(format!(
                "{} evidence is not accepted: the policy accepts {} (a software device needs backends = [\"soft\"], and is then reported unproven)",
                evidence.backend,
                backends.join(", ")
            ))
        } else if evidence.backend == "soft" {
            Ok(UNPROVEN.into())
        } else {
            Ok(format!("{}: a hardware root", evidence.backend))
        },
    );
    // The soft backend's register is its own (index 0); a TPM's is the
    // policy's (by default the daemon's).
    let want_pcr = if evidence.backend == "soft" {
        0
    } else {
        policy
            .pcr
            .unwrap_or(u32::from(crate::hsm::tpm::DEFAULT_PCR))
    };
    check(
        "pcr",
        if evidence.pcr >= 16 {
            Err(format!(
                "PCR {} can be reset (16 by software, 17 to 23 by a locality): a log in it proves nothing",
                evidence.pcr
            ))
        } else if evidence.pcr != want_pcr {
            Err(format!(
                "the evidence names PCR {}; the policy's register is {want_pcr}",
                evidence.pcr
            ))
        } else {
            Ok(format!("PCR {want_pcr}, as the policy says"))
        },
    );
    let quote = match files.read("quote.msg") {
        Ok(b) => b,
        Err(e) => {
            check("signature", Err(e));
            return out;
        }
    };
    let ak_point = files.read("ak.pem").and_then(|pem| ak_point_from_pem(&pem));
    check(
        "signature",
        ak_point.clone().and_then(|ak| {
            verify_signature(&evidence.backend, &ak, &quote, &files.read("quote.sig")?)
        }),
    );
    // The structure: what was signed, and what it says.
    let attested = match evidence.backend.as_str() {
        "tpm" => wire::parse_quote(&quote).map(|q| Attested {
            nonce: q.extra_data.clone(),
            selection: Some(q.selection.clone()),
            pcr_digest: Some(q.pcr_digest.clone()),
            register: None,
            detail: "a quote the TPM generated (TPMS_ATTEST, TPM_ST_ATTEST_QUOTE)".into(),
        }),
        "soft" => parse_soft(&quote),
        other => Err(format!("unknown backend {other}")),
    };
    let attested = match attested {
        Ok(a) => {
            check("attestation", Ok(a.detail.clone()));
            a
        }
        Err(e) => {
            check("attestation", Err(e));
            return out;
        }
    };
    let wanted_nonce = expect
        .challenge
        .as_ref()
        .map(|c| hex_decode(&c.secret).unwrap_or_default())
        .or_else(|| expect.nonce.clone());
    check(
        "nonce",
        match wanted_nonce {
            None => Err("no nonce to check against (--nonce or --challenge)".into()),
            Some(n) if n == attested.nonce => Ok(format!(
                "the quote carries the {} ({} bytes)",
                if expect.challenge.is_some() {
                    "credential's secret"
                } else {
                    "verifier's nonce"
                },
                n.len()
            )),
            Some(_) => Err(format!(
                "the quote carries nonce {}, not the one expected: stale or for another verifier",
                hex(&attested.nonce)
            )),
        },
    );
    let quoted = files
        .read("pcrs.bin")
        .and_then(|b| parse_pcrs_bin(&b))
        .and_then(|(pcr, value)| {
            if pcr != evidence.pcr {
                return Err(format!(
                    "pcrs.bin holds PCR {pcr}; the evidence names {}",
                    evidence.pcr
                ));
            }
            if let Some(sel) = &attested.selection
                && sel[..] != [(wire::ALG_SHA256, vec![pcr])]
            {
                return Err(format!(
                    "the quote selects {sel:?}, not SHA-256 PCR {pcr} alone"
                ));
            }
            if let Some(d) = &attested.pcr_digest
                && d[..] != Sha256::digest(value)[..]
            {
                return Err("the quoted PCR digest is not the hash of pcrs.bin's value".into());
            }
            if let Some(r) = &attested.register
                && r != &value
            {
                return Err("the quoted register is not pcrs.bin's value".into());
            }
            Ok(value)
        });
    let quoted = match quoted {
        Ok(v) => {
            check(
                "pcr-digest",
                Ok(format!("PCR {} = {}", evidence.pcr, hex(&v))),
            );
            v
        }
        Err(e) => {
            check("pcr-digest", Err(e));
            return out;
        }
    };
    let whole = whole_log(&files, &evidence, expect.previous.as_deref());
    let records = match whole
        .clone()
        .and_then(|b| eventlog::parse(&b).map_err(|e| format!("event.log: {e}")))
        .and_then(|r| replay_to(&r, evidence.pcr, &quoted).map(|n| (r, n)))
    {
        Ok((records, n)) => {
            let after = records.len() - n;
            check(
                "log-replay",
                Ok(format!(
                    "{n} events replay to the quoted value{}",
                    if after > 0 {
                        format!("; {after} appended after the quote (not attested)")
                    } else {
                        String::new()
                    }
                )),
            );
            records[..n].to_vec()
        }
        Err(e) => {
            check("log-replay", Err(e));
            return out;
        }
    };
    check(
        "baseline",
        match records.first().filter(|r| r.kind() == "baseline") {
            None => Ok("the register was at zero before the first event".into()),
            Some(r) => {
                let v = r.sha256().map(|d| hex(&d)).unwrap_or_default();
                if policy.baselines.contains(&v) {
                    Ok(format!("non-zero baseline {v}, named by the policy"))
                } else {
                    Err(format!(
                        "the register was {v} before edgeward's first event this boot: \
                         something else extends PCR {} (name the value in the policy's baselines to accept it)",
                        evidence.pcr
                    ))
                }
            }
        },
    );
    check("events", check_events(policy, &records));
    check("policy", check_policy(policy, &records));
    let ek_spki = if let Some(cas) = &expect.ek_ca {
        let r = files
            .read("ek.pem")
            .map_err(|_| {
                format!(
                    "the evidence carries no EK certificate ({} backend{})",
                    evidence.backend,
                    if evidence.backend == "tpm" {
                        ": this TPM has none in NV"
                    } else {
                        ": no hardware root"
                    }
                )
            })
            .and_then(|pem| check_ek_chain(&pem, cas));
        let spki = r.as_ref().ok().map(|(_, s)| Sha256::digest(s).to_vec());
        check("ek-certificate", r.map(|(d, _)| d));
        spki
    } else {
        None
    };
    if !policy.eks.is_empty() {
        check(
            "ek-enrolled",
            match &ek_spki {
                Some(d) => {
                    let d = format!("sha256:{}", hex(d));
                    if policy.eks.contains(&d) {
                        Ok(format!("the EK {d}, enrolled for this device"))
                    } else {
                        Err(format!(
                            "the EK ({d}) is a genuine TPM's but not the one enrolled for this device (eks)"
                        ))
                    }
                }
                None => Err(
                    "the policy enrolls EKs (eks), but no certified EK was checked (--challenge with --ek-ca)"
                        .into(),
                ),
            },
        );
    }
    if let Some(ch) = &expect.challenge {
        check(
            "ak-binding",
            check_binding(&files, ch, ak_point.ok().as_deref(), ek_spki.as_deref()),
        );
    } else {
        check(
            "ak",
            check_enrolled(&files, policy, ak_point.ok().as_deref()),
        );
    }
    // Verified incremental evidence keeps the whole log checked so far,
    // for the next --previous.
    if evidence.from > 0
        && out.iter().all(|c| c.ok)
        && let Ok(w) = &whole
        && let Err(e) = std::fs::write(dir.join(FULL_LOG), w)
    {
        out.push(Check {
            name: "full-log",
            ok: false,
            detail: format!("cannot keep {FULL_LOG}: {e}"),
        });
    }
    out
}

/// The `backend` check's detail for software evidence the policy accepts.
pub const UNPROVEN: &str =
    "soft: accepted by the policy, UNPROVEN (software keys, no hardware root)";

/// Without a credential challenge, the AK must be one the verifier
/// enrolled for this device; a TPM's must also be a restricted signing
/// key fixed to it.
fn check_enrolled(
    files: &Files,
    policy: &Policy,
    ak_point: Option<&[u8]>,
) -> Result<String, String> {
    if policy.aks.is_empty() {
        return Err("the AK is neither enrolled for this device (the policy's aks) nor bound to a certified EK (--challenge with --ek-ca): any key could have signed this".into());
    }
    let digest = ak_digest(&files.read("ak.pem")?)?;
    if !policy.aks.contains(&digest) {
        return Err(format!(
            "the AK ({digest}) is not one the policy enrolled for this device"
        ));
    }
    if files.exists("ak.pub") {
        let ak = wire::parse_ecc_public(&files.read("ak.pub")?)?;
        check_ak_attributes(ak.attributes)?;
        if Some(ak.point.as_slice()) != ak_point {
            return Err("ak.pub and ak.pem are different keys".into());
        }
    }
    Ok(format!("the enrolled AK {digest}"))
}

/// The events the log must hold, in order, whatever the policy allows
/// besides: the daemon's executable first, or the key daemon's own
/// measurement when it launched the daemon (after a baseline the policy
/// named), an executable before any module, a configuration the policy
/// names before any module (when it names any), and each module the
/// policy expects.
fn check_events(policy: &Policy, records: &[Record]) -> Result<String, String> {
    let mut rest = records.iter().skip_while(|r| r.kind() == "baseline");
    match rest.next() {
        None => {
            return Err(
                "the quoted log holds no events of edgeward's: an empty or baseline-only log proves nothing".into(),
            );
        }
        Some(r) if r.kind() != "executable" && r.kind() != "key-daemon" => {
            return Err(format!(
                "record {} ({}) comes first: the daemon (or the key daemon that launches it) measures its executable before anything else",
                r.recnum,
                r.kind()
            ));
        }
        Some(_) => {}
    }
    // A module is loaded by a measured runtime: after an executable, and
    // not between a launched runtime's exit and the next start.
    let mut measured = false;
    for r in records {
        match r.kind() {
            "executable" => measured = true,
            "runtime-exit" => measured = false,
            // A key daemon that launches starts before its runtime.
            "key-daemon" if !r.content["config"]["launch"].is_null() => measured = false,
            "module" if !measured => {
                return Err(format!(
                    "record {} (module) comes while no measured runtime runs (before any executable, or after a runtime-exit): the runtime that loaded it is unmeasured",
                    r.recnum
                ));
            }
            _ => {}
        }
    }
    if !policy.configs.is_empty() {
        let first_module = records
            .iter()
            .position(|r| r.kind() == "module")
            .unwrap_or(records.len());
        let config_ok = records[..first_module].iter().any(|r| {
            r.kind() == "config"
                && r.content["sha256"]
                    .as_str()
                    .is_some_and(|d| policy.configs.contains(&normalize_digest(d)))
        });
        if !config_ok {
            return Err("no configuration the policy names is measured before the modules".into());
        }
    }
    let missing: Vec<&str> = policy
        .modules
        .keys()
        .filter(|name| {
            !records
                .iter()
                .any(|r| r.kind() == "module" && r.content["name"] == name.as_str())
        })
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "modules the policy expects are not measured: {}",
            missing.join(", ")
        ));
    }
    Ok(format!(
        "the executable first{}, and every expected module ({})",
        if policy.configs.is_empty() {
            ""
        } else {
            ", a named configuration before the modules"
        },
        policy.modules.len()
    ))
}

struct Evidence {
    backend: String,
    device: String,
    pcr: u32,
    boot_id: String,
    /// The first record its event.log holds (incremental evidence).
    from: u64,
}

fn read_evidence(files: &Files) -> Result<Evidence, String> {
    let v: Value = serde_json::from_slice(&files.read("evidence.json")?)
        .map_err(|e| format!("evidence.json: {e}"))?;
    if v["format"] != super::evidence::FORMAT {
        return Err(format!(
            "evidence.json: format {} is not {}",
            v["format"],
            super::evidence::FORMAT
        ));
    }
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    Ok(Evidence {
        backend: s("backend").ok_or("evidence.json: no backend")?,
        device: s("device").unwrap_or_default(),
        pcr: v["pcr"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p < 24)
            .ok_or("evidence.json: no PCR index (0-23)")?,
        boot_id: s("boot_id").unwrap_or_default(),
        from: v["from"].as_u64().unwrap_or(0),
    })
}

fn ak_point_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    use p256::pkcs8::DecodePublicKey as _;
    let text = std::str::from_utf8(pem).map_err(|_| "ak.pem is not text")?;
    let pk = p256::PublicKey::from_public_key_pem(text)
        .map_err(|e| format!("ak.pem is not a P-256 public key: {e}"))?;
    Ok(p256::EncodedPoint::from(pk).as_bytes().to_vec())
}

fn verify_signature(backend: &str, ak: &[u8], msg: &[u8], sig: &[u8]) -> Result<String, String> {
    use p256::ecdsa::signature::Verifier as _;
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(ak)
        .map_err(|_| "ak.pem is not a usable P-256 key")?;
    let signature = if backend == "tpm" {
        tpm_signature(sig, "the quote")?
    } else {
        p256::ecdsa::Signature::from_der(sig)
            .map_err(|_| "quote.sig is not a DER ECDSA signature")?
    };
    key.verify(msg, &signature)
        .map_err(|_| "the quote's signature does not verify with ak.pem: forged, altered, or signed by another key".to_owned())?;
    Ok("ECDSA P-256 with SHA-256 by ak.pem".into())
}

/// A TPMT_SIGNATURE that must be ECDSA over SHA-256, as P-256 (r, s);
/// `what` names the signed thing in errors.
pub(crate) fn tpm_signature(sig: &[u8], what: &str) -> Result<p256::ecdsa::Signature, String> {
    let (hash, r, s) = wire::parse_ecdsa_signature(sig)?;
    if hash != wire::ALG_SHA256 {
        return Err(format!(
            "{what} is signed over hash {hash:#06x}, not SHA-256"
        ));
    }
    let pad = |v: &[u8]| -> Result<[u8; 32], String> {
        let v = v.strip_prefix(&[0]).unwrap_or(v);
        if v.len() > 32 {
            return Err("the signature's scalars are too long for P-256".into());
        }
        let mut a = [0u8; 32];
        a[32 - v.len()..].copy_from_slice(v);
        Ok(a)
    };
    p256::ecdsa::Signature::from_scalars(pad(&r)?, pad(&s)?)
        .map_err(|_| "the signature's scalars are out of range".into())
}

struct Attested {
    nonce: Vec<u8>,
    selection: Option<Vec<(u16, Vec<u32>)>>,
    pcr_digest: Option<Vec<u8>>,
    register: Option<[u8; 32]>,
    detail: String,
}

fn parse_soft(msg: &[u8]) -> Result<Attested, String> {
    const LABEL: &[u8] = b"edgeward soft quote v1\0";
    let rest = msg
        .strip_prefix(LABEL)
        .ok_or("quote.msg is not an edgeward soft quote")?;
    let mut r = wire::Reader::new(rest, "quote.msg (soft quote)");
    let mut register = [0u8; 32];
    for b in &mut register {
        *b = r.u8()?;
    }
    let nonce = r.tpm2b()?.to_vec();
    r.end()?;
    Ok(Attested {
        nonce,
        selection: None,
        pcr_digest: None,
        register: Some(register),
        detail: "soft quote: the soft backend's key, no hardware root".into(),
    })
}

/// How many leading records replay to `quoted` (the rest were appended
/// after the quote).
fn replay_to(records: &[Record], pcr: u32, quoted: &[u8; 32]) -> Result<usize, String> {
    if let Some(r) = records.iter().find(|r| r.pcr != pcr) {
        return Err(format!(
            "record {} is for PCR {}, not {pcr}",
            r.recnum, r.pcr
        ));
    }
    // One pass: the value after each record, compared as it goes.
    let mut value = [0u8; 32];
    if &value == quoted {
        return Ok(0);
    }
    for (i, r) in records.iter().enumerate() {
        value = eventlog::replay_step(&value, r)?;
        if &value == quoted {
            return Ok(i + 1);
        }
    }
    Err(format!(
        "no prefix of the log's {} events replays to the quoted PCR value: \
         an entry was removed, reordered, inserted or edited, or the PCR was \
         extended outside the log",
        records.len()
    ))
}

const INCIDENTS: &[&str] = &["integrity-failure", "signature-refused", "cache-rejected"];

fn check_policy(policy: &Policy, records: &[Record]) -> Result<String, String> {
    let mut failures = Vec::new();
    let mut modules = 0;
    for r in records {
        let c = &r.content;
        let field = |k: &str| c[k].as_str().unwrap_or("").to_owned();
        match r.kind() {
            kind @ ("executable" | "key-daemon") => {
                let d = normalize_digest(&field("sha256"));
                if !policy.executables.is_empty() && !policy.executables.contains(&d) {
                    failures.push(format!("record {}: {kind} {d} is not allowed", r.recnum));
                }
            }
            "config"
                if !policy.configs.is_empty()
                    && !policy.configs.contains(&normalize_digest(&field("sha256"))) =>
            {
                failures.push(format!(
                    "record {}: configuration {} is not one the policy names",
                    r.recnum,
                    field("sha256")
                ));
            }
            "module" => {
                modules += 1;
                let (name, digest) = (field("name"), normalize_digest(&field("digest")));
                let by_digest = policy
                    .modules
                    .get(&name)
                    .is_some_and(|l| l.contains(&digest));
                let by_publisher = c["publisher"]
                    .as_str()
                    .is_some_and(|p| policy.publishers.contains(&p.to_ascii_lowercase()));
                if !by_digest && !by_publisher {
                    failures.push(format!(
                        "record {}: module {name} ({digest}) is {}",
                        r.recnum,
                        if policy.modules.contains_key(&name) {
                            "not an allowed digest for that name"
                        } else {
                            "not in the policy and not signed by an allowed publisher"
                        }
                    ));
                }
            }
            k if INCIDENTS.contains(&k) && !policy.allow_incidents => {
                failures.push(format!(
                    "record {}: {k}{}",
                    r.recnum,
                    c.get("name")
                        .and_then(Value::as_str)
                        .map(|n| format!(" of module {n}"))
                        .unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
    if failures.is_empty() {
        Ok(format!(
            "{modules} module measurements allowed, no incidents"
        ))
    } else {
        Err(failures.join("; "))
    }
}

/// Parses PEM certificates (a bundle) into DER.
///
/// # Errors
///
/// No certificate in it.
pub fn pem_certificates(bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let pem = pem.map_err(|e| format!("{what}: {e}"))?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err(format!("{what}: no PEM certificate in it"));
    }
    Ok(out)
}

/// Checks that the EK certificate (PEM) chains to one of `cas` (each
/// trusted); returns a description and its SubjectPublicKeyInfo (DER).
fn check_ek_chain(pem: &[u8], cas: &[Vec<u8>]) -> Result<(String, Vec<u8>), String> {
    use x509_parser::prelude::*;
    let der = pem_certificates(pem, "ek.pem")?.remove(0);
    let (_, ek) = X509Certificate::from_der(&der).map_err(|e| format!("ek.pem: {e}"))?;
    let anchors: Vec<X509Certificate<'_>> = cas
        .iter()
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect();
    let now = x509_parser::time::ASN1Time::now();
    if !ek.validity().is_valid_at(now) {
        return Err(format!("{} is outside its validity period", ek.subject()));
    }
    // Every certificate in the CA file is trusted: the EK certificate
    // must be signed by one of them, a valid CA.
    let issuer = anchors
        .iter()
        .find(|ca| ca.subject() == ek.issuer() && ek.verify_signature(Some(ca.public_key())).is_ok())
        .ok_or_else(|| {
            format!(
                "the EK certificate ({}) is not signed by a certificate in the EK CA file (its issuer: {})",
                ek.subject(),
                ek.issuer()
            )
        })?;
    let is_ca = issuer
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(format!("{} is not a CA certificate", issuer.subject()));
    }
    if !issuer.validity().is_valid_at(now) {
        return Err(format!(
            "{} is outside its validity period",
            issuer.subject()
        ));
    }
    Ok((
        format!("issued by {}", issuer.subject()),
        ek.public_key().raw.to_vec(),
    ))
}

pub(crate) fn check_ak_attributes(attributes: u32) -> Result<(), String> {
    use wire::attr::*;
    let needed = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    if attributes & needed != needed || attributes & DECRYPT != 0 {
        return Err(format!(
            "the AK's attributes {attributes:#010x} are not those of a restricted signing key \
             created in and fixed to its TPM"
        ));
    }
    Ok(())
}

fn check_binding(
    files: &Files,
    ch: &Challenge,
    ak_point: Option<&[u8]>,
    ek_spki: Option<&[u8]>,
) -> Result<String, String> {
    let ak = wire::parse_ecc_public(&files.read("ak.pub")?)?;
    check_ak_attributes(ak.attributes)?;
    if Some(ak.point.as_slice()) != ak_point {
        return Err("ak.pub and ak.pem are different keys".into());
    }
    if hex(&ak.name) != ch.ak_name.to_ascii_lowercase() {
        return Err(
            "the quoting AK is not the one the credential was made for (a foreign AK)".into(),
        );
    }
    match ek_spki {
        Some(s) if hex(s) == ch.ek_spki_sha256.to_ascii_lowercase() => {}
        Some(_) => {
            return Err("the evidence's EK is not the one the credential was made for".into());
        }
        None => return Err("the EK certificate did not verify (--ek-ca is needed)".into()),
    }
    Ok(
        "the AK recovered a credential made for it and the certified EK: both live in one TPM"
            .into(),
    )
}

/// Makes a credential challenge for the evidence in `dir`: checks its EK
/// certificate against `cas` and its AK's attributes, then encrypts a
/// fresh secret to that EK for that AK. Returns the credential for the
/// device and the verifier's record.
///
/// # Errors
///
/// The EK certificate does not chain to `cas`, the AK is not a restricted
/// signing key, or files are missing; named.
pub fn challenge(
    dir: &Path,
    cas: &[Vec<u8>],
) -> Result<(super::evidence::CredentialFile, Challenge), String> {
    let files = Files {
        dir: dir.to_owned(),
    };
    let pem = files.read("ek.pem").map_err(|e| {
        format!("{e}: the device's evidence carries no EK certificate (not a TPM with one)")
    })?;
    let (_, ek_spki) = check_ek_chain(&pem, cas)?;
    let ak = wire::parse_ecc_public(&files.read("ak.pub")?)?;
    check_ak_attributes(ak.attributes)?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness: {e}"))?;
    let credential = super::credential::make(&ek_spki, &ak.name, &secret)?;
    Ok((
        credential,
        Challenge {
            format: "edgeward-challenge/1".into(),
            secret: hex(&secret),
            ak_name: hex(&ak.name),
            ek_spki_sha256: hex(&Sha256::digest(&ek_spki)),
        },
    ))
}
