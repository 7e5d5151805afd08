//! Which tasks are agents: the per-thread task map, cgroup labels (and the marking of new
//! cgroups until they are classified), inheritance by every task the kernel creates.
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    },
    programs::TracePointContext,
};
use countersign_ebpf::{
    CGROUP_MATCH, FLAG_NOTIFIED, KIND_CGROUP_NEW, LABEL_NONE, LABEL_UNCLASSIFIED, MAX_CGROUP_DEPTH,
    MODE_OFF, STAT_EVENTS_DROPPED, STAT_LABEL_INHERIT_FAILED, STATE_IDLE, TaskState,
};

use crate::maps::{self, CGROUP_CACHE, CGROUP_LABELS, TASKS};

/// The calling thread's id (the kernel's pid).
#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Who the calling thread is, for a hook.
pub enum Task {
    /// Not an agent (or countersign is off, or it is the daemon): let it be.
    Unlabelled,
    /// A labelled thread and its state.
    Labelled(*mut TaskState),
    /// Labelled (by its cgroup) but it cannot be given a state (the task map is full): its
    /// actions must be refused, since they cannot be held.
    NoRoom,
}

/// The calling thread. An unlabelled task costs one lookup in the task map, plus one in the
/// cgroup cache when cgroup labels exist (the ancestor walk runs once per cgroup).
///
/// A task under a cgroup the daemon has not classified yet gets the reserved label
/// [`LABEL_UNCLASSIFIED`]: its action is held like any labelled one until the daemon re-labels
/// the task or lets it go. An idle task that still carries that label (a child forked while
/// its cgroup was unclassified) looks at its cgroup again: labelled, unlabelled (its state is
/// removed) or still unclassified.
#[inline(always)]
pub fn current_task() -> Task {
    let config = maps::config();
    if config.mode == MODE_OFF {
        return Task::Unlabelled;
    }
    let tid = current_tid();
    let mut stale: Option<*mut TaskState> = None;
    if let Some(state) = TASKS.get_ptr_mut(tid) {
        if current_tgid() == config.daemon_tgid {
            return Task::Unlabelled;
        }
        // SAFETY: the pointer comes from the map lookup and is valid for this run.
        let s = unsafe { &*state };
        if s.label != LABEL_UNCLASSIFIED || s.state != STATE_IDLE {
            return Task::Labelled(state);
        }
        stale = Some(state);
    } else if config.cgroup_labels == 0 || current_tgid() == config.daemon_tgid {
        return Task::Unlabelled;
    }
    let label = cgroup_label_cached();
    if let Some(state) = stale {
        return match label {
            Some(label) => {
                // SAFETY: as above.
                unsafe { (*state).label = label };
                Task::Labelled(state)
            }
            None => {
                let _ = TASKS.remove(tid);
                Task::Unlabelled
            }
        };
    }
    let Some(label) = label else {
        return Task::Unlabelled;
    };
    let state = TaskState {
        label,
        ..TaskState::default()
    };
    if TASKS.insert(tid, state, 0).is_err() {
        return Task::NoRoom;
    }
    match TASKS.get_ptr_mut(tid) {
        Some(state) => Task::Labelled(state),
        None => Task::NoRoom,
    }
}

/// The label of the current cgroup, through the cache of walks already made. An
/// unclassified answer is never cached: the daemon's classification must be seen.
#[inline(always)]
fn cgroup_label_cached() -> Option<u32> {
    // SAFETY: helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: reading a u32 value out of the map.
    if let Some(label) = unsafe { CGROUP_CACHE.get(id) } {
        return (*label != LABEL_NONE).then_some(*label);
    }
    let label = cgroup_label();
    if label == Some(LABEL_UNCLASSIFIED) {
        return label;
    }
    // Cgroup ids are never reused while the system runs, so the answer stays true for as long
    // as the configured labels do (the daemon empties the cache when they change; a new
    // daemon starts with an empty cache).
    let _ = CGROUP_CACHE.insert(id, label.unwrap_or(LABEL_NONE), 0);
    label
}

/// The label of the nearest labelled (or unclassified) ancestor cgroup of the current task,
/// or its own.
#[inline(always)]
fn cgroup_label() -> Option<u32> {
    let mut level = MAX_CGROUP_DEPTH;
    while level >= 0 {
        // SAFETY: helper call with a plain integer.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 {
            // SAFETY: reading a u32 value out of the map.
            if let Some(label) = unsafe { CGROUP_LABELS.get(id) } {
                if *label != LABEL_NONE {
                    return Some(*label);
                }
            }
        }
        level -= 1;
    }
    None
}

/// The cgroup v2 id in a `cgroup_mkdir`/`cgroup_rmdir` record (`None` for cgroup v1
/// hierarchies, whose ids are another numbering).
#[inline(always)]
fn cgroup_event_id(ctx: &TracePointContext) -> Option<u64> {
    let (root_at, id_at) = maps::cgroup_event_offsets();
    // SAFETY: the offsets come from the kernel's own format file for these tracepoints.
    let root = unsafe { ctx.read_at::<i32>(root_at) }.ok()?;
    if root != 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { ctx.read_at::<u64>(id_at) }.ok()
}

/// `cgroup_mkdir` fires before the new directory is visible (no task can be in it yet): while
/// the policy matches cgroups, the cgroup is marked unclassified, any cached answer for its id
/// is dropped, and the daemon is told. A mark that cannot be written is reported (that cgroup
/// is not held: the daemon raises an alarm).
#[inline(always)]
pub fn cgroup_mkdir(ctx: &TracePointContext) {
    let config = maps::config();
    if config.cgroup_labels & CGROUP_MATCH == 0 || config.mode == MODE_OFF {
        return;
    }
    let Some(id) = cgroup_event_id(ctx) else {
        return;
    };
    let failed = CGROUP_LABELS.insert(id, LABEL_UNCLASSIFIED, 0).is_err();
    let _ = CGROUP_CACHE.remove(id);
    let Some(ev) = crate::hold::event(KIND_CGROUP_NEW, LABEL_UNCLASSIFIED) else {
        maps::count(STAT_EVENTS_DROPPED);
        return;
    };
    ev.cgroup_id = id;
    ev.detail = i32::from(failed);
    if !maps::emit(ev) {
        maps::count(STAT_EVENTS_DROPPED);
    }
}

/// `cgroup_rmdir`: a removed cgroup's entry goes (ids are never reused), so that the map holds
/// only live cgroups.
#[inline(always)]
pub fn cgroup_rmdir(ctx: &TracePointContext) {
    if maps::config().cgroup_labels == 0 {
        return;
    }
    if let Some(id) = cgroup_event_id(ctx) {
        let _ = CGROUP_LABELS.remove(id);
    }
}

/// `task_newtask` fires at the end of `copy_process` for every task the kernel creates, in
/// the creating task, with the new task's pid assigned and before it first runs: forks,
/// threads, and the threads the kernel starts for a process (io_uring's workers and SQPOLL
/// thread, which never pass `sched_process_fork`). The new task gets its creator's label. A
/// full map cannot be refused from a tracepoint; it is counted and the daemon raises an
/// alarm.
#[inline(always)]
pub fn inherit(ctx: &TracePointContext) {
    let parent = current_tid();
    // SAFETY: reading a plain value out of the map.
    let Some(state) = (unsafe { TASKS.get(parent) }) else {
        return;
    };
    let label = state.label;
    // The seccomp filter behind it is inherited too.
    let flags = state.flags & FLAG_NOTIFIED;
    // SAFETY: the offset comes from the kernel's own format file for this tracepoint.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(maps::newtask_pid_offset()) }) else {
        maps::count(STAT_LABEL_INHERIT_FAILED);
        return;
    };
    let child_state = TaskState {
        label,
        flags,
        ..TaskState::default()
    };
    if TASKS.insert(child as u32, child_state, 0).is_err() {
        maps::count(STAT_LABEL_INHERIT_FAILED);
    }
}

#[inline(always)]
pub fn forget_current() {
    let tid = current_tid();
    // A thread that exits while its loaded exec is watched (killed, denied) ends the watch.
    if maps::loaded_watched() {
        maps::unwatch_loaded(tid);
    }
    let _ = TASKS.remove(tid);
}
