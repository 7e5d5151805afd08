//! The types and names that the eBPF programs and the daemon share.
//!
//! Everything here is `#[repr(C)]` with explicit padding and a pinned size, so the two sides
//! cannot drift apart silently. Map and program names are constants used by both sides.
#![no_std]

use core::mem::size_of;

/// Per-thread state of every labelled task, keyed by thread id (the kernel's `pid`).
pub const MAP_TASKS: &str = "CS_TASKS";
/// Cgroup v2 ids whose tasks (and everything below them) carry a label.
pub const MAP_CGROUP_LABELS: &str = "CS_CGROUPS";
/// Ring buffer of [`Event`]s from the kernel to the daemon.
pub const MAP_EVENTS: &str = "CS_EVENTS";
/// One [`Config`] at index 0.
pub const MAP_CONFIG: &str = "CS_CONFIG";
/// Counters (see the `STAT_*` indexes), one `u64` each.
pub const MAP_STATS: &str = "CS_STATS";
/// Label id → name. Only the daemon reads and writes it; it lives in the kernel so that a
/// restarted daemon knows the names behind the ids in [`MAP_TASKS`].
pub const MAP_LABELS: &str = "CS_LABELS";
/// The in-kernel fast path for connects: (label, family, address prefix) → allowed ports.
pub const MAP_CONNECT_ALLOW: &str = "CS_CONNECT_ALLOW";
/// The in-kernel fast path for execs: (label, device, inode) of a binary the policy allows.
pub const MAP_EXEC_ALLOW: &str = "CS_EXEC_ALLOW";
/// Executables whose processes are agents: (device, inode) → label, applied when the file
/// is loaded by an exec.
pub const MAP_EXEC_LABELS: &str = "CS_EXEC_LABELS";
/// Binary grants the kernel answers: (label, device, inode) ([`ExecKey`]) → expiry, in
/// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`); allowed only while `now < expiry`.
pub const MAP_GRANT_EXEC: &str = "CS_GRANT_EXEC";
/// Destination grants the kernel answers: [`GrantConnectKey`] → [`GrantConnect`] (expiries
/// per protocol, as in [`MAP_GRANT_EXEC`]).
pub const MAP_GRANT_CONNECT: &str = "CS_GRANT_CONNECT";
/// Ring buffer of [`DnsPacket`]s: the DNS queries to and answers from port 53 that local
/// sockets send and receive (`daemon::names` learns destination names from them). Not
/// pinned: it belongs to the daemon that reads it.
pub const MAP_DNS: &str = "CS_DNS";
/// Socket cookie → 1 for the UDP sockets whose DNS packets are captured (an LRU map of
/// [`MAX_DNS_SOCKETS`]). Not pinned.
pub const MAP_DNS_SOCKETS: &str = "CS_DNS_SOCKETS";
/// Capacity of [`MAP_DNS_SOCKETS`].
pub const MAX_DNS_SOCKETS: u32 = 8_192;
/// One `u64`: DNS packets the capture could not put in [`MAP_DNS`] (it was full). Not pinned.
pub const MAP_DNS_DROPPED: &str = "CS_DNS_DROPPED";
/// Datagram destinations already decided for a process: [`SendKey`] → [`SendDecided`] (an
/// LRU map of [`MAX_SEND_DECIDED`]). Written by the hooks when a process consumes the decision
/// of a held send, so that its later datagrams to that destination are answered in the kernel.
pub const MAP_SEND_DECIDED: &str = "CS_SEND_DECIDED";
/// Capacity of [`MAP_SEND_DECIDED`].
pub const MAX_SEND_DECIDED: u32 = 16_384;
/// The policy's fast path for socket creation: [`SocketKey`] → 1 for the (label, family, type)
/// a rule allows.
pub const MAP_SOCKET_ALLOW: &str = "CS_SOCKET_ALLOW";
/// Capacity of [`MAP_SOCKET_ALLOW`].
pub const MAX_SOCKET_ALLOW: u32 = 4_096;
/// Local sockets the policy names: [`ExecKey`] (label, peer's file or abstract name, see
/// [`UnixPeer`]) → [`UNIX_ALLOW`] or [`UNIX_HOLD`].
pub const MAP_UNIX_RULES: &str = "CS_UNIX_RULES";
/// Capacity of [`MAP_UNIX_RULES`].
pub const MAX_UNIX_RULES: u32 = 4_096;
/// Labels whose local sockets are restricted: label → [`UNIX_LABEL_HOLD_ALL`] (the sockets no
/// rule names are held too) or [`UNIX_LABEL_RULES`] (only sockets its rules hold or deny);
/// a label without an entry lets every local socket pass (but the deputies).
pub const MAP_UNIX_HOLD_ALL: &str = "CS_UNIX_HOLD_ALL";
/// [`MAP_UNIX_HOLD_ALL`] values.
pub const UNIX_LABEL_HOLD_ALL: u32 = 1;
pub const UNIX_LABEL_RULES: u32 = 2;
/// [`MAP_UNIX_RULES`] values.
pub const UNIX_ALLOW: u32 = 1;
pub const UNIX_HOLD: u32 = 2;
/// The `dev` of a [`MAP_UNIX_RULES`] key for an abstract name (its `ino` is
/// [`abstract_hash`] of the name).
pub const UNIX_ABSTRACT_DEV: u64 = u64::MAX;
/// Thread id → [`ApprovedExec`]: what an approved exec must load (LSM mode, and fallback
/// mode's seccomp notifier).
pub const MAP_EXEC_APPROVED: &str = "CS_EXEC_APPROVED";
/// Countersign's own files that labelled tasks may not change or read: [`FileKey`] (the
/// kernel's device and inode) → `GUARD_*` bits. Written by the daemon at start and on every
/// reload; not pinned (the programs that read it keep it).
pub const MAP_GUARD_FILES: &str = "CS_GUARD_FILES";
/// Fallback mode: the threads whose exec was held after loading and that have not faulted in
/// user mode since (tid → 0), whose first fault is checked. Only the kernel writes it: an
/// entry is removed exactly once (at that fault or at the thread's exit), and whoever removes
/// it lowers [`MAP_LOADED_WATCHED_COUNT`].
pub const MAP_LOADED_WATCHED: &str = "CS_LOADED_WATCHED";
/// Capacity of [`MAP_LOADED_WATCHED`]; a hold that finds it full kills instead.
pub const MAX_LOADED_WATCHED: u32 = 4_096;
/// Fallback mode: the number of entries of [`MAP_LOADED_WATCHED`] (one `u64`). The check at
/// user page faults reads nothing else while it is 0, which it is unless an exec is held
/// after loading (or was just let go and has not run yet).
pub const MAP_LOADED_WATCHED_COUNT: &str = "CS_LOADED_WATCHED_N";
/// Capacity of [`MAP_GUARD_FILES`].
pub const MAX_GUARD_FILES: u32 = 1_024;
/// [`MAP_GUARD_FILES`] bits. A file: no opening for writing, truncating, changing its mode or
/// owner, removing, renaming, replacing or linking.
pub const GUARD_FILE: u32 = 1;
/// A secret (the host key, tokens): no opening at all, plus everything [`GUARD_FILE`] refuses.
pub const GUARD_SECRET: u32 = 2;
/// A directory countersign owns (its spool, its pins): nothing is created, removed or renamed
/// in it and none of its files is opened for writing, plus what [`GUARD_FILE`] refuses.
pub const GUARD_DIR: u32 = 4;
/// A directory on the way to a guarded file: it may not be removed or renamed (which would
/// move the file out from under the path the daemon reads).
pub const GUARD_ANCESTOR: u32 = 8;
/// The daemon's cgroup directory, or one above it (not the root): none of its files is
/// opened for writing (`cgroup.kill`, `cgroup.freeze`, limits, `cgroup.procs`), which would
/// kill, freeze or starve the daemon without a signal.
pub const GUARD_CGROUP: u32 = 16;
/// An entry keyed ([`RAW_MAJOR_KEY_DEV`], major), not a file: a character device major
/// through which a disk is read or written beneath its file systems, as `/proc/devices` names
/// it now (a driver loaded after the daemon started, `sg`, `bsg`, `nvme-generic`, gets a major
/// the load-time [`GuardSettings::raw_majors`] do not have).
pub const GUARD_RAW_MAJOR: u32 = 32;
/// [`FileKey::dev`] of a [`GUARD_RAW_MAJOR`] entry (no device has it).
pub const RAW_MAJOR_KEY_DEV: u64 = u64::MAX;
/// A directory in which some names may not be made (created, linked or renamed to): the
/// entries keyed ([`NAME_KEY_DEV`], [`name_key`]) say which. For files that do not exist yet
/// and that a program reads if they appear (`/etc/ld.so.preload`), which no inode can stand
/// for.
pub const GUARD_NAMES: u32 = 64;
/// [`FileKey::dev`] of a name entry (no device has it).
pub const NAME_KEY_DEV: u64 = u64::MAX - 1;
/// The longest name guarded before it exists, in bytes (the NUL makes 32; a dentry keeps
/// names of up to 32 bytes inline, so reading 32 never passes its end).
pub const GUARD_NAME_LEN: usize = 31;

/// [`FileKey::ino`] of the name entry for `name` (NUL-padded to 32 bytes) in the directory
/// (`dev`, `ino`): FNV-1a over the three. The daemon and the kernel side compute it alike (the
/// kernel side byte by byte, with [`name_key_start`] and [`name_key_byte`]).
#[inline(always)]
#[must_use]
pub fn name_key(dev: u64, ino: u64, name: &[u8; GUARD_NAME_LEN + 1]) -> u64 {
    let mut h = name_key_start(dev, ino);
    let mut i = 0;
    while i < GUARD_NAME_LEN + 1 {
        h = name_key_byte(h, name[i]);
        i += 1;
    }
    h
}

/// [`name_key`] before the name's bytes.
#[inline(always)]
#[must_use]
pub fn name_key_start(dev: u64, ino: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < 8 {
        h = name_key_byte(h, ((dev >> (i * 8)) & 0xff) as u8);
        i += 1;
    }
    let mut i = 0;
    while i < 8 {
        h = name_key_byte(h, ((ino >> (i * 8)) & 0xff) as u8);
        i += 1;
    }
    h
}

/// [`name_key`] after one more byte.
#[inline(always)]
#[must_use]
pub fn name_key_byte(h: u64, byte: u8) -> u64 {
    (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Every map above but the DNS ones and the guard's is pinned by name in the daemon's pin
/// directory, so that holds and labels survive a daemon restart.
pub const PINNED_MAPS: [&str; 18] = [
    MAP_TASKS,
    MAP_CGROUP_LABELS,
    MAP_EVENTS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_LABELS,
    MAP_CONNECT_ALLOW,
    MAP_EXEC_ALLOW,
    MAP_EXEC_LABELS,
    MAP_GRANT_EXEC,
    MAP_GRANT_CONNECT,
    MAP_SEND_DECIDED,
    MAP_SOCKET_ALLOW,
    MAP_UNIX_RULES,
    MAP_UNIX_HOLD_ALL,
    MAP_EXEC_APPROVED,
    MAP_LOADED_WATCHED,
    MAP_LOADED_WATCHED_COUNT,
];
/// Capacity of [`MAP_GRANT_EXEC`] and of [`MAP_GRANT_CONNECT`]: the daemon's most grants.
pub const MAX_KERNEL_GRANTS: u32 = 4_096;
/// Capacity of [`MAP_EXEC_LABELS`].
pub const MAX_EXEC_LABELS: u32 = 1_024;
/// Capacity of [`MAP_EXEC_ALLOW`].
pub const MAX_EXEC_ALLOW: u32 = 16_384;
/// Capacity of [`MAP_CONNECT_ALLOW`].
pub const MAX_CONNECT_ALLOW: u32 = 16_384;
/// Port ranges one [`ConnectAllow`] holds.
pub const MAX_PORT_SPANS: usize = 16;
/// Bits of [`ConnectKey`] before the address (label and family): always matched.
pub const CONNECT_KEY_FIXED_BITS: u32 = 64;
/// [`ConnectAllow::protocols`] bits.
pub const PROTO_TCP: u32 = 1;
pub const PROTO_UDP: u32 = 2;
/// Capacity of [`MAP_LABELS`].
pub const MAX_LABELS: u32 = 4_096;
/// Longest label name.
pub const LABEL_NAME_LEN: usize = 64;

/// Capacity of [`MAP_TASKS`]: the number of labelled threads alive at once.
pub const MAX_LABELLED_TASKS: u32 = 65_536;
/// Capacity of [`MAP_CGROUP_LABELS`]: exact `cgroup_labels`, the cgroups the policy's globs and
/// units label, and new cgroups not classified yet (entries of removed cgroups are dropped
/// by the `cgroup_rmdir` program).
pub const MAX_CGROUP_LABELS: u32 = 16_384;
/// Deepest cgroup level searched for a cgroup label.
pub const MAX_CGROUP_DEPTH: i32 = 16;
/// Size of the event ring buffer in bytes (a power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Size of the DNS ring buffer in bytes (a power of two, multiple of the page size): room for
/// 255 packets between two reads.
pub const DNS_RING_BYTES: u32 = 1024 * 1024;
/// Bytes of a DNS packet captured, from the IP header on (a power of two). EDNS answers
/// are kept under 1232 bytes by resolvers that follow DNS Flag Day 2020; a longer packet is
/// kept truncated (and then not parsed).
pub const DNS_CAPTURE_BYTES: usize = 4096;

pub const PROG_LSM_BPRM_CHECK: &str = "cs_lsm_bprm_check";
pub const PROG_LSM_SOCKET_CONNECT: &str = "cs_lsm_socket_connect";
pub const PROG_LSM_BPRM_CREDS: &str = "cs_lsm_bprm_creds_for_exec";
pub const PROG_TP_SYS_ENTER_EXECVE: &str = "cs_tp_sys_enter_execve";
pub const PROG_TP_SYS_ENTER_EXECVEAT: &str = "cs_tp_sys_enter_execveat";
pub const PROG_TP_SCHED_EXEC: &str = "cs_tp_sched_exec";
pub const PROG_TP_SCHED_EXEC_UNROLLED: &str = "cs_tp_sched_exec_unrolled";
/// Fallback mode (x86): every page fault in user mode; see `exec::user_fault`.
pub const PROG_RTP_PAGE_FAULT_USER: &str = "cs_rtp_page_fault_user";
pub const PROG_TP_TASK_NEWTASK: &str = "cs_tp_task_newtask";
pub const PROG_TP_SCHED_EXIT: &str = "cs_tp_sched_exit";
pub const PROG_TP_SYS_ENTER_CONNECT: &str = "cs_tp_sys_enter_connect";
pub const PROG_TP_SYS_EXIT_CONNECT: &str = "cs_tp_sys_exit_connect";
pub const PROG_TP_SYS_ENTER_LISTEN: &str = "cs_tp_sys_enter_listen";
pub const PROG_TP_SYS_EXIT_LISTEN: &str = "cs_tp_sys_exit_listen";
/// Fallback mode, where the kernel offers kprobes: `inet_listen`, every IPv4/IPv6 listen
/// whatever path it took.
pub const PROG_KP_INET_LISTEN: &str = "cs_kp_inet_listen";
pub const PROG_CG_CONNECT4: &str = "cs_cg_connect4";
pub const PROG_CG_CONNECT6: &str = "cs_cg_connect6";
pub const PROG_LSM_SOCKET_SENDMSG: &str = "cs_lsm_socket_sendmsg";
pub const PROG_LSM_SOCKET_CREATE: &str = "cs_lsm_socket_create";
pub const PROG_TP_SYS_ENTER_SENDTO: &str = "cs_tp_sys_enter_sendto";
pub const PROG_TP_SYS_ENTER_SENDMSG: &str = "cs_tp_sys_enter_sendmsg";
pub const PROG_TP_SYS_ENTER_SENDMMSG: &str = "cs_tp_sys_enter_sendmmsg";
pub const PROG_TP_SYS_ENTER_SOCKET: &str = "cs_tp_sys_enter_socket";
pub const PROG_CG_SENDMSG4: &str = "cs_cg_sendmsg4";
pub const PROG_CG_SENDMSG6: &str = "cs_cg_sendmsg6";
pub const PROG_CG_SOCK_CREATE: &str = "cs_cg_sock_create";
/// Fallback mode, kernels 6.7+: the cgroup programs of local sockets' connects and
/// datagrams. aya cannot load these attach types; the daemon loads them itself.
pub const PROG_CG_UNIX_CONNECT: &str = "cs_cg_unix_connect";
pub const PROG_CG_UNIX_SENDMSG: &str = "cs_cg_unix_sendmsg";
pub const PROG_LSM_UNIX_STREAM_CONNECT: &str = "cs_lsm_unix_stream_connect";
pub const PROG_LSM_UNIX_MAY_SEND: &str = "cs_lsm_unix_may_send";
pub const PROG_LSM_SOCKET_LISTEN: &str = "cs_lsm_socket_listen";
/// The self-protection programs (LSM mode): (program, hook). The `path_*` hooks exist only
/// in kernels built with `CONFIG_SECURITY_PATH`.
pub const GUARD_HOOKS: [(&str, &str); 38] = [
    ("cs_lsm_bpf", "bpf"),
    ("cs_lsm_capable", "capable"),
    ("cs_lsm_perf_event_open", "perf_event_open"),
    ("cs_lsm_kernel_module_request", "kernel_module_request"),
    ("cs_lsm_ptrace_access_check", "ptrace_access_check"),
    ("cs_lsm_task_kill", "task_kill"),
    ("cs_lsm_file_send_sigiotask", "file_send_sigiotask"),
    ("cs_lsm_kernel_read_file", "kernel_read_file"),
    ("cs_lsm_kernel_load_data", "kernel_load_data"),
    ("cs_lsm_sb_mount", "sb_mount"),
    ("cs_lsm_sb_umount", "sb_umount"),
    ("cs_lsm_move_mount", "move_mount"),
    ("cs_lsm_sb_remount", "sb_remount"),
    ("cs_lsm_sb_pivotroot", "sb_pivotroot"),
    ("cs_lsm_file_open", "file_open"),
    ("cs_lsm_file_receive", "file_receive"),
    ("cs_lsm_path_notify", "path_notify"),
    ("cs_lsm_file_lock", "file_lock"),
    ("cs_lsm_task_setrlimit", "task_setrlimit"),
    ("cs_lsm_task_setnice", "task_setnice"),
    ("cs_lsm_task_setioprio", "task_setioprio"),
    ("cs_lsm_task_setscheduler", "task_setscheduler"),
    ("cs_lsm_task_movememory", "task_movememory"),
    ("cs_lsm_inode_create", "inode_create"),
    ("cs_lsm_inode_mkdir", "inode_mkdir"),
    ("cs_lsm_inode_mknod", "inode_mknod"),
    ("cs_lsm_inode_symlink", "inode_symlink"),
    ("cs_lsm_inode_link", "inode_link"),
    ("cs_lsm_inode_unlink", "inode_unlink"),
    ("cs_lsm_inode_rmdir", "inode_rmdir"),
    ("cs_lsm_inode_rename", "inode_rename"),
    ("cs_lsm_path_truncate", "path_truncate"),
    ("cs_lsm_path_chmod", "path_chmod"),
    ("cs_lsm_path_chown", "path_chown"),
    ("cs_lsm_inode_setxattr", "inode_setxattr"),
    ("cs_lsm_inode_removexattr", "inode_removexattr"),
    ("cs_lsm_socket_bind", "socket_bind"),
    ("cs_lsm_file_ioctl", "file_ioctl"),
];
/// Self-protection programs for hooks only some kernels have, each with what covers its case
/// where it is missing: `file_truncate` (6.2+; before, an `O_TRUNC` open passes
/// `path_truncate`); `file_ioctl_compat` (6.8+; before, a 32-bit `ioctl` passes
/// `file_ioctl`); `inode_set_acl` and `inode_remove_acl` (6.2+; before, a POSIX ACL is an
/// extended attribute and passes `inode_setxattr`/`inode_removexattr`).
pub const GUARD_HOOKS_OPTIONAL: [(&str, &str); 4] = [
    ("cs_lsm_file_truncate", "file_truncate"),
    ("cs_lsm_file_ioctl_compat", "file_ioctl_compat"),
    ("cs_lsm_inode_set_acl", "inode_set_acl"),
    ("cs_lsm_inode_remove_acl", "inode_remove_acl"),
];
/// Self-protection programs for hooks whose arguments changed between kernels: (program of
/// [`GUARD_HOOKS`], program for the other declaration). The loader attaches whichever the
/// running kernel's verifier accepts: `perf_event_open(attr, type)` became
/// `perf_event_open(type)`; `inode_rename` at `security_inode_rename`, which takes the
/// rename flags besides the hook's arguments.
pub const GUARD_HOOK_VARIANTS: [(&str, &str); 2] = [
    ("cs_lsm_perf_event_open", "cs_lsm_perf_event_open_type"),
    ("cs_lsm_inode_rename", "cs_lsm_inode_rename_flags"),
];
/// Programs written for a `security_*` function that takes arguments besides its hook's:
/// (program, how many). Every other program runs only where the function takes exactly the
/// hook's.
pub const SECURITY_FUNCTION_EXTRA: [(&str, usize); 1] = [("cs_lsm_inode_rename_flags", 1)];
pub const PROG_TP_CGROUP_MKDIR: &str = "cs_tp_cgroup_mkdir";
pub const PROG_TP_CGROUP_RMDIR: &str = "cs_tp_cgroup_rmdir";
pub const PROG_TP_CGROUP_ATTACH: &str = "cs_tp_cgroup_attach";
pub const PROG_CG_DNS_EGRESS: &str = "cs_cg_dns_egress";
pub const PROG_FE_DNS_SEND4: &str = "cs_fe_dns_send4";
pub const PROG_FE_DNS_SEND6: &str = "cs_fe_dns_send6";
pub const PROG_FE_DNS_ENQUEUE: &str = "cs_fe_dns_enqueue";
pub const PROG_CG_DNS_CONNECT4: &str = "cs_cg_dns_connect4";
pub const PROG_CG_DNS_CONNECT6: &str = "cs_cg_dns_connect6";
pub const PROG_CG_DNS_SENDMSG4: &str = "cs_cg_dns_sendmsg4";
pub const PROG_CG_DNS_SENDMSG6: &str = "cs_cg_dns_sendmsg6";
/// The global the loader sets to the [`DnsOffsets`] of the running kernel.
pub const GLOBAL_DNS_OFFSETS: &str = "DNS_OFFSETS";
/// The global the loader sets to its network namespace cookie (`SO_NETNS_COOKIE`).
pub const GLOBAL_HOST_NETNS_COOKIE: &str = "HOST_NETNS_COOKIE";
pub const PROG_CG_DNS_INGRESS: &str = "cs_cg_dns_ingress";

/// Global set at load time: offset of `pid` in the `task_newtask` tracepoint record, read
/// from the kernel's own format file.
pub const GLOBAL_NEWTASK_PID_OFFSET: &str = "NEWTASK_PID_OFFSET";
/// Globals set at load time: offsets of `root` (the hierarchy id, 0 for cgroup v2) and `id`
/// in the `cgroup_mkdir`/`cgroup_rmdir` tracepoint records, read from the format file.
pub const GLOBAL_CGROUP_ROOT_OFFSET: &str = "CGROUP_ROOT_OFFSET";
pub const GLOBAL_CGROUP_ID_OFFSET: &str = "CGROUP_ID_OFFSET";
/// Global set at load time: offset of `pid` in the `cgroup_attach_task` record.
pub const GLOBAL_CGROUP_ATTACH_PID_OFFSET: &str = "CGROUP_ATTACH_PID_OFFSET";
/// Global set at load time: the [`KernelOffsets`] read from the kernel's BTF.
pub const GLOBAL_KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
/// The [`GuardSettings`] global.
pub const GLOBAL_GUARD: &str = "GUARD";

/// The label id the daemon gives its start-up canary; hooks deny its actions at once and
/// report them, which proves the hooks run.
pub const LABEL_CANARY: u32 = u32::MAX;
/// No label: the task is not an agent.
pub const LABEL_NONE: u32 = 0;
/// Reserved label of a cgroup created while the policy matches cgroups by glob or systemd
/// unit, until the daemon has classified it (written by the `cgroup_mkdir` program into
/// [`MAP_CGROUP_LABELS`]). A task under such a cgroup is held with this label; the daemon
/// re-labels it or lets it go.
pub const LABEL_UNCLASSIFIED: u32 = u32::MAX - 1;

/// [`Config::cgroup_labels`] bits: [`MAP_CGROUP_LABELS`] has entries (unlabelled tasks walk
/// their cgroup's ancestors once per cgroup).
pub const CGROUP_LABELS_ON: u32 = 1;
/// The policy matches cgroups by glob or systemd unit: every new cgroup v2 directory is marked
/// [`LABEL_UNCLASSIFIED`] by the `cgroup_mkdir` program until the daemon classifies it.
pub const CGROUP_MATCH: u32 = 2;

/// Enforcement mode, in [`Config::mode`].
pub const MODE_OFF: u32 = 0;
/// BPF LSM hooks hold execs before the new image loads and connects before anything is sent.
pub const MODE_LSM: u32 = 1;
/// Tracepoints and cgroup programs: connects are held as in LSM mode; execs are held after the
/// new image is loaded but before its first instruction, so a deny kills.
pub const MODE_FALLBACK: u32 = 2;

/// [`TaskState::state`]: nothing is pending.
pub const STATE_IDLE: u32 = 0;
/// A request is waiting for a decision; the task is stopped and its syscall restarts into
/// another hold until the decision is written.
pub const STATE_PENDING: u32 = 1;
/// The pending action may run once (if it is still the same action).
pub const STATE_ALLOWED: u32 = 2;
/// The pending action fails with `EPERM` once.
pub const STATE_DENIED: u32 = 3;
/// An approved exec passed its pre-exec hook; further binfmt passes of the same `execve`
/// (interpreters) are let through, and the new image is held once more to be verified.
pub const STATE_EXEC_RELEASED: u32 = 4;

/// [`TaskState::kind`] and [`Event::kind`] values.
pub const KIND_NONE: u32 = 0;
/// An exec held before the new image is loaded (LSM mode).
pub const KIND_EXEC: u32 = 1;
/// An exec held after the new image is loaded, before its first instruction: the fallback
/// hold, and the verification of an approved exec in LSM mode.
pub const KIND_EXEC_LOADED: u32 = 2;
/// An outbound `connect`.
pub const KIND_CONNECT: u32 = 3;
/// The canary's exec or connect was seen by a hook and denied.
pub const KIND_CANARY_EXEC: u32 = 4;
pub const KIND_CANARY_CONNECT: u32 = 5;
/// Reports a failure in the kernel (for example a full ring buffer); see [`Event::detail`].
pub const KIND_ERROR: u32 = 6;
/// A cgroup v2 directory was created and marked [`LABEL_UNCLASSIFIED`]; its id is in
/// [`Event::cgroup_id`]. [`Event::detail`] is non-zero when the mark could not be written
/// (the map is full): that cgroup is not held.
pub const KIND_CGROUP_NEW: u32 = 7;
/// A datagram (or a TCP Fast Open `sendto`) to a destination not yet decided for the
/// process: `sendto`, `sendmsg`, `sendmmsg` with an address. The destination is in the event
/// as for a connect.
pub const KIND_SEND: u32 = 8;
/// Creating a socket that is not an ordinary TCP/UDP/local one (raw, packet, ICMP, other
/// families): [`Event::family`], [`Event::sock_type`] and the protocol in [`Event::port`].
pub const KIND_SOCKET: u32 = 9;
/// A connect or datagram to a local (`AF_UNIX`) socket: [`Event::addr`] holds the peer's
/// [`UnixPeer`] key, [`Event::unix_name`] the name it was bound to.
pub const KIND_UNIX: u32 = 10;
/// An approved exec loaded exactly what was approved and runs ([`Event::request_id`] is the
/// approved request): evidence for the record, nothing to decide.
pub const KIND_EXEC_VERIFIED: u32 = 11;

/// A labelled task tried to change, stop, read or step around countersign and was refused
/// (LSM mode; see `TAMPER_*` in [`Event::detail`]). [`Event::addr`] holds the target: a
/// process's tgid (first 4 bytes), or a file's (device, inode) (8 bytes each, little-endian);
/// [`Event::port`] a detail (the `bpf` command, the signal, the module source);
/// [`Event::unix_name`] the task's `comm` (16 bytes).
pub const KIND_TAMPER: u32 = 12;
/// A labelled task makes a TCP socket listen on an address other than loopback: peers that
/// reach the host may then connect to it, and what flows back over such a connection is no
/// send with an address. [`Event::family`], [`Event::addr`] and [`Event::port`] are the
/// address it is bound to (all zeros: every address).
pub const KIND_LISTEN: u32 = 13;

/// [`Event::detail`] of a [`KIND_TAMPER`]: the `bpf()` system call.
pub const TAMPER_BPF: i32 = 1;
/// Tracing, or reading or writing the memory of, an unlabelled process (`ptrace`,
/// `/proc/PID/mem`, `process_vm_*`, `pidfd_getfd`), or reading countersign's own.
pub const TAMPER_PTRACE: i32 = 2;
/// A signal to countersign's daemon, approver or collector.
pub const TAMPER_SIGNAL: i32 = 3;
/// Loading a kernel module, a kexec image or a security policy.
pub const TAMPER_MODULE: i32 = 4;
/// Mounting, unmounting or moving a mount.
pub const TAMPER_MOUNT: i32 = 5;
/// Writing, removing, renaming or changing one of countersign's files.
pub const TAMPER_FILE_WRITE: i32 = 6;
/// Opening one of countersign's secrets.
pub const TAMPER_FILE_READ: i32 = 7;
/// Writing a kernel setting: under `/proc/sys` (or another `/proc` file that is not a
/// process's own), sysfs, securityfs, debugfs or tracefs, where usermode helpers and the
/// settings enforcement relies on live.
pub const TAMPER_SYSCTL: i32 = 8;
/// Using a capability no agent needs and with which the kernel's memory, the disk under
/// countersign's files, the clock of its records or the host itself are reached (see
/// [`GUARD_CAPABILITIES`]); [`Event::port`] is the capability.
pub const TAMPER_CAPABILITY: i32 = 9;
/// Opening a disk (a block device, or a character device of [`GuardSettings::raw_majors`]):
/// countersign's files and secrets are on it, beneath the file system's checks.
pub const TAMPER_DEVICE: i32 = 10;
/// Performance monitoring of a whole processor (every process on it, countersign's
/// included: samples carry their registers and stacks).
pub const TAMPER_PERF: i32 = 11;
/// Binding port 53 (a DNS server's): the host's resolvers are trusted for destination names,
/// and a labelled root that stopped the local one could answer in its place. [`Event::port`]
/// is the socket's family.
pub const TAMPER_DNS: i32 = 12;
/// Pushing input into a terminal (`TIOCSTI`, `TIOCLINUX`): the terminal's other programs (the
/// shell the agent was started from) would read it as typed and run it, outside the agent.
/// [`Event::port`] is the request's low half.
pub const TAMPER_TTY: i32 = 13;
/// A descriptor passed to a labelled task by another process (`SCM_RIGHTS`, `pidfd_getfd`)
/// that the task could not have opened itself; [`Event::port`] is the `TAMPER_*` kind the
/// open would have been refused as.
pub const TAMPER_FILE_PASSED: i32 = 14;
/// Asking for fanotify's permission events, with which the asker decides (or never answers)
/// other processes' opens, the daemon's included; [`Event::port`] is the mask's bits 16-31.
pub const TAMPER_FILE_GATE: i32 = 15;
/// A lock or lease on one of countersign's files (`flock`, `fcntl`); [`Event::port`] is the
/// lock's type.
pub const TAMPER_FILE_LOCK: i32 = 16;
/// Changing how one of countersign's processes runs: its resource limits, priority, I/O
/// priority, scheduling policy or affinity, memory placement; [`Event::port`] says which
/// (1 to 5, in that order).
pub const TAMPER_PROCESS: i32 = 17;
/// Writing a cgroup file that would kill, freeze or starve the daemon: any file of the
/// daemon's cgroup or of one above it, and `cgroup.kill`, `cgroup.freeze` (v1:
/// `freezer.state`) anywhere (a cgroup frozen first would freeze the daemon moved into it).
pub const TAMPER_CGROUP: i32 = 18;
/// Moving the daemon into another cgroup (its `cgroup.procs` written with the daemon's pid).
/// The kernel has no hook to refuse a move: the mover is killed and the daemon moves itself
/// back ([`Event::addr`] is the daemon's tgid).
pub const TAMPER_CGROUP_MOVE: i32 = 19;
/// `TIOCSTI` and `TIOCLINUX`.
pub const TTY_INPUT_REQUESTS: [u32; 2] = [0x5412, 0x541C];

/// The capabilities a labelled task is never granted, whatever its uid (a bit per
/// `CAP_*`): `CAP_LINUX_IMMUTABLE` (9: making countersign's files immutable or
/// append-only), `CAP_SYS_MODULE` (16: also unloading modules), `CAP_SYS_RAWIO` (17:
/// `/dev/mem`, `/proc/kcore`, I/O ports, raw SCSI commands), `CAP_SYS_BOOT` (22: reboot,
/// kexec), `CAP_SYS_TIME` (25: the clock of the records), `CAP_MKNOD` (27: a device node of
/// the disk), `CAP_MAC_ADMIN` (33: the policy of another security module).
pub const GUARD_CAPABILITIES: u64 =
    1 << 9 | 1 << 16 | 1 << 17 | 1 << 22 | 1 << 25 | 1 << 27 | 1 << 33;
/// The capabilities a labelled task is not granted over the host's own (initial) user
/// namespace; in a namespace of its own (a sandbox's network namespace) they are its own
/// business: `CAP_NET_ADMIN` (12: the host's firewall and NAT, routes, interfaces and tunnels,
/// with which an allowed destination could be redirected to any other).
pub const GUARD_CAPABILITIES_HOST: u64 = 1 << 12;

/// Settings of the self-protection hooks, set by the loader (LSM mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardSettings {
    /// Non-zero: a tamper attempt also kills the task (`on_tamper: kill`).
    pub kill: u32,
    pub _pad: u32,
    /// The countersign executable's (device, inode): an unlabelled process running it (the
    /// daemon, the approver, the collector) is protected like the daemon.
    pub self_dev: u64,
    pub self_ino: u64,
    /// Majors of the character devices through which a disk is read or written beneath its
    /// file systems (SCSI generic, bsg, NVMe ...; from `/proc/devices`; 0: unused). Block
    /// devices are refused whatever their major.
    pub raw_majors: [u32; RAW_MAJORS],
}
/// Entries of [`GuardSettings::raw_majors`].
pub const RAW_MAJORS: usize = 8;
const _: () = assert!(size_of::<GuardSettings>() == 56);

/// `/proc`'s super block magic.
pub const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// `CGROUP_SUPER_MAGIC` (v1 hierarchies) and `CGROUP2_SUPER_MAGIC`.
pub const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// [`TaskState::flags`]: the task passed `sched_process_exec` since its last `execve` entry.
pub const FLAG_EXEC_LOADED: u32 = 1;
/// (Bit 2 was the after-load verification of an approved exec in LSM mode; the kernel
/// compares the loaded image with [`MAP_EXEC_APPROVED`] itself now.)
/// Fallback mode: the allowed connect was let through by a grant; the cgroup program checks
/// the grant again with the socket type (which the `connect` tracepoint cannot see).
pub const FLAG_GRANT_CHECK: u32 = 4;
/// Fallback mode: the task's execs are decided before they start, by the daemon's seccomp
/// notifier (`countersign exec` installed the filter; children inherit it and this flag). An
/// image such a task loads runs only if it is the one [`MAP_EXEC_APPROVED`] holds for the
/// task, or one the fast path allows: anything else is killed before its first instruction.
pub const FLAG_NOTIFIED: u32 = 8;
/// Fallback mode: the task is inside a native `connect(2)` (between its enter and exit
/// tracepoints), whose local-socket outcome `sys_exit_connect` checks. A local-socket connect
/// of a labelled task without it came another way (io_uring, the 32-bit entry) and is refused.
pub const FLAG_IN_CONNECT: u32 = 16;
/// Fallback mode: the task is inside a native `listen(2)` (between its enter and exit
/// tracepoints), which the seccomp notifier or `sys_exit_listen` decides. A labelled listen
/// on the network without it came another way (io_uring, the 32-bit entry): it is killed.
pub const FLAG_IN_LISTEN: u32 = 32;
/// The task's pending request could not be reported: the event ring was full (a burst of
/// held actions faster than the daemon drains). The task stays held; the daemon finds it in
/// [`MAP_TASKS`] (it watches [`STAT_DEFERRED`]), takes it as a request and clears the flag.
pub const FLAG_UNREPORTED: u32 = 64;

/// [`Event::detail`] of a [`KIND_ERROR`]: in fallback mode, a connect the tracepoint let
/// through on a grant was not covered by it at the cgroup program (a grant for another socket
/// type, which the tracepoint cannot see, or one that ended in between) and was refused: the
/// program that can see the type cannot hold.
pub const ERROR_GRANT_RECHECK: i32 = 1;
/// [`Event::detail`] of a [`KIND_ERROR`]: an action of a labelled task from a context that
/// cannot be held (an io_uring worker or SQPOLL thread, an io_uring submission, a path that
/// did not pass the syscall the hold restarts) and that nothing in the kernel allowed: it was
/// refused. [`Event::action`] carries the `KIND_*` of the action, the rest is filled in as
/// for a hold.
pub const ERROR_UNHOLDABLE: i32 = 2;
/// Fallback mode: a labelled task created a socket of a family no cgroup program can refuse
/// (not IPv4/IPv6) and the policy does not allow it in the kernel: the task was killed.
pub const ERROR_SOCKET_KILLED: i32 = 3;
/// Fallback mode: a task under the seccomp notifier loaded an image that is not the one
/// approved for it (its file or argv changed after the approval), or one that was never
/// approved: it was killed before its first instruction. [`Event::request_id`] is the
/// approved request, if any.
pub const ERROR_EXEC_UNVERIFIED: i32 = 4;
/// Fallback mode: a labelled task's `connect` reached a local socket the policy does not
/// allow in the kernel (a denied or held one: fallback mode sees a local socket only once the
/// connect is made, when nothing can be held any more): the task was killed before the
/// system call returned. [`Event::action`] is [`KIND_UNIX`], the rest as for a hold.
pub const ERROR_UNIX_KILLED: i32 = 5;
/// Fallback mode (kernels 6.7+): a labelled task's local-socket connect made without
/// `connect(2)` (io_uring, the 32-bit entry), or a datagram it sent with an address while its
/// label restricts local sockets: nothing in fallback mode can tell which socket such a call
/// reaches, so it was refused. [`Event::action`] is [`KIND_UNIX`].
pub const ERROR_UNIX_UNSEEN: i32 = 6;
/// Fallback mode: an exec held after loading (an agent not started by `countersign exec`)
/// by a task that another process traces (it asked to be traced, or was attached to): its
/// tracer could let the image run before the daemon holds it, so it was killed before its
/// first instruction.
pub const ERROR_EXEC_TRACED: i32 = 7;
/// Fallback mode: an exec held after loading ran before its decision — its stop was ended
/// (a `SIGCONT`, a tracer that attached before the daemon) and it touched its first page of
/// code or data: it was killed at that page fault, before the faulting instruction ran.
/// [`Event::request_id`] is the held request.
pub const ERROR_EXEC_RAN_EARLY: i32 = 8;
/// Fallback mode: a labelled task's `listen` left a socket on the network in its descriptor
/// that was not decided for it (under the seccomp notifier: another thread put it there while
/// the call waited), or one that could not be held (the event ring was full): it was killed
/// before its `listen` returned. [`Event::action`] is [`KIND_LISTEN`], the rest as for a hold.
pub const ERROR_LISTEN_KILLED: i32 = 9;
/// Fallback mode: a labelled task listened on the network without `listen(2)` (io_uring's
/// `IORING_OP_LISTEN`, the 32-bit entry), where nothing can hold it (seen by the kprobe on
/// `inet_listen`): it was killed before it could accept. [`Event::action`] is [`KIND_LISTEN`].
pub const ERROR_LISTEN_UNSEEN: i32 = 10;

/// Longest argv (the bytes of the strings with their terminators) an approved exec can be
/// verified against in the kernel (see [`ApprovedExec`]).
pub const ARGV_VERIFY_MAX: usize = 16 * 1024;
/// Execs approved at once and not yet loaded (one per task at most).
pub const MAX_EXEC_APPROVED: u32 = 1_024;

/// What an approved exec must load, written by the daemon before it lets the `execve` of a
/// task under the seccomp notifier start; keyed by thread id. `sched_process_exec` compares
/// the loaded image's (device, inode) and its argv (`mm->arg_start..arg_end`, the kernel's
/// own copy) byte for byte, then removes the entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ApprovedExec {
    /// The request the approval is for ([`TaskState::request_id`]).
    pub request_id: u64,
    /// The image that must load (for a script: its interpreter).
    pub dev: u64,
    pub ino: u64,
    /// Bytes of `argv` used; the rest of the array is zero.
    pub argv_len: u32,
    pub _pad: u32,
    /// The argv the image must get: each string with its terminating NUL, as the kernel lays
    /// them out (for a script: interpreter, its argument, the script's name, the rest).
    pub argv: [u8; ARGV_VERIFY_MAX],
}
const _: () = assert!(size_of::<ApprovedExec>() == 32 + ARGV_VERIFY_MAX);

/// Stats indexes in [`MAP_STATS`].
pub const STAT_EVENTS_DROPPED: u32 = 0;
pub const STAT_LABEL_INHERIT_FAILED: u32 = 1;
pub const STAT_HOLDS: u32 = 2;
/// Connects allowed in the kernel by the policy's fast path (never stopped).
pub const STAT_FAST_ALLOWED: u32 = 3;
/// Execs allowed in the kernel by the policy's fast path (never stopped). In LSM mode a script
/// run directly counts once per file the kernel checks (the script, then its interpreter).
pub const STAT_FAST_EXEC: u32 = 4;
/// Execs and connects allowed in the kernel by a grant (never stopped).
pub const STAT_GRANT_ALLOWED: u32 = 5;
/// Actions of labelled tasks refused because they came from a context that cannot be held
/// (see [`ERROR_UNHOLDABLE`]).
pub const STAT_UNHOLDABLE: u32 = 6;
/// Datagrams let through (or refused) by a decision already made for their process and
/// destination ([`MAP_SEND_DECIDED`]).
pub const STAT_SEND_DECIDED: u32 = 7;
/// Held requests the event ring had no room for ([`FLAG_UNREPORTED`]): still held, picked up
/// by the daemon from the task map.
pub const STAT_DEFERRED: u32 = 8;
pub const STAT_COUNT: u32 = 9;

/// `-ERESTARTNOINTR`: the syscall restarts after the stop, whatever the signal disposition.
pub const ERESTARTNOINTR: i32 = 513;
pub const EPERM: i32 = 1;

/// What the `fentry` DNS capture reads of the kernel's structures, from its BTF, and the
/// daemon's network namespace (`valid` 0: unknown, the capture is not attached).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOffsets {
    pub valid: u32,
    /// The inode number of the daemon's network namespace (`/proc/self/ns/net`).
    pub host_netns_inum: u32,
    /// `struct sk_buff`: `sk`, `head`, `network_header` (u16), `len` and `data_len` (u32).
    pub skb_sk: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_len: u32,
    pub skb_data_len: u32,
    /// `struct sock`: `__sk_common.skc_net` (a `struct net *`).
    pub sk_net: u32,
    /// `struct net`: `ns.inum` (u32).
    pub net_inum: u32,
}
const _: () = assert!(size_of::<DnsOffsets>() == 36);

/// One captured DNS packet in [`MAP_DNS`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsPacket {
    /// Bytes of `data` that hold the packet (from the IP header on).
    pub len: u32,
    /// The packet's whole length (more than `len` when truncated).
    pub wire_len: u32,
    /// 1: sent by a local socket (a query to port 53); 0: received (an answer from port 53).
    pub outgoing: u32,
    pub _pad: u32,
    pub data: [u8; DNS_CAPTURE_BYTES],
}
const _: () = assert!(size_of::<DnsPacket>() == 16 + DNS_CAPTURE_BYTES);

/// State of one labelled thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskState {
    /// Label id (never [`LABEL_NONE`] for an entry in the map).
    pub label: u32,
    /// One of the `STATE_*` values.
    pub state: u32,
    /// One of the `KIND_*` values for the pending or decided action.
    pub kind: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Id of the pending or decided request (0: none).
    pub request_id: u64,
    /// Hash of the exact action the request is about (0 for execs: they are bound by the
    /// verification of the loaded image instead, see `KIND_EXEC_LOADED`).
    pub action_hash: u64,
    /// User pointers given to the last `execve`/`execveat`, for the daemon to read the
    /// filename and argv of a held exec from the stopped task's memory.
    pub exec_filename: u64,
    pub exec_argv: u64,
    /// The destination of a pending connect (as in [`Event`]), so that a restarted daemon
    /// can show what it adopts.
    pub family: u16,
    pub port: u16,
    pub sock_type: u16,
    pub _pad: u16,
    pub addr: [u8; 16],
    /// The id the daemon showed for the pending request (written by the daemon only), so
    /// that a restarted daemon shows the same id.
    pub user_id: u64,
}
const _: () = assert!(size_of::<TaskState>() == 80);

/// Global settings, written by the daemon at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// One of the `MODE_*` values; `MODE_OFF` makes every hook return at once.
    pub mode: u32,
    /// Thread-group id of the daemon: never held, whatever its label.
    pub daemon_tgid: u32,
    /// [`CGROUP_LABELS_ON`] when [`MAP_CGROUP_LABELS`] has entries, so that unlabelled tasks
    /// skip the cgroup walk otherwise; [`CGROUP_MATCH`] while new cgroups must be classified.
    /// (Bits of one field: the pinned config keeps its size across versions.)
    pub cgroup_labels: u32,
    /// Non-zero when [`MAP_EXEC_LABELS`] has entries, so that unlabelled execs skip the
    /// lookup otherwise.
    pub exec_labels: u32,
}
const _: () = assert!(size_of::<Config>() == 16);

/// The data of a [`MAP_CONNECT_ALLOW`] key (after the LPM prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectKey {
    pub label: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ConnectKey>() == 24);

/// An inclusive port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortSpan {
    pub first: u16,
    pub last: u16,
}

/// What a [`MAP_CONNECT_ALLOW`] entry allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectAllow {
    /// `PROTO_*` bits; both: any protocol.
    pub protocols: u32,
    /// How many of `spans` are used.
    pub count: u32,
    pub spans: [PortSpan; MAX_PORT_SPANS],
}
const _: () = assert!(size_of::<ConnectAllow>() == 72);

/// A [`MAP_EXEC_ALLOW`] key: a file as the kernel knows it, for one label.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecKey {
    pub label: u32,
    pub _pad: u32,
    /// The kernel's `dev_t` of the file's super block (`MAJOR << 20 | MINOR`), not the
    /// user-space encoding `stat` returns.
    pub dev: u64,
    /// The inode number.
    pub ino: u64,
}
const _: () = assert!(size_of::<ExecKey>() == 24);

/// A [`MAP_GRANT_CONNECT`] key: one destination, for one label.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantConnectKey {
    pub label: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// Network order; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<GrantConnectKey>() == 24);

/// What a [`MAP_GRANT_CONNECT`] entry allows: an expiry (`CLOCK_BOOTTIME` ns, 0: none) per
/// socket type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantConnect {
    /// Any socket type.
    pub any: u64,
    /// `SOCK_STREAM` only.
    pub stream: u64,
    /// `SOCK_DGRAM` only.
    pub dgram: u64,
}
const _: () = assert!(size_of::<GrantConnect>() == 24);

/// A file as the kernel knows it (see [`ExecKey`]): a [`MAP_EXEC_LABELS`] and
/// [`MAP_GUARD_FILES`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}
const _: () = assert!(size_of::<FileKey>() == 16);

/// Byte offsets of the kernel struct fields the exec fast path reads, taken from the running
/// kernel's BTF at load time (they differ between kernel versions and builds). With `valid`
/// 0 the hooks never read kernel structs and every exec takes the slow path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Non-zero once every offset below was found.
    pub valid: u32,
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `task_struct.mm`
    pub task_mm: u32,
    /// `mm_struct.exe_file`
    pub mm_exe_file: u32,
    /// `mm_struct.arg_start` and `arg_end` (the loaded image's argv).
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// Non-zero when the LSM exec hook reads the exec's filename and argv pointers from the
    /// task's saved user registers (below), so that no syscall tracepoint is needed. Zero:
    /// the `sys_enter_execve`/`execveat` tracepoints record them.
    pub regs_valid: u32,
    /// Offsets in `struct pt_regs` of the syscall number and the first three arguments.
    pub regs_nr: u32,
    pub regs_arg0: u32,
    pub regs_arg1: u32,
    pub regs_arg2: u32,
    /// The syscall numbers of `execve` and `execveat` on this architecture.
    pub nr_execve: u32,
    pub nr_execveat: u32,
    /// Non-zero when the `task_struct` offsets below are known.
    pub task_valid: u32,
    /// `task_struct.flags` (u32), `group_leader` (pointer), `start_time` (u64).
    pub task_flags: u32,
    pub task_group_leader: u32,
    pub task_start_time: u32,
    /// `msghdr.msg_name` (the kernel's copy of a send's destination, or null).
    pub msghdr_name: u32,
    /// `socket.ops` and `proto_ops.family`: the family of a socket a send is made on.
    pub socket_ops: u32,
    pub proto_ops_family: u32,
    /// Non-zero when the `AF_UNIX` offsets below are known.
    pub unix_valid: u32,
    /// `socket.sk`; `unix_sock.addr` (a `unix_address *`) and `unix_sock.path.dentry`;
    /// `dentry.d_inode`; `unix_address.len` (int) and `unix_address.name` (sockaddr_un).
    pub socket_sk: u32,
    pub unix_addr: u32,
    pub unix_path_dentry: u32,
    pub dentry_inode: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// The system calls (native and compat) through which a network hold is restartable:
    /// `socket`, `connect`, `sendto`, `sendmsg`, `sendmmsg`, and the 32-bit ones (0: unused).
    /// A network hook reached under any other (`io_uring_enter`) cannot hold (with
    /// [`KernelOffsets::regs_valid`]).
    pub nr_net: [u32; NR_NET_SYSCALLS],
    /// Non-zero when the self-protection offsets below are known.
    pub guard_valid: u32,
    /// `task_struct.pid` (the thread id) and `tgid`.
    pub task_pid: u32,
    pub task_tgid: u32,
    /// `file.f_mode`; `file.f_path` + `path.dentry`; `path.dentry`; `dentry.d_parent`;
    /// `dentry.d_name` + `qstr.name`; `super_block.s_magic`.
    pub file_mode: u32,
    pub file_dentry: u32,
    pub path_dentry: u32,
    pub dentry_parent: u32,
    pub dentry_name: u32,
    pub sb_magic: u32,
    /// `inode.i_mode` (u16) and `inode.i_rdev` (u32, the kernel's encoding).
    pub inode_mode: u32,
    pub inode_rdev: u32,
    /// Non-zero when the descriptor-table offsets below are known (fallback mode's check of
    /// a local socket's peer after its connect).
    pub fd_valid: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds` (u32) and `fdtable.fd`,
    /// `file.private_data`, `unix_sock.peer`; `inode.i_mode` as above.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub unix_peer: u32,
    /// `task_struct.ptrace` (u32: non-zero while the task is traced), with `task_valid`.
    pub task_ptrace: u32,
    /// `user_namespace.level` (int: 0 for the initial namespace), with `guard_valid`.
    pub userns_level: u32,
    /// Non-zero when the listening-socket offsets below are known.
    pub listen_valid: u32,
    /// `sock_common.skc_family` (u16), `skc_rcv_saddr` (IPv4, network order), `skc_num`
    /// (u16, host order), `skc_v6_rcv_saddr` (16 bytes): the address a socket is bound to.
    pub skc_family: u32,
    pub skc_rcv_saddr: u32,
    pub skc_num: u32,
    pub skc_v6_rcv_saddr: u32,
}
/// Entries of [`KernelOffsets::nr_net`].
pub const NR_NET_SYSCALLS: usize = 18;
const _: () = assert!(size_of::<KernelOffsets>() == 296);

/// `task_struct.flags`: an io_uring worker or SQPOLL thread (`PF_IO_WORKER`).
pub const PF_IO_WORKER: u32 = 0x10;

/// A [`MAP_SEND_DECIDED`] key: a destination for one process and label.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendKey {
    pub tgid: u32,
    pub label: u32,
    /// `AF_INET` or `AF_INET6` (IPv4-mapped IPv6 addresses are IPv4).
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// The socket's type (`SOCK_DGRAM`; `SOCK_STREAM` for TCP Fast Open): a decision for
    /// datagrams is not one for a connection.
    pub sock_type: u32,
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SendKey>() == 32);

/// A [`MAP_SEND_DECIDED`] value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendDecided {
    /// The process's `start_time` (of its thread-group leader): an entry of an earlier
    /// process with the same pid never matches.
    pub start_time: u64,
    /// [`STATE_ALLOWED`] or [`STATE_DENIED`].
    pub verdict: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SendDecided>() == 16);

/// A [`MAP_SOCKET_ALLOW`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub label: u32,
    /// `AF_*`.
    pub family: u16,
    /// `SOCK_*`, without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
    pub sock_type: u16,
}
const _: () = assert!(size_of::<SocketKey>() == 8);

/// Whether a socket is one every program needs and no policy decides: local (`AF_UNIX`),
/// netlink, and TCP or UDP over IPv4/IPv6 (their connects and sends are the actions). Every
/// other socket (raw, packet, ICMP, SCTP, vsock, ...) is a [`KIND_SOCKET`] action.
#[inline(always)]
#[must_use]
pub fn ordinary_socket(family: u16, sock_type: u16, protocol: u32) -> bool {
    const AF_UNIX: u16 = 1;
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    const AF_NETLINK: u16 = 16;
    match family {
        AF_UNIX | AF_NETLINK => true,
        AF_INET | AF_INET6 => match sock_type {
            // TCP (and multipath TCP, which connects like it).
            1 => matches!(protocol, 0 | 6 | 262),
            2 => matches!(protocol, 0 | 17),
            _ => false,
        },
        _ => false,
    }
}

/// The hash a socket creation is bound to (family, type and protocol).
#[inline(always)]
#[must_use]
pub fn socket_hash(family: u16, sock_type: u16, protocol: u32) -> u64 {
    let mut addr = [0u8; 16];
    let p = protocol.to_ne_bytes();
    addr[0] = p[0];
    addr[1] = p[1];
    addr[2] = p[2];
    addr[3] = p[3];
    // Not a destination: the family is moved out of the AF_* range so the two never collide.
    connect_hash(family | 0x8000, sock_type, &addr)
}

/// A label's name, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelName {
    pub name: [u8; LABEL_NAME_LEN],
}
const _: () = assert!(size_of::<LabelName>() == LABEL_NAME_LEN);

/// An event from a hook to the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// One of the `KIND_*` values.
    pub kind: u32,
    pub label: u32,
    /// Thread-group id (the user-space pid) and thread id.
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// `AF_INET` or `AF_INET6` for connects.
    pub family: u16,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, … where known (0 otherwise).
    pub sock_type: u16,
    /// Destination port (host byte order) for connects.
    pub port: u16,
    /// For a [`KIND_ERROR`] about an action: that action's `KIND_*` (0 otherwise).
    pub action: u16,
    /// Kind-specific detail: for [`KIND_ERROR`] a negative errno or a reason code.
    pub detail: i32,
    pub request_id: u64,
    pub action_hash: u64,
    /// Destination address: 4 bytes for IPv4 (the rest zero) or 16 for IPv6, network order.
    /// For a [`KIND_EXEC`] in LSM mode: the (device, inode) of the file the kernel opened,
    /// each 8 bytes little-endian (zero if it could not be read).
    pub addr: [u8; 16],
    /// User pointers of the exec's filename and argv (see [`TaskState::exec_filename`]).
    pub exec_filename: u64,
    pub exec_argv: u64,
    pub cgroup_id: u64,
    /// [`KIND_UNIX`]: the `sockaddr_un` the peer was bound with (`sun_path`, NUL-padded; a
    /// leading NUL is an abstract name), and its length in bytes.
    pub unix_name_len: u32,
    pub unix_name: [u8; UNIX_NAME_LEN],
}
const _: () = assert!(size_of::<Event>() == 200);

impl Default for Event {
    fn default() -> Self {
        Self {
            kind: 0,
            label: 0,
            tgid: 0,
            tid: 0,
            uid: 0,
            family: 0,
            sock_type: 0,
            port: 0,
            action: 0,
            detail: 0,
            request_id: 0,
            action_hash: 0,
            addr: [0; 16],
            exec_filename: 0,
            exec_argv: 0,
            cgroup_id: 0,
            unix_name_len: 0,
            unix_name: [0; UNIX_NAME_LEN],
        }
    }
}

/// Bytes of `sun_path`.
pub const UNIX_NAME_LEN: usize = 108;

/// How a local socket is known to the kernel side: the (device, inode) of the file it is
/// bound to, or for an abstract name ([`UNIX_ABSTRACT_DEV`], [`abstract_hash`]). Laid out in
/// [`Event::addr`] as two native-endian `u64`s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixPeer {
    pub dev: u64,
    pub ino: u64,
}

impl UnixPeer {
    #[inline(always)]
    #[must_use]
    pub fn to_addr(self) -> [u8; 16] {
        let d = self.dev.to_ne_bytes();
        let i = self.ino.to_ne_bytes();
        [
            d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], i[0], i[1], i[2], i[3], i[4], i[5],
            i[6], i[7],
        ]
    }

    #[must_use]
    pub fn from_addr(a: &[u8; 16]) -> Self {
        let mut d = [0u8; 8];
        let mut i = [0u8; 8];
        d.copy_from_slice(&a[..8]);
        i.copy_from_slice(&a[8..]);
        Self {
            dev: u64::from_ne_bytes(d),
            ino: u64::from_ne_bytes(i),
        }
    }
}

/// FNV-1a over an abstract socket name: `sun_path` after its leading NUL, the bytes past
/// `len` taken as NULs — so a name bound with the whole NUL-padded `sockaddr_un` hashes like
/// the short one. A fixed number of rounds without an early exit, so the verifier walks it
/// once. Never 0.
#[inline(always)]
#[must_use]
pub fn abstract_hash(name: &[u8; UNIX_NAME_LEN], len: usize) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut i = 1;
    while i < UNIX_NAME_LEN {
        let b = if i < len { name[i] } else { 0 };
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        i += 1;
    }
    h | 1
}

/// FNV-1a over the fields that make a connect the same connect: family, port and address.
/// Both the tracepoint (reading the user's sockaddr) and the cgroup program (reading the
/// kernel's copy) compute it, so a restarted connect to elsewhere does not match.
#[inline(always)]
#[must_use]
pub fn connect_hash(family: u16, port: u16, addr: &[u8; 16]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    h = (h ^ u64::from(family)).wrapping_mul(PRIME);
    h = (h ^ u64::from(port)).wrapping_mul(PRIME);
    let mut i = 0;
    while i < 16 {
        h = (h ^ u64::from(addr[i])).wrapping_mul(PRIME);
        i += 1;
    }
    // Never 0: 0 means "no hash".
    h | 1
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: `#[repr(C)]`, no padding (sizes pinned above), every bit
    // pattern valid.
    unsafe impl aya::Pod for super::TaskState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above (a byte array).
    unsafe impl aya::Pod for super::LabelName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectAllow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GrantConnectKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GrantConnect {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SendDecided {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ApprovedExec {}
}
