//! The approver's web page in a real browser (headless Chromium through chromedriver),
//! natively: sign-in with an approver token, the held request with its full context, a
//! refused self-approval, an approval with a reason that releases the exec, the history.
use std::{path::Path, time::Duration};

use countersign_tests::{
    Daemon, WAIT,
    browser::Browser,
    probe_bin,
    remote::{Approver, token_of},
};

fn probe() -> String {
    probe_bin().to_str().expect("utf-8 path").to_owned()
}

#[test]
fn approve_in_the_web_page() {
    let approver = Approver::start(None);
    let dir = tempfile::tempdir().unwrap();
    let policy = countersign_tests::remote::coder_policy(dir.path(), 1, false, "120s", "");
    let config = approver.daemon_config(dir.path());
    let d = Daemon::start_with(&["--config", config.to_str().unwrap(), "--policy", &policy]);
    let m = d
        .dir()
        .join("ran-from-the-web")
        .to_str()
        .unwrap()
        .to_owned();
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = approver.wait_request(&m);
    let id = r["id"].as_i64().unwrap();

    let b = Browser::start();
    b.goto(&format!("{}/requests", approver.url()));
    // Signed-out visitors are sent to sign in.
    b.wait_url("/login");
    b.type_into("#token", "not-a-token");
    b.click("#signin");
    b.wait_source("Unknown token");

    // The agent's owner signs in and sees the request, but cannot approve it.
    b.goto(&format!("{}/login", approver.url()));
    b.type_into("#token", &token_of("alice"));
    b.click("#signin");
    let shown = b.text(&format!("#request-{id}"));
    for s in [
        m.as_str(),
        "coder",
        "works for alice@example.com",
        "run-the-probe",
        "1 approval(s) from dev",
    ] {
        assert!(shown.contains(s), "the page shows {s}: {shown}");
    }
    b.click(&format!("#approve-{id}"));
    b.wait_source("and cannot approve its actions");
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "still held"
    );
    b.click("nav button");
    b.wait_url("/login");

    // Bob approves, with a reason.
    b.type_into("#token", &token_of("bob"));
    b.click("#signin");
    b.type_into(&format!("#reason-{id}"), "looks right");
    b.click(&format!("#approve-{id}"));
    assert!(
        b.text("#flash").contains("decided: approve"),
        "{}",
        b.source()
    );
    if let Ok(dir) = std::env::var("COUNTERSIGN_SCREENSHOTS") {
        use base64_png::decode;
        std::fs::write(
            Path::new(&dir).join("web-decided.png"),
            decode(&b.screenshot()),
        )
        .unwrap();
    }
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    assert!(Path::new(&m).exists());
    b.goto(&format!("{}/requests", approver.url()));
    let history = b.source();
    assert!(
        history.contains("none-pending") && history.contains("bob approve via web"),
        "{history}"
    );
    let log = d.decisions();
    assert!(
        log.iter().any(|e| e["by"] == "approver: bob via web"),
        "{log:?}"
    );
}

/// Minimal base64 decoding for the optional screenshot (no extra dependency).
mod base64_png {
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let bytes: Vec<u8> = s
            .bytes()
            .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
            .map(val)
            .collect();
        bytes
            .chunks(4)
            .flat_map(|c| {
                let n = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
                let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
                out[..c.len().saturating_sub(1)].to_vec()
            })
            .collect()
    }
}
