//! The daemon's local protocol: one JSON request line, one JSON response line, over the
//! Unix sockets in the socket directory. The CLI and the daemon share these types.
use serde::{Deserialize, Serialize};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Mode, reason, counters.
    Status,
    /// The held requests with their context, in id order: those [`ListFilter`] selects, at
    /// most [`MAX_LIST_PAGE`] (or `limit`) after the id `after`.
    List {
        #[serde(default, flatten)]
        filter: ListFilter,
    },
    /// Decide a held request.
    Decide { id: u64, decision: Decision },
    /// Label the calling process (used by `countersign exec`).
    Label { label: String },
    /// Fallback mode: take the seccomp listener `fd` of the calling (labelled) process, whose
    /// filter sends its `execve`s to the daemon before they start (used by `countersign
    /// exec` when [`Response::Labelled`] asks for it).
    ExecNotifier { fd: i32 },
    /// The grants in force.
    Grants,
    /// Take a grant back (root, not from a labelled process).
    RevokeGrant { id: String },
    /// Rotate the host key (a `key-rotated` record signed by the old key).
    RotateKey,
}

/// Most requests in one [`Response::List`]: an answer stays bounded with thousands held (the
/// CLI asks page after page).
pub const MAX_LIST_PAGE: u32 = 1_000;

/// Which held requests a [`Request::List`] asks for (every condition given must hold).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// An [`ActionKind`]'s wire name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Only requests with a larger id (the next page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// At most this many (capped at [`MAX_LIST_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl ListFilter {
    #[must_use]
    pub fn selects(&self, r: &RequestView) -> bool {
        self.label.as_ref().is_none_or(|l| *l == r.label)
            && self.kind.as_ref().is_none_or(|k| k == r.kind.as_str())
            && self.pid.is_none_or(|p| p == r.pid)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Let exactly the held action run.
    Approve,
    /// The held syscall fails with EPERM (for an exec held after loading: the task is killed).
    Deny,
    /// The task is killed with SIGKILL.
    Kill,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
            Decision::Kill => "kill",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusInfo>),
    List {
        requests: Vec<RequestView>,
        /// More requests were selected than this answer holds (ask again `after` the last).
        #[serde(default)]
        more: bool,
    },
    Decided {
        id: u64,
        outcome: String,
    },
    Labelled {
        label: String,
        pid: u32,
        /// The daemon decides this process's execs before they start once it has its seccomp
        /// listener ([`Request::ExecNotifier`]): fallback mode, where the kernel can only
        /// hold an exec after the new image is loaded.
        #[serde(default)]
        notify_execs: bool,
    },
    /// The listener was taken: from now on the process's execs wait for the daemon.
    NotifierTaken {
        pid: u32,
    },
    Grants {
        grants: Vec<GrantView>,
    },
    Revoked {
        id: String,
    },
    KeyRotated {
        old: String,
        new: String,
        seq: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    /// `lsm` or `fallback`.
    pub mode: String,
    /// Why this mode was chosen.
    pub reason: String,
    /// Where the LSM programs run in LSM mode: `bpf-lsm` (BPF LSM's hooks) or
    /// `security-functions` (the kernel's `security_*` functions, where BPF LSM is built in
    /// but not enabled); absent in fallback mode.
    #[serde(default)]
    pub hooks: Option<String>,
    pub daemon_pid: u32,
    /// The key id of the host key: names this host in escalations and records.
    #[serde(default)]
    pub host_id: String,
    pub uptime_secs: u64,
    pub pending: usize,
    /// Held requests taken over from an earlier daemon (stopped with `on_stop: keep`, or killed).
    pub adopted: usize,
    /// Label names known to the daemon.
    pub labels: Vec<String>,
    pub cgroup_labels: usize,
    pub request_timeout_secs: u64,
    /// Policy files loaded and their rules.
    pub policy_files: usize,
    pub policy_rules: usize,
    /// Why the last policy reload failed (the policy in force stays), if it did.
    pub policy_reload_error: Option<String>,
    /// Why the last signed record could not be written (new requests are refused), if so.
    #[serde(default)]
    pub records_error: Option<String>,
    /// The seq of the last record written in this host's chain.
    #[serde(default)]
    pub records_written: u64,
    /// The seq of the last record of this chain the collector receipted (`None`: none yet,
    /// or no collector).
    #[serde(default)]
    pub records_receipted: Option<u64>,
    /// Bytes of spool segments (receipted segments are removed).
    #[serde(default)]
    pub spool_bytes: u64,
    /// The configured alarm threshold (`spool_alarm_bytes`).
    #[serde(default)]
    pub spool_alarm_bytes: u64,
    pub timeout_action: String,
    pub holds: u64,
    /// Connects the policy allowed in the kernel (never stopped).
    pub fast_allowed: u64,
    /// Execs the policy allowed in the kernel (never stopped).
    #[serde(default)]
    pub fast_allowed_execs: u64,
    /// Execs and connects a grant allowed in the kernel (never stopped).
    #[serde(default)]
    pub grant_allowed: u64,
    /// Datagrams answered in the kernel by a decision their process already consumed.
    #[serde(default)]
    pub send_decided: u64,
    /// Actions refused in the kernel because they were made where they cannot be held
    /// (io_uring threads and submissions, 32-bit system calls in fallback mode).
    #[serde(default)]
    pub unholdable_refused: u64,
    /// Held requests the kernel's event ring had no room for (a burst): still held, taken
    /// by the daemon from the kernel's task table.
    #[serde(default)]
    pub events_deferred: u64,
    /// The most requests held at once (`max_held_requests`).
    #[serde(default)]
    pub max_held_requests: usize,
    /// Requests refused because that many were held already (recorded, reason given).
    #[serde(default)]
    pub refused_over_bound: u64,
    pub events_dropped: u64,
    pub label_inherit_failed: u64,
    /// Fallback mode: how a launched agent's execs are held — `before` they start (the
    /// seccomp notifier) or `after` loading (a stop), with why not before.
    #[serde(default)]
    pub exec_hold: Option<String>,
    /// Fallback mode: what the kernel sees of local sockets (whether the cgroup programs of
    /// local sockets, Linux 6.7+, are attached).
    #[serde(default)]
    pub local_sockets: Option<String>,
    /// Fallback mode: what becomes of a labelled listen on the network made without
    /// `listen(2)` (io_uring, the 32-bit entry): killed where kprobes work, else not seen.
    #[serde(default)]
    pub other_listens: Option<String>,
    /// Fallback mode: the cgroup programs of local sockets are attached (they refuse what
    /// fallback mode cannot tell apart; see `local_sockets`).
    #[serde(default)]
    pub local_socket_programs: bool,
    /// Fallback mode: threads whose exec is held after loading (or was just let go) and
    /// whose first page fault the kernel still checks; `None` where it cannot (see
    /// `exec_hold`).
    #[serde(default)]
    pub loaded_exec_watched: Option<u64>,
    /// Launched agents whose execs the daemon decides before they start.
    #[serde(default)]
    pub exec_notifiers: usize,
    /// Whether labelled tasks, root included, are kept from changing, stopping, reading or
    /// stepping around countersign.
    #[serde(default)]
    pub self_protection: Option<SelfProtection>,
    /// The remote approver, if one is configured.
    #[serde(default)]
    pub approver: Option<ApproverStatus>,
    /// Destination names from DNS answers (`None`: `dns.enabled: false`).
    #[serde(default)]
    pub dns: Option<DnsStatus>,
}

/// Self-protection: is a labelled root contained, and what was refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfProtection {
    /// A labelled task, whatever its uid, cannot change, stop, read or step around
    /// countersign (LSM mode with every guard hook attached).
    pub contained: bool,
    /// Why not.
    pub reason: Option<String>,
    /// `deny` or `kill`.
    pub on_tamper: String,
    /// countersign's files and the directories on the way to them, as given to the kernel.
    pub protected_files: usize,
    /// The places the system starts programs from later (`run_later`) guarded, and the
    /// directories directly inside them.
    #[serde(default)]
    pub run_later_guarded: usize,
    /// The daemon's memory is locked (never in swap) and not dumpable (no core file).
    #[serde(default)]
    pub memory_locked: bool,
    /// Attempts refused since the daemon started, by kind (`bpf`, `ptrace`, ...).
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// What the daemon learns from DNS answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Why the DNS capture could not be attached (names are then unknown).
    pub error: Option<String>,
    /// The resolvers whose answers count.
    pub resolvers: Vec<String>,
    /// Addresses with names now.
    pub addresses: usize,
    /// Answers read from trusted resolvers, and ignored ones from other servers.
    pub answers: u64,
    pub untrusted: u64,
    /// Answers from a trusted resolver to no query this host sent (ignored).
    #[serde(default)]
    pub unsolicited: u64,
    /// DNS packets the kernel could not queue for the daemon (names may be missing).
    #[serde(default)]
    pub dropped: u64,
    /// Which kernel programs capture DNS (`None`: none could be attached).
    #[serde(default)]
    pub capture: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApproverStatus {
    pub url: String,
    /// Enrolled and its key pinned.
    pub enrolled: bool,
    /// The last failure talking to it (cleared by enrollment; kept until the next failure).
    pub last_error: Option<String>,
    /// Escalations delivered and decisions received since the start.
    pub sent: u64,
    pub received: u64,
}

/// A grant in force on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantView {
    pub id: String,
    pub label: String,
    /// `binary dev:ino`, `destination ADDR:PORT`, `tree PID`.
    pub covers: String,
    /// RFC 3339.
    pub expires: String,
    pub by: String,
    /// Answered in the kernel (no stop); false: by the daemon.
    #[serde(default)]
    pub in_kernel: bool,
}

/// One parent in a request's process chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

/// What a held action is: one type from the kernel's events to the records, the approver's
/// channels and OCSF. On the wire it is the kebab-case name (`exec`, `exec-loaded`,
/// `connect`, `send`, `socket`), so records and escalations read as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// An exec held before the new image loads (LSM mode); deny is `EPERM`.
    Exec,
    /// An exec held after its image loaded, before its first instruction; deny kills.
    ExecLoaded,
    /// An outbound `connect`.
    Connect,
    /// A datagram (or TCP Fast Open) send to a destination not yet decided for the process.
    Send,
    /// Creating a raw, packet, ICMP or other socket that is not ordinary TCP/UDP/local.
    Socket,
    /// A connect or datagram to a local (`AF_UNIX`) socket the policy names.
    Unix,
    /// A TCP socket listening on an address other than loopback (peers may connect in).
    Listen,
}

impl ActionKind {
    /// The action a kernel event or task state of `KIND_*` `kind` holds (`None`: not a hold).
    #[must_use]
    pub fn from_kernel(kind: u32) -> Option<Self> {
        use countersign_ebpf as k;
        Some(match kind {
            k::KIND_EXEC => Self::Exec,
            k::KIND_EXEC_LOADED => Self::ExecLoaded,
            k::KIND_CONNECT => Self::Connect,
            k::KIND_SEND => Self::Send,
            k::KIND_SOCKET => Self::Socket,
            k::KIND_UNIX => Self::Unix,
            k::KIND_LISTEN => Self::Listen,
            _ => return None,
        })
    }

    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::ExecLoaded => "exec-loaded",
            Self::Connect => "connect",
            Self::Send => "send",
            Self::Socket => "socket",
            Self::Unix => "unix",
            Self::Listen => "listen",
        }
    }

    /// Runs a program (a binary grant can cover it).
    #[must_use]
    pub fn is_exec(self) -> bool {
        matches!(self, Self::Exec | Self::ExecLoaded)
    }

    /// Reaches a network destination (connect rules and destination grants apply).
    #[must_use]
    pub fn has_destination(self) -> bool {
        matches!(self, Self::Connect | Self::Send)
    }

    /// What a person reads: `run ...`, `connect to ...`.
    #[must_use]
    pub fn verb(self) -> &'static str {
        match self {
            Self::Exec | Self::ExecLoaded => "run",
            Self::Connect => "connect to",
            Self::Send => "send to",
            Self::Socket => "open a socket:",
            Self::Unix => "talk to the local service at",
            Self::Listen => "accept connections from the network on",
        }
    }
}

impl std::fmt::Display for ActionKind {
    /// The wire name; honours width and alignment (`{:<11}` in `requests list`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A held request as the approver sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestView {
    pub id: u64,
    pub kind: ActionKind,
    pub label: String,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub user: Option<String>,
    pub binary: Option<String>,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
    pub cwd: Option<String>,
    pub parents: Vec<ProcInfo>,
    /// `address:port` for connects.
    pub destination: Option<String>,
    /// `tcp`, `udp` or the socket type number.
    pub protocol: Option<String>,
    /// For sockets: `family/type protocol N` (`packet/raw protocol 768`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// For connects: the names the host's resolvers gave for the destination address (most
    /// recent first), learnt from their DNS answers. Context only: not part of the action
    /// hash (the address is what is enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_names: Vec<String>,
    pub age_ms: u64,
    pub expires_in_ms: u64,
    /// Extra facts, e.g. that this exec replaced an approved one.
    pub note: Option<String>,
    /// The policy rule that decided or escalated it (`None`: no policy for its label).
    #[serde(default)]
    pub rule: Option<String>,
}

impl RequestView {
    /// What the request asks, in a few words: `connect to …`, `send to …`, `open a socket:
    /// …`, `run …`.
    #[must_use]
    pub fn what(&self) -> String {
        let object = if self.kind.is_exec() {
            crate::cli::requests::quote_argv(&self.argv)
        } else {
            self.destination_text().unwrap_or_else(|| "?".into())
        };
        format!("{} {object}", self.kind.verb())
    }

    /// A connect's or send's destination as every channel shows it:
    /// `api.example.com (DNS) → 93.184.216.34:443/tcp`, or `93.184.216.34:443/tcp` when no
    /// name was learnt; a socket action's socket (`socket packet/raw protocol 768`). `None`
    /// for execs.
    #[must_use]
    pub fn destination_text(&self) -> Option<String> {
        if let Some(s) = &self.socket {
            return Some(format!("socket {s}"));
        }
        let d = self.destination.as_deref()?;
        let proto = self
            .protocol
            .as_deref()
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        Some(if self.destination_names.is_empty() {
            format!("{d}{proto}")
        } else {
            format!("{} (DNS) → {d}{proto}", self.destination_names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ActionKind, ListFilter, Request};

    /// A list request without conditions is the bare `{"op":"list"}`; conditions and paging
    /// read back; an unknown field is refused.
    #[test]
    fn list_requests_carry_their_filter() {
        let bare = Request::List {
            filter: ListFilter::default(),
        };
        assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"op":"list"}"#);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            bare
        );
        let paged: Request =
            serde_json::from_str(r#"{"op":"list","label":"coder","after":7,"limit":50}"#).unwrap();
        assert_eq!(
            paged,
            Request::List {
                filter: ListFilter {
                    label: Some("coder".into()),
                    after: Some(7),
                    limit: Some(50),
                    ..ListFilter::default()
                }
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"list","lables":"x"}"#).is_err());
    }

    /// The wire names are what records, escalations and OCSF carry: they must not change.
    #[test]
    fn action_kinds_keep_their_wire_names() {
        use countersign_ebpf as k;
        for (kernel, kind, name) in [
            (k::KIND_EXEC, ActionKind::Exec, "exec"),
            (k::KIND_EXEC_LOADED, ActionKind::ExecLoaded, "exec-loaded"),
            (k::KIND_CONNECT, ActionKind::Connect, "connect"),
            (k::KIND_SEND, ActionKind::Send, "send"),
            (k::KIND_SOCKET, ActionKind::Socket, "socket"),
            (k::KIND_UNIX, ActionKind::Unix, "unix"),
            (k::KIND_LISTEN, ActionKind::Listen, "listen"),
        ] {
            assert_eq!(ActionKind::from_kernel(kernel), Some(kind));
            assert_eq!(kind.as_str(), name);
            assert_eq!(serde_json::to_value(kind).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<ActionKind>(name.into()).unwrap(),
                kind
            );
        }
        assert_eq!(ActionKind::from_kernel(k::KIND_ERROR), None);
        assert!(ActionKind::Send.has_destination() && !ActionKind::Socket.has_destination());
        assert_eq!(format!("[{:<7}]", ActionKind::Send), "[send   ]");
    }
}
