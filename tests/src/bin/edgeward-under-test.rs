//! The `edgeward` binary, built inside the test package so integration
//! tests can run it through `CARGO_BIN_EXE_edgeward-under-test`. It is the
//! same one-line `main` as `host/src/main.rs`, plus one test seam the
//! shipped binary does not have: `EDGEWARD_TEST_RESOLVER` scripts name
//! resolution (`NAME=FIRST|THEN;…`: the first lookup of NAME answers FIRST,
//! every later one THEN), so a test can rebind a name between two lookups
//! without a DNS server. And a simulated escape: with
//! `EDGEWARD_TEST_ESCAPE=FILE`, native code in the confined process (as if
//! it had escaped a module's sandbox) tries what an attacker would and
//! writes what happened to FILE ([`escape`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;

#[derive(Debug)]
struct Scripted {
    answers: HashMap<String, (IpAddr, IpAddr)>,
    asked: Mutex<HashMap<String, usize>>,
}

impl edgeward::runtime::network::Resolver for Scripted {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + Sync + 'a>> {
        let n = self
            .asked
            .lock()
            .map(|mut a| {
                let c = a.entry(name.to_owned()).or_default();
                *c += 1;
                *c
            })
            .unwrap_or(1);
        let answer = self
            .answers
            .get(name)
            .map(|(first, then)| vec![if n == 1 { *first } else { *then }])
            .ok_or_else(|| std::io::Error::other(format!("{name}: not scripted")));
        Box::pin(async move { answer })
    }
}

fn scripted(spec: &str) -> Option<Scripted> {
    let mut answers = HashMap::new();
    for entry in spec.split(';').filter(|e| !e.is_empty()) {
        let (name, ips) = entry.split_once('=')?;
        let (first, then) = ips.split_once('|')?;
        answers.insert(name.to_owned(), (first.parse().ok()?, then.parse().ok()?));
    }
    Some(Scripted {
        answers,
        asked: Mutex::default(),
    })
}

/// The system call arguments for each attempt: chosen so that without
/// the filter the call fails with another error or succeeds harmlessly
/// (as root), so `EPERM` means the filter refused it.
fn args_for(name: &str) -> [libc::c_long; 6] {
    match name {
        // PTRACE_PEEKDATA on init: ESRCH unless attached.
        "ptrace" => [2, 1, 0, 0, 0, 0],
        // Reads nothing from init: succeeds as root.
        "process_vm_readv" | "process_vm_writev" => [1, 0, 0, 0, 0, 0],
        // A query: succeeds.
        "personality" => [0xffff_ffff, 0, 0, 0, 0, 0],
        // SYSLOG_ACTION_SIZE_BUFFER: succeeds as root.
        "syslog" => [10, 0, 0, 0, 0, 0],
        // A bad magic number: EINVAL.
        "reboot" => [0, 0, 0, 0, 0, 0],
        _ => [0; 6],
    }
}

/// One attempt: `NAME ERRNO` (0: the call succeeded).
#[allow(unsafe_code)]
fn attempt(nr: libc::c_long, a: [libc::c_long; 6]) -> i32 {
    // SAFETY: every call gets null pointers, zero lengths or numbers; none
    // of them writes to this process's memory.
    let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if r == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

/// The simulated escape (see the file's header): one line per attempt.
fn escape() {
    if let Some(out) = std::env::var_os("EDGEWARD_TEST_ESCAPE") {
        attempts(std::path::Path::new(&out));
    }
}

/// The errno of a failed `r` (0: it worked).
fn errno(r: std::io::Result<()>) -> i32 {
    r.map_or_else(|e| e.raw_os_error().unwrap_or(-1), |()| 0)
}

/// Tries each attempt and writes what happened to `out`.
fn attempts(out: &std::path::Path) {
    let mut lines = String::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in ["NoNewPrivs", "Seccomp", "CapEff", "Uid"] {
        if let Some(l) = status.lines().find(|l| l.starts_with(&format!("{key}:"))) {
            lines.push_str(&format!(
                "status {}\n",
                l.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
    }
    for d in edgeward::confine::DENIED {
        lines.push_str(&format!("{} {}\n", d.name, attempt(d.nr, args_for(d.name))));
    }
    // A new user namespace through clone, with CLONE_FS (EINVAL without
    // the filter, so no child is ever made).
    let flags = (libc::CLONE_NEWUSER | libc::CLONE_FS) as libc::c_long;
    lines.push_str(&format!(
        "clone-newuser {}\n",
        attempt(libc::SYS_clone, [flags, 0, 0, 0, 0, 0])
    ));
    // clone3 with no arguments: EINVAL without the filter, ENOSYS with it.
    lines.push_str(&format!("clone3 {}\n", attempt(libc::SYS_clone3, [0; 6])));
    // A thread still starts (glibc falls back from clone3 to clone).
    let thread = std::thread::spawn(|| 7).join().map_or(-1, |v| v);
    lines.push_str(&format!("thread {thread}\n"));
    // What the compile worker may not do either (the daemon may).
    let open = errno(std::fs::File::open("/etc/hostname").map(drop));
    let outside = std::env::temp_dir().join(format!("edgeward-escape-{}", std::process::id()));
    let create = errno(std::fs::File::create(&outside).map(drop));
    let _ = std::fs::remove_file(&outside);
    let socket = errno(std::net::UdpSocket::bind("127.0.0.1:0").map(drop));
    let exec = errno(std::process::Command::new("/bin/true").status().map(drop));
    let parent = libc::c_long::from(std::os::unix::process::parent_id());
    let kill = attempt(libc::SYS_kill, [parent, 0, 0, 0, 0, 0]);
    lines.push_str(&format!(
        "open {open}\ncreate {create}\nsocket {socket}\nexec {exec}\nkill {kill}\n"
    ));
    // A fork: clone without CLONE_THREAD (CLONE_SIGHAND without CLONE_VM
    // is EINVAL without a filter, so no process is ever made).
    let fork = attempt(
        libc::SYS_clone,
        [libc::c_long::from(libc::CLONE_SIGHAND), 0, 0, 0, 0, 0],
    );
    // Its own core limit, read only (both pointers null): succeeds.
    let prlimit = attempt(
        libc::SYS_prlimit64,
        [0, libc::c_long::from(libc::RLIMIT_CORE), 0, 0, 0, 0],
    );
    // A queued signal 0 to the parent with no info: EFAULT unfiltered.
    let sigqueue = attempt(libc::SYS_rt_sigqueueinfo, [parent, 0, 0, 0, 0, 0]);
    // getpid through the x32 ABI: ENOSYS on a kernel without x32.
    let x32 = attempt(0x4000_0000 | libc::SYS_getpid, [0; 6]);
    // SAFETY: PR_GET_DUMPABLE reads a flag.
    #[allow(unsafe_code)]
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
    lines.push_str(&format!(
        "fork {fork}\nprlimit {prlimit}\nsigqueue {sigqueue}\nx32 {x32}\ndumpable {dumpable}\n"
    ));
    lines.push_str(&keyd_attempts());
    // "-": stderr (the compile worker opens no file).
    let written = if out == std::path::Path::new("-") {
        use std::io::Write as _;
        std::io::stderr().write_all(lines.as_bytes())
    } else {
        std::fs::write(out, lines)
    };
    if let Err(e) = written {
        eprintln!("EDGEWARD_TEST_ESCAPE: {e}");
    }
}

/// What code that escaped into a runtime started with `EDGEWARD_KEYD`
/// tries against the key daemon and its files: each line `keyd-NAME
/// OUTCOME` (`refused`, `ok`, another error, or an errno).
fn keyd_attempts() -> String {
    use edgeward::hsm::Hsm as _;
    let Some(sock) = edgeward::keyd::socket() else {
        return String::new();
    };
    let outcome = |r: Result<(), edgeward::hsm::HsmError>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) if e.to_string().contains("refused by the key daemon") => "refused".to_owned(),
        Err(e) => format!("error:{}", e.to_string().replace(['\n', ' '], "_")),
    };
    let mut lines = String::new();
    match edgeward::keyd::RemoteHsm::connect(&sock) {
        Err(e) => lines.push_str(&format!("keyd-connect {}\n", outcome(Err(e)))),
        Ok(h) => {
            for (name, r) in [
                ("ca-digest", h.sign_digest("device-ca", &[7; 32]).map(drop)),
                (
                    "jwt-digest",
                    h.sign_digest("jwt-authority", &[7; 32]).map(drop),
                ),
                ("extend", h.extend(&[7; 32])),
                ("quote", h.quote("attestation", b"nonce").map(drop)),
                ("destroy-ca", h.destroy_key("device-ca").map(drop)),
                ("other-key", h.signing_key("stolen").map(drop)),
                (
                    "ca-csr",
                    h.sign_certificate("device-ca", b"\x30\x00").map(drop),
                ),
                // What it may do, the positive control.
                ("public", h.signing_key("device-ca").map(drop)),
            ] {
                lines.push_str(&format!("keyd-{name} {}\n", outcome(r)));
            }
            // Whole certificates for the device CA to sign, made as the
            // runtime makes a module's (the tests' device is dev-1).
            let module = "spiffe://edgeward.local/device/dev-1/module/";
            for (name, uri, ca, ttl) in [
                ("cert-ca", format!("{module}escape"), true, 3600),
                (
                    "cert-other-device",
                    "spiffe://edgeward.local/device/other/module/m".to_owned(),
                    false,
                    3600,
                ),
                (
                    "cert-other-domain",
                    "spiffe://evil.example/device/dev-1/module/m".to_owned(),
                    false,
                    3600,
                ),
                (
                    "cert-too-long",
                    format!("{module}escape"),
                    false,
                    400 * 24 * 3600,
                ),
                // A module leaf is the runtime's to ask for: the control.
                ("cert-module-leaf", format!("{module}escape"), false, 3600),
            ] {
                let r = certificate(&h, &uri, ca, ttl);
                lines.push_str(&format!("keyd-{name} {}\n", outcome(r)));
            }
        }
    }
    // Its files and its memory.
    if let Some(state) = std::env::var_os("EDGEWARD_TEST_KEYD_STATE") {
        let state = std::path::Path::new(&state);
        let list = errno(std::fs::read_dir(state.join("hsm")).map(drop));
        lines.push_str(&format!("keyd-files {list}\n"));
    }
    if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock)
        && let Ok(cred) = rustix::net::sockopt::socket_peercred(&s)
    {
        let pid = cred.pid;
        let mem =
            errno(std::fs::File::open(format!("/proc/{}/mem", pid.as_raw_nonzero())).map(drop));
        let environ =
            errno(std::fs::read(format!("/proc/{}/environ", pid.as_raw_nonzero())).map(drop));
        lines.push_str(&format!("keyd-mem {mem}\nkeyd-environ {environ}\n"));
    }
    lines
}

/// The device CA as rcgen's issuer, through the key daemon; the key
/// daemon's error kept for the report.
struct DeviceCa<'a> {
    hsm: &'a edgeward::keyd::RemoteHsm,
    point: Vec<u8>,
    error: Mutex<Option<edgeward::hsm::HsmError>>,
}

impl rcgen::PublicKeyData for DeviceCa<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for DeviceCa<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use edgeward::hsm::Hsm as _;
        self.hsm.sign_certificate("device-ca", msg).map_err(|e| {
            *self
                .error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Asks the device CA (through the key daemon) to sign a certificate for
/// `uri`, a CA if `ca`, valid from now for `ttl` seconds.
fn certificate(
    hsm: &edgeward::keyd::RemoteHsm,
    uri: &str,
    ca: bool,
    ttl: i64,
) -> Result<(), edgeward::hsm::HsmError> {
    use edgeward::hsm::Hsm as _;
    let point = hsm.signing_key("device-ca")?;
    let key = DeviceCa {
        hsm,
        point: point.clone(),
        error: Mutex::new(None),
    };
    let mut p = rcgen::CertificateParams::default();
    p.serial_number = Some(rcgen::SerialNumber::from(vec![0x11, 0x22, 0x33]));
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::seconds(30);
    p.not_after = now + time::Duration::seconds(ttl);
    p.is_ca = if ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0))
    } else {
        rcgen::IsCa::ExplicitNoCa
    };
    p.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(uri).map_err(|e| {
            edgeward::hsm::HsmError::new(
                "escape",
                edgeward::hsm::Op::Sign,
                None,
                edgeward::hsm::ErrorKind::InvalidArgument(e.to_string()),
            )
        })?,
    )];
    let issuer_params = rcgen::CertificateParams::default();
    let issuer = rcgen::Issuer::from_params(&issuer_params, &key);
    let subject = edgeward::identity::authority::PublicP256(point);
    let signed = p.signed_by(&subject, &issuer);
    drop(issuer);
    match signed {
        Ok(_) => Ok(()),
        Err(e) => Err(key.error.into_inner().ok().flatten().unwrap_or_else(|| {
            edgeward::hsm::HsmError::new(
                "escape",
                edgeward::hsm::Op::Sign,
                None,
                edgeward::hsm::ErrorKind::Backend(e.to_string()),
            )
        })),
    }
}

/// The supervisor's loop at a watchdog tick: with
/// `EDGEWARD_TEST_STALL_AFTER=N`, the Nth tick wedges it for good (as a
/// deadlock would), so it feeds the watchdog no more.
fn stall() {
    static TICKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Some(after) = std::env::var("EDGEWARD_TEST_STALL_AFTER")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return;
    };
    if TICKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= after {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

fn main() -> std::process::ExitCode {
    // The same attempts unconfined, before anything else: the test checks
    // that none of them fails with EPERM there, so EPERM under the filter
    // is the filter's doing.
    if let Some(out) = std::env::var_os("EDGEWARD_TEST_ESCAPE_UNCONFINED") {
        attempts(std::path::Path::new(&out));
        return std::process::ExitCode::SUCCESS;
    }
    edgeward::confine::set_probe(escape);
    edgeward::daemon::set_stall_for_tests(stall);
    if let Ok(spec) = std::env::var("EDGEWARD_TEST_RESOLVER") {
        let Some(r) = scripted(&spec) else {
            eprintln!("EDGEWARD_TEST_RESOLVER: expected NAME=IP|IP;...");
            return std::process::ExitCode::from(2);
        };
        edgeward::runtime::network::set_default_resolver(std::sync::Arc::new(r));
    }
    edgeward::cli::main()
}
