//! The daemon's side of the remote approver: enrollment with a one-time token, signed
//! escalations sent with retries until their deadline, and a long poll for decisions whose
//! approver signature is verified here before they reach the main loop (which then checks
//! that each one is bound to a request it holds, with the same action hash).
//!
//! Nothing here can release anything: an unreachable approver only means no decision comes,
//! and the main loop applies each request's timeout outcome at its deadline.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::{
    approver::api::{PAYLOAD_POLL, Poll, PollAnswer},
    sign::{
        self,
        dsse::Envelope,
        statement::{DecisionStatement, PAYLOAD_DECISION, PAYLOAD_REVOCATION, RevocationStatement},
    },
};

/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one long poll may wait at the approver.
const POLL_WAIT: Duration = Duration::from_secs(20);

/// `approver:` in daemon.yaml.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// The approver's base URL, e.g. `https://approver.example.com:8443`.
    pub url: String,
    /// A file holding the one-time enrollment token (needed until the host is enrolled).
    pub enroll_token_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for the approver's TLS (besides the system's roots).
    pub ca_file: Option<PathBuf>,
    /// The approver's public key (SPKI PEM). Without it the key the approver gives at
    /// enrollment is pinned.
    pub public_key: Option<PathBuf>,
    /// Where the enrollment (host id, pinned approver key) is kept.
    #[serde(default = "default_state")]
    pub state: PathBuf,
}

fn default_state() -> PathBuf {
    PathBuf::from(crate::paths::DEFAULT_APPROVER_STATE)
}

/// What enrollment leaves on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Enrollment {
    url: String,
    host_id: String,
    approver_key_id: String,
    /// SPKI PEM.
    approver_key: String,
}

/// A verified decision from the approver (the signature checked; the binding is the main
/// loop's to check).
#[derive(Debug, Clone)]
pub enum Incoming {
    Decision(SignedDecision),
    /// The approver took a grant back.
    Revocation(RevocationStatement),
}

/// A verified decision and its envelope.
#[derive(Debug, Clone)]
pub struct SignedDecision {
    pub statement: DecisionStatement,
    /// Embedded in the decision record.
    pub envelope: Envelope,
}

/// How the connection to the approver is, for `status`.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub enrolled: bool,
    pub last_error: Option<String>,
    pub sent: u64,
    pub received: u64,
}

/// The handle the main loop keeps.
pub struct Remote {
    pub url: String,
    outgoing: mpsc::Sender<(Envelope, tokio::time::Instant)>,
    pub health: Arc<Mutex<Health>>,
}

impl Remote {
    /// Queues a signed escalation; it is retried until `deadline`.
    pub fn escalate(&self, envelope: Envelope, deadline: tokio::time::Instant) {
        if self.outgoing.try_send((envelope, deadline)).is_err() {
            // The queue is bounded; the request still times out by its deadline.
            self.note_error("too many escalations queued; this one was not sent".into());
        }
    }

    fn note_error(&self, e: String) {
        if let Ok(mut h) = self.health.lock() {
            h.last_error = Some(e);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A configured file cannot be read.
    #[error("approver.{field}: {path}: {message}")]
    File {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The HTTP client cannot be built (bad CA file).
    #[error("approver: HTTP client: {0}")]
    Client(String),
}

fn client(config: &RemoteConfig) -> Result<reqwest::Client, RemoteError> {
    let mut b = reqwest::Client::builder()
        .timeout(POLL_WAIT + Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(10));
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).map_err(|e| RemoteError::File {
            field: "ca_file",
            path: ca.clone(),
            message: e.to_string(),
        })?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| RemoteError::File {
            field: "ca_file",
            path: ca.clone(),
            message: e.to_string(),
        })?;
        b = b.add_root_certificate(cert);
    }
    b.build().map_err(|e| RemoteError::Client(e.to_string()))
}

/// Starts the connection to the approver in the background. Configuration errors (files that
/// cannot be read) are returned now; everything network-related is retried for ever.
pub fn start(
    config: RemoteConfig,
    host_key: SigningKey,
    host_id: String,
    host_name: String,
) -> Result<(Remote, mpsc::Receiver<Incoming>), RemoteError> {
    let http = client(&config)?;
    let pinned = match &config.public_key {
        Some(p) => Some(sign::keys::load_public(p).map_err(|e| RemoteError::File {
            field: "public_key",
            path: p.clone(),
            message: e.to_string(),
        })?),
        None => None,
    };
    let token = match &config.enroll_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| RemoteError::File {
                    field: "enroll_token_file",
                    path: p.clone(),
                    message: e.to_string(),
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let health = Arc::new(Mutex::new(Health::default()));
    let (out_tx, out_rx) = mpsc::channel(1024);
    let (in_tx, in_rx) = mpsc::channel(256);
    let (key_tx, key_rx) = watch::channel::<Option<VerifyingKey>>(None);
    let conn = Arc::new(Conn {
        base: config.url.trim_end_matches('/').to_owned(),
        http,
        host_key,
        host_id,
        health: health.clone(),
    });
    tokio::spawn(enroll_then_poll(
        conn.clone(),
        config,
        token,
        host_name,
        pinned,
        key_tx,
        in_tx,
    ));
    tokio::spawn(send_escalations(conn.clone(), out_rx, key_rx));
    Ok((
        Remote {
            url: conn.base.clone(),
            outgoing: out_tx,
            health,
        },
        in_rx,
    ))
}

struct Conn {
    base: String,
    http: reqwest::Client,
    host_key: SigningKey,
    host_id: String,
    health: Arc<Mutex<Health>>,
}

impl Conn {
    fn note(&self, f: impl FnOnce(&mut Health)) {
        if let Ok(mut h) = self.health.lock() {
            f(&mut h);
        }
    }

    async fn post<T: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<serde_json::Value, String> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| format!("{path}: {}", chain(&e)))?;
        let status = resp.status();
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("{path}: HTTP {status}, not JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{path}: HTTP {status}: {}",
                v["error"].as_str().unwrap_or("no reason given")
            ));
        }
        Ok(v)
    }
}

/// An error with its causes (reqwest's own message hides the TLS or connect reason).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn read_enrollment(path: &Path, url: &str) -> Option<Enrollment> {
    let e: Enrollment = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (e.url.trim_end_matches('/') == url).then_some(e)
}

fn write_enrollment(path: &Path, e: &Enrollment) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(e)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn enroll_then_poll(
    conn: Arc<Conn>,
    config: RemoteConfig,
    token: Option<String>,
    host_name: String,
    pinned: Option<VerifyingKey>,
    key_tx: watch::Sender<Option<VerifyingKey>>,
    incoming: mpsc::Sender<Incoming>,
) {
    let mut backoff = Backoff::default();
    let approver_key = loop {
        match enroll(
            &conn,
            &config,
            token.as_deref(),
            &host_name,
            pinned.as_ref(),
        )
        .await
        {
            Ok(k) => break k,
            Err(e) => {
                tracing::warn!(url = conn.base, error = %e, "approver enrollment failed; retrying");
                conn.note(|h| h.last_error = Some(e));
                backoff.wait().await;
            }
        }
    };
    conn.note(|h| {
        h.enrolled = true;
        h.last_error = None;
    });
    let _ = key_tx.send(Some(approver_key));
    tracing::info!(url = conn.base, "connected to the approver");
    let mut after = (0i64, 0i64);
    let mut backoff = Backoff::default();
    loop {
        match poll_once(&conn, &approver_key, after, &incoming).await {
            Ok(a) => {
                after = a;
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(error = %e, "polling the approver failed; retrying");
                conn.note(|h| h.last_error = Some(e));
                backoff.wait().await;
            }
        }
        if incoming.is_closed() {
            return;
        }
    }
}

/// Enrolls (or reads the earlier enrollment); the approver's key to verify decisions with.
async fn enroll(
    conn: &Conn,
    config: &RemoteConfig,
    token: Option<&str>,
    host_name: &str,
    pinned: Option<&VerifyingKey>,
) -> Result<VerifyingKey, String> {
    if let Some(e) = read_enrollment(&config.state, &conn.base)
        && e.host_id == conn.host_id
    {
        let key = sign::keys::parse_public(&e.approver_key)?;
        if pinned.is_some_and(|p| *p != key) {
            return Err(format!(
                "{}: the enrolled approver key is not approver.public_key",
                config.state.display()
            ));
        }
        return Ok(key);
    }
    let Some(token) = token else {
        return Err(format!(
            "not enrolled with {} and no approver.enroll_token_file to enroll with",
            conn.base
        ));
    };
    let v = conn
        .post(
            "/v1/enroll",
            &serde_json::json!({
                "token": token,
                "host_name": host_name,
                "public_key": sign::keys::public_pem(&conn.host_key.verifying_key()),
            }),
        )
        .await?;
    let pem = v["approver_key"]
        .as_str()
        .ok_or("enrollment answer without approver_key")?;
    let key = sign::keys::parse_public(pem)?;
    if pinned.is_some_and(|p| *p != key) {
        return Err("the approver's key is not the configured approver.public_key".into());
    }
    if v["host_id"].as_str() != Some(conn.host_id.as_str()) {
        return Err("the approver computed another host id for our key".into());
    }
    let e = Enrollment {
        url: conn.base.clone(),
        host_id: conn.host_id.clone(),
        approver_key_id: sign::key_id(&key).0,
        approver_key: pem.to_owned(),
    };
    write_enrollment(&config.state, &e)
        .map_err(|err| format!("{}: {err}", config.state.display()))?;
    tracing::info!(
        url = conn.base,
        approver_key = e.approver_key_id,
        "enrolled with the approver"
    );
    Ok(key)
}

/// One long poll; the new `after`.
/// One long poll; the new cursors (decisions, revocations).
async fn poll_once(
    conn: &Conn,
    approver_key: &VerifyingKey,
    (after, after_revocation): (i64, i64),
    incoming: &mpsc::Sender<Incoming>,
) -> Result<(i64, i64), String> {
    let poll = Poll {
        host_id: conn.host_id.clone(),
        after,
        after_revocation,
        wait_ms: POLL_WAIT.as_millis() as u64,
        at: crate::approver::store::rfc3339(crate::approver::store::now_ms()),
    };
    let env =
        Envelope::sign_json(PAYLOAD_POLL, &poll, &conn.host_key).map_err(|e| e.to_string())?;
    let v = conn.post("/v1/decisions", &env).await?;
    let answer: PollAnswer = serde_json::from_value(v).map_err(|e| format!("poll answer: {e}"))?;
    let mut next = after;
    for d in answer.decisions {
        next = next.max(d.seq);
        match d
            .envelope
            .verify_json::<DecisionStatement>(PAYLOAD_DECISION, approver_key)
        {
            Ok(statement) => {
                conn.note(|h| h.received += 1);
                let _ = incoming
                    .send(Incoming::Decision(SignedDecision {
                        statement,
                        envelope: d.envelope,
                    }))
                    .await;
            }
            // A forged or damaged decision is no decision.
            Err(e) => {
                tracing::error!(seq = d.seq, error = %e, "a decision from the approver does not verify; ignored")
            }
        }
    }
    let mut next_revocation = after_revocation;
    for r in answer.revocations {
        next_revocation = next_revocation.max(r.seq);
        match r
            .envelope
            .verify_json::<RevocationStatement>(PAYLOAD_REVOCATION, approver_key)
        {
            Ok(statement) => {
                let _ = incoming.send(Incoming::Revocation(statement)).await;
            }
            Err(e) => {
                tracing::error!(seq = r.seq, error = %e, "a revocation from the approver does not verify; ignored");
            }
        }
    }
    Ok((next, next_revocation))
}

async fn send_escalations(
    conn: Arc<Conn>,
    mut queue: mpsc::Receiver<(Envelope, tokio::time::Instant)>,
    key: watch::Receiver<Option<VerifyingKey>>,
) {
    while let Some((env, deadline)) = queue.recv().await {
        let conn = conn.clone();
        let mut key = key.clone();
        tokio::spawn(async move {
            // Not before enrollment: the approver would not know our key.
            let wait_enrolled = key.wait_for(Option::is_some);
            if tokio::time::timeout_at(deadline, wait_enrolled)
                .await
                .is_err()
            {
                return;
            }
            let mut backoff = Backoff::default();
            while tokio::time::Instant::now() < deadline {
                match conn.post("/v1/escalations", &env).await {
                    Ok(_) => {
                        conn.note(|h| h.sent += 1);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sending an escalation failed; retrying");
                        conn.note(|h| h.last_error = Some(e));
                        let _ = tokio::time::timeout_at(deadline, backoff.wait()).await;
                    }
                }
            }
        });
    }
}

/// Exponential backoff from 500 ms to [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    async fn wait(&mut self) {
        let d = Duration::from_millis(500u64 << self.0.min(6)).min(MAX_BACKOFF);
        self.0 += 1;
        tokio::time::sleep(d).await;
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{approver::api::SeqDecision, proto::Decision};

    fn statement(request: u64) -> DecisionStatement {
        DecisionStatement {
            v: 1,
            approver_key: "k".into(),
            host_id: "h".into(),
            request,
            action_hash: "a".into(),
            decision: Decision::Approve,
            approvals: Vec::new(),
            decided_at: "2026-01-01T00:00:00Z".into(),
            grant: None,
        }
    }

    /// Regression guard: a decision that does not verify against the pinned approver key
    /// (forged, or signed by another approver) never reaches the main loop.
    #[tokio::test(flavor = "current_thread")]
    async fn decisions_not_signed_by_the_pinned_key_are_dropped() {
        let approver = SigningKey::from_bytes(&[7; 32]);
        let forger = SigningKey::from_bytes(&[8; 32]);
        let good = Envelope::sign_json(PAYLOAD_DECISION, &statement(1), &approver).unwrap();
        let forged = Envelope::sign_json(PAYLOAD_DECISION, &statement(2), &forger).unwrap();
        // Right key, wrong payload type (an escalation replayed as a decision).
        let retyped = Envelope::sign_json(
            crate::sign::statement::PAYLOAD_ESCALATION,
            &statement(3),
            &approver,
        )
        .unwrap();
        let mut edited = Envelope::sign_json(PAYLOAD_DECISION, &statement(4), &approver).unwrap();
        edited.payload = Envelope::sign_json(PAYLOAD_DECISION, &statement(5), &approver)
            .unwrap()
            .payload;
        let answer = serde_json::to_value(PollAnswer {
            revocations: Vec::new(),
            decisions: [forged, retyped, edited, good]
                .into_iter()
                .enumerate()
                .map(|(i, envelope)| SeqDecision {
                    seq: i as i64 + 1,
                    envelope,
                })
                .collect(),
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/v1/decisions",
            axum::routing::post(move || {
                let a = answer.clone();
                async move { axum::Json(a) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let conn = Conn {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            host_key: SigningKey::from_bytes(&[9; 32]),
            host_id: "h".into(),
            health: Arc::default(),
        };
        let (tx, mut rx) = mpsc::channel(8);
        let after = poll_once(&conn, &approver.verifying_key(), (0, 0), &tx)
            .await
            .unwrap();
        assert_eq!(after, (4, 0), "the cursor moves past every decision");
        drop(tx);
        let mut got = Vec::new();
        while let Some(i) = rx.recv().await {
            if let Incoming::Decision(d) = i {
                got.push(d.statement.request);
            }
        }
        assert_eq!(got, [1], "only the decision the approver signed arrives");
    }
}
