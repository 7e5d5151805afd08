//! A real browser for the web page scenarios: Debian's headless Chromium driven through
//! chromedriver's W3C WebDriver HTTP API. `cargo xtask setup` installs both. The driver and
//! the browser are ended on drop.
use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    Proc, WAIT,
    remote::{free_port, http_json},
};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    _driver: Proc,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    #[must_use]
    pub fn start() -> Self {
        let port = free_port();
        // Its own process group: on drop the driver and every browser process it started go
        // together, even if the session could not be ended politely.
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (installed by `cargo xtask setup`)");
        let driver = Proc { child };
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // Root in a sandboxed CI machine with no network beyond loopback.
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1200,1600",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let (status, v) = http_json(&addr, "POST", "/session", &[], &caps);
        assert_eq!(status, 200, "new browser session: {v}");
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        Self {
            _driver: driver,
            addr,
            session,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let (status, v) = http_json(
            &self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            &[],
            body,
        );
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", &json!({"url": url}));
    }

    #[must_use]
    pub fn url(&self) -> String {
        self.call("GET", "/url", &Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the page's URL ends with `suffix` (after a click that navigates).
    pub fn wait_url(&self, suffix: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.url().ends_with(suffix) {
            assert!(
                Instant::now() < deadline,
                "the page is {}, not …{suffix}: {}",
                self.url(),
                self.source()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the page's source contains `needle` (after a click that navigates).
    pub fn wait_source(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.source().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the page never showed {needle:?}: {}",
                self.source()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The element `css` selects, waiting for it to appear.
    #[must_use]
    pub fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, v) = http_json(
                &self.addr,
                "POST",
                &format!("/session/{}/element", self.session),
                &[],
                &json!({"using": "css selector", "value": css}),
            );
            if status == 200 {
                return v["value"][ELEMENT].as_str().expect("element id").to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no element {css} on {}: {}",
                self.url(),
                self.source()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/click"), &json!({}));
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            &json!({"text": text}),
        );
    }

    /// The visible text of `css`.
    #[must_use]
    pub fn text(&self, css: &str) -> String {
        let e = self.find(css);
        self.call("GET", &format!("/element/{e}/text"), &Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[must_use]
    pub fn source(&self) -> String {
        let (_, v) = http_json(
            &self.addr,
            "GET",
            &format!("/session/{}/source", self.session),
            &[],
            &Value::Null,
        );
        v["value"].as_str().unwrap_or_default().to_owned()
    }

    /// A PNG of the page, base64.
    #[must_use]
    pub fn screenshot(&self) -> String {
        self.call("GET", "/screenshot", &Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http_json(
            &self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            &[],
            &Value::Null,
        );
    }
}
