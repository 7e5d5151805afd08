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

/// An IPv4 UDP packet from `src`:53.
fn ipv4_udp(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
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
    p.extend_from_slice(&[127, 0, 0, 1]);
    p.extend_from_slice(&[0, 53, 0x9c, 0x40, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}

fn ipv6_udp(src: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = vec![0x60, 0, 0, 0, (udp_len >> 8) as u8, udp_len as u8, 17, 64];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    p.extend_from_slice(&[0, 53, 0x9c, 0x40, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}

fn info(ethertype: u16, len: usize) -> PacketInfo {
    PacketInfo {
        len,
        ethertype,
        pkttype: 0,
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
fn only_answers_from_trusted_resolvers_over_udp_53_count() {
    let msg = bytes(&answer(
        "api.example.test.",
        RecordType::A,
        vec![a("api.example.test.", 60, [10, 0, 0, 9])],
    ));
    let trusted: HashSet<IpAddr> = [IpAddr::from([127, 0, 0, 53])].into();
    let p = ipv4_udp([127, 0, 0, 53], &msg);
    let facts = take(&trusted, info(0x0800, p.len()), &p).unwrap();
    assert_eq!(facts[0].addr, IpAddr::from([10, 0, 0, 9]));
    // The same answer from a server the program chose itself.
    let p = ipv4_udp([10, 9, 9, 9], &msg);
    assert_eq!(
        take(&trusted, info(0x0800, p.len()), &p),
        Err(Skip::Untrusted(IpAddr::from([10, 9, 9, 9])))
    );
    // Our own outgoing copy.
    let p = ipv4_udp([127, 0, 0, 53], &msg);
    let mut out = info(0x0800, p.len());
    out.pkttype = 4;
    assert_eq!(take(&trusted, out, &p), Err(Skip::NotDns));
    // IPv6.
    let v6 = Ipv6Addr::from_str("fd00::53").unwrap();
    let trusted6: HashSet<IpAddr> = [IpAddr::V6(v6)].into();
    let p = ipv6_udp(v6, &msg);
    assert_eq!(take(&trusted6, info(0x86dd, p.len()), &p).unwrap().len(), 1);
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
        assert!(udp_from_53(0x0800, &p[..cut]).is_err(), "cut at {cut}");
    }
    assert!(udp_from_53(0x0800, &p).is_ok());
    // Not from port 53.
    let mut q = p.clone();
    q[21] = 54;
    assert_eq!(udp_from_53(0x0800, &q), Err(Skip::NotDns));
    // A fragment.
    let mut f = p.clone();
    f[6] = 0x20;
    assert_eq!(udp_from_53(0x0800, &f), Err(Skip::NotDns));
    // TCP.
    let mut t = p.clone();
    t[9] = 6;
    assert_eq!(udp_from_53(0x0800, &t), Err(Skip::NotDns));
    let p6 = ipv6_udp(Ipv6Addr::LOCALHOST, &msg);
    for cut in 0..p6.len() {
        assert!(udp_from_53(0x86dd, &p6[..cut]).is_err(), "cut at {cut}");
    }
    assert_eq!(udp_from_53(0x0806, &p), Err(Skip::NotDns));
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

/// The real socket and filter: an answer a program has received is in the cache after one
/// drain (the ordering the daemon relies on before it decides a held connect), and answers
/// from other ports or untrusted servers are not.
#[tokio::test]
async fn a_received_answer_is_learnt_by_the_next_drain() {
    let server_ip = Ipv4Addr::new(127, 83, 0, 53);
    let other_ip = Ipv4Addr::new(127, 83, 0, 54);
    let config = DnsConfig {
        resolvers: vec![IpAddr::V4(server_ip)],
        ..DnsConfig::default()
    };
    let mut names = Names::start(&config);
    assert!(
        names.active(),
        "the packet socket needs CAP_NET_RAW (run as root): {:?}",
        names.error
    );
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = std::net::UdpSocket::bind((server_ip, 53)).unwrap();
    let other = std::net::UdpSocket::bind((other_ip, 53)).unwrap();
    let high = std::net::UdpSocket::bind((server_ip, 0)).unwrap();
    let send = |from: &std::net::UdpSocket, q: &str, ip: [u8; 4]| {
        let m = answer(q, RecordType::A, vec![a(q, 60, ip)]);
        from.send_to(&bytes(&m), client.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 512];
        client.recv(&mut buf).unwrap();
    };
    send(&server, "api.example.test.", [10, 77, 0, 1]);
    send(&other, "planted.example.test.", [10, 77, 0, 2]);
    send(&high, "high.example.test.", [10, 77, 0, 3]);
    names.drain();
    assert_eq!(
        names.lookup(IpAddr::from([10, 77, 0, 1])),
        ["api.example.test"]
    );
    assert!(
        names.lookup(IpAddr::from([10, 77, 0, 2])).is_empty(),
        "untrusted server"
    );
    assert!(
        names.lookup(IpAddr::from([10, 77, 0, 3])).is_empty(),
        "not from port 53"
    );
    assert!(names.counters.untrusted >= 1);
    // On loopback each packet passes twice; the outgoing copy is dropped by the filter.
    assert_eq!(names.counters.answers, 1, "{:?}", names.counters);
}
