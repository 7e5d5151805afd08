//! The process the end-to-end scenarios run under a label: it performs one action and prints
//! what happened, so the tests can tell a held, approved, denied or killed action apart.
//!
//! Usage:
//!   cs-probe connect ADDR:PORT                 TCP connect; prints `connected` or `error ERRNO`
//!   cs-probe udp-connect ADDR:PORT             UDP connect; prints the same
//!   cs-probe listen ADDR:PORT                  a TCP socket bound to ADDR:PORT (0: any port)
//!                                              listens; prints `listening` or `error ERRNO`
//!   cs-probe connect-changing ADDR:P1 P2       connect to P1; a SIGCONT handler switches the
//!                                              address to P2 before the syscall restarts
//!   cs-probe exec PATH ARGS...                 execv; prints `exec-error ERRNO` if it returns
//!   cs-probe exec-changing PATH A B            execv(PATH, [PATH, A]); a SIGCONT handler turns
//!                                              A into B (same length) before the restart
//!   cs-probe exec-after-failed PATH1 PATH2 ARGS...
//!                                              execv(PATH1) (expected to fail: prints
//!                                              `exec-error ERRNO`), then exec PATH2 ARGS...
//!   cs-probe double-fork PATH ARGS...          fork, setsid, fork, exec in the grandchild;
//!                                              prints the grandchild's pid
//!   cs-probe touch FILE                        creates FILE (proof that an exec ran)
//!   cs-probe resolve-connect NAME SERVER PORT  asks SERVER:53 (a connected UDP socket, as
//!                                              the C library does) for NAME's A record,
//!                                              prints `resolved ADDR` (or `dns-error ...`),
//!                                              then TCP connects to ADDR:PORT like `connect`
//!   cs-probe answer-self NAME ADDR SERVER      in a new network namespace of its own (needs
//!                                              CAP_SYS_ADMIN, or a user namespace), serves
//!                                              NAME → ADDR on SERVER:53 and asks it there
//!                                              through a connected UDP socket; prints `answered`
//!   cs-probe wait SUBCOMMAND ARGS...           reads a line from stdin, then runs SUBCOMMAND
use std::{
    ffi::CString,
    io::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicPtr, AtomicU16, Ordering},
};

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("wait") {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        args.remove(1);
    }
    let code = match args.get(1).map(String::as_str) {
        Some("connect") => connect(&args[2], None),
        Some("udp-connect") => udp_connect(&args[2]),
        Some("listen") => match std::net::TcpListener::bind(args[2].as_str()) {
            Ok(_) => {
                say("listening");
                0
            }
            Err(e) => {
                say(&format!("error {}", e.raw_os_error().unwrap_or(-1)));
                1
            }
        },
        Some("connect-changing") => connect(&args[2], Some(args[3].parse().expect("port"))),
        Some("exec") => exec(&args[2..], None),
        Some("exec-changing") => exec(&args[2..4], Some(&args[4])),
        Some("exec-after-failed") => {
            let first = CString::new(args[2].as_str()).expect("no NUL");
            let argv = [first.as_ptr(), std::ptr::null()];
            // SAFETY: NULL-terminated argv of a live CString.
            unsafe { libc::execv(first.as_ptr(), argv.as_ptr()) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
            say(&format!("exec-error {errno}"));
            exec(&args[3..], None)
        }
        Some("burst") => burst(args[2].parse().expect("a COUNT argument"), &args[3]),
        Some("threads-connect") => threads_connect(
            args[2].parse().expect("a THREADS argument"),
            args[3].parse().expect("an EACH argument"),
            &args[4],
        ),
        Some("double-fork") => double_fork(&args[2..]),
        Some("resolve-connect") => resolve_connect(&args[2], &args[3], &args[4]),
        Some("answer-self") => answer_self(&args[2], &args[3], &args[4]),
        Some("touch") => {
            std::fs::write(&args[2], b"ran\n").expect("touch");
            0
        }
        _ => {
            eprintln!("cs-probe: unknown usage {args:?}");
            2
        }
    };
    std::process::exit(code);
}

/// Resolves `name` through `server` (UDP port 53), then connects to the answer.
fn resolve_connect(name: &str, server: &str, port: &str) -> i32 {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let server: std::net::IpAddr = server.parse().expect("SERVER address");
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    if let Err(e) = sock.connect((server, 53)) {
        say(&format!("dns-error {}", e.raw_os_error().unwrap_or(-1)));
        return 1;
    }
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).expect("NAME"),
        RecordType::A,
    ));
    sock.send(&q.to_vec().expect("query"))
        .expect("sending the query");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    let n = match sock.recv(&mut buf) {
        Ok(n) => n,
        Err(e) => {
            say(&format!("dns-error {e}"));
            return 1;
        }
    };
    let answer = Message::from_vec(&buf[..n]).expect("a DNS answer");
    let Some(addr) = answer.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    }) else {
        say("dns-error no address");
        return 1;
    };
    say(&format!("resolved {addr}"));
    connect(&format!("{addr}:{port}"), None)
}

/// Plays both the program and its "resolver" in a network namespace of its own (with a user
/// namespace of its own, as a sandbox makes them: the network there is its own to set up).
fn answer_self(name: &str, addr: &str, server: &str) -> i32 {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };
    // SAFETY: plain syscall; the probe is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        say(&format!(
            "unshare-error {}",
            std::io::Error::last_os_error()
        ));
        return 2;
    }
    if let Err(e) = loopback_up() {
        say(&format!("lo-error {e}"));
        return 2;
    }
    let server: std::net::IpAddr = server.parse().expect("SERVER address");
    let addr: std::net::Ipv4Addr = addr.parse().expect("ADDR");
    let resolver = std::net::UdpSocket::bind((server, 53)).expect("binding SERVER:53");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    client
        .connect((server, 53))
        .expect("connecting to SERVER:53");
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii(name).expect("NAME"),
        RecordType::A,
    ));
    client.send(&q.to_vec().expect("query")).expect("query");
    let mut buf = [0u8; 1500];
    let (n, from) = resolver.recv_from(&mut buf).expect("the query");
    let query = Message::from_vec(&buf[..n]).expect("a DNS query");
    let mut answer = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    answer.add_queries(query.queries.clone());
    answer.add_answer(Record::from_rdata(
        Name::from_ascii(name).expect("NAME"),
        60,
        RData::A(A(addr)),
    ));
    resolver
        .send_to(&answer.to_vec().expect("answer"), from)
        .expect("answering");
    client.recv(&mut buf).expect("the answer");
    say("answered");
    0
}

/// Brings `lo` up in the current network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: an ioctl on a socket this function owns, with an `ifreq` it owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn say(s: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

/// The sockaddr the SIGCONT handler rewrites, and the port it writes.
static SOCKADDR: AtomicPtr<libc::sockaddr_in> = AtomicPtr::new(std::ptr::null_mut());
static NEW_PORT: AtomicU16 = AtomicU16::new(0);
static ARG: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static NEW_ARG: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_sigcont_port(_: libc::c_int) {
    let sa = SOCKADDR.load(Ordering::SeqCst);
    if !sa.is_null() {
        // SAFETY: points at the live sockaddr in `connect`'s frame, which is blocked in the
        // syscall this handler interrupts.
        unsafe { (*sa).sin_port = NEW_PORT.load(Ordering::SeqCst).to_be() };
    }
}

extern "C" fn on_sigcont_arg(_: libc::c_int) {
    let (dst, src) = (ARG.load(Ordering::SeqCst), NEW_ARG.load(Ordering::SeqCst));
    if !dst.is_null() && !src.is_null() {
        // SAFETY: both are NUL-terminated strings of the same length, alive in `exec`'s frame.
        unsafe {
            let mut i = 0;
            while *src.add(i) != 0 {
                *dst.add(i) = *src.add(i);
                i += 1;
            }
        }
    }
}

fn install(handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installing an async-signal-safe handler with a zeroed, then filled, sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGCONT, &sa, std::ptr::null_mut());
    }
}

fn connect(target: &str, change_to: Option<u16>) -> i32 {
    let addr: SocketAddr = target.parse().expect("ADDR:PORT");
    let SocketAddr::V4(v4) = addr else {
        return connect_std(addr);
    };
    // A raw connect, so that the SIGCONT handler can rewrite the address it passes.
    // SAFETY: plain socket calls on a sockaddr that lives across the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = v4.port().to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        if let Some(p) = change_to {
            SOCKADDR.store(&raw mut sa, Ordering::SeqCst);
            NEW_PORT.store(p, Ordering::SeqCst);
            install(on_sigcont_port);
        }
        let rc = libc::connect(
            fd,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        SOCKADDR.store(std::ptr::null_mut(), Ordering::SeqCst);
        if rc == 0 {
            say("connected");
            0
        } else {
            say(&format!("error {}", *libc::__errno_location()));
            1
        }
    }
}

fn udp_connect(target: &str) -> i32 {
    let addr: SocketAddr = target.parse().expect("ADDR:PORT");
    let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
    match socket.connect(addr) {
        Ok(()) => {
            say("connected");
            0
        }
        Err(e) => {
            say(&format!("error {}", e.raw_os_error().unwrap_or(-1)));
            1
        }
    }
}

/// `threads` threads of this process connecting to `target` at once, `each` times apiece:
/// says `threads connected C errors E` (`E` by errno: `errors 1:400`).
fn threads_connect(threads: usize, each: usize, target: &str) -> i32 {
    let addr: SocketAddr = target.parse().expect("ADDR:PORT");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                (0..each)
                    .map(|_| {
                        std::net::TcpStream::connect(addr)
                            .map_or_else(|e| e.raw_os_error().unwrap_or(-1), |_| 0)
                    })
                    .collect::<Vec<i32>>()
            })
        })
        .collect();
    let mut connected = 0;
    let mut errors = std::collections::BTreeMap::<i32, usize>::new();
    for h in handles {
        for e in h.join().expect("a connecting thread") {
            if e == 0 {
                connected += 1;
            } else {
                *errors.entry(e).or_default() += 1;
            }
        }
    }
    let errors: Vec<String> = errors.iter().map(|(e, n)| format!("{e}:{n}")).collect();
    say(&format!(
        "threads connected {connected} errors {}",
        errors.join(" ")
    ));
    0
}

/// A burst of `count` processes that connect to `target` at once: forks them, says
/// `ready PID...` and waits for a line on stdin, lets them all go, waits for them and says
/// `burst connected C refused R` (`R` by errno: `refused 13:4 1:396`).
fn burst(count: usize, target: &str) -> i32 {
    let addr: std::net::SocketAddrV4 = target.parse().expect("an IPv4 ADDR:PORT");
    let mut go = [0i32; 2];
    // SAFETY: a pipe into a two-element array.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0, "pipe");
    let mut pids = Vec::with_capacity(count);
    for _ in 0..count {
        // SAFETY: the child only reads, connects and exits (no allocation).
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::close(go[1]);
                let mut b = 0u8;
                // Returns at end of file: when the parent closes its end.
                libc::read(go[0], (&raw mut b).cast(), 1);
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = addr.port().to_be();
                sa.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
                let rc = libc::connect(
                    fd,
                    (&raw const sa).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                );
                let code = if rc == 0 {
                    0
                } else {
                    (*libc::__errno_location()).clamp(1, 255)
                };
                libc::_exit(code);
            },
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }
    // SAFETY: closing our read end.
    unsafe { libc::close(go[0]) };
    let list: Vec<String> = pids.iter().map(ToString::to_string).collect();
    say(&format!("ready {}", list.join(" ")));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    // SAFETY: closing the write end wakes every child at once.
    unsafe { libc::close(go[1]) };
    let mut connected = 0;
    let mut refused = std::collections::BTreeMap::<i32, usize>::new();
    for pid in pids {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
            (true, 0) => connected += 1,
            (true, errno) => *refused.entry(errno).or_default() += 1,
            _ => *refused.entry(-libc::WTERMSIG(status)).or_default() += 1,
        }
    }
    let refused: Vec<String> = refused.iter().map(|(e, n)| format!("{e}:{n}")).collect();
    say(&format!(
        "burst connected {connected} refused {}",
        refused.join(" ")
    ));
    0
}

fn connect_std(addr: SocketAddr) -> i32 {
    match std::net::TcpStream::connect(addr) {
        Ok(_) => {
            say("connected");
            0
        }
        Err(e) => {
            say(&format!("error {}", e.raw_os_error().unwrap_or(-1)));
            1
        }
    }
}

fn exec(argv: &[String], change_to: Option<&String>) -> i32 {
    let cargs: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_str()).expect("arg"))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let new = change_to.map(|b| CString::new(b.as_str()).expect("arg"));
    if let Some(new) = &new {
        assert_eq!(
            new.as_bytes().len(),
            cargs[1].as_bytes().len(),
            "A and B must be the same length"
        );
        ARG.store(cargs[1].as_ptr().cast_mut().cast(), Ordering::SeqCst);
        NEW_ARG.store(new.as_ptr().cast_mut().cast(), Ordering::SeqCst);
        install(on_sigcont_arg);
    }
    // SAFETY: NULL-terminated argv of live CStrings.
    unsafe { libc::execv(cargs[0].as_ptr(), ptrs.as_ptr()) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
    say(&format!("exec-error {errno}"));
    126
}

fn double_fork(argv: &[String]) -> i32 {
    let (rd, wr) = {
        let mut fds = [0; 2];
        // SAFETY: pipe with a valid array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    };
    // SAFETY: fork in a single-threaded program; the child only calls async-signal-safe
    // functions before exec.
    match unsafe { libc::fork() } {
        0 => unsafe {
            libc::setsid();
            match libc::fork() {
                0 => {
                    let pid = libc::getpid();
                    let bytes = pid.to_ne_bytes();
                    libc::write(wr, bytes.as_ptr().cast(), 4);
                    exec(argv, None);
                    libc::_exit(126);
                }
                _ => libc::_exit(0),
            }
        },
        child => {
            // SAFETY: waiting for our own child; reading 4 bytes from our pipe.
            unsafe {
                libc::close(wr);
                libc::waitpid(child, std::ptr::null_mut(), 0);
                let mut buf = [0u8; 4];
                libc::read(rd, buf.as_mut_ptr().cast(), 4);
                say(&format!("grandchild {}", i32::from_ne_bytes(buf)));
            }
            0
        }
    }
}
