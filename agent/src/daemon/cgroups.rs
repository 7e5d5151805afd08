//! Applies the policy's `match: cgroup` globs and `systemd_unit` names.
//!
//! While a policy has such matches, the kernel marks every new cgroup v2 directory
//! `LABEL_UNCLASSIFIED` (the `cgroup_mkdir` program, before the directory is visible), so a task
//! in it is held with that reserved label until the daemon has said what the cgroup is. Here:
//! - at start and every reload, the marking is switched on first, then the existing cgroups
//!   are walked (`policy::cgroups::existing`) and their labels installed with the exact
//!   `cgroup_labels` of daemon.yaml; the walk cache is emptied (twice: now and a tick later,
//!   so that a hook that walked the old labels meanwhile cannot leave its answer behind);
//! - on the kernel's new-cgroup event (and for every mark left, e.g. by a crashed daemon),
//!   the cgroup's path is found from its id (`open_by_handle_at` on the cgroup v2 mount) and
//!   classified with `policy::cgroups::label_for`: the label, or no entry (the task takes its
//!   ancestors' label, if any);
//! - a request held with the reserved label is resolved from the task's cgroup path
//!   (`/proc/TID/cgroup`, its ancestors' entries): labelled → the task's state gets the label
//!   and the request is routed like any other; not an agent → its state is removed (or set to
//!   the executable label the kernel skipped) and the task continued, with no record.
use std::{
    collections::HashMap,
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use countersign_ebpf as shared;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{ActionKind, Daemon, enrich, label_id};
use crate::{ebpf, policy};

/// How long a marked cgroup whose id names no directory is kept (a directory becomes visible
/// microseconds after it is marked; one that never does was removed).
const GONE_AFTER: Duration = Duration::from_secs(5);
/// How long a request held with the reserved label waits for its cgroup's classification
/// before it is treated as a request of label `(unclassified)` (a human or the timeout
/// decides: fail closed).
const WAIT_CLASSIFIED: Duration = Duration::from_secs(5);
/// Name shown for the reserved label.
pub const UNCLASSIFIED_NAME: &str = "(unclassified)";

/// `FILEID_KERNFS`: the file handle type of kernfs (cgroupfs) nodes, whose 8 bytes are the id.
const FILEID_KERNFS: i32 = 0xfe;

/// The cgroup v2 mount, opened.
pub struct CgroupFs {
    root: PathBuf,
    dir: File,
}

impl CgroupFs {
    pub fn open() -> anyhow::Result<Self> {
        let root = ebpf::cgroup2_root().ok_or_else(|| {
            anyhow::anyhow!(
                "the policy matches cgroups (match: cgroup / systemd_unit) but no cgroup v2 is mounted (/proc/mounts)"
            )
        })?;
        let dir = File::open(&root)
            .map_err(|e| anyhow::anyhow!("opening the cgroup v2 mount {}: {e}", root.display()))?;
        Ok(Self { root, dir })
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path (as in `/proc/PID/cgroup`) of cgroup `id`; `None` when no such cgroup is
    /// visible (removed, or not activated yet).
    pub fn path_of(&self, id: u64) -> std::io::Result<Option<String>> {
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: `handle` is a `struct file_handle` with its 8 bytes of `f_handle` inline,
        // alive for the call; the kernel reads `handle_bytes` bytes after the header.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.dir.as_raw_fd(),
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESTALE | libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: a new descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let full = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let Ok(rel) = full.strip_prefix(&self.root) else {
            return Ok(None);
        };
        let rel = rel.to_string_lossy();
        Ok(Some(if rel.is_empty() {
            "/".to_owned()
        } else {
            format!("/{rel}")
        }))
    }

    /// The id of the cgroup at `path` (as in `/proc/PID/cgroup`).
    fn id_of(&self, path: &str) -> Option<u64> {
        let dir = self.root.join(path.trim_start_matches('/'));
        std::fs::symlink_metadata(dir).ok().map(|m| m.ino())
    }
}

/// A request held with the reserved label, waiting for its cgroup's classification.
pub struct Waiting {
    pub event: shared::Event,
    pub kind: ActionKind,
    pub since: Instant,
}

/// The daemon's cgroup matching state.
#[derive(Default)]
pub struct CgroupMatching {
    pub fs: Option<CgroupFs>,
    /// The exact `cgroup_labels` of daemon.yaml: (id, label).
    pub fixed: Vec<(u64, u32)>,
    /// Marked cgroups whose directory was not visible yet: when first seen so.
    pub unseen: HashMap<u64, Instant>,
    pub waiting: Vec<Waiting>,
    /// The walk cache is emptied again on the next tick.
    pub flush_due: bool,
    /// New cgroups the kernel could not mark (the map was full): not held.
    pub mark_failed: u64,
}

impl CgroupMatching {
    /// Whether the tick has work here: a cache to empty, cgroups to classify, held tasks
    /// waiting for their cgroup's class.
    pub fn needs_tick(&self) -> bool {
        self.flush_due || !self.unseen.is_empty() || !self.waiting.is_empty()
    }
}

/// What the cgroups say about a task.
enum TaskLabel {
    Label(u32),
    None,
    Unclassified,
}

impl Daemon {
    fn uses_cgroup_match(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(policy::cgroups::uses_cgroup_match)
    }

    /// Start and reload: marking on (or off), the existing cgroups walked and installed with
    /// the fixed ones, the cache emptied, the marks left classified.
    pub(super) fn install_cgroup_matches(&mut self) -> anyhow::Result<()> {
        let uses = self.uses_cgroup_match();
        if uses && self.cgroups.fs.is_none() {
            self.cgroups.fs = Some(CgroupFs::open()?);
        }
        self.kernel.set_cgroup_match(uses)?;
        let mut entries = Vec::new();
        let mut found = 0usize;
        if let (true, Some(p), Some(fs)) = (uses, &self.policy, &self.cgroups.fs) {
            let matches = policy::cgroups::existing(p, fs.root())?;
            found = matches.len();
            for m in matches {
                let id = label_id(&mut self.labels, &m.label);
                self.kernel.set_label_name(id, &m.label)?;
                tracing::info!(cgroup = m.path, label = m.label, "cgroup labelled");
                entries.push((m.id, id));
            }
        }
        entries.extend(self.cgroups.fixed.iter().copied());
        self.kernel.install_cgroup_labels(&entries)?;
        self.cgroups.flush_due = true;
        self.classify_marked();
        tracing::info!(
            matching = uses,
            labelled = found,
            "cgroup labels by glob and systemd unit installed"
        );
        Ok(())
    }

    /// Classifies every marked cgroup.
    pub(super) fn classify_marked(&mut self) {
        for id in self.kernel.unclassified_cgroups() {
            self.classify(id);
        }
    }

    /// Classifies marked cgroup `id`. Returns false while it stays marked.
    fn classify(&mut self, id: u64) -> bool {
        if self.kernel.cgroup_label(id) != Some(shared::LABEL_UNCLASSIFIED) {
            return true;
        }
        let path = match &self.cgroups.fs {
            // Marks left by an earlier configuration that matched cgroups: nothing matches now.
            None => None,
            Some(fs) => match fs.path_of(id) {
                Ok(Some(path)) => Some(path),
                Ok(None) => {
                    let first = *self.cgroups.unseen.entry(id).or_insert_with(Instant::now);
                    if first.elapsed() < GONE_AFTER {
                        return false;
                    }
                    tracing::debug!(cgroup_id = id, "marked cgroup is gone");
                    None
                }
                Err(e) => {
                    // It stays marked: its tasks stay held (fail closed); retried each tick.
                    tracing::error!(cgroup_id = id, error = %e, "cannot find a new cgroup's path");
                    return false;
                }
            },
        };
        self.cgroups.unseen.remove(&id);
        let label = path
            .as_deref()
            .and_then(|p| {
                self.policy
                    .as_ref()
                    .and_then(|pol| policy::cgroups::label_for(pol, p))
            })
            .map(str::to_owned);
        let label_id = match &label {
            Some(name) => {
                let id = label_id(&mut self.labels, name);
                if let Err(e) = self.kernel.set_label_name(id, name) {
                    tracing::error!(error = %e, label = name, "cannot record a label name");
                }
                id
            }
            None => shared::LABEL_NONE,
        };
        match self.kernel.classify_cgroup(id, label_id) {
            Ok(()) => {
                tracing::info!(
                    cgroup = path.as_deref().unwrap_or("(gone)"),
                    cgroup_id = id,
                    label = label.as_deref().unwrap_or("(none)"),
                    "new cgroup classified"
                );
                true
            }
            Err(e) => {
                tracing::error!(cgroup_id = id, error = %e, "cannot classify a new cgroup");
                false
            }
        }
    }

    /// The kernel's new-cgroup event.
    pub(super) fn cgroup_created(&mut self, ev: &shared::Event) {
        if ev.detail != 0 {
            self.cgroups.mark_failed += 1;
            tracing::error!(
                cgroup_id = ev.cgroup_id,
                "a new cgroup could not be marked (the cgroup label map is full): its tasks are not held until a reload"
            );
            return;
        }
        self.classify(ev.cgroup_id);
        self.retry_waiting();
    }

    /// The label the cgroups give task `tid` now (its cgroup, then its ancestors).
    fn task_label(&self, tid: u32) -> Option<TaskLabel> {
        let path = enrich::cgroup_path(tid)?;
        let Some(fs) = &self.cgroups.fs else {
            return Some(TaskLabel::None);
        };
        let mut prefix = path.as_str();
        loop {
            if let Some(id) = fs.id_of(prefix) {
                match self.kernel.cgroup_label(id) {
                    Some(shared::LABEL_UNCLASSIFIED) => return Some(TaskLabel::Unclassified),
                    Some(l) if l != shared::LABEL_NONE => return Some(TaskLabel::Label(l)),
                    _ => {}
                }
            }
            match prefix.rfind('/') {
                Some(0) if prefix.len() > 1 => prefix = "/",
                Some(i) if i > 0 => prefix = &prefix[..i],
                _ => return Some(TaskLabel::None),
            }
        }
    }

    /// A request held with the reserved label: re-labelled and routed, let go, or kept
    /// waiting for the classification.
    pub(super) fn unclassified_held(&mut self, ev: &shared::Event, kind: ActionKind) {
        self.classify_marked();
        match self.task_label(ev.tid) {
            // The task is gone.
            None => {}
            Some(TaskLabel::Unclassified)
                if !self
                    .cgroups
                    .waiting
                    .iter()
                    .any(|w| w.event.tid == ev.tid && w.event.request_id == ev.request_id) =>
            {
                self.cgroups.waiting.push(Waiting {
                    event: *ev,
                    kind,
                    since: Instant::now(),
                });
            }
            // Already waiting.
            Some(TaskLabel::Unclassified) => {}
            Some(TaskLabel::Label(label)) => {
                match self.kernel.relabel(ev.tid, ev.request_id, label) {
                    Ok(true) => {
                        let mut ev = *ev;
                        ev.label = label;
                        self.hold(&ev, kind, None);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, pid = ev.tgid, "cannot label a held task; killing it");
                        let _ = kill(Pid::from_raw(ev.tgid as i32), Signal::SIGKILL);
                    }
                }
            }
            Some(TaskLabel::None) => self.let_go(ev, kind),
        }
    }

    /// Continues a task held with the reserved label whose cgroup carries no label: its state
    /// is removed, or set to the executable label an exec held after loading would have had
    /// (it never passes that lookup again). Killed if its state cannot be written.
    fn let_go(&mut self, ev: &shared::Event, kind: ActionKind) {
        let exec_label = if kind == ActionKind::ExecLoaded {
            // The agent's file, on a file system that may not answer: off the loop.
            let exe = format!("/proc/{}/exe", ev.tgid);
            enrich::bounded(move || std::fs::metadata(exe).ok())
                .flatten()
                .and_then(|m| self.kernel.exec_label(ebpf::kernel_dev(m.dev()), m.ino()))
                .unwrap_or(shared::LABEL_NONE)
        } else {
            shared::LABEL_NONE
        };
        match self
            .kernel
            .unhold_unclassified(ev.tid, ev.request_id, exec_label)
        {
            Ok(true) => {
                tracing::debug!(pid = ev.tgid, "not an agent: continued");
                let _ = kill(Pid::from_raw(ev.tgid as i32), Signal::SIGCONT);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, pid = ev.tgid, "cannot release an unlabelled task; killing it");
                let _ = kill(Pid::from_raw(ev.tgid as i32), Signal::SIGKILL);
            }
        }
    }

    /// At shutdown, for a task held with the reserved label: continued if its cgroup carries
    /// no label, else killed (nothing will decide it once the hooks are off).
    pub(super) fn let_go_or_kill(&mut self, ev: &shared::Event, kind: ActionKind) {
        self.classify_marked();
        match self.task_label(ev.tid) {
            Some(TaskLabel::None) => self.let_go(ev, kind),
            None => {}
            Some(_) => {
                let _ = kill(Pid::from_raw(ev.tgid as i32), Signal::SIGKILL);
            }
        }
    }

    /// Requests waiting for a classification: tried again; after [`WAIT_CLASSIFIED`] held as
    /// requests of the reserved label (a human or the timeout decides).
    pub(super) fn retry_waiting(&mut self) {
        if self.cgroups.waiting.is_empty() {
            return;
        }
        self.classify_marked();
        for w in std::mem::take(&mut self.cgroups.waiting) {
            let pending = self
                .kernel
                .task(w.event.tid)
                .is_some_and(|t| t.request_id == w.event.request_id);
            if !pending || !enrich::exists(w.event.tid) {
                continue;
            }
            if w.since.elapsed() >= WAIT_CLASSIFIED {
                tracing::error!(
                    pid = w.event.tgid,
                    "the task's cgroup could not be classified; its request goes to a human"
                );
                self.hold(&w.event, w.kind, Some("cgroup not classified".into()));
                continue;
            }
            let since = w.since;
            self.unclassified_held(&w.event, w.kind);
            if let Some(again) =
                self.cgroups.waiting.iter_mut().find(|x| {
                    x.event.tid == w.event.tid && x.event.request_id == w.event.request_id
                })
            {
                again.since = since;
            }
        }
    }

    /// Each tick: the second cache flush after a change, marks not visible yet, waiting
    /// requests.
    pub(super) fn cgroup_tick(&mut self) {
        if std::mem::take(&mut self.cgroups.flush_due)
            && let Err(e) = self.kernel.flush_cgroup_cache()
        {
            tracing::error!(error = %e, "cannot empty the cgroup cache");
        }
        if !self.cgroups.unseen.is_empty() {
            self.classify_marked();
        }
        self.retry_waiting();
    }

    /// Whether the caller's cgroup (or an ancestor) carries a label, for refusing agents.
    pub(super) fn cgroup_label_of_caller(&self, pid: u32) -> Option<(String, u32)> {
        let path = enrich::cgroup_path(pid)?;
        match self.task_label(pid)? {
            TaskLabel::Label(l) => Some((path, l)),
            TaskLabel::Unclassified => Some((path, shared::LABEL_UNCLASSIFIED)),
            TaskLabel::None => None,
        }
    }
}
