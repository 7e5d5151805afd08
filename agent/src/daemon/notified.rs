//! The daemon's side of the exec notifier (fallback mode; see [`super::notify`]): taking a
//! launcher's listener, and turning each notified `execve` into a held request whose
//! decision is the answer to the system call.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use countersign_ebpf as shared;
use tokio::sync::mpsc;

use super::{
    Daemon, ExecBinding, Peer, enrich,
    enrich::FileId,
    notify::{self, Call, Notification, Reply},
};
use crate::{
    ebpf::ExecFastPath,
    proto::{ActionKind, Response},
};

/// The listeners the daemon watches.
pub struct Notifier {
    tx: mpsc::Sender<Notification>,
    /// The kernel's exec fast path, shared with the listeners' threads (which answer what it
    /// allows without the main loop).
    fast: Option<Arc<ExecFastPath>>,
    live: Arc<AtomicUsize>,
    /// Held execs, by the thread that waits.
    pub execs: HashMap<u32, NotifiedExec>,
    /// Execs held so far (the kernel counts the other holds).
    pub holds: u64,
}

impl Notifier {
    #[must_use]
    pub fn new(tx: mpsc::Sender<Notification>, fast: Option<Arc<ExecFastPath>>) -> Self {
        Self {
            tx,
            fast,
            live: Arc::new(AtomicUsize::new(0)),
            execs: HashMap::new(),
            holds: 0,
        }
    }

    /// Listeners being watched (launched agents that still have a task).
    #[must_use]
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// A held exec of a notified task: what it names, as read while it waited, and what the
/// kernel will check the loaded image against if it is approved.
pub struct NotifiedExec {
    pub n: Notification,
    /// The request id the daemon gave the kernel's task state (even: the kernel's are odd).
    pub kernel_id: u64,
    /// The path as passed, and where it and argv are in the caller's memory.
    pub filename: Vec<u8>,
    pub filename_at: u64,
    pub argv_at: u64,
    /// What an approval binds to, [`ExecBinding::expect`] included.
    pub binding: ExecBinding,
}

/// Why a notified exec is refused without asking anyone.
type Refusal = String;

impl Daemon {
    /// `countersign exec` hands over the listener of the filter it installed on itself.
    pub(super) fn take_notifier(&mut self, fd: i32, peer: Peer) -> Response {
        let Some(notifier) = &self.notifier else {
            return Response::Error {
                message: "this daemon does not decide execs by seccomp notification (LSM mode, or the kernel lacks it: see `countersign status`)".into(),
            };
        };
        match self.kernel.task(peer.pid) {
            None => {
                return Response::Error {
                    message: format!(
                        "pid {} is not labelled: only a labelled launcher hands over its exec notifier",
                        peer.pid
                    ),
                };
            }
            Some(t) if t.flags & shared::FLAG_NOTIFIED != 0 => {
                return Response::Error {
                    message: format!(
                        "pid {} already has its execs decided by a notifier",
                        peer.pid
                    ),
                };
            }
            Some(_) => {}
        }
        if notifier.live() >= notify::MAX_LISTENERS {
            return Response::Error {
                message: format!(
                    "too many launched agents watched at once (at most {})",
                    notify::MAX_LISTENERS
                ),
            };
        }
        let listener = match notify::take_listener(peer.pid, fd) {
            Ok(l) => l,
            Err(e) => {
                return Response::Error {
                    message: format!("taking descriptor {fd} of pid {}: {e}", peer.pid),
                };
            }
        };
        if let Err(e) = self.kernel.set_notified(peer.pid) {
            return Response::Error {
                message: format!("marking pid {}: {e}", peer.pid),
            };
        }
        let live = notifier.live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = notify::watch(
            listener,
            notifier.tx.clone(),
            live.clone(),
            notifier.fast.clone(),
        ) {
            // The thread never started: nothing uncounts it.
            live.fetch_sub(1, Ordering::Relaxed);
            return Response::Error {
                message: format!("watching the notifier of pid {}: {e}", peer.pid),
            };
        }
        tracing::info!(pid = peer.pid, "execs decided before they start");
        Response::NotifierTaken { pid: peer.pid }
    }

    /// A notified exec: let go at once (the fast path; a file that does not exist), refused
    /// (what cannot be verified), or held as a request.
    pub(super) fn exec_notified(&mut self, n: Notification) {
        if let Some(attempt) = notify::guarded(n.arch, n.nr) {
            return self.notified_tamper(&n, attempt);
        }
        let Some(state) = self.kernel.task(n.tid) else {
            // Only a labelled launcher installs the filter, and labels are inherited: a task
            // without one is not what the filter was meant for. Fail closed.
            tracing::warn!(
                tid = n.tid,
                "an unlabelled task under the exec notifier; refused"
            );
            let _ = notify::respond(&n.listener, n.id, Reply::Fail(libc::EPERM));
            return;
        };
        // The same call again (a signal interrupted the wait and the call restarted): the
        // request stands, answered through the new notification.
        if state.state == shared::STATE_PENDING
            && state.kind == shared::KIND_EXEC
            && let Some(e) = self.notifier.as_mut().and_then(|t| t.execs.get_mut(&n.tid))
            && e.kernel_id == state.request_id
        {
            e.n = n;
            return;
        }
        match self.read_exec(&n, state.label) {
            Ok(None) => {
                let _ = notify::respond(&n.listener, n.id, Reply::Continue);
            }
            Ok(Some(exec)) => self.hold_notified(exec, state.label),
            Err(why) => {
                tracing::warn!(tid = n.tid, label = %self.label_name(state.label), why, "exec refused");
                let _ = notify::respond(&n.listener, n.id, Reply::Fail(libc::EPERM));
            }
        }
    }

    /// A launched agent's guarded system call, which the filter refused (fallback mode's
    /// self-protection): counted, logged and recorded; with `on_tamper: kill` the process is
    /// killed too.
    fn notified_tamper(&mut self, n: &Notification, attempt: &'static str) {
        let (tgid, uid) = super::guard::task_ids(n.tid).unwrap_or((n.tid, u32::MAX));
        let label = self.kernel.task(n.tid).map_or(0, |t| t.label);
        let kill = self.config.on_tamper == super::config::OnTamper::Kill;
        let target = format!("system call {} (arch {:#x})", n.nr, n.arch);
        // Recorded while the call waits, so that the record names the process.
        self.report_tamper(
            (tgid, n.tid, uid, label),
            None,
            attempt,
            target,
            if kill { "sigkill" } else { "eperm" },
            "seccomp",
        );
        if kill && notify::still_waiting(&n.listener, n.id) {
            // SAFETY: a plain signal to the labelled process whose call waits (checked just
            // now: the pid is still that process's).
            unsafe { libc::kill(tgid as i32, libc::SIGKILL) };
        }
        let _ = notify::respond(&n.listener, n.id, Reply::Fail(libc::EPERM));
    }

    /// Reads what the exec names. `None`: it may go on without a request (the kernel checks
    /// what it loads either way).
    fn read_exec(&self, n: &Notification, label: u32) -> Result<Option<NotifiedExec>, Refusal> {
        let named = notify::Named::read(n)?;
        if named.goes_on(|f| self.fast_allows(label, f)) {
            return Ok(None);
        }
        let (Some(file), Some(call)) = (named.file, Call::of(n.arch, n.nr)) else {
            return Ok(None);
        };
        let width = if call.narrow { 4 } else { 8 };
        let (argv, cut) = enrich::read_argv_bytes(n.tid, named.argv_at, width)
            .ok_or("its argv cannot be read from the caller's memory")?;
        if cut {
            return Err("its argv is too long to show and verify".into());
        }
        if argv.is_empty() {
            return Err("an empty argv".into());
        }
        // What was read belongs to the task that waits, not to one that took its pid over.
        if !notify::still_waiting(&n.listener, n.id) {
            return Err("the caller is gone".into());
        }
        let Some(expect) = expected(
            file,
            named.script.as_ref(),
            named.interp,
            &named.kernel_name,
            &argv,
        ) else {
            // No interpreter there: the kernel fails the call.
            return Ok(None);
        };
        if expect.1.len() > shared::ARGV_VERIFY_MAX {
            return Err(format!(
                "its argv ({} bytes) is longer than the kernel can verify ({} bytes)",
                expect.1.len(),
                shared::ARGV_VERIFY_MAX
            ));
        }
        let binding = ExecBinding {
            filename: String::from_utf8_lossy(&named.kernel_name).into_owned(),
            exe: Some(file),
            argv: argv
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            expect: Some(expect),
            unverifiable: None,
        };
        Ok(Some(NotifiedExec {
            n: n.clone(),
            kernel_id: 0,
            filename: named.filename,
            filename_at: named.filename_at,
            argv_at: named.argv_at,
            binding,
        }))
    }

    /// The kernel's own test (see [`crate::ebpf::ExecFastPath::allows`]).
    fn fast_allows(&self, label: u32, f: FileId) -> bool {
        self.notifier
            .as_ref()
            .and_then(|t| t.fast.as_ref())
            .is_some_and(|fast| fast.allows(label, f.kernel_dev(), f.ino))
    }

    fn hold_notified(&mut self, mut exec: NotifiedExec, label: u32) {
        let tid = exec.n.tid;
        // Even, so never one of the kernel's (odd) request ids.
        let kernel_id = (super::monotonic_ns() & !1).max(2);
        exec.kernel_id = kernel_id;
        let (filename_ptr, argv_ptr) = (exec.filename_at, exec.argv_at);
        let (n, listener) = (exec.n.id, exec.n.listener.clone());
        match self
            .kernel
            .hold_notified_exec(tid, kernel_id, filename_ptr, argv_ptr)
        {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = notify::respond(&listener, n, Reply::Fail(libc::EPERM));
                return;
            }
        }
        let Some((tgid, uid)) = super::tgid_uid(tid) else {
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            let _ = notify::respond(&listener, n, Reply::Fail(libc::EPERM));
            return;
        };
        let ev = shared::Event {
            kind: shared::KIND_EXEC,
            label,
            tgid,
            tid,
            uid,
            request_id: kernel_id,
            exec_filename: filename_ptr,
            exec_argv: argv_ptr,
            ..shared::Event::default()
        };
        if let Some(t) = self.notifier.as_mut() {
            t.execs.insert(tid, exec);
            t.holds += 1;
        }
        self.hold(&ev, ActionKind::Exec, None);
        // Whatever did not end in an answer (a request refused before it was held) is
        // refused here: a notified call never waits without a request.
        let waiting = self
            .requests
            .values()
            .any(|h| h.tid == tid && h.kernel_id == kernel_id);
        if !waiting {
            self.refuse_notified(tid, kernel_id);
        }
    }

    /// The held exec of `tid` under `kernel_id`, if it is one the notifier holds.
    pub(super) fn notified_exec(&self, tid: u32, kernel_id: u64) -> Option<&NotifiedExec> {
        self.notifier
            .as_ref()?
            .execs
            .get(&tid)
            .filter(|e| e.kernel_id == kernel_id)
    }

    /// Answers a held notified exec with `EPERM` (if still unanswered) and forgets it.
    pub(super) fn refuse_notified(&mut self, tid: u32, kernel_id: u64) {
        let Some(t) = self.notifier.as_mut() else {
            return;
        };
        if t.execs.get(&tid).is_some_and(|e| e.kernel_id == kernel_id)
            && let Some(e) = t.execs.remove(&tid)
        {
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            let _ = notify::respond(&e.n.listener, e.n.id, Reply::Fail(libc::EPERM));
        }
    }

    /// Applies a decision (already recorded) to a held notified exec. Approve: the kernel's
    /// check is armed, then the call goes on. Deny: `EPERM`. Kill: `SIGKILL`. Never lets the
    /// call go on after an error.
    pub(super) fn apply_notified(
        &mut self,
        tid: u32,
        tgid: u32,
        kernel_id: u64,
        approve: bool,
        kill_it: bool,
    ) -> Result<(), String> {
        let Some(exec) = self.notifier.as_mut().and_then(|t| {
            t.execs
                .get(&tid)
                .is_some_and(|e| e.kernel_id == kernel_id)
                .then(|| t.execs.remove(&tid))
                .flatten()
        }) else {
            return Err("its call no longer waits".into());
        };
        let refuse = |e: &NotifiedExec| {
            let _ = notify::respond(&e.n.listener, e.n.id, Reply::Fail(libc::EPERM));
        };
        if kill_it {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(tgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            refuse(&exec);
            return Ok(());
        }
        if !approve {
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            refuse(&exec);
            return Ok(());
        }
        if let Err(e) = self.arm(tid, kernel_id, &exec.binding) {
            refuse(&exec);
            return Err(e);
        }
        match self.kernel.decide(tid, kernel_id, shared::STATE_ALLOWED) {
            Ok(true) => {}
            Ok(false) => {
                refuse(&exec);
                return Err("its task state changed".into());
            }
            Err(e) => {
                refuse(&exec);
                return Err(format!("writing the decision: {e}"));
            }
        }
        if let Err(e) = notify::respond(&exec.n.listener, exec.n.id, Reply::Continue) {
            // Gone, or interrupted: a restarted call is notified again and held anew.
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            return Err(format!("its call no longer waits ({e})"));
        }
        Ok(())
    }

    /// Arms the kernel's check of an approved exec (see [`shared::ApprovedExec`]): written
    /// before the exec is let go.
    pub(super) fn arm(&mut self, tid: u32, kernel_id: u64, b: &ExecBinding) -> Result<(), String> {
        if let Some(why) = &b.unverifiable {
            return Err(format!("the kernel cannot check it: {why}"));
        }
        let Some((file, argv)) = &b.expect else {
            // Nothing there to load: the exec fails by itself, and anything that appears
            // meanwhile finds no approval armed and is killed once loaded.
            return Ok(());
        };
        if argv.len() > shared::ARGV_VERIFY_MAX {
            return Err(format!(
                "its argv ({} bytes) is longer than the kernel can verify ({} bytes)",
                argv.len(),
                shared::ARGV_VERIFY_MAX
            ));
        }
        let mut armed = Box::new(shared::ApprovedExec {
            request_id: kernel_id,
            dev: file.kernel_dev(),
            ino: file.ino,
            argv_len: argv.len() as u32,
            _pad: 0,
            argv: [0; shared::ARGV_VERIFY_MAX],
        });
        armed.argv[..argv.len()].copy_from_slice(argv);
        self.kernel
            .arm_exec(tid, &armed)
            .map_err(|e| format!("arming the kernel's check: {e}"))
    }

    /// Refuses the notified execs whose request is gone (superseded, its task exited).
    pub(super) fn notified_tick(&mut self) {
        let Some(t) = self.notifier.as_ref() else {
            return;
        };
        let stale: Vec<(u32, u64)> = t
            .execs
            .iter()
            .filter(|(tid, e)| {
                !self
                    .requests
                    .values()
                    .any(|h| h.tid == **tid && h.kernel_id == e.kernel_id)
            })
            .map(|(tid, e)| (*tid, e.kernel_id))
            .collect();
        for (tid, kernel_id) in stale {
            self.refuse_notified(tid, kernel_id);
        }
    }
}

/// What an exec of `file` with `argv` loads, as the kernel will check it: the file and argv,
/// or for a `#!` script its interpreter with [interpreter, its argument, `name` (the name the
/// kernel gives the script), argv[1..]]. `None`: a script whose interpreter is not there.
pub(super) fn expected(
    file: FileId,
    script: Option<&(Vec<u8>, Option<Vec<u8>>)>,
    interp: Option<FileId>,
    name: &[u8],
    argv: &[Vec<u8>],
) -> Option<(FileId, Vec<u8>)> {
    match (script, interp) {
        (None, _) => Some((file, nul_joined(argv.iter().map(Vec::as_slice)))),
        (Some((i, arg)), Some(interp)) => {
            let head = [Some(i.as_slice()), arg.as_deref(), Some(name)];
            let rest = argv.iter().skip(1).map(Vec::as_slice);
            Some((interp, nul_joined(head.into_iter().flatten().chain(rest))))
        }
        (Some(_), None) => None,
    }
}

/// Strings laid out as the kernel lays out argv: each with its terminating NUL.
fn nul_joined<'a>(parts: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_laid_out_as_the_kernel_does() {
        let argv: [&[u8]; 3] = [b"sh", b"-c", b""];
        assert_eq!(nul_joined(argv.into_iter()), b"sh\0-c\0\0");
    }

    /// A script runs as its interpreter, with the interpreter's argument and the script's
    /// name before the script's own arguments (argv[0] is dropped), as `binfmt_script` does.
    #[test]
    fn a_script_is_expected_as_its_interpreter_runs_it() {
        let (file, sh) = (FileId { dev: 1, ino: 10 }, FileId { dev: 1, ino: 20 });
        let argv = vec![b"s".to_vec(), b"a b".to_vec()];
        assert_eq!(
            expected(file, None, None, b"./s", &argv),
            Some((file, b"s\0a b\0".to_vec()))
        );
        let script = (b"/bin/sh".to_vec(), Some(b"-e".to_vec()));
        assert_eq!(
            expected(file, Some(&script), Some(sh), b"./s", &argv),
            Some((sh, b"/bin/sh\0-e\0./s\0a b\0".to_vec()))
        );
        let bare = (b"/bin/sh".to_vec(), None);
        assert_eq!(
            expected(file, Some(&bare), Some(sh), b"/dev/fd/3", &argv[..1]),
            Some((sh, b"/bin/sh\0/dev/fd/3\0".to_vec()))
        );
        assert_eq!(expected(file, Some(&bare), None, b"./s", &argv), None);
    }
}
