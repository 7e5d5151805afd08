//! Escape attempts: the ways a determined agent could try to get an outbound action past the
//! hold. Each invocation performs exactly one technique and prints one line: `sent N` (a send
//! reported N bytes sent), `connected` (a TCP connect, and the payload write after it,
//! succeeded) or `error ERRNO`; it exits 0 on success and 1 on error. What is sent is always
//! the ASCII bytes `cs-escape`, so a listener can recognise it. The scenarios run each technique
//! unlabelled first (it must deliver) and then labelled (nothing may arrive).
//!
//! Usage (ADDR:PORT is `127.0.0.1:4000` or `[::1]:4000`; IPV4:PORT takes only the former):
//!   cs-escape udp-sendto ADDR:PORT [COUNT]    unconnected UDP socket, sendto (COUNT times from
//!                                             one socket: prints the bytes sent in all)
//!   cs-escape udp-sendmsg ADDR:PORT           sendmsg with msg_name set
//!   cs-escape udp-sendmmsg ADDR:PORT          sendmmsg of two datagrams to ADDR:PORT; prints the
//!                                             bytes of the datagrams reported sent
//!   cs-escape udp-mapped IPV4:PORT            AF_INET6 socket (IPV6_V6ONLY off), sendto to
//!                                             ::ffff:IPV4
//!   cs-escape udp-connect-then-sendto FIRST SECOND
//!                                             UDP connect to FIRST, then sendto SECOND; prints
//!                                             the sendto's result (or the connect's error)
//!   cs-escape tcp-fastopen ADDR:PORT          TCP sendto(MSG_FASTOPEN): connect and data at once
//!   cs-escape tcp-fastopen-connect ADDR:PORT  TCP_FASTOPEN_CONNECT, connect, write
//!   cs-escape uring-connect ADDR:PORT [MODE]  io_uring TCP connect, then a plain write
//!   cs-escape uring-sendmsg ADDR:PORT [MODE]  io_uring SendMsg on an unconnected UDP socket
//!   cs-escape uring-sendto ADDR:PORT [MODE]   io_uring Send with a destination address (6.0+)
//!                                             MODE: none for an inline submission; `async`
//!                                             (IOSQE_ASYNC: an io-wq worker thread issues it);
//!                                             `sqpoll` (a SQPOLL ring: the kernel's submission
//!                                             thread issues it); `link` (it follows a NOP
//!                                             linked to it, so it is issued on the NOP's
//!                                             completion)
//!   cs-escape thread-connect ADDR:PORT        TCP connect and write from a spawned thread
//!   cs-escape stall-exec-argv MARKER          exec of `sh -c "touch MARKER"` with an argument in
//!                                             a page under a userfaultfd nobody serves: its
//!                                             first reader waits (root: kernel faults)
//!   cs-escape thread-sendto ADDR:PORT         udp-sendto from a spawned thread
//!   cs-escape raw-udp IPV4:PORT               SOCK_RAW/IPPROTO_UDP with a hand-built UDP header
//!                                             (needs CAP_NET_RAW)
//!   cs-escape unix-connect PATH|@NAME         stream connect to a local socket, then a write
//!   cs-escape unix-send PATH|@NAME            a datagram to a local socket, without connect
//!   cs-escape unix-connect-len LEN PATH       the same connect with address length LEN (16, an
//!                                             IPv4 address's: PATH must fit in 14 bytes)
//!   cs-escape unix-connect-swap FIRST SECOND  stream connects, up to 200, from one address in
//!                                             memory that a second thread keeps rewriting
//!                                             between paths FIRST and SECOND; each connection
//!                                             made gets the payload; prints `connected`
//!                                             once the connects are done
//!   cs-escape listen-unbound                  a TCP socket never bound listens (on every
//!                                             address, a port the kernel picks); prints
//!                                             `listening`
//!   cs-escape listen-swap ADDR:PORT [local]   up to 200 listens on one descriptor that a
//!                                             second thread keeps switching between a socket
//!                                             bound to loopback (`local`: a local socket)
//!                                             and one bound to ADDR:PORT; prints
//!                                             `listening` if the second one listens
//!   cs-escape listen-compat ADDR:PORT [socketcall]
//!                                             socket, bind and listen through `int $0x80`
//!                                             (as for udp-sendto-compat); prints `listening`
//!   cs-escape uring-listen ADDR:PORT [MODE]   io_uring's listen (Linux 6.11+) on a socket
//!                                             bound to ADDR:PORT, MODE as for uring-connect;
//!                                             prints `listening`
//!   cs-escape raw-udp-on FD IPV4:PORT         the same on an inherited raw socket (descriptor FD)
//!   cs-escape packet-lo IPV4:PORT             AF_PACKET/SOCK_DGRAM on `lo` with a hand-built
//!                                             IPv4 + UDP packet from 127.0.0.1 (CAP_NET_RAW;
//!                                             delivered only with net.ipv4.conf.lo.
//!                                             route_localnet=1 and accept_local=1)
//!   cs-escape ping ADDR                       one ICMP (or ICMPv6) echo request from a datagram
//!                                             socket (allowed by net.ipv4.ping_group_range)
//!   cs-escape udp-sendto-compat ADDR:PORT [socketcall]
//!                                             socket and sendto through `int $0x80`, the ia32
//!                                             entry (the ia32 socket syscalls, or socketcall
//!                                             with `socketcall`); x86-64 only; `error 38`
//!                                             (ENOSYS) without ia32 emulation
//!   cs-escape tcp-connect-compat ADDR:PORT [socketcall]
//!                                             socket and connect the same way, then a 64-bit
//!                                             write
//!
//! Exec escapes run `cs-escape mark MARKER` (which writes the file MARKER and prints `ran`)
//! against the hold; they print `ran` if MARKER exists once they are done, else `error N`:
//!   cs-escape exec-traceme MARKER             a child that asked to be traced execs; the
//!                                             parent continues each stop
//!   cs-escape exec-attach MARKER              the parent seizes its child before it execs,
//!                                             then the same
//!   cs-escape exec-sigcont MARKER             a child execs under a flood of SIGCONT
//!   cs-escape exec-sigcont-storm MARKER       a child execs while a sibling sends it SIGCONT
//!                                             without a pause
//!   cs-escape exec-attach-stopped MARKER      the parent attaches to its child once it is
//!                                             stopped after its exec, then continues each stop
//!   cs-escape exec-own-notifier MARKER        its own seccomp filter and listener answer its
//!                                             exec "go on"
//!   cs-escape exec-path PATH MARKER           execs PATH (the scenario replaces the file)
//!   cs-escape exec-swap-argv FIRST SECOND GO SWAPPED
//!                                             execs `mark FIRST`; once file GO exists another
//!                                             thread rewrites FIRST to SECOND in place and
//!                                             creates SWAPPED
//!   cs-escape exec-swap-flood FIRST SECOND GO execs `mark FIRST`; once file GO exists its
//!                                             SIGCONT handler rewrites FIRST to SECOND in
//!                                             place and a child floods it with SIGCONT
//!
//! Attempts on countersign itself print `tampered` if they succeeded (undoing what they did),
//! else `error N`:
//!   cs-escape tamper-bpf PIN                  bpf(BPF_OBJ_GET) on a pinned map or link
//!   cs-escape tamper-signal PID               SIGCONT to PID
//!   cs-escape tamper-ptrace PID               PTRACE_SEIZE of PID (then detach)
//!   cs-escape tamper-mem PID                  /proc/PID/mem opened for writing
//!   cs-escape tamper-pidfd-getfd PID          descriptor 0 of PID, by pidfd_getfd
//!   cs-escape tamper-write PATH               PATH opened for writing
//!   cs-escape tamper-read PATH                PATH opened for reading
//!   cs-escape tamper-rename PATH              PATH renamed aside (and back)
//!   cs-escape tamper-create DIR               a new file in DIR (removed again)
//!   cs-escape tamper-make PATH HOW            PATH, which does not exist, made by HOW:
//!                                             create, link, rename or symlink (removed again)
//!   cs-escape tamper-link PATH DIR            a hard link to PATH made in DIR, opened for
//!                                             writing (removed again)
//!   cs-escape tamper-mount DIR                a tmpfs on DIR (unmounted again)
//!   cs-escape tamper-module                   init_module of 64 bytes that are no module
//!                                             (`tampered` unless the load is refused: EPERM)
//!   cs-escape tamper-sysctl                   kernel.core_pattern opened for writing
//!   cs-escape tamper-sysfs                    /sys/kernel/uevent_helper opened for writing
//!   cs-escape tamper-truncate PATH            PATH opened read-only with O_TRUNC (its content
//!                                             written back)
//!   cs-escape tamper-kcore                    /proc/kcore opened for reading
//!   cs-escape tamper-disk NODE                a disk's device node opened for reading
//!                                             (`tampered` unless refused: EPERM)
//!   cs-escape tamper-mknod DIR                a character device node made in DIR (removed)
//!   cs-escape tamper-reboot                   reboot(2) leaving Ctrl-Alt-Del as it is
//!                                             (`tampered` unless refused: EPERM)
//!   cs-escape tamper-clock                    the realtime clock set to what it reads
//!   cs-escape tamper-perf                     perf_event_open of processor 0 as a whole
//!   cs-escape tamper-limits PID               PID's open-file limit set to what it is
//!   cs-escape tamper-nice PID                 PID's priority set to what it is
//!   cs-escape tamper-affinity PID             PID's processor affinity set to what it is
//!   cs-escape tamper-sigio PID               PID made the owner of a pipe's I/O signal
//!                                             (F_SETOWN, default SIGIO), a byte written
//!   cs-escape tamper-cgroup-move PID DIR      PID moved into the cgroup DIR (written to
//!                                             its cgroup.procs)
//!   cs-escape tamper-lock PATH                PATH opened for reading, flock(LOCK_SH)
//!   cs-escape tamper-lease PATH               PATH opened for reading, a read lease
//!   cs-escape tamper-fanotify DIR             fanotify's FAN_OPEN_PERM marked on DIR (the
//!                                             descriptor closed at once)
//!   cs-escape tamper-receive NAME             a descriptor received over the abstract local
//!                                             socket NAME (SCM_RIGHTS) that is open for
//!                                             writing (`error 1`: the kernel did not install
//!                                             it)
//!
//! Not an escape itself, but the stage for one (run unlabelled, as root):
//!   cs-escape fuse-never DIR CMD...           in a mount namespace of its own, mounts at DIR a
//!                                             FUSE file system nobody serves (every lookup in
//!                                             it waits), runs CMD there and exits with its
//!                                             status, unmounting it
use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use io_uring::{IoUring, opcode, squeue, types::Fd};

#[path = "escape/exec.rs"]
mod exec;
#[path = "escape/tamper.rs"]
mod tamper;

/// What every technique sends.
const PAYLOAD: &[u8] = b"cs-escape";

/// The source port of the hand-built UDP headers.
const SOURCE_PORT: u16 = 40_000;

/// What a technique achieved.
enum Done {
    Sent(usize),
    Connected,
    /// A socket listens on the network.
    Listening,
    /// An exec escape's marked program ran.
    Ran,
    /// An attempt on countersign itself succeeded.
    Tampered,
}

/// A technique's result: `Err` holds a positive errno.
type Outcome = Result<Done, i32>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let target = |i: usize| -> SocketAddr {
        arg(i)
            .and_then(|a| a.parse().ok())
            .expect("an ADDR:PORT argument")
    };
    let pid = |i: usize| -> i32 { arg(i).and_then(|a| a.parse().ok()).expect("a PID argument") };
    let outcome = match arg(1) {
        Some("udp-sendto") => match arg(3) {
            None => udp_sendto(target(2)),
            Some(n) => udp_sendto_many(target(2), n.parse().expect("a COUNT")),
        },
        Some("udp-sendmsg") => udp_sendmsg(target(2)),
        Some("udp-sendmmsg") => udp_sendmmsg(target(2)),
        Some("udp-mapped") => udp_mapped(target(2)),
        Some("udp-connect-then-sendto") => udp_connect_then_sendto(target(2), target(3)),
        Some("tcp-fastopen") => tcp_fastopen(target(2)),
        Some("tcp-fastopen-connect") => tcp_connect(target(2), true),
        Some("uring-connect") => uring_connect(target(2), Mode::parse(arg(3))),
        Some("uring-sendmsg") => uring_sendmsg(target(2), Mode::parse(arg(3))),
        Some("uring-sendto") => uring_sendto(target(2), Mode::parse(arg(3))),
        Some("thread-connect") => in_thread(|to| tcp_connect(to, false), target(2)),
        Some("stall-exec-argv") => stall_exec_argv(arg(2).expect("a MARKER argument")),
        Some("thread-sendto") => in_thread(udp_sendto, target(2)),
        Some("unix-connect") => unix_connect(arg(2).expect("a PATH or @NAME argument")),
        Some("unix-send") => unix_send(arg(2).expect("a PATH or @NAME argument")),
        Some("unix-sendmsg") => unix_sendmsg(arg(2).expect("a PATH or @NAME argument")),
        Some("uring-unix-connect") => uring_unix_connect(
            arg(2).expect("a PATH or @NAME argument"),
            Mode::parse(arg(3)),
        ),
        Some("uring-unix-sendmsg") => uring_unix_sendmsg(
            arg(2).expect("a PATH or @NAME argument"),
            Mode::parse(arg(3)),
        ),
        Some("unix-connect-compat") => compat::run_to(
            &Sockaddr::unix(arg(2).expect("a PATH or @NAME argument")),
            true,
            arg(3),
        ),
        Some("unix-send-compat") => compat::run_to(
            &Sockaddr::unix(arg(2).expect("a PATH or @NAME argument")),
            false,
            arg(3),
        ),
        Some("unix-connect-len") => unix_connect_len(
            arg(2).and_then(|n| n.parse().ok()).expect("a LEN argument"),
            arg(3).expect("a PATH argument"),
        ),
        Some("unix-connect-swap") => unix_connect_swap(
            arg(2).expect("a FIRST argument"),
            arg(3).expect("a SECOND argument"),
        ),
        Some("listen-unbound") => listen_unbound(),
        Some("listen-compat") => compat::listen(target(2), arg(3)),
        Some("listen-swap") => listen_swap(target(2), arg(3) == Some("local")),
        Some("uring-listen") => uring_listen(target(2), Mode::parse(arg(3))),
        Some("raw-udp") => raw_udp(target(2)),
        Some("raw-udp-on") => raw_udp_on(
            arg(2).and_then(|a| a.parse().ok()).expect("an FD argument"),
            target(3),
        ),
        Some("packet-lo") => packet_lo(target(2)),
        Some("ping") => ping(
            arg(2)
                .and_then(|a| a.parse().ok())
                .expect("an ADDR argument"),
        ),
        #[cfg(target_arch = "x86_64")]
        Some("udp-sendto-compat") => compat::run(target(2), false, arg(3)),
        #[cfg(target_arch = "x86_64")]
        Some("tcp-connect-compat") => compat::run(target(2), true, arg(3)),
        Some("mark") => exec::mark(arg(2).expect("a MARKER argument")),
        Some("exec-traceme") => exec::traceme(arg(2).expect("a MARKER argument")),
        Some("exec-attach") => exec::attach(arg(2).expect("a MARKER argument")),
        Some("exec-sigcont") => exec::sigcont(arg(2).expect("a MARKER argument")),
        Some("exec-sigcont-storm") => exec::sigcont_storm(arg(2).expect("a MARKER argument")),
        Some("exec-attach-stopped") => exec::attach_stopped(arg(2).expect("a MARKER argument")),
        Some("exec-own-notifier") => exec::own_notifier(arg(2).expect("a MARKER argument")),
        Some("exec-path") => exec::path(
            arg(2).expect("a PATH argument"),
            arg(3).expect("a MARKER argument"),
        ),
        Some("exec-swap-argv") => exec::swap_argv(
            arg(2).expect("FIRST"),
            arg(3).expect("SECOND"),
            arg(4).expect("GO"),
            arg(5).expect("SWAPPED"),
        ),
        Some("exec-swap-flood") => exec::swap_flood(
            arg(2).expect("FIRST"),
            arg(3).expect("SECOND"),
            arg(4).expect("GO"),
        ),
        Some("tamper-bpf") => tamper::bpf(arg(2).expect("a PIN argument")),
        Some("tamper-signal") => tamper::signal(pid(2)),
        Some("tamper-ptrace") => tamper::ptrace(pid(2)),
        Some("tamper-mem") => tamper::mem(pid(2)),
        Some("tamper-pidfd-getfd") => tamper::pidfd_getfd(pid(2)),
        Some("tamper-write") => tamper::write(arg(2).expect("a PATH argument")),
        Some("tamper-read") => tamper::read(arg(2).expect("a PATH argument")),
        Some("tamper-rename") => tamper::rename(arg(2).expect("a PATH argument")),
        Some("tamper-xattr") => tamper::xattr(arg(2).expect("a PATH argument")),
        Some("tamper-acl") => tamper::acl(arg(2).expect("a PATH argument")),
        Some("tamper-bind-dns") => tamper::bind_dns(arg(2).expect("an ADDR argument")),
        Some("tamper-net-admin") => tamper::net_admin(false),
        Some("tamper-tty") => tamper::tty_inject(),
        Some("tamper-receive") => tamper::receive(arg(2).expect("a NAME argument")),
        Some("tamper-fanotify") => tamper::fanotify(arg(2).expect("a DIR argument")),
        Some("tamper-limits") => tamper::process_setting("limits", pid(2)),
        Some("tamper-nice") => tamper::process_setting("nice", pid(2)),
        Some("tamper-affinity") => tamper::process_setting("affinity", pid(2)),
        Some("tamper-sigio") => tamper::sigio(pid(2)),
        Some("tamper-cgroup-move") => {
            tamper::cgroup_move(pid(2), arg(3).expect("a cgroup DIR argument"))
        }
        Some("tamper-lock") => tamper::lock(arg(2).expect("a PATH argument"), false),
        Some("tamper-lease") => tamper::lock(arg(2).expect("a PATH argument"), true),
        Some("net-admin-own-namespace") => tamper::net_admin(true),
        Some("tamper-make") => tamper::make(
            arg(2).expect("a PATH argument"),
            arg(3).expect("create, link, rename or symlink"),
        ),
        Some("tamper-link") => tamper::link(
            arg(2).expect("a PATH argument"),
            arg(3).expect("a DIR argument"),
        ),
        Some("tamper-create") => tamper::create_in(arg(2).expect("a DIR argument")),
        Some("tamper-mount") => tamper::mount(arg(2).expect("a DIR argument")),
        Some("tamper-module") => tamper::module(),
        Some("tamper-sysctl") => tamper::sysctl(),
        Some("tamper-sysfs") => tamper::sysfs(),
        Some("tamper-truncate") => tamper::truncate(arg(2).expect("a PATH argument")),
        Some("tamper-kcore") => tamper::kcore(),
        Some("tamper-disk") => tamper::disk(arg(2).expect("a NODE argument")),
        Some("tamper-mknod") => tamper::mknod(arg(2).expect("a DIR argument")),
        Some("tamper-reboot") => tamper::reboot(),
        Some("tamper-clock") => tamper::clock(),
        Some("tamper-perf") => tamper::perf(),
        Some("fuse-never") => fuse_never(arg(2).expect("a DIR argument"), &args[3..]),
        Some("hold-unix") => hold_unix(
            arg(2).expect("a PATH argument"),
            arg(3)
                .and_then(|n| n.parse().ok())
                .expect("a COUNT argument"),
        ),
        _ => {
            eprintln!("cs-escape: unknown usage {args:?}");
            std::process::exit(2);
        }
    };
    let (line, code) = match outcome {
        Ok(Done::Sent(n)) => (format!("sent {n}"), 0),
        Ok(Done::Connected) => ("connected".to_owned(), 0),
        Ok(Done::Listening) => ("listening".to_owned(), 0),
        Ok(Done::Ran) => ("ran".to_owned(), 0),
        Ok(Done::Tampered) => ("tampered".to_owned(), 0),
        Err(errno) => (format!("error {errno}"), 1),
    };
    say(&line);
    std::process::exit(code);
}

fn say(s: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

/// See `fuse-never` above. Exits with CMD's status (128 + a signal), never returns.
fn fuse_never(dir: &str, cmd: &[String]) -> Outcome {
    use std::os::unix::process::ExitStatusExt as _;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    // SAFETY: plain system calls; the strings outlive them.
    let fuse = unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(errno());
        }
        // Nothing of this namespace's mounts goes back to the host's.
        let root = c("/");
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno());
        }
        let dev = c("/dev/fuse");
        let fd = libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let options = c(&format!("fd={fd},rootmode=40000,user_id=0,group_id=0"));
        let (source, target, kind) = (c("cs-never"), c(dir), c("fuse"));
        if libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        ) != 0
        {
            return Err(errno());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let status = std::process::Command::new(&cmd[0]).args(&cmd[1..]).status();
    // Detach the mount, then close the device: whatever still waits in it is let go.
    let target = c(dir);
    // SAFETY: as above.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    drop(fuse);
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 127,
    };
    std::process::exit(code)
}

/// Opens `count` connections to the stream socket `path` and sends nothing on them until
/// stdin closes: a local user trying to make the daemon's sockets unusable.
fn hold_unix(path: &str, count: usize) -> Outcome {
    let held: Vec<std::os::unix::net::UnixStream> = (0..count)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(path).ok())
        .collect();
    say(&format!("held {}", held.len()));
    let _ = std::io::stdin().read_line(&mut String::new());
    drop(held);
    Ok(Done::Ran)
}

// ---- Plain socket calls -------------------------------------------------------------------

fn udp_sendto(target: SocketAddr) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_DGRAM, 0)?;
    sendto(&fd, PAYLOAD, 0, &to).map(Done::Sent)
}

/// `count` datagrams from one socket: the bytes sent in all.
fn udp_sendto_many(target: SocketAddr, count: usize) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_DGRAM, 0)?;
    let mut total = 0;
    for _ in 0..count {
        total += sendto(&fd, PAYLOAD, 0, &to)?;
    }
    Ok(Done::Sent(total))
}

fn udp_sendmsg(target: SocketAddr) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_DGRAM, 0)?;
    let mut iov = payload_iov();
    let msg = message_to(&to, &mut iov);
    // SAFETY: `msg` points at `to` and `iov`, both alive for the call.
    check(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) }).map(Done::Sent)
}

fn udp_sendmmsg(target: SocketAddr) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_DGRAM, 0)?;
    let mut iovs = [payload_iov(), payload_iov()];
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| libc::mmsghdr {
            msg_hdr: message_to(&to, iov),
            msg_len: 0,
        })
        .collect();
    // SAFETY: every message points at `to` and at its own iovec, all alive for the call.
    let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), 2, 0) };
    let count = check(rc)?;
    Ok(Done::Sent(
        msgs[..count].iter().map(|m| m.msg_len as usize).sum(),
    ))
}

fn udp_mapped(target: SocketAddr) -> Outcome {
    let v4 = ipv4(target);
    let to = Sockaddr::new(SocketAddr::new(
        IpAddr::V6(v4.ip().to_ipv6_mapped()),
        v4.port(),
    ));
    let fd = socket(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
    set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    sendto(&fd, PAYLOAD, 0, &to).map(Done::Sent)
}

fn udp_connect_then_sendto(first: SocketAddr, second: SocketAddr) -> Outcome {
    let (first, second) = (Sockaddr::new(first), Sockaddr::new(second));
    let fd = socket(first.family(), libc::SOCK_DGRAM, 0)?;
    connect(&fd, &first)?;
    sendto(&fd, PAYLOAD, 0, &second).map(Done::Sent)
}

fn tcp_fastopen(target: SocketAddr) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_STREAM, 0)?;
    sendto(&fd, PAYLOAD, libc::MSG_FASTOPEN, &to).map(Done::Sent)
}

/// A TCP connect (with TCP_FASTOPEN_CONNECT set first if `fastopen`: with a cookie cached,
/// the SYN then leaves only with the write) and the payload write after it.
/// `/bin/sh -c "touch MARKER"` exec'd with one more argument in a page registered with a
/// `userfaultfd` that nothing serves: whoever reads that argument first (the daemon, where
/// it reads an exec's argv before the kernel does; else the kernel itself) waits for a fault
/// handler that never answers. Root: kernel faults are handled only for privileged callers.
fn stall_exec_argv(marker: &str) -> Outcome {
    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
    const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    const PAGE: usize = 4096;
    // SAFETY: userfaultfd takes flags; a new descriptor or -1.
    let uffd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
    if uffd < 0 {
        return Err(errno());
    }
    // SAFETY: a new private anonymous page, never touched here.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(errno());
    }
    let mut api = Api {
        api: 0xaa,
        features: 0,
        ioctls: 0,
    };
    let mut reg = Register {
        start: page as u64,
        len: PAGE as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: ioctls on the descriptor just made, with structures of the sizes they encode.
    unsafe {
        if libc::ioctl(uffd, UFFDIO_API, &raw mut api) != 0
            || libc::ioctl(uffd, UFFDIO_REGISTER, &raw mut reg) != 0
        {
            return Err(errno());
        }
    }
    let (sh, c, script) = (
        std::ffi::CString::new("/bin/sh").expect("no NUL"),
        std::ffi::CString::new("-c").expect("no NUL"),
        std::ffi::CString::new(format!("touch {marker}")).map_err(|_| libc::EINVAL)?,
    );
    let argv = [
        sh.as_ptr(),
        c.as_ptr(),
        script.as_ptr(),
        page.cast::<libc::c_char>().cast_const(),
        std::ptr::null(),
    ];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that live for the call; the
    // page argument is what the technique is about.
    unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(errno())
}

fn tcp_connect(target: SocketAddr, fastopen: bool) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_STREAM, 0)?;
    if fastopen {
        set_int_option(&fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT, 1)?;
    }
    connect(&fd, &to)?;
    write(&fd, PAYLOAD)?;
    Ok(Done::Connected)
}

/// Runs `technique` in a new thread, so that a thread other than the main one acts.
fn in_thread(technique: fn(SocketAddr) -> Outcome, target: SocketAddr) -> Outcome {
    std::thread::spawn(move || technique(target))
        .join()
        .expect("the technique's thread")
}

// ---- Local sockets --------------------------------------------------------------------------

/// A local socket address: a path, or `@name` for an abstract one.
fn unix_addr(name: &str) -> std::os::unix::net::SocketAddr {
    use std::os::linux::net::SocketAddrExt as _;
    match name.strip_prefix('@') {
        Some(a) => std::os::unix::net::SocketAddr::from_abstract_name(a.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(name),
    }
    .expect("a local socket address")
}

/// Stream connect to a local service, then the payload.
fn unix_connect(name: &str) -> Outcome {
    use std::io::Write as _;
    let mut s = std::os::unix::net::UnixStream::connect_addr(&unix_addr(name)).map_err(os_errno)?;
    s.write_all(PAYLOAD).map_err(os_errno)?;
    Ok(Done::Connected)
}

/// `sockaddr_un` for `path` (no terminating NUL needed: the kernel ends it at the length).
fn sockaddr_un(path: &str) -> libc::sockaddr_un {
    // SAFETY: plain old data; all zeros is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in sa.sun_path.iter_mut().zip(path.bytes()) {
        *d = b as libc::c_char;
    }
    sa
}

/// Stream connect to `path` with the address length `len`, then the payload.
fn unix_connect_len(len: u32, path: &str) -> Outcome {
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
    let sa = sockaddr_un(path);
    // SAFETY: `sa` lives across the call; the kernel reads at most `len` bytes of it.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) })?;
    // SAFETY: writes the payload from a live buffer.
    check(unsafe { libc::write(fd.as_raw_fd(), PAYLOAD.as_ptr().cast(), PAYLOAD.len()) })?;
    Ok(Done::Connected)
}

/// Connects from an address a second thread rewrites all the while: what was decided is
/// not what the kernel reads next.
fn unix_connect_swap(first: &str, second: &str) -> Outcome {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    struct Shared(std::cell::UnsafeCell<libc::sockaddr_un>);
    // SAFETY: the race on the bytes is the point; both threads only read and write bytes.
    unsafe impl Sync for Shared {}
    let (a, b) = (sockaddr_un(first), sockaddr_un(second));
    let shared = std::sync::Arc::new(Shared(std::cell::UnsafeCell::new(a)));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flips = std::sync::Arc::new(AtomicU64::new(0));
    let flipper = {
        let (shared, stop, flips) = (shared.clone(), stop.clone(), flips.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let next = if i.is_multiple_of(2) { b } else { a };
                // SAFETY: volatile byte writes into the shared address.
                unsafe { std::ptr::write_volatile(shared.0.get(), next) };
                i += 1;
                flips.store(i, Ordering::Relaxed);
            }
        })
    };
    // The rewriting runs before the first connect (a slow machine may start the thread late).
    while flips.load(Ordering::Relaxed) < 1000 {
        std::thread::yield_now();
    }
    let mut connected = 0;
    for _ in 0..200 {
        let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
        // SAFETY: the address stays alive (the Arc); its bytes change under the call.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                shared.0.get().cast_const().cast(),
                size_of::<libc::sockaddr_un>() as u32,
            )
        };
        // Let the rewriting thread run between attempts on a machine with one processor.
        std::thread::yield_now();
        if rc == 0 {
            connected += 1;
            // SAFETY: writes the payload from a live buffer.
            unsafe { libc::write(fd.as_raw_fd(), PAYLOAD.as_ptr().cast(), PAYLOAD.len()) };
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    if connected == 0 {
        return Err(libc::ECONNREFUSED);
    }
    Ok(Done::Connected)
}

/// `listen` on a TCP socket that was never bound: the kernel binds it to every address.
fn listen_unbound() -> Outcome {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    // SAFETY: plain syscall on an owned descriptor.
    if unsafe { libc::listen(fd.as_raw_fd(), 8) } != 0 {
        return Err(errno());
    }
    Ok(Done::Listening)
}

/// A TCP socket bound to `at`, not listening.
fn bound_socket(at: SocketAddr) -> Result<OwnedFd, i32> {
    let family = if at.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(family, libc::SOCK_STREAM, 0)?;
    let addr = Sockaddr::new(at);
    // SAFETY: bind with a live address of its length.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr.storage).cast(), addr.len) } != 0 {
        return Err(errno());
    }
    Ok(fd)
}

/// Whether `fd` is a listening socket (`SO_ACCEPTCONN`).
fn accepts(fd: std::os::fd::RawFd) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut on).cast(),
            &raw mut len,
        )
    };
    rc == 0 && on != 0
}

/// Listens on one descriptor number while another thread keeps putting a loopback socket and
/// one bound to `to` in it (`dup2`): a decision made on what the descriptor held when the
/// listen was asked about must not let the other socket listen.
fn listen_swap(to: SocketAddr, local: bool) -> Outcome {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let lo: SocketAddr = if to.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .expect("an address");
    let quiet = if local {
        // A local socket bound to an abstract name of its own.
        let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
        let addr = Sockaddr::unix(&format!("@cs-escape-listen-{}", std::process::id()));
        // SAFETY: bind with a live address of its length.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr.storage).cast(), addr.len) } != 0 {
            return Err(errno());
        }
        fd
    } else {
        bound_socket(lo)?
    };
    let wide = bound_socket(to)?;
    let slot = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    let n = slot.as_raw_fd();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flips = std::sync::Arc::new(AtomicU64::new(0));
    let swapper = {
        let (stop, flips) = (stop.clone(), flips.clone());
        let (a, b) = (quiet.as_raw_fd(), wide.as_raw_fd());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let from = if i.is_multiple_of(2) { b } else { a };
                // SAFETY: replaces descriptor `n`, which this program owns, with a copy.
                unsafe { libc::dup2(from, n) };
                i += 1;
                flips.store(i, Ordering::Relaxed);
            }
        })
    };
    while flips.load(Ordering::Relaxed) < 1000 {
        std::thread::yield_now();
    }
    for _ in 0..200 {
        // SAFETY: plain syscall; the descriptor's socket changes under it.
        unsafe { libc::listen(n, 8) };
        // Let the switching thread run between attempts: on one processor a yield may not
        // (the scheduler prefers this thread, which ran less), a sleep does.
        std::thread::sleep(std::time::Duration::from_micros(500));
        if accepts(wide.as_raw_fd()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = swapper.join();
    if accepts(wide.as_raw_fd()) {
        Ok(Done::Listening)
    } else {
        Err(libc::EPERM)
    }
}

/// A datagram to a local socket, without connect.
fn unix_send(name: &str) -> Outcome {
    let s = std::os::unix::net::UnixDatagram::unbound().map_err(os_errno)?;
    s.send_to_addr(PAYLOAD, &unix_addr(name))
        .map(Done::Sent)
        .map_err(os_errno)
}

/// A datagram to a local socket with `sendmsg` (the address in the message header).
fn unix_sendmsg(name: &str) -> Outcome {
    let to = Sockaddr::unix(name);
    let fd = socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0)?;
    let mut iov = payload_iov();
    let msg = message_to(&to, &mut iov);
    // SAFETY: `msg` points at `to` and `iov`, alive across the call.
    check(unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, 0) }).map(Done::Sent)
}

/// A stream connect to a local service submitted on io_uring, then the payload.
fn uring_unix_connect(name: &str, mode: Mode) -> Outcome {
    let to = Sockaddr::unix(name);
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
    let entry = opcode::Connect::new(Fd(fd.as_raw_fd()), to.ptr(), to.len).build();
    // SAFETY: the entry points at `to`, alive until `uring` returns.
    unsafe { uring(entry, mode) }?;
    write(&fd, PAYLOAD)?;
    Ok(Done::Connected)
}

/// A datagram to a local socket submitted on io_uring (`sendmsg` with the address).
fn uring_unix_sendmsg(name: &str, mode: Mode) -> Outcome {
    let to = Sockaddr::unix(name);
    let fd = socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0)?;
    let mut iov = payload_iov();
    let msg = message_to(&to, &mut iov);
    let entry = opcode::SendMsg::new(Fd(fd.as_raw_fd()), &msg).build();
    // SAFETY: the entry points at `msg`, which points at `to` and `iov`: all alive until
    // `uring` returns.
    unsafe { uring(entry, mode) }.map(Done::Sent)
}

// ---- Hand-built packets -------------------------------------------------------------------

fn raw_udp(target: SocketAddr) -> Outcome {
    let target = ipv4(target);
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP)?;
    // The kernel adds the IP header; the port of a raw socket's address is not used.
    let to = Sockaddr::new(SocketAddr::new(IpAddr::V4(*target.ip()), 0));
    sendto(&fd, &udp_datagram(target.port()), 0, &to).map(Done::Sent)
}

/// `raw_udp` on a raw socket this process did not create: descriptor `fd`, inherited.
fn raw_udp_on(fd: i32, target: SocketAddr) -> Outcome {
    let target = ipv4(target);
    // SAFETY: the caller hands this process the descriptor; nothing else here owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let to = Sockaddr::new(SocketAddr::new(IpAddr::V4(*target.ip()), 0));
    sendto(&fd, &udp_datagram(target.port()), 0, &to).map(Done::Sent)
}

/// Injected packets carry no route: the kernel routes them as input, where a loopback
/// destination and a local source are martians unless lo has `route_localnet` and
/// `accept_local` set: a scenario sets both before using this technique.
fn packet_lo(target: SocketAddr) -> Outcome {
    let target = ipv4(target);
    let udp = udp_datagram(target.port());
    let mut packet = ipv4_header(Ipv4Addr::LOCALHOST, *target.ip(), udp.len());
    packet.extend_from_slice(&udp);
    let protocol = (libc::ETH_P_IP as u16).to_be();
    let fd = socket(libc::AF_PACKET, libc::SOCK_DGRAM, protocol.into())?;
    // SAFETY: a NUL-terminated interface name.
    let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if ifindex == 0 {
        return Err(errno());
    }
    // SAFETY: all-zero is a valid sockaddr_ll; its all-zero hardware address is lo's own.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as libc::sa_family_t;
    ll.sll_protocol = protocol;
    ll.sll_ifindex = i32::try_from(ifindex).expect("an interface index");
    ll.sll_halen = 6;
    // SAFETY: `packet` and `ll` are alive for the call.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })
    .map(Done::Sent)
}

fn ping(addr: IpAddr) -> Outcome {
    let (family, protocol, echo_request) = match addr {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128),
    };
    let fd = socket(family, libc::SOCK_DGRAM, protocol)?;
    // Type, code, checksum and identifier (the kernel fills these two in), sequence 1.
    let mut echo = vec![echo_request, 0, 0, 0, 0, 0, 0, 1];
    echo.extend_from_slice(PAYLOAD);
    sendto(&fd, &echo, 0, &Sockaddr::new(SocketAddr::new(addr, 0))).map(Done::Sent)
}

/// A UDP header to `port` and the payload; checksum 0 ("none") is valid over IPv4.
fn udp_datagram(port: u16) -> Vec<u8> {
    let len = u16::try_from(8 + PAYLOAD.len()).expect("a small datagram");
    let mut datagram = [
        SOURCE_PORT.to_be_bytes(),
        port.to_be_bytes(),
        len.to_be_bytes(),
        [0, 0],
    ]
    .concat();
    datagram.extend_from_slice(PAYLOAD);
    datagram
}

/// An IPv4 header (no options, don't fragment, TTL 64) of a UDP packet, its checksum computed.
fn ipv4_header(source: Ipv4Addr, destination: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let total = u16::try_from(20 + payload_len).expect("a small packet");
    let protocol = u8::try_from(libc::IPPROTO_UDP).expect("an IP protocol number");
    let mut header = [
        [0x45, 0],
        total.to_be_bytes(),
        [0, 0],
        [0x40, 0],
        [64, protocol],
        [0, 0],
    ]
    .concat();
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&destination.octets());
    let mut sum: u32 = header
        .chunks_exact(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !u16::try_from(sum).expect("folded to 16 bits");
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

// ---- io_uring -----------------------------------------------------------------------------

/// How the io_uring request is issued.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Inline,
    Async,
    Sqpoll,
    Link,
}

impl Mode {
    fn parse(arg: Option<&str>) -> Self {
        match arg {
            None => Self::Inline,
            Some("async") => Self::Async,
            Some("sqpoll") => Self::Sqpoll,
            Some("link") => Self::Link,
            Some(other) => panic!("unknown io_uring mode {other:?}"),
        }
    }
}

fn uring_connect(target: SocketAddr, mode: Mode) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_STREAM, 0)?;
    let entry = opcode::Connect::new(Fd(fd.as_raw_fd()), to.ptr(), to.len).build();
    // SAFETY: the entry points at `to`, alive until `uring` returns.
    unsafe { uring(entry, mode) }?;
    write(&fd, PAYLOAD)?;
    Ok(Done::Connected)
}

/// io_uring's `IORING_OP_LISTEN` (Linux 6.11+; before, `EINVAL`) on a socket bound to
/// `target`.
fn uring_listen(target: SocketAddr, mode: Mode) -> Outcome {
    let fd = bound_socket(target)?;
    let entry = opcode::Listen::new(Fd(fd.as_raw_fd()), 8).build();
    // SAFETY: the entry points at nothing but the descriptor, alive until `uring` returns.
    unsafe { uring(entry, mode) }?;
    if accepts(fd.as_raw_fd()) {
        Ok(Done::Listening)
    } else {
        Err(libc::EPERM)
    }
}

fn uring_sendmsg(target: SocketAddr, mode: Mode) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_DGRAM, 0)?;
    let mut iov = payload_iov();
    let msg = message_to(&to, &mut iov);
    let entry = opcode::SendMsg::new(Fd(fd.as_raw_fd()), &msg).build();
    // SAFETY: the entry points at `msg`, which points at `to` and `iov`: all alive until
    // `uring` returns.
    unsafe { uring(entry, mode) }.map(Done::Sent)
}

fn uring_sendto(target: SocketAddr, mode: Mode) -> Outcome {
    let to = Sockaddr::new(target);
    let fd = socket(to.family(), libc::SOCK_DGRAM, 0)?;
    let len = u32::try_from(PAYLOAD.len()).expect("a small payload");
    let entry = opcode::Send::new(Fd(fd.as_raw_fd()), PAYLOAD.as_ptr(), len)
        .dest_addr(to.ptr())
        .dest_addr_len(to.len)
        .build();
    // SAFETY: the entry points at `to`, alive until `uring` returns, and at the static payload.
    unsafe { uring(entry, mode) }.map(Done::Sent)
}

/// Submits `entry` on a new ring as `mode` says and returns its result once it completed.
///
/// # Safety
/// Whatever `entry` points at must stay valid until this returns. It returns early only when
/// `io_uring_enter` fails, and the caller then only reports the error and exits.
unsafe fn uring(entry: squeue::Entry, mode: Mode) -> Result<usize, i32> {
    const TAG: u64 = 1;
    let mut builder = IoUring::builder();
    if mode == Mode::Sqpoll {
        builder.setup_sqpoll(1000);
    }
    let mut ring: IoUring = builder.build(4).map_err(os_errno)?;
    let mut entry = entry.user_data(TAG);
    if mode == Mode::Async {
        entry = entry.flags(squeue::Flags::ASYNC);
    }
    {
        let mut queue = ring.submission();
        if mode == Mode::Link {
            let nop = opcode::Nop::new().build().flags(squeue::Flags::IO_LINK);
            // SAFETY: a NOP points at nothing.
            unsafe { queue.push(&nop) }.expect("room in a new ring");
        }
        // SAFETY: the caller keeps what `entry` points at valid until we return.
        unsafe { queue.push(&entry) }.expect("room in a new ring");
    }
    loop {
        match ring.submit_and_wait(1) {
            // A held request may stop and continue us, which interrupts the wait.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(os_errno(e)),
            Ok(_) => {}
        }
        if let Some(cqe) = ring.completion().find(|cqe| cqe.user_data() == TAG) {
            return usize::try_from(cqe.result()).map_err(|_| -cqe.result());
        }
    }
}

// ---- Helpers ------------------------------------------------------------------------------

/// A socket address as the kernel takes it.
struct Sockaddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl Sockaddr {
    fn new(addr: SocketAddr) -> Self {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
                let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in6.
                let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                size_of::<libc::sockaddr_in6>()
            }
        };
        let len = libc::socklen_t::try_from(len).expect("a small sockaddr");
        Self { storage, len }
    }

    /// A local socket's address: a path, or `@name` for an abstract one.
    fn unix(name: &str) -> Self {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_un.
        let sun = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_un>() };
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let (bytes, skip, tail) = match name.strip_prefix('@') {
            // An abstract name: a NUL, then the name, without a terminator.
            Some(a) => (a.as_bytes(), 1, 0),
            None => (name.as_bytes(), 0, 1),
        };
        assert!(
            bytes.len() + 1 < sun.sun_path.len(),
            "a short local socket name"
        );
        for (d, b) in sun.sun_path[skip..].iter_mut().zip(bytes) {
            *d = *b as libc::c_char;
        }
        let len = 2 + skip + bytes.len() + tail;
        let len = libc::socklen_t::try_from(len).expect("a small sockaddr");
        Self { storage, len }
    }

    fn family(&self) -> i32 {
        self.storage.ss_family.into()
    }

    fn ptr(&self) -> *const libc::sockaddr {
        (&raw const self.storage).cast()
    }
}

/// The IPv4 address of a technique that only takes one (a usage error otherwise).
fn ipv4(target: SocketAddr) -> SocketAddrV4 {
    match target {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => panic!("this technique takes an IPv4 ADDR"),
    }
}

fn socket(family: i32, kind: i32, protocol: i32) -> Result<OwnedFd, i32> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor that nothing else owns.
    unsafe {
        let fd = libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol);
        if fd < 0 {
            Err(errno())
        } else {
            Ok(OwnedFd::from_raw_fd(fd))
        }
    }
}

fn connect(fd: &OwnedFd, to: &Sockaddr) -> Result<(), i32> {
    // SAFETY: `to` is alive for the call.
    check(unsafe { libc::connect(fd.as_raw_fd(), to.ptr(), to.len) }).map(drop)
}

fn sendto(fd: &OwnedFd, buf: &[u8], flags: i32, to: &Sockaddr) -> Result<usize, i32> {
    // SAFETY: `buf` and `to` are alive for the call.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags,
            to.ptr(),
            to.len,
        )
    })
}

fn write(fd: &OwnedFd, buf: &[u8]) -> Result<usize, i32> {
    // SAFETY: `buf` is alive for the call.
    check(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

fn set_int_option(fd: &OwnedFd, level: i32, name: i32, value: libc::c_int) -> Result<(), i32> {
    // SAFETY: `value` is alive for the call, and its size is passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn payload_iov() -> libc::iovec {
    libc::iovec {
        iov_base: PAYLOAD.as_ptr().cast_mut().cast(),
        iov_len: PAYLOAD.len(),
    }
}

/// A message of `iov` to `to` (both must outlive its use).
fn message_to(to: &Sockaddr, iov: &mut libc::iovec) -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr: no name, no data, no control messages.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.ptr().cast_mut().cast();
    msg.msg_namelen = to.len;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg
}

/// A syscall's non-negative result, or the errno it set.
fn check(rc: impl TryInto<usize>) -> Result<usize, i32> {
    rc.try_into().map_err(|_| errno())
}

fn errno() -> i32 {
    os_errno(std::io::Error::last_os_error())
}

fn os_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

// ---- The ia32 entry -----------------------------------------------------------------------

/// Socket calls through `int $0x80` from this 64-bit process: the kernel's ia32 syscall table,
/// whose numbers and entry points differ from the 64-bit ones.
#[cfg(target_arch = "x86_64")]
mod compat {
    use super::{Done, Outcome, OwnedFd, PAYLOAD, Sockaddr, SocketAddr, errno, write};
    use std::os::fd::FromRawFd as _;

    /// socketcall(2), the ia32 multiplexer of the socket calls.
    const SOCKETCALL: u32 = 102;
    /// Where the low page holds the payload, the socket address and socketcall's arguments.
    const PAYLOAD_AT: usize = 0;
    const SOCKADDR_AT: usize = 64;
    const ARGS_AT: usize = 192;

    /// The socket calls used: each has an ia32 syscall number and a socketcall number.
    #[derive(Clone, Copy)]
    enum Call {
        Socket,
        Bind,
        Connect,
        Listen,
        Sendto,
    }

    impl Call {
        fn numbers(self) -> (u32, u32) {
            match self {
                Self::Socket => (359, 1),
                Self::Bind => (361, 2),
                Self::Connect => (362, 3),
                Self::Listen => (363, 4),
                Self::Sendto => (369, 11),
            }
        }
    }

    /// Opens a TCP (`tcp`) or UDP socket of `target`'s family through the ia32 entry, then
    /// connects it and writes the payload, or sends the payload to `target` with sendto.
    /// `mode` is none for the ia32 socket syscalls, `socketcall` for the multiplexer.
    pub fn run(target: SocketAddr, tcp: bool, mode: Option<&str>) -> Outcome {
        run_to(&Sockaddr::new(target), tcp, mode)
    }

    /// [`run`] to any socket address (a local socket's too): a stream socket (`stream`) is
    /// connected, then written; a datagram socket sends with sendto.
    pub fn run_to(to: &Sockaddr, stream: bool, mode: Option<&str>) -> Outcome {
        let tcp = stream;
        let via_socketcall = match mode {
            None => false,
            Some("socketcall") => true,
            Some(other) => panic!("unknown compat mode {other:?}"),
        };
        let page = LowPage::map(via_socketcall)?;
        let kind = if tcp {
            libc::SOCK_STREAM
        } else {
            libc::SOCK_DGRAM
        };
        let fd = page.call(Call::Socket, &[to.family() as u32, kind as u32, 0])?;
        // SAFETY: the descriptor the socket call just returned; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let addr = page.put_sockaddr(to);
        if tcp {
            page.call(Call::Connect, &[fd, addr, to.len])?;
            write(&owned, PAYLOAD)?;
            return Ok(Done::Connected);
        }
        let (payload, len) = (page.addr(PAYLOAD_AT), PAYLOAD.len() as u32);
        let sent = page.call(Call::Sendto, &[fd, payload, len, 0, addr, to.len])?;
        Ok(Done::Sent(sent as usize))
    }

    /// A TCP socket of `target`'s family, bound to `target` and listening, all through the
    /// ia32 entry (`mode` as for [`run`]).
    pub fn listen(target: SocketAddr, mode: Option<&str>) -> Outcome {
        let to = Sockaddr::new(target);
        let page = LowPage::map(mode == Some("socketcall"))?;
        let fd = page.call(
            Call::Socket,
            &[to.family() as u32, libc::SOCK_STREAM as u32, 0],
        )?;
        // SAFETY: the descriptor the socket call just returned; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let addr = page.put_sockaddr(&to);
        page.call(Call::Bind, &[fd, addr, to.len])?;
        page.call(Call::Listen, &[fd, 8])?;
        if super::accepts(std::os::fd::AsRawFd::as_raw_fd(&owned)) {
            Ok(Done::Listening)
        } else {
            Err(libc::EPERM)
        }
    }

    /// A page below 4 GiB, where the 32-bit pointers that the ia32 calls take can point, with
    /// the payload at its start. It is never unmapped: the process exits soon after.
    struct LowPage {
        base: *mut u8,
        via_socketcall: bool,
    }

    impl LowPage {
        fn map(via_socketcall: bool) -> Result<Self, i32> {
            // SAFETY: a new anonymous mapping, then a copy into its start.
            let base = unsafe {
                let base = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                    -1,
                    0,
                );
                if base == libc::MAP_FAILED {
                    return Err(errno());
                }
                let base = base.cast::<u8>();
                std::ptr::copy_nonoverlapping(
                    PAYLOAD.as_ptr(),
                    base.add(PAYLOAD_AT),
                    PAYLOAD.len(),
                );
                base
            };
            catch_missing_int80();
            Ok(Self {
                base,
                via_socketcall,
            })
        }

        /// The 32-bit address of `offset` in the page.
        fn addr(&self, offset: usize) -> u32 {
            u32::try_from(self.base as usize + offset).expect("MAP_32BIT maps below 4 GiB")
        }

        /// Copies `to` into the page and returns its 32-bit address.
        fn put_sockaddr(&self, to: &Sockaddr) -> u32 {
            assert!(
                to.len as usize <= ARGS_AT - SOCKADDR_AT,
                "a short socket address"
            );
            // SAFETY: the address fits between SOCKADDR_AT and ARGS_AT (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    to.ptr().cast::<u8>(),
                    self.base.add(SOCKADDR_AT),
                    to.len as usize,
                );
            }
            self.addr(SOCKADDR_AT)
        }

        /// Makes `call` with `args` (at most six), as an ia32 syscall or through socketcall.
        fn call(&self, call: Call, args: &[u32]) -> Result<u32, i32> {
            let (direct, multiplexed) = call.numbers();
            let mut registers = [0u32; 6];
            let number = if self.via_socketcall {
                // SAFETY: six u32s fit between ARGS_AT and the end of the page, 4-aligned.
                unsafe {
                    let at = self.base.add(ARGS_AT).cast::<u32>();
                    std::ptr::copy_nonoverlapping(args.as_ptr(), at, args.len());
                }
                registers[..2].copy_from_slice(&[multiplexed, self.addr(ARGS_AT)]);
                SOCKETCALL
            } else {
                registers[..args.len()].copy_from_slice(args);
                direct
            };
            let rc = int80(number, &registers) as i32;
            u32::try_from(rc).map_err(|_| -rc)
        }
    }

    /// The ia32 syscall `number` with `args` in ebx, ecx, edx, esi, edi and ebp.
    fn int80(number: u32, args: &[u32; 6]) -> u32 {
        let mut rc = number;
        // SAFETY: `int $0x80` enters the kernel's ia32 syscall table, which reads only the
        // lower 32 bits of each register: every pointer among `args` is in the low page. rbx
        // and rbp, which the compiler may not hand out as operands, are saved around the call
        // (rdi, which holds `args`, is loaded last); r8-r11 are declared clobbered for kernels
        // that do not preserve them.
        unsafe {
            core::arch::asm!(
                "push rbx",
                "push rbp",
                "mov ebx, [rdi]",
                "mov ecx, [rdi + 4]",
                "mov edx, [rdi + 8]",
                "mov esi, [rdi + 12]",
                "mov ebp, [rdi + 20]",
                "mov edi, [rdi + 16]",
                "int 0x80",
                "pop rbp",
                "pop rbx",
                inout("rdi") args.as_ptr() => _,
                inout("eax") rc,
                out("ecx") _,
                out("edx") _,
                out("esi") _,
                out("r8") _,
                out("r9") _,
                out("r10") _,
                out("r11") _,
            );
        }
        rc
    }

    /// Without ia32 emulation (not built in, or `ia32_emulation=0`) `int $0x80` has no gate
    /// and faults: this SIGSEGV handler turns that fault into an ENOSYS result instead.
    fn catch_missing_int80() {
        // SAFETY: installing a handler that touches only the interrupted context.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_segv as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
        }
    }

    extern "C" fn on_segv(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
        // SAFETY: the kernel hands an SA_SIGINFO handler the interrupted ucontext_t; the
        // faulting instruction is in this program's code, which is readable.
        unsafe {
            let registers = &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
            let rip = registers[libc::REG_RIP as usize];
            if *(rip as usize as *const [u8; 2]) == [0xcd, 0x80] {
                registers[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
                registers[libc::REG_RIP as usize] = rip + 2;
            } else {
                // Any other fault repeats on return, and kills the process as usual.
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            }
        }
    }
}
