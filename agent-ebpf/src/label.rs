//! Which tasks are agents: the per-thread task map, cgroup labels, inheritance at fork.
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    },
    programs::TracePointContext,
};
use countersign_ebpf::{
    LABEL_NONE, MAX_CGROUP_DEPTH, MODE_OFF, STAT_LABEL_INHERIT_FAILED, TaskState,
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
#[inline(always)]
pub fn current_task() -> Task {
    let config = maps::config();
    if config.mode == MODE_OFF {
        return Task::Unlabelled;
    }
    let tid = current_tid();
    if let Some(state) = TASKS.get_ptr_mut(tid) {
        if current_tgid() == config.daemon_tgid {
            return Task::Unlabelled;
        }
        return Task::Labelled(state);
    }
    if config.cgroup_labels == 0 || current_tgid() == config.daemon_tgid {
        return Task::Unlabelled;
    }
    let Some(label) = cgroup_label_cached() else {
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

/// The label of the current cgroup, through the cache of walks already made.
#[inline(always)]
fn cgroup_label_cached() -> Option<u32> {
    // SAFETY: helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: reading a u32 value out of the map.
    if let Some(label) = unsafe { CGROUP_CACHE.get(id) } {
        return (*label != LABEL_NONE).then_some(*label);
    }
    let label = cgroup_label();
    // Cgroup ids are never reused while the system runs, so the answer stays true for as long
    // as the configured labels do (a new daemon starts with an empty cache).
    let _ = CGROUP_CACHE.insert(id, label.unwrap_or(LABEL_NONE), 0);
    label
}

/// The label of the nearest labelled ancestor cgroup of the current task (or its own).
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

/// `sched_process_fork` runs in the parent before the child first runs: the child gets the
/// parent's label. A full map cannot be refused from a tracepoint; it is counted and the
/// daemon raises an alarm.
#[inline(always)]
pub fn inherit(ctx: &TracePointContext) {
    let parent = current_tid();
    // SAFETY: reading a plain value out of the map.
    let Some(state) = (unsafe { TASKS.get(parent) }) else {
        return;
    };
    let label = state.label;
    // SAFETY: the offset comes from the kernel's own format file for this tracepoint.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(maps::fork_child_pid_offset()) }) else {
        maps::count(STAT_LABEL_INHERIT_FAILED);
        return;
    };
    let child_state = TaskState {
        label,
        ..TaskState::default()
    };
    if TASKS.insert(child as u32, child_state, 0).is_err() {
        maps::count(STAT_LABEL_INHERIT_FAILED);
    }
}

#[inline(always)]
pub fn forget_current() {
    let _ = TASKS.remove(current_tid());
}
