//! Command-line interface. `main` parses flags and calls the library.
//!
//! Exit status of `edgeward run`: 0 when the module succeeds, the module's
//! status (1 when it gives none) when it fails, 2 for usage errors, 3 when
//! edgeward refuses or cannot load the module, 124 when `--timeout` passes,
//! 134 when the module traps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod attest;
mod check;
mod fleet;
mod module;
mod support;

use crate::config::{self, Config};
use crate::identity::ServerNamePolicy;
use crate::measure::{Digest, Measured};
use crate::runtime::sandbox::DEFAULT_MAX_MEMORY;
use crate::runtime::{
    DirGrant, EngineOptions, Exit, Limits, Outbound, Output, Runtime, RuntimeOptions, SandboxSpec,
};
use crate::{daemon, spec, state, units};

/// Exit status when edgeward refuses or cannot load a module.
pub const EXIT_REFUSED: u8 = 3;
/// Exit status when the module's deadline passed.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the module trapped.
pub const EXIT_TRAP: u8 = 134;

/// edgeward: run edge modules as measured, sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "edgeward", version, about, long_about = None)]
pub struct Cli {
    /// State directory (cache, secrets, module data). Default:
    /// $EDGEWARD_STATE_DIR, then the config's state_dir, then
    /// /var/lib/edgeward (root) or ~/.local/state/edgeward.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run one command component (exports wasi:cli/run), measured and sandboxed.
    Run(RunArgs),
    /// Run the modules of a deployment until SIGINT/SIGTERM.
    Daemon(DaemonArgs),
    /// Inspect the HSM backend.
    Hsm {
        #[command(subcommand)]
        command: HsmCommand,
    },
    /// Each module's state, origin and digest: `edgeward module list` (with
    /// or without a daemon).
    Status {
        /// Config file (for its state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// A module's recorded output (oldest first), or its exit records:
    /// `edgeward module logs` / `exits` (with or without a daemon).
    Logs {
        /// The module's name.
        module: String,
        /// Print the exit records instead of the output.
        #[arg(long)]
        exits: bool,
        /// Config file (for its state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the trust bundle: the device CA root(s) as PEM, or a SPIFFE
    /// bundle (JWKS with the X.509 roots and the JWT-SVID keys).
    Bundle {
        /// pem (default) or jwks.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// Config file (its [hsm] and [identity] tables, state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Operate a fleet through its broker and registry: push, deploy,
    /// rollback, status, attest, watch, acl.
    Fleet(fleet::FleetArgs),
    /// The device's own identity: `edgeward identity csr [--broker] --out FILE`.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Enroll this device with its organisation, once, in the foreground
    /// (zero-touch provisioning, docs/fleet.md): the TPM proves the device
    /// CA key lives in it; the organisation's service answers with the
    /// device CA certificate, written to <state>/identity/enrolled.pem.
    Provision {
        /// The broker's enrollment listener: mqtts://HOST[:PORT] (default:
        /// the config's [provisioning] broker).
        #[arg(long, value_name = "URL")]
        broker: Option<String>,
        /// Roots for the broker's certificate (PEM; default: [provisioning]
        /// ca).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// The organisation's root(s) (PEM) the issued chain must lead
        /// to: whoever answers cannot make the device trust another
        /// (default: [provisioning] org_roots).
        #[arg(long, value_name = "FILE")]
        org_root: Option<PathBuf>,
        /// The device id to ask for (default: [identity] device_id).
        #[arg(long, value_name = "ID")]
        device_id: Option<String>,
        /// A board without a TPM: its symmetric-key enrollment group
        /// (with --enrollment-key).
        #[arg(long, value_name = "GROUP", requires = "enrollment_key")]
        group: Option<String>,
        /// The device's enrollment key (32 bytes, from `fleet enroll
        /// derive-key`), with --group.
        #[arg(long, value_name = "FILE", requires = "group")]
        enrollment_key: Option<PathBuf>,
        /// How long to wait for each answer of the service.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        timeout: String,
        /// Renew the enrolled device CA certificate now, authenticated
        /// by the current one (the daemon renews by itself past two
        /// thirds of its lifetime).
        #[arg(long, conflicts_with_all = ["group", "enrollment_key", "device_id"])]
        renew: bool,
        /// Config file (its [hsm] and [identity] tables, state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Delete a module's registration. Its next start registers it anew with
    /// a new generation id: data it sealed with `encrypt` can no longer be
    /// decrypted. Stop the daemon first.
    Deregister {
        /// The module's name.
        module: String,
        /// Config file (for its state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Manage modules through the running daemon's management socket.
    Module(module::ModuleArgs),
    /// Apply a deployment manifest: the complete set of the operator's
    /// modules (added, updated, removed to match).
    Deploy(module::DeployArgs),
    /// Show the last deployment applied, its status, or what differs from it.
    Deployment(module::DeploymentArgs),
    /// Ask the running daemon about itself.
    System(module::SystemArgs),
    /// Print the daemon's recent events (state changes, exits) as JSON
    /// lines; with -f, keep printing them as they happen.
    Events(module::EventsArgs),
    /// Collect what to send when asking for help into a new directory:
    /// versions, the config (module environments and settings redacted),
    /// check, statuses, events, metrics, recent module output, the
    /// measurement log and the units' journal. Never a key.
    SupportBundle(support::SupportArgs),
    /// Check that this device is ready: config, state dir, socket,
    /// registry, stored components, compiled cache, HSM, CA certificate, JWT keys, cloud broker, clock, disk. Exits
    /// non-zero only on a failure.
    Check {
        /// Config file. Default: $EDGEWARD_CONFIG, then
        /// /etc/edgeward/config.toml if it exists, else none.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The management socket (see `edgeward module --help`).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a new publisher key pair: PREFIX.key (0600) and PREFIX.pub
    /// (wasmsign2's raw encoding).
    Keygen {
        /// Where to write them.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Sign a component: a detached signature (default FILE.sig), or with
    /// --embed a signed copy (named by --out). The format is the
    /// WebAssembly tool conventions' (wasmsign2). A deployment manifest
    /// (any file that is not WebAssembly) gets MANIFEST.sig: Ed25519 over
    /// the SHA-256 of its bytes.
    Sign {
        /// The secret key (raw, PEM, DER or OpenSSH Ed25519).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The component.
        file: PathBuf,
        /// Where to write the signature (or the signed copy).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Embed the signature in a copy of the component.
        #[arg(long)]
        embed: bool,
    },
    /// Verify a component's signature against publisher keys: FILE.sig
    /// beside it, else --signature, else its embedded signature.
    Verify {
        /// A trusted publisher key (repeatable).
        #[arg(long = "publisher", value_name = "PUB", required = true)]
        publishers: Vec<PathBuf>,
        /// The component.
        file: PathBuf,
        /// A detached signature (when there is no FILE.sig).
        #[arg(long, value_name = "SIG")]
        signature: Option<PathBuf>,
    },
    /// Attestation: write evidence for a remote verifier (`attest --nonce
    /// HEX --out DIR`), make a credential challenge (`attest challenge`),
    /// check evidence (`attest verify`).
    Attest(attest::AttestArgs),
    /// Compile components into the daemon's authenticated cache ahead of a
    /// start (for the engine the config's daemon builds), so its first
    /// start loads code instead of compiling. Stop a daemon on a TPM first
    /// (it holds the TPM).
    Compile {
        /// Component files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Config file (its [runtime], [hsm], modules and state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the sha256 digest of component files, as pinned in a config.
    Digest {
        /// Component files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// `edgeward bundle --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BundleFormat {
    /// PEM certificates.
    Pem,
    /// A SPIFFE bundle (JWKS).
    Jwks,
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// Print the backend, its keys (ids, algorithms, public keys) and the
    /// measurement register.
    Info {
        /// Config file (its [hsm] table). Default: $EDGEWARD_CONFIG, then
        /// /etc/edgeward/config.toml if it exists, else the soft backend.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The component file.
    file: PathBuf,
    /// Refuse to run unless the file's digest is exactly this (sha256:HEX).
    #[arg(long, value_name = "sha256:HEX")]
    digest: Option<Digest>,
    /// Grant a host directory, seen as GUEST (default: the same path).
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    dirs: Vec<DirGrant>,
    /// Set an environment variable (K=V), or pass K through from this process.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A setting the module reads through wasi:config/store (repeatable).
    #[arg(long = "setting", value_name = "K=V")]
    settings: Vec<String>,
    /// Linear-memory limit: the total over all the module's memories.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = units::parse_size)]
    max_memory: u64,
    /// Core instances the module may create.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_instances)]
    max_instances: u32,
    /// Linear memories the module may define.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_memories)]
    max_memories: u32,
    /// Handles (open files, sockets, streams, pollables) the module may hold.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_handles)]
    max_handles: u32,
    /// Tables the module may create.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_tables)]
    max_tables: u32,
    /// Elements per table.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_table_elements)]
    max_table_elements: u32,
    /// Bytes the module may hand the host in one call.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = units::parse_size)]
    max_hostcall_data: u64,
    /// Hold every --dir grant to a disk budget of SIZE bytes (apparent
    /// file sizes); writes past it fail with EDQUOT. Default: no budget.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    max_disk: Option<u64>,
    /// Hold every --dir grant to N files, directories and links (default
    /// with --max-disk: 10000).
    #[arg(long, value_name = "N")]
    max_disk_entries: Option<u32>,
    /// Wasm stack limit (deeper recursion traps).
    #[arg(long, value_name = "SIZE", default_value = "512KiB", value_parser = units::parse_size)]
    max_stack: u64,
    /// Allow outbound connections to HOST:PORT (repeatable). Default: no network.
    #[arg(long = "allow-outbound", value_name = "HOST:PORT")]
    allow_outbound: Vec<Outbound>,
    /// Allow server certificates for NAME (repeatable): a DNS name,
    /// `*.suffix` (one label), an IP address or a CIDR block. Default: none.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Stop the module after this long (e.g. 500ms, 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    timeout: Option<Duration>,
    /// Do not read or write the compiled-artifact cache.
    #[arg(long)]
    no_cache: bool,
    /// A trusted publisher key (repeatable): the component's signature is
    /// checked against these (FILE.sig beside it, else --signature, else
    /// its embedded signature); a failure is a warning unless
    /// --require-signature.
    #[arg(long = "publisher", value_name = "PUB")]
    publishers: Vec<PathBuf>,
    /// Refuse (exit 3, before compiling) a component not signed by a
    /// --publisher key.
    #[arg(long, requires = "publishers")]
    require_signature: bool,
    /// A detached signature, when there is no FILE.sig beside the file.
    #[arg(long, value_name = "SIG")]
    signature: Option<PathBuf>,
    /// Measure this executable and the module into the HSM's register and
    /// this boot's measurement log, as the daemon does (off by default: a
    /// one-shot run opens no HSM before the module asks for its identity).
    #[arg(long)]
    measure: bool,
    /// Config file for the [hsm] and [identity] settings (modules in it are
    /// ignored). Default: $EDGEWARD_CONFIG, then /etc/edgeward/config.toml if
    /// it exists, else the soft HSM and default identity settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Arguments for the module.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct DaemonArgs {
    /// The management socket. Default: $EDGEWARD_SOCKET, then the config's
    /// [api] socket, then /run/edgeward/management.sock (root) or
    /// $XDG_RUNTIME_DIR/edgeward/management.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file. Default: $EDGEWARD_CONFIG, then
    /// /etc/edgeward/config.toml if it exists, else none (an empty
    /// deployment).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    if let Some(native) = edgeward_proto::journal::native("edgeward") {
        // Under journald, its native socket: fields it indexes.
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(native)
            .try_init();
        return;
    }
    if edgeward_proto::journal::stderr_is_journal() {
        // Under journald: a priority per line, no second timestamp.
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .event_format(edgeward_proto::journal::Prioritized(format))
            .with_writer(|| edgeward_proto::QuietStderr)
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| edgeward_proto::QuietStderr)
        .try_init();
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("edgeward: error: {msg}");
    ExitCode::from(code)
}

/// The `edgeward` binary.
pub fn main() -> ExitCode {
    // The daemon's compile worker (runtime::worker): not a command for
    // people, so not in the help either.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(crate::runtime::worker::SUBCOMMAND))
    {
        let args: Vec<String> = std::env::args_os()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return ExitCode::from(crate::runtime::worker::serve(&args));
    }
    // Executed by the key daemon through a descriptor, this process's name
    // would be the descriptor's number: give `ps` and the journal its own.
    if std::env::var_os(crate::keyd::LAUNCHER_ENV).is_some() {
        let _ = rustix::thread::set_name(c"edgeward");
    }
    // The key daemon's user, looked up while /etc/passwd can be read (the
    // daemon confines itself before it connects); an error is the
    // connection's to report.
    let _ = edgeward_proto::keyd_user();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging("warn");
            run_command(cli.state_dir, args)
        }
        Command::Daemon(args) => {
            init_logging("info");
            daemon_command(cli.state_dir, args)
        }
        Command::Hsm {
            command: HsmCommand::Info { config, json },
        } => {
            init_logging("warn");
            hsm_info(cli.state_dir, config, json)
        }
        Command::Status { config, json } => {
            init_logging("warn");
            module::status(config, json, cli.state_dir.as_deref())
        }
        Command::Logs {
            module,
            exits,
            config,
        } => {
            init_logging("warn");
            module::logs_alias(config, module, exits, cli.state_dir.as_deref())
        }
        Command::Bundle { format, config } => {
            init_logging("warn");
            bundle_command(cli.state_dir, config, format)
        }
        Command::Fleet(args) => {
            init_logging("warn");
            fleet::command(args)
        }
        Command::Identity {
            command:
                IdentityCommand::Csr {
                    out,
                    config,
                    broker,
                },
        } => {
            init_logging("warn");
            csr_command(cli.state_dir, config, &out, broker)
        }
        Command::Provision {
            broker,
            ca,
            org_root,
            device_id,
            group,
            enrollment_key,
            timeout,
            renew,
            config,
        } => {
            init_logging("warn");
            let symmetric = group.zip(enrollment_key);
            provision_command(
                cli.state_dir,
                config,
                (broker, ca, org_root),
                device_id,
                symmetric,
                (&timeout, renew),
            )
        }
        Command::Module(args) => {
            init_logging("warn");
            module::command(args, cli.state_dir.as_deref())
        }
        Command::Check {
            config,
            socket,
            json,
        } => {
            init_logging("error");
            check::command(cli.state_dir, config, socket, json)
        }
        Command::SupportBundle(args) => {
            init_logging("error");
            support::command(args, cli.state_dir)
        }
        Command::Events(args) => {
            init_logging("warn");
            module::events(args)
        }
        Command::System(args) => {
            init_logging("warn");
            module::system(args)
        }
        Command::Deploy(args) => {
            init_logging("warn");
            module::deploy(args)
        }
        Command::Deployment(args) => {
            init_logging("warn");
            module::deployment(args, cli.state_dir.as_deref())
        }
        Command::Deregister { module, config } => {
            init_logging("warn");
            deregister_command(cli.state_dir, config, &module)
        }
        Command::Keygen { out } => match crate::attest::publisher::keygen(&out) {
            Ok((key, public)) => {
                println!("{}\n{}", key.display(), public.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        Command::Sign {
            key,
            file,
            out,
            embed,
        } => match sign_file(&key, &file, out.as_deref(), embed) {
            Ok(written) => {
                println!("{}", written.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        Command::Verify {
            publishers,
            file,
            signature,
        } => match verify_file(&file, signature.as_deref(), &publishers) {
            Ok(key) => {
                println!("{}: signed by publisher key {key}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        Command::Attest(args) => {
            init_logging("warn");
            attest::command(args, cli.state_dir.as_deref())
        }
        Command::Compile { files, config } => {
            init_logging("warn");
            compile_command(cli.state_dir.as_deref(), config, &files)
        }
        Command::Digest { files } => {
            let mut code = ExitCode::SUCCESS;
            for f in files {
                match Measured::read(&f) {
                    Ok(m) => println!("{}  {}", m.digest, f.display()),
                    Err(e) => code = fail(e, 1),
                }
            }
            code
        }
    }
}

fn parse_env(entries: &[String]) -> Result<Vec<(String, String)>, String> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if spec::valid_env_key(k) => Ok((k.to_owned(), v.to_owned())),
            Some(_) => Err(format!("--env {e:?}: invalid variable name")),
            None if spec::valid_env_key(e) => std::env::var(e)
                .map(|v| (e.clone(), v))
                .map_err(|_| format!("--env {e}: {e} is not set in edgeward's environment")),
            None => Err(format!("--env {e:?}: invalid variable name")),
        })
        .collect()
}

/// `--setting K=V` flags as a module's settings, checked as a spec's are.
fn parse_settings(entries: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for e in entries {
        let Some((k, v)) = e.split_once('=') else {
            return Err(format!("--setting {e:?}: expected KEY=VALUE"));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    spec::check_settings(&out).map_err(|e| format!("--setting: {e}"))?;
    Ok(out)
}

/// On TPM or PKCS#11 the compiled-cache key is wrapped by the HSM: opens
/// the HSM for that alone (closed again on return) and unwraps it. Nothing
/// to do on the soft backend, or without a cache.
fn unlock_cache(
    runtime: &Runtime,
    hsm: &crate::hsm::HsmConfig,
    state_dir: &std::path::Path,
    identity: &crate::identity::IdentityConfig,
) -> Result<(), String> {
    match (runtime.cache(), crate::config::cache_key(hsm)) {
        (Some(cache), crate::runtime::cache::CacheKey::Hsm) => {
            crate::keyd::open(hsm, state_dir, identity)
                .map_err(|e| e.to_string())
                .and_then(|h| cache.unlock(h.as_ref()))
        }
        _ => Ok(()),
    }
}

/// `edgeward compile`: each file measured and compiled into the cache (or
/// found there), with the daemon's engine.
fn compile_command(
    state_flag: Option<&std::path::Path>,
    config: Option<PathBuf>,
    files: &[PathBuf],
) -> ExitCode {
    let cfg = match optional_config(config) {
        Ok(c) => c.unwrap_or_else(Config::empty),
        Err(code) => return code,
    };
    let state_dir = match state::resolve(state_flag, cfg.state_dir.as_deref()) {
        Ok(d) => d,
        Err(e) => return fail(e, 2),
    };
    if let Err(e) = state::ensure_private_dir(&state_dir) {
        return fail(e, 1);
    }
    let runtime = match crate::daemon::runtime(&cfg, &state_dir) {
        Ok(r) => r,
        Err(e) => return fail(format!("{e:#}"), 1),
    };
    if let Err(e) = unlock_cache(&runtime, &cfg.hsm, &state_dir, &cfg.identity) {
        return fail(
            format!(
                "the cache key is wrapped by the HSM and cannot be unwrapped: {e} (a daemon on a TPM holds it: stop it first)"
            ),
            1,
        );
    }
    // As many files at once as the compile queue admits (each worker
    // holds one file's bytes); reported in the order given.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..runtime.compile_concurrency().min(files.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let started = std::time::Instant::now();
                    let r = Measured::read(f)
                        .map_err(anyhow::Error::from)
                        .and_then(|m| runtime.load(&m));
                    let took = started.elapsed();
                    done.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((i, r, took));
                }
            });
        }
    });
    let mut results = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(i, _, _)| *i);
    let mut code = ExitCode::SUCCESS;
    for (f, (_, r, took)) in files.iter().zip(results) {
        match r {
            Ok(m) if m.cache_error.is_some() => {
                code = fail(
                    format!(
                        "{}: compiled, but not cached: {}",
                        f.display(),
                        m.cache_error.as_deref().unwrap_or_default()
                    ),
                    1,
                );
            }
            Ok(m) => println!(
                "{}  {}  {} in {} ms",
                m.digest,
                f.display(),
                match m.source {
                    crate::runtime::CodeSource::Cache(_) => "already cached",
                    crate::runtime::CodeSource::Compiled => "compiled and cached",
                    crate::runtime::CodeSource::Recompiled(_) => {
                        "recompiled (the old entry was refused) and cached"
                    }
                },
                took.as_millis()
            ),
            Err(e) => code = fail(format!("{}: {e:#}", f.display()), 1),
        }
    }
    code
}

/// `edgeward sign`: a component's signature (wasmsign2's format), or a
/// manifest's (Ed25519 over its SHA-256).
fn sign_file(
    key: &std::path::Path,
    file: &std::path::Path,
    out: Option<&std::path::Path>,
    embed: bool,
) -> Result<PathBuf, String> {
    use crate::attest::publisher;
    let mut head = [0u8; 4];
    let n = std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if publisher::is_wasm(&head[..n]) {
        publisher::sign(key, file, out, embed)
    } else if embed {
        Err(format!(
            "{}: not WebAssembly: a manifest's signature is detached (no --embed)",
            file.display()
        ))
    } else {
        publisher::sign_manifest(key, file, out)
    }
}

/// `edgeward verify`: the key that verified `file`.
fn verify_file(
    file: &std::path::Path,
    signature: Option<&std::path::Path>,
    publishers: &[PathBuf],
) -> Result<String, String> {
    use crate::attest::publisher;
    let keys = publisher::load_publishers(publishers).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let detached = publisher::detached_for(file, signature).map_err(|e| e.to_string())?;
    if publisher::is_wasm(&bytes) {
        publisher::verify(&bytes, detached.as_deref(), &keys, file)
    } else {
        publisher::verify_manifest(&bytes, detached.as_deref(), &keys)
    }
    .map_err(|e| format!("{}: {e}", file.display()))
}

/// `edgeward run --measure`: the executable, then the module (its
/// registration name, `ephemeral` generation, digest), before it runs.
fn measure_run(
    cfg: Option<&Config>,
    state_dir: &std::path::Path,
    file: &std::path::Path,
    digest: &Digest,
    publisher: Option<&str>,
) -> Result<(), String> {
    let (name, digest) = (registration_name(file), digest.to_string());
    let module = match publisher {
        Some(p) => crate::attest::signed_module_event(&name, "ephemeral", &digest, p),
        None => crate::attest::module_event(&name, "ephemeral", &digest),
    };
    measure_events(cfg, state_dir, vec![module])
}

/// Measures this executable, then `events`, as `edgeward run --measure`
/// does.
fn measure_events(
    cfg: Option<&Config>,
    state_dir: &std::path::Path,
    events: Vec<serde_json::Value>,
) -> Result<(), String> {
    let hsm_config = cfg.map(|c| c.hsm.clone()).unwrap_or_default();
    let pcr = crate::attest::register_of(&hsm_config)
        .ok_or("the pkcs11 backend has no measurement register")?;
    let identity = cfg.map(|c| c.identity.clone()).unwrap_or_default();
    let hsm = crate::keyd::open(&hsm_config, state_dir, &identity).map_err(|e| e.to_string())?;
    let m = crate::attest::Measurer::new(hsm, state_dir, pcr)?;
    let mut all = vec![crate::attest::executable_event()?];
    all.extend(events);
    m.measure_all(all)
}

fn run_command(state_flag: Option<PathBuf>, args: RunArgs) -> ExitCode {
    let env = match parse_env(&args.env) {
        Ok(e) => e,
        Err(e) => return fail(e, 2),
    };
    let settings = match parse_settings(&args.settings) {
        Ok(s) => s,
        Err(e) => return fail(e, 2),
    };
    let limits = Limits {
        max_memory: args.max_memory,
        max_instances: args.max_instances,
        max_memories: args.max_memories,
        max_handles: args.max_handles,
        max_tables: args.max_tables,
        max_table_elements: args.max_table_elements,
        max_hostcall_data: args.max_hostcall_data,
        max_disk: args.max_disk.unwrap_or(Limits::default().max_disk),
        max_disk_entries: args
            .max_disk_entries
            .unwrap_or(Limits::default().max_disk_entries),
    };
    // `edgeward run` grants what the operator names; a budget only when asked.
    let budgeted = args.max_disk.is_some() || args.max_disk_entries.is_some();
    if let Err((field, msg)) = spec::check_limits(&limits) {
        return fail(format!("--{}: {msg}", field.replace('_', "-")), 2);
    }
    if !(64 << 10..=64 << 20).contains(&args.max_stack) {
        return fail("--max-stack must be between 64KiB and 64MiB", 2);
    }
    if args.timeout == Some(Duration::ZERO) {
        return fail("--timeout must be greater than zero", 2);
    }
    let server_names = match ServerNamePolicy::parse(&args.server_names) {
        Ok(p) => p,
        Err(e) => return fail(format!("--server-name: {e}"), 2),
    };
    let cfg = match optional_config(args.config.clone()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let state_dir = match state::resolve(
        state_flag.as_deref(),
        cfg.as_ref().and_then(|c| c.state_dir.as_deref()),
    )
    .and_then(|d| state::ensure_private_dir(&d).map(|()| d))
    {
        Ok(d) => d,
        Err(e) => return fail(e, EXIT_REFUSED),
    };

    // A TPM or PKCS#11 backend is held by a key daemon of its own, started
    // before this process confines itself. One that cannot start does not
    // stop a module that never asks for its identity: the error is the
    // answer to the first that does (and is logged then).
    if let Some(c) = &cfg
        && let Err(e) = crate::keyd::start_private(
            &c.hsm,
            &state_dir,
            &c.identity,
            crate::keyd::PrivateFor::Runtime,
        )
    {
        tracing::debug!(error = %e, "no private key daemon");
    }
    // Before any module is read (see crate::confine).
    confine("run");
    // Its threads start confined.
    crate::keyd::watch_private();
    // Timers (the deadline) are checked after every poll of the module,
    // not every 61 polls of up to an epoch slice each.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(1)
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}"), 1),
    };
    let hsm_config = cfg.as_ref().map(|c| c.hsm.clone()).unwrap_or_default();
    let identity = cfg.as_ref().map(|c| c.identity.clone()).unwrap_or_default();
    rt.block_on(async move {
        let runtime = match Runtime::new(&RuntimeOptions {
            engine: EngineOptions {
                // One module: no pool. Reserving one costs ~1.8 ms of a
                // 10 ms run and buys nothing for a single instance; the
                // module's limits are held by its store's limiter, which
                // refuses (exit 3) what does not fit, naming the limit.
                max_instances: 1,
                ceilings: crate::runtime::engine::ModuleCeilings {
                    core_instances: limits.max_instances,
                    memories: limits.max_memories,
                    tables: limits.max_tables,
                },
                max_memory: args.max_memory.max(DEFAULT_MAX_MEMORY),
                pooling: Some(false),
                max_wasm_stack: usize::try_from(args.max_stack).unwrap_or(usize::MAX),
            },
            state_dir: (!args.no_cache).then(|| state_dir.clone()),
            cache_key: crate::config::cache_key(&hsm_config),
        }) {
            Ok(r) => r,
            Err(e) => return fail(format!("{e:#}"), EXIT_REFUSED),
        };
        // The HSM is closed again before the identity opens it.
        if let Err(e) = unlock_cache(&runtime, &hsm_config, &state_dir, &identity) {
            eprintln!("edgeward: warning: the compiled-artifact cache is off for this run: {e}");
        }
        // Measured once; the signature checked on those bytes before
        // anything is compiled.
        let mut publisher = None;
        let measured = match Measured::read(&args.file)
            .and_then(|m| m.verify(args.digest.as_ref()).map(|()| m))
        {
            Ok(m) => m,
            Err(e) => return fail(format!("{e:#}"), EXIT_REFUSED),
        };
        if !args.publishers.is_empty() {
            let checked =
                crate::attest::publisher::load_publishers(&args.publishers).and_then(|keys| {
                    let detached = crate::attest::publisher::detached_for(
                        &args.file,
                        args.signature.as_deref(),
                    )?;
                    crate::attest::publisher::verify(
                        &measured.bytes,
                        detached.as_deref(),
                        &keys,
                        &args.file,
                    )
                });
            match checked {
                Ok(key) => publisher = Some(key),
                Err(e) if args.require_signature => {
                    let why = format!("{} refused: {e}", args.file.display());
                    if args.measure {
                        let refusal = serde_json::json!({
                            "kind": "signature-refused",
                            "file": args.file.display().to_string(),
                            "digest": measured.digest.to_string(),
                            "reason": e.to_string(),
                        });
                        if let Err(m) = measure_events(cfg.as_ref(), &state_dir, vec![refusal]) {
                            return fail(format!("{why}; --measure: {m}"), EXIT_REFUSED);
                        }
                    }
                    return fail(why, EXIT_REFUSED);
                }
                Err(e) => eprintln!("edgeward: warning: {}: {e}", args.file.display()),
            }
        }
        let module = match runtime.load(&measured) {
            Ok(m) => m,
            Err(e) => return fail(format!("{e:#}"), EXIT_REFUSED),
        };
        // Compiled or loaded: the component's bytes are not needed while it
        // runs, and would sit under the run's peak memory (its whole size).
        drop(measured);
        if args.measure
            && let Err(e) = measure_run(
                cfg.as_ref(),
                &state_dir,
                &args.file,
                &module.digest,
                publisher.as_deref(),
            )
        {
            return fail(format!("--measure: {e}"), EXIT_REFUSED);
        }
        let program = args
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "module".to_owned());
        // The identity (HSM, device CA) is set up at the module's first
        // workload call: a module that never asks does not pay for it.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let _stop_maintenance = stop_tx;
        let (name, digest, dir) = (
            registration_name(&args.file),
            module.digest.to_string(),
            state_dir.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        let identity = crate::identity::IdentityHandle::deferred(move || {
            let svc = open_identity(cfg.as_ref(), &dir)?;
            handle.spawn(svc.clone().maintain(false, stop_rx));
            svc.ephemeral(&name, &digest, &server_names)
        });
        let mut spec = SandboxSpec::new(program);
        spec.identity = Some(identity);
        spec.args.extend(args.args);
        spec.env = env;
        spec.settings = settings;
        spec.dirs = args
            .dirs
            .into_iter()
            .map(|d| DirGrant { budgeted, ..d })
            .collect();
        spec.limits = limits;
        spec.allow_outbound = args.allow_outbound;
        spec.output = Output::Inherit;
        match runtime.start(&module, &spec, args.timeout).await {
            Exit::Success => ExitCode::SUCCESS,
            Exit::Failure(code) => {
                ExitCode::from(u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1))
            }
            e @ Exit::TimedOut(_) => fail(e, EXIT_TIMEOUT),
            // The trap message escapes the guest-chosen names it carries.
            e @ Exit::Trap(_) => fail(format!("module {e}"), EXIT_TRAP),
            e @ Exit::SetupFailed(_) => fail(e, EXIT_REFUSED),
        }
    })
}

/// The ephemeral registration name for a file run by `edgeward run`: its
/// stem, with characters a module name cannot hold replaced by `-`.
fn registration_name(file: &std::path::Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .take(63)
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'm');
        name.truncate(63);
    }
    name
}

/// Opens the HSM and the identity service as the config (or the defaults)
/// say.
fn open_identity(
    cfg: Option<&Config>,
    state_dir: &std::path::Path,
) -> Result<std::sync::Arc<crate::identity::IdentityService>, crate::identity::IdentityError> {
    let hsm_config = cfg.map(|c| c.hsm.clone()).unwrap_or_default();
    let identity_config = cfg.map(|c| c.identity.clone()).unwrap_or_default();
    let hsm = crate::keyd::open(&hsm_config, state_dir, &identity_config)?;
    crate::identity::IdentityService::open(hsm, identity_config, state_dir)
}

fn bundle_command(
    state_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
    format: BundleFormat,
) -> ExitCode {
    let (cfg, state_dir) = match inspect_context(state_flag.as_deref(), config_flag) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let identity = match open_identity(cfg.as_ref(), &state_dir) {
        Ok(i) => i,
        Err(e) => return fail(e, 1),
    };
    match format {
        BundleFormat::Pem => print!("{}", identity.bundle_pem()),
        BundleFormat::Jwks => match identity.bundle_jwks() {
            Ok(doc) => println!("{doc:#}"),
            Err(e) => return fail(e, 1),
        },
    }
    ExitCode::SUCCESS
}

/// `edgeward identity ...`.
#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Write a certificate signing request, signed in the HSM, for the
    /// organisation to certify. By default for the device CA key (CN = the
    /// device id, its SPIFFE ID as URI SAN), which certifies the device's
    /// modules: the organisation's workload CA certifies it, name
    /// constrained; put the certificate, then its issuers up to the root,
    /// in `[identity] ca_certificate`. With --broker, for the key the
    /// device logs in to its broker with: the organisation's device CA
    /// certifies it as a client; the certificate goes in `[cloud]
    /// certificate`.
    Csr {
        /// Where to write the CSR (PEM).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A CSR for the broker login key (`cloud-client`), not the device
        /// CA.
        #[arg(long)]
        broker: bool,
        /// Config file (its [hsm] and [identity] tables, state_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn csr_command(
    state_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
    out: &std::path::Path,
    broker: bool,
) -> ExitCode {
    let (cfg, state_dir) = match inspect_context(state_flag.as_deref(), config_flag) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let hsm_config = cfg.as_ref().map(|c| c.hsm.clone()).unwrap_or_default();
    let id = cfg.as_ref().map(|c| c.identity.clone()).unwrap_or_default();
    // The HSM alone: the device CA's certificate may not exist yet.
    let hsm = match crate::keyd::open(&hsm_config, &state_dir, &id) {
        Ok(h) => h,
        Err(e) => return fail(e, 1),
    };
    let spiffe = format!("spiffe://{}/device/{}", id.trust_domain, id.device_id);
    let pem = if broker {
        crate::cloud::tls::broker_csr(&hsm, &id.device_id, &spiffe)
    } else {
        crate::identity::authority::device_ca_csr(&hsm, &id.device_id, &spiffe)
            .map_err(|e| e.to_string())
    };
    let pem = match pem {
        Ok(p) => p,
        Err(e) => return fail(e, 1),
    };
    if let Err(e) = std::fs::write(out, pem) {
        return fail(format!("{}: {e}", out.display()), 1);
    }
    eprintln!(
        "wrote {}: a CSR for the {} key of {} ({spiffe})",
        out.display(),
        if broker { "broker login" } else { "device CA" },
        id.device_id
    );
    ExitCode::SUCCESS
}

fn provision_command(
    state_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
    (broker, ca, org_root): (Option<String>, Option<PathBuf>, Option<PathBuf>),
    device_id: Option<String>,
    symmetric: Option<(String, PathBuf)>,
    (timeout, renew): (&str, bool),
) -> ExitCode {
    let (cfg, state_dir) = match inspect_context(state_flag.as_deref(), config_flag) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let run = || -> Result<crate::enroll::device::Enrolled, String> {
        let timeout =
            crate::units::parse_duration(timeout).map_err(|e| format!("--timeout: {e}"))?;
        let configured = cfg.as_ref().and_then(|c| c.provisioning.as_ref());
        let missing = |flag: &str| {
            format!("{flag}: give it, or a config (--config) with a [provisioning] table")
        };
        let (host, port) = match (&broker, configured) {
            (Some(b), _) => crate::cloud::parse_broker(b).map_err(|e| format!("--broker: {e}"))?,
            (None, Some(p)) => (p.host.clone(), p.port),
            (None, None) => return Err(missing("--broker")),
        };
        let roots = match (&ca, configured) {
            (Some(ca), _) => std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?,
            (None, Some(p)) => p.ca_pem.clone(),
            (None, None) => return Err(missing("--ca")),
        };
        let tls = crate::enroll::transport::tls(&roots, None)?;
        let org_roots = match (&org_root, configured) {
            (Some(r), _) => crate::attest::verify::pem_certificates(
                &std::fs::read(r).map_err(|e| format!("{}: {e}", r.display()))?,
                &r.display().to_string(),
            )?,
            (None, Some(p)) => p.org_roots.clone(),
            (None, None) => return Err(missing("--org-root")),
        };
        let hsm_config = cfg.as_ref().map(|c| c.hsm.clone()).unwrap_or_default();
        let id = cfg.as_ref().map(|c| c.identity.clone()).unwrap_or_default();
        let device_id = device_id.unwrap_or_else(|| id.device_id.clone());
        if !crate::identity::valid_path_segment(&device_id) {
            return Err(format!("device id {device_id:?} is not a valid id"));
        }
        let symmetric = symmetric.or_else(|| configured.and_then(|p| p.symmetric.clone()));
        let hsm = crate::keyd::open(&hsm_config, &state_dir, &id).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let progress = |step: &str| eprintln!("provision: {step}");
        let enrollee = crate::enroll::transport::Enrollee {
            device_id: &device_id,
            trust_domain: &id.trust_domain,
            org_roots: &org_roots,
        };
        let issued = if renew {
            let path = crate::enroll::device::chain_path(&state_dir);
            let chain = std::fs::read_to_string(&path).map_err(|e| {
                format!("{}: {e}: renewing needs an enrolled device", path.display())
            })?;
            progress("renewing with the current device CA certificate");
            rt.block_on(crate::enroll::transport::renew(
                hsm,
                &chain,
                enrollee,
                (&host, port, tls),
                timeout,
            ))?
        } else {
            let credentials = crate::enroll::device::credentials(symmetric.as_ref())?;
            rt.block_on(crate::enroll::transport::provision(
                hsm,
                credentials,
                enrollee,
                (&host, port, tls),
                timeout,
                &progress,
            ))?
        };
        let enrolled = crate::enroll::device::Enrolled::store(&state_dir, &issued)?;
        // The transition of trust is part of the device's history: a
        // verifier replaying the log sees which organisation certificate
        // the device CA key took, and when.
        let mut event = crate::enroll::device::event(&issued)?;
        if renew {
            event["kind"] = "renewed".into();
        }
        measure_events(cfg.as_ref(), &state_dir, vec![event]).map_err(|e| {
            format!(
                "enrolled, and the answer is in {}, but the enrollment could not be measured: {e}",
                state_dir.join(crate::enroll::device::DIR).display()
            )
        })?;
        Ok(enrolled)
    };
    match run() {
        Ok(e) => {
            let chain = crate::enroll::device::chain_path(&state_dir);
            println!(
                "{} as {} (groups: {}); device CA chain in {}",
                if renew { "renewed" } else { "enrolled" },
                e.device_id,
                if e.groups.is_empty() {
                    "none".into()
                } else {
                    e.groups.join(", ")
                },
                chain.display()
            );
            match &e.broker {
                Some(b) => println!(
                    "assigned broker {b} with {} deployment key(s); the daemon with [provisioning] connects to it",
                    e.deployment_keys
                ),
                None => println!(
                    "no fleet broker assigned; without [provisioning], set [identity] ca_certificate to the chain"
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("provision: {e}"), 1),
    }
}

fn deregister_command(
    state_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
    module: &str,
) -> ExitCode {
    let (cfg, state_dir) = match inspect_context(state_flag.as_deref(), config_flag) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if !spec::valid_module_name(module) {
        return fail(format!("{module:?} is not a valid module name"), 2);
    }
    let registry = match crate::registry::Registry::open(&state_dir) {
        Ok(r) => r,
        Err(e) => return fail(e, 1),
    };
    // A registration with a key of its own (PKCS#11) has it destroyed now.
    let own_key = registry
        .registration(module)
        .ok()
        .flatten()
        .and_then(|r| r.wrapping_key);
    let hsm = match own_key {
        None => None,
        Some(key) => {
            let cfg = cfg.unwrap_or_else(Config::empty);
            match crate::keyd::open(&cfg.hsm, &state_dir, &cfg.identity) {
                Ok(h) => Some(h),
                Err(e) => {
                    eprintln!(
                        "edgeward: warning: cannot open the HSM ({e}): key {key} is destroyed at the next daemon start"
                    );
                    None
                }
            }
        }
    };
    match crate::identity::registry::deregister(hsm.as_deref(), &registry, module) {
        Ok(true) => {
            println!("{module}: registration deleted; its next start gets a new generation");
            ExitCode::SUCCESS
        }
        Ok(false) => fail(format!("{module}: not registered"), 1),
        Err(e) => fail(e, 1),
    }
}

/// `--config`, then `$EDGEWARD_CONFIG`, then the default path.
fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(config::CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG))
}

/// The config named by `--config` or `$EDGEWARD_CONFIG` (which must load),
/// else the default file if it exists, else none.
fn optional_config(flag: Option<PathBuf>) -> Result<Option<Config>, ExitCode> {
    let explicit = flag.is_some() || std::env::var_os(config::CONFIG_ENV).is_some();
    let path = config_path(flag);
    if explicit || path.exists() {
        Config::load(&path).map(Some).map_err(|e| fail(e, 2))
    } else {
        Ok(None)
    }
}

/// The config (if any) and state directory for the inspection commands;
/// the directory is created if missing.
fn inspect_context(
    state_flag: Option<&std::path::Path>,
    config_flag: Option<PathBuf>,
) -> Result<(Option<Config>, PathBuf), ExitCode> {
    let cfg = optional_config(config_flag)?;
    let dir = state::resolve(
        state_flag,
        cfg.as_ref().and_then(|c| c.state_dir.as_deref()),
    )
    .and_then(|d| state::ensure_private_dir(&d).map(|()| d))
    .map_err(|e| fail(e, 2))?;
    Ok((cfg, dir))
}

fn hsm_info(state_flag: Option<PathBuf>, config_flag: Option<PathBuf>, json: bool) -> ExitCode {
    let (cfg, state_dir) = match inspect_context(state_flag.as_deref(), config_flag) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let hsm_config = cfg.as_ref().map(|c| c.hsm.clone()).unwrap_or_default();
    let identity = cfg.as_ref().map(|c| c.identity.clone()).unwrap_or_default();
    let hsm = match crate::keyd::open(&hsm_config, &state_dir, &identity) {
        Ok(h) => h,
        Err(e) => return fail(e, 1),
    };
    let keys = match hsm.keys() {
        Ok(k) => k,
        Err(e) => return fail(e, 1),
    };
    let register = match hsm.read_register() {
        Ok(r) => Some(crate::measure::hex(&r)),
        Err(e) if e.kind == crate::hsm::ErrorKind::NotSupported => None,
        Err(e) => return fail(e, 1),
    };
    if json {
        let keys: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "id": k.id,
                    "algorithm": k.kind.to_string(),
                    "public_key": k.public_key.as_deref().map(crate::measure::hex),
                    "public_key_pem": k.public_key.as_deref().and_then(crate::hsm::public_key_pem),
                })
            })
            .collect();
        let doc =
            serde_json::json!({ "backend": hsm.backend(), "register": register, "keys": keys });
        println!("{doc:#}");
    } else {
        println!("backend:  {}", hsm.backend());
        println!(
            "register: {}",
            register
                .as_deref()
                .unwrap_or("(not supported by this backend)")
        );
        println!("keys:{}", if keys.is_empty() { " (none)" } else { "" });
        for k in &keys {
            let public = k
                .public_key
                .as_deref()
                .map(crate::measure::hex)
                .unwrap_or_else(|| "-".into());
            println!("  {:<24} {:<12} {public}", k.id, k.kind.to_string());
        }
    }
    ExitCode::SUCCESS
}

/// Confines this process (`no_new_privs`, the seccomp filter) or says
/// loudly why it could not: a kernel without seccomp filters runs the
/// runtime unconfined, never silently.
fn confine(command: &str) {
    match crate::confine::apply() {
        Ok(()) => tracing::debug!(command, "confined: no_new_privs, seccomp filter"),
        Err(e) => tracing::warn!(
            command,
            error = %e,
            "running WITHOUT the seccomp filter: code that escapes a module could make the \
             system calls it denies"
        ),
    }
    crate::confine::run_probe();
}

/// Holds the daemon to its file system policy ([`daemon::fs_policy`]) or
/// says loudly why not.
fn landlock_daemon(cfg: &Config, state_dir: &std::path::Path, socket: &std::path::Path) {
    let without = "running WITHOUT Landlock: code that escapes a module can reach any file \
                   this user can";
    match crate::confine::landlock(&daemon::fs_policy(cfg, state_dir, socket)) {
        Ok(crate::confine::Landlocked::Fully) => {
            tracing::debug!("landlocked: the state dir, the configured files, system code");
        }
        Ok(crate::confine::Landlocked::Partially) => tracing::warn!(
            "Landlock holds only partly: this kernel lacks some of its rights (device \
             ioctls, truncation, renames across directories, or signal scoping)"
        ),
        Ok(crate::confine::Landlocked::Not) => {
            tracing::warn!(
                reason = "this kernel has no Landlock, or it is disabled",
                "{without}"
            );
        }
        Err(e) => tracing::warn!(reason = %e, "{without}"),
    }
}

fn daemon_command(state_flag: Option<PathBuf>, args: DaemonArgs) -> ExitCode {
    // No config file at all is an empty deployment.
    let cfg = match optional_config(args.config) {
        Ok(c) => c.unwrap_or_else(Config::empty),
        Err(code) => return code,
    };
    let state_dir = match state::resolve(state_flag.as_deref(), cfg.state_dir.as_deref()) {
        Ok(d) => d,
        Err(e) => return fail(e, 2),
    };
    let socket = match crate::api::socket_path(args.socket.as_deref(), cfg.api.socket.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(e, 2),
    };
    // Before any module is read and any thread exists (see crate::confine):
    // Landlock binds the threads there are, and what they start.
    if let Err(e) = state::ensure_private_dir(&state_dir) {
        return fail(format!("{}: {e}", state_dir.display()), 1);
    }
    if let Err(e) = crate::api::prepare_dir(&socket, cfg.api.group) {
        return fail(e, 1);
    }
    // The service manager's socket, reached before Landlock scopes this
    // process (an abstract name would be refused after), and before it
    // starts anything that could inherit it.
    let notifier = edgeward_proto::notify::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "NOTIFY_SOCKET cannot be reached: no readiness or watchdog");
        None
    });
    // A TPM or PKCS#11 backend is held by a key daemon of its own, started
    // before Landlock and seccomp hold this process.
    if let Err(e) = crate::keyd::start_private(
        &cfg.hsm,
        &state_dir,
        &cfg.identity,
        crate::keyd::PrivateFor::Runtime,
    ) {
        return fail(e, 1);
    }
    landlock_daemon(&cfg, &state_dir, &socket);
    confine("daemon");
    // Its threads start confined.
    crate::keyd::watch_private();
    // Modules are tasks whose polls last up to an epoch slice (10 ms). With
    // tokio's default of checking timers and I/O every 61 polls, a busy
    // worker would let a neighbour's timer wait over half a second; check
    // after every poll instead (one non-blocking epoll per slice).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(1)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}"), 1),
    };
    let result = rt.block_on(daemon::run(cfg, state_dir, socket, notifier));
    // A compile abandoned by a signal at start-up must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}"), 1),
    }
}
