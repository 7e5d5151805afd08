//! Local sockets (`AF_UNIX`): which socket a connect or datagram reaches, as the kernel knows
//! it — the file it is bound to (device, inode: a symlink, a copy of the path or a bind mount
//! does not change it) or its abstract name — and what the policy says about it in the kernel.
//! The hold itself is `connect::lsm_unix`.
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use countersign_ebpf::{
    ExecKey, LABEL_NONE, UNIX_ABSTRACT_DEV, UNIX_ALLOW, UNIX_LABEL_HOLD_ALL, UNIX_NAME_LEN,
    UnixPeer, abstract_hash,
};

use crate::{
    exec::{inode_id, read_ptr},
    maps::{self, NAME_SCRATCH, UNIX_HOLD_ALL, UNIX_RULES},
};

/// The `sun_path` the peer `unix_sock` (`struct sock *`) was bound with, into `name`; its
/// length in bytes (0: unnamed, or unreadable).
#[inline(always)]
pub fn read_name(sk: *const u8, name: &mut [u8; UNIX_NAME_LEN]) -> u32 {
    let o = maps::kernel_offsets();
    if o.unix_valid == 0 {
        return 0;
    }
    let Some(addr) = read_ptr(sk, o.unix_addr) else {
        return 0;
    };
    // SAFETY: reads with the checked helper.
    let Ok(len) = (unsafe {
        bpf_probe_read_kernel(addr.wrapping_add(o.unix_address_len as usize).cast::<i32>())
    }) else {
        return 0;
    };
    // `struct sockaddr_un` is `sa_family_t sun_family; char sun_path[108]`.
    let path = addr.wrapping_add(o.unix_address_name as usize + 2);
    // SAFETY: as above; read straight into `name` (no copy on the BPF stack).
    match unsafe { bpf_probe_read_kernel_buf(path, name) } {
        Ok(()) => (len.clamp(2, 2 + UNIX_NAME_LEN as i32) - 2) as u32,
        Err(_) => 0,
    }
}

/// The peer socket `sk` (`struct sock *` of a `unix_sock`) as the policy names it; `None`
/// for an unnamed one (a socketpair's, or one never bound), which no other process can reach
/// by name.
#[inline(always)]
pub fn peer(sk: *const u8) -> Option<UnixPeer> {
    let o = maps::kernel_offsets();
    if o.unix_valid == 0 {
        return None;
    }
    if let Some(dentry) = read_ptr(sk, o.unix_path_dentry) {
        let inode = read_ptr(dentry, o.dentry_inode)?;
        let (dev, ino) = inode_id(inode)?;
        return Some(UnixPeer { dev, ino });
    }
    // This CPU's scratch slot: 108 bytes do not fit on the BPF stack beside the hook's own.
    let name = NAME_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the slot belongs to this CPU for this program run.
    let name = unsafe { &mut *name };
    let len = read_name(sk, name);
    if len == 0 || name[0] != 0 {
        return None;
    }
    Some(UnixPeer {
        dev: UNIX_ABSTRACT_DEV,
        ino: abstract_hash(name, len as usize),
    })
}

/// The local socket open as descriptor `fd` of the current task, when it is one: the
/// `struct sock *` of its peer (null while unconnected) and the socket's type. Reads the
/// task's descriptor table as the kernel has it at this moment.
#[inline(always)]
pub fn fd_socket(fd: u64) -> Option<(*const u8, u16)> {
    const AF_UNIX: i32 = 1;
    let o = maps::kernel_offsets();
    if o.unix_valid == 0 {
        return None;
    }
    let sock = fd_sock(fd)?;
    let ops = read_ptr(sock, o.socket_ops)?;
    if read::<i32>(ops, o.proto_ops_family)? != AF_UNIX {
        return None;
    }
    // `struct socket` starts with `socket_state state; short type;`.
    let sock_type = read::<u16>(sock, 4)?;
    let sk = read_ptr(sock, o.socket_sk)?;
    let peer = read::<u64>(sk, o.unix_peer)? as *const u8;
    Some((peer, sock_type))
}

/// The socket open as descriptor `fd` of the current task, when it is one: its `struct
/// socket *`, of any family. Reads the task's descriptor table as the kernel has it at this
/// moment.
#[inline(always)]
pub fn fd_sock(fd: u64) -> Option<*const u8> {
    const S_IFMT: u16 = 0o170_000;
    const S_IFSOCK: u16 = 0o140_000;
    let o = maps::kernel_offsets();
    if o.fd_valid == 0 || o.task_valid == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() } as *const u8;
    let files = read_ptr(task, o.task_files)?;
    let fdt = read_ptr(files, o.files_fdt)?;
    let max = read::<u32>(fdt, o.fdtable_max_fds)?;
    if fd >= u64::from(max) {
        return None;
    }
    let fds = read_ptr(fdt, o.fdtable_fd)?;
    let file = read_ptr(fds.wrapping_add(fd as usize * 8), 0)?;
    let inode = read_ptr(file, o.file_inode)?;
    if read::<u16>(inode, o.inode_mode)? & S_IFMT != S_IFSOCK {
        return None;
    }
    read_ptr(file, o.file_private_data)
}

/// A kernel value at `base + offset`, read with the checked helper.
#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: read with the checked helper; a bad address fails the read, nothing else.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

/// The `sk` of a `struct socket`.
#[inline(always)]
pub fn socket_sk(sock: *const u8) -> Option<*const u8> {
    let o = maps::kernel_offsets();
    if o.unix_valid == 0 {
        return None;
    }
    read_ptr(sock, o.socket_sk)
}

/// What a rule of `label` says about `peer` in the kernel (`UNIX_ALLOW`, `UNIX_HOLD`), or
/// `None` when no rule names it.
#[inline(always)]
pub fn rule(label: u32, peer: UnixPeer) -> Option<u32> {
    let key = ExecKey {
        label,
        _pad: 0,
        dev: peer.dev,
        ino: peer.ino,
    };
    // SAFETY: reading a plain value out of the map.
    unsafe { UNIX_RULES.get(&key) }.copied()
}

/// Whether `label` reaches `peer` only by a decision: its own rule does not allow it, or no
/// rule of its names it and it holds every socket, or it is a deputy held for every label
/// (label 0) that the label's own rule does not name.
#[inline(always)]
pub fn restricts(label: u32, peer: UnixPeer) -> bool {
    match rule(label, peer) {
        Some(r) => r != UNIX_ALLOW,
        None => hold_all(label) || rule(LABEL_NONE, peer).is_some(),
    }
}

/// Whether `label` holds the local sockets no rule names.
#[inline(always)]
pub fn hold_all(label: u32) -> bool {
    // SAFETY: as above.
    unsafe { UNIX_HOLD_ALL.get(label) }.is_some_and(|v| *v == UNIX_LABEL_HOLD_ALL)
}

/// Whether `label` restricts any local socket (a rule that holds or denies one, or all held).
#[inline(always)]
pub fn restricted(label: u32) -> bool {
    // SAFETY: as above.
    unsafe { UNIX_HOLD_ALL.get(label) }.is_some()
}
