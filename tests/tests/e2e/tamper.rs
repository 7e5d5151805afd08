//! Self-protection: a labelled root agent tries to change, stop, read or step around
//! countersign (`cs-escape tamper-*`, one attempt per run). Each attempt first runs unlabelled
//! as root and must succeed (else the labelled run would prove nothing); labelled, in LSM mode
//! every one is refused and recorded as a signed `tamper` record; in fallback mode exactly
//! what the README states is refused (a launched agent's `bpf`, `ptrace`, module loads and
//! mounts, by its seccomp filter), and the rest is shown to get through, as documented.
use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
};

use countersign_tests::{Daemon, Proc, TestCgroup, WAIT, cgroup2_root, escape_bin};
use serde_json::Value;

/// What the attempts are allowed to touch: a policy file of the daemon's own.
fn start(extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    start_in(extra, None)
}

/// [`start`], in the cgroup `cgroup` if given.
fn start_in(extra: &[&str], cgroup: Option<&Path>) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: agent\n    default: {outcome: escalate}\n",
    )
    .expect("the policy");
    let mut args = vec!["--policy", policy.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let daemon = match cgroup {
        Some(cgroup) => Daemon::start_in_cgroup(&args, cgroup),
        None => Daemon::start_with(&args),
    };
    (daemon, dir)
}

fn escape() -> String {
    escape_bin().to_str().expect("utf-8 path").to_owned()
}

/// The attempt unlabelled, as root: it must succeed.
fn control(args: &[&str]) {
    let out = std::process::Command::new(escape())
        .args(args)
        .output()
        .expect("cs-escape unlabelled");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tampered",
        "`cs-escape {}` does not work even unlabelled on this machine ({}): the labelled run would prove nothing",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The attempt labelled (its own exec approved): what it printed, and whether it was killed.
fn labelled(d: &Daemon, args: &[&str]) -> (String, bool) {
    let bin = escape();
    let mut cmd = vec![bin.as_str()];
    cmd.extend_from_slice(args);
    let mut p = d.labelled("agent", &cmd);
    let exec = d.wait_exec(p.pid(), args[0]);
    d.decide(&exec, "approve");
    let status = p.wait(WAIT);
    (
        p.stdout().trim().to_owned(),
        status.signal() == Some(libc::SIGKILL),
    )
}

/// The refusals by kind that `status` reports.
fn refused(d: &Daemon) -> BTreeMap<String, u64> {
    d.status()["self_protection"]["refused"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `status` counts one more refusal of `attempt` than `before`.
fn wait_counted(d: &Daemon, attempt: &str, before: &BTreeMap<String, u64>) {
    let deadline = std::time::Instant::now() + WAIT;
    let was = before.get(attempt).copied().unwrap_or(0);
    while refused(d).get(attempt).copied().unwrap_or(0) <= was {
        assert!(
            std::time::Instant::now() < deadline,
            "no {attempt} refusal counted: {:?}\n{}",
            refused(d),
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
}

/// What one attempt must meet in this mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Refused (`EPERM`, or `EACCES` where the kernel reports a refused access so) and
    /// counted as this kind of tamper attempt.
    Refused(&'static str),
    /// Not refused (fallback mode: a stated limit, README "Modes and their limits").
    GetsThrough,
}

/// Runs the attempt unlabelled (it must succeed), then labelled, and checks `expect`.
fn attempt(d: &Daemon, args: &[&str], expect: Expect) {
    control(args);
    let before = refused(d);
    let (stdout, killed) = labelled(d, args);
    match expect {
        Expect::Refused(kind) => {
            // `/proc/PID/mem` reports a refused access as EACCES.
            let refused = [libc::EPERM, libc::EACCES].map(|e| format!("error {e}"));
            assert!(
                refused.contains(&stdout) && !killed,
                "TAMPER: `cs-escape {}` labelled printed {stdout:?} (killed: {killed})",
                args.join(" ")
            );
            wait_counted(d, kind, &before);
        }
        Expect::GetsThrough => assert_eq!(
            stdout,
            "tampered",
            "fallback mode: `cs-escape {}` is documented to get through",
            args.join(" ")
        ),
    }
}

/// Every attempt on countersign, in one daemon: refused in LSM mode; in fallback mode what
/// a launched agent's filter refuses is refused and the rest documented as getting through.
#[test]
fn a_labelled_root_cannot_tamper_with_countersign() {
    // The test VMs have no resolver configuration: one is made (before the daemon guards it)
    // so that changing it can be tried; a machine's own is left as it is.
    let resolv_conf = Path::new("/etc/resolv.conf");
    if std::env::var("COUNTERSIGN_E2E_MODE").as_deref() == Ok("lsm") && !resolv_conf.exists() {
        std::fs::write(resolv_conf, "nameserver 127.0.0.53\n").expect("a resolv.conf");
    }
    let (d, dir) = start(&[]);
    let lsm = d.is_lsm();
    let status = d.status();
    assert_eq!(
        status["self_protection"]["contained"], lsm,
        "{}",
        status["self_protection"]
    );
    // The daemon's memory (the host key in it) never goes to swap, where a swap file is a file
    // root may read: locked, in either mode.
    assert_eq!(
        status["self_protection"]["memory_locked"], true,
        "{}",
        status["self_protection"]
    );
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", d.pid())).expect("the daemon's status");
    let locked_kb: u64 = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmLck in /proc/PID/status");
    assert!(
        locked_kb > 0,
        "the daemon's memory is not locked:\n{proc_status}"
    );
    // In fallback mode the filter refuses these; the rest is not contained.
    let filtered = |kind| Expect::Refused(kind);
    let hooked = |kind| {
        if lsm {
            Expect::Refused(kind)
        } else {
            Expect::GetsThrough
        }
    };
    let daemon = d.pid().to_string();
    let victim: Proc = d.unlabelled(&["sleep", "600"]);
    let victim_pid = victim.pid().to_string();
    let pin = d.pin_dir().join("CS_CONFIG");
    let pin = pin.to_str().expect("utf-8 path");
    let policy = dir.path().join("policy.yaml");
    let policy = policy.to_str().expect("utf-8 path");
    let key = d.dir().join("host.key");
    let log = d.dir().join("decisions.jsonl");
    let spool = d.spool_dir();
    let mnt = tempfile::tempdir().expect("a mount point");

    attempt(&d, &["tamper-bpf", pin], filtered("bpf"));
    attempt(&d, &["tamper-ptrace", &victim_pid], filtered("ptrace"));
    attempt(&d, &["tamper-ptrace", &daemon], filtered("ptrace"));
    attempt(&d, &["tamper-pidfd-getfd", &daemon], filtered("ptrace"));
    attempt(
        &d,
        &["tamper-mount", mnt.path().to_str().expect("utf-8 path")],
        filtered("mount"),
    );
    // Loading a module takes CAP_SYS_MODULE, which LSM mode never grants a labelled task
    // (the load hooks refuse it too); the fallback's filter refuses the call.
    attempt(
        &d,
        &["tamper-module"],
        filtered(if lsm { "capability" } else { "module" }),
    );
    attempt(&d, &["tamper-mem", &victim_pid], hooked("ptrace"));
    attempt(&d, &["tamper-signal", &daemon], hooked("signal"));
    attempt(&d, &["tamper-write", policy], hooked("file-write"));
    // How the daemon runs: a CPU time limit would have the kernel kill it, a limit of no
    // open files or the lowest priority would leave it unable to decide.
    for setting in ["tamper-limits", "tamper-nice", "tamper-affinity"] {
        attempt(&d, &[setting, &daemon], hooked("process"));
    }
    attempt(
        &d,
        &["tamper-read", key.to_str().expect("utf-8 path")],
        hooked("file-read"),
    );
    attempt(
        &d,
        &["tamper-rename", log.to_str().expect("utf-8 path")],
        hooked("file-write"),
    );
    attempt(
        &d,
        &["tamper-create", spool.to_str().expect("utf-8 path")],
        hooked("file-write"),
    );
    attempt(&d, &["tamper-rename", pin], hooked("file-write"));
    attempt(&d, &["tamper-sysctl"], hooked("sysctl"));
    // The daemon's own /proc files (its OOM score: it is exempt from the OOM killer where
    // its root may lower it, which takes CAP_SYS_RESOURCE; else it says so).
    let oom = format!("/proc/{daemon}/oom_score_adj");
    let score = std::fs::read_to_string(&oom).expect("the daemon's OOM score");
    assert!(
        score.trim() == "-1000"
            || d.log()
                .contains("could not exempt the daemon from the OOM killer"),
        "OOM score {score}"
    );
    attempt(&d, &["tamper-write", &oom], hooked("ptrace"));
    attempt(&d, &["tamper-truncate", policy], hooked("file-write"));
    // Extended attributes and POSIX ACLs (an ACL could hand another user write access).
    attempt(&d, &["tamper-xattr", policy], hooked("file-write"));
    attempt(&d, &["tamper-acl", policy], hooked("file-write"));
    // Input pushed into the terminal the agent was started from, which its shell would run.
    attempt(&d, &["tamper-tty"], filtered("tty"));
    // Locks and leases on countersign's files: a lock on the daemon's lock file would keep
    // a restarted daemon from starting, a lease makes the daemon's next open wait.
    attempt(&d, &["tamper-lock", policy], hooked("file-lock"));
    attempt(&d, &["tamper-lease", policy], hooked("file-lock"));
    // fanotify's permission events: the holder of the mark decides every open beneath it,
    // the daemon's included.
    attempt(
        &d,
        &["tamper-fanotify", mnt.path().to_str().expect("utf-8 path")],
        hooked("file-gate"),
    );
    // A service that opens files for its callers (udisks' `OpenDevice`, a root helper):
    // the policy, opened for writing by a process of the host and passed in.
    let passer = Passer::new(Path::new(policy));
    attempt(
        &d,
        &["tamper-receive", passer.name()],
        hooked("file-passed"),
    );
    drop(passer);
    // The host's network configuration: with a NAT rule an allowed destination could lead
    // anywhere. In a network namespace of its own the capability stays the agent's.
    attempt(&d, &["tamper-net-admin"], hooked("capability"));
    control(&["net-admin-own-namespace"]);
    let (own, _) = labelled(&d, &["net-admin-own-namespace"]);
    assert_eq!(
        own, "tampered",
        "CAP_NET_ADMIN in the agent's own namespace"
    );
    // The host's resolvers name destinations: a labelled root may neither answer in their
    // place (port 53) nor point the host at a resolver of its own.
    attempt(&d, &["tamper-bind-dns", "127.53.53.53"], hooked("dns"));
    attempt(&d, &["tamper-bind-dns", "::1"], hooked("dns"));
    if resolv_conf.exists() {
        attempt(
            &d,
            &["tamper-write", "/etc/resolv.conf"],
            hooked("file-write"),
        );
    } else {
        eprintln!("this machine has no /etc/resolv.conf: that attempt is not made");
    }
    // tracefs, one of the file systems that are kernel settings as a whole (the daemon
    // mounts it where it is missing).
    let marker = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .map(|d| Path::new(d).join("trace_marker"))
        .into_iter()
        .find(|p| p.exists())
        .expect("tracefs is mounted (the daemon needs it)");
    attempt(
        &d,
        &["tamper-write", marker.to_str().expect("utf-8 path")],
        hooked("sysctl"),
    );
    // binfmt_misc: a handler registered there runs its program for every process that
    // execs a matching file, root's included. Mounted for the attempt in LSM mode (the VMs'
    // own kernel), where it usually is on a distribution.
    let register = Path::new("/proc/sys/fs/binfmt_misc/register");
    if lsm && !register.exists() {
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (fs, dir) = (c("binfmt_misc"), c("/proc/sys/fs/binfmt_misc"));
        // SAFETY: NUL-terminated strings; no data.
        unsafe { libc::mount(fs.as_ptr(), dir.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    }
    if register.exists() {
        attempt(
            &d,
            &["tamper-write", register.to_str().expect("utf-8 path")],
            hooked("sysctl"),
        );
    } else {
        eprintln!("binfmt_misc is not mounted here: that attempt is not made");
    }
    if Path::new("/sys/kernel/uevent_helper").exists() {
        attempt(&d, &["tamper-sysfs"], hooked("sysctl"));
    } else {
        eprintln!("this kernel has no /sys/kernel/uevent_helper: the sysfs attempt is not made");
    }

    // What takes a capability no agent is granted, and what reaches countersign's files or
    // keys beneath the file systems: kernel memory, a disk, a whole processor's samples.
    attempt(&d, &["tamper-reboot"], filtered("capability"));
    attempt(&d, &["tamper-clock"], hooked("capability"));
    attempt(
        &d,
        &["tamper-mknod", mnt.path().to_str().expect("utf-8 path")],
        hooked("capability"),
    );
    attempt(&d, &["tamper-perf"], hooked("perf"));
    if Path::new("/proc/kcore").exists() {
        attempt(&d, &["tamper-kcore"], hooked("capability"));
    } else {
        eprintln!("this kernel has no /proc/kcore: the kernel memory attempt is not made");
    }
    // Disks, by nodes of our own (a disk need not exist: refused is refused before the
    // driver is asked), in /dev where device nodes work: a block device, and the character
    // device of SCSI generic commands where the kernel has it.
    let nodes = DeviceNodes::new();
    let block = nodes.make("block", libc::S_IFBLK, 7, 0);
    attempt(&d, &["tamper-disk", &block], hooked("device"));
    let devices = std::fs::read_to_string("/proc/devices").expect("/proc/devices");
    match char_major(&devices, &["bsg", "sg"]) {
        Some(major) => {
            let raw = nodes.make("raw", libc::S_IFCHR, major, 0);
            attempt(&d, &["tamper-disk", &raw], hooked("device"));
        }
        None => eprintln!("this kernel has no SCSI generic driver: that attempt is not made"),
    }

    // Not everything is refused: a signal to a process that is not countersign's, and
    // opening files that are not countersign's, are the agent's own business.
    let (stdout, _) = labelled(&d, &["tamper-signal", &victim_pid]);
    assert_eq!(stdout, "tampered");
    let (stdout, _) = labelled(&d, &["tamper-nice", &victim_pid]);
    assert_eq!(
        stdout, "tampered",
        "another process's priority is the agent's business"
    );
    let own = mnt.path().join("own");
    std::fs::write(&own, b"").expect("a file of the agent's");
    let (stdout, _) = labelled(&d, &["tamper-write", own.to_str().expect("utf-8 path")]);
    assert_eq!(stdout, "tampered");
    let (stdout, _) = labelled(&d, &["tamper-write", "/proc/self/oom_score_adj"]);
    assert_eq!(
        stdout, "tampered",
        "a process's own /proc files are its own"
    );

    // Each refusal is a signed `tamper` record, and the chain verifies.
    let records = super::records::spooled_records(&d.spool_dir());
    let tampers: Vec<&Value> = records
        .iter()
        .filter(|r| r["body"]["type"] == "tamper")
        .collect();
    let bpf = tampers
        .iter()
        .find(|r| r["body"]["attempt"] == "bpf")
        .unwrap_or_else(|| panic!("no bpf tamper record: {tampers:?}"));
    assert_eq!(bpf["body"]["label"], "agent", "{bpf}");
    assert_eq!(bpf["body"]["applied"], "eperm", "{bpf}");
    assert_eq!(
        bpf["body"]["by"],
        if lsm { "kernel" } else { "seccomp" },
        "{bpf}"
    );
    // The process may be gone before the daemon reads its executable; its name stays.
    assert_eq!(bpf["body"]["comm"], "cs-escape", "{bpf}");
    if lsm {
        let read = tampers
            .iter()
            .find(|r| r["body"]["attempt"] == "file-read")
            .unwrap_or_else(|| panic!("no file-read tamper record: {tampers:?}"));
        assert_eq!(
            read["body"]["target"],
            key.to_str().expect("utf-8 path"),
            "{read}"
        );
        let passed = tampers
            .iter()
            .find(|r| r["body"]["attempt"] == "file-passed")
            .unwrap_or_else(|| panic!("no file-passed tamper record: {tampers:?}"));
        assert_eq!(
            passed["body"]["target"],
            format!(
                "{policy}, passed in by another process (opening it would be refused: file-write)"
            ),
            "{passed}"
        );
    }
    d.assert_records_verify();
    assert!(Path::new(policy).exists() && key.exists());
}

/// An unprivileged agent and a root service that opens files for its callers: the
/// descriptor of countersign's policy, open for writing, that `nobody` could never open
/// itself, is not installed for a labelled `nobody` either (LSM mode; fallback mode does
/// not see descriptors passed in).
#[test]
fn a_labelled_nobody_is_not_passed_countersign_files() {
    use std::os::unix::process::CommandExt as _;
    const NOBODY: u32 = 65534;
    let (d, dir) = start(&[]);
    let policy = dir.path().join("policy.yaml");
    let passer = Passer::new(&policy);
    let bin = d.for_other_users(&countersign_tests::escape_bin(), "cs-escape-for-nobody");
    let bin = bin.to_str().expect("utf-8 path");
    let out = std::process::Command::new(bin)
        .args(["tamper-receive", passer.name()])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("cs-escape unlabelled");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tampered",
        "unlabelled, nobody is not passed the descriptor here: the labelled run would prove nothing ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let before = refused(&d);
    let mut p = d.labelled_as(NOBODY, "agent", &[bin, "tamper-receive", passer.name()]);
    let exec = d.wait_exec(p.pid(), bin);
    d.decide(&exec, "approve");
    p.wait(WAIT);
    if d.is_lsm() {
        assert_eq!(
            p.stdout().trim(),
            format!("error {}", libc::EPERM),
            "TAMPER: a labelled nobody was passed a writable descriptor of the policy"
        );
        wait_counted(&d, "file-passed", &before);
    } else {
        assert_eq!(
            p.stdout().trim(),
            "tampered",
            "fallback mode: documented to get through"
        );
    }
}

/// An unlabelled service that opens a file for whoever connects to its abstract local
/// socket and passes the descriptor (open for writing) with `SCM_RIGHTS`; stops when dropped.
struct Passer {
    name: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Passer {
    fn new(file: &Path) -> Self {
        use std::os::linux::net::SocketAddrExt as _;
        use std::os::unix::net::{SocketAddr, UnixListener};
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "countersign-passer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("an abstract name");
        let listener = UnixListener::bind_addr(&addr).expect("bind the passer's socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (file, stopped) = (file.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let f = std::fs::OpenOptions::new()
                            .append(true)
                            .open(&file)
                            .expect("the passer opens the file");
                        pass_descriptor(&stream, &f);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Self {
            name,
            stop,
            thread: Some(thread),
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Passer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one byte with `file`'s descriptor attached (`SCM_RIGHTS`).
fn pass_descriptor(stream: &std::os::unix::net::UnixStream, file: &std::fs::File) {
    use std::os::fd::AsRawFd as _;
    let mut byte = [b'x'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below, and the
    // control message is written within `control` through the kernel's macros.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), file.as_raw_fd());
        libc::sendmsg(stream.as_raw_fd(), &raw const msg, 0)
    };
    assert_eq!(sent, 1, "sendmsg: {}", std::io::Error::last_os_error());
}

/// Device nodes of the test's own in `/dev`, removed when dropped.
struct DeviceNodes(std::cell::RefCell<Vec<String>>);

impl DeviceNodes {
    fn new() -> Self {
        Self(std::cell::RefCell::new(Vec::new()))
    }

    fn make(&self, name: &str, kind: libc::mode_t, major: u32, minor: u32) -> String {
        let path = format!("/dev/cs-test-{}-{name}", std::process::id());
        let c = std::ffi::CString::new(path.clone()).expect("no NUL");
        // SAFETY: a NUL-terminated path.
        let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
        assert_eq!(r, 0, "mknod {path}: {}", std::io::Error::last_os_error());
        self.0.borrow_mut().push(path.clone());
        path
    }
}

impl Drop for DeviceNodes {
    fn drop(&mut self) {
        for p in self.0.borrow().iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The major of the first of `names` among `/proc/devices`' character devices.
fn char_major(devices: &str, names: &[&str]) -> Option<u32> {
    let chars: Vec<(u32, &str)> = devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?))
        })
        .collect();
    names
        .iter()
        .find_map(|n| chars.iter().find(|(_, c)| c == n).map(|(m, _)| *m))
}

/// The cgroup v2 directory `/proc/PID/cgroup` names for `pid`.
fn cgroup_of(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/PID/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    cgroup2_root().join(rel.trim().trim_start_matches('/'))
}

/// The cgroup files that stop a process without a signal: a labelled root does not write
/// `cgroup.kill`, `cgroup.freeze` or the limits of the daemon's cgroup or of one above it, nor
/// freeze or kill any cgroup (into which it would then move the daemon); a labelled task that
/// moves the daemon into another cgroup anyway is killed, and the daemon moves back. (The
/// writes are attempted as opens for writing: one that got through writes nothing that could
/// stop the daemon running this test.)
#[test]
fn a_labelled_root_cannot_stop_countersign_through_cgroups() {
    let cgroup = TestCgroup::new("cs-guard");
    let home = cgroup.child("daemon");
    let elsewhere = cgroup.child("elsewhere");
    let (d, _dir) = start_in(&[], Some(&home));
    assert_eq!(
        cgroup_of(d.pid()),
        home,
        "the daemon did not start in its cgroup"
    );
    let hooked = |kind| {
        if d.is_lsm() {
            Expect::Refused(kind)
        } else {
            Expect::GetsThrough
        }
    };
    let path = |p: PathBuf| p.to_str().expect("utf-8 path").to_owned();
    for file in [
        // Its own cgroup's: kill, freeze, a limit.
        home.join("cgroup.kill"),
        home.join("cgroup.freeze"),
        home.join("cgroup.max.descendants"),
        // The cgroup above it: the same stop the daemon with everything else in it.
        cgroup.path.join("cgroup.freeze"),
        cgroup.path.join("cgroup.max.depth"),
        // Another cgroup's freezer: frozen first, it would freeze the daemon moved in.
        elsewhere.join("cgroup.freeze"),
        elsewhere.join("cgroup.kill"),
    ] {
        attempt(&d, &["tamper-write", &path(file)], hooked("cgroup"));
    }

    // A cgroup v1 hierarchy's `release_agent`: the kernel runs what it names as root,
    // unlabelled, when a cgroup there empties. A named hierarchy without controllers is
    // mounted for the attempt (every kernel the suite runs on still has cgroup v1).
    let v1 = V1Hierarchy::mount();
    attempt(
        &d,
        &["tamper-write", &path(v1.dir.path().join("release_agent"))],
        hooked("sysctl"),
    );
    drop(v1);

    // The move itself: no hook refuses it, in either mode the mover is killed and the daemon
    // moves back. An unlabelled root can move a process there (else this proves nothing).
    let victim: Proc = d.unlabelled(&["sleep", "600"]);
    control(&[
        "tamper-cgroup-move",
        &victim.pid().to_string(),
        &path(elsewhere.clone()),
    ]);
    assert_eq!(
        cgroup_of(victim.pid()),
        elsewhere,
        "the unlabelled move did not happen"
    );
    drop(victim);
    let before = refused(&d);
    let (stdout, killed) = labelled(
        &d,
        &[
            "tamper-cgroup-move",
            &d.pid().to_string(),
            &path(elsewhere.clone()),
        ],
    );
    assert!(
        killed,
        "TAMPER: a labelled task moved the daemon into another cgroup and lived ({stdout:?})"
    );
    wait_counted(&d, "cgroup-move", &before);
    let deadline = std::time::Instant::now() + WAIT;
    while cgroup_of(d.pid()) != home {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon stayed in {} after it was moved\n{}",
            cgroup_of(d.pid()).display(),
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    // A move the daemon was not told of (its report lost in a full ring, or made by an
    // unlabelled process): noticed within a second, and undone.
    TestCgroup::enter(&elsewhere, d.pid());
    let deadline = std::time::Instant::now() + WAIT;
    while cgroup_of(d.pid()) != home {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon stayed in {} after an unreported move\n{}",
            cgroup_of(d.pid()).display(),
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    // Still deciding.
    assert!(d.status()["mode"].is_string(), "the daemon does not answer");
    let records = super::records::spooled_records(&d.spool_dir());
    let record = records
        .iter()
        .find(|r| r["body"]["type"] == "tamper" && r["body"]["attempt"] == "cgroup-move")
        .unwrap_or_else(|| panic!("no cgroup-move tamper record: {records:?}"));
    assert_eq!(record["body"]["applied"], "sigkill", "{record}");
    assert_eq!(record["body"]["label"], "agent", "{record}");
    d.assert_records_verify();
}

/// A signal without `kill`: a labelled root makes the daemon the owner of a pipe's I/O
/// signal (`F_SETOWN`; the default `SIGIO` terminates) and writes a byte. The same kills an
/// ordinary process, unlabelled or labelled (else this proves nothing); in LSM mode the daemon
/// is not signalled and the attempt is counted. (Fallback mode does not contain a labelled
/// root, README "Self-protection": the daemon would be killed, so that is not tried there.)
#[test]
fn a_labelled_root_cannot_signal_countersign_through_io() {
    let (d, _dir) = start(&[]);
    for labelled_run in [false, true] {
        let mut victim: Proc = d.unlabelled(&["sleep", "600"]);
        let args = ["tamper-sigio".to_owned(), victim.pid().to_string()];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if labelled_run {
            let (stdout, killed) = labelled(&d, &args);
            assert!(
                stdout == "tampered" && !killed,
                "{stdout:?} (killed: {killed})"
            );
        } else {
            control(&args);
        }
        let status = victim.wait(WAIT);
        assert_eq!(
            status.signal(),
            Some(libc::SIGIO),
            "an I/O signal did not reach an ordinary process (labelled sender: {labelled_run}): {status}"
        );
    }
    if !d.is_lsm() {
        return;
    }
    let before = refused(&d);
    let (stdout, killed) = labelled(&d, &["tamper-sigio", &d.pid().to_string()]);
    assert!(
        stdout == "tampered" && !killed,
        "{stdout:?} (killed: {killed})"
    );
    wait_counted(&d, "signal", &before);
    assert!(
        Path::new(&format!("/proc/{}", d.pid())).exists() && d.status()["mode"] == "lsm",
        "TAMPER: the daemon was signalled through I/O\n{}",
        d.log()
    );
}

/// A named cgroup v1 hierarchy without controllers, mounted for one test and unmounted on
/// drop.
struct V1Hierarchy {
    dir: tempfile::TempDir,
}

impl V1Hierarchy {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("a mount point");
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let target = c(dir.path().to_str().expect("utf-8 path"));
        let (fs, options) = (
            c("cgroup"),
            c(&format!("none,name=cs-test-{}", std::process::id())),
        );
        // SAFETY: NUL-terminated strings that live for the call.
        let r = unsafe {
            libc::mount(
                fs.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting a cgroup v1 hierarchy: {}",
            std::io::Error::last_os_error()
        );
        Self { dir }
    }
}

impl Drop for V1Hierarchy {
    fn drop(&mut self) {
        let target =
            std::ffi::CString::new(self.dir.path().to_str().expect("utf-8 path")).expect("no NUL");
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Paths this test made (removed again, also on failure).
struct Made(Vec<PathBuf>);

impl Made {
    /// `dir` made if missing.
    fn dir(&mut self, dir: &Path) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            self.0.push(dir.to_path_buf());
        }
    }

    /// `file` made with `content`, if missing.
    fn file(&mut self, file: &Path, content: &str) {
        if !file.exists() {
            std::fs::write(file, content).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            self.0.push(file.to_path_buf());
        }
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
    }
}

/// What the system starts later (cron and `at` jobs, units, the dynamic linker's preload, ...)
/// runs unlabelled, so a labelled root leaves nothing there (`run_later`): no new file in
/// cron's directories or in the directories inside them (a user's crontab), no write to a
/// job, no second name for a job made elsewhere to write it through, no `ld.so.preload` made
/// (created, linked, renamed or symlinked there) while it does not exist, nor written once
/// it does.
/// In LSM mode the daemon's defaults are tried (the places are made where missing, as in
/// the test VMs); in fallback mode places of the test's own (a host's real ones are not
/// written), which get through as documented.
#[test]
fn a_labelled_root_leaves_nothing_to_run_later() {
    let lsm = countersign_tests::expected_mode().as_deref() == Some("lsm");
    let own = tempfile::tempdir().expect("tempdir");
    let mut made = Made(Vec::new());
    let (cron, crontabs, preload) = if lsm {
        let cron = PathBuf::from("/etc/cron.d");
        let crontabs = PathBuf::from("/var/spool/cron/crontabs");
        made.dir(&cron);
        made.dir(&crontabs);
        (cron, crontabs, PathBuf::from("/etc/ld.so.preload"))
    } else {
        let cron = own.path().join("cron.d");
        let crontabs = own.path().join("spool/cron/crontabs");
        std::fs::create_dir_all(&cron).expect("cron.d");
        std::fs::create_dir_all(&crontabs).expect("crontabs");
        (cron, crontabs, own.path().join("ld.so.preload"))
    };
    // The dynamic linker's preload list usually does not exist: guarded by its name.
    assert!(
        !preload.exists(),
        "{} exists on this machine: the attempt to make it cannot be tried",
        preload.display()
    );
    let job = crontabs.join("cs-escape-job");
    made.file(&job, "* * * * * true\n");
    let config = own.path().join("daemon.yaml");
    let places = if lsm {
        String::new()
    } else {
        format!(
            "run_later: [{}, {}, {}]\n",
            cron.display(),
            crontabs.parent().expect("spool/cron").display(),
            preload.display()
        )
    };
    std::fs::write(&config, places).expect("the configuration");
    let (d, _dir) = start(&["--config", config.to_str().expect("utf-8 path")]);
    if lsm {
        let guarded = d.status()["self_protection"]["run_later_guarded"].as_u64();
        assert!(
            guarded.is_some_and(|n| n >= 4),
            "run_later_guarded: {guarded:?}"
        );
    }
    let expect = if lsm {
        Expect::Refused("file-write")
    } else {
        Expect::GetsThrough
    };
    // Somewhere unguarded on the same file system as the job, for the hard link.
    let elsewhere = tempfile::tempdir_in(
        crontabs
            .parent()
            .expect("spool/cron")
            .parent()
            .expect("spool"),
    )
    .expect("a directory beside the spool");
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    attempt(&d, &["tamper-create", &s(&cron)], expect);
    attempt(&d, &["tamper-create", &s(&crontabs)], expect);
    attempt(&d, &["tamper-write", &s(&job)], expect);
    attempt(&d, &["tamper-rename", &s(&job)], expect);
    attempt(&d, &["tamper-link", &s(&job), &s(elsewhere.path())], expect);
    for how in ["create", "link", "rename", "symlink"] {
        attempt(&d, &["tamper-make", &s(&preload), how], expect);
    }
    // Made by someone unlabelled (here the test), it is guarded as the file it is now,
    // within a second.
    made.file(&preload, "");
    if lsm {
        std::thread::sleep(std::time::Duration::from_millis(2_500));
    }
    attempt(&d, &["tamper-write", &s(&preload)], expect);
    attempt(&d, &["tamper-rename", &s(&preload)], expect);
}

/// `on_tamper: kill`: the attempt is refused and the agent killed.
#[test]
fn on_tamper_kill_kills_the_agent() {
    let (d, _dir) = start(&["--on-tamper", "kill"]);
    let pin = d.pin_dir().join("CS_CONFIG");
    let args = ["tamper-bpf", pin.to_str().expect("utf-8 path")];
    control(&args);
    let before = refused(&d);
    let (stdout, killed) = labelled(&d, &args);
    assert!(killed, "not killed; printed {stdout:?}");
    assert_ne!(stdout, "tampered");
    wait_counted(&d, "bpf", &before);
    assert_eq!(d.status()["self_protection"]["on_tamper"], "kill");
}

/// The service manager and the container runtimes act as root for whoever reaches them
/// (`systemctl stop countersign` goes to systemd over its socket or the system bus): a
/// labelled task's connect to one is held for a human even where its label allows
/// everything, unless a rule of the label names the socket. LSM mode (fallback mode does not
/// hold local sockets: README "Not held yet").
#[test]
fn deputies_that_could_stop_countersign_are_held_for_a_human() {
    use std::os::unix::net::UnixListener;
    let bus = Path::new("/run/dbus/system_bus_socket");
    if countersign_tests::expected_mode().is_none_or(|m| m != "lsm") {
        eprintln!("fallback mode: local sockets are not held (README: Not held yet)");
        return;
    }
    assert!(
        !bus.exists(),
        "the test machine runs a system bus; this scenario binds its own"
    );
    std::fs::create_dir_all("/run/dbus").expect("/run/dbus");
    let listener = UnixListener::bind(bus).expect("a stand-in system bus");
    listener.set_nonblocking(true).expect("non-blocking");
    struct Unbind;
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = std::fs::remove_file("/run/dbus/system_bus_socket");
        }
    }
    let _unbind = Unbind;
    // A user's service manager (`systemd-run --user` starts anything as that user).
    let user_run = Path::new("/run/user/4242");
    assert!(
        !user_run.exists(),
        "the test machine has a user 4242 session"
    );
    let mut made = Made(Vec::new());
    made.dir(&user_run.join("systemd"));
    made.0.insert(0, user_run.to_path_buf());
    let user_bus = user_run.join("systemd/private");
    let user_listener = UnixListener::bind(&user_bus).expect("a stand-in user manager");
    user_listener.set_nonblocking(true).expect("non-blocking");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = other_dir.path().join("service.sock");
    let other_listener = UnixListener::bind(&other).expect("another local service");
    other_listener.set_nonblocking(true).expect("non-blocking");

    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: agent\n    default: {outcome: allow}\n",
    )
    .expect("the policy");
    let d = Daemon::start_with(&["--policy", policy.to_str().expect("utf-8 path")]);
    let bus = bus.to_str().expect("utf-8 path");

    // Everything else is allowed in the kernel, without a request.
    let bin = escape();
    let mut p = d.labelled(
        "agent",
        &[&bin, "unix-connect", other.to_str().expect("utf-8")],
    );
    assert!(p.wait(WAIT).success(), "{}", p.stderr());
    assert_eq!(p.stdout().trim(), "connected");
    assert!(other_listener.accept().is_ok());

    // The system bus: held, shown as the built-in rule, and denied here.
    let mut p = d.labelled("agent", &[&bin, "unix-connect", bus]);
    let r = d.wait_request("a connect to the system bus", |r| {
        r["pid"] == p.pid() && r["kind"] == "unix"
    });
    assert_eq!(r["destination"], format!("unix:{bus}"), "{r}");
    assert!(
        r["rule"]
            .as_str()
            .is_some_and(|x| x.starts_with("built in")),
        "{r}"
    );
    assert!(
        listener.accept().is_err(),
        "nothing reached the bus while held"
    );
    d.decide(&r, "deny");
    assert!(!p.wait(WAIT).success());
    assert_eq!(p.stdout().trim(), format!("error {}", libc::EPERM));
    assert!(listener.accept().is_err(), "nothing reached the bus");

    // A user's service manager: the same.
    let user_bus = user_bus.to_str().expect("utf-8 path");
    let mut p = d.labelled("agent", &[&bin, "unix-connect", user_bus]);
    let r = d.wait_request("a connect to a user's service manager", |r| {
        r["pid"] == p.pid() && r["kind"] == "unix"
    });
    assert_eq!(r["destination"], format!("unix:{user_bus}"), "{r}");
    assert!(
        r["rule"]
            .as_str()
            .is_some_and(|x| x.starts_with("built in")),
        "{r}"
    );
    d.decide(&r, "deny");
    assert!(!p.wait(WAIT).success());
    assert!(user_listener.accept().is_err(), "nothing reached it");
}
