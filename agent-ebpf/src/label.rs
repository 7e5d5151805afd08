//! Which tasks are agents: the per-thread task map, cgroup labels, inheritance at fork.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_ancestor_cgroup_id},
    programs::TracePointContext,
};
use countersign_ebpf::{
    LABEL_NONE, MAX_CGROUP_DEPTH, MODE_OFF, STAT_LABEL_INHERIT_FAILED, TaskState,
};

use crate::maps::{self, CGROUP_LABELS, TASKS};

/// The calling thread's id (the kernel's pid).
#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The state of the calling thread if it is labelled and countersign is enforcing; `None`
/// for everyone else, after one map lookup (plus the cgroup walk when cgroup labels exist).
#[inline(always)]
pub fn current_task() -> Option<*mut TaskState> {
    let config = maps::config();
    if config.mode == MODE_OFF {
        return None;
    }
    let tid = current_tid();
    if let Some(state) = TASKS.get_ptr_mut(tid) {
        if current_tgid() == config.daemon_tgid {
            return None;
        }
        return Some(state);
    }
    if config.cgroup_labels == 0 || current_tgid() == config.daemon_tgid {
        return None;
    }
    let label = cgroup_label()?;
    let state = TaskState {
        label,
        ..TaskState::default()
    };
    // A full map leaves the task unlabelled here; the cgroup walk finds it again next time.
    TASKS.insert(tid, state, 0).ok()?;
    TASKS.get_ptr_mut(tid)
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
