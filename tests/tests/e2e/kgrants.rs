//! Grants in the kernel: after a binary grant and a destination grant, the actions they cover
//! are allowed by the kernel itself — the daemon sees no event (its hold counter does not
//! move, nothing is logged or escalated) while the grant counter grows — and once the grant is
//! revoked or has expired the same action is held again.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use countersign_tests::{
    Daemon, Listener, WAIT,
    remote::{Approver, write_coder_policy},
};
use serde_json::Value;

use super::{marker, probe};

/// Label `coder`: every exec of the probe and every connect to `port` on loopback go to group
/// `dev`, which may grant the binary (10 minutes) and the destination (`dest_for`).
fn grant_policy(dir: &Path, port: u16, dest_for: &str) -> String {
    write_coder_policy(
        dir,
        &format!(
            "    rules:
      - name: run-the-probe
        exec: {{binary: [{probe}]}}
        outcome: escalate
        escalate: {{approvers: [dev], timeout: 60s, on_timeout: deny, grants: [{{scope: binary, for: 10m}}]}}
      - name: call-out
        connect: {{cidr: [127.0.0.1/32], ports: [{port}]}}
        outcome: escalate
        escalate: {{approvers: [dev], timeout: 60s, on_timeout: deny, grants: [{{scope: destination, for: {dest_for}}}]}}
",
            probe = probe()
        ),
    )
}

fn start_daemon(approver: &Approver, dir: &Path, policy: &str) -> Daemon {
    approver.start_daemon(&approver.daemon_config(dir), policy)
}

/// The host's grants (`grants list --json`).
fn grants(d: &Daemon) -> Vec<Value> {
    let out = d.cli(&["grants", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("grants JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until grant `id` is in force and answered by the kernel.
fn wait_in_kernel(d: &Daemon, id: &str) {
    let deadline = Instant::now() + WAIT;
    while !grants(d)
        .iter()
        .any(|g| g["id"] == id && g["in_kernel"] == true)
    {
        assert!(
            Instant::now() < deadline,
            "grant {id} not in the kernel: {:?}\n{}",
            grants(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Approves the pending request whose argv shows `needle`, giving `grant`; its grant id.
fn approve_with_grant(approver: &Approver, needle: &str, grant: &str) -> String {
    let r = approver.wait_request(needle);
    let id = r["id"].to_string();
    let out = approver.cli("bob", &["approve", &id, "--grant", grant]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("decided: approve"),
        "{out:?}"
    );
    format!("g-{id}")
}

/// (holds, allowed by grants in the kernel, decision log lines).
fn counters(d: &Daemon) -> (u64, u64, usize) {
    let s = d.status();
    (
        s["holds"].as_u64().unwrap(),
        s["grant_allowed"].as_u64().unwrap(),
        d.decisions().len(),
    )
}

#[test]
fn binary_and_destination_grants_are_answered_in_the_kernel_until_revoked_or_expired() {
    let approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::new();
    // Long enough for the slowest VM to use it once, short enough to wait for.
    let dest_for = 12;
    let policy = grant_policy(dir.path(), listener.port(), &format!("{dest_for}s"));
    let d = start_daemon(&approver, dir.path(), &policy);

    // A human approves the first exec, granting the binary.
    let m1 = marker(&d, "first");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m1]);
    let binary = approve_with_grant(&approver, &m1, "binary");
    assert!(p.wait(WAIT).success(), "{}", d.log());
    wait_in_kernel(&d, &binary);

    // The next exec of that binary: allowed by the kernel, the daemon sees nothing.
    let (holds, granted, logged) = counters(&d);
    let m2 = marker(&d, "second");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m2]);
    assert!(p.wait(WAIT).success(), "{}", d.log());
    assert!(Path::new(&m2).exists());
    let (holds2, granted2, logged2) = counters(&d);
    assert_eq!(holds2, holds, "the exec was not stopped:\n{}", d.log());
    assert!(granted2 > granted, "the kernel counted the grant");
    assert_eq!(
        logged2,
        logged,
        "nothing reached the daemon: {:?}",
        d.decisions()
    );
    let human = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("by grants"), "{human}");

    // A connect: held (the probe's own exec is granted), a human grants the destination.
    let mut p = d.labelled("coder", &[&probe(), "connect", &listener.addr()]);
    let destination = approve_with_grant(&approver, &listener.addr(), "destination");
    assert!(p.wait(WAIT).success(), "{}", d.log());
    assert_eq!(p.first_line().trim(), "connected");
    assert!(listener.accepted());
    wait_in_kernel(&d, &destination);
    let listed = String::from_utf8_lossy(&d.cli(&["grants", "list"]).stdout).into_owned();
    assert!(listed.contains("[kernel]"), "{listed}");

    // The same connect again: the exec and the connect never leave the kernel.
    let (holds, granted, logged) = counters(&d);
    let mut p = d.labelled("coder", &[&probe(), "connect", &listener.addr()]);
    assert!(p.wait(WAIT).success(), "{}", d.log());
    assert_eq!(p.first_line().trim(), "connected");
    assert!(listener.accepted());
    let (holds2, granted2, logged2) = counters(&d);
    assert_eq!(holds2, holds, "nothing was stopped:\n{}", d.log());
    assert!(granted2 >= granted + 2, "exec and connect by grants");
    assert_eq!(logged2, logged, "{:?}", d.decisions());

    // Expired: the kernel entry ends with it, and the connect waits for a human again.
    let deadline = Instant::now() + Duration::from_secs(dest_for + 30);
    while grants(&d).iter().any(|g| g["id"] == destination.as_str()) {
        assert!(Instant::now() < deadline, "the grant did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (holds, _, _) = counters(&d);
    let mut p = d.labelled("coder", &[&probe(), "connect", &listener.addr()]);
    let r = approver.wait_request(&listener.addr());
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "held again"
    );
    assert!(!listener.accepted(), "nothing was sent while held");
    assert!(counters(&d).0 > holds);
    let out = approver.cli("bob", &["deny", &r["id"].to_string()]);
    assert!(out.status.success(), "{out:?}");
    let _ = p.wait(WAIT);

    // Revoked on the host: the next exec of the binary is held again at once.
    let out = d.cli(&["grants", "revoke", &binary]);
    assert!(out.status.success(), "{out:?}");
    assert!(grants(&d).is_empty(), "{:?}", grants(&d));
    let (holds, granted, _) = counters(&d);
    let m3 = marker(&d, "third");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m3]);
    let r = approver.wait_request(&m3);
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "held again"
    );
    assert!(!Path::new(&m3).exists());
    let (holds2, granted2, _) = counters(&d);
    assert!(holds2 > holds);
    assert_eq!(granted2, granted, "no grant allowed it");
    let out = approver.cli("bob", &["deny", &r["id"].to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert!(!p.wait(WAIT).success());
    assert!(!Path::new(&m3).exists());
}

/// A deny rule that could match what a grant covers keeps the grant out of the kernel: the
/// covered action still reaches the daemon (which applies the grant), and a policy reload
/// that adds such a rule takes the entry out.
#[test]
fn a_grant_a_refusal_could_overlap_stays_with_the_daemon() {
    let approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::new();
    let policy = grant_policy(dir.path(), listener.port(), "10m");
    let d = start_daemon(&approver, dir.path(), &policy);
    let m1 = marker(&d, "first");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m1]);
    let binary = approve_with_grant(&approver, &m1, "binary");
    assert!(p.wait(WAIT).success(), "{}", d.log());
    wait_in_kernel(&d, &binary);

    // A refusal of the probe with some arguments: the kernel cannot see arguments.
    let text = std::fs::read_to_string(&policy).unwrap();
    let refusal = format!(
        "    rules:\n      - name: no-rm\n        exec: {{binary: [{}], args: [\"rm *\"]}}\n        outcome: deny\n",
        probe()
    );
    std::fs::write(&policy, text.replacen("    rules:\n", &refusal, 1)).unwrap();
    let deadline = Instant::now() + WAIT;
    while grants(&d)
        .iter()
        .any(|g| g["id"] == binary.as_str() && g["in_kernel"] == true)
    {
        assert!(
            Instant::now() < deadline,
            "the reload kept the entry:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still granted, now by the daemon: held for a moment and allowed without a human.
    let (holds, granted, _) = counters(&d);
    let m2 = marker(&d, "second");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m2]);
    assert!(p.wait(WAIT).success(), "{}", d.log());
    assert!(Path::new(&m2).exists());
    let (holds2, granted2, _) = counters(&d);
    assert!(holds2 > holds, "the daemon saw it");
    assert_eq!(granted2, granted);
    assert!(
        d.decisions().iter().any(|e| e["decision"] == "auto-allowed"
            && e["by"]
                .as_str()
                .is_some_and(|b| b.starts_with(&format!("grant {binary}")))),
        "{:?}",
        d.decisions()
    );
}

/// A destination grant is bound to the socket type: a UDP connect to the address and port a
/// TCP grant covers is not let through. LSM mode holds it for a human; in fallback mode the
/// program that sees the type cannot hold, so it is refused (and the daemon says why).
#[test]
fn a_tcp_destination_grant_does_not_cover_udp() {
    let approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::new();
    let policy = write_coder_policy(
        dir.path(),
        &format!(
            "    rules:
      - {{exec: {{binary: [{probe}]}}, outcome: allow}}
      - name: call-out
        connect: {{cidr: [127.0.0.1/32], ports: [{port}]}}
        outcome: escalate
        escalate: {{approvers: [dev], timeout: 60s, on_timeout: deny, grants: [{{scope: destination, for: 10m}}]}}
",
            probe = probe(),
            port = listener.port()
        ),
    );
    let d = start_daemon(&approver, dir.path(), &policy);
    let mut p = d.labelled("coder", &[&probe(), "connect", &listener.addr()]);
    let destination = approve_with_grant(&approver, &listener.addr(), "destination");
    assert!(p.wait(WAIT).success(), "{}", d.log());
    wait_in_kernel(&d, &destination);
    let (holds, granted, _) = counters(&d);
    let mut p = d.labelled("coder", &[&probe(), "connect", &listener.addr()]);
    assert!(p.wait(WAIT).success(), "{}", d.log());
    let (holds2, granted2, _) = counters(&d);
    assert_eq!(holds2, holds, "{}", d.log());
    assert!(granted2 > granted);

    let mut p = d.labelled("coder", &[&probe(), "udp-connect", &listener.addr()]);
    if d.is_lsm() {
        let r = approver.wait_request("udp-connect");
        assert!(p.still_running_after(Duration::from_millis(300)), "held");
        let out = approver.cli("bob", &["deny", &r["id"].to_string()]);
        assert!(out.status.success(), "{out:?}");
    } else {
        let deadline = Instant::now() + WAIT;
        while !d
            .log()
            .contains("was not covered by it once its socket type was known")
        {
            assert!(Instant::now() < deadline, "{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(counters(&d).0, holds2, "refused, not held");
    }
    assert!(!p.wait(WAIT).success());
    assert_eq!(p.first_line().trim(), "error 1", "EPERM");
}
