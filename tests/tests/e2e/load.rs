//! Under load: held actions arriving faster than the daemon takes them in.
use std::{
    io::BufRead as _,
    time::{Duration, Instant},
};

use countersign_tests::{Daemon, Listener};
use serde_json::Value;

/// Held requests at once in the burst scenario.
const BOUND: usize = 40;
/// Processes in the burst: more than the kernel's event ring holds (its smallest size, 16 KiB
/// with 4 KiB pages, which `BOUND` gives, holds about 78 events).
const BURST: usize = 150;
/// How long the daemon may take to take the whole burst in (an emulated VM is slow).
const TAKE_IN: Duration = Duration::from_secs(240);

/// Stops a process until dropped (also when the test fails): the daemon, so that the ring
/// fills while it does not read.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        // SAFETY: signalling the daemon this test started, by its pid.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Whether `pid` is stopped (a signal stop or a tracer's).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
    })
}

/// The daemon's refusals of burst connects for want of room, and the held requests.
fn taken_in(d: &Daemon) -> (Vec<Value>, Vec<Value>) {
    let refused = d
        .decisions()
        .into_iter()
        .filter(|e| {
            e["decision"] == "denied"
                && e["by"]
                    .as_str()
                    .is_some_and(|b| b.contains("max_held_requests"))
        })
        .collect();
    (refused, d.list())
}

/// A burst of held connects larger than the kernel's event ring, made while the daemon does
/// not read (so that the ring is full): every connect becomes a held request (up to
/// `max_held_requests`) or a refusal recorded with its reason — none is refused unseen, none
/// is lost, none gets through, and those the ring had no room for are described as fully as
/// the others.
#[test]
fn a_burst_past_the_ring_loses_nothing() {
    let d = Daemon::start_with(&[
        "--request-timeout",
        "600",
        "--max-held-requests",
        &BOUND.to_string(),
    ]);
    let l = Listener::new();
    let mut p = d.labelled_piped(
        "coder",
        &[&super::probe(), "burst", &BURST.to_string(), &l.addr()],
    );
    let r = d.wait_exec(p.pid(), "burst");
    d.decide(&r, "approve");
    let mut out = std::io::BufReader::new(p.child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the burst's ready line");
    let pids: Vec<u32> = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("not a ready line: {line:?}"))
        .split(' ')
        .map(|s| s.parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), BURST);

    let daemon = Stopped::new(d.pid());
    p.go();
    // Every connect is held in the kernel, with nobody reading the ring.
    let deadline = Instant::now() + TAKE_IN;
    while !pids.iter().all(|pid| stopped(*pid)) {
        assert!(
            Instant::now() < deadline,
            "the burst's connects were not all held within {TAKE_IN:?}: {} of {BURST}",
            pids.iter().filter(|pid| stopped(**pid)).count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(daemon);

    // The daemon takes them all in: BOUND held, the rest refused with the reason recorded.
    let deadline = Instant::now() + TAKE_IN;
    let (refused, held) = loop {
        let (refused, held) = taken_in(&d);
        if refused.len() + held.len() >= BURST {
            break (refused, held);
        }
        assert!(
            Instant::now() < deadline,
            "only {} refused and {} held of {BURST} within {TAKE_IN:?}\n{}",
            refused.len(),
            held.len(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(held.len(), BOUND, "held up to max_held_requests");
    assert_eq!(
        refused.len(),
        BURST - BOUND,
        "the rest refused, each recorded"
    );
    let requests = held
        .iter()
        .chain(refused.iter().map(|e| &e["request"]))
        .collect::<Vec<_>>();
    for r in &requests {
        assert_eq!(r["kind"], "connect", "{r}");
        assert_eq!(r["destination"], l.addr(), "described in full: {r}");
        let pid = r["pid"].as_u64().expect("a pid") as u32;
        assert!(pids.contains(&pid), "one of the burst's: {r}");
    }
    let mut seen: Vec<u64> = requests
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), BURST, "each connect once");
    // The ring overflowed, and what it had no room for came from the kernel's task table.
    let status = d.status();
    let deferred = status["events_deferred"].as_u64().expect("events_deferred");
    assert!(
        deferred > 0,
        "the burst did not overflow the ring: {status}"
    );
    let noted = requests
        .iter()
        .filter(|r| {
            r["note"]
                .as_str()
                .is_some_and(|n| n.contains("event ring was full"))
        })
        .count();
    assert_eq!(noted as u64, deferred, "every deferred one taken in");
    assert_eq!(status["refused_over_bound"], BURST - BOUND, "{status}");
    assert_eq!(status["events_dropped"], 0, "{status}");

    // The held ones are denied; nothing reached the listener.
    for r in &held {
        d.decide(r, "deny");
    }
    p.wait(TAKE_IN);
    line.clear();
    out.read_line(&mut line).expect("the burst's tally");
    assert_eq!(
        line.trim(),
        format!("burst connected 0 refused {}:{BURST}", super::EPERM),
        "every connect refused with EPERM"
    );
    assert!(!l.accepted(), "nothing reached the listener");
}

/// Threads of one process held at once, each decided by the daemon (a `deny` rule): every
/// connect meets its own decision (`EPERM`). A thread whose stop was merged with another
/// thread's, then discarded by the `SIGCONT` that released a third, once returned the
/// kernel's internal `ERESTARTNOINTR` (513) to its program instead of waiting.
#[test]
fn threads_held_at_once_each_meet_their_decision() {
    const THREADS: usize = 8;
    const EACH: usize = 40;
    let l = Listener::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("threads.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: agent
    default: {{outcome: escalate}}
    rules:
      - name: the-probe
        exec: {{binary: [{probe}]}}
        outcome: allow
      - name: not-there
        connect: {{cidr: [127.0.0.1/32], ports: [{port}]}}
        outcome: deny
",
            probe = super::probe(),
            port = l.port(),
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--policy", policy.to_str().unwrap()]);
    let mut p = d.labelled(
        "agent",
        &[
            &super::probe(),
            "threads-connect",
            &THREADS.to_string(),
            &EACH.to_string(),
            &l.addr(),
        ],
    );
    assert!(p.wait(TAKE_IN).success());
    assert_eq!(
        p.stdout().trim(),
        format!(
            "threads connected 0 errors {}:{}",
            super::EPERM,
            THREADS * EACH
        ),
        "each connect refused by its decision\n{}",
        d.log()
    );
    assert!(!l.accepted(), "nothing reached the listener");
    let denied = d
        .decisions()
        .iter()
        .filter(|e| e["decision"] == "auto-denied")
        .count();
    assert!(
        denied >= THREADS * EACH,
        "each one decided and recorded: {denied}"
    );
}
