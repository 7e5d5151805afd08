use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::{
    Action, Policy, load,
    schema::{GrantScope, Outcome, Protocol, TimeoutOutcome},
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn exec(argv: &[&str]) -> Action {
    Action::Exec {
        binary: PathBuf::from(argv[0]),
        binary_file: None,
        script: None,
        script_file: None,
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn connect(addr: &str, port: u16, host: Option<&str>) -> Action {
    Action::Connect {
        addr: addr.parse::<IpAddr>().unwrap(),
        port,
        protocol: Protocol::Tcp,
        hosts: host.map(str::to_owned).into_iter().collect(),
    }
}

fn connect_named(addr: &str, port: u16, hosts: &[&str]) -> Action {
    Action::Connect {
        addr: addr.parse::<IpAddr>().unwrap(),
        port,
        protocol: Protocol::Tcp,
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
    }
}

#[test]
fn host_globs_match_any_learnt_name_of_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    default: {outcome: escalate}\n    rules:\n      - {name: no-paste, connect: {host: ['*.Paste.test']}, outcome: deny}\n      - {name: api, connect: {host: ['api.example.test'], ports: [443]}, outcome: allow}\n",
    );
    let p = load(&[f]).unwrap();
    // One of several names of a shared address is enough (globs are case-insensitive; names
    // are kept lowercase).
    assert_eq!(
        outcome(
            &p,
            "a",
            &connect_named("10.0.0.1", 443, &["cdn.test", "x.paste.test"])
        ),
        (Outcome::Deny, Some("no-paste".into()))
    );
    assert_eq!(
        outcome(
            &p,
            "a",
            &connect_named("10.0.0.1", 443, &["cdn.test", "api.example.test"])
        ),
        (Outcome::Allow, Some("api".into()))
    );
    // The port still counts; no name known: only the default.
    assert_eq!(
        outcome(
            &p,
            "a",
            &connect_named("10.0.0.1", 80, &["api.example.test"])
        )
        .0,
        Outcome::Escalate
    );
    assert_eq!(
        outcome(&p, "a", &connect_named("10.0.0.1", 443, &[])).0,
        Outcome::Escalate
    );
}

fn outcome(p: &Policy, label: &str, a: &Action) -> (Outcome, Option<String>) {
    let v = p.evaluate(label, a).expect("known label");
    (v.decision.outcome, v.rule.and_then(|r| r.name.clone()))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn errors(dir: &Path, text: &str) -> String {
    let p = write(dir, "p.yaml", text);
    load(&[p]).unwrap_err().to_string()
}

#[test]
fn every_example_policy_loads() {
    let p = load(&[examples()]).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = p.labels.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["ci", "coder", "pipeline"]);
    assert!(p.rule_count() >= 12);
}

#[test]
fn coding_agent_example_decides_as_documented() {
    let p = load(&[examples().join("coding-agent.yaml")]).unwrap();
    assert_eq!(
        outcome(&p, "coder", &exec(&["/usr/bin/git", "status"])),
        (Outcome::Allow, Some("read-only-git".into()))
    );
    assert_eq!(
        outcome(&p, "coder", &exec(&["/usr/bin/git", "log", "--oneline"])).0,
        Outcome::Allow
    );
    let (o, r) = outcome(
        &p,
        "coder",
        &exec(&["/usr/bin/git", "push", "origin", "main"]),
    );
    assert_eq!((o, r.as_deref()), (Outcome::Escalate, Some("git-push")));
    let v = p
        .evaluate("coder", &exec(&["/usr/bin/git", "push"]))
        .unwrap();
    let esc = v.decision.escalation().unwrap();
    assert!(esc.justification);
    assert_eq!(esc.timeout.map(|t| t.as_secs()), Some(600));
    assert_eq!(esc.grants[1].scope, GrantScope::Binary);
    assert_eq!(esc.grants[1].duration.unwrap().as_secs(), 1800);
    assert_eq!(
        outcome(&p, "coder", &exec(&["/usr/bin/rm", "-rf", "/home"])).0,
        Outcome::Kill
    );
    // Not named: the label's default (escalate, 5 minutes, then deny, as the example sets).
    let v = p
        .evaluate("coder", &exec(&["/usr/bin/curl", "https://x"]))
        .unwrap();
    assert!(v.rule.is_none());
    let esc = v.decision.escalation().unwrap();
    assert_eq!(
        (esc.timeout, esc.on_timeout),
        (
            Some(std::time::Duration::from_secs(300)),
            Some(TimeoutOutcome::Deny)
        )
    );
    assert_eq!(
        outcome(&p, "coder", &connect("169.254.169.254", 80, None)).0,
        Outcome::Deny
    );
    assert_eq!(
        outcome(
            &p,
            "coder",
            &connect("1.2.3.4", 443, Some("api.anthropic.com"))
        )
        .0,
        Outcome::Allow
    );
    assert_eq!(
        outcome(
            &p,
            "coder",
            &connect("1.2.3.4", 443, Some("chat.openai.com"))
        )
        .0,
        Outcome::Allow
    );
    // Without a known host name the host rule cannot match.
    assert_eq!(
        outcome(&p, "coder", &connect("1.2.3.4", 443, None)).0,
        Outcome::Escalate
    );
    assert_eq!(
        p.label("coder").unwrap().on_behalf_of.as_deref(),
        Some("alice@example.com")
    );
    // Local deputies are refused whatever the label's default.
    let deputy = Action::Unix {
        file: None,
        abstract_name: None,
        name: "/run/docker.sock".into(),
    };
    let (o, rule) = outcome(&p, "coder", &deputy);
    assert_eq!(o, Outcome::Deny);
    assert!(rule.unwrap().contains("local-deputies"));
    // Local sockets no rule names are let through (no `unix_default`).
    let journal = Action::Unix {
        file: None,
        abstract_name: None,
        name: "/run/systemd/journal/socket".into(),
    };
    assert_eq!(outcome(&p, "coder", &journal), (Outcome::Allow, None));
}

#[test]
fn ci_and_pipeline_examples_decide_as_documented() {
    let p = load(&[examples()]).unwrap();
    assert_eq!(
        outcome(&p, "ci", &connect("10.20.3.4", 443, None)).0,
        Outcome::Allow
    );
    assert_eq!(
        outcome(&p, "ci", &connect("10.20.3.4", 22, None)).0,
        Outcome::Deny
    );
    assert_eq!(
        outcome(&p, "ci", &connect("10.30.4.9", 9005, None)).0,
        Outcome::Allow
    );
    let v = p
        .evaluate("ci", &exec(&["/usr/bin/kubectl", "apply"]))
        .unwrap();
    assert_eq!(v.decision.escalation().unwrap().quorum, 2);
    assert_eq!(
        outcome(&p, "ci", &exec(&["/usr/bin/gcc", "x.c"])).0,
        Outcome::Allow
    );
    // The pipeline's rules come from two files, the included network rules first.
    assert_eq!(
        outcome(&p, "pipeline", &connect("10.40.1.1", 5432, None)).0,
        Outcome::Allow
    );
    assert_eq!(
        outcome(&p, "pipeline", &connect("8.8.8.8", 443, None)).0,
        Outcome::Deny
    );
    assert_eq!(
        outcome(&p, "pipeline", &connect("2001:db8::1", 443, None)).0,
        Outcome::Deny
    );
    let script = Action::Exec {
        binary: "/usr/bin/python3".into(),
        binary_file: None,
        script: Some("/opt/pipeline/steps/extract.py".into()),
        script_file: None,
        argv: vec!["python3".into(), "/opt/pipeline/steps/extract.py".into()],
    };
    assert_eq!(
        outcome(&p, "pipeline", &script),
        (Outcome::Allow, Some("own-steps".into()))
    );
    assert_eq!(
        outcome(
            &p,
            "pipeline",
            &exec(&["/usr/bin/python3", "/tmp/other.py"])
        )
        .0,
        Outcome::Escalate
    );
}

#[test]
fn unknown_label_is_none() {
    let p = load(&[examples()]).unwrap();
    assert!(p.evaluate("nobody", &exec(&["/bin/true"])).is_none());
}

#[test]
fn binaries_match_by_file_not_by_path_string() {
    let dir = tempfile::tempdir().unwrap();
    let real = write(dir.path(), "tool", "#!/bin/sh\n");
    let link = dir.path().join("alias");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let p = write(
        dir.path(),
        "p.yaml",
        &format!(
            "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {{binary: [{}]}}\n        outcome: allow\n",
            real.display()
        ),
    );
    let policy = load(&[p]).unwrap();
    let via_link = Action::Exec {
        binary: link.clone(),
        binary_file: crate::daemon::enrich::file_id(&link),
        script: None,
        script_file: None,
        argv: vec!["alias".into()],
    };
    assert_eq!(outcome(&policy, "a", &via_link).0, Outcome::Allow);
}

#[test]
fn errors_name_file_line_column_and_suggest() {
    let dir = tempfile::tempdir().unwrap();
    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {}\n        outcom: allow\n",
    );
    assert!(e.contains("p.yaml:6:9: "), "{e}");
    assert!(
        e.contains("unknown field `outcom`") && e.contains("did you mean `outcome`?"),
        "{e}"
    );

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - connect: {cidr: [10.0.0/8]}\n        outcome: allow\n",
    );
    assert!(
        e.contains("p.yaml:5:") && e.contains("`10.0.0/8` is not a CIDR"),
        "{e}"
    );

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - connect: {ports: [70000]}\n        outcome: allow\n",
    );
    assert!(e.contains("`70000` is not a port"), "{e}");

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {}\n        connect: {}\n        outcome: allow\n",
    );
    assert!(
        e.contains("more than one of `exec`, `connect`, `socket`, `unix` and `listen`"),
        "{e}"
    );

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - socket: {family: [pakket]}\n        outcome: allow\n",
    );
    assert!(
        e.contains("p.yaml:5:")
            && e.contains("`pakket` is not a socket family")
            && e.contains("packet"),
        "{e}"
    );

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {}\n        outcome: allow\n        escalate: {quorum: 2}\n",
    );
    assert!(e.contains("only go with `outcome: escalate`"), "{e}");

    let e = errors(dir.path(), "apiVersion: countersign.dev/v2\n");
    assert!(
        e.contains("p.yaml:1:") && e.contains("countersign.dev/v1"),
        "{e}"
    );

    let e = errors(dir.path(), "labels: []\n");
    assert!(e.contains("missing field `apiVersion`"), "{e}");

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {}\n        outcome: alow\n",
    );
    assert!(e.contains("did you mean `allow`?"), "{e}");

    let e = errors(
        dir.path(),
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    default: {outcome: escalate, escalate: {timeout: 2d}}\n",
    );
    assert!(e.contains("at most 24h"), "{e}");
}

#[test]
fn every_file_reports_its_own_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    bogus: 1\n",
    );
    let b = write(
        dir.path(),
        "b.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: 'b c'\n",
    );
    let e = load(&[a, b]).unwrap_err();
    assert_eq!(e.0.len(), 2, "{e}");
    assert!(
        e.0[0].file.ends_with("a.yaml") && e.0[1].file.ends_with("b.yaml"),
        "{e}"
    );
}

#[test]
fn a_label_is_defined_in_one_file_and_extended_in_others() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: x\n    default: {outcome: deny}\n    rules:\n      - {name: first, connect: {ports: [1]}, outcome: allow}\n",
    );
    let b = write(
        dir.path(),
        "b.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: x\n    rules:\n      - {name: second, connect: {ports: [1, 2]}, outcome: kill}\n",
    );
    let p = load(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(
        outcome(&p, "x", &connect("1.1.1.1", 1, None)),
        (Outcome::Allow, Some("first".into()))
    );
    assert_eq!(
        outcome(&p, "x", &connect("1.1.1.1", 2, None)),
        (Outcome::Kill, Some("second".into()))
    );
    assert_eq!(
        outcome(&p, "x", &connect("1.1.1.1", 3, None)),
        (Outcome::Deny, None)
    );
    let c = write(
        dir.path(),
        "c.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: x\n    default: {outcome: allow}\n",
    );
    let e = load(&[a, b, c]).unwrap_err().to_string();
    assert!(
        e.contains("c.yaml:3:") && e.contains("already set in") && e.contains("a.yaml"),
        "{e}"
    );
}

#[test]
fn includes_are_relative_read_once_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(
        &dir.path().join("sub"),
        "inc.yaml",
        "apiVersion: countersign.dev/v1\ninclude: [../main.yaml]\nlabels:\n  - name: y\n",
    );
    let main = write(
        dir.path(),
        "main.yaml",
        "apiVersion: countersign.dev/v1\ninclude: [sub/inc.yaml]\nlabels:\n  - name: z\n",
    );
    let p = load(&[main]).unwrap();
    assert_eq!(p.files.len(), 2, "a cycle is read once");
    let missing = write(
        dir.path(),
        "m.yaml",
        "apiVersion: countersign.dev/v1\ninclude: [nope.yaml]\n",
    );
    let e = load(&[missing]).unwrap_err().to_string();
    assert!(e.contains("m.yaml:2:") && e.contains("nope.yaml"), "{e}");
}

#[test]
fn reminders_and_the_escalation_ladder_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {binary: [/bin/true]}\n        outcome: escalate\n        escalate: {approvers: [dev], timeout: 30m, remind: 5m, ladder: [{after: 10m, approvers: [leads]}, {after: 20m, approvers: [cto]}]}\n",
    );
    let p = load(&[good]).unwrap();
    let e = p.labels[0].rules[0].decision.escalation().unwrap();
    assert_eq!(e.remind, Some(std::time::Duration::from_secs(300)));
    assert_eq!(e.ladder.len(), 2);
    assert_eq!(e.ladder[1].approvers, ["cto"]);
    let late = write(
        dir.path(),
        "late.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {binary: [/bin/true]}\n        outcome: escalate\n        escalate: {timeout: 5m, ladder: [{after: 10m, approvers: [leads]}]}\n",
    );
    let e = load(&[late]).unwrap_err().to_string();
    assert!(
        e.contains("late.yaml") && e.contains("ladder[0].after"),
        "{e}"
    );
}

/// Socket rules: families and types by name or number, first match wins, and only `allow`
/// rules naming both family and type go into the kernel (unless an earlier refusal overlaps).
#[test]
fn socket_rules_match_and_compile() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.yaml",
        "apiVersion: countersign.dev/v1
labels:
  - name: a
    default: {outcome: deny}
    rules:
      - {name: no-raw-v6, socket: {family: [inet6], type: [raw]}, outcome: kill}
      - {name: ping, socket: {family: [inet, inet6], type: [dgram, raw]}, outcome: allow}
      - {name: vsock, socket: {family: [40]}, outcome: escalate}
",
    );
    let p = load(&[p]).unwrap_or_else(|e| panic!("{e}"));
    let socket = |family, sock_type| Action::Socket { family, sock_type };
    assert_eq!(outcome(&p, "a", &socket(2, 3)).0, Outcome::Allow);
    assert_eq!(outcome(&p, "a", &socket(10, 3)).0, Outcome::Kill);
    assert_eq!(outcome(&p, "a", &socket(40, 1)).0, Outcome::Escalate);
    assert_eq!(outcome(&p, "a", &socket(17, 3)).0, Outcome::Deny);
    // A connect rule never matches a socket, nor a socket rule a connect.
    assert_eq!(
        outcome(&p, "a", &connect("10.0.0.1", 443, None)).0,
        Outcome::Deny
    );
    let fast: Vec<(u16, u16)> = crate::policy::compile::socket_fast_path(&p)
        .into_iter()
        .map(|e| (e.family, e.sock_type))
        .collect();
    assert_eq!(fast, [(2, 2), (2, 3), (10, 2)], "inet6/raw stays refused");
}

/// Local-socket rules: the first rule naming a socket decides it in the kernel; an abstract
/// name hashes as the kernel hashes the bound name (trailing NULs of a padded bind ignored);
/// `unix_default` that holds puts the label in the hold-everything set.
#[test]
fn unix_rules_compile_for_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("svc.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let p = write(
        dir.path(),
        "p.yaml",
        &format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: a
    unix_default: {{outcome: escalate}}
    rules:
      - {{name: svc, unix: [{}, '@bus'], outcome: deny}}
      - {{name: svc-again, unix: [{}], outcome: allow}}
      - {{name: missing, unix: [/nonexistent/x.sock], outcome: deny}}
  - name: b
    rules:
      - {{name: ok, unix: ['@bus'], outcome: allow}}
",
            sock.display(),
            sock.display()
        ),
    );
    let p = load(&[p]).unwrap_or_else(|e| panic!("{e}"));
    let (entries, holding) = crate::policy::compile::unix_rules(&p);
    assert_eq!(holding, ["a"]);
    let a: Vec<_> = entries.iter().filter(|e| e.label == "a").collect();
    assert_eq!(
        a.len(),
        2,
        "the file once, the name once, the missing path not: {a:?}"
    );
    assert!(
        a.iter().all(|e| !e.allow),
        "the first rule (deny) wins: {a:?}"
    );
    let b: Vec<_> = entries.iter().filter(|e| e.label == "b").collect();
    assert!(b.len() == 1 && b[0].allow);
    assert_eq!(b[0].dev, countersign_ebpf::UNIX_ABSTRACT_DEV);
    // The kernel's hash of `\0bus` bound with the whole sockaddr_un (NUL-padded).
    let mut bound = [0u8; countersign_ebpf::UNIX_NAME_LEN];
    bound[1..4].copy_from_slice(b"bus");
    assert_eq!(
        b[0].ino,
        countersign_ebpf::abstract_hash(&bound, countersign_ebpf::UNIX_NAME_LEN)
    );
    assert_eq!(b[0].ino, countersign_ebpf::abstract_hash(&bound, 4));
    assert_ne!(
        b[0].ino,
        crate::policy::compile::abstract_name_hash("bux"),
        "another name"
    );
    // Rules match by file: another path to the same socket is the same socket.
    let alias = dir.path().join("alias.sock");
    std::os::unix::fs::symlink(&sock, &alias).unwrap();
    let by_alias = Action::Unix {
        file: crate::daemon::enrich::file_id(&alias),
        abstract_name: None,
        name: alias.display().to_string(),
    };
    assert_eq!(outcome(&p, "a", &by_alias).0, Outcome::Deny);
    let unnamed = Action::Unix {
        file: None,
        abstract_name: Some("other".into()),
        name: "@other".into(),
    };
    assert_eq!(outcome(&p, "a", &unnamed).0, Outcome::Escalate);
    assert_eq!(outcome(&p, "b", &unnamed), (Outcome::Allow, None));
}

#[test]
fn a_ladder_needs_the_rules_own_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let text = "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - exec: {binary: [/bin/true]}\n        outcome: escalate\n        escalate: {ladder: [{after: 1m, approvers: [oncall]}]}\n";
    let e = errors(dir.path(), text);
    assert!(e.contains("escalate.ladder needs escalate.timeout"), "{e}");
    let with_timeout = write(
        dir.path(),
        "timed.yaml",
        &text.replace("{ladder:", "{timeout: 10m, ladder:"),
    );
    let p = load(&[with_timeout]).expect("a ladder before the rule's timeout");
    let e = p.labels[0].rules[0].decision.escalation().unwrap();
    assert_eq!(e.timeout, Some(std::time::Duration::from_secs(600)));
    assert_eq!(e.on_timeout, None, "the daemon's timeout_action applies");
}

/// `listen:` rules match the address listened on and its port; every address (`0.0.0.0`)
/// only by a CIDR that holds it.
#[test]
fn listen_rules_match_the_address_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "l.yaml",
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    default: {outcome: deny}\n    rules:\n      - {name: any-8080, listen: {ports: [8080]}, outcome: allow}\n      - {name: inside, listen: {cidr: [10.0.0.0/8]}, outcome: escalate}\n",
    );
    let p = load(&[p]).unwrap();
    let listen = |addr: &str, port| Action::Listen {
        addr: addr.parse().unwrap(),
        port,
    };
    let rule = |a: &Action| outcome(&p, "a", a);
    assert_eq!(
        rule(&listen("0.0.0.0", 8080)),
        (Outcome::Allow, Some("any-8080".into()))
    );
    assert_eq!(
        rule(&listen("10.1.2.3", 22)),
        (Outcome::Escalate, Some("inside".into()))
    );
    // Every address is more than 10.0.0.0/8: the label's default.
    assert_eq!(rule(&listen("0.0.0.0", 22)), (Outcome::Deny, None));
    // A connect to the same address and port is another action.
    assert_eq!(rule(&connect("10.1.2.3", 8080, None)).0, Outcome::Deny);
}
