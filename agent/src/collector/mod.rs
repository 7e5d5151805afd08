//! `countersign collector`: receives the hosts' signed records, verifies every one
//! (signature by the enrolled or rotated-to key, contiguous seq, previous hash), stores the
//! raw envelopes with queryable rows, answers with signed receipts, and raises alerts.
//!
//! Ingestion is serialised (one mutex): records of one chain arrive in order, and a retry
//! of a stored record is answered as a duplicate, so the shipper may resend anything.
//! Hourly, the collector signs a digest of all heads chained to the previous digest.
pub mod api;
pub mod config;
pub mod export;
pub mod store;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use self::{
    api::{
        Accepted, Batch, Expected, MAX_BATCH, MAX_BODY_BYTES, PAYLOAD_RECEIPT, Receipt, Refused,
    },
    config::CollectorConfig,
    store::{Alert, Head, Row, Store, StoreError},
};
use crate::{
    records::{self, Body, PAYLOAD_RECORD, Record, verify::check_content},
    sign::{self, dsse::Envelope, keys},
};

/// How often the heads digest is signed.
pub const DIGEST_EVERY: Duration = Duration::from_secs(3600);
/// How many raised alerts are remembered to not raise them again on retries.
const MAX_REMEMBERED_ALERTS: usize = 10_000;
/// Alerts anyone can cause are counted in one alert per kind and peer in this window.
const OPEN_ALERT_WINDOW: Duration = Duration::from_secs(3600);
/// How often the count of such an alert is written while it keeps coming.
const OPEN_ALERT_FLUSH: Duration = Duration::from_secs(1);
/// DSSE payload type of a heads digest.
pub const PAYLOAD_DIGEST: &str = "application/vnd.countersign.digest+json";

/// Why the collector cannot start or serve.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// A key file.
    #[error(transparent)]
    Key(#[from] sign::SignError),
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listener.
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The signed digest of all heads, chained to the previous one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub v: u32,
    pub collector_key: String,
    /// 1, 2, 3, …
    pub n: u64,
    /// SHA-256 of the previous digest's envelope (canonical JSON), `None` for the first.
    pub prev: Option<String>,
    pub at: String,
    /// (chain id, host id, seq, hash) of every chain.
    pub heads: Vec<(String, String, u64, String)>,
}

pub struct Collector {
    store: Store,
    key: SigningKey,
    key_id: String,
    hosts: HashMap<String, VerifyingKey>,
    approvers: HashMap<String, VerifyingKey>,
    /// SHA-256 (hex, lowercase) of the tokens that may export.
    export_tokens: Vec<String>,
    /// SHA-256 (hex, lowercase) of the readers' tokens.
    reader_tokens: Vec<String>,
    /// Refused clients, logged at a bounded rate.
    refusals: Arc<crate::serve::Refusals>,
    /// Alerts raised lately (kind, chain, seq, detail): a shipper retrying a refused record
    /// forever raises its alert once, not once per retry.
    raised: std::sync::Mutex<std::collections::HashSet<(String, String, u64, String)>>,
    /// The alerts anyone can cause, by (kind, peer): counted, not stored one by one.
    open_alerts: std::sync::Mutex<HashMap<(String, String), OpenAlert>>,
    /// Peers refused too often.
    strikes: Arc<crate::serve::Strikes>,
    ingest: tokio::sync::Mutex<()>,
}

/// The alert of one kind and peer in the current window.
#[derive(Debug, Clone)]
struct OpenAlert {
    /// When it was raised (its key in the table, with kind and source).
    at: String,
    since: std::time::Instant,
    count: u64,
    written: u64,
    written_at: std::time::Instant,
    last_at: String,
}

/// What became of one record.
enum Ingested {
    Stored(Head),
    Duplicate(Head),
}

/// Why a record was refused.
struct Reject {
    why: String,
    expected: Option<Expected>,
    /// Anyone could have sent it (see [`Refused::unauthenticated`]).
    unauthenticated: bool,
}

impl Collector {
    /// Opens the database and keys named by `config`.
    pub async fn open(config: &CollectorConfig) -> Result<Self, CollectorError> {
        let (key, made) = keys::load_or_create(&config.key)?;
        let key_id = sign::key_id(&key.verifying_key()).0;
        if made {
            tracing::info!(path = %config.key.display(), key_id, "collector key made");
        }
        let mut hosts = HashMap::new();
        for p in &config.hosts {
            let k = keys::load_public(p)?;
            hosts.insert(sign::key_id(&k).0, k);
        }
        let mut approvers = HashMap::new();
        for p in &config.approver_keys {
            let k = keys::load_public(p)?;
            approvers.insert(sign::key_id(&k).0, k);
        }
        Ok(Self {
            store: Store::open(&config.database).await?,
            key,
            key_id,
            hosts,
            approvers,
            export_tokens: config
                .export_tokens_sha256
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            reader_tokens: config
                .reader_tokens_sha256
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            refusals: Arc::new(crate::serve::Refusals::default()),
            open_alerts: std::sync::Mutex::new(HashMap::new()),
            strikes: Arc::new(crate::serve::Strikes::new(
                config.limits.refusals_per_peer_per_minute,
            )),
            ingest: tokio::sync::Mutex::new(()),
            raised: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    #[must_use]
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    #[must_use]
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    #[must_use]
    pub fn host_keys(&self) -> Vec<VerifyingKey> {
        self.hosts.values().copied().collect()
    }

    #[must_use]
    pub fn approver_keys(&self) -> Vec<VerifyingKey> {
        self.approvers.values().copied().collect()
    }

    async fn raise(&self, kind: &str, r: Option<&Record>, detail: String) {
        let key = (
            kind.to_owned(),
            r.map(|r| r.chain_id.clone()).unwrap_or_default(),
            r.map_or(0, |r| r.seq),
            detail.clone(),
        );
        {
            let mut raised = self.raised.lock().unwrap_or_else(|e| e.into_inner());
            if raised.contains(&key) {
                return;
            }
            // Bounded: forgetting old ones only means raising them once more.
            if raised.len() >= MAX_REMEMBERED_ALERTS {
                raised.clear();
            }
            raised.insert(key);
        }
        tracing::warn!(
            kind,
            host_id = r.map_or("", |r| r.host_id.as_str()),
            chain_id = r.map_or("", |r| r.chain_id.as_str()),
            seq = r.map_or(0, |r| r.seq),
            detail,
            "ALERT"
        );
        let a = Alert {
            at: records::now_rfc3339(),
            kind: kind.to_owned(),
            host_id: r.map(|r| r.host_id.clone()),
            chain_id: r.map(|r| r.chain_id.clone()),
            seq: r.map(|r| r.seq),
            detail,
            count: 1,
            last_at: String::new(),
            source: None,
        };
        let a = Alert {
            last_at: a.at.clone(),
            ..a
        };
        if let Err(e) = self.store.alert(&a).await {
            tracing::error!(error = %e, "cannot store an alert");
        }
    }

    /// An alert anyone could cause (a record that is not an enrolled host's): one alert per
    /// kind and peer an hour, with a count, so a flood cannot fill the table or hide the
    /// alerts about real hosts.
    async fn raise_open(&self, kind: &str, peer: Option<std::net::IpAddr>, detail: String) {
        let source = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let now = std::time::Instant::now();
        let now_text = records::now_rfc3339();
        let key = (kind.to_owned(), source.clone());
        let (new, write) = {
            let mut open = self.open_alerts.lock().unwrap_or_else(|e| e.into_inner());
            match open.get_mut(&key) {
                Some(a) if now.duration_since(a.since) < OPEN_ALERT_WINDOW => {
                    a.count += 1;
                    a.last_at.clone_from(&now_text);
                    let due = now.duration_since(a.written_at) >= OPEN_ALERT_FLUSH;
                    if due {
                        a.written = a.count;
                        a.written_at = now;
                    }
                    (false, due.then(|| a.clone()))
                }
                _ => {
                    if open.len() >= MAX_REMEMBERED_ALERTS {
                        open.clear();
                    }
                    let a = OpenAlert {
                        at: now_text.clone(),
                        since: now,
                        count: 1,
                        written: 1,
                        written_at: now,
                        last_at: now_text.clone(),
                    };
                    open.insert(key, a.clone());
                    (true, Some(a))
                }
            }
        };
        let Some(a) = write else { return };
        let stored = if new {
            tracing::warn!(
                kind,
                source,
                detail,
                "ALERT (more of this kind from this peer are counted for an hour)"
            );
            self.store
                .alert(&Alert {
                    at: a.at,
                    kind: kind.to_owned(),
                    host_id: None,
                    chain_id: None,
                    seq: None,
                    detail,
                    count: 1,
                    last_at: a.last_at,
                    source: Some(source),
                })
                .await
        } else {
            self.store
                .count_alert(kind, &source, &a.at, a.count, &a.last_at)
                .await
        };
        if let Err(e) = stored {
            tracing::error!(error = %e, "cannot store an alert");
        }
    }

    /// Writes the counts of alerts anyone could cause that moved since they were written.
    pub async fn write_open_alert_counts(&self) {
        let pending: Vec<((String, String), OpenAlert)> = {
            let mut open = self.open_alerts.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            open.retain(|_, a| {
                now.duration_since(a.since) < OPEN_ALERT_WINDOW || a.written != a.count
            });
            open.iter_mut()
                .filter(|(_, a)| a.written != a.count)
                .map(|(k, a)| {
                    a.written = a.count;
                    a.written_at = now;
                    (k.clone(), a.clone())
                })
                .collect()
        };
        for ((kind, source), a) in pending {
            if let Err(e) = self
                .store
                .count_alert(&kind, &source, &a.at, a.count, &a.last_at)
                .await
            {
                tracing::error!(error = %e, "cannot store an alert's count");
            }
        }
    }

    /// Verifies and stores one record (see the module docs).
    async fn ingest_one(
        &self,
        env: &Envelope,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Result<Ingested, Reject>, StoreError> {
        let reject = |why: String| {
            Ok(Err(Reject {
                why,
                expected: None,
                unauthenticated: false,
            }))
        };
        let open_reject = |why: String| {
            Ok(Err(Reject {
                why,
                expected: None,
                unauthenticated: true,
            }))
        };
        let claimed = match records::peek(env) {
            Ok(r) => r,
            Err(why) => {
                self.raise_open("unreadable", peer, why.clone()).await;
                return open_reject(why);
            }
        };
        let head = self.store.head(&claimed.chain_id).await?;
        let key = match &head {
            Some(h) => match keys::parse_public(&h.next_key) {
                Ok(k) => k,
                Err(e) => return reject(format!("stored key of the chain: {e}")),
            },
            None => match self.hosts.get(&claimed.host_id) {
                Some(k) => *k,
                None => {
                    let why = format!(
                        "host key {} is not enrolled (replaced key?)",
                        claimed.host_id
                    );
                    self.raise_open("unknown-key", peer, why.clone()).await;
                    return open_reject(why);
                }
            },
        };
        let record: Record = match env.verify_json(PAYLOAD_RECORD, &key) {
            Ok(r) => r,
            Err(e) => {
                let why = format!(
                    "host signature: {e} (record claims host {} chain {} seq {})",
                    claimed.host_id, claimed.chain_id, claimed.seq
                );
                self.raise_open("bad-signature", peer, why.clone()).await;
                return open_reject(why);
            }
        };
        if record.host_id != sign::key_id(&key).0 || record.v != records::RECORD_VERSION {
            let why = format!(
                "host_id {} / version {} do not match the signing key {} / version {}",
                record.host_id,
                record.v,
                sign::key_id(&key),
                records::RECORD_VERSION
            );
            self.raise("bad-signature", Some(&record), why.clone())
                .await;
            return reject(why);
        }
        let hash = match records::record_hash(env) {
            Ok(h) => h,
            Err(e) => return reject(e.to_string()),
        };
        let next_seq = head.as_ref().map_or(1, |h| h.seq + 1);
        if let Some(h) = &head
            && record.seq <= h.seq
        {
            return match self.store.hash_at(&record.chain_id, record.seq).await? {
                Some(stored) if stored == hash => Ok(Ok(Ingested::Duplicate(Head {
                    seq: record.seq,
                    hash,
                    ..h.clone()
                }))),
                _ => {
                    let why = format!(
                        "fork: another record with seq {} is stored for this chain",
                        record.seq
                    );
                    self.raise("fork", Some(&record), why.clone()).await;
                    reject(why)
                }
            };
        }
        if record.seq != next_seq {
            let why = format!("gap: expected seq {next_seq}, got {}", record.seq);
            self.raise("gap", Some(&record), why.clone()).await;
            return Ok(Err(Reject {
                why,
                expected: Some(Expected {
                    chain_id: record.chain_id.clone(),
                    seq: next_seq,
                }),
                unauthenticated: false,
            }));
        }
        if record.prev.as_deref() != head.as_ref().map(|h| h.hash.as_str()) {
            let why = format!(
                "fork: prev hash does not match the stored seq {}",
                record.seq.saturating_sub(1)
            );
            self.raise("fork", Some(&record), why.clone()).await;
            return reject(why);
        }
        // Content problems are alerted and kept with the record: the record is a true
        // statement of what the host did, and refusing it would stop the chain.
        let (problems, self_approval) = check_content(&record, &self.approvers);
        if !problems.is_empty() {
            let kind = if self_approval {
                "self-approval"
            } else {
                "content"
            };
            self.raise(kind, Some(&record), problems.join("; ")).await;
        }
        let next_key = match &record.body {
            Body::KeyRotated { new_public_key, .. } => new_public_key.clone(),
            _ => keys::public_pem(&key),
        };
        let new_head = Head {
            chain_id: record.chain_id.clone(),
            host_id: record.host_id.clone(),
            seq: record.seq,
            hash: hash.clone(),
            next_key,
        };
        let row = row(&record, env, &hash, &problems);
        self.store
            .insert(&row, &new_head, &records::now_rfc3339())
            .await?;
        Ok(Ok(Ingested::Stored(new_head)))
    }

    fn receipt(&self, h: &Head) -> Envelope {
        let r = Receipt {
            v: 1,
            collector_key: self.key_id.clone(),
            host_id: h.host_id.clone(),
            chain_id: h.chain_id.clone(),
            seq: h.seq,
            hash: h.hash.clone(),
            received_at: records::now_rfc3339(),
        };
        Envelope::sign_json(PAYLOAD_RECEIPT, &r, &self.key).expect("a receipt is canonical JSON")
    }

    /// Ingests a batch in order; the answer and its HTTP status.
    #[cfg(test)]
    pub async fn ingest(&self, batch: &Batch) -> Result<Result<Accepted, Refused>, StoreError> {
        self.ingest_from(batch, None).await
    }

    /// [`Self::ingest`] of a batch sent by `peer`.
    pub async fn ingest_from(
        &self,
        batch: &Batch,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Result<Accepted, Refused>, StoreError> {
        let _serial = self.ingest.lock().await;
        let (mut stored, mut duplicates, mut last) = (0, 0, None);
        for (i, env) in batch.records.iter().enumerate() {
            match self.ingest_one(env, peer).await? {
                Ok(Ingested::Stored(h)) => {
                    stored += 1;
                    last = Some(h);
                }
                Ok(Ingested::Duplicate(h)) => {
                    duplicates += 1;
                    last = Some(h);
                }
                Err(r) => {
                    let at = records::peek(env).map_or_else(
                        |_| String::new(),
                        |c| format!(" (host {} chain {} seq {})", c.host_id, c.chain_id, c.seq),
                    );
                    return Ok(Err(Refused {
                        error: format!("record {i}{at}: {}", r.why),
                        expected: r.expected,
                        stored,
                        receipt: last.as_ref().map(|h| self.receipt(h)),
                        unauthenticated: r.unauthenticated,
                    }));
                }
            }
        }
        Ok(match last {
            Some(h) => Ok(Accepted {
                stored,
                duplicates,
                receipt: self.receipt(&h),
            }),
            None => Err(Refused {
                error: "an empty batch".into(),
                expected: None,
                stored: 0,
                receipt: None,
                unauthenticated: true,
            }),
        })
    }

    /// Raises a `silent` alert for each chain whose head has not moved for `silence` and is
    /// not a `daemon-stop` (once per head); returns the chains alerted now. `alerted`
    /// remembers the heads already alerted.
    pub async fn check_silence(
        &self,
        silence: Duration,
        alerted: &mut std::collections::HashSet<(String, u64)>,
    ) -> Result<Vec<String>, StoreError> {
        let now = time_ms(&records::now_rfc3339()).unwrap_or(0);
        let limit = i64::try_from(silence.as_millis()).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for (chain_id, host_id, seq, kind, updated) in self.store.head_activity().await? {
            let quiet = now - time_ms(&updated).unwrap_or(now);
            if kind == "daemon-stop" || quiet < limit || alerted.contains(&(chain_id.clone(), seq))
            {
                continue;
            }
            alerted.insert((chain_id.clone(), seq));
            let detail = format!(
                "no record for {}s after seq {seq} ({kind}), and the host did not stop cleanly",
                quiet / 1000
            );
            tracing::warn!(kind = "silent", host_id, chain_id, seq, detail, "ALERT");
            let at = records::now_rfc3339();
            self.store
                .alert(&Alert {
                    at: at.clone(),
                    kind: "silent".into(),
                    host_id: Some(host_id),
                    chain_id: Some(chain_id.clone()),
                    seq: Some(seq),
                    detail,
                    count: 1,
                    last_at: at,
                    source: None,
                })
                .await?;
            out.push(chain_id);
        }
        Ok(out)
    }

    /// Signs a digest of all heads, chained to the previous digest, and stores it.
    pub async fn sign_digest(&self) -> Result<Envelope, StoreError> {
        let last = self.store.last_digest().await?;
        let (n, prev) = match &last {
            Some((n, env)) => (n + 1, Some(sign::sha256_hex(env.as_bytes()))),
            None => (1, None),
        };
        let heads = self
            .store
            .heads()
            .await?
            .into_iter()
            .map(|h| (h.chain_id, h.host_id, h.seq, h.hash))
            .collect();
        let at = records::now_rfc3339();
        let d = Digest {
            v: 1,
            collector_key: self.key_id.clone(),
            n,
            prev,
            at: at.clone(),
            heads,
        };
        let env =
            Envelope::sign_json(PAYLOAD_DIGEST, &d, &self.key).expect("a digest is canonical JSON");
        let text = String::from_utf8(sign::canonical(&env).expect("canonical"))
            .expect("canonical JSON is UTF-8");
        self.store.add_digest(n, &at, &text).await?;
        Ok(env)
    }
}

/// The queryable columns of `record`.
fn row(record: &Record, env: &Envelope, hash: &str, problems: &[String]) -> Row {
    let (decision, request_id, label, decided_by, on_behalf_of) = match &record.body {
        Body::Decision(d) | Body::Outcome(d) => (
            Some(d.decision.clone()),
            Some(d.request.id),
            Some(d.request.label.clone()),
            Some(d.by.clone()),
            d.on_behalf_of.clone(),
        ),
        Body::Request(q) => (
            None,
            Some(q.request.id),
            Some(q.request.label.clone()),
            None,
            q.on_behalf_of.clone(),
        ),
        Body::Tamper(t) => (
            Some("refused".to_owned()),
            None,
            Some(t.label.clone()),
            Some(t.by.clone()),
            t.on_behalf_of.clone(),
        ),
        _ => (None, None, None, None, None),
    };
    Row {
        chain_id: record.chain_id.clone(),
        seq: record.seq,
        host_id: record.host_id.clone(),
        host_name: record.host_name.clone(),
        hash: hash.to_owned(),
        time: record.time.clone(),
        time_ms: time_ms(&record.time).unwrap_or(0),
        kind: record.body.kind().to_owned(),
        decision,
        request_id,
        label,
        decided_by,
        on_behalf_of,
        problems: (!problems.is_empty()).then(|| problems.join("; ")),
        envelope: String::from_utf8(sign::canonical(env).expect("an envelope is canonical"))
            .expect("canonical JSON is UTF-8"),
        received_at: records::now_rfc3339(),
    }
}

/// Milliseconds since the epoch of an RFC 3339 time.
#[must_use]
pub fn time_ms(t: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

type Shared = Arc<Collector>;

async fn post_records(
    State(c): State<Shared>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    body: Bytes,
) -> Response {
    let peer = peer.map(|p| (p.0).0.ip());
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            let why = format!("not a batch of records: {e}");
            let mut r = (StatusCode::BAD_REQUEST, why.clone()).into_response();
            r.extensions_mut().insert(crate::serve::Reason(why));
            return r;
        }
    };
    if batch.records.len() > MAX_BATCH {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_BATCH} records per batch"),
        )
            .into_response();
    }
    match c.ingest_from(&batch, peer).await {
        Ok(Ok(a)) => {
            tracing::info!(
                stored = a.stored,
                duplicates = a.duplicates,
                "records received"
            );
            (StatusCode::OK, Json(a)).into_response()
        }
        Ok(Err(r)) => {
            // A record no enrolled host signed counts against its sender's address, and is
            // logged with it by the strikes layer (at a bounded rate).
            let strike = r.unauthenticated;
            let reason = crate::serve::Reason(r.error.clone());
            if !strike {
                tracing::warn!(error = r.error, "records refused");
            }
            let mut answer = (StatusCode::CONFLICT, Json(r)).into_response();
            if strike {
                answer.extensions_mut().insert(crate::serve::Strike);
                answer.extensions_mut().insert(reason);
            }
            answer
        }
        Err(e) => {
            tracing::error!(error = %e, "storing records failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// A bearer token whose SHA-256 is one of `allowed`.
fn bearer_in(headers: &axum::http::HeaderMap, allowed: &[&[String]]) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            let h = sign::sha256_hex(t.trim().as_bytes());
            allowed.iter().any(|set| set.contains(&h))
        })
}

/// Lets through only requests with a reader token (or, for the export, an export token);
/// the others get 401 and a line in the log.
async fn readers_only(
    State(c): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let mut allowed: Vec<&[String]> = vec![&c.reader_tokens];
    if parts.uri.path() == api::EXPORT_PATH {
        allowed.push(&c.export_tokens);
    }
    if !bearer_in(&parts.headers, &allowed) {
        // Logged with the peer by the strikes layer around it.
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            "a valid reader token is needed (reader_tokens_sha256)\n",
        )
            .into_response();
    }
    next.run(axum::extract::Request::from_parts(parts, body))
        .await
}

async fn get_heads(State(c): State<Shared>) -> Response {
    match c.store.heads().await {
        Ok(heads) => Json(
            heads
                .into_iter()
                .map(|h| serde_json::json!({"host_id": h.host_id, "chain_id": h.chain_id, "seq": h.seq, "hash": h.hash}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading heads failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// Query of `GET /v1/alerts`.
#[derive(Debug, Deserialize)]
struct AlertsQuery {
    /// At most this many (default 100, at most 1000).
    limit: Option<u64>,
    /// Skip the newest this many.
    offset: Option<u64>,
}

/// The alerts, newest first, a page at a time.
async fn get_alerts(
    State(c): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<AlertsQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match c
        .store
        .alerts_page(limit, q.offset.unwrap_or(0), true)
        .await
    {
        Ok(alerts) => (
            [(
                axum::http::HeaderName::from_static(MORE_HEADER),
                (alerts.len() as u64 == limit).to_string(),
            )],
            Json(
                alerts
                    .into_iter()
                    .map(|a| {
                        serde_json::json!({"at": a.at, "kind": a.kind, "host_id": a.host_id,
                        "chain_id": a.chain_id, "seq": a.seq, "detail": a.detail,
                        "count": a.count, "last_at": a.last_at, "source": a.source})
                    })
                    .collect::<Vec<_>>(),
            ),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading alerts failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// Query of `GET /v1/export`.
#[derive(Debug, Deserialize)]
struct ExportQuery {
    from: Option<String>,
    to: Option<String>,
}

/// The records of a period with the signed heads, for `records verify URL` (a reader or
/// export token, checked by `readers_only` around the route).
async fn get_export(
    State(c): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<ExportQuery>,
) -> Response {
    match export::period(&c, q.from.as_deref(), q.to.as_deref()).await {
        Ok(p) if p.records.len() > api::MAX_EXPORT_RECORDS => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "more than {} records: narrow the period",
                api::MAX_EXPORT_RECORDS
            ),
        )
            .into_response(),
        Ok(p) => Json(api::ExportAnswer {
            records: p.records,
            heads: p.heads,
            host_keys: c.host_keys().iter().map(keys::public_pem).collect(),
            approver_keys: c.approver_keys().iter().map(keys::public_pem).collect(),
        })
        .into_response(),
        Err(export::ExportError::Time(t)) => (
            StatusCode::BAD_REQUEST,
            format!("{t}: not an RFC 3339 time"),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "export failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// Query of `GET /v1/ocsf`.
#[derive(Debug, Deserialize)]
struct OcsfQuery {
    /// The cursor of the previous page (the `X-Countersign-Cursor` it answered); none: from
    /// the first record stored.
    after: Option<u64>,
    /// RFC 3339: only decisions at or after this time.
    since: Option<String>,
    /// At most this many records are read (default and maximum 1000).
    limit: Option<u32>,
}

/// Header of `GET /v1/ocsf`'s answer: the cursor to ask the next page with.
pub const CURSOR_HEADER: &str = "x-countersign-cursor";
/// Header of `GET /v1/ocsf`'s answer: `true` when the page was full (ask again at once).
pub const MORE_HEADER: &str = "x-countersign-more";

/// Decisions as OCSF events, one JSON object per line, in the order the collector stored
/// them. Paged by an ingest cursor: records that make no event (heartbeats) move the cursor
/// too, and a record shipped late comes after the pages already read.
async fn get_ocsf(
    State(c): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<OcsfQuery>,
) -> Response {
    let from = match q.since.as_deref().map(time_ms) {
        None => i64::MIN,
        Some(Some(ms)) => ms,
        Some(None) => {
            return (StatusCode::BAD_REQUEST, "since: not an RFC 3339 time").into_response();
        }
    };
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(1000).clamp(1, 1000);
    match c.store.ingested_after(after, from, limit).await {
        Ok(envs) => {
            let full = envs.len() == limit as usize;
            let cursor = envs.last().map_or(after, |(n, _)| *n);
            let mut out = String::new();
            for (_, e) in envs {
                let Ok(env) = serde_json::from_str::<Envelope>(&e) else {
                    continue;
                };
                if let Some(ev) = records::peek(&env)
                    .ok()
                    .as_ref()
                    .and_then(records::ocsf::event)
                {
                    out.push_str(&ev.to_string());
                    out.push('\n');
                }
            }
            (
                [
                    (
                        axum::http::header::CONTENT_TYPE,
                        "application/x-ndjson".to_owned(),
                    ),
                    (
                        axum::http::HeaderName::from_static(CURSOR_HEADER),
                        cursor.to_string(),
                    ),
                    (
                        axum::http::HeaderName::from_static(MORE_HEADER),
                        full.to_string(),
                    ),
                ],
                out,
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "reading records failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// The HTTP routes.
pub fn router(c: Shared) -> Router {
    let reads = Router::new()
        .route("/v1/heads", get(get_heads))
        .route("/v1/alerts", get(get_alerts))
        .route("/v1/ocsf", get(get_ocsf))
        .route(api::EXPORT_PATH, get(get_export))
        .route_layer(axum::middleware::from_fn_with_state(
            c.clone(),
            readers_only,
        ));
    let strikes = (c.strikes.clone(), c.refusals.clone());
    Router::new()
        .route(api::RECORDS_PATH, post(post_records))
        .merge(reads)
        .route_layer(axum::middleware::from_fn_with_state(
            ("collector", strikes.0, strikes.1),
            crate::serve::strikes_layer,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(c)
}

/// Runs the collector until SIGTERM or SIGINT.
pub async fn run(config: CollectorConfig) -> anyhow::Result<()> {
    let c = Arc::new(Collector::open(&config).await?);
    tracing::info!(
        listen = %config.listen,
        key_id = c.key_id,
        hosts = c.hosts.len(),
        tls = config.tls.is_some(),
        "collector serving"
    );
    let digests = c.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(DIGEST_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            match digests.sign_digest().await {
                Ok(_) => tracing::info!("heads digest signed"),
                Err(e) => tracing::error!(error = %e, "signing the heads digest failed"),
            }
        }
    });
    let counts = c.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(OPEN_ALERT_FLUSH);
        loop {
            every.tick().await;
            counts.write_open_alert_counts().await;
        }
    });
    let watch = c.clone();
    let silence = Duration::from_secs(config.silence_alert_secs.max(1));
    tokio::spawn(async move {
        let mut alerted = std::collections::HashSet::new();
        let mut every = tokio::time::interval((silence / 4).max(Duration::from_secs(1)));
        loop {
            every.tick().await;
            if let Err(e) = watch.check_silence(silence, &mut alerted).await {
                tracing::error!(error = %e, "checking for silent hosts failed");
            }
        }
    });
    let limits = config.limits.clone();
    let refusals = c.refusals.clone();
    let app = router(c);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let tls = match &config.tls {
        Some(t) => Some(crate::serve::tls_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CollectorError::Listen {
            addr: config.listen,
            source,
        })?;
    crate::serve::serve(
        crate::serve::Front {
            service: "collector",
            router: app,
            limits,
            max_body: MAX_BODY_BYTES,
            refusals,
        },
        listener,
        tls,
        shutdown,
    )
    .await;
    tracing::info!("collector stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
