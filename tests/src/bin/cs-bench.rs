//! countersign's benchmark driver (run by `cargo xtask bench`, on the host and in the VMs).
//!
//! Four loops — fork+exec of a tiny binary, TCP connect+close to a loopback listener, UDP
//! `sendto` of a small datagram to a loopback socket (no connect: each send names its
//! destination), and open+read+close of a small file (the file hooks of self-protection run
//! on every open) — are timed in three settings, interleaved round by round so that drift of the machine affects
//! them alike:
//! - `baseline`: no daemon, no hooks;
//! - `unlabelled`: the daemon runs, the loop's process is not an agent;
//! - `labelled`: the loop runs under `countersign exec --label bench`, and the policy allows
//!   its actions (both in the kernel's fast path).
//!
//! Each loop reports two costs per operation: wall-clock time, and CPU time (user + system,
//! of the loop's process and of the children it waited for, from `getrusage`). Kernel work
//! done on the loop's behalf — the countersign hooks included — is charged to the loop's
//! tasks, so its CPU time measures the hot path while being far less sensitive than wall time
//! to other work on a shared machine; wall time also shows waiting (e.g. for the daemon).
//!
//! Usage: cs-bench suite COUNTERSIGN POLICY_DIR_OUT ROUNDS EXECS CONNECTS SENDS OPENS
//!        cs-bench decisions COUNTERSIGN WORK_DIR WORKERS EACH
//!                                 (daemon-made decisions: WORKERS labelled processes each
//!                                 make EACH connects the policy refuses in the daemon, held
//!                                 and decided one by one; prints one JSON object: decisions
//!                                 per second, hold → release latency)
//!        cs-bench exec N          (prints wall and CPU ns per exec)
//!        cs-bench connect N       (prints wall and CPU ns per connect)
//!        cs-bench send N          (prints wall and CPU ns per datagram sent)
//!        cs-bench open N          (prints wall and CPU ns per open+read+close)
//!
//! `CS_BENCH_CONFIG=FILE` starts the daemon with that configuration file (to time a setting
//! apart, such as destination names off).
//! `CS_BENCH_MODE=MODE` starts it with `--mode MODE` (`lsm`, `fallback`; by default it picks
//! its mode itself).
//!
//! `suite` prints one JSON object with every round's samples (`samples.LOOP.SETTING.wall` and
//! `.cpu`, ns per operation, in round order); `cargo xtask bench` turns them into paired
//! ratios, medians and intervals.
use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The tiny binary the exec loop runs.
const TRUE: &str = "/bin/true";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("exec") => {
            let n = args[2].parse().expect("N");
            let (wall, cpu) = measure(n, || exec_loop(n));
            println!("{wall} {cpu}");
            0
        }
        Some("connect") => {
            let n = args[2].parse().expect("N");
            let (wall, cpu) = measure(n, || connect_loop(n));
            println!("{wall} {cpu}");
            0
        }
        Some("send") => {
            let n = args[2].parse().expect("N");
            let (wall, cpu) = measure(n, || send_loop(n));
            println!("{wall} {cpu}");
            0
        }
        Some("open") => {
            let n = args[2].parse().expect("N");
            let (wall, cpu) = measure(n, || open_loop(n));
            println!("{wall} {cpu}");
            0
        }
        Some("decide-loop") => decide_loop(
            args[2].parse().expect("WORKERS"),
            args[3].parse().expect("EACH"),
            &args[4],
        ),
        Some("decisions") => decisions(
            Path::new(&args[2]),
            Path::new(&args[3]),
            args[4].parse().expect("WORKERS"),
            args[5].parse().expect("EACH"),
        ),
        Some("suite") => suite(
            Path::new(&args[2]),
            Path::new(&args[3]),
            args[4].parse().expect("ROUNDS"),
            Counts {
                exec: args[5].parse().expect("EXECS"),
                connect: args[6].parse().expect("CONNECTS"),
                send: args[7].parse().expect("SENDS"),
                open: args[8].parse().expect("OPENS"),
            },
        ),
        _ => {
            eprintln!("cs-bench: unknown usage {args:?}");
            2
        }
    };
    std::process::exit(code);
}

/// CPU time (user + system) used so far by this process and by its waited-for children.
fn cpu_ns() -> u128 {
    let used = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(who, &raw mut ru) }, 0, "getrusage");
        let tv = |t: libc::timeval| t.tv_sec as u128 * 1_000_000_000 + t.tv_usec as u128 * 1_000;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

/// Runs `body` (n operations) and returns its mean wall and CPU nanoseconds per operation.
fn measure(n: u32, body: impl FnOnce()) -> (u64, u64) {
    let (cpu0, start) = (cpu_ns(), Instant::now());
    body();
    let wall = start.elapsed().as_nanos();
    let cpu = cpu_ns() - cpu0;
    let n = u128::from(n.max(1));
    ((wall / n) as u64, (cpu / n) as u64)
}

/// Fork+exec+wait of `/bin/true`, `n` times.
fn exec_loop(n: u32) {
    for _ in 0..n {
        let status = Command::new(TRUE).status().expect("run /bin/true");
        assert!(status.success(), "/bin/true failed: {status}");
    }
}

/// TCP connect+close to a loopback listener of this process, `n` times.
fn connect_loop(n: u32) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    for _ in 0..n {
        let s = TcpStream::connect(addr).expect("connect");
        // Accepted at once, in this thread: the accept queue never fills (a full queue drops
        // SYNs, and a retransmission costs a second).
        drop(listener.accept().expect("accept"));
        reset_on_close(&s);
        drop(s);
    }
}

/// open+read+close of this process's own small file, `n` times.
fn open_loop(n: u32) {
    let path = std::env::temp_dir().join(format!("cs-bench-open-{}", std::process::id()));
    std::fs::write(&path, [7u8; 512]).expect("the file to open");
    let mut buf = [0u8; 512];
    for _ in 0..n {
        let mut f = std::fs::File::open(&path).expect("open");
        f.read_exact(&mut buf).expect("read");
    }
    let _ = std::fs::remove_file(&path);
}

/// UDP `sendto` of a 32-byte datagram to a loopback socket of this process, `n` times; the
/// receiver is drained now and then so that the datagrams are really queued, not dropped.
fn send_loop(n: u32) {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    receiver.set_nonblocking(true).expect("nonblocking");
    let to = receiver.local_addr().expect("addr");
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let payload = [7u8; 32];
    let mut buf = [0u8; 64];
    for i in 0..n {
        sender.send_to(&payload, to).expect("sendto");
        if i % 64 == 63 {
            while receiver.recv(&mut buf).is_ok() {}
        }
    }
}

/// Closes with a reset instead of leaving the port in TIME_WAIT, so that thousands of
/// connects per run do not slow the later runs down.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a live socket with a pointer to a local struct and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

struct Daemon {
    child: std::process::Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(countersign: &Path, policy: &Path, dir: &Path) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("daemon dir");
        let child = Command::new(countersign)
            .args(["daemon", "--policy"])
            .arg(policy)
            .arg("--socket-dir")
            .arg(dir)
            .arg("--bpf-pin-dir")
            .arg(format!(
                "/sys/fs/bpf/countersign-bench-{}",
                std::process::id()
            ))
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            // The daemon's mode (`--mode`), if not its own choice.
            .args(
                std::env::var_os("CS_BENCH_MODE")
                    .map(|m| [std::ffi::OsString::from("--mode"), m])
                    .into_iter()
                    .flatten(),
            )
            .args(
                std::env::var_os("CS_BENCH_CONFIG")
                    .map(|c| [std::ffi::OsString::from("--config"), c])
                    .into_iter()
                    .flatten(),
            )
            .env("COUNTERSIGN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !dir.join("control.sock").exists() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon this process started, by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cs-bench WHAT N`, labelled or not, and returns its (wall, CPU) ns per operation.
fn run(countersign: &Path, dir: Option<&Path>, what: &str, n: u32) -> (u64, u64) {
    let me = std::env::current_exe().expect("current_exe");
    let mut cmd = match dir {
        Some(dir) => {
            let mut c = Command::new(countersign);
            c.args(["exec", "--label", "bench", "--"])
                .arg(&me)
                .env("COUNTERSIGN_SOCKET_DIR", dir);
            c
        }
        None => Command::new(&me),
    };
    let mut child = cmd
        .args([what, &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the loop");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let status = child.wait().expect("wait");
    assert!(status.success(), "the {what} loop failed: {status}");
    let mut it = out
        .split_whitespace()
        .map(|x| x.parse().expect("ns per op"));
    let (Some(wall), Some(cpu)) = (it.next(), it.next()) else {
        panic!("the {what} loop printed {out:?}, not WALL CPU");
    };
    (wall, cpu)
}

/// The samples of one setting of one loop.
#[derive(Default)]
struct Samples {
    wall: Vec<u64>,
    cpu: Vec<u64>,
}

impl Samples {
    fn push(&mut self, (wall, cpu): (u64, u64)) {
        self.wall.push(wall);
        self.cpu.push(cpu);
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"wall": self.wall, "cpu": self.cpu})
    }
}

/// Operations per loop run.
struct Counts {
    exec: u32,
    connect: u32,
    send: u32,
    open: u32,
}

/// The loops, in the order they run.
const LOOPS: [&str; 4] = ["exec", "connect", "send", "open"];

fn suite(countersign: &Path, work: &Path, rounds: u32, counts: Counts) -> i32 {
    std::fs::create_dir_all(work).expect("work dir");
    let me = std::env::current_exe().expect("current_exe");
    let policy = work.join("bench-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: bench
    default: {{outcome: deny}}
    rules:
      - name: the-loops
        exec: {{binary: [{}, {TRUE}]}}
        outcome: allow
      - name: loopback
        connect: {{cidr: [127.0.0.0/8]}}
        outcome: allow
",
            me.display()
        ),
    )
    .expect("policy");
    let dir = work.join("daemon");
    let count = |op: &str| match op {
        "exec" => counts.exec,
        "connect" => counts.connect,
        "send" => counts.send,
        _ => counts.open,
    };
    // samples[loop][setting]: baseline, unlabelled, labelled.
    let mut samples: [[Samples; 3]; 4] = Default::default();
    // Warm up caches (page cache, binaries) outside the measurement.
    for op in LOOPS {
        run(countersign, None, op, count(op) / 10 + 1);
    }
    for round in 0..rounds {
        // Baseline first or last, alternately, so that neither side always runs first.
        let baseline = |samples: &mut [[Samples; 3]; 4]| {
            for (i, op) in LOOPS.iter().enumerate() {
                samples[i][0].push(run(countersign, None, op, count(op)));
            }
        };
        if round % 2 == 0 {
            baseline(&mut samples);
        }
        let daemon = Daemon::start(countersign, &policy, &dir);
        for s in [1, 2] {
            let dir = (s == 2).then_some(daemon.dir.as_path());
            for (i, op) in LOOPS.iter().enumerate() {
                samples[i][s].push(run(countersign, dir, op, count(op)));
            }
        }
        drop(daemon);
        if round % 2 == 1 {
            baseline(&mut samples);
        }
        eprintln!("cs-bench: round {}/{rounds} done", round + 1);
    }
    let setting = |v: &[Samples; 3]| {
        serde_json::json!({
            "baseline": v[0].json(),
            "unlabelled": v[1].json(),
            "labelled": v[2].json(),
        })
    };
    let json = serde_json::json!({
        "rounds": rounds,
        "execs_per_round": counts.exec,
        "connects_per_round": counts.connect,
        "sends_per_round": counts.send,
        "opens_per_round": counts.open,
        "samples": {
            "exec": setting(&samples[0]),
            "connect": setting(&samples[1]),
            "send": setting(&samples[2]),
            "open": setting(&samples[3]),
        },
    });
    println!("{json}");
    0
}

/// `workers` labelled processes connecting where the policy refuses in the daemon (each
/// connect held, decided, recorded durably, released with `EPERM`), `each` connects apiece:
/// prints `{"decisions": N, "secs": S, "per_sec": R, "p50_us": .., "p99_us": .., "max_us":
/// ..}` (latency: the connect call, hold to release).
fn decide_loop(workers: usize, each: usize, target: &str) -> i32 {
    use std::io::Write as _;
    let addr: std::net::SocketAddr = target.parse().expect("ADDR:PORT");
    let start = Instant::now();
    let mut readers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut fds = [0i32; 2];
        // SAFETY: a pipe into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
        // SAFETY: the child connects, writes its latencies and exits.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: our pipe's ends.
                let mut out = unsafe {
                    libc::close(fds[0]);
                    std::fs::File::from_raw_fd(fds[1])
                };
                let mut took = Vec::with_capacity(each * 8);
                for _ in 0..each {
                    let t = Instant::now();
                    let e = TcpStream::connect(addr).expect_err("the policy refuses it");
                    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                    took.extend_from_slice(&(t.elapsed().as_nanos() as u64).to_le_bytes());
                }
                out.write_all(&took).expect("the latencies");
                // SAFETY: leaving the forked child without the parent's exit handlers.
                unsafe { libc::_exit(0) };
            }
            pid if pid > 0 => {
                // SAFETY: our pipe's ends.
                readers.push((pid, unsafe {
                    libc::close(fds[1]);
                    std::fs::File::from_raw_fd(fds[0])
                }));
            }
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }
    let mut took = Vec::with_capacity(workers * each);
    for (pid, mut r) in readers {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).expect("a worker's latencies");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "a worker failed: {status:#x}"
        );
        took.extend(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(took.len(), workers * each, "every worker's latencies");
    took.sort_unstable();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)] / 1000;
    println!(
        "{}",
        serde_json::json!({
            "decisions": took.len(),
            "secs": secs,
            "per_sec": took.len() as f64 / secs,
            "p50_us": at(0.50),
            "p99_us": at(0.99),
            "max_us": took.last().copied().unwrap_or(0) / 1000,
        })
    );
    0
}

/// Starts a daemon whose policy refuses connects to 127.0.0.1:9 by a `deny` rule (decided
/// in the daemon, recorded), runs [`decide_loop`] labelled, and prints its JSON.
fn decisions(countersign: &Path, work: &Path, workers: usize, each: usize) -> i32 {
    std::fs::create_dir_all(work).expect("work dir");
    let me = std::env::current_exe().expect("current_exe");
    let policy = work.join("decisions-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: bench
    default: {{outcome: deny}}
    rules:
      - name: the-loop
        exec: {{binary: [{}]}}
        outcome: allow
      - name: discard
        connect: {{cidr: [127.0.0.1/32], ports: [9]}}
        outcome: deny
",
            me.display()
        ),
    )
    .expect("policy");
    let daemon = Daemon::start(countersign, &policy, &work.join("daemon"));
    let out = Command::new(countersign)
        .args(["exec", "--label", "bench", "--"])
        .arg(&me)
        .args([
            "decide-loop",
            &workers.to_string(),
            &each.to_string(),
            "127.0.0.1:9",
        ])
        .env("COUNTERSIGN_SOCKET_DIR", &daemon.dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the loop");
    drop(daemon);
    assert!(
        out.status.success(),
        "the decide loop failed: {}",
        out.status
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    0
}
