//! Harness for the remote approver scenarios: a real `countersign approver` on loopback with
//! its own SQLite file and key, and `fake-slack`, the local stand-in for Slack. Both are
//! killed on drop; a failing test prints their logs.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use sha2::Digest as _;

use crate::{Proc, WAIT, countersign_bin};

/// The Slack workspace, channel and secrets the scenarios use.
pub const TEAM: &str = "T0COUNTER";
pub const CHANNEL: &str = "C0APPROVALS";
pub const BOT_TOKEN: &str = "xoxb-local-test-token";
pub const SIGNING_SECRET: &str = "local-test-signing-secret";
pub const APP_TOKEN: &str = "xapp-local-test-app-token";
pub const ENROLL_TOKEN: &str = "enroll-once-0123456789";
/// A self-signed TLS certificate and key for 127.0.0.1 (test fixture, not a secret).
const TEST_TLS_CERT: &str = include_str!("../../agent/src/collector/testdata/cert.pem");
const TEST_TLS_KEY: &str = include_str!("../../agent/src/collector/testdata/key.pem");

/// The Teams bot and conversation the scenarios use.
pub const TEAMS_APP_ID: &str = "00000000-0000-4000-8000-c0c0a11ce5e5";
pub const TEAMS_APP_PASSWORD: &str = "local-test-bot-secret";
pub const TEAMS_CONVERSATION: &str = "19:approvals@thread.tacv2";

/// Lowercase hex SHA-256 (how tokens are configured).
#[must_use]
pub fn sha256(s: &str) -> String {
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The API token of a test approver.
#[must_use]
pub fn token_of(name: &str) -> String {
    format!("token-of-{name}-0123456789")
}

#[must_use]
pub fn fake_slack_bin() -> PathBuf {
    std::env::var_os("COUNTERSIGN_FAKE_SLACK").map_or_else(
        || {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .join("fake-slack")
        },
        PathBuf::from,
    )
}

/// Writes `coder.yaml` in `dir`: label `coder` works for alice and escalates every exec of the
/// probe to group `dev` with these settings (`extra`: more `escalate:` keys, starting with
/// `, `); its path.
#[must_use]
pub fn coder_policy(
    dir: &Path,
    quorum: u32,
    justification: bool,
    timeout: &str,
    extra: &str,
) -> String {
    write_coder_policy(
        dir,
        &format!(
            "    rules:
      - name: run-the-probe
        exec: {{binary: [{probe}]}}
        outcome: escalate
        escalate: {{approvers: [dev], quorum: {quorum}, justification: {justification}, timeout: {timeout}, on_timeout: deny{extra}}}
",
            probe = crate::probe_bin().display()
        ),
    )
}

/// Writes `coder.yaml` in `dir`: label `coder`, working for alice, with `body` (its further
/// keys, indented by four spaces: `default:`, `rules:`); its path.
#[must_use]
pub fn write_coder_policy(dir: &Path, body: &str) -> String {
    let path = dir.join("coder.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: countersign.dev/v1
labels:
  - name: coder
    on_behalf_of: alice@example.com
{body}"
        ),
    )
    .expect("policy file");
    path.to_str().expect("utf-8 path").to_owned()
}

/// A free TCP port on loopback (bound, then released).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One HTTP/1.1 request over a plain TCP connection; (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    // Read the head, then exactly the body (servers may keep the connection open).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
        assert!(n > 0, "{addr} closed the connection before answering");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer from {addr}: {head}"));
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &buf[head_end..];
        let done = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let body = if chunked { dechunk(&body) } else { body };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// JSON request; (status, JSON body or Null).
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Value) {
    let mut h = Vec::new();
    if !body.is_null() {
        h.push(("Content-Type", "application/json"));
    }
    h.extend_from_slice(headers);
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, text) = http(addr, method, path, &h, &text);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The local Slack stand-in.
pub struct FakeSlack {
    _proc: Proc,
    pub addr: String,
}

impl FakeSlack {
    #[must_use]
    pub fn start() -> Self {
        let child = Command::new(fake_slack_bin())
            .args([BOT_TOKEN, SIGNING_SECRET, CHANNEL, APP_TOKEN])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", fake_slack_bin().display()));
        let mut proc = Proc { child };
        let mut line = String::new();
        BufReader::new(proc.child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("fake-slack's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("fake-slack said {line:?}"))
            .to_owned();
        Self { _proc: proc, addr }
    }

    /// Every message posted so far.
    #[must_use]
    pub fn messages(&self) -> Vec<Value> {
        let (_, v) = http_json(&self.addr, "GET", "/_test/messages", &[], &Value::Null);
        v["messages"].as_array().cloned().unwrap_or_default()
    }

    /// Socket Mode connections opened so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        let (_, v) = http_json(&self.addr, "GET", "/_test/messages", &[], &Value::Null);
        v["connections"].as_u64().unwrap_or(0)
    }

    /// Sends Slack's `disconnect` (refresh) message on the Socket Mode connection.
    pub fn disconnect(&self) {
        let (status, _) = http_json(
            &self.addr,
            "POST",
            "/_test/disconnect",
            &[],
            &serde_json::json!({}),
        );
        assert_eq!(status, 200);
    }

    /// Every modal opened so far.
    #[must_use]
    pub fn views(&self) -> Vec<Value> {
        let (_, v) = http_json(&self.addr, "GET", "/_test/messages", &[], &Value::Null);
        v["views"].as_array().cloned().unwrap_or_default()
    }

    /// Waits for an ephemeral reply (to a clicking user) containing `needle`.
    pub fn wait_reply(&self, needle: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, v) = http_json(&self.addr, "GET", "/_test/messages", &[], &Value::Null);
            if let Some(r) = v["responses"].as_array().into_iter().flatten().find(|r| {
                r["message"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(needle))
            }) {
                assert_eq!(r["message"]["response_type"], "ephemeral", "{r}");
                return r.clone();
            }
            assert!(Instant::now() < deadline, "no reply with {needle:?}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a message whose text contains `needle`.
    pub fn wait_message(&self, needle: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(m) = self
                .messages()
                .into_iter()
                .find(|m| m.to_string().contains(needle))
            {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no Slack message with {needle:?}: {:?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A user clicks a button of message `ts`; the answers of the request URL.
    pub fn click(
        &self,
        request_url: &str,
        ts: &Value,
        action: &str,
        user: &str,
        extra: &Value,
    ) -> Vec<Value> {
        let mut body = serde_json::json!({"request_url": request_url, "ts": ts, "action_id": action, "team": TEAM, "user": user});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (status, v) = http_json(&self.addr, "POST", "/_test/click", &[], &body);
        assert_eq!(status, 200, "fake-slack click: {v}");
        v["answers"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("click failed: {v}"))
    }

    /// Submits the open modal `view_id` with a reason.
    pub fn submit(
        &self,
        request_url: &str,
        view_id: &Value,
        user: &str,
        reason: &str,
    ) -> Vec<Value> {
        let body = serde_json::json!({"request_url": request_url, "view_id": view_id, "team": TEAM, "user": user, "reason": reason});
        let (_, v) = http_json(&self.addr, "POST", "/_test/submit", &[], &body);
        v["answers"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("submit failed: {v}"))
    }
}

#[must_use]
pub fn fake_teams_bin() -> PathBuf {
    std::env::var_os("COUNTERSIGN_FAKE_TEAMS").map_or_else(
        || fake_slack_bin().with_file_name("fake-teams"),
        PathBuf::from,
    )
}

/// The local stand-in for Teams' Bot Framework.
pub struct FakeTeams {
    _proc: Proc,
    pub addr: String,
}

impl FakeTeams {
    #[must_use]
    pub fn start() -> Self {
        let child = Command::new(fake_teams_bin())
            .args([TEAMS_APP_ID, TEAMS_APP_PASSWORD, TEAMS_CONVERSATION])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", fake_teams_bin().display()));
        let mut proc = Proc { child };
        let mut line = String::new();
        BufReader::new(proc.child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("fake-teams' first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("fake-teams said {line:?}"))
            .to_owned();
        Self { _proc: proc, addr }
    }

    /// Posted activities (with their edit history) and webhook posts.
    #[must_use]
    pub fn state(&self) -> Value {
        http_json(&self.addr, "GET", "/_test/state", &[], &Value::Null).1
    }

    /// Waits for a posted card whose content contains `needle`.
    pub fn wait_card(&self, needle: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(a) = self.state()["activities"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["attachments"].to_string().contains(needle))
            {
                return a.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no Teams card with {needle:?}: {}",
                self.state()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A click on a card's button by the user with AAD object id `aad`; (status, body).
    pub fn invoke(
        &self,
        bot_url: &str,
        activity: &Value,
        id: i64,
        verb: &str,
        aad: &str,
        extra: &Value,
    ) -> (u64, Value) {
        let mut body = serde_json::json!({"bot_url": bot_url, "activity_id": activity["id"], "id": id, "verb": verb, "aad": aad});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (_, v) = http_json(&self.addr, "POST", "/_test/invoke", &[], &body);
        (v["status"].as_u64().unwrap_or(0), v["body"].clone())
    }
}

/// A running `countersign approver` with four people: alice (the agent's owner in the
/// scenarios), bob and carol in group `dev`, dave in group `ops`.
pub struct Approver {
    proc: Proc,
    dir: tempfile::TempDir,
    pub port: u16,
    config: PathBuf,
    /// The CA certificate clients must trust, when the service speaks TLS.
    pub ca: Option<PathBuf>,
}

impl Approver {
    /// Starts one; `slack`: post to this Slack stand-in.
    #[must_use]
    pub fn start(slack: Option<&FakeSlack>) -> Self {
        Self::start_with_database(slack, None)
    }

    /// Starts one on the database at `url` (default: a SQLite file of its own).
    #[must_use]
    pub fn start_with_database(slack: Option<&FakeSlack>, url: Option<&str>) -> Self {
        Self::start_full(slack, url, None)
    }

    /// A second replica of this service: another port, the same database and key.
    #[must_use]
    pub fn replica(&self, database: &str) -> Self {
        Self::start_full(None, Some(database), Some(&self.key_path()))
    }

    #[must_use]
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("approver.key")
    }

    /// Starts one that takes Slack's answers over Socket Mode only (no signing secret: its
    /// HTTP callback route refuses everything).
    #[must_use]
    pub fn start_socket_mode(slack: &FakeSlack) -> Self {
        let a = Self::start_channels_tls(Some(slack), None, None, None, false, "");
        let text = std::fs::read_to_string(&a.config).expect("config");
        let text = text.replace(
            &format!("  signing_secret: {SIGNING_SECRET}\n"),
            &format!("  app_token: {APP_TOKEN}\n"),
        );
        std::fs::write(&a.config, text).expect("config");
        let mut a = a;
        a.restart();
        a
    }

    /// Stops it (SIGTERM, as an operator would) and starts it again on the same state.
    pub fn restart(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        self.proc = Self::spawn(self.dir.path(), &self.config);
        self.wait_serving();
    }

    /// Starts one that speaks TLS, with a self-signed test certificate.
    #[must_use]
    pub fn start_tls() -> Self {
        Self::start_channels_tls(None, None, None, None, true, "")
    }

    /// Starts one with `extra` appended to its configuration (YAML at the top level).
    #[must_use]
    pub fn start_with_yaml(extra: &str, tls: bool) -> Self {
        Self::start_channels_tls(None, None, None, None, tls, extra)
    }

    /// Starts one that posts to this Teams stand-in (bot and webhook).
    #[must_use]
    pub fn start_with_teams(teams: &FakeTeams) -> Self {
        Self::start_channels(None, Some(teams), None, None)
    }

    fn start_full(slack: Option<&FakeSlack>, url: Option<&str>, key: Option<&Path>) -> Self {
        Self::start_channels(slack, None, url, key)
    }

    fn start_channels(
        slack: Option<&FakeSlack>,
        teams: Option<&FakeTeams>,
        url: Option<&str>,
        key: Option<&Path>,
    ) -> Self {
        Self::start_channels_tls(slack, teams, url, key, false, "")
    }

    fn start_channels_tls(
        slack: Option<&FakeSlack>,
        teams: Option<&FakeTeams>,
        url: Option<&str>,
        key: Option<&Path>,
        tls: bool,
        extra: &str,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("countersign-approver")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let person = |name: &str, user: &str, email: Option<&str>| {
            format!(
                "  - name: {name}\n    slack: {{team: {TEAM}, user: {user}}}\n    teams: {{aad_object_id: aad-{name}}}\n    tokens: [{}]\n{}",
                sha256(&token_of(name)),
                email
                    .map(|e| format!("    email: {e}\n"))
                    .unwrap_or_default()
            )
        };
        let mut yaml = format!(
            "listen: 127.0.0.1:{port}\ndatabase: {}\nkey: {}\npublic_url: http://127.0.0.1:{port}\nenrollment_tokens: [{}]\napprovers:\n{}{}{}{}groups:\n  dev: [alice, bob, carol]\n  ops: [dave]\ndefault_group: dev\n",
            url.map_or_else(
                || format!("sqlite://{}/approver.db", dir.path().display()),
                str::to_owned
            ),
            key.map_or_else(|| dir.path().join("approver.key"), Path::to_path_buf)
                .display(),
            sha256(ENROLL_TOKEN),
            person("alice", "UALICE", Some("alice@example.com")),
            person("bob", "UBOB", None),
            person("carol", "UCAROL", None),
            person("dave", "UDAVE", None),
        );
        if let Some(s) = slack {
            yaml.push_str(&format!(
                "slack:\n  bot_token: {BOT_TOKEN}\n  signing_secret: {SIGNING_SECRET}\n  channel: {CHANNEL}\n  api_url: http://{}/api\n",
                s.addr
            ));
        }
        if let Some(t) = teams {
            yaml.push_str(&format!(
                "teams:\n  app_id: {TEAMS_APP_ID}\n  app_password: {TEAMS_APP_PASSWORD}\n  service_url: http://{a}/\n  conversation_id: \"{TEAMS_CONVERSATION}\"\n  token_url: http://{a}/oauth2/token\n  openid_url: http://{a}/openid\nteams_webhook:\n  url: http://{a}/webhook\n",
                a = t.addr
            ));
        }
        // A self-signed server certificate for 127.0.0.1 (a test fixture shared with the
        // collector's tests; embedded, so it is there in the VMs too), trusted as its own CA.
        let ca = tls.then(|| {
            let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
            std::fs::write(&cert, TEST_TLS_CERT).expect("cert");
            std::fs::write(&key, TEST_TLS_KEY).expect("key");
            yaml.push_str(&format!(
                "tls: {{cert: {}, key: {}}}\n",
                cert.display(),
                key.display()
            ));
            cert
        });
        yaml.push_str(extra);
        let config = dir.path().join("approver.yaml");
        std::fs::write(&config, yaml).expect("approver.yaml");
        let proc = Self::spawn(dir.path(), &config);
        let a = Self {
            proc,
            dir,
            port,
            config,
            ca,
        };
        a.wait_serving();
        a
    }

    fn spawn(dir: &Path, config: &Path) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("approver.log"))
            .expect("approver log");
        let child = Command::new(countersign_bin())
            .args(["approver", "--config"])
            .arg(config)
            .env("COUNTERSIGN_LOG", "info,countersign=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("countersign approver");
        Proc { child }
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "the approver did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it (SIGKILL) and starts it again on the same port, database and key.
    pub fn crash_and_restart(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        self.proc = Self::spawn(self.dir.path(), &self.config);
        self.wait_serving();
    }

    /// The configuration file.
    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Asks it to read its configuration again (SIGHUP).
    pub fn reload(&self) {
        // SAFETY: signalling the approver we started, by its pid.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGHUP) };
    }

    /// Kills it for good.
    pub fn stop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    #[must_use]
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    #[must_use]
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    #[must_use]
    pub fn slack_request_url(&self) -> String {
        format!("{}/slack/interactivity", self.url())
    }

    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("approver.log")).unwrap_or_default()
    }

    /// A daemon.yaml (in `dir`) that escalates to this approver and enrolls with the test
    /// token; pass it with `--config`.
    #[must_use]
    pub fn daemon_config(&self, dir: &Path) -> PathBuf {
        let token = dir.join("enroll.token");
        std::fs::write(&token, ENROLL_TOKEN).expect("token file");
        let path = dir.join("daemon.yaml");
        std::fs::write(
            &path,
            format!(
                "approver:\n  url: {}\n  enroll_token_file: {}\n  state: {}\n{}",
                self.url(),
                token.display(),
                dir.join("approver.json").display(),
                self.ca
                    .as_ref()
                    .map(|c| format!("  ca_file: {}\n", c.display()))
                    .unwrap_or_default()
            ),
        )
        .expect("daemon.yaml");
        path
    }

    /// Starts a daemon with `config` (see [`Self::daemon_config`]) and `policy`, and waits
    /// until it has enrolled (and pinned this approver's key), before anything is escalated.
    #[must_use]
    pub fn start_daemon(&self, config: &Path, policy: &str) -> crate::Daemon {
        let config = config.to_str().expect("utf-8 path");
        let d = crate::Daemon::start_with(&["--config", config, "--policy", policy]);
        let deadline = std::time::Instant::now() + crate::WAIT;
        while d.status()["approver"]["enrolled"] != true {
            assert!(
                std::time::Instant::now() < deadline,
                "not enrolled: {}\n{}\n{}",
                d.status(),
                d.log(),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }

    /// `countersign requests ARGS --approver URL` with `who`'s token.
    #[must_use]
    pub fn cli(&self, who: &str, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(countersign_bin());
        c.args(["requests"])
            .args(args)
            .args(["--approver", &self.url()]);
        if let Some(ca) = &self.ca {
            c.arg("--ca-file").arg(ca);
        }
        c.env("COUNTERSIGN_APPROVER_TOKEN", token_of(who))
            .output()
            .expect("countersign requests")
    }

    /// The approver's requests in `state` (through the CLI, as `who`).
    #[must_use]
    pub fn requests(&self, who: &str, state: &str) -> Vec<Value> {
        let out = self.cli(who, &["list", "--json", "--state", state]);
        assert!(
            out.status.success(),
            "requests list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .expect("JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for a pending request whose argv contains `needle`.
    pub fn wait_request(&self, needle: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self
                .requests("bob", "pending")
                .into_iter()
                .find(|r| r["request"]["argv"].to_string().contains(needle))
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no request for {needle} at the approver:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
