//! The `tpm` backend's settings. The backend itself (tss-esapi, Debian's
//! libtss2) is in `edgeward-hsm-hw`, which only the key daemon links.

/// The PCR used as the measurement register unless configured otherwise:
/// 13, which software cannot reset (PCRs 0-15 are reset only by a
/// platform reset; 16 and 23 can be reset from any locality, so malware
/// could reset 23 and replay expected values into a forged quote). On
/// distributions that boot with GRUB, or systemd-boot without unified
/// kernel images, nothing else extends PCR 13; systemd-stub extends it with
/// the system extension images a UKI boot loads (`TPM2_PCR_SYSEXTS`), and
/// then the value before edgeward's first event is recorded as the log's
/// baseline. Other choices: 12 (systemd-stub: kernel command line,
/// credentials), 14 (shim: MOK lists), 15 (systemd: machine id, volume
/// keys), 8-10 (GRUB, IMA) are all taken on common distributions.
pub const DEFAULT_PCR: u8 = 13;

/// The `tpm` backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmConfig {
    /// TCTI string, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// PCR index for the measurement register (0..=23).
    pub pcr: u8,
    /// Boot PCRs new keys are bound to (their use needs these PCRs to hold
    /// what they held when the key was made). `None`: PCR 7 (the Secure
    /// Boot state) if the platform measured its boot there (non-zero),
    /// else none. Never the measurement register, never 16-23.
    pub boot_pcrs: Option<Vec<u8>>,
}

/// Why `boot_pcrs` cannot be used.
///
/// # Errors
///
/// A PCR at or past 16 (resettable, or the debug PCR), the measurement
/// register itself, or one named twice.
pub fn check_boot_pcrs(pcrs: &[u8], register: u8) -> std::result::Result<(), String> {
    let mut seen = [false; 24];
    for &p in pcrs {
        if p >= 16 {
            return Err(format!(
                "hsm.boot_pcrs: PCR {p} can be reset by software; bind keys to boot PCRs 0-15"
            ));
        }
        if p == register {
            return Err(format!(
                "hsm.boot_pcrs: PCR {p} is the measurement register edgeward extends at run time; a key bound to it would stop working at the next event"
            ));
        }
        if std::mem::replace(&mut seen[usize::from(p)], true) {
            return Err(format!("hsm.boot_pcrs: PCR {p} is named twice"));
        }
    }
    Ok(())
}
