//! The daemon's side of the exec notifier (fallback mode; see [`super::notify`]): taking a
//! launcher's listener, and turning each notified `execve` into a held request whose
//! decision is the answer to the system call.
use std::{
    collections::HashMap,
    os::fd::OwnedFd,
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
    /// Held connects to local sockets and listens, by the thread that waits.
    pub connects: HashMap<u32, NotifiedConnect>,
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
            connects: HashMap::new(),
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

/// A held `connect` of a notified task to a local socket, or its `listen` on the network:
/// decided before it is made. The kernel checks after a connect that it reached the socket
/// that was decided (the path in the agent's memory, and what it names, can change in
/// between); a listen the daemon makes itself, on the socket it read.
pub struct NotifiedConnect {
    pub n: Notification,
    /// The request id the daemon gave the kernel's task state (even).
    pub kernel_id: u64,
    /// A listen's socket (a copy of the caller's descriptor as it was read): the daemon
    /// makes the listen on it once approved.
    pub socket: Option<OwnedFd>,
}

/// Why a notified exec is refused without asking anyone.
type Refusal = String;

/// What becomes of a notified `listen`.
enum Listen {
    /// Another family's (a local socket's): the call goes on in the kernel, whose check after
    /// it judges what the descriptor then holds. (Made by the daemon, its peers would see the
    /// daemon's credentials.)
    InKernel,
    /// On loopback: the daemon makes it on this socket.
    Make(OwnedFd),
    /// On the network: held as this event; once approved, the daemon makes it on the socket.
    Hold(shared::Event, OwnedFd),
}

/// Reads the address the socket of a notified `listen` is bound to (from a copy of the
/// caller's descriptor) and, for one on the network, the held event, filled as the kernel
/// fills one: an IPv4-mapped address as IPv4, an unbound socket as every address with port 0.
fn read_listen(n: &Notification, label: u32) -> Result<Listen, Refusal> {
    use nix::sys::socket::{getsockopt, sockopt};
    use std::os::fd::AsRawFd as _;
    let (tgid, uid) = super::tgid_uid(n.tid).ok_or("the caller is gone")?;
    // The call's `int fd`: the low half of the register.
    let fd = n.args[0] as u32 as i32;
    let sock = notify::take_fd(tgid, fd).map_err(|e| format!("its descriptor {fd}: {e}"))?;
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut bound: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname into a live buffer of the length given.
    if unsafe { libc::getsockname(sock.as_raw_fd(), (&raw mut bound).cast(), &raw mut len) } != 0 {
        return Err(format!("its descriptor {fd} is not a socket"));
    }
    let sock_type = getsockopt(&sock, sockopt::SockType).map_or(0, |t| t as u16);
    let (family, port, mut addr) = match i32::from(bound.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (the family says so) into storage
            // large enough and aligned for it.
            let v4 = unsafe { &*(&raw const bound).cast::<libc::sockaddr_in>() };
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&v4.sin_addr.s_addr.to_ne_bytes());
            (libc::AF_INET as u16, u16::from_be(v4.sin_port), addr)
        }
        libc::AF_INET6 => {
            // SAFETY: as above, a sockaddr_in6.
            let v6 = unsafe { &*(&raw const bound).cast::<libc::sockaddr_in6>() };
            (
                libc::AF_INET6 as u16,
                u16::from_be(v6.sin6_port),
                v6.sin6_addr.s6_addr,
            )
        }
        _ => return Ok(Listen::InKernel),
    };
    let mut family = family;
    if family == libc::AF_INET6 as u16
        && let Some(v4) = std::net::Ipv6Addr::from(addr).to_ipv4_mapped()
    {
        family = libc::AF_INET as u16;
        addr = [0; 16];
        addr[..4].copy_from_slice(&v4.octets());
    }
    let ip = if family == libc::AF_INET as u16 {
        std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        std::net::IpAddr::from(addr)
    };
    if ip.is_loopback() {
        return Ok(Listen::Make(sock));
    }
    // What was read belongs to the task that waits, not to one that took its pid over.
    if !notify::still_waiting(&n.listener, n.id) {
        return Err("the caller is gone".into());
    }
    let ev = shared::Event {
        kind: shared::KIND_LISTEN,
        label,
        tgid,
        tid: n.tid,
        uid,
        family,
        port,
        sock_type,
        addr,
        ..shared::Event::default()
    };
    Ok(Listen::Hold(ev, sock))
}

/// Makes a notified `listen` on `socket` (the caller's socket as the daemon read it), with
/// the caller's backlog: the answer to give the call.
fn listen_on(socket: &OwnedFd, n: &Notification) -> Reply {
    use std::os::fd::AsRawFd as _;
    // The call's `int backlog`: the low half of the register.
    let backlog = n.args[1] as u32 as i32;
    // SAFETY: plain system call on a descriptor the daemon owns.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog) } == 0 {
        Reply::Done
    } else {
        Reply::Fail(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EPERM),
        )
    }
}

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
        if notify::is_connect(n.arch, n.nr) {
            return self.connect_notified(n);
        }
        if notify::is_listen(n.arch, n.nr) {
            return self.listen_notified(n);
        }
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
        let (argv, cut) = enrich::held_argv_bytes(n.tid, named.argv_at, width)
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

    /// The notified connect or listen `n` (of kind `kind`), with its task's label, if it is a
    /// new one to decide: a task without a label is refused; the same call again (a signal
    /// interrupted the wait) takes over the request that stands, answered through `n`.
    fn fresh_notified_call(
        &mut self,
        n: Notification,
        kind: u32,
        call: &str,
    ) -> Option<(Notification, u32)> {
        let Some(state) = self.kernel.task(n.tid) else {
            tracing::warn!(
                tid = n.tid,
                "an unlabelled task under the notifier; its {call} is refused"
            );
            let _ = notify::respond(&n.listener, n.id, Reply::Fail(libc::EPERM));
            return None;
        };
        if state.state == shared::STATE_PENDING
            && state.kind == kind
            && let Some(c) = self
                .notifier
                .as_mut()
                .and_then(|t| t.connects.get_mut(&n.tid))
            && c.kernel_id == state.request_id
        {
            c.n = n;
            return None;
        }
        Some((n, state.label))
    }

    /// A notified `connect` (one whose address is not an IP address's length): let go at once
    /// unless it names a local socket its label's rules hold or deny, which is held as a
    /// request (or refused when it cannot be read).
    fn connect_notified(&mut self, n: Notification) {
        let Some((n, label)) = self.fresh_notified_call(n, shared::KIND_UNIX, "connect") else {
            return;
        };
        match self.read_connect(&n, label) {
            Ok(None) => {
                let _ = notify::respond(&n.listener, n.id, Reply::Continue);
            }
            Ok(Some(ev)) => self.hold_notified_connect(n, ev, None),
            Err(why) => {
                tracing::warn!(tid = n.tid, label = %self.label_name(label), why, "connect refused");
                let _ = notify::respond(&n.listener, n.id, Reply::Fail(libc::EPERM));
            }
        }
    }

    /// Reads the address a notified connect names and, for a local socket the label's rules
    /// name (or that its `unix_default` or a deputy rule holds), the held event, filled as
    /// the kernel fills one. `None`: it goes on (not a local socket, nothing there, or one
    /// the rules allow); the kernel checks what it reaches either way.
    fn read_connect(&self, n: &Notification, label: u32) -> Result<Option<shared::Event>, Refusal> {
        use std::os::unix::{
            ffi::{OsStrExt as _, OsStringExt as _},
            fs::{FileTypeExt as _, MetadataExt as _},
        };
        let len = (n.args[2] as u32 as usize).min(2 + shared::UNIX_NAME_LEN);
        if len <= 2 {
            // No name: the kernel refuses it.
            return Ok(None);
        }
        let sockaddr = enrich::held_bytes(n.tid, n.args[1], len)
            .ok_or("its address cannot be read from the caller's memory")?;
        if sockaddr.len() < len {
            return Err("its address cannot be read from the caller's memory".into());
        }
        if u16::from_ne_bytes([sockaddr[0], sockaddr[1]]) != libc::AF_UNIX as u16 {
            return Ok(None);
        }
        let name = &sockaddr[2..];
        let mut fixed = [0u8; shared::UNIX_NAME_LEN];
        let (peer, shown) = if name[0] == 0 {
            fixed[..name.len()].copy_from_slice(name);
            let peer = shared::UnixPeer {
                dev: shared::UNIX_ABSTRACT_DEV,
                ino: shared::abstract_hash(&fixed, name.len()),
            };
            (peer, name.to_vec())
        } else {
            let path = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            let from = if path.starts_with(b"/") {
                format!("/proc/{}/root", n.tid)
            } else {
                format!("/proc/{}/cwd/", n.tid)
            };
            let mut full = std::ffi::OsString::from(from);
            full.push(std::ffi::OsStr::from_bytes(path));
            // The path is the agent's choice, and so may be its file system: looked up off
            // the loop, within a bound.
            let looked_up = enrich::bounded(move || {
                let m = std::fs::metadata(&full).ok()?;
                let shown = m
                    .file_type()
                    .is_socket()
                    .then(|| std::fs::canonicalize(&full).ok())
                    .flatten();
                Some((m, shown))
            })
            .ok_or("the file system of its path did not answer")?;
            let Some((m, shown)) = looked_up else {
                // Nothing there: the kernel fails the call (and checks anything that
                // appears in between once it is connected).
                return Ok(None);
            };
            if !m.file_type().is_socket() {
                return Ok(None);
            }
            let file = FileId {
                dev: m.dev(),
                ino: m.ino(),
            };
            let shown = shown.map_or_else(|| path.to_vec(), |p| p.into_os_string().into_vec());
            let peer = shared::UnixPeer {
                dev: file.kernel_dev(),
                ino: file.ino,
            };
            (peer, shown)
        };
        let key = |label| shared::ExecKey {
            label,
            _pad: 0,
            dev: peer.dev,
            ino: peer.ino,
        };
        let held = match self.unix_rules.get(&key(label)) {
            Some(&rule) => rule != shared::UNIX_ALLOW,
            None => {
                self.unix_hold_all.contains(&label)
                    || self.unix_rules.contains_key(&key(shared::LABEL_NONE))
            }
        };
        if !held {
            return Ok(None);
        }
        let (tgid, uid) = super::tgid_uid(n.tid).ok_or("the caller is gone")?;
        let addr = peer.to_addr();
        match self.kernel.unix_decided(tgid, label, addr) {
            // Decided for this process already (the kernel checks it is the same process).
            Some(shared::STATE_ALLOWED) => return Ok(None),
            Some(_) => return Err("a decision of this process refused that socket".into()),
            None => {}
        }
        // What was read belongs to the task that waits, not to one that took its pid over.
        if !notify::still_waiting(&n.listener, n.id) {
            return Err("the caller is gone".into());
        }
        let mut ev = shared::Event {
            kind: shared::KIND_UNIX,
            label,
            tgid,
            tid: n.tid,
            uid,
            family: libc::AF_UNIX as u16,
            addr,
            ..shared::Event::default()
        };
        let shown = &shown[..shown.len().min(shared::UNIX_NAME_LEN)];
        ev.unix_name[..shown.len()].copy_from_slice(shown);
        ev.unix_name_len = shown.len() as u32;
        Ok(Some(ev))
    }

    /// A notified `listen`: let go at once unless its socket is bound to an IPv4 or IPv6
    /// address other than loopback (or to none yet: every address), which is held as a
    /// `listen` request; refused when the socket cannot be read. An IPv4/IPv6 one the daemon
    /// makes itself, on the socket it read (see [`notify::is_listen`] and [`Listen`]).
    fn listen_notified(&mut self, n: Notification) {
        let Some((n, label)) = self.fresh_notified_call(n, shared::KIND_LISTEN, "listen") else {
            return;
        };
        match read_listen(&n, label) {
            Ok(Listen::InKernel) => {
                let _ = notify::respond(&n.listener, n.id, Reply::Continue);
            }
            Ok(Listen::Make(socket)) => {
                let _ = notify::respond(&n.listener, n.id, listen_on(&socket, &n));
            }
            Ok(Listen::Hold(ev, socket)) => self.hold_notified_connect(n, ev, Some(socket)),
            Err(why) => {
                tracing::warn!(tid = n.tid, label = %self.label_name(label), why, "listen refused");
                let _ = notify::respond(&n.listener, n.id, Reply::Fail(libc::EPERM));
            }
        }
    }

    /// Holds a notified connect to a local socket ([`shared::KIND_UNIX`]) or listen
    /// ([`shared::KIND_LISTEN`]) as `ev` describes it.
    fn hold_notified_connect(
        &mut self,
        n: Notification,
        ev: shared::Event,
        socket: Option<OwnedFd>,
    ) {
        let tid = n.tid;
        // Even, so never one of the kernel's (odd) request ids.
        let kernel_id = (super::monotonic_ns() & !1).max(2);
        let (id, listener) = (n.id, n.listener.clone());
        if !matches!(
            self.kernel.hold_notified_action(tid, kernel_id, &ev),
            Ok(true)
        ) {
            let _ = notify::respond(&listener, id, Reply::Fail(libc::EPERM));
            return;
        }
        let ev = shared::Event {
            request_id: kernel_id,
            ..ev
        };
        if let Some(t) = self.notifier.as_mut() {
            t.connects.insert(
                tid,
                NotifiedConnect {
                    n,
                    kernel_id,
                    socket,
                },
            );
            t.holds += 1;
        }
        let kind = if ev.kind == shared::KIND_LISTEN {
            ActionKind::Listen
        } else {
            ActionKind::Unix
        };
        self.hold_notified_call(&ev, kind);
    }

    /// Holds a notified call whose waiting task the notifier now keeps: whatever did not end
    /// in a request (one refused before it was held) is refused here — a notified call never
    /// waits without a request.
    fn hold_notified_call(&mut self, ev: &shared::Event, kind: ActionKind) {
        self.hold(ev, kind, None);
        let (tid, kernel_id) = (ev.tid, ev.request_id);
        let waiting = self
            .requests
            .values()
            .any(|h| h.tid == tid && h.kernel_id == kernel_id);
        if !waiting {
            self.refuse_notified(tid, kernel_id);
        }
    }

    /// The held connect of `tid` under `kernel_id`, if it is one the notifier holds.
    pub(super) fn notified_connect(&self, tid: u32, kernel_id: u64) -> Option<&NotifiedConnect> {
        self.notifier
            .as_ref()?
            .connects
            .get(&tid)
            .filter(|c| c.kernel_id == kernel_id)
    }

    /// Applies a decision (already recorded) to a held notified connect. Approve: the
    /// kernel's state says allowed (its check after the connect passes that socket only),
    /// then the call goes on. Kill: `SIGKILL`, and `EPERM`. Otherwise `EPERM`. Never lets
    /// the call go on after an error.
    pub(super) fn apply_notified_connect(
        &mut self,
        tid: u32,
        tgid: u32,
        kernel_id: u64,
        approve: bool,
        kill_it: bool,
    ) -> Result<(), String> {
        let Some(c) = self.notifier.as_mut().and_then(|t| {
            t.connects
                .get(&tid)
                .is_some_and(|c| c.kernel_id == kernel_id)
                .then(|| t.connects.remove(&tid))
                .flatten()
        }) else {
            return Err("its call no longer waits".into());
        };
        let refuse = |c: &NotifiedConnect| {
            let _ = notify::respond(&c.n.listener, c.n.id, Reply::Fail(libc::EPERM));
        };
        if kill_it {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(tgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !approve {
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            refuse(&c);
            return Ok(());
        }
        if let Some(socket) = &c.socket {
            // A listen: made here, on the socket that was decided (the kernel's check after
            // the call consumes the approval).
            if !matches!(
                self.kernel.decide(tid, kernel_id, shared::STATE_ALLOWED),
                Ok(true)
            ) {
                refuse(&c);
                return Err("its task state changed".into());
            }
            return notify::respond(&c.n.listener, c.n.id, listen_on(socket, &c.n))
                .map_err(|e| format!("its call no longer waits ({e})"));
        }
        match self.kernel.decide(tid, kernel_id, shared::STATE_ALLOWED) {
            Ok(true) => {}
            Ok(false) => {
                refuse(&c);
                return Err("its task state changed".into());
            }
            Err(e) => {
                refuse(&c);
                return Err(format!("writing the decision: {e}"));
            }
        }
        if let Err(e) = notify::respond(&c.n.listener, c.n.id, Reply::Continue) {
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            return Err(format!("its call no longer waits ({e})"));
        }
        Ok(())
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
        self.hold_notified_call(&ev, ActionKind::Exec);
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
        if t.connects
            .get(&tid)
            .is_some_and(|c| c.kernel_id == kernel_id)
            && let Some(c) = t.connects.remove(&tid)
        {
            let _ = self.kernel.decide(tid, kernel_id, shared::STATE_IDLE);
            let _ = notify::respond(&c.n.listener, c.n.id, Reply::Fail(libc::EPERM));
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
            .map(|(tid, e)| (*tid, e.kernel_id))
            .chain(t.connects.iter().map(|(tid, c)| (*tid, c.kernel_id)))
            .filter(|(tid, kernel_id)| {
                !self
                    .requests
                    .values()
                    .any(|h| h.tid == *tid && h.kernel_id == *kernel_id)
            })
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
