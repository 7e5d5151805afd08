//! Outbound holds: connects and datagram sends. LSM mode: the `socket_connect` and
//! `socket_sendmsg` hooks (before anything is sent). Fallback mode: syscall tracepoints stop
//! the task, cgroup programs make its syscall restart or fail on the kernel's copy of the
//! address.
//!
//! A send with a destination (`sendto`, `sendmsg`, `sendmmsg`, on a UDP socket, a TCP Fast
//! Open `sendto`, io_uring's send opcodes) is held like a connect to that destination; once a
//! process has consumed the decision, later datagrams of that process to that destination are
//! answered in the kernel (`SEND_DECIDED`), allowed or refused, without a stop.
//!
//! Hooks reached where nothing restarts (io_uring's threads and inline submissions) cannot
//! hold: there the kernel's own answers (policy, grants, decided destinations) apply and
//! anything else is refused and reported.
//!
//! What the kernel lets through without a stop: the policy's LPM trie, then the destination
//! grants (exact address and port, with an expiry per socket type). The fallback tracepoint
//! does not know the socket type: it passes a granted destination on, and the cgroup program
//! checks the grant again with the type (refusing, since it cannot hold, what it does not
//! cover).
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_user},
    programs::{SockAddrContext, TracePointContext},
};
use countersign_ebpf::{
    CONNECT_KEY_FIXED_BITS, ConnectKey, ERROR_GRANT_RECHECK, ERROR_LISTEN_KILLED,
    ERROR_LISTEN_UNSEEN, ERROR_UNHOLDABLE, ERROR_UNIX_KILLED, ERROR_UNIX_UNSEEN, FLAG_GRANT_CHECK,
    FLAG_IN_CONNECT, FLAG_IN_LISTEN, FLAG_NOTIFIED, GrantConnectKey, KIND_CANARY_CONNECT,
    KIND_CONNECT, KIND_LISTEN, KIND_SEND, KIND_UNIX, LABEL_CANARY, MAX_PORT_SPANS, MODE_FALLBACK,
    MODE_LSM, PROTO_TCP, PROTO_UDP, STAT_FAST_ALLOWED, STAT_GRANT_ALLOWED, STAT_SEND_DECIDED,
    STAT_UNHOLDABLE, STATE_ALLOWED, STATE_DENIED, STATE_IDLE, STATE_PENDING, SendDecided, SendKey,
    TaskState, connect_hash,
};

use crate::{
    hold::{self, Verdict},
    label::{self, Task, current_tgid},
    maps::{self, CONNECT_ALLOW, SEND_DECIDED},
    task,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A destination: what a connect is bound to.
#[derive(Clone, Copy)]
struct Dest {
    family: u16,
    port: u16,
    addr: [u8; 16],
}

impl Dest {
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 destination it reaches: the
    /// kernel sends it as IPv4 (and runs the IPv4 cgroup programs with it), and the policy's
    /// IPv4 rules must match it.
    #[inline(always)]
    fn unmapped(mut self) -> Self {
        if self.family == AF_INET6 {
            let a = self.addr;
            let mut zero = true;
            let mut i = 0;
            while i < 10 {
                zero &= a[i] == 0;
                i += 1;
            }
            if zero && a[10] == 0xff && a[11] == 0xff {
                self.family = AF_INET;
                self.addr = [
                    a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ];
            }
        }
        self
    }

    #[inline(always)]
    fn hash(&self) -> u64 {
        connect_hash(self.family, self.port, &self.addr)
    }

    /// `127.0.0.0/8` or `::1`: reached from this host only.
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        let a = self.addr;
        if self.family == AF_INET {
            return a[0] == 127;
        }
        let mut zero = true;
        let mut i = 0;
        while i < 15 {
            zero &= a[i] == 0;
            i += 1;
        }
        zero && a[15] == 1
    }
}

/// Reads a `sockaddr_in`/`sockaddr_in6` (UAPI layouts) through `read`; `None` for other
/// families, which are not network destinations.
#[inline(always)]
fn read_dest(sa: *const u8, read: impl Fn(*const u8) -> Option<[u8; 8]>) -> Option<Dest> {
    let head = read(sa)?;
    let family = u16::from_ne_bytes([head[0], head[1]]);
    let port = u16::from_be_bytes([head[2], head[3]]);
    let mut addr = [0u8; 16];
    match family {
        AF_INET => {
            addr[0] = head[4];
            addr[1] = head[5];
            addr[2] = head[6];
            addr[3] = head[7];
        }
        AF_INET6 => {
            // SAFETY: stays inside a sockaddr_in6 (28 bytes): address at 8..24.
            let lo = read(unsafe { sa.add(8) })?;
            let hi = read(unsafe { sa.add(16) })?;
            addr[..8].copy_from_slice(&lo);
            addr[8..].copy_from_slice(&hi);
        }
        _ => return None,
    }
    Some(Dest { family, port, addr }.unmapped())
}

/// `sock_type` of a check made where the type is unknown but some type would do (the fallback
/// send tracepoint: the cgroup program checks again with the real one).
const ANY_TYPE: u16 = u16::MAX;

/// Whether the policy allows this connect in the kernel (no stop, no event). `sock_type` 0
/// (unknown) only matches entries that allow any protocol; [`ANY_TYPE`] entries for any.
#[inline(always)]
fn fast_allowed(label: u32, d: &Dest, sock_type: u16) -> bool {
    let bits = if d.family == AF_INET6 { 128 } else { 32 };
    let key = Key::new(
        CONNECT_KEY_FIXED_BITS + bits,
        ConnectKey {
            label,
            family: u32::from(d.family),
            addr: d.addr,
        },
    );
    let Some(allow) = CONNECT_ALLOW.get(&key) else {
        return false;
    };
    let any = PROTO_TCP | PROTO_UDP;
    if allow.protocols & any != any {
        let bit = match sock_type {
            1 => PROTO_TCP,
            2 => PROTO_UDP,
            ANY_TYPE => any,
            _ => 0,
        };
        if allow.protocols & bit == 0 {
            return false;
        }
    }
    let mut i = 0;
    while i < MAX_PORT_SPANS {
        if i as u32 >= allow.count {
            break;
        }
        let span = allow.spans[i];
        if d.port >= span.first && d.port <= span.last {
            if sock_type != ANY_TYPE {
                maps::count(STAT_FAST_ALLOWED);
            }
            return true;
        }
        i += 1;
    }
    false
}

/// What the destination grants say about a connect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Granted {
    No,
    Yes,
    /// Granted for a socket type, and the type is not known here (0: the fallback tracepoint).
    IfSockType,
}

/// Whether a destination grant of `label` covers this connect now. `sock_type` 0: unknown.
#[inline(always)]
fn granted(label: u32, d: &Dest, sock_type: u16) -> Granted {
    let key = GrantConnectKey {
        label,
        family: d.family,
        port: d.port,
        addr: d.addr,
    };
    let Some(g) = maps::connect_grant(&key) else {
        return Granted::No;
    };
    let now = maps::boot_ns();
    if now < g.any {
        return Granted::Yes;
    }
    match sock_type {
        1 if now < g.stream => Granted::Yes,
        2 if now < g.dgram => Granted::Yes,
        0 if now < g.stream || now < g.dgram => Granted::IfSockType,
        _ => Granted::No,
    }
}

#[inline(always)]
fn fill(ev: &mut countersign_ebpf::Event, d: &Dest, sock_type: u16) {
    ev.family = d.family;
    ev.port = d.port;
    ev.addr = d.addr;
    ev.sock_type = sock_type;
}

/// The decision a process already consumed for sending to `d` (see the module doc).
#[inline(always)]
fn decided(label: u32, d: &Dest, sock_type: u16) -> Option<u32> {
    let key = send_key(label, d, sock_type);
    // SAFETY: reading a plain value out of the map.
    let entry = unsafe { SEND_DECIDED.get(&key) }?;
    if entry.start_time != task::process_start() {
        // An earlier process with the same pid.
        return None;
    }
    maps::count(STAT_SEND_DECIDED);
    Some(entry.verdict)
}

#[inline(always)]
fn send_key(label: u32, d: &Dest, sock_type: u16) -> SendKey {
    SendKey {
        tgid: current_tgid(),
        label,
        family: d.family,
        port: d.port,
        sock_type: u32::from(sock_type),
        addr: d.addr,
    }
}

/// Remembers the decision a send of the process consumed (best effort: without the entry
/// the next datagram is simply asked about again).
#[inline(always)]
fn remember(label: u32, d: &Dest, sock_type: u16, verdict: u32) {
    let value = SendDecided {
        start_time: task::process_start(),
        verdict,
        _pad: 0,
    };
    let _ = SEND_DECIDED.insert(send_key(label, d, sock_type), value, 0);
}

/// Consumes the decision of the same action (pending actions are the caller's), remembering
/// a send's for its process. `None`: there is none.
#[inline(always)]
fn consume(state: &mut TaskState, kind: u32, d: &Dest, sock_type: u16) -> Option<Verdict> {
    if state.kind != kind || state.action_hash != d.hash() {
        return None;
    }
    let verdict = match state.state {
        STATE_ALLOWED => Verdict::Allow,
        STATE_DENIED => Verdict::Deny,
        _ => return None,
    };
    if kind == KIND_SEND || kind == KIND_UNIX {
        remember(state.label, d, sock_type, state.state);
    }
    state.state = STATE_IDLE;
    Some(verdict)
}

/// What the kernel answers by itself for a destination: the policy's fast path, a grant, a
/// decision the process already consumed (sends). `None`: nothing; it must be held.
#[inline(always)]
fn kernel_answer(label: u32, kind: u32, d: &Dest, sock_type: u16) -> Option<Verdict> {
    // The fast path and grants describe destinations, not the addresses a socket listens on.
    if kind == KIND_LISTEN {
        return None;
    }
    if fast_allowed(label, d, sock_type) {
        return Some(Verdict::Allow);
    }
    if granted(label, d, sock_type) == Granted::Yes {
        maps::count(STAT_GRANT_ALLOWED);
        return Some(Verdict::Allow);
    }
    if kind == KIND_SEND {
        return match decided(label, d, sock_type) {
            Some(STATE_ALLOWED) => Some(Verdict::Allow),
            Some(_) => Some(Verdict::Deny),
            None => None,
        };
    }
    None
}

/// Refuses an action nothing in the kernel allowed, where it cannot be held, and tells the
/// daemon.
#[inline(always)]
fn refuse_unholdable(label: u32, kind: u32, d: &Dest, sock_type: u16) -> Verdict {
    report_refusal(label, kind, d, sock_type, ERROR_UNHOLDABLE, |_| {});
    Verdict::Deny
}

/// Counts an action the kernel refused or killed by itself (where it could not be held) and
/// tells the daemon: `action` on `d`, `detail` says why, `more` fills the rest of the event.
#[inline(always)]
fn report_refusal(
    label: u32,
    action: u32,
    d: &Dest,
    sock_type: u16,
    detail: i32,
    more: impl FnOnce(&mut countersign_ebpf::Event),
) {
    maps::count(STAT_UNHOLDABLE);
    let Some(ev) = hold::event(countersign_ebpf::KIND_ERROR, label) else {
        maps::count(countersign_ebpf::STAT_EVENTS_DROPPED);
        return;
    };
    fill(ev, d, sock_type);
    ev.action = action as u16;
    ev.detail = detail;
    more(ev);
    if !maps::emit(ev) {
        maps::count(countersign_ebpf::STAT_EVENTS_DROPPED);
    }
}

/// LSM mode: decides a labelled task's connect or send to `dest` (or its listen on `dest`).
#[inline(always)]
fn lsm_outbound(state: &mut TaskState, kind: u32, dest: &Dest, sock_type: u16) -> Verdict {
    let label = state.label;
    let event = |kind| {
        let ev = hold::event(kind, label)?;
        fill(ev, dest, sock_type);
        Some(ev)
    };
    if label == LABEL_CANARY {
        if let Some(ev) = event(KIND_CANARY_CONNECT) {
            maps::emit(ev);
        }
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_LSM {
        return Verdict::Allow;
    }
    // The same action pending or decided goes to the state machine; anything else may be
    // answered in the kernel (an idle task's allowed connect does not even hash it).
    let same = state.state != STATE_IDLE && state.kind == kind && state.action_hash == dest.hash();
    if same {
        if let Some(v) = consume(state, kind, dest, sock_type) {
            return v;
        }
    } else {
        if let Some(v) = kernel_answer(label, kind, dest, sock_type) {
            return v;
        }
        if !task::can_hold_net() {
            return refuse_unholdable(label, kind, dest, sock_type);
        }
    }
    hold::decide(state, kind, dest.hash(), || event(kind))
}

/// `socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)`.
#[inline(always)]
pub fn lsm_connect(sock: *const u8, address: *const u8) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: the pointer comes from the map lookup and is valid for this run.
    let state = unsafe { &mut *state };
    // SAFETY: the kernel's copy of the caller's sockaddr, read with the checked helper.
    let Some(dest) = read_dest(address, |p| {
        unsafe { bpf_probe_read_kernel(p.cast::<[u8; 8]>()) }.ok()
    }) else {
        return Verdict::Allow;
    };
    let (_, sock_type) = socket_state_type(sock);
    lsm_outbound(state, KIND_CONNECT, &dest, sock_type)
}

/// LSM mode: a labelled task's connect (`unix_stream_connect`) or datagram (`unix_may_send`)
/// to the local socket `peer_sk` (`struct sock *`). The policy's rules for the peer's file or
/// abstract name are in the kernel: allowed passes; named otherwise, or unnamed for a label
/// that holds every local socket, is held (or refused where nothing restarts) — and once the
/// process consumed a decision for that socket, its later connects and datagrams there are
/// answered in the kernel. Other local sockets pass.
#[inline(always)]
pub fn lsm_unix(peer_sk: *const u8, sock_type: u16) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: the pointer comes from the map lookup and is valid for this run.
    let state = unsafe { &mut *state };
    if maps::config().mode != MODE_LSM || state.label == LABEL_CANARY {
        return Verdict::Allow;
    }
    let Some(peer) = crate::unix::peer(peer_sk) else {
        return Verdict::Allow;
    };
    let dest = Dest {
        family: AF_UNIX,
        port: 0,
        addr: peer.to_addr(),
    };
    let label = state.label;
    let same =
        state.state != STATE_IDLE && state.kind == KIND_UNIX && state.action_hash == dest.hash();
    if same {
        if let Some(v) = consume(state, KIND_UNIX, &dest, 0) {
            return v;
        }
    } else {
        if !crate::unix::restricts(label, peer) {
            return Verdict::Allow;
        }
        match decided(label, &dest, 0) {
            Some(STATE_ALLOWED) => return Verdict::Allow,
            Some(_) => return Verdict::Deny,
            None => {}
        }
        if !task::can_hold_net() {
            return refuse_unholdable(label, KIND_UNIX, &dest, sock_type);
        }
    }
    hold::decide(state, KIND_UNIX, dest.hash(), || {
        let ev = hold::event(KIND_UNIX, label)?;
        fill(ev, &dest, sock_type);
        ev.unix_name_len = crate::unix::read_name(peer_sk, &mut ev.unix_name);
        Some(ev)
    })
}

/// Fallback: `sys_exit_connect`. Without BPF LSM nothing sees a local socket's connect
/// before it is made (no cgroup program for `AF_UNIX` here), so the check comes right after
/// it, before the system call returns, on what the kernel connected: the peer of the socket
/// (its bound file or abstract name, as in LSM mode). Allowed in the kernel, or decided for
/// this process: nothing happens. Anything else — a socket a rule denies or holds, a deputy
/// held for every label — cannot be held any more: the task is killed before it returns to
/// its program (nothing was sent on the connection) and a signed `kernel:` record says so.
#[inline(always)]
pub fn sys_exit_connect(ctx: &TracePointContext) {
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    state.flags &= !FLAG_IN_CONNECT;
    let label = state.label;
    if maps::config().mode != MODE_FALLBACK || label == LABEL_CANARY {
        return;
    }
    // SAFETY: fixed offset of the return value in the record.
    if unsafe { ctx.read_at::<i64>(16) } != Ok(0) {
        return;
    }
    let Some(fd) = task::syscall_arg0() else {
        return;
    };
    let Some((peer_sk, sock_type)) = crate::unix::fd_socket(fd) else {
        return;
    };
    let Some(peer) = crate::unix::peer(peer_sk) else {
        return;
    };
    let dest = Dest {
        family: AF_UNIX,
        port: 0,
        addr: peer.to_addr(),
    };
    if state.state != STATE_IDLE && state.kind == KIND_UNIX && state.action_hash == dest.hash() {
        // The seccomp notifier held this connect of a launched agent before it was made
        // and wrote its decision: approved for this socket, it is consumed (and holds for
        // the process); anything else is killed below.
        if consume(state, KIND_UNIX, &dest, 0) == Some(Verdict::Allow) {
            return;
        }
    } else {
        if !crate::unix::restricts(label, peer) {
            return;
        }
        if decided(label, &dest, 0) == Some(STATE_ALLOWED) {
            return;
        }
    }
    hold::kill_current();
    report_refusal(
        label,
        KIND_UNIX,
        &dest,
        sock_type,
        ERROR_UNIX_KILLED,
        |ev| {
            ev.unix_name_len = crate::unix::read_name(peer_sk, &mut ev.unix_name);
        },
    );
}

/// Fallback mode, kernels 6.7+: the cgroup `connect_unix` (`send` false) and `sendmsg_unix`
/// programs, which the kernel runs before a local socket's connect, and before a datagram
/// sent with an address, whatever path the call took. They run before the kernel looks the
/// path up, so they cannot tell which socket it names (the policy names sockets by file):
/// - a connect that came through `connect(2)` goes on: `sys_exit_connect` checks what it
///   reached (and the seccomp notifier held it before, for a launched agent); one that came
///   another way (io_uring, the 32-bit entry) cannot be checked after it: it is refused;
/// - a datagram with an address (`sendto`/`sendmsg`/`sendmmsg`, io_uring, 32-bit) from a
///   label that restricts local sockets is refused: nothing could check after it which socket
///   it reached. Connecting first (then sending) is held like any connect.
///
/// Refusals are counted and reported like the other actions that cannot be held.
#[inline(always)]
pub fn cgroup_unix(ctx: &SockAddrContext, send: bool) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if maps::config().mode != MODE_FALLBACK || state.label == LABEL_CANARY {
        return Verdict::Allow;
    }
    if send {
        if !crate::unix::restricted(state.label) {
            return Verdict::Allow;
        }
    } else if state.flags & FLAG_IN_CONNECT != 0 {
        return Verdict::Allow;
    }
    maps::count(STAT_UNHOLDABLE);
    match hold::event(countersign_ebpf::KIND_ERROR, state.label) {
        Some(ev) => {
            ev.family = AF_UNIX;
            ev.action = KIND_UNIX as u16;
            ev.detail = ERROR_UNIX_UNSEEN;
            ev.unix_name_len = unix_address(ctx, &mut ev.unix_name);
            if !maps::emit(ev) {
                maps::count(countersign_ebpf::STAT_EVENTS_DROPPED);
            }
        }
        None => maps::count(countersign_ebpf::STAT_EVENTS_DROPPED),
    }
    Verdict::Deny
}

/// The kernel's copy of the address a `connect_unix`/`sendmsg_unix` program runs for, into
/// `name` (the `sun_path` bytes); its length (0 if unreadable). The context is the kernel's
/// `struct bpf_sock_addr_kern { struct sock *sk; struct sockaddr *uaddr; u64 tmp_reg;
/// void *t_ctx; u32 uaddrlen; }` (this layout since 6.7, the first kernel with these
/// programs).
#[inline(always)]
fn unix_address(ctx: &SockAddrContext, name: &mut [u8; countersign_ebpf::UNIX_NAME_LEN]) -> u32 {
    let kern = ctx.sock_addr as *const u8;
    // SAFETY: reads of kernel memory with the checked helper.
    let Ok(uaddr) = (unsafe { bpf_probe_read_kernel(kern.wrapping_add(8).cast::<u64>()) }) else {
        return 0;
    };
    // SAFETY: as above.
    let Ok(len) = (unsafe { bpf_probe_read_kernel(kern.wrapping_add(32).cast::<u32>()) }) else {
        return 0;
    };
    // SAFETY: as above (`sun_path` follows the 2-byte family).
    match unsafe { bpf_probe_read_kernel_buf((uaddr as *const u8).wrapping_add(2), name) } {
        Ok(()) => len.clamp(2, 2 + countersign_ebpf::UNIX_NAME_LEN as u32) - 2,
        Err(_) => 0,
    }
}

/// `socket_listen(struct socket *sock, int backlog)`: a labelled task's socket that starts
/// listening on an address other than loopback is held as a [`KIND_LISTEN`] for that address
/// (all zeros: every address; a socket not bound yet is bound to every address by `listen`),
/// since any peer that reaches the host may then connect to it and be answered over that
/// connection. Loopback listeners and local sockets pass. Where nothing restarts (io_uring's
/// `IORING_OP_LISTEN`) it is refused unless the process already consumed a decision for it.
#[inline(always)]
pub fn lsm_listen(sock: *const u8) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: the pointer comes from the map lookup and is valid for this run.
    let state = unsafe { &mut *state };
    // (The canary proves the hooks with a connect; it never listens. Other modes:
    // `lsm_outbound` lets it pass.)
    if state.label == LABEL_CANARY {
        return Verdict::Allow;
    }
    let Some(dest) = listen_address(sock) else {
        return Verdict::Allow;
    };
    if dest.is_loopback() {
        return Verdict::Allow;
    }
    let (_, sock_type) = socket_state_type(sock);
    lsm_outbound(state, KIND_LISTEN, &dest, sock_type)
}

/// Fallback: `sys_exit_listen(int fd, int backlog)`. Without BPF LSM nothing sees a listen
/// before it is made. A task under the seccomp notifier (started by `countersign exec`) has
/// its listens decided before, and those on IPv4/IPv6 made by the daemon on the socket it
/// read; others (a local socket's) go on in the kernel. Either way the socket its descriptor
/// holds now must be one that may listen: loopback, another family, or the address approved;
/// anything else (a socket another thread put in the descriptor while the call waited) is
/// killed before the call returns, with a signed `kernel:` record. Any other labelled task's
/// successful listen on the network is held here, after the fact: stopped before it returns
/// to its program (before it can accept a connection) and asked about; the daemon holds it
/// in a ptrace stop, and lets it go on or kills it. One that cannot be asked about (the ring
/// is full) is killed too.
#[inline(always)]
pub fn sys_exit_listen(ctx: &TracePointContext) {
    const SOCK_STREAM: u16 = 1;
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    state.flags &= !FLAG_IN_LISTEN;
    let label = state.label;
    if maps::config().mode != MODE_FALLBACK || label == LABEL_CANARY {
        return;
    }
    // SAFETY: fixed offset of the return value in the record.
    if unsafe { ctx.read_at::<i64>(16) } != Ok(0) {
        return;
    }
    // A socket that cannot be read listens on every address, for all this check knows.
    let sock = task::syscall_arg0().and_then(crate::unix::fd_sock);
    let dest = match sock {
        Some(sock) => match listen_address(sock) {
            Some(dest) => dest,
            None => return,
        },
        None => Dest {
            family: AF_INET,
            port: 0,
            addr: [0; 16],
        },
    };
    if dest.is_loopback() {
        return;
    }
    let sock_type = sock.map_or(SOCK_STREAM, |s| socket_state_type(s).1);
    if state.flags & FLAG_NOTIFIED != 0 {
        // Decided by the daemon, which made the listen itself on the socket it read; this
        // one is in the descriptor now. Approved for its address (or, decided unbound, for
        // every address on the port the kernel then picked): consumed. Anything else was
        // put in the descriptor while the call waited.
        let unbound = Dest { port: 0, ..dest };
        if state.kind == KIND_LISTEN
            && state.state == STATE_ALLOWED
            && (state.action_hash == dest.hash() || state.action_hash == unbound.hash())
        {
            state.state = STATE_IDLE;
            return;
        }
    } else {
        let requested = hold::event(KIND_LISTEN, label)
            .map(|ev| {
                fill(ev, &dest, sock_type);
                hold::request(state, KIND_LISTEN, dest.hash(), ev);
            })
            .is_some();
        if requested {
            return;
        }
        // Nobody can be asked (the ring is full): not let go undecided.
    }
    hold::kill_current();
    report_refusal(
        label,
        KIND_LISTEN,
        &dest,
        sock_type,
        ERROR_LISTEN_KILLED,
        |_| {},
    );
}

/// Fallback: `sys_enter_listen`. What `inet_listen` sees until `sys_exit_listen` came through
/// the system call (the notifier or the exit check decides it).
#[inline(always)]
pub fn sys_enter_listen() {
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if maps::config().mode == MODE_FALLBACK {
        state.flags |= FLAG_IN_LISTEN;
    }
}

/// Fallback, a kprobe on `inet_listen(struct socket *sock, int backlog)`: every IPv4/IPv6
/// listen, whatever path it took. One of a labelled task on the network that did not come
/// through `listen(2)` (io_uring's `IORING_OP_LISTEN`, inline or on its threads; the 32-bit
/// entry's `socketcall`), or any of a task under the seccomp notifier, cannot be held: it is
/// killed (the whole process, before it can accept), and reported.
#[inline(always)]
pub fn inet_listen(sock: *const u8) {
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    let label = state.label;
    // Inside `listen(2)`, the notifier or the exit check decides it; but a task under the
    // notifier never makes an IPv4/IPv6 listen itself (the daemon makes those), so one here
    // came from a socket put in the descriptor after the daemon read it.
    let in_syscall = state.flags & FLAG_IN_LISTEN != 0 && state.flags & FLAG_NOTIFIED == 0;
    if maps::config().mode != MODE_FALLBACK || label == LABEL_CANARY || in_syscall {
        return;
    }
    let Some(dest) = listen_address(sock) else {
        return;
    };
    if dest.is_loopback() {
        return;
    }
    hold::kill_current();
    let sock_type = socket_state_type(sock).1;
    report_refusal(
        label,
        KIND_LISTEN,
        &dest,
        sock_type,
        ERROR_LISTEN_UNSEEN,
        |_| {},
    );
}

/// The address an IPv4/IPv6 socket is bound to (`None`: another family, which no peer on the
/// network reaches). Unreadable offsets give every address (held, never let through).
#[inline(always)]
fn listen_address(sock: *const u8) -> Option<Dest> {
    let o = maps::kernel_offsets();
    let every = Dest {
        family: AF_INET,
        port: 0,
        addr: [0; 16],
    };
    if o.listen_valid == 0 {
        return Some(every);
    }
    // SAFETY: kernel memory, read with the checked helper.
    let read = |at: *const u8, off: u32| -> Option<[u8; 16]> {
        unsafe { bpf_probe_read_kernel(at.wrapping_add(off as usize).cast::<[u8; 16]>()) }.ok()
    };
    // SAFETY: as above.
    let Ok(sk) = (unsafe {
        bpf_probe_read_kernel(sock.wrapping_add(o.socket_sk as usize).cast::<*const u8>())
    }) else {
        return Some(every);
    };
    // SAFETY: as above.
    let family =
        unsafe { bpf_probe_read_kernel(sk.wrapping_add(o.skc_family as usize).cast::<u16>()) }
            .ok()?;
    // SAFETY: as above.
    let port = unsafe { bpf_probe_read_kernel(sk.wrapping_add(o.skc_num as usize).cast::<u16>()) }
        .unwrap_or(0);
    let mut addr = [0u8; 16];
    match family {
        AF_INET => {
            // SAFETY: as above.
            let v4 = unsafe {
                bpf_probe_read_kernel(sk.wrapping_add(o.skc_rcv_saddr as usize).cast::<[u8; 4]>())
            }
            .ok()?;
            addr[..4].copy_from_slice(&v4);
        }
        AF_INET6 => addr = read(sk, o.skc_v6_rcv_saddr)?,
        _ => return None,
    }
    Some(Dest { family, port, addr }.unmapped())
}

/// `struct socket` starts with `socket_state state; short type;`: (state, type).
#[inline(always)]
fn socket_state_type(sock: *const u8) -> (u32, u16) {
    // SAFETY: read with the checked helper.
    let state = unsafe { bpf_probe_read_kernel(sock.cast::<u32>()) }.unwrap_or(0);
    // SAFETY: as above.
    let ty = unsafe { bpf_probe_read_kernel(sock.wrapping_add(4).cast::<u16>()) }.unwrap_or(0);
    (state, ty)
}

/// `socket_sendmsg(struct socket *sock, struct msghdr *msg, int size)`: a send that names a
/// destination (`msg->msg_name`, the kernel's copy) is an action for that destination; one
/// without (a connected socket's) was decided by its connect. A stream socket's destination
/// counts only while it is unconnected (TCP Fast Open opens the connection here, without
/// `socket_connect`); a connected one ignores it.
#[inline(always)]
pub fn lsm_sendmsg(sock: *const u8, msg: *const u8) -> Verdict {
    // (Local sockets' datagrams are decided in `unix_may_send`.)
    const SS_UNCONNECTED: u32 = 1;
    const SOCK_STREAM: u16 = 1;
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    let o = maps::kernel_offsets();
    if o.task_valid == 0 {
        // Without `msghdr`'s layout the destination cannot be read: refused, not guessed.
        return Verdict::Deny;
    }
    // SAFETY: read with the checked helper.
    let Ok(name) =
        (unsafe { bpf_probe_read_kernel(msg.wrapping_add(o.msghdr_name as usize).cast::<u64>()) })
    else {
        return Verdict::Deny;
    };
    let (sock_state, sock_type) = socket_state_type(sock);
    // A raw, packet or other unusual socket this process was not allowed to create (passed
    // in by another process, or made before it was labelled) sends nothing, whatever the
    // address says.
    if !crate::socket::may_send_on(state.label, sock, sock_type) {
        return Verdict::Deny;
    }
    if name == 0 {
        return Verdict::Allow;
    }
    // SAFETY: as in `lsm_connect`.
    let Some(dest) = read_dest(name as *const u8, |p| {
        unsafe { bpf_probe_read_kernel(p.cast::<[u8; 8]>()) }.ok()
    }) else {
        return Verdict::Allow;
    };
    if sock_type == SOCK_STREAM && sock_state != SS_UNCONNECTED {
        return Verdict::Allow;
    }
    lsm_outbound(state, KIND_SEND, &dest, sock_type)
}

/// Fallback: `sys_enter_connect(int fd, struct sockaddr *uservaddr, int addrlen)`.
#[inline(always)]
pub fn sys_enter_connect(ctx: &TracePointContext) {
    // A task without room is refused by the cgroup program.
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if maps::config().mode != MODE_FALLBACK || state.label == LABEL_CANARY {
        return;
    }
    // Until `sys_exit_connect`: a local socket this connect reaches is checked there.
    state.flags |= FLAG_IN_CONNECT;
    // SAFETY: fixed offset of the second syscall argument in the record.
    let Ok(uaddr) = (unsafe { ctx.read_at::<u64>(24) }) else {
        return;
    };
    // SAFETY: user memory of the current task, read with the checked helper.
    let Some(dest) = read_dest(uaddr as *const u8, |p| {
        unsafe { bpf_probe_read_user(p.cast::<[u8; 8]>()) }.ok()
    }) else {
        return;
    };
    let hash = dest.hash();
    if state.flags & FLAG_GRANT_CHECK != 0 {
        // A grant's pass that never reached the cgroup program (the connect failed before
        // it): not a decision to keep; this connect is looked at afresh.
        state.flags &= !FLAG_GRANT_CHECK;
        if state.state == STATE_ALLOWED {
            state.state = STATE_IDLE;
        }
    }
    if state.kind == KIND_CONNECT && state.action_hash == hash {
        match state.state {
            // A restart while pending: stop again; the cgroup program restarts the syscall.
            STATE_PENDING => {
                hold::stop_current();
                return;
            }
            // Decided: the cgroup program consumes the decision.
            STATE_ALLOWED | STATE_DENIED => return,
            _ => {}
        }
    }
    if fast_allowed(state.label, &dest, 0) {
        // The cgroup program consumes this like an approval.
        state.kind = KIND_CONNECT;
        state.action_hash = hash;
        state.state = STATE_ALLOWED;
        return;
    }
    if granted(state.label, &dest, 0) != Granted::No {
        // Passed on; the cgroup program checks the grant again with the socket type.
        state.kind = KIND_CONNECT;
        state.action_hash = hash;
        state.state = STATE_ALLOWED;
        state.flags |= FLAG_GRANT_CHECK;
        return;
    }
    let requested = hold::event(KIND_CONNECT, state.label)
        .map(|ev| {
            fill(ev, &dest, 0);
            hold::request(state, KIND_CONNECT, hash, ev);
        })
        .is_some();
    if !requested {
        // The cgroup program refuses what is not pending or decided.
        state.state = STATE_IDLE;
        state.kind = 0;
    }
}

/// Fallback: the cgroup `connect4`/`connect6` programs, on the kernel's copy of the address.
#[inline(always)]
pub fn cgroup_connect(ctx: &SockAddrContext, v6: bool) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if state.label == LABEL_CANARY {
        if let Some(ev) = hold::event(KIND_CANARY_CONNECT, state.label) {
            ev.family = if v6 { AF_INET6 } else { AF_INET };
            maps::emit(ev);
        }
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_FALLBACK {
        return Verdict::Allow;
    }
    let dest = sock_addr_dest(ctx, v6);
    let hash = dest.hash();
    // SAFETY: the context pointer is valid for this run.
    let sock_type = unsafe { (*ctx.sock_addr).type_ } as u16;
    // A TCP Fast Open `sendto` connects here after its send tracepoint made the request.
    if state.kind == KIND_SEND && state.action_hash == hash {
        return match consume(state, KIND_SEND, &dest, sock_type) {
            Some(v) => v,
            None if state.state == STATE_PENDING => Verdict::Held,
            None => refuse_unholdable(state.label, KIND_CONNECT, &dest, sock_type),
        };
    }
    if state.kind == KIND_CONNECT && state.action_hash == hash {
        match state.state {
            STATE_PENDING => {
                // The tracepoint cannot know the socket type; the daemon reads it here.
                state.sock_type = sock_type;
                return Verdict::Held;
            }
            STATE_ALLOWED if state.flags & FLAG_GRANT_CHECK != 0 => {
                state.state = STATE_IDLE;
                state.flags &= !FLAG_GRANT_CHECK;
                if granted(state.label, &dest, sock_type) == Granted::Yes {
                    maps::count(STAT_GRANT_ALLOWED);
                    return Verdict::Allow;
                }
                // Refused rather than held: this program cannot stop the task (fail closed).
                hold::report_error(state.label, ERROR_GRANT_RECHECK);
                return Verdict::Deny;
            }
            STATE_ALLOWED => {
                state.state = STATE_IDLE;
                return Verdict::Allow;
            }
            STATE_DENIED => {
                state.state = STATE_IDLE;
                return Verdict::Deny;
            }
            _ => {}
        }
    }
    // A labelled connect that did not pass the tracepoint (io_uring, a 32-bit syscall, a
    // rewritten address): nobody was asked; what the kernel allows passes, the rest is
    // refused.
    match kernel_answer(state.label, KIND_CONNECT, &dest, sock_type) {
        Some(v) => v,
        None => refuse_unholdable(state.label, KIND_CONNECT, &dest, sock_type),
    }
}

/// Where a send system call's destination is.
#[derive(Clone, Copy)]
pub enum SendCall {
    /// `sendto(fd, buf, len, flags, addr, addrlen)`.
    SendTo,
    /// `sendmsg(fd, msg, flags)`: `msg->msg_name`.
    SendMsg,
    /// `sendmmsg(fd, msgvec, vlen, flags)`: the first message's `msg_name`.
    SendMmsg,
}

/// Fallback: `sys_enter_sendto`/`sendmsg`/`sendmmsg`. A labelled send that names a
/// destination the kernel does not answer becomes a request and the task is stopped; the
/// cgroup `sendmsg4/6` programs (UDP) or `connect4/6` (TCP Fast Open) make the syscall
/// restart until it is decided, on the kernel's copy of the address. Only a `sendmmsg`'s
/// first destination is read here: another undecided one in the batch is refused.
#[inline(always)]
pub fn sys_enter_send(ctx: &TracePointContext, call: SendCall) {
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if maps::config().mode != MODE_FALLBACK || state.label == LABEL_CANARY {
        return;
    }
    // The syscall's second argument (`sys_enter_*` records: args from offset 16, 8 each);
    // `sendto`'s address is its fifth.
    let at = match call {
        SendCall::SendTo => 48,
        SendCall::SendMsg | SendCall::SendMmsg => 24,
    };
    // SAFETY: a fixed argument slot of the record.
    let Ok(arg) = (unsafe { ctx.read_at::<u64>(at) }) else {
        return;
    };
    let uaddr = match call {
        SendCall::SendTo => arg,
        // `struct msghdr` (and `struct mmsghdr`, which starts with one) begins with
        // `msg_name` in the UAPI.
        // SAFETY: user memory of the current task, read with the checked helper.
        SendCall::SendMsg | SendCall::SendMmsg => {
            unsafe { bpf_probe_read_user(arg as *const u64) }.unwrap_or(0)
        }
    };
    if uaddr == 0 {
        return;
    }
    // SAFETY: as in `sys_enter_connect`.
    let Some(dest) = read_dest(uaddr as *const u8, |p| {
        unsafe { bpf_probe_read_user(p.cast::<[u8; 8]>()) }.ok()
    }) else {
        return;
    };
    let hash = dest.hash();
    if state.kind == KIND_SEND && state.action_hash == hash {
        match state.state {
            STATE_PENDING => {
                hold::stop_current();
                return;
            }
            // The cgroup program consumes the decision.
            STATE_ALLOWED | STATE_DENIED => return,
            _ => {}
        }
    }
    // What the kernel may answer for some socket type is left to the cgroup program, which
    // knows the type.
    let label = state.label;
    if fast_allowed(label, &dest, ANY_TYPE)
        || granted(label, &dest, 0) != Granted::No
        || decided(label, &dest, 2).is_some()
        || decided(label, &dest, 1).is_some()
    {
        return;
    }
    let requested = hold::event(KIND_SEND, label)
        .map(|ev| {
            fill(ev, &dest, 0);
            hold::request(state, KIND_SEND, hash, ev);
        })
        .is_some();
    if !requested {
        state.state = STATE_IDLE;
        state.kind = 0;
    }
}

/// Fallback: the cgroup `sendmsg4`/`sendmsg6` programs, for every UDP send with an address,
/// on the kernel's copy of it.
#[inline(always)]
pub fn cgroup_sendmsg(ctx: &SockAddrContext, v6: bool) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if state.label == LABEL_CANARY {
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_FALLBACK {
        return Verdict::Allow;
    }
    let dest = sock_addr_dest(ctx, v6);
    // SAFETY: the context pointer is valid for this run.
    let sock_type = unsafe { (*ctx.sock_addr).type_ } as u16;
    if state.kind == KIND_SEND && state.action_hash == dest.hash() {
        if let Some(v) = consume(state, KIND_SEND, &dest, sock_type) {
            return v;
        }
        if state.state == STATE_PENDING {
            // The daemon shows the type the tracepoint could not see.
            state.sock_type = sock_type;
            return Verdict::Held;
        }
    }
    match kernel_answer(state.label, KIND_SEND, &dest, sock_type) {
        Some(v) => v,
        // Did not pass the tracepoint: io_uring, a 32-bit syscall, a batch's other address.
        None => refuse_unholdable(state.label, KIND_SEND, &dest, sock_type),
    }
}

/// The destination in a cgroup `sock_addr` context (IPv4-mapped IPv6 as IPv4).
#[inline(always)]
fn sock_addr_dest(ctx: &SockAddrContext, v6: bool) -> Dest {
    // SAFETY: the context pointer is valid for this run; these are direct context loads.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let mut addr = [0u8; 16];
    let family = if v6 {
        let words = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        let mut i = 0;
        while i < 4 {
            let b = words[i].to_ne_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        AF_INET6
    } else {
        let b = sa.user_ip4.to_ne_bytes();
        addr[0] = b[0];
        addr[1] = b[1];
        addr[2] = b[2];
        addr[3] = b[3];
        AF_INET
    };
    Dest { family, port, addr }.unmapped()
}
