//! `edgeward support-bundle --out DIR`: what an operator sends when asking
//! for help, in one directory (`tar czf bundle.tgz DIR`): versions, the
//! effective config with module environments and settings redacted, the
//! `check` report, the daemon's system info, modules, deployment status,
//! recent events, metrics, each module's recent output and exits, the
//! measurement log with a fresh quote, and the units' journal when there is
//! one. Never a key: nothing is copied from the state directory, only what
//! the management API and `check` say, and a PEM private key that turns up
//! anyway (a module printing one) is replaced by a marker and noted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::fail;

/// `edgeward support-bundle`.
#[derive(Debug, clap::Args)]
pub(super) struct SupportArgs {
    /// The directory to write (it must not exist; made 0700).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Config file. Default: $EDGEWARD_CONFIG, then
    /// /etc/edgeward/config.toml if it exists, else none.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The management socket (see `edgeward module --help`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Lines of each module's recorded output to include.
    #[arg(long, value_name = "N", default_value_t = 200)]
    lines: u32,
}

/// How long one API request, `check` or `journalctl` may take: a wedged
/// daemon is when a bundle is needed most.
const STEP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

struct Bundle {
    /// The directory, opened once (`O_NOFOLLOW`) and reached through its
    /// descriptor from then on: renaming or replacing the path it was made
    /// at redirects nothing.
    dir: std::fs::File,
    written: Vec<String>,
    notes: Vec<String>,
}

/// `text` with every PEM private-key block replaced by a marker; how many.
fn without_private_keys(text: &str) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut n = 0;
    while let Some(start) = rest.find("-----BEGIN ") {
        let (before, block) = rest.split_at(start);
        let header_end = block.find('\n').unwrap_or(block.len());
        out.push_str(before);
        if !block[..header_end].contains("PRIVATE KEY") {
            out.push_str(&block[..header_end]);
            rest = &block[header_end..];
            continue;
        }
        out.push_str("<a private key was here and is left out>");
        n += 1;
        rest = match block.find("-----END ") {
            Some(e) => {
                let after = &block[e + 9..];
                after.find("-----").map_or("", |k| &after[k + 5..])
            }
            None => "",
        };
    }
    out.push_str(rest);
    (out, n)
}

impl Bundle {
    /// Writes `name` (relative; its directories made 0700), with any PEM
    /// private key in it replaced by a marker (noted).
    fn put(&mut self, name: &str, bytes: &[u8]) {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        use std::os::unix::io::AsRawFd as _;
        let base = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        let text = String::from_utf8_lossy(bytes);
        let (clean, keys) = without_private_keys(&text);
        if keys > 0 {
            self.notes.push(format!(
                "{name}: {keys} private key(s) replaced by a marker"
            ));
        }
        if let Some(parent) = Path::new(name)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            && let Err(e) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(base.join(parent))
        {
            self.notes.push(format!("{name}: {e}"));
            return;
        }
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(base.join(name))
            .and_then(|mut f| f.write_all(clean.as_bytes()));
        match written {
            Ok(()) => self.written.push(name.to_owned()),
            Err(e) => self.notes.push(format!("{name}: {e}")),
        }
    }
}

/// The effective config with what may be secret replaced: module and
/// agent environments and settings (their keys kept) and arguments.
fn redacted(mut v: serde_json::Value) -> serde_json::Value {
    fn scrub(m: &mut serde_json::Value) {
        if let Some(serde_json::Value::Array(args)) = m.get_mut("args") {
            for arg in args.iter_mut() {
                *arg = "<redacted>".into();
            }
        }
        for field in ["env", "settings"] {
            match m.get_mut(field) {
                Some(serde_json::Value::Object(o)) => {
                    for (_, v) in o.iter_mut() {
                        *v = "<redacted>".into();
                    }
                }
                Some(serde_json::Value::Array(a)) => {
                    for pair in a.iter_mut() {
                        if let serde_json::Value::Array(kv) = pair
                            && kv.len() == 2
                        {
                            kv[1] = "<redacted>".into();
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(serde_json::Value::Array(ms)) = v.get_mut("modules") {
        ms.iter_mut().for_each(scrub);
    }
    if let Some(agent) = v.get_mut("agent") {
        scrub(agent);
    }
    v
}

/// `cmd`'s output (stdout, then stderr) and exit status; killed past
/// [`STEP_DEADLINE`].
fn run_capture(cmd: &mut std::process::Command) -> Vec<u8> {
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return format!("cannot run: {e}\n").into_bytes(),
    };
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = std::time::Instant::now() + STEP_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.to_string(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break format!("killed after {} s", STEP_DEADLINE.as_secs());
            }
            Err(e) => break format!("cannot wait: {e}"),
        }
    };
    let mut all = out.join().unwrap_or_default();
    all.extend_from_slice(&err.join().unwrap_or_default());
    all.extend_from_slice(format!("\n(exit status: {status})\n").as_bytes());
    all
}

/// Runs `edgeward support-bundle`.
pub(super) fn command(args: SupportArgs, state_flag: Option<PathBuf>) -> ExitCode {
    use std::os::unix::fs::DirBuilderExt as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&args.out) {
        return fail(
            format!(
                "cannot create {}: {e} (name a directory that does not exist yet)",
                args.out.display()
            ),
            2,
        );
    }
    // Opened without following a link, and ours and private, or nothing
    // is written: the path may sit in a directory someone else can change.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&args.out);
    let dir = match opened {
        Ok(d) => match d.metadata() {
            Ok(m)
                if m.is_dir()
                    && m.uid() == rustix::process::geteuid().as_raw()
                    && m.mode() & 0o077 == 0 =>
            {
                d
            }
            _ => {
                return fail(
                    format!(
                        "{}: not the private directory just made",
                        args.out.display()
                    ),
                    2,
                );
            }
        },
        Err(e) => return fail(format!("cannot open {}: {e}", args.out.display()), 2),
    };
    let mut b = Bundle {
        dir,
        written: Vec::new(),
        notes: Vec::new(),
    };
    let uname = rustix::system::uname();
    let versions = format!(
        "edgeward {}\nwasmtime {}\nkernel {} {} {}\n\n{}",
        crate::VERSION,
        crate::WASMTIME_VERSION,
        uname.sysname().to_string_lossy(),
        uname.release().to_string_lossy(),
        uname.machine().to_string_lossy(),
        std::fs::read_to_string("/etc/os-release").unwrap_or_default()
    );
    b.put("versions.txt", versions.as_bytes());

    let mut config_path = args.config.clone();
    let config_loads = match super::optional_config(args.config.clone()) {
        Ok(Some(c)) => {
            let text = serde_json::to_string_pretty(&redacted(c.effective())).unwrap_or_default();
            b.put("config.json", text.as_bytes());
            true
        }
        Ok(None) => {
            b.put("config.json", b"null\n");
            true
        }
        Err(_) => {
            // Its error may quote the file (a secret on the line that does
            // not parse): left to the operator's own `check`.
            b.notes.push(
                "config.json, check.txt: the config does not load; `edgeward check` says why (not included: its message may quote the file)".to_owned(),
            );
            config_path = Some(PathBuf::from("/dev/null"));
            false
        }
    };

    // `check`, as an operator would run it (as root: as the state
    // directory's owner).
    let mut check = std::process::Command::new("/proc/self/exe");
    if let Some(s) = &state_flag {
        check.arg("--state-dir").arg(s);
    }
    check.arg("check");
    if let Some(c) = &config_path {
        check.arg("--config").arg(c);
    }
    if let Some(s) = &args.socket {
        check.arg("--socket").arg(s);
    }
    if config_loads {
        b.put("check.txt", &run_capture(&mut check));
    }

    // What the management API says (a daemon, else the state dir's
    // records read-only).
    match super::module::connect_for(
        args.socket.clone(),
        config_path,
        Some(state_flag.as_deref()),
    ) {
        Ok(t) => t.rt.block_on(from_api(&mut b, &t.socket, args.lines)),
        Err(_) => b
            .notes
            .push("the management API: no daemon answers and no records to read".to_owned()),
    }

    // The units' journal, when this device has one.
    let journalctl = ["/usr/bin/journalctl", "/bin/journalctl"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if let Some(journalctl) = journalctl
        && Path::new("/run/systemd/journal").exists()
    {
        let journal = run_capture(
            std::process::Command::new(journalctl)
                .args(["-u", "edgeward", "-u", "edgeward-keyd", "-n", "2000"])
                .args(["--no-pager", "-o", "short-iso"]),
        );
        b.put("journal.txt", &journal);
    }

    if !b.notes.is_empty() {
        eprintln!("edgeward support-bundle: notes (also in INDEX.txt):");
        for n in &b.notes {
            eprintln!("  {n}");
        }
    }
    let mut index = String::from(
        "edgeward support bundle: what the management API, check and the journal say; no key, token or state file.\n\n",
    );
    for w in &b.written {
        index.push_str(&format!("{w}\n"));
    }
    if !b.notes.is_empty() {
        index.push_str("\nnot included:\n");
        for n in &b.notes {
            index.push_str(&format!("  {n}\n"));
        }
    }
    b.put("INDEX.txt", index.as_bytes());
    println!(
        "{}: {} files (INDEX.txt lists them); send it as: tar czf edgeward-support.tgz -C {} {}",
        args.out.display(),
        b.written.len(),
        args.out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .display(),
        args.out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    ExitCode::SUCCESS
}

async fn from_api(b: &mut Bundle, socket: &Path, lines: u32) {
    let get = |path: String| async move {
        tokio::time::timeout(
            STEP_DEADLINE,
            crate::api::client::request(socket, "GET", &path, None),
        )
        .await
        .map_err(|_| format!("no answer within {} s", STEP_DEADLINE.as_secs()))?
        .map_err(|e| format!("{e:#}"))
        .and_then(|a| {
            if a.status == 200 {
                Ok(a.body.to_vec())
            } else {
                Err(format!(
                    "{} {}",
                    a.status,
                    String::from_utf8_lossy(&a.body).trim()
                ))
            }
        })
    };
    for (name, path) in [
        ("system.json", "/v1/system/info"),
        ("modules.json", "/v1/modules"),
        ("deployment-status.json", "/v1/deployment/status"),
        ("events.jsonl", "/v1/events"),
        ("metrics.txt", "/v1/metrics"),
        ("identities.json", "/v1/identities"),
    ] {
        match get(path.to_owned()).await {
            Ok(body) => b.put(name, &body),
            Err(e) => b.notes.push(format!("{name}: {e}")),
        }
    }
    // A fresh quote over the measurement log (a daemon that measures).
    let mut nonce = [0u8; 16];
    if getrandom::fill(&mut nonce).is_ok() {
        match get(format!("/v1/attest?nonce={}", crate::measure::hex(&nonce))).await {
            Ok(body) => b.put("measurements.json", &body),
            Err(e) => b.notes.push(format!("measurements.json: {e}")),
        }
    }
    let names: Vec<String> = match get("/v1/modules".to_owned()).await {
        Ok(body) => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .filter(|n| crate::spec::valid_module_name(n))
            .collect(),
        Err(_) => Vec::new(),
    };
    for n in names {
        match get(format!("/v1/modules/{n}/logs?tail={lines}")).await {
            Ok(body) => b.put(&format!("modules/{n}/output.log"), &body),
            Err(e) => b.notes.push(format!("modules/{n}/output.log: {e}")),
        }
        match get(format!("/v1/modules/{n}/exits")).await {
            Ok(body) => b.put(&format!("modules/{n}/exits.json"), &body),
            Err(e) => b.notes.push(format!("modules/{n}/exits.json: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_keys_are_cut_out_and_the_rest_kept() {
        let text = "before\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\nmid\n-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\nafter\n-----BEGIN EC PRIVATE KEY-----\nunterminated";
        let (clean, n) = without_private_keys(text);
        assert_eq!(n, 2);
        assert!(clean.contains("BEGIN CERTIFICATE") && clean.contains("MIIB"));
        assert!(clean.contains("mid") && clean.contains("after"));
        assert!(!clean.contains("MIGH") && !clean.contains("unterminated"));
        assert_eq!(without_private_keys("plain").1, 0);
    }

    #[test]
    fn arguments_environments_and_settings_are_redacted() {
        let v = serde_json::json!({"modules": [{
            "name": "m", "args": ["--password", "p"],
            "env": {"TOKEN": "t"}, "settings": {"k": "v"}
        }]});
        let r = redacted(v).to_string();
        assert!(r.contains("TOKEN") && r.contains("\"k\""));
        for secret in ["\"p\"", "\"t\"", "\"v\"", "--password"] {
            assert!(!r.contains(secret), "{secret}: {r}");
        }
    }
}
