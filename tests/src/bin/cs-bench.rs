//! countersign's benchmark driver (run by `cargo xtask bench`, on the host and in the VMs).
//!
//! Two loops — fork+exec of a tiny binary, and TCP connect+close to a loopback listener — are
//! timed in three settings, interleaved round by round so that drift of the machine affects
//! them alike:
//! - `baseline`: no daemon, no hooks;
//! - `unlabelled`: the daemon runs, the loop's process is not an agent;
//! - `labelled`: the loop runs under `countersign exec --label bench`, and the policy allows
//!   its actions (both in the kernel's fast path).
//!
//! Usage: cs-bench suite COUNTERSIGN POLICY_DIR_OUT ROUNDS EXECS CONNECTS
//!        cs-bench exec N          (prints ns per exec)
//!        cs-bench connect N       (prints ns per connect)
//!
//! `suite` prints one JSON object with the medians (ns per operation) and the ratios to the
//! baseline.
use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
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
            println!("{}", exec_loop(args[2].parse().expect("N")));
            0
        }
        Some("connect") => {
            println!("{}", connect_loop(args[2].parse().expect("N")));
            0
        }
        Some("suite") => suite(
            Path::new(&args[2]),
            Path::new(&args[3]),
            args[4].parse().expect("ROUNDS"),
            args[5].parse().expect("EXECS"),
            args[6].parse().expect("CONNECTS"),
        ),
        _ => {
            eprintln!("cs-bench: unknown usage {args:?}");
            2
        }
    };
    std::process::exit(code);
}

/// Mean nanoseconds per fork+exec+wait of `/bin/true`.
fn exec_loop(n: u32) -> u64 {
    let start = Instant::now();
    for _ in 0..n {
        let status = Command::new(TRUE).status().expect("run /bin/true");
        assert!(status.success(), "/bin/true failed: {status}");
    }
    (start.elapsed().as_nanos() / u128::from(n.max(1))) as u64
}

/// Mean nanoseconds per TCP connect+close to a loopback listener of this process.
fn connect_loop(n: u32) -> u64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let start = Instant::now();
    for _ in 0..n {
        let s = TcpStream::connect(addr).expect("connect");
        // Accepted at once, in this thread: the accept queue never fills (a full queue drops
        // SYNs, and a retransmission costs a second).
        drop(listener.accept().expect("accept"));
        reset_on_close(&s);
        drop(s);
    }
    (start.elapsed().as_nanos() / u128::from(n.max(1))) as u64
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

/// Runs `cs-bench WHAT N`, labelled or not, and returns its ns per operation.
fn run(countersign: &Path, dir: Option<&Path>, what: &str, n: u32) -> u64 {
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
    out.trim().parse().expect("ns per op")
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn suite(countersign: &Path, work: &Path, rounds: u32, execs: u32, connects: u32) -> i32 {
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
    let names = ["baseline", "unlabelled", "labelled"];
    let mut exec = [Vec::new(), Vec::new(), Vec::new()];
    let mut connect = [Vec::new(), Vec::new(), Vec::new()];
    // Warm up caches (page cache, binaries) outside the measurement.
    run(countersign, None, "exec", execs / 10 + 1);
    run(countersign, None, "connect", connects / 10 + 1);
    for round in 0..rounds {
        // Baseline first or last, alternately, so that neither side always runs first.
        let baseline = |exec: &mut [Vec<u64>; 3], connect: &mut [Vec<u64>; 3]| {
            exec[0].push(run(countersign, None, "exec", execs));
            connect[0].push(run(countersign, None, "connect", connects));
        };
        if round % 2 == 0 {
            baseline(&mut exec, &mut connect);
        }
        let daemon = Daemon::start(countersign, &policy, &dir);
        for s in [1, 2] {
            let dir = (s == 2).then_some(daemon.dir.as_path());
            exec[s].push(run(countersign, dir, "exec", execs));
            connect[s].push(run(countersign, dir, "connect", connects));
        }
        drop(daemon);
        if round % 2 == 1 {
            baseline(&mut exec, &mut connect);
        }
        eprintln!("cs-bench: round {}/{rounds} done", round + 1);
    }
    let exec_m: Vec<u64> = exec.iter_mut().map(|v| median(v)).collect();
    let connect_m: Vec<u64> = connect.iter_mut().map(|v| median(v)).collect();
    let ratio = |m: &[u64], i: usize| m[i] as f64 / m[0].max(1) as f64;
    let mut json = String::from("{");
    json.push_str(&format!(
        "\"rounds\":{rounds},\"execs_per_round\":{execs},\"connects_per_round\":{connects}"
    ));
    for (loop_name, m) in [("exec", &exec_m), ("connect", &connect_m)] {
        for (i, n) in names.iter().enumerate() {
            json.push_str(&format!(",\"{loop_name}_{n}_ns\":{}", m[i]));
            if i > 0 {
                json.push_str(&format!(",\"{loop_name}_{n}_ratio\":{:.4}", ratio(m, i)));
            }
        }
    }
    json.push('}');
    println!("{json}");
    0
}
