//! The context of a held action, read from /proc and the stopped task's memory: what the
//! approver needs to decide (binary, argv, cwd, user, parent chain, destination).
//!
//! Every read is bounded; a field that cannot be read is left empty rather than guessed.
use std::{
    io::IoSliceMut,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::{
    sys::uio::{RemoteIoVec, process_vm_readv},
    unistd::Pid,
};

use crate::proto::ProcInfo;

/// A socket action as people read it: `packet/dgram protocol 768`.
#[must_use]
pub fn socket(family: u16, sock_type: u16, protocol: u16) -> String {
    use crate::policy::schema::{SocketFamily, SocketType};
    format!(
        "{}/{} protocol {protocol}",
        SocketFamily(family),
        SocketType(sock_type)
    )
}

/// At most this many argv entries are read.
pub const MAX_ARGS: usize = 256;
/// At most this many bytes of one argument or path.
pub const MAX_ARG_BYTES: usize = 4096;
/// At most this many bytes of argv in all.
pub const MAX_ARGV_BYTES: usize = 64 * 1024;
/// At most this many ancestors are listed.
pub const MAX_PARENTS: usize = 16;

/// A file as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// From the kernel's encoding of the device (`MAJOR << 20 | MINOR`, as the hooks read it
    /// from a super block) to `stat`'s.
    #[must_use]
    pub fn from_kernel(dev: u64, ino: u64) -> Self {
        let (major, minor) = ((dev >> 20) as u32, (dev & 0xf_ffff) as u32);
        Self {
            dev: libc::makedev(major, minor),
            ino,
        }
    }

    /// The kernel's encoding of the device (the inverse of [`FileId::from_kernel`]).
    #[must_use]
    pub fn kernel_dev(self) -> u64 {
        (u64::from(libc::major(self.dev)) << 20) | u64::from(libc::minor(self.dev))
    }
}

/// How long the daemon waits for a file system to answer about a path a labelled process
/// chose (its executable, a script, a local socket's file).
pub const FS_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Helper threads that may be stuck in a file system that never answered; beyond them, such
/// work is refused at once.
const MAX_STUCK_FS_THREADS: usize = 8;

type FsJob = Box<dyn FnOnce() + Send>;

/// The queue of the thread that touches agent-chosen paths (`None`: start one).
static FS_WORKER: std::sync::Mutex<Option<std::sync::mpsc::Sender<FsJob>>> =
    std::sync::Mutex::new(None);
/// Earlier such threads still stuck in a file system.
static STUCK_FS_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `work` (which touches a path a labelled process chose) off the caller's thread and
/// waits at most [`FS_ANSWER_WITHIN`] for it: the path may lie on a file system the agent
/// serves itself (FUSE) or one that hangs, which must not stall the daemon's loop and with
/// it every decision. `None`: no answer in time (the thread is left to finish, and counted
/// against [`MAX_STUCK_FS_THREADS`]), or too many are stuck already. Callers treat it as a
/// path that cannot be read.
pub fn bounded<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    bounded_or(work).ok()
}

/// Why [`bounded_or`] has no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// The work did not finish in time (its thread is left to finish).
    Late,
    /// Too many earlier threads are stuck: the work was not tried.
    TooManyStuck,
}

/// [`bounded`], saying why there is no answer.
pub fn bounded_or<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Unanswered> {
    use std::sync::{atomic::Ordering, mpsc};
    let mut worker = FS_WORKER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (answer_tx, answer) = mpsc::sync_channel(1);
    let job: FsJob = Box::new(move || {
        let _ = answer_tx.send(work());
    });
    let jobs = match &*worker {
        Some(jobs) => jobs.clone(),
        None => {
            if STUCK_FS_THREADS.load(Ordering::Relaxed) >= MAX_STUCK_FS_THREADS {
                tracing::warn!(
                    "file systems or memory of labelled processes have not answered {MAX_STUCK_FS_THREADS} times; refusing to touch them until one does"
                );
                return Err(Unanswered::TooManyStuck);
            }
            let (tx, rx) = mpsc::channel::<FsJob>();
            std::thread::Builder::new()
                .name("cs-paths".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .map_err(|_| Unanswered::TooManyStuck)?;
            *worker = Some(tx.clone());
            tx
        }
    };
    if jobs.send(job).is_err() {
        *worker = None;
        return Err(Unanswered::TooManyStuck);
    }
    match answer.recv_timeout(FS_ANSWER_WITHIN) {
        Ok(value) => Ok(value),
        Err(_) => {
            // The worker is stuck in that file system: the next job gets a new one. This one
            // ends when its job returns (its queue is gone then) and is uncounted.
            *worker = None;
            STUCK_FS_THREADS.fetch_add(1, Ordering::Relaxed);
            let _ = jobs.send(Box::new(|| {
                STUCK_FS_THREADS.fetch_sub(1, Ordering::Relaxed);
            }));
            tracing::warn!(
                within = ?FS_ANSWER_WITHIN,
                "a file system or the memory of a labelled process did not answer; treated as unreadable"
            );
            Err(Unanswered::Late)
        }
    }
}

/// Reads a process's memory (an exec's filename and argv, a local socket's address,
/// `/proc/PID/cmdline`) with `read`, off the daemon's loop and within [`FS_ANSWER_WITHIN`]
/// (see [`bounded`]). Memory answers at once unless its process arranged otherwise: a page
/// registered with `userfaultfd` whose handler does not serve it, a mapping of a file on a
/// file system that hangs. When `stalling` names the labelled process whose held action is
/// being read (by a pidfd taken before the read, so that a pid reused meanwhile is not
/// hit), that process is killed: it made its own memory unreadable in the middle of its own
/// held action, and its death also ends the stuck read (its `userfaultfd` closes with it).
/// `None`: not read.
pub fn from_memory<T: Send + 'static>(
    stalling: Option<u32>,
    read: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    use std::os::fd::FromRawFd as _;
    let pidfd = stalling.and_then(|tid| {
        // A pidfd names a thread group by its leader.
        let pid = super::guard::task_ids(tid).map_or(tid, |(tgid, _)| tgid);
        // SAFETY: pidfd_open takes a pid and flags; a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: the descriptor was just returned to this process.
        (fd >= 0).then(|| (pid, unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    });
    match bounded_or(read) {
        Ok(value) => Some(value),
        Err(Unanswered::Late) => {
            if let Some((pid, pidfd)) = pidfd {
                use std::os::fd::AsRawFd as _;
                // SAFETY: a signal through a pidfd this process owns; no siginfo.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                tracing::warn!(
                    pid,
                    within = ?FS_ANSWER_WITHIN,
                    "a labelled process's memory did not answer while its action was held (userfaultfd, or a mapping of a hung file system): killed"
                );
            }
            None
        }
        Err(Unanswered::TooManyStuck) => None,
    }
}

pub fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// `comm`, state letter and parent pid from `/proc/PID/stat`.
pub fn stat(pid: u32) -> Option<(String, char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 2..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// When the process started (`/proc/PID/stat` field 22, clock ticks since boot): with the
/// pid, names one process for good (pids are reused, start times with them are not).
pub fn start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    // Fields after the command: state is field 3, so starttime (22) is the 20th.
    text.get(close + 2..)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

pub fn exists(tid: u32) -> bool {
    Path::new(&format!("/proc/{tid}")).exists()
}

pub fn readlink(pid: u32, what: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/{what}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The chain of ancestors, nearest first.
pub fn parents(pid: u32) -> Vec<ProcInfo> {
    let mut out = Vec::new();
    let mut cur = stat(pid).map(|(_, _, ppid)| ppid);
    while let Some(p) = cur {
        if p == 0 || out.len() >= MAX_PARENTS {
            break;
        }
        let Some((comm, _, ppid)) = stat(p) else {
            break;
        };
        out.push(ProcInfo {
            pid: p,
            comm,
            exe: readlink(p, "exe"),
        });
        cur = Some(ppid);
    }
    out
}

/// The user name of `uid` from /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// The argv of a task from `/proc/PID/cmdline` (the loaded image's own copy).
pub fn cmdline(pid: u32) -> Option<(Vec<String>, bool)> {
    from_memory(None, move || cmdline_now(pid)).flatten()
}

/// [`cmdline`] of the labelled process whose held action is being shown: killed when its
/// memory does not answer (see [`from_memory`]).
pub fn cmdline_of_held(pid: u32) -> Option<(Vec<String>, bool)> {
    from_memory(Some(pid), move || cmdline_now(pid)).flatten()
}

/// [`read_cbytes`] of the labelled task whose held action is being read (see
/// [`from_memory`]).
pub fn held_cbytes(tid: u32, addr: u64) -> Option<(Vec<u8>, bool)> {
    from_memory(Some(tid), move || read_cbytes(tid, addr)).flatten()
}

/// [`read_argv_bytes`] of the labelled task whose held action is being read.
pub fn held_argv_bytes(tid: u32, argv: u64, width: usize) -> Option<(Vec<Vec<u8>>, bool)> {
    from_memory(Some(tid), move || read_argv_bytes(tid, argv, width)).flatten()
}

/// `len` bytes at `addr` of the labelled task whose held action is being read (fewer where
/// the memory ends).
pub fn held_bytes(tid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    from_memory(Some(tid), move || {
        let mut buf = vec![0u8; len];
        let n = read_remote(tid, addr, &mut buf)?;
        buf.truncate(n);
        Some(buf)
    })
    .flatten()
}

/// `/proc/PID/cmdline` read on the caller's thread (the kernel reads it from the process's
/// memory).
fn cmdline_now(pid: u32) -> Option<(Vec<String>, bool)> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    let f = std::fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    f.take(MAX_ARGV_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    let truncated = buf.len() > MAX_ARGV_BYTES;
    buf.truncate(MAX_ARGV_BYTES);
    let mut args: Vec<String> = buf
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    Some((args, truncated))
}

/// Reads `buf.len()` bytes at `addr` of process `pid`'s memory; how many were read.
pub fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> Option<usize> {
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).ok()?,
        len: buf.len(),
    }];
    let mut local = [IoSliceMut::new(buf)];
    process_vm_readv(Pid::from_raw(i32::try_from(pid).ok()?), &mut local, &remote).ok()
}

/// A NUL-terminated string in the task's memory, at most [`MAX_ARG_BYTES`] long; the bool
/// says whether it was cut.
pub fn read_cbytes(pid: u32, addr: u64) -> Option<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 256];
    let mut at = addr;
    // Read past the limit by one chunk at most, to see whether the terminator follows.
    while out.len() <= MAX_ARG_BYTES {
        // Do not cross a page boundary in one read: the next page may be unmapped.
        let to_page_end = 4096 - (at % 4096) as usize;
        let want = chunk.len().min(to_page_end);
        let n = read_remote(pid, at, &mut chunk[..want])?;
        if n == 0 {
            return None;
        }
        if let Some(end) = chunk[..n].iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..end]);
            // The terminator can lie past the limit within the last chunk.
            let cut = out.len() > MAX_ARG_BYTES;
            out.truncate(MAX_ARG_BYTES);
            return Some((out, cut));
        }
        out.extend_from_slice(&chunk[..n]);
        at += n as u64;
    }
    out.truncate(MAX_ARG_BYTES);
    Some((out, true))
}

/// The argv array at `argv` in the task's memory, of `width`-byte pointers (4 for a 32-bit
/// caller), bounded by the `MAX_*` limits; the bool says whether it was cut.
pub fn read_argv_bytes(pid: u32, argv: u64, width: usize) -> Option<(Vec<Vec<u8>>, bool)> {
    let mut args = Vec::new();
    let mut total = 0;
    for i in 0..MAX_ARGS as u64 {
        let mut ptr = [0u8; 8];
        if read_remote(pid, argv + width as u64 * i, &mut ptr[..width])? != width {
            return None;
        }
        let ptr = u64::from_le_bytes(ptr);
        if ptr == 0 {
            return Some((args, false));
        }
        let (arg, cut) = read_cbytes(pid, ptr)?;
        total += arg.len();
        args.push(arg);
        if cut || total > MAX_ARGV_BYTES {
            return Some((args, true));
        }
    }
    Some((args, true))
}

/// The file a pre-exec filename names, seen from the task (its root and cwd).
pub fn resolve_in_task(pid: u32, filename: &str) -> PathBuf {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    if filename.starts_with('/') {
        root.join(filename.trim_start_matches('/'))
    } else {
        PathBuf::from(format!("/proc/{pid}/cwd")).join(filename)
    }
}

/// The interpreter named by a `#!` line, if `path` is a script (see [`shebang_bytes`]).
pub fn shebang(path: &Path) -> Option<(String, Option<String>)> {
    let (interp, arg) = shebang_bytes(path)?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Some((text(interp), arg.map(text)))
}

/// The interpreter and its argument a `#!` line names, parsed as the kernel does
/// (`binfmt_script`): spaces and tabs after `#!` skipped, the interpreter up to the next
/// space, tab or end of line, the argument the rest of the line without the spaces and tabs
/// around it. `None` if `path` is not a script.
pub fn shebang_bytes(path: &Path) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut head = [0u8; 256];
    // Never blocks: a path an agent names may be a FIFO (or, through /proc/PID/fd, a pipe).
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !blank(b))?;
    let line = &line[start..];
    let end = line.iter().position(blank).unwrap_or(line.len());
    let (interp, rest) = line.split_at(end);
    let rest = rest
        .iter()
        .position(|b| !blank(b))
        .map_or(&[][..], |s| &rest[s..]);
    let rest = &rest[..rest.iter().rposition(|b| !blank(b)).map_or(0, |e| e + 1)];
    (!interp.is_empty()).then(|| (interp.to_vec(), (!rest.is_empty()).then(|| rest.to_vec())))
}

/// `address:port` for display (`[v6]:port` for IPv6).
pub fn destination(family: u16, addr: &[u8; 16], port: u16) -> String {
    if family == libc::AF_INET6 as u16 {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(*addr))
    } else {
        format!(
            "{}:{port}",
            std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])
        )
    }
}

pub fn protocol(sock_type: u16) -> Option<String> {
    match i32::from(sock_type) {
        0 => None,
        libc::SOCK_STREAM => Some("tcp".into()),
        libc::SOCK_DGRAM => Some("udp".into()),
        t => Some(format!("type {t}")),
    }
}

/// The cgroup v2 path of a task, as in `/proc/PID/cgroup` (`0::/path`).
pub fn cgroup_path(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_argv_text(at: u64) -> Option<(Vec<String>, bool)> {
        let (argv, cut) = read_argv_bytes(std::process::id(), at, 8)?;
        Some((
            argv.iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            cut,
        ))
    }

    #[test]
    fn formats_destinations() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(destination(libc::AF_INET as u16, &a, 443), "10.1.2.3:443");
        let v6 = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(destination(libc::AF_INET6 as u16, &v6, 80), "[::1]:80");
    }

    #[test]
    fn reads_own_argv_from_memory() {
        // Build a C-style argv in our own memory and read it back through process_vm_readv.
        let args = [c"/bin/echo", c"hello world", c""];
        let ptrs: Vec<u64> = args
            .iter()
            .map(|a| a.as_ptr() as u64)
            .chain(std::iter::once(0))
            .collect();
        let (argv, cut) = read_argv_text(ptrs.as_ptr() as u64).unwrap();
        assert_eq!(argv, ["/bin/echo", "hello world", ""]);
        assert!(!cut);
    }

    /// Regression: a terminator within the last chunk but past the limit was reported as
    /// not cut, and the argument returned whole.
    #[test]
    fn long_argument_is_cut_and_flagged() {
        for extra in [1, 100, 255, 256, 5000] {
            let long = std::ffi::CString::new(vec![b'a'; MAX_ARG_BYTES + extra]).unwrap();
            let ptrs = [long.as_ptr() as u64, 0];
            let (argv, cut) = read_argv_text(ptrs.as_ptr() as u64).unwrap();
            assert!(cut, "{extra} bytes over");
            assert_eq!(argv[0].len(), MAX_ARG_BYTES);
        }
        let exact = std::ffi::CString::new(vec![b'a'; MAX_ARG_BYTES]).unwrap();
        let ptrs = [exact.as_ptr() as u64, 0];
        let (argv, cut) = read_argv_text(ptrs.as_ptr() as u64).unwrap();
        assert_eq!(argv[0].len(), MAX_ARG_BYTES);
        assert!(!cut, "exactly at the limit is whole");
    }

    #[test]
    fn own_stat_and_cmdline() {
        let (_, state, ppid) = stat(std::process::id()).unwrap();
        assert!(ppid > 0);
        assert!(state == 'R' || state == 'S');
        let (argv, _) = cmdline(std::process::id()).unwrap();
        assert!(!argv.is_empty());
    }

    #[test]
    fn parses_shebang() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "#!/bin/sh -e\necho\n").unwrap();
        assert_eq!(shebang(&p), Some(("/bin/sh".into(), Some("-e".into()))));
        std::fs::write(&p, "echo\n").unwrap();
        assert_eq!(shebang(&p), None);
    }

    /// As `binfmt_script` reads it: blanks after `#!` skipped, the interpreter up to a blank,
    /// the argument the rest of the line with the blanks around it removed (inner ones kept).
    #[test]
    fn parses_shebang_as_the_kernel_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let parsed = |text: &str| {
            std::fs::write(&p, text).unwrap();
            shebang_bytes(&p)
        };
        let s = |t: &str| t.as_bytes().to_vec();
        assert_eq!(parsed("#! \t/bin/sh\n"), Some((s("/bin/sh"), None)));
        assert_eq!(
            parsed("#!/usr/bin/env  python3 -u \t\nx"),
            Some((s("/usr/bin/env"), Some(s("python3 -u"))))
        );
        assert_eq!(parsed("#!/bin/sh"), Some((s("/bin/sh"), None)));
        assert_eq!(parsed("#!  \n"), None);
        assert_eq!(parsed("#"), None);
    }

    /// A path an agent names may be a FIFO: reading its `#!` line must not wait for a writer.
    #[test]
    fn a_fifo_is_not_a_script_and_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(shebang_bytes(&p), None);
    }

    #[test]
    fn work_that_does_not_answer_in_time_is_given_up_and_the_next_runs() {
        assert_eq!(bounded(|| 7), Some(7));
        let started = std::time::Instant::now();
        let hung =
            bounded(|| std::thread::sleep(FS_ANSWER_WITHIN + std::time::Duration::from_secs(1)));
        assert_eq!(hung, None);
        let waited = started.elapsed();
        assert!(
            waited >= FS_ANSWER_WITHIN
                && waited < FS_ANSWER_WITHIN + std::time::Duration::from_secs(1),
            "{waited:?}"
        );
        // The stuck thread is left behind; the next work gets a thread of its own at once.
        let started = std::time::Instant::now();
        assert_eq!(bounded(|| "answered"), Some("answered"));
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }
}
