//! Attempts on countersign itself, as a labelled root agent would make them: each does one
//! thing that would change, stop, read or step around enforcement, undoes it where it
//! succeeded (the unlabelled control run must leave the host as it was), and reports
//! `tampered` if it succeeded, else `error ERRNO`.
use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::{Done, Outcome, errno};

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// `open(path, flags)`, closed again.
fn open(path: &str, flags: i32) -> Outcome {
    let p = cstr(path);
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just opened.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(Done::Tampered)
}

/// `bpf(BPF_OBJ_GET)` on a pinned map or link: the way to every map countersign keeps.
pub fn bpf(pin: &str) -> Outcome {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u8; 108],
    }
    let p = cstr(pin);
    let attr = ObjGet {
        pathname: p.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: [0; 108],
    };
    const BPF_OBJ_GET: i64 = 7;
    // SAFETY: `attr` lives for the call; its size is given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just returned.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(Done::Tampered)
}

/// `SIGCONT` (harmless to a running process) to `pid`.
pub fn signal(pid: i32) -> Outcome {
    // SAFETY: plain system call.
    if unsafe { libc::kill(pid, libc::SIGCONT) } != 0 {
        return Err(errno());
    }
    Ok(Done::Tampered)
}

/// `PTRACE_SEIZE` of `pid`, detached again.
pub fn ptrace(pid: i32) -> Outcome {
    // SAFETY: plain system calls.
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) } != 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
    Ok(Done::Tampered)
}

/// `/proc/PID/mem` opened for writing.
pub fn mem(pid: i32) -> Outcome {
    open(&format!("/proc/{pid}/mem"), libc::O_RDWR)
}

/// `pidfd_getfd`: descriptor 0 of `pid`.
pub fn pidfd_getfd(pid: i32) -> Outcome {
    // SAFETY: plain system calls; results checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just returned.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            0,
            0,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(Done::Tampered)
}

/// `PATH` opened for writing (appending nothing).
pub fn write(path: &str) -> Outcome {
    open(path, libc::O_WRONLY | libc::O_APPEND)
}

/// `PATH` opened for reading.
pub fn read(path: &str) -> Outcome {
    open(path, libc::O_RDONLY)
}

/// `PATH` truncated by an open for reading with `O_TRUNC` (its content written back).
pub fn truncate(path: &str) -> Outcome {
    let content = std::fs::read(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    open(path, libc::O_RDONLY | libc::O_TRUNC)?;
    let emptied = std::fs::metadata(path).is_ok_and(|m| m.len() == 0);
    let _ = std::fs::write(path, &content);
    if emptied || content.is_empty() {
        Ok(Done::Tampered)
    } else {
        // The open passed but truncated nothing: not refused, not done either.
        Err(libc::EIO)
    }
}

/// An extended attribute set on `PATH` (in the `trusted` namespace, which root may write on
/// any file system that has extended attributes), then removed.
pub fn xattr(path: &str) -> Outcome {
    let (p, name) = (cstr(path), cstr("trusted.cs-escape"));
    // SAFETY: NUL-terminated path and name; a one-byte value.
    if unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0) } != 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    if unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(Done::Tampered)
}

/// A POSIX ACL on `PATH` that gives `nobody` read and write access (another principal could
/// then change the file), then removed and the mode put back.
pub fn acl(path: &str) -> Outcome {
    use std::os::unix::fs::PermissionsExt as _;
    const UNDEFINED: u32 = u32::MAX;
    let mode = std::fs::metadata(path)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?
        .permissions()
        .mode();
    // `posix_acl_xattr_header` (version 2), then entries (tag, perm, id): the owner, the user
    // nobody, the group, the mask, others.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, UNDEFINED),
        (0x02, 6, 65_534),
        (0x04, 4, UNDEFINED),
        (0x10, 6, UNDEFINED),
        (0x20, 4, UNDEFINED),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let (p, name) = (cstr(path), cstr("system.posix_acl_access"));
    // SAFETY: NUL-terminated path and name; `acl` lives across the call.
    if unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), acl.as_ptr().cast(), acl.len(), 0) } != 0
    {
        return Err(errno());
    }
    // SAFETY: as above.
    unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) };
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    Ok(Done::Tampered)
}

/// `CAP_NET_ADMIN` over the host's network (the firewall, NAT, routes and interfaces need
/// it): the loopback interface's flags set to what they are (`SIOCSIFFLAGS`, which takes
/// nothing but that capability). With `own`, in a new user and network namespace first, where
/// the capability is the process's own.
pub fn net_admin(own: bool) -> Outcome {
    // SAFETY: plain system call with flags only.
    if own && unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        return Err(errno());
    }
    // SAFETY: plain system call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a descriptor this process just made.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *b as libc::c_char;
    }
    // SAFETY: `req` names the interface and receives its flags.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } != 0 {
        return Err(errno());
    }
    // SAFETY: the same flags written back.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) } != 0 {
        return Err(errno());
    }
    Ok(Done::Tampered)
}

/// Input pushed into a terminal with `TIOCSTI`: the shell that owns the terminal would read
/// it as typed and run it, outside the agent. A child in a new session makes a new
/// pseudo-terminal its controlling terminal (as the terminal an agent is started from is),
/// pushes a line into it and reads it back.
pub fn tty_inject() -> Outcome {
    const LINE: &[u8] = b"cs-escape\n";
    // SAFETY: a new pseudo-terminal pair for this process.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    // SAFETY: plain calls on the descriptor just made.
    if master < 0 || unsafe { libc::grantpt(master) } != 0 || unsafe { libc::unlockpt(master) } != 0
    {
        return Err(errno());
    }
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: `name` is writable for its length.
    if unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) } != 0 {
        return Err(errno());
    }
    // SAFETY: the child only makes system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, then _exit.
        unsafe {
            libc::setsid();
            let tty = libc::open(name.as_ptr(), libc::O_RDWR);
            if tty < 0 {
                libc::_exit(*libc::__errno_location());
            }
            for b in LINE {
                if libc::ioctl(tty, libc::TIOCSTI, b) != 0 {
                    libc::_exit(*libc::__errno_location());
                }
            }
            let mut got = [0u8; 16];
            let n = libc::read(tty, got.as_mut_ptr().cast(), got.len());
            libc::_exit(if n == LINE.len() as isize && got[..LINE.len()] == *LINE {
                0
            } else {
                libc::EIO
            });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 if libc::WIFEXITED(status) => Ok(Done::Tampered),
        code => Err(code),
    }
}

/// A UDP socket bound to port 53 of `ADDR` (where a resolver would answer), closed again.
pub fn bind_dns(addr: &str) -> Outcome {
    let ip: std::net::IpAddr = addr.parse().expect("an IP address");
    match std::net::UdpSocket::bind((ip, 53)) {
        Ok(_) => Ok(Done::Tampered),
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// `PATH` renamed aside and back.
pub fn rename(path: &str) -> Outcome {
    let (from, to) = (cstr(path), cstr(&format!("{path}-cs-escape")));
    // SAFETY: NUL-terminated paths.
    if unsafe { libc::rename(from.as_ptr(), to.as_ptr()) } != 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    unsafe { libc::rename(to.as_ptr(), from.as_ptr()) };
    Ok(Done::Tampered)
}

/// A second name for `PATH` in `DIR` (a hard link) opened for writing there, then removed.
pub fn link(path: &str, dir: &str) -> Outcome {
    let name = format!("{dir}/cs-escape-link");
    let (from, to) = (cstr(path), cstr(&name));
    // SAFETY: NUL-terminated paths.
    if unsafe { libc::link(from.as_ptr(), to.as_ptr()) } != 0 {
        return Err(errno());
    }
    let opened = open(&name, libc::O_WRONLY | libc::O_APPEND);
    // SAFETY: as above.
    unsafe { libc::unlink(to.as_ptr()) };
    opened
}

/// `PATH`, which does not exist, made by `how` — `create` (an `O_CREAT` open), `link` (a
/// hard link to a file made beside it), `rename` (such a file renamed to it) or `symlink` —
/// and removed again.
pub fn make(path: &str, how: &str) -> Outcome {
    let target = cstr(path);
    let scratch_name = format!("{path}-cs-escape");
    let scratch = cstr(&scratch_name);
    let with_scratch = |op: &dyn Fn() -> libc::c_int| {
        open(&scratch_name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)?;
        let r = op();
        let error = errno();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::unlink(scratch.as_ptr()) };
        if r == 0 {
            Ok(Done::Tampered)
        } else {
            Err(error)
        }
    };
    let made = match how {
        "create" => open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL),
        // SAFETY (all three): NUL-terminated paths.
        "link" => with_scratch(&|| unsafe { libc::link(scratch.as_ptr(), target.as_ptr()) }),
        "rename" => with_scratch(&|| unsafe { libc::rename(scratch.as_ptr(), target.as_ptr()) }),
        "symlink" => {
            let to = cstr("/dev/null");
            // SAFETY: as above.
            if unsafe { libc::symlink(to.as_ptr(), target.as_ptr()) } == 0 {
                Ok(Done::Tampered)
            } else {
                Err(errno())
            }
        }
        other => panic!("tamper-make: {other}: create, link, rename or symlink"),
    };
    if made.is_ok() {
        // SAFETY: as above.
        unsafe { libc::unlink(target.as_ptr()) };
    }
    made
}

/// A new file in `DIR`, removed again.
pub fn create_in(dir: &str) -> Outcome {
    let path = format!("{dir}/cs-escape");
    open(&path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)?;
    let p = cstr(&path);
    // SAFETY: a NUL-terminated path.
    unsafe { libc::unlink(p.as_ptr()) };
    Ok(Done::Tampered)
}

/// A tmpfs mounted on `DIR`, unmounted again.
pub fn mount(dir: &str) -> Outcome {
    let (src, target, fstype) = (cstr("cs-escape"), cstr(dir), cstr("tmpfs"));
    // SAFETY: NUL-terminated strings; no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    unsafe { libc::umount2(target.as_ptr(), 0) };
    Ok(Done::Tampered)
}

/// `init_module` of 64 bytes that are no module: the kernel looks at them (and refuses with
/// `ENOEXEC` or the like) unless the load itself is refused (`EPERM`). Anything but `EPERM`
/// means the load was let through to the kernel's checks.
pub fn module() -> Outcome {
    let image = [0u8; 64];
    let params = cstr("");
    // SAFETY: the buffer and string live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len(),
            params.as_ptr(),
        )
    };
    match (r, errno()) {
        (0, _) => Ok(Done::Tampered),
        (_, libc::EPERM) => Err(libc::EPERM),
        _ => Ok(Done::Tampered),
    }
}

/// A kernel setting (`kernel.core_pattern`, through which the kernel starts a program as
/// root) opened for writing.
pub fn sysctl() -> Outcome {
    open("/proc/sys/kernel/core_pattern", libc::O_WRONLY)
}

/// A sysfs setting (`/sys/kernel/uevent_helper`, a program the kernel starts as root on
/// every device event) opened for writing.
pub fn sysfs() -> Outcome {
    open("/sys/kernel/uevent_helper", libc::O_WRONLY)
}

/// `EPERM` is the refusal; any other outcome means the call got past the permission checks
/// (to the driver or the kernel's own checks of its arguments).
fn past_the_checks(r: libc::c_long) -> Outcome {
    match (r, errno()) {
        (r, _) if r >= 0 => Ok(Done::Tampered),
        (_, libc::EPERM) => Err(libc::EPERM),
        _ => Ok(Done::Tampered),
    }
}

/// `/proc/kcore` (all of the kernel's memory, and through its direct map every process's,
/// countersign's keys included) opened for reading.
pub fn kcore() -> Outcome {
    open("/proc/kcore", libc::O_RDONLY)
}

/// A disk's device node opened for reading (every file on it, secrets included, beneath the
/// file system's checks); anything but `EPERM` means the open reached the driver.
pub fn disk(path: &str) -> Outcome {
    let p = cstr(path);
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: the descriptor was just opened.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    past_the_checks(fd.into())
}

/// A device node (`/dev/null`'s numbers) made in `DIR`, removed again.
pub fn mknod(dir: &str) -> Outcome {
    let path = cstr(&format!("{dir}/cs-escape-node"));
    // SAFETY: a NUL-terminated path.
    let r = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    if r != 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    unsafe { libc::unlink(path.as_ptr()) };
    Ok(Done::Tampered)
}

/// `reboot(2)` setting what Ctrl-Alt-Del does to what it is already (no change): the call
/// that also restarts or powers off the host. Anything but `EPERM` means the capability
/// was granted.
pub fn reboot() -> Outcome {
    const CAD_ON: libc::c_int = 0x89AB_CDEF_u32 as libc::c_int;
    let on =
        std::fs::read_to_string("/proc/sys/kernel/ctrl-alt-del").is_ok_and(|v| v.trim() != "0");
    let cmd = if on { CAD_ON } else { 0 };
    // SAFETY: a command without an argument.
    let r = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            cmd,
            std::ptr::null::<u8>(),
        )
    };
    past_the_checks(r)
}

/// The realtime clock set to what it reads (carried forward by the monotonic clock, so that
/// it moves by nanoseconds at most): the clock the records are stamped with.
pub fn clock() -> Outcome {
    let now = |clock| {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a plain system call on a local struct.
        unsafe { libc::clock_gettime(clock, &raw mut t) };
        i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
    };
    let (real, mono) = (now(libc::CLOCK_REALTIME), now(libc::CLOCK_MONOTONIC));
    let set = real + (now(libc::CLOCK_MONOTONIC) - mono);
    let t = libc::timespec {
        tv_sec: (set / 1_000_000_000) as libc::time_t,
        tv_nsec: (set % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: as above.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &raw const t) } != 0 {
        return Err(errno());
    }
    Ok(Done::Tampered)
}

/// A software counter of processor 0 as a whole (every process that runs there, not a
/// task), closed again.
pub fn perf() -> Outcome {
    #[repr(C)]
    struct Attr {
        kind: u32,
        size: u32,
        config: u64,
        _rest: [u64; 14],
    }
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
    let attr = Attr {
        kind: PERF_TYPE_SOFTWARE,
        size: std::mem::size_of::<Attr>() as u32,
        config: PERF_COUNT_SW_CPU_CLOCK,
        _rest: [0; 14],
    };
    // SAFETY: `attr` lives for the call; its size is given in it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1 as libc::pid_t,
            0,
            -1,
            0,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just returned.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(Done::Tampered)
}

/// A writable descriptor of a file countersign guards, opened by another process and passed
/// in over a local socket (`SCM_RIGHTS`), as a service that opens files or disks for its
/// callers would: connects to the abstract socket `NAME` and receives one descriptor. The
/// kernel reports a descriptor it did not install by `MSG_CTRUNC` (no errno): that is
/// reported as `EPERM`, the refusal the hook returned.
pub fn receive(name: &str) -> Outcome {
    use std::os::unix::net::{SocketAddr, UnixStream};
    use std::os::{fd::AsRawFd as _, linux::net::SocketAddrExt as _};
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| libc::EINVAL)?;
    let stream =
        UnixStream::connect_addr(&addr).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // Room for one descriptor, aligned as `cmsghdr` needs.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at buffers that live for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the macros walk it.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    if cmsg.is_null() {
        return Err(if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            libc::EPERM
        } else {
            libc::ENOMSG
        });
    }
    // SAFETY: a control message the kernel wrote; SCM_RIGHTS carries ints.
    let fd = unsafe {
        if (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(libc::ENOMSG);
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
    };
    // SAFETY: the descriptor was just installed for this process.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_GETFL on a live descriptor.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
        Ok(Done::Tampered)
    } else {
        Err(libc::EBADF)
    }
}

/// fanotify's permission events on `DIR`: whoever holds the mark decides every open beneath
/// it (and may never answer). The mark goes with the descriptor, closed at once.
pub fn fanotify(dir: &str) -> Outcome {
    const FAN_CLASS_CONTENT: u32 = 0x04;
    const FAN_CLOEXEC: u32 = 0x01;
    const FAN_MARK_ADD: u32 = 0x01;
    const FAN_OPEN_PERM: u64 = 0x0001_0000;
    // SAFETY: fanotify_init takes flags; a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fanotify_init,
            FAN_CLASS_CONTENT | FAN_CLOEXEC,
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let p = cstr(dir);
    // SAFETY: a NUL-terminated path; the group descriptor is live.
    let r = unsafe {
        libc::fanotify_mark(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            FAN_MARK_ADD,
            FAN_OPEN_PERM,
            libc::AT_FDCWD,
            p.as_ptr(),
        )
    };
    if r != 0 {
        return Err(errno());
    }
    drop(fd);
    Ok(Done::Tampered)
}

/// `PID` signalled without `kill`: made the owner of a pipe's read end with `O_ASYNC`
/// (`F_SETOWN`), whose default signal `SIGIO` terminates, then a byte written. The kernel
/// sends the signal when the byte is there; the sender is not told whether it arrived.
pub fn sigio(pid: i32) -> Outcome {
    let mut fds = [0; 2];
    // SAFETY: a pipe into a two-element array; fcntl and write on its own descriptors.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(errno());
        }
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        if libc::fcntl(r.as_raw_fd(), libc::F_SETOWN, pid) != 0
            || libc::fcntl(
                r.as_raw_fd(),
                libc::F_SETFL,
                libc::O_ASYNC | libc::O_NONBLOCK,
            ) != 0
        {
            return Err(errno());
        }
        if libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) != 1 {
            return Err(errno());
        }
    }
    Ok(Done::Tampered)
}

/// `PID` moved into the cgroup `DIR`: its pid written to `DIR/cgroup.procs` (which moves the
/// whole process). A process that froze `DIR` first, or limited it, would stop the process.
pub fn cgroup_move(pid: i32, dir: &str) -> Outcome {
    let path = format!("{dir}/cgroup.procs");
    std::fs::write(&path, pid.to_string()).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    Ok(Done::Tampered)
}

/// `PATH` opened for reading and locked: a shared `flock`, or (`lease`) a read lease, which
/// makes another process's open for writing wait for the holder. Released again.
pub fn lock(path: &str, lease: bool) -> Outcome {
    let p = cstr(path);
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just opened.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: lock calls on a live descriptor.
    let (take, release) = unsafe {
        if lease {
            (
                libc::fcntl(raw, libc::F_SETLEASE, libc::F_RDLCK),
                libc::F_SETLEASE,
            )
        } else {
            (
                libc::flock(raw, libc::LOCK_SH | libc::LOCK_NB),
                libc::F_UNLCK,
            )
        }
    };
    if take != 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    unsafe {
        if lease {
            libc::fcntl(raw, release, libc::F_UNLCK);
        } else {
            libc::flock(raw, libc::LOCK_UN);
        }
    }
    Ok(Done::Tampered)
}

/// How process `pid` runs, set to what it already is (so that the unlabelled control run
/// changes nothing): `limits` its open-file limit (`prlimit`; an `RLIMIT_CPU` of a second
/// would have the kernel kill it), `nice` its priority (`setpriority`), `affinity` its
/// processors (`sched_setaffinity`).
pub fn process_setting(what: &str, pid: i32) -> Outcome {
    // SAFETY: plain calls about another process, with buffers that live for each call.
    let r = unsafe {
        match what {
            "limits" => {
                let mut old: libc::rlimit = std::mem::zeroed();
                if libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) != 0 {
                    return Err(errno());
                }
                libc::prlimit(
                    pid,
                    libc::RLIMIT_NOFILE,
                    &raw const old,
                    std::ptr::null_mut(),
                )
            }
            "nice" => {
                *libc::__errno_location() = 0;
                let nice = libc::getpriority(libc::PRIO_PROCESS, pid as libc::id_t);
                if nice == -1 && errno() != 0 {
                    return Err(errno());
                }
                libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice)
            }
            "affinity" => {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                let size = std::mem::size_of::<libc::cpu_set_t>();
                if libc::sched_getaffinity(pid, size, &raw mut set) != 0 {
                    return Err(errno());
                }
                libc::sched_setaffinity(pid, size, &raw const set)
            }
            _ => return Err(libc::EINVAL),
        }
    };
    if r != 0 {
        return Err(errno());
    }
    Ok(Done::Tampered)
}
