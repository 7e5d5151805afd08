//! Socket creation: a socket that is not an ordinary TCP, UDP, local or netlink one (raw,
//! packet, ICMP, SCTP, vsock, ...) is an action (`KIND_SOCKET`), because it sends what no
//! connect or send hold sees. LSM mode holds it in `socket_create`. Fallback mode holds IPv4
//! and IPv6 ones through the `socket` tracepoint (stop) and the cgroup `sock_create` program
//! (restart or refuse); other families cannot be refused there, so a task that creates one the
//! policy does not allow is killed.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    programs::{SockContext, TracePointContext},
};
use countersign_ebpf::{
    ERROR_SOCKET_KILLED, ERROR_UNHOLDABLE, KIND_ERROR, KIND_SOCKET, LABEL_CANARY, MODE_FALLBACK,
    MODE_LSM, STAT_EVENTS_DROPPED, STAT_UNHOLDABLE, STATE_ALLOWED, STATE_DENIED, STATE_IDLE,
    STATE_PENDING, SendDecided, SendKey, SocketKey, TaskState, ordinary_socket, socket_hash,
};

use crate::{
    hold::{self, Verdict},
    label::{self, Task, current_tgid},
    maps::{self, SEND_DECIDED, SOCKET_ALLOW},
    task,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// One socket creation: family, type (without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`), protocol.
#[derive(Clone, Copy)]
struct Socket {
    family: u16,
    sock_type: u16,
    protocol: u32,
}

impl Socket {
    #[inline(always)]
    fn new(family: u64, sock_type: u64, protocol: u64) -> Self {
        Self {
            family: family as u16,
            sock_type: (sock_type & 0xf) as u16,
            protocol: protocol as u32,
        }
    }

    #[inline(always)]
    fn ordinary(&self) -> bool {
        ordinary_socket(self.family, self.sock_type, self.protocol)
    }

    #[inline(always)]
    fn hash(&self) -> u64 {
        socket_hash(self.family, self.sock_type, self.protocol)
    }

    #[inline(always)]
    fn allowed(&self, label: u32) -> bool {
        let key = SocketKey {
            label,
            family: self.family,
            sock_type: self.sock_type,
        };
        // SAFETY: reading a plain value out of the map.
        unsafe { SOCKET_ALLOW.get(&key) }.is_some()
    }

    #[inline(always)]
    fn event(&self, kind: u32, label: u32) -> Option<&'static mut countersign_ebpf::Event> {
        let ev = hold::event(kind, label)?;
        ev.family = self.family;
        ev.sock_type = self.sock_type;
        ev.port = self.protocol as u16;
        Some(ev)
    }
}

/// Tells the daemon about a refusal or a kill (`detail`).
#[inline(always)]
fn report(s: &Socket, label: u32, detail: i32) {
    let Some(ev) = s.event(KIND_ERROR, label) else {
        maps::count(STAT_EVENTS_DROPPED);
        return;
    };
    ev.action = KIND_SOCKET as u16;
    ev.detail = detail;
    if !maps::emit(ev) {
        maps::count(STAT_EVENTS_DROPPED);
    }
}

/// The labelled task's state, if the current task is labelled and `s` is an action; `Err`
/// with the verdict otherwise.
#[inline(always)]
fn labelled(s: &Socket) -> Result<&'static mut TaskState, Verdict> {
    if s.ordinary() {
        return Err(Verdict::Allow);
    }
    match label::current_task() {
        // SAFETY: the pointer comes from the map lookup and is valid for this run.
        Task::Labelled(state) => Ok(unsafe { &mut *state }),
        Task::Unlabelled => Err(Verdict::Allow),
        Task::NoRoom => Err(Verdict::Deny),
    }
}

/// `socket_create(int family, int type, int protocol, int kern)`; the kernel's own sockets
/// (`kern`) are not actions.
#[inline(always)]
pub fn lsm_socket_create(family: u64, sock_type: u64, protocol: u64, kern: u64) -> Verdict {
    if kern != 0 {
        return Verdict::Allow;
    }
    let s = Socket::new(family, sock_type, protocol);
    let state = match labelled(&s) {
        Ok(state) => state,
        Err(v) => return v,
    };
    if state.label == LABEL_CANARY {
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_LSM {
        return Verdict::Allow;
    }
    let hash = s.hash();
    let same = state.state != STATE_IDLE && state.kind == KIND_SOCKET && state.action_hash == hash;
    if !same {
        if s.allowed(state.label) {
            return Verdict::Allow;
        }
        if !task::can_hold_net() {
            maps::count(STAT_UNHOLDABLE);
            report(&s, state.label, ERROR_UNHOLDABLE);
            return Verdict::Deny;
        }
    }
    let label = state.label;
    let verdict = hold::decide(state, KIND_SOCKET, hash, || s.event(KIND_SOCKET, label));
    if same && verdict == Verdict::Allow {
        // Its sends may use it (see `may_send_on`).
        remember_approved(label, &s);
    }
    verdict
}

/// The [`SEND_DECIDED`] key under which a process's approved socket kind is kept: family
/// moved out of the `AF_*` range, the type in the port.
#[inline(always)]
fn approved_key(label: u32, family: u16, sock_type: u16) -> SendKey {
    SendKey {
        tgid: current_tgid(),
        label,
        family: family | 0x8000,
        port: sock_type,
        sock_type: 0,
        addr: [0; 16],
    }
}

#[inline(always)]
fn remember_approved(label: u32, s: &Socket) {
    let value = SendDecided {
        start_time: task::process_start(),
        verdict: STATE_ALLOWED,
        _pad: 0,
    };
    let _ = SEND_DECIDED.insert(approved_key(label, s.family, s.sock_type), value, 0);
}

/// LSM mode, before any send: whether a labelled task may send on `sock` at all. Ordinary
/// sockets: yes. A raw, packet or other unusual one: only if the policy allows such sockets
/// in the kernel or this process had its creation approved — not one passed in by another
/// process or made before the task was labelled. A refusal is reported.
#[inline(always)]
pub fn may_send_on(label: u32, sock: *const u8, sock_type: u16) -> bool {
    let o = maps::kernel_offsets();
    // SAFETY: reads with the checked helper; a failed read is a refusal.
    let ops =
        unsafe { bpf_probe_read_kernel(sock.wrapping_add(o.socket_ops as usize).cast::<u64>()) }
            .unwrap_or(0) as *const u8;
    if ops.is_null() {
        return false;
    }
    // SAFETY: as above.
    let Ok(family) = (unsafe {
        bpf_probe_read_kernel(ops.wrapping_add(o.proto_ops_family as usize).cast::<i32>())
    }) else {
        return false;
    };
    let s = Socket::new(family as u64, u64::from(sock_type), 0);
    if s.ordinary() || s.allowed(label) {
        return true;
    }
    let key = approved_key(label, s.family, s.sock_type);
    // SAFETY: reading a plain value out of the map.
    if let Some(d) = unsafe { SEND_DECIDED.get(&key) }
        && d.verdict == STATE_ALLOWED
        && d.start_time == task::process_start()
    {
        return true;
    }
    maps::count(STAT_UNHOLDABLE);
    report(&s, label, ERROR_UNHOLDABLE);
    false
}

/// Fallback: `sys_enter_socket(int family, int type, int protocol)`.
#[inline(always)]
pub fn sys_enter_socket(ctx: &TracePointContext) {
    // SAFETY: fixed argument slots of the record.
    let read = |at| unsafe { ctx.read_at::<u64>(at) }.unwrap_or(0);
    let s = Socket::new(read(16), read(24), read(32));
    let Ok(state) = labelled(&s) else {
        return;
    };
    if maps::config().mode != MODE_FALLBACK || state.label == LABEL_CANARY {
        return;
    }
    let hash = s.hash();
    let inet = s.family == AF_INET || s.family == AF_INET6;
    if state.kind == KIND_SOCKET && state.action_hash == hash {
        match state.state {
            STATE_PENDING => {
                hold::stop_current();
                return;
            }
            // IPv4/IPv6: the cgroup program consumes the decision.
            STATE_ALLOWED | STATE_DENIED if inet => return,
            _ => {}
        }
    }
    if s.allowed(state.label) {
        return;
    }
    if !inet {
        // Nothing after this point can refuse it, and a stop would land after the socket
        // exists: the task dies before it returns to user space.
        state.state = STATE_IDLE;
        report(&s, state.label, ERROR_SOCKET_KILLED);
        hold::kill_current();
        return;
    }
    let requested = s
        .event(KIND_SOCKET, state.label)
        .map(|ev| hold::request(state, KIND_SOCKET, hash, ev))
        .is_some();
    if requested {
        hold::stop_current();
    } else {
        state.state = STATE_IDLE;
        state.kind = 0;
    }
}

/// Fallback: the cgroup `sock_create` program, for every IPv4/IPv6 socket a task creates.
#[inline(always)]
pub fn cgroup_sock_create(ctx: &SockContext) -> Verdict {
    // SAFETY: the context pointer is valid for this run; direct context loads.
    let sk = unsafe { &*ctx.sock };
    let s = Socket::new(
        u64::from(sk.family),
        u64::from(sk.type_),
        u64::from(sk.protocol),
    );
    let state = match labelled(&s) {
        Ok(state) => state,
        Err(v) => return v,
    };
    if state.label == LABEL_CANARY {
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_FALLBACK {
        return Verdict::Allow;
    }
    if state.kind == KIND_SOCKET && state.action_hash == s.hash() {
        match state.state {
            STATE_PENDING => return Verdict::Held,
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
    if s.allowed(state.label) {
        return Verdict::Allow;
    }
    // Did not pass the tracepoint (io_uring, a 32-bit syscall): refused.
    maps::count(STAT_UNHOLDABLE);
    report(&s, state.label, ERROR_UNHOLDABLE);
    Verdict::Deny
}
