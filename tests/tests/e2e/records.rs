//! Signed decision records, end to end: what the daemon spools verifies, a removed record
//! is found, and a spool that cannot be written refuses rather than releases.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use countersign_tests::{Daemon, WAIT, countersign_bin};

use super::{marker, probe};

/// `countersign records verify PATH --key KEY`.
fn verify(path: &Path, key: &Path) -> Output {
    std::process::Command::new(countersign_bin())
        .args(["records", "verify"])
        .arg(path)
        .arg("--key")
        .arg(key)
        .output()
        .expect("running countersign records verify")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The spool's only segment.
fn segment(spool: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(spool)
        .expect("spool dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "one segment: {segs:?}");
    segs.remove(0)
}

/// Byte ranges of the frames of a segment (`CSR1`, u32 LE length, 32-byte checksum, payload).
fn frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 40 <= bytes.len() {
        assert_eq!(&bytes[at..at + 4], b"CSR1", "frame at {at}");
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push(at..at + 40 + len);
        at += 40 + len;
    }
    assert_eq!(at, bytes.len(), "whole frames only");
    out
}

/// The summary line `N/M records valid, …` of a verify run.
fn summary(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn decisions_are_signed_records_that_verify_and_a_removed_one_is_named() {
    let mut d = Daemon::start();
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "approve");
    assert!(p.wait(WAIT).success());
    let m2 = marker(&d, "ran2");
    let mut q = d.labelled("coder", &[&probe(), "touch", &m2]);
    let r2 = d.wait_exec(q.pid(), "touch");
    d.decide(&r2, "kill");
    q.wait(WAIT);
    assert_eq!(
        d.status()["records_written"].as_u64().map(|n| n >= 5),
        Some(true)
    );
    d.stop();

    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
    // daemon-start, request + approved, request + killed, daemon-stop, and in LSM mode the
    // exec-verified outcome.
    let n = frames(&std::fs::read(segment(&d.spool_dir())).unwrap()).len();
    assert!(n >= 6, "{n} records");
    assert_eq!(
        summary(&out),
        format!("{n}/{n} records valid, 0 gaps, 0 forks, 0 self-approvals")
    );

    // The signed record of the approval holds the request as shown to the human.
    let seg = segment(&d.spool_dir());
    let bytes = std::fs::read(&seg).unwrap();
    let fr = frames(&bytes);

    // Remove the third record: the fourth is named, and the exit status says it.
    let mut cut = bytes[..fr[2].start].to_vec();
    cut.extend_from_slice(&bytes[fr[2].end..]);
    std::fs::write(&seg, &cut).unwrap();
    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("seq 4: gap: seq 3 to 3 missing"), "{t}");
    assert_eq!(
        summary(&out),
        format!(
            "{}/{} records valid, 1 gaps, 0 forks, 0 self-approvals",
            n - 2,
            n - 1
        )
    );

    // Verified with another key: every record is refused.
    let other = d.dir().join("other.pub");
    std::fs::write(
        &other,
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let out = verify(&d.spool_dir(), &other);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no trusted host key has that id"),
        "{}",
        text(&out)
    );
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn new(path: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: valid NUL-terminated strings; mounting a fresh tmpfs on our own directory.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Self { path }
    }

    /// Fills the filesystem with `filler`.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    }

    fn unfill(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: unmounting the tmpfs this test mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_spool_that_cannot_be_written_refuses_and_releases_nothing() {
    let base = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(base.path().join("spool"), "256k");
    let spool = fs.path.to_str().unwrap().to_owned();
    let mut d = Daemon::start_with(&["--request-timeout", "60", "--spool-dir", &spool]);
    fs.fill();
    // The spool's last page still has room for a record or two: approve until something
    // cannot be recorded. Either the approval itself cannot be recorded (it is not applied:
    // the request stays held), or a later record cannot (an approved exec's `exec-verified`
    // outcome: the exec ran on its recorded decision) and from then on new requests are
    // refused.
    let mut held = None;
    for i in 0..20 {
        let m = marker(&d, &format!("ran{i}"));
        let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
        let r = d.wait_exec(p.pid(), "touch");
        let answer = d.decide(&r, "approve");
        if answer.contains("not applied") {
            held = Some((p, r, m));
            break;
        }
        assert!(p.wait(WAIT).success(), "{answer}");
        assert!(Path::new(&m).exists(), "{answer}");
        // An outcome is recorded after the release: give it the time to fail.
        std::thread::sleep(Duration::from_millis(300));
        if d.status()["records_error"].is_string() {
            break;
        }
    }
    let status = d.status();
    assert!(
        status["records_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "the full spool was not noticed: {status}"
    );
    // Nothing runs without its record: the held approval stays held, and a new exec is
    // refused — a refusal that itself waits, held, until it can be recorded.
    if let Some((p, _, m)) = held.as_mut() {
        assert!(p.still_running_after(Duration::from_millis(300)));
        assert!(
            !Path::new(m.as_str()).exists(),
            "nothing ran without a record"
        );
    }
    let refused = marker(&d, "refused");
    let mut q = d.labelled("coder", &[&probe(), "touch", &refused]);
    assert!(q.still_running_after(Duration::from_millis(500)));
    assert!(!Path::new(&refused).exists());
    // Space again: decisions are recorded and applied.
    fs.unfill();
    if let Some((mut p, r, m)) = held {
        let answer = d.decide(&r, "approve");
        assert!(answer.contains("approved"), "{answer}");
        assert!(p.wait(WAIT).success());
        assert!(Path::new(&m).exists());
    } else {
        let m = marker(&d, "after");
        let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
        let r = d.wait_exec(p.pid(), "touch");
        d.decide(&r, "approve");
        assert!(p.wait(WAIT).success());
        assert!(Path::new(&m).exists());
    }
    assert!(d.status()["records_error"].is_null());
    // The refused exec never ran (its refusal is applied once it is recorded, or at the
    // stop).
    assert!(!Path::new(&refused).exists(), "the refused exec ran");
    d.stop();
    assert!(!q.wait(WAIT).success(), "the refused exec ran");
    assert!(!Path::new(&refused).exists());
    // The failed writes left no damage behind.
    let out = verify(&fs.path, &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
}

/// The export token the test collectors accept, and its SHA-256.
const EXPORT_TOKEN: &str = "test-export-token";
const EXPORT_TOKEN_SHA256: &str =
    "69081258d050e5107275d5de4e69f2dbe08ea01f7c33738892429f9e85e44690";
/// The reader token the test collectors accept (`GET /v1/heads`, `/v1/ocsf`).
const READER_TOKEN: &str = "test-reader-token";

/// A `countersign collector` process, stopped on drop.
struct Collector {
    proc: Option<countersign_tests::Proc>,
    dir: PathBuf,
    port: u16,
}

impl Collector {
    /// Writes its config (enrolling `hosts`) and starts it; waits until it serves.
    fn start(dir: &Path, port: u16, hosts: &[PathBuf]) -> Self {
        Self::start_with(dir, port, hosts, &[])
    }

    /// Like [`Collector::start`], checking embedded approver decisions with `approvers`.
    fn start_with(dir: &Path, port: u16, hosts: &[PathBuf], approvers: &[PathBuf]) -> Self {
        let approvers: String = approvers
            .iter()
            .map(|a| format!("  - {}\n", a.display()))
            .collect();
        let hosts: Vec<String> = hosts
            .iter()
            .map(|h| format!("  - {}\n", h.display()))
            .collect();
        let config = dir.join("collector.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\ndatabase: sqlite://{}\nkey: {}\nexport_tokens_sha256: [{EXPORT_TOKEN_SHA256}]\nreader_tokens_sha256: [{}]\n{}hosts:\n{}",
                dir.join("collector.db").display(),
                dir.join("collector.key").display(),
                countersign_tests::remote::sha256(READER_TOKEN),
                if approvers.is_empty() {
                    String::new()
                } else {
                    format!("approver_keys:\n{approvers}")
                },
                if hosts.is_empty() {
                    "  []\n".to_owned()
                } else {
                    hosts.concat()
                }
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("collector.log")).unwrap();
        let child = std::process::Command::new(countersign_bin())
            .args(["collector", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("countersign collector");
        let mut c = Self {
            proc: Some(countersign_tests::Proc { child }),
            dir: dir.to_path_buf(),
            port,
        };
        let deadline = std::time::Instant::now() + WAIT;
        while c.get("/healthz").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the collector did not serve:\n{}",
                c.log()
            );
            if let Some(p) = c.proc.as_mut() {
                assert!(
                    p.child.try_wait().unwrap().is_none(),
                    "the collector exited:\n{}",
                    c.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("collector.log")).unwrap_or_default()
    }

    /// The body of a plain HTTP GET, if the collector answers 200.
    fn get(&self, path: &str) -> Option<String> {
        self.get_with_head(path).map(|(_, body)| body)
    }

    /// The head (lowercased) and body of a plain HTTP GET, if the collector answers 200.
    fn get_with_head(&self, path: &str) -> Option<(String, String)> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {READER_TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| (head.to_ascii_lowercase(), body.to_owned()))
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // SAFETY: signalling the collector we started, by its pid.
            unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
            p.wait(WAIT);
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- collector log ----\n{}\n----", self.log());
        }
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The collector is down while decisions are made; once it is up every record arrives,
/// once and in order; the exported bundle verifies.
#[test]
fn records_made_while_the_collector_is_down_arrive_once_in_order_and_export_verifies() {
    let base = tempfile::tempdir().unwrap();
    let port = free_port();
    // Make the collector's key, then stop it: it is down while the host decides.
    Collector::start(base.path(), port, &[]).stop();
    let daemon_yaml = base.path().join("daemon.yaml");
    std::fs::write(
        &daemon_yaml,
        format!(
            "collector:\n  url: http://127.0.0.1:{port}\n  public_key: {}\n",
            base.path().join("collector.key.pub").display()
        ),
    )
    .unwrap();
    let config = daemon_yaml.to_str().unwrap().to_owned();
    let mut d = Daemon::start_with(&["--config", &config, "--request-timeout", "60"]);
    for (i, decision) in ["approve", "deny", "approve"].iter().enumerate() {
        let m = marker(&d, &format!("ran{i}"));
        let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
        let r = d.wait_exec(p.pid(), "touch");
        d.decide(&r, decision);
        p.wait(WAIT);
    }
    let written = d.status()["records_written"].as_u64().unwrap();
    assert!(written >= 7, "{written}");
    assert!(
        std::fs::read_to_string(d.spool_dir().join("cursor.json")).is_err(),
        "nothing was receipted while the collector was down"
    );

    let mut c = Collector::start(base.path(), port, &[d.host_pub()]);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let heads: serde_json::Value =
            serde_json::from_str(&c.get("/v1/heads").unwrap_or_default()).unwrap_or_default();
        if heads[0]["seq"].as_u64() >= Some(written) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the collector holds {heads}, the host wrote {written}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The daemon reports what the collector receipted (the cursor moves after the receipt).
    let deadline = std::time::Instant::now() + WAIT;
    while d.status()["records_receipted"].as_u64() < Some(written) {
        assert!(std::time::Instant::now() < deadline, "{}", d.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The decisions as OCSF events for a SIEM: the denied exec is a blocked process launch.
    let ocsf = c.get("/v1/ocsf").expect("GET /v1/ocsf");
    let events: Vec<serde_json::Value> = ocsf
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert!(
        events.iter().any(|e| e["class_uid"] == 1007
            && e["disposition"] == "Blocked"
            && e["unmapped"]["decision"] == "denied"),
        "{ocsf}"
    );
    assert!(events.iter().any(|e| e["action"] == "Allowed"), "{ocsf}");
    // A SIEM pages through the same events one record at a time with the ingest cursor; the
    // heartbeats between decisions move the cursor and hide nothing.
    let (mut cursor, mut paged, mut pages) = (0u64, String::new(), 0);
    loop {
        let (head, body) = c
            .get_with_head(&format!("/v1/ocsf?after={cursor}&limit=1"))
            .expect("a page");
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("no {name} in {head}"))
        };
        paged.push_str(&body);
        pages += 1;
        let next: u64 = header("x-countersign-cursor").parse().unwrap();
        if header("x-countersign-more") != "true" {
            assert_eq!(next, cursor, "the last page moves nothing");
            break;
        }
        assert_eq!(next, cursor + 1, "one record a page");
        cursor = next;
        assert!(pages < 1000, "the cursor never stalls");
    }
    assert_eq!(
        paged, ocsf,
        "paging finds every event of the single read, in order"
    );
    assert!(
        cursor >= written,
        "every stored record was a page: {cursor} < {written}"
    );
    // Verified straight from the collector, with its pinned key and an export token.
    let token = base.path().join("token");
    std::fs::write(&token, EXPORT_TOKEN).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let collector_pub = base.path().join("collector.key.pub");
    let by_url = |token: &Path| {
        std::process::Command::new(countersign_bin())
            .args(["records", "verify", &url, "--collector-key"])
            .arg(&collector_pub)
            .arg("--token-file")
            .arg(token)
            .arg("--key")
            .arg(d.host_pub())
            .output()
            .unwrap()
    };
    let out = by_url(&token);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        summary(&out).ends_with("records valid, 0 gaps, 0 forks, 0 self-approvals"),
        "{}",
        text(&out)
    );
    let wrong = base.path().join("wrong-token");
    std::fs::write(&wrong, "nope").unwrap();
    let out = by_url(&wrong);
    assert!(!out.status.success());
    assert!(text(&out).contains("401"), "{}", text(&out));
    d.stop();
    c.stop();

    // Export from the collector's database: every record once, in order, byte for byte what
    // the host spooled.
    let out = base.path().join("bundle");
    let export = std::process::Command::new(countersign_bin())
        .args(["records", "export", "--config"])
        .arg(base.path().join("collector.yaml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", text(&export));
    let bundle = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    let spooled = std::fs::read(segment(&d.spool_dir())).unwrap();
    let spooled: Vec<String> = frames(&spooled)
        .into_iter()
        .map(|r| String::from_utf8(spooled[r.start + 40..r.end].to_vec()).unwrap())
        .collect();
    let shipped: Vec<&str> = bundle.lines().collect();
    assert!(shipped.len() as u64 >= written);
    assert_eq!(
        shipped,
        spooled[..shipped.len()]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "the collector holds the spooled records, once each, in order"
    );
    let n = shipped.len();
    let out_v = std::process::Command::new(countersign_bin())
        .args(["records", "verify"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(out_v.status.success(), "{}", text(&out_v));
    assert_eq!(
        summary(&out_v),
        format!("{n}/{n} records valid, 0 gaps, 0 forks, 0 self-approvals")
    );
    let csv = std::fs::read_to_string(out.join("population.csv")).unwrap();
    assert_eq!(csv.lines().count(), n + 1);
    assert!(
        csv.lines().any(|l| l.contains(",decision,denied,")),
        "{csv}"
    );
    let ocsf = std::fs::read_to_string(out.join("ocsf.jsonl")).unwrap();
    assert_eq!(ocsf.lines().count(), events.len(), "{ocsf}");
}

/// A decision the CLI saw applied is in the spool even if the daemon is killed right after;
/// the restarted daemon continues the same chain.
#[test]
fn a_daemon_killed_after_a_decision_keeps_its_record_and_continues_the_chain() {
    let mut d = Daemon::start();
    // A connect: once approved, the kernel lets it through without the daemon.
    let l = countersign_tests::Listener::new();
    let mut p = d.labelled_probe("coder", &["connect", &l.addr()]);
    let r = d.wait_request("connect", |r| r["pid"] == p.pid() && r["kind"] == "connect");
    d.decide(&r, "approve");
    d.crash();
    assert!(p.wait(WAIT).success());
    let before = frames(&std::fs::read(segment(&d.spool_dir())).unwrap()).len();
    assert!(
        before >= 3,
        "daemon-start, request and the approval: {before}"
    );
    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
    d.restart();
    d.stop();
    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    // One chain: the restart continued it (daemon-start and daemon-stop were added).
    assert_eq!(t.matches("chain: ").count(), 1, "{t}");
    let n = frames(&std::fs::read(segment(&d.spool_dir())).unwrap()).len();
    assert_eq!(n, before + 2, "{t}");
    assert!(t.contains(&format!("seq 1..{n}")), "{t}");
}

/// The host key rotated while the daemon runs: the whole spool verifies with the old
/// public key alone (the rotation record vouches for the new key).
#[test]
fn a_rotated_host_key_is_followed_from_the_old_one() {
    let mut d = Daemon::start();
    let old_pub = d.dir().join("old.pub");
    std::fs::copy(d.host_pub(), &old_pub).unwrap();
    let old_id = d.status()["host_id"].as_str().unwrap().to_owned();
    let out = d.cli(&["records", "rotate-key"]);
    assert!(out.status.success(), "{}", text(&out));
    let new_id = d.status()["host_id"].as_str().unwrap().to_owned();
    assert_ne!(old_id, new_id);
    assert!(text(&out).contains(&new_id), "{}", text(&out));
    assert_ne!(
        std::fs::read(d.host_pub()).unwrap(),
        std::fs::read(&old_pub).unwrap(),
        "the public key file is the new key's"
    );
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "approve");
    assert!(p.wait(WAIT).success());
    d.stop();
    let out = verify(&d.spool_dir(), &old_pub);
    assert!(out.status.success(), "{}", text(&out));
    assert!(summary(&out).ends_with("0 gaps, 0 forks, 0 self-approvals"));
    // After a restart the new key goes on with the same chain.
    d.restart();
    d.stop();
    let out = verify(&d.spool_dir(), &old_pub);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("chain: ").count(), 1, "{}", text(&out));
}

/// The records in a spool segment: each record's payload (the signed record, as JSON).
pub(super) fn spooled_records(spool: &Path) -> Vec<serde_json::Value> {
    use base64::Engine as _;
    let bytes = std::fs::read(segment(spool)).unwrap();
    frames(&bytes)
        .into_iter()
        .map(|r| {
            let env: serde_json::Value =
                serde_json::from_slice(&bytes[r.start + 40..r.end]).unwrap();
            let payload = base64::engine::general_purpose::STANDARD
                .decode(env["payload"].as_str().unwrap())
                .unwrap();
            serde_json::from_slice(&payload).unwrap()
        })
        .collect()
}

/// The daemon killed with SIGKILL again and again while a labelled loop makes it decide
/// (and record) exec after exec: the spool recovers each time, verifies as one unbroken
/// chain, and every decision the daemon acted on has its signed record.
#[test]
fn sigkill_during_decisions_repeatedly_loses_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("busy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: countersign.dev/v1\nlabels:\n  - name: busy\n    default: {outcome: allow}\n",
    )
    .unwrap();
    let policy = policy.to_str().unwrap().to_owned();
    // The execs of a launched agent must outlive the daemon's restarts: in fallback mode
    // they are held by a stop (the notifier does not survive its daemon).
    let mut d = Daemon::start_with(&[
        "--request-timeout",
        "60",
        "--policy",
        &policy,
        "--fallback-exec-hold",
        "stop",
    ]);
    let count = marker(&d, "count");
    let script =
        format!("i=0; while [ $i -lt 100000 ]; do /bin/true; i=$((i+1)); echo $i > {count}; done");
    let mut p = d.labelled("busy", &["/bin/sh", "-c", &script]);
    let progress = |c: &str| {
        std::fs::read_to_string(c)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    for round in 0..6u64 {
        // Let it decide a few execs, then kill the daemon in the middle of it.
        let before = progress(&count);
        let deadline = std::time::Instant::now() + WAIT;
        while progress(&count) < before + 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the loop made no progress:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(37 * round));
        d.crash();
        d.restart();
    }
    let deadline = std::time::Instant::now() + WAIT;
    let before = progress(&count);
    while progress(&count) < before + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop made no progress:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = p.child.kill();
    let _ = p.child.wait();
    d.stop();

    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("chain: ").count(), 1, "{}", text(&out));
    let records = spooled_records(&d.spool_dir());
    let starts = records
        .iter()
        .filter(|r| r["body"]["type"] == "daemon-start")
        .count();
    assert_eq!(starts, 7, "one chain over seven daemon runs");
    // Every decision in the log (written after its record, before it was applied) has its
    // signed record; every /bin/true that ran was allowed by one.
    let signed: std::collections::HashSet<u64> = records
        .iter()
        .filter(|r| r["body"]["type"] == "decision" && r["body"]["decision"] == "auto-allowed")
        .map(|r| r["body"]["request"]["id"].as_u64().unwrap())
        .collect();
    let logged: Vec<u64> = d
        .decisions()
        .iter()
        .filter(|e| e["decision"] == "auto-allowed")
        .map(|e| e["request"]["id"].as_u64().unwrap())
        .collect();
    for id in &logged {
        assert!(
            signed.contains(id),
            "request {id} was decided without a signed record"
        );
    }
    let ran = progress(&count);
    assert!(
        signed.len() as u64 >= ran,
        "{ran} execs ran, {} signed allow records",
        signed.len()
    );
}

/// The whole path (issue 5's end-to-end case, run natively and in the VMs): an exec held,
/// escalated to the approver, approved by a signed Slack click; the decision record, which
/// embeds the approver's signed decision, reaches the collector; the exported evidence bundle
/// verifies and names who approved.
#[test]
fn an_exec_approved_through_the_approver_reaches_the_collector_and_its_bundle_verifies() {
    use countersign_tests::remote::{Approver, FakeSlack};
    let slack = FakeSlack::start();
    let approver = Approver::start(Some(&slack));
    let base = tempfile::tempdir().unwrap();
    let port = free_port();
    Collector::start(base.path(), port, &[]).stop();
    let config = approver.daemon_config(base.path());
    let mut yaml = std::fs::read_to_string(&config).unwrap();
    yaml.push_str(&format!(
        "collector:\n  url: http://127.0.0.1:{port}\n  public_key: {}\n",
        base.path().join("collector.key.pub").display()
    ));
    std::fs::write(&config, yaml).unwrap();
    let policy = countersign_tests::remote::coder_policy(base.path(), 1, false, "60s", "");
    let mut d = Daemon::start_with(&["--config", config.to_str().unwrap(), "--policy", &policy]);
    let approver_pub = approver.key_path().with_extension("key.pub");
    let mut c = Collector::start_with(base.path(), port, &[d.host_pub()], &[approver_pub]);
    let m = marker(&d, "approved-remotely");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let msg = slack.wait_message(&m);
    slack.click(
        &approver.slack_request_url(),
        &msg["ts"],
        "approve",
        "UBOB",
        &serde_json::json!({}),
    );
    assert!(p.wait(WAIT).success(), "{}\n{}", d.log(), approver.log());
    // Everything written so far reaches the collector and is receipted.
    let written = d.status()["records_written"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while d.status()["records_receipted"].as_u64() < Some(written) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            d.status(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop();
    c.stop();
    let out = base.path().join("bundle");
    let export = std::process::Command::new(countersign_bin())
        .args(["records", "export", "--config"])
        .arg(base.path().join("collector.yaml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", text(&export));
    let csv = std::fs::read_to_string(out.join("population.csv")).unwrap();
    let row = csv
        .lines()
        .find(|l| l.contains("approved-remotely") && l.contains(",approved,"))
        .unwrap_or_else(|| panic!("{csv}"));
    assert!(
        row.contains("bob"),
        "who approved is in the population: {row}"
    );
    assert!(
        csv.lines().next().unwrap().ends_with(",approver_decision"),
        "{csv}"
    );
    assert!(
        !row.ends_with(','),
        "the row carries the approver's signed decision: {row}"
    );
    let check = std::process::Command::new(countersign_bin())
        .args(["records", "verify"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        summary(&check).ends_with("records valid, 0 gaps, 0 forks, 0 self-approvals"),
        "{}",
        text(&check)
    );
}

/// A spool above `spool_alarm_bytes` is an alarm in `status`, and nothing is dropped: every
/// decision still has its record.
#[test]
fn a_large_spool_is_an_alarm_not_a_reason_to_drop() {
    let base = tempfile::tempdir().unwrap();
    let yaml = base.path().join("daemon.yaml");
    std::fs::write(&yaml, "spool_alarm_bytes: 1\n").unwrap();
    let d = Daemon::start_with(&[
        "--config",
        yaml.to_str().unwrap(),
        "--request-timeout",
        "60",
    ]);
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "approve");
    assert!(p.wait(WAIT).success());
    let human = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("ALARM: the record spool holds"), "{human}");
    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
}
