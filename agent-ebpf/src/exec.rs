//! Exec holds. LSM mode: `bprm_check_security` holds before the new image is loaded, and an
//! approved exec is verified once more when its image is loaded. Fallback mode: the image is
//! held when loaded, before its first instruction.
//!
//! The fast path: a file whose (device, inode) the policy allows for the task's label runs
//! without a stop and without an event. LSM mode checks the file of every binfmt pass (a
//! script, then its interpreter: both must be allowed); fallback mode checks the loaded image
//! (`current->mm->exe_file`, the interpreter for a script). Any failed read means "not
//! allowed here": the slow path decides. After the policy's entries, the binary grants the
//! daemon wrote (same key, with an expiry) are looked up the same way.
use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_probe_read_user, bpf_task_pt_regs},
    },
    programs::TracePointContext,
};
use countersign_ebpf::{
    ARGV_VERIFY_MAX, ApprovedExec, ERROR_EXEC_RAN_EARLY, ERROR_EXEC_TRACED, ERROR_EXEC_UNVERIFIED,
    ExecKey, FLAG_EXEC_LOADED, FLAG_NOTIFIED, FileKey, KIND_CANARY_EXEC, KIND_ERROR, KIND_EXEC,
    KIND_EXEC_LOADED, KIND_EXEC_VERIFIED, LABEL_CANARY, LABEL_NONE, MODE_FALLBACK, MODE_LSM,
    MODE_OFF, STAT_FAST_EXEC, STAT_GRANT_ALLOWED, STATE_ALLOWED, STATE_DENIED, STATE_EXEC_RELEASED,
    STATE_IDLE, STATE_PENDING, TaskState,
};

use crate::{
    hold::{self, Verdict},
    label::{self, Task},
    maps,
};

/// Offsets of `filename` and `argv` in the `sys_enter_execve` record (the syscall ABI's
/// argument slots, stable across kernels).
pub const EXECVE_ARGS: (usize, usize) = (16, 24);
/// The same for `sys_enter_execveat` (after the dirfd).
pub const EXECVEAT_ARGS: (usize, usize) = (24, 32);

/// Reads a kernel pointer at `base + offset`; `None` for a failed read or a null pointer.
#[inline(always)]
pub fn read_ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    if base.is_null() {
        return None;
    }
    // SAFETY: read with the checked helper; a bad address fails the read, nothing else.
    let p = unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<u64>()) }
        .ok()? as *const u8;
    (!p.is_null()).then_some(p)
}

/// (device, inode) of a `struct file`, as the kernel knows them.
#[inline(always)]
fn file_id(file: *const u8) -> Option<(u64, u64)> {
    let o = maps::kernel_offsets();
    if o.valid == 0 {
        return None;
    }
    inode_id(read_ptr(file, o.file_inode)?)
}

/// (device, inode) of a `struct inode`.
#[inline(always)]
pub fn inode_id(inode: *const u8) -> Option<(u64, u64)> {
    let o = maps::kernel_offsets();
    if o.valid == 0 {
        return None;
    }
    // SAFETY: as in `read_ptr`.
    let ino =
        unsafe { bpf_probe_read_kernel(inode.wrapping_add(o.inode_ino as usize).cast::<u64>()) }
            .ok()?;
    let sb = read_ptr(inode, o.inode_sb)?;
    // SAFETY: as in `read_ptr`; `dev_t` is 32 bits.
    let dev =
        unsafe { bpf_probe_read_kernel(sb.wrapping_add(o.sb_dev as usize).cast::<u32>()) }.ok()?;
    Some((u64::from(dev), ino))
}

/// Whether the policy allows running `file` for `label` in the kernel. Fails closed: a file
/// that cannot be identified is not allowed here.
#[inline(always)]
fn fast_allowed(label: u32, file: Option<*const u8>) -> bool {
    let Some((dev, ino)) = file.and_then(file_id) else {
        return false;
    };
    let key = ExecKey {
        label,
        _pad: 0,
        dev,
        ino,
    };
    // SAFETY: reading a plain value out of the map.
    if unsafe { maps::EXEC_ALLOW.get(&key) }.is_some() {
        maps::count(STAT_FAST_EXEC);
        return true;
    }
    // A binary grant, while it lasts (the daemon deletes it on revocation and expiry; the
    // expiry here stops it on time even if that delete failed).
    if maps::exec_granted(&key) {
        maps::count(STAT_GRANT_ALLOWED);
        return true;
    }
    false
}

/// The file of one binfmt pass: `bprm->file`.
#[inline(always)]
fn bprm_file(bprm: *const u8) -> Option<*const u8> {
    let o = maps::kernel_offsets();
    if o.valid == 0 {
        return None;
    }
    read_ptr(bprm, o.bprm_file)
}

/// The loaded image of the current task: `current->mm->exe_file`.
#[inline(always)]
fn current_exe_file() -> Option<*const u8> {
    let o = maps::kernel_offsets();
    if o.valid == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mm = read_ptr(task, o.task_mm)?;
    read_ptr(mm, o.mm_exe_file)
}

/// LSM mode: the filename and argv pointers the task passed to `execve`/`execveat`, from its
/// saved user registers, for the daemon to read while the task is held. Left as they are
/// when the loader did not enable this (the syscall tracepoints record them instead); 0 when
/// they cannot be read (the daemon then shows the loaded image instead of the arguments).
#[inline(always)]
fn record_exec_args(state: &mut countersign_ebpf::TaskState) {
    let o = maps::kernel_offsets();
    if o.regs_valid == 0 {
        return;
    }
    state.exec_filename = 0;
    state.exec_argv = 0;
    // SAFETY: helpers on the current task; the verifier types both pointers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return;
    }
    let read = |at: u32| {
        // SAFETY: read with the checked helper.
        unsafe { bpf_probe_read_kernel(regs.wrapping_add(at as usize).cast::<u64>()) }.ok()
    };
    let Some(nr) = read(o.regs_nr) else { return };
    let (filename_at, argv_at) = if nr == u64::from(o.nr_execve) {
        (o.regs_arg0, o.regs_arg1)
    } else if nr == u64::from(o.nr_execveat) {
        (o.regs_arg1, o.regs_arg2)
    } else {
        return;
    };
    state.exec_filename = read(filename_at).unwrap_or(0);
    state.exec_argv = read(argv_at).unwrap_or(0);
}

#[inline(always)]
pub fn sys_enter_exec(ctx: &TracePointContext, (filename_at, argv_at): (usize, usize)) {
    // A task without room is refused by the exec hooks.
    let Task::Labelled(state) = label::current_task() else {
        return;
    };
    // SAFETY: the pointer comes from the map lookup and is valid for this run.
    let state = unsafe { &mut *state };
    // SAFETY: fixed offsets inside the tracepoint record.
    state.exec_filename = unsafe { ctx.read_at::<u64>(filename_at) }.unwrap_or(0);
    state.exec_argv = unsafe { ctx.read_at::<u64>(argv_at) }.unwrap_or(0);
    state.flags &= !FLAG_EXEC_LOADED;
    // A new execve (not the restart of an approved one) ends an earlier release.
    if state.state == STATE_EXEC_RELEASED {
        state.state = STATE_IDLE;
    }
}

/// LSM mode without the syscall tracepoints: a new `execve` begins (not a pass of the same
/// one), so a release an earlier, failed exec left behind ends. The restart of an approved
/// exec still finds its decision (`STATE_ALLOWED`), which is only turned into a release by
/// its first binfmt pass.
#[inline(always)]
pub fn new_execve() {
    if let Task::Labelled(state) = label::current_task() {
        // SAFETY: the pointer comes from the map lookup and is valid for this run.
        let state = unsafe { &mut *state };
        if state.state == STATE_EXEC_RELEASED {
            state.state = STATE_IDLE;
        }
    }
}

/// `bprm_check_security(struct linux_binprm *bprm)`: runs once per binfmt pass.
#[inline(always)]
pub fn bprm_check(bprm: *const u8) -> Verdict {
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => return Verdict::Allow,
        Task::NoRoom => return Verdict::Deny,
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if state.label == LABEL_CANARY {
        if let Some(ev) = hold::event(KIND_CANARY_EXEC, state.label) {
            maps::emit(ev);
        }
        return Verdict::Deny;
    }
    if maps::config().mode != MODE_LSM {
        return Verdict::Allow;
    }
    if state.kind == KIND_EXEC {
        match state.state {
            STATE_PENDING => {
                hold::stop_current();
                return Verdict::Held;
            }
            STATE_ALLOWED => {
                // The image is verified again once loaded (see `sched_exec`).
                state.state = STATE_EXEC_RELEASED;
                return Verdict::Allow;
            }
            STATE_DENIED => {
                state.state = STATE_IDLE;
                return Verdict::Deny;
            }
            _ => {}
        }
    }
    if state.state == STATE_EXEC_RELEASED {
        // The interpreter of an approved script: same execve, let it load.
        return Verdict::Allow;
    }
    // Checked after the state machine, so that a pending or decided exec stays what it is.
    if fast_allowed(state.label, bprm_file(bprm)) {
        return Verdict::Allow;
    }
    record_exec_args(state);
    let file = bprm_file(bprm).and_then(file_id);
    let requested = hold::event(KIND_EXEC, state.label)
        .map(|ev| {
            // The file the kernel opened: the daemon binds the approval to it, whatever name
            // (or descriptor) the caller used.
            if let Some((dev, ino)) = file {
                ev.addr[..8].copy_from_slice(&dev.to_le_bytes());
                ev.addr[8..].copy_from_slice(&ino.to_le_bytes());
            }
            hold::request(state, KIND_EXEC, 0, ev);
        })
        .is_some();
    if requested {
        Verdict::Held
    } else {
        Verdict::Deny
    }
}

/// An unlabelled task just loaded an image: if the policy names that file as an agent's
/// executable, the task is labelled before its first instruction (its exec of the agent is
/// not held; everything the agent does from now on is). An agent that cannot be given a
/// state is killed (fail closed); a file that cannot be identified labels nothing (the
/// daemon refuses executable labels where the kernel cannot identify files).
#[inline(always)]
fn label_by_executable() {
    let config = maps::config();
    if config.exec_labels == 0
        || config.mode == MODE_OFF
        || label::current_tgid() == config.daemon_tgid
    {
        return;
    }
    let Some((dev, ino)) = current_exe_file().and_then(file_id) else {
        return;
    };
    // SAFETY: reading a plain value out of the map.
    let Some(label) = (unsafe { maps::EXEC_LABELS.get(&FileKey { dev, ino }) }).copied() else {
        return;
    };
    if label == LABEL_NONE {
        return;
    }
    let state = TaskState {
        label,
        ..TaskState::default()
    };
    if maps::TASKS.insert(label::current_tid(), state, 0).is_err() {
        hold::kill_current();
    }
}

/// Offsets of `pid` and `old_pid` in the `sched_process_exec` record.
const EXEC_PID_AT: usize = 12;
const EXEC_OLD_PID_AT: usize = 16;

/// `looped`: the argv comparison runs in `bpf_loop` (5.17+: the verifier checks one chunk's
/// comparison once instead of 256 unrolled copies, which took seconds to load under
/// emulation); otherwise unrolled.
#[inline(always)]
pub fn sched_exec(ctx: &TracePointContext, looped: bool) {
    // An exec from a non-leader thread takes over the leader's pid: move the state along.
    // SAFETY: fixed offsets inside the tracepoint record.
    let pid = unsafe { ctx.read_at::<i32>(EXEC_PID_AT) }.unwrap_or(0) as u32;
    let old_pid = unsafe { ctx.read_at::<i32>(EXEC_OLD_PID_AT) }.unwrap_or(0) as u32;
    if pid != old_pid && pid != 0 {
        // SAFETY: reading a plain value out of the map.
        if let Some(old) = unsafe { maps::TASKS.get(old_pid) } {
            let moved = *old;
            if maps::TASKS.insert(pid, moved, 0).is_err() {
                hold::kill_current();
                return;
            }
            let _ = maps::TASKS.remove(old_pid);
        }
    }
    let state = match label::current_task() {
        Task::Labelled(state) => state,
        Task::Unlabelled => {
            label_by_executable();
            return;
        }
        Task::NoRoom => {
            // Labelled, but nothing can hold it: fail closed before the first instruction.
            hold::kill_current();
            return;
        }
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    state.flags |= FLAG_EXEC_LOADED;
    let mode = maps::config().mode;
    if state.label == LABEL_CANARY {
        // Only reached in fallback mode (the LSM hook refuses the canary's exec).
        if let Some(ev) = hold::event(KIND_CANARY_EXEC, state.label) {
            maps::emit(ev);
        }
        hold::kill_current();
        return;
    }
    // An approved exec (LSM: released by the hook; fallback: let go by the notifier) runs
    // only as approved.
    if mode == MODE_LSM && state.state == STATE_EXEC_RELEASED {
        verify_approved(state, old_pid, STATE_EXEC_RELEASED, looped);
        return;
    }
    if mode != MODE_FALLBACK {
        return;
    }
    if state.flags & FLAG_NOTIFIED != 0 {
        verify_approved(state, old_pid, STATE_ALLOWED, looped);
        return;
    }
    // Fallback: the loaded image is one the policy allows; it runs without a stop.
    if fast_allowed(state.label, current_exe_file()) {
        return;
    }
    // The hold below is a stop the daemon then turns into a ptrace stop; a task someone else
    // already traces (it asked to be, or its parent attached) could be let run by its tracer
    // before that: it is killed before its first instruction instead.
    if crate::task::traced() {
        hold::kill_current();
        maps::count(countersign_ebpf::STAT_UNHOLDABLE);
        if let Some(ev) = hold::event(KIND_ERROR, state.label) {
            ev.action = KIND_EXEC_LOADED as u16;
            ev.detail = ERROR_EXEC_TRACED;
            maps::emit(ev);
        }
        return;
    }
    let requested = hold::event(KIND_EXEC_LOADED, state.label)
        .map(|ev| hold::request(state, KIND_EXEC_LOADED, 0, ev))
        .is_some();
    if requested {
        // Watched from now until its first fault in user mode (see `user_fault`); a hold
        // that cannot be watched could be let run early: killed instead.
        if !maps::watch_loaded(label::current_tid()) {
            hold::kill_current();
        }
    } else {
        // Nobody would decide it: fail closed before the first instruction.
        hold::kill_current();
    }
}

/// Fallback mode: a page fault in user mode (x86's `page_fault_user`). The hold after
/// loading is a stop, and a stop ends with any `SIGCONT` (or a tracer that attached first)
/// before the daemon can seize the task. But a new image's memory is mapped, not yet present:
/// its first instruction faults (the kernel wrote only the stack). A task whose loaded exec is
/// still pending that faults in user mode was let run without a decision: it is killed, and
/// the kill is taken before the faulting instruction is retried. The daemon writes its
/// decision into the task's state before it lets the task go.
///
/// Every host's fault passes here: while no task is watched (the usual case) it reads one
/// counter and returns. A watched task's first fault ends the watch, whatever it finds.
#[inline(always)]
pub fn user_fault() {
    if !maps::loaded_watched() {
        return;
    }
    let tid = label::current_tid();
    if !maps::unwatch_loaded(tid) {
        return;
    }
    let Some(state) = maps::TASKS.get_ptr_mut(tid) else {
        // Watched but without a state: nothing says it was let go.
        hold::kill_current();
        return;
    };
    // SAFETY: the pointer comes from the map lookup and is valid for this run.
    let state = unsafe { &mut *state };
    if state.kind != KIND_EXEC_LOADED || state.state != STATE_PENDING {
        // Let go by the daemon's decision, which it wrote before resuming the task.
        return;
    }
    hold::kill_current();
    // Reported once: the task dies with its next return to user mode.
    state.state = STATE_DENIED;
    maps::count(countersign_ebpf::STAT_UNHOLDABLE);
    if let Some(ev) = hold::event(KIND_ERROR, state.label) {
        ev.action = KIND_EXEC_LOADED as u16;
        ev.detail = ERROR_EXEC_RAN_EARLY;
        ev.request_id = state.request_id;
        ev.exec_filename = state.exec_filename;
        ev.exec_argv = state.exec_argv;
        maps::emit(ev);
    }
}

/// An exec that was let start by an approval — in LSM mode released by the exec hook
/// (`released` is `STATE_EXEC_RELEASED`), in fallback mode let go by the seccomp notifier
/// (`STATE_ALLOWED`) — or, under the notifier, as one the fast path allows. The approval is
/// armed in [`maps::EXEC_APPROVED`] under the thread that made the call: the loaded image
/// runs if it is exactly the approved one (file and argv, read by the kernel itself after
/// the approval) or one the policy allows; anything else — a file or an argv changed after
/// the approval, an exec that never asked — is killed before its first instruction. No stop,
/// so nothing (a `SIGCONT`, a tracer) can let it run before the check.
#[inline(always)]
fn verify_approved(state: &mut TaskState, tid: u32, released: u32, looped: bool) {
    let approved = maps::EXEC_APPROVED.get_ptr(&tid);
    let mut request = 0;
    let mut verified = false;
    if let Some(a) = approved {
        // SAFETY: as above; only read.
        let a = unsafe { &*a };
        request = a.request_id;
        verified = state.state == released
            && state.kind == KIND_EXEC
            && state.request_id == a.request_id
            && loaded_is(a, tid, looped);
    }
    if approved.is_some() {
        let _ = maps::EXEC_APPROVED.remove(&tid);
    }
    if verified {
        state.state = STATE_IDLE;
        if let Some(ev) = hold::event(KIND_EXEC_VERIFIED, state.label) {
            ev.request_id = request;
            maps::emit(ev);
        }
        return;
    }
    if fast_allowed(state.label, current_exe_file()) {
        if state.state == released {
            state.state = STATE_IDLE;
        }
        return;
    }
    if let Some(ev) = hold::event(KIND_ERROR, state.label) {
        ev.action = KIND_EXEC as u16;
        ev.detail = ERROR_EXEC_UNVERIFIED;
        ev.request_id = request;
        maps::emit(ev);
    }
    hold::kill_current();
}

/// Bytes of the loaded argv compared per step.
const ARGV_CHUNK: usize = 64;

/// Whether the current task's loaded image and argv are the approved ones. Any failed read
/// is a mismatch.
#[inline(always)]
fn loaded_is(a: &ApprovedExec, tid: u32, looped: bool) -> bool {
    let Some((dev, ino)) = current_exe_file().and_then(file_id) else {
        return false;
    };
    if dev != a.dev || ino != a.ino {
        return false;
    }
    let o = maps::kernel_offsets();
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(mm) = read_ptr(task, o.task_mm) else {
        return false;
    };
    let read = |at: u32| {
        // SAFETY: read with the checked helper.
        unsafe { bpf_probe_read_kernel(mm.wrapping_add(at as usize).cast::<u64>()) }.ok()
    };
    let (Some(start), Some(end)) = (read(o.mm_arg_start), read(o.mm_arg_end)) else {
        return false;
    };
    let len = a.argv_len as usize;
    if end < start || end - start != len as u64 || len > ARGV_VERIFY_MAX {
        return false;
    }
    if looped {
        let mut cmp = ArgvCompare {
            start,
            len: len as u64,
            tid: u64::from(tid),
            differs: 0,
        };
        let chunks = len.div_ceil(ARGV_CHUNK) as u32;
        // SAFETY: the callback is a static subprogram taking (index, context); the context is
        // this frame's `cmp`, alive across the call.
        let done = unsafe {
            bpf_loop(
                chunks,
                argv_chunk_matches as *mut core::ffi::c_void,
                (&raw mut cmp).cast(),
                0,
            )
        };
        return done == i64::from(chunks) && cmp.differs == 0;
    }
    // Whole chunks, then the rest: each step has one way on and short ways out, so that the
    // verifier's walk stays linear in the number of chunks.
    for i in 0..ARGV_VERIFY_MAX / ARGV_CHUNK {
        let off = i * ARGV_CHUNK;
        if off + ARGV_CHUNK > len {
            break;
        }
        if !chunk_is(start + off as u64, ARGV_CHUNK as u32, a, off) {
            return false;
        }
    }
    let rest = len % ARGV_CHUNK;
    if rest == 0 {
        return true;
    }
    // `len - rest` is a whole number of chunks below the limit; the mask tells the verifier.
    let off = (len - rest) & (ARGV_VERIFY_MAX - ARGV_CHUNK) & !(ARGV_CHUNK - 1);
    chunk_is(
        start + off as u64,
        rest as u32 & (ARGV_CHUNK as u32 - 1),
        a,
        off,
    )
}

/// What [`argv_chunk_matches`] compares: the loaded argv (`start`, `len`) of thread `tid`
/// against its armed approval; `differs` is set at the first chunk that differs.
#[repr(C)]
struct ArgvCompare {
    start: u64,
    len: u64,
    tid: u64,
    differs: u64,
}

/// `bpf_loop` callback: chunk `index` of the comparison in `ctx` (an [`ArgvCompare`]).
/// Returns 1 (stop) at a difference or a failed read, else 0.
#[inline(never)]
extern "C" fn argv_chunk_matches(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `ArgvCompare`, as `loaded_is` passes it.
    let cmp = unsafe { &mut *ctx.cast::<ArgvCompare>() };
    let Some(a) = maps::EXEC_APPROVED.get_ptr(&(cmp.tid as u32)) else {
        cmp.differs = 1;
        return 1;
    };
    // SAFETY: the pointer comes from the map lookup and is valid for this run; only read.
    let a = unsafe { &*a };
    // A whole number of chunks below the limit; the masks tell the verifier.
    let off = (index as usize * ARGV_CHUNK) & (ARGV_VERIFY_MAX - ARGV_CHUNK);
    let left = cmp.len.saturating_sub(off as u64);
    let n = if left >= ARGV_CHUNK as u64 {
        ARGV_CHUNK as u32
    } else {
        left as u32 & (ARGV_CHUNK as u32 - 1)
    };
    if !chunk_is(cmp.start + off as u64, n, a, off) {
        cmp.differs = 1;
        return 1;
    }
    0
}

/// Whether the `n` bytes of user memory at `at` are the approved argv's bytes at `off` (the
/// approved bytes past the argv are zero, as are the unread bytes of the chunk).
#[inline(always)]
fn chunk_is(at: u64, n: u32, a: &ApprovedExec, off: usize) -> bool {
    let mut got = [0u64; ARGV_CHUNK / 8];
    // SAFETY: at most `ARGV_CHUNK` bytes into `got`, read with the checked helper.
    let failed =
        unsafe { bpf_probe_read_user(got.as_mut_ptr().cast(), n, at as *const core::ffi::c_void) }
            != 0;
    if failed {
        return false;
    }
    let want = a.argv.as_ptr().cast::<u64>();
    for (w, g) in got.iter().enumerate() {
        // SAFETY: `off + 8 * w + 8 <= ARGV_VERIFY_MAX` (callers keep `off` below the limit by
        // a chunk): inside the map value; the array starts 8-aligned.
        if unsafe { *want.add(off / 8 + w) } != *g {
            return false;
        }
    }
    true
}
