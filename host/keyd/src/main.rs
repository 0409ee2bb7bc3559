//! `edgeward-keyd`: see the crate's documentation.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use edgeward_hsm::HsmConfig;
use edgeward_keyd::launch::{self, Launch, Supervisor};
use edgeward_keyd::policy::Policy;
use edgeward_keyd::server::Server;

const USAGE: &str = "usage: edgeward-keyd --state DIR --socket PATH [--device-id ID] [--runtime-uid UID | --runtime-user NAME]...
       [--trust-domain NAME] [--max-leaf-ttl SECS] [--max-jwt-key-ttl SECS]
       [--hsm soft | --hsm tpm [--tcti TCTI] [--pcr N] [--boot-pcrs N,N...] | --hsm pkcs11 --module PATH --token LABEL --pin-file PATH]
       [--launch EXE [--runtime-gid GID] -- ARGS... | --private | --private-runtime] [--no-measure]";

#[derive(Debug)]
struct Args {
    state: PathBuf,
    socket: PathBuf,
    hsm: HsmConfig,
    policy: Policy,
    launch: Option<Launch>,
    /// The helper of the process that started it (`--private`,
    /// `--private-runtime`): serves only that process, does not measure
    /// itself, and stops when it is gone.
    private: bool,
    /// `--no-measure`: no measurement log (a device that is not attested;
    /// the runtime's `[runtime] measure = false`), as on a PKCS#11 token,
    /// which has no register.
    measure: bool,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut state = None;
    let mut socket = None;
    let mut backend = "soft".to_owned();
    let (mut tcti, mut pcr, mut module, mut token, mut pin_file) = (None, None, None, None, None);
    let (mut boot_pcrs, mut private, mut measure) = (None, false, true);
    let (mut launch_exe, mut runtime_gid, mut launch_args) = (None, None, None);
    let owner = rustix::process::geteuid().as_raw();
    // Its own user may do everything: not one that stands for many.
    if is_overflow(owner) {
        return Err(format!(
            "running as uid {owner}: the overflow (nobody) ids stand for many services; give the key daemon a user of its own"
        ));
    }
    let mut policy = Policy {
        owner,
        owner_is_runtime: false,
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
            "--runtime-uid" | "--runtime-user" => {
                let v = value()?;
                let uid = if flag == "--runtime-user" {
                    passwd_uid(&v)?
                } else {
                    v.parse::<u32>()
                        .map_err(|_| format!("--runtime-uid {v:?}: a uid"))?
                };
                if uid == 0 {
                    return Err("--runtime-uid 0: root is a principal of its own".into());
                }
                if uid == owner {
                    return Err(format!(
                        "--runtime-uid {uid}: the key daemon's own user is a principal of its own (it may do everything)"
                    ));
                }
                // nobody and the overflow ids stand for many services.
                if is_overflow(uid) {
                    return Err(format!(
                        "--runtime-uid {uid}: the overflow (nobody) ids stand for many services; give the runtime a user of its own"
                    ));
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
            "--boot-pcrs" => {
                let v = value()?;
                let list = v
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse::<u8>().ok().filter(|p| *p <= 23))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| {
                        format!("--boot-pcrs {v:?}: PCR numbers 0..=23, comma-separated")
                    })?;
                boot_pcrs = Some(list);
            }
            "--private" => private = true,
            "--no-measure" => measure = false,
            // A runtime's: its process gets the runtime's operations only.
            "--private-runtime" => {
                private = true;
                policy.owner_is_runtime = true;
            }
            "--module" => module = Some(PathBuf::from(value()?)),
            "--token" => token = Some(value()?),
            "--pin-file" => pin_file = Some(PathBuf::from(value()?)),
            "--launch" => launch_exe = Some(PathBuf::from(value()?)),
            "--runtime-gid" => {
                let v = value()?;
                let gid = v
                    .parse::<u32>()
                    .map_err(|_| format!("--runtime-gid {v:?}: a gid"))?;
                if gid == 0 {
                    return Err("--runtime-gid 0: the runtime gets no root group".into());
                }
                runtime_gid = Some(gid);
            }
            "--" => {
                launch_args = Some(it.by_ref().collect::<Vec<_>>());
                break;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let check_segment = |v: &str, f: &str| {
        if edgeward_trust::identity::valid_path_segment(v) {
            Ok(())
        } else {
            Err(format!(
                "{f} {v:?}: 1-128 of letters, digits, - _ . (not . or ..)"
            ))
        }
    };
    let state = state.ok_or("--state is required")?;
    let socket = socket.ok_or("--socket is required")?;
    // Absent or empty: the hostname, as the runtime's own default
    // ([identity] device_id) takes it, read now rather than at install.
    if policy.device_id.is_empty() {
        policy.device_id = edgeward_trust::identity::default_device_id();
    }
    if !edgeward_trust::identity::valid_trust_domain(&policy.trust_domain) {
        return Err(format!(
            "--trust-domain {:?}: not a SPIFFE trust domain (lowercase letters, digits, - _ .)",
            policy.trust_domain
        ));
    }
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
            boot_pcrs,
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
    let _ = (tcti, pcr, boot_pcrs);
    #[cfg(not(feature = "pkcs11"))]
    let _ = (module, token, pin_file);
    if private && (launch_exe.is_some() || launch_args.is_some() || !policy.runtime_uids.is_empty())
    {
        return Err(
            "--private serves only the process that started it: it takes no --launch or --runtime-uid".into(),
        );
    }
    let launch = match (launch_exe, launch_args) {
        (Some(exe), args) => {
            let uid = policy.runtime_uids.first().copied();
            if uid.is_none() && owner == 0 {
                return Err(
                    "--launch as root needs --runtime-uid: the runtime never runs as root".into(),
                );
            }
            let gid = match (uid, runtime_gid) {
                (Some(_), Some(g)) => Some(g),
                (Some(u), None) => Some(primary_gid(u)?),
                (None, _) => None,
            };
            // vars_os: a variable that is not UTF-8 is not passed (and
            // does not panic the key daemon).
            let mut env: Vec<(String, String)> = std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| launch::env_passed(k))
                .collect();
            env.sort();
            Some(Launch {
                exe,
                args: args.unwrap_or_default(),
                uid,
                gid,
                env,
            })
        }
        (None, Some(_)) => return Err("arguments after -- are for --launch".into()),
        (None, None) => None,
    };
    if runtime_gid.is_some() && launch.as_ref().is_none_or(|l| l.uid.is_none()) {
        return Err(
            "--runtime-gid is the launched runtime's: it needs --launch and --runtime-uid".into(),
        );
    }
    Ok(Args {
        state,
        socket,
        hsm,
        policy,
        launch,
        private,
        measure,
    })
}

/// A pidfd of this process's parent, checked to be the parent still
/// (a pid read with getppid may be reused once the parent is gone; the
/// pidfd opened afterwards is the parent's only if getppid still says so).
/// A kernel without pidfds (before 5.3), or a seccomp profile that denies
/// them, leaves standard input as the only lifeline: said, not fatal.
fn parent_pidfd() -> Result<(Option<std::os::fd::OwnedFd>, i32), String> {
    let ppid = rustix::process::getppid().ok_or("its parent is already gone")?;
    let fd = match rustix::process::pidfd_open(ppid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no pidfd for its parent: it stops when its standard input closes, which a process its parent forked could hold open"
            );
            None
        }
    };
    if rustix::process::getppid() != Some(ppid) {
        return Err("its parent is already gone".into());
    }
    Ok((fd, ppid.as_raw_nonzero().get()))
}

/// Returns when the parent is gone: its pidfd becomes readable when it
/// exits, and its end of standard input closes with it. Either ends the
/// wait: a process the parent forked keeps the pipe open, not the parent
/// alive, and a parent that closed the pipe is done with its key daemon.
fn watch_parent(parent: Option<std::os::fd::OwnedFd>) {
    use rustix::event::{PollFd, PollFlags, poll};
    let stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        let (stdin_ready, parent_ready) = {
            let mut fds = vec![PollFd::new(&stdin, PollFlags::IN)];
            if let Some(p) = &parent {
                fds.push(PollFd::new(p, PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return,
            }
            let ready = |f: &PollFd<'_>| !f.revents().is_empty();
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if parent_ready {
            return;
        }
        if stdin_ready
            && !matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0)
        {
            return;
        }
    }
}

/// What the key daemon may reach once it serves: its state dir (keys,
/// the measurement log) read-write but not to execute or make a device
/// node in, its socket's directory when that holds nothing but the socket
/// (to remove it at stop: never a shared `/run` or `/tmp`), the boot id to
/// read, and the TPM device it opened. Nothing to execute:
/// a key daemon that launches the runtime is not held by Landlock at all
/// (the runtime would inherit the ruleset, and it reads and writes what
/// its configuration names), nor is one on a PKCS#11 token (the module
/// reads and writes where its vendor put it: SoftHSM2's token directory,
/// pcscd's socket).
fn fs_policy(args: &Args) -> Result<edgeward_confine::FsPolicy, &'static str> {
    if args.launch.is_some() {
        return Err("it launches the runtime, which would inherit the ruleset");
    }
    // The soft backend reads the boot id at every extend.
    let boot_id = std::env::var_os(edgeward_hsm::BOOT_ID_ENV)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(edgeward_hsm::BOOT_ID_FILE), PathBuf::from);
    let mut p = edgeward_confine::FsPolicy {
        read_write: vec![args.state.clone()],
        read_only: vec![boot_id],
        ..Default::default()
    };
    if let Some(dir) = args.socket.parent()
        && holds_only(dir, &args.socket)
    {
        p.sockets.push(dir.to_path_buf());
    }
    match &args.hsm {
        HsmConfig::Soft => {}
        HsmConfig::Tpm(t) => {
            if let Some(dev) = t.tcti.strip_prefix("device:") {
                p.devices.push(dev.into());
            }
        }
        HsmConfig::Pkcs11(_) => {
            return Err("a PKCS#11 module reads and writes where its vendor put it");
        }
    }
    Ok(p)
}

/// Whether `dir` holds `socket` and nothing else.
fn holds_only(dir: &std::path::Path, socket: &std::path::Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.len() == 1 && names[0] == socket
}

/// Every capability dropped (a launcher keeps what starting the runtime
/// as its user and stopping it take: `CAP_SETUID`, `CAP_SETGID`,
/// `CAP_KILL`), `no_new_privs`, non-dumpable, the seccomp denylist the
/// runtime has too, and [`fs_policy`] through Landlock; what it could not
/// apply, it says, naming what is missing.
fn confine(args: &Args) {
    use rustix::thread::CapabilitySet;
    let keep = if args.launch.is_some() {
        CapabilitySet::SETUID | CapabilitySet::SETGID | CapabilitySet::KILL
    } else {
        CapabilitySet::empty()
    };
    if let Err(e) = edgeward_confine::drop_capabilities(keep) {
        tracing::warn!(
            error = %e,
            "running WITH its capabilities: code that subverts the key daemon could use them"
        );
    }
    match edgeward_confine::apply() {
        Ok(()) => tracing::debug!("confined: no_new_privs, seccomp filter"),
        Err(e) => tracing::warn!(
            error = %e,
            "running WITHOUT the seccomp filter: code that subverts the key daemon could make the system calls it denies"
        ),
    }
    let landlock = match fs_policy(args) {
        Err(why) => {
            tracing::info!(reason = why, "not landlocked");
            "not applied"
        }
        Ok(policy) => match edgeward_confine::landlock(&policy) {
            Ok(edgeward_confine::Landlocked::Fully) => "fully",
            Ok(edgeward_confine::Landlocked::Partially) => {
                tracing::warn!("Landlock holds only partly: this kernel lacks some of its rights");
                "partially"
            }
            Ok(edgeward_confine::Landlocked::Not) => {
                tracing::warn!(
                    reason = "this kernel has no Landlock, or it is disabled",
                    "running WITHOUT Landlock: code that subverts the key daemon can reach any file its user can"
                );
                "not"
            }
            Err(e) => {
                tracing::warn!(
                    reason = %e,
                    "running WITHOUT Landlock: code that subverts the key daemon can reach any file its user can"
                );
                "not"
            }
        },
    };
    tracing::info!(landlock, "key daemon confined");
}

/// nobody and the overflow ids.
fn is_overflow(uid: u32) -> bool {
    uid == 65534 || uid == u32::MAX || uid == u32::from(u16::MAX)
}

/// The uid of user `name`, from /etc/passwd (a service's unit names its
/// runtime's user; the package creates it with a uid of the system's
/// choosing).
fn passwd_uid(name: &str) -> Result<u32, String> {
    if name.is_empty() || name.contains(':') || name.parse::<u32>().is_ok() {
        return Err(format!("--runtime-user {name:?}: not a user name"));
    }
    edgeward_hsm::state::user_uid(name)
        .map_err(|e| format!("--runtime-user {name:?}: /etc/passwd: {e}"))?
        .ok_or_else(|| format!("--runtime-user {name:?}: no such user in /etc/passwd"))
}

/// The primary group of `uid`, from /etc/passwd (not the group numbered
/// as the user: that may be another service's, `tss` or `docker`).
fn primary_gid(uid: u32) -> Result<u32, String> {
    edgeward_hsm::state::primary_gid(uid)
        .filter(|g| *g != 0)
        .ok_or_else(|| {
            format!(
                "uid {uid} has no passwd entry with a group other than root's: give --runtime-gid"
            )
        })
}

fn main() -> ExitCode {
    // A level, not a filter expression: no regular-expression engine in
    // the key daemon.
    let level = std::env::var("EDGEWARD_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    if let Some(native) = edgeward_proto::journal::native("edgeward-keyd") {
        // Under journald, its native socket: fields it indexes.
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::from_level(level))
            .with(native)
            .init();
    } else if edgeward_proto::journal::stderr_is_journal() {
        // Under journald: a priority per line, no second timestamp.
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .event_format(edgeward_proto::journal::Prioritized(format))
            .with_writer(|| edgeward_proto::QuietStderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(|| edgeward_proto::QuietStderr)
            .init();
    }
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("edgeward-keyd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The service manager's socket, while this process is single-threaded
    // and before Landlock scopes it.
    let notifier = edgeward_proto::notify::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "NOTIFY_SOCKET cannot be reached: no readiness");
        None
    });
    let notify = |f: &dyn Fn(&edgeward_proto::notify::Notifier)| {
        if let Some(n) = &notifier {
            f(n);
        }
    };
    // The parent a private key daemon belongs to, taken before anything
    // else: its pidfd is how it knows the parent ended.
    let parent = if args.private {
        match parent_pidfd() {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("edgeward-keyd: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    // Before any thread starts: SIGTERM, SIGINT, SIGHUP and SIGQUIT are
    // then received by sigwait in the main thread alone, which stops
    // cleanly (the launcher stops its runtime first; every key daemon
    // removes its socket and releases the TPM's session and primary: a
    // TPM without a resource manager, such as a simulator, keeps what a
    // process that ended without it left loaded).
    if let Err(e) = launch::block_stop_signals() {
        eprintln!("edgeward-keyd: {e}");
        return ExitCode::from(1);
    }
    // What it measures, hashed on a thread of its own while it opens the
    // HSM (its own executable, then the runtime's); the log still takes
    // them in order. A private key daemon does not measure itself (the
    // process that started it does).
    let measures = args.measure && !matches!(args.hsm, HsmConfig::Pkcs11(_));
    let mut hashing =
        launch::Hashing::start(measures && !args.private, args.launch.as_ref(), measures);
    // No core file with keys in it; no ptrace by another process of this
    // uid; nothing it runs gains privileges.
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    let _ = rustix::thread::set_no_new_privs(true);
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if let Err(e) = std::fs::create_dir_all(&args.state) {
        eprintln!("edgeward-keyd: {}: {e}", args.state.display());
        return ExitCode::from(1);
    }
    let opening = std::time::Instant::now();
    let hsm = match edgeward_hsm_hw::open(&args.hsm, &args.state) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("edgeward-keyd: cannot open the HSM: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::debug!(
        ms = opening.elapsed().as_secs_f64() * 1e3,
        backend = args.hsm.backend(),
        "the HSM is open"
    );
    // Told not to measure, on a backend with a register: the register
    // takes a mark no log explains, so nothing this boot runs can be
    // attested afterwards (a measured start later in the boot would
    // otherwise continue a log that hides this one).
    let mark = edgeward_hsm::measure::Digest::of(launch::UNMEASURED);
    if !args.measure
        && !args.private
        && !matches!(args.hsm, HsmConfig::Pkcs11(_))
        && let Err(e) = hsm.extend(mark.as_bytes())
    {
        eprintln!("edgeward-keyd: --no-measure: cannot mark the register: {e}");
        return ExitCode::from(1);
    }
    // The register it measures into, and this boot's log.
    let pcr = match &args.hsm {
        _ if !measures => None,
        HsmConfig::Soft => Some(0),
        HsmConfig::Tpm(c) => Some(u32::from(c.pcr)),
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
    let server = Server::new(hsm, measurements, args.policy.clone());
    let parent = parent.and_then(|(fd, pid)| {
        server.set_parent(pid);
        fd
    });
    if args.launch.is_some() {
        server.set_launching();
    }
    // The first event of this start: the key daemon itself, and what it
    // was told to be.
    // A private key daemon is a part of the process that started it,
    // which measures itself.
    if server.measures() && !args.private {
        let config = serde_json::json!({
            "backend": args.hsm.backend(),
            "device_id": args.policy.device_id,
            "trust_domain": args.policy.trust_domain,
            "owner": args.policy.owner,
            "runtime_uids": args.policy.runtime_uids,
            "max_leaf_ttl": args.policy.max_leaf_ttl,
            "max_jwt_key_ttl": args.policy.max_jwt_key_ttl,
            "socket": args.socket.display().to_string(),
            "launch": args.launch.as_ref().map(Launch::describe),
        });
        match hashing.own().and_then(|h| {
            let event = h.event(config);
            let digest = event["sha256"].as_str().unwrap_or("").to_owned();
            server.measure(vec![event]).map(|()| (digest, h.took))
        }) {
            Ok((digest, took)) => tracing::info!(
                %digest,
                hash_ms = took.as_secs_f64() * 1000.0,
                "the key daemon measured itself"
            ),
            Err(e) => {
                eprintln!("edgeward-keyd: cannot measure itself: {e}");
                return ExitCode::from(1);
            }
        }
    } else if !args.measure {
        tracing::warn!(
            "--no-measure: the key daemon and the runtime it launches are not measured, and this device cannot be attested"
        );
    } else if args.launch.is_some() {
        tracing::warn!(
            "the backend has no measurement register: the key daemon and the runtime it launches are not measured"
        );
    }
    let socket = &args.socket;
    // Its directory is this user's and no one else may change it: nobody
    // can swap the socket for their own or a link in between.
    let dir = socket.parent().unwrap_or(std::path::Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.uid() == rustix::process::geteuid().as_raw() && m.mode() & 0o022 == 0 => {}
        Ok(_) => {
            eprintln!(
                "edgeward-keyd: {}: the socket's directory must be this user's and writable by no one else",
                dir.display()
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("edgeward-keyd: {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    }
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
    // Anyone may connect; the principal table decides, by SO_PEERCRED,
    // what each caller may do (a stranger: nothing). The mode comes from
    // the umask at bind: a chmod afterwards would follow whatever link
    // someone put at the path in between.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o111));
    let bound = std::os::unix::net::UnixListener::bind(socket);
    rustix::process::umask(old);
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            eprintln!("edgeward-keyd: cannot bind {}: {e}", socket.display());
            return ExitCode::from(1);
        }
    };
    // The hashing thread ends here: capabilities, like Landlock, are a
    // thread's own.
    let first_start = hashing.finish();
    // Before any thread starts (Landlock binds the calling thread and
    // those it starts) and before the first request.
    confine(&args);
    tracing::info!(
        socket = %socket.display(),
        backend = args.hsm.backend(),
        runtime_uids = ?args.policy.runtime_uids,
        "key daemon ready"
    );
    // Ready once the HSM is open and the socket answers (the serving
    // thread starts next; a connection made meanwhile waits in the
    // listener's backlog).
    notify(&|n| {
        n.ready(&format!(
            "serving the {} backend on {}",
            args.hsm.backend(),
            socket.display()
        ));
    });
    if args.private {
        let socket = socket.clone();
        let server = server.clone();
        let lifeline = std::thread::Builder::new()
            .name("keyd-lifeline".into())
            .spawn(move || {
                watch_parent(parent);
                let _ = std::fs::remove_file(&socket);
                server.close();
                tracing::info!("its parent is gone: private key daemon stopped");
                std::process::exit(0);
            });
        if let Err(e) = lifeline {
            eprintln!("edgeward-keyd: cannot watch its parent: {e}");
            return ExitCode::from(1);
        }
    }
    let serving = {
        let server = server.clone();
        std::thread::Builder::new()
            .name("keyd-accept".into())
            .spawn(move || server.serve(&listener))
    };
    if let Err(e) = serving {
        eprintln!("edgeward-keyd: cannot start serving: {e}");
        return ExitCode::from(1);
    }
    // A private key daemon stops with its parent and only then: the stop
    // signal a service manager sends every process of the unit at once
    // stays blocked (pending), so the runtime stops its modules with its
    // keys still there.
    if args.private {
        loop {
            std::thread::park();
        }
    }
    let Some(launch) = args.launch else {
        let sig = launch::wait_for_stop();
        tracing::info!(signal = sig, "stopping");
        notify(&|n| n.stopping("stopping"));
        let _ = std::fs::remove_file(socket);
        server.close();
        tracing::info!("key daemon stopped");
        return ExitCode::SUCCESS;
    };
    let supervisor = Supervisor::new(launch, args.socket.clone(), server.clone(), first_start);
    let supervising = {
        let s = supervisor.clone();
        std::thread::Builder::new()
            .name("keyd-launch".into())
            .spawn(move || s.run(&launch::stop_self))
    };
    let supervising = match supervising {
        Ok(t) => t,
        Err(e) => {
            eprintln!("edgeward-keyd: cannot start the launcher: {e}");
            return ExitCode::from(1);
        }
    };
    let sig = launch::wait_for_stop();
    tracing::info!(signal = sig, "stopping: the runtime first");
    notify(&|n| n.stopping("stopping: the runtime first"));
    supervisor.stop();
    let deadline = std::time::Instant::now() + launch::STOP_GRACE;
    while !supervising.is_finished() {
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                grace_s = launch::STOP_GRACE.as_secs(),
                "the runtime did not stop in time; killed"
            );
            supervisor.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = supervising.join();
    let _ = std::fs::remove_file(socket);
    server.close();
    tracing::info!("key daemon stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn args(extra: &[&str]) -> Result<Args, String> {
        let base = ["--state", "/s", "--socket", "/s/k.sock", "--device-id", "d"];
        parse(base.iter().chain(extra).map(|s| (*s).to_owned()))
    }

    #[test]
    fn private_serves_only_the_process_that_started_it() {
        assert!(args(&["--private"]).unwrap().private);
        assert!(!args(&[]).unwrap().private);
        let e = args(&["--private", "--runtime-uid", "1234"]).unwrap_err();
        assert!(
            e.contains("--private serves only the process that started it"),
            "{e}"
        );
        let e = args(&["--private", "--launch", "/bin/true", "--"]).unwrap_err();
        assert!(e.contains("--private"), "{e}");
    }

    #[test]
    fn a_runtimes_private_key_daemon_gives_its_owner_the_runtimes_operations() {
        use edgeward_keyd::policy::Principal;
        let a = args(&["--private-runtime"]).unwrap();
        assert!(a.private);
        assert_eq!(a.policy.principal(a.policy.owner), Principal::Runtime);
        let a = args(&["--private"]).unwrap();
        assert_eq!(a.policy.principal(a.policy.owner), Principal::Root);
        let e = args(&["--private-runtime", "--runtime-uid", "1234"]).unwrap_err();
        assert!(e.contains("--private"), "{e}");
    }

    #[test]
    fn a_runtime_user_is_named_or_numbered() {
        let a = args(&["--runtime-user", "root"]).unwrap_err();
        assert!(a.contains("root is a principal of its own"), "{a}");
        let e = args(&["--runtime-user", "no-such-user-here"]).unwrap_err();
        assert!(e.contains("no such user"), "{e}");
        for bad in ["", "a:b"] {
            let e = args(&["--runtime-user", bad]).unwrap_err();
            assert!(e.contains("not a user name"), "{e}");
        }
        let nobody = args(&["--runtime-user", "nobody"]).unwrap_err();
        assert!(nobody.contains("overflow"), "{nobody}");
    }

    #[test]
    fn landlock_grants_the_state_a_dedicated_socket_dir_and_the_boot_id_only() {
        let p = fs_policy(&args(&[]).unwrap()).unwrap();
        assert_eq!(p.read_write, [PathBuf::from("/s")]);
        assert_eq!(p.read_only, [PathBuf::from(edgeward_hsm::BOOT_ID_FILE)]);
        // Not a directory that holds more than the socket.
        assert!(p.sockets.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        std::fs::write(&sock, b"").unwrap();
        let a = parse(
            ["--state", "/s", "--device-id", "d", "--socket"]
                .iter()
                .map(|s| (*s).to_owned())
                .chain([sock.display().to_string()]),
        )
        .unwrap();
        assert_eq!(fs_policy(&a).unwrap().sockets, [dir.path().to_path_buf()]);
        std::fs::write(dir.path().join("other"), b"").unwrap();
        assert!(fs_policy(&a).unwrap().sockets.is_empty());
        assert!(p.execute.is_empty() && p.devices.is_empty());
        // A launcher is not landlocked: its runtime would inherit it.
        let launch = [
            "--runtime-uid",
            "1234",
            "--runtime-gid",
            "1234",
            "--launch",
            "/bin/true",
            "--",
        ];
        let e = fs_policy(&args(&launch).unwrap()).unwrap_err();
        assert!(e.contains("launches the runtime"), "{e}");
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn landlock_grants_the_tpm_device_it_opened() {
        let p = fs_policy(&args(&["--hsm", "tpm", "--tcti", "device:/dev/tpm0"]).unwrap()).unwrap();
        assert_eq!(p.devices, [PathBuf::from("/dev/tpm0")]);
        let p = fs_policy(&args(&["--hsm", "tpm", "--tcti", "swtpm:port=1"]).unwrap()).unwrap();
        assert!(p.devices.is_empty());
    }

    #[cfg(feature = "pkcs11")]
    #[test]
    fn a_pkcs11_token_is_not_landlocked() {
        let a = [
            "--hsm",
            "pkcs11",
            "--module",
            "/m.so",
            "--token",
            "t",
            "--pin-file",
            "/p",
        ];
        let e = fs_policy(&args(&a).unwrap()).unwrap_err();
        assert!(e.contains("PKCS#11"), "{e}");
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn boot_pcrs_are_pcr_numbers() {
        let a = args(&["--hsm", "tpm", "--boot-pcrs", "0,2,7"]).unwrap();
        let HsmConfig::Tpm(t) = a.hsm else {
            panic!("{:?}", a.hsm)
        };
        assert_eq!(t.boot_pcrs, Some(vec![0, 2, 7]));
        for bad in ["24", "0,x", "-1", "0,,300"] {
            let e = args(&["--hsm", "tpm", "--boot-pcrs", bad]).unwrap_err();
            assert!(e.contains("--boot-pcrs"), "{bad}: {e}");
        }
        // Without it, none are checked.
        let HsmConfig::Tpm(t) = args(&["--hsm", "tpm"]).unwrap().hsm else {
            panic!()
        };
        assert_eq!(t.boot_pcrs, None);
    }
}
