//! The approver and the collector against hostile and careless clients, over loopback, on the
//! real binaries: slow clients beyond the connection limit, clients that never finish their
//! request, bodies in flight, a shutdown with clients hanging on, reads without a reader
//! token.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use countersign_tests::{
    Proc, WAIT, countersign_bin,
    remote::{Approver, free_port, http, sha256},
};

const READER_TOKEN: &str = "reader-token-for-the-siem";
const EXPORT_TOKEN: &str = "export-token-for-records-verify";

/// A `countersign collector` with `limits` (YAML flow mapping), stopped on drop.
struct Collector {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Collector {
    fn start(limits: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = dir.path().join("collector.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\ndatabase: sqlite://{}\nkey: {}\nhosts: []\n\
                 reader_tokens_sha256: [{}]\nexport_tokens_sha256: [{}]\nlimits: {limits}\n",
                dir.path().join("collector.db").display(),
                dir.path().join("collector.key").display(),
                sha256(READER_TOKEN),
                sha256(EXPORT_TOKEN),
            ),
        )
        .expect("collector.yaml");
        let log = std::fs::File::create(dir.path().join("collector.log")).expect("log");
        let child = Command::new(countersign_bin())
            .args(["collector", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("countersign collector");
        let c = Self {
            proc: Some(Proc { child }),
            dir,
            port,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(c.addr()).is_err() {
            assert!(Instant::now() < deadline, "not serving:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("collector.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").pid()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- collector log ----\n{}\n----", self.log());
        }
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// `n` connections that send part of a request head and then nothing.
fn slow_clients(addr: &str, n: usize, partial: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            if !partial.is_empty() {
                s.write_all(partial).expect("partial head");
            }
            s
        })
        .collect()
}

/// Open file descriptors of `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// A GET /healthz answered 200 within a second, five times in a row.
fn served_within_a_second(addr: &str) {
    for _ in 0..5 {
        let t = Instant::now();
        let (status, body) = http(addr, "GET", "/healthz", &[], "");
        let took = t.elapsed();
        assert_eq!((status, body.trim()), (200, "ok"));
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
    }
}

#[test]
fn slow_clients_beyond_the_limit_do_not_keep_a_normal_client_out_of_the_collector() {
    // A head timeout far away: what keeps the service answering is the limit, not the timer.
    let c = Collector::start("{max_connections: 50, header_timeout_secs: 300}");
    let slow = slow_clients(
        &c.addr(),
        150,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    );
    served_within_a_second(&c.addr());
    // The service holds no more than its limit, whatever was opened.
    let fds = descriptors(c.pid());
    assert!(fds < 50 + 40, "{fds} descriptors open");
    // The evicted clients were told by a closed connection (reset, when the service had not
    // read their bytes yet).
    let closed = slow
        .into_iter()
        .filter_map(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(20))).ok()?;
            match s.read(&mut [0u8; 64]) {
                Ok(0) => Some(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(()),
                _ => None,
            }
        })
        .count();
    assert!(closed >= 100, "{closed} of 150 slow clients closed");
    let log = c.log();
    assert!(
        log.contains("connection limit reached") && log.contains("127.0.0.1"),
        "refusals are logged with the peer:\n{log}"
    );
    assert!(
        log.matches("refused").count() <= 40,
        "refusals are logged at a bounded rate:\n{log}"
    );
}

#[test]
fn slow_clients_beyond_the_limit_do_not_keep_a_normal_client_out_of_the_approver_over_tls() {
    let a = Approver::start_with_yaml(
        "limits: {max_connections: 40, header_timeout_secs: 300}\n",
        true,
    );
    // TCP connections that never start their TLS handshake, and some half a hello.
    let _silent = slow_clients(&a.addr(), 60, b"");
    let _half = slow_clients(&a.addr(), 60, &[0x16, 0x03, 0x01, 0x02]);
    let ca = std::fs::read(a.ca.as_ref().expect("tls")).expect("ca");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("pem"))
            .build()
            .expect("client");
        for _ in 0..5 {
            let t = Instant::now();
            let r = client
                .get(format!("{}/healthz", a.url()))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
            assert_eq!(r.status(), 200);
            let took = t.elapsed();
            assert!(took < Duration::from_secs(1), "answered after {took:?}");
        }
    });
}

#[test]
fn a_client_that_never_finishes_its_request_is_closed_at_the_head_deadline() {
    let c = Collector::start("{header_timeout_secs: 1, body_timeout_secs: 1}");
    let mut head = slow_clients(&c.addr(), 1, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").remove(0);
    let mut body = slow_clients(
        &c.addr(),
        1,
        b"POST /v1/records HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"records\":",
    )
    .remove(0);
    for s in [&mut head, &mut body] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "closed after {took:?}: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    let log = c.log();
    assert!(log.contains("request head not received in time"), "{log}");
    assert!(log.contains("request body not received in time"), "{log}");
}

#[test]
fn a_tls_handshake_that_never_comes_is_closed_at_the_head_deadline() {
    let a = Approver::start_with_yaml("limits: {header_timeout_secs: 1}\n", true);
    let mut silent = TcpStream::connect(a.addr()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let _ = silent.read_to_end(&mut Vec::new());
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    // The line is written just after the socket is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.log().contains("TLS handshake not finished in time") {
        assert!(Instant::now() < deadline, "{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn request_bodies_in_flight_are_bounded_together() {
    let c = Collector::start("{max_body_bytes_in_flight: 1048576, body_timeout_secs: 60}");
    let post = |len: usize| {
        format!("POST /v1/records HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{{")
    };
    // One large body arriving slowly holds most of the budget…
    let first = slow_clients(&c.addr(), 1, post(800_000).as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    // …so a second one is refused at once, and told to come back.
    let mut second = slow_clients(&c.addr(), 1, post(800_000).as_bytes()).remove(0);
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = [0u8; 512];
    let n = second.read(&mut answer).expect("an answer");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    // Small requests still pass, and once the large one is gone the budget is back.
    let (status, _) = http(&c.addr(), "POST", "/v1/records", &[], "{}");
    assert_eq!(status, 400, "a small body fits in what is left");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = slow_clients(&c.addr(), 1, post(800_000).as_bytes()).remove(0);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match s.read(&mut [0u8; 64]) {
            // Still reading the body: admitted.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            _ => assert!(Instant::now() < deadline, "the budget did not come back"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_collector_stops_within_its_drain_whatever_its_clients_do() {
    let mut c = Collector::start("{drain_secs: 1, header_timeout_secs: 300}");
    let _slow = slow_clients(&c.addr(), 5, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    let mut idle = TcpStream::connect(c.addr()).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut p = c.proc.take().expect("running");
    let t = Instant::now();
    // SAFETY: signalling the collector this test started, by its pid.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let status = p.wait(Duration::from_secs(10));
    let took = t.elapsed();
    assert!(status.success(), "{status:?}\n{}", c.log());
    assert!(took < Duration::from_secs(4), "stopped after {took:?}");
}

#[test]
fn every_read_of_the_collector_needs_a_reader_token() {
    let c = Collector::start("{}");
    let bearer = |t: &str| format!("Bearer {t}");
    for path in ["/v1/ocsf", "/v1/alerts", "/v1/heads", "/v1/export"] {
        let (status, body) = http(&c.addr(), "GET", path, &[], "");
        assert_eq!(status, 401, "{path} without a token: {body}");
        let (status, _) = http(
            &c.addr(),
            "GET",
            path,
            &[("Authorization", &bearer("not-a-token"))],
            "",
        );
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, body) = http(
            &c.addr(),
            "GET",
            path,
            &[("Authorization", &bearer(READER_TOKEN))],
            "",
        );
        assert_eq!(status, 200, "{path} with a reader token: {body}");
    }
    // An export token reads the export, and nothing else.
    let export = [("Authorization", bearer(EXPORT_TOKEN))];
    let export: Vec<(&str, &str)> = export.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(http(&c.addr(), "GET", "/v1/export", &export, "").0, 200);
    assert_eq!(http(&c.addr(), "GET", "/v1/ocsf", &export, "").0, 401);
    // Health needs nothing.
    assert_eq!(http(&c.addr(), "GET", "/healthz", &[], "").0, 200);
    let log = c.log();
    assert!(
        log.contains("GET /v1/ocsf: answered 401") && log.contains("127.0.0.1"),
        "{log}"
    );
}

#[test]
fn bad_limits_are_refused_at_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("collector.yaml");
    std::fs::write(
        &config,
        format!(
            "database: sqlite://{}\nkey: {}\nlimits: {{header_timeout_secs: 0}}\n",
            dir.path().join("c.db").display(),
            dir.path().join("c.key").display()
        ),
    )
    .unwrap();
    let out = Command::new(countersign_bin())
        .args(["collector", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(config.to_str().unwrap()) && err.contains("limits.header_timeout_secs"),
        "{err}"
    );
}

/// A connection to `addr` from the loopback address `from` (so one test can be two peers).
fn connect_from(from: [u8; 4], addr: &str) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    let to: std::net::SocketAddrV4 = addr.parse().expect("an IPv4 address");
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, bound and connected with valid sockaddr_in values; its
    // descriptor is owned by the TcpStream made from it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(std::net::Ipv4Addr::from(from), 0);
        assert_eq!(
            libc::bind(fd, std::ptr::from_ref(&local).cast(), len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        let remote = sockaddr(*to.ip(), to.port());
        assert_eq!(
            libc::connect(fd, std::ptr::from_ref(&remote).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        stream
    }
}

/// The status of a POST of `body` to `path` over `s`.
fn post_status(s: TcpStream, path: &str, body: &str) -> u16 {
    status_of(
        s,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The status of the answer to `request` (a whole HTTP/1.1 request) sent over `s`.
fn status_of(mut s: TcpStream, request: &str) -> u16 {
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

#[test]
fn records_anyone_can_send_make_one_counted_alert_and_their_sender_is_stopped() {
    let c = Collector::start("{refusals_per_peer_per_minute: 20}");
    // A signed-looking envelope whose payload is no record: what any sender can post.
    let junk = r#"{"records":[{"payloadType":"application/vnd.countersign.record+json","payload":"bm90IGEgcmVjb3Jk","signatures":[{"keyid":"0000","sig":"AAAA"}]}]}"#;
    let statuses: Vec<u16> = (0..50)
        .map(|_| post_status(connect_from([127, 0, 0, 2], &c.addr()), "/v1/records", junk))
        .collect();
    assert!(
        statuses[..20].iter().all(|s| *s == 409),
        "refused, with the reason: {statuses:?}"
    );
    assert!(
        statuses[20..].iter().all(|s| *s == 429),
        "then stopped before any work: {statuses:?}"
    );
    // Another peer is not stopped, and sees one alert with the count.
    let bearer = format!("Bearer {READER_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let deadline = Instant::now() + Duration::from_secs(10);
    let alert = loop {
        let (status, body) = http(&c.addr(), "GET", "/v1/alerts", &auth, "");
        assert_eq!(status, 200, "{body}");
        let alerts: serde_json::Value = serde_json::from_str(&body).unwrap();
        let alerts = alerts.as_array().unwrap().clone();
        assert_eq!(alerts.len(), 1, "one alert for the flood: {alerts:?}");
        if alerts[0]["count"] == 20 {
            break alerts[0].clone();
        }
        assert!(Instant::now() < deadline, "{alerts:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(alert["kind"], "unreadable", "{alert}");
    assert_eq!(alert["source"], "127.0.0.2", "{alert}");
    // The log names the sender and the reason, a bounded number of times.
    let log = c.log();
    assert!(
        log.contains("peer=127.0.0.2") && log.contains("payload is not a record"),
        "{log}"
    );
    assert!(
        log.matches("payload is not a record").count() <= 12,
        "refusals are not logged one by one:\n{log}"
    );
    // Garbage that is not even a batch counts against its sender too, without an alert.
    let c2 = Collector::start("{refusals_per_peer_per_minute: 3}");
    let statuses: Vec<u16> = (0..5)
        .map(|_| post_status(TcpStream::connect(c2.addr()).unwrap(), "/v1/records", "{"))
        .collect();
    assert_eq!(statuses, [400, 400, 400, 429, 429]);
}

#[test]
fn alerts_are_paged_newest_first() {
    let c = Collector::start("{}");
    let junk = |n: u8| {
        format!(
            r#"{{"records":[{{"payloadType":"x","payload":"bm90IGEgcmVjb3Jk","signatures":[{{"keyid":"{n}","sig":"AAAA"}}]}}]}}"#
        )
    };
    // Three peers: three alerts.
    for n in 2..5 {
        assert_eq!(
            post_status(
                connect_from([127, 0, 0, n], &c.addr()),
                "/v1/records",
                &junk(n)
            ),
            409
        );
    }
    let bearer = format!("Bearer {READER_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let page = |q: &str| {
        let (status, body) = http(&c.addr(), "GET", &format!("/v1/alerts?{q}"), &auth, "");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| a["source"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let all = page("limit=10");
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(page("limit=2"), all[..2]);
    assert_eq!(page("limit=2&offset=2"), all[2..]);
}

#[test]
fn a_peer_that_keeps_guessing_approver_tokens_is_stopped_and_others_are_not() {
    let a = Approver::start_with_yaml("limits: {refusals_per_peer_per_minute: 5}\n", false);
    let get = |s: TcpStream, token: &str| {
        status_of(
            s,
            &format!(
                "GET /v1/requests HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
            ),
        )
    };
    let guesses: Vec<u16> = (0..8)
        .map(|i| {
            get(
                connect_from([127, 0, 0, 3], &a.addr()),
                &format!("guess-{i}"),
            )
        })
        .collect();
    assert_eq!(guesses, [401, 401, 401, 401, 401, 429, 429, 429]);
    // Stopped even with a right token, for the rest of the minute…
    let alice = countersign_tests::remote::token_of("alice");
    assert_eq!(get(connect_from([127, 0, 0, 3], &a.addr()), &alice), 429);
    // …while another address is served.
    assert_eq!(get(TcpStream::connect(a.addr()).unwrap(), &alice), 200);
    assert_eq!(http(&a.addr(), "GET", "/healthz", &[], "").0, 200);
    let log = a.log();
    assert!(
        log.contains("too many refused requests from this address") && log.contains("127.0.0.3"),
        "{log}"
    );
}

#[test]
fn teams_tokens_naming_unknown_keys_do_not_make_the_approver_fetch_keys_again_and_again() {
    let teams = countersign_tests::remote::FakeTeams::start();
    let a = Approver::start_with_teams(&teams);
    let bot = format!("{}/teams/messages", a.url());
    let forged = serde_json::json!({"forge": "kid"});
    for i in 0..30 {
        let (status, body) = teams.invoke(
            &bot,
            &serde_json::Value::Null,
            i,
            "approve",
            "aad-bob",
            &forged,
        );
        assert!(
            (400..500).contains(&status),
            "a token naming an unknown key is refused: {status} {body}"
        );
    }
    let state = teams.state();
    // The first token fetches the set once; the next unknown key id fetches it once more;
    // then nothing for a minute.
    assert!(
        state["keys_fetches"].as_u64() <= Some(2) && state["openid_fetches"].as_u64() <= Some(2),
        "{} metadata and {} key set fetches for 30 forged key ids",
        state["openid_fetches"],
        state["keys_fetches"]
    );
    // A real token still verifies with the key set in hand.
    let (status, _) = teams.invoke(
        &bot,
        &serde_json::Value::Null,
        99,
        "approve",
        "aad-bob",
        &serde_json::json!({}),
    );
    assert_ne!(status, 401, "a real token is not refused for its key");
}
