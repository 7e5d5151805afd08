//! The verifier: given records in their stored order and nothing but public keys, says
//! which records are valid, and names every record that is not and why.
//!
//! Per record: the envelope's type and host-key signature (the key id must be the record's
//! `host_id`, and the key a trusted one, or one a trusted chain handed over to with a
//! `key-rotated` record), the schema version, the action hash of a decision's request, and an
//! embedded approver decision (signed by a trusted approver key, naming the same host,
//! request and action hash, with a matching decision). Per chain (host id, chain id): `seq`
//! goes up by one and `prev` is the hash of the record before; a skipped seq is a gap, two
//! different records with one seq a fork, a seq that comes back down a reordering. Given the
//! heads a chain is known to reach (the spool's receipted cursor, or a bundle's heads), a
//! chain that stops short has lost its tail.
use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::VerifyingKey;

use super::{Body, PAYLOAD_RECORD, RECORD_VERSION, Record, record_hash};
use crate::{
    proto::Decision,
    sign::{
        self,
        dsse::Envelope,
        statement::{DecisionStatement, PAYLOAD_DECISION, action_hash},
    },
};

/// Trusted public keys, by key id.
#[derive(Debug, Default, Clone)]
pub struct Keys {
    pub hosts: HashMap<String, VerifyingKey>,
    pub approvers: HashMap<String, VerifyingKey>,
}

impl Keys {
    pub fn add_host(&mut self, key: VerifyingKey) {
        self.hosts.insert(sign::key_id(&key).0, key);
    }

    pub fn add_approver(&mut self, key: VerifyingKey) {
        self.approvers.insert(sign::key_id(&key).0, key);
    }
}

/// Where a chain is known to have got to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub host_id: String,
    pub chain_id: String,
    /// The last seq the chain is known to reach.
    pub seq: u64,
    /// The first seq the records should start at (a period's first record), if known.
    #[serde(default)]
    pub first: Option<u64>,
}

/// One record that is not valid, or one thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Where it is: `host H chain C seq N`, or the record's place when it cannot be read.
    pub at: String,
    pub why: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.why)
    }
}

/// What verifying found.
#[derive(Debug, Default)]
pub struct Report {
    pub total: usize,
    pub valid: usize,
    pub gaps: usize,
    pub forks: usize,
    pub self_approvals: usize,
    pub failures: Vec<Failure>,
    /// Per chain: (host id, chain id) → (first seq, last seq, records).
    pub chains: BTreeMap<(String, String), (u64, u64, usize)>,
    /// The records that verified, in order, with their hash.
    pub records: Vec<(Record, String)>,
}

impl Report {
    /// `N/M records valid, G gaps, F forks, S self-approvals`.
    #[must_use]
    pub fn summary(&self) -> String {
        format!(
            "{}/{} records valid, {} gaps, {} forks, {} self-approvals",
            self.valid, self.total, self.gaps, self.forks, self.self_approvals
        )
    }

    #[must_use]
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.valid == self.total
    }
}

/// The state of one chain while records are fed in.
#[derive(Debug)]
struct Chain {
    key: VerifyingKey,
    /// The key the next record must be signed by, after a `key-rotated` record.
    next_key: Option<VerifyingKey>,
    first: u64,
    last: u64,
    /// `None` after a record that claimed the next seq but did not verify (already
    /// reported): the record after it cannot be linked, and is not a gap either.
    last_hash: Option<String>,
    /// seq → hash of every record seen.
    seen: HashMap<u64, String>,
    count: usize,
}

/// Verifies records fed in their stored order.
#[derive(Debug)]
pub struct Verifier {
    keys: Keys,
    chains: HashMap<(String, String), Chain>,
    report: Report,
}

impl Verifier {
    #[must_use]
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            chains: HashMap::new(),
            report: Report::default(),
        }
    }

    /// A record that could not even be read (e.g. a damaged frame), at `at`.
    pub fn unreadable(&mut self, at: String, why: String) {
        self.report.total += 1;
        self.report.failures.push(Failure { at, why });
    }

    /// Checks the next record; `place` says where it was read (for records whose own
    /// host/seq cannot be trusted or read).
    pub fn feed(&mut self, env: &Envelope, place: &str) {
        self.report.total += 1;
        let claimed = match super::peek(env) {
            Ok(r) => r,
            Err(why) => {
                self.report.failures.push(Failure {
                    at: place.to_owned(),
                    why,
                });
                return;
            }
        };
        let at = format!(
            "host {} chain {} seq {}",
            claimed.host_id, claimed.chain_id, claimed.seq
        );
        let fail = |report: &mut Report, why: String| {
            report.failures.push(Failure {
                at: at.clone(),
                why,
            });
        };
        let id = (claimed.host_id.clone(), claimed.chain_id.clone());
        // The key: the chain's (or the one it was handed to), else a trusted host key.
        let key = match self.chains.get(&id) {
            Some(c) => c.next_key.unwrap_or(c.key),
            None => match self.keys.hosts.get(&claimed.host_id) {
                Some(k) => *k,
                None => {
                    // A chain handed over by rotation is known under its old host id.
                    match self.chains.iter().find(|((_, chain), c)| {
                        *chain == claimed.chain_id
                            && c.next_key
                                .is_some_and(|k| sign::key_id(&k).0 == claimed.host_id)
                    }) {
                        Some((_, c)) => c.next_key.expect("checked"),
                        None => {
                            fail(
                                &mut self.report,
                                format!(
                                    "signed as host {} but no trusted host key has that id (replaced key?)",
                                    claimed.host_id
                                ),
                            );
                            take_place(&mut self.chains, &claimed);
                            return;
                        }
                    }
                }
            },
        };
        let record: Record = match env.verify_json(PAYLOAD_RECORD, &key) {
            Ok(r) => r,
            Err(e) => {
                fail(&mut self.report, format!("host signature: {e}"));
                take_place(&mut self.chains, &claimed);
                return;
            }
        };
        if record.host_id != sign::key_id(&key).0 {
            fail(
                &mut self.report,
                format!(
                    "host_id {} is not the signing key {}",
                    record.host_id,
                    sign::key_id(&key)
                ),
            );
            take_place(&mut self.chains, &claimed);
            return;
        }
        if record.v != RECORD_VERSION {
            fail(
                &mut self.report,
                format!("record version {} (expected {RECORD_VERSION})", record.v),
            );
            take_place(&mut self.chains, &claimed);
            return;
        }
        let hash = match record_hash(env) {
            Ok(h) => h,
            Err(e) => {
                fail(&mut self.report, e.to_string());
                return;
            }
        };
        // Content checks.
        let (mut problems, self_approval) = check_content(&record, &self.keys.approvers);
        if self_approval {
            self.report.self_approvals += 1;
        }
        // Chain checks.
        let key_for_chain = match &record.body {
            Body::KeyRotated { new_public_key, .. } => {
                match sign::keys::parse_public(new_public_key) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        problems.push(format!("key-rotated: {e}"));
                        None
                    }
                }
            }
            _ => None,
        };
        let chain_key = (record.host_id.clone(), record.chain_id.clone());
        // A rotated chain continues under the new host id: carry its state over.
        let mut chain = self.chains.remove(&chain_key).or_else(|| {
            let old = self
                .chains
                .keys()
                .find(|(_, c)| *c == record.chain_id)
                .cloned();
            old.and_then(|k| self.chains.remove(&k))
        });
        match &mut chain {
            None => {
                if record.seq == 1 && record.prev.is_some() {
                    problems.push("seq 1 has a prev hash".into());
                }
                chain = Some(Chain {
                    key,
                    next_key: key_for_chain,
                    first: record.seq,
                    last: record.seq,
                    last_hash: Some(hash.clone()),
                    seen: HashMap::from([(record.seq, hash.clone())]),
                    count: 1,
                });
            }
            Some(c) => {
                if let Some(h) = c.seen.get(&record.seq) {
                    if *h == hash {
                        problems.push("a second copy of a record already seen".into());
                    } else {
                        self.report.forks += 1;
                        problems.push(format!(
                            "fork: another record with seq {} was seen before",
                            record.seq
                        ));
                    }
                } else if record.seq == c.last + 1 {
                    if let Some(want) = &c.last_hash
                        && record.prev.as_deref() != Some(want.as_str())
                    {
                        problems.push(format!(
                            "prev hash does not match record seq {} (edited, replaced or reordered)",
                            c.last
                        ));
                    }
                } else if record.seq > c.last + 1 {
                    self.report.gaps += 1;
                    problems.push(format!(
                        "gap: seq {} to {} missing before this record",
                        c.last + 1,
                        record.seq - 1
                    ));
                } else {
                    problems.push(format!(
                        "out of order: comes after seq {} in the stored order",
                        c.last
                    ));
                }
                c.key = key;
                c.next_key = key_for_chain;
                c.seen.insert(record.seq, hash.clone());
                if record.seq > c.last {
                    c.last = record.seq;
                    c.last_hash = Some(hash.clone());
                }
                c.count += 1;
            }
        }
        self.chains.insert(chain_key, chain.expect("set above"));
        if problems.is_empty() {
            self.report.valid += 1;
            self.report.records.push((record, hash));
        } else {
            for why in problems {
                fail(&mut self.report, why);
            }
        }
    }

    /// Ends the run: checks that every chain reaches the `heads` it is known to reach.
    #[must_use]
    pub fn finish(mut self, heads: &[Head]) -> Report {
        for h in heads {
            let at = format!("host {} chain {}", h.host_id, h.chain_id);
            let chain = self
                .chains
                .iter()
                .find(|((_, chain), _)| *chain == h.chain_id)
                .map(|(_, c)| c);
            if let (Some(c), Some(first)) = (chain, h.first)
                && c.first > first
            {
                self.report.gaps += 1;
                self.report.failures.push(Failure {
                    at: at.clone(),
                    why: format!(
                        "the records begin at seq {}, the period begins at seq {first}",
                        c.first
                    ),
                });
            }
            let reached = chain.map(|c| c.last);
            match reached {
                Some(last) if last >= h.seq => {}
                Some(last) => {
                    self.report.gaps += 1;
                    self.report.failures.push(Failure {
                        at,
                        why: format!(
                            "truncated: the records end at seq {last}, the chain is known to reach seq {}",
                            h.seq
                        ),
                    });
                }
                None => {
                    self.report.gaps += 1;
                    self.report.failures.push(Failure {
                        at,
                        why: format!("no records, the chain is known to reach seq {}", h.seq),
                    });
                }
            }
        }
        for ((host, chain), c) in &self.chains {
            self.report
                .chains
                .insert((host.clone(), chain.clone()), (c.first, c.last, c.count));
        }
        self.report
    }
}

/// What is wrong with a (signed) record's content: a decision's action hash, and an embedded
/// approver decision (trusted key, same host, request, action and decision). The flag says
/// whether it is a self-approval (an approval by the request's `on_behalf_of`).
#[must_use]
pub fn check_content(
    record: &Record,
    approvers: &HashMap<String, VerifyingKey>,
) -> (Vec<String>, bool) {
    let mut problems = Vec::new();
    let mut self_approval = false;
    if let Body::Decision(d) | Body::Outcome(d) = &record.body {
        let want = action_hash(&record.host_id, &d.request);
        if d.action_hash != want {
            problems.push(format!(
                "action_hash {} is not the hash of the request ({want})",
                d.action_hash
            ));
        }
        if let Some(a) = &d.approver_decision {
            match approver_statement(a, approvers) {
                Err(why) => problems.push(format!("approver decision: {why}")),
                Ok(st) => {
                    problems.extend(statement_mismatch(&st, record, d));
                    let requester = crate::sign::statement::requester_identities(
                        d.on_behalf_of.as_deref(),
                        &d.request,
                    );
                    for ap in st
                        .approvals
                        .iter()
                        .filter(|a| a.decision == Decision::Approve)
                    {
                        let mut theirs = vec![ap.approver.clone(), ap.identity.clone()];
                        theirs.extend(ap.identities.iter().cloned());
                        if let Some((approver_id, requester_id)) =
                            crate::sign::statement::same_person(&theirs, &requester)
                        {
                            self_approval = true;
                            problems.push(format!(
                                "self-approval: {} approved a request made on their behalf ({requester_id} is {approver_id})",
                                ap.approver
                            ));
                        }
                    }
                }
            }
        }
    }
    (problems, self_approval)
}

fn approver_statement(
    env: &Envelope,
    approvers: &HashMap<String, VerifyingKey>,
) -> Result<DecisionStatement, String> {
    let id = env.first_keyid().ok_or("no signature")?;
    let key = approvers
        .get(id)
        .ok_or_else(|| format!("signed by key {id}, which is not a trusted approver key"))?;
    env.verify_json(PAYLOAD_DECISION, key)
        .map_err(|e| e.to_string())
}

/// A record that claims the next seq of a chain but does not verify still takes its place
/// (it is reported itself): the next record is neither a gap nor linked to it.
fn take_place(chains: &mut HashMap<(String, String), Chain>, claimed: &Record) {
    if let Some((_, c)) = chains
        .iter_mut()
        .find(|((_, chain), _)| *chain == claimed.chain_id)
        && claimed.seq == c.last + 1
    {
        c.last = claimed.seq;
        c.last_hash = None;
        c.count += 1;
    }
}

/// What in an approver's statement does not match the record embedding it.
fn statement_mismatch(
    st: &DecisionStatement,
    record: &Record,
    d: &super::DecisionRecord,
) -> Vec<String> {
    let mut out = Vec::new();
    if st.host_id != record.host_id {
        out.push(format!(
            "approver decision names host {}, not {}",
            st.host_id, record.host_id
        ));
    }
    if st.request != d.request.id {
        out.push(format!(
            "approver decision names request {}, not {}",
            st.request, d.request.id
        ));
    }
    if st.action_hash != d.action_hash {
        out.push("approver decision is about another action (action hash differs)".into());
    }
    let word = match st.decision {
        Decision::Approve => "approved",
        Decision::Deny => "denied",
        Decision::Kill => "killed",
    };
    if d.decision != word {
        out.push(format!(
            "approver decided {word}, the record says {}",
            d.decision
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::{
        records::{
            DecisionRecord,
            spool::{self, Spool},
            tests::view,
        },
        sign::statement::{Approval, STATEMENT_VERSION},
    };

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn host() -> SigningKey {
        key(1)
    }

    fn approver() -> SigningKey {
        key(9)
    }

    fn keys() -> Keys {
        let mut k = Keys::default();
        k.add_host(host().verifying_key());
        k.add_approver(approver().verifying_key());
        k
    }

    fn statement(id: u64, who: &str, signer: &SigningKey) -> Envelope {
        statement_with(id, who, &[], signer)
    }

    /// A decision approved by `who`, known to the approver service by `identities`.
    fn statement_with(id: u64, who: &str, identities: &[&str], signer: &SigningKey) -> Envelope {
        let host_id = sign::key_id(&host().verifying_key()).0;
        let st = DecisionStatement {
            grant: None,
            v: STATEMENT_VERSION,
            approver_key: sign::key_id(&signer.verifying_key()).0,
            host_id: host_id.clone(),
            request: id,
            action_hash: action_hash(&host_id, &view(id)),
            decision: Decision::Approve,
            approvals: vec![Approval {
                grant: None,
                approver: who.into(),
                channel: "api".into(),
                identity: format!("token:{who}"),
                decision: Decision::Approve,
                justification: None,
                at: "2026-01-01T00:00:00Z".into(),
                identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            }],
            decided_at: "2026-01-01T00:00:00Z".into(),
        };
        Envelope::sign_json(PAYLOAD_DECISION, &st, signer).unwrap()
    }

    fn approved(id: u64, approver_decision: Option<Envelope>) -> Body {
        approved_for(id, "alice", approver_decision)
    }

    fn approved_for(id: u64, on_behalf_of: &str, approver_decision: Option<Envelope>) -> Body {
        let host_id = sign::key_id(&host().verifying_key()).0;
        Body::Decision(DecisionRecord {
            decision: "approved".into(),
            applied: "released".into(),
            by: "approver".into(),
            request: view(id),
            action_hash: action_hash(&host_id, &view(id)),
            on_behalf_of: Some(on_behalf_of.into()),
            approver_decision,
        })
    }

    /// Five records: start, two approvals by bob through the approver, a local one, a stop.
    /// The envelopes of the spool in `dir`, in order.
    fn spooled(dir: &std::path::Path) -> Vec<Envelope> {
        spool::read(dir)
            .unwrap()
            .records
            .into_iter()
            .map(|s| s.envelope)
            .collect()
    }

    fn spool() -> (tempfile::TempDir, Vec<Envelope>) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), host(), "h").unwrap();
        s.append(Body::DaemonStart {
            version: "0".into(),
            mode: "lsm".into(),
            pid: 1,
        })
        .unwrap();
        s.append(approved(1, Some(statement(1, "bob", &approver()))))
            .unwrap();
        s.append(approved(2, Some(statement(2, "bob", &approver()))))
            .unwrap();
        s.append(approved(3, None)).unwrap();
        s.append(Body::DaemonStop {
            reason: "SIGTERM".into(),
        })
        .unwrap();
        let envs = spooled(dir.path());
        (dir, envs)
    }

    fn run(envs: &[Envelope], heads: &[Head]) -> Report {
        let mut v = Verifier::new(keys());
        for (i, e) in envs.iter().enumerate() {
            v.feed(e, &format!("record {}", i + 1));
        }
        v.finish(heads)
    }

    fn head(envs: &[Envelope]) -> Head {
        let r = super::super::peek(envs.last().unwrap()).unwrap();
        Head {
            host_id: r.host_id,
            chain_id: r.chain_id,
            seq: r.seq,
            first: Some(1),
        }
    }

    fn failures(r: &Report) -> String {
        r.failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Re-signs `env` after `edit` changed its record (as someone holding `signer` could).
    fn resign(env: &Envelope, signer: &SigningKey, edit: impl FnOnce(&mut Record)) -> Envelope {
        let mut r = super::super::peek(env).unwrap();
        edit(&mut r);
        Envelope::sign_json(PAYLOAD_RECORD, &r, signer).unwrap()
    }

    #[test]
    fn an_untouched_spool_is_valid() {
        let (_d, envs) = spool();
        let r = run(&envs, &[head(&envs)]);
        assert!(r.ok(), "{}", failures(&r));
        assert_eq!(
            r.summary(),
            "5/5 records valid, 0 gaps, 0 forks, 0 self-approvals"
        );
        assert_eq!(r.chains.values().next(), Some(&(1, 5, 5)));
    }

    #[test]
    fn an_edited_field_is_named() {
        let (_d, mut envs) = spool();
        // Change the argv inside the third record without re-signing.
        let mut payload = envs[2].unverified_payload().unwrap();
        let text = String::from_utf8(payload.clone()).unwrap();
        payload = text.replacen("https://x", "https://evil", 1).into_bytes();
        use base64::Engine as _;
        envs[2].payload = base64::engine::general_purpose::STANDARD.encode(payload);
        let r = run(&envs, &[head(&envs)]);
        assert!(!r.ok());
        assert_eq!(r.valid, 4);
        let f = failures(&r);
        assert!(f.contains("seq 3: host signature"), "{f}");
    }

    #[test]
    fn a_removed_record_is_a_gap() {
        let (_d, mut envs) = spool();
        envs.remove(2);
        let r = run(&envs, &[]);
        assert_eq!(r.gaps, 1, "{}", failures(&r));
        assert!(failures(&r).contains("seq 4: gap: seq 3 to 3 missing"));
        assert!(r.summary().starts_with("3/4 records valid, 1 gaps"));
    }

    #[test]
    fn reordered_records_are_named() {
        let (_d, mut envs) = spool();
        envs.swap(2, 3);
        let r = run(&envs, &[]);
        let f = failures(&r);
        assert!(!r.ok());
        assert!(f.contains("seq 4: gap"), "{f}");
        assert!(f.contains("seq 3: out of order"), "{f}");
    }

    #[test]
    fn a_truncated_tail_is_found_against_the_known_head() {
        let (_d, mut envs) = spool();
        let known = head(&envs);
        envs.truncate(3);
        let r = run(&envs, &[known]);
        assert_eq!(r.gaps, 1);
        let f = failures(&r);
        assert!(
            f.contains("truncated: the records end at seq 3, the chain is known to reach seq 5"),
            "{f}"
        );
    }

    #[test]
    fn a_replaced_key_is_refused() {
        let (_d, mut envs) = spool();
        // Everything re-signed by another key (which names itself as the host).
        let other = key(7);
        let other_id = sign::key_id(&other.verifying_key()).0;
        envs[1] = resign(&envs[1], &other, |r| r.host_id.clone_from(&other_id));
        // Or signed by another key under the real host id.
        envs[3] = resign(&envs[3], &other, |_| {});
        let r = run(&envs, &[]);
        let f = failures(&r);
        assert!(
            f.contains("no trusted host key has that id (replaced key?)"),
            "{f}"
        );
        assert!(f.contains("seq 4: host signature"), "{f}");
        assert_eq!(r.valid, 3, "{f}");
        assert_eq!(r.gaps, 0, "an invalid record is not also a gap: {f}");
    }

    #[test]
    fn a_re_signed_edit_breaks_the_chain_and_a_second_version_is_a_fork() {
        let (_d, envs) = spool();
        // Even with the host key, an edit changes the hash the next record links to.
        let mut edited = envs.clone();
        edited[2] = resign(&envs[2], &host(), |r| {
            r.time = "2020-01-01T00:00:00Z".into()
        });
        let r = run(&edited, &[]);
        assert!(
            failures(&r).contains("seq 4: prev hash does not match record seq 3"),
            "{}",
            failures(&r)
        );
        // Both versions present: a fork.
        let mut both = envs.clone();
        both.insert(3, edited[2].clone());
        let r = run(&both, &[]);
        assert_eq!(r.forks, 1, "{}", failures(&r));
    }

    #[test]
    fn a_forged_or_mismatched_approver_decision_is_named() {
        let (_d, envs) = spool();
        // A decision signed by a key that is not a trusted approver's.
        let forged = resign(&envs[1], &host(), |r| {
            r.body = approved(1, Some(statement(1, "bob", &key(8))));
        });
        // A trusted decision about another request.
        let other = resign(&envs[2], &host(), |r| {
            r.body = approved(2, Some(statement(1, "bob", &approver())));
        });
        let mut v = Verifier::new(keys());
        v.feed(&forged, "a");
        v.feed(&other, "b");
        let r = v.finish(&[]);
        let f = failures(&r);
        assert!(f.contains("not a trusted approver key"), "{f}");
        assert!(
            f.contains("approver decision names request 1, not 2"),
            "{f}"
        );
    }

    #[test]
    fn a_self_approval_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), host(), "h").unwrap();
        s.append(approved(1, Some(statement(1, "alice", &approver()))))
            .unwrap();
        let envs = spooled(dir.path());
        let r = run(&envs, &[]);
        assert_eq!(r.self_approvals, 1);
        assert!(failures(&r).contains("self-approval: alice approved"));
        assert_eq!(
            r.summary(),
            "0/1 records valid, 0 gaps, 0 forks, 1 self-approvals"
        );
    }

    #[test]
    fn a_self_approval_under_any_identity_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), host(), "h").unwrap();
        // Known to the approver as robert, with bob's address among his identities.
        s.append(approved_for(
            1,
            "bob@example.com",
            Some(statement_with(
                1,
                "robert",
                &["robert", "okta:00urob", "bob@example.com"],
                &approver(),
            )),
        ))
        .unwrap();
        // An entry without the email: the address's local part is the approver's name.
        s.append(approved_for(
            2,
            "bob@example.com",
            Some(statement(2, "bob", &approver())),
        ))
        .unwrap();
        // Somebody else entirely.
        s.append(approved_for(
            3,
            "bob@example.com",
            Some(statement_with(
                3,
                "carol",
                &["carol", "carol@example.com"],
                &approver(),
            )),
        ))
        .unwrap();
        let envs = spooled(dir.path());
        let r = run(&envs, &[]);
        assert_eq!(r.self_approvals, 2, "{}", failures(&r));
        assert!(
            failures(&r).contains("robert approved a request made on their behalf (bob@example.com is bob@example.com)"),
            "{}",
            failures(&r)
        );
        assert!(failures(&r).contains("self-approval: bob approved"));
    }

    #[test]
    fn a_rotated_key_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), host(), "h").unwrap();
        s.append(Body::DaemonStop { reason: "x".into() }).unwrap();
        s.rotate(key(5)).unwrap();
        s.append(Body::DaemonStop { reason: "y".into() }).unwrap();
        let envs = spooled(dir.path());
        // Only the first key is trusted: the rotation record vouches for the second.
        let r = run(&envs, &[]);
        assert!(r.ok(), "{}", failures(&r));
        assert_eq!(r.valid, 3);
    }
}
