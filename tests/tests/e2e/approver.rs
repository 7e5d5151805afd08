//! Remote approver scenarios: the real daemon escalates to a real `countersign approver`,
//! which posts to the local Slack stand-in; people answer by Slack buttons (signed callbacks)
//! and through the CLI/API, and the held action runs only after a signed decision.
use std::{path::Path, time::Duration};

use countersign_tests::{
    Daemon, WAIT,
    remote::{Approver, FakeSlack, FakeTeams, coder_policy},
};
use serde_json::json;

use super::{marker, probe};

/// A policy whose `coder` label works for alice and escalates every exec of the probe to
/// group `dev` with `quorum`.
fn policy(dir: &Path, quorum: u32, justification: bool, timeout: &str) -> String {
    policy_with(dir, quorum, justification, timeout, "")
}

/// Like [`policy`], with more `escalate:` settings (`extra` starts with `, `).
fn policy_with(dir: &Path, quorum: u32, justification: bool, timeout: &str, extra: &str) -> String {
    coder_policy(dir, quorum, justification, timeout, extra)
}

fn start_daemon(approver: &Approver, dir: &Path, policy: &str) -> Daemon {
    approver.start_daemon(&approver.daemon_config(dir), policy)
}

/// The whole path: held exec → Slack message with the full context → refused clicks (the
/// agent's owner, a forged signature, a stale timestamp) change nothing → bob's signed click
/// approves (a retried delivery counts once) → the program runs → the message is updated.
#[test]
fn slack_click_approves_a_held_exec() {
    let slack = FakeSlack::start();
    let approver = Approver::start(Some(&slack));
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, false, "60s");
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-after-slack");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);

    let msg = slack.wait_message(&m);
    let text = msg.to_string();
    for shown in [
        "coder",
        "alice@example.com",
        "run-the-probe",
        "touch",
        "Approve",
        "Deny",
    ] {
        assert!(text.contains(shown), "the message shows {shown}: {text}");
    }
    let url = approver.slack_request_url();
    let ts = &msg["ts"];

    // The person the agent works for cannot approve it.
    slack.click(&url, ts, "approve", "UALICE", &json!({}));
    slack.wait_reply("works for");
    // Forged and stale callbacks are refused outright.
    let a = slack.click(&url, ts, "approve", "UBOB", &json!({"forge": true}));
    assert_eq!(a[0]["status"], 401, "{a:?}");
    let a = slack.click(&url, ts, "approve", "UBOB", &json!({"age_secs": 600}));
    assert_eq!(a[0]["status"], 401, "{a:?}");
    // Someone outside the group asked.
    slack.click(&url, ts, "approve", "UDAVE", &json!({}));
    slack.wait_reply("not in the group");
    // A Slack user who is no approver at all.
    slack.click(&url, ts, "approve", "UMALLORY", &json!({}));
    slack.wait_reply("not a configured approver");
    assert!(
        p.still_running_after(Duration::from_millis(500)),
        "still held"
    );
    assert!(!Path::new(&m).exists(), "nothing ran");

    // Bob approves; Slack delivers the callback twice.
    let a = slack.click(&url, ts, "approve", "UBOB", &json!({"repeat": 2}));
    assert!(a.iter().all(|x| x["status"] == 200), "{a:?}");
    assert!(p.wait(WAIT).success(), "{}", d.log());
    assert!(Path::new(&m).exists(), "the approved program ran");

    let log = d.decisions();
    let e = log
        .iter()
        .find(|e| e["decision"] == "approved")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(e["by"], "approver: bob via slack", "{e}");
    assert_eq!(
        d.status()["approver"]["received"],
        1,
        "one decision, delivered once"
    );

    // The message now says who approved, and has no buttons left.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = slack
            .messages()
            .into_iter()
            .find(|x| x["ts"] == *ts)
            .unwrap();
        let t = now["blocks"].to_string();
        if t.contains("APPROVED") {
            assert!(t.contains("bob approve via slack"), "{t}");
            assert!(
                !t.contains("\"actions\""),
                "no buttons after the decision: {t}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "message not updated: {now}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = approver.requests("bob", "all");
    assert_eq!(r[0]["state"], "approved");
    assert_eq!(r[0]["answers"].as_array().unwrap().len(), 1, "{r:?}");

    // The host's signed records embed the approver's signed decision: they verify offline
    // with the host's and the approver's public keys, and not without the approver's.
    let verify = |approver_key: bool| {
        let mut c = std::process::Command::new(countersign_tests::countersign_bin());
        c.args(["records", "verify"])
            .arg(d.spool_dir())
            .arg("--key")
            .arg(d.dir().join("host.key.pub"));
        if approver_key {
            c.arg("--approver-key")
                .arg(approver.key_path().with_extension("key.pub"));
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = verify(true);
    assert!(ok && text.contains("0 self-approvals"), "{text}");
    let (ok, text) = verify(false);
    assert!(
        !ok,
        "an approver decision signed by an unknown key fails: {text}"
    );
}

/// A rule that asks for a reason: the button opens Slack's modal; only its submission, with
/// the reason, answers.
#[test]
fn slack_asks_for_a_reason_when_the_rule_requires_one() {
    let slack = FakeSlack::start();
    let approver = Approver::start(Some(&slack));
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, true, "60s");
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-with-reason");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let msg = slack.wait_message(&m);
    let url = approver.slack_request_url();
    slack.click(&url, &msg["ts"], "deny", "UCAROL", &json!({}));
    let views = slack.views();
    assert_eq!(views.len(), 1, "a modal opened: {views:?}");
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "a click alone does not answer"
    );
    let a = slack.submit(&url, &views[0]["id"], "UCAROL", "not during the freeze");
    assert_eq!(a[0]["status"], 200, "{a:?}");
    let s = p.wait(WAIT);
    assert!(!s.success(), "denied");
    assert!(!Path::new(&m).exists());
    let r = approver.requests("bob", "all");
    assert_eq!(r[0]["state"], "denied");
    assert_eq!(r[0]["answers"][0]["justification"], "not during the freeze");
}

/// Quorum of two through the CLI, a refused outsider, a double answer, and an approver
/// restart with the request pending: nothing is lost, and the second approval releases it.
/// Then a deny vetoes an earlier approval.
#[test]
fn quorum_of_two_survives_an_approver_restart_and_a_deny_vetoes() {
    let mut approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 2, false, "60s");
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-with-quorum");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = approver.wait_request(&m);
    let id = r["id"].to_string();
    assert_eq!(r["on_behalf_of"], "alice@example.com");
    assert_eq!(r["quorum"], 2);

    let out = approver.cli("bob", &["approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 of 2"),
        "{out:?}"
    );
    let out = approver.cli("bob", &["approve", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("answered already"),
        "{out:?}"
    );
    let out = approver.cli("dave", &["approve", &id]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the group"),
        "{out:?}"
    );
    let out = approver.cli("alice", &["approve", &id]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("works for"),
        "{out:?}"
    );
    let out = approver.cli("nobody", &["list"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown approver token"),
        "{out:?}"
    );

    approver.crash_and_restart();
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "still held"
    );
    let pending = approver.requests("carol", "pending");
    assert_eq!(
        pending.len(),
        1,
        "the request survived the restart: {pending:?}"
    );
    assert_eq!(pending[0]["answers"][0]["approver"], "bob");

    let out = approver.cli("carol", &["approve", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("decided: approve"),
        "{out:?}"
    );
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    assert!(Path::new(&m).exists());

    let m2 = marker(&d, "vetoed");
    let mut p2 = d.labelled("coder", &[&probe(), "touch", &m2]);
    let r2 = approver.wait_request(&m2);
    let id2 = r2["id"].to_string();
    assert!(approver.cli("bob", &["approve", &id2]).status.success());
    let out = approver.cli("carol", &["deny", &id2]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("decided: deny"),
        "{out:?}"
    );
    assert!(!p2.wait(WAIT).success(), "denied");
    assert!(!Path::new(&m2).exists());
    let late = approver.cli("carol", &["approve", &id2]);
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("already"),
        "{late:?}"
    );
}

/// The approver is gone: the request stays held (never released by an error) until its
/// deadline, then gets the rule's timeout outcome; status names the problem.
#[test]
fn unreachable_approver_means_the_timeout_outcome() {
    let mut approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, false, "3s");
    let d = start_daemon(&approver, dir.path(), &policy);
    approver.stop();
    let m = marker(&d, "never");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    assert!(
        p.still_running_after(Duration::from_millis(1500)),
        "held while the approver is away"
    );
    assert!(!p.wait(WAIT).success(), "denied at the deadline");
    assert!(!Path::new(&m).exists());
    let log = d.decisions();
    assert!(
        log.iter().any(|e| e["decision"] == "expired-denied"),
        "{log:?}"
    );
    let status = d.status();
    assert!(status["approver"]["last_error"].is_string(), "{status}");
}

/// Nobody in `dev` answers: reminders go to the request's Slack thread, and after the
/// ladder's step `ops` may answer too (before it, an ops approver is refused).
#[test]
fn reminders_and_the_ladder_bring_in_the_next_group() {
    let slack = FakeSlack::start();
    let approver = Approver::start(Some(&slack));
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_with(
        dir.path(),
        1,
        false,
        "60s",
        ", remind: 1s, ladder: [{after: 3s, approvers: [ops]}]",
    );
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-after-ladder");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let msg = slack.wait_message(&m);
    let url = approver.slack_request_url();
    slack.click(&url, &msg["ts"], "approve", "UDAVE", &json!({}));
    slack.wait_reply("not in the group");
    assert!(p.still_running_after(Duration::from_millis(200)));
    let thread = |needle: &str| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if slack.messages().iter().any(|x| {
                x["thread_ts"] == msg["ts"]
                    && x["text"].as_str().is_some_and(|t| t.contains(needle))
            }) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no thread reply with {needle}: {:?}",
                slack.messages()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    thread("Reminder");
    thread("escalated to ops");
    slack.click(&url, &msg["ts"], "approve", "UDAVE", &json!({}));
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    assert!(Path::new(&m).exists());
    let r = approver.requests("bob", "all");
    assert_eq!(r[0]["answers"][0]["approver"], "dave");
}

/// Teams: the Adaptive Card shows the request; invokes with a forged, expired or
/// wrong-audience Bot Framework token are refused; the owner cannot approve; bob's click
/// (identity from aadObjectId) approves, his card is refreshed, and the posted card is updated
/// for everyone; the notification-only webhook got a card with a link to the web page.
#[test]
fn teams_card_action_approves_a_held_exec() {
    let teams = FakeTeams::start();
    let approver = Approver::start_with_teams(&teams);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, false, "60s");
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-after-teams");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let card = teams.wait_card(&m);
    let text = card.to_string();
    for shown in [
        "coder",
        "alice@example.com",
        "run-the-probe",
        "Action.Execute",
        "approve",
    ] {
        assert!(text.contains(shown), "the card shows {shown}: {text}");
    }
    let id = card["attachments"][0]["content"]["actions"][0]["data"]["id"]
        .as_i64()
        .unwrap();
    let bot = format!("{}/teams/messages", approver.url());
    for forge in ["key", "audience", "expired"] {
        let (status, body) = teams.invoke(
            &bot,
            &card,
            id,
            "approve",
            "aad-bob",
            &json!({"forge": forge}),
        );
        assert_eq!(status, 401, "{forge}: {body}");
    }
    let (_, body) = teams.invoke(&bot, &card, id, "approve", "aad-alice", &json!({}));
    assert!(
        body["value"]
            .as_str()
            .is_some_and(|t| t.contains("works for")),
        "{body}"
    );
    let (_, body) = teams.invoke(&bot, &card, id, "approve", "aad-mallory", &json!({}));
    assert!(
        body["value"]
            .as_str()
            .is_some_and(|t| t.contains("not a configured approver")),
        "{body}"
    );
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "still held"
    );

    let (status, body) = teams.invoke(&bot, &card, id, "approve", "aad-bob", &json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["type"], "application/vnd.microsoft.card.adaptive",
        "a refreshed card: {body}"
    );
    assert!(body["value"].to_string().contains("approved"), "{body}");
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    assert!(Path::new(&m).exists());
    let log = d.decisions();
    assert!(
        log.iter().any(|e| e["by"] == "approver: bob via teams"),
        "{log:?}"
    );

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let st = teams.state();
        let posted = st["activities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == card["id"])
            .unwrap()
            .clone();
        let now = posted["attachments"].to_string();
        if now.contains("approved") {
            assert!(
                !now.contains("Action.Execute"),
                "no buttons once decided: {now}"
            );
            let hook = st["webhook"].to_string();
            assert!(
                hook.contains(&format!("/requests/{id}")) && !hook.contains("Action.Execute"),
                "{hook}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "card not updated: {posted}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The same path over TLS: the daemon and the CLI trust the approver's (self-signed)
/// certificate through `ca_file`; without it the CLI refuses to talk.
#[test]
fn approver_over_tls() {
    let approver = Approver::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, false, "60s");
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-over-tls");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = approver.wait_request(&m);
    let id = r["id"].to_string();
    let untrusted = std::process::Command::new(countersign_tests::countersign_bin())
        .args(["requests", "list", "--approver", &approver.url()])
        .env(
            "COUNTERSIGN_APPROVER_TOKEN",
            countersign_tests::remote::token_of("bob"),
        )
        .output()
        .unwrap();
    assert!(
        !untrusted.status.success(),
        "an unknown certificate is refused"
    );
    let out = approver.cli("bob", &["approve", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("decided: approve"),
        "{out:?}"
    );
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    assert!(Path::new(&m).exists());
}

/// Socket Mode: the approver opens the WebSocket itself (no inbound callbacks at all); a
/// click arrives as an envelope, is acknowledged, and approves; after Slack's `disconnect`
/// the approver reconnects and keeps working.
#[test]
fn slack_socket_mode_approves_without_inbound_callbacks() {
    let slack = FakeSlack::start();
    let approver = Approver::start_socket_mode(&slack);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, false, "60s");
    let d = start_daemon(&approver, dir.path(), &policy);
    let wait_connections = |n: u64| {
        let deadline = std::time::Instant::now() + WAIT;
        while slack.connections() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "no Socket Mode connection {n}:\n{}",
                approver.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_connections(1);
    // The HTTP callback route is closed without a signing secret.
    let url = approver.slack_request_url();
    let m0 = marker(&d, "first");
    let mut p0 = d.labelled("coder", &[&probe(), "touch", &m0]);
    let msg0 = slack.wait_message(&m0);
    let a = slack.click(&url, &msg0["ts"], "approve", "UBOB", &json!({}));
    assert_eq!(a[0]["status"], 404, "{a:?}");
    let a = slack.click(
        &url,
        &msg0["ts"],
        "approve",
        "UBOB",
        &json!({"socket": true}),
    );
    assert_eq!(a[0]["status"], 200, "acknowledged: {a:?}");
    assert!(
        a[0]["body"].as_str().unwrap().contains("envelope_id"),
        "{a:?}"
    );
    assert!(p0.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());

    slack.disconnect();
    wait_connections(2);
    let m = marker(&d, "second");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let msg = slack.wait_message(&m);
    slack.click(
        &url,
        &msg["ts"],
        "approve",
        "UALICE",
        &json!({"socket": true}),
    );
    slack.wait_reply("works for");
    let a = slack.click(
        &url,
        &msg["ts"],
        "approve",
        "UCAROL",
        &json!({"socket": true}),
    );
    assert_eq!(a[0]["status"], 200, "{a:?}");
    assert!(p.wait(WAIT).success());
    assert!(Path::new(&m).exists());
}

/// People and groups are synced from the configuration file on SIGHUP: a newly added
/// approver can answer without a restart; a broken file changes nothing.
#[test]
fn approvers_are_reloaded_from_the_file() {
    let approver = Approver::start(None);
    let erin = countersign_tests::remote::token_of("erin");
    let list = |who: &str| approver.cli(who, &["list"]);
    assert!(!list("erin").status.success(), "erin is unknown at first");
    let original = std::fs::read_to_string(approver.config_path()).unwrap();
    let added = original.replacen(
        "approvers:\n",
        &format!(
            "approvers:\n  - name: erin\n    tokens: [{}]\n",
            countersign_tests::remote::sha256(&erin)
        ),
        1,
    );
    std::fs::write(
        approver.config_path(),
        added.replace("dev: [alice, bob, carol]", "dev: [alice, bob, carol, erin]"),
    )
    .unwrap();
    approver.reload();
    let deadline = std::time::Instant::now() + WAIT;
    while !list("erin").status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "erin was not added:\n{}",
            approver.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A file with an error: reported, and the configuration in force stays.
    std::fs::write(
        approver.config_path(),
        "approvers: [{name: erin, bogus: 1}]\n",
    )
    .unwrap();
    approver.reload();
    let deadline = std::time::Instant::now() + WAIT;
    while !approver.log().contains("configuration reload failed") {
        assert!(std::time::Instant::now() < deadline, "{}", approver.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(list("erin").status.success() && list("bob").status.success());
}

/// Grants: bob approves with "this binary for 10m" (a Slack button); the label's next exec of
/// that binary runs without a human (recorded as allowed by the grant); bob revokes it from
/// the Slack message and the next exec waits for a human again. Then the same through the
/// CLI (`--grant binary`), revoked on the host itself.
#[test]
fn a_grant_answers_later_execs_until_it_is_revoked() {
    let slack = FakeSlack::start();
    let approver = Approver::start(Some(&slack));
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_with(
        dir.path(),
        1,
        false,
        "60s",
        ", grants: [{scope: binary, for: 10m}, {scope: destination, for: 10m}]",
    );
    let d = start_daemon(&approver, dir.path(), &policy);
    let url = approver.slack_request_url();
    let m1 = marker(&d, "first");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m1]);
    let msg = slack.wait_message(&m1);
    let text = msg.to_string();
    assert!(
        text.contains("this binary for 10m"),
        "the grant is offered: {text}"
    );
    assert!(
        !text.contains("this destination"),
        "a connect grant is not offered for an exec: {text}"
    );
    let a = slack.click(&url, &msg["ts"], "grant_0", "UBOB", &json!({}));
    assert_eq!(a[0]["status"], 200, "{a:?}");
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    let listed = String::from_utf8_lossy(&d.cli(&["grants", "list"]).stdout).into_owned();
    assert!(
        listed.contains("g-1") && listed.contains("label=coder"),
        "{listed}"
    );

    // Covered by the grant: no human, no Slack message. The kernel answers it (see
    // e2e/kgrants.rs): the daemon does not even see it.
    let m2 = marker(&d, "second");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m2]);
    assert!(p.wait(WAIT).success(), "{}", d.log());
    assert!(Path::new(&m2).exists());
    assert!(!slack.messages().iter().any(|x| x.to_string().contains(&m2)));
    assert!(d.status()["grant_allowed"].as_u64().unwrap() >= 1);
    let log = d.decisions();
    assert!(!log.iter().any(|e| e.to_string().contains(&m2)), "{log:?}");

    // Revoked from the Slack message: a human decides again.
    let deadline = std::time::Instant::now() + WAIT;
    let revoke_ts = loop {
        let m = slack
            .messages()
            .into_iter()
            .find(|x| x["ts"] == msg["ts"])
            .unwrap();
        if m["blocks"].to_string().contains("Revoke grant") {
            break m["ts"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no revoke button: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    slack.click(&url, &revoke_ts, "revoke", "UCAROL", &json!({}));
    slack.wait_reply("revoked");
    let deadline = std::time::Instant::now() + WAIT;
    while String::from_utf8_lossy(&d.cli(&["grants", "list"]).stdout).contains("g-1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the host kept the grant:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m3 = marker(&d, "third");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m3]);
    let r = approver.wait_request(&m3);
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "held again"
    );

    // The CLI gives a grant; the host revokes it locally.
    let id = r["id"].to_string();
    let out = approver.cli("bob", &["approve", &id, "--grant", "tree"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("offers no `tree` grant"),
        "{out:?}"
    );
    let out = approver.cli("bob", &["approve", &id, "--grant", "binary"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("decided: approve"),
        "{out:?}"
    );
    assert!(p.wait(WAIT).success());
    let grant = format!("g-{id}");
    let deadline = std::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&d.cli(&["grants", "list"]).stdout).contains(&grant) {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = d.cli(&["grants", "revoke", &grant]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spool_records = std::process::Command::new(countersign_tests::countersign_bin())
        .args(["records", "verify"])
        .arg(d.spool_dir())
        .arg("--key")
        .arg(d.dir().join("host.key.pub"))
        .arg("--approver-key")
        .arg(approver.key_path().with_extension("key.pub"))
        .output()
        .unwrap();
    assert!(spool_records.status.success(), "{spool_records:?}");
}

/// Separation of duties by every identity: bob's approver entry has no email, yet a request
/// on behalf of bob@example.com is his and he cannot approve it; carol can.
#[test]
fn the_person_behind_a_request_cannot_approve_it_under_another_identity() {
    let approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 1, false, "60s");
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        text.replace(
            "on_behalf_of: alice@example.com",
            "on_behalf_of: bob@example.com",
        ),
    )
    .unwrap();
    let d = start_daemon(&approver, dir.path(), &policy);
    let m = marker(&d, "ran-for-bob");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = approver.wait_request(&m);
    assert_eq!(r["on_behalf_of"], "bob@example.com");
    let id = r["id"].to_string();
    let out = approver.cli("bob", &["approve", &id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("works for") && err.contains("bob@example.com is bob"),
        "{err}"
    );
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "bob's answer did not count"
    );
    let out = approver.cli("carol", &["approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(p.wait(WAIT).success());
    assert!(Path::new(&m).exists());
    // The records, with carol's signed decision, verify clean.
    let out = std::process::Command::new(countersign_tests::countersign_bin())
        .args(["records", "verify"])
        .arg(d.spool_dir())
        .arg("--key")
        .arg(d.host_pub())
        .arg("--approver-key")
        .arg(approver.key_path().with_extension("key.pub"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("0 self-approvals"), "{report}");
}
