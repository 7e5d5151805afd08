//! Exec escapes: ways to make a held exec run before (or other than) its approval. Each runs
//! `cs-escape mark MARKER` (or a program at PATH doing the same) somehow; the evidence of an
//! escape is the marker file. A technique reports `ran` when the marker exists once it is
//! done, `error N` otherwise (N: the child's exit status, or 128 + its signal).
use std::{
    ffi::CString,
    path::Path,
    time::{Duration, Instant},
};

use super::{Done, Outcome};

/// How long a technique keeps trying (the scenarios decide well within it).
const TRY_FOR: Duration = Duration::from_secs(30);

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in an argument")
}

fn self_exe() -> String {
    std::env::current_exe()
        .expect("the running binary")
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `execv(program, [program, "mark", marker])`; returns only on failure (the errno).
fn exec_mark(program: &str, marker: &str) -> i32 {
    let args = [cstr(program), cstr("mark"), cstr(marker)];
    let argv = [
        args[0].as_ptr(),
        args[1].as_ptr(),
        args[2].as_ptr(),
        std::ptr::null(),
    ];
    // SAFETY: NUL-terminated strings and a NULL-terminated array, alive for the call.
    unsafe { libc::execv(argv[0], argv.as_ptr()) };
    errno()
}

/// `cs-escape mark MARKER`: the program an escape tries to run.
pub fn mark(marker: &str) -> Outcome {
    std::fs::write(marker, b"ran").map_err(|e| e.raw_os_error().unwrap_or(5))?;
    Ok(Done::Ran)
}

fn outcome(marker: &str, status: i32) -> Outcome {
    if Path::new(marker).exists() {
        Ok(Done::Ran)
    } else if libc::WIFEXITED(status) {
        Err(libc::WEXITSTATUS(status))
    } else {
        Err(128 + libc::WTERMSIG(status))
    }
}

/// Forks a child that runs `child` (which should exec) and exits with its result.
fn fork(child: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child only calls async-signal-safe functions before it execs or exits
    // (the closures below: ptrace, read, execv).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", errno());
    if pid == 0 {
        let code = child();
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code.clamp(1, 125)) };
    }
    pid
}

/// Drives `pid` until it ends: as its tracer, every stop is continued (the stop signal
/// suppressed); otherwise `SIGCONT` is sent all the time. The child's wait status.
fn drive(pid: libc::pid_t, traced: bool) -> i32 {
    let deadline = Instant::now() + TRY_FOR;
    loop {
        let mut status = 0;
        // SAFETY: plain system calls on our child.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return status;
            }
            if traced && libc::WIFSTOPPED(status) {
                // Resume it, suppressing the stop signal.
                // SAFETY: as above.
                unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) };
            }
        }
        if !traced {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A child that asked to be traced execs; its parent continues every stop (a stop signal
/// continued by a tracer is gone).
pub fn traceme(marker: &str) -> Outcome {
    let exe = self_exe();
    let pid = fork(|| {
        // SAFETY: plain system call.
        if unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) } != 0 {
            return 100;
        }
        exec_mark(&exe, marker)
    });
    outcome(marker, drive(pid, true))
}

/// The parent attaches to its child (`PTRACE_SEIZE`, exec events traced) before the child
/// execs, then continues every stop.
pub fn attach(marker: &str) -> Outcome {
    let exe = self_exe();
    let mut fds = [0; 2];
    // SAFETY: a pipe into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let pid = fork(|| {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte: the parent says it is attached.
        unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        exec_mark(&exe, marker)
    });
    // SAFETY: plain system calls on our child.
    let seized = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            0,
            libc::PTRACE_O_TRACEEXEC as libc::c_long,
        )
    };
    if seized != 0 {
        let e = errno();
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Err(e);
    }
    // SAFETY: one byte into the pipe.
    unsafe { libc::write(fds[1], b"g".as_ptr().cast(), 1) };
    outcome(marker, drive(pid, true))
}

/// A child execs while its parent floods it with `SIGCONT`.
pub fn sigcont(marker: &str) -> Outcome {
    let exe = self_exe();
    let pid = fork(|| exec_mark(&exe, marker));
    outcome(marker, drive(pid, false))
}

/// A child execs while a sibling sends it `SIGCONT` without a pause, from before the exec
/// until the child ends: a stop that a `SIGCONT` ends does not last.
pub fn sigcont_storm(marker: &str) -> Outcome {
    let exe = self_exe();
    let pid = fork(|| exec_mark(&exe, marker));
    let storm = fork(move || {
        let deadline = Instant::now() + TRY_FOR;
        while Instant::now() < deadline {
            // SAFETY: signalling our sibling (a zombie until our parent reaps it).
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        0
    });
    let status = wait_end(pid);
    // SAFETY: ending and reaping our own child.
    unsafe {
        libc::kill(storm, libc::SIGKILL);
        libc::waitpid(storm, std::ptr::null_mut(), 0);
    }
    outcome(marker, status)
}

/// The parent attaches to its child (`PTRACE_ATTACH`) as soon as the child is stopped after
/// its exec — before anyone else could trace it — then continues every stop.
pub fn attach_stopped(marker: &str) -> Outcome {
    let exe = self_exe();
    let pid = fork(|| exec_mark(&exe, marker));
    let deadline = Instant::now() + TRY_FOR;
    loop {
        match run_state(pid) {
            Some(b'T' | b't') => break,
            // Ended (it ran, or was killed): nothing to attach to.
            None | Some(b'Z' | b'X') => return outcome(marker, wait_end(pid)),
            Some(_) if Instant::now() > deadline => {
                // SAFETY: ending our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return outcome(marker, wait_end(pid));
            }
            Some(_) => std::hint::spin_loop(),
        }
    }
    // SAFETY: plain system call on our child.
    if unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) } != 0 {
        // Somebody else traces it already: it ends as they decide.
        return outcome(marker, wait_end(pid));
    }
    outcome(marker, drive(pid, true))
}

/// The state letter of process `pid` (`/proc/PID/stat`), `None` once it is gone.
fn run_state(pid: libc::pid_t) -> Option<u8> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) S ...": COMM may hold anything, so the state follows the last ')'.
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
}

/// Waits for our child `pid` to end (killing it after [`TRY_FOR`]); its wait status.
fn wait_end(pid: libc::pid_t) -> i32 {
    let deadline = Instant::now() + TRY_FOR;
    loop {
        let mut status = 0;
        // SAFETY: plain system calls on our child.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
            return status;
        }
        if r < 0 {
            return status;
        }
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The program at `path` is run (the scenario may replace the file meanwhile).
pub fn path(program: &str, marker: &str) -> Outcome {
    Err(exec_mark(program, marker))
}

/// Installs a seccomp filter of its own that sends every exec to a listener it answers
/// itself ("go on"), then execs: the newest filter's listener is the one the kernel asks.
pub fn own_notifier(marker: &str) -> Outcome {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ALLOW,
        SECCOMP_RET_USER_NOTIF, sock_filter,
    };
    let f = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        f(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),
        f(BPF_JMP | BPF_JEQ | BPF_K, 2, 0, libc::SYS_execve as u32),
        f(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, libc::SYS_execveat as u32),
        f(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW),
        f(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_USER_NOTIF),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl; the filter outlives the call.
    let listener = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &raw const prog,
        )
    };
    if listener < 0 {
        return Err(errno());
    }
    let listener = listener as i32;
    std::thread::spawn(move || {
        loop {
            // SAFETY: zeroed as the kernel requires; the ioctls fill and read the structs.
            unsafe {
                let mut n: libc::seccomp_notif = std::mem::zeroed();
                if libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV, &raw mut n) != 0 {
                    continue;
                }
                let resp = libc::seccomp_notif_resp {
                    id: n.id,
                    val: 0,
                    error: 0,
                    flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
                };
                libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND, &raw const resp);
            }
        }
    });
    Err(exec_mark(&self_exe(), marker))
}

/// Execs with argv [self, mark, FIRST] while another thread, once `go` exists, rewrites that
/// argument in place to SECOND (same length) and creates `swapped`: the approver saw FIRST;
/// the kernel reads argv again when the exec goes on.
pub fn swap_argv(first: &str, second: &str, go: &str, swapped: &str) -> Outcome {
    assert_eq!(
        first.len(),
        second.len(),
        "FIRST and SECOND differ in length"
    );
    let exe = cstr(&self_exe());
    let mark = cstr("mark");
    let marker: &'static mut [u8] = Box::leak(cstr(first).into_bytes_with_nul().into_boxed_slice());
    let at = marker.as_mut_ptr() as usize;
    let (second, go, swapped) = (second.to_owned(), go.to_owned(), swapped.to_owned());
    std::thread::spawn(move || {
        let deadline = Instant::now() + TRY_FOR;
        while !Path::new(&go).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: the leaked buffer lives forever; the same length as SECOND.
        unsafe { std::ptr::copy_nonoverlapping(second.as_ptr(), at as *mut u8, second.len()) };
        let _ = std::fs::write(&swapped, b"");
    });
    let argv = [
        exe.as_ptr(),
        mark.as_ptr(),
        at as *const libc::c_char,
        std::ptr::null(),
    ];
    // SAFETY: NUL-terminated strings and a NULL-terminated array, alive for the call.
    unsafe { libc::execv(argv[0], argv.as_ptr()) };
    Err(errno())
}

/// The rewrite target of [`swap_flood`]'s handler: (buffer, SECOND, its length, GO).
static SWAP: std::sync::OnceLock<(usize, CString, CString)> = std::sync::OnceLock::new();

extern "C" fn swap_on_sigcont(_: libc::c_int) {
    if let Some((at, second, go)) = SWAP.get() {
        // SAFETY: async-signal-safe calls only: access(2) and a byte copy into the leaked
        // buffer, the same length as SECOND.
        unsafe {
            if libc::access(go.as_ptr(), libc::F_OK) == 0 {
                let bytes = second.as_bytes();
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), *at as *mut u8, bytes.len());
            }
        }
    }
}

/// Execs `mark FIRST`; once file GO exists, the `SIGCONT` handler rewrites FIRST to SECOND
/// in place (so the exec restarted by the approval's `SIGCONT` reads SECOND), and a child
/// floods the process with `SIGCONT` — against a stop that holds the loaded image until its
/// check.
pub fn swap_flood(first: &str, second: &str, go: &str) -> Outcome {
    assert_eq!(
        first.len(),
        second.len(),
        "FIRST and SECOND differ in length"
    );
    let exe = cstr(&self_exe());
    let mark = cstr("mark");
    let buffer: &'static mut [u8] = Box::leak(cstr(first).into_bytes_with_nul().into_boxed_slice());
    let at = buffer.as_mut_ptr() as usize;
    let go_c = cstr(go);
    let _ = SWAP.set((at, cstr(second), go_c.clone()));
    // SAFETY: installing a handler that only makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = swap_on_sigcont as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGCONT, &raw const sa, std::ptr::null_mut());
    }
    // SAFETY: plain system call.
    let parent = unsafe { libc::getpid() };
    let _flooder = fork(|| {
        let deadline = Instant::now() + TRY_FOR;
        // SAFETY: async-signal-safe calls only.
        unsafe {
            while Instant::now() < deadline && libc::getppid() == parent {
                if libc::access(go_c.as_ptr(), libc::F_OK) == 0 {
                    libc::kill(parent, libc::SIGCONT);
                }
                libc::usleep(50);
            }
        }
        0
    });
    let argv = [
        exe.as_ptr(),
        mark.as_ptr(),
        at as *const libc::c_char,
        std::ptr::null(),
    ];
    // SAFETY: NUL-terminated strings and a NULL-terminated array, alive for the call.
    unsafe { libc::execv(argv[0], argv.as_ptr()) };
    Err(errno())
}
