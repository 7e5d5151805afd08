//! What the kernel can decide without the daemon: the policy's connect `allow` rules become
//! entries of an LPM trie keyed by (label, family, address prefix), so that an allowed connect
//! is never stopped and never leaves the kernel.
//!
//! A rule is compiled only where the kernel's answer is the policy's answer: it must be an
//! `allow` without `host` patterns (the kernel does not know names), and no earlier rule of its
//! label that is not an `allow` may overlap it (first match wins). Entries for the same prefix
//! are merged when they allow the same protocols; anything else stays on the slow path, where
//! the daemon evaluates the whole policy.
//!
//! Exec `allow` rules become (label, device, inode) entries of a hash map in the same way:
//! only rules that name binaries, with no `script` and no `args` patterns (the kernel sees
//! the file, not the arguments), whose files existed when the policy was loaded and live on
//! a filesystem where `stat`'s device number is the kernel's, and with no earlier rule of
//! the label that is not an `allow` and could match the same file.
//!
//! Grants (binary and destination) become kernel entries by the same measure: only where no
//! `deny` or `kill` of the label could match an action the entry lets through
//! ([`grant_in_kernel`]).
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::{
    CompiledMatcher, Policy,
    schema::{Cidr, ConnectMatch, Outcome, PortRange, Protocol},
};
use crate::daemon::enrich::FileId;
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

/// A socket the policy allows in the kernel: (label, family, type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEntry {
    pub label: String,
    pub family: u16,
    pub sock_type: u16,
}

/// The socket fast path of `policy`: every (family, type) an `allow` socket rule names with
/// both lists given, unless an earlier socket rule of the label with another outcome could
/// match it (first match wins). Rules with an empty list stay with the daemon.
#[must_use]
pub fn socket_fast_path(policy: &Policy) -> Vec<SocketEntry> {
    let mut out = Vec::new();
    for label in &policy.labels {
        let mut earlier: Vec<&crate::policy::schema::SocketMatch> = Vec::new();
        for rule in &label.rules {
            let CompiledMatcher::Socket(m) = &rule.matcher else {
                continue;
            };
            if rule.decision.outcome != Outcome::Allow {
                earlier.push(m);
                continue;
            }
            for f in &m.family {
                for t in &m.types {
                    if earlier.iter().any(|e| e.matches(f.0, t.0)) {
                        continue;
                    }
                    let entry = SocketEntry {
                        label: label.name.clone(),
                        family: f.0,
                        sock_type: t.0,
                    };
                    if !out.contains(&entry) {
                        out.push(entry);
                    }
                }
            }
        }
    }
    out
}

/// A local socket a rule names, for the kernel: (label, the kernel's device and inode of its
/// file, or [`countersign_ebpf::UNIX_ABSTRACT_DEV`] and the hash of an abstract name), and
/// whether the first rule naming it allows it (else the daemon decides: held).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixEntry {
    pub label: String,
    pub dev: u64,
    pub ino: u64,
    pub allow: bool,
}

/// The kernel's local-socket rules of `policy` (first rule naming a socket wins; a path that
/// does not exist when the policy is loaded has no entry until it does and the policy is
/// reloaded — the daemon's change check sees it appear), and the labels whose `unix_default`
/// holds every other local socket.
#[must_use]
pub fn unix_rules(policy: &Policy) -> (Vec<UnixEntry>, Vec<String>) {
    let mut out: Vec<UnixEntry> = Vec::new();
    let mut holding = Vec::new();
    for label in &policy.labels {
        if label
            .unix_default
            .as_ref()
            .is_some_and(|d| d.outcome != Outcome::Allow)
        {
            holding.push(label.name.clone());
        }
        for rule in &label.rules {
            let CompiledMatcher::Unix { paths, abstracts } = &rule.matcher else {
                continue;
            };
            let allow = rule.decision.outcome == Outcome::Allow;
            let files = paths
                .iter()
                .filter_map(|(_, f)| f.map(|f| (crate::ebpf::kernel_dev(f.dev), f.ino)));
            let names = abstracts
                .iter()
                .map(|a| (countersign_ebpf::UNIX_ABSTRACT_DEV, abstract_name_hash(a)));
            for (dev, ino) in files.chain(names) {
                if out
                    .iter()
                    .any(|e| e.label == label.name && e.dev == dev && e.ino == ino)
                {
                    continue;
                }
                out.push(UnixEntry {
                    label: label.name.clone(),
                    dev,
                    ino,
                    allow,
                });
            }
        }
    }
    (out, holding)
}

/// The hash the kernel computes for the abstract name `name` (written without its `@`).
#[must_use]
pub fn abstract_name_hash(name: &str) -> u64 {
    let mut buf = [0u8; countersign_ebpf::UNIX_NAME_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(buf.len() - 1);
    buf[1..=n].copy_from_slice(&bytes[..n]);
    countersign_ebpf::abstract_hash(&buf, n + 1)
}

/// The local socket paths the policy's rules name (watched for changes: a service started
/// later binds a new file).
#[must_use]
pub fn unix_paths(policy: &Policy) -> Vec<std::path::PathBuf> {
    policy
        .labels
        .iter()
        .flat_map(|l| &l.rules)
        .filter_map(|r| match &r.matcher {
            CompiledMatcher::Unix { paths, .. } => Some(paths.iter().map(|(p, _)| p.clone())),
            _ => None,
        })
        .flatten()
        .collect()
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

/// One exec entry: a binary the kernel may let a label run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecEntry {
    pub label: String,
    pub path: PathBuf,
    /// The file as it was when the policy was loaded (what the daemon compares with too).
    pub file: FileId,
}

/// The exec fast path of `policy`.
#[must_use]
pub fn exec_fast_path(policy: &Policy) -> Vec<ExecEntry> {
    let mut out: Vec<ExecEntry> = Vec::new();
    for label in &policy.labels {
        // Files an earlier rule that is not an `allow` could match; `None`: any file.
        let mut refused: Vec<Option<FileId>> = Vec::new();
        for rule in &label.rules {
            let CompiledMatcher::Exec {
                binaries,
                scripts,
                args,
            } = &rule.matcher
            else {
                continue;
            };
            if rule.decision.outcome != Outcome::Allow {
                if binaries.is_empty() {
                    refused.push(None);
                }
                // A binary not found at load is matched by path: it could be any file.
                refused.extend(binaries.iter().map(|(_, f)| *f));
                continue;
            }
            if binaries.is_empty() || !scripts.is_empty() || !args.is_empty() {
                continue;
            }
            for (path, file) in binaries {
                let Some(file) = *file else { continue };
                let shadowed = refused.iter().any(|r| r.is_none_or(|r| r == file));
                if shadowed || !kernel_sees_stat_ids(path) {
                    continue;
                }
                let entry = ExecEntry {
                    label: label.name.clone(),
                    path: path.clone(),
                    file,
                };
                if !out
                    .iter()
                    .any(|e| e.label == entry.label && e.file == entry.file)
                {
                    out.push(entry);
                }
            }
        }
    }
    out
}

/// What a grant lets through, as the kernel would match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantMatch {
    /// Every exec of this file (by device and inode), whatever its arguments.
    Binary(FileId),
    /// Every connect to this address and port; `Protocol::Any`: whatever the socket type.
    Destination {
        addr: std::net::IpAddr,
        port: u16,
        protocol: Protocol,
    },
}

/// Whether the kernel may answer every action `grant` covers for `label` with "allowed":
/// true only when the policy could not refuse (deny or kill) any of them, so that the kernel's
/// answer is the policy's. Rules are taken in order (first match wins): an `allow` or
/// `escalate` rule that surely matches every covered action settles it (a grant answers an
/// escalation); a `deny` or `kill` rule that could match one of them, before that, refuses.
/// When no rule settles it, the label's default must not refuse either. A label the policy
/// does not know (or no policy) asks a human for everything, which the grant answers.
#[must_use]
pub fn grant_in_kernel(policy: Option<&Policy>, label: &str, grant: &GrantMatch) -> bool {
    let Some(label) = policy.and_then(|p| p.label(label)) else {
        return true;
    };
    let refuses = |o: Outcome| matches!(o, Outcome::Deny | Outcome::Kill);
    for rule in &label.rules {
        let outcome = rule.decision.outcome;
        let (surely, could) = match (&rule.matcher, grant) {
            (
                CompiledMatcher::Exec {
                    binaries,
                    scripts,
                    args,
                },
                GrantMatch::Binary(file),
            ) => {
                // A binary not found at load is matched by path: it could be any file.
                let could = binaries.is_empty()
                    || binaries.iter().any(|(_, f)| f.is_none_or(|f| f == *file));
                let surely = scripts.is_empty()
                    && args.is_empty()
                    && (binaries.is_empty() || binaries.iter().any(|(_, f)| *f == Some(*file)));
                (surely, could)
            }
            (
                CompiledMatcher::Connect(m),
                GrantMatch::Destination {
                    addr,
                    port,
                    protocol,
                },
            ) => {
                let net = m.cidr.is_empty() || m.cidr.iter().any(|c| c.contains(*addr));
                let ports = m.ports.is_empty() || m.ports.iter().any(|p| p.contains(*port));
                let could_proto = m.protocol == Protocol::Any
                    || *protocol == Protocol::Any
                    || m.protocol == *protocol;
                // Names are not known in the kernel: a `host` rule could match any address
                // it could match without them, and never surely does.
                let surely = net
                    && ports
                    && m.host.is_empty()
                    && (m.protocol == Protocol::Any || m.protocol == *protocol);
                (surely, net && ports && could_proto)
            }
            _ => (false, false),
        };
        if could && refuses(outcome) {
            return false;
        }
        if surely {
            return true;
        }
    }
    !refuses(label.default.outcome)
}

/// The policy's `match: executable` labels, resolved to files now; the executables that
/// cannot be labelled in the kernel come back with the reason, for the daemon to report.
#[must_use]
pub fn executable_labels(policy: &Policy) -> (Vec<ExecEntry>, Vec<(String, PathBuf, String)>) {
    let mut out: Vec<ExecEntry> = Vec::new();
    let mut skipped = Vec::new();
    for label in &policy.labels {
        for path in &label.matches.executable {
            let Some(file) = crate::daemon::enrich::file_id(path) else {
                skipped.push((label.name.clone(), path.clone(), "not found".to_owned()));
                continue;
            };
            if !kernel_sees_stat_ids(path) {
                skipped.push((
                    label.name.clone(),
                    path.clone(),
                    "on a filesystem whose device numbers the kernel sees differently (btrfs, overlayfs): label it by cgroup or `countersign exec`".to_owned(),
                ));
                continue;
            }
            // The first label that names a file keeps it (labels are merged in file order).
            if out.iter().any(|e| e.file == file) {
                continue;
            }
            out.push(ExecEntry {
                label: label.name.clone(),
                path: path.clone(),
                file,
            });
        }
    }
    (out, skipped)
}

/// Whether the device and inode `stat` reports for `path` are the ones the kernel's hooks
/// read (`inode->i_sb->s_dev`, `inode->i_ino`). True for the common local filesystems; not for
/// btrfs (per-subvolume device numbers) or overlayfs (its own numbering), whose files stay on
/// the slow path.
pub fn kernel_sees_stat_ids(path: &Path) -> bool {
    const EXT4: i64 = 0xef53;
    const XFS: i64 = 0x5846_5342;
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58f6;
    const SQUASHFS: i64 = 0x7371_7368;
    const F2FS: i64 = 0xf2f5_2010;
    let Ok(fs) = nix::sys::statfs::statfs(path) else {
        return false;
    };
    #[expect(
        clippy::unnecessary_cast,
        reason = "the type of f_type differs between libcs"
    )]
    let kind = fs.filesystem_type().0 as i64;
    matches!(kind, EXT4 | XFS | TMPFS | RAMFS | SQUASHFS | F2FS)
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

    /// A binary of this test's own filesystem, which the kernel identifies like `stat` does
    /// (skipped where the build directory is on btrfs or overlayfs).
    fn test_binary() -> Option<String> {
        let exe = std::env::current_exe().unwrap();
        kernel_sees_stat_ids(&exe).then(|| exe.display().to_string())
    }

    #[test]
    fn exec_allow_rules_by_binary_compile() {
        let Some(me) = test_binary() else { return };
        let p = policy(&format!(
            "      - {{exec: {{binary: [{me}, /nonexistent/x]}}, outcome: allow}}\n"
        ));
        let e = exec_fast_path(&p);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].label, "a");
        assert_eq!(e[0].path.display().to_string(), me);
        assert_eq!(Some(e[0].file), crate::daemon::enrich::file_id(&e[0].path));
    }

    #[test]
    fn exec_rules_the_kernel_cannot_decide_stay_on_the_slow_path() {
        let Some(me) = test_binary() else { return };
        for rules in [
            // arguments and scripts are not seen by the kernel
            format!("      - {{exec: {{binary: [{me}], args: [\"push *\"]}}, outcome: allow}}\n"),
            format!("      - {{exec: {{binary: [{me}], script: [/tmp/x.sh]}}, outcome: allow}}\n"),
            // any binary: not a set of files
            "      - {exec: {}, outcome: allow}\n".to_owned(),
            // first match wins: an earlier refusal of the same file, or of any file
            format!(
                "      - {{exec: {{binary: [{me}], args: [\"-x\"]}}, outcome: deny}}\n      - {{exec: {{binary: [{me}]}}, outcome: allow}}\n"
            ),
            format!(
                "      - {{exec: {{args: [\"rm *\"]}}, outcome: escalate}}\n      - {{exec: {{binary: [{me}]}}, outcome: allow}}\n"
            ),
            // an earlier refusal of a path that did not exist at load matches by path
            format!(
                "      - {{exec: {{binary: [/nonexistent/x]}}, outcome: kill}}\n      - {{exec: {{binary: [{me}]}}, outcome: allow}}\n"
            ),
            // a deny rule never compiles
            format!("      - {{exec: {{binary: [{me}]}}, outcome: deny}}\n"),
        ] {
            let p = policy(&rules);
            assert!(exec_fast_path(&p).is_empty(), "{rules}");
        }
        // A later refusal, or an earlier one of another file, does not matter.
        let p = policy(&format!(
            "      - {{exec: {{binary: [/bin/sh]}}, outcome: deny}}\n      - {{exec: {{binary: [{me}]}}, outcome: allow}}\n      - {{exec: {{}}, outcome: kill}}\n"
        ));
        assert_eq!(exec_fast_path(&p).len(), 1);
    }

    #[test]
    fn a_binary_grant_is_a_kernel_entry_only_where_no_refusal_could_match() {
        let Some(me) = test_binary() else { return };
        let file = crate::daemon::enrich::file_id(Path::new(&me)).unwrap();
        let g = GrantMatch::Binary(file);
        // No policy, or a label it does not know: everything goes to a human, whom the grant
        // answers.
        assert!(grant_in_kernel(None, "a", &g));
        let p = policy("      - {exec: {binary: [/bin/sh]}, outcome: deny}\n");
        assert!(grant_in_kernel(Some(&p), "other", &g));
        for (rules, expect) in [
            // The escalation the grant answers, alone or before refusals of this file.
            (
                format!("      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n"),
                true,
            ),
            (
                format!(
                    "      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n      - {{exec: {{binary: [{me}]}}, outcome: kill}}\n"
                ),
                true,
            ),
            // A refusal of another file does not matter.
            (
                format!(
                    "      - {{exec: {{binary: [/bin/sh]}}, outcome: deny}}\n      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n"
                ),
                true,
            ),
            // A refusal of this file with some arguments, or of a script it could run.
            (
                format!(
                    "      - {{exec: {{binary: [{me}], args: [\"rm *\"]}}, outcome: deny}}\n      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n"
                ),
                false,
            ),
            (
                format!(
                    "      - {{exec: {{script: [/tmp/x.sh]}}, outcome: kill}}\n      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n"
                ),
                false,
            ),
            // A refusal by a path that did not exist at load: it could be any file.
            (
                format!(
                    "      - {{exec: {{binary: [/nonexistent/x]}}, outcome: deny}}\n      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n"
                ),
                false,
            ),
            // An escalation by arguments does not settle every exec of the file: the refusal
            // after it still could match.
            (
                format!(
                    "      - {{exec: {{binary: [{me}], args: [\"push *\"]}}, outcome: escalate}}\n      - {{exec: {{}}, outcome: deny}}\n"
                ),
                false,
            ),
            // Connect rules say nothing about execs.
            (
                format!(
                    "      - {{connect: {{}}, outcome: deny}}\n      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n"
                ),
                true,
            ),
        ] {
            let p = policy(&rules);
            assert_eq!(grant_in_kernel(Some(&p), "a", &g), expect, "{rules}");
        }
        // The label's default counts where no rule settles it.
        let with_default = |default: &str, rules: &str| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("p.yaml");
            std::fs::write(
                &p,
                format!("apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    default: {{outcome: {default}}}\n    rules:\n{rules}"),
            )
            .unwrap();
            super::super::load(&[p]).unwrap()
        };
        let args_only =
            format!("      - {{exec: {{binary: [{me}], args: [\"x\"]}}, outcome: escalate}}\n");
        assert!(!grant_in_kernel(
            Some(&with_default("deny", &args_only)),
            "a",
            &g
        ));
        assert!(grant_in_kernel(
            Some(&with_default("escalate", &args_only)),
            "a",
            &g
        ));
        let whole = format!("      - {{exec: {{binary: [{me}]}}, outcome: escalate}}\n");
        assert!(grant_in_kernel(
            Some(&with_default("kill", &whole)),
            "a",
            &g
        ));
    }

    #[test]
    fn a_destination_grant_is_a_kernel_entry_only_where_no_refusal_could_match() {
        let tcp = GrantMatch::Destination {
            addr: "10.1.2.3".parse().unwrap(),
            port: 443,
            protocol: Protocol::Tcp,
        };
        let any = GrantMatch::Destination {
            addr: "10.1.2.3".parse().unwrap(),
            port: 443,
            protocol: Protocol::Any,
        };
        let esc = "      - {connect: {cidr: [10.0.0.0/8]}, outcome: escalate}\n";
        for (rules, g, expect) in [
            (esc.to_owned(), tcp, true),
            // Overlapping refusals: network, port and protocol all could match.
            (
                format!("      - {{connect: {{cidr: [10.1.0.0/16], ports: [443]}}, outcome: deny}}\n{esc}"),
                tcp,
                false,
            ),
            (
                format!("      - {{connect: {{ports: [\"400-500\"], protocol: tcp}}, outcome: kill}}\n{esc}"),
                tcp,
                false,
            ),
            // A refusal by name: the kernel does not know names.
            (
                format!("      - {{connect: {{host: [\"*.example.com\"]}}, outcome: deny}}\n{esc}"),
                tcp,
                false,
            ),
            // Refusals that cannot match: another network, port, or protocol.
            (
                format!(
                    "      - {{connect: {{cidr: [192.168.0.0/16]}}, outcome: deny}}\n      - {{connect: {{ports: [80]}}, outcome: deny}}\n      - {{connect: {{protocol: udp}}, outcome: deny}}\n{esc}"
                ),
                tcp,
                true,
            ),
            // A grant for any socket type could meet the UDP refusal.
            (
                format!("      - {{connect: {{protocol: udp}}, outcome: deny}}\n{esc}"),
                any,
                false,
            ),
            // An escalation by name never settles it: the refusal after it still could match.
            (
                "      - {connect: {host: [api.example.com]}, outcome: escalate}\n      - {connect: {}, outcome: deny}\n".to_owned(),
                tcp,
                false,
            ),
            // An escalation for TCP settles a TCP grant, not a grant for any type.
            (
                "      - {connect: {protocol: tcp}, outcome: escalate}\n      - {connect: {}, outcome: deny}\n".to_owned(),
                tcp,
                true,
            ),
            (
                "      - {connect: {protocol: tcp}, outcome: escalate}\n      - {connect: {}, outcome: deny}\n".to_owned(),
                any,
                false,
            ),
            // A later refusal after a rule that settles it does not matter.
            (format!("{esc}      - {{connect: {{}}, outcome: kill}}\n"), tcp, true),
        ] {
            let p = policy(&rules);
            assert_eq!(grant_in_kernel(Some(&p), "a", &g), expect, "{rules} {g:?}");
        }
    }

    #[test]
    fn executables_resolve_to_files_and_missing_ones_are_reported() {
        let Some(me) = test_binary() else { return };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.yaml");
        std::fs::write(
            &p,
            format!(
                "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    match: {{executable: [{me}, /nonexistent/agent]}}\n  - name: b\n    match: {{executable: [{me}]}}\n"
            ),
        )
        .unwrap();
        let p = super::super::load(&[p]).unwrap();
        let (labels, skipped) = executable_labels(&p);
        assert_eq!(labels.len(), 1, "{labels:?}");
        assert_eq!(labels[0].label, "a");
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].1, Path::new("/nonexistent/agent"));
        assert_eq!(skipped[0].2, "not found");
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
