//! The maps, and small typed accessors around them.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use countersign_ebpf::{
    ApprovedExec, Config, ConnectAllow, ConnectKey, DNS_RING_BYTES, EVENTS_RING_BYTES, Event,
    ExecKey, FileKey, GrantConnect, GrantConnectKey, GuardSettings, KernelOffsets, LabelName,
    MAX_CGROUP_LABELS, MAX_CONNECT_ALLOW, MAX_DNS_SOCKETS, MAX_EXEC_ALLOW, MAX_EXEC_APPROVED,
    MAX_EXEC_LABELS, MAX_GUARD_FILES, MAX_KERNEL_GRANTS, MAX_LABELLED_TASKS, MAX_LABELS,
    MAX_SEND_DECIDED, MAX_SOCKET_ALLOW, MAX_UNIX_RULES, NR_NET_SYSCALLS, STAT_COUNT, SendDecided,
    SendKey, SocketKey, TaskState,
};

/// `BPF_F_NO_PREALLOC`: a hash map whose entries are allocated when inserted.
const BPF_F_NO_PREALLOC: u32 = 1;

// Every map is pinned by name (see `countersign_ebpf::PINNED_MAPS`): a restarted daemon
// reuses them, so held tasks stay held and labelled tasks stay labelled across restarts.

#[map(name = "CS_TASKS")]
pub static TASKS: HashMap<u32, TaskState> = HashMap::pinned(MAX_LABELLED_TASKS, 0);

#[map(name = "CS_CGROUPS")]
pub static CGROUP_LABELS: HashMap<u64, u32> = HashMap::pinned(MAX_CGROUP_LABELS, 0);

#[map(name = "CS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[map(name = "CS_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "CS_STATS")]
pub static STATS: Array<u64> = Array::pinned(STAT_COUNT, 0);

/// Cgroup id → label (0: none) for the cgroups whose ancestors were already walked. Not
/// pinned: it belongs to one daemon's cgroup configuration.
#[map(name = "CS_CGROUP_CACHE")]
pub static CGROUP_CACHE: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16_384, 0);

/// The policy's connect fast path, written by the daemon.
#[map(name = "CS_CONNECT_ALLOW")]
pub static CONNECT_ALLOW: LpmTrie<ConnectKey, ConnectAllow> = LpmTrie::pinned(MAX_CONNECT_ALLOW, 0);

/// The policy's exec fast path, written by the daemon: (label, device, inode) → 1.
#[map(name = "CS_EXEC_ALLOW")]
pub static EXEC_ALLOW: HashMap<ExecKey, u32> = HashMap::pinned(MAX_EXEC_ALLOW, 0);

/// Approved execs not yet loaded (see `exec::verify_approved`).
/// Allocated on use: the values are large.
#[map(name = "CS_EXEC_APPROVED")]
pub static EXEC_APPROVED: HashMap<u32, ApprovedExec> =
    HashMap::pinned(MAX_EXEC_APPROVED, BPF_F_NO_PREALLOC);

/// The policy's `match: executable` labels, written by the daemon: (device, inode) → label.
#[map(name = "CS_EXEC_LABELS")]
pub static EXEC_LABELS: HashMap<FileKey, u32> = HashMap::pinned(MAX_EXEC_LABELS, 0);

/// Binary grants, written by the daemon: (label, device, inode) → expiry (boot-time ns).
#[map(name = "CS_GRANT_EXEC")]
pub static GRANT_EXEC: HashMap<ExecKey, u64> = HashMap::pinned(MAX_KERNEL_GRANTS, 0);

/// Destination grants, written by the daemon: (label, family, port, address) → expiries.
#[map(name = "CS_GRANT_CONNECT")]
pub static GRANT_CONNECT: HashMap<GrantConnectKey, GrantConnect> =
    HashMap::pinned(MAX_KERNEL_GRANTS, 0);

/// Datagram destinations decided for a process (see `send`).
#[map(name = "CS_SEND_DECIDED")]
pub static SEND_DECIDED: LruHashMap<SendKey, SendDecided> = LruHashMap::pinned(MAX_SEND_DECIDED, 0);

/// The policy's fast path for socket creation, written by the daemon: (label, family, type).
#[map(name = "CS_SOCKET_ALLOW")]
pub static SOCKET_ALLOW: HashMap<SocketKey, u32> = HashMap::pinned(MAX_SOCKET_ALLOW, 0);

/// Local sockets the policy names, written by the daemon (see `unix`).
#[map(name = "CS_UNIX_RULES")]
pub static UNIX_RULES: HashMap<ExecKey, u32> = HashMap::pinned(MAX_UNIX_RULES, 0);

/// Labels whose unnamed local sockets are held, written by the daemon.
#[map(name = "CS_UNIX_HOLD_ALL")]
pub static UNIX_HOLD_ALL: HashMap<u32, u32> = HashMap::pinned(MAX_LABELS, 0);

/// One event per CPU being filled (an `Event` does not fit on the BPF stack beside a hook's
/// own variables). Not pinned.
#[map(name = "CS_EVENT_SCRATCH")]
pub static EVENT_SCRATCH: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

/// One local socket name per CPU being read (see `unix::peer`). Not pinned.
#[map(name = "CS_NAME_SCRATCH")]
pub static NAME_SCRATCH: PerCpuArray<[u8; countersign_ebpf::UNIX_NAME_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Written and read by the daemon only.
/// See [`countersign_ebpf::MAP_LOADED_WATCHED`]. Pinned, as is its count: they outlive a
/// daemon, like the holds they watch.
#[map(name = "CS_LOADED_WATCHED")]
pub static LOADED_WATCHED: HashMap<u32, u32> =
    HashMap::pinned(countersign_ebpf::MAX_LOADED_WATCHED, 0);

#[map(name = "CS_LOADED_WATCHED_N")]
pub static LOADED_WATCHED_COUNT: Array<u64> = Array::pinned(1, 0);

/// Starts watching thread `tid`; false if it cannot be watched (no room).
#[inline(always)]
pub fn watch_loaded(tid: u32) -> bool {
    // BPF_NOEXIST: only the insert that creates the entry counts it.
    match LOADED_WATCHED.insert(tid, 0, 1) {
        Ok(()) => {
            loaded_watched_add(1);
            true
        }
        Err(_) => LOADED_WATCHED.get_ptr(tid).is_some(),
    }
}

/// Stops watching thread `tid`; true if it was watched. Exactly one caller removes an entry.
#[inline(always)]
pub fn unwatch_loaded(tid: u32) -> bool {
    if LOADED_WATCHED.remove(tid).is_ok() {
        loaded_watched_add(u64::MAX);
        true
    } else {
        false
    }
}

/// Adds `delta` (wrapping: -1 is `u64::MAX`) to the count of watched threads, atomically.
#[inline(always)]
fn loaded_watched_add(delta: u64) {
    if let Some(p) = LOADED_WATCHED_COUNT.get_ptr_mut(0) {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        // SAFETY: the pointer comes from the map lookup and stays valid for this program run;
        // the value is only ever changed atomically. The result is not used, so this is the
        // plain atomic add (`BPF_XADD`) every kernel's verifier knows.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Whether any task's exec is held after loading, or was let go and has not run yet.
#[inline(always)]
pub fn loaded_watched() -> bool {
    // SAFETY: a plain read of the map's value.
    LOADED_WATCHED_COUNT.get(0).is_some_and(|n| *n != 0)
}

#[map(name = "CS_LABELS")]
pub static LABELS: HashMap<u32, LabelName> = HashMap::pinned(MAX_LABELS, 0);

/// DNS queries and answers for the daemon's names (see `dns`). Not pinned: they belong to the
/// daemon that attached the capture.
#[map(name = "CS_DNS")]
pub static DNS: RingBuf = RingBuf::with_byte_size(DNS_RING_BYTES, 0);

/// Socket cookies of the UDP sockets whose DNS packets are captured (see `dns::mark`).
#[map(name = "CS_DNS_SOCKETS")]
pub static DNS_SOCKETS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_DNS_SOCKETS, 0);

#[map(name = "CS_DNS_DROPPED")]
pub static DNS_DROPPED: Array<u64> = Array::with_max_entries(1, 0);

/// Offset of `pid` in the `task_newtask` record (set by the loader).
#[unsafe(no_mangle)]
pub static NEWTASK_PID_OFFSET: u32 = 8;

/// Offsets of `root` and `id` in the `cgroup_mkdir`/`cgroup_rmdir` records (set by the loader).
#[unsafe(no_mangle)]
pub static CGROUP_ROOT_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
pub static CGROUP_ID_OFFSET: u32 = 16;
/// Offset of `pid` in the `cgroup_attach_task` record (set by the loader).
#[unsafe(no_mangle)]
pub static CGROUP_ATTACH_PID_OFFSET: u32 = 16;

#[inline(always)]
pub fn cgroup_attach_pid_offset() -> usize {
    // SAFETY: a plain read of a global the loader may have rewritten (volatile: not folded).
    unsafe { core::ptr::read_volatile(&CGROUP_ATTACH_PID_OFFSET) as usize }
}

#[inline(always)]
pub fn cgroup_event_offsets() -> (usize, usize) {
    // SAFETY: plain reads of globals the loader may have rewritten; volatile so the compiler
    // does not fold the defaults in.
    unsafe {
        (
            core::ptr::read_volatile(&CGROUP_ROOT_OFFSET) as usize,
            core::ptr::read_volatile(&CGROUP_ID_OFFSET) as usize,
        )
    }
}

/// The daemon's settings; an unset map reads as "off".
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this program run.
        // Counters are diagnostics: a rare lost update across CPUs is acceptable.
        unsafe { *p += 1 };
    }
}

/// Kernel struct offsets from BTF (set by the loader; all zero, "not valid", otherwise).
#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    valid: 0,
    bprm_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    task_mm: 0,
    mm_exe_file: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    regs_valid: 0,
    regs_nr: 0,
    regs_arg0: 0,
    regs_arg1: 0,
    regs_arg2: 0,
    nr_execve: 0,
    nr_execveat: 0,
    task_valid: 0,
    task_flags: 0,
    task_group_leader: 0,
    task_start_time: 0,
    msghdr_name: 0,
    socket_ops: 0,
    proto_ops_family: 0,
    unix_valid: 0,
    socket_sk: 0,
    unix_addr: 0,
    unix_path_dentry: 0,
    dentry_inode: 0,
    unix_address_len: 0,
    unix_address_name: 0,
    nr_net: [0; NR_NET_SYSCALLS],
    guard_valid: 0,
    task_pid: 0,
    task_tgid: 0,
    file_mode: 0,
    file_dentry: 0,
    path_dentry: 0,
    dentry_parent: 0,
    dentry_name: 0,
    sb_magic: 0,
    inode_mode: 0,
    inode_rdev: 0,
    fd_valid: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    unix_peer: 0,
    task_ptrace: 0,
    userns_level: 0,
    listen_valid: 0,
    skc_family: 0,
    skc_rcv_saddr: 0,
    skc_num: 0,
    skc_v6_rcv_saddr: 0,
};

/// The self-protection settings (set by the loader).
#[unsafe(no_mangle)]
pub static GUARD: GuardSettings = GuardSettings {
    kill: 0,
    _pad: 0,
    self_dev: 0,
    self_ino: 0,
    raw_majors: [0; countersign_ebpf::RAW_MAJORS],
};

#[inline(always)]
pub fn guard_settings() -> &'static GuardSettings {
    opaque(&GUARD)
}

/// Countersign's own files (see `countersign_ebpf::MAP_GUARD_FILES`). Not pinned.
#[map(name = "CS_GUARD_FILES")]
pub static GUARD_FILES: HashMap<FileKey, u32> = HashMap::with_max_entries(MAX_GUARD_FILES, 0);

#[inline(always)]
pub fn kernel_offsets() -> &'static KernelOffsets {
    opaque(&KERNEL_OFFSETS)
}

/// A global the loader rewrites, reached through a pointer the compiler cannot see through:
/// it neither folds the defaults in nor copies the whole struct (a volatile read of the
/// struct itself would copy every byte of it on every call, on every hot path), and each
/// field is read where it is used.
#[inline(always)]
pub fn opaque<T>(global: &'static T) -> &'static T {
    let p: *const T = global;
    // SAFETY: `p` points to a static; the volatile read only hides its value from the
    // optimiser, and the pointer read back is the same.
    unsafe { &*core::ptr::read_volatile(&p) }
}

#[inline(always)]
pub fn newtask_pid_offset() -> usize {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the
    // compiler does not fold the default in.
    unsafe { core::ptr::read_volatile(&NEWTASK_PID_OFFSET) as usize }
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock of grant expiries (it keeps counting through a
/// suspend, like the wall clock the daemon converts from).
#[inline(always)]
pub fn boot_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() }
}

/// Whether a binary grant lets `key` run now.
#[inline(always)]
pub fn exec_granted(key: &ExecKey) -> bool {
    // SAFETY: reading a plain value out of the map.
    match unsafe { GRANT_EXEC.get(key) } {
        Some(expiry) => boot_ns() < *expiry,
        None => false,
    }
}

/// The expiries a destination grant gives `key`, if any.
#[inline(always)]
pub fn connect_grant(key: &GrantConnectKey) -> Option<GrantConnect> {
    // SAFETY: reading a plain value out of the map.
    unsafe { GRANT_CONNECT.get(key) }.copied()
}

#[inline(always)]
pub fn emit(event: &Event) -> bool {
    EVENTS.output::<Event>(event, 0).is_ok()
}
