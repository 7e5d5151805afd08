//! Running external programs with a deadline.
//!
//! Everything xtask drives (apt, cargo, rustup, qemu) can hang on a network or a stuck
//! guest, so no child process is ever waited on without a timeout. A child is wrapped in a
//! [`ChildGuard`] as soon as it is spawned: if anything goes wrong before it has been reaped
//! (timeout, error, panic), the guard kills that one process by its own pid.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How often a running child is polled for exit.
const POLL: Duration = Duration::from_millis(50);

/// Owns a spawned child until it has been reaped; kills it (by its pid) when dropped early.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Mutable access to the child (for taking its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// Returns the exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let child = self.child_mut();
        let pid = child.id();
        let status = child
            .try_wait()
            .with_context(|| format!("waiting for process {pid}"))?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Waits until `deadline` for the child to exit. `None` means it is still running.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Kills the child (SIGKILL to its pid) and reaps it. Does nothing if already reaped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The child may have exited on its own in the meantime; both calls then fail
            // harmlessly.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A printable form of a command line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Reads a pipe to its end on a helper thread.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd` with stdout and stderr captured, killing it after `timeout`. `what` names the
/// step in error messages. A non-zero exit is not an error here (see [`run_ok`]).
pub fn run_captured(cmd: &mut Command, timeout: Duration, what: &str) -> Result<Output> {
    let line = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .with_context(|| format!("{what}: could not start `{line}`"))?;
    let mut guard = ChildGuard::new(child);
    let out = drain(guard.child_mut().stdout.take());
    let err = drain(guard.child_mut().stderr.take());
    let status = guard.wait_until(Instant::now() + timeout)?;
    let Some(status) = status else {
        guard.kill();
        bail!(
            "{what}: `{line}` did not finish within {} s and was killed",
            timeout.as_secs()
        );
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Like [`run_captured`] but a non-zero exit is an error (carrying the tail of stderr);
/// returns stdout as text.
pub fn run_ok(cmd: &mut Command, timeout: Duration, what: &str) -> Result<String> {
    let line = describe(cmd);
    let output = run_captured(cmd, timeout, what)?;
    if !output.status.success() {
        bail!(
            "{what}: `{line}` failed ({}): {}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), 20).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd` with the terminal's stdout/stderr (for long steps whose progress a person
/// wants to see), killing it after `timeout`. A non-zero exit is an error.
pub fn run_streaming(cmd: &mut Command, timeout: Duration, what: &str) -> Result<()> {
    let line = describe(cmd);
    cmd.stdin(Stdio::null());
    let child = cmd
        .spawn()
        .with_context(|| format!("{what}: could not start `{line}`"))?;
    let mut guard = ChildGuard::new(child);
    match guard.wait_until(Instant::now() + timeout)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("{what}: `{line}` failed ({status})"),
        None => {
            guard.kill();
            bail!(
                "{what}: `{line}` did not finish within {} s and was killed",
                timeout.as_secs()
            )
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
