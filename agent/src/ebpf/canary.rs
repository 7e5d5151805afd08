//! Proof that the hooks run. A BPF LSM program can attach "successfully" and never run (when
//! `bpf` is missing from the boot `lsm=` list), so the daemon starts a canary process under a
//! reserved label: its connect and its exec must each hit a hook and be refused, or the
//! daemon does not claim enforcement.
use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpListener,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use countersign_ebpf as shared;

use super::{Kernel, Mode, parse_event};

/// How long the canary may take.
const CANARY_TIMEOUT: Duration = Duration::from_secs(10);

/// Hidden subcommands the canary process runs.
pub const CANARY_ARG: &str = "internal-canary";
pub const CANARY_EXEC_ARG: &str = "internal-canary-exec";

/// Why the canary failed.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("could not start the canary: {0}")]
    Spawn(std::io::Error),
    #[error("could not label the canary: {0}")]
    Label(String),
    #[error("the canary's connect was not refused by a hook (it reported `{0}`)")]
    Connect(String),
    #[error("the canary's exec was not refused by a hook (it reported `{0}`, status {1})")]
    Exec(String, String),
    #[error("no hook reported the canary's {0}")]
    NoEvent(&'static str),
    #[error("the canary's connect reached the listener")]
    Reached,
    #[error("the canary did not finish within {0:?}")]
    Timeout(Duration),
}

/// Runs the canary against the hooks of `mode`.
pub fn prove(
    kernel: &mut Kernel,
    ring: &mut RingBuf<MapData>,
    mode: Mode,
) -> Result<(), CanaryError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(CanaryError::Spawn)?;
    listener.set_nonblocking(true).map_err(CanaryError::Spawn)?;
    let port = listener.local_addr().map_err(CanaryError::Spawn)?.port();
    let mut child = Command::new("/proc/self/exe")
        .args([CANARY_ARG, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(CanaryError::Spawn)?;
    let pid = child.id();
    let result = run(kernel, ring, &mut child, pid, mode, &listener);
    if result.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    kernel.forget_task(pid);
    result
}

fn run(
    kernel: &mut Kernel,
    ring: &mut RingBuf<MapData>,
    child: &mut std::process::Child,
    pid: u32,
    mode: Mode,
    listener: &TcpListener,
) -> Result<(), CanaryError> {
    // Read the canary's output on a thread, so that every wait below is bounded.
    let stdout = child
        .stdout
        .take()
        .ok_or(CanaryError::Timeout(Duration::ZERO))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        if reader.read_line(&mut line).is_ok() {
            let _ = tx.send(line.clone());
        }
        let _ = reader.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    // Label it only once it runs its own image: labelling during its first exec would make
    // that exec the canary's.
    match rx.recv_timeout(CANARY_TIMEOUT) {
        Ok(line) if line.trim() == "ready" => {}
        Ok(line) => {
            return Err(CanaryError::Connect(format!(
                "unexpected start line {line:?}"
            )));
        }
        Err(_) => return Err(CanaryError::Timeout(CANARY_TIMEOUT)),
    }
    kernel
        .label_task(pid, shared::LABEL_CANARY)
        .map_err(|e| CanaryError::Label(e.to_string()))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or(CanaryError::Timeout(Duration::ZERO))?;
    stdin.write_all(b"go\n").map_err(CanaryError::Spawn)?;
    drop(stdin);

    let deadline = Instant::now() + CANARY_TIMEOUT;
    let (mut saw_connect, mut saw_exec) = (false, false);
    let status = loop {
        drain_canary_events(ring, pid, &mut saw_connect, &mut saw_exec);
        if let Some(status) = child.try_wait().map_err(CanaryError::Spawn)? {
            break status;
        }
        if Instant::now() > deadline {
            return Err(CanaryError::Timeout(CANARY_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Events submitted just before the exit.
    drain_canary_events(ring, pid, &mut saw_connect, &mut saw_exec);
    let report = rx.recv_timeout(CANARY_TIMEOUT).unwrap_or_default();
    if listener.accept().is_ok() {
        return Err(CanaryError::Reached);
    }
    if !report.contains("connect=EPERM") {
        return Err(CanaryError::Connect(report.trim().to_owned()));
    }
    let exec_refused = match mode {
        Mode::Lsm => report.contains("exec=EPERM") && status.success(),
        // The fallback kills the new image before its first instruction.
        Mode::Fallback => status.signal() == Some(libc::SIGKILL) && !report.contains("exec=RAN"),
    };
    if !exec_refused {
        return Err(CanaryError::Exec(
            report.trim().to_owned(),
            status.to_string(),
        ));
    }
    if !saw_connect {
        return Err(CanaryError::NoEvent("connect"));
    }
    if !saw_exec {
        return Err(CanaryError::NoEvent("exec"));
    }
    Ok(())
}

/// Notes which canary events of `pid` the ring buffer holds.
fn drain_canary_events(ring: &mut RingBuf<MapData>, pid: u32, connect: &mut bool, exec: &mut bool) {
    while let Some(item) = ring.next() {
        if let Some(ev) = parse_event(&item).filter(|ev| ev.tgid == pid) {
            *connect |= ev.kind == shared::KIND_CANARY_CONNECT;
            *exec |= ev.kind == shared::KIND_CANARY_EXEC;
        }
    }
}

/// The canary process: waits for "go", then tries a connect and an exec; each must be refused.
pub fn canary_main(port: u16) -> i32 {
    println!("ready");
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() || line.trim() != "go" {
        return 2;
    }
    let mut out = std::io::stdout();
    match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let _ = write!(out, "connect=EPERM ");
        }
        Err(e) => {
            let _ = write!(out, "connect={e} ");
        }
        Ok(_) => {
            let _ = write!(out, "connect=CONNECTED ");
        }
    }
    let _ = out.flush();
    let err = Command::new("/proc/self/exe").arg(CANARY_EXEC_ARG).exec();
    if err.raw_os_error() == Some(libc::EPERM) {
        let _ = write!(out, "exec=EPERM");
        let _ = out.flush();
        0
    } else {
        let _ = write!(out, "exec={err}");
        let _ = out.flush();
        3
    }
}

/// The image the canary tries to exec: reaching it means the exec was not refused.
pub fn canary_exec_main() -> i32 {
    print!("exec=RAN");
    let _ = std::io::stdout().flush();
    3
}
