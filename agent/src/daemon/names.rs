//! Destination names learnt from DNS answers: the daemon watches the answers the host's
//! resolvers send (`ebpf::dns`: only on sockets that connect or send to port 53 in the
//! daemon's network namespace), and remembers, per address, the names programs asked
//! for. A held connect then shows `api.example.com (DNS) → 93.184.216.34:443/tcp`, and
//! `host:` globs of connect rules match its names.
//!
//! Trust: only answers from the host's resolvers count (the `nameserver` lines of
//! `/etc/resolv.conf`, re-read when it changes and on reload, plus `dns.resolvers` of
//! daemon.yaml), from UDP port 53, with `NOERROR`, and only as the answer to a query this
//! host sent them (same resolver, port, id and question, within [`QUERY_WINDOW`]). A program
//! that asks its own server cannot plant names, nor can an off-path sender of forged
//! answers without guessing the port and id. Not seen (the name is then unknown): DNS over
//! TCP, TLS or HTTPS, queries and answers in other network namespaces (where a program could
//! be its own "resolver"), fragmented or truncated answers, names from `/etc/hosts`.
//!
//! Ordering: the kernel copies an answer to the capture ring before it queues it on the
//! program's socket, so the daemon drains the ring ([`Names::drain`]) before it describes a
//! held connect; the name the program just resolved is then known.
//!
//! Bounds: at most `max_addresses` addresses (the least recently learnt go first), at most
//! [`MAX_NAMES_PER_ADDRESS`] names each (most recent first), names of at most 253 bytes,
//! lowercase, without the trailing dot; each name lives max(TTL, `min_ttl_secs`), at most
//! `max_ttl_secs`; a drain reads at most [`MAX_DRAIN`] packets.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData},
};
use serde::Deserialize;

use crate::ebpf::dns::{DnsCapture, PacketInfo};

/// Names kept per address.
pub const MAX_NAMES_PER_ADDRESS: usize = 8;
/// Packets read by one drain (the rest wait for the next one).
pub const MAX_DRAIN: usize = 4096;
/// Longest name (RFC 1035, without the trailing dot).
pub const MAX_NAME_LEN: usize = 253;
/// CNAME links followed from the question name.
const MAX_CNAME_HOPS: usize = 16;
/// The host's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `dns:` of daemon.yaml.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Learn names at all.
    pub enabled: bool,
    /// Resolvers trusted besides the `nameserver` lines of /etc/resolv.conf.
    pub resolvers: Vec<IpAddr>,
    /// Shortest time a learnt name is kept, whatever the record's TTL.
    pub min_ttl_secs: u64,
    /// Longest time a learnt name is kept.
    pub max_ttl_secs: u64,
    /// Most addresses remembered.
    pub max_addresses: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            resolvers: Vec::new(),
            // Programs (and their resolver libraries) keep answers longer than the TTL says:
            // a connect minutes after a short-TTL answer still goes to that name.
            min_ttl_secs: 300,
            // A day: a name is not shown for an address the resolver stopped giving long ago.
            max_ttl_secs: 24 * 3600,
            // About 10 MB at most.
            max_addresses: 65_536,
        }
    }
}

/// Longest accepted `max_ttl_secs` (a week) and most `max_addresses`.
pub const MAX_MAX_TTL_SECS: u64 = 7 * 24 * 3600;
pub const MAX_MAX_ADDRESSES: usize = 1 << 22;

impl DnsConfig {
    /// The first invalid field and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_ttl_secs == 0 || self.max_ttl_secs > MAX_MAX_TTL_SECS {
            return Err((
                "dns.max_ttl_secs".into(),
                format!(
                    "must be between 1 and {MAX_MAX_TTL_SECS}, not {}",
                    self.max_ttl_secs
                ),
            ));
        }
        if self.min_ttl_secs > self.max_ttl_secs {
            return Err((
                "dns.min_ttl_secs".into(),
                format!(
                    "must not exceed max_ttl_secs ({}), not {}",
                    self.max_ttl_secs, self.min_ttl_secs
                ),
            ));
        }
        if self.max_addresses == 0 || self.max_addresses > MAX_MAX_ADDRESSES {
            return Err((
                "dns.max_addresses".into(),
                format!(
                    "must be between 1 and {MAX_MAX_ADDRESSES}, not {}",
                    self.max_addresses
                ),
            ));
        }
        if let Some(a) = self.resolvers.iter().find(|a| a.is_unspecified()) {
            return Err((
                "dns.resolvers".into(),
                format!("`{a}` is not a resolver address"),
            ));
        }
        Ok(())
    }
}

/// Why a packet taught nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// Not a whole UDP datagram from port 53 over IPv4/IPv6.
    #[error("not a UDP answer from port 53")]
    NotDns,
    /// From an address that is not one of the host's resolvers.
    #[error("from {0}, which is not a host resolver")]
    Untrusted(IpAddr),
    /// Not a DNS message.
    #[error("not a DNS message: {0}")]
    Malformed(String),
    /// A query, another opcode, truncated, or not exactly one IN question.
    #[error("not a plain answer")]
    NotAnswer,
    /// An error answer (NXDOMAIN, SERVFAIL, ...).
    #[error("answer code {0}")]
    Refused(String),
    /// An answer to no query this host sent (resolver, port, id and question must match one).
    #[error("an answer to no query sent from this host")]
    Unsolicited,
}

/// One address → name fact of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learnt {
    pub addr: IpAddr,
    /// The question's name, lowercase, without the trailing dot.
    pub name: String,
    /// The smallest TTL along the CNAME chain to the address record.
    pub ttl: u32,
}

/// The addresses, ports and payload of an IPv4/IPv6 UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub payload: &'a [u8],
}

/// Parses the IP and UDP headers of a whole (unfragmented) datagram, every length checked.
pub fn udp(ethertype: u16, packet: &[u8]) -> Result<Udp<'_>, Skip> {
    let (src, dst, udp) = match ethertype {
        0x0800 => {
            let b0 = *packet.first().ok_or(Skip::NotDns)?;
            let ihl = usize::from(b0 & 0x0f) * 4;
            if b0 >> 4 != 4 || ihl < 20 || packet.len() < ihl {
                return Err(Skip::NotDns);
            }
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            if packet[9] != 17 || frag & 0x3fff != 0 || total < ihl || total > packet.len() {
                return Err(Skip::NotDns);
            }
            let src: [u8; 4] = packet[12..16].try_into().map_err(|_| Skip::NotDns)?;
            let dst: [u8; 4] = packet[16..20].try_into().map_err(|_| Skip::NotDns)?;
            (IpAddr::from(src), IpAddr::from(dst), &packet[ihl..total])
        }
        0x86dd => {
            if packet.len() < 40 || packet[0] >> 4 != 6 || packet[6] != 17 {
                return Err(Skip::NotDns);
            }
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if 40 + payload > packet.len() {
                return Err(Skip::NotDns);
            }
            let src: [u8; 16] = packet[8..24].try_into().map_err(|_| Skip::NotDns)?;
            let dst: [u8; 16] = packet[24..40].try_into().map_err(|_| Skip::NotDns)?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                &packet[40..40 + payload],
            )
        }
        _ => return Err(Skip::NotDns),
    };
    if udp.len() < 8 {
        return Err(Skip::NotDns);
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if len < 8 || len > udp.len() {
        return Err(Skip::NotDns);
    }
    Ok(Udp {
        src,
        dst,
        sport: u16::from_be_bytes([udp[0], udp[1]]),
        dport: u16::from_be_bytes([udp[2], udp[3]]),
        payload: &udp[8..len],
    })
}

/// `name` as kept: lowercase, no trailing dot; `None` when too long or empty.
fn normalise(name: &Name) -> Option<String> {
    let s = name.to_lowercase().to_ascii();
    let s = s.strip_suffix('.').unwrap_or(&s).to_owned();
    (!s.is_empty() && s.len() <= MAX_NAME_LEN).then_some(s)
}

/// The facts of a DNS answer (see [`parse_answer`]).
#[cfg(test)]
pub fn answers(message: &[u8]) -> Result<Vec<Learnt>, Skip> {
    parse_answer(message).map(|(_, facts)| facts)
}

/// A query this host sent: its id and question name (normalised).
pub fn parse_query(message: &[u8]) -> Result<(u16, String), Skip> {
    let m = Message::from_vec(message).map_err(|e| Skip::Malformed(e.to_string()))?;
    let md = &m.metadata;
    if md.message_type != MessageType::Query || md.op_code != OpCode::Query {
        return Err(Skip::NotAnswer);
    }
    let [q] = m.queries.as_slice() else {
        return Err(Skip::NotAnswer);
    };
    Ok((md.id, normalise(q.name()).ok_or(Skip::NotAnswer)?))
}

/// The address → question name facts of a DNS answer, with the key that ties the answer to
/// its query (id, question name): the question's name maps to every A or AAAA address
/// reachable from it through the answer's CNAME chain. Anything that is not a `NOERROR`
/// answer to exactly one IN question teaches nothing.
fn parse_answer(message: &[u8]) -> Result<((u16, String), Vec<Learnt>), Skip> {
    let m = Message::from_vec(message).map_err(|e| Skip::Malformed(e.to_string()))?;
    let md = &m.metadata;
    if md.message_type != MessageType::Response || md.op_code != OpCode::Query || md.truncation {
        return Err(Skip::NotAnswer);
    }
    if md.response_code != ResponseCode::NoError {
        return Err(Skip::Refused(md.response_code.to_string()));
    }
    let [q] = m.queries.as_slice() else {
        return Err(Skip::NotAnswer);
    };
    if q.query_class() != DNSClass::IN {
        return Err(Skip::NotAnswer);
    }
    let question = normalise(q.name()).ok_or(Skip::NotAnswer)?;
    // Owner names reachable from the question, with the smallest TTL on the way.
    let mut reach: HashMap<String, u32> = HashMap::from([(question.clone(), u32::MAX)]);
    for _ in 0..MAX_CNAME_HOPS {
        let mut grew = false;
        for r in &m.answers {
            let RData::CNAME(target) = &r.data else {
                continue;
            };
            let (Some(owner), Some(target)) = (normalise(&r.name), normalise(&target.0)) else {
                continue;
            };
            if let Some(&ttl) = reach.get(&owner)
                && !reach.contains_key(&target)
            {
                reach.insert(target, ttl.min(r.ttl));
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let mut out = Vec::new();
    for r in &m.answers {
        if r.dns_class != DNSClass::IN {
            continue;
        }
        let addr = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        let Some(&chain_ttl) = normalise(&r.name).and_then(|o| reach.get(&o)) else {
            continue;
        };
        out.push(Learnt {
            addr,
            name: question.clone(),
            ttl: chain_ttl.min(r.ttl),
        });
    }
    Ok(((md.id, question), out))
}

/// How long a sent query waits for its answer.
pub const QUERY_WINDOW: Duration = Duration::from_secs(30);
/// Queries remembered at once (more are not remembered: their answers teach nothing).
pub const MAX_QUERIES: usize = 4096;

/// (resolver, this host's port, id, question name) of a query in flight.
type QueryKey = (IpAddr, u16, u16, String);

/// The queries this host sent to its resolvers and not yet answered: an answer counts only
/// if it answers one of them (an off-path sender must guess port and id).
#[derive(Debug, Default)]
pub struct Queries {
    sent: HashMap<QueryKey, Instant>,
}

impl Queries {
    fn add(&mut self, key: QueryKey, now: Instant) {
        if self.sent.len() >= MAX_QUERIES {
            self.sent
                .retain(|_, t| now.duration_since(*t) < QUERY_WINDOW);
        }
        if self.sent.len() < MAX_QUERIES {
            self.sent.insert(key, now);
        }
    }

    /// Takes the query `key` answers, if one is in flight.
    fn answer(&mut self, key: &QueryKey, now: Instant) -> bool {
        self.sent
            .remove(key)
            .is_some_and(|t| now.duration_since(t) < QUERY_WINDOW)
    }

    fn purge(&mut self, now: Instant) {
        self.sent
            .retain(|_, t| now.duration_since(*t) < QUERY_WINDOW);
    }
}

/// The nameserver addresses of a resolv.conf text. Without any, the C library asks the local
/// host: 127.0.0.1 and ::1.
#[must_use]
pub fn resolv_conf_servers(text: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        // `fe80::1%eth0`: the scope does not matter for a source address.
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect();
    if out.is_empty() {
        out = vec![
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        ];
    }
    out
}

#[derive(Debug)]
struct Entry {
    /// Most recent first: (name, expiry).
    names: Vec<(String, Instant)>,
    /// Key in `order`.
    seq: u64,
}

/// The bounded address → names cache.
#[derive(Debug)]
pub struct Cache {
    entries: HashMap<IpAddr, Entry>,
    /// Learn order: the smallest seq is the least recently learnt address.
    order: BTreeMap<u64, IpAddr>,
    next_seq: u64,
    max_addresses: usize,
    min_ttl: Duration,
    max_ttl: Duration,
}

impl Cache {
    #[must_use]
    pub fn new(config: &DnsConfig) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            max_addresses: config.max_addresses.max(1),
            min_ttl: Duration::from_secs(config.min_ttl_secs),
            max_ttl: Duration::from_secs(config.max_ttl_secs),
        }
    }

    /// Remembers `fact` as of `now`.
    pub fn learn(&mut self, fact: &Learnt, now: Instant) {
        let life = Duration::from_secs(u64::from(fact.ttl))
            .max(self.min_ttl)
            .min(self.max_ttl);
        let expiry = now + life;
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.entries.get_mut(&fact.addr) {
            Some(e) => {
                self.order.remove(&e.seq);
                e.seq = seq;
                e.names.retain(|(n, _)| *n != fact.name);
                e.names.insert(0, (fact.name.clone(), expiry));
                e.names.truncate(MAX_NAMES_PER_ADDRESS);
            }
            None => {
                while self.entries.len() >= self.max_addresses {
                    let Some((_, old)) = self.order.pop_first() else {
                        break;
                    };
                    self.entries.remove(&old);
                }
                self.entries.insert(
                    fact.addr,
                    Entry {
                        names: vec![(fact.name.clone(), expiry)],
                        seq,
                    },
                );
            }
        }
        self.order.insert(seq, fact.addr);
    }

    /// The names of `addr` not expired at `now`, most recent first.
    #[must_use]
    pub fn lookup(&self, addr: IpAddr, now: Instant) -> Vec<String> {
        // An IPv4 connect on an IPv6 socket comes as ::ffff:a.b.c.d.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.entries
            .get(&addr)
            .map(|e| {
                e.names
                    .iter()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops expired names and addresses left without any.
    pub fn purge(&mut self, now: Instant) {
        let order = &mut self.order;
        self.entries.retain(|_, e| {
            e.names.retain(|(_, exp)| *exp > now);
            if e.names.is_empty() {
                order.remove(&e.seq);
            }
            !e.names.is_empty()
        });
    }

    /// Addresses with names.
    #[must_use]
    pub fn addresses(&self) -> usize {
        self.entries.len()
    }
}

/// Counters shown by `countersign status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub answers: u64,
    pub untrusted: u64,
    /// Answers from a trusted resolver to no query in flight.
    pub unsolicited: u64,
    pub learnt: u64,
    /// Packets the kernel could not queue for the daemon (its ring was full).
    pub dropped: u64,
}

/// The learner: capture, trusted resolvers, cache.
pub struct Names {
    capture: Option<DnsCapture>,
    ready: Option<Readiness>,
    /// Why the capture could not be attached, if it could not.
    pub error: Option<String>,
    config: DnsConfig,
    resolv_conf: PathBuf,
    resolv_stamp: Option<(Option<SystemTime>, u64, u64)>,
    trusted: HashSet<IpAddr>,
    cache: Cache,
    queries: Queries,
    pub counters: Counters,
    buf: Vec<u8>,
    /// The last drain left packets queued.
    backlog: bool,
}

impl Names {
    /// Starts the capture with `attach` when names are enabled (a failure is kept and
    /// reported: names stay unknown). Must run inside the tokio runtime.
    pub fn start(config: &DnsConfig, attach: impl FnOnce() -> Result<DnsCapture, String>) -> Self {
        let mut n = Self {
            capture: None,
            ready: None,
            error: None,
            config: config.clone(),
            resolv_conf: PathBuf::from(RESOLV_CONF),
            resolv_stamp: None,
            trusted: HashSet::new(),
            cache: Cache::new(config),
            queries: Queries::default(),
            counters: Counters::default(),
            buf: vec![0; countersign_ebpf::DNS_CAPTURE_BYTES],
            backlog: false,
        };
        if !config.enabled {
            return n;
        }
        let started = attach().and_then(|capture| {
            let fd = capture
                .readiness_fd()
                .and_then(|fd| {
                    // SAFETY: the AsyncFd owns the descriptor (a duplicate of the ring's); it
                    // stays open and unchanged for as long as the AsyncFd lives.
                    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
                })
                .map_err(|e| format!("cannot wait on the DNS capture: {e}"))?;
            Ok((capture, fd))
        });
        match started {
            Ok((capture, fd)) => {
                n.capture = Some(capture);
                n.ready = Some(std::sync::Arc::new(fd));
            }
            Err(e) => {
                let message = format!("cannot capture DNS answers: {e}");
                tracing::error!(error = %message, "destination names will be unknown");
                n.error = Some(message);
            }
        }
        n.refresh_resolvers(true);
        n
    }

    /// Whether names are learnt.
    #[must_use]
    pub fn active(&self) -> bool {
        self.capture.is_some()
    }

    /// Re-reads /etc/resolv.conf if it changed (or always with `force`); whether it did
    /// change (a replaced file is a new one to guard).
    pub fn refresh_resolvers(&mut self, force: bool) -> bool {
        if !self.config.enabled {
            return false;
        }
        let stamp = file_stamp(&self.resolv_conf);
        if !force && stamp == self.resolv_stamp {
            return false;
        }
        self.resolv_stamp = stamp;
        let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
        let mut trusted: HashSet<IpAddr> = resolv_conf_servers(&text).into_iter().collect();
        trusted.extend(self.config.resolvers.iter().copied());
        if trusted != self.trusted {
            tracing::info!(resolvers = ?trusted, "trusted DNS resolvers");
        }
        self.trusted = trusted;
        true
    }

    /// The trusted resolvers.
    #[must_use]
    pub fn resolvers(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.trusted.iter().copied().collect();
        v.sort();
        v
    }

    /// Which programs capture (`None`: no capture).
    #[must_use]
    pub fn capture_programs(&self) -> Option<&'static str> {
        self.capture.as_ref().map(|c| c.programs)
    }

    /// The capture's readiness, for the main loop to wait on ([`readable`]).
    #[must_use]
    pub fn readiness(&self) -> Option<Readiness> {
        self.ready.clone()
    }

    /// Reads what is queued (at most [`MAX_DRAIN`] packets) into the cache; what is left
    /// beyond the bound is read on the next tick ([`Names::backlog`]).
    pub fn drain(&mut self) {
        let Some(capture) = &mut self.capture else {
            return;
        };
        let now = Instant::now();
        self.backlog = true;
        for _ in 0..MAX_DRAIN {
            let Some(info) = capture.next(&mut self.buf) else {
                self.backlog = false;
                break;
            };
            let packet = &self.buf[..info.len];
            match take(&self.trusted, &mut self.queries, info, packet, now) {
                Ok(None) => {}
                Ok(Some(facts)) => {
                    self.counters.answers += 1;
                    for f in &facts {
                        tracing::debug!(addr = %f.addr, name = f.name, ttl = f.ttl, "name learnt");
                        self.cache.learn(f, now);
                    }
                    self.counters.learnt += facts.len() as u64;
                }
                Err(Skip::Untrusted(from)) => {
                    self.counters.untrusted += 1;
                    tracing::debug!(%from, "DNS answer from a server that is not a host resolver; ignored");
                }
                Err(Skip::Unsolicited) => {
                    self.counters.unsolicited += 1;
                    tracing::debug!("DNS answer to no query sent from this host; ignored");
                }
                Err(why) => tracing::trace!(%why, "packet ignored"),
            }
        }
    }

    /// Whether the last drain stopped at its bound with packets left.
    #[must_use]
    pub fn backlog(&self) -> bool {
        self.backlog
    }

    /// The known names of `addr`.
    #[must_use]
    pub fn lookup(&self, addr: IpAddr) -> Vec<String> {
        self.cache.lookup(addr, Instant::now())
    }

    /// Drops expired names and queries, and reads the kernel's drop count.
    pub fn purge(&mut self) {
        if let Some(capture) = &self.capture {
            self.counters.dropped = capture.dropped();
        }
        let now = Instant::now();
        self.cache.purge(now);
        self.queries.purge(now);
    }

    /// Addresses with names.
    #[must_use]
    pub fn addresses(&self) -> usize {
        self.cache.addresses()
    }
}

/// The capture's ring buffer as the runtime watches it.
pub type Readiness = std::sync::Arc<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>;

/// Waits until the capture has packets (forever without one); the caller then drains.
pub async fn readable(socket: Option<&Readiness>) {
    match socket {
        Some(s) => match s.readable().await {
            // Cleared before the drain: a packet arriving meanwhile wakes us again.
            Ok(mut g) => g.clear_ready(),
            Err(e) => {
                tracing::error!(error = %e, "waiting on the DNS capture; answers are read on the tick only");
                std::future::pending::<()>().await;
            }
        },
        None => std::future::pending().await,
    }
}

/// What one captured packet teaches: a query this host sent to a trusted resolver is
/// remembered (`None`); an answer from a trusted resolver to a remembered query gives its
/// facts.
fn take(
    trusted: &HashSet<IpAddr>,
    queries: &mut Queries,
    info: PacketInfo,
    packet: &[u8],
    now: Instant,
) -> Result<Option<Vec<Learnt>>, Skip> {
    let u = udp(info.ethertype, packet)?;
    if info.outgoing {
        if u.dport != 53 || !trusted.contains(&u.dst) {
            return Err(Skip::NotDns);
        }
        let (id, name) = parse_query(u.payload)?;
        queries.add((u.dst, u.sport, id, name), now);
        return Ok(None);
    }
    if u.sport != 53 {
        return Err(Skip::NotDns);
    }
    if !trusted.contains(&u.src) {
        return Err(Skip::Untrusted(u.src));
    }
    let ((id, name), facts) = parse_answer(u.payload)?;
    if !queries.answer(&(u.src, u.dport, id, name), now) {
        return Err(Skip::Unsolicited);
    }
    Ok(Some(facts))
}

fn file_stamp(p: &Path) -> Option<(Option<SystemTime>, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.modified().ok(), m.len(), m.ino()))
}

#[cfg(test)]
mod tests;
