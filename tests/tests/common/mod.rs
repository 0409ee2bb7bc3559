//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use edgeward_tests::guests;

pub mod daemon;
pub mod svid;

/// The edgeward binary under test.
pub const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");

/// A scratch directory with a private state dir inside.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes `text` to `name` in the scratch directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }

    /// The management socket of this scratch's daemon (each test's own:
    /// daemons in parallel tests must not share the default one).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// `edgeward --state-dir <state> ARGS...`, logs at their defaults, the
    /// management socket this scratch's own.
    pub fn edgeward(&self) -> Command {
        let mut c = Command::new(EDGEWARD);
        c.arg("--state-dir").arg(self.state());
        c.env_remove("EDGEWARD_LOG")
            .env_remove("EDGEWARD_STATE_DIR")
            .env_remove("EDGEWARD_CONFIG")
            .env("EDGEWARD_SOCKET", self.socket());
        c
    }

    /// `edgeward daemon --config CONFIG` for a daemon expected to refuse to
    /// start, with the output collected.
    pub fn daemon_refused(&self, config: &Path) -> Output {
        self.edgeward()
            .arg("daemon")
            .arg("--config")
            .arg(config)
            .output()
            .expect("spawn edgeward daemon")
    }

    /// Puts `files`' compiled code into this scratch's cache: each is
    /// compiled once per test run, by `edgeward compile` into a state dir
    /// every test binary shares (under a lock), and its entry and the
    /// cache's key are copied here. The Python and JavaScript components
    /// take seconds each to compile.
    pub fn precompiled(&self, files: &[&str]) {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let shared = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compiled");
        std::fs::create_dir_all(&shared).expect("create the shared cache dir");
        let lock = std::fs::File::create(shared.join(".lock")).expect("the shared cache's lock");
        lock.lock().expect("lock the shared cache");
        let state = shared.join("state");
        let o = Command::new(EDGEWARD)
            .arg("--state-dir")
            .arg(&state)
            .arg("compile")
            .args(files)
            .env_remove("EDGEWARD_LOG")
            .env_remove("EDGEWARD_CONFIG")
            .output()
            .expect("spawn edgeward compile");
        assert_status(&o, 0);
        let mine = self.state();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(mine.join("cache"))
            .expect("create the scratch cache");
        std::fs::copy(state.join("cache.key"), mine.join("cache.key")).expect("copy cache.key");
        std::fs::set_permissions(
            mine.join("cache.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod cache.key");
        for f in files {
            let digest = sha256sum(f);
            let hex = digest.trim_start_matches("sha256:");
            let mut found = false;
            for e in std::fs::read_dir(state.join("cache")).expect("the shared cache") {
                let e = e.expect("entry");
                if e.file_name().to_string_lossy().starts_with(hex) {
                    std::fs::copy(e.path(), mine.join("cache").join(e.file_name()))
                        .expect("copy a cache entry");
                    found = true;
                }
            }
            assert!(
                found,
                "edgeward compile left no cache entry for {f}:\n{}{}",
                stdout(&o),
                stderr(&o)
            );
        }
    }

    /// `edgeward run FILE ARGS...`, with the output collected.
    pub fn run(&self, file: &str, flags: &[&str], guest_args: &[&str]) -> Output {
        let mut c = self.edgeward();
        c.arg("run").args(flags).arg(file);
        if !guest_args.is_empty() {
            c.arg("--").args(guest_args);
        }
        c.output().expect("spawn edgeward")
    }
}

impl Scratch {
    /// Writes `name` in the scratch directory: a command component with no
    /// imports around one core module whose fields (text format) are
    /// `fields` and which exports `run: () -> i32` (0 is success). Returns
    /// its path.
    pub fn command_component(&self, name: &str, fields: &str) -> String {
        let text = format!(
            r#"(component
  (core module $m
    {fields})
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $cli (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $cli)))"#
        );
        self.component(name, &text)
    }

    /// Writes `name` in the scratch directory from a component in the text
    /// format. Returns its path.
    pub fn component(&self, name: &str, text: &str) -> String {
        let path = self.path().join(name);
        std::fs::write(&path, wat::parse_str(text).expect("component text"))
            .expect("write component");
        path.to_string_lossy().into_owned()
    }
}

/// A command component that holds on to pollables (`wasi:clocks`
/// `subscribe-duration`, no host file descriptor behind them) in a loop:
/// only the resource-table bound can stop it. Returns 1 (failure) if a
/// million were never refused.
pub const POLLABLE_LOOP: &str = r#"(component
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type (sub resource)))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
    (alias outer 1 $pollable (type $p))
    (export "pollable" (type $pe (eq $p)))
    (export "subscribe-duration" (func (param "when" u64) (result (own $pe))))))
  (core func $sub (canon lower (func $clock "subscribe-duration")))
  (core module $m
    (import "host" "sub" (func $sub (param i64) (result i32)))
    (func (export "run") (result i32)
      (local $i i32)
      (loop $l
        (drop (call $sub (i64.const 1000000000)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000))))
      (i32.const 1)))
  (core instance $host (export "sub" (func $sub)))
  (core instance $i (instantiate $m (with "host" (instance $host))))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $cli (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $cli)))"#;

/// The fields of a core module that defines `memories` linear memories of
/// one page each and whose `run` grows every one of them, 16 pages at a
/// time, until refused, and returns an error if they ended up holding more
/// than `limit_pages` pages together.
pub fn memory_bomb(memories: usize, limit_pages: u32) -> String {
    let mems: String = (0..memories)
        .map(|i| format!("(memory $m{i} 1)\n"))
        .collect();
    let grows: String = (0..memories)
        .map(|i| {
            format!(
                "(block $d{i} (loop $l{i} (br_if $d{i} (i32.eq (memory.grow $m{i} (i32.const 16)) (i32.const -1))) (br $l{i})))\n"
            )
        })
        .collect();
    let sum = (1..memories).fold("(memory.size $m0)".to_owned(), |acc, i| {
        format!("(i32.add {acc} (memory.size $m{i}))")
    });
    format!(
        "{mems}(func (export \"run\") (result i32)\n{grows}(i32.gt_u {sum} (i32.const {limit_pages})))"
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit status, printing both streams when it is wrong.
#[track_caller]
pub fn assert_status(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "unexpected status\n--- stdout\n{}\n--- stderr\n{}",
        stdout(o),
        stderr(o)
    );
}

/// `sha256:` digest of a file, computed by coreutils, independently of edgeward.
pub fn sha256sum(path: &str) -> String {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).expect("utf8");
    format!("sha256:{}", out.split_whitespace().next().expect("hash"))
}
