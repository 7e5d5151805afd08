//! Holding an action held after it was made against stray `SIGCONT`s.
//!
//! An exec held after its image loaded (the fallback, or an approved exec whose image did not
//! match), and in the fallback a listen held once its socket listens, have no syscall left to
//! restart: a `SIGCONT` from anyone allowed to signal the process would let it run (the image,
//! or an `accept`). So the daemon also puts every thread of such a process into a ptrace stop
//! (`PTRACE_SEIZE` while it is in its group stop): a traced, stopped task is not resumed by
//! `SIGCONT`, only by its tracer. The daemon detaches when the action is approved; deny and
//! kill are `SIGKILL`. If the task cannot be traced (it already has a tracer, or ptrace is
//! restricted), the hold fails closed: the task is killed. So it is if the daemon dies while
//! it holds the task (`PTRACE_O_EXITKILL`): nothing held this way outlives the daemon.
use std::{
    collections::HashMap,
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
    /// Traced processes and their threads.
    traced: HashMap<u32, Vec<u32>>,
}

impl Tracer {
    /// Puts every thread of the stopped process `pid` into a ptrace stop (one thread after an
    /// exec; any number after a listen held once it was made).
    pub fn hold(&mut self, pid: u32) -> Result<(), String> {
        if self.traced.contains_key(&pid) {
            return Ok(());
        }
        let deadline = Instant::now() + STOP_WAIT;
        let mut seized: Vec<u32> = Vec::new();
        let result = loop {
            // A stopped process makes no threads; one not stopped yet may: the list is read
            // again until every thread in it is seized.
            let threads = threads(pid);
            if threads.is_empty() {
                break Err(format!("pid {pid} exited"));
            }
            let fresh: Vec<u32> = threads
                .into_iter()
                .filter(|t| !seized.contains(t))
                .collect();
            if fresh.is_empty() {
                break Ok(());
            }
            if let Err(e) = fresh
                .iter()
                .try_for_each(|&tid| seize_stopped(tid, deadline).map(|()| seized.push(tid)))
            {
                break Err(e);
            }
        };
        // Kept even on failure: the caller kills the process, and the tick reaps its threads.
        self.traced.insert(pid, seized);
        result
    }

    /// Lets an approved task run: detaches, after the caller sent `SIGCONT`.
    ///
    /// No `SIGCONT` may follow the detach: the task may already be in its next exec, whose
    /// hook sent a `SIGSTOP` that a late `SIGCONT` would cancel (regression: a released
    /// task's next exec "did not stop" and was killed).
    pub fn release(&mut self, pid: u32) {
        for tid in self.traced.remove(&pid).unwrap_or_default() {
            // The thread is in a trap stop: detaching resumes it (the group stop ended with
            // the SIGCONT the caller sent).
            drain(tid);
            let _ = ptrace::detach(Pid::from_raw(tid as i32), None);
        }
    }

    /// Consumes the stop notifications of every traced task (never resuming it), and forgets
    /// the ones that exited (reaping them, so they do not linger as zombies).
    pub fn reap(&mut self) {
        self.traced.retain(|_, tids| {
            tids.retain(|&tid| !drain(tid));
            !tids.is_empty()
        });
    }

    /// Whether any task is traced (its notifications are reaped on the tick).
    #[must_use]
    pub fn is_tracing(&self) -> bool {
        !self.traced.is_empty()
    }

    #[must_use]
    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.contains_key(&pid)
    }
}

/// The threads of process `pid` (empty when it is gone).
fn threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or_else(
        |_| Vec::new(),
        |dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        },
    )
}

/// Waits (until `deadline`) for thread `tid` to be in its group stop, then seizes it.
fn seize_stopped(tid: u32, deadline: Instant) -> Result<(), String> {
    loop {
        match enrich::stat(tid) {
            Some((_, 'T' | 't', _)) => break,
            // Killed already (the kernel's check of a stop ended early, a decision).
            None | Some((_, 'Z' | 'X', _)) => return Err(format!("thread {tid} exited")),
            Some(_) => {}
        }
        if Instant::now() > deadline {
            return Err(format!("thread {tid} did not stop within {STOP_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let p = Pid::from_raw(tid as i32);
    // Should the daemon die while it holds the task, the kernel kills the task: a tracee
    // left behind would return to its group stop, which any `SIGCONT` ends.
    ptrace::seize(p, ptrace::Options::PTRACE_O_EXITKILL)
        .map_err(|e| format!("ptrace seize of thread {tid}: {e}"))?;
    // Seizing a task in group stop traps it at once; the interrupt makes sure of it.
    let _ = ptrace::interrupt(p);
    Ok(())
}

/// Drains thread `tid`'s notifications (never resuming it); true if it is gone.
fn drain(tid: u32) -> bool {
    let p = Pid::from_raw(tid as i32);
    loop {
        match waitpid(p, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => return true,
            // A stop (a stray SIGCONT shows up as one): stay stopped.
            Ok(_) => {}
        }
    }
}
