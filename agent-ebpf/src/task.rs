//! Where a hook runs: whether the calling task can be held at all (a syscall that restarts
//! after the stop, not an io_uring thread), and which process it belongs to.
use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_probe_read_kernel,
    generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
};
use countersign_ebpf::{NR_NET_SYSCALLS, PF_IO_WORKER};

use crate::maps;

/// Reads a `T` at `base + offset` of kernel memory.
#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: read with the checked helper; a bad address fails the read, nothing else.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

/// The `u32` at `field` (one of the `task_struct` offsets) of the current task; `None` where
/// those offsets are unknown or the read failed.
#[inline(always)]
fn current_u32(field: impl FnOnce(&countersign_ebpf::KernelOffsets) -> u32) -> Option<u32> {
    let o = maps::kernel_offsets();
    if o.task_valid == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    read::<u32>(task, field(o))
}

/// Whether the current task is an io_uring worker or SQPOLL thread: threads of the process
/// that the kernel runs, which never return to user space, so a stop and a syscall restart
/// mean nothing to them. Unknown: no.
#[inline(always)]
pub fn io_thread() -> bool {
    current_u32(|o| o.task_flags).is_some_and(|f| f & PF_IO_WORKER != 0)
}

/// Whether another process traces the current task (`task_struct.ptrace`). Unknown: yes (the
/// caller fails closed).
#[inline(always)]
pub fn traced() -> bool {
    current_u32(|o| o.task_ptrace).is_none_or(|p| p != 0)
}

/// Whether a network hook (LSM mode) runs under a system call that restarts after a hold:
/// not in an io_uring thread, and, where the task's registers can be read, under `socket`,
/// `connect` or a send (native or 32-bit), not under `io_uring_enter` submitting inline.
/// Only such a hook may hold; elsewhere an action nothing allowed is refused.
#[inline(always)]
pub fn can_hold_net() -> bool {
    if io_thread() {
        return false;
    }
    let o = maps::kernel_offsets();
    if o.regs_valid == 0 {
        return true;
    }
    // SAFETY: helpers on the current task; the verifier types both pointers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    let Some(nr) = read::<u64>(regs, o.regs_nr) else {
        return false;
    };
    let mut i = 0;
    while i < NR_NET_SYSCALLS {
        let n = o.nr_net[i];
        if n != 0 && u64::from(n) == nr {
            return true;
        }
        i += 1;
    }
    false
}

/// The first argument of the current task's system call, from its saved user registers
/// (`None` where their layout is unknown). At a syscall's exit it is still what the caller
/// passed.
#[inline(always)]
pub fn syscall_arg0() -> Option<u64> {
    let o = maps::kernel_offsets();
    if o.regs_valid == 0 {
        return None;
    }
    // SAFETY: helpers on the current task; the verifier types both pointers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    read::<u64>(regs, o.regs_arg0)
}

/// The current process's identity beside its pid: its thread-group leader's `start_time`
/// (0 when unknown: the offsets are missing or the read failed).
#[inline(always)]
pub fn process_start() -> u64 {
    let o = maps::kernel_offsets();
    if o.task_valid == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(leader) = read::<u64>(task, o.task_group_leader) else {
        return 0;
    };
    read::<u64>(leader as *const u8, o.task_start_time).unwrap_or(0)
}
