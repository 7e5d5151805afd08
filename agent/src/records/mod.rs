//! Signed decision records: the evidence an auditor is given.
//!
//! Every record is one [`Record`] (a small versioned schema of our own) serialised as RFC 8785
//! canonical JSON and signed by the host key in a DSSE envelope of type [`PAYLOAD_RECORD`].
//! Records form a hash chain per host and chain id:
//!
//! - `host_id` is the key id of the host key ([`crate::sign::key_id`]);
//! - `chain_id` is random, made when a spool starts a chain (a fresh spool, or a host key that
//!   is not the one that signed the spool's last record);
//! - `seq` starts at 1 and is contiguous within a chain;
//! - `prev` is [`record_hash`] of the previous record's envelope (`None` for seq 1): the
//!   lowercase hex SHA-256 of the envelope's canonical JSON
//!   (`{"payload":…,"payloadType":…,"signatures":[{"keyid":…,"sig":…}]}`), which is exactly
//!   the byte string the spool stores.
//!
//! So a dropped record is a gap in `seq`, an edited one a bad signature, a reordered or
//! replaced one a `prev` that does not match, and two different records with one `seq` a fork.
//!
//! - [`spool`]: the durable local append-only spool the daemon writes before it acts;
//! - [`ship`]: the daemon's task that sends the spool to the collector;
//! - [`verify`]: the offline verifier (`countersign records verify`);
//! - [`bundle`]: the evidence bundle (`countersign records export`);
//! - [`ocsf`]: decisions as OCSF events for SIEMs;
//! - [`rotate`]: host key rotation, crash-safe.
pub mod bundle;
pub mod ocsf;
pub mod rotate;
pub mod ship;
pub mod spool;
pub mod verify;

use serde::{Deserialize, Serialize};

use crate::{
    proto::{ProcInfo, RequestView},
    sign::{self, SignError, dsse::Envelope},
};

/// DSSE payload type of a record (signed by the host key).
pub const PAYLOAD_RECORD: &str = "application/vnd.countersign.record+json";
/// Version of [`Record`].
pub const RECORD_VERSION: u32 = 1;

/// One record (payload of [`PAYLOAD_RECORD`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// [`RECORD_VERSION`].
    pub v: u32,
    /// Key id of the host key that signs this chain (it names the host).
    pub host_id: String,
    /// The host's name, for people.
    pub host_name: String,
    pub chain_id: String,
    /// 1, 2, 3, … within the chain.
    pub seq: u64,
    /// [`record_hash`] of the previous record (`None` for seq 1).
    pub prev: Option<String>,
    /// RFC 3339, UTC, when the record was written.
    pub time: String,
    pub body: Body,
}

/// What a record states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Body {
    /// The daemon started enforcing.
    DaemonStart {
        /// The countersign version.
        version: String,
        /// `lsm` or `fallback`.
        mode: String,
        pid: u32,
    },
    /// The daemon stopped on a signal (after denying what it held); the reason says whether
    /// enforcement stayed.
    DaemonStop { reason: String },
    /// A held request that waits for a human (written before anyone is asked).
    Request(RequestRecord),
    /// A decision about a held request: `approved`, `denied`, `killed` (a human, or the
    /// approver: then `approver_decision` is set), `auto-allowed`, `auto-denied`,
    /// `auto-killed` (a policy rule, named in `by`), `expired-approved`, `expired-denied`,
    /// `expired-killed` (the timeout outcome).
    Decision(DecisionRecord),
    /// What happened afterwards: `exec-verified` (the approved exec is what loaded),
    /// `task-exited` (gone before a decision, or before it could be applied), `superseded`
    /// (the task asked something else), `apply-failed` (the decision could not be written
    /// into the kernel: the task was killed). A decision record states what the daemon is
    /// about to do (it is written first); an outcome record follows when that did not happen.
    Outcome(DecisionRecord),
    /// The approver's decision gave a grant (see `daemon::grants`).
    GrantIssued {
        grant_id: String,
        label: String,
        scope: String,
        expires_at: String,
        by: String,
    },
    /// A grant was revoked (by the approver or on the host).
    GrantRevoked { grant_id: String, by: String },
    /// A policy was loaded (at start and on every successful reload).
    PolicyLoaded {
        /// SHA-256 of the canonical JSON of `files`.
        hash: String,
        files: Vec<PolicyFile>,
    },
    /// The host key changes: this record is signed by the old key; the next one onwards by
    /// the new key, in the same chain.
    KeyRotated {
        new_key_id: String,
        /// SPKI PEM of the new public key.
        new_public_key: String,
    },
    /// A labelled task tried to change, stop, read or step around countersign, and was
    /// refused (see `daemon::guard`).
    Tamper(TamperRecord),
    /// The daemon is alive: silence between heartbeats is provable.
    Heartbeat {
        /// Requests held at the time.
        pending: u64,
        /// Seconds until the next heartbeat.
        interval_secs: u64,
    },
}

impl Body {
    /// The record type as written in `type`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Body::DaemonStart { .. } => "daemon-start",
            Body::DaemonStop { .. } => "daemon-stop",
            Body::Request(_) => "request",
            Body::Decision(_) => "decision",
            Body::Outcome(_) => "outcome",
            Body::GrantIssued { .. } => "grant-issued",
            Body::GrantRevoked { .. } => "grant-revoked",
            Body::PolicyLoaded { .. } => "policy-loaded",
            Body::KeyRotated { .. } => "key-rotated",
            Body::Heartbeat { .. } => "heartbeat",
            Body::Tamper(_) => "tamper",
        }
    }
}

/// A refused attempt of a labelled task on countersign itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TamperRecord {
    /// What was tried: `bpf`, `ptrace`, `signal`, `module`, `mount`, `file-write`,
    /// `file-read`, `file-passed`, `file-gate`, `file-lock`, `sysctl`, `capability`,
    /// `device`, `perf`, `dns`, `tty`, `process`.
    pub attempt: String,
    /// What it was aimed at, as a person reads it (`the daemon (pid 812)`, a file's path).
    pub target: String,
    /// What was done: `eperm` (refused), or `sigkill` too (`on_tamper: kill`).
    pub applied: String,
    /// Who refused: `kernel` (the LSM hooks), `seccomp` (fallback mode's filter), `daemon`.
    pub by: String,
    pub label: String,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub user: Option<String>,
    /// The task's name as the kernel reported it (kept when the process is gone before its
    /// executable and argv could be read).
    pub comm: String,
    pub binary: Option<String>,
    pub argv: Vec<String>,
    pub parents: Vec<ProcInfo>,
    /// Who the agent works for (the policy label's `on_behalf_of`).
    pub on_behalf_of: Option<String>,
}

/// A held request waiting for a human.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRecord {
    pub request: RequestView,
    /// [`sign::statement::action_hash`] of `request` on this host.
    pub action_hash: String,
    /// Who the agent works for (the policy label's `on_behalf_of`).
    pub on_behalf_of: Option<String>,
}

/// A decision or an outcome about one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// See [`Body::Decision`] and [`Body::Outcome`].
    pub decision: String,
    /// What was done to the task: `released`, `eperm`, `sigkill`, `none`.
    pub applied: String,
    /// Who decided: `cli uid=0 pid=123`, `approver`, `policy: …`, `timeout`, `daemon`.
    pub by: String,
    pub request: RequestView,
    /// [`sign::statement::action_hash`] of `request` on this host.
    pub action_hash: String,
    /// Who the agent works for (the policy label's `on_behalf_of`): an approval by them is a
    /// self-approval.
    pub on_behalf_of: Option<String>,
    /// The approver's signed decision ([`sign::statement::DecisionStatement`]), when the
    /// decision came from the approver: the record then proves both statements.
    pub approver_decision: Option<Envelope>,
}

/// One policy file and the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub path: String,
    pub sha256: String,
}

impl Body {
    /// A `policy-loaded` body for `files` (each read now; an unreadable file is hashed as
    /// the error that names it, so the record still says what was attempted).
    #[must_use]
    pub fn policy_loaded(files: &[std::path::PathBuf]) -> Self {
        let files: Vec<PolicyFile> = files
            .iter()
            .map(|p| PolicyFile {
                path: p.display().to_string(),
                sha256: std::fs::read(p).map_or_else(
                    |e| format!("unreadable: {e}"),
                    |bytes| sign::sha256_hex(&bytes),
                ),
            })
            .collect();
        let hash = sign::sha256_hex(&sign::canonical(&files).unwrap_or_default());
        Body::PolicyLoaded { hash, files }
    }
}

/// Why a record cannot be made, stored or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading or writing a spool file failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Signing or canonical JSON failed.
    #[error("signing a record: {0}")]
    Sign(#[from] SignError),
    /// A record does not fit the spool's bounds.
    #[error("record of {0} bytes is larger than the {max} bytes allowed", max = spool::MAX_RECORD_BYTES)]
    TooLarge(usize),
    /// A stored record or cursor is not what it should be.
    #[error("{path}: {message}")]
    Corrupt {
        path: std::path::PathBuf,
        message: String,
    },
}

/// The hash that links records: lowercase hex SHA-256 of the envelope's canonical JSON.
pub fn record_hash(env: &Envelope) -> Result<String, SignError> {
    Ok(sign::sha256_hex(&sign::canonical(env)?))
}

/// Now, RFC 3339 UTC.
#[must_use]
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The host's name (for people; records are identified by `host_id`).
#[must_use]
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// A fresh random chain id (128 bits, hex).
pub fn new_chain_id() -> Result<String, RecordError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| RecordError::Io {
        path: "(random source)".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(sign::hex(&b))
}

/// The record inside `env`, without verifying it (to learn which chain and key it claims).
pub fn peek(env: &Envelope) -> Result<Record, String> {
    let bytes = env.unverified_payload().map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("payload is not a record: {e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn view(id: u64) -> RequestView {
        serde_json::from_value(serde_json::json!({
            "id": id, "kind": "exec", "label": "coder", "pid": 10, "tid": 10, "uid": 1000,
            "user": "alice", "binary": "/usr/bin/curl", "argv": ["curl", "https://x"],
            "argv_truncated": false, "cwd": "/home/alice", "parents": [], "destination": null,
            "protocol": null, "age_ms": 5, "expires_in_ms": 1000, "note": null, "rule": null
        }))
        .unwrap()
    }

    #[test]
    fn bodies_serialise_with_their_type_and_round_trip() {
        let b = Body::Decision(DecisionRecord {
            decision: "approved".into(),
            applied: "released".into(),
            by: "cli uid=0 pid=1".into(),
            request: view(3),
            action_hash: "ab".into(),
            on_behalf_of: Some("alice".into()),
            approver_decision: None,
        });
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["type"], "decision");
        assert_eq!(v["request"]["id"], 3);
        let back: Body = serde_json::from_value(v).unwrap();
        assert_eq!(back, b);
        assert_eq!(b.kind(), "decision");
        let h = Body::Heartbeat {
            pending: 0,
            interval_secs: 60,
        };
        assert_eq!(serde_json::to_value(&h).unwrap()["type"], h.kind());
        // Unknown fields are refused: a record means exactly what its schema says.
        let mut v = serde_json::to_value(&h).unwrap();
        v["extra"] = 1.into();
        assert!(serde_json::from_value::<Body>(v).is_err());
    }

    #[test]
    fn policy_hash_changes_with_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.yaml");
        std::fs::write(&p, "labels: {}\n").unwrap();
        let Body::PolicyLoaded { hash: h1, files } = Body::policy_loaded(std::slice::from_ref(&p))
        else {
            unreachable!()
        };
        assert_eq!(files[0].sha256, sign::sha256_hex(b"labels: {}\n"));
        std::fs::write(&p, "labels: {x: {}}\n").unwrap();
        let Body::PolicyLoaded { hash: h2, .. } = Body::policy_loaded(&[p]) else {
            unreachable!()
        };
        assert_ne!(h1, h2);
    }
}
