//! Real HSM components for tests and benchmarks: a TPM 2.0 simulator
//! (swtpm) per test, and a SoftHSM2 token per test. When the component is
//! not installed these panic with what to install: tests that need them fail,
//! they never skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use edgeward_hsm_hw::pkcs11::Pkcs11Config;
use edgeward_hsm_hw::tpm::TpmConfig;

/// Where Debian's SoftHSM2 installs its PKCS#11 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of test tokens.
pub const USER_PIN: &str = "1234-user";
const SO_PIN: &str = "5678-so";

/// A private swtpm instance listening on loopback.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("addr")
        .port()
}

/// A free loopback port `p` whose neighbour `p + 1` is free too (swtpm's
/// data and control ports). Pairs handed out in this process never overlap (the tests of one binary
/// run in parallel threads); other processes are caught by `wait_ready`.
pub fn free_port_pair() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = a.local_addr().expect("addr").port();
        if port == u16::MAX || TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
            continue;
        }
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed.iter().any(|&p| p.abs_diff(port) <= 1) {
            continue;
        }
        handed.push(port);
        return port;
    }
}

fn spawn_swtpm(dir: &Path, port: u16) -> Child {
    Command::new("swtpm")
        .args(["socket", "--tpm2"])
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .args(["--flags", "not-need-init,startup-clear"])
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start swtpm ({e}): install Debian's swtpm (scripts/setup)")
        })
}

/// Whether process `pid` holds a socket listening on loopback `port`: the
/// inode of the listening socket in `/proc/net/tcp` is one of the process's
/// descriptors.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state (0A = LISTEN), ..., inode at 9.
            (cols.len() > 9 && cols[1] == local && cols[3] == "0A")
                .then(|| format!("socket:[{}]", cols[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// Waits (up to 10 s) until `child` listens on every one of `ports`
/// itself; false if it exits or the time runs out (a port another
/// process took meanwhile).
fn wait_listening(child: &mut Child, ports: &[u16]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if ports.iter().all(|p| listens_on(child.id(), *p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

impl Swtpm {
    /// Starts a fresh TPM with its own state directory and ports.
    pub fn start() -> Self {
        for _ in 0..10 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port_pair();
            let child = spawn_swtpm(dir.path(), port);
            let mut tpm = Self { child, port, dir };
            if tpm.wait_ready() {
                return tpm;
            }
            // Port taken meanwhile: dropping `tpm` stops it; try another.
        }
        panic!("swtpm did not start on any loopback port");
    }

    /// Starts a TPM manufactured as a real one is: an RSA 2048 (and a
    /// P-384) endorsement key with certificates in NV, issued by a local CA
    /// (`swtpm_setup --create-ek-cert` with `swtpm_localca`). Returns the
    /// TPM and the CA certificates (intermediate and root, PEM).
    pub fn start_with_ek_certificate() -> (Self, PathBuf) {
        // The CA lives beside the TPM's state and goes with it.
        let state = tempfile::tempdir().expect("tempdir");
        let ca = state.path().join("ca");
        std::fs::create_dir(&ca).expect("create the CA dir");
        let localca = ca.join("localca.conf");
        std::fs::write(
            &localca,
            format!(
                "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\ncertserial = {d}/certserial\n",
                d = ca.display()
            ),
        )
        .expect("write localca.conf");
        let options = ca.join("localca.options");
        std::fs::write(
            &options,
            "--platform-manufacturer edgeward-tests\n--platform-version 1\n--platform-model swtpm\n",
        )
        .expect("write localca.options");
        let setup = ca.join("swtpm_setup.conf");
        std::fs::write(
            &setup,
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                localca.display(),
                options.display()
            ),
        )
        .expect("write swtpm_setup.conf");
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--overwrite"])
            .arg("--tpmstate")
            .arg(state.path())
            .arg("--config")
            .arg(&setup)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run swtpm_setup ({e}): install Debian's swtpm-tools (scripts/setup)")
            });
        assert!(
            out.status.success(),
            "swtpm_setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bundle = ca.join("ek-ca.pem");
        let mut pem = std::fs::read(ca.join("issuercert.pem")).expect("issuercert.pem");
        pem.extend(std::fs::read(ca.join("swtpm-localca-rootca-cert.pem")).expect("root CA"));
        std::fs::write(&bundle, pem).expect("write the CA bundle");
        let mut state = Some(state);
        for _ in 0..10 {
            let port = free_port_pair();
            let dir = state.take().expect("the TPM's state");
            let child = spawn_swtpm(dir.path(), port);
            let mut tpm = Self { child, port, dir };
            if tpm.wait_ready() {
                return (tpm, bundle);
            }
            // Port taken meanwhile: stop it, keep its state, try another.
            let _ = tpm.child.kill();
            let _ = tpm.child.wait();
            state = Some(std::mem::replace(
                &mut tpm.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
        panic!("swtpm did not start on any loopback port");
    }

    /// Waits until this swtpm listens on both of its ports. A port that
    /// answers is not enough: between `free_port_pair` and the bind another
    /// process (often a swtpm of a parallel test, whose pair overlaps) can
    /// take one of them, and this one then exits while the other answers
    /// for it. So the listening sockets must be the child's own.
    fn wait_ready(&mut self) -> bool {
        wait_listening(&mut self.child, &[self.port, self.port + 1])
    }

    /// Its data port (the control port is the next one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCTI string for this instance.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A backend config for this instance.
    pub fn config(&self) -> TpmConfig {
        TpmConfig {
            tcti: self.tcti(),
            pcr: edgeward_hsm_hw::tpm::DEFAULT_PCR,
            boot_pcrs: None,
        }
    }

    /// Power-cycles the TPM (TPM reset): transient objects and PCRs are
    /// cleared, persistent state (seeds, NV) is kept.
    pub fn reset(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..50 {
            self.child = spawn_swtpm(self.dir.path(), self.port);
            if self.wait_ready() {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("swtpm did not come back after a reset");
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the SoftHSM2 config `$SOFTHSM2_CONF` names (set for every cargo
/// process by `.cargo/config.toml`) with a token directory beside it.
fn ensure_softhsm_conf() -> PathBuf {
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .map(PathBuf::from)
        .expect("SOFTHSM2_CONF is not set: run through cargo (see .cargo/config.toml)");
    let dir = conf.parent().expect("conf has a parent").to_owned();
    let tokens = dir.join("tokens");
    // Tokens from earlier runs are dropped before this process first loads
    // SoftHSM2, so the token store does not grow without end.
    static CLEAN: Once = Once::new();
    CLEAN.call_once(|| {
        let _ = std::fs::remove_dir_all(&tokens);
    });
    std::fs::create_dir_all(&tokens).expect("create the SoftHSM2 token directory");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    if std::fs::read_to_string(&conf).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&conf, text).expect("write the SoftHSM2 config");
    }
    assert!(
        Path::new(SOFTHSM_MODULE).exists(),
        "{SOFTHSM_MODULE} is missing: install Debian's softhsm2 (scripts/setup)"
    );
    conf
}

/// A freshly initialized SoftHSM2 token with its own label and PIN file.
#[derive(Debug)]
pub struct SoftHsmToken {
    /// The token label.
    pub label: String,
    /// A file holding the user PIN.
    pub pin_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl SoftHsmToken {
    /// Initializes a new token in the free slot.
    pub fn new() -> Self {
        static CREATED: AtomicU32 = AtomicU32::new(0);
        ensure_softhsm_conf();
        let lib =
            edgeward_hsm_hw::pkcs11::library(Path::new(SOFTHSM_MODULE)).expect("load SoftHSM2");
        let _slots = edgeward_hsm_hw::pkcs11::slot_lock();
        let n = CREATED.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).expect("random");
        let label = format!(
            "t{}-{}-{:02x}{:02x}{:02x}{:02x}",
            std::process::id(),
            n,
            nonce[0],
            nonce[1],
            nonce[2],
            nonce[3]
        );
        let slot = lib
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .find(|s| {
                lib.get_token_info(*s)
                    .map(|t| !t.token_initialized())
                    .unwrap_or(false)
            })
            .expect("SoftHSM2 offers a free slot");
        lib.init_token(slot, &AuthPin::from(SO_PIN), &label)
            .expect("init token");
        let session = lib.open_rw_session(slot).expect("session");
        session
            .login(UserType::So, Some(&AuthPin::from(SO_PIN)))
            .expect("SO login");
        session
            .init_pin(&AuthPin::from(USER_PIN))
            .expect("init PIN");
        session.logout().expect("logout");
        drop(session);
        let dir = tempfile::tempdir().expect("tempdir");
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).expect("pin file");
        Self {
            label,
            pin_file,
            _dir: dir,
        }
    }

    /// A backend config for this token.
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module: SOFTHSM_MODULE.into(),
            token: self.label.clone(),
            pin_file: self.pin_file.clone(),
        }
    }

    /// The `[hsm]` section of a daemon's config naming this token.
    pub fn hsm_toml(&self) -> String {
        format!(
            "[hsm]\nbackend = \"pkcs11\"\nmodule = \"{}\"\ntoken = \"{}\"\npin_file = \"{}\"\n",
            SOFTHSM_MODULE,
            self.label,
            self.pin_file.display()
        )
    }
}

impl Default for SoftHsmToken {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `openssl` with `command` (split at whitespace: paths here are
/// tempdirs without spaces), panicking with its output when it fails.
fn openssl(command: &str) {
    let args: Vec<&str> = command.split_whitespace().collect();
    let out = Command::new("openssl")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install Debian's openssl"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An organisation's CAs, made with the openssl CLI, one per role as
/// docs/fleet.md lays out: `servers` certifies the broker and registries
/// (what devices and operators pin), `devices` the devices' broker logins,
/// `operators` the operators', and `workloads` each device's CA (from
/// `edgeward identity csr`), name-constrained to the trust domain and the
/// device's DNS suffix. The broker accepts clients of `devices` and
/// `operators` only.
#[derive(Debug)]
pub struct OrgCa {
    dir: tempfile::TempDir,
}

impl Default for OrgCa {
    fn default() -> Self {
        Self::new()
    }
}

/// The roles an [`OrgCa`] has a root for.
pub const ROLES: [&str; 4] = ["servers", "devices", "operators", "workloads"];

impl OrgCa {
    /// New P-256 roots, one per role, valid for two days.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Self { dir };
        for role in ROLES {
            openssl(&format!(
                "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {} -out {} -days 2 -subj /O=edgeward-tests/CN={role}-root -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
                ca.file(&format!("{role}.key")),
                ca.file(&format!("{role}.pem")),
            ));
        }
        let mut clients = std::fs::read(ca.role_root("devices")).expect("devices root");
        clients.extend(std::fs::read(ca.role_root("operators")).expect("operators root"));
        std::fs::write(ca.dir.path().join("clients.pem"), clients).expect("write");
        ca
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The servers' root (PEM): what devices and operators pin for the
    /// broker, and trust for registries.
    pub fn root(&self) -> PathBuf {
        self.role_root("servers")
    }

    /// The root of `role` (one of [`ROLES`]).
    pub fn role_root(&self, role: &str) -> PathBuf {
        self.dir.path().join(format!("{role}.pem"))
    }

    /// The key of the root of `role` (PEM).
    pub fn role_key(&self, role: &str) -> PathBuf {
        self.dir.path().join(format!("{role}.key"))
    }

    /// The roots the broker accepts clients of: devices and operators.
    pub fn client_roots(&self) -> PathBuf {
        self.dir.path().join("clients.pem")
    }

    /// A key and certificate for `cn` (end entity) from the servers' root,
    /// with `ext` (openssl extension lines): (certificate, key).
    pub fn issue(&self, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
        self.issue_as("servers", cn, ext)
    }

    /// The same from the root of `role`.
    pub fn issue_as(&self, role: &str, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
        let (key, csr, cert, extfile) = (
            self.file(&format!("{role}-{cn}.key")),
            self.file(&format!("{role}-{cn}.csr")),
            self.file(&format!("{role}-{cn}.pem")),
            self.file(&format!("{role}-{cn}.ext")),
        );
        std::fs::write(&extfile, ext).expect("write the extensions");
        openssl(&format!(
            "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {key} -out {csr} -subj /CN={cn}"
        ));
        self.sign(role, &csr, &extfile, &cert, false);
        (PathBuf::from(cert), PathBuf::from(key))
    }

    fn sign(&self, role: &str, csr: &str, extfile: &str, out: &str, copy: bool) {
        openssl(&format!(
            "x509 -req -in {csr} -CA {root} -CAkey {root_key} -CAcreateserial -days 1 {copy}-extfile {extfile} -out {out}",
            root = self.file(&format!("{role}.pem")),
            root_key = self.file(&format!("{role}.key")),
            copy = if copy { "-copy_extensions copy " } else { "" },
        ));
    }

    /// Certifies a device CA from its CSR (as `edgeward identity csr`
    /// writes it) under the workloads root, constrained to `trust_domain`
    /// URIs, DNS names under `dns` and no IP address: the certificate,
    /// then the root, the chain `[identity] ca_certificate` takes, written
    /// to `out`.
    pub fn certify_device_ca(&self, csr: &Path, out: &Path, trust_domain: &str, dns: &str) {
        self.certify_device_ca_with(
            csr,
            out,
            &format!("nameConstraints=critical,permitted;URI:{trust_domain},permitted;DNS:{dns},excluded;IP:0.0.0.0/0.0.0.0,excluded;IP:0:0:0:0:0:0:0:0/0:0:0:0:0:0:0:0\n"),
        );
    }

    /// The same with `extra` extension lines instead of the constraints.
    pub fn certify_device_ca_with(&self, csr: &Path, out: &Path, extra: &str) {
        let cert = self.file("device-ca.pem");
        let ext = self.file("device-ca.ext");
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n{extra}"
            ),
        )
        .expect("write the extensions");
        self.sign("workloads", &csr.display().to_string(), &ext, &cert, true);
        let mut chain = std::fs::read(&cert).expect("the device CA certificate");
        chain.extend(std::fs::read(self.role_root("workloads")).expect("the root"));
        std::fs::write(out, chain).expect("write the chain");
    }

    /// Certifies a device's broker key from its CSR (`edgeward identity
    /// csr --broker`) under the devices root: the client certificate
    /// `[cloud] certificate` names, written to `out`.
    pub fn certify_broker_key(&self, csr: &Path, out: &Path) {
        let ext = self.file("broker-key.ext");
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .expect("write the extensions");
        self.sign(
            "devices",
            &csr.display().to_string(),
            &ext,
            &out.display().to_string(),
            true,
        );
    }
}

/// A Mosquitto broker (Debian's package) on a free loopback port: a TLS
/// listener that requires a client certificate from `ca`, takes its CN as
/// the username, and confines each client with the ACL given (as
/// `edgeward fleet acl` writes it; see docs/fleet.md).
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    /// The enrollment listener's port, if it has one.
    enroll_port: Option<u16>,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts a broker trusting `ca`'s root, with `acl` as its acl_file.
    pub fn start(ca: &OrgCa, acl: &str) -> Self {
        Self::start_with(ca, acl, None)
    }

    /// The same with an enrollment listener too: TLS with the broker's
    /// certificate, no client certificate, `enroll_acl` its acl_file
    /// (per_listener_settings true).
    pub fn start_with_enrollment(ca: &OrgCa, acl: &str, enroll_acl: &str) -> Self {
        Self::start_with(ca, acl, Some(enroll_acl))
    }

    fn start_with(ca: &OrgCa, acl: &str, enroll_acl: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ca.issue(
            "broker",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        std::fs::write(dir.path().join("acl"), acl).expect("write the ACL");
        if let Some(a) = enroll_acl {
            std::fs::write(dir.path().join("enroll-acl"), a).expect("write the ACL");
        }
        let mut m = Self {
            child: None,
            port: 0,
            enroll_port: None,
            dir,
        };
        std::fs::copy(&cert, m.dir.path().join("broker.pem")).expect("copy");
        std::fs::copy(&key, m.dir.path().join("broker.key")).expect("copy");
        // Clients of the devices and operators roots only: never the
        // workloads root, whose certificates modules hold.
        std::fs::copy(ca.client_roots(), m.dir.path().join("ca.pem")).expect("copy");
        for _ in 0..10 {
            let port = free_port();
            m.port = port;
            if enroll_acl.is_some() {
                m.enroll_port = Some(free_port());
            }
            if m.spawn() {
                return m;
            }
        }
        panic!("mosquitto did not start on any loopback port");
    }

    fn spawn(&mut self) -> bool {
        let d = self.dir.path();
        let conf = d.join("mosquitto.conf");
        let common = format!(
            "user root\nmax_queued_messages 20000\npersistence true\npersistence_location {d}/\nautosave_interval 1\nautosave_on_changes true\nsys_interval 1\nlog_dest stderr\nlog_type error\nlog_type warning\n",
            d = d.display()
        );
        let main = format!(
            "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/broker.pem\nkeyfile {d}/broker.key\nrequire_certificate true\nuse_identity_as_username true\nacl_file {d}/acl\n",
            d = d.display(),
            port = self.port
        );
        let text = match self.enroll_port {
            None => format!("{common}per_listener_settings false\nallow_anonymous false\n{main}"),
            Some(e) => format!(
                "{common}per_listener_settings true\n{main}allow_anonymous false\nlistener {e} 127.0.0.1\ncertfile {d}/broker.pem\nkeyfile {d}/broker.key\nrequire_certificate false\nallow_anonymous true\nacl_file {d}/enroll-acl\n",
                d = d.display()
            ),
        };
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start mosquitto ({e}): install Debian's mosquitto (scripts/setup)")
            });
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.enroll_port).collect();
        if wait_listening(&mut child, &ports) {
            self.child = Some(child);
            return true;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The enrollment listener's `mqtts://127.0.0.1:PORT`.
    pub fn enroll_url(&self) -> String {
        format!(
            "mqtts://127.0.0.1:{}",
            self.enroll_port
                .expect("a broker with an enrollment listener")
        )
    }

    /// Its process id, while it runs (to pause it: SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `mqtts://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL: no goodbye to anyone); its persistence file
    /// keeps what it had saved (it saves on every change).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it as an operator would (SIGTERM: it saves its state).
    pub fn shut_down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not come back on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An MQTT client of the broker: Mosquitto's own command-line clients, an
/// implementation independent of the device's.
#[derive(Debug, Clone)]
pub struct MqttUser {
    /// The broker's port.
    pub port: u16,
    /// Roots for the broker's certificate.
    pub ca: PathBuf,
    /// Client certificate and key.
    pub cert: PathBuf,
    /// See `cert`.
    pub key: PathBuf,
}

impl MqttUser {
    fn common(&self, c: &mut Command) {
        c.args(["-h", "127.0.0.1", "-V", "mqttv5", "-p"])
            .arg(self.port.to_string())
            .arg("--cafile")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key);
    }

    /// Publishes `payload` to `topic` (QoS 1), retained if asked; whether
    /// the client reported success.
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> bool {
        let mut c = Command::new("mosquitto_pub");
        self.common(&mut c);
        c.args(["-q", "1", "-t", topic, "-s"]);
        if retain {
            c.arg("-r");
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto_pub ({e}): install Debian's mosquitto-clients")
            });
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(payload).expect("write the payload");
        }
        child.wait().expect("mosquitto_pub").success()
    }

    /// Subscribes to `filter` until dropped; each message arrives as
    /// `(topic, payload)` (one line each: payloads here are JSON).
    pub fn subscribe(&self, filter: &str) -> Subscription {
        let mut c = Command::new("mosquitto_sub");
        self.common(&mut c);
        c.args(["-q", "1", "-t", filter, "-F", "%t %p"]);
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto_sub ({e}): install Debian's mosquitto-clients")
            });
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let (t, p) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                if tx
                    .send((t.to_owned(), p.to_owned(), Instant::now()))
                    .is_err()
                {
                    break;
                }
            }
        });
        Subscription {
            child,
            rx,
            seen: Vec::new(),
            arrived: Vec::new(),
            taken: std::collections::HashSet::new(),
        }
    }
}

/// A running `mosquitto_sub`.
#[derive(Debug)]
pub struct Subscription {
    child: Child,
    rx: std::sync::mpsc::Receiver<(String, String, Instant)>,
    /// Every message so far.
    pub seen: Vec<(String, String)>,
    /// When each of `seen` arrived.
    pub arrived: Vec<Instant>,
    /// Which of `seen` a [`Subscription::wait`] returned already.
    taken: std::collections::HashSet<usize>,
}

impl Subscription {
    /// Takes in what has arrived.
    pub fn pump(&mut self) {
        while let Ok((t, p, at)) = self.rx.try_recv() {
            self.seen.push((t, p));
            self.arrived.push(at);
        }
    }

    /// Waits up to `within` for a message on `topic` whose JSON payload
    /// satisfies `pred`, and returns it. A message returned once is not
    /// returned again: a second wait for the same kind of message waits
    /// for another one.
    #[track_caller]
    pub fn wait(
        &mut self,
        topic: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        let mut checked = 0;
        loop {
            self.pump();
            for (i, (t, p)) in self.seen.iter().enumerate().skip(checked) {
                if t == topic
                    && !self.taken.contains(&i)
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(p)
                    && pred(&v)
                {
                    self.taken.insert(i);
                    return v;
                }
            }
            checked = self.seen.len();
            assert!(
                Instant::now() < deadline,
                "no message on {topic} as expected within {within:?}; seen:\n{}",
                self.seen
                    .iter()
                    .map(|(t, p)| format!("{t} {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The messages that arrived within `within`.
    pub fn drain(&mut self, within: Duration) -> &[(String, String)] {
        std::thread::sleep(within);
        self.pump();
        &self.seen
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI registry (Debian's `docker-registry`, the CNCF distribution
/// registry) on a free loopback port, plain HTTP, storing in a tempdir.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Default for Registry {
    fn default() -> Self {
        Self::start()
    }
}

impl Registry {
    /// Starts one: plain HTTP, no auth.
    pub fn start() -> Self {
        Self::start_with(tempfile::tempdir().expect("tempdir"), "")
    }

    /// Starts one as a real registry is run: TLS with a certificate from
    /// `ca` (for 127.0.0.1), and basic auth for `user` (htpasswd, bcrypt).
    pub fn start_secure(ca: &OrgCa, user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run htpasswd ({e}): install Debian's apache2-utils (scripts/setup)")
            });
        assert!(out.status.success(), "htpasswd failed");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
        let auth = format!(
            "  htpasswd:\n    realm: edgeward-tests\n    path: {}\n",
            htpasswd.display()
        );
        Self::start_tls(ca, dir, &auth)
    }

    /// Starts one with TLS (a certificate from `ca` for 127.0.0.1) and the
    /// `auth:` block given (its lines indented by two), such as a token
    /// service's.
    pub fn start_with_auth(ca: &OrgCa, auth: &str) -> Self {
        Self::start_tls(ca, tempfile::tempdir().expect("tempdir"), auth)
    }

    fn start_tls(ca: &OrgCa, dir: tempfile::TempDir, auth: &str) -> Self {
        let (cert, key) = ca.issue(
            "registry",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        let extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n{auth}",
            cert.display(),
            key.display(),
        );
        Self::start_with(dir, &extra)
    }

    fn start_with(dir: tempfile::TempDir, extra: &str) -> Self {
        for _ in 0..10 {
            let port = free_port();
            let conf = dir.path().join("config.yml");
            std::fs::write(
                &conf,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                    dir.path().join("data").display()
                ),
            )
            .expect("write the registry config");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start docker-registry ({e}): install Debian's docker-registry (scripts/setup)")
                });
            if wait_listening(&mut child, &[port]) {
                return Self {
                    child,
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start on any loopback port");
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
