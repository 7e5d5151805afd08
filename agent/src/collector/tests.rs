//! The collector against a real SQLite database and, for shipping, over real HTTP.
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::*;
use crate::records::{
    DecisionRecord,
    ship::{self, Target},
    spool::{self, Spool},
    tests::view,
};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

struct Fixture {
    dir: tempfile::TempDir,
    config: CollectorConfig,
}

impl Fixture {
    /// A collector config in a temp dir with host key 1 and approver key 9 enrolled.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host.pub");
        keys::write_public(&host, &key(1).verifying_key()).unwrap();
        let approver = dir.path().join("approver.pub");
        keys::write_public(&approver, &key(9).verifying_key()).unwrap();
        let config = CollectorConfig {
            database: format!("sqlite://{}", dir.path().join("c.db").display()),
            key: dir.path().join("collector.key"),
            hosts: vec![host],
            approver_keys: vec![approver],
            ..CollectorConfig::default()
        };
        Self { dir, config }
    }

    fn spool(&self, name: &str, k: SigningKey) -> (PathBuf, Spool) {
        let p = self.dir.path().join(name);
        let s = Spool::open(&p, k, "h").unwrap();
        (p, s)
    }
}

fn heartbeat() -> Body {
    Body::Heartbeat {
        pending: 0,
        interval_secs: 60,
    }
}

fn envelopes(dir: &Path) -> Vec<Envelope> {
    spool::read(dir)
        .unwrap()
        .records
        .into_iter()
        .map(|s| s.envelope)
        .collect()
}

fn batch(envs: &[Envelope]) -> Batch {
    Batch {
        records: envs.to_vec(),
    }
}

#[tokio::test]
async fn ingest_checks_every_record_and_answers_retries_gaps_and_forks() {
    let f = Fixture::new();
    ingest_checks(&f).await;
}

/// The same checks against a real PostgreSQL server started for the test.
#[tokio::test]
async fn ingest_checks_on_postgresql() {
    let mut f = Fixture::new();
    let pg = PgCluster::start(f.dir.path());
    f.config.database = pg.url.clone();
    ingest_checks(&f).await;
    // And an export from it verifies.
    let out = f.dir.path().join("bundle");
    let report = export::export(&f.config, None, None, &out).await.unwrap();
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(report.valid, 5);
}

/// A throwaway PostgreSQL cluster (initdb + pg_ctl on a temp dir and a free port), stopped
/// on drop. Run as the `postgres` user when the tests run as root (initdb refuses root).
struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    user: Option<nix::unistd::User>,
    url: String,
}

impl PgCluster {
    fn start(base: &Path) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                let mut v: Vec<PathBuf> = d.flatten().map(|e| e.path().join("bin")).collect();
                v.sort();
                v.pop()
            })
            .filter(|b| b.join("initdb").exists())
            .expect(
                "PostgreSQL server binaries (/usr/lib/postgresql/*/bin): run `cargo xtask setup`",
            );
        let root = base.join("pg");
        std::fs::create_dir_all(&root).unwrap();
        let user = nix::unistd::geteuid().is_root().then(|| {
            nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("the postgres user (made by the postgresql package)")
        });
        if let Some(u) = &user {
            nix::unistd::chown(base, Some(u.uid), Some(u.gid)).unwrap();
            nix::unistd::chown(&root, Some(u.uid), Some(u.gid)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = root.join("data");
        let run = |args: &[&std::ffi::OsStr], what: &str| {
            use std::os::unix::process::CommandExt as _;
            let mut cmd = std::process::Command::new(bin.join(args[0]));
            cmd.args(&args[1..]);
            if let Some(u) = &user {
                cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
            }
            let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                out.status.success(),
                "{what}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let os = |s: &str| std::ffi::OsString::from(s);
        run(
            &[
                &os("initdb"),
                &os("-D"),
                data.as_os_str(),
                &os("-A"),
                &os("trust"),
                &os("-U"),
                &os("postgres"),
                &os("--no-sync"),
            ],
            "initdb",
        );
        let cluster = Self {
            bin: bin.clone(),
            data: data.clone(),
            user: user.clone(),
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        run(
            &[
                &os("pg_ctl"),
                &os("-D"),
                data.as_os_str(),
                &os("-o"),
                &os(&format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                    root.display()
                )),
                &os("-l"),
                root.join("log").as_os_str(),
                &os("-w"),
                &os("-t"),
                &os("60"),
                &os("start"),
            ],
            "pg_ctl start",
        );
        cluster
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = std::process::Command::new(self.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        if let Some(u) = &self.user {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        let _ = cmd.output();
    }
}

async fn ingest_checks(f: &Fixture) {
    let c = Collector::open(&f.config).await.unwrap();
    let (dir, mut s) = f.spool("spool", key(1));
    for _ in 0..5 {
        s.append(heartbeat()).unwrap();
    }
    let envs = envelopes(&dir);

    let a = c.ingest(&batch(&envs[..3])).await.unwrap().unwrap();
    assert_eq!((a.stored, a.duplicates), (3, 0));
    let r: Receipt = a
        .receipt
        .verify_json(PAYLOAD_RECEIPT, &c.public_key())
        .unwrap();
    assert_eq!(r.seq, 3);
    assert_eq!(r.hash, records::record_hash(&envs[2]).unwrap());

    // A retry is answered, not stored twice.
    let a = c.ingest(&batch(&envs[..3])).await.unwrap().unwrap();
    assert_eq!((a.stored, a.duplicates), (0, 3));

    // A gap names the seq expected.
    let refused = c.ingest(&batch(&envs[4..])).await.unwrap().unwrap_err();
    assert_eq!(refused.expected.as_ref().map(|e| e.seq), Some(4));
    assert!(refused.error.contains("gap"), "{}", refused.error);

    // A reordered batch is refused at the first record out of place, after the good ones.
    let reordered = vec![envs[4].clone(), envs[3].clone()];
    assert!(c.ingest(&batch(&reordered)).await.unwrap().is_err());
    let a = c.ingest(&batch(&envs[3..])).await.unwrap().unwrap();
    assert_eq!(a.stored, 2);

    // Another version of a stored record is a fork.
    let mut other = records::peek(&envs[4]).unwrap();
    other.time = "2020-01-01T00:00:00Z".into();
    let forged = Envelope::sign_json(PAYLOAD_RECORD, &other, &key(1)).unwrap();
    let refused = c.ingest(&batch(&[forged])).await.unwrap().unwrap_err();
    assert!(refused.error.contains("fork"), "{}", refused.error);

    // An edited record does not verify; a key that is not enrolled is refused.
    let mut edited = envs[0].clone();
    edited.signatures[0].sig = Envelope::sign("x", b"y", &key(1)).signatures[0].sig.clone();
    let refused = c.ingest(&batch(&[edited])).await.unwrap().unwrap_err();
    assert!(
        refused.error.contains("host signature"),
        "{}",
        refused.error
    );
    let (dir2, mut s2) = f.spool("spool2", key(2));
    s2.append(heartbeat()).unwrap();
    let refused = c
        .ingest(&batch(&envelopes(&dir2)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(refused.error.contains("not enrolled"), "{}", refused.error);

    let kinds: Vec<String> = c
        .store()
        .alerts()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.kind)
        .collect();
    for k in ["gap", "fork", "bad-signature", "unknown-key"] {
        assert!(kinds.iter().any(|x| x == k), "{k} alerted: {kinds:?}");
    }
    // Retries of a refused record do not raise its alert again.
    let before = kinds.len();
    for _ in 0..3 {
        assert!(c.ingest(&batch(&envelopes(&dir2))).await.unwrap().is_err());
    }
    assert_eq!(c.store().alerts().await.unwrap().len(), before);
    let heads = c.store().heads().await.unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].seq, 5);
}

#[tokio::test]
async fn rotation_forged_approvals_and_self_approvals() {
    let f = Fixture::new();
    let c = Collector::open(&f.config).await.unwrap();
    let (dir, mut s) = f.spool("spool", key(1));
    s.append(heartbeat()).unwrap();
    s.rotate(key(3)).unwrap();
    s.append(heartbeat()).unwrap();
    // A decision carrying an approver decision signed by an unknown key.
    let host_id = sign::key_id(&key(3).verifying_key()).0;
    let st = crate::sign::statement::DecisionStatement {
        grant: None,
        v: 1,
        approver_key: "x".into(),
        host_id: host_id.clone(),
        request: 1,
        action_hash: crate::sign::statement::action_hash(&host_id, &view(1)),
        decision: crate::proto::Decision::Approve,
        approvals: vec![crate::sign::statement::Approval {
            grant: None,
            approver: "alice".into(),
            channel: "api".into(),
            identity: "token:a".into(),
            decision: crate::proto::Decision::Approve,
            justification: None,
            at: "2026-01-01T00:00:00Z".into(),
            identities: Vec::new(),
        }],
        decided_at: "2026-01-01T00:00:00Z".into(),
    };
    let decision = |signer: &SigningKey| {
        Body::Decision(DecisionRecord {
            decision: "approved".into(),
            applied: "released".into(),
            by: "approver".into(),
            request: view(1),
            action_hash: crate::sign::statement::action_hash(&host_id, &view(1)),
            on_behalf_of: Some("alice".into()),
            approver_decision: Some(
                Envelope::sign_json(crate::sign::statement::PAYLOAD_DECISION, &st, signer).unwrap(),
            ),
        })
    };
    s.append(decision(&key(8))).unwrap();
    s.append(decision(&key(9))).unwrap();
    let a = c.ingest(&batch(&envelopes(&dir))).await.unwrap().unwrap();
    assert_eq!(a.stored, 5, "the rotated-to key is accepted for the chain");
    let alerts = c.store().alerts().await.unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "content" && a.detail.contains("not a trusted approver key")),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "self-approval" && a.seq == Some(5)),
        "{alerts:?}"
    );
}

#[tokio::test]
async fn shipped_once_in_order_after_the_collector_comes_up_and_exported() {
    let f = Fixture::new();
    let (dir, mut s) = f.spool("spool", key(1));
    for _ in 0..7 {
        s.append(heartbeat()).unwrap();
    }
    // A free port with nothing listening yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = reqwest::Client::new();
    let c = Arc::new(Collector::open(&f.config).await.unwrap());
    let target = Target {
        url: format!("http://127.0.0.1:{port}"),
        key: c.public_key(),
        ca_pem: None,
    };
    let mut next = None;
    assert!(matches!(
        ship::round(&client, &dir, &target, &mut next).await,
        Err(ship::ShipError::Http { .. })
    ));
    assert_eq!(spool::read_cursor(&dir).unwrap(), None, "nothing receipted");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tokio::spawn(axum::serve(listener, router(c.clone())).into_future());
    assert_eq!(
        ship::round(&client, &dir, &target, &mut next)
            .await
            .unwrap(),
        7
    );
    assert_eq!(spool::read_cursor(&dir).unwrap().unwrap().seq, 7);
    assert_eq!(
        ship::round(&client, &dir, &target, &mut next)
            .await
            .unwrap(),
        0
    );
    s.append(heartbeat()).unwrap();
    assert_eq!(
        ship::round(&client, &dir, &target, &mut next)
            .await
            .unwrap(),
        1
    );
    // A receipt by another key moves nothing.
    s.append(heartbeat()).unwrap();
    let wrong = Target {
        key: key(5).verifying_key(),
        ..target.clone()
    };
    assert!(matches!(
        ship::round(&client, &dir, &wrong, &mut next).await,
        Err(ship::ShipError::Receipt(_))
    ));
    assert_eq!(spool::read_cursor(&dir).unwrap().unwrap().seq, 8);
    assert_eq!(
        ship::round(&client, &dir, &target, &mut next)
            .await
            .unwrap(),
        1,
        "resent, stored once"
    );
    let heads = c.store().heads().await.unwrap();
    assert_eq!(heads[0].seq, 9);
    server.abort();

    // Export: a bundle that verifies; tampering with it is named.
    let out = f.dir.path().join("bundle");
    let report = export::export(&f.config, None, None, &out).await.unwrap();
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(
        report.summary(),
        "9/9 records valid, 0 gaps, 0 forks, 0 self-approvals"
    );
    let csv = std::fs::read_to_string(out.join(crate::records::bundle::POPULATION_FILE)).unwrap();
    assert_eq!(csv.lines().count(), 10, "{csv}");
    let lines = std::fs::read_to_string(out.join(crate::records::bundle::RECORDS_FILE)).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    let write = |ls: &[&str]| {
        std::fs::write(
            out.join(crate::records::bundle::RECORDS_FILE),
            ls.join("\n") + "\n",
        )
        .unwrap();
    };
    write(&lines[..8]);
    let r = crate::records::bundle::verify(&out, Default::default()).unwrap();
    assert!(
        r.failures.iter().any(|f| f.why.contains("truncated")),
        "{:?}",
        r.failures
    );
    let mut no_first = lines[1..].to_vec();
    no_first.truncate(8);
    write(&no_first);
    let r = crate::records::bundle::verify(&out, Default::default()).unwrap();
    assert!(
        r.failures
            .iter()
            .any(|f| f.why.contains("the period begins at seq 1")),
        "{:?}",
        r.failures
    );
    // heads.json edited: refused.
    let heads_path = out.join(crate::records::bundle::HEADS_FILE);
    let text = std::fs::read_to_string(&heads_path).unwrap();
    std::fs::write(
        &heads_path,
        text.replace("\"payload\": \"", "\"payload\": \"e30"),
    )
    .unwrap();
    let e = crate::records::bundle::verify(&out, Default::default()).unwrap_err();
    assert!(e.to_string().contains("collector signature"), "{e}");
}

#[tokio::test]
async fn digests_chain_to_the_previous_one() {
    let f = Fixture::new();
    let c = Collector::open(&f.config).await.unwrap();
    let d1 = c.sign_digest().await.unwrap();
    let d2 = c.sign_digest().await.unwrap();
    let first: Digest = d1.verify_json(PAYLOAD_DIGEST, &c.public_key()).unwrap();
    let second: Digest = d2.verify_json(PAYLOAD_DIGEST, &c.public_key()).unwrap();
    assert_eq!((first.n, second.n), (1, 2));
    assert_eq!(
        second.prev,
        Some(sign::sha256_hex(&sign::canonical(&d1).unwrap()))
    );
}

/// `c` served on a free loopback port (through `tls` when given) until the task is aborted.
async fn serve_on_loopback(
    c: &Arc<Collector>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(crate::serve::serve(
        crate::serve::Front {
            service: "collector",
            router: router(c.clone()),
            limits: crate::serve::Limits::default(),
            max_body: MAX_BODY_BYTES,
            refusals: Arc::default(),
        },
        listener,
        tls,
        std::future::pending(),
    ));
    (addr, server)
}

#[tokio::test]
async fn shipped_over_https_to_a_collector_the_host_trusts() {
    let f = Fixture::new();
    let (dir, mut s) = f.spool("spool", key(1));
    for _ in 0..3 {
        s.append(heartbeat()).unwrap();
    }
    let c = Arc::new(Collector::open(&f.config).await.unwrap());
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/collector/testdata");
    let tls =
        crate::serve::tls_acceptor(&testdata.join("cert.pem"), &testdata.join("key.pem")).unwrap();
    let (addr, server) = serve_on_loopback(&c, Some(tls)).await;
    let port = addr.port();
    let mut target = Target {
        url: format!("https://127.0.0.1:{port}"),
        key: c.public_key(),
        ca_pem: None,
    };
    // A certificate nobody vouched for is refused.
    let untrusted = ship::client(&target).unwrap();
    let mut next = None;
    assert!(matches!(
        ship::round(&untrusted, &dir, &target, &mut next).await,
        Err(ship::ShipError::Http { .. })
    ));
    target.ca_pem = Some(std::fs::read(testdata.join("cert.pem")).unwrap());
    let trusted = ship::client(&target).unwrap();
    assert_eq!(
        ship::round(&trusted, &dir, &target, &mut next)
            .await
            .unwrap(),
        3
    );
    assert_eq!(spool::read_cursor(&dir).unwrap().unwrap().seq, 3);
    server.abort();
}

#[tokio::test]
async fn a_chain_that_goes_quiet_without_stopping_raises_one_silent_alert() {
    let f = Fixture::new();
    let c = Collector::open(&f.config).await.unwrap();
    let (dir, mut s) = f.spool("spool", key(1));
    s.append(heartbeat()).unwrap();
    c.ingest(&batch(&envelopes(&dir))).await.unwrap().unwrap();
    let mut alerted = std::collections::HashSet::new();
    assert!(
        c.check_silence(Duration::from_secs(3600), &mut alerted)
            .await
            .unwrap()
            .is_empty(),
        "not quiet for long"
    );
    assert_eq!(
        c.check_silence(Duration::ZERO, &mut alerted)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        c.check_silence(Duration::ZERO, &mut alerted)
            .await
            .unwrap()
            .is_empty(),
        "alerted once"
    );
    // A clean stop is not silence.
    s.append(Body::DaemonStop {
        reason: "signal".into(),
    })
    .unwrap();
    let envs = envelopes(&dir);
    c.ingest(&batch(&envs[1..])).await.unwrap().unwrap();
    assert!(
        c.check_silence(Duration::ZERO, &mut alerted)
            .await
            .unwrap()
            .is_empty()
    );
    let alerts = c.store().alerts().await.unwrap();
    assert_eq!(alerts.iter().filter(|a| a.kind == "silent").count(), 1);
}

/// A decision the policy made alone (no approver), for the OCSF feed.
fn policy_decision(id: u64) -> Body {
    Body::Decision(DecisionRecord {
        decision: "denied".into(),
        applied: "refused".into(),
        by: "policy".into(),
        request: view(id),
        action_hash: crate::sign::statement::action_hash("h", &view(id)),
        on_behalf_of: None,
        approver_decision: None,
    })
}

/// `GET /v1/ocsf` pages by the order records were stored in: heartbeats move the cursor
/// without hiding what follows, and a chain shipped late (older records) comes after the
/// pages already read instead of being skipped.
async fn ocsf_pages(f: &mut Fixture) {
    const READER: &str = "a-reader-token";
    f.config.reader_tokens_sha256 = vec![sign::sha256_hex(READER.as_bytes())];
    let c = Arc::new(Collector::open(&f.config).await.unwrap());
    // Written first, shipped last.
    let (late, mut l) = f.spool("late", key(1));
    l.append(policy_decision(7)).unwrap();
    let (dir, mut s) = f.spool("spool", key(1));
    for _ in 0..5 {
        s.append(heartbeat()).unwrap();
    }
    s.append(policy_decision(1)).unwrap();
    c.ingest(&batch(&envelopes(&dir))).await.unwrap().unwrap();

    let (addr, server) = serve_on_loopback(&c, None).await;
    let url = format!("http://{addr}/v1/ocsf");
    let http = reqwest::Client::new();
    let page = |after: Option<u64>| {
        let mut q = vec![("limit", "3".to_owned())];
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        let r = http.get(&url).bearer_auth(READER).query(&q).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status(), 200);
            let header = |h: &str| {
                r.headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let cursor: u64 = header(CURSOR_HEADER).parse().unwrap();
            let more = header(MORE_HEADER) == "true";
            let ids: Vec<u64> = r
                .text()
                .await
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["unmapped"]["request_id"].as_u64().unwrap()
                })
                .collect();
            (ids, cursor, more)
        }
    };
    assert_eq!(page(None).await, (vec![], 3, true), "heartbeats only");
    assert_eq!(page(Some(3)).await, (vec![1], 6, true));
    assert_eq!(page(Some(6)).await, (vec![], 6, false), "nothing new");
    c.ingest(&batch(&envelopes(&late))).await.unwrap().unwrap();
    assert_eq!(
        page(Some(6)).await,
        (vec![7], 7, false),
        "shipped late, read after"
    );
    server.abort();
}

#[tokio::test]
async fn the_ocsf_feed_pages_by_ingest_order() {
    let mut f = Fixture::new();
    ocsf_pages(&mut f).await;
}

#[tokio::test]
async fn the_ocsf_feed_pages_by_ingest_order_on_postgresql() {
    let mut f = Fixture::new();
    let pg = PgCluster::start(f.dir.path());
    f.config.database = pg.url.clone();
    ocsf_pages(&mut f).await;
}
