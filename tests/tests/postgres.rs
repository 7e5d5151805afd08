//! The approver on PostgreSQL, against a real server (natively; the VMs carry no database
//! server): two replicas on one database, two people answering at the same moment on
//! different replicas, and exactly one decision that releases the held exec.
use std::{path::Path, thread, time::Duration};

use countersign_tests::{Daemon, WAIT, pg::PgServer, probe_bin, remote::Approver};

fn probe() -> String {
    probe_bin().to_str().expect("utf-8 path").to_owned()
}

/// Labels `q1` and `q2` escalate the probe's execs with quorum 1 and 2.
fn policy(dir: &Path) -> String {
    let path = dir.join("coder.yaml");
    let label = |q: u32| {
        format!(
            "  - name: q{q}
    on_behalf_of: alice@example.com
    rules:
      - name: run-the-probe
        exec: {{binary: [{probe}]}}
        outcome: escalate
        escalate: {{approvers: [dev], quorum: {q}, timeout: 60s, on_timeout: deny}}
",
            probe = probe()
        )
    };
    std::fs::write(
        &path,
        format!(
            "apiVersion: countersign.dev/v1\nlabels:\n{}{}",
            label(1),
            label(2)
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

/// Answers `id` as `who` on `a`; the CLI's stdout and stderr.
fn answer(a: &Approver, who: &str, id: &str) -> String {
    let out = a.cli(who, &["approve", id]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn two_replicas_on_postgresql_decide_exactly_once() {
    let pg = PgServer::start();
    let a = Approver::start_with_database(None, Some(&pg.url()));
    let b = a.replica(&pg.url());
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path());
    let config = a.daemon_config(dir.path());
    let d = Daemon::start_with(&["--config", config.to_str().unwrap(), "--policy", &policy]);
    for quorum in [1u32, 2] {
        let m = d
            .dir()
            .join(format!("ran-{quorum}"))
            .to_str()
            .unwrap()
            .to_owned();
        let mut p = d.labelled(&format!("q{quorum}"), &[&probe(), "touch", &m]);
        let r = a.wait_request(&m);
        let id = r["id"].to_string();
        // The same request on the other replica.
        assert!(
            b.requests("bob", "pending")
                .iter()
                .any(|x| x["id"] == r["id"]),
            "replica b sees the request"
        );
        // Bob on replica a and carol on replica b, at the same moment.
        let (ra, rb) = thread::scope(|s| {
            let x = s.spawn(|| answer(&a, "bob", &id));
            let y = s.spawn(|| answer(&b, "carol", &id));
            (x.join().unwrap(), y.join().unwrap())
        });
        let decided = [&ra, &rb]
            .iter()
            .filter(|o| o.contains("decided: approve"))
            .count();
        assert_eq!(
            decided, 1,
            "exactly one answer decides (quorum {quorum}): {ra:?} / {rb:?}"
        );
        if quorum == 1 {
            assert!(
                ra.contains("already") || rb.contains("already"),
                "the other answer finds it decided: {ra:?} / {rb:?}"
            );
        } else {
            assert!(
                ra.contains("1 of 2") || rb.contains("1 of 2"),
                "the first answer is counted: {ra:?} / {rb:?}"
            );
        }
        assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), a.log());
        assert!(Path::new(&m).exists());
        let all = b.requests("bob", "all");
        let this = all.iter().find(|x| x["id"] == r["id"]).unwrap();
        assert_eq!(this["state"], "approved", "{this}");
        assert_eq!(
            this["answers"].as_array().unwrap().len(),
            quorum as usize,
            "{this}"
        );
        // One decision per request reached the host.
        assert_eq!(d.status()["approver"]["received"], quorum);
        thread::sleep(Duration::from_millis(100));
    }
}
