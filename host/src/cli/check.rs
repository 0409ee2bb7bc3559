//! `edgeward check`: is this device ready to run edgeward? Each check is
//! named with pass, warn or fail and, when it is not a pass, a hint. Exits
//! non-zero only on a failure. Works with a running daemon (the registry is
//! then its: checked through the socket) and without. It creates nothing
//! (no state dir, registry or soft-HSM key); redb's integrity check may
//! finish a write a crash interrupted.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::hsm::Hsm as _;

use super::{fail, optional_config};

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Pass,
        detail: detail.into(),
        hint: None,
    }
}

fn not_ok(
    name: &'static str,
    verdict: Verdict,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

/// Runs `edgeward check`.
pub(super) fn command(
    state_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
    socket_flag: Option<PathBuf>,
    json: bool,
) -> ExitCode {
    let mut checks = Vec::new();
    // Nothing is created or repaired here: the state dir is looked at as
    // it is.
    let cfg = match optional_config(config_flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let state_dir = match crate::state::resolve(
        state_flag.as_deref(),
        cfg.as_ref().and_then(|c| c.state_dir.as_deref()),
    ) {
        Ok(d) => d,
        Err(e) => return fail(e, 2),
    };
    checks.push(match &cfg {
        Some(c) => pass(
            "config",
            format!(
                "{} is valid ({} modules)",
                c.path.display(),
                c.modules.len()
            ),
        ),
        None => pass("config", "no config file: an empty deployment"),
    });
    if !state_dir.exists() {
        checks.push(not_ok(
            "state-dir",
            Verdict::Warn,
            format!("{} does not exist yet", state_dir.display()),
            "the daemon creates it (0700) at its first start",
        ));
        return report(&checks, json);
    }
    if let Some(code) = as_owner(
        &state_dir,
        cfg.as_ref().map(|c| c.path.as_path()),
        socket_flag.as_deref(),
        json,
    ) {
        return code;
    }
    checks.push(state_dir_check(&state_dir));
    let configured = cfg.as_ref().and_then(|c| c.api.socket.clone());
    let socket = crate::api::socket_path(socket_flag.as_deref(), configured.as_deref());
    let daemon = socket
        .as_ref()
        .ok()
        .is_some_and(|s| daemon_answers(s, &state_dir));
    let socket_ok = socket_check(socket.as_ref(), daemon);
    // What the daemon says is believed only from a socket that passed.
    let believed = daemon && socket_ok.verdict == Verdict::Pass;
    checks.push(socket_ok);
    checks.push(registry_check(&state_dir, daemon));
    checks.push(components_check(&state_dir));
    checks.push(cache_check(cfg.as_ref(), &state_dir, daemon));
    let keyd = if believed {
        key_daemon(socket.as_ref().ok().map(PathBuf::as_path), &state_dir)
    } else {
        key_daemon(None, &state_dir)
    };
    checks.push(hsm_check(cfg.as_ref(), &state_dir, keyd.as_ref()));
    checks.push(ca_check(&state_dir));
    checks.push(jwt_keys_check(&state_dir));
    checks.push(cloud_check(cfg.as_ref()));
    checks.push(clock_check());
    checks.push(disk_check(&state_dir));
    report(&checks, json)
}

/// Prints the checks; fails only if one failed.
fn report(checks: &[Check], json: bool) -> ExitCode {
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    if json {
        match serde_json::to_string_pretty(checks) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(e, 1),
        }
    } else {
        for c in checks {
            let v = match c.verdict {
                Verdict::Pass => "pass",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            // Details carry what files, the daemon and the key daemon
            // said: never a terminal's control sequence.
            let detail = crate::runtime::escape::escape_str(&c.detail);
            println!("{v}  {:<10} {detail}", c.name);
            if let Some(h) = &c.hint {
                let h = crate::runtime::escape::escape_str(h);
                println!("      {:<10} hint: {h}", "");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Set in the environment of a check run again as the state directory's
/// owner (so it is not run again).
const AS_OWNER_ENV: &str = "EDGEWARD_CHECK_AS_OWNER";

/// What a check run as the state directory's owner keeps of this
/// process's environment (nothing else: it is root's).
const KEPT_ENV: [&str; 6] = [
    "PATH",
    "LANG",
    "LC_ALL",
    "EDGEWARD_KEYD",
    "EDGEWARD_KEYD_USER",
    "EDGEWARD_LOG",
];

/// As root, with a state directory a service user owns (the packaged
/// units' `edgeward`), the checks run again as that user: they judge its
/// files as the daemon sees them, and root's view (everything readable,
/// nothing its own) would fail them all. `None`: run here.
///
/// The owner may be hostile (a `--state-dir` someone else made), so what
/// runs as it gets nothing of root's: the paths resolved here as
/// arguments, an environment of [`KEPT_ENV`] only, `/` as its directory,
/// a session of its own (no controlling terminal to type into), standard
/// input from /dev/null, and its output through pipes this process relays.
fn as_owner(
    dir: &Path,
    config: Option<&Path>,
    socket: Option<&Path>,
    json: bool,
) -> Option<ExitCode> {
    use std::io::Read as _;
    use std::os::unix::process::CommandExt as _;
    if !rustix::process::getuid().is_root() || std::env::var_os(AS_OWNER_ENV).is_some() {
        return None;
    }
    let owner = std::fs::metadata(dir).ok()?.uid();
    if owner == 0 {
        return None;
    }
    let Some(gid) = edgeward_hsm::state::primary_gid(owner).filter(|g| *g != 0) else {
        return Some(fail(
            format!(
                "{} is owned by uid {owner}, which has no /etc/passwd entry with a group other than root's: run the check as that user",
                dir.display()
            ),
            2,
        ));
    };
    eprintln!(
        "edgeward check: checking as uid {owner}, the owner of {}",
        dir.display()
    );
    // Absolute: the check runs in /.
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg("--state-dir").arg(abs(dir)).arg("check");
    if let Some(c) = config {
        cmd.arg("--config").arg(abs(c));
    }
    if let Some(s) = socket {
        cmd.arg("--socket").arg(abs(s));
    }
    if json {
        cmd.arg("--json");
    }
    cmd.env_clear();
    for k in KEPT_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd.env(AS_OWNER_ENV, "1")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .uid(owner)
        .gid(gid);
    // SAFETY: setsid is async-signal-safe and touches no memory of this
    // process; it runs in the child between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Some(fail(
                format!("cannot run the checks as uid {owner}: {e}"),
                2,
            ));
        }
    };
    // Relayed whole (the checks' output is a page), stderr on a thread.
    let mut err = child.stderr.take()?;
    let relay = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let mut out = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut out);
    }
    let status = child.wait();
    let err = relay.join().unwrap_or_default();
    {
        use std::io::Write as _;
        let _ = std::io::stdout().write_all(&out);
        let _ = std::io::stderr().write_all(&err);
    }
    Some(match status {
        Ok(s) => ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => fail(format!("cannot run the checks as uid {owner}: {e}"), 2),
    })
}

fn state_dir_check(dir: &Path) -> Check {
    let Ok(meta) = std::fs::metadata(dir) else {
        return not_ok(
            "state-dir",
            Verdict::Fail,
            format!("{}: cannot be read", dir.display()),
            "check the path and its permissions",
        );
    };
    let me = rustix::process::getuid().as_raw();
    let mode = meta.permissions().mode() & 0o777;
    if meta.uid() != me {
        return not_ok(
            "state-dir",
            Verdict::Fail,
            format!("{} is owned by uid {}, not {me}", dir.display(), meta.uid()),
            "run as the daemon's user",
        );
    }
    if mode & 0o077 != 0 {
        return not_ok(
            "state-dir",
            Verdict::Fail,
            format!(
                "{} is {mode:o}: other users can reach keys and data",
                dir.display()
            ),
            format!("chmod 700 {}", dir.display()),
        );
    }
    pass("state-dir", format!("{} (700, ours)", dir.display()))
}

fn daemon_answers(socket: &Path, state_dir: &Path) -> bool {
    daemon_get(socket, state_dir, "/v1/health").is_some()
}

/// The body of a 200 answer to `GET path` on the management socket, if
/// the daemon answers there: root, this user or the state dir's owner
/// (anyone else at that path is not believed), within 5 s in all and
/// 1 MiB.
fn daemon_get(socket: &Path, state_dir: &Path, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::MetadataExt as _;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // Non-blocking: a listener whose backlog is full is not answering
    // (a blocking connect would wait for it for ever).
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )
    .ok()?;
    rustix::net::connect(&fd, &rustix::net::SocketAddrUnix::new(socket).ok()?).ok()?;
    let mut c = std::os::unix::net::UnixStream::from(fd);
    c.set_nonblocking(false).ok()?;
    let server = rustix::net::sockopt::socket_peercred(&c).ok()?.uid.as_raw();
    let owner = std::fs::metadata(state_dir).ok().map(|m| m.uid());
    if server != 0 && server != rustix::process::geteuid().as_raw() && Some(server) != owner {
        return None;
    }
    c.set_write_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        c.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .ok()?;
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if out.len() + n <= 1 << 20 => out.extend_from_slice(&buf[..n]),
            Ok(_) | Err(_) => return None,
        }
    }
    let out = String::from_utf8(out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// A key daemon that holds the HSM: its socket, and the user trusted to
/// answer there (besides root and this one).
struct KeyDaemon {
    socket: PathBuf,
    user: Result<Option<u32>, String>,
}

/// The key daemon that holds the HSM: the one `EDGEWARD_KEYD` names (its
/// user from `EDGEWARD_KEYD_USER`), else the one the running daemon
/// reports using, with the user it reports.
fn key_daemon(socket: Option<&Path>, state_dir: &Path) -> Option<KeyDaemon> {
    if let Some(socket) = crate::keyd::configured_socket() {
        return Some(KeyDaemon {
            socket,
            user: edgeward_proto::keyd_user(),
        });
    }
    let info = daemon_get(socket?, state_dir, "/v1/system/info")?;
    let v: serde_json::Value = serde_json::from_str(&info).ok()?;
    Some(KeyDaemon {
        socket: PathBuf::from(v["key_daemon"].as_str()?),
        user: v["key_daemon_user"]
            .as_str()
            .map(|name| {
                edgeward_proto::resolve_keyd_user(name)
                    .map_err(|e| format!("the daemon's key daemon user {e}"))
            })
            .transpose(),
    })
}

fn socket_check(socket: Result<&PathBuf, &String>, daemon: bool) -> Check {
    let socket = match socket {
        Ok(s) => s,
        Err(e) => return not_ok("socket", Verdict::Warn, e.clone(), "give --socket"),
    };
    if !socket.exists() {
        return not_ok(
            "socket",
            Verdict::Warn,
            format!("{}: no daemon is running", socket.display()),
            "start it with `edgeward daemon`",
        );
    }
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    let dir = socket.parent().unwrap_or(Path::new("."));
    let (dm, sm) = (mode(dir), mode(socket));
    // Others may connect if they may write the socket; they may replace it
    // if they may write its directory.
    if sm & 0o002 != 0 || dm & 0o002 != 0 {
        return not_ok(
            "socket",
            Verdict::Fail,
            format!(
                "{} is {sm:o} in a {dm:o} directory: any user can reach or replace the management socket",
                socket.display()
            ),
            "restart the daemon (it makes the socket 660)",
        );
    }
    if daemon {
        pass(
            "socket",
            format!("{}: the daemon answers", socket.display()),
        )
    } else {
        not_ok(
            "socket",
            Verdict::Warn,
            format!("{}: nothing answers (a stale socket)", socket.display()),
            "start the daemon; it replaces a stale socket",
        )
    }
}

fn registry_check(state_dir: &Path, daemon: bool) -> Check {
    if !state_dir.join(crate::registry::FILE).exists() {
        return pass("registry", "none yet (made at the first daemon start)");
    }
    match crate::registry::Registry::open(state_dir) {
        Ok(mut r) => match r.check_integrity() {
            Ok(true) => pass(
                "registry",
                format!(
                    "{}: intact, {} modules",
                    r.path().display(),
                    r.modules().map(|m| m.len()).unwrap_or(0)
                ),
            ),
            Ok(false) => not_ok(
                "registry",
                Verdict::Warn,
                format!("{}: was repaired", r.path().display()),
                "a crash interrupted a write; nothing acknowledged was lost",
            ),
            Err(e) => not_ok(
                "registry",
                Verdict::Fail,
                e.to_string(),
                "restore it from a backup",
            ),
        },
        Err(crate::registry::RegistryError::Busy(p)) if daemon => pass(
            "registry",
            format!("{}: held by the running daemon", p.display()),
        ),
        Err(e) => not_ok(
            "registry",
            Verdict::Fail,
            e.to_string(),
            "see the message; the registry is never reset",
        ),
    }
}

fn components_check(state_dir: &Path) -> Check {
    if !state_dir.join(crate::components::DIR).exists() {
        return pass("components", "none stored");
    }
    let store = match crate::components::ComponentStore::open(state_dir) {
        Ok(s) => s,
        Err(e) => {
            return not_ok(
                "components",
                Verdict::Fail,
                e.to_string(),
                "check the state dir",
            );
        }
    };
    let (mut ok, mut bad) = (0, Vec::new());
    for (path, digest) in store.entries() {
        match digest.map(|d| store.get(&d)) {
            Some(Ok(_)) => ok += 1,
            _ => bad.push(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        }
    }
    if bad.is_empty() {
        pass(
            "components",
            format!("{ok} stored, each matches its digest"),
        )
    } else {
        not_ok(
            "components",
            Verdict::Fail,
            format!(
                "{} do not match their digests: {}",
                bad.len(),
                bad.join(", ")
            ),
            "they are refused, never run; delete them and upload or configure the component again",
        )
    }
}

/// Re-measures the compiled-cache entries of the stored components, as the
/// watchdog does: each authenticated under the cache key with the engine
/// the config's daemon builds. An entry that fails is deleted (it is
/// rebuilt, never loaded), as the watchdog would.
fn cache_check(cfg: Option<&crate::config::Config>, state_dir: &Path, daemon: bool) -> Check {
    let empty = crate::config::Config::empty();
    let cfg = cfg.unwrap_or(&empty);
    let wrapped = crate::config::cache_key(&cfg.hsm) == crate::runtime::cache::CacheKey::Hsm;
    let key = state_dir.join(if wrapped {
        "cache.key.wrapped"
    } else {
        "cache.key"
    });
    if !key.exists() || !state_dir.join("cache").exists() {
        return pass("cache", "no compiled-artifact cache yet");
    }
    if wrapped && daemon {
        return pass(
            "cache",
            "the running daemon holds the HSM; its watchdog re-measures the entries",
        );
    }
    let runtime =
        match crate::runtime::Runtime::new(&crate::daemon::runtime_options(cfg, state_dir)) {
            Ok(r) => r,
            Err(e) => {
                return not_ok(
                    "cache",
                    Verdict::Fail,
                    format!("{e:#}"),
                    "check the state dir",
                );
            }
        };
    let Some(cache) = runtime.cache() else {
        return pass("cache", "off");
    };
    if let Err(e) = super::unlock_cache(&runtime, &cfg.hsm, state_dir, &cfg.identity) {
        return not_ok(
            "cache",
            Verdict::Fail,
            format!("the cache key does not unwrap: {e}"),
            "check [hsm]; the daemon makes a new key and rebuilds the entries",
        );
    }
    let store = match crate::components::ComponentStore::open(state_dir) {
        Ok(s) => s,
        Err(e) => return not_ok("cache", Verdict::Fail, e.to_string(), "check the state dir"),
    };
    let (mut ok, mut absent, mut bad) = (0, 0, Vec::new());
    for digest in store.entries().into_iter().filter_map(|(_, d)| d) {
        match cache.verify(&digest) {
            Ok(true) => ok += 1,
            Ok(false) => absent += 1,
            Err(why) => bad.push(format!("{digest} ({why})")),
        }
    }
    if bad.is_empty() {
        pass(
            "cache",
            format!(
                "{ok} entries authenticated ({absent} components not compiled for this engine yet)"
            ),
        )
    } else {
        not_ok(
            "cache",
            Verdict::Fail,
            format!(
                "{} entries fail authentication: {}",
                bad.len(),
                bad.join(", ")
            ),
            "they were deleted, never loaded: the daemon recompiles them from the measured components; find out who wrote to the state dir",
        )
    }
}

/// The HSM: reachable, and holding the device CA's key. `keyd` is the key
/// daemon that holds it, when one does (its keys are not in this state
/// dir then).
fn hsm_check(
    cfg: Option<&crate::config::Config>,
    state_dir: &Path,
    keyd: Option<&KeyDaemon>,
) -> Check {
    let hsm_config = cfg.map(|c| c.hsm.clone()).unwrap_or_default();
    let (hsm, held) = match keyd {
        Some(KeyDaemon { socket: sock, user }) => {
            let opened = user
                .clone()
                .map_err(|e| {
                    crate::hsm::HsmError::new(
                        "keyd",
                        crate::hsm::Op::ListKeys,
                        None,
                        crate::hsm::ErrorKind::Unavailable(e),
                    )
                })
                .and_then(|uid| edgeward_proto::RemoteHsm::connect_trusting(sock, uid))
                .and_then(|remote| {
                    if remote.backend() == hsm_config.backend() {
                        Ok(remote)
                    } else {
                        Err(crate::hsm::HsmError::new(
                            remote.backend(),
                            crate::hsm::Op::ListKeys,
                            None,
                            crate::hsm::ErrorKind::Unavailable(format!(
                                "the key daemon at {} holds the {} backend; [hsm] backend is {}",
                                sock.display(),
                                remote.backend(),
                                hsm_config.backend()
                            )),
                        ))
                    }
                });
            match opened {
                Ok(h) => (
                    std::sync::Arc::new(h) as std::sync::Arc<dyn crate::hsm::Hsm>,
                    format!(" (the key daemon at {})", sock.display()),
                ),
                Err(e) => {
                    return not_ok(
                        "hsm",
                        Verdict::Fail,
                        e.to_string(),
                        "start the key daemon (systemctl start edgeward-keyd) and check its log",
                    );
                }
            }
        }
        None => {
            // Opening the soft backend would create its key-encryption key.
            if hsm_config == crate::hsm::HsmConfig::Soft && !state_dir.join("hsm").exists() {
                return pass(
                    "hsm",
                    "soft: not set up yet (the daemon does at its first start)",
                );
            }
            let identity = cfg.map(|c| c.identity.clone()).unwrap_or_default();
            match crate::keyd::open(&hsm_config, state_dir, &identity) {
                Ok(h) => (h, String::new()),
                Err(e) => {
                    return not_ok(
                        "hsm",
                        Verdict::Fail,
                        e.to_string(),
                        "check [hsm] and that the device or token is reachable",
                    );
                }
            }
        }
    };
    match hsm.keys() {
        Ok(keys) if keys.iter().any(|k| k.id == "device-ca") => pass(
            "hsm",
            format!(
                "{}{held}: {} keys, device-ca present",
                hsm.backend(),
                keys.len()
            ),
        ),
        Ok(keys) => not_ok(
            "hsm",
            Verdict::Warn,
            format!(
                "{}{held}: {} keys, no device-ca yet",
                hsm.backend(),
                keys.len()
            ),
            "the daemon creates it at its first start",
        ),
        Err(e) => not_ok("hsm", Verdict::Fail, e.to_string(), "check the HSM"),
    }
}

/// The published JWT-SVID keys: readable, and one still valid (the daemon
/// rotates them; a stopped daemon's keys run out).
fn jwt_keys_check(state_dir: &Path) -> Check {
    let path = state_dir.join("identity").join("jwt-keys.json");
    let Ok(text) = std::fs::read(&path) else {
        return pass("jwt-keys", "no JWT-SVID keys yet (made at the first token)");
    };
    let Ok(keys) = serde_json::from_slice::<Vec<crate::identity::jwt::PublishedKey>>(&text) else {
        return not_ok(
            "jwt-keys",
            Verdict::Fail,
            format!("{}: not a list of published keys", path.display()),
            "delete it: the daemon publishes a new key (tokens signed by the old ones stop validating)",
        );
    };
    let now = crate::identity::unix_now();
    match keys.iter().map(|k| k.valid_until).max() {
        Some(until) if until > now => pass(
            "jwt-keys",
            format!(
                "{} published, the newest valid for {} more minutes",
                keys.len(),
                (until - now) / 60
            ),
        ),
        _ => not_ok(
            "jwt-keys",
            Verdict::Warn,
            format!("{}: no published key is valid now", path.display()),
            "start the daemon: it rotates the working key",
        ),
    }
}

fn ca_check(state_dir: &Path) -> Check {
    let path = state_dir.join("identity").join("ca.pem");
    let Ok(pem) = std::fs::read(&path) else {
        return pass(
            "ca",
            "no device CA certificate yet (issued at the first start)",
        );
    };
    let cert = x509_parser::pem::parse_x509_pem(&pem)
        .ok()
        .and_then(|(_, p)| {
            p.parse_x509()
                .ok()
                .map(|c| c.validity().not_after.timestamp())
        });
    let Some(not_after) = cert else {
        return not_ok(
            "ca",
            Verdict::Fail,
            format!("{}: not a certificate", path.display()),
            "delete it: the daemon issues a new root for the same key",
        );
    };
    let now = i64::try_from(crate::identity::unix_now()).unwrap_or(i64::MAX);
    let days = (not_after - now) / 86_400;
    if not_after <= now {
        not_ok(
            "ca",
            Verdict::Fail,
            format!("{}: expired", path.display()),
            "restart the daemon (it re-issues an expiring root)",
        )
    } else if days < 30 {
        not_ok(
            "ca",
            Verdict::Warn,
            format!("{}: expires in {days} days", path.display()),
            "restart the daemon, or renew the configured chain",
        )
    } else {
        pass(
            "ca",
            format!("{}: valid for {days} more days", path.display()),
        )
    }
}

/// `[cloud]`: the organisation's certificate for the device's broker key
/// present and current (else the broker refuses the device), and the
/// broker reachable with a certificate `[cloud] ca` verifies. The device's
/// own client authentication is the daemon's (`edgeward fleet status`
/// shows it).
fn cloud_check(cfg: Option<&crate::config::Config>) -> Check {
    let Some(c) = cfg.and_then(|c| c.cloud.as_ref().map(|cl| (c, cl))) else {
        return pass("cloud", "no [cloud]: not connected to a fleet");
    };
    let (_, cloud) = c;
    let broker = format!("{}:{}", cloud.host, cloud.port);
    let hint = "edgeward identity csr --broker --out broker.csr, have the organisation's device CA certify it, put the certificate where [cloud] certificate says (docs/fleet.md)";
    let cert = &cloud.certificate;
    let parsed = std::fs::read(cert)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            let (_, p) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| e.to_string())?;
            let c = p.parse_x509().map_err(|e| e.to_string())?;
            Ok(c.validity().not_after.timestamp())
        });
    match parsed {
        Err(e) => {
            return not_ok(
                "cloud",
                Verdict::Fail,
                format!(
                    "broker {broker}: the device's broker certificate {}: {e}",
                    cert.display()
                ),
                hint,
            );
        }
        Ok(not_after) => {
            let left = not_after - i64::try_from(crate::identity::unix_now()).unwrap_or(i64::MAX);
            if left <= 0 {
                return not_ok(
                    "cloud",
                    Verdict::Fail,
                    format!(
                        "broker {broker}: the device's broker certificate {} has expired",
                        cert.display()
                    ),
                    hint,
                );
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return not_ok("cloud", Verdict::Fail, e.to_string(), "retry"),
    };
    match rt.block_on(broker_handshake(cloud)) {
        Ok(()) => pass(
            "cloud",
            format!(
                "broker {broker} reachable; its certificate verifies against {}",
                cloud.ca.display()
            ),
        ),
        Err(e) => not_ok(
            "cloud",
            Verdict::Fail,
            format!("broker {broker}: {e}"),
            "check [cloud] broker and ca, and the network path to the broker",
        ),
    }
}

/// A TLS handshake with the broker, verifying its certificate (and
/// presenting none: the broker may then close, which is not the point).
async fn broker_handshake(cloud: &crate::cloud::CloudConfig) -> Result<(), String> {
    let tls = crate::cloud::tls::client_builder(cloud.broker_roots.clone())?.with_no_client_auth();
    let limit = std::time::Duration::from_secs(5);
    let tcp = tokio::time::timeout(
        limit,
        tokio::net::TcpStream::connect((cloud.host.as_str(), cloud.port)),
    )
    .await
    .map_err(|_| format!("no connection within {limit:?}"))?
    .map_err(|e| format!("cannot connect: {e}"))?;
    let name = match cloud.host.parse::<std::net::IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::from(ip),
        Err(_) => rustls::pki_types::ServerName::try_from(cloud.host.clone())
            .map_err(|e| e.to_string())?,
    };
    tokio::time::timeout(
        limit,
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| format!("no TLS handshake within {limit:?}"))?
    .map(drop)
    .map_err(|e| format!("TLS: {e}"))
}

fn clock_check() -> Check {
    // Certificates and tokens need a sane clock: not before this build's year.
    const EARLIEST: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
    let now = crate::identity::unix_now();
    if now < EARLIEST {
        not_ok(
            "clock",
            Verdict::Fail,
            format!("the clock says {now} (unix), before 2026"),
            "set the time (NTP): certificates and tokens depend on it",
        )
    } else {
        pass("clock", "after this build's date")
    }
}

fn disk_check(state_dir: &Path) -> Check {
    let Ok(st) = rustix::fs::statvfs(state_dir) else {
        return not_ok(
            "disk",
            Verdict::Warn,
            "cannot read the filesystem's free space",
            "check the state dir's filesystem",
        );
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let total = st.f_blocks.saturating_mul(st.f_frsize).max(1);
    #[allow(clippy::cast_precision_loss)] // a display figure
    let shown = format!("{:.1} GiB", free as f64 / f64::from(1u32 << 30));
    if free < 100 << 20 || free * 100 / total < 5 {
        not_ok(
            "disk",
            Verdict::Warn,
            format!("{shown} free under the state dir"),
            "modules' data budgets (max_disk) and logs need room",
        )
    } else {
        pass("disk", format!("{shown} free under the state dir"))
    }
}
