//! What countersign signs, and the hash that binds a decision to one exact action.
//!
//! - an **escalation**: the daemon, with its host key, asks the approver to decide a request;
//! - a **decision**: the approver, with its key, states who decided what about which request
//!   (host, request id and action hash): the daemon releases nothing without one that
//!   verifies and matches the request it holds, and the host's records embed it.
use serde::{Deserialize, Serialize};

use crate::proto::{ActionKind, Decision, RequestView};

/// DSSE payload type of an escalation (signed by the host key).
pub const PAYLOAD_ESCALATION: &str = "application/vnd.countersign.escalation+json";
/// DSSE payload type of a decision (signed by the approver's key).
pub const PAYLOAD_DECISION: &str = "application/vnd.countersign.decision+json";
/// DSSE payload type of a grant's revocation (signed by the approver's key).
pub const PAYLOAD_REVOCATION: &str = "application/vnd.countersign.revocation+json";
/// Version of the statements below.
pub const STATEMENT_VERSION: u32 = 1;

/// The fields of a held action that an approval is bound to: what the human was shown and
/// what the daemon checks again before it releases anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionDigest<'a> {
    pub host: &'a str,
    pub request: u64,
    pub kind: &'a str,
    pub label: &'a str,
    pub pid: u32,
    pub uid: u32,
    pub binary: Option<&'a str>,
    pub argv: &'a [String],
    pub argv_truncated: bool,
    pub cwd: Option<&'a str>,
    pub destination: Option<&'a str>,
    pub protocol: Option<&'a str>,
    /// Only for socket actions (absent otherwise, so other actions hash as before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'a str>,
}

/// SHA-256 (hex) of the canonical JSON of the action in `view`, on host `host_id`.
#[must_use]
pub fn action_hash(host_id: &str, view: &RequestView) -> String {
    let digest = ActionDigest {
        host: host_id,
        request: view.id,
        kind: view.kind.as_str(),
        label: &view.label,
        pid: view.pid,
        uid: view.uid,
        binary: view.binary.as_deref(),
        argv: &view.argv,
        argv_truncated: view.argv_truncated,
        cwd: view.cwd.as_deref(),
        destination: view.destination.as_deref(),
        protocol: view.protocol.as_deref(),
        socket: view.socket.as_deref(),
    };
    // Only strings, integers and booleans: canonical JSON cannot fail.
    super::sha256_hex(&super::canonical(&digest).expect("canonical JSON of an action"))
}

/// A daemon's request for a decision (payload of [`PAYLOAD_ESCALATION`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    pub v: u32,
    /// The host's id: the key id of its host key.
    pub host_id: String,
    /// The host's name, for people.
    pub host_name: String,
    pub request: RequestView,
    /// [`action_hash`] of `request` on `host_id`.
    pub action_hash: String,
    /// Who the agent works for (the label's `on_behalf_of`): never an approver of it.
    pub on_behalf_of: Option<String>,
    /// Approver groups the policy rule names (empty: the approver's default group).
    pub approvers: Vec<String>,
    /// Approvals needed (from the rule; at least 1).
    pub quorum: u32,
    /// Whether the approvals must include one from each group in `approvers`.
    #[serde(default)]
    pub each_group: bool,
    /// Whether the approver must give a reason.
    pub justification: bool,
    /// RFC 3339 time after which the host applies the timeout outcome.
    pub deadline: String,
    /// What the timeout brings (`approve`, `deny`, `kill`).
    pub on_timeout: Decision,
    /// RFC 3339 time the escalation was signed.
    pub sent_at: String,
    /// Remind the approvers every so many seconds while nobody decides.
    #[serde(default)]
    pub remind_secs: Option<u64>,
    /// Groups asked in addition after so many seconds without a decision.
    #[serde(default)]
    pub ladder: Vec<LadderStep>,
    /// Grants the approvers may give instead of a single approval (from the rule).
    #[serde(default)]
    pub grants: Vec<GrantOffer>,
}

/// What a grant covers, besides the approved action itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    /// The same binary, for the same label (execs).
    Binary,
    /// The same destination address, port and protocol, for the same label (connects).
    Destination,
    /// Anything the requesting process and its descendants do, for the same label.
    Tree,
}

impl std::fmt::Display for GrantScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GrantScope::Binary => "binary",
            GrantScope::Destination => "destination",
            GrantScope::Tree => "tree",
        })
    }
}

/// A grant an escalation offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantOffer {
    pub scope: GrantScope,
    pub for_secs: u64,
}

impl GrantOffer {
    /// Whether it can apply to a request of `kind`.
    #[must_use]
    pub fn fits(&self, kind: ActionKind) -> bool {
        match self.scope {
            GrantScope::Binary => kind.is_exec(),
            GrantScope::Destination => kind.has_destination(),
            GrantScope::Tree => true,
        }
    }

    /// For people: `this binary for 30m`.
    #[must_use]
    pub fn describe(&self) -> String {
        let what = match self.scope {
            GrantScope::Binary => "this binary",
            GrantScope::Destination => "this destination",
            GrantScope::Tree => "this process tree",
        };
        format!(
            "{what} for {}",
            humantime::format_duration(std::time::Duration::from_secs(self.for_secs))
        )
    }
}

/// A grant given with an approval (in [`DecisionStatement::grant`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantStatement {
    /// Unique at this approver (`g-` + its request id).
    pub id: String,
    pub scope: GrantScope,
    /// RFC 3339.
    pub expires_at: String,
}

/// The approver revokes a grant (payload of [`PAYLOAD_REVOCATION`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationStatement {
    pub v: u32,
    pub approver_key: String,
    pub host_id: String,
    pub grant_id: String,
    /// Who revoked it (`bob via slack`).
    pub by: String,
    /// RFC 3339.
    pub at: String,
}

/// A rung of the escalation ladder, as sent to the approver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LadderStep {
    pub after_secs: u64,
    pub approvers: Vec<String>,
}

impl Escalation {
    /// The groups that may answer `elapsed_ms` after the request was made: the rule's, plus
    /// every ladder step already reached.
    #[must_use]
    pub fn groups_at(&self, elapsed_ms: i64) -> Vec<String> {
        let mut groups = self.approvers.clone();
        for step in &self.ladder {
            if elapsed_ms >= (step.after_secs as i64).saturating_mul(1000) {
                groups.extend(step.approvers.iter().cloned());
            }
        }
        groups.dedup();
        groups
    }

    /// What the request asks of people, `elapsed_ms` after it was made, e.g. `1 approval(s)
    /// from dev, ops` or `one approval from each of dev, ops, with a reason`.
    #[must_use]
    pub fn asks(&self, elapsed_ms: i64) -> String {
        let groups = self.groups_at(elapsed_ms);
        let who = if groups.is_empty() {
            "the approvers".to_owned()
        } else {
            groups.join(", ")
        };
        let reason = if self.justification {
            ", with a reason"
        } else {
            ""
        };
        if self.each_group && groups.len() > 1 {
            format!(
                "{} approval(s), one from each of {who}{reason}",
                self.quorum.max(groups.len() as u32)
            )
        } else {
            format!("{} approval(s) from {who}{reason}", self.quorum.max(1))
        }
    }
}

/// One human's answer that counted towards a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// The approver's configured name.
    pub approver: String,
    /// Through what: `api`, `cli`, `slack`, `teams`, `web`.
    pub channel: String,
    /// The identity the channel proved (e.g. `slack:T123/U456`, `token:3f2a…`).
    pub identity: String,
    pub decision: Decision,
    pub justification: Option<String>,
    /// RFC 3339.
    pub at: String,
    /// The grant this answer offered to give (index into the escalation's `grants`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<u32>,
    /// Every identity the approver service knew for this person when it decided (name,
    /// emails, chat ids, identity provider subjects, Unix users): what separation of duties
    /// is checked against, by the service and again by every verifier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// The forms an identity is compared in: trimmed and lowercased, and an email address also
/// by its local part (`bob@example.com` is `bob` too: an approver entry that lacks the email
/// is still matched by name).
fn identity_forms(id: &str) -> Vec<String> {
    let id = id.trim().to_lowercase();
    if id.is_empty() {
        return Vec::new();
    }
    let mut forms = vec![id.clone()];
    if let Some((local, _)) = id.split_once('@')
        && !local.is_empty()
    {
        forms.push(local.to_owned());
    }
    if let Some(user) = id.strip_prefix("unix:") {
        forms.push(user.to_owned());
    }
    forms
}

/// The first pair of identities, one from each list, that name the same person in any of
/// their forms.
#[must_use]
pub fn same_person(a: &[String], b: &[String]) -> Option<(String, String)> {
    for x in a {
        let xs = identity_forms(x);
        for y in b {
            if identity_forms(y).iter().any(|f| xs.contains(f)) {
                return Some((x.clone(), y.clone()));
            }
        }
    }
    None
}

/// The identities a request names for the human behind it: who the agent works for
/// (`on_behalf_of`) and the Unix user it runs as (`unix:NAME`).
#[must_use]
pub fn requester_identities(on_behalf_of: Option<&str>, view: &RequestView) -> Vec<String> {
    on_behalf_of
        .map(str::to_owned)
        .into_iter()
        .chain(view.user.as_deref().map(|u| format!("unix:{u}")))
        .collect()
}

/// The approver's decision (payload of [`PAYLOAD_DECISION`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionStatement {
    pub v: u32,
    /// Key id of the approver service's key.
    pub approver_key: String,
    pub host_id: String,
    pub request: u64,
    pub action_hash: String,
    pub decision: Decision,
    /// The answers that made the decision (a quorum of approvals, or the deny that vetoed).
    pub approvals: Vec<Approval>,
    /// RFC 3339.
    pub decided_at: String,
    /// A grant given with the approval (every approval chose it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantStatement>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> RequestView {
        serde_json::from_value(serde_json::json!({
            "id": 7, "kind": "exec", "label": "coder", "pid": 10, "tid": 10, "uid": 1000,
            "user": "alice", "binary": "/usr/bin/curl", "argv": ["curl", "https://x"],
            "argv_truncated": false, "cwd": "/home/alice", "parents": [], "destination": null,
            "protocol": null, "age_ms": 5, "expires_in_ms": 1000, "note": null, "rule": null
        }))
        .unwrap()
    }

    #[test]
    fn the_hash_covers_what_runs_and_ignores_what_changes_while_held() {
        let v = view();
        let h = action_hash("host-a", &v);
        assert_eq!(h.len(), 64);
        let mut aged = v.clone();
        aged.age_ms = 999;
        aged.expires_in_ms = 1;
        assert_eq!(action_hash("host-a", &aged), h);
        let mut other = v.clone();
        other.argv[1] = "https://y".into();
        assert_ne!(action_hash("host-a", &other), h);
        assert_ne!(action_hash("host-b", &v), h);
        let mut next = v;
        next.id = 8;
        assert_ne!(action_hash("host-a", &next), h);
    }

    #[test]
    fn destination_names_are_context_outside_the_hash() {
        let mut v = view();
        v.kind = crate::proto::ActionKind::Connect;
        v.destination = Some("93.184.216.34:443".into());
        v.protocol = Some("tcp".into());
        let h = action_hash("host-a", &v);
        assert_eq!(v.destination_text().unwrap(), "93.184.216.34:443/tcp");
        // A view without the field (an older daemon) reads; one without names writes none.
        assert!(
            !serde_json::to_string(&v)
                .unwrap()
                .contains("destination_names")
        );
        let mut named = v.clone();
        named.destination_names = vec!["api.example.com".into(), "cdn.example.net".into()];
        assert_eq!(
            action_hash("host-a", &named),
            h,
            "the address is what is bound"
        );
        assert_eq!(
            named.destination_text().unwrap(),
            "api.example.com, cdn.example.net (DNS) → 93.184.216.34:443/tcp"
        );
        let back: RequestView =
            serde_json::from_str(&serde_json::to_string(&named).unwrap()).unwrap();
        assert_eq!(back, named);
        let mut elsewhere = v;
        elsewhere.destination = Some("10.0.0.1:443".into());
        assert_ne!(action_hash("host-a", &elsewhere), h);
    }
}
