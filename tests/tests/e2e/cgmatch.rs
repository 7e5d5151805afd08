//! Labels by cgroup glob and systemd unit (`match: cgroup` / `systemd_unit`): cgroups created
//! after the daemon started, cgroups that match nothing, a reload that changes the glob, and
//! tasks held with the reserved unclassified label while no daemon ran.
use std::{os::unix::process::ExitStatusExt as _, path::Path, time::Duration};

use countersign_tests::{Daemon, Listener, Proc, TestCgroup, WAIT};

use super::{EPERM, probe};

/// A policy labelling `{cg}/agents-*` as `agents` and the unit `unit` as `svc`; both escalate.
fn write_policy(file: &Path, glob: &str, unit: &str) {
    std::fs::write(
        file,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: agents
    match: {{cgroup: ['{glob}']}}
    default: {{outcome: escalate}}
  - name: svc
    match: {{systemd_unit: [{unit}]}}
    default: {{outcome: escalate}}
"
        ),
    )
    .unwrap();
}

/// A unit name no other test or host service uses.
fn unit_name() -> String {
    format!("cs-e2e-{}.service", std::process::id())
}

fn start(policy: &Path) -> Daemon {
    Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ])
}

/// `cs-probe wait ARGS`, moved into the cgroup at `dir` before it acts.
fn probe_in(d: &Daemon, dir: &Path, args: &[&str]) -> Proc {
    let probe = probe();
    let mut cmd = vec![probe.as_str(), "wait"];
    cmd.extend_from_slice(args);
    let mut p = d.unlabelled_waiting(&cmd);
    TestCgroup::enter(dir, p.pid());
    p.go();
    p
}

/// Nothing was recorded or held for `pid`.
fn never_seen(d: &Daemon, pid: u32) {
    assert!(
        !d.decisions().iter().any(|e| e["pid"] == pid),
        "recorded: {:?}",
        d.decisions()
    );
    assert!(!d.list().iter().any(|r| r["pid"] == pid), "{:?}", d.list());
}

/// A glob labels a cgroup created after the daemon started: the first exec of a process in it
/// is held under the label and an approval runs it; a systemd-unit match (a cgroup named like
/// the unit under a test slice) likewise, and a denial refuses it; a new cgroup that matches
/// nothing runs its process without a hold or a record.
#[test]
fn cgroup_glob_and_unit_label_cgroups_created_after_start() {
    let cg = TestCgroup::new("countersign-glob");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    let unit = unit_name();
    write_policy(&policy, &format!("{}/agents-*", cg.name), &unit);
    let d = start(&policy);

    // The glob.
    let job = cg.child("agents-1");
    let marker = d.dir().join("ran");
    let marker = marker.to_str().unwrap();
    let mut p = probe_in(&d, &job, &["exec", &probe(), "touch", marker]);
    let r = d.wait_exec(p.pid(), "touch");
    assert_eq!(r["label"], "agents", "{r}");
    assert!(!Path::new(marker).exists());
    d.decide(&r, "approve");
    assert!(p.wait(WAIT).success(), "{}", p.stderr());
    assert!(Path::new(marker).exists(), "the approved exec ran");

    // The systemd unit, in a cgroup below a test slice.
    let slice = cg.child("test.slice");
    let svc = slice.join(&unit);
    std::fs::create_dir(&svc).unwrap();
    let mut q = probe_in(&d, &svc, &["exec", &probe(), "touch", marker]);
    let r = d.wait_exec(q.pid(), "touch");
    assert_eq!(r["label"], "svc", "{r}");
    d.decide(&r, "deny");
    let status = q.wait(WAIT);
    if d.is_lsm() {
        assert_eq!(q.stdout().trim(), format!("exec-error {EPERM}"));
        assert_eq!(status.code(), Some(126));
    } else {
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    // A new cgroup that matches nothing (a sibling, and one holding the unit's name as a
    // substring only): its process connects without a hold and is not recorded.
    let l = Listener::new();
    for name in ["other", &format!("x{unit}")] {
        let other = cg.child(name);
        let mut o = probe_in(&d, &other, &["connect", &l.addr()]);
        assert!(o.wait(WAIT).success(), "{}", o.stderr());
        assert_eq!(o.stdout().trim(), "connected");
        never_seen(&d, o.pid());
    }
    assert!(l.accepted());
    let _ = std::fs::remove_dir(&svc);
}

/// A reload that changes the glob changes the classification of cgroups that already exist:
/// the cgroup matched before runs freely, the one matched now is held.
#[test]
fn reload_changing_the_glob_reclassifies_existing_cgroups() {
    let cg = TestCgroup::new("countersign-reglob");
    let a = cg.child("a-1");
    let b = cg.child("b-1");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    let unit = unit_name();
    write_policy(&policy, &format!("{}/a-*", cg.name), &unit);
    let d = start(&policy);
    let l = Listener::new();

    let mut p = probe_in(&d, &a, &["connect", &l.addr()]);
    let r = d.wait_request("connect from a-1", |r| {
        r["pid"] == p.pid() && r["kind"] == "connect"
    });
    assert_eq!(r["label"], "agents");
    d.decide(&r, "deny");
    assert_eq!(p.wait(WAIT).code(), Some(1));
    let mut q = probe_in(&d, &b, &["connect", &l.addr()]);
    assert!(q.wait(WAIT).success(), "{}", q.stderr());
    never_seen(&d, q.pid());

    write_policy(&policy, &format!("{}/b-*", cg.name), &unit);
    let pid = d.status()["daemon_pid"].as_i64().unwrap() as i32;
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + WAIT;
    while d
        .log()
        .matches("cgroup labels by glob and systemd unit installed")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not reloaded:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut p = probe_in(&d, &a, &["connect", &l.addr()]);
    assert!(p.wait(WAIT).success(), "{}", p.stderr());
    assert_eq!(p.stdout().trim(), "connected");
    never_seen(&d, p.pid());
    let mut q = probe_in(&d, &b, &["connect", &l.addr()]);
    let r = d.wait_request("connect from b-1", |r| {
        r["pid"] == q.pid() && r["kind"] == "connect"
    });
    assert_eq!(r["label"], "agents");
    d.decide(&r, "approve");
    assert!(q.wait(WAIT).success());
    assert_eq!(q.stdout().trim(), "connected");
}

/// With no daemon running (killed), new cgroups are still marked unclassified by the kernel
/// and their tasks are held with the reserved label; the restarted daemon classifies them:
/// the matching one's request is routed under its label, the other task is let go unrecorded.
#[test]
fn tasks_of_unclassified_cgroups_wait_for_a_restarted_daemon() {
    let cg = TestCgroup::new("countersign-uncl");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    let unit = unit_name();
    write_policy(&policy, &format!("{}/agents-*", cg.name), &unit);
    let mut d = start(&policy);
    d.crash();

    let job = cg.child("agents-2");
    let other = cg.child("other-2");
    let l = Listener::new();
    let mut p = probe_in(&d, &job, &["connect", &l.addr()]);
    let mut o = probe_in(&d, &other, &["connect", &l.addr()]);
    assert!(p.still_running_after(Duration::from_millis(500)));
    assert!(o.still_running_after(Duration::from_millis(10)));
    assert!(
        !l.accepted(),
        "nothing connected while no daemon classified the cgroups"
    );

    d.restart();
    assert!(o.wait(WAIT).success(), "{}\n{}", o.stderr(), d.log());
    assert_eq!(o.stdout().trim(), "connected");
    never_seen(&d, o.pid());
    let r = d.wait_request("connect from agents-2", |r| {
        r["pid"] == p.pid() && r["kind"] == "connect"
    });
    assert_eq!(r["label"], "agents");
    d.decide(&r, "deny");
    assert_eq!(p.wait(WAIT).code(), Some(1));
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
}
