//! `edgeward-keyd`: see the crate's documentation.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use edgeward_hsm::HsmConfig;
use edgeward_keyd::policy::Policy;
use edgeward_keyd::server::Server;

const USAGE: &str = "usage: edgeward-keyd --state DIR --socket PATH --device-id ID [--runtime-uid UID]...
       [--trust-domain NAME] [--max-leaf-ttl SECS] [--max-jwt-key-ttl SECS]
       [--hsm soft | --hsm tpm [--tcti TCTI] [--pcr N] | --hsm pkcs11 --module PATH --token LABEL --pin-file PATH]";

#[derive(Debug)]
struct Args {
    state: PathBuf,
    socket: PathBuf,
    hsm: HsmConfig,
    policy: Policy,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut state = None;
    let mut socket = None;
    let mut backend = "soft".to_owned();
    let (mut tcti, mut pcr, mut module, mut token, mut pin_file) = (None, None, None, None, None);
    let mut policy = Policy {
        runtime_uids: Vec::new(),
        trust_domain: "edgeward.local".into(),
        device_id: String::new(),
        max_leaf_ttl: 24 * 3600,
        max_jwt_key_ttl: 7 * 24 * 3600,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String, f: &str| v.parse::<u64>().map_err(|_| format!("{f} {v:?}: a number"));
        match flag.as_str() {
            "--state" => state = Some(PathBuf::from(value()?)),
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--runtime-uid" => {
                let v = value()?;
                let uid = v
                    .parse::<u32>()
                    .map_err(|_| format!("--runtime-uid {v:?}: a uid"))?;
                if uid == 0 {
                    return Err("--runtime-uid 0: root is a principal of its own".into());
                }
                policy.runtime_uids.push(uid);
            }
            "--trust-domain" => policy.trust_domain = value()?,
            "--device-id" => policy.device_id = value()?,
            "--max-leaf-ttl" => policy.max_leaf_ttl = num(value()?, "--max-leaf-ttl")?,
            "--max-jwt-key-ttl" => policy.max_jwt_key_ttl = num(value()?, "--max-jwt-key-ttl")?,
            "--hsm" => backend = value()?,
            "--tcti" => tcti = Some(value()?),
            "--pcr" => pcr = Some(value()?),
            "--module" => module = Some(PathBuf::from(value()?)),
            "--token" => token = Some(value()?),
            "--pin-file" => pin_file = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let check_segment = |v: &str, f: &str| {
        if v.is_empty()
            || !v
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            Err(format!("{f} {v:?}: letters, digits, - _ . only"))
        } else {
            Ok(())
        }
    };
    let state = state.ok_or("--state is required")?;
    let socket = socket.ok_or("--socket is required")?;
    if policy.device_id.is_empty() {
        return Err("--device-id is required (the device's SPIFFE namespace)".into());
    }
    check_segment(&policy.trust_domain, "--trust-domain")?;
    check_segment(&policy.device_id, "--device-id")?;
    let hsm = match backend.as_str() {
        "soft" => HsmConfig::Soft,
        #[cfg(feature = "tpm")]
        "tpm" => HsmConfig::Tpm(edgeward_hsm::tpm::TpmConfig {
            tcti: tcti.unwrap_or_else(|| "device:/dev/tpmrm0".into()),
            pcr: match pcr {
                None => edgeward_hsm::tpm::DEFAULT_PCR,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 23)
                    .ok_or_else(|| format!("--pcr {p:?}: 0..=23"))?,
            },
            boot_pcrs: None,
        }),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => HsmConfig::Pkcs11(edgeward_hsm::pkcs11::Pkcs11Config {
            module: module.ok_or("--hsm pkcs11 needs --module")?,
            token: token.ok_or("--hsm pkcs11 needs --token")?,
            pin_file: pin_file.ok_or("--hsm pkcs11 needs --pin-file")?,
        }),
        other => return Err(format!("--hsm {other:?}: soft, tpm or pkcs11")),
    };
    #[cfg(not(feature = "tpm"))]
    let _ = (tcti, pcr);
    #[cfg(not(feature = "pkcs11"))]
    let _ = (module, token, pin_file);
    Ok(Args {
        state,
        socket,
        hsm,
        policy,
    })
}

fn main() -> ExitCode {
    // A level, not a filter expression: no regular-expression engine in
    // the key daemon.
    let level = std::env::var("EDGEWARD_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("edgeward-keyd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // No core file with keys in it; no ptrace by another process of this
    // uid; nothing it runs gains privileges.
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    let _ = rustix::thread::set_no_new_privs(true);
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if let Err(e) = std::fs::create_dir_all(&args.state) {
        eprintln!("edgeward-keyd: {}: {e}", args.state.display());
        return ExitCode::from(1);
    }
    let hsm = match edgeward_hsm::open(&args.hsm, &args.state) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("edgeward-keyd: cannot open the HSM: {e}");
            return ExitCode::from(1);
        }
    };
    // The register it measures into, and this boot's log.
    let pcr = match &args.hsm {
        HsmConfig::Soft => Some(0),
        #[cfg(feature = "tpm")]
        HsmConfig::Tpm(c) => Some(u32::from(c.pcr)),
        #[cfg(feature = "pkcs11")]
        HsmConfig::Pkcs11(_) => None,
    };
    let measurements = match (pcr, edgeward_hsm::boot_id()) {
        (None, _) => None,
        (Some(pcr), Ok(boot_id)) => {
            let log = edgeward_trust::attest::eventlog::EventLog::new(&args.state, &boot_id, pcr);
            let pruned = log.prune_other_boots(1);
            if pruned > 0 {
                tracing::info!(pruned, "measurement logs of older boots deleted");
            }
            Some(edgeward_keyd::server::Measurements { log, boot_id })
        }
        (Some(_), Err(e)) => {
            eprintln!("edgeward-keyd: no boot id: {e}");
            return ExitCode::from(1);
        }
    };
    let socket = &args.socket;
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            eprintln!(
                "edgeward-keyd: {}: another key daemon answers there",
                socket.display()
            );
            return ExitCode::from(1);
        }
        let _ = std::fs::remove_file(socket);
    }
    let listener = match std::os::unix::net::UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("edgeward-keyd: cannot bind {}: {e}", socket.display());
            return ExitCode::from(1);
        }
    };
    // Anyone may connect; the principal table decides, by SO_PEERCRED,
    // what each caller may do (a stranger: nothing).
    if let Err(e) = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)) {
        eprintln!("edgeward-keyd: {}: {e}", socket.display());
        return ExitCode::from(1);
    }
    tracing::info!(
        socket = %socket.display(),
        backend = hsm.backend(),
        runtime_uids = ?args.policy.runtime_uids,
        "key daemon ready"
    );
    Server::new(hsm, measurements, args.policy).serve(&listener);
    ExitCode::from(1)
}
