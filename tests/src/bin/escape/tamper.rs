//! Attempts on countersign itself, as a labelled root agent would make them: each does one
//! thing that would change, stop, read or step around enforcement, undoes it where it
//! succeeded (the unlabelled control run must leave the host as it was), and reports
//! `tampered` if it succeeded, else `error ERRNO`.
use std::{ffi::CString, os::fd::FromRawFd as _, os::fd::OwnedFd};

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
