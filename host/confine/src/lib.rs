//! edgeward's processes confine themselves: the runtime before it reads
//! any module, the key daemon before it serves. `no_new_privs`
//! (nothing it executes can gain privileges: no setuid, no file
//! capabilities) and a seccomp filter that refuses the system calls neither
//! wasmtime nor tokio makes, so that code which escapes a module's sandbox
//! into the runtime's process still cannot use them against the device.
//!
//! The filter denies, with `EPERM`, every call in [`DENIED`] (each with
//! the reason it is there), creating namespaces through `clone`, and
//! answers `clone3` with `ENOSYS` (its flags are behind a pointer seccomp
//! cannot read; glibc then falls back to `clone`, whose flags it can).
//! Everything else is allowed: the list is a denylist of what an attacker
//! wants and the runtime never needs, not an allowlist of what it does,
//! which would break with every wasmtime, tokio or glibc release.
//!
//! Filters are inherited by every thread created after and every child
//! (the compile worker), and cannot be removed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A system call the filter denies, and why.
#[derive(Debug, Clone, Copy)]
pub struct Denied {
    /// Its name (`man 2 NAME`).
    pub name: &'static str,
    /// Its number on this architecture.
    pub nr: i64,
    /// What an attacker would use it for.
    pub why: &'static str,
}

macro_rules! denied {
    ($($(#[$m:meta])* $name:ident: $why:literal,)*) => {
        /// The system calls the filter denies with `EPERM`.
        pub const DENIED: &[Denied] = &[
            $($(#[$m])* Denied { name: stringify!($name), nr: sys::$name, why: $why },)*
        ];
    };
}

/// System call numbers by their names.
mod sys {
    #![allow(non_upper_case_globals)]
    macro_rules! nr {
        ($($(#[$m:meta])* $name:ident = $c:ident,)*) => {
            $($(#[$m])* pub const $name: i64 = libc::$c;)*
        };
    }
    nr! {
        ptrace = SYS_ptrace,
        process_vm_readv = SYS_process_vm_readv,
        process_vm_writev = SYS_process_vm_writev,
        mount = SYS_mount,
        umount2 = SYS_umount2,
        mount_setattr = SYS_mount_setattr,
        move_mount = SYS_move_mount,
        open_tree = SYS_open_tree,
        fsopen = SYS_fsopen,
        fsconfig = SYS_fsconfig,
        fsmount = SYS_fsmount,
        fspick = SYS_fspick,
        pivot_root = SYS_pivot_root,
        chroot = SYS_chroot,
        bpf = SYS_bpf,
        perf_event_open = SYS_perf_event_open,
        kexec_load = SYS_kexec_load,
        kexec_file_load = SYS_kexec_file_load,
        init_module = SYS_init_module,
        finit_module = SYS_finit_module,
        delete_module = SYS_delete_module,
        keyctl = SYS_keyctl,
        add_key = SYS_add_key,
        request_key = SYS_request_key,
        userfaultfd = SYS_userfaultfd,
        setns = SYS_setns,
        unshare = SYS_unshare,
        personality = SYS_personality,
        swapon = SYS_swapon,
        swapoff = SYS_swapoff,
        reboot = SYS_reboot,
        acct = SYS_acct,
        open_by_handle_at = SYS_open_by_handle_at,
        name_to_handle_at = SYS_name_to_handle_at,
        quotactl = SYS_quotactl,
        syslog = SYS_syslog,
        settimeofday = SYS_settimeofday,
        clock_settime = SYS_clock_settime,
        clock_adjtime = SYS_clock_adjtime,
        adjtimex = SYS_adjtimex,
        io_uring_setup = SYS_io_uring_setup,
        io_uring_enter = SYS_io_uring_enter,
        io_uring_register = SYS_io_uring_register,
        mknodat = SYS_mknodat,
        #[cfg(target_arch = "x86_64")]
        mknod = SYS_mknod,
        #[cfg(target_arch = "x86_64")]
        iopl = SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        ioperm = SYS_ioperm,
    }
}

denied! {
    ptrace: "read or rewrite another process's memory and registers (a neighbour's, the service manager's)",
    process_vm_readv: "read another process's memory without attaching",
    process_vm_writev: "write another process's memory without attaching",
    mount: "change the file system view (hide or replace what the runtime reads)",
    umount2: "remove a mount (expose what a mount hides)",
    mount_setattr: "make a read-only mount writable",
    move_mount: "the new mount API: attach a mount elsewhere",
    open_tree: "the new mount API: clone a mount tree",
    fsopen: "the new mount API: create a file system context",
    fsconfig: "the new mount API: configure a file system context",
    fsmount: "the new mount API: mount a file system context",
    fspick: "the new mount API: reconfigure a mounted file system",
    pivot_root: "replace the root file system",
    chroot: "the classic chroot escape with an fd held outside",
    bpf: "load programs into the kernel; the largest kernel attack surface a process can reach",
    perf_event_open: "side channels and a long record of kernel bugs",
    kexec_load: "boot another kernel, past measured boot",
    kexec_file_load: "boot another kernel, past measured boot",
    init_module: "load code into the kernel",
    finit_module: "load code into the kernel from a file",
    delete_module: "unload a kernel module (a security module, a driver)",
    keyctl: "the kernel keyring: read or plant keys of the user's session",
    add_key: "plant a key in a kernel keyring",
    request_key: "ask the kernel (and its upcalls) for a key",
    userfaultfd: "stall the kernel mid-copy: the standard way to widen a kernel race",
    setns: "enter another namespace",
    unshare: "create namespaces (user namespaces unlock kernel code paths root-only otherwise)",
    personality: "turn off address-space randomization (ADDR_NO_RANDOMIZE) for a child",
    swapon: "add swap: let secrets reach a disk",
    swapoff: "remove swap",
    reboot: "reboot the device or load a kexec image",
    acct: "process accounting to a file of the attacker's choice",
    open_by_handle_at: "open any file on a file system by its handle, past path checks (the shocker escape)",
    name_to_handle_at: "the other half of open_by_handle_at",
    quotactl: "change disk quotas",
    syslog: "read the kernel log (addresses that defeat KASLR)",
    settimeofday: "move the clock: certificates and tokens expire or come back to life",
    clock_settime: "move the clock: certificates and tokens expire or come back to life",
    clock_adjtime: "move the clock",
    adjtimex: "move the clock",
    io_uring_setup: "io_uring: a second system call interface seccomp cannot see into",
    io_uring_enter: "io_uring: a second system call interface seccomp cannot see into",
    io_uring_register: "io_uring: a second system call interface seccomp cannot see into",
    mknodat: "make a device node (the raw disk, /dev/mem) in a directory it may write, past the device's own permissions",
    #[cfg(target_arch = "x86_64")]
    mknod: "make a device node (the raw disk, /dev/mem) in a directory it may write, past the device's own permissions",
    #[cfg(target_arch = "x86_64")]
    iopl: "raw I/O port access",
    #[cfg(target_arch = "x86_64")]
    ioperm: "raw I/O port access",
}

/// The `clone` flags that create namespaces: refused like `unshare`.
pub const NAMESPACE_FLAGS: &[(&str, u64)] = &[
    ("CLONE_NEWNS", libc::CLONE_NEWNS as u64),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS as u64),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC as u64),
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER as u64),
    ("CLONE_NEWPID", libc::CLONE_NEWPID as u64),
    ("CLONE_NEWNET", libc::CLONE_NEWNET as u64),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP as u64),
];

/// Confinement could not be applied.
#[derive(Debug)]
pub struct ConfineError(String);

impl fmt::Display for ConfineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfineError {}

fn arch() -> Result<TargetArch, ConfineError> {
    std::env::consts::ARCH.try_into().map_err(|e| {
        ConfineError(format!(
            "seccomp: {} is not supported: {e:?}",
            std::env::consts::ARCH
        ))
    })
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
) -> Result<BpfProgram, ConfineError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch()?)
        .map_err(|e| ConfineError(format!("seccomp filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| ConfineError(format!("seccomp filter: {e}")))
}

/// The two filters: [`DENIED`] and namespace-creating `clone` get `EPERM`;
/// `clone3` gets `ENOSYS`.
fn filters() -> Result<Vec<BpfProgram>, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|d| (d.nr, Vec::new())).collect();
    let clone = NAMESPACE_FLAGS
        .iter()
        .map(|&(_, flag)| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| ConfineError(format!("seccomp rule: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone);
    let eperm = compile(rules, SeccompAction::Errno(libc::EPERM as u32))?;
    let enosys = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let mut all = vec![eperm, enosys];
    #[cfg(target_arch = "x86_64")]
    all.push(x32());
    Ok(all)
}

/// The x32 ABI shares x86-64's audit architecture: its system calls are
/// x86-64's numbers with bit 30 set, so a filter keyed on x86-64's numbers
/// alone would let `ptrace | 0x40000000` through on a kernel built with
/// x32. Nothing in edgeward uses x32; every such call fails with `EPERM`
/// (distinct from the `ENOSYS` of a kernel without x32, so a test can tell
/// the filter refused it).
#[cfg(target_arch = "x86_64")]
fn x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JSET_K: u16 = 0x45;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.nr
        op(BPF_LD_W_ABS, 0, 0, 0),
        op(BPF_JMP_JSET_K, 0, 1, X32_SYSCALL_BIT),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// Sets `no_new_privs` and installs the filters on every thread of the
/// process.
///
/// # Errors
///
/// The kernel refuses either (no seccomp filter support): the caller
/// decides whether to go on.
pub fn apply() -> Result<(), ConfineError> {
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| ConfineError(format!("cannot set no_new_privs: {e}")))?;
    // No core dump (keys and module memory on disk), and no ptrace or
    // /proc/<pid>/mem by another process of the same uid.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| ConfineError(format!("cannot make the process non-dumpable: {e}")))?;
    for f in filters()? {
        seccompiler::apply_filter_all_threads(&f)
            .map_err(|e| ConfineError(format!("cannot install the seccomp filter: {e}")))?;
    }
    Ok(())
}

/// Drops every capability but `keep` from this thread (call it before
/// any other thread starts: they inherit it; one already running is
/// reported as an error after the drop) for good: the bounding set
/// (what an exec could regain), the ambient set, and the effective,
/// permitted and inheritable sets. A process that is not root has none to
/// drop.
///
/// # Errors
///
/// The kernel refuses (no `CAP_SETPCAP` to shrink the bounding set).
pub fn drop_capabilities(keep: rustix::thread::CapabilitySet) -> Result<(), ConfineError> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let now = rustix::thread::capabilities(None)
        .map_err(|e| ConfineError(format!("cannot read its capabilities: {e}")))?;
    // The bounding set, while CAP_SETPCAP is effective (without it there
    // is nothing an exec could regain beyond what the set below drops).
    let mut bounding = Ok(());
    if now.effective.contains(CapabilitySet::SETPCAP) {
        for n in 0..64u32 {
            if keep.bits() & (1 << n) != 0 {
                continue;
            }
            // SAFETY: PR_CAPBSET_DROP takes a capability number and reads
            // no memory.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(n), 0, 0, 0) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // Past the kernel's last capability.
                if e.raw_os_error() != Some(libc::EINVAL) {
                    bounding = Err(ConfineError(format!(
                        "cannot drop capability {n} from the bounding set: {e}"
                    )));
                }
                break;
            }
        }
    }
    // Always: the ambient, effective, permitted and inheritable sets.
    let _ = rustix::thread::clear_ambient_capability_set();
    let kept = now.permitted & keep;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: kept,
            permitted: kept,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|e| ConfineError(format!("cannot drop its capabilities: {e}")))?;
    bounding?;
    // Capabilities are a thread's: this one and those it starts have none
    // now, one already running keeps its own.
    let threads = threads();
    if threads > 1 {
        return Err(ConfineError(format!(
            "{threads} threads ran already: those started before keep their capabilities"
        )));
    }
    Ok(())
}

/// How many threads this process runs (0 if `/proc` cannot say).
fn threads() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        .unwrap_or(0)
}

/// What the compile worker may no longer do once it has its input pipes:
/// open or make files, change the file system, make sockets, run a
/// program, or signal another process. It computes, reads its stdin and
/// writes its stdout and stderr; nothing else.
const WORKER_DENIED: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdirat,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_truncate,
    libc::SYS_mknodat,
    libc::SYS_utimensat,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pidfd_getfd,
    // As root it could raise its own limits (CAP_SYS_RESOURCE).
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fchmodat2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_creat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mkdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_link,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_symlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chmod,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chown,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lchown,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mknod,
];

/// Confines the compile worker (see the runtime's `runtime::worker`): `no_new_privs`,
/// [`apply`]'s filters if this process does not have them yet, and a filter
/// of its own: no file opened or changed, no socket, no program run, no
/// new process (`clone` for threads only), no change to its limits, no
/// signal to another process (`tgkill` only on itself, which `abort`
/// needs).
///
/// # Errors
///
/// As [`apply`].
pub fn apply_worker() -> Result<(), ConfineError> {
    // Always, even under a filter already (inherited, or the service
    // manager's): that one may lack the clone3 and x32 rules this one's
    // fork and file rules rely on. Filters stack; the strictest answer
    // wins.
    apply()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        WORKER_DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let me = u64::from(std::process::id());
    let other = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, me)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| ConfineError(format!("seccomp rule: {e}")))?;
    rules.insert(libc::SYS_tgkill, vec![other]);
    // Threads (Cranelift's) but no new process: a clone without
    // CLONE_THREAD is a fork.
    let fork = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| ConfineError(format!("seccomp rule: {e}")))?;
    rules.insert(libc::SYS_clone, vec![fork]);
    let filter = compile(rules, SeccompAction::Errno(libc::EPERM as u32))?;
    seccompiler::apply_filter_all_threads(&filter)
        .map_err(|e| ConfineError(format!("cannot install the worker's seccomp filter: {e}")))
}

/// What the daemon's Landlock ruleset lets it reach: everything else on
/// the file system is refused (`EACCES`), whatever the process's uid.
#[derive(Debug, Clone, Default)]
pub struct FsPolicy {
    /// Read, write, create and remove beneath (the state dir, `dirs`
    /// grants); not execute, and no device node made.
    pub read_write: Vec<PathBuf>,
    /// Read files and list directories beneath (the config, module files,
    /// `::ro` grants, `/proc`, `/sys`, name-service files).
    pub read_only: Vec<PathBuf>,
    /// Read and execute beneath (system libraries, this executable for
    /// the compile worker).
    pub execute: Vec<PathBuf>,
    /// Devices it reads and writes (`/dev/null`, the TPM).
    pub devices: Vec<PathBuf>,
    /// Directories it binds and removes a socket in (the management
    /// socket's).
    pub sockets: Vec<PathBuf>,
}

/// How far Landlock holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landlocked {
    /// Every requested restriction is enforced.
    Fully,
    /// Those this kernel knows (an older ABI): named in the log.
    Partially,
    /// Not at all: the kernel has no Landlock (or it is disabled).
    Not,
}

/// The Landlock ABI the ruleset is written for (7, Linux 6.15+: file
/// system rights including truncation and device ioctls, and the signal
/// and abstract-socket scopes); an older kernel enforces what it knows,
/// and the daemon says so.
const LANDLOCK_ABI: landlock::ABI = landlock::ABI::V7;

/// Restricts this thread and everything it starts afterwards to `policy`
/// (call it before any other thread exists: Landlock binds threads, not
/// processes), and scopes signals and abstract unix sockets to this
/// process and its children.
///
/// # Errors
///
/// The ruleset cannot be built or applied; a kernel without Landlock is
/// not an error but [`Landlocked::Not`].
pub fn landlock(policy: &FsPolicy) -> Result<Landlocked, ConfineError> {
    use landlock::{
        Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
        path_beneath_rules,
    };
    // A thread already running would stay outside the ruleset.
    let threads = threads();
    if threads > 1 {
        return Err(ConfineError(format!(
            "{threads} threads run already: Landlock would bind only the calling one"
        )));
    }
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    // What it may do beneath a read-write grant: everything but run a
    // program from it or make a device node there.
    let read_write = all & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let execute = read | AccessFs::Execute;
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let socket = AccessFs::MakeSock | AccessFs::RemoveFile;
    let err = |e: landlock::RulesetError| ConfineError(format!("Landlock: {e}"));
    // A path that does not exist yet grants nothing (and would fail the
    // whole ruleset): what is missing now stays unreachable.
    let present = |paths: &[PathBuf]| -> Vec<PathBuf> {
        paths.iter().filter(|p| p.exists()).cloned().collect()
    };
    let policy = FsPolicy {
        read_write: present(&policy.read_write),
        read_only: present(&policy.read_only),
        execute: present(&policy.execute),
        devices: present(&policy.devices),
        sockets: present(&policy.sockets),
    };
    let status = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(Ruleset::create)
        .and_then(|r| r.add_rules(path_beneath_rules(&policy.read_write, read_write)))
        .and_then(|r| r.add_rules(path_beneath_rules(&policy.read_only, read)))
        .and_then(|r| r.add_rules(path_beneath_rules(&policy.execute, execute)))
        .and_then(|r| r.add_rules(path_beneath_rules(&policy.devices, device)))
        .and_then(|r| r.add_rules(path_beneath_rules(&policy.sockets, socket)))
        .and_then(|r| r.restrict_self())
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlocked::Fully,
        RulesetStatus::PartiallyEnforced => Landlocked::Partially,
        RulesetStatus::NotEnforced => Landlocked::Not,
    })
}

/// What `/proc/self/status` says of this process's confinement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
    /// `Seccomp`: 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    /// `CapEff`, the effective capability set.
    pub cap_eff: u64,
}

/// This process's [`Status`].
///
/// # Errors
///
/// `/proc/self/status` cannot be read.
pub fn status() -> std::io::Result<Status> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let mut s = Status::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "NoNewPrivs" => s.no_new_privs = v == "1",
            "Seccomp" => s.seccomp = v.parse().unwrap_or(0),
            "CapEff" => s.cap_eff = u64::from_str_radix(v, 16).unwrap_or(u64::MAX),
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denied_call_is_distinct_and_explained() {
        let mut seen = std::collections::HashSet::new();
        for d in DENIED {
            assert!(seen.insert(d.nr), "{} listed twice", d.name);
            assert!(!d.why.is_empty(), "{} has no reason", d.name);
        }
        // The ones the issue names, at least.
        for name in [
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "mount",
            "umount2",
            "bpf",
            "perf_event_open",
            "kexec_load",
            "init_module",
            "finit_module",
            "keyctl",
            "add_key",
            "userfaultfd",
            "setns",
            "unshare",
            "personality",
        ] {
            assert!(
                DENIED.iter().any(|d| d.name == name),
                "{name} is not denied"
            );
        }
    }

    #[test]
    fn the_docs_list_every_denied_call() {
        let page = include_str!("../../../docs/sandbox.md");
        for d in DENIED {
            assert!(
                page.contains(&format!("| `{}` | {} |", d.name, d.why)),
                "docs/sandbox.md does not list {} with its reason",
                d.name
            );
        }
    }

    #[test]
    fn the_filters_compile_for_this_architecture() {
        let all = filters().expect("filters");
        assert!(
            all[0].len() > DENIED.len(),
            "one comparison per denied call at least"
        );
        assert!(!all[1].is_empty());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(all[2], x32());
    }
}
