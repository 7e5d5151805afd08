//! Fallback mode: the execs of a launched agent are decided before they start.
//!
//! Without BPF LSM the kernel side can only see an exec once its new image is loaded, and a
//! task stopped there could be let run by a `SIGCONT` or a tracer. So `countersign exec`
//! installs a seccomp filter that turns every `execve`/`execveat` of the agent (and of
//! everything it starts: the filter is inherited and cannot be removed) into a user
//! notification, and hands the filter's listener to the daemon. A notified task waits inside
//! the kernel, killable only (where the kernel offers `WAIT_KILLABLE_RECV`, 5.19+): no signal,
//! tracer or other process can make it go on; only the daemon's answer can. If the daemon
//! dies, the listener closes and the waiting `execve` fails (`ENOSYS`): nothing runs.
//!
//! The daemon reads what the exec names, decides (the policy, a grant, a human), and either
//! refuses (`EPERM`) or lets the system call go on. What the kernel then loads is not taken
//! on trust — the filename and argv live in the agent's memory, which another of its threads
//! can rewrite in between: `sched_process_exec` compares the loaded image and its argv with
//! what was approved (see `countersign_ebpf::ApprovedExec`) and kills a mismatch before its
//! first instruction.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::mpsc;

use super::enrich::{self, FileId};
use crate::ebpf::ExecFastPath;

/// Launched agents whose listeners one daemon watches at once.
pub const MAX_LISTENERS: usize = 512;
/// How often a listener's thread looks whether the filter still has tasks.
const POLL_MS: i32 = 1_000;

// The architectures a filter checks (`AUDIT_ARCH_*`, from the kernel's uapi `audit.h`).
#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "x86_64")]
const COMPAT_ARCH: u32 = 0x4000_0003;
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "aarch64")]
const COMPAT_ARCH: u32 = 0x4000_0028;

/// x86_64's x32 ABI: the same architecture, system call numbers with this bit.
#[cfg(target_arch = "x86_64")]
const X32_BIT: u32 = 0x4000_0000;

/// `execve`, `execveat` of the native ABI (and on x86_64 of x32).
#[cfg(target_arch = "x86_64")]
const NATIVE_EXECS: [u32; 4] = [59, 322, X32_BIT | 520, X32_BIT | 545];
#[cfg(target_arch = "aarch64")]
const NATIVE_EXECS: [u32; 2] = [221, 281];
/// `execve`, `execveat` of the 32-bit ABI.
#[cfg(target_arch = "x86_64")]
const COMPAT_EXECS: [u32; 2] = [11, 358];
#[cfg(target_arch = "aarch64")]
const COMPAT_EXECS: [u32; 2] = [11, 387];

/// `execveat` in each ABI (the others are `execve`).
#[cfg(target_arch = "x86_64")]
const EXECVEATS: [u32; 3] = [322, X32_BIT | 545, 358];
#[cfg(target_arch = "aarch64")]
const EXECVEATS: [u32; 2] = [281, 387];

/// System calls a launched agent may never make in fallback mode (where no LSM hook can refuse
/// them by their target): `bpf`, `ptrace`, `process_vm_readv`/`writev`, `pidfd_getfd`,
/// loading and removing kernel modules, `kexec_load`/`kexec_file_load`, and every mount
/// call (`mount`, `umount2`, `pivot_root`, `open_tree`, `move_mount`, `fsopen`, `fsconfig`,
/// `fsmount`, `fspick`, `mount_setattr`), `reboot`, and on x86 `iopl`/`ioperm` (raw I/O
/// ports; recorded as `capability`, as LSM mode refuses them). The main loop records each as a tamper attempt
/// while the call waits (so that the record names the process), then answers `EPERM`; if the
/// daemon is gone the call fails with `ENOSYS`.
#[cfg(target_arch = "x86_64")]
const NATIVE_GUARDED: [(u32, &str); 23] = [
    (321, "bpf"),
    (101, "ptrace"),
    (310, "ptrace"),
    (311, "ptrace"),
    (438, "ptrace"),
    (175, "module"),
    (313, "module"),
    (176, "module"),
    (246, "module"),
    (320, "module"),
    (165, "mount"),
    (166, "mount"),
    (155, "mount"),
    (428, "mount"),
    (429, "mount"),
    (430, "mount"),
    (431, "mount"),
    (432, "mount"),
    (433, "mount"),
    (442, "mount"),
    (169, "capability"),
    (172, "capability"),
    (173, "capability"),
];
/// x32 (with [`X32_BIT`]): the native numbers, and these where x32 has its own (`ptrace`,
/// `kexec_load`, `process_vm_readv/writev`).
#[cfg(target_arch = "x86_64")]
const X32_OWN_GUARDED: [(u32, &str); 4] = [
    (521, "ptrace"),
    (528, "module"),
    (539, "ptrace"),
    (540, "ptrace"),
];
#[cfg(target_arch = "x86_64")]
const COMPAT_GUARDED: [(u32, &str); 23] = [
    (357, "bpf"),
    (26, "ptrace"),
    (347, "ptrace"),
    (348, "ptrace"),
    (438, "ptrace"),
    (128, "module"),
    (350, "module"),
    (129, "module"),
    (283, "module"),
    (21, "mount"),
    (22, "mount"),
    (52, "mount"),
    (217, "mount"),
    (428, "mount"),
    (429, "mount"),
    (430, "mount"),
    (431, "mount"),
    (432, "mount"),
    (433, "mount"),
    (442, "mount"),
    (88, "capability"),
    (110, "capability"),
    (101, "capability"),
];
#[cfg(target_arch = "aarch64")]
const NATIVE_GUARDED: [(u32, &str); 21] = [
    (280, "bpf"),
    (117, "ptrace"),
    (270, "ptrace"),
    (271, "ptrace"),
    (438, "ptrace"),
    (105, "module"),
    (273, "module"),
    (106, "module"),
    (104, "module"),
    (294, "module"),
    (40, "mount"),
    (39, "mount"),
    (41, "mount"),
    (428, "mount"),
    (429, "mount"),
    (430, "mount"),
    (431, "mount"),
    (432, "mount"),
    (433, "mount"),
    (442, "mount"),
    (142, "capability"),
];
#[cfg(target_arch = "aarch64")]
const COMPAT_GUARDED: [(u32, &str); 20] = [
    (386, "bpf"),
    (26, "ptrace"),
    (376, "ptrace"),
    (377, "ptrace"),
    (438, "ptrace"),
    (128, "module"),
    (379, "module"),
    (129, "module"),
    (347, "module"),
    (21, "mount"),
    (52, "mount"),
    (218, "mount"),
    (428, "mount"),
    (429, "mount"),
    (430, "mount"),
    (431, "mount"),
    (432, "mount"),
    (433, "mount"),
    (442, "mount"),
    (88, "capability"),
];

/// `ioctl` of the native ABIs (x32's own number too) and of the 32-bit one: notified only for
/// the requests of [`TTY_INPUT_REQUESTS`].
#[cfg(target_arch = "x86_64")]
const NATIVE_IOCTLS: [u32; 2] = [16, X32_BIT | 514];
#[cfg(target_arch = "x86_64")]
const COMPAT_IOCTL: u32 = 54;
#[cfg(target_arch = "aarch64")]
const NATIVE_IOCTLS: [u32; 1] = [29];
#[cfg(target_arch = "aarch64")]
const COMPAT_IOCTL: u32 = 54;
/// `TIOCSTI` (push a byte into a terminal's input) and `TIOCLINUX` (its subcommands paste a
/// console selection): input that the terminal's other programs (the shell the agent was
/// started from) would read as typed and run, outside the agent.
const TTY_INPUT_REQUESTS: [u32; 2] = countersign_ebpf::TTY_INPUT_REQUESTS;

/// Every guarded call of the native architecture's ABIs (on x86_64, x32's too).
fn native_guarded() -> impl Iterator<Item = (u32, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    let x32 = NATIVE_GUARDED
        .iter()
        .chain(&X32_OWN_GUARDED)
        .map(|(n, k)| (X32_BIT | n, *k));
    #[cfg(not(target_arch = "x86_64"))]
    let x32 = std::iter::empty();
    NATIVE_GUARDED.iter().copied().chain(x32)
}

/// The kind of tamper attempt a notified call is (`None`: not one the filter refuses).
#[must_use]
pub fn guarded(arch: u32, nr: i32) -> Option<&'static str> {
    let nr = nr as u32;
    let found = |(n, k): (u32, &'static str)| (n == nr).then_some(k);
    // The filter sends an `ioctl` only for a terminal-input request.
    if (arch == NATIVE_ARCH && NATIVE_IOCTLS.contains(&nr))
        || (arch == COMPAT_ARCH && nr == COMPAT_IOCTL)
    {
        return Some("tty");
    }
    if arch == NATIVE_ARCH {
        native_guarded().find_map(found)
    } else if arch == COMPAT_ARCH {
        COMPAT_GUARDED.iter().copied().find_map(found)
    } else {
        None
    }
}

/// What a notified system call is, as the daemon needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// `execveat` (dirfd, path, argv, envp, flags) rather than `execve` (path, argv, envp).
    pub at: bool,
    /// Pointers in the agent's memory are 4 bytes wide (a 32-bit or x32 caller).
    pub narrow: bool,
}

impl Call {
    /// `None` for anything the filter should not have sent.
    #[must_use]
    pub fn of(arch: u32, nr: i32) -> Option<Self> {
        let nr = nr as u32;
        let (native, compat) = (arch == NATIVE_ARCH, arch == COMPAT_ARCH);
        if !(native && NATIVE_EXECS.contains(&nr) || compat && COMPAT_EXECS.contains(&nr)) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        let x32 = native && nr & X32_BIT != 0;
        #[cfg(not(target_arch = "x86_64"))]
        let x32 = false;
        Some(Self {
            at: EXECVEATS.contains(&nr),
            narrow: compat || x32,
        })
    }
}

/// `connect` of the native ABI (and on x86_64 of x32). A launched agent's connects are
/// notified unless their address has the length of an IPv4 or IPv6 one
/// ([`IP_ADDRESS_LENGTHS`]): the kernel's own hooks decide network connects, the daemon
/// decides local sockets (`AF_UNIX`) before they are made. The 32-bit entry's connects are
/// not notified (`socketcall` carries its arguments in memory).
#[cfg(target_arch = "x86_64")]
const NATIVE_CONNECTS: [u32; 2] = [42, X32_BIT | 42];
#[cfg(target_arch = "aarch64")]
const NATIVE_CONNECTS: [u32; 1] = [203];
/// `sizeof(struct sockaddr_in)` and `sizeof(struct sockaddr_in6)`.
const IP_ADDRESS_LENGTHS: [u32; 2] = [16, 28];

/// `listen` of the native ABI (and on x86_64 of x32), and of the 32-bit ABI's direct call
/// (its `socketcall` carries the arguments in memory). A launched agent's listen is decided
/// before it is made, and one on IPv4/IPv6 made by the daemon: it takes a copy of the
/// descriptor, reads the address its socket is bound to, and, if the listen may go on, calls
/// `listen` on that copy (the same socket) and answers 0 — the call never runs in the agent,
/// so a socket another thread puts in the descriptor meanwhile is never the one that listens
/// (the kernel's check after the call kills one left there).
#[cfg(target_arch = "x86_64")]
const NATIVE_LISTENS: [u32; 2] = [50, X32_BIT | 50];
#[cfg(target_arch = "aarch64")]
const NATIVE_LISTENS: [u32; 1] = [201];
#[cfg(target_arch = "x86_64")]
const COMPAT_LISTEN: u32 = 363;
#[cfg(target_arch = "aarch64")]
const COMPAT_LISTEN: u32 = 284;

/// Whether a notified call is a `listen` (see [`NATIVE_LISTENS`]).
#[must_use]
pub fn is_listen(arch: u32, nr: i32) -> bool {
    let nr = nr as u32;
    (arch == NATIVE_ARCH && NATIVE_LISTENS.contains(&nr))
        || (arch == COMPAT_ARCH && nr == COMPAT_LISTEN)
}

/// Whether a notified call is a `connect` (see [`NATIVE_CONNECTS`]).
#[must_use]
pub fn is_connect(arch: u32, nr: i32) -> bool {
    arch == NATIVE_ARCH && NATIVE_CONNECTS.contains(&(nr as u32))
}

/// The filter: every exec system call of every ABI, every guarded one and every `listen` go to
/// the listener, and so does a native `connect` whose address length is not an IP address's;
/// the rest is allowed.
fn program() -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ALLOW,
        SECCOMP_RET_USER_NOTIF,
    };
    // Offsets in `struct seccomp_data`: the number, the architecture, the low halves of the
    // second argument (`ioctl`'s request) and the third (`connect`'s address length;
    // little-endian).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG1: u32 = 24;
    const ARG2: u32 = 32;
    /// Where a jump goes: the next instruction or a named place.
    #[derive(Clone, Copy, PartialEq)]
    enum To {
        Next,
        At(&'static str),
    }
    struct Insn {
        code: u32,
        k: u32,
        jt: To,
        jf: To,
    }
    let load = |k| Insn {
        code: BPF_LD | BPF_W | BPF_ABS,
        k,
        jt: To::Next,
        jf: To::Next,
    };
    let ret = |k| Insn {
        code: BPF_RET | BPF_K,
        k,
        jt: To::Next,
        jf: To::Next,
    };
    let jeq = |k, jt, jf| Insn {
        code: BPF_JMP | BPF_JEQ | BPF_K,
        k,
        jt,
        jf,
    };
    let mut code: Vec<(Option<&'static str>, Insn)> = Vec::new();
    let mut at = |place: Option<&'static str>, i: Insn| code.push((place, i));
    at(None, load(ARCH));
    at(None, jeq(NATIVE_ARCH, To::At("native"), To::Next));
    at(None, jeq(COMPAT_ARCH, To::At("compat"), To::At("allow")));
    at(Some("native"), load(NR));
    for nr in NATIVE_EXECS
        .iter()
        .copied()
        .chain(native_guarded().map(|(n, _)| n))
    {
        at(None, jeq(nr, To::At("notify"), To::Next));
    }
    for nr in NATIVE_CONNECTS {
        at(None, jeq(nr, To::At("connect"), To::Next));
    }
    for nr in NATIVE_LISTENS {
        at(None, jeq(nr, To::At("notify"), To::Next));
    }
    for nr in NATIVE_IOCTLS {
        at(None, jeq(nr, To::At("ioctl"), To::Next));
    }
    at(None, ret(SECCOMP_RET_ALLOW));
    at(Some("compat"), load(NR));
    for nr in COMPAT_EXECS
        .iter()
        .copied()
        .chain(COMPAT_GUARDED.iter().map(|(n, _)| *n))
    {
        at(None, jeq(nr, To::At("notify"), To::Next));
    }
    at(None, jeq(COMPAT_LISTEN, To::At("notify"), To::Next));
    at(None, jeq(COMPAT_IOCTL, To::At("ioctl"), To::At("allow")));
    at(Some("ioctl"), load(ARG1));
    for request in TTY_INPUT_REQUESTS {
        at(None, jeq(request, To::At("notify"), To::Next));
    }
    at(None, ret(SECCOMP_RET_ALLOW));
    at(Some("connect"), load(ARG2));
    for len in IP_ADDRESS_LENGTHS {
        at(None, jeq(len, To::At("allow"), To::Next));
    }
    at(Some("notify"), ret(SECCOMP_RET_USER_NOTIF));
    at(Some("allow"), ret(SECCOMP_RET_ALLOW));
    let place = |name: &str| {
        code.iter()
            .position(|(p, _)| *p == Some(name))
            .expect("a place the filter names")
    };
    let offset = |here: usize, to: To| match to {
        To::Next => 0,
        To::At(name) => u8::try_from(place(name) - here - 1).expect("a short filter"),
    };
    code.iter()
        .enumerate()
        .map(|(here, (_, i))| libc::sock_filter {
            code: i.code as u16,
            jt: offset(here, i.jt),
            jf: offset(here, i.jf),
            k: i.k,
        })
        .collect()
}

/// Installs the filter on the calling process (the launcher, single-threaded, before it
/// executes the agent) and returns its listener. Without `CAP_SYS_ADMIN` the kernel requires
/// `no_new_privs` first: set-user-id programs then no longer gain privileges in the agent.
pub fn install_filter() -> io::Result<OwnedFd> {
    let filter = program();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    let base = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    let attempt = |flags: libc::c_ulong| {
        // SAFETY: `prog` points at `filter`, alive for the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &raw const prog,
            )
        };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a new descriptor the kernel just gave us.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        }
    };
    let install = || match attempt(base | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV) {
        // Before 5.19: waits that a signal interrupts restart the call, which is notified
        // again; nothing runs in between.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => attempt(base),
        other => other,
    };
    match install() {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            install()
        }
        other => other,
    }
}

/// Whether this kernel can hold execs this way: user notifications (5.0), `pidfd_open` (5.3)
/// and `pidfd_getfd` (5.6). The reason if not.
pub fn available() -> Result<(), String> {
    let mut action = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: the argument points at a u32, as the operation expects.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &raw mut action,
        )
    };
    if r != 0 {
        return Err(format!(
            "seccomp user notifications: {}",
            io::Error::last_os_error()
        ));
    }
    // Taking a descriptor of another process is a ptrace-class access.
    if std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").is_ok_and(|v| v.trim() == "3")
    {
        return Err("kernel.yama.ptrace_scope=3 forbids taking a launcher's listener".into());
    }
    // A bad descriptor tells the call exists (EBADF), ENOSYS that it does not.
    // SAFETY: no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0) };
    let e = io::Error::last_os_error();
    if r < 0 && e.raw_os_error() == Some(libc::ENOSYS) {
        return Err("pidfd_getfd: not in this kernel (5.6+)".into());
    }
    Ok(())
}

/// Takes descriptor `fd` of process `pid` (the launcher, which is waiting for the answer)
/// and checks it is a seccomp listener.
pub fn take_listener(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let listener = take_fd(pid, fd)?;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))?;
    if target.as_os_str() != "anon_inode:seccomp notify" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "descriptor {fd} of pid {pid} is {}, not a seccomp listener",
                target.display()
            ),
        ));
    }
    Ok(listener)
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_getfd`): the same open file.
pub fn take_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: as above.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, with close-on-exec set by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// One notified system call, waiting for [`respond`].
#[derive(Clone)]
pub struct Notification {
    pub listener: Arc<OwnedFd>,
    pub id: u64,
    /// The calling thread (in the daemon's pid namespace).
    pub tid: u32,
    pub arch: u32,
    pub nr: i32,
    pub args: [u64; 6],
}

/// Watches `listener` on a thread of its own, sending each notification to `tx`, until the
/// filter has no task left (or the daemon stops).
/// `live` counts the watched listeners: the caller counted this one; the thread uncounts it
/// when it ends.
/// What the kernel allows by itself (`fast`) is answered here, without the main loop.
pub fn watch(
    listener: OwnedFd,
    tx: mpsc::Sender<Notification>,
    live: Arc<AtomicUsize>,
    fast: Option<Arc<ExecFastPath>>,
) -> io::Result<()> {
    struct Uncount(Arc<AtomicUsize>);
    impl Drop for Uncount {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let listener = Arc::new(listener);
    std::thread::Builder::new()
        .name("cs-notify".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _uncount = Uncount(live);
            loop {
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                let n = unsafe { libc::poll(&raw mut pfd, 1, POLL_MS) };
                if n < 0 {
                    if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return;
                }
                if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    return;
                }
                if tx.is_closed() {
                    return;
                }
                if pfd.revents & libc::POLLIN == 0 {
                    continue;
                }
                // SAFETY: zeroed, as the kernel requires.
                let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
                // SAFETY: the ioctl fills `n`.
                let r = unsafe {
                    libc::ioctl(
                        listener.as_raw_fd(),
                        libc::SECCOMP_IOCTL_NOTIF_RECV,
                        &raw mut n,
                    )
                };
                if r != 0 {
                    // ENOENT: the task went away (killed) before we took its call.
                    continue;
                }
                let n = Notification {
                    listener: listener.clone(),
                    id: n.id,
                    tid: n.pid,
                    arch: n.data.arch,
                    nr: n.data.nr,
                    args: n.data.args,
                };
                if fast.as_deref().is_some_and(|f| goes_on_by_itself(f, &n))
                    && respond(&listener, n.id, Reply::Continue).is_ok()
                {
                    continue;
                }
                let sent = tx.blocking_send(n);
                if sent.is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
}

/// What a notified exec names, read from the caller's memory while it waits.
pub struct Named {
    /// The path as passed, and where it and argv are in the caller's memory.
    pub filename: Vec<u8>,
    pub filename_at: u64,
    pub argv_at: u64,
    /// The name the kernel gives the program (`/dev/fd/N[/path]` through a descriptor):
    /// what a script's interpreter gets as its argument.
    pub kernel_name: Vec<u8>,
    /// The file, resolved as the kernel would from the caller (`None`: nothing there, the
    /// kernel fails the call).
    pub file: Option<FileId>,
    /// For a `#!` script: its interpreter and argument, and the interpreter's file.
    pub script: Option<(Vec<u8>, Option<Vec<u8>>)>,
    pub interp: Option<FileId>,
}

impl Named {
    /// Reads the filename and resolves it from the caller's root, cwd or `execveat`
    /// descriptor.
    pub fn read(n: &Notification) -> Result<Self, String> {
        let call = Call::of(n.arch, n.nr)
            .ok_or_else(|| format!("not an exec (arch {:#x} nr {})", n.arch, n.nr))?;
        let narrow = |v: u64| if call.narrow { v & 0xffff_ffff } else { v };
        let (dirfd, filename_at, argv_at, flags) = if call.at {
            (
                n.args[0] as i32,
                narrow(n.args[1]),
                narrow(n.args[2]),
                n.args[4] as i32,
            )
        } else {
            (libc::AT_FDCWD, narrow(n.args[0]), narrow(n.args[1]), 0)
        };
        let (filename, cut) = enrich::held_cbytes(n.tid, filename_at)
            .ok_or("its filename cannot be read from the caller's memory")?;
        if cut {
            return Err("its filename is too long to show".into());
        }
        let name = String::from_utf8_lossy(&filename).into_owned();
        let relative = !filename.starts_with(b"/");
        let (path, kernel_name) = if call.at && dirfd != libc::AT_FDCWD && relative {
            if filename.is_empty() && flags & libc::AT_EMPTY_PATH == 0 {
                // The kernel answers ENOENT.
                (None, Vec::new())
            } else if filename.is_empty() {
                (
                    Some(PathBuf::from(format!("/proc/{}/fd/{dirfd}", n.tid))),
                    format!("/dev/fd/{dirfd}").into_bytes(),
                )
            } else {
                (
                    Some(PathBuf::from(format!("/proc/{}/fd/{dirfd}/{name}", n.tid))),
                    [format!("/dev/fd/{dirfd}/").as_bytes(), &filename].concat(),
                )
            }
        } else {
            (
                Some(enrich::resolve_in_task(n.tid, &name)),
                filename.clone(),
            )
        };
        let file = path.as_deref().and_then(enrich::file_id);
        let script = file.and(path.as_deref()).and_then(enrich::shebang_bytes);
        let interp = script.as_ref().and_then(|(i, _)| {
            enrich::file_id(&enrich::resolve_in_task(n.tid, &String::from_utf8_lossy(i)))
        });
        Ok(Self {
            filename,
            filename_at,
            argv_at,
            kernel_name,
            file,
            script,
            interp,
        })
    }

    /// Whether the call goes on without a request: nothing is there to run (the kernel fails
    /// it; a file that appears meanwhile is not approved, and the kernel's check refuses to
    /// run it), or the kernel allows the file by itself (`allows`) — a script and its
    /// interpreter both.
    pub fn goes_on(&self, allows: impl Fn(FileId) -> bool) -> bool {
        match (self.file, &self.script, self.interp) {
            (None, _, _) | (Some(_), Some(_), None) => true,
            (Some(f), None, _) => allows(f),
            (Some(f), Some(_), Some(i)) => allows(f) && allows(i),
        }
    }
}

/// Whether the watcher thread may answer `n` "go on" by itself: a labelled thread's exec the
/// kernel allows without asking (the same test the main loop makes first).
fn goes_on_by_itself(fast: &ExecFastPath, n: &Notification) -> bool {
    let Some(state) = fast.task(n.tid) else {
        return false;
    };
    // A call restarted while held belongs to its request.
    if state.state == countersign_ebpf::STATE_PENDING {
        return false;
    }
    Named::read(n)
        .is_ok_and(|named| named.goes_on(|f| fast.allows(state.label, f.kernel_dev(), f.ino)))
}

/// The answer to a notified call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The system call goes on (the kernel's exec check still applies).
    Continue,
    /// It fails with this errno, having done nothing.
    Fail(i32),
    /// It returns 0: the daemon made the call itself (on the objects it checked, so that
    /// nothing the caller changes in between counts).
    Done,
}

/// Answers notification `id`. An error means the call is no longer waiting (its task died,
/// or a signal interrupted the wait: the call is then notified again).
pub fn respond(listener: &OwnedFd, id: u64, reply: Reply) -> io::Result<()> {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: match reply {
            Reply::Continue | Reply::Done => 0,
            Reply::Fail(errno) => -errno,
        },
        flags: match reply {
            Reply::Continue => libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            Reply::Fail(_) | Reply::Done => 0,
        },
    };
    // SAFETY: the ioctl reads `resp`.
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &raw const resp,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether notification `id` still waits: checked after reading the caller's memory, so that
/// what was read belongs to the task that waits (not to a new task that took over its pid).
#[must_use]
pub fn still_waiting(listener: &OwnedFd, id: u64) -> bool {
    // SAFETY: the ioctl reads the u64.
    unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &raw const id,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter program on one `seccomp_data` (a tiny interpreter of the three
    /// instruction kinds it uses).
    fn run(p: &[libc::sock_filter], arch: u32, nr: u32) -> u32 {
        run_with(p, arch, nr, 0)
    }

    /// Runs the filter on a call whose third argument's low half is `arg2`.
    fn run_with(p: &[libc::sock_filter], arch: u32, nr: u32, arg2: u32) -> u32 {
        run_args(p, arch, nr, 0, arg2)
    }

    /// Runs the filter on a call whose second and third arguments' low halves are given.
    fn run_args(p: &[libc::sock_filter], arch: u32, nr: u32, arg1: u32, arg2: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            match u32::from(i.code) {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    acc = match i.k {
                        0 => nr,
                        4 => arch,
                        24 => arg1,
                        32 => arg2,
                        k => panic!("unexpected load at {k}"),
                    };
                    pc += 1;
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("unexpected instruction {c:#x}"),
            }
        }
    }

    #[test]
    fn every_exec_and_guarded_call_of_every_abi_is_notified_and_nothing_else() {
        let p = program();
        for nr in NATIVE_EXECS {
            assert_eq!(
                run(&p, NATIVE_ARCH, nr),
                libc::SECCOMP_RET_USER_NOTIF,
                "{nr}"
            );
            assert!(Call::of(NATIVE_ARCH, nr as i32).is_some());
        }
        for nr in COMPAT_EXECS {
            assert_eq!(
                run(&p, COMPAT_ARCH, nr),
                libc::SECCOMP_RET_USER_NOTIF,
                "{nr}"
            );
            assert!(Call::of(COMPAT_ARCH, nr as i32).unwrap().narrow);
        }
        for (nr, _) in native_guarded() {
            assert_eq!(
                run(&p, NATIVE_ARCH, nr),
                libc::SECCOMP_RET_USER_NOTIF,
                "{nr}"
            );
            assert!(guarded(NATIVE_ARCH, nr as i32).is_some());
            assert!(Call::of(NATIVE_ARCH, nr as i32).is_none());
        }
        for (nr, _) in COMPAT_GUARDED {
            assert_eq!(
                run(&p, COMPAT_ARCH, nr),
                libc::SECCOMP_RET_USER_NOTIF,
                "{nr}"
            );
        }
        assert_eq!(
            guarded(NATIVE_ARCH, NATIVE_GUARDED[0].0 as i32),
            Some("bpf")
        );
        assert_eq!(guarded(NATIVE_ARCH, NATIVE_EXECS[0] as i32), None);
        assert_eq!(guarded(0x1234, NATIVE_GUARDED[0].0 as i32), None);
        for nr in [0, 1, 2, 56, 57, 58, 60, 323, 435] {
            assert_eq!(run(&p, NATIVE_ARCH, nr), libc::SECCOMP_RET_ALLOW, "{nr}");
            assert_eq!(run(&p, COMPAT_ARCH, nr), libc::SECCOMP_RET_ALLOW, "{nr}");
            assert!(Call::of(NATIVE_ARCH, nr as i32).is_none());
        }
        for nr in NATIVE_LISTENS {
            assert_eq!(
                run(&p, NATIVE_ARCH, nr),
                libc::SECCOMP_RET_USER_NOTIF,
                "{nr}"
            );
            assert!(is_listen(NATIVE_ARCH, nr as i32));
            assert!(Call::of(NATIVE_ARCH, nr as i32).is_none());
            assert!(guarded(NATIVE_ARCH, nr as i32).is_none());
        }
        assert_eq!(
            run(&p, COMPAT_ARCH, COMPAT_LISTEN),
            libc::SECCOMP_RET_USER_NOTIF
        );
        assert!(is_listen(COMPAT_ARCH, COMPAT_LISTEN as i32));
        assert!(!is_listen(NATIVE_ARCH, COMPAT_LISTEN as i32));
        // A native exec number under another architecture is not an exec there.
        assert_eq!(run(&p, 0x1234, NATIVE_EXECS[0]), libc::SECCOMP_RET_ALLOW);
    }

    /// Pushing input into a terminal (`TIOCSTI`, `TIOCLINUX`) goes to the daemon, which refuses
    /// it; every other `ioctl` is the kernel's, in every ABI.
    #[test]
    fn terminal_input_ioctls_are_notified_and_no_other() {
        let p = program();
        let abis = NATIVE_IOCTLS
            .iter()
            .map(|nr| (NATIVE_ARCH, *nr))
            .chain([(COMPAT_ARCH, COMPAT_IOCTL)]);
        for (arch, nr) in abis {
            for request in TTY_INPUT_REQUESTS {
                assert_eq!(
                    run_args(&p, arch, nr, request, 0),
                    libc::SECCOMP_RET_USER_NOTIF,
                    "{arch:#x} {nr} {request:#x}"
                );
            }
            // TCGETS, FIONREAD, TIOCGWINSZ, FIONBIO.
            for request in [0x5401, 0x541B, 0x5413, 0x5421] {
                assert_eq!(
                    run_args(&p, arch, nr, request, 0),
                    libc::SECCOMP_RET_ALLOW,
                    "{arch:#x} {nr} {request:#x}"
                );
            }
            assert_eq!(guarded(arch, nr as i32), Some("tty"));
            assert!(Call::of(arch, nr as i32).is_none());
        }
    }

    /// A native `connect` goes to the daemon unless its address has an IPv4 or IPv6
    /// address's length; the 32-bit ABI's number is another call there.
    #[test]
    fn connects_with_other_address_lengths_are_notified() {
        let p = program();
        for nr in NATIVE_CONNECTS {
            assert!(is_connect(NATIVE_ARCH, nr as i32));
            for len in [16, 28] {
                assert_eq!(
                    run_with(&p, NATIVE_ARCH, nr, len),
                    libc::SECCOMP_RET_ALLOW,
                    "{nr} {len}"
                );
            }
            for len in [0, 2, 3, 17, 24, 110, 128] {
                assert_eq!(
                    run_with(&p, NATIVE_ARCH, nr, len),
                    libc::SECCOMP_RET_USER_NOTIF,
                    "{nr} {len}"
                );
            }
            assert_eq!(run_with(&p, COMPAT_ARCH, nr, 110), libc::SECCOMP_RET_ALLOW);
            assert!(!is_connect(COMPAT_ARCH, nr as i32));
        }
        // Other calls are not looked at by their third argument.
        assert_eq!(run_with(&p, NATIVE_ARCH, 0, 110), libc::SECCOMP_RET_ALLOW);
    }

    /// What goes on without a request: nothing there to run, or what the kernel allows — a
    /// script only with its interpreter.
    #[test]
    fn what_goes_on_without_a_request() {
        let (f, i) = (FileId { dev: 1, ino: 1 }, FileId { dev: 1, ino: 2 });
        let named = |file, script: bool, interp| Named {
            filename: Vec::new(),
            filename_at: 0,
            argv_at: 0,
            kernel_name: Vec::new(),
            file,
            script: script.then(|| (b"/bin/sh".to_vec(), None)),
            interp,
        };
        let none = |_: FileId| false;
        let all = |_: FileId| true;
        let only_f = |x: FileId| x == f;
        assert!(named(None, false, None).goes_on(none));
        assert!(!named(Some(f), false, None).goes_on(none));
        assert!(named(Some(f), false, None).goes_on(all));
        // A script whose interpreter is missing fails by itself.
        assert!(named(Some(f), true, None).goes_on(none));
        assert!(!named(Some(f), true, Some(i)).goes_on(only_f));
        assert!(named(Some(f), true, Some(i)).goes_on(all));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_and_ia32_calls_have_narrow_pointers() {
        let x32 = Call::of(NATIVE_ARCH, (X32_BIT | 520) as i32).unwrap();
        assert!(x32.narrow && !x32.at);
        let x32at = Call::of(NATIVE_ARCH, (X32_BIT | 545) as i32).unwrap();
        assert!(x32at.narrow && x32at.at);
        let ia32at = Call::of(COMPAT_ARCH, 358).unwrap();
        assert!(ia32at.narrow && ia32at.at);
        // A native number that is not an exec under the compat ABI.
        assert!(Call::of(COMPAT_ARCH, 59).is_none());
        // x32's own numbers of guarded calls, and the shared ones with the x32 bit.
        assert_eq!(guarded(NATIVE_ARCH, (X32_BIT | 521) as i32), Some("ptrace"));
        assert_eq!(guarded(NATIVE_ARCH, (X32_BIT | 321) as i32), Some("bpf"));
        assert_eq!(guarded(COMPAT_ARCH, 357), Some("bpf"));
        assert_eq!(guarded(COMPAT_ARCH, 321), None);
    }

    #[test]
    fn execveat_is_told_apart() {
        assert!(!Call::of(NATIVE_ARCH, NATIVE_EXECS[0] as i32).unwrap().at);
        assert!(Call::of(NATIVE_ARCH, NATIVE_EXECS[1] as i32).unwrap().at);
        assert!(
            !Call::of(NATIVE_ARCH, NATIVE_EXECS[1] as i32)
                .unwrap()
                .narrow
        );
    }
}
