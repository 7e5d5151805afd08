//! countersign's eBPF programs: entry shims only. The logic lives in `hold`, `label`, `exec`
//! and `connect`; each shim maps a [`hold::Verdict`] to what its hook returns.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The plain atomic add (`lock xadd`): the bpf target's `AtomicU64` has no read-modify-write.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod exec;
#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod hold;
#[cfg(target_arch = "bpf")]
mod label;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod socket;
#[cfg(target_arch = "bpf")]
mod task;
#[cfg(target_arch = "bpf")]
mod unix;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{
            cgroup_skb, cgroup_sock, cgroup_sock_addr, fentry, kprobe, lsm, raw_tracepoint,
            tracepoint,
        },
        programs::{
            FEntryContext, LsmContext, ProbeContext, RawTracePointContext, SkBuffContext,
            SockAddrContext, SockContext, TracePointContext,
        },
    };

    use crate::{
        connect::{self, SendCall},
        dns, exec, guard,
        hold::Verdict,
        label, socket,
    };

    /// `bprm_check_security`: holds a labelled task's exec before the new image is loaded.
    /// Fails closed: an exec it cannot record is denied.
    #[lsm(hook = "bprm_check_security")]
    pub fn cs_lsm_bprm_check(ctx: LsmContext) -> i32 {
        // The last argument is what an earlier BPF LSM program returned: keep its refusal.
        let previous: i32 = ctx.arg(1);
        if previous != 0 {
            return previous;
        }
        exec::bprm_check(ctx.arg(0)).lsm_return()
    }

    /// `bprm_creds_for_exec`: runs once per `execve`, before any binfmt pass; a release left
    /// by an approved exec that then failed ends here, so this exec is held before it loads.
    /// Attached only where the syscall tracepoints are not (they do the same). Refuses
    /// nothing.
    #[lsm(hook = "bprm_creds_for_exec")]
    pub fn cs_lsm_bprm_creds_for_exec(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(1);
        if previous != 0 {
            return previous;
        }
        exec::new_execve();
        0
    }

    /// `socket_connect`: holds a labelled task's IPv4/IPv6 connect before anything is sent.
    /// Fails closed: a connect it cannot record is denied.
    #[lsm(hook = "socket_connect")]
    pub fn cs_lsm_socket_connect(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(3);
        if previous != 0 {
            return previous;
        }
        connect::lsm_connect(ctx.arg(0), ctx.arg(1)).lsm_return()
    }

    /// `socket_sendmsg`: holds a labelled task's send to a destination not decided for it
    /// (datagrams, TCP Fast Open) before anything is sent. Fails closed.
    #[lsm(hook = "socket_sendmsg")]
    pub fn cs_lsm_socket_sendmsg(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(3);
        if previous != 0 {
            return previous;
        }
        connect::lsm_sendmsg(ctx.arg(0), ctx.arg(1)).lsm_return()
    }

    /// `socket_create`: holds a labelled task's raw, packet, ICMP or other unusual socket.
    /// Fails closed: one it cannot record is refused.
    #[lsm(hook = "socket_create")]
    pub fn cs_lsm_socket_create(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(4);
        if previous != 0 {
            return previous;
        }
        socket::lsm_socket_create(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3)).lsm_return()
    }

    /// `unix_stream_connect(struct sock *sock, struct sock *other, struct sock *newsk)`: holds
    /// a labelled task's connect to a local socket the policy names. Fails closed for named
    /// sockets (one it cannot record is refused); a peer it cannot identify is treated as
    /// unnamed, which passes (as every socket a rule does not name does).
    #[lsm(hook = "unix_stream_connect")]
    pub fn cs_lsm_unix_stream_connect(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(3);
        if previous != 0 {
            return previous;
        }
        connect::lsm_unix(ctx.arg(1), 1).lsm_return()
    }

    /// `unix_may_send(struct socket *sock, struct socket *other)`: every datagram (and
    /// datagram connect) to a local socket. As `unix_stream_connect`.
    #[lsm(hook = "unix_may_send")]
    pub fn cs_lsm_unix_may_send(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(2);
        if previous != 0 {
            return previous;
        }
        match crate::unix::socket_sk(ctx.arg(1)) {
            Some(peer) => connect::lsm_unix(peer, 2).lsm_return(),
            None => 0,
        }
    }

    /// `socket_listen(struct socket *sock, int backlog)`: a labelled listener on an address
    /// other than loopback is held.
    #[lsm(hook = "socket_listen")]
    pub fn cs_lsm_socket_listen(ctx: LsmContext) -> i32 {
        let previous: i32 = ctx.arg(2);
        if previous != 0 {
            return previous;
        }
        connect::lsm_listen(ctx.arg(0)).lsm_return()
    }

    // Self-protection (see `guard`). Each keeps the refusal of an earlier BPF LSM program
    // (passed as the argument after the hook's own).

    /// `bpf(cmd, attr, size[, kernel])`: the argument count differs between kernels, so the
    /// earlier program's answer is not read; this one refuses or passes.
    #[lsm(hook = "bpf")]
    pub fn cs_lsm_bpf(ctx: LsmContext) -> i32 {
        guard::bpf(ctx.arg(0))
    }

    /// `capable(cred, ns, cap, opts)`: the capabilities of `GUARD_CAPABILITIES` (and of
    /// `GUARD_CAPABILITIES_HOST` over the initial user namespace).
    #[lsm(hook = "capable")]
    pub fn cs_lsm_capable(ctx: LsmContext) -> i32 {
        keep(ctx.arg(4), || {
            guard::capable(ctx.arg(1), ctx.arg(2), ctx.arg(3))
        })
    }

    /// `perf_event_open(attr, type)`: monitoring a whole processor.
    #[lsm(hook = "perf_event_open")]
    pub fn cs_lsm_perf_event_open(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::perf_event_open(ctx.arg(1)))
    }

    /// `perf_event_open(type)`, as newer kernels (6.12+) declare the hook.
    #[lsm(hook = "perf_event_open")]
    pub fn cs_lsm_perf_event_open_type(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || guard::perf_event_open(ctx.arg(0)))
    }

    #[lsm(hook = "ptrace_access_check")]
    pub fn cs_lsm_ptrace_access_check(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::ptrace_access(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "task_kill")]
    pub fn cs_lsm_task_kill(ctx: LsmContext) -> i32 {
        keep(ctx.arg(4), || guard::task_kill(ctx.arg(0), ctx.arg(2)))
    }

    /// `file_send_sigiotask(tsk, fown, sig)`: the signal a file's owner asked for when I/O is
    /// ready on it (`F_SETOWN`, `F_SETSIG`), which passes no `task_kill`.
    #[lsm(hook = "file_send_sigiotask")]
    pub fn cs_lsm_file_send_sigiotask(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::sigio(ctx.arg(0), ctx.arg(2)))
    }

    /// `task_setrlimit(p, resource, new_rlim)` and the other settings of how a process
    /// runs: not changed for countersign's processes by a labelled task.
    #[lsm(hook = "task_setrlimit")]
    pub fn cs_lsm_task_setrlimit(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || {
            guard::process_setting(ctx.arg(0), guard::PROCESS_LIMITS)
        })
    }

    /// `task_setnice(p, nice)`.
    #[lsm(hook = "task_setnice")]
    pub fn cs_lsm_task_setnice(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || {
            guard::process_setting(ctx.arg(0), guard::PROCESS_NICE)
        })
    }

    /// `task_setioprio(p, ioprio)`.
    #[lsm(hook = "task_setioprio")]
    pub fn cs_lsm_task_setioprio(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || {
            guard::process_setting(ctx.arg(0), guard::PROCESS_IOPRIO)
        })
    }

    /// `task_setscheduler(p)`: policy, priority and affinity (and a move into a cpuset).
    #[lsm(hook = "task_setscheduler")]
    pub fn cs_lsm_task_setscheduler(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || {
            guard::process_setting(ctx.arg(0), guard::PROCESS_SCHEDULER)
        })
    }

    /// `task_movememory(p)`.
    #[lsm(hook = "task_movememory")]
    pub fn cs_lsm_task_movememory(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || {
            guard::process_setting(ctx.arg(0), guard::PROCESS_MEMORY)
        })
    }

    #[lsm(hook = "kernel_read_file")]
    pub fn cs_lsm_kernel_read_file(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::kernel_load(ctx.arg(1)))
    }

    #[lsm(hook = "kernel_load_data")]
    pub fn cs_lsm_kernel_load_data(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::kernel_load(ctx.arg(0)))
    }

    /// `kernel_module_request(kmod_name)`: a module load the kernel would start for a
    /// labelled task (modprobe runs unlabelled, as root, with what `/etc/modprobe.d` says).
    #[lsm(hook = "kernel_module_request")]
    pub fn cs_lsm_kernel_module_request(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || guard::kernel_load(2))
    }

    #[lsm(hook = "file_truncate")]
    pub fn cs_lsm_file_truncate(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || guard::file_truncate(ctx.arg(0)))
    }

    #[lsm(hook = "sb_mount")]
    pub fn cs_lsm_sb_mount(ctx: LsmContext) -> i32 {
        keep(ctx.arg(5), || guard::mount(1))
    }

    #[lsm(hook = "sb_umount")]
    pub fn cs_lsm_sb_umount(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::mount(2))
    }

    #[lsm(hook = "move_mount")]
    pub fn cs_lsm_move_mount(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::mount(3))
    }

    #[lsm(hook = "sb_remount")]
    pub fn cs_lsm_sb_remount(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::mount(4))
    }

    #[lsm(hook = "sb_pivotroot")]
    pub fn cs_lsm_sb_pivotroot(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::mount(5))
    }

    #[lsm(hook = "file_open")]
    pub fn cs_lsm_file_open(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || guard::file_open(ctx.arg(0)))
    }

    /// `file_receive(file)`: a descriptor another process passes in (`SCM_RIGHTS`,
    /// `pidfd_getfd`) is held to what the task could open itself.
    #[lsm(hook = "file_receive")]
    pub fn cs_lsm_file_receive(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || guard::file_receive(ctx.arg(0)))
    }

    /// `path_notify(path, mask, obj_type)`: no fanotify permission events for a labelled
    /// task (their holder decides every open beneath the mark).
    #[lsm(hook = "path_notify")]
    pub fn cs_lsm_path_notify(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::path_notify(ctx.arg(1)))
    }

    /// `file_lock(file, cmd)`: no lock or lease on countersign's files.
    #[lsm(hook = "file_lock")]
    pub fn cs_lsm_file_lock(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::file_lock(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_create")]
    pub fn cs_lsm_inode_create(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::inode_create(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_mkdir")]
    pub fn cs_lsm_inode_mkdir(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::inode_create(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_mknod")]
    pub fn cs_lsm_inode_mknod(ctx: LsmContext) -> i32 {
        keep(ctx.arg(4), || guard::inode_create(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_symlink")]
    pub fn cs_lsm_inode_symlink(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::inode_create(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_link")]
    pub fn cs_lsm_inode_link(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || {
            guard::inode_link(ctx.arg(0), ctx.arg(1), ctx.arg(2))
        })
    }

    #[lsm(hook = "inode_unlink")]
    pub fn cs_lsm_inode_unlink(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::inode_remove(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_rmdir")]
    pub fn cs_lsm_inode_rmdir(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::inode_remove(ctx.arg(0), ctx.arg(1)))
    }

    #[lsm(hook = "inode_rename")]
    pub fn cs_lsm_inode_rename(ctx: LsmContext) -> i32 {
        keep(ctx.arg(4), || {
            guard::inode_rename(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3))
        })
    }

    /// `inode_rename` where it runs at `security_inode_rename(old_dir, old_dentry, new_dir,
    /// new_dentry, flags)`, which takes the rename flags besides the hook's arguments: the
    /// earlier program's answer follows them (see the daemon's `SECURITY_FUNCTION_EXTRA`).
    #[lsm(hook = "inode_rename")]
    pub fn cs_lsm_inode_rename_flags(ctx: LsmContext) -> i32 {
        keep(ctx.arg(5), || {
            guard::inode_rename(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3))
        })
    }

    #[lsm(hook = "path_truncate")]
    pub fn cs_lsm_path_truncate(ctx: LsmContext) -> i32 {
        keep(ctx.arg(1), || guard::path_change(ctx.arg(0)))
    }

    #[lsm(hook = "path_chmod")]
    pub fn cs_lsm_path_chmod(ctx: LsmContext) -> i32 {
        keep(ctx.arg(2), || guard::path_change(ctx.arg(0)))
    }

    #[lsm(hook = "path_chown")]
    pub fn cs_lsm_path_chown(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::path_change(ctx.arg(0)))
    }

    /// `file_ioctl(file, cmd, arg)`: no labelled task pushes input into a terminal.
    #[lsm(hook = "file_ioctl")]
    pub fn cs_lsm_file_ioctl(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::ioctl(ctx.arg(1)))
    }

    /// `file_ioctl_compat(file, cmd, arg)` (6.8+): the same for 32-bit callers.
    #[lsm(hook = "file_ioctl_compat")]
    pub fn cs_lsm_file_ioctl_compat(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::ioctl(ctx.arg(1)))
    }

    /// `socket_bind(sock, address, addrlen)`: no labelled task binds the DNS port.
    #[lsm(hook = "socket_bind")]
    pub fn cs_lsm_socket_bind(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::bind(ctx.arg(0), ctx.arg(1)))
    }

    /// `inode_setxattr(idmap, dentry, name, value, size, flags)`: no extended attribute of
    /// countersign's files is set (a POSIX ACL before 6.2, a security label, ...).
    #[lsm(hook = "inode_setxattr")]
    pub fn cs_lsm_inode_setxattr(ctx: LsmContext) -> i32 {
        keep(ctx.arg(6), || guard::dentry_change(ctx.arg(1)))
    }

    /// `inode_removexattr(idmap, dentry, name)`.
    #[lsm(hook = "inode_removexattr")]
    pub fn cs_lsm_inode_removexattr(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::dentry_change(ctx.arg(1)))
    }

    /// `inode_set_acl(idmap, dentry, acl_name, kacl)` (6.2+): no POSIX ACL on countersign's
    /// files (one could give another user their write access).
    #[lsm(hook = "inode_set_acl")]
    pub fn cs_lsm_inode_set_acl(ctx: LsmContext) -> i32 {
        keep(ctx.arg(4), || guard::dentry_change(ctx.arg(1)))
    }

    /// `inode_remove_acl(idmap, dentry, acl_name)` (6.2+).
    #[lsm(hook = "inode_remove_acl")]
    pub fn cs_lsm_inode_remove_acl(ctx: LsmContext) -> i32 {
        keep(ctx.arg(3), || guard::dentry_change(ctx.arg(1)))
    }

    /// An earlier BPF LSM program's refusal stands; otherwise `check` decides.
    #[inline(always)]
    fn keep(previous: i32, check: impl FnOnce() -> i32) -> i32 {
        if previous != 0 { previous } else { check() }
    }

    /// Records the filename and argv pointers of a labelled task's exec, for the daemon to
    /// read while the task is held. Cannot refuse anything (a tracepoint).
    #[tracepoint(category = "syscalls", name = "sys_enter_execve")]
    pub fn cs_tp_sys_enter_execve(ctx: TracePointContext) -> u32 {
        exec::sys_enter_exec(&ctx, exec::EXECVE_ARGS);
        0
    }

    #[tracepoint(category = "syscalls", name = "sys_enter_execveat")]
    pub fn cs_tp_sys_enter_execveat(ctx: TracePointContext) -> u32 {
        exec::sys_enter_exec(&ctx, exec::EXECVEAT_ARGS);
        0
    }

    /// The new image is loaded and has not run an instruction: the fallback exec hold, and
    /// the verification of an approved exec in LSM mode. Fails closed by SIGKILL.
    #[tracepoint(category = "sched", name = "sched_process_exec")]
    pub fn cs_tp_sched_exec(ctx: TracePointContext) -> u32 {
        exec::sched_exec(&ctx, true);
        0
    }

    /// The same, for kernels without `bpf_loop` (before 5.17): the argv comparison unrolled.
    #[tracepoint(category = "sched", name = "sched_process_exec")]
    pub fn cs_tp_sched_exec_unrolled(ctx: TracePointContext) -> u32 {
        exec::sched_exec(&ctx, false);
        0
    }

    /// Fallback mode (x86): a page fault in user mode. An image held after loading that
    /// faults was let run before its decision: killed before the faulting instruction.
    #[raw_tracepoint(tracepoint = "page_fault_user")]
    pub fn cs_rtp_page_fault_user(_ctx: RawTracePointContext) -> i32 {
        exec::user_fault();
        0
    }

    /// Every task the kernel creates inherits its creator's label before it first runs
    /// (forks, threads, io_uring's worker and SQPOLL threads).
    #[tracepoint(category = "task", name = "task_newtask")]
    pub fn cs_tp_task_newtask(ctx: TracePointContext) -> u32 {
        label::inherit(&ctx);
        0
    }

    /// A new cgroup is marked unclassified while the policy matches cgroups.
    #[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
    pub fn cs_tp_cgroup_mkdir(ctx: TracePointContext) -> u32 {
        label::cgroup_mkdir(&ctx);
        0
    }

    /// A removed cgroup's label entry goes.
    #[tracepoint(category = "cgroup", name = "cgroup_rmdir")]
    pub fn cs_tp_cgroup_rmdir(ctx: TracePointContext) -> u32 {
        label::cgroup_rmdir(&ctx);
        0
    }

    /// A labelled task that moved the daemon into another cgroup is killed (no hook refuses a
    /// move; the daemon moves itself back).
    #[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
    pub fn cs_tp_cgroup_attach(ctx: TracePointContext) -> u32 {
        guard::cgroup_attach(&ctx);
        0
    }

    #[tracepoint(category = "sched", name = "sched_process_exit")]
    pub fn cs_tp_sched_exit(_ctx: TracePointContext) -> u32 {
        label::forget_current();
        guard::process_exit();
        0
    }

    /// Fallback mode: stops a labelled task that enters `connect`; the cgroup programs below
    /// make the syscall restart while it is pending.
    #[tracepoint(category = "syscalls", name = "sys_enter_connect")]
    pub fn cs_tp_sys_enter_connect(ctx: TracePointContext) -> u32 {
        connect::sys_enter_connect(&ctx);
        0
    }

    /// Fallback mode: checks the local socket a labelled task's connect reached (and kills
    /// the task before it returns when the policy does not allow it).
    #[tracepoint(category = "syscalls", name = "sys_exit_connect")]
    pub fn cs_tp_sys_exit_connect(ctx: TracePointContext) -> u32 {
        connect::sys_exit_connect(&ctx);
        0
    }

    /// Fallback mode: marks a labelled task's listen as made through the system call.
    #[tracepoint(category = "syscalls", name = "sys_enter_listen")]
    pub fn cs_tp_sys_enter_listen(_ctx: TracePointContext) -> u32 {
        connect::sys_enter_listen();
        0
    }

    /// Fallback mode, where kprobes work: a labelled task's listen on the network that did
    /// not come through the system call (io_uring, the 32-bit entry) kills it.
    #[kprobe]
    pub fn cs_kp_inet_listen(ctx: ProbeContext) -> u32 {
        if let Some(sock) = ctx.arg::<*const u8>(0) {
            connect::inet_listen(sock);
        }
        0
    }

    /// Fallback mode: checks a labelled task's listen on the network once it is made: decided
    /// before by the seccomp notifier, held after by a stop otherwise.
    #[tracepoint(category = "syscalls", name = "sys_exit_listen")]
    pub fn cs_tp_sys_exit_listen(ctx: TracePointContext) -> u32 {
        connect::sys_exit_listen(&ctx);
        0
    }

    /// Fallback mode: stops a labelled task whose send names a destination not decided for
    /// it; the cgroup programs make the syscall restart while it is pending. Cannot refuse
    /// (a tracepoint): the cgroup programs fail closed.
    #[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
    pub fn cs_tp_sys_enter_sendto(ctx: TracePointContext) -> u32 {
        connect::sys_enter_send(&ctx, SendCall::SendTo);
        0
    }

    #[tracepoint(category = "syscalls", name = "sys_enter_sendmsg")]
    pub fn cs_tp_sys_enter_sendmsg(ctx: TracePointContext) -> u32 {
        connect::sys_enter_send(&ctx, SendCall::SendMsg);
        0
    }

    #[tracepoint(category = "syscalls", name = "sys_enter_sendmmsg")]
    pub fn cs_tp_sys_enter_sendmmsg(ctx: TracePointContext) -> u32 {
        connect::sys_enter_send(&ctx, SendCall::SendMmsg);
        0
    }

    /// Fallback mode: stops a labelled task creating an unusual socket (or kills it, for
    /// families no cgroup program can refuse: fails closed by SIGKILL).
    #[tracepoint(category = "syscalls", name = "sys_enter_socket")]
    pub fn cs_tp_sys_enter_socket(ctx: TracePointContext) -> u32 {
        socket::sys_enter_socket(&ctx);
        0
    }

    /// Fallback mode: decides a labelled task's UDP send with an address, on the kernel's
    /// copy. Fails closed: one that did not pass the send tracepoints is refused unless the
    /// kernel allows it.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn cs_cg_sendmsg4(ctx: SockAddrContext) -> i32 {
        connect::cgroup_sendmsg(&ctx, false).cgroup_return()
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn cs_cg_sendmsg6(ctx: SockAddrContext) -> i32 {
        connect::cgroup_sendmsg(&ctx, true).cgroup_return()
    }

    /// Fallback mode: decides a labelled task's IPv4/IPv6 socket creation. Fails closed: one
    /// that did not pass the socket tracepoint is refused unless the policy allows it.
    #[cgroup_sock(sock_create)]
    pub fn cs_cg_sock_create(ctx: SockContext) -> i32 {
        socket::cgroup_sock_create(&ctx).cgroup_return()
    }

    /// Fallback mode: decides a labelled task's connect. Fails closed: a labelled connect
    /// that did not come through `sys_enter_connect` (io_uring, a 32-bit syscall) is
    /// refused unless the kernel allows it.
    #[cgroup_sock_addr(connect4)]
    pub fn cs_cg_connect4(ctx: SockAddrContext) -> i32 {
        connect::cgroup_connect(&ctx, false).cgroup_return()
    }

    #[cgroup_sock_addr(connect6)]
    pub fn cs_cg_connect6(ctx: SockAddrContext) -> i32 {
        connect::cgroup_connect(&ctx, true).cgroup_return()
    }

    /// Fallback mode (kernels 6.7+): a labelled task's local-socket connect that did not come
    /// through `connect(2)` (io_uring, the 32-bit entry) is refused. Built under an IPv4
    /// section name that aya parses; the daemon loads it with the `connect_unix` attach type.
    #[cgroup_sock_addr(connect4)]
    pub fn cs_cg_unix_connect(ctx: SockAddrContext) -> i32 {
        connect::cgroup_unix(&ctx, false).cgroup_return()
    }

    /// Fallback mode (kernels 6.7+): a labelled task's local-socket datagram sent with an
    /// address is refused where its label restricts local sockets (loaded as `sendmsg_unix`).
    #[cgroup_sock_addr(sendmsg4)]
    pub fn cs_cg_unix_sendmsg(ctx: SockAddrContext) -> i32 {
        connect::cgroup_unix(&ctx, true).cgroup_return()
    }

    /// `ip_send_skb(struct net *, struct sk_buff *)`: every IPv4 UDP datagram sent.
    #[fentry(function = "ip_send_skb")]
    pub fn cs_fe_dns_send4(ctx: FEntryContext) -> i32 {
        dns::capture_kernel_skb(core::ptr::null(), ctx.arg(1), true);
        0
    }

    /// `ip6_send_skb(struct sk_buff *)`: every IPv6 UDP datagram sent.
    #[fentry(function = "ip6_send_skb")]
    pub fn cs_fe_dns_send6(ctx: FEntryContext) -> i32 {
        dns::capture_kernel_skb(core::ptr::null(), ctx.arg(0), true);
        0
    }

    /// `__udp_enqueue_schedule_skb(struct sock *, struct sk_buff *)`: every datagram queued
    /// on a UDP socket (IPv4 and IPv6), before the program can read it.
    #[fentry(function = "__udp_enqueue_schedule_skb")]
    pub fn cs_fe_dns_enqueue(ctx: FEntryContext) -> i32 {
        dns::capture_kernel_skb(ctx.arg(0), ctx.arg(1), false);
        0
    }

    /// Marks UDP sockets connected or sending to port 53 in the daemon's network namespace,
    /// whose DNS packets the two programs below capture. Refuses nothing.
    #[cgroup_sock_addr(connect4)]
    pub fn cs_cg_dns_connect4(ctx: SockAddrContext) -> i32 {
        dns::mark(&ctx);
        1
    }

    #[cgroup_sock_addr(connect6)]
    pub fn cs_cg_dns_connect6(ctx: SockAddrContext) -> i32 {
        dns::mark(&ctx);
        1
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn cs_cg_dns_sendmsg4(ctx: SockAddrContext) -> i32 {
        dns::mark(&ctx);
        1
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn cs_cg_dns_sendmsg6(ctx: SockAddrContext) -> i32 {
        dns::mark(&ctx);
        1
    }

    /// Copies DNS queries local sockets send to the daemon's DNS ring. Passes every packet.
    #[cgroup_skb(egress)]
    pub fn cs_cg_dns_egress(ctx: SkBuffContext) -> i32 {
        dns::capture(&ctx, true);
        1
    }

    /// Copies DNS answers local sockets receive to the daemon's DNS ring. Passes every packet.
    #[cgroup_skb(ingress)]
    pub fn cs_cg_dns_ingress(ctx: SkBuffContext) -> i32 {
        dns::capture(&ctx, false);
        1
    }

    impl Verdict {
        /// LSM hooks: 0 lets the action run; a negative errno refuses it.
        fn lsm_return(self) -> i32 {
            match self {
                Verdict::Allow => 0,
                Verdict::Deny => -countersign_ebpf::EPERM,
                Verdict::Held => -countersign_ebpf::ERESTARTNOINTR,
            }
        }

        /// cgroup sock_addr programs: 1 lets the connect go on, 0 refuses it with the retval
        /// (EPERM unless set otherwise).
        fn cgroup_return(self) -> i32 {
            match self {
                Verdict::Allow => 1,
                Verdict::Deny => 0,
                Verdict::Held => {
                    // SAFETY: helper call with a plain integer.
                    unsafe {
                        aya_ebpf::helpers::generated::bpf_set_retval(
                            -countersign_ebpf::ERESTARTNOINTR,
                        )
                    };
                    0
                }
            }
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// On the host this binary is empty: the real one is built for the bpf target by
/// `agent/build.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
