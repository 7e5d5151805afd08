//! What the kernel can decide without the daemon: the policy's connect `allow` rules become
//! entries of an LPM trie keyed by (label, family, address prefix), so that an allowed connect
//! is never stopped and never leaves the kernel.
//!
//! A rule is compiled only where the kernel's answer is the policy's answer: it must be an
//! `allow` without `host` patterns (the kernel does not know names), and no earlier rule of its
//! label that is not an `allow` may overlap it (first match wins). Entries for the same prefix
//! are merged when they allow the same protocols; anything else stays on the slow path, where
//! the daemon evaluates the whole policy.
use ipnet::IpNet;

use super::{
    CompiledMatcher, Policy,
    schema::{Cidr, ConnectMatch, Outcome, PortRange, Protocol},
};
use countersign_ebpf::{MAX_PORT_SPANS, PROTO_TCP, PROTO_UDP};

/// One kernel entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectEntry {
    pub label: String,
    pub net: IpNet,
    /// `PROTO_*` bits.
    pub protocols: u32,
    pub ports: Vec<(u16, u16)>,
}

/// The connect fast path of `policy`.
#[must_use]
pub fn connect_fast_path(policy: &Policy) -> Vec<ConnectEntry> {
    let mut out: Vec<ConnectEntry> = Vec::new();
    // Prefixes that must stay on the slow path (conflicting entries), per label.
    let mut dropped: Vec<(String, IpNet)> = Vec::new();
    for label in &policy.labels {
        let mut earlier: Vec<(&ConnectMatch, Outcome)> = Vec::new();
        for rule in &label.rules {
            let CompiledMatcher::Connect(m) = &rule.matcher else {
                continue;
            };
            let outcome = rule.decision.outcome;
            let compilable = outcome == Outcome::Allow
                && m.host.is_empty()
                && !earlier
                    .iter()
                    .any(|(e, o)| *o != Outcome::Allow && overlaps(e, m));
            earlier.push((m, outcome));
            if !compilable {
                continue;
            }
            let ports = spans(&m.ports);
            if ports.len() > MAX_PORT_SPANS {
                continue;
            }
            let protocols = match m.protocol {
                Protocol::Any => PROTO_TCP | PROTO_UDP,
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
            };
            for net in nets(&m.cidr) {
                if dropped.iter().any(|(l, n)| *l == label.name && *n == net) {
                    continue;
                }
                match out
                    .iter()
                    .position(|e| e.label == label.name && e.net == net)
                {
                    None => out.push(ConnectEntry {
                        label: label.name.clone(),
                        net,
                        protocols,
                        ports: ports.clone(),
                    }),
                    Some(i) if out[i].protocols == protocols => {
                        let merged = merge(&out[i].ports, &ports);
                        if merged.len() > MAX_PORT_SPANS {
                            out.remove(i);
                            dropped.push((label.name.clone(), net));
                        } else {
                            out[i].ports = merged;
                        }
                    }
                    Some(i) => {
                        out.remove(i);
                        dropped.push((label.name.clone(), net));
                    }
                }
            }
        }
    }
    widen_nested(&mut out);
    out
}

/// The kernel looks up the longest matching prefix only: a more specific entry must also carry
/// what the entries around it allow (when they allow the same protocols), or it would hide
/// them. Entries it cannot carry (other protocols, too many spans) only cost the slow path.
fn widen_nested(entries: &mut [ConnectEntry]) {
    let snapshot = entries.to_vec();
    for e in entries.iter_mut() {
        for outer in &snapshot {
            let nested = outer.label == e.label
                && outer.net != e.net
                && outer.net.contains(&e.net.network())
                && outer.net.prefix_len() < e.net.prefix_len();
            if nested && outer.protocols == e.protocols {
                let merged = merge(&e.ports, &outer.ports);
                if merged.len() <= MAX_PORT_SPANS {
                    e.ports = merged;
                }
            }
        }
    }
}

fn nets(cidrs: &[Cidr]) -> Vec<IpNet> {
    if cidrs.is_empty() {
        return vec![
            "0.0.0.0/0".parse().expect("valid"),
            "::/0".parse().expect("valid"),
        ];
    }
    cidrs.iter().map(|c| c.0.trunc()).collect()
}

fn spans(ports: &[PortRange]) -> Vec<(u16, u16)> {
    if ports.is_empty() {
        return vec![(1, u16::MAX)];
    }
    merge(
        &[],
        &ports.iter().map(|p| (p.first, p.last)).collect::<Vec<_>>(),
    )
}

/// The union of two sets of ranges, sorted and coalesced.
fn merge(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut all: Vec<(u16, u16)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (f, l) in all {
        match out.last_mut() {
            Some(last) if u32::from(f) <= u32::from(last.1) + 1 => last.1 = last.1.max(l),
            _ => out.push((f, l)),
        }
    }
    out
}

/// Whether some connect could match both rules.
fn overlaps(a: &ConnectMatch, b: &ConnectMatch) -> bool {
    let nets_overlap = a.cidr.is_empty()
        || b.cidr.is_empty()
        || a.cidr.iter().any(|x| {
            b.cidr
                .iter()
                .any(|y| x.0.contains(&y.0.network()) || y.0.contains(&x.0.network()))
        });
    let ports_overlap = a.ports.is_empty()
        || b.ports.is_empty()
        || a.ports.iter().any(|x| {
            b.ports
                .iter()
                .any(|y| x.first <= y.last && y.first <= x.last)
        });
    let protocols_overlap =
        a.protocol == Protocol::Any || b.protocol == Protocol::Any || a.protocol == b.protocol;
    nets_overlap && ports_overlap && protocols_overlap
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(rules: &str) -> Policy {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.yaml");
        std::fs::write(
            &p,
            format!("apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n{rules}"),
        )
        .unwrap();
        super::super::load(&[p]).unwrap()
    }

    #[test]
    fn allow_rules_compile_with_their_ports_and_protocols() {
        let p = policy(
            "      - {connect: {cidr: [10.0.0.0/8], ports: [443, 80, \"8000-8100\"], protocol: tcp}, outcome: allow}\n      - {connect: {cidr: [\"2001:db8::/32\"]}, outcome: allow}\n",
        );
        let e = connect_fast_path(&p);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].net.to_string(), "10.0.0.0/8");
        assert_eq!(e[0].protocols, PROTO_TCP);
        assert_eq!(e[0].ports, [(80, 80), (443, 443), (8000, 8100)]);
        assert_eq!(e[1].ports, [(1, 65535)]);
        assert_eq!(e[1].protocols, PROTO_TCP | PROTO_UDP);
    }

    #[test]
    fn an_earlier_overlapping_refusal_keeps_the_allow_on_the_slow_path() {
        let p = policy(
            "      - {connect: {cidr: [10.1.0.0/16], ports: [443]}, outcome: deny}\n      - {connect: {cidr: [10.0.0.0/8], ports: [443]}, outcome: allow}\n      - {connect: {cidr: [10.0.0.0/8], ports: [22]}, outcome: escalate}\n      - {connect: {cidr: [192.168.0.0/16]}, outcome: allow}\n",
        );
        let e = connect_fast_path(&p);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].net.to_string(), "192.168.0.0/16");
    }

    #[test]
    fn host_rules_and_non_allow_rules_never_compile() {
        let p = policy(
            "      - {connect: {host: [api.example.com]}, outcome: allow}\n      - {connect: {ports: [1]}, outcome: kill}\n",
        );
        assert!(connect_fast_path(&p).is_empty());
    }

    #[test]
    fn same_prefix_merges_or_falls_back() {
        let p = policy(
            "      - {connect: {cidr: [10.0.0.0/8], ports: [1]}, outcome: allow}\n      - {connect: {cidr: [10.0.0.0/8], ports: [2]}, outcome: allow}\n      - {connect: {cidr: [11.0.0.0/8], ports: [1], protocol: tcp}, outcome: allow}\n      - {connect: {cidr: [11.0.0.0/8], ports: [2], protocol: udp}, outcome: allow}\n",
        );
        let e = connect_fast_path(&p);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].ports, [(1, 2)]);
    }

    #[test]
    fn a_nested_prefix_carries_the_ports_around_it() {
        let p = policy(
            "      - {connect: {cidr: [10.0.0.0/8], ports: [443]}, outcome: allow}\n      - {connect: {cidr: [10.1.2.3/32], ports: [22]}, outcome: allow}\n",
        );
        let e = connect_fast_path(&p);
        let inner = e
            .iter()
            .find(|x| x.net.to_string() == "10.1.2.3/32")
            .unwrap();
        assert_eq!(inner.ports, [(22, 22), (443, 443)]);
    }

    #[test]
    fn examples_compile() {
        let p = super::super::load(&[Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")])
            .unwrap();
        let e = connect_fast_path(&p);
        // ci: package mirror + artifact store; pipeline: analytics databases.
        assert!(
            e.iter()
                .any(|x| x.label == "ci" && x.net.to_string() == "10.20.0.0/16")
        );
        assert!(
            e.iter()
                .any(|x| x.label == "pipeline" && x.net.to_string() == "10.40.0.0/16")
        );
        // coder's only connect allow is by host name.
        assert!(!e.iter().any(|x| x.label == "coder"));
    }
}
