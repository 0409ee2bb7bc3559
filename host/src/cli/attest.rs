//! `edgeward attest`: evidence for a remote verifier, and the verifier's
//! side (`attest challenge`, `attest verify`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::fail;
use crate::attest::evidence::{self, CredentialFile};
use crate::attest::verify;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct AttestArgs {
    #[command(subcommand)]
    command: Option<AttestCommand>,
    #[command(flatten)]
    gather: GatherArgs,
}

/// Write evidence: a quote of the measurement register over the
/// verifier's nonce, the measurement log, the attestation key and (on a
/// TPM that has one) the endorsement key's certificate. Through the
/// daemon when it runs (it owns the TPM connection), else directly.
#[derive(Debug, clap::Args)]
struct GatherArgs {
    /// The verifier's nonce, hex (1-64 bytes).
    #[arg(long, value_name = "HEX", conflicts_with = "credential")]
    nonce: Option<String>,
    /// A credential from `edgeward attest challenge`: its secret, which
    /// only this TPM's EK and AK together recover, becomes the nonce.
    #[arg(long, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// Where to write the evidence files.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Incremental evidence: the log from record N on (a verifier that
    /// checked records 0..N has them: `attest verify --previous`); the
    /// quote covers the whole log.
    #[arg(long, value_name = "N", default_value_t = 0)]
    from: u64,
    /// Config file (its [hsm], [identity], [api] tables and state_dir).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The management socket (see `edgeward module --help`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AttestCommand {
    /// Check evidence: signature, attestation structure, nonce, PCR
    /// digest, log replay, baseline, policy, and with --ek-ca and
    /// --challenge the EK certificate and the AK's binding to it. Prints
    /// each check; exits 1 on any failure.
    Verify {
        /// The evidence directory.
        dir: PathBuf,
        /// The device the evidence must be from (its device id).
        #[arg(long, value_name = "ID")]
        device: String,
        /// The nonce sent to the device, hex.
        #[arg(long, value_name = "HEX")]
        nonce: Option<String>,
        /// The policy (TOML: backends, pcr, enrolled aks, baselines,
        /// configs, executables, modules, publishers, allow_incidents);
        /// without one, the strictest: a TPM, a certified EK, no module.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Trusted EK CA certificates (PEM).
        #[arg(long, value_name = "FILE")]
        ek_ca: Option<PathBuf>,
        /// The verifier's record of the challenge the evidence answers
        /// (challenge.json): checks the AK is bound to the EK.
        #[arg(long, value_name = "FILE")]
        challenge: Option<PathBuf>,
        /// Evidence of the same boot verified before (its directory): the
        /// records it holds are not asked for again (`attest --from`).
        /// Once this evidence verifies, the whole log checked so far is
        /// kept beside it as event.full.log, for the next --previous.
        #[arg(long, value_name = "DIR")]
        previous: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make a credential challenge for a device's evidence: checks its EK
    /// certificate against --ek-ca, then encrypts a fresh secret to that
    /// EK for that AK (TPM2_MakeCredential). Writes OUT/credential.bin (for
    /// the device: `edgeward attest --credential`) and OUT/challenge.json
    /// (kept by the verifier: `attest verify --challenge`).
    Challenge {
        /// The device's evidence directory (its ek.pem and ak.pub).
        dir: PathBuf,
        /// Trusted EK CA certificates (PEM).
        #[arg(long, value_name = "FILE")]
        ek_ca: PathBuf,
        /// Where to write credential.bin and challenge.json.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub(super) fn command(args: AttestArgs, state_flag: Option<&Path>) -> ExitCode {
    match args.command {
        Some(AttestCommand::Verify {
            dir,
            device,
            nonce,
            policy,
            ek_ca,
            challenge,
            previous,
            json,
        }) => verify_command(
            &dir, device, nonce, policy, ek_ca, challenge, previous, json,
        ),
        Some(AttestCommand::Challenge { dir, ek_ca, out }) => challenge_command(&dir, &ek_ca, &out),
        None => gather_command(args.gather, state_flag),
    }
}

fn gather_command(args: GatherArgs, state_flag: Option<&Path>) -> ExitCode {
    let Some(out) = args.out else {
        return fail("--out DIR: where to write the evidence", 2);
    };
    let (nonce, credential) = match (&args.nonce, &args.credential) {
        (Some(n), None) => match crate::api::parse_nonce(n) {
            Ok(n) => (n, None),
            Err(e) => return fail(format!("--{e}"), 2),
        },
        (None, Some(path)) => {
            let c = std::fs::read(path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|b| {
                    CredentialFile::parse(&b).map_err(|e| format!("{}: {e}", path.display()))
                });
            match c {
                Ok(c) => (Vec::new(), Some(c)),
                Err(e) => return fail(e, 2),
            }
        }
        _ => return fail("give --nonce HEX or --credential FILE", 2),
    };
    let cfg = match super::optional_config(args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let configured = cfg.as_ref().and_then(|c| c.api.socket.clone());
    let socket = match crate::api::socket_path(args.socket.as_deref(), configured.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(e, 2),
    };
    let files = if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        through_daemon(&socket, &nonce, credential.as_ref(), args.from)
    } else {
        directly(cfg, state_flag, &nonce, credential.as_ref(), args.from)
    };
    let files = match files {
        Ok(f) => f,
        Err(e) => return fail(e, 1),
    };
    if let Err(e) = evidence::write_dir(&out, &files) {
        return fail(e, 1);
    }
    let summary = files
        .iter()
        .find(|(n, _)| *n == "evidence.json")
        .and_then(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).ok())
        .unwrap_or_default();
    println!(
        "evidence for device {} ({} backend, PCR {}, {} events{}) written to {}",
        summary["device"].as_str().unwrap_or("?"),
        summary["backend"].as_str().unwrap_or("?"),
        summary["pcr"],
        summary["events"],
        if summary["endorsement_certificate"] == true {
            ", with the EK certificate"
        } else {
            ""
        },
        out.display()
    );
    ExitCode::SUCCESS
}

fn through_daemon(
    socket: &Path,
    nonce: &[u8],
    credential: Option<&CredentialFile>,
    from: u64,
) -> Result<evidence::Files, String> {
    use base64ct::Encoding as _;
    let mut query = match credential {
        Some(c) => format!(
            "credential={}",
            base64ct::Base64UrlUnpadded::encode_string(&c.to_bytes())
        ),
        None => format!("nonce={}", crate::measure::hex(nonce)),
    };
    // Only when asked: a daemon from before incremental evidence refuses
    // the unknown parameter.
    if from > 0 {
        query.push_str(&format!("&from={from}"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let answer = rt
        .block_on(crate::api::client::request(
            socket,
            "GET",
            &format!("/v1/attest?{query}"),
            None,
        ))
        .map_err(|e| format!("{e:#}"))?;
    if answer.status != 200 {
        return Err(format!("the daemon refused: {}", answer.error()));
    }
    let view: crate::api::EvidenceView = serde_json::from_value(answer.json())
        .map_err(|e| format!("the daemon's evidence is malformed: {e}"))?;
    let mut files = Vec::new();
    for (name, b64) in view.files {
        let Some(known) = evidence::FILES.iter().find(|f| **f == name) else {
            return Err(format!("the daemon sent an unknown evidence file {name:?}"));
        };
        let bytes = base64ct::Base64::decode_vec(&b64)
            .map_err(|_| format!("the daemon's {name} is not base64"))?;
        files.push((*known, bytes));
    }
    Ok(files)
}

fn directly(
    cfg: Option<crate::config::Config>,
    state_flag: Option<&Path>,
    nonce: &[u8],
    credential: Option<&CredentialFile>,
    from: u64,
) -> Result<evidence::Files, String> {
    let cfg = cfg.unwrap_or_else(crate::config::Config::empty);
    let state_dir =
        crate::state::resolve(state_flag, cfg.state_dir.as_deref()).map_err(|e| e.to_string())?;
    let pcr = crate::attest::register_of(&cfg.hsm).ok_or(
        "attestation is not supported on the pkcs11 backend: a PKCS#11 token has no \
         measurement register to quote",
    )?;
    let hsm = crate::keyd::open(&cfg.hsm, &state_dir, &cfg.identity).map_err(|e| e.to_string())?;
    let m = crate::attest::Measurer::new(hsm, &state_dir, pcr)?;
    m.attest(&cfg.identity.device_id, nonce, credential, from)
}

#[allow(clippy::too_many_arguments)]
fn verify_command(
    dir: &Path,
    device: String,
    nonce: Option<String>,
    policy: Option<PathBuf>,
    ek_ca: Option<PathBuf>,
    challenge: Option<PathBuf>,
    previous: Option<PathBuf>,
    json: bool,
) -> ExitCode {
    let mut expect = verify::Expect {
        device: Some(device),
        previous,
        ..verify::Expect::default()
    };
    if let Some(n) = nonce {
        match crate::api::parse_nonce(&n) {
            Ok(n) => expect.nonce = Some(n),
            Err(e) => return fail(format!("--{e}"), 2),
        }
    }
    if let Some(p) = policy {
        match verify::Policy::load(&p) {
            Ok(p) => expect.policy = Some(p),
            Err(e) => return fail(e, 2),
        }
    }
    if let Some(ca) = ek_ca {
        match read_cas(&ca) {
            Ok(c) => expect.ek_ca = Some(c),
            Err(e) => return fail(e, 2),
        }
    }
    if let Some(c) = challenge {
        let read = std::fs::read(&c).map_err(|e| e.to_string()).and_then(|b| {
            serde_json::from_slice::<verify::Challenge>(&b).map_err(|e| e.to_string())
        });
        match read {
            Ok(ch) => expect.challenge = Some(ch),
            Err(e) => return fail(format!("{}: {e}", c.display()), 2),
        }
    }
    if expect.nonce.is_none() && expect.challenge.is_none() {
        return fail(
            "give --nonce HEX (or --challenge FILE): a quote is fresh only against the verifier's nonce",
            2,
        );
    }
    print_verdict(&verify::verify(dir, &expect), json, None)
}

/// Prints each check (or one JSON object) and the verdict; exits 0 when
/// every check passed, 1 otherwise.
pub(super) fn print_verdict(
    checks: &[verify::Check],
    json: bool,
    device: Option<&str>,
) -> ExitCode {
    let ok = checks.iter().all(|c| c.ok);
    let proven = !checks.iter().any(|c| c.detail == verify::UNPROVEN);
    if json {
        let mut v = serde_json::json!({"ok": ok, "proven": ok && proven, "checks": checks});
        if let Some(d) = device {
            v["device"] = d.into();
        }
        println!("{v}");
    } else {
        for c in checks {
            println!(
                "{} {:<15} {}",
                if c.ok { "pass" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        let verdict = if ok && !proven {
            "evidence verified, UNPROVEN (a software device: no hardware root)"
        } else if ok {
            "evidence verified"
        } else {
            "evidence REFUSED"
        };
        match device {
            Some(d) => println!("{d}: {verdict}"),
            None => println!("{verdict}"),
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn read_cas(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    verify::pem_certificates(&bytes, &path.display().to_string())
}

fn challenge_command(dir: &Path, ek_ca: &Path, out: &Path) -> ExitCode {
    let run = || -> Result<(), String> {
        let cas = read_cas(ek_ca)?;
        let (credential, record) = verify::challenge(dir, &cas)?;
        crate::state::ensure_private_dir(out).map_err(|e| e.to_string())?;
        let cred = out.join("credential.bin");
        std::fs::write(&cred, credential.to_bytes())
            .map_err(|e| format!("{}: {e}", cred.display()))?;
        let rec = out.join("challenge.json");
        let mut text = serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?;
        text.push('\n');
        crate::state::write_atomic(&rec, text.as_bytes())
            .map_err(|e| format!("{}: {e}", rec.display()))?;
        println!(
            "{} (for the device: edgeward attest --credential)\n{} (keep: edgeward attest verify --challenge)",
            cred.display(),
            rec.display()
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}
