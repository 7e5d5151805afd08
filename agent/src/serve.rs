//! The HTTP front of the approver and the collector: the accept loop, with every resource a
//! client can hold bounded.
//!
//! Neither `axum::serve` nor a generic server bounds what a client that never finishes its
//! request can hold, so the loop is ours (hyper's HTTP/1.1 connection, rustls for TLS):
//! - a connection table of at most [`Limits::max_connections`]; a client arriving at a full
//!   table evicts the connection that has waited longest *without a request in work* (a
//!   handshake, a request head or body still arriving, or an idle keep-alive), so a flood of
//!   slow clients cannot keep a normal client out; when every slot is working, the newcomer
//!   gets a plain `503` and the socket is closed;
//! - each phase of a connection has a deadline: TLS handshake and request head
//!   ([`Limits::header_timeout_secs`]), request body ([`Limits::body_timeout_secs`]), an idle
//!   keep-alive ([`Limits::idle_timeout_secs`]), a request in work
//!   ([`Limits::request_timeout_secs`]);
//! - request bodies are bounded each (the router's body limit) and together: a request
//!   reserves its declared length (or the per-request maximum when it declares none) from a
//!   budget of [`Limits::max_body_bytes_in_flight`], and is refused with `503` when the
//!   budget is spent;
//! - shutdown stops accepting, lets requests in work finish for [`Limits::drain_secs`], then
//!   closes what is left, whatever the clients do.
//!
//! Refusals are logged with the peer and the reason by [`Refusals`], at most a few lines a
//! second, so a flood cannot flood the log.
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    extract::ConnectInfo,
    http::{Request, Response, StatusCode, header},
};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore, watch},
    time::Instant,
};

/// What one service lets its clients hold (the `limits:` section of its configuration).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections open at once. Also kept below the process's file descriptor limit. Each
    /// host waiting in the approver's decision poll holds one, in work: keep it above the
    /// number of hosts.
    pub max_connections: usize,
    /// Longest a TLS handshake, or a request's head, may take to arrive.
    pub header_timeout_secs: u64,
    /// Longest a request's body may take to arrive.
    pub body_timeout_secs: u64,
    /// Longest a keep-alive connection may wait for its next request.
    pub idle_timeout_secs: u64,
    /// Longest a request may be in work (the hosts' decision poll waits at most 25 s).
    pub request_timeout_secs: u64,
    /// Sum of the bodies of the requests being received at once.
    pub max_body_bytes_in_flight: usize,
    /// At shutdown, how long requests in work may finish before every connection is closed.
    pub drain_secs: u64,
    /// Refused requests (bad credentials or signatures, malformed) one peer address may make
    /// in a minute; beyond, its requests are answered 429 until the minute ends, before any
    /// work is done for them.
    pub refusals_per_peer_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 30,
            request_timeout_secs: 60,
            max_body_bytes_in_flight: 128 * 1024 * 1024,
            drain_secs: 5,
            refusals_per_peer_per_minute: 120,
        }
    }
}

impl Limits {
    /// The first field that is not acceptable, and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let secs = [
            ("limits.header_timeout_secs", self.header_timeout_secs),
            ("limits.body_timeout_secs", self.body_timeout_secs),
            ("limits.idle_timeout_secs", self.idle_timeout_secs),
            ("limits.request_timeout_secs", self.request_timeout_secs),
            ("limits.drain_secs", self.drain_secs),
        ];
        for (field, v) in secs {
            if !(1..=3600).contains(&v) {
                return Err((field, format!("{v}: must be 1 to 3600 seconds")));
            }
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err((
                "limits.max_connections",
                format!("{}: must be 1 to 1000000", self.max_connections),
            ));
        }
        if self.refusals_per_peer_per_minute == 0 {
            return Err((
                "limits.refusals_per_peer_per_minute",
                "0: must be at least 1".to_owned(),
            ));
        }
        if self.max_body_bytes_in_flight < 1024 * 1024 {
            return Err((
                "limits.max_body_bytes_in_flight",
                format!(
                    "{}: must be at least 1048576",
                    self.max_body_bytes_in_flight
                ),
            ));
        }
        Ok(())
    }
}

/// Logs refused clients with their address and the reason, at most [`Refusals::PER_SECOND`]
/// lines a second; what is left out is counted and said in one line.
#[derive(Debug, Default)]
pub struct Refusals {
    window: Mutex<(Option<std::time::Instant>, u32, u64)>,
}

impl Refusals {
    pub const PER_SECOND: u32 = 10;

    pub fn log(&self, service: &str, peer: Option<SocketAddr>, reason: &str) {
        let now = std::time::Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            if w.2 > 0 {
                tracing::warn!(service, count = w.2, "more refusals, not logged one by one");
            }
            *w = (Some(now), 0, 0);
        }
        if w.1 < Self::PER_SECOND {
            w.1 += 1;
            match peer {
                Some(peer) => tracing::warn!(service, %peer, reason, "refused"),
                None => tracing::warn!(service, reason, "refused"),
            }
        } else {
            w.2 += 1;
        }
    }
}

/// Counts the refused requests of each peer address in the current minute; a peer over
/// [`Limits::refusals_per_peer_per_minute`] is answered 429 until the minute ends.
#[derive(Debug)]
pub struct Strikes {
    per_minute: u32,
    window: Mutex<(Option<std::time::Instant>, HashMap<std::net::IpAddr, u32>)>,
}

impl Strikes {
    /// Peers remembered in one minute; beyond, the minute starts over (forgetting strikes
    /// only lets a peer be refused again before it is stopped).
    const MAX_PEERS: usize = 100_000;

    #[must_use]
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            window: Mutex::new((None, HashMap::new())),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<std::net::IpAddr, u32>) -> T) -> T {
        let now = std::time::Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(60))
            || w.1.len() >= Self::MAX_PEERS
        {
            *w = (Some(now), HashMap::new());
        }
        f(&mut w.1)
    }

    /// Whether `ip` has used up its refusals for this minute.
    pub fn stopped(&self, ip: std::net::IpAddr) -> bool {
        self.with(|m| m.get(&ip).is_some_and(|n| *n >= self.per_minute))
    }

    /// One more refusal for `ip`.
    pub fn strike(&self, ip: std::net::IpAddr) {
        self.with(|m| *m.entry(ip).or_insert(0) += 1);
    }
}

/// Put in a response's extensions, it counts against the peer as a refusal whatever its
/// status (the collector's 409 for a record no enrolled host signed).
#[derive(Debug, Clone, Copy)]
pub struct Strike;

/// Put in a refused response's extensions, it is the reason the strikes layer logs.
#[derive(Debug, Clone)]
pub struct Reason(pub String);

/// The route layer for routes anyone can reach: a peer refused too often this minute gets
/// 429 before any work; answers 400, 401 and 403, and those marked [`Strike`], count
/// against it.
pub async fn strikes_layer(
    axum::extract::State((service, strikes, refusals)): axum::extract::State<(
        &'static str,
        Arc<Strikes>,
        Arc<Refusals>,
    )>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Some(p) = peer
        && strikes.stopped(p.ip())
    {
        refusals.log(service, peer, "too many refused requests from this address");
        let mut r = plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many refused requests from this address: retry in a minute\n",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, "60".parse().expect("valid"));
        return r;
    }
    let what = format!("{} {}", req.method(), req.uri().path());
    let r = next.run(req).await;
    let refused = matches!(
        r.status(),
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) || r.extensions().get::<Strike>().is_some();
    if refused && let Some(p) = peer {
        strikes.strike(p.ip());
        let why = r
            .extensions()
            .get::<Reason>()
            .map(|w| format!(": {}", w.0))
            .unwrap_or_default();
        refusals.log(
            service,
            peer,
            &format!("{what}: answered {}{why}", r.status()),
        );
    }
    r
}

/// The phase a connection is in; all but [`Phase::Working`] may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected: the TLS handshake or the first request's head is arriving.
    Head,
    /// A request's body is arriving.
    Body,
    /// A request is in work.
    Working,
    /// Between requests.
    Idle,
}

/// One connection's phase and its start, shared by its reader, its request body and the
/// table.
#[derive(Debug)]
struct Conn {
    state: Mutex<(Phase, Instant)>,
    evict: Notify,
    peer: Option<SocketAddr>,
}

impl Conn {
    fn new(peer: Option<SocketAddr>) -> Self {
        Self {
            state: Mutex::new((Phase::Head, Instant::now())),
            evict: Notify::new(),
            peer,
        }
    }

    fn get(&self) -> (Phase, Instant) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (phase, Instant::now());
    }

    /// From `from` to `to`, only if in `from`.
    fn shift(&self, from: Phase, to: Phase) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 == from {
            *s = (to, Instant::now());
        }
    }
}

/// The connections open, by id.
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    limit: usize,
    emptied: Notify,
}

/// A connection's place in the table, given back when dropped.
struct Slot {
    table: Arc<Table>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut conns = self.table.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(&self.id);
        if conns.is_empty() {
            self.table.emptied.notify_waiters();
        }
    }
}

impl Table {
    /// A place for a new connection from `peer`, evicting the one that has waited longest
    /// without a request in work when the table is full (its peer is returned); `None` when
    /// every connection is working.
    fn admit(
        self: &Arc<Self>,
        peer: Option<SocketAddr>,
    ) -> Option<(Slot, Arc<Conn>, Option<Option<SocketAddr>>)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = None;
        if conns.len() >= self.limit {
            let oldest = conns
                .iter()
                .map(|(id, c)| (*id, c.get()))
                .filter(|(_, (phase, _))| *phase != Phase::Working)
                .min_by_key(|(_, (_, since))| *since)
                .map(|(id, _)| id)?;
            if let Some(c) = conns.remove(&oldest) {
                c.evict.notify_one();
                evicted = Some(c.peer);
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(peer));
        conns.insert(id, conn.clone());
        Some((
            Slot {
                table: self.clone(),
                id,
            },
            conn,
            evicted,
        ))
    }

    fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn evict_all(&self) {
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            c.evict.notify_one();
        }
    }
}

/// A TLS acceptor for the PEM certificate chain and key (HTTP/1.1 by ALPN).
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("TLS certificate {}", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "TLS certificate {}: no certificate in it",
        cert.display()
    );
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("TLS key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("TLS certificate {} and its key", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Raises the soft file descriptor limit to the hard one, and returns the connection limit
/// that fits under it (a hundred descriptors are kept for files, the database and clients).
fn fit_descriptors(service: &str, wanted: usize) -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return wanted;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    let room = usize::try_from(r.rlim_cur)
        .unwrap_or(usize::MAX)
        .saturating_sub(100)
        .max(1);
    if wanted > room {
        tracing::warn!(
            service,
            wanted,
            room,
            "limits.max_connections is above what the file descriptor limit allows; using {room}"
        );
        room
    } else {
        wanted
    }
}

/// What the connections of one service share.
struct Shared {
    service: &'static str,
    router: Router,
    limits: Limits,
    /// Largest body of one request (the router's limit).
    max_body: usize,
    budget: Arc<Semaphore>,
    refusals: Arc<Refusals>,
}

/// One service's routes and what bounds its clients.
pub struct Front {
    /// Its name in the log.
    pub service: &'static str,
    pub router: Router,
    pub limits: Limits,
    /// Largest body of one request (the router's limit).
    pub max_body: usize,
    pub refusals: Arc<Refusals>,
}

/// Serves `front` on `listener` (through `tls` when given) until `shutdown` completes, then
/// drains for at most [`Limits::drain_secs`].
pub async fn serve(
    front: Front,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let Front {
        service,
        router,
        limits,
        max_body,
        refusals,
    } = front;
    let table = Arc::new(Table {
        conns: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        limit: fit_descriptors(service, limits.max_connections),
        emptied: Notify::new(),
    });
    let budget = Arc::new(Semaphore::new(
        limits.max_body_bytes_in_flight.min(Semaphore::MAX_PERMITS),
    ));
    let shared = Arc::new(Shared {
        service,
        router,
        limits,
        max_body,
        budget,
        refusals,
    });
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or memory: say so, and give the clients a moment.
                    shared.refusals.log(service, None, &format!("accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some((slot, conn, evicted)) = table.admit(Some(peer)) else {
            shared
                .refusals
                .log(service, Some(peer), "connection limit reached, all working");
            // A TLS client would not understand a plain answer: it sees the socket close.
            if tls.is_none() {
                tokio::spawn(refuse(stream));
            }
            continue;
        };
        if let Some(old) = evicted {
            shared.refusals.log(
                service,
                old,
                "connection limit reached: closed as the longest waiting without a request, \
                 for a new one",
            );
        }
        let shared = shared.clone();
        let tls = tls.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            connection(shared, stream, peer, tls, conn, stopping).await;
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = async {
        loop {
            let emptied = table.emptied.notified();
            if table.len() == 0 {
                return;
            }
            emptied.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(shared.limits.drain_secs), drained)
        .await
        .is_err()
    {
        tracing::warn!(
            service,
            open = table.len(),
            "connections still open after the drain: closing them"
        );
        table.evict_all();
    }
}

/// Tells a client that arrived when every connection was working to come back.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n\
              Content-Type: text/plain\r\nContent-Length: 41\r\n\r\n\
              connection limit reached: retry shortly.\n",
        ),
    )
    .await;
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conn: Arc<Conn>,
    stopping: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let header = Duration::from_secs(shared.limits.header_timeout_secs);
    match tls {
        None => http(shared, stream, peer, conn, stopping).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                () = conn.evict.notified() => return,
                r = tokio::time::timeout(header, acceptor.accept(stream)) => r,
            };
            match handshake {
                Ok(Ok(s)) => {
                    conn.set(Phase::Head);
                    http(shared, s, peer, conn, stopping).await;
                }
                Ok(Err(e)) => {
                    shared
                        .refusals
                        .log(shared.service, Some(peer), &format!("TLS handshake: {e}"));
                }
                Err(_) => shared.refusals.log(
                    shared.service,
                    Some(peer),
                    "TLS handshake not finished in time",
                ),
            }
        }
    }
}

/// One HTTP/1.1 connection, closed when its phase's deadline passes or it is evicted.
async fn http<T>(
    shared: Arc<Shared>,
    io: T,
    peer: SocketAddr,
    conn: Arc<Conn>,
    mut stopping: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watched = Watched {
        inner: io,
        conn: conn.clone(),
    };
    let svc = {
        let shared = shared.clone();
        let conn = conn.clone();
        hyper::service::service_fn(move |req| request(shared.clone(), conn.clone(), peer, req))
    };
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(watched), svc);
    tokio::pin!(served);
    let limits = &shared.limits;
    let mut draining = false;
    loop {
        let (phase, since) = conn.get();
        let (allowed, what) = match phase {
            Phase::Head => (
                limits.header_timeout_secs,
                "request head not received in time",
            ),
            Phase::Body => (
                limits.body_timeout_secs,
                "request body not received in time",
            ),
            Phase::Idle => (limits.idle_timeout_secs, ""),
            Phase::Working => (limits.request_timeout_secs + 1, ""),
        };
        let deadline = since + Duration::from_secs(allowed);
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r
                    && !e.is_incomplete_message()
                {
                    tracing::debug!(service = shared.service, %peer, error = %e, "connection ended");
                }
                return;
            }
            () = conn.evict.notified() => return,
            () = tokio::time::sleep_until(deadline) => {
                let (now_phase, now_since) = conn.get();
                if now_phase == phase && now_since == since {
                    if !what.is_empty() {
                        shared.refusals.log(shared.service, Some(peer), what);
                    }
                    return;
                }
            }
            changed = stopping.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    served.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// One request: reserves its body in the budget, runs the router within the request
/// deadline, and keeps the connection's phase.
async fn request(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<axum::body::Body>, Infallible> {
    use http_body::Body as _;
    let has_body = !req.body().is_end_stream();
    conn.set(if has_body {
        Phase::Body
    } else {
        Phase::Working
    });
    let _permit = if has_body {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let reserve = declared.unwrap_or(shared.max_body).min(shared.max_body);
        let reserve = u32::try_from(reserve.max(1)).unwrap_or(u32::MAX);
        match shared.budget.clone().try_acquire_many_owned(reserve) {
            Ok(p) => Some(p),
            Err(_) => {
                shared.refusals.log(
                    shared.service,
                    Some(peer),
                    "request bodies in flight above limits.max_body_bytes_in_flight",
                );
                conn.set(Phase::Idle);
                return Ok(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many large requests in progress: retry shortly\n",
                ));
            }
        }
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    let body = axum::body::Body::new(WatchedBody {
        inner: body,
        conn: conn.clone(),
    });
    let mut router = shared.router.clone();
    let call = tower_service::Service::call(&mut router, Request::from_parts(parts, body));
    let answer = tokio::time::timeout(
        Duration::from_secs(shared.limits.request_timeout_secs),
        call,
    )
    .await;
    conn.set(Phase::Idle);
    Ok(match answer {
        Ok(Ok(r)) => r,
        Ok(Err(never)) => match never {},
        Err(_) => {
            shared
                .refusals
                .log(shared.service, Some(peer), "request not answered in time");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request took too long: retry\n",
            )
        }
    })
}

fn plain(status: StatusCode, text: &'static str) -> Response<axum::body::Body> {
    let mut r = Response::new(axum::body::Body::from(text));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().expect("valid"));
    r.headers_mut()
        .insert(header::RETRY_AFTER, "1".parse().expect("valid"));
    r
}

/// The connection's stream: the first bytes after an idle wait start a request head.
struct Watched<T> {
    inner: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.shift(Phase::Idle, Phase::Head);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request's body: once it has arrived (or the handler has let it go), the request is in
/// work and its connection can no longer be evicted.
struct WatchedBody {
    inner: hyper::body::Incoming,
    conn: Arc<Conn>,
}

impl http_body::Body for WatchedBody {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.conn.shift(Phase::Body, Phase::Working);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.conn.shift(Phase::Body, Phase::Working);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(limit: usize) -> Arc<Table> {
        Arc::new(Table {
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            limit,
            emptied: Notify::new(),
        })
    }

    #[test]
    fn a_full_table_evicts_the_longest_waiting_connection_and_never_a_working_one() {
        let t = table(2);
        let (a, ca, _) = t.admit(None).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let (b, cb, _) = t.admit("127.0.0.9:1".parse().ok()).unwrap();
        ca.set(Phase::Working);
        std::thread::sleep(Duration::from_millis(2));
        // a is working: b, though newer, is the one to go.
        let (c, cc, evicted) = t.admit(None).unwrap();
        assert_eq!(
            evicted,
            Some("127.0.0.9:1".parse().ok()),
            "b's peer is named"
        );
        assert_eq!(t.len(), 2);
        assert!(t.conns.lock().unwrap().contains_key(&a.id));
        assert!(!t.conns.lock().unwrap().contains_key(&b.id));
        drop(b);
        assert_eq!(t.len(), 2, "an evicted slot's drop frees nothing twice");
        // Everything working: the newcomer is refused.
        cc.set(Phase::Working);
        assert!(t.admit(None).is_none());
        drop((a, c, cb));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn limits_name_the_bad_field() {
        let l = Limits {
            body_timeout_secs: 0,
            ..Limits::default()
        };
        assert_eq!(l.check().unwrap_err().0, "limits.body_timeout_secs");
        assert!(Limits::default().check().is_ok());
    }
}
