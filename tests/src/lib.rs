//! Harness for the end-to-end scenarios: starts a real `countersign daemon` in a private
//! socket directory, runs labelled processes through `countersign exec`, and decides their
//! requests through the real CLI. Everything started here is stopped on drop, also when a
//! test fails (and then the daemon's log is printed).
//!
//! Environment:
//! - `COUNTERSIGN_BIN`: the countersign binary (default: target/debug/countersign).
//! - `COUNTERSIGN_PROBE`: the cs-probe binary (default: the one cargo built beside the tests).
//! - `COUNTERSIGN_ESCAPE`: the cs-escape binary (default: beside cs-probe).
//! - `COUNTERSIGN_POLICIES`: the example policies (default: the workspace's `policies/`).
//! - `COUNTERSIGN_E2E_MODE`: `lsm` or `fallback`: the mode the daemon is started in
//!   (`--mode`) and must report. The VM runs set `lsm`, so a kernel without working BPF LSM
//!   fails the suite instead of passing it in fallback mode.
//! - `COUNTERSIGN_E2E_AUTO=1`: the daemon is started with `--mode auto` instead, and must
//!   still land in `COUNTERSIGN_E2E_MODE` (a fallback it chose says why).
//! - `COUNTERSIGN_E2E_HOOKS`: where the LSM programs must run in LSM mode, as `status`
//!   says (`bpf-lsm`, or `security-functions` on the VMs booted without BPF LSM).
//! - `COUNTERSIGN_E2E_FENTRY=1`: the kernel runs `fentry` programs and kprobes (the VMs'
//!   Debian kernels do, the test host's does not): destination names are captured there in
//!   either mode, and fallback mode kills listens it cannot hold.
//!
//! Each daemon gets its own socket directory and bpffs pin directory, so tests run in
//! parallel; a crashed daemon's pins are removed when its `Daemon` is dropped.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod browser;
pub mod dns;
pub mod pg;
pub mod remote;

/// How long any wait in a scenario may take (TCG-emulated VMs are slow).
pub const WAIT: Duration = Duration::from_secs(60);

#[must_use]
pub fn countersign_bin() -> PathBuf {
    std::env::var_os("COUNTERSIGN_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/countersign"),
        PathBuf::from,
    )
}

#[must_use]
pub fn probe_bin() -> PathBuf {
    // Test executables live in target/<profile>/deps; cargo puts cs-probe in target/<profile>.
    std::env::var_os("COUNTERSIGN_PROBE").map_or_else(
        || {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .join("cs-probe")
        },
        PathBuf::from,
    )
}

/// The cs-escape binary (`COUNTERSIGN_ESCAPE`, else beside cs-probe).
#[must_use]
pub fn escape_bin() -> PathBuf {
    std::env::var_os("COUNTERSIGN_ESCAPE")
        .map_or_else(|| probe_bin().with_file_name("cs-escape"), PathBuf::from)
}

/// The mode the suite expects, if it was told.
#[must_use]
pub fn expected_mode() -> Option<String> {
    std::env::var("COUNTERSIGN_E2E_MODE")
        .ok()
        .filter(|m| !m.is_empty())
}

/// Whether the daemon is started with `--mode auto` (`COUNTERSIGN_E2E_AUTO=1`) rather than
/// the expected mode.
#[must_use]
pub fn auto_mode() -> bool {
    std::env::var_os("COUNTERSIGN_E2E_AUTO").is_some_and(|v| v == "1")
}

/// Where the LSM programs must run (`COUNTERSIGN_E2E_HOOKS`), if the suite was told.
#[must_use]
pub fn expected_hooks() -> Option<String> {
    std::env::var("COUNTERSIGN_E2E_HOOKS")
        .ok()
        .filter(|m| !m.is_empty())
}

/// A child process killed (by its pid) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit, at most `timeout`; panics (after killing it) if it does not exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "pid {} did not exit within {timeout:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running after `d`.
    pub fn still_running_after(&mut self, d: Duration) -> bool {
        std::thread::sleep(d);
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Returns once it waits on its stdin (a `cs-probe wait …` that came that far).
    pub fn wait_reading_stdin(&self) {
        let syscall = format!("/proc/{}/syscall", self.pid());
        let reading = format!("{} 0x0 ", libc::SYS_read);
        let deadline = Instant::now() + WAIT;
        while !std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with(&reading)) {
            assert!(
                Instant::now() < deadline,
                "pid {} did not come to read its stdin within {WAIT:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets a `cs-probe wait …` go on.
    pub fn go(&mut self) {
        use std::io::Write as _;
        let mut stdin = self.child.stdin.take().expect("stdin piped");
        stdin.write_all(b"go\n").expect("write to stdin");
    }

    /// Everything it printed on stdout (after it exited).
    pub fn stdout(&mut self) -> String {
        use std::io::Read as _;
        let mut s = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut s);
        }
        s
    }

    /// The first line it printed on stdout (children may keep the pipe open).
    pub fn first_line(&mut self) -> String {
        use std::io::BufRead as _;
        let mut s = String::new();
        if let Some(out) = self.child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut s);
        }
        s
    }

    pub fn stderr(&mut self) -> String {
        use std::io::Read as _;
        let mut s = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running daemon in its own directories (sockets, log, pins).
pub struct Daemon {
    proc: Proc,
    dir: tempfile::TempDir,
    /// This daemon's pin directory on bpffs (unique per test).
    pin_dir: PathBuf,
    args: Vec<String>,
    /// The cgroup v2 directory the daemon is started in (the test's own unless set).
    cgroup: Option<PathBuf>,
}

impl Daemon {
    /// Starts a daemon with a 60 s request timeout and waits until it serves.
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(&["--request-timeout", "60"])
    }

    #[must_use]
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_in(args, None)
    }

    /// Starts a daemon with `args` in the cgroup v2 directory `cgroup` (it moves there before
    /// it runs), as a service manager starts it in a cgroup of its own.
    #[must_use]
    pub fn start_in_cgroup(args: &[&str], cgroup: &Path) -> Self {
        Self::start_in(args, Some(cgroup.to_path_buf()))
    }

    fn start_in(args: &[&str], cgroup: Option<PathBuf>) -> Self {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "the end-to-end scenarios need root (they load eBPF programs): run them through `cargo xtask test`"
        );
        let dir = tempfile::Builder::new()
            .prefix("countersign-e2e")
            .tempdir()
            .expect("tempdir");
        let unique = dir
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique);
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let proc = Self::spawn(dir.path(), &pin_dir, &args, cgroup.as_deref());
        let mut daemon = Daemon {
            proc,
            dir,
            pin_dir,
            args,
            cgroup,
        };
        daemon.wait_serving();
        daemon
    }

    fn spawn(dir: &Path, pin_dir: &Path, args: &[String], cgroup: Option<&Path>) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .expect("daemon log");
        // `COUNTERSIGN_E2E_AUTO=1`: the daemon picks its mode itself, as it does on a host,
        // and must still land in the expected one.
        let mode: Vec<String> = if auto_mode() {
            vec!["--mode".to_owned(), "auto".to_owned()]
        } else {
            expected_mode()
                .map(|m| vec!["--mode".to_owned(), m])
                .unwrap_or_default()
        };
        // The records spool goes beside the log unless the test chose one.
        let spool: Vec<PathBuf> = if args.iter().any(|a| a == "--spool-dir") {
            Vec::new()
        } else {
            vec!["--spool-dir".into(), dir.join("spool")]
        };
        let mut command = Command::new(countersign_bin());
        if let Some(cgroup) = cgroup {
            use std::os::unix::{ffi::OsStrExt as _, process::CommandExt as _};
            let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
                .expect("a cgroup path without NUL");
            // SAFETY: between fork and exec the child only opens, writes and closes (no
            // allocation): "0" moves the writing process.
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written == 1 { Ok(()) } else { Err(error) }
                });
            }
        }
        let child = command
            .arg("daemon")
            .args(&mode)
            .arg("--socket-dir")
            .arg(dir)
            .arg("--bpf-pin-dir")
            .arg(pin_dir)
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            .arg("--host-key")
            .arg(dir.join("host.key"))
            .args(&spool)
            .args(args)
            .env("COUNTERSIGN_LOG", "info,countersign=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", countersign_bin().display()));
        Proc { child }
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub fn crash(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Stops the daemon with SIGTERM and waits for it (a clean stop).
    pub fn stop(&mut self) {
        // SAFETY: signalling the daemon we started, by its pid.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let status = self.proc.wait(WAIT);
        assert!(
            status.success(),
            "the daemon stopped with {status}:\n{}",
            self.log()
        );
    }

    /// Asserts that `countersign records verify` accepts the daemon's spool with its key.
    pub fn assert_records_verify(&self) {
        let out = Command::new(countersign_bin())
            .args(["records", "verify"])
            .arg(self.spool_dir())
            .arg("--key")
            .arg(self.host_pub())
            .output()
            .expect("records verify");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where the daemon pins its maps and links.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The daemon's records spool (unless the test chose another with `--spool-dir`).
    #[must_use]
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// The host's public key file.
    #[must_use]
    pub fn host_pub(&self) -> PathBuf {
        self.dir.path().join("host.key.pub")
    }

    /// Starts the daemon again with the same directories and arguments.
    pub fn restart(&mut self) {
        self.proc = Self::spawn(
            self.dir.path(),
            &self.pin_dir,
            &self.args,
            self.cgroup.as_deref(),
        );
        self.wait_serving();
    }

    fn wait_serving(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
                if let Some(want) = expected_mode() {
                    assert_eq!(
                        status["mode"],
                        want.as_str(),
                        "daemon runs in the wrong mode: {status}"
                    );
                    if let Some(hooks) = expected_hooks() {
                        assert_eq!(
                            status["hooks"],
                            hooks.as_str(),
                            "the LSM programs run elsewhere: {status}"
                        );
                    }
                    // Chosen by itself, the fallback says why.
                    if auto_mode() && want == "fallback" {
                        let reason = status["reason"].as_str().unwrap_or_default();
                        assert!(
                            reason.starts_with("fallback: BPF LSM not available"),
                            "{status}"
                        );
                    }
                }
                return;
            }
            if let Some(s) = self.proc.child.try_wait().expect("try_wait") {
                panic!("the daemon exited ({s}) during start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not start serving:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `countersign status --json`.
    #[must_use]
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The daemon's own log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The mode the daemon enforces in.
    #[must_use]
    pub fn mode(&self) -> String {
        let out = self.cli(&["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        status["mode"].as_str().expect("mode").to_owned()
    }

    #[must_use]
    pub fn is_lsm(&self) -> bool {
        self.mode() == "lsm"
    }

    /// Fallback mode with the cgroup programs of local sockets (Linux 6.7+): local-socket
    /// connects that skip `connect(2)` and datagrams sent with an address are refused.
    #[must_use]
    pub fn has_local_socket_programs(&self) -> bool {
        self.status()["local_socket_programs"] == true
    }

    /// The kind an exec of a launched agent (`countersign exec`) is held as: before it
    /// starts (`exec`) in LSM mode, and in fallback mode where the daemon has the seccomp
    /// notifier; otherwise after loading (`exec-loaded`).
    #[must_use]
    pub fn exec_kind(&self) -> &'static str {
        let before = self.is_lsm()
            || self.status()["exec_hold"]
                .as_str()
                .is_some_and(|h| h.starts_with("before"));
        if before { "exec" } else { "exec-loaded" }
    }

    /// Runs the countersign CLI against this daemon.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(countersign_bin())
            .args(args)
            .env("COUNTERSIGN_SOCKET_DIR", self.dir.path())
            .output()
            .expect("running countersign")
    }

    /// Starts `cmd` under `label` (through `countersign exec`), stdout and stderr piped.
    #[must_use]
    pub fn labelled(&self, label: &str, cmd: &[&str]) -> Proc {
        self.labelled_with(label, cmd, Stdio::null())
    }

    /// [`Daemon::labelled`] with stdin piped (see `cs-probe wait`, [`Proc::go`]).
    #[must_use]
    pub fn labelled_piped(&self, label: &str, cmd: &[&str]) -> Proc {
        self.labelled_with(label, cmd, Stdio::piped())
    }

    fn labelled_with(&self, label: &str, cmd: &[&str], stdin: Stdio) -> Proc {
        let child = Command::new(countersign_bin())
            .args(["exec", "--label", label, "--"])
            .args(cmd)
            .env("COUNTERSIGN_SOCKET_DIR", self.dir.path())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("countersign exec");
        Proc { child }
    }

    /// Starts `cmd` without a label, with its stdin piped (see `cs-probe wait`), and returns
    /// once it waits on stdin: its exec has finished, so moving it into a labelled cgroup
    /// labels what it does next, never the exec it was still in (the spawn returns at the
    /// exec's point of no return, before the kernel reports the new image).
    #[must_use]
    pub fn unlabelled_waiting(&self, cmd: &[&str]) -> Proc {
        let p = spawn_unlabelled(cmd, Stdio::piped());
        p.wait_reading_stdin();
        p
    }

    /// Starts `cmd` without a label.
    #[must_use]
    pub fn unlabelled(&self, cmd: &[&str]) -> Proc {
        spawn_unlabelled(cmd, Stdio::null())
    }

    /// The held requests.
    #[must_use]
    pub fn list(&self) -> Vec<Value> {
        let out = self.cli(&["requests", "list", "--json"]);
        assert!(
            out.status.success(),
            "requests list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .expect("list JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for a held request matching `pred`.
    pub fn wait_request(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.list().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no held request for {what} within {WAIT:?}; held: {:?}\n{}",
                self.list(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Waits for the held exec of `pid` whose argv contains `needle`.
    pub fn wait_exec(&self, pid: u32, needle: &str) -> Value {
        // Agents labelled otherwise than by `countersign exec` (cgroups, executables) are held
        // after loading in fallback mode.
        let kinds = [
            self.exec_kind(),
            if self.is_lsm() { "exec" } else { "exec-loaded" },
        ];
        self.wait_request(&format!("exec of {needle} by pid {pid}"), |r| {
            r["pid"] == pid
                && kinds.iter().any(|k| r["kind"] == *k)
                && r["argv"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x.as_str().is_some_and(|s| s.contains(needle)))
                })
        })
    }

    /// Makes the daemon's directory reachable by every user and puts a link (or copy) of
    /// `from` there named `name`, for scenarios that run as another user: the checkout the
    /// binaries were built in may not be reachable by them (a private temporary folder).
    #[must_use]
    pub fn for_other_users(&self, from: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(self.dir(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the test directory");
        let to = self.dir().join(name);
        if !to.exists() && std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).expect("copy a binary for other users");
        }
        to
    }

    /// Starts `countersign exec --label L -- CMD` as user `uid` (group `uid` too), with the
    /// countersign binary made reachable for that user.
    #[must_use]
    pub fn labelled_as(&self, uid: u32, label: &str, cmd: &[&str]) -> Proc {
        use std::os::unix::process::CommandExt as _;
        let bin = self.for_other_users(&countersign_bin(), "countersign-for-others");
        let child = Command::new(bin)
            .args(["exec", "--label", label, "--"])
            .args(cmd)
            .env("COUNTERSIGN_SOCKET_DIR", self.dir.path())
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("countersign exec as another user");
        Proc { child }
    }

    /// Runs `countersign exec --label L -- cs-probe ARGS` and approves the probe's own exec,
    /// so that the probe runs labelled; returns it.
    pub fn labelled_probe(&self, label: &str, args: &[&str]) -> Proc {
        let probe = probe_bin();
        let mut cmd = vec![probe.to_str().expect("utf-8 path")];
        cmd.extend_from_slice(args);
        let p = self.labelled(label, &cmd);
        let r = self.wait_exec(p.pid(), args[0]);
        self.decide(&r, "approve");
        p
    }

    /// Decides a request through the CLI; panics if the CLI fails.
    pub fn decide(&self, request: &Value, decision: &str) -> String {
        let id = request["id"].to_string();
        let out = self.cli(&["requests", decision, &id]);
        assert!(
            out.status.success(),
            "requests {decision} {id} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The names of the programs whose links the daemon pinned (what is attached).
    #[must_use]
    pub fn attached_programs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.pin_dir.join("links"))
            .expect("the daemon's pinned links")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Waits for a decision log entry matching `pred`.
    pub fn wait_decision(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.decisions().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no decision for {what} within {WAIT:?}; decisions: {:?}\n{}",
                self.decisions(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// The decision log's entries.
    #[must_use]
    pub fn decisions(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("decisions.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("decision log line is JSON"))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon we started, by its pid.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.proc.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log ----\n{}\n---- end of daemon log ----",
                self.log()
            );
        }
        // A clean stop removed the pins; after a crash (or a failed stop) they go here.
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn spawn_unlabelled(cmd: &[&str], stdin: Stdio) -> Proc {
    let child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    Proc { child }
}

/// A TCP listener on loopback that must (or must not) see a connection.
pub struct Listener {
    inner: std::net::TcpListener,
}

impl Listener {
    #[must_use]
    pub fn new() -> Self {
        Self::on("127.0.0.1")
    }

    /// A listener on another loopback address (all of 127.0.0.0/8 is local).
    #[must_use]
    pub fn on(ip: &str) -> Self {
        let inner = std::net::TcpListener::bind((ip, 0)).expect("bind");
        inner.set_nonblocking(true).expect("nonblocking");
        Self { inner }
    }

    #[must_use]
    pub fn addr(&self) -> String {
        self.inner.local_addr().expect("addr").to_string()
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.inner.local_addr().expect("addr").port()
    }

    /// Whether a connection has arrived (without waiting).
    #[must_use]
    pub fn accepted(&self) -> bool {
        self.inner.accept().is_ok()
    }
}

impl Default for Listener {
    fn default() -> Self {
        Self::new()
    }
}

/// A UDP socket on loopback that must (or must not) receive a datagram.
pub struct UdpReceiver {
    inner: std::net::UdpSocket,
}

impl UdpReceiver {
    /// A receiver on `ip` (`127.0.0.1`, `::1`), on a free port.
    #[must_use]
    pub fn on(ip: &str) -> Self {
        let inner = std::net::UdpSocket::bind((ip, 0)).expect("bind udp");
        inner.set_nonblocking(true).expect("nonblocking");
        Self { inner }
    }

    /// `ip:port` (`[ip]:port` for IPv6).
    #[must_use]
    pub fn addr(&self) -> String {
        self.inner.local_addr().expect("addr").to_string()
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.inner.local_addr().expect("addr").port()
    }

    /// How many datagrams have arrived since the last call (without waiting).
    #[must_use]
    pub fn received(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while self.inner.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

/// The cgroup v2 mount point.
#[must_use]
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup v2 mount")
}

/// Held by every [`TestCgroup`]: scenarios that make cgroups run one at a time. A daemon
/// whose policy matches cgroups marks *every* new cgroup on the host until it classifies it
/// (and a crashed one leaves them marked until it is back), so another scenario's new
/// cgroup would be held by it.
static CGROUP_SCENARIOS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A cgroup made for one test, removed (once empty) on drop. Declare it before the test's
/// daemon, so that the daemon is gone before the next cgroup scenario starts.
pub struct TestCgroup {
    pub path: PathBuf,
    /// As `/proc/PID/cgroup` shows it.
    pub name: String,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl TestCgroup {
    #[must_use]
    pub fn new(name: &str) -> Self {
        // A scenario that failed still frees the next one.
        let serial = CGROUP_SCENARIOS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = format!("/{name}-{}", std::process::id());
        let path = cgroup2_root().join(name.trim_start_matches('/'));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self {
            path,
            name,
            _serial: serial,
        }
    }

    /// A child cgroup (removed with this one).
    #[must_use]
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
        p
    }

    /// Moves `pid` into the cgroup at `dir`.
    pub fn enter(dir: &Path, pid: u32) {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Children first; a cgroup can only be removed once its processes are gone.
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
