//! The Debian package (`scripts/package`), checked by lintian, then
//! installed, upgraded, removed and purged in a throwaway root that
//! mmdebstrap makes from Debian's packages: never on the test machine's own
//! `/`. In the root, the daemons are started as their installed units say
//! (the binary, user, groups, arguments and environment read from the unit
//! files and `/etc/edgeward/keyd.env`), since no systemd runs there; the
//! CLI then serves `edgeward check` and `edgeward module list` through the
//! installed paths, as the README's installation section has it.
//!
//! The package is built from the binaries `cargo test --workspace` built
//! (`--profile dev --no-build`; `/usr/bin/edgeward` is `edgeward-pkg`, the
//! same `main` as `host/src/main.rs`); the earlier version is the same build
//! packaged as 0.0.9-1 (the upgrade path, the conffile and the maintainer
//! scripts are what is tested).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Puts the `edgeward` binary the tests built where cargo-deb takes it from
/// (`cargo test` does not build `host`'s binary; `edgeward-pkg` is it,
/// `host/src/main.rs`'s `main`), beside the key daemon's.
fn stage_binaries() {
    let pkg = Path::new(env!("CARGO_BIN_EXE_edgeward-pkg"));
    std::fs::copy(pkg, pkg.with_file_name("edgeward")).unwrap();
    assert!(
        pkg.with_file_name("edgeward-keyd").exists(),
        "the key daemon's binary (cargo test builds it for its own tests)"
    );
}

/// Builds the package at `version` (None: the crate's) and returns it,
/// copied to `dir`.
fn package(dir: &Path, version: Option<&str>) -> PathBuf {
    let mut cmd = Command::new(root_dir().join("scripts/package"));
    cmd.args(["--profile", "dev", "--no-build"]);
    if let Some(v) = version {
        cmd.args(["--deb-version", v]);
    }
    let o = cmd.output().expect("scripts/package");
    assert!(o.status.success(), "scripts/package: {}", stderr(&o));
    let built = String::from_utf8_lossy(&o.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&o.stderr).lines())
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| root_dir().join(l.trim()))
        .unwrap_or_else(|| panic!("no .deb named: {}{}", stdout(&o), stderr(&o)));
    let to = dir.join(built.file_name().unwrap());
    std::fs::copy(&built, &to).unwrap();
    to
}

/// A throwaway Debian root with what the package depends on.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("edgeward-pkg-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let o = Command::new("mmdebstrap")
            .args([
                "--variant=apt",
                "--quiet",
                "--include=adduser,init-system-helpers,libtss2-esys-3.0.2-0,libtss2-mu0,libtss2-tctildr0",
                "bookworm",
            ])
            .arg(dir.path())
            .arg("deb http://deb.debian.org/debian bookworm main")
            .output()
            .expect("mmdebstrap (scripts/setup installs it)");
        assert!(o.status.success(), "mmdebstrap: {}", stderr(&o));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `script` by /bin/sh in the root, in a mount namespace of its own
    /// with /proc and /dev.
    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--fork", "--kill-child", "--propagation", "private"])
            .arg("sh")
            .arg("-c")
            .arg(
                r#"set -e
root="$1"; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive "$@""#,
            )
            .arg("sh")
            .arg(self.path())
            .args(["/bin/sh", "-c", script]);
        c
    }

    fn run(&self, script: &str) -> Output {
        self.command(script).output().unwrap()
    }

    fn ok(&self, script: &str) -> String {
        let o = self.run(script);
        assert!(o.status.success(), "{script}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    }

    /// Whether `p` is there in the root (a link counts: its target is a
    /// path in the root, not here).
    fn exists(&self, p: &str) -> bool {
        std::fs::symlink_metadata(self.path().join(p.trim_start_matches('/'))).is_ok()
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path().join(p.trim_start_matches('/'))).unwrap_or_default()
    }
}

/// The `[Service]` settings of an installed unit that say how it starts.
fn unit(root: &Root, name: &str) -> BTreeMap<String, Vec<String>> {
    let text = root.read(&format!("/usr/lib/systemd/system/{name}.service"));
    assert!(!text.is_empty(), "{name}.service is not installed");
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=')
            && !line.starts_with('#')
        {
            m.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    m
}

/// The environment a unit's process gets: `Environment=` and its
/// `EnvironmentFile=`.
fn unit_env(root: &Root, u: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in u.get("Environment").into_iter().flatten() {
        let (k, v) = e.split_once('=').unwrap();
        env.insert(k.to_owned(), v.to_owned());
    }
    for f in u.get("EnvironmentFile").into_iter().flatten() {
        for line in root.read(f.trim_start_matches('-')).lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').unwrap();
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    env
}

/// `ExecStart=` as systemd expands it: `${VAR}` as one word, `$VAR` split
/// on spaces (empty: no word).
fn exec_start(u: &BTreeMap<String, Vec<String>>, env: &BTreeMap<String, String>) -> Vec<String> {
    let line = &u["ExecStart"][0];
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        if let Some(var) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            argv.push(env.get(var).cloned().unwrap_or_default());
        } else if let Some(var) = word.strip_prefix('$') {
            argv.extend(
                env.get(var)
                    .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                    .unwrap_or_default(),
            );
        } else {
            argv.push(word.to_owned());
        }
    }
    argv
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Starts `name` as its unit would: its runtime directory made (0755, its
/// user's), then its ExecStart under its User, Group and
/// SupplementaryGroups, with its environment and UMask and
/// no_new_privs.
fn start_unit(root: &Root, name: &str) -> Child {
    let u = unit(root, name);
    let env = unit_env(root, &u);
    let argv = exec_start(&u, &env);
    let user = &u["User"][0];
    let group = &u["Group"][0];
    let run_dir = &u["RuntimeDirectory"][0];
    let mode = &u["RuntimeDirectoryMode"][0];
    let groups = u
        .get("SupplementaryGroups")
        .map(|g| g.join(","))
        .unwrap_or_else(|| group.clone());
    let envs: Vec<String> = env
        .iter()
        .map(|(k, v)| sh_quote(&format!("{k}={v}")))
        .collect();
    let script = format!(
        "install -d -m {mode} -o {user} -g {group} /run/{run_dir} && umask {umask} && exec env {envs} setpriv --reuid={user} --regid={group} --groups={groups} --no-new-privs {argv}",
        umask = u["UMask"][0],
        envs = envs.join(" "),
        argv = argv
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    );
    root.command(&script)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(root.path().join(format!("tmp/{name}.log"))).unwrap())
        .spawn()
        .unwrap()
}

/// The daemon in `child` (unshare -> sh/setpriv -> daemon, each exec'd
/// but the first): SIGTERM to it, and wait for the whole chain.
fn stop_unit(mut child: Child) {
    let pid = child.id();
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for k in kids.split_whitespace() {
        let _ = Command::new("kill").args(["-TERM", k]).status();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(root: &Root, path: &str, log: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !root.exists(path) {
        assert!(
            Instant::now() < deadline,
            "no {path}: {}",
            root.read(&format!("/tmp/{log}.log"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both daemons, the key daemon first, as the units order them.
fn start_daemons(root: &Root) -> (Child, Child) {
    let keyd = start_unit(root, "edgeward-keyd");
    wait_for(root, "/run/edgeward-keyd/keyd.sock", "edgeward-keyd");
    let runtime = start_unit(root, "edgeward");
    wait_for(root, "/run/edgeward/management.sock", "edgeward");
    // Serving: the CLI answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !root.run("edgeward system info").status.success() {
        assert!(
            Instant::now() < deadline,
            "{}",
            root.read("/tmp/edgeward.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (keyd, runtime)
}

fn stop_daemons((keyd, runtime): (Child, Child)) {
    stop_unit(runtime);
    stop_unit(keyd);
}

fn module_log(root: &Root, name: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = root.run(&format!("edgeward module logs {name}"));
        if stdout(&o).contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never logged {needle:?}: {}{}\n{}",
            stdout(&o),
            stderr(&o),
            root.read("/tmp/edgeward.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_package_installs_upgrades_removes_and_purges_in_a_throwaway_root() {
    let debs = tempfile::tempdir().unwrap();
    stage_binaries();
    let old = package(debs.path(), Some("0.0.9-1"));
    let new = package(debs.path(), None);

    // lintian: no errors, no warnings (overrides are commented in
    // packaging/debian/lintian-overrides).
    let o = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(&new)
        .output()
        .expect("lintian (scripts/setup installs it)");
    assert!(o.status.success(), "lintian: {}{}", stdout(&o), stderr(&o));
    let tags: Vec<String> = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .map(str::to_owned)
        .collect();
    assert!(tags.is_empty(), "{tags:?}");

    let root = Root::new();
    for deb in [&old, &new] {
        std::fs::copy(deb, root.path().join("tmp").join(deb.file_name().unwrap())).unwrap();
    }
    let in_tmp = |p: &Path| format!("/tmp/{}", p.file_name().unwrap().to_string_lossy());

    // Install (the older version first).
    root.ok(&format!("apt-get install -y -q {}", in_tmp(&old)));
    for (user, home) in [
        ("edgeward", "/var/lib/edgeward"),
        ("edgeward-keyd", "/var/lib/edgeward-keyd"),
    ] {
        let line = root.ok(&format!("getent passwd {user}"));
        assert!(line.contains(home), "{line}");
        let st = root.ok(&format!("stat -c '%a %U %G' {home}"));
        assert_eq!(st.trim(), format!("700 {user} {user}"));
    }
    root.ok("getent group edgeward-operators");
    let keyd_env = root.read("/etc/edgeward/keyd.env");
    assert!(keyd_env.contains("EDGEWARD_DEVICE_ID="), "{keyd_env}");
    assert!(root.exists("/usr/libexec/edgeward/edgeward-keyd"));
    assert!(root.exists("/usr/share/man/man1/edgeward.1.gz"));
    assert!(root.exists("/usr/share/man/man1/edgeward-module-add.1.gz"));
    assert!(root.exists("/usr/share/bash-completion/completions/edgeward"));
    assert!(root.exists("/usr/share/zsh/vendor-completions/_edgeward"));
    assert!(root.exists("/usr/share/fish/vendor_completions.d/edgeward.fish"));
    // Enabled for the next boot (deb-systemd-helper's links).
    assert!(root.exists("/etc/systemd/system/multi-user.target.wants/edgeward.service"));
    assert!(root.exists("/etc/systemd/system/multi-user.target.wants/edgeward-keyd.service"));
    let conffiles = root.ok("cat /var/lib/dpkg/info/edgeward.conffiles");
    assert!(
        conffiles.contains("/etc/edgeward/config.toml"),
        "{conffiles}"
    );

    // Started as the units start them: the CLI checks the device and lists
    // (no modules yet) through the installed paths.
    let daemons = start_daemons(&root);
    // Root checks as the state directory's owner, every check passing.
    let o = root.run("edgeward check");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("checking as uid")
            && stderr(&o).contains("the owner of /var/lib/edgeward"),
        "{}",
        stderr(&o)
    );
    for line in [
        "pass  state-dir",
        "pass  socket",
        "pass  registry",
        "pass  ca",
    ] {
        assert!(stdout(&o).contains(line), "{line}: {}", stdout(&o));
    }
    // The keys are the key daemon's (the daemon names it): counted there,
    // not reported missing from the runtime's state dir.
    let text = stdout(&o);
    let hsm = text.lines().find(|l| l.starts_with("pass  hsm "));
    assert!(
        hsm.is_some_and(
            |l| l.contains("soft (the key daemon at /run/edgeward-keyd/keyd.sock): ")
                && l.contains("device-ca present")
        ),
        "{text}"
    );
    assert!(!stdout(&o).contains("FAIL"), "{}", stdout(&o));
    // The key daemon took the hostname as the device id, as the runtime
    // did: the modules' identities are certified (below).
    // The root shares this machine's hostname.
    let host = edgeward::identity::default_device_id();
    let info = root.ok("edgeward system info");
    assert!(info.contains(&host), "{host}: {info}");
    let list = root.ok("edgeward module list");
    assert!(list.starts_with("NAME"), "{list}");
    // The socket is the operators' group's, and the runtime runs as its user.
    let st = root.ok("stat -c '%a %G' /run/edgeward/management.sock");
    assert_eq!(st.trim(), "660 edgeward-operators");
    // A module that seals data, deployed through the socket.
    std::fs::copy(
        guests::IDENTITY_PROBE,
        root.path().join("tmp/identity-probe.wasm"),
    )
    .unwrap();
    root.ok("edgeward module add vault /tmp/identity-probe.wasm --arg vault --restart never");
    module_log(&root, "vault", "vault-seal ok");
    // An operator's edit to the conffile.
    root.ok("echo '# edited by the operator' >> /etc/edgeward/config.toml");

    // Upgrade while running, then restarted as systemd would after it.
    root.ok(&format!("apt-get install -y -q {}", in_tmp(&new)));
    let version = root.ok("dpkg-query -W -f '${Version}' edgeward");
    assert_ne!(version.trim(), "0.0.9-1");
    stop_daemons(daemons);
    assert!(
        root.read("/etc/edgeward/config.toml")
            .contains("# edited by the operator"),
        "the conffile edit survives the upgrade"
    );
    let daemons = start_daemons(&root);
    let list = root.ok("edgeward module list");
    assert!(list.contains("vault"), "{list}");
    // Its registration, identity and sealed data came through.
    module_log(&root, "vault", "vault-open ok");
    stop_daemons(daemons);

    // Remove: binaries gone, state, users and the conffile kept.
    root.ok("apt-get remove -y -q edgeward");
    assert!(!root.exists("/usr/bin/edgeward"));
    assert!(!root.exists("/usr/libexec/edgeward/edgeward-keyd"));
    assert!(root.exists("/var/lib/edgeward/registry.redb"));
    assert!(root.exists("/var/lib/edgeward-keyd"));
    assert!(root.exists("/etc/edgeward/config.toml"));
    root.ok("getent passwd edgeward");

    // Purge: nothing of edgeward is left.
    root.ok("apt-get purge -y -q edgeward");
    let left = root
        .ok("find / -xdev \\( -path /proc -o -path /tmp \\) -prune -o -name '*edgeward*' -print");
    assert!(left.trim().is_empty(), "left after purge: {left}");
    for who in [
        "passwd edgeward",
        "passwd edgeward-keyd",
        "group edgeward-operators",
    ] {
        assert!(
            !root.run(&format!("getent {who}")).status.success(),
            "{who} is left"
        );
    }
    assert!(!root.exists("/etc/edgeward"));
}
