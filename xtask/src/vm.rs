//! Runs one command inside a real Debian kernel under qemu (TCG), for tests that need BPF
//! LSM, which the host kernel refuses.
//!
//! Each run builds a throw-away initramfs (busybox, the given files with all their shared
//! libraries, and a generated `/init`), boots the cached kernel with
//! `lsm=lockdown,capability,bpf` (or, to test the fallback as most distributions boot,
//! without `bpf`), streams the serial console to the terminal, and reads the
//! command's exit code back from a marker line that `/init` prints before powering off.
//! Nothing waits forever: the whole run has a timeout, and qemu is killed (by its pid) on
//! timeout and on every error path.
//!
//! TCG guests are CPU bound: a test VM has one processor, and at most [`VM_SLOTS`] of them
//! (one per core of the test machines) run at once; two-processor guests side by side
//! starved each other until the guest kernels reported RCU stalls. A run waits for a slot, a
//! lock file in the cache folder (released when the process ends, however it ends); the
//! benchmark's VM takes every slot.

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::cpio::Archive;
use crate::kernels::{self, KernelId};
use crate::paths;
use crate::process::{ChildGuard, run_captured, tail};

/// The kernel command line: serial console, the LSMs of [`Lsm`], and a panic ends the run
/// (panic=-1 reboots at once, and qemu's -no-reboot turns the reboot into an exit). A soft
/// lockup or an oops panics, with every CPU's backtrace, so that a stuck kernel fails the
/// run within seconds and names where it was stuck, instead of spinning until the timeout.
const KERNEL_APPEND: &str = "console=ttyS0 quiet panic=-1 softlockup_panic=1 \
    softlockup_all_cpu_backtrace=1 oops=panic";

/// Which security modules the guest kernel enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lsm {
    /// BPF LSM enabled (`lsm=lockdown,capability,bpf`): countersign's LSM programs run at
    /// BPF LSM's hooks.
    Bpf,
    /// BPF LSM built in but not enabled (`lsm=lockdown,capability`), as Debian and most
    /// distributions boot: countersign runs its LSM programs at the `security_*` functions
    /// (or the fallback, where it is told to).
    NoBpf,
}

impl Lsm {
    fn kernel_arg(self) -> &'static str {
        match self {
            Lsm::Bpf => "lsm=lockdown,capability,bpf",
            Lsm::NoBpf => "lsm=lockdown,capability",
        }
    }

    /// How runs and their logs name this boot.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Lsm::Bpf => "bpf-lsm",
            Lsm::NoBpf => "no-bpf-lsm",
        }
    }
}

/// Where busybox-static installs its binary.
const BUSYBOX: &str = "/bin/busybox";

/// Printed by `/init` right before the command starts.
const START_MARKER: &str = "XTASK-VM-COMMAND-START";
/// Printed by `/init` after the command, followed by its exit code.
const EXIT_MARKER: &str = "XTASK-VM-EXIT-CODE=";
/// Printed by `/init` with the active LSMs (`/sys/kernel/security/lsm`).
const LSM_MARKER: &str = "XTASK-VM-LSM=";
/// Printed by `/init` with `uname -r`.
const KERNEL_MARKER: &str = "XTASK-VM-KERNEL=";

/// How many of the last lines of guest output an error carries.
const ERROR_TAIL_LINES: usize = 40;
/// How many lines from the first kernel trouble message an error carries.
const ERROR_TROUBLE_LINES: usize = 120;
/// Kernel messages that say the guest kernel itself went wrong.
const KERNEL_TROUBLE: [&str; 8] = [
    "BUG:",
    "Oops",
    "Kernel panic",
    "WARNING:",
    "general protection fault",
    "rcu: INFO",
    "watchdog:",
    "Call Trace:",
];

/// How long qemu gets to power off after the exit marker before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(60);

/// The result of a VM run whose command finished.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// The command's exit code as the guest shell saw it (128+N when killed by signal N).
    pub exit_code: i32,
    /// The guest console between the start of the command and its exit marker: the
    /// command's stdout and stderr (kernel messages may be interleaved).
    pub output: String,
    /// The whole serial console of the run (boot messages, /init's lines, the output).
    pub console: String,
    /// The active LSMs as the guest reported them (e.g. `lockdown,capability,bpf`).
    pub lsm: Option<String>,
    /// The guest's `uname -r`.
    pub kernel_release: Option<String>,
}

/// Why a VM run produced no exit code. Returned inside `anyhow::Error`; callers that care
/// use `err.downcast_ref::<VmError>()`.
#[derive(Debug)]
pub enum VmError {
    /// The run did not finish within its timeout; qemu was killed.
    Timeout {
        kernel: KernelId,
        timeout: Duration,
        report: String,
    },
    /// qemu exited without the exit marker (kernel panic, /init failure, qemu error).
    NoExitMarker {
        kernel: KernelId,
        qemu_status: String,
        qemu_stderr: String,
        report: String,
    },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Timeout {
                kernel,
                timeout,
                report,
            } => write!(
                f,
                "VM run on {kernel} timed out after {} s (qemu killed); {report}",
                timeout.as_secs()
            ),
            VmError::NoExitMarker {
                kernel,
                qemu_status,
                qemu_stderr,
                report,
            } => write!(
                f,
                "VM run on {kernel}: qemu exited ({qemu_status}) without the command's exit marker {EXIT_MARKER}; \
                 qemu stderr: {qemu_stderr:?}; {report}"
            ),
        }
    }
}

impl std::error::Error for VmError {}

/// Parses a `--file HOST_PATH[:GUEST_PATH]` argument; the guest path defaults to the host
/// path made absolute.
pub fn parse_file_arg(arg: &str) -> Result<(PathBuf, String)> {
    let (host, guest) = match arg.split_once(':') {
        Some((host, guest)) => (PathBuf::from(host), guest.to_owned()),
        None => {
            let host = PathBuf::from(arg);
            let abs = std::path::absolute(&host)
                .with_context(|| format!("--file {arg}: cannot make the path absolute"))?;
            (host, abs.to_string_lossy().into_owned())
        }
    };
    if !guest.starts_with('/') {
        bail!("--file {arg}: the guest path {guest:?} must be absolute");
    }
    Ok((host, guest))
}

/// Parses a `--env KEY=VALUE` argument.
pub fn parse_env_arg(arg: &str) -> Result<(String, String)> {
    let (key, value) = arg
        .split_once('=')
        .with_context(|| format!("--env {arg}: expected KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Boots kernel `kernel` under qemu and runs `command` (program and arguments; the program
/// is looked up on PATH=/bin:/sbin:/usr/bin:/usr/sbin) as root in the guest, with `env`
/// exported, and with `files` (host path, absolute guest path) copied in along with every
/// shared library they need. A host folder is copied with its contents.
///
/// The kernel is fetched first if it is not cached yet; call [`crate::setup::setup`]
/// beforehand to have the rest of the tooling checked. Fails with a [`VmError`] on timeout
/// or when the guest never reports the exit code.
pub fn run_in_vm(
    kernel: KernelId,
    lsm: Lsm,
    clock: Clock,
    files: &[(PathBuf, String)],
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<VmOutcome> {
    if command.is_empty() {
        bail!("VM run on {kernel}: no command given");
    }
    let image = kernels::ensure_kernel(kernel)?;
    let _lock = machine_lock(clock)?;
    let scratch = RunDir::new(kernel)?;
    let initrd = scratch.0.join("initramfs.cpio");
    build_initramfs(files, command, env)
        .with_context(|| format!("VM run on {kernel}: building the initramfs"))?
        .write_to(&initrd)?;
    boot(kernel, lsm, clock, &image.vmlinuz, &initrd, timeout)
}

/// How the guest's processors and clock are emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// One processor, the guest's clock following the host's: for the tests (timeouts in
    /// real time). Two such VMs run side by side, one per core of the host (see
    /// [`machine_lock`]). One processor each, not two: with two, the emulator let a guest
    /// processor run code another one had just patched (the kernel's int3-based live
    /// patching while a daemon attached its programs) and the guest kernel died on a stray
    /// int3.
    Host,
    /// One processor whose clock counts the instructions it executes (qemu `-icount
    /// shift=0,sleep=off`: an instruction is a nanosecond, idle time is skipped): for the
    /// benchmark, where a time then measures the work done, user and kernel, and no longer
    /// depends on the host's load or on how fast the host emulates each instruction.
    Instructions,
}

/// qemu's machine arguments for `clock` (the emulator is TCG: no KVM on the test machines).
fn machine_args(clock: Clock) -> Vec<&'static str> {
    let mut args = vec!["-accel", "tcg", "-cpu", "max", "-m", "2048"];
    match clock {
        Clock::Host => args.extend(["-smp", "1"]),
        Clock::Instructions => args.extend(["-smp", "1", "-icount", "shift=0,sleep=off"]),
    }
    args
}

/// How many test VMs (one processor each) may run at once: one per core of the test
/// machines (two).
pub const VM_SLOTS: usize = 2;

/// Takes VM slots on this machine, waiting (and saying so) while other runs hold them: one
/// slot for a test VM, every slot for the benchmark's VM (its clock counts instructions, but
/// a quiet machine keeps the emulation steady). The slots are lock files, released with the
/// returned handles (and by the kernel if xtask dies).
fn machine_lock(clock: Clock) -> Result<Vec<fs::File>> {
    let dir = paths::cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut slots: Vec<(PathBuf, fs::File)> = (0..VM_SLOTS)
        .map(|i| {
            let path = dir.join(format!("vm-slot-{i}.lock"));
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok((path, file))
        })
        .collect::<Result<_>>()?;
    let mut said = false;
    let mut say_waiting = |dir: &Path| {
        if !said {
            eprintln!(
                "waiting for other VM runs on this machine ({})",
                dir.display()
            );
            said = true;
        }
    };
    match clock {
        Clock::Instructions => {
            // Every slot, in order (no two takers wait on each other).
            for (path, file) in &slots {
                if !try_take(path, file)? {
                    say_waiting(&dir);
                    file.lock()
                        .with_context(|| format!("locking {}", path.display()))?;
                }
            }
            Ok(slots.into_iter().map(|(_, file)| file).collect())
        }
        Clock::Host => loop {
            // The first free slot; a taker of every slot waits on them in order, so polling
            // here cannot starve it for long.
            for i in 0..slots.len() {
                if try_take(&slots[i].0, &slots[i].1)? {
                    return Ok(vec![slots.swap_remove(i).1]);
                }
            }
            say_waiting(&dir);
            thread::sleep(Duration::from_millis(500));
        },
    }
}

/// Tries the lock of one slot file: whether it was free (and is now held).
fn try_take(path: &Path, file: &fs::File) -> Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(fs::TryLockError::WouldBlock) => Ok(false),
        Err(fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Assembles the initramfs for one run.
fn build_initramfs(
    files: &[(PathBuf, String)],
    command: &[String],
    env: &[(String, String)],
) -> Result<Archive> {
    let mut archive = Archive::new();
    for dir in [
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/mnt",
        "/var",
    ] {
        archive.dir(dir, 0o755)?;
    }
    archive.dir("/tmp", 0o1777)?;
    archive.dir("/root", 0o700)?;
    // The kernel opens /dev/console for /init's standard streams before /init can mount
    // devtmpfs.
    archive.char_dev("/dev/console", 5, 1, 0o600)?;

    // busybox and a link for each of its applets at the applet's usual place.
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing: install busybox-static (`cargo xtask setup` does)");
    }
    let mut libs = Vec::new();
    add_elf_file(&mut archive, BUSYBOX, Path::new(BUSYBOX), &mut libs)?;
    let out = run_captured(
        Command::new(BUSYBOX).arg("--list-full"),
        Duration::from_secs(60),
        "busybox --list-full",
    )?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        archive.symlink(&format!("/{applet}"), BUSYBOX)?;
    }

    archive.bytes(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    archive.bytes("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    archive.bytes("/etc/hostname", "countersign-vm\n", 0o644)?;

    // The caller's files replace busybox links at the same path.
    for (host, guest) in files {
        add_tree(&mut archive, host, guest, &mut libs)
            .with_context(|| format!("adding {} as {guest}", host.display()))?;
    }
    // Shared libraries and the dynamic loader, at the paths ldd reported.
    libs.sort();
    libs.dedup();
    for lib in &libs {
        if !archive.contains(lib) {
            archive.host_file(lib, Path::new(lib))?;
        }
    }

    archive.bytes("/init", init_script(command, env)?, 0o755)?;
    Ok(archive)
}

/// Adds a host file or folder (recursively) at `guest`.
fn add_tree(archive: &mut Archive, host: &Path, guest: &str, libs: &mut Vec<String>) -> Result<()> {
    let meta = fs::metadata(host).with_context(|| format!("reading {}", host.display()))?;
    if meta.is_dir() {
        use std::os::unix::fs::PermissionsExt;
        archive.dir(guest, meta.permissions().mode() & 0o7777)?;
        let mut entries: Vec<_> = fs::read_dir(host)
            .with_context(|| format!("reading {}", host.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", host.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let child_guest = format!("{}/{}", guest.trim_end_matches('/'), name.to_string_lossy());
            add_tree(archive, &entry.path(), &child_guest, libs)?;
        }
        Ok(())
    } else {
        add_elf_file(archive, guest, host, libs)
    }
}

/// Adds a file; if it is an ELF file, records the shared libraries `ldd` finds for it.
fn add_elf_file(
    archive: &mut Archive,
    guest: &str,
    host: &Path,
    libs: &mut Vec<String>,
) -> Result<()> {
    archive.host_file(guest, host)?;
    let mut magic = [0u8; 4];
    let is_elf = fs::File::open(host)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if is_elf {
        libs.extend(shared_libraries(host)?);
    }
    Ok(())
}

/// The absolute paths of the shared libraries and the dynamic loader of an ELF file, as
/// `ldd` reports them (none for a static binary).
fn shared_libraries(file: &Path) -> Result<Vec<String>> {
    let out = run_captured(
        Command::new("ldd").arg(file),
        Duration::from_secs(60),
        &format!("ldd {}", file.display()),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // Static binaries: "not a dynamic executable" / "statically linked".
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
            || stdout.contains("statically linked")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed ({}): {}",
            file.display(),
            out.status,
            stderr.trim()
        );
    }
    parse_ldd(&stdout).with_context(|| format!("ldd {}", file.display()))
}

/// Parses ldd's output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file and is skipped.
fn parse_ldd(output: &str) -> Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("shared library {} not found", name.trim());
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(path.to_owned());
        }
    }
    Ok(libs)
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The generated `/init`: mounts what the agent needs, reports the kernel and LSMs, runs the
/// command and prints its exit code, then powers off.
fn init_script(command: &[String], env: &[(String, String)]) -> Result<String> {
    let mut exports = String::new();
    for (key, value) in env {
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && key.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !valid {
            bail!("environment variable name {key:?} is not a valid shell name");
        }
        exports.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    let command_line = command
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(format!(
        r#"#!/bin/sh
# Generated by xtask (vm.rs) for one VM run.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
m() {{
    mkdir -p "$3" 2>/dev/null
    mount -t "$1" "$2" "$3" || echo "xtask-vm: warning: could not mount $1 on $3"
}}
m proc proc /proc
m sysfs sysfs /sys
m devtmpfs devtmpfs /dev
m devpts devpts /dev/pts
m tmpfs tmpfs /dev/shm
m securityfs securityfs /sys/kernel/security
m bpf bpffs /sys/fs/bpf
m cgroup2 cgroup2 /sys/fs/cgroup
m tracefs tracefs /sys/kernel/tracing
m debugfs debugfs /sys/kernel/debug
m tmpfs tmpfs /tmp
m tmpfs tmpfs /run
ip link set lo up || echo "xtask-vm: warning: could not bring lo up"
hostname countersign-vm
echo "{KERNEL_MARKER}$(uname -r)"
echo "{LSM_MARKER}$(cat /sys/kernel/security/lsm 2>/dev/null)"
{exports}cd /
echo "{START_MARKER}"
{command_line} </dev/null
rc=$?
echo "{EXIT_MARKER}$rc"
sync
poweroff -f
"#
    ))
}

/// Boots qemu and follows its console until the exit marker and qemu's exit, or timeout.
fn boot(
    kernel: KernelId,
    lsm: Lsm,
    clock: Clock,
    vmlinuz: &Path,
    initrd: &Path,
    timeout: Duration,
) -> Result<VmOutcome> {
    let deadline = Instant::now() + timeout;
    // Two runs may share the terminal: each line names the kernel and the boot.
    let mode = lsm.name();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(machine_args(clock))
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("{KERNEL_APPEND} {}", lsm.kernel_arg())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| {
        format!("VM run on {kernel}: starting qemu-system-x86_64 (install qemu-system-x86)")
    })?;
    let mut qemu = ChildGuard::new(child);

    // Console lines arrive on a channel so the deadline can be checked while waiting.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = qemu.child_mut().stdout.take().context("qemu stdout")?;
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = clean_console_line(&String::from_utf8_lossy(&buf));
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let stderr = qemu.child_mut().stderr.take().context("qemu stderr")?;
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[vm {kernel} {mode} qemu] {line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    });

    let mut console: Vec<String> = Vec::new();
    let mut output: Option<Vec<String>> = None;
    let mut exit_code = None;
    let mut lsm = None;
    let mut kernel_release = None;
    // After the exit marker, qemu only has to power off.
    let mut stop_at = deadline;
    // Whether qemu closed its console (it exited) before `stop_at`.
    let mut console_closed = false;
    loop {
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        match rx.recv_timeout(stop_at - now) {
            Ok(line) => {
                {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "[vm {kernel} {mode}] {line}");
                }
                match output.as_mut() {
                    // Before the command: /init's report lines.
                    None => {
                        if let Some(value) = marker_value(&line, LSM_MARKER) {
                            lsm = Some(value.to_owned());
                        } else if let Some(value) = marker_value(&line, KERNEL_MARKER) {
                            kernel_release = Some(value.to_owned());
                        } else if line.contains(START_MARKER) {
                            output = Some(Vec::new());
                        }
                    }
                    // The command runs: its output, up to the exit marker.
                    Some(output) if exit_code.is_none() => {
                        if let Some(code) = marker_value(&line, EXIT_MARKER) {
                            // Output that did not end with a newline shares the line.
                            let before = &line[..line.find(EXIT_MARKER).unwrap_or(0)];
                            if !before.is_empty() {
                                output.push(before.to_owned());
                            }
                            exit_code = Some(code.parse::<i32>().with_context(|| {
                                format!("VM run on {kernel}: bad exit marker line {line:?}")
                            })?);
                            stop_at = stop_at.min(Instant::now() + POWEROFF_GRACE);
                        } else {
                            output.push(line.clone());
                        }
                    }
                    // After the exit marker: powering off.
                    Some(_) => {}
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                console_closed = true;
                break;
            }
        }
    }

    // Reap qemu: it has exited, is powering off, or is killed now (the guard also kills it
    // if anything above returned early).
    let status = if console_closed {
        qemu.wait_until(Instant::now() + Duration::from_secs(10))?
    } else {
        None
    };
    let timed_out = !console_closed && exit_code.is_none();
    qemu.kill();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let report = || failure_report(kernel, mode, &console);

    if timed_out {
        return Err(VmError::Timeout {
            kernel,
            timeout,
            report: report(),
        }
        .into());
    }
    let Some(exit_code) = exit_code else {
        return Err(VmError::NoExitMarker {
            kernel,
            qemu_status: status.map_or_else(|| "killed".to_owned(), |s| s.to_string()),
            qemu_stderr: qemu_stderr.trim().to_owned(),
            report: report(),
        }
        .into());
    };
    Ok(VmOutcome {
        exit_code,
        output: output.unwrap_or_default().join("\n"),
        console: console.join("\n"),
        lsm,
        kernel_release,
    })
}

/// What an error about a run that did not finish says of the guest: where the whole console
/// is kept, the last test libtest named (it names a test before running it, so a line
/// without a result is the test that was running), the kernel's first trouble message
/// onwards, and the last lines.
fn failure_report(kernel: KernelId, mode: &str, console: &[String]) -> String {
    let saved = paths::vm_dir().join(format!("{kernel}-{mode}-console.log"));
    let saved_note = match std::fs::write(&saved, console.join("\n") + "\n") {
        Ok(()) => format!("the whole guest console is in {}", saved.display()),
        Err(e) => format!(
            "the guest console could not be saved to {}: {e}",
            saved.display()
        ),
    };
    let mut report = saved_note;
    if let Some(line) = console.iter().rev().find(|l| is_test_line(l)) {
        report.push_str(&format!("\nthe last test line: {line}"));
    }
    if let Some(first) = console
        .iter()
        .position(|l| KERNEL_TROUBLE.iter().any(|t| l.contains(t)))
    {
        let end = (first + ERROR_TROUBLE_LINES).min(console.len());
        report.push_str(&format!(
            "\nthe guest kernel reported trouble (lines {}..{end} of the console):\n{}",
            first + 1,
            console[first..end].join("\n")
        ));
    }
    report.push_str(&format!(
        "\nlast {ERROR_TAIL_LINES} lines of guest output:\n{}",
        tail(&console.join("\n"), ERROR_TAIL_LINES)
    ));
    report
}

/// Whether a console line is libtest's progress line (`test name ... ok`, or `test name ... `
/// while it runs, possibly followed by kernel messages on the same console line).
fn is_test_line(line: &str) -> bool {
    line.strip_prefix("test ")
        .and_then(|rest| rest.split_once(" ... "))
        .is_some_and(|(name, _)| !name.is_empty() && !name.contains(' '))
}

/// A console line without its line end and without terminal control sequences (the
/// firmware clears the screen and turns off line wrapping, which must not reach the
/// terminal running xtask).
fn clean_console_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // ESC: a CSI sequence (ESC [ ... final byte in '@'..='~') is skipped whole;
            // of any other escape (such as ESC c, reset) the next character is skipped.
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The value after `marker` when the line holds it (kernel messages may precede it).
fn marker_value<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| line[i + marker.len()..].trim())
}

/// A per-run scratch folder under `target/vm/`, removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn new(kernel: KernelId) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = paths::vm_dir().join(format!(
            "run-{kernel}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn strips_terminal_control_sequences() {
        assert_eq!(
            clean_console_line("\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS\r\n"),
            "SeaBIOS"
        );
        assert_eq!(clean_console_line("a\tb\r\n"), "a\tb");
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn finds_markers_after_kernel_noise() {
        assert_eq!(
            marker_value("[ 1.0] x XTASK-VM-EXIT-CODE=3", EXIT_MARKER),
            Some("3")
        );
        assert_eq!(marker_value("nothing", EXIT_MARKER), None);
    }

    #[test]
    fn a_failure_report_names_the_test_and_the_kernel_trouble() {
        let console: Vec<String> = [
            "XTASK-VM-COMMAND-START",
            "test first ... ok",
            "test second ... [ 9.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [x:1]",
            "[ 9.2] Call Trace:",
            "[ 9.3]  <TASK>",
        ]
        .map(String::from)
        .to_vec();
        let report = failure_report(KernelId::Debian12, "lsm", &console);
        assert!(report.contains("the last test line: test second ... [ 9.1] watchdog"));
        assert!(report.contains("trouble (lines 3..5 of the console):\ntest second"));
        assert!(report.contains("[ 9.3]  <TASK>"));
        let saved = paths::vm_dir().join("debian12-lsm-console.log");
        assert!(report.contains(&saved.display().to_string()), "{report}");
        assert!(!is_test_line("test result: ok. 1 passed"));
        assert!(is_test_line("test a::b ... "));
    }

    /// Boots a real VM (about 10 s): `cargo test -p xtask -- --ignored`.
    #[test]
    #[ignore = "boots qemu; needs `cargo xtask setup`"]
    fn runs_a_command_in_a_vm() {
        let command: Vec<String> = ["/bin/sh", "-c", "echo \"$GREETING\"; printf tail; exit 3"]
            .map(String::from)
            .to_vec();
        let env = [("GREETING".to_owned(), "it's me".to_owned())];
        let outcome = run_in_vm(
            KernelId::Debian12,
            Lsm::Bpf,
            Clock::Host,
            &[(PathBuf::from("/usr/bin/stat"), "/opt/stat".to_owned())],
            &command,
            &env,
            Duration::from_secs(300),
        )
        .unwrap();
        assert_eq!(outcome.exit_code, 3);
        assert_eq!(outcome.output, "it's me\ntail");
        assert!(outcome.lsm.unwrap().split(',').any(|l| l == "bpf"));
        assert!(outcome.kernel_release.unwrap().starts_with("6.1."));
    }

    #[test]
    fn the_benchmark_clock_is_one_processor_counting_instructions() {
        let bench = machine_args(Clock::Instructions).join(" ");
        assert!(bench.contains("-smp 1"), "{bench}");
        assert!(bench.contains("-icount shift=0,sleep=off"), "{bench}");
        let tests = machine_args(Clock::Host).join(" ");
        assert!(tests.contains("-smp 1"), "{tests}");
        assert!(!tests.contains("icount"), "{tests}");
    }

    /// Boots a real VM on the benchmark's clock: one processor, and a guest clock that does
    /// not run while the guest sleeps (idle time is skipped, so a long sleep is quick).
    #[test]
    #[ignore = "boots qemu; needs `cargo xtask setup`"]
    fn the_instruction_clock_runs_one_processor_and_skips_idle_time() {
        let command = ["/bin/sh", "-c", "nproc; sleep 120; echo slept"].map(String::from);
        let started = Instant::now();
        let outcome = run_in_vm(
            KernelId::Debian12,
            Lsm::Bpf,
            Clock::Instructions,
            &[(PathBuf::from("/usr/bin/nproc"), "/bin/nproc".to_owned())],
            &command,
            &[],
            Duration::from_secs(300),
        )
        .unwrap();
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(outcome.output, "1\nslept");
        assert!(started.elapsed() < Duration::from_secs(100));
    }

    /// Boots a real VM whose kernel crashes: the run ends at once, with the crash reported.
    #[test]
    #[ignore = "boots qemu; needs `cargo xtask setup`"]
    fn a_crashed_kernel_ends_the_run_with_its_report() {
        let command =
            ["/bin/sh", "-c", "echo c > /proc/sysrq-trigger; sleep 1000"].map(String::from);
        let started = Instant::now();
        let err = run_in_vm(
            KernelId::Debian12,
            Lsm::Bpf,
            Clock::Host,
            &[],
            &command,
            &[],
            Duration::from_secs(600),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(300));
        let text = err.to_string();
        assert!(text.contains("without the command's exit marker"), "{text}");
        assert!(text.contains("the guest kernel reported trouble"), "{text}");
    }

    /// Boots a real VM and lets it time out: `cargo test -p xtask -- --ignored`.
    #[test]
    #[ignore = "boots qemu; needs `cargo xtask setup`"]
    fn a_hung_vm_is_killed() {
        let command = ["sleep".to_owned(), "1000".to_owned()];
        let err = run_in_vm(
            KernelId::Debian13,
            Lsm::Bpf,
            Clock::Host,
            &[],
            &command,
            &[],
            Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(matches!(
            err.downcast_ref::<VmError>(),
            Some(VmError::Timeout { .. })
        ));
    }

    #[test]
    fn parses_file_args() {
        let (host, guest) = parse_file_arg("/usr/bin/stat").unwrap();
        assert_eq!(
            (host.to_str().unwrap(), guest.as_str()),
            ("/usr/bin/stat", "/usr/bin/stat")
        );
        let (_, guest) = parse_file_arg("a/b:/opt/b").unwrap();
        assert_eq!(guest, "/opt/b");
        assert!(parse_file_arg("a:relative").is_err());
    }
}
