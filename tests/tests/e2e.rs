//! End-to-end scenarios: the real daemon, real hooks, real processes. Run by `cargo xtask
//! test` natively (fallback mode) and in VMs booting kernels with BPF LSM (LSM mode).
use std::time::Duration;

use countersign_tests::{Daemon, Listener, TestCgroup, WAIT, probe_bin};

#[path = "e2e/approver.rs"]
mod approver;
#[path = "e2e/cgmatch.rs"]
mod cgmatch;
#[path = "e2e/escape.rs"]
mod escape;
#[path = "e2e/kgrants.rs"]
mod kgrants;
#[path = "e2e/load.rs"]
mod load;

const EPERM: i32 = 1;

fn probe() -> String {
    probe_bin().to_str().expect("utf-8 path").to_owned()
}

fn marker(d: &Daemon, name: &str) -> String {
    d.dir().join(name).to_str().expect("utf-8").to_owned()
}

/// Held, approved: the program runs.
#[test]
fn labelled_exec_held_then_approved_runs() {
    let d = Daemon::start();
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    assert_eq!(r["label"], "coder");
    assert!(
        r["argv"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == m.as_str()),
        "argv shown in full: {r}"
    );
    assert!(
        r["binary"].as_str().unwrap().ends_with("cs-probe"),
        "binary shown: {r}"
    );
    assert!(
        r["cwd"].is_string() && r["parents"].is_array(),
        "context shown: {r}"
    );
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "held exec must not finish"
    );
    assert!(!std::path::Path::new(&m).exists(), "nothing ran while held");
    d.decide(&r, "approve");
    assert!(p.wait(countersign_tests::WAIT).success());
    assert!(
        std::path::Path::new(&m).exists(),
        "the approved program ran"
    );
    let log = d.decisions();
    let e = log
        .iter()
        .find(|e| e["request"]["id"] == r["id"])
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(e["decision"], "approved");
    assert_eq!(e["applied"], "released");
    assert!(e["by"].as_str().unwrap().starts_with("cli uid=0"), "{e}");
    if d.exec_kind() == "exec" {
        // The kernel compared what loaded with the approval, and said so.
        let verified = d.wait_decision("the exec-verified outcome", |x| {
            x["request"]["id"] == r["id"] && x["decision"] == "exec-verified"
        });
        assert_eq!(verified["by"], "kernel", "{verified}");
    }
    assert!(
        e["request"]["age_ms"].as_u64().unwrap() >= 300,
        "the record says how long it was held: {e}"
    );
}

/// Held, denied: nothing runs (LSM: EPERM to the caller; fallback: the image is killed).
#[test]
fn labelled_exec_denied_never_runs() {
    let d = Daemon::start();
    let m = marker(&d, "ran");
    let mut p = d.labelled_probe("coder", &["exec", &probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "deny");
    let status = p.wait(countersign_tests::WAIT);
    if d.exec_kind() == "exec" {
        // Held before it started: refused.
        assert_eq!(p.stdout().trim(), format!("exec-error {EPERM}"));
        assert_eq!(status.code(), Some(126));
    } else {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "fallback deny kills the loaded image"
        );
    }
    assert!(
        !std::path::Path::new(&m).exists(),
        "the denied program did not run"
    );
    assert!(d.decisions().iter().any(|e| e["decision"] == "denied"));
}

/// Held, killed: the process dies by SIGKILL.
#[test]
fn labelled_exec_killed() {
    use std::os::unix::process::ExitStatusExt as _;
    let d = Daemon::start();
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "kill");
    assert_eq!(
        p.wait(countersign_tests::WAIT).signal(),
        Some(libc::SIGKILL)
    );
    assert!(!std::path::Path::new(&m).exists());
    assert!(
        d.decisions()
            .iter()
            .any(|e| e["decision"] == "killed" && e["applied"] == "sigkill")
    );
}

/// A held connect sends nothing; approved, it connects.
#[test]
fn labelled_connect_held_then_approved() {
    let d = Daemon::start();
    let l = Listener::new();
    let mut p = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    assert_eq!(r["destination"], l.addr().as_str());
    assert!(p.still_running_after(Duration::from_millis(300)));
    assert!(
        !l.accepted(),
        "the listener saw nothing while the connect was held"
    );
    d.decide(&r, "approve");
    assert!(p.wait(countersign_tests::WAIT).success());
    assert_eq!(p.stdout().trim(), "connected");
    assert!(l.accepted(), "the approved connect arrived");
}

/// A denied connect fails with EPERM and never reaches the listener.
#[test]
fn labelled_connect_denied() {
    let d = Daemon::start();
    let l = Listener::new();
    let mut p = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    d.decide(&r, "deny");
    assert_eq!(p.wait(countersign_tests::WAIT).code(), Some(1));
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
    assert!(!l.accepted());
}

/// A SIGCONT from someone else while pending does not release the connect.
#[test]
fn spurious_sigcont_keeps_connect_held() {
    let d = Daemon::start();
    let l = Listener::new();
    let mut p = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    for _ in 0..3 {
        // SAFETY: signalling the probe we started.
        unsafe { libc::kill(p.pid() as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "still held"
    );
    assert!(!l.accepted(), "nothing sent");
    let again = d.list();
    assert!(
        again.iter().any(|x| x["id"] == r["id"]),
        "the same request is still pending, no second one: {again:?}"
    );
    assert_eq!(again.iter().filter(|x| x["pid"] == p.pid()).count(), 1);
    d.decide(&r, "approve");
    assert!(p.wait(countersign_tests::WAIT).success());
    assert!(l.accepted());
}

/// A SIGCONT while an exec is pending does not release it: in LSM mode the restarted exec is
/// held again; in fallback mode (held after the image loaded) the ptrace stop keeps it.
#[test]
fn spurious_sigcont_keeps_exec_held() {
    let d = Daemon::start();
    let m = marker(&d, "ran");
    let mut p = d.labelled_probe("coder", &["exec", &probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    for _ in 0..3 {
        // SAFETY: signalling the probe we started.
        unsafe { libc::kill(p.pid() as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(p.still_running_after(Duration::from_millis(300)));
    assert!(!std::path::Path::new(&m).exists());
    assert_eq!(d.list().iter().filter(|x| x["pid"] == p.pid()).count(), 1);
    d.decide(&r, "approve");
    assert!(p.wait(countersign_tests::WAIT).success());
    assert!(std::path::Path::new(&m).exists());
}

/// Double fork and setsid do not shed the label: the grandchild's exec is held.
#[test]
fn label_survives_double_fork_and_setsid() {
    let d = Daemon::start();
    let m = marker(&d, "grandchild-ran");
    let mut p = d.labelled_probe("coder", &["double-fork", &probe(), "touch", &m]);
    assert!(p.wait(countersign_tests::WAIT).success());
    let out = p.first_line();
    let gc: u32 = out
        .trim()
        .strip_prefix("grandchild ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let r = d.wait_exec(gc, "touch");
    assert_eq!(r["label"], "coder");
    assert!(!std::path::Path::new(&m).exists());
    d.decide(&r, "approve");
    let deadline = std::time::Instant::now() + countersign_tests::WAIT;
    while !std::path::Path::new(&m).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the approved grandchild did not run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unlabelled processes are never held, even with the daemon running.
#[test]
fn unlabelled_processes_are_never_held() {
    let d = Daemon::start();
    let l = Listener::new();
    let m = marker(&d, "ran");
    let mut e = d.unlabelled(&[&probe(), "exec", &probe(), "touch", &m]);
    assert!(e.wait(Duration::from_secs(20)).success());
    assert!(std::path::Path::new(&m).exists());
    let mut c = d.unlabelled(&[&probe(), "connect", &l.addr()]);
    assert!(c.wait(Duration::from_secs(20)).success());
    assert_eq!(c.stdout().trim(), "connected");
    assert!(d.list().is_empty());
    assert!(
        d.decisions().is_empty(),
        "nothing was decided: {:?}",
        d.decisions()
    );
}

/// Times the daemon's threads blocked and were woken again (voluntary context switches).
fn wakeups(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// An idle daemon (nothing held, nothing to classify) wakes about once a second, not at the
/// 100 ms tick that held requests need: it must not keep an idle host busy. (Names are off
/// so that other scenarios' DNS packets do not wake it.)
#[test]
fn an_idle_daemon_wakes_rarely() {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "dns:\n  enabled: false\n").unwrap();
    let d = Daemon::start_with(&["--config", cfg.path().to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(1));
    let before = wakeups(d.pid());
    std::thread::sleep(Duration::from_secs(5));
    let woken = wakeups(d.pid()) - before;
    // A 100 ms tick alone is 50 wakeups in 5 s (the timer wheel adds some); once a second,
    // 5 to 15.
    assert!(woken <= 25, "the idle daemon woke {woken} times in 5 s");
    // It still serves at once.
    assert!(d.list().is_empty());
}

/// Nobody decides: the configured default (deny) is applied at the deadline.
#[test]
fn timeout_applies_the_default_deny() {
    let d = Daemon::start_with(&["--request-timeout", "3"]);
    let l = Listener::new();
    // The probe's own exec is approved at once by labelled_probe, its connect is left alone.
    let mut p = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    assert_eq!(p.wait(countersign_tests::WAIT).code(), Some(1));
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
    assert!(!l.accepted());
    let log = d.decisions();
    let e = log
        .iter()
        .find(|e| e["request"]["id"] == r["id"])
        .expect("the expiry is recorded");
    assert_eq!(e["decision"], "expired-denied");
    assert_eq!(e["by"], "timeout");
}

/// A labelled process cannot approve requests, not even its own.
#[test]
fn labelled_process_cannot_approve() {
    let d = Daemon::start();
    let l = Listener::new();
    let mut agent = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| {
        r["pid"] == agent.pid() && r["kind"] == "connect"
    });
    // The agent runs `countersign requests approve ID` (its exec of countersign is approved
    // from outside first, so that the CLI call itself is what is tested).
    let bin = countersign_tests::countersign_bin();
    let id = r["id"].to_string();
    let mut selfie = d.labelled(
        "coder",
        &[bin.to_str().unwrap(), "requests", "approve", &id],
    );
    let held = d.wait_exec(selfie.pid(), "approve");
    d.decide(&held, "approve");
    let status = selfie.wait(countersign_tests::WAIT);
    let err = selfie.stderr();
    assert!(!status.success(), "self-approval must fail");
    assert!(
        err.contains("labelled process") && err.contains("cannot approve"),
        "{err}"
    );
    assert!(
        d.list().iter().any(|x| x["id"] == r["id"]),
        "the agent's request is still held"
    );
    assert!(!l.accepted());
    d.decide(&r, "deny");
    assert_eq!(agent.wait(countersign_tests::WAIT).code(), Some(1));
}

/// An approval releases exactly the approved connect: if the restarted syscall goes elsewhere,
/// it is held again as a new request.
#[test]
fn changed_connect_after_approval_is_held_again() {
    let d = Daemon::start();
    let approved = Listener::new();
    let other = Listener::new();
    let mut p = d.labelled_probe(
        "coder",
        &[
            "connect-changing",
            &approved.addr(),
            &other.port().to_string(),
        ],
    );
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    assert_eq!(r["destination"], approved.addr().as_str());
    d.decide(&r, "approve");
    let again = d.wait_request("the changed connect", |x| {
        x["pid"] == p.pid() && x["id"] != r["id"]
    });
    assert_eq!(again["destination"], other.addr().as_str());
    assert!(!other.accepted() && !approved.accepted());
    d.decide(&again, "deny");
    assert_eq!(p.wait(countersign_tests::WAIT).code(), Some(1));
    assert!(!other.accepted());
}

/// LSM mode: an approved exec whose argv changes before the restart is killed before its
/// first instruction: the kernel compares what it loaded with the approval, and records why.
#[test]
fn changed_exec_after_approval_is_killed_before_it_runs_in_lsm_mode() {
    let d = Daemon::start();
    if !d.is_lsm() {
        eprintln!(
            "not applicable in fallback mode: nothing restarts there; escape::an_exec_changed_after_its_approval_never_runs_* rewrites the argv while the exec waits"
        );
        return;
    }
    let dir = d.dir().to_str().unwrap().to_owned();
    let (a, b) = (format!("{dir}/AAAA"), format!("{dir}/BBBB"));
    // The probe execs itself with argv [probe, A]; its SIGCONT handler turns A into B.
    let mut p = d.labelled_probe("coder", &["exec-changing", &probe(), &a, &b]);
    let r = d.wait_exec(p.pid(), "AAAA");
    d.decide(&r, "approve");
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        p.wait(countersign_tests::WAIT).signal(),
        Some(libc::SIGKILL)
    );
    let record = d.wait_decision("the kernel's refusal of the changed exec", |e| {
        e["request"]["pid"] == p.pid()
            && e["by"]
                .as_str()
                .is_some_and(|by| by.starts_with("kernel:") && by.contains("approved"))
    });
    assert_eq!(record["request"]["kind"], "exec", "{record}");
    assert_eq!(record["decision"], "killed", "{record}");
    assert!(
        d.list().iter().all(|x| x["pid"] != p.pid()),
        "nothing asked again"
    );
}

/// `countersign exec` fails closed when the daemon is not there: the command does not run.
#[test]
fn exec_without_daemon_does_not_run_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("ran");
    let out = std::process::Command::new(countersign_tests::countersign_bin())
        .args([
            "exec",
            "--label",
            "coder",
            "--",
            &probe(),
            "touch",
            m.to_str().unwrap(),
        ])
        .env("COUNTERSIGN_SOCKET_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the countersign daemon"));
    assert!(!m.exists());
}

/// Unknown request ids get a clear error.
#[test]
fn unknown_request_id_is_a_clear_error() {
    let d = Daemon::start();
    let out = d.cli(&["requests", "approve", "424242"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no held request #424242"));
}

/// A daemon that labels `cg` (and below it) `label`, with a minute for each request; the
/// configuration file lives as long as the second value.
fn daemon_labelling_cgroup(cg: &TestCgroup, label: &str) -> (Daemon, tempfile::NamedTempFile) {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        format!(
            "cgroup_labels:\n  - label: {label}\n    path: {}\n",
            cg.name
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--config",
        cfg.path().to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    (d, cfg)
}

/// A cgroup label holds tasks in that cgroup and below it, also ones moved in after the
/// daemon started.
#[test]
fn cgroup_label_holds_tasks_in_the_cgroup_and_below() {
    let cg = TestCgroup::new("countersign-e2e");
    let job = cg.child("job");
    let (d, _cfg) = daemon_labelling_cgroup(&cg, "ci");
    let l = Listener::new();
    let mut p = d.unlabelled_waiting(&[&probe(), "wait", "connect", &l.addr()]);
    TestCgroup::enter(&job, p.pid());
    p.go();
    let r = d.wait_request("connect from the cgroup", |r| {
        r["pid"] == p.pid() && r["kind"] == "connect"
    });
    assert_eq!(r["label"], "ci");
    assert!(!l.accepted());
    d.decide(&r, "deny");
    assert_eq!(p.wait(countersign_tests::WAIT).code(), Some(1));
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
    let status: serde_json::Value =
        serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["cgroup_labels"], 1);
}

/// Bad configuration stops the daemon with an error naming the file and the field.
#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "cgroup_labels:\n  - label: ci\n    path: /no-such-cgroup-countersign\n",
            "cgroup_labels[0].path",
        ),
        ("request_timeout: 5\n", "unknown field `request_timeout`"),
        ("mode: sometimes\n", "mode"),
    ];
    for (text, expect) in cases {
        let cfg = dir.path().join("daemon.yaml");
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(countersign_tests::countersign_bin())
            .args([
                "daemon",
                "--config",
                cfg.to_str().unwrap(),
                "--socket-dir",
                dir.path().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains(expect), "{text}: {err}");
        if !expect.starts_with("cgroup") {
            assert!(err.contains("daemon.yaml"), "names the file: {err}");
        }
        assert!(!dir.path().join("control.sock").exists(), "nothing served");
    }
}

/// The daemon killed with SIGKILL while a request is held: the task stays held (a SIGCONT
/// does not release it), the restarted daemon takes the request over, and its approval runs
/// exactly the held connect. A clean stop afterwards leaves no pins behind.
#[test]
fn daemon_crash_keeps_held_requests_held_and_a_restart_takes_them_over() {
    let mut d = Daemon::start();
    let l = Listener::new();
    let mut p = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    d.crash();
    // SAFETY: signalling the probe we started.
    unsafe { libc::kill(p.pid() as i32, libc::SIGCONT) };
    assert!(
        p.still_running_after(Duration::from_millis(500)),
        "still held without a daemon"
    );
    assert!(!l.accepted(), "nothing sent without a daemon");
    d.restart();
    let adopted = d.wait_request("the adopted connect", |x| {
        x["pid"] == p.pid() && x["kind"] == "connect"
    });
    assert_eq!(adopted["destination"], l.addr().as_str());
    assert_eq!(adopted["label"], "coder", "label names survive the restart");
    assert!(
        adopted["note"]
            .as_str()
            .unwrap_or("")
            .contains("taken over"),
        "{adopted}"
    );
    assert_eq!(
        adopted["id"], r["id"],
        "the approver sees the same request id"
    );
    assert_eq!(d.status()["adopted"], 1);
    d.decide(&adopted, "approve");
    assert!(p.wait(countersign_tests::WAIT).success());
    assert_eq!(p.stdout().trim(), "connected");
    assert!(l.accepted());
    // New requests after the restart get new ids.
    let mut q = d.labelled("coder", &[&probe(), "touch", "/nonexistent/x"]);
    let r2 = d.wait_exec(q.pid(), "touch");
    assert!(r2["id"].as_u64() > r["id"].as_u64(), "{r2} after {r}");
    d.decide(&r2, "kill");
    q.wait(countersign_tests::WAIT);
}

/// Other users may label themselves and read the status, never list or decide requests.
#[test]
fn non_root_may_label_itself_but_not_decide() {
    use std::os::unix::process::CommandExt as _;
    let d = Daemon::start();
    // nobody runs links (or copies) of the binaries from the test's directory.
    let bin = d.for_other_users(
        &countersign_tests::countersign_bin(),
        "countersign-for-nobody",
    );
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(&bin)
            .args(args)
            .env("COUNTERSIGN_SOCKET_DIR", d.dir())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["requests", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("needs root"),
        "{err}"
    );
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A labelled process of another user is held like any other.
    let l = Listener::new();
    let p = d.for_other_users(&countersign_tests::probe_bin(), "cs-probe-for-nobody");
    let p = p.to_str().unwrap();
    let mut agent = {
        let child = std::process::Command::new(&bin)
            .args(["exec", "--label", "coder", "--", p, "connect", &l.addr()])
            .env("COUNTERSIGN_SOCKET_DIR", d.dir())
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        countersign_tests::Proc { child }
    };
    let r = d.wait_exec(agent.pid(), "connect");
    assert_eq!(r["uid"], 65534);
    d.decide(&r, "approve");
    let c = d.wait_request("connect", |x| {
        x["pid"] == agent.pid() && x["kind"] == "connect"
    });
    d.decide(&c, "approve");
    assert!(agent.wait(countersign_tests::WAIT).success());
    assert_eq!(agent.stdout().trim(), "connected");
}

/// An unprivileged user who holds connections to the launch socket and sends nothing cannot
/// make `countersign exec` or `status` fail for anyone else.
#[test]
fn a_user_holding_launch_socket_connections_does_not_lock_others_out() {
    use std::os::unix::process::CommandExt as _;
    let d = Daemon::start();
    let escape = d.for_other_users(&countersign_tests::escape_bin(), "cs-escape-for-nobody");
    let launch = d.dir().join("launch.sock");
    let mut hog = countersign_tests::Proc {
        child: std::process::Command::new(&escape)
            .args(["hold-unix", launch.to_str().unwrap(), "400"])
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    };
    assert!(hog.first_line().starts_with("held "));
    std::thread::sleep(Duration::from_millis(300));
    // Another user reads the status through the launch socket, at once.
    let bin = d.for_other_users(
        &countersign_tests::countersign_bin(),
        "countersign-for-others",
    );
    let t = std::time::Instant::now();
    let out = std::process::Command::new(&bin)
        .args(["status", "--json"])
        .env("COUNTERSIGN_SOCKET_DIR", d.dir())
        .uid(65533)
        .gid(65533)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // And root's agents still start, labelled, and are held.
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "deny");
    p.wait(countersign_tests::WAIT);
    assert!(!std::path::Path::new(&m).exists());
    hog.go();
    hog.wait(countersign_tests::WAIT);
    assert!(
        d.log().contains("connections to the launch socket"),
        "the refusals are logged"
    );
}

/// The example policies: `COUNTERSIGN_POLICIES` (set for the VM runs), else the workspace's.
fn policies() -> String {
    std::env::var("COUNTERSIGN_POLICIES").unwrap_or_else(|_| {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap();
        workspace.join("policies").to_str().unwrap().to_owned()
    })
}

fn countersign(args: &[&str]) -> std::process::Output {
    std::process::Command::new(countersign_tests::countersign_bin())
        .args(args)
        .output()
        .unwrap()
}

/// `policy check` passes the example policies and fails a broken one, naming the place.
#[test]
fn policy_check_reports_validity_by_exit_status() {
    let out = countersign(&["policy", "check", &policies()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 label(s)"), "{stdout}");
    // Which timeout each escalation waits, and whose: the example's `git-push` sets a timeout
    // of its own but no outcome, so the daemon's `timeout_action` applies.
    assert!(
        stdout.lines().any(|l| l.contains("rule `git-push`")
            && l.contains("waits 10m (set there), then the daemon's timeout_action")),
        "{stdout}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - connect: {ports: [443]}\n        outcome: allw\n",
    )
    .unwrap();
    let out = countersign(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:6:18:") && err.contains("did you mean `allow`?"),
        "{err}"
    );
}

/// `policy check --cgroups` lists the existing cgroups a policy's cgroup globs and systemd
/// units name (by the documented rule).
#[test]
fn policy_check_lists_cgroups_named_by_globs_and_units() {
    let cg = TestCgroup::new("countersign-match");
    let _agents = cg.child("agents-1");
    let _unit = cg.child("x.service");
    let _other = cg.child("other");
    // Holds the unit's name but is not the unit: not named.
    let _not_unit = cg.child("ax.service");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: countersign.dev/v1\nlabels:\n  - name: agents\n    match: {{cgroup: ['{0}/agents-*']}}\n  - name: svc\n    match: {{systemd_unit: [x.service]}}\n",
            cg.name
        ),
    )
    .unwrap();
    let out = countersign(&["policy", "check", "--cgroups", file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<&str> = text.lines().filter(|l| l.starts_with("cgroup ")).collect();
    let job = format!("cgroup {}/agents-1 (id ", cg.name);
    let unit = format!("cgroup {}/x.service (id ", cg.name);
    assert!(
        listed
            .iter()
            .any(|l| l.starts_with(&job) && l.ends_with("): label agents")),
        "{text}"
    );
    assert!(
        listed
            .iter()
            .any(|l| l.starts_with(&unit) && l.ends_with("): label svc")),
        "{text}"
    );
    assert!(
        !listed
            .iter()
            .any(|l| l.contains(&format!("{}/other ", cg.name))
                || l.contains(&format!("{}/ax.service ", cg.name))),
        "{text}"
    );
    assert!(
        text.contains(
            "label `svc`: systemd unit(s) x.service; the daemon holds tasks of a new cgroup"
        ),
        "{text}"
    );
}

/// `policy test` names the matching rule and the outcome, for execs, connects, sends, local
/// services and unusual sockets.
#[test]
fn policy_test_names_rule_and_outcome() {
    let p = policies();
    let policy_test = |label: &str, flag: &str, value: &str| {
        countersign(&["policy", "test", &p, "--label", label, flag, value])
    };
    let out = policy_test("coder", "--exec", "/usr/bin/git push origin main");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rule `git-push`") && text.contains("coding-agent.yaml:43"),
        "{text}"
    );
    assert!(
        text.contains("escalate to developers") && text.contains("justification required"),
        "{text}"
    );
    let out = policy_test("ci", "--connect", "10.20.1.1:22");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the default of label `ci`") && text.contains("outcome: deny"),
        "{text}"
    );
    assert!(text.contains("connect 10.20.1.1 port 22/tcp"), "{text}");
    // A name the daemon would have learnt for the address: `host:` rules match it.
    let named = countersign(&[
        "policy",
        "test",
        &p,
        "--label",
        "coder",
        "--connect",
        "192.0.2.7:443",
        "--host",
        "api.anthropic.com",
    ]);
    let text = String::from_utf8_lossy(&named.stdout);
    assert!(
        text.contains("rule `model-api`") && text.contains("outcome: allow"),
        "{text}"
    );
    let unnamed = policy_test("coder", "--connect", "192.0.2.7:443");
    assert!(
        !String::from_utf8_lossy(&unnamed.stdout).contains("model-api"),
        "no name, no host rule"
    );
    let out = policy_test("nobody", "--connect", "10.20.1.1:22");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no label `nobody`"));
    // A datagram without connect: connect rules decide it, as UDP by default.
    let text =
        String::from_utf8_lossy(&policy_test("ci", "--send", "10.30.4.1:9005").stdout).into_owned();
    assert!(
        text.contains("send 10.30.4.1 port 9005/udp")
            && text.contains("rule `artifact-store`")
            && text.contains("outcome: allow"),
        "{text}"
    );
    // A local deputy, whatever the label's default.
    let text = String::from_utf8_lossy(&policy_test("coder", "--unix", "/run/docker.sock").stdout)
        .into_owned();
    assert!(
        text.contains("unix /run/docker.sock")
            && text.contains("rule `local-deputies`")
            && text.contains("outcome: deny"),
        "{text}"
    );
    let text =
        String::from_utf8_lossy(&policy_test("ci", "--socket", "packet/raw").stdout).into_owned();
    assert!(
        text.contains("socket packet/raw") && text.contains("rule `no-raw-sockets`"),
        "{text}"
    );
    let out = policy_test("ci", "--socket", "inet/stream");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an action"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Listening for connections from the network is an action: in LSM mode a labelled listener
/// on an address other than loopback waits for a decision (denied: `EPERM`; approved: it
/// listens), a `listen:` rule decides without a human, and loopback passes. Fallback mode
/// does not hold it (README "Not held yet"): it listens at once.
#[test]
fn labelled_listen_on_the_network_is_held() {
    let free_port = || {
        std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let allowed = free_port();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("listen.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: agent
    default: {{outcome: escalate}}
    rules:
      - name: the-probe
        exec: {{binary: [{probe}, {escape}]}}
        outcome: allow
      - name: dev-server
        listen: {{ports: [{allowed}]}}
        outcome: allow
",
            probe = probe(),
            escape = countersign_tests::escape_bin().display(),
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    let listen = |addr: &str| d.labelled("agent", &[&probe(), "listen", addr]);
    let listens = |p: &mut countersign_tests::Proc| {
        assert!(p.wait(WAIT).success(), "{}", p.stdout());
        assert_eq!(p.stdout().trim(), "listening");
    };
    // Loopback: reached from this host only.
    listens(&mut listen("127.0.0.1:0"));
    // Allowed by a rule: decided by the daemon, nobody asked.
    listens(&mut listen(&format!("0.0.0.0:{allowed}")));
    // Anything else waits for a human, before it listens: in LSM mode in the kernel's hook; in
    // fallback mode (an agent started by `countersign exec`) by the seccomp notifier.
    let held = |p: &countersign_tests::Proc| {
        d.wait_request("a listen on every address", |r| {
            r["pid"] == p.pid() && r["kind"] == "listen"
        })
    };
    let mut denied = listen("0.0.0.0:0");
    let r = held(&denied);
    assert!(
        r["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with("0.0.0.0:")),
        "{r}"
    );
    d.decide(&r, "deny");
    assert_eq!(denied.wait(WAIT).code(), Some(1));
    assert_eq!(denied.stdout().trim(), format!("error {}", libc::EPERM));
    let mut approved = listen("[::]:0");
    let r = held(&approved);
    d.decide(&r, "approve");
    listens(&mut approved);
    // A socket never bound: every address, on a port the kernel picks.
    let escape = countersign_tests::escape_bin();
    let escape = escape.to_str().unwrap();
    let mut unbound = d.labelled("agent", &[escape, "listen-unbound"]);
    let r = held(&unbound);
    assert!(
        r["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with("0.0.0.0:")),
        "{r}"
    );
    d.decide(&r, "approve");
    listens(&mut unbound);
    // Another thread keeps switching the descriptor between a loopback socket and one on the
    // network while the program listens on it: a listen decided (or let go) for what the
    // descriptor held when it was read must not make the other socket listen. Whatever is
    // asked about is denied.
    let wide = format!("0.0.0.0:{}", free_port());
    let mut swap = d.labelled("agent", &[escape, "listen-swap", &wide]);
    let pid = swap.pid().to_string();
    let deadline = std::time::Instant::now() + WAIT;
    while swap.child.try_wait().expect("try_wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "listen-swap did not end"
        );
        let _ = d.cli(&["requests", "deny", "--pid", &pid]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = swap.wait(WAIT);
    assert_ne!(
        swap.stdout().trim(),
        "listening",
        "the network socket listened"
    );
    let log = d.decisions();
    assert!(
        log.iter().any(|e| e["decision"] == "auto-allowed"
            && e["request"]["kind"] == "listen"
            && e["by"].as_str().is_some_and(|b| b.contains("dev-server"))),
        "{log:?}"
    );
}

/// A listen on the network of a process labelled by its cgroup (not started by `countersign
/// exec`) is held too: in LSM mode before it listens; in fallback mode once it listens,
/// stopped before it returns to its program (before it can accept anything), and killed if
/// denied.
#[test]
fn labelled_by_cgroup_a_listen_is_held_too() {
    use std::os::unix::process::ExitStatusExt as _;
    let cg = TestCgroup::new("countersign-e2e-listen");
    let (d, _cfg) = daemon_labelling_cgroup(&cg, "ci");
    let listen = || {
        let mut p = d.unlabelled_waiting(&[&probe(), "wait", "listen", "0.0.0.0:0"]);
        TestCgroup::enter(&cg.path, p.pid());
        p.go();
        let r = d.wait_request("a listen from the cgroup", |r| {
            r["pid"] == p.pid() && r["kind"] == "listen"
        });
        assert_eq!(r["label"], "ci");
        (p, r)
    };
    let (mut denied, r) = listen();
    d.decide(&r, "deny");
    let status = denied.wait(WAIT);
    if d.is_lsm() {
        assert_eq!(status.code(), Some(1));
        assert_eq!(denied.stdout().trim(), format!("error {EPERM}"));
    } else {
        // It listened before it was stopped: nothing to refuse any more, so it is killed.
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert_eq!(denied.stdout().trim(), "");
    }
    let (mut approved, r) = listen();
    d.decide(&r, "approve");
    assert!(approved.wait(WAIT).success());
    assert_eq!(approved.stdout().trim(), "listening");
    // A SIGCONT (from anyone allowed to signal it) does not let it go on undecided: in LSM
    // mode its listen has not happened and the restarted call stops again; in fallback mode
    // the daemon holds it in a ptrace stop as well, which a SIGCONT does not end.
    let (mut continued, r) = listen();
    // SAFETY: a signal to the test's own child.
    unsafe { libc::kill(continued.pid() as i32, libc::SIGCONT) };
    assert!(continued.still_running_after(Duration::from_secs(2)));
    d.decide(&r, "deny");
    let status = continued.wait(WAIT);
    assert_eq!(status.code().is_some(), d.is_lsm(), "{status:?}");
    let log = d.decisions();
    let applied: Vec<_> = log
        .iter()
        .filter(|e| e["request"]["kind"] == "listen")
        .map(|e| (e["decision"].clone(), e["applied"].clone()))
        .collect();
    let deny_applied = if d.is_lsm() { "eperm" } else { "sigkill" };
    assert!(
        applied.contains(&("denied".into(), deny_applied.into()))
            && applied.contains(&("approved".into(), "released".into())),
        "{applied:?}"
    );
}

/// `requests list|deny|kill` select held requests by label, kind and process, and decide every
/// selected one in one call, and only those.
#[test]
fn held_requests_are_selected_and_decided_many_at_once() {
    use std::os::unix::process::ExitStatusExt as _;
    let d = Daemon::start();
    let target = Listener::new();
    let cmd = [probe(), "connect".to_owned(), target.addr()];
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    // No policy: each exec waits for a human.
    let mut alpha = [d.labelled("alpha", &cmd), d.labelled("alpha", &cmd)];
    let mut beta = d.labelled("beta", &cmd);
    for p in alpha.iter().chain([&beta]) {
        d.wait_exec(p.pid(), "connect");
    }
    let selected = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["requests", "list", "--json"];
        all.extend_from_slice(args);
        let out = d.cli(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .expect("list JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(selected(&["--label", "alpha"]).len(), 2);
    // Paged, in id order.
    let ids = |v: &[serde_json::Value]| v.iter().map(|r| r["id"].clone()).collect::<Vec<_>>();
    let all = selected(&[]);
    assert_eq!(all.len(), 3, "{all:?}");
    let first_two = selected(&["--limit", "2"]);
    assert_eq!(ids(&first_two), ids(&all[..2]));
    let after = first_two[1]["id"].to_string();
    assert_eq!(ids(&selected(&["--after", &after])), ids(&all[2..]));
    let beta_pid = beta.pid().to_string();
    let only_beta = selected(&["--pid", &beta_pid]);
    assert_eq!(only_beta.len(), 1, "{only_beta:?}");
    // beta's exec approved: its connect is held next, a request of another kind.
    d.decide(&only_beta[0], "approve");
    let connect = d.wait_request("beta's connect", |r| {
        r["pid"] == beta.pid() && r["kind"] == "connect"
    });
    assert_eq!(
        ids(&selected(&["--kind", "connect"])),
        [connect["id"].clone()]
    );

    let out = d.cli(&["requests", "kill", "--kind", "connect"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(beta.wait(WAIT).signal(), Some(libc::SIGKILL));
    assert_eq!(
        selected(&["--label", "alpha"]).len(),
        2,
        "only the connect was selected"
    );

    let out = d.cli(&["requests", "deny", "--label", "alpha"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &mut alpha {
        assert!(!p.wait(WAIT).success(), "a denied exec ran");
    }
    assert!(d.list().is_empty(), "{:?}", d.list());
    assert!(!target.accepted());
    let out = d.cli(&["requests", "deny", "--all"]);
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("no held request selected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decided = d
        .decisions()
        .iter()
        .filter(|e| e["decision"] == "denied")
        .count();
    assert_eq!(decided, 2, "one record per denied request");
}

/// With a policy, the daemon applies its verdicts: allowed actions run and denied or killed
/// ones fail without a human, each recorded with its rule; escalations use the rule's deadline
/// and timeout outcome; labels the policy does not know are held for a human as before.
#[test]
fn daemon_applies_the_policy() {
    let allowed = Listener::new();
    let denied = Listener::new();
    let escalated = Listener::new();
    let asked = Listener::new();
    // On its own address: the kernel looks up the longest prefix only.
    let fast = Listener::on("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("agent.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: agent
    default: {{outcome: kill}}
    rules:
      - name: the-probe
        exec: {{binary: [{probe}]}}
        outcome: allow
      - name: allowed-port
        connect: {{cidr: [127.0.0.0/8], ports: [{a}], protocol: tcp}}
        outcome: allow
      - name: fast-port
        connect: {{cidr: [127.0.0.2/32], ports: [{f}]}}
        outcome: allow
      - name: denied-port
        connect: {{ports: [{d}]}}
        outcome: deny
      - name: ask
        connect: {{ports: [{e}]}}
        outcome: escalate
        escalate: {{timeout: 2s, on_timeout: kill}}
      - name: ask-daemon
        connect: {{ports: [{q}]}}
        outcome: escalate
",
            probe = probe(),
            a = allowed.port(),
            d = denied.port(),
            e = escalated.port(),
            f = fast.port(),
            q = asked.port()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    assert_eq!(d.status()["policy_rules"], 6);
    let human = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(
        human.contains("policy:         6 rule(s) from 1 file(s)"),
        "{human}"
    );

    // Allowed in the kernel: never stopped, never reaches the daemon.
    let mut p = d.labelled("agent", &[&probe(), "connect", &fast.addr()]);
    assert!(p.wait(countersign_tests::WAIT).success());
    assert_eq!(p.stdout().trim(), "connected");
    assert!(fast.accepted());
    assert!(d.status()["fast_allowed"].as_u64().unwrap() >= 1);

    // Allowed exec and connect: no request is ever listed.
    let mut p = d.labelled("agent", &[&probe(), "connect", &allowed.addr()]);
    assert!(p.wait(countersign_tests::WAIT).success());
    assert_eq!(p.stdout().trim(), "connected");
    assert!(allowed.accepted());

    let mut p = d.labelled("agent", &[&probe(), "connect", &denied.addr()]);
    assert_eq!(p.wait(countersign_tests::WAIT).code(), Some(1));
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
    assert!(!denied.accepted());

    // Escalated: listed with its rule, then the rule's timeout outcome (kill) after 2 s.
    use std::os::unix::process::ExitStatusExt as _;
    let mut p = d.labelled("agent", &[&probe(), "connect", &escalated.addr()]);
    let r = d.wait_request("escalated connect", |r| {
        r["pid"] == p.pid() && r["kind"] == "connect"
    });
    assert!(r["rule"].as_str().unwrap().contains("rule `ask`"), "{r}");
    assert!(r["expires_in_ms"].as_u64().unwrap() <= 2000, "{r}");
    assert_eq!(
        p.wait(countersign_tests::WAIT).signal(),
        Some(libc::SIGKILL)
    );
    assert!(!escalated.accepted());

    // Escalated by a rule that sets no timeout: the daemon's (60 s here), not a default of
    // the rule's own.
    let mut p = d.labelled("agent", &[&probe(), "connect", &asked.addr()]);
    let r = d.wait_request("connect escalated with the daemon's timeout", |r| {
        r["pid"] == p.pid() && r["kind"] == "connect"
    });
    assert!(
        r["rule"].as_str().unwrap().contains("rule `ask-daemon`"),
        "{r}"
    );
    let expires = r["expires_in_ms"].as_u64().unwrap();
    assert!((30_000..=60_000).contains(&expires), "{r}");
    d.decide(&r, "deny");
    assert_eq!(p.wait(countersign_tests::WAIT).code(), Some(1));
    assert!(!asked.accepted());

    // Not matched by any rule: the label's default (kill).
    let mut p = d.labelled("agent", &[&probe(), "connect", "127.0.0.1:9"]);
    assert_eq!(
        p.wait(countersign_tests::WAIT).signal(),
        Some(libc::SIGKILL)
    );

    let log = d.decisions();
    let by_rule = |rule: &str, decision: &str| {
        log.iter().any(|e| {
            e["decision"] == decision
                && e["by"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("rule `{rule}`"))
        })
    };
    // The probe's own exec is decided in the kernel (exec fast path): never logged.
    assert!(!by_rule("the-probe", "auto-allowed"), "{log:#?}");
    assert!(d.status()["fast_allowed_execs"].as_u64().unwrap() >= 1);
    // With `protocol: tcp` the kernel decides where it knows the socket type (LSM mode);
    // the fallback's tracepoint does not, so there the daemon allows it.
    if d.is_lsm() {
        assert!(!by_rule("allowed-port", "auto-allowed"), "{log:#?}");
    } else {
        assert!(by_rule("allowed-port", "auto-allowed"), "{log:#?}");
    }
    assert!(
        !by_rule("fast-port", "auto-allowed"),
        "the kernel decided it: {log:#?}"
    );
    assert!(by_rule("denied-port", "auto-denied"), "{log:#?}");
    assert!(log.iter().any(|e| e["decision"] == "expired-killed"
        && e["request"]["rule"].as_str().unwrap_or("").contains("ask")));
    assert!(log.iter().any(|e| {
        e["decision"] == "auto-killed"
            && e["by"]
                .as_str()
                .unwrap_or("")
                .contains("default of label `agent`")
    }));

    // A label the policy does not know is held for a human, as without a policy.
    let mut other = d.labelled("someone-else", &[&probe(), "touch", "/nonexistent"]);
    let held = d.wait_exec(other.pid(), "touch");
    assert!(held["rule"].is_null());
    d.decide(&held, "kill");
    other.wait(countersign_tests::WAIT);
}

/// A daemon refuses to start on a policy with errors, naming them.
#[test]
fn daemon_refuses_a_broken_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(&policy, "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - {exec: {}, outcome: maybe}\n").unwrap();
    let out = countersign(&[
        "daemon",
        "--policy",
        policy.to_str().unwrap(),
        "--socket-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml:5:") && err.contains("unknown variant `maybe`"),
        "{err}"
    );
    assert!(!dir.path().join("control.sock").exists());
}

/// A policy reload (SIGHUP, or the files changing) applies at once, also to requests already
/// held; a broken policy is reported and the one in force stays.
#[test]
fn policy_reload_reevaluates_held_requests() {
    let target = Listener::new();
    let other = Listener::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("agent.yaml");
    let write = |port_rule: &str| {
        std::fs::write(
            &policy,
            format!(
                "apiVersion: countersign.dev/v1
labels:
  - name: agent
    default: {{outcome: escalate}}
    rules:
      - name: the-probe
        exec: {{binary: [{}]}}
        outcome: allow
{port_rule}",
                probe()
            ),
        )
        .unwrap();
    };
    write("");
    let d = Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    let mut p = d.labelled("agent", &[&probe(), "connect", &target.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    assert!(r["rule"].as_str().unwrap().contains("default"), "{r}");

    // SIGHUP with a policy that allows it: the held connect goes through.
    write(&format!(
        "      - name: now-allowed\n        connect: {{ports: [{}]}}\n        outcome: allow\n",
        target.port()
    ));
    let pid = d.status()["daemon_pid"].as_i64().unwrap() as i32;
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    assert!(p.wait(countersign_tests::WAIT).success());
    assert_eq!(p.stdout().trim(), "connected");
    assert!(d.decisions().iter().any(|e| e["decision"] == "auto-allowed"
        && e["by"].as_str().unwrap_or("").contains("now-allowed")));

    // A broken policy: reported, the policy in force stays.
    std::fs::write(&policy, "apiVersion: countersign.dev/v1\nlabels: [{name: agent, rules: [{exec: {}, outcome: sometimes}]}]\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + countersign_tests::WAIT;
    let status = loop {
        let s = d.status();
        if !s["policy_reload_error"].is_null() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broken policy was not reported: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status["policy_reload_error"]
            .as_str()
            .unwrap()
            .contains("sometimes"),
        "{status}"
    );
    assert_eq!(status["policy_rules"], 2, "the policy in force stays");

    // Edited without a signal: noticed by itself.
    write(&format!(
        "      - name: refused\n        connect: {{ports: [{}]}}\n        outcome: deny\n",
        other.port()
    ));
    let deadline = std::time::Instant::now() + countersign_tests::WAIT;
    while !d.status()["policy_reload_error"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the edited policy was not reloaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut q = d.labelled("agent", &[&probe(), "connect", &other.addr()]);
    assert_eq!(q.wait(countersign_tests::WAIT).code(), Some(1));
    assert_eq!(q.stdout().trim(), format!("error {EPERM}"));
    assert!(!other.accepted());
}

/// The exec fast path: a binary an `allow` rule names runs without a stop and without a
/// request or a decision record; `status` counts it. Another binary, a copy of the allowed
/// one (same bytes, another inode), or the allowed binary under a label whose earlier rule
/// refuses some of its runs, still reach the daemon.
#[test]
fn exec_fast_path_allows_exactly_the_listed_file() {
    let d0 = tempfile::tempdir().unwrap();
    // A copy of the probe: the same bytes at another inode.
    let copy = d0.path().join("cs-probe-copy");
    std::fs::copy(probe(), &copy).unwrap();
    let copy = copy.to_str().unwrap().to_owned();
    let policy = d0.path().join("agent.yaml");
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
  - name: strict
    default: {{outcome: escalate}}
    rules:
      - name: no-touch
        exec: {{binary: [{probe}], args: [\"touch *\"]}}
        outcome: deny
      - name: the-probe-otherwise
        exec: {{binary: [{probe}]}}
        outcome: allow
",
            probe = probe()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    let status = d.status();
    let holds = status["holds"].as_u64().unwrap();
    let fast = status["fast_allowed_execs"].as_u64().unwrap();

    // Allowed in the kernel: runs, no hold, no request, no record.
    let ran = marker(&d, "ran");
    let mut p = d.labelled("agent", &[&probe(), "touch", &ran]);
    assert!(p.wait(countersign_tests::WAIT).success(), "{}", d.log());
    assert!(std::path::Path::new(&ran).exists());
    let status = d.status();
    assert_eq!(status["holds"].as_u64().unwrap(), holds, "{status}");
    assert!(
        status["fast_allowed_execs"].as_u64().unwrap() > fast,
        "{status}"
    );
    assert!(d.decisions().is_empty(), "{:?}", d.decisions());
    let human = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("execs (policy fast path)"), "{human}");

    // The same bytes at another inode are not the allowed file: held for a human.
    let copied = marker(&d, "copied");
    let mut p = d.labelled("agent", &[&copy, "touch", &copied]);
    let r = d.wait_exec(p.pid(), "touch");
    assert!(
        r["rule"]
            .as_str()
            .unwrap_or("")
            .contains("default of label `agent`"),
        "{r}"
    );
    d.decide(&r, "kill");
    assert!(!p.wait(countersign_tests::WAIT).success());
    assert!(!std::path::Path::new(&copied).exists());

    // The allowed probe runs another binary: that exec is held.
    let nested = marker(&d, "nested");
    let mut p = d.labelled("agent", &[&probe(), "exec", &copy, "touch", &nested]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "kill");
    assert!(!p.wait(countersign_tests::WAIT).success());
    assert!(!std::path::Path::new(&nested).exists());

    // An earlier refusal keeps the later allow on the slow path: refused by the daemon...
    let strict = marker(&d, "strict");
    let mut p = d.labelled("strict", &[&probe(), "touch", &strict]);
    assert!(!p.wait(countersign_tests::WAIT).success());
    assert!(!std::path::Path::new(&strict).exists());
    // ...and allowed by the daemon (recorded) when the refusal does not match.
    let mut p = d.labelled("strict", &[&probe(), "exec", "/nonexistent/x"]);
    p.wait(countersign_tests::WAIT);
    assert_eq!(p.stdout().trim(), "exec-error 2");
    let log = d.decisions();
    let by_rule = |rule: &str, decision: &str| {
        log.iter().any(|e| {
            e["decision"] == decision
                && e["by"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("rule `{rule}`"))
        })
    };
    assert!(by_rule("no-touch", "auto-denied"), "{log:#?}");
    assert!(by_rule("the-probe-otherwise", "auto-allowed"), "{log:#?}");
    assert!(!by_rule("the-probe", "auto-allowed"), "{log:#?}");
}

/// LSM mode reads a held exec's arguments in the LSM hook itself: no syscall tracepoint is
/// attached (they put every task's syscalls on the kernel's slower traced path). The
/// fallback needs them.
#[test]
fn syscall_tracepoints_only_in_fallback_mode() {
    let d = Daemon::start();
    let attached = d.attached_programs();
    let syscall_hooks: Vec<&String> = attached
        .iter()
        .filter(|n| n.contains("sys_enter"))
        .collect();
    if d.is_lsm() {
        assert!(syscall_hooks.is_empty(), "{attached:?}");
        assert!(
            attached.iter().any(|n| n == "cs_lsm_bprm_check"),
            "{attached:?}"
        );
    } else {
        for hook in [
            "cs_tp_sys_enter_execve",
            "cs_tp_sys_enter_execveat",
            "cs_tp_sys_enter_connect",
        ] {
            assert!(attached.iter().any(|n| n == hook), "{hook}: {attached:?}");
        }
    }
    // Either way a held exec shows its filename and arguments.
    let m = marker(&d, "args");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    assert!(
        r["argv"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == m.as_str()),
        "{r}"
    );
    assert!(r["binary"].as_str().unwrap().ends_with("cs-probe"), "{r}");
    d.decide(&r, "kill");
    p.wait(countersign_tests::WAIT);
}

/// `match: executable`: a process that loads a named file (by device and inode) is labelled
/// by the kernel before its first instruction; what it does next is held under that label.
/// The same bytes at another inode label nothing.
#[test]
fn executable_match_labels_the_process_at_exec() {
    let d0 = tempfile::tempdir().unwrap();
    let agent = d0.path().join("agent-bin");
    std::fs::copy(probe(), &agent).unwrap();
    let agent = agent.to_str().unwrap().to_owned();
    let policy = d0.path().join("agent.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: tool
    match: {{executable: [{agent}]}}
    default: {{outcome: escalate}}
"
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    // Started unlabelled, the agent's binary labels it; its own exec is not held, its next
    // one is.
    let m = marker(&d, "by-agent");
    let mut p = d.unlabelled(&[&agent, "exec", &probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    assert_eq!(r["label"], "tool", "{r}");
    d.decide(&r, "kill");
    assert!(!p.wait(countersign_tests::WAIT).success());
    assert!(!std::path::Path::new(&m).exists());
    // The probe (same bytes, another inode) is not the agent's executable.
    let m = marker(&d, "by-probe");
    let mut p = d.unlabelled(&[&probe(), "exec", &probe(), "touch", &m]);
    assert!(p.wait(countersign_tests::WAIT).success(), "{}", d.log());
    assert!(std::path::Path::new(&m).exists());
    assert!(d.list().is_empty(), "{:?}", d.list());
}

/// Scripts and the exec fast path. Allowing an interpreter allows the scripts it runs (the
/// policy's meaning): in fallback mode the kernel sees the loaded interpreter and decides; in
/// LSM mode it also sees the script, which is not an allowed binary, so the daemon decides
/// (same answer, recorded). A `script:` rule is never decided in the kernel: a script it does
/// not name is refused.
#[test]
fn scripts_run_only_as_the_policy_says() {
    let d0 = tempfile::tempdir().unwrap();
    let script = |name: &str| {
        let p = d0.path().join(name);
        std::fs::write(&p, "#!/bin/sh\necho ran > \"$1\"\n").unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (named, other) = (script("named.sh"), script("other.sh"));
    let policy = d0.path().join("agent.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: shell
    default: {{outcome: kill}}
    rules:
      - name: any-sh
        exec: {{binary: [/bin/sh]}}
        outcome: allow
  - name: one-script
    default: {{outcome: kill}}
    rules:
      - name: the-named-script
        exec: {{binary: [/bin/sh], script: [{named}]}}
        outcome: allow
"
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    let log_has = |rule: &str| {
        d.decisions().iter().any(|e| {
            e["decision"] == "auto-allowed"
                && e["by"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("rule `{rule}`"))
        })
    };

    let m = marker(&d, "shell");
    let mut p = d.labelled("shell", &[&other, &m]);
    assert!(p.wait(countersign_tests::WAIT).success(), "{}", d.log());
    assert!(std::path::Path::new(&m).exists());
    if d.exec_kind() == "exec" {
        // Held before it started (the script is not on the fast path): the daemon decided.
        assert!(log_has("any-sh"), "the daemon decided: {:?}", d.decisions());
    } else {
        assert!(
            !log_has("any-sh"),
            "the kernel decided: {:?}",
            d.decisions()
        );
        assert!(d.status()["fast_allowed_execs"].as_u64().unwrap() >= 1);
    }

    let m = marker(&d, "named");
    let mut p = d.labelled("one-script", &[&named, &m]);
    assert!(p.wait(countersign_tests::WAIT).success(), "{}", d.log());
    assert!(std::path::Path::new(&m).exists());
    assert!(log_has("the-named-script"), "{:?}", d.decisions());

    let m = marker(&d, "other");
    let mut p = d.labelled("one-script", &[&other, &m]);
    assert!(!p.wait(countersign_tests::WAIT).success());
    assert!(!std::path::Path::new(&m).exists());
}

/// Regression: an approved exec that fails after its first binfmt pass (a script whose
/// interpreter is missing) must not leave a release that lets the task's next exec load
/// unasked; that exec is held like any other (before it loads, in LSM mode).
#[test]
fn a_failed_approved_exec_leaves_no_release() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.sh");
    std::fs::write(&broken, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let broken = broken.to_str().unwrap().to_owned();
    let m = marker(&d, "after");
    let mut p = d.labelled_probe(
        "coder",
        &["exec-after-failed", &broken, &probe(), "touch", &m],
    );
    if d.is_lsm() {
        // Held before it loads, approved: the interpreter is missing, the exec fails.
        let r = d.wait_exec(p.pid(), "broken.sh");
        d.decide(&r, "approve");
    }
    let r = d.wait_exec(p.pid(), "touch");
    assert_eq!(r["kind"], d.exec_kind(), "{r}");
    d.decide(&r, "kill");
    p.wait(countersign_tests::WAIT);
    assert!(p.stdout().contains("exec-error 2"), "{}", p.stdout());
    assert!(!std::path::Path::new(&m).exists());
}

#[path = "e2e/records.rs"]
mod records;

#[path = "e2e/tamper.rs"]
mod tamper;

#[path = "e2e/names.rs"]
mod names;
