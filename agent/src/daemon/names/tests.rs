//! DNS answers into cache entries: messages built with the same crate the daemon parses
//! them with, wrapped in real IPv4/IPv6 UDP headers.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr as _,
};

use hickory_proto::{
    op::{Message, OpCode, Query, ResponseCode},
    rr::{
        Record, RecordType,
        rdata::{A, AAAA, CNAME, TXT},
    },
};

use super::*;

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn answer(q: &str, rtype: RecordType, records: Vec<Record>) -> Message {
    let mut m = Message::response(7, OpCode::Query);
    m.add_query(Query::query(name(q), rtype));
    m.add_answers(records);
    m
}

fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn bytes(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

/// An IPv4 UDP packet `src`:`sport` → `dst`:`dport`.
fn ipv4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[(udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}

/// An answer from `src`:53 to 127.0.0.1:40000.
fn ipv4_udp(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
    ipv4(src, 53, [127, 0, 0, 1], 40000, payload)
}

fn ipv6_udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = vec![0x60, 0, 0, 0, (udp_len >> 8) as u8, udp_len as u8, 17, 64];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[(udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The query `answer` (id 7) answers.
fn query_for(q: &str) -> Vec<u8> {
    let mut m = Message::new(7, hickory_proto::op::MessageType::Query, OpCode::Query);
    m.add_query(Query::query(name(q), RecordType::A));
    bytes(&m)
}

const OUT: bool = true;

fn info(ethertype: u16, len: usize) -> PacketInfo {
    PacketInfo {
        len,
        ethertype,
        outgoing: false,
    }
}

#[test]
fn a_and_aaaa_map_to_the_question_name() {
    let mut m = answer(
        "API.Example.Test.",
        RecordType::A,
        vec![a("api.example.test.", 60, [10, 0, 0, 1])],
    );
    m.add_answer(Record::from_rdata(
        name("api.example.test."),
        30,
        RData::AAAA(AAAA(Ipv6Addr::from_str("2001:db8::1").unwrap())),
    ));
    let facts = answers(&bytes(&m)).unwrap();
    assert_eq!(
        facts,
        vec![
            Learnt {
                addr: IpAddr::from([10, 0, 0, 1]),
                name: "api.example.test".into(),
                ttl: 60
            },
            Learnt {
                addr: IpAddr::from_str("2001:db8::1").unwrap(),
                name: "api.example.test".into(),
                ttl: 30
            },
        ]
    );
}

#[test]
fn a_cname_chain_leads_to_the_question_name_with_the_smallest_ttl() {
    // The question's name, not the CNAME targets: that is what the program asked for.
    let m = answer(
        "www.example.test.",
        RecordType::A,
        vec![
            cname("www.example.test.", 3600, "edge.cdn.test."),
            cname("edge.cdn.test.", 20, "n1.cdn.test."),
            a("n1.cdn.test.", 600, [10, 0, 0, 2]),
            // Not reachable from the question: planted, ignored.
            a("bank.example.test.", 600, [10, 0, 0, 3]),
        ],
    );
    let facts = answers(&bytes(&m)).unwrap();
    assert_eq!(
        facts,
        vec![Learnt {
            addr: IpAddr::from([10, 0, 0, 2]),
            name: "www.example.test".into(),
            ttl: 20
        }]
    );
}

#[test]
fn error_answers_queries_and_garbage_teach_nothing() {
    let mut nx = answer(
        "gone.example.test.",
        RecordType::A,
        vec![a("gone.example.test.", 60, [10, 0, 0, 1])],
    );
    nx.metadata.response_code = ResponseCode::NXDomain;
    assert!(matches!(answers(&bytes(&nx)), Err(Skip::Refused(_))));
    let mut servfail = nx.clone();
    servfail.metadata.response_code = ResponseCode::ServFail;
    assert!(matches!(answers(&bytes(&servfail)), Err(Skip::Refused(_))));
    let mut query = Message::query();
    query.add_query(Query::query(name("x.test."), RecordType::A));
    assert_eq!(answers(&bytes(&query)), Err(Skip::NotAnswer));
    let mut truncated = answer(
        "t.test.",
        RecordType::A,
        vec![a("t.test.", 60, [10, 0, 0, 1])],
    );
    truncated.metadata.truncation = true;
    assert_eq!(answers(&bytes(&truncated)), Err(Skip::NotAnswer));
    let mut two = answer(
        "a.test.",
        RecordType::A,
        vec![a("a.test.", 60, [10, 0, 0, 1])],
    );
    two.add_query(Query::query(name("b.test."), RecordType::A));
    assert_eq!(answers(&bytes(&two)), Err(Skip::NotAnswer));
    assert!(matches!(answers(b"\x00\x07\x81"), Err(Skip::Malformed(_))));
    let full = bytes(&answer(
        "c.test.",
        RecordType::A,
        vec![a("c.test.", 60, [10, 0, 0, 1])],
    ));
    assert!(matches!(
        answers(&full[..full.len() - 2]),
        Err(Skip::Malformed(_))
    ));
    // Other record types are not addresses.
    let txt = answer(
        "t.test.",
        RecordType::TXT,
        vec![Record::from_rdata(
            name("t.test."),
            60,
            RData::TXT(TXT::new(vec!["10.0.0.1".into()])),
        )],
    );
    assert_eq!(answers(&bytes(&txt)), Ok(vec![]));
}

#[test]
fn only_answers_from_trusted_resolvers_to_queries_of_this_host_count() {
    let q = "api.example.test.";
    let msg = bytes(&answer(q, RecordType::A, vec![a(q, 60, [10, 0, 0, 9])]));
    let resolver = [127, 0, 0, 53];
    let trusted: HashSet<IpAddr> = [IpAddr::from(resolver)].into();
    let mut queries = Queries::default();
    let t0 = Instant::now();
    let mut take_at = |outgoing: bool, p: &[u8], t: Instant| {
        let mut i = info(0x0800, p.len());
        i.outgoing = outgoing;
        take(&trusted, &mut queries, i, p, t)
    };
    // An answer nobody here asked for (an off-path forgery, or a replay).
    let answer_pkt = ipv4_udp(resolver, &msg);
    assert_eq!(take_at(false, &answer_pkt, t0), Err(Skip::Unsolicited));
    // The query this host sends (its outgoing copy), then the answer: learnt once.
    let query_pkt = ipv4([127, 0, 0, 1], 40000, resolver, 53, &query_for(q));
    assert_eq!(take_at(OUT, &query_pkt, t0), Ok(None));
    let facts = take_at(false, &answer_pkt, t0).unwrap().unwrap();
    assert_eq!(facts[0].addr, IpAddr::from([10, 0, 0, 9]));
    assert_eq!(
        take_at(false, &answer_pkt, t0),
        Err(Skip::Unsolicited),
        "one answer per query"
    );
    // To another port of this host, with another id, for another name, or too late.
    assert_eq!(take_at(OUT, &query_pkt, t0), Ok(None));
    let other_port = ipv4(resolver, 53, [127, 0, 0, 1], 40001, &msg);
    assert_eq!(take_at(false, &other_port, t0), Err(Skip::Unsolicited));
    let mut other_id = answer(q, RecordType::A, vec![a(q, 60, [10, 0, 0, 9])]);
    other_id.metadata.id = 8;
    let p = ipv4_udp(resolver, &bytes(&other_id));
    assert_eq!(take_at(false, &p, t0), Err(Skip::Unsolicited));
    let bank = "bank.example.test.";
    let other_name = answer(bank, RecordType::A, vec![a(bank, 60, [10, 0, 0, 9])]);
    let p = ipv4_udp(resolver, &bytes(&other_name));
    assert_eq!(take_at(false, &p, t0), Err(Skip::Unsolicited));
    assert_eq!(
        take_at(false, &answer_pkt, t0 + QUERY_WINDOW),
        Err(Skip::Unsolicited)
    );
    // The same exchange with a server the program chose itself.
    let other = [10, 9, 9, 9];
    let p = ipv4([127, 0, 0, 1], 40000, other, 53, &query_for(q));
    assert_eq!(take_at(OUT, &p, t0), Err(Skip::NotDns));
    assert_eq!(
        take_at(false, &ipv4_udp(other, &msg), t0),
        Err(Skip::Untrusted(IpAddr::from(other)))
    );
    // The outgoing copy of an answer (a resolver on this host) teaches nothing.
    assert_eq!(take_at(OUT, &answer_pkt, t0), Err(Skip::NotDns));
    // IPv6.
    let v6 = Ipv6Addr::from_str("fd00::53").unwrap();
    let trusted6: HashSet<IpAddr> = [IpAddr::V6(v6)].into();
    let me = Ipv6Addr::LOCALHOST;
    let mut queries6 = Queries::default();
    let qp = ipv6_udp(me, 40000, v6, 53, &query_for(q));
    let ap = ipv6_udp(v6, 53, me, 40000, &msg);
    let mut i = info(0x86dd, qp.len());
    i.outgoing = OUT;
    assert_eq!(take(&trusted6, &mut queries6, i, &qp, t0), Ok(None));
    let got = take(&trusted6, &mut queries6, info(0x86dd, ap.len()), &ap, t0);
    assert_eq!(got.unwrap().unwrap().len(), 1);
}

#[test]
fn queries_in_flight_are_bounded() {
    let mut qs = Queries::default();
    let t0 = Instant::now();
    let key = |i: usize| {
        (
            IpAddr::from([127, 0, 0, 53]),
            1000,
            i as u16,
            "x.test".to_owned(),
        )
    };
    for i in 0..MAX_QUERIES + 10 {
        qs.add(key(i), t0);
    }
    assert_eq!(qs.sent.len(), MAX_QUERIES);
    assert!(
        !qs.answer(&key(MAX_QUERIES + 5), t0),
        "not remembered past the bound"
    );
    // Once the window passed, room is made again.
    qs.add(key(MAX_QUERIES + 5), t0 + QUERY_WINDOW);
    assert_eq!(qs.sent.len(), 1);
    assert!(qs.answer(&key(MAX_QUERIES + 5), t0 + QUERY_WINDOW));
}

#[test]
fn headers_are_bounded() {
    let msg = bytes(&answer(
        "a.test.",
        RecordType::A,
        vec![a("a.test.", 60, [10, 0, 0, 1])],
    ));
    let p = ipv4_udp([127, 0, 0, 53], &msg);
    // Cut anywhere: never a panic, never a fact from a partial datagram.
    for cut in 0..p.len() {
        assert!(udp(0x0800, &p[..cut]).is_err(), "cut at {cut}");
    }
    let u = udp(0x0800, &p).unwrap();
    assert_eq!(
        (u.src, u.sport, u.dport),
        (IpAddr::from([127, 0, 0, 53]), 53, 40000)
    );
    assert_eq!(u.payload, msg.as_slice());
    // A fragment.
    let mut f = p.clone();
    f[6] = 0x20;
    assert_eq!(udp(0x0800, &f), Err(Skip::NotDns));
    // TCP.
    let mut t = p.clone();
    t[9] = 6;
    assert_eq!(udp(0x0800, &t), Err(Skip::NotDns));
    // A UDP length beyond the packet.
    let mut l = p.clone();
    l[24] = 0xff;
    assert_eq!(udp(0x0800, &l), Err(Skip::NotDns));
    let p6 = ipv6_udp(Ipv6Addr::LOCALHOST, 53, Ipv6Addr::LOCALHOST, 40000, &msg);
    for cut in 0..p6.len() {
        assert!(udp(0x86dd, &p6[..cut]).is_err(), "cut at {cut}");
    }
    assert_eq!(udp(0x0806, &p), Err(Skip::NotDns));
}

#[test]
fn the_longest_name_is_kept_whole() {
    // 253 bytes without the dot: the most the wire format carries (longer names cannot be
    // encoded, so the parser refuses them before `normalise` sees them).
    let label = "a".repeat(63);
    let long = format!("{label}.{label}.{label}.{}.", "b".repeat(61));
    let m = answer(&long, RecordType::A, vec![a(&long, 60, [10, 0, 0, 1])]);
    let facts = answers(&bytes(&m)).unwrap();
    assert_eq!(facts[0].name.len(), MAX_NAME_LEN);
    assert!(Name::from_ascii(format!("c{long}")).is_err());
}

fn config() -> DnsConfig {
    DnsConfig {
        min_ttl_secs: 300,
        max_ttl_secs: 3600,
        max_addresses: 3,
        ..DnsConfig::default()
    }
}

fn fact(ip: u8, name: &str, ttl: u32) -> Learnt {
    Learnt {
        addr: IpAddr::from([10, 0, 0, ip]),
        name: name.into(),
        ttl,
    }
}

#[test]
fn expiry_is_the_ttl_within_min_and_max() {
    let mut c = Cache::new(&config());
    let t0 = Instant::now();
    let ip = IpAddr::from([10, 0, 0, 1]);
    c.learn(&fact(1, "short.test", 5), t0);
    // Kept for min_ttl_secs although the TTL was 5 s.
    assert_eq!(c.lookup(ip, t0 + Duration::from_secs(299)), ["short.test"]);
    assert!(c.lookup(ip, t0 + Duration::from_secs(300)).is_empty());
    c.learn(&fact(2, "long.test", 86_400), t0);
    let ip2 = IpAddr::from([10, 0, 0, 2]);
    assert_eq!(c.lookup(ip2, t0 + Duration::from_secs(3599)), ["long.test"]);
    assert!(c.lookup(ip2, t0 + Duration::from_secs(3600)).is_empty());
    c.purge(t0 + Duration::from_secs(301));
    assert_eq!(c.addresses(), 1);
    c.purge(t0 + Duration::from_secs(3601));
    assert_eq!(c.addresses(), 0);
    // An IPv4 connect on an IPv6 socket.
    c.learn(&fact(3, "mapped.test", 60), t0);
    let mapped = IpAddr::from_str("::ffff:10.0.0.3").unwrap();
    assert_eq!(c.lookup(mapped, t0), ["mapped.test"]);
}

#[test]
fn names_per_address_and_addresses_are_bounded() {
    let mut c = Cache::new(&config());
    let t0 = Instant::now();
    for i in 0..20 {
        c.learn(&fact(1, &format!("n{i}.test"), 60), t0);
    }
    let names = c.lookup(IpAddr::from([10, 0, 0, 1]), t0);
    assert_eq!(names.len(), MAX_NAMES_PER_ADDRESS);
    assert_eq!(names[0], "n19.test", "most recent first");
    // Relearning moves a name to the front without duplicating it.
    c.learn(&fact(1, "n15.test", 60), t0);
    let names = c.lookup(IpAddr::from([10, 0, 0, 1]), t0);
    assert_eq!(names[0], "n15.test");
    assert_eq!(names.iter().filter(|n| *n == "n15.test").count(), 1);
    // Three addresses at most: the least recently learnt goes.
    c.learn(&fact(2, "b.test", 60), t0);
    c.learn(&fact(3, "c.test", 60), t0);
    c.learn(&fact(1, "a.test", 60), t0); // 1 is now the most recent
    c.learn(&fact(4, "d.test", 60), t0);
    assert_eq!(c.addresses(), 3);
    assert!(
        c.lookup(IpAddr::from([10, 0, 0, 2]), t0).is_empty(),
        "the oldest was evicted"
    );
    assert_eq!(c.lookup(IpAddr::from([10, 0, 0, 1]), t0)[0], "a.test");
    assert_eq!(c.lookup(IpAddr::from([10, 0, 0, 4]), t0), ["d.test"]);
}

#[test]
fn resolv_conf_nameservers() {
    let text = "# comment\nsearch example.test\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n";
    assert_eq!(
        resolv_conf_servers(text),
        [
            IpAddr::from([10, 0, 0, 53]),
            IpAddr::from_str("fe80::1").unwrap()
        ]
    );
    // None: the C library asks the local host.
    assert_eq!(
        resolv_conf_servers("search x\n"),
        [
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        ]
    );
}

#[test]
fn config_bounds_name_the_field() {
    assert!(DnsConfig::default().validate().is_ok());
    let bad = DnsConfig {
        max_ttl_secs: 0,
        ..DnsConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "dns.max_ttl_secs");
    let bad = DnsConfig {
        min_ttl_secs: 100_000,
        ..DnsConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "dns.min_ttl_secs");
    let bad = DnsConfig {
        max_addresses: 0,
        ..DnsConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "dns.max_addresses");
    let bad = DnsConfig {
        resolvers: vec![IpAddr::from([0, 0, 0, 0])],
        ..DnsConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "dns.resolvers");
}
