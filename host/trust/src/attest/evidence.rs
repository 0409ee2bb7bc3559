//! Attestation evidence: what `edgeward attest` writes and `edgeward
//! attest verify` reads, one file each, in the layouts the TPM tools use.
//!
//! | file | what |
//! |---|---|
//! | `quote.msg` | the signed message: TPMS_ATTEST (tpm), or [`crate::hsm::soft_quote_message`] (soft) |
//! | `quote.sig` | TPMT_SIGNATURE (tpm), or a DER ECDSA P-256 signature (soft) |
//! | `ak.pem` | the attestation key's public key (SPKI PEM) |
//! | `ak.pub` | (tpm) its TPM2B_PUBLIC, whose name a credential is made for |
//! | `ek.pem` | (tpm, where the TPM has one) the endorsement key's certificate |
//! | `pcrs.bin` | the quoted PCR value, in `tpm2_quote -o`'s serialized layout |
//! | `event.log` | the measurement log (CEL-JSON, JSON-SEQ); with `from` N, its records from N on |
//! | `evidence.json` | device, backend, PCR, boot, nonce, baseline and what each file is |
//!
//! `tpm2_checkquote -u ak.pem -m quote.msg -s quote.sig -f pcrs.bin -g
//! sha256 -q NONCE` accepts a TPM backend's evidence.
//!
//! Who may reach it: `edgeward attest` runs as a user who can open the HSM
//! (the daemon's user), or asks the daemon through its socket (an operator
//! or reader). It reveals only public values: the register, the log, public
//! keys and certificates. A hostile caller can choose the nonce (it is only
//! signed over, at most 64 bytes) and hand in a credential (the TPM checks
//! it was made for this EK and AK; anything else is refused).

use std::path::Path;

use serde_json::json;

use crate::hsm::{Hsm, public_key_pem};
use crate::measure::hex;

use super::eventlog::{self, EventLog};

/// The attestation key the daemon quotes with.
pub const AK_ID: &str = "attestation";

/// The format named in `evidence.json`.
pub const FORMAT: &str = "edgeward-evidence/1";

/// Every file evidence may hold (nothing else is written or read).
pub const FILES: &[&str] = &[
    "quote.msg",
    "quote.sig",
    "ak.pem",
    "ak.pub",
    "ek.pem",
    "pcrs.bin",
    "event.log",
    "evidence.json",
];

/// What the evidence says about the device.
#[derive(Debug, Clone)]
pub struct Device<'a> {
    /// `[identity] device_id`.
    pub id: &'a str,
    /// The boot the log belongs to.
    pub boot_id: &'a str,
}

/// The files of a piece of evidence, by name (names from [`FILES`]).
pub type Files = Vec<(&'static str, Vec<u8>)>;

/// A credential as `tpm2_makecredential` writes it: magic `0xBADCC0DE`,
/// version 1 (both big-endian u32), then TPM2B_ID_OBJECT and
/// TPM2B_ENCRYPTED_SECRET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFile {
    /// TPM2B_ID_OBJECT's buffer.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET's buffer.
    pub secret: Vec<u8>,
}

const CREDENTIAL_MAGIC: u32 = 0xBADC_C0DE;

impl CredentialFile {
    /// Its bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = CREDENTIAL_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&1u32.to_be_bytes());
        for b in [&self.id_object, &self.secret] {
            out.extend_from_slice(&u16::try_from(b.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(b);
        }
        out
    }

    /// Parses [`CredentialFile::to_bytes`]'s layout.
    ///
    /// # Errors
    ///
    /// Another layout, named.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let header = bytes
            .get(..8)
            .ok_or("a credential file starts with an 8-byte header")?;
        if header[..4] != CREDENTIAL_MAGIC.to_be_bytes() || header[4..] != 1u32.to_be_bytes() {
            return Err("not a credential file (magic 0xBADCC0DE, version 1)".into());
        }
        let mut rest = &bytes[8..];
        let mut take = |what: &str| -> Result<Vec<u8>, String> {
            let len = rest
                .get(..2)
                .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
                .ok_or_else(|| format!("the credential file ends before its {what}"))?;
            let b = rest
                .get(2..2 + len)
                .ok_or_else(|| format!("the credential file's {what} is cut short"))?
                .to_vec();
            rest = &rest[2 + len..];
            Ok(b)
        };
        let id_object = take("id object")?;
        let secret = take("encrypted secret")?;
        if id_object.is_empty() || secret.is_empty() {
            return Err("the credential file holds an empty part".into());
        }
        if !rest.is_empty() {
            return Err("the credential file has bytes after its secret".into());
        }
        Ok(Self { id_object, secret })
    }
}

/// Gathers evidence: the log and a quote of the register over `nonce`
/// taken together (the log's shared lock is held, so no event lands in
/// between), the attestation key and, where the HSM has them, its public
/// area and the endorsement certificate. With `credential`, the quote's
/// nonce is the secret the credential carries, which only this HSM's EK
/// and AK together can recover: the quote then proves the AK lives beside
/// the EK.
///
/// # Errors
///
/// The HSM cannot quote (PKCS#11: not supported), the credential is not
/// for this device, or the log cannot be read; named.
pub fn gather(
    hsm: &dyn Hsm,
    log: &EventLog,
    device: &Device<'_>,
    nonce: &[u8],
    credential: Option<&CredentialFile>,
    from: u64,
) -> Result<Files, String> {
    let backend = hsm.backend();
    if backend == "pkcs11" {
        return Err(
            "attestation is not supported on the pkcs11 backend: a PKCS#11 token has no \
             measurement register to quote"
                .into(),
        );
    }
    let ak = hsm
        .attestation_key(AK_ID)
        .map_err(|e| format!("cannot create or load the attestation key: {e}"))?;
    let activated;
    let nonce = match credential {
        Some(c) => {
            activated = hsm
                .activate_credential(AK_ID, &c.id_object, &c.secret)
                .map_err(|e| {
                    format!(
                        "the credential cannot be activated (it was not made for this \
                         device's endorsement and attestation keys?): {e}"
                    )
                })?;
            activated.as_slice()
        }
        None => nonce,
    };
    let (log_bytes, quote) = log.with_bytes(|bytes| {
        hsm.quote(AK_ID, nonce)
            .map(|q| (bytes.to_vec(), q))
            .map_err(|e| format!("cannot quote the measurement register: {e}"))
    })??;
    let ak_pem = public_key_pem(&ak).ok_or("the attestation key is not a P-256 point")?;
    let ak_public = hsm
        .attestation_public(AK_ID)
        .map_err(|e| format!("cannot read the attestation key's public area: {e}"))?;
    let ek = hsm
        .endorsement_certificate()
        .map_err(|e| format!("cannot read the endorsement key's certificate: {e}"))?;
    let records =
        eventlog::parse(&log_bytes).map_err(|e| format!("{}: {e}", log.path().display()))?;
    let baseline = records
        .first()
        .filter(|r| r.kind() == "baseline")
        .and_then(|r| r.sha256().ok());
    // Incremental evidence: the records from `from` on (a verifier holds
    // the earlier ones, checked), with a quote that covers all.
    let total = records.len();
    let log_bytes = eventlog::tail_from(&log_bytes, from)
        .ok_or_else(|| {
            format!("from: the log of this boot has {total} records, not more than {from}")
        })?
        .to_vec();
    let mut files: Files = vec![
        ("quote.msg", quote.message),
        ("quote.sig", quote.signature),
        ("ak.pem", ak_pem.into_bytes()),
        ("pcrs.bin", pcrs_bin(log.pcr(), &quote.register)),
        ("event.log", log_bytes),
    ];
    let mut described = serde_json::Map::new();
    let mut describe = |name: &str, what: &str| {
        described.insert(name.to_owned(), json!(what));
    };
    describe(
        "quote.msg",
        if backend == "tpm" {
            "TPMS_ATTEST (TPM2_Quote)"
        } else {
            "edgeward soft quote v1: label, register, nonce"
        },
    );
    describe(
        "quote.sig",
        if backend == "tpm" {
            "TPMT_SIGNATURE (ECDSA P-256, SHA-256)"
        } else {
            "ECDSA P-256 over quote.msg (SHA-256), DER"
        },
    );
    describe("ak.pem", "the attestation key (SubjectPublicKeyInfo, PEM)");
    describe(
        "pcrs.bin",
        "the quoted PCR value (tpm2_quote -o serialized layout)",
    );
    describe(
        "event.log",
        "the measurement log (TCG CEL-JSON records, JSON-SEQ)",
    );
    if let Some(public) = ak_public {
        files.push(("ak.pub", public));
        describe(
            "ak.pub",
            "the attestation key's TPM2B_PUBLIC (its name binds credentials)",
        );
    }
    if let Some(der) = &ek {
        files.push((
            "ek.pem",
            crate::identity::authority::pem_block("CERTIFICATE", der).into_bytes(),
        ));
        describe(
            "ek.pem",
            "the endorsement key's certificate (RSA 2048, NV 0x01c00002)",
        );
    }
    describe("evidence.json", "this description");
    let evidence = json!({
        "format": FORMAT,
        "device": device.id,
        "backend": backend,
        "pcr": log.pcr(),
        "hash": "sha256",
        "boot_id": device.boot_id,
        "nonce": hex(&quote.nonce),
        "credential_activated": credential.is_some(),
        "register": hex(&quote.register),
        "baseline": baseline.map(|b| hex(&b)),
        "events": total,
        "from": from,
        "endorsement_certificate": ek.is_some(),
        "files": described,
    });
    let mut text = serde_json::to_string_pretty(&evidence).map_err(|e| e.to_string())?;
    text.push('\n');
    files.push(("evidence.json", text.into_bytes()));
    Ok(files)
}

/// Writes `files` into `dir` (created, 0700; files 0644: evidence is
/// public).
///
/// # Errors
///
/// A name not in [`FILES`], or the directory or a file cannot be written.
pub fn write_dir(dir: &Path, files: &Files) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, bytes) in files {
        if !FILES.contains(name) {
            return Err(format!("not an evidence file: {name}"));
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // A file an earlier attest wrote that this one has not (ek.pem, ak.pub)
    // would be read as this evidence's: remove it.
    for name in FILES {
        if !files.iter().any(|(n, _)| n == name) {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", dir.join(name).display())),
            }
        }
    }
    Ok(())
}

const PCR_BANKS: usize = 16;
const DIGESTS_PER_LIST: usize = 8;
/// The serialized layout's size for one bank and one PCR.
pub const PCRS_BIN_LEN: usize = 4 + PCR_BANKS * 8 + 4 + 4 + DIGESTS_PER_LIST * 66;
const TPM_ALG_SHA256: u16 = 0x000b;

/// One SHA-256 PCR's value in the layout `tpm2_quote -o` writes by
/// default in tpm2-tools 5.4 ("serialized": the host's little-endian
/// TPML_PCR_SELECTION, a u32 count of digest lists, then the TPML_DIGEST
/// structures, unpacked).
pub fn pcrs_bin(pcr: u32, value: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PCRS_BIN_LEN);
    out.extend_from_slice(&1u32.to_le_bytes());
    for bank in 0..PCR_BANKS {
        let mut sel = [0u8; 8];
        if bank == 0 {
            sel[..2].copy_from_slice(&TPM_ALG_SHA256.to_le_bytes());
            sel[2] = 3;
            let (byte, bit) = ((pcr / 8) as usize, pcr % 8);
            if byte < 4 {
                sel[3 + byte] = 1 << bit;
            }
        }
        out.extend_from_slice(&sel);
    }
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for i in 0..DIGESTS_PER_LIST {
        let mut d = [0u8; 66];
        if i == 0 {
            d[..2].copy_from_slice(&32u16.to_le_bytes());
            d[2..34].copy_from_slice(value);
        }
        out.extend_from_slice(&d);
    }
    out
}

/// Reads [`pcrs_bin`]'s layout: the one SHA-256 PCR it selects and its
/// value.
///
/// # Errors
///
/// Another layout, more than one PCR or bank, or not SHA-256; named.
pub fn parse_pcrs_bin(bytes: &[u8]) -> Result<(u32, [u8; 32]), String> {
    if bytes.len() != PCRS_BIN_LEN {
        return Err(format!(
            "pcrs.bin is {} bytes; one SHA-256 PCR in the serialized layout is {PCRS_BIN_LEN}",
            bytes.len()
        ));
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    if u32_at(0) != 1 {
        return Err("pcrs.bin selects more than one bank".into());
    }
    let sel = &bytes[4..12];
    if u16::from_le_bytes([sel[0], sel[1]]) != TPM_ALG_SHA256 {
        return Err("pcrs.bin's bank is not SHA-256".into());
    }
    let size = usize::from(sel[2]).min(4);
    let selected: Vec<u32> = (0..size * 8)
        .filter(|i| sel[3 + i / 8] & (1 << (i % 8)) != 0)
        .map(|i| i as u32)
        .collect();
    let [pcr] = selected[..] else {
        return Err(format!("pcrs.bin selects PCRs {selected:?}, not one"));
    };
    let at = 4 + PCR_BANKS * 8;
    if u32_at(at) != 1 || u32_at(at + 4) != 1 {
        return Err("pcrs.bin holds more than one digest".into());
    }
    let d = &bytes[at + 8..at + 8 + 66];
    if u16::from_le_bytes([d[0], d[1]]) != 32 {
        return Err("pcrs.bin's digest is not 32 bytes".into());
    }
    let mut value = [0u8; 32];
    value.copy_from_slice(&d[2..34]);
    Ok((pcr, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcrs_bin_round_trips_and_has_the_tools_size() {
        let v = [7u8; 32];
        let b = pcrs_bin(13, &v);
        assert_eq!(b.len(), 668, "tpm2_quote -o writes 668 bytes for one PCR");
        assert_eq!(&b[4..12], &[0x0b, 0, 3, 0, 0x20, 0, 0, 0]);
        assert_eq!(parse_pcrs_bin(&b).unwrap(), (13, v));
        assert!(parse_pcrs_bin(&b[1..]).is_err());
        let mut two = b.clone();
        two[7] = 1;
        assert!(parse_pcrs_bin(&two).unwrap_err().contains("not one"));
    }

    #[test]
    fn credential_files_round_trip_and_refuse_other_bytes() {
        let c = CredentialFile {
            id_object: vec![1; 50],
            secret: vec![2; 256],
        };
        let b = c.to_bytes();
        assert_eq!(CredentialFile::parse(&b).unwrap(), c);
        assert!(CredentialFile::parse(&b[..b.len() - 1]).is_err());
        let mut more = b.clone();
        more.push(0);
        assert!(CredentialFile::parse(&more).is_err());
        assert!(CredentialFile::parse(b"garbage!").is_err());
    }
}
