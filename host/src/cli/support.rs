//! `edgeward support-bundle --out DIR`: what an operator sends when asking
//! for help, in one directory (`tar czf bundle.tgz DIR`): versions, the
//! effective config with module environments and settings redacted, the
//! `check` report, the daemon's system info, modules, deployment status,
//! recent events, metrics, each module's recent output and exits, the
//! measurement log with a fresh quote, and the units' journal when there is
//! one. Never a key: nothing is copied from the state directory, only what
//! the management API and `check` say; every file is scanned for key
//! material before it is kept.

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

/// What marks key material; a file holding it is not kept.
const KEY_MARKERS: [&str; 2] = ["PRIVATE KEY", "private_key"];

struct Bundle {
    dir: PathBuf,
    written: Vec<String>,
    notes: Vec<String>,
}

impl Bundle {
    /// Writes `name` (relative), unless it holds key material.
    fn put(&mut self, name: &str, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        if let Some(m) = KEY_MARKERS.iter().find(|m| text.contains(*m)) {
            self.notes.push(format!(
                "{name}: left out (it held {m:?}, which marks key material)"
            ));
            return;
        }
        let path = self.dir.join(name);
        if let Some(parent) = path.parent()
            && let Err(e) = std::fs::create_dir_all(parent)
        {
            self.notes.push(format!("{name}: {e}"));
            return;
        }
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_0600()
            .open(&path)
            .and_then(|mut f| f.write_all(bytes));
        match written {
            Ok(()) => self.written.push(name.to_owned()),
            Err(e) => self.notes.push(format!("{name}: {e}")),
        }
    }
}

/// 0600 for every file of the bundle.
trait Private {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Private for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.mode(0o600)
    }
}

/// The effective config with what may be secret replaced: module and
/// agent environments and settings (their keys kept).
fn redacted(mut v: serde_json::Value) -> serde_json::Value {
    fn scrub(m: &mut serde_json::Value) {
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

fn run_capture(cmd: &mut std::process::Command) -> Vec<u8> {
    match cmd.stdin(std::process::Stdio::null()).output() {
        Ok(o) => {
            let mut all = o.stdout;
            all.extend_from_slice(&o.stderr);
            all.extend_from_slice(format!("\n(exit status: {})\n", o.status).as_bytes());
            all
        }
        Err(e) => format!("cannot run: {e}\n").into_bytes(),
    }
}

/// Runs `edgeward support-bundle`.
pub(super) fn command(args: SupportArgs, state_flag: Option<PathBuf>) -> ExitCode {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&args.out) {
        return fail(
            format!(
                "cannot create {}: {e} (name a directory that does not exist yet)",
                args.out.display()
            ),
            2,
        );
    }
    let mut b = Bundle {
        dir: args.out.clone(),
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

    let config_path = args.config.clone();
    match super::optional_config(args.config.clone()) {
        Ok(Some(c)) => {
            let text = serde_json::to_string_pretty(&redacted(c.effective())).unwrap_or_default();
            b.put("config.json", text.as_bytes());
        }
        Ok(None) => b.put("config.json", b"null\n"),
        Err(_) => b
            .notes
            .push("config.json: the config does not load (check.txt says why)".to_owned()),
    }

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
    b.put("check.txt", &run_capture(&mut check));

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
    if Path::new("/run/systemd/journal").exists() {
        let journal = run_capture(
            std::process::Command::new("journalctl")
                .args(["-u", "edgeward", "-u", "edgeward-keyd", "-n", "2000"])
                .args(["--no-pager", "-o", "short-iso"]),
        );
        b.put("journal.txt", &journal);
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
        crate::api::client::request(socket, "GET", &path, None)
            .await
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
