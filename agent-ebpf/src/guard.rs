//! Self-protection (LSM mode): what a labelled task may never do, whatever its uid and
//! capabilities, because it would switch enforcement off or step around it. Each refusal is
//! reported as a [`KIND_TAMPER`] event (the daemon signs a `tamper` record) and, with
//! `on_tamper: kill`, also kills the task.
//!
//! - `bpf()` at all (countersign's maps, programs and links are reached through it);
//! - tracing or touching the memory of an unlabelled process (`ptrace`, `/proc/PID/mem`,
//!   `process_vm_*`, `pidfd_getfd` all ask `ptrace_access_check` for an attach), and any
//!   access of that kind, reads included, to countersign's own processes;
//! - signals to countersign's own processes: the daemon (by its tgid, which the kernel forgets
//!   when the daemon exits, so that a labelled process given its pid later is nobody special)
//!   and any unlabelled process running the countersign executable (approver, collector);
//! - loading a kernel module, a kexec image or a security policy;
//! - mounting, unmounting, moving mounts, changing the root;
//! - writing, truncating, removing, renaming, replacing or linking countersign's files, and
//!   anything in its directories; opening its secrets at all; removing or renaming a directory
//!   on the way to them (all by device and inode, so links and bind mounts change nothing);
//! - writing under `/proc` outside the process directories (`/proc/sys`: the sysctls through
//!   which the kernel starts usermode helpers, and those enforcement relies on);
//! - the capabilities of [`GUARD_CAPABILITIES`] (kernel memory, raw I/O, device nodes,
//!   reboot, the clock, immutable files, other security modules' policies);
//! - opening a disk beneath its file systems (block devices, raw disk character devices);
//! - monitoring a whole processor (`perf_event_open` without a task).
//! - writing the cgroup files that would kill, freeze or starve the daemon (its cgroup's and
//!   those above it; `cgroup.kill` and `cgroup.freeze` anywhere), and moving the daemon into
//!   another cgroup (no hook refuses it: the mover is killed, the daemon moves back).
//!
//! Unlabelled tasks pay the label lookup every hook makes and nothing else.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use aya_ebpf::programs::TracePointContext;
use countersign_ebpf::{
    CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, EPERM, FileKey, GUARD_ANCESTOR, GUARD_CAPABILITIES,
    GUARD_CAPABILITIES_HOST, GUARD_CGROUP, GUARD_DIR, GUARD_FILE, GUARD_NAME_LEN, GUARD_NAMES,
    GUARD_RAW_MAJOR, GUARD_SECRET, KIND_TAMPER, LABEL_CANARY, LABEL_UNCLASSIFIED, NAME_KEY_DEV,
    PROC_SUPER_MAGIC, RAW_MAJOR_KEY_DEV, STAT_EVENTS_DROPPED, TAMPER_BPF, TAMPER_CAPABILITY,
    TAMPER_CGROUP, TAMPER_CGROUP_MOVE, TAMPER_DEVICE, TAMPER_DNS, TAMPER_FILE_GATE,
    TAMPER_FILE_LOCK, TAMPER_FILE_PASSED, TAMPER_FILE_READ, TAMPER_FILE_WRITE, TAMPER_MODULE,
    TAMPER_MOUNT, TAMPER_PERF, TAMPER_PROCESS, TAMPER_PTRACE, TAMPER_SIGNAL, TAMPER_SYSCTL,
    TAMPER_TTY, TTY_INPUT_REQUESTS,
};

use crate::{
    exec::{inode_id, read_ptr},
    hold,
    label::{self, Task},
    maps::{self, GUARD_FILES, TASKS},
};

/// `PTRACE_MODE_ATTACH`: tracing, or reading or writing memory.
const PTRACE_MODE_ATTACH: u32 = 0x02;
/// `PTRACE_MODE_NOAUDIT`: the kernel only asks whether to show a field (`ps` reading
/// `/proc/PID/stat`): refused quietly, never reported or killed for.
const PTRACE_MODE_NOAUDIT: u32 = 0x04;
/// `FMODE_WRITE`.
const FMODE_WRITE: u32 = 0x2;
/// `READING_FIRMWARE` / `LOADING_FIRMWARE`: the only kernel read a labelled task may cause.
const READING_FIRMWARE: i32 = 1;
/// The file systems that are kernel settings as a whole, written by no agent: sysfs
/// (`/sys/kernel/uevent_helper` starts a program as root), securityfs (LSM policies),
/// debugfs, tracefs, binfmt_misc (a handler registered there runs, as whoever execs a
/// matching file, the program it names: root's later execs included) and configfs (kernel
/// objects made by `mkdir` and written settings: targets, gadgets).
const KERNEL_SETTINGS_MAGIC: [u64; 6] = [
    0x6265_6572,
    0x7363_6673,
    0x6462_6720,
    0x7472_6163,
    0x4249_4e4d,
    0x6265_6570,
];
/// `CAP_OPT_NOAUDIT`: the kernel only asks (`has_capability_noaudit`): refused quietly.
const CAP_OPT_NOAUDIT: u32 = 1 << 1;
/// `PERF_SECURITY_CPU`: an event counting a whole processor, not a task.
const PERF_SECURITY_CPU: i32 = 1;
/// `S_IFMT`, `S_IFBLK`, `S_IFCHR`.
const S_IFMT: u16 = 0o170_000;
const S_IFBLK: u16 = 0o060_000;
const S_IFCHR: u16 = 0o020_000;
/// Parents walked up from a `/proc` file to its top-level directory.
const PROC_DEPTH: usize = 8;
/// The cgroup files that kill or freeze every process of their cgroup, wherever they are: a
/// cgroup frozen first would freeze the daemon moved into it before it could move back (v1's
/// freezer: `freezer.state`). NUL-terminated, compared over [`CGROUP_NAME_LEN`] bytes.
const CGROUP_STOP_FILES: [&[u8; CGROUP_NAME_LEN]; 3] = [
    b"cgroup.kill\0\0\0\0",
    b"cgroup.freeze\0\0",
    b"freezer.state\0\0",
];
/// A cgroup v1 hierarchy's `release_agent`: the kernel starts the program it names, as root
/// and unlabelled, whenever a cgroup there empties (a usermode helper, as `core_pattern`).
const CGROUP_RELEASE_AGENT: &[u8; CGROUP_NAME_LEN] = b"release_agent\0\0";
const CGROUP_NAME_LEN: usize = 15;

/// What a refusal was aimed at.
enum Target {
    None,
    Process(u32),
    File(u64, u64),
}

/// The label of the current task when the guard applies to it: a labelled task (or one that
/// must be refused because it could not be given a state). Not the canary, and not a task
/// whose cgroup the daemon has yet to classify: refusing those could break a service that
/// is no agent at all, and a task labelled before keeps its label when it moves.
#[inline(always)]
fn guarded() -> Option<u32> {
    match label::current_task() {
        Task::Unlabelled => None,
        Task::NoRoom => Some(0),
        Task::Labelled(state) => {
            // SAFETY: the pointer comes from the map lookup and is valid for this run.
            let label = unsafe { (*state).label };
            (label != LABEL_CANARY && label != LABEL_UNCLASSIFIED).then_some(label)
        }
    }
}

/// Reports the attempt and refuses it (killing the task too with `on_tamper: kill`).
#[inline(always)]
fn refuse(label: u32, what: i32, target: Target, detail: u16) -> i32 {
    report(label, what, target, detail);
    if maps::guard_settings().kill != 0 {
        hold::kill_current();
    }
    -EPERM
}

/// Reports a refused attempt (a [`KIND_TAMPER`] event).
#[inline(always)]
fn report(label: u32, what: i32, target: Target, detail: u16) {
    match hold::event(KIND_TAMPER, label) {
        Some(ev) => {
            ev.detail = what;
            ev.port = detail;
            // The task's name, for the record when the process is gone before the daemon
            // reads it.
            if let Ok(comm) = aya_ebpf::helpers::bpf_get_current_comm() {
                ev.unix_name[..16].copy_from_slice(&comm);
            }
            match target {
                Target::None => {}
                Target::Process(tgid) => ev.addr[..4].copy_from_slice(&tgid.to_le_bytes()),
                Target::File(dev, ino) => {
                    ev.addr[..8].copy_from_slice(&dev.to_le_bytes());
                    ev.addr[8..].copy_from_slice(&ino.to_le_bytes());
                }
            }
            if !maps::emit(ev) {
                maps::count(STAT_EVENTS_DROPPED);
            }
        }
        None => maps::count(STAT_EVENTS_DROPPED),
    }
}

#[inline(always)]
fn read_u32(base: *const u8, offset: u32) -> Option<u32> {
    if base.is_null() {
        return None;
    }
    // SAFETY: read with the checked helper; a bad address fails the read, nothing else.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<u32>()) }.ok()
}

#[inline(always)]
fn read_u64(base: *const u8, offset: u32) -> Option<u64> {
    if base.is_null() {
        return None;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<u64>()) }.ok()
}

/// Whether the self-protection offsets are known (they are wherever LSM mode runs).
#[inline(always)]
fn offsets_known() -> bool {
    let o = maps::kernel_offsets();
    o.guard_valid != 0 && o.valid != 0
}

/// Whether `task` (a `task_struct`) is labelled.
#[inline(always)]
fn task_labelled(task: *const u8) -> bool {
    let o = maps::kernel_offsets();
    // SAFETY: reading a plain value out of the map.
    read_u32(task, o.task_pid).is_some_and(|tid| unsafe { TASKS.get(tid) }.is_some())
}

/// Whether `task` is one of countersign's own processes: the daemon's thread group, or an
/// unlabelled process whose executable is countersign's. Unreadable: not protected here (the
/// attach checks refuse every unlabelled target anyway).
#[inline(always)]
fn protected(task: *const u8) -> Option<u32> {
    let o = maps::kernel_offsets();
    let tgid = read_u32(task, o.task_tgid)?;
    let daemon = maps::config().daemon_tgid;
    if daemon != 0 && tgid == daemon {
        return Some(tgid);
    }
    let guard = maps::guard_settings();
    if guard.self_ino == 0 || task_labelled(task) {
        return None;
    }
    let mm = read_ptr(task, o.task_mm)?;
    let exe = read_ptr(mm, o.mm_exe_file)?;
    let inode = read_ptr(exe, o.file_inode)?;
    let (dev, ino) = inode_id(inode)?;
    (dev == guard.self_dev && ino == guard.self_ino).then_some(tgid)
}

/// `capable(cred, ns, cap, opts)`: a labelled task is not granted the capabilities of
/// [`GUARD_CAPABILITIES`] (asked without an audit, refused without a record).
#[inline(always)]
pub fn capable(ns: *const u8, cap: i32, opts: u32) -> i32 {
    if !(0..64).contains(&cap) {
        return 0;
    }
    let bit = 1u64 << cap;
    if GUARD_CAPABILITIES & bit == 0 {
        if GUARD_CAPABILITIES_HOST & bit == 0 {
            return 0;
        }
        // Only over the host's own namespace (level 0); unknown: as if it were.
        let o = maps::kernel_offsets();
        // SAFETY: read with the checked helper.
        let level = unsafe {
            bpf_probe_read_kernel(ns.wrapping_add(o.userns_level as usize).cast::<i32>())
        };
        if o.guard_valid != 0 && level.is_ok_and(|l| l != 0) {
            return 0;
        }
    }
    match guarded() {
        Some(_) if opts & CAP_OPT_NOAUDIT != 0 => -EPERM,
        Some(label) => refuse(label, TAMPER_CAPABILITY, Target::None, cap as u16),
        None => 0,
    }
}

/// `perf_event_open(attr, type)`: no event of a whole processor (its samples carry the
/// registers and stacks of every process that runs there, countersign's included); events
/// of a task pass (another process's ask `ptrace_access_check`).
#[inline(always)]
pub fn perf_event_open(kind: i32) -> i32 {
    if kind != PERF_SECURITY_CPU {
        return 0;
    }
    match guarded() {
        Some(label) => refuse(label, TAMPER_PERF, Target::None, kind as u16),
        None => 0,
    }
}

/// `bpf(cmd, attr, size)`: refused to labelled tasks.
#[inline(always)]
pub fn bpf(cmd: i32) -> i32 {
    match guarded() {
        Some(label) => refuse(label, TAMPER_BPF, Target::None, cmd as u16),
        None => 0,
    }
}

/// `ptrace_access_check(child, mode)`: a labelled task may not attach to (trace, read or
/// write the memory of, take descriptors from) an unlabelled one, nor look into
/// countersign's own processes at all.
#[inline(always)]
pub fn ptrace_access(child: *const u8, mode: u32) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    if !offsets_known() {
        return refuse(label, TAMPER_PTRACE, Target::None, mode as u16);
    }
    if let Some(tgid) = protected(child) {
        if mode & PTRACE_MODE_NOAUDIT != 0 {
            return -EPERM;
        }
        return refuse(label, TAMPER_PTRACE, Target::Process(tgid), mode as u16);
    }
    if mode & PTRACE_MODE_ATTACH != 0 && !task_labelled(child) {
        let o = maps::kernel_offsets();
        let tgid = read_u32(child, o.task_tgid).unwrap_or(0);
        return refuse(label, TAMPER_PTRACE, Target::Process(tgid), mode as u16);
    }
    0
}

/// `task_kill(p, info, sig, cred)`: no signal from a labelled task to countersign's own
/// processes (signal 0, which only asks whether the process exists, passes).
#[inline(always)]
pub fn task_kill(target: *const u8, sig: i32) -> i32 {
    if sig == 0 {
        return 0;
    }
    let Some(label) = guarded() else {
        return 0;
    };
    if !offsets_known() {
        // The target cannot be told apart (LSM mode has the offsets wherever it loads: it
        // needs the kernel's BTF); refusing every signal would break the agent's own work.
        return 0;
    }
    match protected(target) {
        Some(tgid) => refuse(label, TAMPER_SIGNAL, Target::Process(tgid), sig as u16),
        None => 0,
    }
}

/// `file_send_sigiotask(tsk, fown, sig)`: no I/O signal to countersign's own processes. A
/// process that makes itself the owner of a file on the daemon's behalf (`F_SETOWN` with the
/// daemon's pid, `F_SETSIG` with any signal, or the default `SIGIO`, which terminates) has the
/// kernel signal the daemon whenever the file is ready, past `task_kill`. Refused whoever
/// causes the I/O (the daemon asks for no I/O signals); reported (never killed for: on a
/// socket the task running may be any) when that is a labelled task.
#[inline(always)]
pub fn sigio(target: *const u8, sig: i32) -> i32 {
    if !offsets_known() {
        return 0;
    }
    let Some(tgid) = protected(target) else {
        return 0;
    };
    let signal = if sig == 0 { SIGIO } else { sig as u16 };
    if let Some(label) = guarded() {
        report(label, TAMPER_SIGNAL, Target::Process(tgid), signal);
    }
    -EPERM
}

/// `SIGIO`: what an I/O signal is when its owner asked for none in particular.
const SIGIO: u16 = 29;

/// `task_setrlimit`, `task_setnice`, `task_setioprio`, `task_setscheduler`,
/// `task_movememory`: a labelled task does not change how countersign's processes run. A
/// `RLIMIT_CPU` of one second has the kernel kill the daemon (`SIGXCPU`, then `SIGKILL`, past
/// `task_kill`); `RLIMIT_NOFILE` of 0 leaves it unable to open a file or take a connection;
/// the lowest priority, `SCHED_IDLE`, an idle I/O class or an affinity to a busy processor
/// starve it. `what` is [`PROCESS_LIMITS`] and the like, for the record.
#[inline(always)]
pub fn process_setting(target: *const u8, what: u16) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    if !offsets_known() {
        return 0;
    }
    match protected(target) {
        Some(tgid) => refuse(label, TAMPER_PROCESS, Target::Process(tgid), what),
        None => 0,
    }
}

/// [`process_setting`]'s `what`: resource limits, priority, I/O priority, scheduling policy
/// or processor affinity, memory placement.
pub const PROCESS_LIMITS: u16 = 1;
pub const PROCESS_NICE: u16 = 2;
pub const PROCESS_IOPRIO: u16 = 3;
pub const PROCESS_SCHEDULER: u16 = 4;
pub const PROCESS_MEMORY: u16 = 5;

/// `kernel_read_file(file, id, contents)` and `kernel_load_data(id, contents)`: a labelled
/// task loads no module, kexec image, policy or certificate (firmware passes).
#[inline(always)]
pub fn kernel_load(id: i32) -> i32 {
    if id == READING_FIRMWARE {
        return 0;
    }
    match guarded() {
        Some(label) => refuse(label, TAMPER_MODULE, Target::None, id as u16),
        None => 0,
    }
}

/// The mount hooks (`sb_mount`, `sb_umount`, `move_mount`, `sb_remount`, `sb_pivotroot`):
/// refused to labelled tasks. `which` says which.
#[inline(always)]
pub fn mount(which: u16) -> i32 {
    match guarded() {
        Some(label) => refuse(label, TAMPER_MOUNT, Target::None, which),
        None => 0,
    }
}

/// The guard bits of `inode` (0: not countersign's, or unreadable).
#[inline(always)]
fn inode_flags(inode: *const u8) -> (u32, u64, u64) {
    let Some((dev, ino)) = inode_id(inode) else {
        return (0, 0, 0);
    };
    // SAFETY: reading a plain value out of the map.
    let flags = unsafe { GUARD_FILES.get(&FileKey { dev, ino }) }.copied();
    (flags.unwrap_or(0), dev, ino)
}

/// The guard bits of a dentry's inode (a negative dentry has none).
#[inline(always)]
fn dentry_flags(dentry: *const u8) -> (u32, u64, u64) {
    let o = maps::kernel_offsets();
    match read_ptr(dentry, o.dentry_inode) {
        Some(inode) => inode_flags(inode),
        None => (0, 0, 0),
    }
}

/// `file_open(file)`: countersign's secrets are not opened, its files are not opened for
/// writing, nor is anything in its directories, nor a `/proc` file outside the process
/// directories.
#[inline(always)]
pub fn file_open(file: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    match open_refusal(file) {
        Some(r) => refuse(label, r.kind, r.target, r.detail),
        None => 0,
    }
}

/// `file_receive(file)`: a descriptor passed to a labelled task by another process
/// (`SCM_RIGHTS`, `pidfd_getfd`, binder) that it could not have opened itself is not
/// installed, and the refusal names what opening it would have been. A service that opens
/// files or disks for its callers (udisks' `OpenDevice`, a root helper) would otherwise step
/// around every check of [`file_open`].
#[inline(always)]
pub fn file_receive(file: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    match open_refusal(file) {
        Some(r) => {
            let (dev, ino) = r.file;
            refuse(
                label,
                TAMPER_FILE_PASSED,
                Target::File(dev, ino),
                r.kind as u16,
            )
        }
        None => 0,
    }
}

/// Why a labelled task may not hold an open `file`.
struct OpenRefusal {
    kind: i32,
    target: Target,
    detail: u16,
    /// The file's (device, inode).
    file: (u64, u64),
}

/// What [`file_open`] refuses, for an open file of any origin.
#[inline(always)]
fn open_refusal(file: *const u8) -> Option<OpenRefusal> {
    if !offsets_known() {
        return None;
    }
    let o = maps::kernel_offsets();
    let inode = read_ptr(file, o.file_inode)?;
    let (flags, dev, ino) = inode_flags(inode);
    let refusal = |kind, target, detail| {
        Some(OpenRefusal {
            kind,
            target,
            detail,
            file: (dev, ino),
        })
    };
    if flags & GUARD_SECRET != 0 {
        return refusal(TAMPER_FILE_READ, Target::File(dev, ino), 0);
    }
    if let Some(rdev) = raw_disk(inode) {
        return refusal(TAMPER_DEVICE, Target::File(dev, ino), (rdev >> 20) as u16);
    }
    let writing = read_u32(file, o.file_mode).is_some_and(|m| m & FMODE_WRITE != 0);
    if !writing {
        return None;
    }
    if flags & (GUARD_FILE | GUARD_DIR) != 0 {
        return refusal(TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    let dentry = read_ptr(file, o.file_dentry);
    if let Some(parent) = dentry.and_then(|d| read_ptr(d, o.dentry_parent)) {
        let (pflags, _, _) = dentry_flags(parent);
        // (The daemon's cgroup is a guarded directory too: reported as what it is.)
        if pflags & GUARD_CGROUP != 0 {
            return refusal(TAMPER_CGROUP, Target::File(dev, ino), 0);
        }
        if pflags & GUARD_DIR != 0 {
            return refusal(TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
        }
    }
    let magic = read_ptr(inode, o.inode_sb).and_then(|sb| read_u64(sb, o.sb_magic));
    match magic {
        Some(CGROUP_SUPER_MAGIC | CGROUP2_SUPER_MAGIC) => match dentry.map(cgroup_file) {
            Some(CgroupFile::Stops) | None => refusal(TAMPER_CGROUP, Target::File(dev, ino), 0),
            Some(CgroupFile::Helper) => refusal(TAMPER_SYSCTL, Target::File(dev, ino), 0),
            Some(CgroupFile::Other) => None,
        },
        Some(PROC_SUPER_MAGIC) => match dentry.and_then(process_dir) {
            None => refusal(TAMPER_SYSCTL, Target::File(dev, ino), 0),
            // The daemon's `oom_score_adj`, `comm`, `attr/*` ...: its own business.
            Some(pid) if pid == maps::config().daemon_tgid && pid != 0 => {
                refusal(TAMPER_PTRACE, Target::Process(pid), 0)
            }
            Some(_) => None,
        },
        Some(m) if KERNEL_SETTINGS_MAGIC.contains(&m) => {
            refusal(TAMPER_SYSCTL, Target::File(dev, ino), 0)
        }
        _ => None,
    }
}

/// What a file on a cgroup file system is to the guard.
enum CgroupFile {
    /// One of [`CGROUP_STOP_FILES`] (or its name is unreadable).
    Stops,
    /// [`CGROUP_RELEASE_AGENT`].
    Helper,
    Other,
}

/// What the cgroup file of `dentry` is, by its name.
#[inline(always)]
fn cgroup_file(dentry: *const u8) -> CgroupFile {
    let o = maps::kernel_offsets();
    let Some(name) = read_ptr(dentry, o.dentry_name) else {
        return CgroupFile::Stops;
    };
    // SAFETY: the name's first bytes, read with the checked helper. The read may run past
    // a short name's NUL into the dentry's inline name buffer (32 bytes): the comparison stops
    // at the NUL.
    let Ok(bytes) = (unsafe { bpf_probe_read_kernel(name.cast::<[u8; CGROUP_NAME_LEN]>()) }) else {
        return CgroupFile::Stops;
    };
    if names_equal(&bytes, CGROUP_RELEASE_AGENT) {
        return CgroupFile::Helper;
    }
    let mut i = 0;
    while i < CGROUP_STOP_FILES.len() {
        if names_equal(&bytes, CGROUP_STOP_FILES[i]) {
            return CgroupFile::Stops;
        }
        i += 1;
    }
    CgroupFile::Other
}

/// Whether the NUL-terminated name in `got` is `want`'s (bytes after the NUL ignored).
#[inline(always)]
fn names_equal(got: &[u8; CGROUP_NAME_LEN], want: &[u8; CGROUP_NAME_LEN]) -> bool {
    let mut i = 0;
    while i < CGROUP_NAME_LEN {
        if got[i] != want[i] {
            return false;
        }
        if want[i] == 0 {
            return true;
        }
        i += 1;
    }
    true
}

/// `cgroup_attach_task` (after a task moved into another cgroup): a labelled task that moved
/// the daemon (its tgid written to a `cgroup.procs`) is killed and the move reported, so that
/// the daemon moves itself back. The kernel has no hook that could refuse the move itself;
/// what the move could lead to is refused beforehand (freezing or killing a cgroup, see
/// [`CGROUP_STOP_FILES`]), what remains is limits the daemon leaves at once.
#[inline(always)]
pub fn cgroup_attach(ctx: &TracePointContext) {
    let daemon = maps::config().daemon_tgid;
    if daemon == 0 {
        return;
    }
    // SAFETY: the offset comes from the kernel's own format file for this tracepoint.
    let Ok(pid) = (unsafe { ctx.read_at::<i32>(maps::cgroup_attach_pid_offset()) }) else {
        return;
    };
    if pid as u32 != daemon {
        return;
    }
    let Some(label) = guarded() else {
        return;
    };
    refuse(label, TAMPER_CGROUP_MOVE, Target::Process(daemon), 0);
    hold::kill_current();
}

/// The device number (kernel encoding) of `inode` when it is a disk beneath its file
/// systems: a block device, or a character device of one of the raw majors.
#[inline(always)]
fn raw_disk(inode: *const u8) -> Option<u32> {
    // (`i_mode` is the first field: offset 0 is a known offset.)
    let o = maps::kernel_offsets();
    let mode = read_u32(inode, o.inode_mode)? as u16 & S_IFMT;
    if mode != S_IFBLK && mode != S_IFCHR {
        return None;
    }
    let rdev = read_u32(inode, o.inode_rdev)?;
    if mode == S_IFBLK {
        return Some(rdev);
    }
    let major = rdev >> 20;
    let raw = maps::guard_settings().raw_majors;
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != 0 && raw[i] == major {
            return Some(rdev);
        }
        i += 1;
    }
    // A driver registered since the load: the daemon keeps the majors up to date in the map.
    let key = FileKey {
        dev: RAW_MAJOR_KEY_DEV,
        ino: u64::from(major),
    };
    // SAFETY: reading a plain value out of the map.
    let later = unsafe { GUARD_FILES.get(&key) }.is_some_and(|f| f & GUARD_RAW_MAJOR != 0);
    later.then_some(rdev)
}

/// `file_truncate(file)` (kernels 6.2+, where an `open` with `O_TRUNC` no longer passes
/// `path_truncate`): countersign's files are not truncated, even through a read-only open.
#[inline(always)]
pub fn file_truncate(file: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    match countersign_file(file) {
        Some((dev, ino)) => refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0),
        None => 0,
    }
}

/// `file_lock(file, cmd)` (`flock`, POSIX record locks, leases): no lock or lease on
/// countersign's files. A lock held on the daemon's lock file keeps a restarted daemon from
/// starting; a lease makes the daemon's next open of that file wait for the holder (45 s by
/// default, again at each new lease); a record lock can stall a database.
#[inline(always)]
pub fn file_lock(file: *const u8, cmd: u32) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    match countersign_file(file) {
        Some((dev, ino)) => refuse(label, TAMPER_FILE_LOCK, Target::File(dev, ino), cmd as u16),
        None => 0,
    }
}

/// (device, inode) of `file` when it is one of countersign's files, or lies in one of its
/// directories.
#[inline(always)]
fn countersign_file(file: *const u8) -> Option<(u64, u64)> {
    let o = maps::kernel_offsets();
    let inode = read_ptr(file, o.file_inode)?;
    let (flags, dev, ino) = inode_flags(inode);
    if flags & !(GUARD_ANCESTOR | GUARD_NAMES) != 0 {
        return Some((dev, ino));
    }
    let parent = read_ptr(file, o.file_dentry).and_then(|d| read_ptr(d, o.dentry_parent));
    if parent.is_some_and(|p| dentry_flags(p).0 & GUARD_DIR != 0) {
        return Some((dev, ino));
    }
    None
}

/// The process whose directory a `/proc` dentry lies under (`/proc/PID/...`; `self` and
/// `thread-self` resolve to one): its top-level directory's name, a number. `None`: not in
/// a process directory, or unknown (deeper than [`PROC_DEPTH`], unreadable).
#[inline(always)]
fn process_dir(dentry: *const u8) -> Option<u32> {
    let o = maps::kernel_offsets();
    let mut cur = dentry;
    let mut i = 0;
    while i < PROC_DEPTH {
        let parent = read_ptr(cur, o.dentry_parent)?;
        let grand = read_ptr(parent, o.dentry_parent)?;
        if grand == parent {
            // `cur` is a top-level entry of /proc.
            let name = read_ptr(cur, o.dentry_name)?;
            // SAFETY: the name's first bytes, read with the checked helper (a pid has at most
            // 10 digits; the name is NUL-terminated).
            let bytes = unsafe { bpf_probe_read_kernel(name.cast::<[u8; 11]>()) }.ok()?;
            return parse_pid(&bytes);
        }
        if parent == cur {
            // The file is /proc itself.
            return None;
        }
        cur = parent;
        i += 1;
    }
    None
}

/// A decimal pid at the start of `bytes`, ended by a NUL (`None` otherwise).
#[inline(always)]
fn parse_pid(bytes: &[u8; 11]) -> Option<u32> {
    let mut pid: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0 {
            return (i > 0).then_some(pid);
        }
        if !b.is_ascii_digit() {
            return None;
        }
        pid = pid.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
        i += 1;
    }
    None
}

/// The directory hooks that create in `dir` (`inode_create`, `inode_mkdir`, `inode_mknod`,
/// `inode_symlink`): nothing new in countersign's directories.
#[inline(always)]
pub fn inode_create(dir: *const u8, dentry: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    let (flags, dev, ino) = inode_flags(dir);
    if flags & GUARD_DIR != 0 || (flags & GUARD_NAMES != 0 && guarded_name(dev, ino, dentry)) {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    0
}

/// Whether `dentry`'s name may not be made in the directory (`dev`, `ino`): a name entry
/// exists for it (see [`GUARD_NAMES`]). Names longer than [`GUARD_NAME_LEN`] have none.
#[inline(always)]
fn guarded_name(dev: u64, ino: u64, dentry: *const u8) -> bool {
    if !offsets_known() {
        return false;
    }
    let Some(name) = read_ptr(dentry, maps::kernel_offsets().dentry_name) else {
        return false;
    };
    // Hashed 8 bytes at a time as read (a buffer of the whole name would not fit the
    // stack of the hooks this is inlined in). A name shorter than 32 bytes is kept in the
    // dentry's inline buffer, so the reads stay in it; bytes after the NUL count as NULs.
    let mut h = countersign_ebpf::name_key_start(dev, ino);
    let mut ended = false;
    let mut word = 0;
    while word < (GUARD_NAME_LEN + 1) / 8 {
        // SAFETY: the checked helper.
        let Ok(bytes) = (unsafe { bpf_probe_read_kernel(name.add(word * 8).cast::<u64>()) }) else {
            return false;
        };
        let mut i = 0;
        while i < 8 {
            let mut b = ((bytes >> (i * 8)) & 0xff) as u8;
            if ended {
                b = 0;
            } else if b == 0 {
                ended = true;
            }
            h = countersign_ebpf::name_key_byte(h, b);
            i += 1;
        }
        word += 1;
    }
    if !ended {
        return false;
    }
    let key = FileKey {
        dev: NAME_KEY_DEV,
        ino: h,
    };
    // SAFETY: reading a plain value out of the map.
    unsafe { GUARD_FILES.get(&key) }.is_some()
}

/// `inode_unlink(dir, dentry)` and `inode_rmdir(dir, dentry)`: nothing of countersign's is
/// removed, nor anything in its directories.
#[inline(always)]
pub fn inode_remove(dir: *const u8, dentry: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    let (flags, dev, ino) = dentry_flags(dentry);
    if flags != 0 {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    let (dflags, ddev, dino) = inode_flags(dir);
    if dflags & GUARD_DIR != 0 {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(ddev, dino), 0);
    }
    0
}

/// `inode_rename(old_dir, old_dentry, new_dir, new_dentry)`: nothing of countersign's is
/// renamed or replaced, nor anything moved into or out of its directories.
#[inline(always)]
pub fn inode_rename(
    old_dir: *const u8,
    old_dentry: *const u8,
    new_dir: *const u8,
    new_dentry: *const u8,
) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    for dentry in [old_dentry, new_dentry] {
        let (flags, dev, ino) = dentry_flags(dentry);
        if flags != 0 {
            return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
        }
    }
    for dir in [old_dir, new_dir] {
        let (flags, dev, ino) = inode_flags(dir);
        if flags & GUARD_DIR != 0 {
            return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
        }
    }
    let (flags, dev, ino) = inode_flags(new_dir);
    if flags & GUARD_NAMES != 0 && guarded_name(dev, ino, new_dentry) {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    0
}

/// `inode_link(old_dentry, dir, new_dentry)`: no new name for countersign's files, and no
/// new entry in its directories.
#[inline(always)]
pub fn inode_link(old_dentry: *const u8, dir: *const u8, new_dentry: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    let (flags, dev, ino) = dentry_flags(old_dentry);
    if flags & (GUARD_FILE | GUARD_SECRET) != 0 {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    // A file of a guarded directory is guarded by its place: a second name elsewhere would
    // open it for writing from a directory that is not.
    let parent = offsets_known()
        .then(|| read_ptr(old_dentry, maps::kernel_offsets().dentry_parent))
        .flatten();
    if parent.is_some_and(|p| dentry_flags(p).0 & GUARD_DIR != 0) {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    let (dflags, ddev, dino) = inode_flags(dir);
    if dflags & GUARD_DIR != 0
        || (dflags & GUARD_NAMES != 0 && guarded_name(ddev, dino, new_dentry))
    {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(ddev, dino), 0);
    }
    0
}

/// `path_truncate(path)`, `path_chmod(path, mode)`, `path_chown(path, uid, gid)`: none on
/// countersign's files and directories (ancestors may change).
#[inline(always)]
pub fn path_change(path: *const u8) -> i32 {
    if guarded().is_none() {
        return 0;
    }
    let o = maps::kernel_offsets();
    let Some(dentry) = read_ptr(path, o.path_dentry) else {
        return 0;
    };
    dentry_change(dentry)
}

/// A change of the file `dentry` is (its attributes, extended attributes, ACLs): none on
/// countersign's files and directories (ancestors may change).
#[inline(always)]
pub fn dentry_change(dentry: *const u8) -> i32 {
    let Some(label) = guarded() else {
        return 0;
    };
    let (flags, dev, ino) = dentry_flags(dentry);
    if flags & !(GUARD_ANCESTOR | GUARD_NAMES) != 0 {
        return refuse(label, TAMPER_FILE_WRITE, Target::File(dev, ino), 0);
    }
    0
}

/// `file_ioctl(file, cmd, arg)`: a labelled task may not push input into a terminal
/// (`TIOCSTI`, `TIOCLINUX`'s paste): the shell it was started from would run it as typed,
/// unlabelled, once the agent exits. Every other request passes without a lookup.
#[inline(always)]
pub fn ioctl(cmd: u32) -> i32 {
    if cmd != TTY_INPUT_REQUESTS[0] && cmd != TTY_INPUT_REQUESTS[1] {
        return 0;
    }
    match guarded() {
        Some(label) => refuse(label, TAMPER_TTY, Target::None, cmd as u16),
        None => 0,
    }
}

/// `path_notify(path, mask, obj_type)`: no labelled task asks for fanotify's permission
/// events (`FAN_OPEN_PERM`, `FAN_ACCESS_PERM`, `FAN_OPEN_EXEC_PERM`, `FAN_PRE_ACCESS`). Whoever
/// holds such a mark decides, and may never answer, every open beneath it: on a file system
/// or mount holding countersign's files that stops the daemon, and with it every decision.
/// Notifications that only report (inotify, fanotify's other events) pass without a lookup.
#[inline(always)]
pub fn path_notify(mask: u64) -> i32 {
    if mask & FANOTIFY_PERMISSION_EVENTS == 0 {
        return 0;
    }
    match guarded() {
        Some(label) => refuse(label, TAMPER_FILE_GATE, Target::None, (mask >> 16) as u16),
        None => 0,
    }
}

/// `FS_OPEN_PERM`, `FS_ACCESS_PERM`, `FS_OPEN_EXEC_PERM` and (6.14+) `FS_PRE_ACCESS`.
const FANOTIFY_PERMISSION_EVENTS: u64 = 0x0001_0000 | 0x0002_0000 | 0x0004_0000 | 0x0010_0000;

/// `socket_bind(sock, address, addrlen)` (the kernel's copy of the address): a labelled task
/// may not bind port 53 on IPv4 or IPv6. The daemon learns destination names from the
/// answers of the host's resolvers; a labelled root that stopped the local one (a stub on
/// 127.0.0.53, say) and bound its address would answer in its place.
#[inline(always)]
pub fn bind(sock: *const u8, address: *const u8) -> i32 {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    const DNS_PORT: u16 = 53;
    let Some(label) = guarded() else {
        return 0;
    };
    // SAFETY: reads of the kernel's copy of the address with the checked helper.
    let Ok(family) = (unsafe { bpf_probe_read_kernel(address.cast::<u16>()) }) else {
        return 0;
    };
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    // SAFETY: as above; `sin_port`/`sin6_port` follow the family, in network order.
    let Ok(port) = (unsafe { bpf_probe_read_kernel(address.wrapping_add(2).cast::<u16>()) }) else {
        return 0;
    };
    if u16::from_be(port) != DNS_PORT {
        return 0;
    }
    // Only in the host's network namespace, where the daemon learns names: in one of its own
    // (a sandbox) a program may serve DNS to itself. Unknown: as if it were the host's.
    let dns = crate::dns::offsets();
    let o = maps::kernel_offsets();
    if dns.valid != 0 && o.unix_valid != 0 {
        let net = read_ptr(sock, o.socket_sk).and_then(|sk| read_ptr(sk, dns.sk_net));
        // SAFETY: read with the checked helper.
        let inum = net.and_then(|net| {
            unsafe { bpf_probe_read_kernel(net.wrapping_add(dns.net_inum as usize).cast::<u32>()) }
                .ok()
        });
        if inum.is_some_and(|i| i != dns.host_netns_inum) {
            return 0;
        }
    }
    refuse(label, TAMPER_DNS, Target::None, family)
}

/// `sched_process_exit`: when the daemon's main thread exits, the kernel forgets the
/// daemon's tgid before the pid can be given to anyone else, so that no later process with
/// that pid is taken for the daemon (never held, protected).
#[inline(always)]
pub fn process_exit() {
    let tgid = label::current_tgid();
    if label::current_tid() != tgid {
        return;
    }
    if let Some(config) = maps::CONFIG.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the map lookup and is valid for this run.
        unsafe {
            if (*config).daemon_tgid == tgid {
                (*config).daemon_tgid = 0;
            }
        }
    }
}
