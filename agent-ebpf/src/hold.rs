//! The hold itself: the per-task state machine shared by the exec and connect hooks.
use aya_ebpf::helpers::{
    bpf_get_current_uid_gid, bpf_ktime_get_ns, generated::bpf_get_current_cgroup_id,
    generated::bpf_send_signal, generated::bpf_send_signal_thread,
};
use countersign_ebpf::{
    Event, FLAG_UNREPORTED, KIND_ERROR, STAT_DEFERRED, STAT_EVENTS_DROPPED, STAT_HOLDS,
    STATE_ALLOWED, STATE_DENIED, STATE_IDLE, STATE_PENDING, TaskState,
};

use crate::{
    label::{current_tgid, current_tid},
    maps,
};

pub const SIGKILL: u32 = 9;
pub const SIGSTOP: u32 = 19;

/// What a hook does with the action in front of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it run.
    Allow,
    /// Refuse it (`EPERM`).
    Deny,
    /// The task is stopping and the syscall restarts once it is continued.
    Held,
}

/// The event skeleton for the current task, in this CPU's scratch slot (an `Event` is too
/// big for the BPF stack next to a hook's own variables). `None` only if the slot cannot be
/// had, which the callers treat as an event that cannot be delivered (refused).
#[inline(always)]
pub fn event(kind: u32, label: u32) -> Option<&'static mut Event> {
    let ev = maps::EVENT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the slot belongs to this CPU for this program run (programs do not migrate
    // while they run); zeroed, then filled.
    let ev = unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        &mut *ev
    };
    ev.kind = kind;
    ev.label = label;
    ev.tgid = current_tgid();
    ev.tid = current_tid();
    ev.uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without arguments.
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    Some(ev)
}

/// Stops the current thread's process (a stop of one thread stops its whole group).
///
/// Sent to the thread, not the group: the call it is in returns `-ERESTARTNOINTR`, which is
/// restarted only if the thread goes back to user space with a signal pending. A stop sent
/// to the group while another thread's stop is still pending there is merged with it and
/// wakes nobody; a `SIGCONT` (the daemon releasing another thread) then discards that stop,
/// and this thread would return `ERESTARTNOINTR` (513) to its program. Its own stop always
/// marks it as having a signal pending, which a `SIGCONT` does not take back: the call then
/// restarts and meets its state again (held again, or decided).
#[inline(always)]
pub fn stop_current() {
    // SAFETY: helper call with a plain integer; it signals the current thread.
    unsafe { bpf_send_signal_thread(SIGSTOP) };
}

#[inline(always)]
pub fn kill_current() {
    // SAFETY: helper call with a plain integer; it signals the current thread group.
    unsafe { bpf_send_signal(SIGKILL) };
}

/// Decides an action of kind `kind` and hash `hash` by the task's state:
/// - the same action already pending: held again, silently (a spurious `SIGCONT`);
/// - the same action decided: the decision is consumed (allowed or denied once);
/// - anything else: a new request is recorded, reported and held.
///
/// `event` makes the filled event, only when a new request is made (the common paths do not
/// pay for it).
#[inline(always)]
pub fn decide(
    state: &mut TaskState,
    kind: u32,
    hash: u64,
    event: impl FnOnce() -> Option<&'static mut Event>,
) -> Verdict {
    let same = state.kind == kind && state.action_hash == hash;
    if same {
        match state.state {
            STATE_PENDING => {
                stop_current();
                return Verdict::Held;
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
    match event() {
        Some(ev) => {
            request(state, kind, hash, ev);
            Verdict::Held
        }
        // No scratch slot for the event: nobody could ever decide it.
        None => Verdict::Deny,
    }
}

/// Records a new pending request in `state`, stops the task and reports the request. A report
/// the ring has no room for is left in the state ([`FLAG_UNREPORTED`]): the task stays held
/// and the daemon picks it up from the task map, so that no burst turns requests into silent
/// refusals.
///
/// The state and the stop come before the report: on a preemptible kernel the daemon can
/// read the report, decide and continue the task before this program goes on. It then finds
/// the request pending, and its `SIGCONT` finds the stop already queued and drops it (the
/// call restarts and meets the decision). Reported first, the daemon could find the state
/// not yet pending (and give up the request), or continue the task before its stop, which
/// then held it for good.
#[inline(always)]
pub fn request(state: &mut TaskState, kind: u32, hash: u64, ev: &mut Event) {
    // SAFETY: helper without arguments.
    let id = unsafe { bpf_ktime_get_ns() } | 1;
    ev.request_id = id;
    ev.action_hash = hash;
    ev.exec_filename = state.exec_filename;
    ev.exec_argv = state.exec_argv;
    state.kind = kind;
    state.action_hash = hash;
    state.request_id = id;
    state.family = ev.family;
    state.port = ev.port;
    state.sock_type = ev.sock_type;
    state.addr = ev.addr;
    // The daemon writes its id for the request once it has seen it.
    state.user_id = 0;
    state.flags &= !FLAG_UNREPORTED;
    state.state = STATE_PENDING;
    stop_current();
    if !maps::emit(ev) {
        // The ring is full: the request stays held, and the daemon takes it from the task
        // map (everything it needs is in the state), so that a burst loses nothing.
        state.flags |= FLAG_UNREPORTED;
        maps::count(STAT_DEFERRED);
    }
    maps::count(STAT_HOLDS);
}

/// Reports a kernel-side failure to the daemon (best effort).
#[inline(always)]
pub fn report_error(label: u32, detail: i32) {
    let Some(ev) = event(KIND_ERROR, label) else {
        maps::count(STAT_EVENTS_DROPPED);
        return;
    };
    ev.detail = detail;
    if !maps::emit(ev) {
        maps::count(STAT_EVENTS_DROPPED);
    }
}
