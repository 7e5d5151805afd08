//! The policy language (`apiVersion: countersign.dev/v1`): serde types for one file.
//!
//! Values are checked while they are parsed (CIDRs, port ranges, durations, globs, the shape
//! of a rule), so that every error carries the file, line and column serde_yaml reports.
use std::{fmt, net::IpAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// One policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(rename = "apiVersion")]
    pub api_version: ApiVersion,
    /// Other files, relative to this one, merged before it.
    #[serde(default)]
    pub include: Vec<PathBuf>,
    #[serde(default)]
    pub labels: Vec<LabelSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ApiVersion {
    #[serde(rename = "countersign.dev/v1")]
    V1,
}

/// An agent: how its processes are recognised, on whose behalf it works, and its rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// Also the name given to `countersign exec --label`.
    pub name: LabelName,
    #[serde(default, rename = "match")]
    pub matches: MatchSpec,
    /// The human the agent works for: never an approver of its requests.
    #[serde(default)]
    pub on_behalf_of: Option<String>,
    /// What happens to an action no rule matches (default: escalate).
    #[serde(default)]
    pub default: Option<Decision>,
    /// What happens to a local (`AF_UNIX`) socket no rule names: absent, it is let through
    /// in the kernel (local IPC is everywhere); `{outcome: escalate}` holds every one.
    #[serde(default)]
    pub unix_default: Option<Decision>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Ways to recognise an agent's processes besides `countersign exec --label`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// cgroup v2 paths as in `/proc/PID/cgroup`, globs allowed (`/agents.slice/*`).
    #[serde(default)]
    pub cgroup: Vec<Glob>,
    /// systemd units (`ci-runner.service`).
    #[serde(default)]
    pub systemd_unit: Vec<String>,
    /// Executables: a process that runs one of these files (by device and inode) is an agent.
    #[serde(default)]
    pub executable: Vec<PathBuf>,
}

/// A label name: 1 to 64 of `a-z A-Z 0-9 - _ .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelName(pub String);

impl<'de> Deserialize<'de> for LabelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::daemon::config::validate_label(&s).map_err(de::Error::custom)?;
        Ok(Self(s))
    }
}

/// What a rule (or a label's default) decides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub outcome: Outcome,
    /// Only with `outcome: escalate`.
    #[serde(default)]
    pub escalate: Option<Escalation>,
}

/// One rule: what it matches, and the decision. Exactly one of `exec` and `connect`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawRule")]
pub struct Rule {
    pub name: Option<String>,
    pub matcher: Matcher,
    pub decision: Decision,
}

#[derive(Debug, Clone)]
pub enum Matcher {
    Exec(ExecMatch),
    /// Connects and sends: any way to reach a destination.
    Connect(ConnectMatch),
    Socket(SocketMatch),
    /// Local sockets: paths, `@abstract` names.
    Unix(Vec<UnixName>),
    /// Listening for connections from the network: the address listened on, its port.
    Listen(ListenMatch),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    exec: Option<ExecMatch>,
    #[serde(default)]
    connect: Option<ConnectMatch>,
    #[serde(default)]
    socket: Option<SocketMatch>,
    #[serde(default)]
    unix: Option<Vec<UnixName>>,
    #[serde(default)]
    listen: Option<ListenMatch>,
    outcome: Outcome,
    #[serde(default)]
    escalate: Option<Escalation>,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    fn try_from(r: RawRule) -> Result<Self, String> {
        let what = r
            .name
            .as_deref()
            .map_or_else(|| "rule".to_owned(), |n| format!("rule `{n}`"));
        let matcher = match (r.exec, r.connect, r.socket, r.unix, r.listen) {
            (Some(e), None, None, None, None) => Matcher::Exec(e),
            (None, Some(c), None, None, None) => Matcher::Connect(c),
            (None, None, Some(s), None, None) => Matcher::Socket(s),
            (None, None, None, Some(u), None) if !u.is_empty() => Matcher::Unix(u),
            (None, None, None, Some(_), None) => {
                return Err(format!("{what}: `unix` names no socket"));
            }
            (None, None, None, None, Some(l)) => Matcher::Listen(l),
            (None, None, None, None, None) => {
                return Err(format!(
                    "{what} needs `exec: {{...}}`, `connect: {{...}}`, `socket: {{...}}`, `unix: [...]` or `listen: {{...}}`"
                ));
            }
            _ => {
                return Err(format!(
                    "{what} has more than one of `exec`, `connect`, `socket`, `unix` and `listen`; split it into one rule each"
                ));
            }
        };
        let decision = Decision {
            outcome: r.outcome,
            escalate: r.escalate,
        };
        decision.check().map_err(|e| format!("{what}: {e}"))?;
        Ok(Rule {
            name: r.name,
            matcher,
            decision,
        })
    }
}

impl Decision {
    /// `escalate:` only goes with `outcome: escalate`.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.escalate {
            for (i, g) in e.grants.iter().enumerate() {
                match (g.scope, g.duration) {
                    (GrantScope::Once, Some(_)) => {
                        return Err(format!("escalate.grants[{i}]: `once` takes no `for`"));
                    }
                    (GrantScope::Binary | GrantScope::Destination | GrantScope::Tree, None) => {
                        return Err(format!(
                            "escalate.grants[{i}]: a `{:?}` grant needs `for` (how long it lasts, at most 24h)",
                            g.scope
                        )
                        .to_lowercase());
                    }
                    _ => {}
                }
            }
            if !e.ladder.is_empty() && e.timeout.is_none() {
                return Err(
                    "escalate.ladder needs escalate.timeout (its steps come before the timeout; the daemon's request_timeout_secs is not known to the policy)"
                        .into(),
                );
            }
            let timeout = e.timeout.unwrap_or(Duration::MAX);
            let mut last = Duration::ZERO;
            for (i, step) in e.ladder.iter().enumerate() {
                if step.after <= last || step.after >= timeout {
                    return Err(format!(
                        "escalate.ladder[{i}].after: each step must come after the one before and before the timeout ({})",
                        humantime::format_duration(timeout)
                    ));
                }
                if step.approvers.is_empty() {
                    return Err(format!(
                        "escalate.ladder[{i}].approvers: name at least one group"
                    ));
                }
                last = step.after;
            }
        }
        if self.escalate.is_some() && self.outcome != Outcome::Escalate {
            return Err(format!(
                "`escalate:` settings only go with `outcome: escalate` (outcome is `{}`)",
                self.outcome
            ));
        }
        Ok(())
    }

    /// The escalation settings in force (the defaults when none are given).
    #[must_use]
    pub fn escalation(&self) -> Option<Escalation> {
        (self.outcome == Outcome::Escalate).then(|| self.escalate.clone().unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Runs; decided in the kernel where possible.
    Allow,
    /// Fails with EPERM (an exec held after loading is killed).
    Deny,
    /// The process is killed.
    Kill,
    /// A human decides.
    Escalate,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Kill => "kill",
            Outcome::Escalate => "escalate",
        })
    }
}

/// Who decides an escalated action, and what happens if nobody does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Escalation {
    /// Approver groups.
    pub approvers: Vec<String>,
    /// How many approvals are needed.
    pub quorum: u32,
    /// `each`: the approvals must include one from every group in `approvers` (and be at
    /// least `quorum`); `any` (default): `quorum` approvals from any of them.
    pub quorum_from: QuorumFrom,
    /// Whether an approver must give a reason.
    pub justification: bool,
    /// How long a human has; `None`: the daemon's `request_timeout_secs`. A rule's own
    /// timeout, where it sets one, comes before the daemon's.
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// What is applied when nobody decided in time; `None`: the daemon's `timeout_action`.
    pub on_timeout: Option<TimeoutOutcome>,
    /// Scoped grants the approver may give instead of a single approval.
    pub grants: Vec<Grant>,
    /// Remind the approvers this often while the request waits (none: no reminders).
    #[serde(deserialize_with = "opt_duration")]
    pub remind: Option<Duration>,
    /// Further groups asked when the earlier ones have not decided in time.
    pub ladder: Vec<LadderStep>,
}

/// Where a quorum's approvals must come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuorumFrom {
    /// Any of the groups asked.
    #[default]
    Any,
    /// At least one from each group asked.
    Each,
}

/// One rung of the escalation ladder: after `after` without a decision, `approvers` may
/// answer too (and are told).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LadderStep {
    #[serde(deserialize_with = "duration")]
    pub after: Duration,
    pub approvers: Vec<String>,
}

impl Default for Escalation {
    fn default() -> Self {
        Self {
            approvers: Vec::new(),
            quorum: 1,
            quorum_from: QuorumFrom::Any,
            justification: false,
            // The daemon's (`request_timeout_secs`, `timeout_action`) unless the rule says.
            timeout: None,
            on_timeout: None,
            grants: Vec::new(),
            remind: None,
            ladder: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutOutcome {
    Allow,
    Deny,
    Kill,
}

impl fmt::Display for TimeoutOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutOutcome::Allow => "allow",
            TimeoutOutcome::Deny => "deny",
            TimeoutOutcome::Kill => "kill",
        })
    }
}

/// A grant an approver may give.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub scope: GrantScope,
    /// How long it lasts (not for `once`).
    #[serde(default, rename = "for", deserialize_with = "opt_duration")]
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    /// This exact action, once.
    Once,
    /// This binary for this label.
    Binary,
    /// This destination for this label.
    Destination,
    /// This process tree.
    Tree,
}

/// What an exec rule matches. Empty lists match anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecMatch {
    /// Binaries, by path; compared by device and inode where the file exists.
    #[serde(default)]
    pub binary: Vec<PathBuf>,
    /// Scripts run by an interpreter (`python3 /opt/x.py`), by path.
    #[serde(default)]
    pub script: Vec<PathBuf>,
    /// Globs over the arguments after argv[0], joined by single spaces (`push *`).
    #[serde(default)]
    pub args: Vec<Glob>,
}

/// What a listen rule matches: the address a socket listens on (`0.0.0.0` or `::` when it
/// listens on every address of the host, which only a CIDR holding it matches) and the port.
/// Empty lists match anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenMatch {
    #[serde(default)]
    pub cidr: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

/// What a connect rule matches. Empty lists match anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectMatch {
    #[serde(default)]
    pub cidr: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination host names (globs, case-insensitive), matched against the names learnt
    /// for the address from the host resolvers' DNS answers.
    #[serde(default)]
    pub host: Vec<HostGlob>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    /// As written in a policy.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Which sockets a rule names (empty lists: any). Only sockets that are not ordinary TCP,
/// UDP, local or netlink ones are actions: `socket: {family: [packet]}`,
/// `socket: {family: [inet], type: [raw]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketMatch {
    #[serde(default)]
    pub family: Vec<SocketFamily>,
    #[serde(default, rename = "type")]
    pub types: Vec<SocketType>,
}

impl SocketMatch {
    #[must_use]
    pub fn matches(&self, family: u16, sock_type: u16) -> bool {
        (self.family.is_empty() || self.family.iter().any(|f| f.0 == family))
            && (self.types.is_empty() || self.types.iter().any(|t| t.0 == sock_type))
    }
}

/// A local socket a rule names: an absolute path (`/run/docker.sock`, matched by the file it
/// is, whatever path reaches it) or an abstract name written `@name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixName {
    Path(std::path::PathBuf),
    Abstract(String),
}

impl FromStr for UnixName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix('@') {
            if name.is_empty() || name.len() > 107 {
                return Err(format!(
                    "`{s}`: an abstract name has 1 to 107 bytes after `@`"
                ));
            }
            return Ok(UnixName::Abstract(name.to_owned()));
        }
        if !s.starts_with('/') || s.len() > 107 {
            return Err(format!(
                "`{s}` is not a local socket: an absolute path of at most 107 bytes, or `@name` for an abstract one"
            ));
        }
        Ok(UnixName::Path(s.into()))
    }
}

impl fmt::Display for UnixName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixName::Path(p) => write!(f, "{}", p.display()),
            UnixName::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

/// Socket families by name (`AF_*` without the prefix, lowercase) or number.
const SOCKET_FAMILIES: &[(&str, u16)] = &[
    ("unix", 1),
    ("inet", 2),
    ("ax25", 3),
    ("ipx", 4),
    ("appletalk", 5),
    ("x25", 9),
    ("inet6", 10),
    ("key", 15),
    ("netlink", 16),
    ("packet", 17),
    ("rds", 21),
    ("llc", 26),
    ("ib", 27),
    ("mpls", 28),
    ("can", 29),
    ("tipc", 30),
    ("bluetooth", 31),
    ("alg", 38),
    ("nfc", 39),
    ("vsock", 40),
    ("kcm", 41),
    ("qipcrtr", 42),
    ("smc", 43),
    ("xdp", 44),
    ("mctp", 45),
];

/// Socket types by name (`SOCK_*` without the prefix, lowercase) or number.
const SOCKET_TYPES: &[(&str, u16)] = &[
    ("stream", 1),
    ("dgram", 2),
    ("raw", 3),
    ("rdm", 4),
    ("seqpacket", 5),
    ("dccp", 6),
    ("packet", 10),
];

/// A socket family (`AF_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFamily(pub u16);

/// A socket type (`SOCK_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketType(pub u16);

/// A name from `table` or a number below `max`.
fn name_or_number(s: &str, table: &[(&str, u16)], what: &str, max: u16) -> Result<u16, String> {
    if let Some((_, n)) = table.iter().find(|(name, _)| name.eq_ignore_ascii_case(s)) {
        return Ok(*n);
    }
    match s.parse::<u16>() {
        Ok(n) if n < max => Ok(n),
        _ => {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            Err(format!(
                "`{s}` is not a socket {what} (one of {}, or a number below {max})",
                names.join(", ")
            ))
        }
    }
}

/// The name of `n` in `table`, else the number.
fn number_name(n: u16, table: &[(&str, u16)]) -> String {
    table
        .iter()
        .find(|(_, v)| *v == n)
        .map_or_else(|| n.to_string(), |(name, _)| (*name).to_owned())
}

impl FromStr for SocketFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        name_or_number(s, SOCKET_FAMILIES, "family", 64).map(SocketFamily)
    }
}

impl FromStr for SocketType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        name_or_number(s, SOCKET_TYPES, "type", 16).map(SocketType)
    }
}

impl fmt::Display for SocketFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&number_name(self.0, SOCKET_FAMILIES))
    }
}

impl fmt::Display for SocketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&number_name(self.0, SOCKET_TYPES))
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    #[must_use]
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net));
        }
        // A bare address is a /32 or /128.
        s.parse::<IpAddr>()
            .map(|a| Cidr(ipnet::IpNet::from(a)))
            .map_err(|_| {
                format!("`{s}` is not a CIDR (like 10.0.0.0/8 or 2001:db8::/32) or an address")
            })
    }
}

/// A port or an inclusive range `8000-8100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port (1-65535) or a range like 8000-8100");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// A glob (`*` and `?`, `[...]` classes), matched against a whole string.
#[derive(Debug, Clone)]
pub struct Glob {
    matcher: globset::GlobMatcher,
}

impl Glob {
    #[must_use]
    pub fn matches(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

impl FromStr for Glob {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(s)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("`{s}` is not a valid pattern: {e}"))?;
        Ok(Glob {
            matcher: glob.compile_matcher(),
        })
    }
}

/// A host name glob: like [`Glob`], but case-insensitive (DNS names are).
#[derive(Debug, Clone)]
pub struct HostGlob {
    matcher: globset::GlobMatcher,
}

impl HostGlob {
    #[must_use]
    pub fn matches(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

impl FromStr for HostGlob {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(s.trim_end_matches('.'))
            .literal_separator(false)
            .backslash_escape(true)
            .case_insensitive(true)
            .build()
            .map_err(|e| format!("`{s}` is not a valid host pattern: {e}"))?;
        Ok(HostGlob {
            matcher: glob.compile_matcher(),
        })
    }
}

/// Deserializes any `FromStr` type from a string (or, for ports, a number).
macro_rules! from_str_de {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = StrOrNum::deserialize(d)?;
                v.0.parse().map_err(de::Error::custom)
            }
        }
    };
}
from_str_de!(Cidr);
from_str_de!(PortRange);
from_str_de!(Glob);
from_str_de!(SocketFamily);
from_str_de!(SocketType);
from_str_de!(UnixName);
from_str_de!(HostGlob);

/// A scalar read as text (YAML gives ports as numbers).
struct StrOrNum(String);

impl<'de> Deserialize<'de> for StrOrNum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = StrOrNum;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrOrNum, E> {
                Ok(StrOrNum(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StrOrNum, E> {
                Ok(StrOrNum(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StrOrNum, E> {
                Ok(StrOrNum(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `30s`, `5m`, `1h30m`; at most a day.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = StrOrNum::deserialize(d)?.0;
    parse_duration(&s).map_err(de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s, 5m or 1h ({e})"))?;
    if d.is_zero() || d > Duration::from_secs(24 * 3600) {
        return Err(format!(
            "`{s}`: a duration must be more than 0 and at most 24h"
        ));
    }
    Ok(d)
}
