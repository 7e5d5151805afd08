//! Connect holds: the LSM hook (before anything is sent), and in fallback mode a tracepoint
//! that stops the task plus cgroup programs that make its connect restart or fail.
//!
//! What the kernel lets through without a stop: the policy's LPM trie, then the destination
//! grants (exact address and port, with an expiry per socket type). The fallback tracepoint
//! does not know the socket type: it passes a granted destination on, and the cgroup program
//! checks the grant again with the type (refusing, since it cannot hold, what it does not
//! cover).
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    programs::{SockAddrContext, TracePointContext},
};
use countersign_ebpf::{
    CONNECT_KEY_FIXED_BITS, ConnectKey, ERROR_GRANT_RECHECK, FLAG_GRANT_CHECK, GrantConnectKey,
    KIND_CANARY_CONNECT, KIND_CONNECT, LABEL_CANARY, MAX_PORT_SPANS, MODE_FALLBACK, MODE_LSM,
    PROTO_TCP, PROTO_UDP, STAT_FAST_ALLOWED, STAT_GRANT_ALLOWED, STATE_ALLOWED, STATE_DENIED,
    STATE_IDLE, STATE_PENDING, connect_hash,
};

use crate::{
    hold::{self, Verdict},
    label::{self, Task},
    maps::{self, CONNECT_ALLOW},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A destination: what a connect is bound to.
#[derive(Clone, Copy)]
struct Dest {
    family: u16,
    port: u16,
    addr: [u8; 16],
}

/// Reads a `sockaddr_in`/`sockaddr_in6` (UAPI layouts) through `read`; `None` for other
/// families, which countersign does not hold.
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
    Some(Dest { family, port, addr })
}

/// Whether the policy allows this connect in the kernel (no stop, no event). `sock_type` 0
/// (unknown) only matches entries that allow any protocol.
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
            maps::count(STAT_FAST_ALLOWED);
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
    // `struct socket` starts with `socket_state state; short type;`.
    // SAFETY: read with the checked helper.
    let sock_type = unsafe { bpf_probe_read_kernel(sock.add(4).cast::<u16>()) }.unwrap_or(0);
    let label = state.label;
    let event = |kind| {
        let mut ev = hold::event(kind, label);
        fill(&mut ev, &dest, sock_type);
        ev
    };
    if label == LABEL_CANARY {
        maps::emit(&event(KIND_CANARY_CONNECT));
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_LSM {
        return Verdict::Allow;
    }
    let hash = || connect_hash(dest.family, dest.port, &dest.addr);
    // The same connect pending or decided goes to the state machine; anything else may pass
    // in the kernel (an idle task's connect does not even hash its destination).
    let pending_same =
        state.state != STATE_IDLE && state.kind == KIND_CONNECT && state.action_hash == hash();
    if !pending_same {
        if fast_allowed(label, &dest, sock_type) {
            return Verdict::Allow;
        }
        if granted(label, &dest, sock_type) == Granted::Yes {
            maps::count(STAT_GRANT_ALLOWED);
            return Verdict::Allow;
        }
    }
    hold::decide(state, KIND_CONNECT, hash(), || event(KIND_CONNECT))
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
    let hash = connect_hash(dest.family, dest.port, &dest.addr);
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
    let mut ev = hold::event(KIND_CONNECT, state.label);
    fill(&mut ev, &dest, 0);
    if hold::request(state, KIND_CONNECT, hash, &mut ev) {
        hold::stop_current();
    } else {
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
        let mut ev = hold::event(KIND_CANARY_CONNECT, state.label);
        ev.family = if v6 { AF_INET6 } else { AF_INET };
        maps::emit(&ev);
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_FALLBACK {
        return Verdict::Allow;
    }
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
    let hash = connect_hash(family, port, &addr);
    if state.kind == KIND_CONNECT && state.action_hash == hash {
        match state.state {
            STATE_PENDING => {
                // The tracepoint cannot know the socket type; the daemon reads it here.
                state.sock_type = sa.type_ as u16;
                return Verdict::Held;
            }
            STATE_ALLOWED if state.flags & FLAG_GRANT_CHECK != 0 => {
                state.state = STATE_IDLE;
                state.flags &= !FLAG_GRANT_CHECK;
                let dest = Dest { family, port, addr };
                if granted(state.label, &dest, sa.type_ as u16) == Granted::Yes {
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
    // A labelled connect that did not pass the tracepoint (io_uring, TCP Fast Open, a
    // rewritten address): nobody was asked, so it is refused.
    hold::report_error(state.label, -(countersign_ebpf::EPERM));
    Verdict::Deny
}
