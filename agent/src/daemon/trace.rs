//! Holding a loaded-but-not-run exec against stray `SIGCONT`s.
//!
//! An exec held after its image loaded (the fallback, or an approved exec whose image did not
//! match) has no syscall left to restart: a `SIGCONT` from anyone allowed to signal the task
//! would let the image run. So the daemon also puts such a task into a ptrace stop
//! (`PTRACE_SEIZE` while it is in its group stop): a traced, stopped task is not resumed by
//! `SIGCONT`, only by its tracer. The daemon detaches when the exec is approved; deny and kill
//! are `SIGKILL`. If the task cannot be traced (it already has a tracer, or ptrace is
//! restricted), the hold fails closed: the task is killed. So it is if the daemon dies while
//! it holds the task (`PTRACE_O_EXITKILL`): nothing held this way outlives the daemon.
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        ptrace,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use super::enrich;

/// How long a task may take to enter its group stop after the hook sent `SIGSTOP`.
const STOP_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Tracer {
    traced: HashSet<u32>,
}

impl Tracer {
    /// Puts the stopped task `pid` (single-threaded: it has just exec'd) into a ptrace stop.
    pub fn hold(&mut self, pid: u32) -> Result<(), String> {
        if self.traced.contains(&pid) {
            return Ok(());
        }
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            match enrich::stat(pid) {
                Some((_, 'T' | 't', _)) => break,
                // Killed already (the kernel's check of a stop ended early, a decision).
                None | Some((_, 'Z' | 'X', _)) => return Err(format!("pid {pid} exited")),
                Some(_) => {}
            }
            if Instant::now() > deadline {
                return Err(format!("pid {pid} did not stop within {STOP_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let p = Pid::from_raw(pid as i32);
        // Should the daemon die while it holds the task, the kernel kills the task: a tracee
        // left behind would return to its group stop, which any `SIGCONT` ends.
        ptrace::seize(p, ptrace::Options::PTRACE_O_EXITKILL)
            .map_err(|e| format!("ptrace seize of pid {pid}: {e}"))?;
        self.traced.insert(pid);
        // Seizing a task in group stop traps it at once; the interrupt makes sure of it.
        let _ = ptrace::interrupt(p);
        Ok(())
    }

    /// Lets an approved task run: detaches, after the caller sent `SIGCONT`.
    ///
    /// No `SIGCONT` may follow the detach: the task may already be in its next exec, whose
    /// hook sent a `SIGSTOP` that a late `SIGCONT` would cancel (regression: a released
    /// task's next exec "did not stop" and was killed).
    pub fn release(&mut self, pid: u32) {
        if self.traced.remove(&pid) {
            // The task is in a trap stop: detaching resumes it (the group stop ended with the
            // SIGCONT the caller sent).
            self.drain(pid);
            let _ = ptrace::detach(Pid::from_raw(pid as i32), None);
        }
    }

    /// Consumes the stop notifications of every traced task (never resuming it), and forgets
    /// the ones that exited (reaping them, so they do not linger as zombies).
    pub fn reap(&mut self) {
        let pids: Vec<u32> = self.traced.iter().copied().collect();
        for pid in pids {
            if self.drain(pid) {
                self.traced.remove(&pid);
            }
        }
    }

    /// Drains `pid`'s notifications; true if it is gone.
    fn drain(&self, pid: u32) -> bool {
        let p = Pid::from_raw(pid as i32);
        loop {
            match waitpid(p, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) => return false,
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => return true,
                // A stop (a stray SIGCONT shows up as one): stay stopped.
                Ok(_) => {}
            }
        }
    }

    /// Whether any task is traced (its notifications are reaped on the tick).
    #[must_use]
    pub fn is_tracing(&self) -> bool {
        !self.traced.is_empty()
    }

    #[must_use]
    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.contains(&pid)
    }
}
