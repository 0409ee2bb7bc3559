//! The systemd units edgeward ships (`packaging/systemd/`): `systemd-analyze
//! verify` passes on each, and their exposure by `systemd-analyze security
//! --offline=true` stays within its goal (the key daemon 1.5, the runtime
//! 2.5), measured in the same run as anchors: systemd's own localed,
//! Debian's Mosquitto, and a unit with a user and nothing else (the shape
//! of aziot's keyd, identityd and tpmd units).
//!
//! systemd-analyze comes with Debian's systemd; a machine without it fails
//! these tests.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/systemd");

/// A root with systemd's own units, edgeward's, the anchors, and the
/// binaries the units name at their installed paths.
fn root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let system = r.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    let o = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system/."])
        .arg(&system)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let etc = r.join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    for unit in ["edgeward-keyd.service", "edgeward.service"] {
        std::fs::copy(Path::new(UNITS).join(unit), etc.join(unit)).unwrap();
    }
    std::fs::copy(
        "/lib/systemd/system/mosquitto.service",
        etc.join("mosquitto.service"),
    )
    .expect("Debian's mosquitto.service (scripts/setup installs mosquitto)");
    std::fs::write(
        etc.join("plain.service"),
        "[Unit]\nDescription=a user and nothing else\n\n[Service]\nExecStart=/usr/bin/true\nUser=nobody\n",
    )
    .unwrap();
    for (from, to) in [
        (PathBuf::from(EDGEWARD), "usr/bin/edgeward"),
        (
            Path::new(EDGEWARD).with_file_name("edgeward-keyd"),
            "usr/libexec/edgeward/edgeward-keyd",
        ),
    ] {
        let to = r.join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    root
}

fn analyze(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(format!("--root={}", root.display()))
        .output()
        .expect("systemd-analyze (Debian's systemd)")
}

#[test]
fn the_units_verify() {
    let root = root();
    // No man page yet: the package will generate them.
    let o = analyze(
        root.path(),
        &[
            "verify",
            "--man=no",
            "edgeward-keyd.service",
            "edgeward.service",
        ],
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).trim().is_empty(), "{}", stderr(&o));
}

#[test]
fn the_units_exposure_stays_within_its_goal() {
    let root = root();
    let exposure = |unit: &str| -> f64 {
        let o = analyze(root.path(), &["security", "--offline=true", unit]);
        let out = stdout(&o);
        out.lines()
            .find_map(|l| l.split_once(&format!("Overall exposure level for {unit}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure for {unit}: {out}{}", stderr(&o)))
    };
    let ours = [("edgeward-keyd.service", 1.5), ("edgeward.service", 2.5)];
    let anchors = [
        "systemd-localed.service",
        "mosquitto.service",
        "plain.service",
    ];
    let mut report = String::new();
    for (unit, _) in ours {
        report.push_str(&format!("{unit:<28} {:.1}\n", exposure(unit)));
    }
    for unit in anchors {
        report.push_str(&format!("{unit:<28} {:.1}\n", exposure(unit)));
    }
    println!("{report}");
    for (unit, goal) in ours {
        let e = exposure(unit);
        assert!(e <= goal, "{unit}: {e} over its goal of {goal}\n{report}");
    }
    // The scale is the tool's: a unit with nothing but a user is unsafe.
    assert!(exposure("plain.service") >= 9.0, "{report}");
}

/// Every system call in `group` (or the call itself), groups expanded as
/// this machine's systemd expands them.
fn expand(group: &str, into: &mut std::collections::BTreeSet<String>) {
    if !group.starts_with('@') {
        into.insert(group.to_owned());
        return;
    }
    let o = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .expect("systemd-analyze");
    assert!(o.status.success(), "{group}: {}", stderr(&o));
    for line in stdout(&o).lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        expand(item, into);
    }
}

/// The system calls a unit's `SystemCallFilter=` lines allow: the union of
/// its allow lists less every `~` list.
fn allowed(unit: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(UNITS).join(unit)).unwrap();
    let (mut allow, mut deny) = (Default::default(), Default::default());
    for value in text
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (list, value) = match value.strip_prefix('~') {
            Some(v) => (&mut deny, v),
            None => (&mut allow, value),
        };
        for item in value.split_whitespace() {
            expand(item, list);
        }
    }
    allow.difference(&deny).cloned().collect()
}

/// What each daemon does to itself and to serve is allowed by its unit's
/// system call filter (systemd 252's `@system-service` lacks `seccomp` and
/// Landlock's calls: a unit without them would leave the daemons without
/// their own filters, and the compile worker refuses to run unconfined).
#[test]
fn the_units_allow_what_the_daemons_do_to_themselves() {
    let confine = [
        "seccomp",
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
        "capset",
        "prctl",
        "pidfd_open",
        "ppoll",
        "socket",
        "bind",
        "listen",
        "accept4",
        "sendto",
        "recvfrom",
    ];
    let keyd = allowed("edgeward-keyd.service");
    for call in confine {
        assert!(keyd.contains(call), "edgeward-keyd.service refuses {call}");
    }
    let runtime = allowed("edgeward.service");
    // The compile worker (exec, limits, a sealed memfd), the boot hash's
    // lower priority, the modules' network.
    let worker = [
        "execve",
        "memfd_create",
        "setrlimit",
        "prlimit64",
        "setpriority",
        "mprotect",
        "connect",
    ];
    for call in confine.iter().chain(&worker) {
        assert!(runtime.contains(*call), "edgeward.service refuses {call}");
    }
    // And the denied groups stay denied.
    for call in ["mount", "reboot", "init_module", "ptrace", "settimeofday"] {
        assert!(!keyd.contains(call), "edgeward-keyd.service allows {call}");
        assert!(!runtime.contains(call), "edgeward.service allows {call}");
    }
}
