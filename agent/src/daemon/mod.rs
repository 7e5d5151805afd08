//! The host daemon: loads the hooks, turns kernel events into held requests with their full
//! context, serves decisions over the local sockets, applies them (write-ahead logged), and
//! applies the timeout outcome to anything nobody decides.
//!
//! One task (the main loop below) owns the kernel state, the request table and the log; the
//! socket handlers talk to it through [`control::Command`] messages.
mod cgroups;
pub mod config;
pub mod control;
pub mod enrich;
pub mod grants;
mod guard;
mod kgrants;
mod log;
pub mod names;
mod notified;
pub mod notify;
pub mod remote;
mod trace;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use countersign_ebpf as shared;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::sync::mpsc;

use self::{
    config::{DaemonConfig, TimeoutAction, validate_label},
    control::{Command, Peer, Socket},
    enrich::FileId,
    log::DecisionLog,
};
use crate::records::{self, Body, DecisionRecord, RequestRecord, spool::Spool};
use crate::{
    ebpf::{self, Kernel},
    policy::{
        self, Action, Policy,
        schema::{Outcome, Protocol, TimeoutOutcome},
    },
    proto::{ActionKind, Decision, RequestView, Response, StatusInfo},
};

/// How often deadlines and vanished tasks are checked while anything waits on the tick
/// (held requests, traced execs, unclassified cgroups, a DNS backlog).
const TICK: Duration = Duration::from_millis(100);
/// How often an idle daemon wakes up (policy files, resolvers, heartbeats, grant expiry): an
/// idle host is not woken ten times a second.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// At shutdown, how long denied tasks get to consume their denial before they are killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often the policy files (and the resolvers) are checked for changes.
const POLICY_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Events taken from the ring in one go: between two such batches the daemon answers its
/// socket (a burst of thousands of held actions must not make `status` wait).
const DRAIN_BATCH: usize = 64;
/// How often the same refusal in the kernel (same process, same action) is recorded.
const REFUSAL_RECORD_EVERY: Duration = Duration::from_secs(60);
/// Most distinct refusals remembered for that.
const MAX_REFUSALS: usize = 1024;

/// What an approved exec is bound to: the image that runs must be this one.
#[derive(Debug, Clone)]
struct ExecBinding {
    filename: String,
    exe: Option<FileId>,
    argv: Vec<String>,
    /// What the kernel checks the loaded image against once approved (the file, or a
    /// script's interpreter, and the argv bytes as the kernel lays them out). `None`: nothing
    /// is there to load (no file, no interpreter): the exec fails by itself, and should
    /// something appear meanwhile the kernel kills it, unapproved.
    expect: Option<(FileId, Vec<u8>)>,
    /// Why an approval could not be checked by the kernel (argv cut or too long): such an
    /// exec is refused rather than released.
    unverifiable: Option<String>,
}

/// A decision recorded and not yet applied (see [`Daemon::end_batch`]).
struct Decided {
    held: Held,
    decision: Decision,
    /// The kernel state to write (none: the task is let go or killed by the signal).
    state: Option<u32>,
    signal: Signal,
    /// What the caller sees (`eperm`, `released`, `sigkill`).
    applied: &'static str,
    /// The decision as recorded (`approved`, `auto-denied`, ...).
    word: String,
    by: String,
    view: RequestView,
}

struct Held {
    view: RequestView,
    kind: ActionKind,
    tid: u32,
    tgid: u32,
    kernel_id: u64,
    created: Instant,
    deadline: Instant,
    binding: Option<ExecBinding>,
    /// What the deadline brings.
    on_timeout: Decision,
    /// The kernel's report, kept to evaluate the request again (policy reload).
    event: shared::Event,
    /// Set when escalated to the remote approver: what its decision must be bound to.
    action_hash: Option<String>,
    /// The grants the escalation offered (a decision's grant must be one of them).
    grant_offers: Vec<crate::sign::statement::GrantOffer>,
}

struct Daemon {
    kernel: Kernel,
    /// Signs what this host states (escalations; records through the spool); its id names
    /// the host.
    host_key: ed25519_dalek::SigningKey,
    /// `sign::key_id` of `host_key`.
    host_id: String,
    host_name: String,
    /// The remote approver, if one is configured.
    remote: Option<remote::Remote>,
    /// Grants the approver gave: later actions they cover need no human.
    grants: grants::Grants,
    config: DaemonConfig,
    log: DecisionLog,
    /// Signed decision records, written before the decision log and before anything is
    /// applied.
    spool: Spool,
    /// Why the last record could not be written, until one is: meanwhile nobody is asked to
    /// decide anything (new requests are refused).
    spool_error: Option<String>,
    last_heartbeat: Instant,
    labels: Vec<String>,
    /// (cgroup path as in /proc/PID/cgroup, label id), for refusing labelled callers.
    cgroup_labels: Vec<(String, u32)>,
    /// Labels by cgroup glob and systemd unit (see `cgroups`).
    cgroups: cgroups::CgroupMatching,
    requests: BTreeMap<u64, Held>,
    next_id: u64,
    started: Instant,
    /// Requests taken over from an earlier daemon (stopped with `on_stop: keep`, or killed).
    adopted: usize,
    /// The kernel's count of requests it held without room in the event ring, as last
    /// looked at (`None`: an earlier daemon's statistics map has no such count).
    deferred_seen: Option<u64>,
    /// Requests refused because `max_held_requests` were held already.
    over_bound: u64,
    /// Decisions of the current batch, recorded and waiting for its flush.
    batch: Option<Vec<Decided>>,
    /// Refusals the kernel reported lately, by (process, what): the first of a storm is
    /// recorded, its repeats within [`REFUSAL_RECORD_EVERY`] only counted by the kernel.
    refusals: HashMap<(u32, String), Instant>,
    /// Loaded-but-not-run execs held in a ptrace stop.
    tracer: trace::Tracer,
    /// Approved execs on their way to the kernel's check, by request id (the kernel's): the
    /// approved request, recorded again as `exec-verified` once what loaded matched.
    verifying: HashMap<u64, (u32, RequestView)>,
    /// Fallback mode: the seccomp listeners of launched agents, whose execs are decided
    /// before they start (`None` in LSM mode, or where the kernel cannot).
    notifier: Option<notified::Notifier>,
    /// Fallback mode: how launched agents' execs are held (for `status`).
    exec_hold: Option<String>,
    policy: Option<Policy>,
    /// What the policy files looked like when read (to notice changes).
    policy_stamp: Vec<(std::path::PathBuf, Option<std::time::SystemTime>, u64)>,
    /// Why the last reload failed, until one succeeds.
    reload_error: Option<String>,
    /// When the policy files were last checked for changes.
    last_policy_check: Instant,
    /// Destination names learnt from the host resolvers' DNS answers.
    names: names::Names,
    /// countersign's own files as given to the kernel (self-protection).
    guarded: guard::Guarded,
    /// Labelled tasks' attempts on countersign refused since the start, by kind.
    tampers: BTreeMap<&'static str, u64>,
    /// Whether the daemon's memory is locked and not dumpable (`guard::protect_memory`).
    memory: Result<(), String>,
    /// The deputy sockets (`guard::DEPUTY_SOCKETS`) as installed: (device, inode).
    deputies: Vec<(u64, u64)>,
    /// The local-socket rules as given to the kernel (`CS_UNIX_RULES`, `CS_UNIX_HOLD_ALL`),
    /// for the notifier's own decision before a launched agent's connect is made.
    unix_rules: std::collections::HashMap<shared::ExecKey, u32>,
    unix_hold_all: std::collections::HashSet<u32>,
}

/// Moves the daemon back into the cgroups it started in (`guard::return_home`), saying why.
fn return_home(why: &str) {
    match guard::return_home() {
        Ok(homes) => tracing::warn!(cgroups = ?homes, "{why}: moved back"),
        Err(e) => tracing::error!(error = %e, "{why}; moving back failed"),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: DaemonConfig) -> anyhow::Result<()> {
    // Before the host key is read.
    let memory = guard::protect_memory();
    if let Err(why) = &memory {
        tracing::warn!(
            why,
            "the daemon's memory is not locked: the host key could be written to swap"
        );
    }
    let _lock = control::lock(&config.socket_dir)?;
    // Resolve the cgroups first: a configuration error must not touch the kernel.
    let mut cgroups = Vec::new();
    if !config.cgroup_labels.is_empty() {
        let root = ebpf::cgroup2_root()
            .context("cgroup_labels need a cgroup v2 mount; none in /proc/mounts")?;
        for (i, c) in config.cgroup_labels.iter().enumerate() {
            let dir = root.join(c.path.strip_prefix("/").unwrap_or(&c.path));
            let id = ebpf::cgroup_id(&dir).with_context(|| {
                format!(
                    "cgroup_labels[{i}].path: cgroup {} ({})",
                    c.path.display(),
                    dir.display()
                )
            })?;
            cgroups.push((id, c));
        }
    }
    let policy = load_policy(&config)?;
    let stamp = policy_stamp(&config, policy.as_ref());
    let log = DecisionLog::open(&config.decision_log)?;
    match records::rotate::finish_interrupted(&config.host_key, &config.spool_dir)
        .context("finishing an interrupted host key rotation")?
    {
        records::rotate::Interrupted::None => {}
        done => tracing::warn!(?done, "an interrupted host key rotation was completed"),
    }
    let (host_key, made) =
        crate::sign::keys::load_or_create(&config.host_key).context("the host key (host_key)")?;
    let host_id = crate::sign::key_id(&host_key.verifying_key()).0;
    if made {
        tracing::info!(path = %config.host_key.display(), host_id, "host key made");
    }
    let spool = Spool::open(&config.spool_dir, host_key.clone(), &records::host_name())
        .context("the record spool (spool_dir)")?;
    let shipper = match &config.collector {
        Some(c) => Some(records::ship::Target {
            url: c.url.clone(),
            key: crate::sign::keys::load_public(&c.public_key)
                .context("the collector's public key (collector.public_key)")?,
            ca_pem: c
                .ca_file
                .as_ref()
                .map(|p| {
                    std::fs::read(p).with_context(|| format!("collector.ca_file {}", p.display()))
                })
                .transpose()?,
        }),
        None => None,
    };
    let next_id = log.last_request_id() + 1;
    // The OOM killer takes anything else first: the daemon is what keeps held tasks held.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(error = %e, "could not exempt the daemon from the OOM killer");
    }
    let (mut kernel, ring) = Kernel::load(
        config.mode,
        &config.bpf_pin_dir,
        guard::settings(&config),
        ebpf::events_ring_bytes(config.max_held_requests),
    )
    .context("loading the eBPF hooks")?;
    // Label ids are kept in the kernel with their names, so that a restarted daemon reads
    // the same table.
    let mut labels: Vec<String> = Vec::new();
    for (id, name) in kernel.label_names() {
        let i = id as usize;
        if i == 0 {
            continue;
        }
        if labels.len() < i {
            labels.resize_with(i, String::new);
        }
        labels[i - 1] = name;
    }
    let mut cgroup_ids = Vec::new();
    let mut cgroup_labels = Vec::new();
    for (id, c) in cgroups {
        let label = label_id(&mut labels, &c.label);
        kernel.set_label_name(label, &c.label)?;
        cgroup_ids.push((id, label));
        cgroup_labels.push((c.path.to_string_lossy().into_owned(), label));
    }
    kernel.install_cgroup_labels(&cgroup_ids)?;
    tracing::info!(mode = %kernel.mode(), reason = kernel.reason(), "enforcing");

    let host_name = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let (remote, mut decisions) = match config.approver.clone() {
        Some(a) => {
            let (r, rx) = remote::start(a, host_key.clone(), host_id.clone(), host_name.clone())?;
            (Some(r), Some(rx))
        }
        None => (None, None),
    };
    let mut ring = ebpf::watch_ring(ring).context("watching the event ring buffer")?;
    let names = names::Names::start(&config.dns, || {
        kernel
            .capture_dns()
            .map_err(|e| crate::ebpf::error_chain(&e))
    });
    kernel.drop_btf();
    let (notify_tx, mut notify_rx) = mpsc::channel::<notify::Notification>(64);
    let (notifier, exec_hold) = match (kernel.mode(), kernel.can_verify_execs()) {
        (ebpf::Mode::Lsm, _) => (None, None),
        _ if config.fallback_exec_hold == config::FallbackExecHold::Stop => (
            None,
            Some("after loading, by a stop (fallback_exec_hold: stop)".to_owned()),
        ),
        (_, false) => (None, Some("after loading, by a stop: the kernel cannot identify executables (no BTF offsets)".to_owned())),
        (_, true) => match notify::available() {
            Ok(()) => (
                Some(notified::Notifier::new(
                    notify_tx,
                    ebpf::ExecFastPath::open(&config.bpf_pin_dir)
                        .inspect_err(|e| tracing::warn!(error = %e, "the exec notifier's threads cannot read the fast path; the main loop answers every exec"))
                        .ok()
                        .map(std::sync::Arc::new),
                )),
                Some("before they start, by the seccomp notifier (launched agents; others after loading, by a stop)".to_owned()),
            ),
            Err(why) => {
                tracing::warn!(why, "launched agents' execs are held after loading (a stop), not before: the kernel cannot notify them");
                (None, Some(format!("after loading, by a stop: {why}")))
            }
        },
    };
    if names.active() {
        tracing::info!(resolvers = ?names.resolvers(), capture = names.capture_programs(), "learning destination names from DNS answers");
    }
    // Agents held after loading: what ends the stop before the daemon holds it.
    let exec_hold = exec_hold.map(|hold| {
        if kernel.loaded_exec_tripwire() {
            format!("{hold}; a stopped image let run before its decision is killed at its first page fault")
        } else {
            format!("{hold}; a SIGCONT or a tracer in the moment before the daemon holds a stopped image can let it run (no page-fault tracepoint on this kernel)")
        }
    });
    let dns_ready = names.readiness();
    let mut daemon = Daemon {
        kernel,
        host_key,
        host_id,
        host_name,
        remote,
        grants: grants::Grants::default(),
        config,
        log,
        spool,
        spool_error: None,
        last_heartbeat: Instant::now(),
        labels,
        cgroup_labels,
        cgroups: cgroups::CgroupMatching {
            fixed: cgroup_ids,
            ..Default::default()
        },
        requests: BTreeMap::new(),
        next_id,
        started: Instant::now(),
        adopted: 0,
        deferred_seen: Some(0),
        over_bound: 0,
        batch: None,
        refusals: HashMap::new(),
        tracer: trace::Tracer::default(),
        verifying: HashMap::new(),
        notifier,
        exec_hold,
        policy_stamp: stamp,
        policy,
        reload_error: None,
        last_policy_check: Instant::now(),
        names,
        guarded: guard::Guarded::default(),
        tampers: BTreeMap::new(),
        memory,
        deputies: Vec::new(),
        unix_rules: std::collections::HashMap::new(),
        unix_hold_all: std::collections::HashSet::new(),
    };
    if let Some(target) = shipper {
        tracing::info!(url = target.url, "shipping records");
        tokio::spawn(records::ship::run(daemon.config.spool_dir.clone(), target));
    }
    daemon.append(Body::DaemonStart {
        version: env!("CARGO_PKG_VERSION").into(),
        mode: daemon.kernel.mode().to_string(),
        pid: std::process::id(),
    });
    daemon.record_policy();
    // The policy's fast paths (empty without a policy: clears an earlier daemon's).
    daemon.install_fast_path()?;
    // Before adopting: held tasks of unclassified cgroups are resolved against these labels.
    daemon.install_cgroup_matches()?;
    daemon.install_guard();
    daemon.adopt();
    // The sockets appear once everything above is in place: a caller that sees them (a
    // supervisor's readiness check, `countersign exec`) finds the daemon ready, not loading.
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    control::serve(&daemon.config.socket_dir, tx)?;
    eprintln!(
        "countersign: enforcing in {} mode ({}); sockets in {}",
        daemon.kernel.mode(),
        daemon.kernel.reason(),
        daemon.config.socket_dir.display()
    );

    let protection = daemon.self_protection();
    if let Some(why) = protection
        .reason
        .as_deref()
        .filter(|_| !protection.contained)
    {
        eprintln!("countersign: a labelled root is NOT contained: {why}");
        tracing::warn!(why, "a labelled root is not contained");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // SIGHUP will reload the policy; until there is one, it must not kill the daemon.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let tick = tokio::time::sleep(TICK);
    tokio::pin!(tick);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the event ring buffer")?;
                daemon.begin_batch();
                if drain(guard.get_inner_mut(), &mut daemon) {
                    guard.clear_ready();
                }
                daemon.pick_up_unreported();
                daemon.end_batch();
            }
            Some(d) = async {
                match decisions.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => daemon.remote_decision(d),
            Some(cmd) = rx.recv() => {
                let response = daemon.command(cmd.request, cmd.peer);
                let _ = cmd.reply.send(response);
            }
            Some(n) = notify_rx.recv() => daemon.exec_notified(n),
            () = names::readable(dns_ready.as_ref()) => daemon.names.drain(),
            () = &mut tick => {
                daemon.begin_batch();
                daemon.tick();
                daemon.end_batch();
            }
            _ = hup.recv() => daemon.reload("SIGHUP"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        // After a tick the next one is due in `next_tick`; after anything else it may only
        // come sooner (a new request must be watched from now on).
        let next = tokio::time::Instant::now() + daemon.next_tick();
        if tick.is_elapsed() || next < tick.deadline() {
            tick.as_mut().reset(next);
        }
    }
    daemon.shutdown(ring.get_mut(), "signal");
    Ok(())
}

/// Takes up to [`DRAIN_BATCH`] events from the ring; whether it is empty.
fn drain(ring: &mut RingBuf<MapData>, daemon: &mut Daemon) -> bool {
    for _ in 0..DRAIN_BATCH {
        let Some(item) = ring.next() else {
            return true;
        };
        let event = ebpf::parse_event(&item);
        drop(item);
        if let Some(event) = event {
            daemon.event(&event);
        }
    }
    false
}

/// Why a labelled root is not contained in fallback mode, with launched agents' filter.
const FALLBACK_GUARD_NOTIFIER: &str = "fallback mode (no BPF LSM): a labelled root can write countersign's files, signal the daemon and change sysctls; agents started by `countersign exec` are refused bpf, ptrace, module loads and mounts by their seccomp filter, agents labelled otherwise not even that";
/// The same without the filter (`fallback_exec_hold: stop`, or a kernel without it).
const FALLBACK_GUARD_NONE: &str = "fallback mode (no BPF LSM, no seccomp filter for launched agents): a labelled root can use bpf, ptrace, load modules, mount, write countersign's files and signal the daemon";

/// Threads of a caller looked at for a label (a process with more is refused).
const MAX_CALLER_THREADS: usize = 4_096;

/// The id of label `name` (its index + 1), adding it if new.
fn label_id(labels: &mut Vec<String>, name: &str) -> u32 {
    if let Some(i) = labels.iter().position(|l| l == name) {
        return i as u32 + 1;
    }
    labels.push(name.to_owned());
    labels.len() as u32
}

/// The configured policy; with none configured, the default directory if it exists. A policy
/// with errors stops the daemon: it must not enforce something else than what was written.
fn load_policy(config: &DaemonConfig) -> anyhow::Result<Option<Policy>> {
    let paths = if config.policy.is_empty() {
        let dir = std::path::PathBuf::from(crate::paths::DEFAULT_POLICY_DIR);
        if !dir.is_dir() {
            return Ok(None);
        }
        vec![dir]
    } else {
        config.policy.clone()
    };
    let p = policy::load(&paths).map_err(|e| anyhow::anyhow!("the policy has errors:\n{e}"))?;
    tracing::info!(
        files = p.files.len(),
        labels = p.labels.len(),
        rules = p.rule_count(),
        "policy loaded"
    );
    Ok(Some(p))
}

/// Modification time and size of every policy file (and of the configured directories'
/// YAML files), to notice edits, new and removed files. A failed reload records the new
/// stamp too, so that a broken file is reported once, not every check.
fn policy_stamp(
    config: &DaemonConfig,
    policy: Option<&Policy>,
) -> Vec<(std::path::PathBuf, Option<std::time::SystemTime>, u64)> {
    let mut paths: Vec<std::path::PathBuf> = policy.map(|p| p.files.clone()).unwrap_or_default();
    let roots = if config.policy.is_empty() {
        vec![std::path::PathBuf::from(crate::paths::DEFAULT_POLICY_DIR)]
    } else {
        config.policy.clone()
    };
    for root in roots {
        if let Ok(entries) = std::fs::read_dir(&root) {
            paths.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml")),
            );
        } else {
            paths.push(root);
        }
    }
    // An agent executable replaced (a new inode) or installed later: labelled once reloaded;
    // likewise a local socket a rule names (a service started later binds a new file).
    if let Some(p) = policy {
        paths.extend(p.labels.iter().flat_map(|l| l.matches.executable.clone()));
        paths.extend(policy::compile::unix_paths(p));
    }
    // A deputy started after the daemon (the system bus at boot) is held once it appears.
    // So is a user's service manager once the user has a session (`/run/user/UID`).
    paths.extend(guard::deputy_paths());
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let stamp = (
                m.as_ref().and_then(|m| m.modified().ok()),
                m.map_or(0, |m| m.len()),
            );
            (p, stamp.0, stamp.1)
        })
        .collect()
}

/// The destination address of a connect event.
/// The name a local socket's peer was bound with: its path, or `@name` for an abstract one
/// (empty when unknown).
fn unix_name(ev: &shared::Event) -> String {
    let len = (ev.unix_name_len as usize).min(shared::UNIX_NAME_LEN);
    let bytes = &ev.unix_name[..len];
    match bytes.split_first() {
        Some((0, rest)) => {
            let end = rest.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            format!("@{}", String::from_utf8_lossy(&rest[..end]))
        }
        _ => {
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(len);
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        }
    }
}

/// A local socket as people read it: `unix:/run/docker.sock`, `unix:@name`, or by its file
/// when it has no name.
fn unix_text(ev: &shared::Event) -> String {
    let name = unix_name(ev);
    if name.is_empty() {
        let peer = shared::UnixPeer::from_addr(&ev.addr);
        format!("unix:(file {}:{})", peer.dev, peer.ino)
    } else {
        format!("unix:{name}")
    }
}

fn event_addr(ev: &shared::Event) -> std::net::IpAddr {
    if ev.family == libc::AF_INET6 as u16 {
        std::net::IpAddr::from(ev.addr)
    } else {
        std::net::IpAddr::from([ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]])
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the kernel's request ids.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The event the kernel reports for a pending request, rebuilt from the task's state (which
/// keeps everything but a local socket's name and the cgroup id).
fn state_event(tid: u32, tgid: u32, uid: u32, st: &shared::TaskState) -> shared::Event {
    shared::Event {
        kind: st.kind,
        label: st.label,
        tgid,
        tid,
        uid,
        family: st.family,
        sock_type: st.sock_type,
        port: st.port,
        request_id: st.request_id,
        action_hash: st.action_hash,
        addr: st.addr,
        exec_filename: st.exec_filename,
        exec_argv: st.exec_argv,
        ..shared::Event::default()
    }
}

/// Thread-group id and uid of a thread, from `/proc/TID/status`.
fn tgid_uid(tid: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    Some((field("Tgid:")?, field("Uid:")?))
}

impl Daemon {
    /// Takes over what an earlier daemon (stopped with `on_stop: keep`, or killed) left held:
    /// pending requests come back with their original deadlines; decisions written but not
    /// yet taken are released (they were logged before they were written).
    fn adopt(&mut self) {
        if !self.kernel.adopted() {
            return;
        }
        let now_ns = monotonic_ns();
        for (tid, st) in self.kernel.held_tasks() {
            let Some((tgid, uid)) = tgid_uid(tid) else {
                continue;
            };
            if st.flags & shared::FLAG_NOTIFIED != 0 && st.kind == shared::KIND_EXEC {
                // Held by the seccomp notifier of the daemon that died: its listener closed
                // with it, and the kernel failed the waiting call (ENOSYS). Nothing is held.
                let _ = self.kernel.decide(tid, st.request_id, shared::STATE_IDLE);
                continue;
            }
            if st.state != shared::STATE_PENDING {
                let _ = kill(Pid::from_raw(tgid as i32), Signal::SIGCONT);
                continue;
            }
            let mut ev = state_event(tid, tgid, uid, &st);
            if st.kind == shared::KIND_EXEC {
                // An earlier daemon's exec: its file is resolved by name.
                ev.addr = [0; 16];
            }
            let kind = ActionKind::from_kernel(st.kind).unwrap_or(ActionKind::ExecLoaded);
            if st.label == shared::LABEL_UNCLASSIFIED {
                // Never recorded: resolved against the cgroup labels installed at start.
                self.unclassified_held(&ev, kind);
                continue;
            }
            self.hold_as(
                &ev,
                kind,
                Some(
                    "taken over from an earlier daemon (stopped with on_stop: keep, or killed)"
                        .into(),
                ),
                st.user_id,
            );
            // The deadline counts from when the kernel raised the request.
            let age = Duration::from_nanos(now_ns.saturating_sub(st.request_id));
            let timeout = Duration::from_secs(self.config.request_timeout_secs);
            if let Some(h) = self
                .requests
                .values_mut()
                .find(|h| h.tid == tid && h.kernel_id == st.request_id)
            {
                h.created = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                h.deadline = h.created + timeout;
            }
            self.adopted += 1;
        }
        tracing::warn!(
            adopted = self.adopted,
            "an earlier daemon left enforcement in place (on_stop: keep, or killed); its held requests were taken over"
        );
        let orphaned = self.kernel.notified_processes();
        if !orphaned.is_empty() {
            tracing::warn!(
                pids = ?orphaned,
                "these launched agents had their execs decided by the earlier daemon's notifier, which ended with it: their execs fail (ENOSYS) until they are started again"
            );
        }
    }

    /// Takes the requests the kernel held while its event ring was full
    /// (`shared::FLAG_UNREPORTED`) from the task map, as if the ring had carried them; looked
    /// for whenever the kernel's count of them moved.
    fn pick_up_unreported(&mut self) {
        let deferred = self.kernel.stat(shared::STAT_DEFERRED);
        if deferred.is_some() && deferred == self.deferred_seen {
            return;
        }
        self.deferred_seen = deferred;
        for (ev, kind) in self.unreported() {
            if ev.label == shared::LABEL_UNCLASSIFIED {
                self.unclassified_held(&ev, kind);
                continue;
            }
            let mut note = "reported while the kernel's event ring was full (a burst), taken from its task table".to_owned();
            if kind == ActionKind::Unix
                && shared::UnixPeer::from_addr(&ev.addr).dev == shared::UNIX_ABSTRACT_DEV
            {
                note.push_str("; the abstract socket's name was not kept");
            }
            self.hold(&ev, kind, Some(note));
        }
    }

    /// The pending requests of the task map that no event reported, as the events would
    /// have (without a local socket's name); taken (their flag cleared).
    fn unreported(&mut self) -> Vec<(shared::Event, ActionKind)> {
        let mut out = Vec::new();
        for (tid, st) in self.kernel.held_tasks() {
            if st.state != shared::STATE_PENDING || st.flags & shared::FLAG_UNREPORTED == 0 {
                continue;
            }
            let Some((tgid, uid)) = tgid_uid(tid) else {
                continue;
            };
            self.kernel.clear_unreported(tid, st.request_id);
            let Some(kind) = ActionKind::from_kernel(st.kind) else {
                continue;
            };
            out.push((state_event(tid, tgid, uid, &st), kind));
        }
        out
    }

    fn label_name(&self, id: u32) -> String {
        if id == shared::LABEL_UNCLASSIFIED {
            return cgroups::UNCLASSIFIED_NAME.to_owned();
        }
        self.labels
            .get((id as usize).wrapping_sub(1))
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }

    fn event(&mut self, ev: &shared::Event) {
        if ev.label == shared::LABEL_UNCLASSIFIED
            && let Some(kind) = ActionKind::from_kernel(ev.kind)
        {
            return self.unclassified_held(ev, kind);
        }
        match ev.kind {
            shared::KIND_CGROUP_NEW => self.cgroup_created(ev),
            shared::KIND_EXEC_VERIFIED => {
                if let Some((_, view)) = self.verifying.remove(&ev.request_id) {
                    self.log_or_warn("exec-verified", "released", "kernel", &view);
                }
            }
            shared::KIND_EXEC
            | shared::KIND_EXEC_LOADED
            | shared::KIND_CONNECT
            | shared::KIND_SEND
            | shared::KIND_SOCKET
            | shared::KIND_UNIX
            | shared::KIND_LISTEN => {
                if let Some(kind) = ActionKind::from_kernel(ev.kind) {
                    self.hold(ev, kind, None);
                }
            }
            shared::KIND_TAMPER => self.tamper(ev),
            shared::KIND_ERROR if ev.detail == shared::ERROR_GRANT_RECHECK => {
                tracing::warn!(pid = ev.tgid, label = %self.label_name(ev.label),
                    "a connect let through on a grant was not covered by it once its socket type was known (a grant for another protocol, or it just ended) and was refused");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_UNHOLDABLE => {
                self.kernel_refused(ev, "denied", "eperm",
                    "kernel: made where it cannot be held (an io_uring thread or submission, a 32-bit system call, another destination of one batch) and not allowed by the policy's fast path, a grant or an earlier decision");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_SOCKET_KILLED => {
                self.kernel_refused(ev, "killed", "sigkill",
                    "kernel: a socket of a family the fallback hooks cannot refuse, not allowed by the policy");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_UNIX_KILLED => {
                self.kernel_refused(ev, "killed", "sigkill",
                    "kernel: a connect reached a local socket the policy does not allow, without a decision for it (fallback mode checks local sockets once connected): killed before its connect returned");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_LISTEN_KILLED => {
                self.kernel_refused(ev, "killed", "sigkill",
                    "kernel: a listen left a socket on the network in its descriptor that was not decided (another thread put it there while the call waited), or could not be held (no room to ask): killed before its listen returned");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_LISTEN_UNSEEN => {
                self.kernel_refused(ev, "killed", "sigkill",
                    "kernel: a listen on the network made without listen(2) (io_uring, a 32-bit system call), where fallback mode cannot hold it: killed");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_UNIX_UNSEEN => {
                self.kernel_refused(ev, "denied", "eperm",
                    "kernel: a local-socket connect made without connect(2) (io_uring, a 32-bit system call), or a datagram sent with an address to a local socket while the label restricts local sockets: fallback mode cannot tell which socket it names");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_EXEC_TRACED => {
                self.kernel_refused(ev, "killed", "sigkill",
                    "kernel: an exec held after loading by a task another process traces (it asked to be traced, or was attached to), whose tracer could have let it run before the hold: killed before its first instruction");
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_EXEC_RAN_EARLY => {
                let by = "kernel: an exec held after loading was let run before its decision (its stop ended by a SIGCONT, or by a tracer that attached before the daemon): killed at its first page fault, before that instruction ran";
                let id = self
                    .requests
                    .iter()
                    .find(|(_, h)| h.tid == ev.tid && h.kernel_id == ev.request_id)
                    .map(|(id, _)| *id);
                match id.and_then(|id| self.requests.remove(&id)) {
                    Some(held) => {
                        self.apply(held, Decision::Kill, by);
                    }
                    None => self.kernel_refused(ev, "killed", "sigkill", by),
                }
            }
            shared::KIND_ERROR if ev.detail == shared::ERROR_EXEC_UNVERIFIED => {
                self.kernel_refused(ev, "killed", "sigkill",
                    "kernel: an exec that loaded something other than what was approved (its file or argv changed after the approval), or that never asked");
            }
            shared::KIND_ERROR => {
                tracing::warn!(pid = ev.tgid, label = %self.label_name(ev.label), detail = ev.detail,
                    "the kernel reported an error for a labelled task");
            }
            _ => {}
        }
    }

    /// An action the kernel refused (or killed) by itself: logged, and recorded as a signed
    /// decision so that the evidence shows the attempt — once a minute for the same process
    /// and action, so that a storm of refusals cannot flood the spool.
    fn kernel_refused(&mut self, ev: &shared::Event, decision: &str, applied: &str, by: &str) {
        let Some(kind) = ActionKind::from_kernel(u32::from(ev.action)) else {
            return;
        };
        let what = match kind {
            ActionKind::Socket => enrich::socket(ev.family, ev.sock_type, ev.port),
            ActionKind::Exec | ActionKind::ExecLoaded => enrich::readlink(ev.tgid, "exe")
                .unwrap_or_else(|| "an exec (its process already gone)".into()),
            ActionKind::Unix => unix_text(ev),
            _ => enrich::destination(ev.family, &ev.addr, ev.port),
        };
        tracing::warn!(pid = ev.tgid, tid = ev.tid, label = %self.label_name(ev.label),
            action = %kind, what, decision, "{by}");
        if !self.first_this_minute(ev.tgid, format!("{kind} {what}")) {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let (mut view, _) = self.describe(id, ev, kind, None);
        view.expires_in_ms = 0;
        if let Err(e) = self.record(decision, applied, by, &view, None) {
            tracing::error!(error = %e, "cannot record a refusal of the kernel");
        }
    }

    /// Gives the kernel countersign's own files as they are now (at start and on every
    /// reload: a policy file an editor replaced is a new inode).
    fn install_guard(&mut self) {
        let mut policy_paths = if self.config.policy.is_empty() {
            vec![std::path::PathBuf::from(crate::paths::DEFAULT_POLICY_DIR)]
        } else {
            self.config.policy.clone()
        };
        if let Some(p) = &self.policy {
            policy_paths.extend(p.files.iter().cloned());
        }
        self.guarded = guard::Guarded::of(&self.config, &policy_paths);
        let (entries, dropped) = self.guarded.entries();
        if dropped > 0 {
            tracing::error!(
                dropped,
                "more of countersign's files and their directories than the kernel map holds: the last directories on the way to them are not guarded"
            );
        }
        match self.kernel.set_guard_files(&entries) {
            Ok(()) => tracing::info!(files = entries.len(), "countersign's own files guarded"),
            Err(e) => {
                tracing::error!(error = %e, "countersign's own files could not be given to the kernel");
            }
        }
    }

    /// A labelled task's attempt on countersign that the kernel refused: counted, logged,
    /// and recorded as a signed `tamper` record (once a minute for the same process and
    /// attempt, so that a loop of attempts cannot flood the spool).
    fn tamper(&mut self, ev: &shared::Event) {
        let attempt = guard::attempt_name(ev.detail);
        let target = guard::target_text(ev, &self.guarded, std::process::id());
        if ev.detail == shared::TAMPER_CGROUP_MOVE {
            return_home("a labelled task moved the daemon into another cgroup");
        }
        // A move cannot be refused: its mover is always killed.
        let applied = if self.config.on_tamper == config::OnTamper::Kill
            || ev.detail == shared::TAMPER_CGROUP_MOVE
        {
            "sigkill"
        } else {
            "eperm"
        };
        let comm = ev.unix_name[..16]
            .split(|b| *b == 0)
            .next()
            .unwrap_or_default();
        let comm = String::from_utf8_lossy(comm).into_owned();
        self.report_tamper(
            (ev.tgid, ev.tid, ev.uid, ev.label),
            Some(comm),
            attempt,
            target,
            applied,
            "kernel",
        );
    }

    /// Counts, logs and records one refused attempt (see [`Daemon::tamper`]).
    /// `who`: (pid, tid, uid, label id); `comm`: the task's name if the kernel gave it.
    fn report_tamper(
        &mut self,
        who: (u32, u32, u32, u32),
        comm: Option<String>,
        attempt: &'static str,
        target: String,
        applied: &str,
        by: &str,
    ) {
        let (pid, tid, uid, label) = who;
        *self.tampers.entry(attempt).or_default() += 1;
        let label = self.label_name(label);
        tracing::warn!(
            pid,
            tid,
            label,
            attempt,
            target,
            applied,
            "a labelled task tried to tamper with countersign: refused"
        );
        if !self.first_this_minute(pid, format!("tamper {attempt} {target}")) {
            return;
        }
        let (argv, _) = enrich::cmdline(pid).unwrap_or_default();
        let record = records::TamperRecord {
            attempt: attempt.to_owned(),
            target,
            applied: applied.to_owned(),
            by: by.to_owned(),
            on_behalf_of: self.on_behalf_of(&label),
            label,
            pid,
            tid,
            uid,
            user: enrich::user_name(uid),
            comm: comm
                .or_else(|| enrich::stat(pid).map(|(c, _, _)| c))
                .unwrap_or_default(),
            binary: enrich::readlink(pid, "exe"),
            argv,
            parents: enrich::parents(pid),
        };
        if let Err(e) = self.try_append(Body::Tamper(record)) {
            tracing::error!(error = %e, "cannot record a tamper attempt");
        }
    }

    /// Whether a refusal of `what` by process `pid` is the first within
    /// [`REFUSAL_RECORD_EVERY`] (and so recorded): a storm of refusals cannot flood the spool.
    /// Past [`MAX_REFUSALS`] remembered ones, nothing more is recorded until they age out.
    fn first_this_minute(&mut self, pid: u32, what: String) -> bool {
        let now = Instant::now();
        let key = (pid, what);
        if self
            .refusals
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < REFUSAL_RECORD_EVERY)
        {
            return false;
        }
        if self.refusals.len() >= MAX_REFUSALS {
            self.refusals
                .retain(|_, t| now.duration_since(*t) < REFUSAL_RECORD_EVERY);
            if self.refusals.len() >= MAX_REFUSALS {
                return false;
            }
        }
        self.refusals.insert(key, now);
        true
    }

    /// A new held request.
    fn hold(&mut self, ev: &shared::Event, kind: ActionKind, note: Option<String>) {
        self.hold_as(ev, kind, note, 0);
    }

    /// A held request; `adopted_id` is the id an earlier daemon gave it (0: a new one).
    fn hold_as(
        &mut self,
        ev: &shared::Event,
        kind: ActionKind,
        note: Option<String>,
        adopted_id: u64,
    ) {
        // Already known (adopted at start, then reported again by the ring buffer).
        if self
            .requests
            .values()
            .any(|h| h.tid == ev.tid && h.kernel_id == ev.request_id)
        {
            return;
        }
        // A task has at most one request: a new one supersedes the old.
        let old: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, h)| h.tid == ev.tid)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if let Some(h) = self.requests.remove(&id) {
                self.log_or_warn("superseded", "none", "kernel", &h.view);
            }
        }
        let id = if adopted_id > 0 {
            self.next_id = self.next_id.max(adopted_id + 1);
            adopted_id
        } else {
            let id = self.next_id;
            self.next_id += 1;
            self.kernel.set_user_id(ev.tid, ev.request_id, id);
            id
        };
        if kind.has_destination() {
            // The answer that gave the program this address was copied to the DNS capture
            // before the program could read it: read it before the connect is described and
            // decided, so that its name is known.
            self.names.drain();
        }
        let (view, binding) = self.describe(id, ev, kind, note);
        if self.requests.len() >= self.config.max_held_requests {
            self.over_bound += 1;
            tracing::error!(
                pending = self.requests.len(),
                max_held_requests = self.config.max_held_requests,
                "too many held requests; refusing a new one"
            );
            let held = self.held(view, kind, ev, binding);
            let by = format!(
                "daemon (max_held_requests: {} requests were held already)",
                self.config.max_held_requests
            );
            self.apply(held, Decision::Deny, &by);
            return;
        }
        tracing::info!(id, pid = ev.tgid, label = %view.label, kind = %view.kind,
            binary = view.binary.as_deref().unwrap_or(""), destination = view.destination.as_deref().unwrap_or(""),
            names = ?view.destination_names, "held");
        let held = self.held(view, kind, ev, binding);
        // The policy decides what it can; a human the rest, within the rule's deadline.
        let Some(held) = self.route(held) else {
            return;
        };
        if self.held_after(kind, ev.tid, ev.request_id)
            && let Err(why) = self.tracer.hold(ev.tgid)
        {
            // Without the ptrace stop a SIGCONT could let it run: fail closed.
            tracing::error!(
                pid = ev.tgid,
                why,
                %kind,
                "cannot hold what was made; killing it"
            );
            self.apply(
                held,
                Decision::Kill,
                &format!("daemon (cannot hold: {why})"),
            );
            return;
        }
        // A human will be asked: the request is recorded first. Without a working spool
        // nobody is asked, and the request is denied (which is recorded too, or it stays held).
        let request = Body::Request(RequestRecord {
            action_hash: crate::sign::statement::action_hash(&self.host_id, &held.view),
            on_behalf_of: self.on_behalf_of(&held.view.label),
            request: held.view.clone(),
        });
        if let Err(why) = self.try_append(request) {
            tracing::error!(id, why, "refusing the request: it cannot be recorded");
            self.apply(held, Decision::Deny, "daemon (records cannot be written)");
            return;
        }
        self.requests.insert(id, held);
    }

    fn held(
        &self,
        view: RequestView,
        kind: ActionKind,
        ev: &shared::Event,
        binding: Option<ExecBinding>,
    ) -> Held {
        let now = Instant::now();
        Held {
            view,
            kind,
            tid: ev.tid,
            tgid: ev.tgid,
            kernel_id: ev.request_id,
            created: now,
            deadline: now + Duration::from_secs(self.config.request_timeout_secs),
            binding,
            on_timeout: self.timeout_decision(),
            event: *ev,
            action_hash: None,
            grant_offers: Vec::new(),
        }
    }

    /// The request's context, and for execs what an approval binds to.
    fn describe(
        &self,
        id: u64,
        ev: &shared::Event,
        kind: ActionKind,
        note: Option<String>,
    ) -> (RequestView, Option<ExecBinding>) {
        let pid = ev.tgid;
        let mut view = RequestView {
            id,
            kind,
            label: self.label_name(ev.label),
            pid,
            tid: ev.tid,
            uid: ev.uid,
            user: enrich::user_name(ev.uid),
            binary: None,
            argv: Vec::new(),
            argv_truncated: false,
            cwd: enrich::readlink(pid, "cwd"),
            parents: enrich::parents(pid),
            destination: None,
            protocol: None,
            socket: None,
            destination_names: Vec::new(),
            age_ms: 0,
            expires_in_ms: self.config.request_timeout_secs * 1000,
            note,
            rule: None,
        };
        let mut binding = None;
        match kind {
            ActionKind::Exec => {
                binding = match self.notified_exec(ev.tid, ev.request_id) {
                    // Read once, while the call waited: what is shown is what the kernel
                    // will check the loaded image against.
                    Some(n) => {
                        view.argv = n.binding.argv.clone();
                        view.binary = Some(String::from_utf8_lossy(&n.filename).into_owned());
                        Some(n.binding.clone())
                    }
                    None => exec_from_memory(ev, &mut view),
                };
            }
            ActionKind::ExecLoaded => {
                view.binary = enrich::readlink(pid, "exe");
                if let Some((argv, cut)) = enrich::cmdline_of_held(pid) {
                    view.argv = argv;
                    view.argv_truncated = cut;
                }
            }
            ActionKind::Unix => {
                view.destination = Some(unix_text(ev));
                view.binary = enrich::readlink(pid, "exe");
                if let Some((argv, cut)) = enrich::cmdline_of_held(pid) {
                    view.argv = argv;
                    view.argv_truncated = cut;
                }
            }
            ActionKind::Socket => {
                view.socket = Some(enrich::socket(ev.family, ev.sock_type, ev.port));
                view.binary = enrich::readlink(pid, "exe");
                if let Some((argv, cut)) = enrich::cmdline_of_held(pid) {
                    view.argv = argv;
                    view.argv_truncated = cut;
                }
            }
            ActionKind::Listen => {
                // The address it listens on (all zeros: every address of the host).
                view.destination = Some(enrich::destination(ev.family, &ev.addr, ev.port));
                view.protocol = enrich::protocol(ev.sock_type);
                view.binary = enrich::readlink(pid, "exe");
                if let Some((argv, cut)) = enrich::cmdline_of_held(pid) {
                    view.argv = argv;
                    view.argv_truncated = cut;
                }
            }
            ActionKind::Connect | ActionKind::Send => {
                view.destination = Some(enrich::destination(ev.family, &ev.addr, ev.port));
                view.destination_names = self.names.lookup(event_addr(ev));
                view.protocol = enrich::protocol(ev.sock_type);
                view.binary = enrich::readlink(pid, "exe");
                if let Some((argv, cut)) = enrich::cmdline_of_held(pid) {
                    view.argv = argv;
                    view.argv_truncated = cut;
                }
            }
        }
        (view, binding)
    }

    /// Applies what the policy decides about `held` (allow, deny, kill): `None`. An
    /// escalation gets the rule's deadline and timeout outcome and comes back, as does a
    /// request the policy has nothing to say about.
    fn route(&mut self, mut held: Held) -> Option<Held> {
        if self.trusted_dns(&held) {
            self.apply(held, Decision::Approve, "dns: a trusted resolver");
            return None;
        }
        let Some((outcome, rule, escalation)) = self.policy_verdict(&held) else {
            // No policy for this label: a human decides (regression: such requests were dropped)
            // unless a grant covers it.
            let mut held = self.try_grant(held)?;
            self.escalate(&mut held, None);
            return Some(held);
        };
        held.view.rule = Some(rule.clone());
        let by = format!("policy: {rule}");
        let decision = match outcome {
            Outcome::Allow => Decision::Approve,
            Outcome::Deny => Decision::Deny,
            Outcome::Kill => Decision::Kill,
            Outcome::Escalate => {
                // The rule's timeout and outcome where it sets them; else the daemon's, set
                // when the request was made.
                if let Some(timeout) = escalation.as_ref().and_then(|e| e.timeout) {
                    held.deadline = held.created + timeout;
                    held.view.expires_in_ms = timeout.as_millis() as u64;
                }
                if let Some(outcome) = escalation.as_ref().and_then(|e| e.on_timeout) {
                    held.on_timeout = match outcome {
                        TimeoutOutcome::Allow => Decision::Approve,
                        TimeoutOutcome::Deny => Decision::Deny,
                        TimeoutOutcome::Kill => Decision::Kill,
                    };
                }
                // A grant answers what a human would have been asked.
                let mut held = self.try_grant(held)?;
                self.escalate(&mut held, escalation.as_ref());
                return Some(held);
            }
        };
        self.apply(held, decision, &by);
        None
    }

    /// The held request as grants see it.
    fn grant_subject(&self, held: &Held) -> grants::Subject {
        let pid = held.tgid;
        let binary = match held.kind {
            ActionKind::Exec => held.binding.as_ref().and_then(|b| b.exe),
            ActionKind::ExecLoaded => enrich::bounded(move || {
                enrich::file_id(std::path::Path::new(&format!("/proc/{pid}/exe")))
            })
            .flatten(),
            ActionKind::Connect
            | ActionKind::Send
            | ActionKind::Socket
            | ActionKind::Unix
            | ActionKind::Listen => None,
        };
        let destination = held.kind.has_destination().then(|| {
            let ev = &held.event;
            (event_addr(ev), ev.port, self.sock_type(ev))
        });
        let lineage = std::iter::once(pid)
            .chain(held.view.parents.iter().map(|p| p.pid))
            .filter_map(|p| enrich::start_time(p).map(|t| (p, t)))
            .collect();
        grants::Subject {
            binary,
            destination,
            lineage,
        }
    }

    /// Applies a grant that covers `held` (`None`), or gives it back.
    fn try_grant(&mut self, held: Held) -> Option<Held> {
        let subject = self.grant_subject(&held);
        let Some(g) = self
            .grants
            .find(&held.view.label, &subject, std::time::SystemTime::now())
        else {
            return Some(held);
        };
        let by = format!("grant {} ({})", g.id, g.by);
        self.apply(held, Decision::Approve, &by);
        None
    }

    /// Keeps the grant an approver's decision gave for `held`, and records it.
    fn issue_grant(&mut self, held: &Held, g: &crate::sign::statement::GrantStatement, by: &str) {
        use crate::sign::statement::GrantScope;
        // Only what this host's policy offered, for no longer than offered (a minute of clock
        // skew allowed), whatever the approver signed.
        let longest = held
            .grant_offers
            .iter()
            .filter(|o| o.scope == g.scope && o.fits(held.view.kind))
            .map(|o| o.for_secs)
            .max();
        let Some(longest) = longest else {
            tracing::error!(grant = g.id, scope = %g.scope, "the approver gave a grant the policy did not offer; only the approval applies");
            return;
        };
        let subject = self.grant_subject(held);
        let key = match g.scope {
            GrantScope::Binary => subject.binary.map(grants::Key::Binary),
            GrantScope::Destination => {
                subject
                    .destination
                    .map(|(addr, port, sock_type)| grants::Key::Destination {
                        addr,
                        port,
                        sock_type,
                    })
            }
            GrantScope::Tree => subject
                .lineage
                .first()
                .map(|&(pid, start)| grants::Key::Tree { pid, start }),
        };
        let expires = time::OffsetDateTime::parse(
            &g.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
        .map(std::time::SystemTime::from);
        let (Some(key), Some(expires)) = (key, expires) else {
            tracing::warn!(
                grant = g.id,
                "the grant does not fit the request; only the approval applies"
            );
            return;
        };
        let now = std::time::SystemTime::now();
        if expires <= now {
            return;
        }
        if expires > now + Duration::from_secs(longest + 60) {
            tracing::error!(
                grant = g.id,
                "the grant lasts longer than the policy offers; only the approval applies"
            );
            return;
        }
        let grant = grants::Grant {
            id: g.id.clone(),
            label: held.view.label.clone(),
            label_id: held.event.label,
            kernel: self.kernel_key(held, &key),
            key,
            expires,
            by: by.to_owned(),
            in_kernel: false,
        };
        if !self.grants.add(grant) {
            tracing::error!(grant = g.id, "too many grants; only the approval applies");
            return;
        }
        self.sync_grants();
        tracing::info!(grant = g.id, scope = %g.scope, label = held.view.label, expires = g.expires_at, by, "grant issued");
        self.append(Body::GrantIssued {
            grant_id: g.id.clone(),
            label: held.view.label.clone(),
            scope: g.scope.to_string(),
            expires_at: g.expires_at.clone(),
            by: by.to_owned(),
        });
    }

    /// Takes grant `id` back (from the approver or the local CLI), recording who did.
    fn revoke_grant(&mut self, id: &str, by: &str) -> bool {
        if self.grants.revoke(id).is_none() {
            return false;
        }
        self.sync_grants();
        tracing::info!(grant = id, by, "grant revoked");
        self.append(Body::GrantRevoked {
            grant_id: id.to_owned(),
            by: by.to_owned(),
        });
        true
    }

    /// Sends a held request to the remote approver (if one is configured), signed with the
    /// host key, and remembers the action hash its decision must carry.
    fn escalate(&mut self, held: &mut Held, rule: Option<&policy::schema::Escalation>) {
        let Some(remote) = &self.remote else {
            return;
        };
        let hash = crate::sign::statement::action_hash(&self.host_id, &held.view);
        let on_behalf_of = self.on_behalf_of(&held.view.label);
        let remaining = held.deadline.saturating_duration_since(Instant::now());
        let now = time::OffsetDateTime::now_utc();
        let rfc = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let mut view = held.view.clone();
        view.age_ms = held.created.elapsed().as_millis() as u64;
        view.expires_in_ms = remaining.as_millis() as u64;
        let esc = crate::sign::statement::Escalation {
            v: crate::sign::statement::STATEMENT_VERSION,
            host_id: self.host_id.clone(),
            host_name: self.host_name.clone(),
            request: view,
            action_hash: hash.clone(),
            on_behalf_of,
            approvers: rule.map(|r| r.approvers.clone()).unwrap_or_default(),
            quorum: rule.map_or(1, |r| r.quorum.max(1)),
            each_group: rule.is_some_and(|r| r.quorum_from == policy::schema::QuorumFrom::Each),
            justification: rule.is_some_and(|r| r.justification),
            deadline: rfc(now + remaining),
            on_timeout: held.on_timeout,
            sent_at: rfc(now),
            remind_secs: rule.and_then(|r| r.remind).map(|d| d.as_secs().max(1)),
            grants: rule
                .map(|r| {
                    r.grants
                        .iter()
                        .filter_map(|g| {
                            use crate::sign::statement::{GrantOffer, GrantScope};
                            let scope = match g.scope {
                                policy::schema::GrantScope::Once => return None,
                                policy::schema::GrantScope::Binary => GrantScope::Binary,
                                policy::schema::GrantScope::Destination => GrantScope::Destination,
                                policy::schema::GrantScope::Tree => GrantScope::Tree,
                            };
                            Some(GrantOffer {
                                scope,
                                for_secs: g.duration?.as_secs(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            ladder: rule
                .map(|r| {
                    r.ladder
                        .iter()
                        .map(|s| crate::sign::statement::LadderStep {
                            after_secs: s.after.as_secs(),
                            approvers: s.approvers.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        match crate::sign::dsse::Envelope::sign_json(
            crate::sign::statement::PAYLOAD_ESCALATION,
            &esc,
            &self.host_key,
        ) {
            Ok(env) => {
                remote.escalate(env, tokio::time::Instant::from_std(held.deadline));
                held.action_hash = Some(hash);
                held.grant_offers = esc.grants.clone();
            }
            // Unsendable: nobody remote can decide; the local CLI and the timeout still can.
            Err(e) => tracing::error!(id = held.view.id, error = %e, "cannot sign the escalation"),
        }
    }

    /// A decision from the remote approver (its signature already verified): applied only if
    /// it is for this host and for a request held now with the same action hash.
    fn remote_decision(&mut self, incoming: remote::Incoming) {
        let d = match incoming {
            remote::Incoming::Decision(d) => d,
            remote::Incoming::Revocation(r) => {
                if r.host_id == self.host_id {
                    self.revoke_grant(&r.grant_id, &format!("approver: {}", r.by));
                }
                return;
            }
        };
        let s = &d.statement;
        if s.host_id != self.host_id {
            tracing::error!(host = s.host_id, "a decision for another host; ignored");
            return;
        }
        let Some(held) = self.requests.get(&s.request) else {
            // Decided already (locally, by timeout) or replayed: nothing to do.
            tracing::debug!(id = s.request, "a decision for a request not held; ignored");
            return;
        };
        if held.action_hash.as_deref() != Some(s.action_hash.as_str()) {
            tracing::error!(
                id = s.request,
                "the approver's decision is bound to another action; ignored (the request stays held)"
            );
            return;
        }
        let who: Vec<String> = s
            .approvals
            .iter()
            .map(|a| format!("{} via {}", a.approver, a.channel))
            .collect();
        let by = format!("approver: {}", who.join(", "));
        let Some(held) = self.requests.remove(&s.request) else {
            return;
        };
        match self.kernel.task(held.tid) {
            Some(t) if t.request_id == held.kernel_id && t.state == shared::STATE_PENDING => {
                let decision = s.decision;
                if decision == Decision::Approve
                    && let Some(g) = s.grant.clone()
                {
                    self.issue_grant(&held, &g, &who.join(", "));
                }
                self.apply_signed(held, decision, &by, Some(d.envelope));
            }
            _ => self.log_or_warn("task-exited", "none", &by, &held.view),
        }
    }

    /// Reads the policy again. A policy with errors is reported and the one in force kept;
    /// a good one replaces it at once (fast path included), and every held request is
    /// evaluated against it.
    fn reload(&mut self, why: &str) {
        let _ = self.names.refresh_resolvers(true);
        match load_policy(&self.config) {
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(why, error = %message, "policy reload failed; the policy in force stays");
                self.reload_error = Some(message);
                // Reported once: the next change of the files tries again.
                self.policy_stamp = policy_stamp(&self.config, self.policy.as_ref());
            }
            Ok(policy) => {
                self.policy = policy;
                self.reload_error = None;
                self.record_policy();
                self.policy_stamp = policy_stamp(&self.config, self.policy.as_ref());
                if let Err(e) = self.install_fast_path() {
                    tracing::error!(error = %e, "installing the fast path failed; the daemon decides instead");
                }
                if let Err(e) = self.install_cgroup_matches() {
                    tracing::error!(error = %format!("{e:#}"), "installing the cgroup labels failed; the earlier ones stay");
                }
                self.install_guard();
                let ids: Vec<u64> = self.requests.keys().copied().collect();
                for id in ids {
                    if let Some(held) = self.requests.remove(&id)
                        && let Some(held) = self.route(held)
                    {
                        self.requests.insert(id, held);
                    }
                }
                tracing::info!(
                    why,
                    rules = self.policy.as_ref().map_or(0, Policy::rule_count),
                    "policy reloaded"
                );
            }
        }
    }

    /// Compiles the policy's connect and exec fast paths into the kernel (empty ones without
    /// policy).
    fn install_fast_path(&mut self) -> Result<usize, ebpf::KernelError> {
        let mut fast = Vec::new();
        if let Some(p) = &self.policy {
            for e in policy::compile::connect_fast_path(p) {
                let id = label_id(&mut self.labels, &e.label);
                self.kernel.set_label_name(id, &e.label)?;
                fast.push(ebpf::ConnectAllowEntry {
                    label: id,
                    net: e.net,
                    protocols: e.protocols,
                    ports: e.ports,
                });
            }
        }
        self.kernel.set_connect_allow(&fast)?;
        tracing::info!(entries = fast.len(), "connect fast path installed");
        let mut execs = Vec::new();
        if let Some(p) = &self.policy {
            for e in policy::compile::exec_fast_path(p) {
                let id = label_id(&mut self.labels, &e.label);
                self.kernel.set_label_name(id, &e.label)?;
                tracing::debug!(label = %e.label, binary = %e.path.display(), "exec allowed in the kernel");
                execs.push(ebpf::ExecAllowEntry {
                    label: id,
                    dev: ebpf::kernel_dev(e.file.dev),
                    ino: e.file.ino,
                });
            }
        }
        self.kernel.set_exec_allow(&execs)?;
        tracing::info!(entries = execs.len(), "exec fast path installed");
        let mut by_exe = Vec::new();
        if let Some(p) = &self.policy {
            let (entries, skipped) = policy::compile::executable_labels(p);
            for (label, path, why) in skipped {
                tracing::error!(label, executable = %path.display(), why, "executable not labelled");
            }
            for e in entries {
                let id = label_id(&mut self.labels, &e.label);
                self.kernel.set_label_name(id, &e.label)?;
                by_exe.push(ebpf::ExecLabelEntry {
                    label: id,
                    dev: ebpf::kernel_dev(e.file.dev),
                    ino: e.file.ino,
                });
            }
        }
        self.kernel.set_exec_labels(&by_exe)?;
        tracing::info!(entries = by_exe.len(), "executable labels installed");
        let mut sockets = Vec::new();
        if let Some(p) = &self.policy {
            for e in policy::compile::socket_fast_path(p) {
                let id = label_id(&mut self.labels, &e.label);
                self.kernel.set_label_name(id, &e.label)?;
                sockets.push(shared::SocketKey {
                    label: id,
                    family: e.family,
                    sock_type: e.sock_type,
                });
            }
        }
        self.kernel.set_socket_allow(&sockets)?;
        let mut unix = Vec::new();
        let mut hold_all = Vec::new();
        if let Some(p) = &self.policy {
            let (entries, holding) = policy::compile::unix_rules(p);
            for e in entries {
                let id = label_id(&mut self.labels, &e.label);
                self.kernel.set_label_name(id, &e.label)?;
                let key = shared::ExecKey {
                    label: id,
                    _pad: 0,
                    dev: e.dev,
                    ino: e.ino,
                };
                let value = if e.allow {
                    shared::UNIX_ALLOW
                } else {
                    shared::UNIX_HOLD
                };
                unix.push((key, value));
            }
            for l in holding {
                let id = label_id(&mut self.labels, &l);
                self.kernel.set_label_name(id, &l)?;
                hold_all.push(id);
            }
        }
        // The deputies, for every label (label 0): held unless a label's own rule names them.
        self.deputies = guard::deputies();
        for (dev, ino) in &self.deputies {
            unix.push((
                shared::ExecKey {
                    label: shared::LABEL_NONE,
                    _pad: 0,
                    dev: *dev,
                    ino: *ino,
                },
                shared::UNIX_HOLD,
            ));
        }
        self.kernel.set_unix_rules(&unix, &hold_all)?;
        self.unix_rules = unix.into_iter().collect();
        self.unix_hold_all = hold_all.into_iter().collect();
        // What processes' sends were decided under the earlier policy is asked again.
        self.kernel.forget_send_decisions()?;
        // The grants' entries depend on the policy too (a new deny rule removes them).
        self.sync_grants();
        Ok(fast.len() + execs.len())
    }

    /// What the policy says about a held request: outcome, the rule (described), and the
    /// escalation settings. `None` when there is no policy or it does not know the label.
    fn policy_verdict(
        &self,
        held: &Held,
    ) -> Option<(Outcome, String, Option<policy::schema::Escalation>)> {
        let policy = self.policy.as_ref()?;
        let action = self.action(held, &held.event)?;
        let v = policy.evaluate(&held.view.label, &action)?;
        if v.rule.is_none() && v.decision.outcome == Outcome::Allow && self.to_deputy(held) {
            // Not the label's default: a person decides whether the agent may ask a root
            // service to act for it (stop countersign, start a container, a unit).
            return Some((
                Outcome::Escalate,
                "built in: a local service that acts as root for whoever reaches it (no rule of the label names it)".to_owned(),
                None,
            ));
        }
        Some((
            v.decision.outcome,
            v.describe_rule(),
            v.decision.escalation(),
        ))
    }

    /// Whether a held `unix` request reaches one of the deputy sockets.
    fn to_deputy(&self, held: &Held) -> bool {
        if held.kind != ActionKind::Unix {
            return false;
        }
        let peer = shared::UnixPeer::from_addr(&held.event.addr);
        self.deputies.contains(&(peer.dev, peer.ino))
    }

    /// A query to one of the host's trusted resolvers (port 53) that no rule of the label
    /// names: programs must resolve names without a human, and the daemon learns the names
    /// from these answers. A rule that names it (to deny, say) still decides.
    fn trusted_dns(&self, held: &Held) -> bool {
        let ev = &held.event;
        if !held.kind.has_destination()
            || ev.port != 53
            || !self.names.resolvers().contains(&event_addr(ev))
        {
            return false;
        }
        let named = self.policy.as_ref().is_some_and(|p| {
            self.action(held, ev)
                .and_then(|a| p.evaluate(&held.view.label, &a).map(|v| v.rule.is_some()))
                .unwrap_or(false)
        });
        !named
    }

    /// The held request as a policy action.
    fn action(&self, held: &Held, ev: &shared::Event) -> Option<Action> {
        let v = &held.view;
        let pid = v.pid;
        match held.kind {
            ActionKind::Socket => Some(Action::Socket {
                family: ev.family,
                sock_type: ev.sock_type,
            }),
            ActionKind::Listen => Some(Action::Listen {
                addr: event_addr(ev),
                port: ev.port,
            }),
            ActionKind::Unix => {
                let peer = shared::UnixPeer::from_addr(&ev.addr);
                let name = unix_name(ev);
                Some(if peer.dev == shared::UNIX_ABSTRACT_DEV {
                    Action::Unix {
                        file: None,
                        abstract_name: name.strip_prefix('@').map(str::to_owned),
                        name,
                    }
                } else {
                    Action::Unix {
                        file: Some(FileId::from_kernel(peer.dev, peer.ino)),
                        abstract_name: None,
                        name,
                    }
                })
            }
            ActionKind::Connect | ActionKind::Send => {
                let addr = event_addr(ev);
                let protocol = match i32::from(self.sock_type(ev)) {
                    libc::SOCK_STREAM => Protocol::Tcp,
                    libc::SOCK_DGRAM => Protocol::Udp,
                    // Unknown: only protocol-independent rules can match.
                    _ => Protocol::Any,
                };
                Some(Action::Connect {
                    addr,
                    port: ev.port,
                    protocol,
                    hosts: held.view.destination_names.clone(),
                })
            }
            ActionKind::Exec | ActionKind::ExecLoaded => {
                let (kind, binary, argv) = (held.kind, v.binary.clone()?, v.argv.clone());
                // The files are the agent's choice, and so may be their file system: looked
                // at off the loop, within a bound; unanswered, they are files nobody can read
                // (no rule that names a file matches).
                let unread = Action::Exec {
                    binary: binary.clone().into(),
                    binary_file: None,
                    script: None,
                    script_file: None,
                    argv: argv.clone(),
                };
                Some(
                    enrich::bounded(move || exec_action(pid, kind, binary, argv)).unwrap_or(unread),
                )
            }
        }
    }

    /// The socket type of a held connect: from the event (LSM mode), else as the fallback's
    /// cgroup program recorded it in the task's state (it runs just after the event is sent).
    fn sock_type(&self, ev: &shared::Event) -> u16 {
        if ev.sock_type != 0 {
            return ev.sock_type;
        }
        for _ in 0..20 {
            if let Some(t) = self
                .kernel
                .task(ev.tid)
                .filter(|t| t.request_id == ev.request_id && t.sock_type != 0)
            {
                return t.sock_type;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        0
    }

    fn command(&mut self, request: crate::proto::Request, peer: Peer) -> Response {
        use crate::proto::Request as R;
        match (request, peer.socket) {
            (R::Status, _) => Response::Status(Box::new(self.status())),
            (R::Label { label }, _) => self.label(&label, peer),
            (R::ExecNotifier { fd }, _) => self.take_notifier(fd, peer),
            (R::List { filter }, Socket::Control) => {
                let (requests, more) = self.list(&filter);
                Response::List { requests, more }
            }
            (R::RotateKey, Socket::Control) => {
                if let Err(message) = self.may_decide(peer) {
                    return Response::Error { message };
                }
                self.rotate_key()
            }
            (R::Decide { id, decision }, Socket::Control) => {
                if let Err(message) = self.may_decide(peer) {
                    return Response::Error { message };
                }
                let by = format!("cli uid={} pid={}", peer.uid, peer.pid);
                match self.decide(id, decision, &by) {
                    Ok(outcome) => Response::Decided { id, outcome },
                    Err(message) => Response::Error { message },
                }
            }
            (R::Grants, Socket::Control) => Response::Grants {
                grants: self
                    .grants
                    .list()
                    .iter()
                    .map(|g| crate::proto::GrantView {
                        id: g.id.clone(),
                        label: g.label.clone(),
                        covers: match &g.key {
                            grants::Key::Binary(f) => format!("binary dev {} inode {}", f.dev, f.ino),
                            grants::Key::Destination { addr, port, .. } => {
                                format!("destination {}", std::net::SocketAddr::new(*addr, *port))
                            }
                            grants::Key::Tree { pid, .. } => format!("tree of pid {pid}"),
                        },
                        expires: time::OffsetDateTime::from(g.expires)
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default(),
                        by: g.by.clone(),
                        in_kernel: g.in_kernel,
                    })
                    .collect(),
            },
            (R::RevokeGrant { id }, Socket::Control) => {
                if let Err(message) = self.may_decide(peer) {
                    return Response::Error { message };
                }
                let by = format!("cli uid={} pid={}", peer.uid, peer.pid);
                if self.revoke_grant(&id, &by) {
                    Response::Revoked { id }
                } else {
                    Response::Error {
                        message: format!("no grant {id} in force (see `countersign grants list`)"),
                    }
                }
            }
            (_, Socket::Launch) => Response::Error {
                message: "this socket only labels and reports status; decisions need the root-only control socket".into(),
            },
        }
    }

    /// Refuses callers that are not root or that are (inside) a labelled process tree.
    fn may_decide(&self, peer: Peer) -> Result<(), String> {
        if peer.uid != 0 {
            return Err(format!(
                "only root may decide requests (caller uid {})",
                peer.uid
            ));
        }
        // Any thread of the caller: its main thread may have exited, or never been labelled
        // while another thread was.
        let threads = std::fs::read_dir(format!("/proc/{}/task", peer.pid))
            .map(|d| {
                d.flatten()
                    .take(MAX_CALLER_THREADS + 1)
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .collect::<Vec<u32>>()
            })
            .unwrap_or_default();
        if threads.len() > MAX_CALLER_THREADS {
            return Err(format!(
                "refused: the caller (pid {}) has more than {MAX_CALLER_THREADS} threads to check for a label",
                peer.pid
            ));
        }
        for tid in std::iter::once(peer.pid).chain(threads) {
            if let Some(t) = self.kernel.task(tid) {
                return Err(format!(
                    "refused: the caller (pid {}) is a labelled process (label {}); an agent cannot approve its own requests",
                    peer.pid,
                    self.label_name(t.label)
                ));
            }
        }
        if let Some((path, label)) = self.cgroup_label_of_caller(peer.pid) {
            return Err(format!(
                "refused: the caller (pid {}) runs in cgroup {path}, labelled {}; an agent cannot approve its own requests",
                peer.pid,
                self.label_name(label)
            ));
        }
        if let Some(path) = enrich::cgroup_path(peer.pid) {
            for (cg, label) in &self.cgroup_labels {
                if path == *cg || path.starts_with(&format!("{}/", cg.trim_end_matches('/'))) {
                    return Err(format!(
                        "refused: the caller (pid {}) runs in cgroup {path}, labelled {}; an agent cannot approve its own requests",
                        peer.pid,
                        self.label_name(*label)
                    ));
                }
            }
        }
        Ok(())
    }

    fn label(&mut self, label: &str, peer: Peer) -> Response {
        if let Err(message) = validate_label(label) {
            return Response::Error { message };
        }
        if !self.labels.iter().any(|l| l == label)
            && self.labels.len() >= shared::MAX_LABELS as usize
        {
            return Response::Error {
                message: format!("too many labels (at most {})", shared::MAX_LABELS),
            };
        }
        let id = label_id(&mut self.labels, label);
        if let Err(e) = self.kernel.set_label_name(id, label) {
            return Response::Error {
                message: format!("recording label {label}: {e}"),
            };
        }
        if let Some(existing) = self.kernel.task(peer.pid) {
            if existing.label != id {
                return Response::Error {
                    message: format!(
                        "pid {} already carries label {}; a label cannot be changed",
                        peer.pid,
                        self.label_name(existing.label)
                    ),
                };
            }
            return Response::Labelled {
                label: label.to_owned(),
                pid: peer.pid,
                notify_execs: self.notifier.is_some(),
            };
        }
        match self.kernel.label_task(peer.pid, id) {
            Ok(()) => {
                tracing::info!(pid = peer.pid, label, "labelled");
                Response::Labelled {
                    label: label.to_owned(),
                    pid: peer.pid,
                    notify_execs: self.notifier.is_some(),
                }
            }
            Err(e) => Response::Error {
                message: format!("labelling pid {}: {e}", peer.pid),
            },
        }
    }

    /// The held requests `filter` selects, one page of them, and whether more were selected.
    fn list(&self, filter: &crate::proto::ListFilter) -> (Vec<RequestView>, bool) {
        let now = Instant::now();
        let limit = filter
            .limit
            .unwrap_or(crate::proto::MAX_LIST_PAGE)
            .clamp(1, crate::proto::MAX_LIST_PAGE) as usize;
        let from = filter.after.map_or(0, |a| a.saturating_add(1));
        let mut selected = self
            .requests
            .range(from..)
            .map(|(_, h)| h)
            .filter(|h| filter.selects(&h.view));
        let page: Vec<RequestView> = selected
            .by_ref()
            .take(limit)
            .map(|h| {
                let mut v = h.view.clone();
                v.age_ms = now.duration_since(h.created).as_millis() as u64;
                v.expires_in_ms = h.deadline.saturating_duration_since(now).as_millis() as u64;
                v
            })
            .collect();
        let more = selected.next().is_some();
        (page, more)
    }

    /// Whether a labelled root is contained, and what was refused.
    fn self_protection(&self) -> crate::proto::SelfProtection {
        let (contained, reason) = match self.kernel.self_protection() {
            Ok(()) => (true, None),
            Err(_) if self.kernel.mode() == ebpf::Mode::Fallback => (
                false,
                Some(if self.notifier.is_some() {
                    FALLBACK_GUARD_NOTIFIER.to_owned()
                } else {
                    FALLBACK_GUARD_NONE.to_owned()
                }),
            ),
            Err(why) => (false, Some(format!("self-protection hooks missing: {why}"))),
        };
        let (contained, reason) = match (&self.memory, contained) {
            (Err(why), true) => (
                false,
                Some(format!(
                    "the daemon's memory is not locked ({why}): the host key could be written to swap, which root may read"
                )),
            ),
            _ => (contained, reason),
        };
        crate::proto::SelfProtection {
            contained,
            reason,
            on_tamper: match self.config.on_tamper {
                config::OnTamper::Deny => "deny".into(),
                config::OnTamper::Kill => "kill".into(),
            },
            protected_files: self.guarded.len(),
            run_later_guarded: self.guarded.run_later_len(),
            memory_locked: self.memory.is_ok(),
            refused: self
                .tampers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }

    fn status(&self) -> StatusInfo {
        let stats = self.kernel.stats();
        StatusInfo {
            mode: self.kernel.mode().to_string(),
            reason: self.kernel.reason().to_owned(),
            hooks: self.kernel.hook_attach().map(|h| h.as_str().to_owned()),
            daemon_pid: std::process::id(),
            host_id: self.host_id.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            pending: self.requests.len(),
            adopted: self.adopted,
            labels: self.labels.clone(),
            cgroup_labels: self.kernel.cgroup_label_count(),
            request_timeout_secs: self.config.request_timeout_secs,
            timeout_action: self.config.timeout_action.to_string(),
            policy_files: self.policy.as_ref().map_or(0, |p| p.files.len()),
            policy_rules: self.policy.as_ref().map_or(0, Policy::rule_count),
            policy_reload_error: self.reload_error.clone(),
            records_error: self.spool_error.clone(),
            records_written: self.spool.next_seq() - 1,
            records_receipted: records::spool::read_cursor(self.spool.dir())
                .ok()
                .flatten()
                .filter(|c| c.chain_id == self.spool.chain_id())
                .map(|c| c.seq),
            spool_bytes: records::spool::size(self.spool.dir()),
            spool_alarm_bytes: self.config.spool_alarm_bytes,
            holds: stats[shared::STAT_HOLDS as usize]
                + self.notifier.as_ref().map_or(0, |n| n.holds),
            fast_allowed: stats[shared::STAT_FAST_ALLOWED as usize],
            fast_allowed_execs: stats[shared::STAT_FAST_EXEC as usize],
            grant_allowed: stats[shared::STAT_GRANT_ALLOWED as usize],
            send_decided: stats[shared::STAT_SEND_DECIDED as usize],
            unholdable_refused: stats[shared::STAT_UNHOLDABLE as usize],
            events_deferred: stats[shared::STAT_DEFERRED as usize],
            max_held_requests: self.config.max_held_requests,
            refused_over_bound: self.over_bound,
            events_dropped: stats[shared::STAT_EVENTS_DROPPED as usize],
            label_inherit_failed: stats[shared::STAT_LABEL_INHERIT_FAILED as usize],
            exec_hold: self.exec_hold.clone(),
            local_sockets: self.kernel.local_sockets().map(str::to_owned),
            other_listens: self.kernel.other_listens(),
            local_socket_programs: self.kernel.local_socket_programs(),
            loaded_exec_watched: self.kernel.loaded_exec_watched(),
            exec_notifiers: self.notifier.as_ref().map_or(0, notified::Notifier::live),
            self_protection: Some(self.self_protection()),
            dns: self.config.dns.enabled.then(|| crate::proto::DnsStatus {
                error: self.names.error.clone(),
                resolvers: self
                    .names
                    .resolvers()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                addresses: self.names.addresses(),
                answers: self.names.counters.answers,
                untrusted: self.names.counters.untrusted,
                unsolicited: self.names.counters.unsolicited,
                dropped: self.names.counters.dropped,
                capture: self.names.capture_programs().map(str::to_owned),
            }),
            approver: self.remote.as_ref().map(|r| {
                let h = r.health.lock().map(|h| h.clone()).unwrap_or_default();
                crate::proto::ApproverStatus {
                    url: r.url.clone(),
                    enrolled: h.enrolled,
                    last_error: h.last_error,
                    sent: h.sent,
                    received: h.received,
                }
            }),
        }
    }

    /// Decides request `id`; the outcome text, or why nothing was done.
    fn decide(&mut self, id: u64, decision: Decision, by: &str) -> Result<String, String> {
        let Some(held) = self.requests.remove(&id) else {
            return Err(format!(
                "no held request #{id} (see `countersign requests list`)"
            ));
        };
        match self.kernel.task(held.tid) {
            Some(t) if t.request_id == held.kernel_id && t.state == shared::STATE_PENDING => {}
            _ => {
                self.log_or_warn("task-exited", "none", by, &held.view);
                return Err(format!(
                    "request #{id} is no longer pending: its task exited"
                ));
            }
        }
        Ok(self.apply(held, decision, by))
    }

    /// Records, then applies, a decision. A decision that cannot be recorded is not applied:
    /// the request stays held (and its timeout still applies).
    fn apply(&mut self, held: Held, decision: Decision, by: &str) -> String {
        self.apply_signed(held, decision, by, None)
    }

    /// [`Daemon::apply`] of a decision the remote approver signed (embedded in the record).
    fn apply_signed(
        &mut self,
        held: Held,
        decision: Decision,
        by: &str,
        approver_decision: Option<crate::sign::dsse::Envelope>,
    ) -> String {
        // (kernel state to write, signal, what the caller sees)
        let after = self.held_after(held.kind, held.tid, held.kernel_id);
        let (state, signal, applied) = match decision {
            // Nothing restarts: the task is let go or killed.
            Decision::Approve if after => (Some(shared::STATE_IDLE), Signal::SIGCONT, "released"),
            Decision::Deny if after => (None, Signal::SIGKILL, "sigkill"),
            Decision::Kill => (None, Signal::SIGKILL, "sigkill"),
            // Held before it happened: the restarted syscall consumes the decision.
            Decision::Approve => (Some(shared::STATE_ALLOWED), Signal::SIGCONT, "released"),
            Decision::Deny => (Some(shared::STATE_DENIED), Signal::SIGCONT, "eperm"),
        };
        let word = match decision {
            Decision::Approve => "approved",
            Decision::Deny => "denied",
            Decision::Kill => "killed",
        };
        let word = if by == "timeout" {
            format!("expired-{word}")
        } else if by.starts_with("policy") || by.starts_with("grant") {
            match decision {
                Decision::Approve => "auto-allowed",
                Decision::Deny => "auto-denied",
                Decision::Kill => "auto-killed",
            }
            .to_owned()
        } else {
            word.to_owned()
        };
        let mut view = held.view.clone();
        view.age_ms = held.created.elapsed().as_millis() as u64;
        view.expires_in_ms = held
            .deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        if let Err(e) = self.record(&word, applied, by, &view, approver_decision) {
            tracing::error!(error = %e, id = held.view.id, "cannot record the decision; the request stays held");
            let id = held.view.id;
            self.requests.insert(id, held);
            return format!("not applied: {e}");
        }
        let decided = Decided {
            held,
            decision,
            state,
            signal,
            applied,
            word,
            by: by.to_owned(),
            view,
        };
        match self.batch.as_mut() {
            // Applied once the batch's records are durable (`end_batch`).
            Some(batch) => {
                let said = format!("{} ({})", decided.word, decided.applied);
                batch.push(decided);
                said
            }
            None => self.release(decided),
        }
    }

    /// Starts a batch: the records of the decisions made until [`Daemon::end_batch`] are
    /// made durable with one flush, and only then are the decisions applied (group commit).
    fn begin_batch(&mut self) {
        self.batch = Some(Vec::new());
        self.spool.group_commit(true);
        self.log.group_commit(true);
    }

    /// Ends a batch: one flush of the spool and of the decision log, then the batch's
    /// decisions are applied. If the records cannot be made durable, nothing is applied and
    /// the requests stay held (as when a single record cannot be written).
    fn end_batch(&mut self) {
        let Some(batch) = self.batch.take() else {
            return;
        };
        self.spool.group_commit(false);
        self.log.group_commit(false);
        let durable = self
            .spool
            .commit()
            .map_err(|e| e.to_string())
            .and_then(|()| self.log.commit().map_err(|e| e.to_string()));
        if let Err(e) = durable {
            tracing::error!(error = %e, decisions = batch.len(), "cannot make the records of a batch of decisions durable; none is applied, the requests stay held");
            self.spool_error = Some(format!("cannot make records durable: {e}"));
            for d in batch {
                self.requests.insert(d.held.view.id, d.held);
            }
            return;
        }
        for d in batch {
            self.release(d);
        }
    }

    /// Applies a recorded decision: the kernel's state, the signal, the notifier's answer.
    fn release(&mut self, d: Decided) -> String {
        let Decided {
            held,
            decision,
            state,
            signal,
            applied,
            word,
            by,
            view,
        } = d;
        let by = by.as_str();
        let notified = match held.kind {
            ActionKind::Exec => self.notified_exec(held.tid, held.kernel_id).is_some(),
            ActionKind::Unix | ActionKind::Listen => {
                self.notified_connect(held.tid, held.kernel_id).is_some()
            }
            _ => false,
        };
        if notified {
            // Held before it started, by the seccomp notifier: the answer is the system
            // call's (and the kernel checks what it then loads or connects to).
            let (approve, kill_it) = (decision == Decision::Approve, decision == Decision::Kill);
            let (call, applied_to) = if held.kind == ActionKind::Exec {
                if approve {
                    self.verifying
                        .insert(held.kernel_id, (held.tid, view.clone()));
                }
                let r = self.apply_notified(held.tid, held.tgid, held.kernel_id, approve, kill_it);
                ("exec", r)
            } else {
                let r = self.apply_notified_connect(
                    held.tid,
                    held.tgid,
                    held.kernel_id,
                    approve,
                    kill_it,
                );
                (
                    if held.kind == ActionKind::Listen {
                        "listen"
                    } else {
                        "connect"
                    },
                    r,
                )
            };
            if let Err(why) = applied_to {
                tracing::warn!(
                    id = held.view.id,
                    pid = held.tgid,
                    why,
                    call,
                    "the decision could not be applied; the call was refused"
                );
                self.log_or_warn("apply-failed", "eperm", "daemon", &view);
                return format!("not applied: {why}; the {call} was refused");
            }
            tracing::info!(id = held.view.id, pid = held.tgid, decision = %word, applied, by, "decided");
            return format!("{word} ({applied})");
        }
        if decision == Decision::Approve
            && held.kind == ActionKind::Exec
            && let Err(why) = held
                .binding
                .as_ref()
                .ok_or_else(|| "nothing binds it".to_owned())
                .and_then(|b| self.arm(held.tid, held.kernel_id, b))
        {
            // Never released unchecked: refused instead.
            tracing::error!(
                id = held.view.id,
                pid = held.tgid,
                why,
                "an approved exec cannot be bound to what it loads; refusing it"
            );
            let _ = self
                .kernel
                .decide(held.tid, held.kernel_id, shared::STATE_DENIED);
            let _ = kill(Pid::from_raw(held.tgid as i32), Signal::SIGCONT);
            self.log_or_warn("apply-failed", "eperm", "daemon", &view);
            return format!("not applied: {why}; the exec was refused");
        }
        if decision == Decision::Approve && held.kind == ActionKind::Exec {
            self.verifying
                .insert(held.kernel_id, (held.tid, view.clone()));
        }
        if let Some(state) = state {
            match self.kernel.decide(held.tid, held.kernel_id, state) {
                Ok(true) => {}
                Ok(false) => {
                    // The record said what was about to be done; this one what happened.
                    self.log_or_warn("task-exited", "none", "kernel", &view);
                    return "the task exited before the decision was applied".into();
                }
                Err(e) => {
                    // Never release on an error path.
                    tracing::error!(error = %e, pid = held.tgid, "writing the decision failed; killing the task");
                    let _ = kill(Pid::from_raw(held.tgid as i32), Signal::SIGKILL);
                    self.log_or_warn("apply-failed", "sigkill", "daemon", &view);
                    return format!("killed: writing the decision failed ({e})");
                }
            }
        }
        let _ = kill(Pid::from_raw(held.tgid as i32), signal);
        if signal == Signal::SIGCONT && self.tracer.is_traced(held.tgid) {
            self.tracer.release(held.tgid);
        }
        tracing::info!(id = held.view.id, pid = held.tgid, decision = %word, applied, by, "decided");
        format!("{word} ({applied})")
    }

    /// Whether a held action was held after it was made (fallback mode): an exec that
    /// loaded, a listen that listens — nothing restarts, so it is let go or killed, and it
    /// waits in a ptrace stop. A listen the notifier holds waits in the kernel instead.
    fn held_after(&self, kind: ActionKind, tid: u32, kernel_id: u64) -> bool {
        kind == ActionKind::ExecLoaded
            || (kind == ActionKind::Listen
                && self.kernel.mode() == ebpf::Mode::Fallback
                && self.notified_connect(tid, kernel_id).is_none())
    }

    fn timeout_decision(&self) -> Decision {
        match self.config.timeout_action {
            TimeoutAction::Deny => Decision::Deny,
            TimeoutAction::Kill => Decision::Kill,
            TimeoutAction::Allow => Decision::Approve,
        }
    }

    /// How long until the next tick: [`TICK`] while anything waits on it, otherwise
    /// [`IDLE_TICK`] or until the next grant expires, whichever comes first.
    fn next_tick(&self) -> Duration {
        let busy = !self.requests.is_empty()
            || self.tracer.is_tracing()
            || self.cgroups.needs_tick()
            || self.names.backlog();
        if busy {
            return TICK;
        }
        match self.grants.next_expiry() {
            Some(at) => at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
                .clamp(TICK, IDLE_TICK),
            None => IDLE_TICK,
        }
    }

    fn tick(&mut self) {
        self.tracer.reap();
        // Held after the last drain looked (the ring filled between the two).
        self.pick_up_unreported();
        // Answers left by a drain that stopped at its bound.
        self.names.drain();
        self.cgroup_tick();
        let expired = self.grants.expire(std::time::SystemTime::now());
        for g in &expired {
            tracing::info!(grant = g.id, label = g.label, "grant expired");
        }
        if !expired.is_empty() {
            self.sync_grants();
        }
        if self.last_heartbeat.elapsed() >= Duration::from_secs(self.config.heartbeat_secs) {
            self.last_heartbeat = Instant::now();
            let spooled = records::spool::size(self.spool.dir());
            if spooled > self.config.spool_alarm_bytes {
                tracing::warn!(
                    spooled,
                    alarm = self.config.spool_alarm_bytes,
                    "the record spool is above spool_alarm_bytes (is the collector receipting?); nothing is dropped"
                );
            }
            self.append(Body::Heartbeat {
                pending: self.requests.len() as u64,
                interval_secs: self.config.heartbeat_secs,
            });
        }
        if self.last_policy_check.elapsed() >= POLICY_CHECK_EVERY {
            self.last_policy_check = Instant::now();
            self.names.purge();
            if self.names.refresh_resolvers(false) {
                // A replaced resolv.conf is a new file: guard it again.
                self.install_guard();
            }
            if guard::away_from_home() {
                // The kernel's report of the move is how this is noticed at once; this is
                // for a report that was lost (a full ring) or a move by anyone else.
                return_home("the daemon found itself in another cgroup");
            }
            if self.guarded.raw_majors_changed() {
                // A disk driver registered since: its character devices are refused too.
                tracing::info!("a disk driver registered a character device major: guarded");
                self.install_guard();
            }
            if self.guarded.run_later_appeared() {
                // A `run_later` place that did not exist was made (by someone unlabelled,
                // or, where its directory was missing too, by anyone): guarded as what it
                // now is.
                tracing::info!("a run_later place appeared: guarded");
                self.install_guard();
            }
            if policy_stamp(&self.config, self.policy.as_ref()) != self.policy_stamp {
                self.reload("policy files changed");
            }
        }
        let now = Instant::now();
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            let Some(held) = self.requests.get(&id) else {
                continue;
            };
            let alive = enrich::exists(held.tid)
                && self.kernel.task(held.tid).is_some_and(|t| {
                    t.request_id == held.kernel_id && t.state == shared::STATE_PENDING
                });
            let expired = now >= held.deadline;
            if !alive {
                if let Some(h) = self.requests.remove(&id) {
                    self.log_or_warn("task-exited", "none", "daemon", &h.view);
                }
            } else if expired && let Some(h) = self.requests.remove(&id) {
                let d = h.on_timeout;
                self.apply(h, d, "timeout");
            }
        }
        // Approvals whose exec never loaded (the exec failed) go with their task.
        self.kernel.forget_approvals(|tid| !enrich::exists(tid));
        self.verifying.retain(|_, (tid, _)| enrich::exists(*tid));
        self.notified_tick();
    }

    fn log_or_warn(&mut self, decision: &str, applied: &str, by: &str, view: &RequestView) {
        if let Err(e) = self.record(decision, applied, by, view, None) {
            tracing::error!(error = %e, "cannot record");
        }
    }

    /// Records a decision or outcome: the signed record into the spool, then the decision
    /// log, each synced to disk. Every decision goes through here before it is applied; an
    /// error means it must not be applied. `approver_decision`: the approver's signed
    /// decision, when it came from the approver.
    fn record(
        &mut self,
        decision: &str,
        applied: &str,
        by: &str,
        view: &RequestView,
        approver_decision: Option<crate::sign::dsse::Envelope>,
    ) -> Result<(), String> {
        let d = DecisionRecord {
            decision: decision.to_owned(),
            applied: applied.to_owned(),
            by: by.to_owned(),
            request: view.clone(),
            action_hash: crate::sign::statement::action_hash(&self.host_id, view),
            on_behalf_of: self.on_behalf_of(&view.label),
            approver_decision,
        };
        let body = match decision {
            "exec-verified" | "task-exited" | "superseded" | "apply-failed" => Body::Outcome(d),
            _ => Body::Decision(d),
        };
        self.try_append(body)?;
        self.log
            .write(decision, applied, by, view)
            .map_err(|e| e.to_string())
    }

    /// Appends a record; remembers a failure (new requests are refused until a record can
    /// be written again).
    fn try_append(&mut self, body: Body) -> Result<u64, String> {
        let kind = body.kind();
        match self.spool.append(body) {
            Ok(seq) => {
                if self.spool_error.take().is_some() {
                    tracing::info!(seq, "records can be written again");
                }
                tracing::debug!(seq, kind, "recorded");
                Ok(seq)
            }
            Err(e) => {
                let message = format!("cannot write the {kind} record: {e}");
                tracing::error!(error = %message, "record spool failed; new requests are refused until it works");
                self.spool_error = Some(message.clone());
                Err(message)
            }
        }
    }

    /// Appends a record that nothing waits on (start, stop, policy, heartbeat).
    fn append(&mut self, body: Body) {
        let _ = self.try_append(body);
    }

    /// A `policy-loaded` record for the policy in force (none without a policy).
    fn record_policy(&mut self) {
        if let Some(p) = &self.policy {
            let body = Body::policy_loaded(&p.files);
            self.append(body);
        }
    }

    /// Hands the records chain to a new host key (see `records::rotate`).
    fn rotate_key(&mut self) -> Response {
        let old = self.host_id.clone();
        match records::rotate::rotate(&mut self.spool, &self.config.host_key) {
            Ok((key, seq)) => {
                self.host_id = crate::sign::key_id(&key.verifying_key()).0;
                self.host_key = key;
                tracing::info!(old, new = self.host_id, seq, "host key rotated");
                Response::KeyRotated {
                    old,
                    new: self.host_id.clone(),
                    seq,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "host key rotation failed; the old key stays");
                Response::Error {
                    message: format!("rotation failed, the old key stays: {e}"),
                }
            }
        }
    }

    /// Who the agent behind `label` works for, per the policy.
    fn on_behalf_of(&self, label: &str) -> Option<String> {
        self.policy
            .as_ref()
            .and_then(|p| p.label(label))
            .and_then(|l| l.on_behalf_of.clone())
    }

    /// Denies everything held, waits briefly for the denials to be consumed, kills what is
    /// still held, then leaves the hooks and their state pinned for the next daemon
    /// (`on_stop: keep`) or turns them off (`off`).
    fn shutdown(&mut self, ring: &mut RingBuf<MapData>, reason: &str) {
        let held: Vec<Held> = std::mem::take(&mut self.requests).into_values().collect();
        let mut waiting = Vec::new();
        for h in held {
            let (tid, tgid, kernel_id) = (h.tid, h.tgid, h.kernel_id);
            self.apply(h, Decision::Deny, "daemon shutdown");
            waiting.push((tid, tgid, kernel_id));
        }
        // Requests still waiting for their cgroup's classification: let go if it carries no
        // label, else killed (nothing decides them once the hooks are off).
        for w in std::mem::take(&mut self.cgroups.waiting) {
            self.let_go_or_kill(&w.event, w.kind);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while Instant::now() < deadline {
            waiting.retain(|&(tid, _, id)| {
                self.kernel
                    .task(tid)
                    .is_some_and(|t| t.request_id == id && t.state == shared::STATE_DENIED)
            });
            // Requests raised meanwhile (reported, or left in the task map by a full ring)
            // are ended at once too.
            let mut raised = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(ev) = ebpf::parse_event(&item)
                    && let Some(kind) = ActionKind::from_kernel(ev.kind)
                {
                    raised.push((ev, kind));
                }
            }
            raised.extend(self.unreported());
            for (ev, kind) in raised {
                if ev.label == shared::LABEL_UNCLASSIFIED {
                    self.let_go_or_kill(&ev, kind);
                } else {
                    let _ = kill(Pid::from_raw(ev.tgid as i32), Signal::SIGKILL);
                }
            }
            if waiting.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (_, tgid, _) in waiting {
            let _ = kill(Pid::from_raw(tgid as i32), Signal::SIGKILL);
        }
        let reason = match self.config.on_stop {
            config::OnStop::Off => {
                self.kernel.teardown();
                format!("{reason}; enforcement off (on_stop: off)")
            }
            config::OnStop::Keep => {
                tracing::warn!(
                    pins = %self.config.bpf_pin_dir.display(),
                    "enforcement stays while no daemon runs (on_stop: keep): labelled processes stay labelled and their actions wait for the next daemon; `countersign off` turns it off"
                );
                format!("{reason}; enforcement kept (on_stop: keep)")
            }
        };
        self.append(Body::DaemonStop { reason });
        let _ = std::fs::remove_file(self.config.socket_dir.join(crate::paths::CONTROL_SOCKET));
        let _ = std::fs::remove_file(self.config.socket_dir.join(crate::paths::LAUNCH_SOCKET));
        eprintln!("countersign: stopped");
    }
}

/// An exec's context, read from the caller's memory as the hook left it (LSM mode: the
/// caller waits in a restartable stop), and what an approval binds to.
fn exec_from_memory(ev: &shared::Event, view: &mut RequestView) -> Option<ExecBinding> {
    // The task's memory may not answer (userfaultfd): read within a bound, and the task is
    // killed if it does not answer.
    let filename = if ev.exec_filename == 0 {
        None
    } else {
        enrich::held_cbytes(ev.tid, ev.exec_filename)
    };
    let argv = (ev.exec_argv != 0)
        .then(|| enrich::held_argv_bytes(ev.tid, ev.exec_argv, 8))
        .flatten();
    if let Some((argv, cut)) = &argv {
        view.argv = argv
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        view.argv_truncated = *cut;
    }
    let (filename, cut) = filename?;
    let name = String::from_utf8_lossy(&filename).into_owned();
    let path = enrich::resolve_in_task(ev.tgid, &name);
    // The file the kernel opened (LSM mode), else the name resolved from the task's root and
    // cwd.
    let opened = (
        u64::from_le_bytes(ev.addr[..8].try_into().unwrap_or_default()),
        u64::from_le_bytes(ev.addr[8..].try_into().unwrap_or_default()),
    );
    // The agent's files, on a file system that may not answer: read off the loop, within a
    // bound; unanswered, the exec cannot be bound to what it loads (and is refused if
    // approved).
    let tgid = ev.tgid;
    let (exe, script, interp) = enrich::bounded(move || {
        let exe = if opened.1 != 0 {
            Some(FileId::from_kernel(opened.0, opened.1))
        } else {
            enrich::file_id(&path)
        };
        let script = enrich::shebang_bytes(&path);
        let interp = script.as_ref().and_then(|(i, _)| {
            enrich::file_id(&enrich::resolve_in_task(tgid, &String::from_utf8_lossy(i)))
        });
        (exe, script, interp)
    })
    .unwrap_or((None, None, None));
    let (expect, unverifiable) = match (exe, &argv) {
        _ if cut => (None, Some("its filename is too long".to_owned())),
        (_, None) => (None, Some("its argv cannot be read".to_owned())),
        (_, Some((_, true))) => (None, Some("its argv is too long".to_owned())),
        (_, Some((argv, false))) if argv.is_empty() => (None, Some("an empty argv".to_owned())),
        (None, _) => (None, None),
        (Some(f), Some((argv, false))) => (
            notified::expected(f, script.as_ref(), interp, &filename, argv),
            None,
        ),
    };
    view.binary = Some(name.clone());
    Some(ExecBinding {
        filename: name,
        exe,
        argv: view.argv.clone(),
        expect,
        unverifiable,
    })
}

/// What the policy matches for an exec of `binary` with `argv` by process `pid` (a held
/// `exec`, or an image loaded before it was held): the files are read here, which may be slow
/// (see [`enrich::bounded`]).
fn exec_action(pid: u32, kind: ActionKind, binary: String, argv: Vec<String>) -> Action {
    let in_task = |p: &str| enrich::resolve_in_task(pid, p);
    let binary_file = if kind == ActionKind::Exec {
        enrich::file_id(&in_task(&binary))
    } else {
        enrich::file_id(std::path::Path::new(&format!("/proc/{pid}/exe")))
    };
    // A script run directly: its interpreter runs, the script is matched too.
    if kind == ActionKind::Exec
        && let Some((interp, _)) = enrich::shebang(&in_task(&binary))
    {
        return Action::Exec {
            binary_file: enrich::file_id(&in_task(&interp)),
            binary: interp.into(),
            script_file: binary_file,
            script: Some(binary.into()),
            argv,
        };
    }
    // An interpreter given a script: `python3 /opt/x.py`.
    let script = argv.get(1).filter(|a| !a.starts_with('-')).cloned();
    let script_file = script.as_deref().and_then(|s| {
        let p = in_task(s);
        if p.is_file() {
            enrich::file_id(&p)
        } else {
            None
        }
    });
    Action::Exec {
        binary: binary.into(),
        binary_file,
        script: script.filter(|_| script_file.is_some()).map(Into::into),
        script_file,
        argv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_ids_are_stable_and_start_at_one() {
        let mut labels = Vec::new();
        assert_eq!(label_id(&mut labels, "a"), 1);
        assert_eq!(label_id(&mut labels, "b"), 2);
        assert_eq!(label_id(&mut labels, "a"), 1);
    }
}
