//! The only code that touches aya: loading the programs, choosing LSM or fallback mode,
//! proving the hooks run (the canary), and reading/writing the maps.
//!
//! One [`Kernel`] value owns all of it; the daemon's main loop is its only user.
mod btf;
mod canary;
pub mod dns;
mod format;
pub mod pin;
mod unix_cgroup;
pub(crate) use unix_cgroup::sys_bpf;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, KProbe, Lsm, RawTracePoint, TracePoint,
        cgroup_sock::CgroupSockLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        kprobe::KProbeLinkId,
        links::{FdLink, PinnedLink},
        lsm::LsmLinkId,
        raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};
use countersign_ebpf as shared;
use shared::{Config, Event, FileKey, LabelName, TaskState};

pub use canary::{CanaryError, canary_exec_main, canary_main};

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/countersign-ebpf"));

/// Which enforcement the daemon asks for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ModeRequest {
    /// LSM mode where the kernel can run it (at BPF LSM's hooks, else at its `security_*`
    /// functions), else the fallback.
    Auto,
    /// LSM mode or nothing.
    Lsm,
    /// The fallback even where LSM mode would work.
    Fallback,
}

/// The enforcement in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Lsm,
    Fallback,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Lsm => "lsm",
            Mode::Fallback => "fallback",
        })
    }
}

/// Where the LSM programs run (LSM mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAttach {
    /// At BPF LSM's hooks: the kernel runs BPF LSM (`bpf` is in its `lsm=` list).
    BpfLsm,
    /// At the start of the kernel's `security_*` functions, as `BPF_MODIFY_RETURN` programs:
    /// kernels built with BPF LSM that leave it out of `lsm=` (most distributions' default).
    /// A program's non-zero answer is returned in the function's place.
    SecurityFunctions,
}

impl HookAttach {
    /// As `countersign status` shows it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HookAttach::BpfLsm => "bpf-lsm",
            HookAttach::SecurityFunctions => "security-functions",
        }
    }

    /// What to try, in order: BPF LSM's hooks first unless the kernel says it does not run
    /// BPF LSM (trying costs attaching and detaching every program).
    fn candidates() -> Vec<HookAttach> {
        match std::fs::read_to_string(ACTIVE_LSMS) {
            Ok(list) if !list.trim().split(',').any(|l| l == "bpf") => {
                vec![HookAttach::SecurityFunctions]
            }
            _ => vec![HookAttach::BpfLsm, HookAttach::SecurityFunctions],
        }
    }
}

/// The kernel's active LSMs, in order.
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";

/// The LSM hooks that hold (program, hook); `bprm_creds_for_exec` besides where the exec
/// arguments are read from the task's registers.
const LSM_HOOKS: [(&str, &str); 7] = [
    (shared::PROG_LSM_BPRM_CHECK, "bprm_check_security"),
    (shared::PROG_LSM_SOCKET_LISTEN, "socket_listen"),
    (shared::PROG_LSM_SOCKET_CONNECT, "socket_connect"),
    (shared::PROG_LSM_SOCKET_SENDMSG, "socket_sendmsg"),
    (shared::PROG_LSM_SOCKET_CREATE, "socket_create"),
    (shared::PROG_LSM_UNIX_STREAM_CONNECT, "unix_stream_connect"),
    (shared::PROG_LSM_UNIX_MAY_SEND, "unix_may_send"),
];
const LSM_HOOK_BPRM_CREDS: (&str, &str) = (shared::PROG_LSM_BPRM_CREDS, "bprm_creds_for_exec");

/// Errors of the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The object could not be loaded at all.
    #[error("loading the eBPF object: {0}")]
    Load(aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {error}")]
    Program {
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    /// A map is missing or could not be used.
    #[error("map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    /// A tracepoint format could not be read.
    #[error("{0}")]
    Format(String),
    /// LSM mode was required and is not available.
    #[error("LSM mode is required (--mode lsm) but not available: {0}")]
    LsmUnavailable(String),
    /// No cgroup v2 hierarchy to attach the fallback connect programs to.
    #[error("no cgroup v2 mount found in /proc/mounts (the fallback needs one)")]
    NoCgroup2,
    /// Opening a file the loader needs.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The pin directory holds another version's kernel state: it cannot be taken over.
    #[error(
        "{dir}: kernel state pinned by a countersign of another version cannot be taken over ({why}); its hooks stay in force (labelled processes stay held): run `countersign off` (processes waiting for a decision are killed), then start the daemon"
    )]
    Incompatible { dir: PathBuf, why: String },
    /// The canary did not prove enforcement.
    #[error("the hooks did not prove they run: {0}")]
    Canary(CanaryError),
}

type Result<T> = std::result::Result<T, KernelError>;

/// The (unpinned) cache of cgroup walks in the eBPF object.
const MAP_CGROUP_CACHE: &str = "CS_CGROUP_CACHE";

/// The loaded programs and maps.
pub struct Kernel {
    ebpf: Ebpf,
    tasks: HashMap<MapData, u32, TaskState>,
    cgroups: HashMap<MapData, u64, u32>,
    config: Array<MapData, Config>,
    stats: Array<MapData, u64>,
    labels: HashMap<MapData, u32, LabelName>,
    mode: Mode,
    /// Why this mode (for `countersign status`).
    reason: String,
    /// Where the LSM programs run (LSM mode).
    hook_attach: Option<HookAttach>,
    /// For each LSM hook used, the `security_*` function its programs can run at instead
    /// and how many arguments it takes besides the hook's, or why not (the kernel's BTF).
    security_functions:
        std::collections::HashMap<&'static str, std::result::Result<(String, usize), String>>,
    pin_dir: PathBuf,
    /// Links attached by this daemon, not pinned yet.
    attached: Vec<(&'static str, AttachedLink)>,
    /// Links pinned by this daemon.
    pinned: Vec<PinnedLink>,
    /// The mode an earlier daemon left in the (pinned) config, `MODE_OFF` if none.
    previous_mode: u32,
    /// An earlier daemon left its state pinned (`on_stop: keep`, or killed): adopted.
    adopted: bool,
    /// Whether the kernel can decide execs (its struct offsets were found), or why not.
    exec_fast_path: std::result::Result<(), String>,
    /// The offsets given to the programs.
    offsets: shared::KernelOffsets,
    /// The `sys_enter_execve`/`execveat` tracepoints are attached.
    exec_tracepoints: bool,
    /// The daemon's network namespace cookie (0: unknown); DNS is captured only there.
    netns_cookie: u64,
    /// What the `fentry` DNS capture reads (`valid` 0: it is not tried).
    dns_offsets: shared::DnsOffsets,
    /// The kernel's BTF as aya parsed it for the LSM programs, until the DNS capture has used
    /// it (parsing it is the slow part of a start on small machines).
    aya_btf: Option<Btf>,
    /// The self-protection hooks that could not be attached, with why (LSM mode); all of
    /// them in fallback mode.
    guard_missing: Vec<String>,
    /// Countersign's own files, as last given to the kernel.
    guard_files: HashMap<MapData, FileKey, u32>,
    /// [`Config::cgroup_labels`] and [`Config::exec_labels`] as installed.
    cgroup_labels_on: u32,
    exec_labels_on: u32,
    /// Copies of the maps' descriptors, for the programs this daemon loads itself.
    map_fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// Fallback mode: the cgroup programs of local sockets are attached (Linux 6.7+).
    local_socket_programs: bool,
    /// Fallback mode: the check of images held after loading at their first page fault is
    /// attached (x86: `page_fault_user`).
    loaded_exec_tripwire: bool,
    /// Fallback mode: the kprobe on `inet_listen` is attached (or why not).
    listen_kprobe: std::result::Result<(), String>,
}

/// A link attached by this daemon, by program type.
enum AttachedLink {
    TracePoint(TracePointLinkId),
    Lsm(LsmLinkId),
    Cgroup(CgroupSockAddrLinkId),
    CgroupSock(CgroupSockLinkId),
    /// A link this daemon made itself (see `unix_cgroup`).
    Raw(std::os::fd::OwnedFd),
    RawTracePoint(RawTracePointLinkId),
    KProbe(KProbeLinkId),
}

/// Bytes of event ring for `held` requests at once: room for each one's event (with the
/// ring's 8-byte record header), a power of two of at least 16 KiB and a page (the kernel
/// wants a multiple of the page size). Events the ring has no room for are not lost (see
/// `shared::FLAG_UNREPORTED`).
#[must_use]
pub fn events_ring_bytes(held: usize) -> u32 {
    let record = size_of::<shared::Event>() + 8;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(64 << 10);
    let bytes = held
        .saturating_mul(record)
        .clamp((16 << 10).max(page), 1 << 30);
    u32::try_from(bytes.next_power_of_two()).unwrap_or(1 << 30)
}

impl Kernel {
    /// Loads everything, picks the mode, and proves the hooks run with the canary.
    /// Maps and links are pinned in `pin_dir`; state an earlier daemon left there is adopted.
    pub fn load(
        request: ModeRequest,
        pin_dir: &Path,
        guard: shared::GuardSettings,
        events_ring_bytes: u32,
    ) -> Result<(Self, RingBuf<MapData>)> {
        raise_memlock();
        pin::prepare(pin_dir)?;
        // Never reused blind: a map read with another layout would be misread, or the programs
        // refused; the earlier hooks stay until the operator turns them off.
        if let Some(why) = pin::incompatible(pin_dir, EBPF_OBJECT) {
            return Err(KernelError::Incompatible {
                dir: pin_dir.to_path_buf(),
                why,
            });
        }
        let adopted = pin::has_previous_links(pin_dir);
        format::ensure_tracefs().map_err(KernelError::Format)?;
        let newtask_pid_offset =
            format::field_offset("task", "task_newtask", "pid").map_err(KernelError::Format)?;
        let cgroup_root_offset =
            format::field_offset("cgroup", "cgroup_mkdir", "root").map_err(KernelError::Format)?;
        let cgroup_id_offset =
            format::field_offset("cgroup", "cgroup_mkdir", "id").map_err(KernelError::Format)?;
        let cgroup_attach_pid_offset = format::field_offset("cgroup", "cgroup_attach_task", "pid")
            .map_err(KernelError::Format)?;
        // Without the offsets the exec fast path is off (every exec takes the slow path).
        // Parsed once: reading the kernel's BTF is the slow part of a start on small machines.
        let started = std::time::Instant::now();
        let parsed_btf = btf::Btf::from_sys_fs();
        tracing::debug!(ms = started.elapsed().as_millis(), "read the kernel's BTF");
        let (offsets, exec_fast_path) = kernel_offsets(&parsed_btf);
        let netns_cookie = dns::netns_cookie();
        let dns_offsets = dns::kernel_offsets(parsed_btf.as_ref().ok());
        let security_functions = LSM_HOOKS
            .into_iter()
            .chain([LSM_HOOK_BPRM_CREDS])
            .chain(shared::GUARD_HOOKS)
            .chain(shared::GUARD_HOOKS_OPTIONAL)
            .map(|(_, hook)| {
                let function = match &parsed_btf {
                    Ok(btf) => btf.security_function(hook).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("no kernel BTF: {e}")),
                };
                (hook, function)
            })
            .collect();
        drop(parsed_btf);
        let mut ebpf = EbpfLoader::new()
            .override_global(shared::GLOBAL_HOST_NETNS_COOKIE, &netns_cookie, true)
            .override_global(shared::GLOBAL_DNS_OFFSETS, &dns_offsets, true)
            .override_global(shared::GLOBAL_NEWTASK_PID_OFFSET, &newtask_pid_offset, true)
            .override_global(shared::GLOBAL_KERNEL_OFFSETS, &offsets, true)
            .override_global(shared::GLOBAL_GUARD, &guard, true)
            .override_global(shared::GLOBAL_CGROUP_ROOT_OFFSET, &cgroup_root_offset, true)
            .override_global(shared::GLOBAL_CGROUP_ID_OFFSET, &cgroup_id_offset, true)
            .override_global(
                shared::GLOBAL_CGROUP_ATTACH_PID_OFFSET,
                &cgroup_attach_pid_offset,
                true,
            )
            // A ring an earlier daemon pinned keeps its size (its events are still in it).
            .map_max_entries(shared::MAP_EVENTS, events_ring_bytes)
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(KernelError::Load)?;
        tracing::debug!(ms = started.elapsed().as_millis(), "loaded the eBPF object");
        let map_fds = unix_cgroup::map_fds(&ebpf);
        // aya-log is deliberately not used: its logger made loads fail on some kernels.
        let tasks = HashMap::try_from(take_map(&mut ebpf, shared::MAP_TASKS)?)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        let cgroups: HashMap<MapData, u64, u32> =
            HashMap::try_from(take_map(&mut ebpf, shared::MAP_CGROUP_LABELS)?)
                .map_err(|e| map_err(shared::MAP_CGROUP_LABELS, &e))?;
        let config = Array::try_from(take_map(&mut ebpf, shared::MAP_CONFIG)?)
            .map_err(|e| map_err(shared::MAP_CONFIG, &e))?;
        let stats = Array::try_from(take_map(&mut ebpf, shared::MAP_STATS)?)
            .map_err(|e| map_err(shared::MAP_STATS, &e))?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, shared::MAP_EVENTS)?)
            .map_err(|e| map_err(shared::MAP_EVENTS, &e))?;
        let labels = HashMap::try_from(take_map(&mut ebpf, shared::MAP_LABELS)?)
            .map_err(|e| map_err(shared::MAP_LABELS, &e))?;
        let guard_files = HashMap::try_from(take_map(&mut ebpf, shared::MAP_GUARD_FILES)?)
            .map_err(|e| map_err(shared::MAP_GUARD_FILES, &e))?;
        let mut attached = Vec::new();

        for (name, category, tp) in [
            (shared::PROG_TP_TASK_NEWTASK, "task", "task_newtask"),
            (shared::PROG_TP_SCHED_EXIT, "sched", "sched_process_exit"),
            (shared::PROG_TP_SCHED_EXEC, "sched", "sched_process_exec"),
            (shared::PROG_TP_CGROUP_MKDIR, "cgroup", "cgroup_mkdir"),
            (shared::PROG_TP_CGROUP_RMDIR, "cgroup", "cgroup_rmdir"),
            (
                shared::PROG_TP_CGROUP_ATTACH,
                "cgroup",
                "cgroup_attach_task",
            ),
        ] {
            let (name, id) = match attach_tracepoint(&mut ebpf, name, category, tp) {
                // Before 5.17 (no `bpf_loop`): the exec check with its comparison unrolled.
                Err(e) if name == shared::PROG_TP_SCHED_EXEC => {
                    tracing::debug!(error = %error_chain(&e), "the exec check without bpf_loop");
                    let name = shared::PROG_TP_SCHED_EXEC_UNROLLED;
                    (name, attach_tracepoint(&mut ebpf, name, category, tp)?)
                }
                other => (name, other?),
            };
            attached.push((name, AttachedLink::TracePoint(id)));
            tracing::debug!(
                ms = started.elapsed().as_millis(),
                program = name,
                "attached"
            );
        }

        let previous: Config = config.get(&0, 0).unwrap_or_default();
        let previous_mode = previous.mode;
        let mut kernel = Kernel {
            ebpf,
            tasks,
            cgroups,
            config,
            stats,
            labels,
            mode: Mode::Fallback,
            reason: String::new(),
            hook_attach: None,
            security_functions,
            pin_dir: pin_dir.to_path_buf(),
            attached,
            pinned: Vec::new(),
            previous_mode,
            adopted,
            exec_fast_path,
            offsets,
            exec_tracepoints: false,
            netns_cookie,
            dns_offsets,
            aya_btf: None,
            guard_missing: vec!["fallback mode: without BPF LSM no hook can refuse".to_owned()],
            guard_files,
            // The reused maps keep their entries until this daemon installs its own: so do
            // the switches (a cgroup made meanwhile is still marked, labelled cgroups still
            // walked).
            cgroup_labels_on: previous.cgroup_labels,
            exec_labels_on: previous.exec_labels,
            map_fds,
            local_socket_programs: false,
            loaded_exec_tripwire: false,
            listen_kprobe: Err("not in fallback mode".into()),
        };
        // An earlier daemon's programs may still be attached: from now on they must not hold
        // this daemon. Its mode stays in force until ours is proven.
        kernel.set_config(previous_mode)?;
        let mut ring = ring;
        if request != ModeRequest::Fallback {
            let mut why_not = Vec::new();
            for attach in HookAttach::candidates() {
                match kernel.try_lsm(&mut ring, attach) {
                    Ok(()) => {
                        kernel.pin_links()?;
                        return Ok((kernel, ring));
                    }
                    Err(why) => {
                        tracing::info!(hooks = attach.as_str(), reason = %why, "the LSM programs cannot run there");
                        why_not.push(format!("{}: {why}", attach.as_str()));
                    }
                }
            }
            let why = why_not.join("; ");
            if request == ModeRequest::Lsm {
                return Err(KernelError::LsmUnavailable(why));
            }
            tracing::warn!(reason = %why, "the LSM programs cannot run; using the fallback hooks");
            kernel.reason = format!("fallback: BPF LSM not available ({why})");
        } else {
            kernel.reason = "fallback: requested by configuration".to_owned();
        }
        kernel.attach_fallback()?;
        kernel.set_config(shared::MODE_FALLBACK)?;
        kernel.mode = Mode::Fallback;
        canary::prove(&mut kernel, &mut ring, Mode::Fallback).map_err(KernelError::Canary)?;
        kernel.pin_links()?;
        Ok((kernel, ring))
    }

    /// Loads and attaches the LSM programs where `attach` says and runs the canary; on
    /// failure everything LSM is unloaded again and the reason returned.
    fn try_lsm(
        &mut self,
        ring: &mut RingBuf<MapData>,
        attach: HookAttach,
    ) -> std::result::Result<(), String> {
        self.hook_attach = Some(attach);
        let started = std::time::Instant::now();
        let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
        tracing::debug!(
            ms = started.elapsed().as_millis(),
            "read the kernel's BTF for the LSM hooks"
        );
        // The LSM hook reads the exec's arguments from the task's registers where it can;
        // otherwise the syscall tracepoints record them (they slow every task's syscalls).
        let mut hooks = LSM_HOOKS.to_vec();
        if self.offsets.regs_valid == 0 {
            self.attach_exec_tracepoints().map_err(|e| e.to_string())?;
        } else {
            // What `sys_enter_execve` does besides recording the arguments: end a stale
            // release when a new execve begins.
            hooks.push(LSM_HOOK_BPRM_CREDS);
        }
        for (name, hook) in hooks {
            match self.attach_lsm(name, hook, &btf) {
                Ok(id) => self.attached.push((name, AttachedLink::Lsm(id))),
                Err(e) => {
                    self.unload_lsm();
                    return Err(format!("{hook}: {e}"));
                }
            }
        }
        tracing::debug!(ms = started.elapsed().as_millis(), "attached the LSM hooks");
        // Kept for the DNS capture's `fentry` programs (`drop_btf` frees it).
        self.aya_btf = Some(btf);
        self.set_config(shared::MODE_LSM)
            .map_err(|e| e.to_string())?;
        self.mode = Mode::Lsm;
        match canary::prove(self, ring, Mode::Lsm) {
            Ok(()) => {
                tracing::debug!(
                    ms = started.elapsed().as_millis(),
                    "the canary proved the hooks"
                );
                self.reason = match attach {
                    HookAttach::BpfLsm => {
                        "lsm: BPF LSM hooks attached and proven by the canary".to_owned()
                    }
                    HookAttach::SecurityFunctions => "lsm: the LSM programs run at the kernel's security functions (BPF LSM is built in but not in its lsm= list), proven by the canary".to_owned(),
                };
                if let Some(btf) = self.aya_btf.take() {
                    self.attach_guard(&btf);
                    self.aya_btf = Some(btf);
                }
                tracing::debug!(
                    ms = started.elapsed().as_millis(),
                    "attached the self-protection hooks"
                );
                Ok(())
            }
            Err(e) => {
                self.unload_lsm();
                self.hook_attach = None;
                let _ = self.set_config(self.previous_mode);
                Err(match attach {
                    HookAttach::BpfLsm => format!(
                        "LSM programs attached but {e} (is `bpf` in the kernel's lsm= list?)"
                    ),
                    HookAttach::SecurityFunctions => {
                        format!("LSM programs attached at the security functions but {e}")
                    }
                })
            }
        }
    }

    /// Attaches the self-protection programs (see `countersign_ebpf::GUARD_HOOKS`). One that
    /// cannot be attached does not stop enforcement: it is named in
    /// [`Kernel::self_protection`] (and `countersign status`), which then says a labelled root
    /// is not contained.
    fn attach_guard(&mut self, btf: &Btf) {
        self.guard_missing.clear();
        if self.offsets.guard_valid == 0 {
            self.guard_missing
                .push("the kernel struct offsets it reads are unknown (no BTF for them)".into());
        }
        let optional = shared::GUARD_HOOKS_OPTIONAL.map(|(name, _)| name);
        for (name, hook) in shared::GUARD_HOOKS
            .into_iter()
            .chain(shared::GUARD_HOOKS_OPTIONAL)
        {
            let variant = shared::GUARD_HOOK_VARIANTS
                .iter()
                .find_map(|&(first, other)| (first == name).then_some(other));
            let mut attached = self.attach_lsm(name, hook, btf).map(|link| (name, link));
            if let (Err(first), Some(other)) = (&attached, variant) {
                // The hook may be declared otherwise on this kernel: its other program.
                attached = self
                    .attach_lsm(other, hook, btf)
                    .map(|link| (other, link))
                    .map_err(|e| format!("{first}; its other program: {e}"));
            }
            match attached {
                Ok((program, id)) => self.attached.push((program, AttachedLink::Lsm(id))),
                Err(e) if optional.contains(&name) => {
                    tracing::info!(hook, error = %e, "this kernel has no such hook; an older one covers its case");
                }
                Err(e) => {
                    tracing::warn!(hook, error = %e, "a self-protection hook could not be attached");
                    self.guard_missing.push(format!("{hook}: {e}"));
                }
            }
        }
    }

    /// Loads and attaches the LSM program `name` on `hook`.
    fn attach_lsm(
        &mut self,
        name: &str,
        hook: &str,
        btf: &Btf,
    ) -> std::result::Result<LsmLinkId, String> {
        // The program reads the earlier program's answer after the arguments it was written
        // for: the hook's and these many more.
        let written_for = shared::SECURITY_FUNCTION_EXTRA
            .iter()
            .find_map(|&(program, n)| (program == name).then_some(n))
            .unwrap_or(0);
        let function = match self.hook_attach {
            Some(HookAttach::SecurityFunctions) => {
                let (function, extra) = self
                    .security_functions
                    .get(hook)
                    .cloned()
                    .unwrap_or_else(|| Err(format!("no security function known for {hook}")))?;
                if extra != written_for {
                    return Err(format!(
                        "{function} takes {extra} argument(s) besides the hook's; program {name} was written for {written_for}"
                    ));
                }
                Some(function)
            }
            _ if written_for != 0 => {
                return Err(format!(
                    "program {name} is written for a security function, not the hook"
                ));
            }
            _ => None,
        };
        let prog: &mut Lsm = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing from the object"))?
            .try_into()
            .map_err(|e| format!("program {name}: {e}"))?;
        let loaded = match &function {
            Some(function) => prog.load_modify_return(function, btf),
            None => prog.load(hook, btf),
        };
        loaded
            .and_then(|()| prog.attach())
            .map_err(|e| error_chain(&e))
    }

    /// Whether a labelled task, root included, is kept from changing, stopping, reading or
    /// stepping around countersign, and if not, why.
    pub fn self_protection(&self) -> std::result::Result<(), String> {
        if self.guard_missing.is_empty() {
            Ok(())
        } else {
            Err(self.guard_missing.join("; "))
        }
    }

    /// Replaces countersign's own files in the kernel: (device, inode) → `GUARD_*` bits.
    pub fn set_guard_files(&mut self, files: &[(FileKey, u32)]) -> Result<()> {
        let name = shared::MAP_GUARD_FILES;
        let wanted: std::collections::HashMap<FileKey, u32> = files.iter().copied().collect();
        let stale: Vec<FileKey> = self
            .guard_files
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for (key, flags) in &wanted {
            self.guard_files
                .insert(key, flags, 0)
                .map_err(|e| map_err(name, &e))?;
        }
        for key in stale {
            let _ = self.guard_files.remove(&key);
        }
        Ok(())
    }

    /// Frees the kernel's BTF kept for the DNS capture (once it is attached, or not wanted).
    pub fn drop_btf(&mut self) {
        self.aya_btf = None;
    }

    fn unload_lsm(&mut self) {
        self.attached
            .retain(|(_, l)| !matches!(l, AttachedLink::Lsm(_)));
        for name in LSM_HOOKS
            .into_iter()
            .chain([LSM_HOOK_BPRM_CREDS])
            .map(|(name, _)| name)
            .chain(shared::GUARD_HOOKS.map(|(name, _)| name))
            .chain(shared::GUARD_HOOKS_OPTIONAL.map(|(name, _)| name))
            .chain(shared::GUARD_HOOK_VARIANTS.map(|(_, other)| other))
        {
            if let Some(prog) = self.ebpf.program_mut(name) {
                let prog: std::result::Result<&mut Lsm, _> = prog.try_into();
                if let Ok(prog) = prog {
                    let _ = prog.unload();
                }
            }
        }
    }

    /// Attaches the tracepoints that record the filename and argv pointers of every labelled
    /// exec (once).
    fn attach_exec_tracepoints(&mut self) -> Result<()> {
        if self.exec_tracepoints {
            return Ok(());
        }
        for (name, tp) in [
            (shared::PROG_TP_SYS_ENTER_EXECVE, "sys_enter_execve"),
            (shared::PROG_TP_SYS_ENTER_EXECVEAT, "sys_enter_execveat"),
        ] {
            let id = attach_tracepoint(&mut self.ebpf, name, "syscalls", tp)?;
            self.attached.push((name, AttachedLink::TracePoint(id)));
        }
        self.exec_tracepoints = true;
        Ok(())
    }

    fn attach_fallback(&mut self) -> Result<()> {
        self.attach_exec_tracepoints()?;
        for (name, tp) in [
            (shared::PROG_TP_SYS_ENTER_CONNECT, "sys_enter_connect"),
            (shared::PROG_TP_SYS_EXIT_CONNECT, "sys_exit_connect"),
            (shared::PROG_TP_SYS_ENTER_LISTEN, "sys_enter_listen"),
            (shared::PROG_TP_SYS_EXIT_LISTEN, "sys_exit_listen"),
            (shared::PROG_TP_SYS_ENTER_SENDTO, "sys_enter_sendto"),
            (shared::PROG_TP_SYS_ENTER_SENDMSG, "sys_enter_sendmsg"),
            (shared::PROG_TP_SYS_ENTER_SENDMMSG, "sys_enter_sendmmsg"),
            (shared::PROG_TP_SYS_ENTER_SOCKET, "sys_enter_socket"),
        ] {
            let id = attach_tracepoint(&mut self.ebpf, name, "syscalls", tp)?;
            self.attached.push((name, AttachedLink::TracePoint(id)));
        }
        let root = cgroup2_root().ok_or(KernelError::NoCgroup2)?;
        let cgroup = File::open(&root).map_err(|error| KernelError::Io {
            path: root.clone(),
            error,
        })?;
        for name in [
            shared::PROG_CG_CONNECT4,
            shared::PROG_CG_CONNECT6,
            shared::PROG_CG_SENDMSG4,
            shared::PROG_CG_SENDMSG6,
        ] {
            let prog: &mut CgroupSockAddr = program_as(&mut self.ebpf, name)?;
            prog.load()
                .map_err(|error| KernelError::Program { name, error })?;
            // A bpf_link is always "multi" for cgroups; the kernel refuses the flag on links.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|error| KernelError::Program { name, error })?;
            self.attached.push((name, AttachedLink::Cgroup(id)));
        }
        let name = shared::PROG_CG_SOCK_CREATE;
        let prog: &mut CgroupSock = program_as(&mut self.ebpf, name)?;
        prog.load()
            .map_err(|error| KernelError::Program { name, error })?;
        let id = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|error| KernelError::Program { name, error })?;
        self.attached.push((name, AttachedLink::CgroupSock(id)));
        self.attach_loaded_exec_tripwire();
        self.attach_listen_kprobe();
        self.attach_unix_cgroup(&cgroup)
    }

    /// Fallback mode: kills a labelled listen on the network that did not come through
    /// `listen(2)` (io_uring, the 32-bit entry; see `connect::inet_listen` in the eBPF
    /// object), where the kernel offers kprobes. Without them such a listen is not seen
    /// (`status` says so).
    fn attach_listen_kprobe(&mut self) {
        let name = shared::PROG_KP_INET_LISTEN;
        let attached = program_as::<KProbe>(&mut self.ebpf, name).and_then(|prog| {
            prog.load()
                .map_err(|error| KernelError::Program { name, error })?;
            prog.attach("inet_listen", 0)
                .map_err(|error| KernelError::Program { name, error })
        });
        match attached {
            Ok(id) => {
                self.attached.push((name, AttachedLink::KProbe(id)));
                self.listen_kprobe = Ok(());
            }
            Err(e) => {
                let why = error_chain(&e);
                tracing::warn!(error = %why,
                    "no kprobe on inet_listen: a labelled listen through io_uring or the 32-bit entry is not seen");
                self.listen_kprobe = Err(why);
            }
        }
    }

    /// Fallback mode: what becomes of a labelled listen on the network that does not come
    /// through `listen(2)` (`None` in LSM mode, which holds every listen).
    pub fn other_listens(&self) -> Option<String> {
        (self.mode == Mode::Fallback).then(|| match &self.listen_kprobe {
            Ok(()) => {
                "listens through io_uring or the 32-bit entry: killed (kprobe on inet_listen)"
                    .to_owned()
            }
            Err(why) => {
                format!("listens through io_uring or the 32-bit entry: not seen (no kprobe: {why})")
            }
        })
    }

    /// Fallback mode: kills an image held after loading at its first page fault if it was let
    /// run before its decision (see `exec::user_fault` in the eBPF object). The tracepoint is
    /// x86's; elsewhere the hold after loading keeps its window (`status` says so).
    fn attach_loaded_exec_tripwire(&mut self) {
        let name = shared::PROG_RTP_PAGE_FAULT_USER;
        let attached = program_as::<RawTracePoint>(&mut self.ebpf, name).and_then(|prog| {
            prog.load()
                .map_err(|error| KernelError::Program { name, error })?;
            prog.attach("page_fault_user")
                .map_err(|error| KernelError::Program { name, error })
        });
        match attached {
            Ok(id) => {
                self.attached.push((name, AttachedLink::RawTracePoint(id)));
                self.loaded_exec_tripwire = true;
            }
            Err(e) => tracing::warn!(
                error = %error_chain(&e),
                "no check of page faults: an exec held after loading (agents not started by `countersign exec`) can be let run by a SIGCONT or a tracer in the moment before the daemon holds it"
            ),
        }
    }

    /// Fallback mode: whether an image held after loading is killed if it runs before its
    /// decision.
    pub fn loaded_exec_tripwire(&self) -> bool {
        self.loaded_exec_tripwire
    }

    /// Fallback mode: threads whose exec was held after loading and whose first page fault is
    /// still to be checked (`None` where that check is not attached). 0 whenever no exec is
    /// held so: only then does the check cost every other fault nothing but one read.
    pub fn loaded_exec_watched(&self) -> Option<u64> {
        if !self.loaded_exec_tripwire {
            return None;
        }
        let map = self.ebpf.map(shared::MAP_LOADED_WATCHED_COUNT)?;
        let count: Array<&MapData, u64> = Array::try_from(map).ok()?;
        count.get(&0, 0).ok()
    }

    /// Fallback mode, kernels 6.7+: the cgroup programs of local sockets (see
    /// `unix_cgroup`). Older kernels have none: what they would refuse stays unseen (README
    /// "Not held yet") and `status` says so. A kernel that has them but refuses ours is an
    /// error: the daemon does not start with less than the kernel allows.
    fn attach_unix_cgroup(&mut self, cgroup: &File) -> Result<()> {
        use std::os::fd::AsFd as _;
        let prepared = unix_cgroup::prepare(EBPF_OBJECT, &self.map_fds).map_err(|detail| {
            KernelError::Map {
                name: shared::PROG_CG_UNIX_CONNECT,
                detail,
            }
        })?;
        match unix_cgroup::attach(&prepared, cgroup.as_fd()) {
            Ok(links) => {
                for (name, link) in links {
                    self.attached.push((name, AttachedLink::Raw(link)));
                }
                self.local_socket_programs = true;
                Ok(())
            }
            Err(unix_cgroup::UnixCgroupError::Unsupported) => {
                tracing::warn!(
                    "this kernel has no cgroup programs for local sockets (Linux 6.7+): a labelled process's local-socket connects through io_uring or the 32-bit entry, and its datagrams sent with an address, are not seen"
                );
                Ok(())
            }
            Err(unix_cgroup::UnixCgroupError::Failed(detail)) => Err(KernelError::Map {
                name: shared::PROG_CG_UNIX_CONNECT,
                detail,
            }),
        }
    }

    /// Fallback mode: whether the cgroup programs of local sockets are attached.
    pub fn local_socket_programs(&self) -> bool {
        self.local_socket_programs
    }

    /// Fallback mode: what the kernel sees of local sockets (`None` in LSM mode).
    pub fn local_sockets(&self) -> Option<&'static str> {
        match self.mode {
            Mode::Lsm => None,
            Mode::Fallback if self.local_socket_programs => Some(concat!(
                "connects checked once made (held before for agents started by `countersign exec`); ",
                "connects through io_uring or the 32-bit entry, and datagrams sent with an address ",
                "under a label that restricts local sockets, refused"
            )),
            Mode::Fallback => Some(concat!(
                "connects checked once made (held before for agents started by `countersign exec`); ",
                "connects through io_uring or the 32-bit entry, and datagrams sent with an address, ",
                "not seen (kernel before 6.7)"
            )),
        }
    }

    /// Installs the cgroup labels (after the canary, so that no agent is held before the
    /// daemon is ready to hear about it): `labels` (the exact `cgroup_labels` and the cgroups
    /// the policy's globs and units name) replace what was there, an earlier daemon's
    /// included, except the marks of new cgroups not classified yet, which the daemon
    /// classifies one by one ([`Kernel::unclassified_cgroups`]). Empties the cgroup cache.
    pub fn install_cgroup_labels(&mut self, labels: &[(u64, u32)]) -> Result<()> {
        let stale: Vec<u64> = self
            .cgroups
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(id, label)| {
                *label != shared::LABEL_UNCLASSIFIED && !labels.iter().any(|(l, _)| l == id)
            })
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            let _ = self.cgroups.remove(&id);
        }
        for &(id, label) in labels {
            self.cgroups
                .insert(id, label, 0)
                .map_err(|e| map_err(shared::MAP_CGROUP_LABELS, &e))?;
        }
        if !labels.is_empty() {
            self.cgroup_labels_on |= shared::CGROUP_LABELS_ON;
        } else if self.cgroup_labels_on & shared::CGROUP_MATCH == 0 {
            self.cgroup_labels_on = 0;
        }
        self.set_config(self.mode_value())?;
        self.flush_cgroup_cache()
    }

    /// Turns the marking of new cgroups on or off ([`shared::CGROUP_MATCH`]). On comes
    /// before the walk of the existing cgroups, so that none created meanwhile is missed.
    pub fn set_cgroup_match(&mut self, on: bool) -> Result<()> {
        if on {
            self.cgroup_labels_on |= shared::CGROUP_MATCH | shared::CGROUP_LABELS_ON;
        } else {
            self.cgroup_labels_on &= !shared::CGROUP_MATCH;
        }
        self.set_config(self.mode_value())
    }

    /// The cgroups marked unclassified (created while cgroups are matched).
    #[must_use]
    pub fn unclassified_cgroups(&self) -> Vec<u64> {
        self.cgroups
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(_, label)| *label == shared::LABEL_UNCLASSIFIED)
            .map(|(id, _)| id)
            .collect()
    }

    /// The entry of one cgroup (`None`: no entry).
    #[must_use]
    pub fn cgroup_label(&self, id: u64) -> Option<u32> {
        self.cgroups.get(&id, 0).ok()
    }

    /// Classifies a marked cgroup: its label, or no entry for [`shared::LABEL_NONE`] (its
    /// tasks take their ancestors' label, if any). Hooks never cached the unclassified
    /// answer, so no cache entry needs to go.
    pub fn classify_cgroup(&mut self, id: u64, label: u32) -> Result<()> {
        if label == shared::LABEL_NONE {
            match self.cgroups.remove(&id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(shared::MAP_CGROUP_LABELS, &e)),
            }
        } else {
            self.cgroups
                .insert(id, label, 0)
                .map_err(|e| map_err(shared::MAP_CGROUP_LABELS, &e))
        }
    }

    /// Empties the cache of cgroup walks (after the labels changed).
    pub fn flush_cgroup_cache(&mut self) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(MAP_CGROUP_CACHE)
            .ok_or(KernelError::Map {
                name: MAP_CGROUP_CACHE,
                detail: "missing from the object".into(),
            })?;
        let mut cache: HashMap<&mut MapData, u64, u32> =
            HashMap::try_from(map).map_err(|e| map_err(MAP_CGROUP_CACHE, &e))?;
        let keys: Vec<u64> = cache.keys().filter_map(std::result::Result::ok).collect();
        for k in keys {
            let _ = cache.remove(&k);
        }
        Ok(())
    }

    /// The executable label of a file (kernel device encoding), if the policy names it.
    #[must_use]
    pub fn exec_label(&self, dev: u64, ino: u64) -> Option<u32> {
        let map = self.ebpf.map(shared::MAP_EXEC_LABELS)?;
        let labels: HashMap<&MapData, shared::FileKey, u32> = HashMap::try_from(map).ok()?;
        labels
            .get(&shared::FileKey { dev, ino }, 0)
            .ok()
            .filter(|l| *l != shared::LABEL_NONE)
    }

    /// Gives the pending request `request_id` of `tid` (held with the reserved
    /// [`shared::LABEL_UNCLASSIFIED`]) its real label. False when that request is no longer
    /// pending.
    pub fn relabel(&mut self, tid: u32, request_id: u64, label: u32) -> Result<bool> {
        let Ok(mut state) = self.tasks.get(&tid, 0) else {
            return Ok(false);
        };
        if state.request_id != request_id || state.state != shared::STATE_PENDING {
            return Ok(false);
        }
        state.label = label;
        self.tasks
            .insert(tid, state, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        Ok(true)
    }

    /// Replaces the state of a task held with the reserved label that turned out not to be
    /// an agent of its cgroup: `label` [`shared::LABEL_NONE`] removes it (the restarted
    /// syscall finds no label), another label leaves it idle under that label (an
    /// executable label the kernel did not apply because the task looked labelled).
    pub fn unhold_unclassified(&mut self, tid: u32, request_id: u64, label: u32) -> Result<bool> {
        let Ok(state) = self.tasks.get(&tid, 0) else {
            return Ok(false);
        };
        if state.request_id != request_id || state.label != shared::LABEL_UNCLASSIFIED {
            return Ok(false);
        }
        if label == shared::LABEL_NONE {
            return match self.tasks.remove(&tid) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(true),
                Err(e) => Err(map_err(shared::MAP_TASKS, &e)),
            };
        }
        self.tasks
            .insert(
                tid,
                TaskState {
                    label,
                    ..TaskState::default()
                },
                0,
            )
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        Ok(true)
    }

    /// Installs the policy's `match: executable` labels, replacing the earlier ones. Fails
    /// when the kernel cannot identify files (no BTF offsets): those agents would run
    /// unlabelled.
    pub fn set_exec_labels(&mut self, entries: &[ExecLabelEntry]) -> Result<()> {
        if let Err(why) = &self.exec_fast_path
            && !entries.is_empty()
        {
            return Err(KernelError::Map {
                name: shared::MAP_EXEC_LABELS,
                detail: format!("the kernel cannot identify executables: {why}"),
            });
        }
        let map = self
            .ebpf
            .map_mut(shared::MAP_EXEC_LABELS)
            .ok_or(KernelError::Map {
                name: shared::MAP_EXEC_LABELS,
                detail: "missing from the object".into(),
            })?;
        let mut labels: HashMap<&mut MapData, shared::FileKey, u32> =
            HashMap::try_from(map).map_err(|e| map_err(shared::MAP_EXEC_LABELS, &e))?;
        let wanted: Vec<(shared::FileKey, u32)> = entries
            .iter()
            .map(|e| {
                (
                    shared::FileKey {
                        dev: e.dev,
                        ino: e.ino,
                    },
                    e.label,
                )
            })
            .collect();
        let stale: Vec<shared::FileKey> = labels
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !wanted.iter().any(|(w, _)| w == k))
            .collect();
        for k in stale {
            let _ = labels.remove(&k);
        }
        for (key, label) in &wanted {
            labels
                .insert(key, label, 0)
                .map_err(|e| map_err(shared::MAP_EXEC_LABELS, &e))?;
        }
        self.exec_labels_on = u32::from(!wanted.is_empty());
        self.set_config(self.mode_value())
    }

    fn mode_value(&self) -> u32 {
        match self.mode {
            Mode::Lsm => shared::MODE_LSM,
            Mode::Fallback => shared::MODE_FALLBACK,
        }
    }

    fn set_config(&mut self, mode: u32) -> Result<()> {
        let config = Config {
            mode,
            daemon_tgid: std::process::id(),
            cgroup_labels: self.cgroup_labels_on,
            exec_labels: self.exec_labels_on,
        };
        self.config
            .set(0, config, 0)
            .map_err(|e| map_err(shared::MAP_CONFIG, &e))
    }

    /// Pins this daemon's links in place of an earlier daemon's.
    fn pin_links(&mut self) -> Result<()> {
        let mut links = Vec::new();
        let mut raw = Vec::new();
        for (name, id) in std::mem::take(&mut self.attached) {
            match id {
                AttachedLink::Raw(fd) => raw.push((name, fd)),
                id => links.push((name, self.take_fd_link(name, id)?)),
            }
        }
        let mut names: Vec<&str> = links.iter().map(|(n, _)| *n).collect();
        names.extend(raw.iter().map(|(n, _)| *n));
        self.pinned = pin::pin_links(&self.pin_dir, links)?;
        self.pinned
            .extend(pin::pin_raw_links(&self.pin_dir, raw, unix_cgroup::pin)?);
        pin::remove_other_links(&self.pin_dir, &names);
        Ok(())
    }

    fn take_fd_link(&mut self, name: &'static str, id: AttachedLink) -> Result<FdLink> {
        let missing = || KernelError::Map {
            name,
            detail: "program missing from the object".into(),
        };
        let invalid = |e: &dyn std::fmt::Display| KernelError::Map {
            name,
            detail: format!("cannot pin its link: {e}"),
        };
        let prog = self.ebpf.program_mut(name).ok_or_else(missing)?;
        Ok(match id {
            AttachedLink::TracePoint(id) => {
                let p: &mut TracePoint = prog
                    .try_into()
                    .map_err(|error| KernelError::Program { name, error })?;
                let link = p
                    .take_link(id)
                    .map_err(|error| KernelError::Program { name, error })?;
                FdLink::try_from(link).map_err(|e| invalid(&e))?
            }
            AttachedLink::Lsm(id) => {
                let p: &mut Lsm = prog
                    .try_into()
                    .map_err(|error| KernelError::Program { name, error })?;
                FdLink::from(
                    p.take_link(id)
                        .map_err(|error| KernelError::Program { name, error })?,
                )
            }
            AttachedLink::Cgroup(id) => {
                let p: &mut CgroupSockAddr = prog
                    .try_into()
                    .map_err(|error| KernelError::Program { name, error })?;
                let link = p
                    .take_link(id)
                    .map_err(|error| KernelError::Program { name, error })?;
                FdLink::try_from(link).map_err(|e| invalid(&e))?
            }
            AttachedLink::RawTracePoint(id) => {
                let p: &mut RawTracePoint = prog
                    .try_into()
                    .map_err(|error| KernelError::Program { name, error })?;
                FdLink::from(
                    p.take_link(id)
                        .map_err(|error| KernelError::Program { name, error })?,
                )
            }
            AttachedLink::Raw(_) => {
                return Err(KernelError::Map {
                    name,
                    detail: "a raw link is pinned by its descriptor".into(),
                });
            }
            AttachedLink::CgroupSock(id) => {
                let p: &mut CgroupSock = prog
                    .try_into()
                    .map_err(|error| KernelError::Program { name, error })?;
                let link = p
                    .take_link(id)
                    .map_err(|error| KernelError::Program { name, error })?;
                FdLink::try_from(link).map_err(|e| invalid(&e))?
            }
            AttachedLink::KProbe(id) => {
                let p: &mut KProbe = prog
                    .try_into()
                    .map_err(|error| KernelError::Program { name, error })?;
                let link = p
                    .take_link(id)
                    .map_err(|error| KernelError::Program { name, error })?;
                FdLink::try_from(link).map_err(|e| invalid(&e))?
            }
        })
    }

    /// Stops all enforcement and removes every pin: only at a stop with `on_stop: off`, after
    /// every held task was decided.
    pub fn teardown(&mut self) {
        let _ = self.set_config(shared::MODE_OFF);
        pin::remove_all(&self.pin_dir, std::mem::take(&mut self.pinned));
    }

    /// Whether an earlier daemon's state was adopted at start.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Every labelled thread that has a request pending or decided (for adoption).
    #[must_use]
    pub fn held_tasks(&self) -> Vec<(u32, TaskState)> {
        self.tasks
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(_, t)| {
                matches!(
                    t.state,
                    shared::STATE_PENDING | shared::STATE_ALLOWED | shared::STATE_DENIED
                )
            })
            .collect()
    }

    /// Processes (thread-group leaders) whose execs a seccomp notifier decides.
    #[must_use]
    pub fn notified_processes(&self) -> Vec<u32> {
        self.tasks
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(_, t)| t.flags & shared::FLAG_NOTIFIED != 0)
            .map(|(tid, _)| tid)
            .filter(|tid| {
                std::fs::read_to_string(format!("/proc/{tid}/status"))
                    .is_ok_and(|s| s.lines().any(|l| l == format!("Tgid:\t{tid}")))
            })
            .collect()
    }

    /// Replaces the connect fast path with `entries` (label id, network, protocols, ports).
    pub fn set_connect_allow(&mut self, entries: &[ConnectAllowEntry]) -> Result<()> {
        use aya::maps::lpm_trie::{Key, LpmTrie};
        let map = self
            .ebpf
            .map_mut(shared::MAP_CONNECT_ALLOW)
            .ok_or(KernelError::Map {
                name: shared::MAP_CONNECT_ALLOW,
                detail: "missing from the object".into(),
            })?;
        let mut trie: LpmTrie<&mut MapData, shared::ConnectKey, shared::ConnectAllow> =
            LpmTrie::try_from(map).map_err(|e| map_err(shared::MAP_CONNECT_ALLOW, &e))?;
        let old: Vec<Key<shared::ConnectKey>> =
            trie.keys().filter_map(std::result::Result::ok).collect();
        for k in old {
            let _ = trie.remove(&k);
        }
        for ConnectAllowEntry {
            label,
            net,
            protocols,
            ports,
        } in entries
        {
            let (family, addr, bits) = match net {
                ipnet::IpNet::V4(n) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&n.network().octets());
                    (libc::AF_INET as u32, a, u32::from(n.prefix_len()))
                }
                ipnet::IpNet::V6(n) => (
                    libc::AF_INET6 as u32,
                    n.network().octets(),
                    u32::from(n.prefix_len()),
                ),
            };
            let mut value = shared::ConnectAllow {
                protocols: *protocols,
                count: 0,
                spans: [shared::PortSpan::default(); shared::MAX_PORT_SPANS],
            };
            for (i, (first, last)) in ports.iter().take(shared::MAX_PORT_SPANS).enumerate() {
                value.spans[i] = shared::PortSpan {
                    first: *first,
                    last: *last,
                };
                value.count += 1;
            }
            let key = Key::new(
                shared::CONNECT_KEY_FIXED_BITS + bits,
                shared::ConnectKey {
                    label: *label,
                    family,
                    addr,
                },
            );
            trie.insert(&key, value, 0)
                .map_err(|e| map_err(shared::MAP_CONNECT_ALLOW, &e))?;
        }
        Ok(())
    }

    /// Replaces the exec fast path with `entries`. Where the kernel cannot decide execs (its
    /// struct offsets are unknown) nothing is installed and the daemon decides every exec.
    pub fn set_exec_allow(&mut self, entries: &[ExecAllowEntry]) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(shared::MAP_EXEC_ALLOW)
            .ok_or(KernelError::Map {
                name: shared::MAP_EXEC_ALLOW,
                detail: "missing from the object".into(),
            })?;
        let mut allow: HashMap<&mut MapData, shared::ExecKey, u32> =
            HashMap::try_from(map).map_err(|e| map_err(shared::MAP_EXEC_ALLOW, &e))?;
        let wanted: Vec<shared::ExecKey> = entries
            .iter()
            .map(|e| shared::ExecKey {
                label: e.label,
                _pad: 0,
                dev: e.dev,
                ino: e.ino,
            })
            .collect();
        let stale: Vec<shared::ExecKey> = allow
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            let _ = allow.remove(&k);
        }
        if let Err(why) = &self.exec_fast_path {
            if !entries.is_empty() {
                tracing::warn!(reason = %why, entries = entries.len(), "exec fast path off: the daemon decides every exec");
            }
            return Ok(());
        }
        for key in wanted {
            allow
                .insert(key, 1, 0)
                .map_err(|e| map_err(shared::MAP_EXEC_ALLOW, &e))?;
        }
        Ok(())
    }

    /// Replaces the socket fast path with `entries` ((label id, family, type) a rule allows).
    pub fn set_socket_allow(&mut self, entries: &[shared::SocketKey]) -> Result<()> {
        let pairs: Vec<(shared::SocketKey, u32)> = entries.iter().map(|k| (*k, 1)).collect();
        let written = replace_hash(&mut self.ebpf, shared::MAP_SOCKET_ALLOW, &pairs, true)?;
        if written.iter().any(|w| !w) {
            tracing::warn!(
                "some socket rules could not be written into the kernel: the daemon decides those sockets"
            );
        }
        Ok(())
    }

    /// Replaces the local-socket rules (`(label, file or abstract name) → UNIX_ALLOW |
    /// UNIX_HOLD`) and the labels that hold every local socket no rule names.
    pub fn set_unix_rules(
        &mut self,
        rules: &[(shared::ExecKey, u32)],
        hold_all: &[u32],
    ) -> Result<()> {
        let written = replace_hash(&mut self.ebpf, shared::MAP_UNIX_RULES, rules, true)?;
        if written.iter().any(|w| !w) {
            tracing::error!(
                "some local-socket rules could not be written into the kernel (map full): those sockets are not held"
            );
        }
        // Every label that restricts a local socket (fallback mode refuses its datagrams sent
        // with an address, which it cannot tell apart), and how.
        let mut labels: Vec<(u32, u32)> = hold_all
            .iter()
            .map(|l| (*l, shared::UNIX_LABEL_HOLD_ALL))
            .collect();
        for (key, value) in rules {
            if key.label != shared::LABEL_NONE
                && *value != shared::UNIX_ALLOW
                && !labels.iter().any(|(l, _)| *l == key.label)
            {
                labels.push((key.label, shared::UNIX_LABEL_RULES));
            }
        }
        replace_hash(&mut self.ebpf, shared::MAP_UNIX_HOLD_ALL, &labels, true)?;
        Ok(())
    }

    /// Forgets the destinations decided for processes' sends (a new policy or daemon asks
    /// again: fail closed).
    pub fn forget_send_decisions(&mut self) -> Result<()> {
        replace_hash::<shared::SendKey, shared::SendDecided>(
            &mut self.ebpf,
            shared::MAP_SEND_DECIDED,
            &[],
            false,
        )?;
        Ok(())
    }

    /// Replaces the grant entries with `execs` ((label, kernel device, inode) → boot-time
    /// expiry) and `connects` (→ expiries for any socket type, stream, datagram). Stale
    /// entries are deleted first. Returns, for each entry given, whether it is in the kernel
    /// now (an insert fails when the map is full: that grant stays with the daemon).
    pub fn set_grants(
        &mut self,
        execs: &[((u32, u64, u64), u64)],
        connects: &[(ConnectGrantKey, [u64; 3])],
    ) -> Result<(Vec<bool>, Vec<bool>)> {
        let exec_keys: Vec<(shared::ExecKey, u64)> = execs
            .iter()
            .map(|&((label, dev, ino), expiry)| {
                let key = shared::ExecKey {
                    label,
                    _pad: 0,
                    dev,
                    ino,
                };
                (key, expiry)
            })
            .collect();
        let connect_keys: Vec<(shared::GrantConnectKey, shared::GrantConnect)> = connects
            .iter()
            .map(|&((label, family, addr, port), [any, stream, dgram])| {
                let key = shared::GrantConnectKey {
                    label,
                    family,
                    port,
                    addr,
                };
                (key, shared::GrantConnect { any, stream, dgram })
            })
            .collect();
        let exec_ok = replace_hash(
            &mut self.ebpf,
            shared::MAP_GRANT_EXEC,
            &exec_keys,
            self.exec_fast_path.is_ok(),
        )?;
        let connect_ok = replace_hash(
            &mut self.ebpf,
            shared::MAP_GRANT_CONNECT,
            &connect_keys,
            true,
        )?;
        Ok((exec_ok, connect_ok))
    }

    /// Records a label's name in the kernel, for a daemon that restarts.
    pub fn set_label_name(&mut self, id: u32, name: &str) -> Result<()> {
        let mut value = LabelName {
            name: [0; shared::LABEL_NAME_LEN],
        };
        let n = name.len().min(shared::LABEL_NAME_LEN);
        value.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.labels
            .insert(id, value, 0)
            .map_err(|e| map_err(shared::MAP_LABELS, &e))
    }

    /// The label names an earlier daemon recorded, by id.
    #[must_use]
    pub fn label_names(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = self
            .labels
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(id, l)| {
                let end = l.name.iter().position(|b| *b == 0).unwrap_or(l.name.len());
                (id, String::from_utf8_lossy(&l.name[..end]).into_owned())
            })
            .collect();
        out.sort();
        out
    }

    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Where the LSM programs run (`None` in fallback mode).
    #[must_use]
    pub fn hook_attach(&self) -> Option<HookAttach> {
        (self.mode == Mode::Lsm)
            .then_some(self.hook_attach)
            .flatten()
    }

    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The state of a labelled thread, if any.
    #[must_use]
    pub fn task(&self, tid: u32) -> Option<TaskState> {
        self.tasks.get(&tid, 0).ok()
    }

    /// Labels a thread (and, through the fork hook, everything it starts from now on).
    pub fn label_task(&mut self, tid: u32, label: u32) -> Result<()> {
        let state = TaskState {
            label,
            ..TaskState::default()
        };
        self.tasks
            .insert(tid, state, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))
    }

    /// Writes a decision for the pending request `request_id` of `tid`. Returns false when the
    /// task no longer has that request pending (it exited, or its request was superseded).
    pub fn decide(&mut self, tid: u32, request_id: u64, new_state: u32) -> Result<bool> {
        let Ok(mut state) = self.tasks.get(&tid, 0) else {
            return Ok(false);
        };
        if state.request_id != request_id || state.state != shared::STATE_PENDING {
            return Ok(false);
        }
        state.state = new_state;
        self.tasks
            .insert(tid, state, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        Ok(true)
    }

    /// Records the daemon's id for the pending request `request_id` of `tid` (best effort:
    /// only a restarted daemon reads it).
    /// Clears `shared::FLAG_UNREPORTED` of `tid`'s pending request `request_id` (the daemon
    /// has taken it from the task map).
    pub fn clear_unreported(&mut self, tid: u32, request_id: u64) {
        if let Ok(mut state) = self.tasks.get(&tid, 0)
            && state.request_id == request_id
            && state.flags & shared::FLAG_UNREPORTED != 0
        {
            state.flags &= !shared::FLAG_UNREPORTED;
            let _ = self.tasks.insert(tid, state, 0);
        }
    }

    pub fn set_user_id(&mut self, tid: u32, request_id: u64, user_id: u64) {
        if let Ok(mut state) = self.tasks.get(&tid, 0)
            && state.request_id == request_id
            && state.state == shared::STATE_PENDING
        {
            state.user_id = user_id;
            let _ = self.tasks.insert(tid, state, 0);
        }
    }

    /// Whether the kernel can verify the image an approved exec loads (the seccomp notifier of
    /// fallback mode needs it: without it a notified task's execs could not be let run).
    #[must_use]
    pub fn can_verify_execs(&self) -> bool {
        self.mode == Mode::Fallback && self.exec_fast_path.is_ok() && self.offsets.valid != 0
    }

    /// Marks a labelled thread as one whose execs the seccomp notifier decides (inherited by
    /// what it starts). Fails if the thread is not labelled.
    pub fn set_notified(&mut self, tid: u32) -> Result<()> {
        let mut state = self
            .tasks
            .get(&tid, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        state.flags |= shared::FLAG_NOTIFIED;
        self.tasks
            .insert(tid, state, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))
    }

    /// Records a held exec of a notified thread: pending, with the daemon's request id and
    /// the pointers its `execve` passed (for the request's description). Returns false if the
    /// thread is not labelled.
    pub fn hold_notified_exec(
        &mut self,
        tid: u32,
        request_id: u64,
        filename: u64,
        argv: u64,
    ) -> Result<bool> {
        let Ok(mut state) = self.tasks.get(&tid, 0) else {
            return Ok(false);
        };
        state.state = shared::STATE_PENDING;
        state.kind = shared::KIND_EXEC;
        state.request_id = request_id;
        state.action_hash = 0;
        state.exec_filename = filename;
        state.exec_argv = argv;
        state.user_id = 0;
        self.tasks
            .insert(tid, state, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        Ok(true)
    }

    /// Marks the action `ev` of notified thread `tid` (a connect to a local socket, a
    /// [`shared::UnixPeer`] in `addr`; a listen on `addr`/`port`) as pending under
    /// `request_id` while its call waits for the daemon: the kernel's check after the call
    /// lets it through only once it is decided allowed, and only for that socket or address.
    /// False if `tid` has no state (it is not labelled).
    pub fn hold_notified_action(
        &mut self,
        tid: u32,
        request_id: u64,
        ev: &shared::Event,
    ) -> Result<bool> {
        let Ok(mut state) = self.tasks.get(&tid, 0) else {
            return Ok(false);
        };
        state.state = shared::STATE_PENDING;
        state.kind = ev.kind;
        state.request_id = request_id;
        state.action_hash = shared::connect_hash(ev.family, ev.port, &ev.addr);
        state.family = ev.family;
        state.port = ev.port;
        state.sock_type = ev.sock_type;
        state.addr = ev.addr;
        state.user_id = 0;
        self.tasks
            .insert(tid, state, 0)
            .map_err(|e| map_err(shared::MAP_TASKS, &e))?;
        Ok(true)
    }

    /// What process `tgid` (label `label`) already consumed for the local socket `addr`:
    /// [`shared::STATE_ALLOWED`] or [`shared::STATE_DENIED`]. The kernel checks the entry's
    /// process start time itself when the connect is made.
    pub fn unix_decided(&self, tgid: u32, label: u32, addr: [u8; 16]) -> Option<u32> {
        let map = self.ebpf.map(shared::MAP_SEND_DECIDED)?;
        let decided: HashMap<&MapData, shared::SendKey, shared::SendDecided> =
            HashMap::try_from(map).ok()?;
        let key = shared::SendKey {
            tgid,
            label,
            family: libc::AF_UNIX as u16,
            port: 0,
            sock_type: 0,
            addr,
        };
        decided.get(&key, 0).ok().map(|d| d.verdict)
    }

    /// Arms the kernel's check of an approved exec of a notified thread (see
    /// [`shared::ApprovedExec`]); it must be written before the `execve` is let start.
    pub fn arm_exec(&mut self, tid: u32, approved: &shared::ApprovedExec) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(shared::MAP_EXEC_APPROVED)
            .ok_or(KernelError::Map {
                name: shared::MAP_EXEC_APPROVED,
                detail: "missing from the object".into(),
            })?;
        let mut armed: HashMap<&mut MapData, u32, shared::ApprovedExec> =
            HashMap::try_from(map).map_err(|e| map_err(shared::MAP_EXEC_APPROVED, &e))?;
        armed
            .insert(tid, approved, 0)
            .map_err(|e| map_err(shared::MAP_EXEC_APPROVED, &e))
    }

    /// Removes the armed approvals of threads `gone` says are gone (their exec failed before
    /// it loaded).
    pub fn forget_approvals(&mut self, gone: impl Fn(u32) -> bool) {
        let Some(map) = self.ebpf.map_mut(shared::MAP_EXEC_APPROVED) else {
            return;
        };
        let Ok(mut armed) = HashMap::<&mut MapData, u32, shared::ApprovedExec>::try_from(map)
        else {
            return;
        };
        let stale: Vec<u32> = armed
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|tid| gone(*tid))
            .collect();
        for tid in stale {
            let _ = armed.remove(&tid);
        }
    }

    /// Removes a thread's entry (the canary, once done).
    pub fn forget_task(&mut self, tid: u32) {
        let _ = self.tasks.remove(&tid);
    }

    /// One of the kernel's counts (`None`: the statistics map, pinned by an earlier version,
    /// has no such entry).
    #[must_use]
    pub fn stat(&self, index: u32) -> Option<u64> {
        self.stats.get(&index, 0).ok()
    }

    /// Counter values by `STAT_*` index.
    #[must_use]
    pub fn stats(&self) -> [u64; shared::STAT_COUNT as usize] {
        let mut out = [0; shared::STAT_COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = self.stats.get(&(i as u32), 0).unwrap_or(0);
        }
        out
    }

    /// Number of entries in the cgroup label map (for status).
    #[must_use]
    pub fn cgroup_label_count(&self) -> usize {
        self.cgroups.keys().count()
    }
}

/// Makes hash map `name` hold exactly `entries` (deleting the others first, so that a full
/// map only refuses new keys). With `insert` false it is only emptied of stale keys. Returns
/// whether each entry is in the map.
fn replace_hash<K: aya::Pod + PartialEq, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(K, V)],
    insert: bool,
) -> Result<Vec<bool>> {
    let map = ebpf.map_mut(name).ok_or(KernelError::Map {
        name,
        detail: "missing from the object".into(),
    })?;
    let mut hash: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map).map_err(|e| map_err(name, &e))?;
    let stale: Vec<K> = hash
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| !insert || !entries.iter().any(|(e, _)| e == k))
        .collect();
    for k in stale {
        // A key that cannot be deleted still ends at its expiry.
        if let Err(e) = hash.remove(&k) {
            tracing::warn!(map = name, error = %e, "a stale grant entry could not be deleted; it ends at its expiry");
        }
    }
    if !insert {
        return Ok(vec![false; entries.len()]);
    }
    Ok(entries
        .iter()
        .map(|(k, v)| match hash.insert(k, *v, 0) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(map = name, error = %e, "a grant could not be written into the kernel (map full?); the daemon answers it instead");
                false
            }
        })
        .collect())
}

/// A destination grant's key: (label id, family, address as in the events, port).
pub type ConnectGrantKey = (u32, u16, [u8; 16], u16);

/// One entry of the connect fast path.
pub struct ConnectAllowEntry {
    pub label: u32,
    pub net: ipnet::IpNet,
    /// `PROTO_*` bits.
    pub protocols: u32,
    pub ports: Vec<(u16, u16)>,
}

/// The kernel struct offsets for the programs, from the running kernel's BTF, and whether
/// the exec fast path can work (or why not). The register offsets are only used by the LSM
/// hook, which runs with the BTF-typed task pointer those need.
fn kernel_offsets(
    parsed: &std::result::Result<btf::Btf, btf::BtfError>,
) -> (shared::KernelOffsets, std::result::Result<(), String>) {
    let parsed = match parsed {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "exec fast path off: no kernel BTF");
            return (shared::KernelOffsets::default(), Err(e.to_string()));
        }
    };
    let mut offsets = match parsed.kernel_offsets() {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "exec fast path off: kernel struct offsets unknown");
            return (shared::KernelOffsets::default(), Err(e.to_string()));
        }
    };
    if let Err(e) = parsed.exec_arg_regs(&mut offsets) {
        tracing::info!(reason = %e, "exec arguments are recorded by the syscall tracepoints");
    }
    if let Err(e) = parsed.task_offsets(&mut offsets) {
        tracing::warn!(reason = %e, "io_uring threads cannot be told apart and sends that name a destination are refused (no BTF for them)");
    }
    if let Err(e) = parsed.fd_offsets(&mut offsets) {
        tracing::warn!(reason = %e, "fallback mode cannot check the local socket a connect reached (no BTF for the descriptor table)");
    }
    if let Err(e) = parsed.guard_offsets(&mut offsets) {
        tracing::warn!(reason = %e, "self-protection reads no kernel structs (no BTF for them): countersign's files and processes are not told apart");
    }
    if let Err(e) = parsed.listen_offsets(&mut offsets) {
        tracing::warn!(reason = %e, "the address a socket listens on cannot be read (no BTF for it): every labelled listen is held");
    }
    (offsets, Ok(()))
}

/// One entry of the exec fast path: a file by the kernel's device number and inode.
pub struct ExecAllowEntry {
    pub label: u32,
    /// The kernel's `dev_t` (see [`kernel_dev`]).
    pub dev: u64,
    pub ino: u64,
}

/// One `match: executable` label: a file by the kernel's device number and inode.
pub struct ExecLabelEntry {
    pub label: u32,
    /// The kernel's `dev_t` (see [`kernel_dev`]).
    pub dev: u64,
    pub ino: u64,
}

/// The kernel's internal `dev_t` (`MAJOR << 20 | MINOR`) of a device number as `stat`
/// returns it.
#[must_use]
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = u64::from(libc::major(st_dev));
    let minor = u64::from(libc::minor(st_dev));
    (major << 20) | minor
}

/// Parses one ring buffer item into an [`Event`]; `None` for a short item.
#[must_use]
pub fn parse_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above; Event is plain old data and read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// The program `name` of the object, as its type.
fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::Map {
            name,
            detail: "program missing from the object".into(),
        })?
        .try_into()
        .map_err(|error| KernelError::Program { name, error })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        detail: "missing from the object".into(),
    })
}

fn map_err(name: &'static str, e: &dyn std::fmt::Display) -> KernelError {
    KernelError::Map {
        name,
        detail: e.to_string(),
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    tp: &str,
) -> Result<TracePointLinkId> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(KernelError::Map {
            name,
            detail: "program missing from the object".into(),
        })?
        .try_into()
        .map_err(|error| KernelError::Program { name, error })?;
    prog.load()
        .map_err(|error| KernelError::Program { name, error })?;
    prog.attach(category, tp)
        .map_err(|error| KernelError::Program { name, error })
}

/// An error with its sources, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to a local struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) };
    if rc != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on most hosts).
#[must_use]
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup v2 id of a cgroup directory (its inode number).
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a cgroup directory",
        ));
    }
    Ok(meta.ino())
}

/// Registers the ring buffer with the async runtime.
pub fn watch_ring(
    ring: RingBuf<MapData>,
) -> std::io::Result<tokio::io::unix::AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its map fd; it stays open and unchanged for as long as the
    // AsyncFd owns the ring buffer.
    unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)
}

/// The maps that tell whether a labelled task may exec a file without asking, opened from
/// their pins: the exec notifier's threads answer those execs without the daemon's main loop.
pub struct ExecFastPath {
    tasks: HashMap<MapData, u32, TaskState>,
    allow: HashMap<MapData, shared::ExecKey, u32>,
    grants: HashMap<MapData, shared::ExecKey, u64>,
}

impl ExecFastPath {
    /// Opens the maps pinned in `pin_dir` (the daemon's, after it loaded).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        fn open<K: aya::Pod, V: aya::Pod>(
            pin_dir: &Path,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(|e| KernelError::Map {
                name,
                detail: format!("opening its pin: {e}"),
            })?;
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|e| map_err(name, &e))
        }
        Ok(Self {
            tasks: open(pin_dir, shared::MAP_TASKS)?,
            allow: open(pin_dir, shared::MAP_EXEC_ALLOW)?,
            grants: open(pin_dir, shared::MAP_GRANT_EXEC)?,
        })
    }

    /// The thread's state, if it is labelled.
    #[must_use]
    pub fn task(&self, tid: u32) -> Option<TaskState> {
        self.tasks.get(&tid, 0).ok()
    }

    /// Whether the kernel lets label `label` run the file (the kernel's encoding of its
    /// device, its inode) without asking: the policy's fast path, or a binary grant while it
    /// lasts — the exec hooks' own test.
    #[must_use]
    pub fn allows(&self, label: u32, dev: u64, ino: u64) -> bool {
        let key = shared::ExecKey {
            label,
            _pad: 0,
            dev,
            ino,
        };
        self.allow.get(&key, 0).is_ok()
            || self
                .grants
                .get(&key, 0)
                .is_ok_and(|expiry| boot_ns() < expiry)
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock of the kernel's grant expiries.
fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_convert_to_the_kernels_encoding() {
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        // Minors above 255 are split in the user-space encoding, whole in the kernel's.
        assert_eq!(kernel_dev(libc::makedev(259, 300)), (259 << 20) | 300);
        assert_eq!(kernel_dev(libc::makedev(0, 45)), 45);
    }

    #[test]
    fn the_event_ring_holds_the_bound() {
        let record = size_of::<shared::Event>() + 8;
        for held in [1, 40, 315, 316, 10_000, 65_536] {
            let bytes = events_ring_bytes(held) as usize;
            assert!(
                bytes.is_power_of_two() && bytes >= 16 << 10,
                "{held}: {bytes}"
            );
            assert!(bytes / record >= held, "{held}: {bytes}");
        }
        // The smallest: 16 KiB where pages are 4 KiB (about 78 events), else a page.
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .unwrap()
            .unwrap() as u32;
        assert_eq!(events_ring_bytes(40), (16 << 10).max(page));
        assert_eq!(events_ring_bytes(10_000), 2 << 20);
    }
}
