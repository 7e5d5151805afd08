//! Destination names learnt from DNS answers (issues 3 and 4): a real DNS responder on a
//! loopback address is the daemon's configured resolver; the labelled probe resolves a name
//! through it (a connected UDP socket, as the C library does) and connects to the answer.
//! `host:` rules decide by the learnt name, the held request shows it, and answers from a
//! server the host does not use teach nothing.
use std::net::Ipv4Addr;

use countersign_tests::{Daemon, Listener, WAIT, dns::DnsResponder};

use super::{EPERM, probe};

const RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 1);
/// The resolver of the second scenario (the scenarios run in parallel, each with its own).
const RESOLVER_2: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 3);
/// A server the probe may ask, but that is not the host's resolver.
const OTHER_SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 2);

fn start(dir: &std::path::Path, resolver: Ipv4Addr, extra_rules: &str) -> Daemon {
    let config = dir.join("daemon.yaml");
    std::fs::write(&config, format!("dns:\n  resolvers: [{resolver}]\n")).unwrap();
    let policy = dir.join("names.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: names
    default: {{outcome: deny}}
    rules:
      - {{name: the-probe, exec: {{binary: [{probe}]}}, outcome: allow}}
      - {{name: dns, connect: {{cidr: [127.0.53.0/24], ports: [53], protocol: udp}}, outcome: allow}}
      # The answer a program playing a resolver sends back (a datagram without connect).
      - {{name: dns-replies, connect: {{cidr: [127.0.0.1/32], ports: [1024-65535], protocol: udp}}, outcome: allow}}
      - {{name: no-paste, connect: {{host: ['*.paste.test']}}, outcome: deny}}
{extra_rules}      - {{name: api, connect: {{host: ['*.example.test']}}, outcome: allow}}
",
            probe = probe()
        ),
    )
    .unwrap();
    Daemon::start_with(&[
        "--config",
        config.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--request-timeout",
        "60",
    ])
}

fn resolve_connect(d: &Daemon, name: &str, server: Ipv4Addr, port: u16) -> (Option<i32>, String) {
    let mut p = d.labelled(
        "names",
        &[
            &probe(),
            "resolve-connect",
            name,
            &server.to_string(),
            &port.to_string(),
        ],
    );
    let code = p.wait(WAIT).code();
    (code, p.stdout())
}

/// `host:` rules match the name the program resolved; the same address without a learnt
/// name falls to the label's default; a name from another server is not learnt.
#[test]
fn host_rules_decide_by_the_name_the_host_resolver_gave() {
    let api = Listener::on("127.0.54.1");
    let paste = Listener::on("127.0.54.2");
    let planted = Listener::on("127.0.54.4");
    let _resolver = DnsResponder::start(
        RESOLVER,
        &[
            ("api.example.test", Ipv4Addr::new(127, 0, 54, 1)),
            ("x.paste.test", Ipv4Addr::new(127, 0, 54, 2)),
        ],
    );
    // The program's own server says bank.example.test is 127.0.54.4.
    let _other = DnsResponder::start(
        OTHER_SERVER,
        &[("bank.example.test", Ipv4Addr::new(127, 0, 54, 4))],
    );
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), RESOLVER, "");

    // The address before any answer named it: the default (deny).
    let mut p = d.labelled("names", &[&probe(), "connect", &api.addr()]);
    assert_eq!(p.wait(WAIT).code(), Some(1));
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
    assert!(!api.accepted());

    // Resolved through the host's resolver: `*.example.test` allows it.
    let (code, out) = resolve_connect(&d, "api.example.test", RESOLVER, api.port());
    assert_eq!(code, Some(0), "{out}\n{}", d.log());
    assert!(
        out.contains("resolved 127.0.54.1") && out.contains("connected"),
        "{out}"
    );
    assert!(api.accepted());

    // `*.paste.test` refuses.
    let (code, out) = resolve_connect(&d, "x.paste.test", RESOLVER, paste.port());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("error {EPERM}")), "{out}");
    assert!(!paste.accepted());

    // An answer from a server that is not the host's resolver plants no name.
    let (code, out) = resolve_connect(&d, "bank.example.test", OTHER_SERVER, planted.port());
    assert!(out.contains("resolved 127.0.54.4"), "{out}");
    assert_eq!(code, Some(1), "{out}");
    assert!(!planted.accepted());

    // Nor does a program that plays the host's resolver (its address, port 53) in a network
    // namespace of its own, where any address can be local.
    let own = Listener::on("127.0.54.6");
    let mut p = d.labelled(
        "names",
        &[
            &probe(),
            "answer-self",
            "own.example.test",
            "127.0.54.6",
            &RESOLVER.to_string(),
        ],
    );
    assert_eq!(p.wait(WAIT).code(), Some(0), "{}", p.stdout());
    assert!(p.stdout().contains("answered"), "{}", p.stdout());
    let mut p = d.labelled("names", &[&probe(), "connect", &own.addr()]);
    assert_eq!(p.wait(WAIT).code(), Some(1), "{}", d.log());
    assert_eq!(p.stdout().trim(), format!("error {EPERM}"));
    assert!(!own.accepted());

    let log = d.decisions();
    let decided = |dest: &str| {
        log.iter()
            .filter(|e| {
                e["request"]["destination"]
                    .as_str()
                    .is_some_and(|x| x.starts_with(dest))
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let api_log = decided("127.0.54.1:");
    assert_eq!(api_log.len(), 2, "{log:?}");
    assert!(
        api_log[0]["request"].get("destination_names").is_none(),
        "{api_log:?}"
    );
    assert_eq!(
        api_log[1]["request"]["destination_names"],
        serde_json::json!(["api.example.test"])
    );
    assert!(
        api_log[1]["by"].as_str().unwrap().contains("rule `api`"),
        "{api_log:?}"
    );
    let paste_log = decided("127.0.54.2:");
    assert!(
        paste_log[0]["by"]
            .as_str()
            .unwrap()
            .contains("rule `no-paste`"),
        "{paste_log:?}"
    );
    for planted in ["127.0.54.4:", "127.0.54.6:"] {
        let planted_log = decided(planted);
        assert!(
            planted_log[0]["request"].get("destination_names").is_none(),
            "{planted_log:?}"
        );
    }
    let status = d.status();
    assert!(
        status["dns"]["untrusted"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(status["dns"]["error"].is_null(), "{status}");
    // Kernels that run BPF LSM run `fentry` programs too, and so do the distribution kernels
    // the VMs boot without it: there, only UDP pays for the capture. The harness says which
    // kernels those are (the test host's runs no `fentry` program).
    let fentry = d.is_lsm() || std::env::var_os("COUNTERSIGN_E2E_FENTRY").is_some_and(|v| v == "1");
    let expected = if fentry {
        "kernel UDP paths (fentry)"
    } else {
        "cgroup programs"
    };
    assert_eq!(status["dns"]["capture"], expected, "{status}");
}

/// A held connect shows the name next to the address, in `requests list` and its JSON; the
/// approval is bound to the address, and the record keeps the name.
#[test]
fn a_held_connect_shows_its_learnt_name() {
    let ask = Listener::on("127.0.54.3");
    let _resolver = DnsResponder::start(
        RESOLVER_2,
        &[("ask.example.test", Ipv4Addr::new(127, 0, 54, 3))],
    );
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        RESOLVER_2,
        "      - {name: ask, connect: {host: [ask.example.test]}, outcome: escalate, escalate: {timeout: 60s, on_timeout: deny}}\n",
    );
    let mut p = d.labelled(
        "names",
        &[
            &probe(),
            "resolve-connect",
            "ask.example.test",
            &RESOLVER_2.to_string(),
            &ask.port().to_string(),
        ],
    );
    let r = d.wait_request("the held connect to ask.example.test", |r| {
        r["pid"] == p.pid() && r["kind"] == "connect"
    });
    assert_eq!(
        r["destination_names"],
        serde_json::json!(["ask.example.test"]),
        "{r}"
    );
    assert!(r["rule"].as_str().unwrap().contains("rule `ask`"), "{r}");
    let human = String::from_utf8_lossy(&d.cli(&["requests", "list"]).stdout).into_owned();
    // (The protocol follows the address where the hook knew it: `/tcp` in LSM mode.)
    let shown = format!("ask.example.test (DNS) → 127.0.54.3:{}", ask.port());
    assert!(human.contains(&shown), "{human}");
    assert!(!ask.accepted(), "held");
    d.decide(&r, "approve");
    assert_eq!(p.wait(WAIT).code(), Some(0));
    assert!(p.stdout().contains("connected"));
    assert!(ask.accepted());
    let log = d.decisions();
    let e = log
        .iter()
        .find(|e| e["request"]["id"] == r["id"] && e["decision"] == "approved")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(
        e["request"]["destination_names"],
        serde_json::json!(["ask.example.test"])
    );
}

/// A daemon escalating connects to `deploy.*.test` to `approver`, trusting `resolver`.
fn approver_daemon(
    approver: &countersign_tests::remote::Approver,
    dir: &std::path::Path,
    resolver: Ipv4Addr,
) -> Daemon {
    let config = approver.daemon_config(dir);
    let mut yaml = std::fs::read_to_string(&config).unwrap();
    yaml.push_str(&format!("dns:\n  resolvers: [{resolver}]\n"));
    std::fs::write(&config, yaml).unwrap();
    let policy = countersign_tests::remote::write_coder_policy(
        dir,
        &format!(
            "    default: {{outcome: deny}}
    rules:
      - {{name: the-probe, exec: {{binary: [{probe}]}}, outcome: allow}}
      - {{name: dns, connect: {{cidr: [127.0.53.0/24], ports: [53], protocol: udp}}, outcome: allow}}
      - name: deploys
        connect: {{host: ['deploy.*.test']}}
        outcome: escalate
        escalate: {{approvers: [dev], timeout: 60s, on_timeout: deny}}
",
            probe = probe()
        ),
    );
    approver.start_daemon(&config, &policy)
}

/// Through the remote approver: the Slack message and the approver's CLI show the name next
/// to the address, and a Slack approval releases the connect.
#[test]
fn the_approver_and_slack_show_the_learnt_name() {
    use countersign_tests::remote::{Approver, FakeSlack};
    const RESOLVER_3: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 5);
    let ask = Listener::on("127.0.54.5");
    let _resolver = DnsResponder::start(
        RESOLVER_3,
        &[("deploy.example.test", Ipv4Addr::new(127, 0, 54, 5))],
    );
    let slack = FakeSlack::start();
    let approver = Approver::start(Some(&slack));
    let dir = tempfile::tempdir().unwrap();
    let d = approver_daemon(&approver, dir.path(), RESOLVER_3);
    let mut p = d.labelled(
        "coder",
        &[
            &probe(),
            "resolve-connect",
            "deploy.example.test",
            &RESOLVER_3.to_string(),
            &ask.port().to_string(),
        ],
    );
    let shown = format!("deploy.example.test (DNS) → 127.0.54.5:{}", ask.port());
    let msg = slack.wait_message("deploy.example.test");
    assert!(msg.to_string().contains(&shown), "the Slack message: {msg}");
    let r = approver.wait_request("deploy.example.test");
    assert_eq!(
        r["request"]["destination_names"],
        serde_json::json!(["deploy.example.test"]),
        "{r}"
    );
    let out = approver.cli("bob", &["list"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains(&shown), "the approver's CLI: {human}");
    assert!(!ask.accepted(), "held");
    let a = slack.click(
        &approver.slack_request_url(),
        &msg["ts"],
        "approve",
        "UBOB",
        &serde_json::json!({}),
    );
    assert!(a.iter().all(|x| x["status"] == 200), "{a:?}");
    assert_eq!(p.wait(WAIT).code(), Some(0), "{}", d.log());
    assert!(p.stdout().contains("connected"));
    assert!(ask.accepted());
}

/// The Teams card shows the name next to the address; a card action approves.
#[test]
fn the_teams_card_shows_the_learnt_name() {
    use countersign_tests::remote::{Approver, FakeTeams};
    const RESOLVER_4: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 7);
    let ask = Listener::on("127.0.54.7");
    let _resolver = DnsResponder::start(
        RESOLVER_4,
        &[("deploy.teams.test", Ipv4Addr::new(127, 0, 54, 7))],
    );
    let teams = FakeTeams::start();
    let approver = Approver::start_with_teams(&teams);
    let dir = tempfile::tempdir().unwrap();
    let d = approver_daemon(&approver, dir.path(), RESOLVER_4);
    let mut p = d.labelled(
        "coder",
        &[
            &probe(),
            "resolve-connect",
            "deploy.teams.test",
            &RESOLVER_4.to_string(),
            &ask.port().to_string(),
        ],
    );
    let card = teams.wait_card("deploy.teams.test");
    let shown = format!("deploy.teams.test (DNS) → 127.0.54.7:{}", ask.port());
    assert!(card.to_string().contains(&shown), "the Teams card: {card}");
    let id = card["attachments"][0]["content"]["actions"][0]["data"]["id"]
        .as_i64()
        .unwrap();
    let bot = format!("{}/teams/messages", approver.url());
    let (status, body) = teams.invoke(
        &bot,
        &card,
        id,
        "approve",
        "aad-bob",
        &serde_json::json!({}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(p.wait(WAIT).code(), Some(0), "{}", d.log());
    assert!(ask.accepted());
}
