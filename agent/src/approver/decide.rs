//! Who may answer a request and when the answers make a decision: group membership,
//! separation of duties, justification, quorum with any deny as a veto. Pure logic: the store
//! calls it inside the transaction that records the answer, so every replica agrees.
use crate::{approver::config::ApproverConfig, proto::Decision};

/// What an escalation asks for (from the policy rule), as stored with the request.
#[derive(Debug, Clone)]
pub struct Ask {
    /// Groups that may answer (empty: the default group, else every approver).
    pub groups: Vec<String>,
    pub quorum: u32,
    /// Approvals must include one from each of `groups`.
    pub each_group: bool,
    pub justification: bool,
    /// The identities of the human behind the request (who the agent works for, the Unix
    /// user it runs as): none of them may approve it.
    pub requester: Vec<String>,
}

/// One answer already given.
#[derive(Debug, Clone)]
pub struct Answer {
    pub approver: String,
    pub decision: Decision,
}

/// What a new answer does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not counted, and why (shown to the person).
    Refused(String),
    /// The same person answered already (a double click, a retried delivery): nothing changes.
    Duplicate,
    /// Counted; `have` of `need` approvals.
    Counted { have: u32, need: u32 },
    /// The request is decided by this answer.
    Decided(Decision),
}

/// Whether `approver` may answer `ask` at all.
pub fn may_answer(config: &ApproverConfig, ask: &Ask, approver: &str) -> Result<(), String> {
    let Some(person) = config.by_name(approver) else {
        return Err(format!("{approver} is not a configured approver"));
    };
    if let Some((mine, theirs)) =
        crate::sign::statement::same_person(&person.all_identities(), &ask.requester)
    {
        return Err(format!(
            "{approver} is the person this agent works for ({theirs} is {mine}) and cannot approve its actions"
        ));
    }
    let groups: Vec<&str> = if ask.groups.is_empty() {
        config.default_group.iter().map(String::as_str).collect()
    } else {
        ask.groups.iter().map(String::as_str).collect()
    };
    if groups.is_empty() {
        // No group named anywhere: every configured approver may answer.
        return Ok(());
    }
    if config.groups_of(approver).any(|g| groups.contains(&g)) {
        Ok(())
    } else {
        Err(format!(
            "{approver} is not in the group(s) asked: {}",
            groups.join(", ")
        ))
    }
}

/// Applies one more answer to the ones given so far.
pub fn answer(
    config: &ApproverConfig,
    ask: &Ask,
    given: &[Answer],
    approver: &str,
    decision: Decision,
    justification: Option<&str>,
) -> Outcome {
    if let Err(why) = may_answer(config, ask, approver) {
        return Outcome::Refused(why);
    }
    if given.iter().any(|a| a.approver == approver) {
        return Outcome::Duplicate;
    }
    if ask.justification && justification.is_none_or(|j| j.trim().is_empty()) {
        return Outcome::Refused("this request needs a reason with the answer".into());
    }
    match decision {
        // Any deny or kill is a veto.
        Decision::Deny | Decision::Kill => Outcome::Decided(decision),
        Decision::Approve => {
            let approvers: Vec<&str> = given
                .iter()
                .filter(|a| a.decision == Decision::Approve)
                .map(|a| a.approver.as_str())
                .chain(std::iter::once(approver))
                .collect();
            let mut need = ask.quorum.max(1);
            let have = approvers.len() as u32;
            let mut groups_ok = true;
            if ask.each_group && !ask.groups.is_empty() {
                need = need.max(ask.groups.len() as u32);
                groups_ok = ask.groups.iter().all(|g| {
                    approvers
                        .iter()
                        .any(|a| config.groups_of(a).any(|x| x == g))
                });
            }
            if have >= need && groups_ok {
                Outcome::Decided(Decision::Approve)
            } else {
                Outcome::Counted {
                    have,
                    need: need.max(have + 1),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ApproverConfig {
        serde_yaml::from_str(
            "approvers:\n  - {name: alice, email: alice@example.com}\n  - {name: bob}\n  - {name: carol}\n  - {name: dave}\ngroups:\n  dev: [alice, bob, carol]\n  ops: [dave]\n",
        )
        .unwrap()
    }

    fn ask(quorum: u32) -> Ask {
        Ask {
            groups: vec!["dev".into()],
            quorum,
            each_group: false,
            justification: false,
            requester: vec!["alice@example.com".into()],
        }
    }

    #[test]
    fn one_from_each_group() {
        let c = config();
        let a = Ask {
            groups: vec!["dev".into(), "ops".into()],
            quorum: 1,
            each_group: true,
            justification: false,
            requester: Vec::new(),
        };
        let bob = Answer {
            approver: "bob".into(),
            decision: Decision::Approve,
        };
        // Two from dev do not make the quorum: ops has not approved.
        assert!(matches!(
            answer(
                &c,
                &a,
                std::slice::from_ref(&bob),
                "carol",
                Decision::Approve,
                None
            ),
            Outcome::Counted { have: 2, .. }
        ));
        assert_eq!(
            answer(&c, &a, &[bob], "dave", Decision::Approve, None),
            Outcome::Decided(Decision::Approve)
        );
    }

    #[test]
    fn the_owner_cannot_approve_their_agent() {
        let o = answer(&config(), &ask(1), &[], "alice", Decision::Approve, None);
        assert!(
            matches!(o, Outcome::Refused(ref m) if m.contains("works for")),
            "{o:?}"
        );
    }

    #[test]
    fn the_owner_is_known_by_every_identity() {
        let c: ApproverConfig = serde_yaml::from_str(
            "approvers:\n  - {name: bob}\n  - name: carol\n    slack: {team: T1, user: UCAROL}\n    identities: [okta:00ucarol, unix:cjones]\n  - {name: dave, email: dave@example.com}\ngroups:\n  dev: [bob, carol, dave]\n",
        )
        .unwrap();
        let refused = |requester: &[&str], who: &str| {
            let a = Ask {
                requester: requester.iter().map(|s| (*s).to_owned()).collect(),
                ..ask(1)
            };
            matches!(
                answer(&c, &a, &[], who, Decision::Approve, None),
                Outcome::Refused(_)
            )
        };
        // bob's entry has no email: a request on behalf of bob's address is still his.
        assert!(refused(&["bob@example.com"], "bob"));
        assert!(refused(&["BOB"], "bob"));
        // carol by her identity provider subject, her Slack id, or the Unix user she runs as.
        assert!(refused(&["okta:00ucarol"], "carol"));
        assert!(refused(&["slack:T1/UCAROL"], "carol"));
        assert!(refused(&["someone@example.com", "unix:cjones"], "carol"));
        // dave by his email's local part as a plain name.
        assert!(refused(&["unix:dave"], "dave"));
        // Other people are not refused.
        assert!(!refused(&["alice@example.com", "unix:alice"], "bob"));
        assert!(!refused(&["okta:00ualice"], "carol"));
    }

    #[test]
    fn outside_the_group_is_refused() {
        let o = answer(&config(), &ask(1), &[], "dave", Decision::Approve, None);
        assert!(
            matches!(o, Outcome::Refused(ref m) if m.contains("not in the group")),
            "{o:?}"
        );
        let o = answer(&config(), &ask(1), &[], "mallory", Decision::Approve, None);
        assert!(matches!(o, Outcome::Refused(_)), "{o:?}");
    }

    #[test]
    fn quorum_of_two_needs_two_people() {
        let c = config();
        let a = ask(2);
        assert_eq!(
            answer(&c, &a, &[], "bob", Decision::Approve, None),
            Outcome::Counted { have: 1, need: 2 }
        );
        let given = [Answer {
            approver: "bob".into(),
            decision: Decision::Approve,
        }];
        // A double click counts once.
        assert_eq!(
            answer(&c, &a, &given, "bob", Decision::Approve, None),
            Outcome::Duplicate
        );
        assert_eq!(
            answer(&c, &a, &given, "carol", Decision::Approve, None),
            Outcome::Decided(Decision::Approve)
        );
    }

    #[test]
    fn any_deny_is_a_veto() {
        let given = [Answer {
            approver: "bob".into(),
            decision: Decision::Approve,
        }];
        assert_eq!(
            answer(&config(), &ask(3), &given, "carol", Decision::Deny, None),
            Outcome::Decided(Decision::Deny)
        );
    }

    #[test]
    fn a_required_reason_must_be_given() {
        let mut a = ask(1);
        a.justification = true;
        assert!(matches!(
            answer(&config(), &a, &[], "bob", Decision::Approve, Some("  ")),
            Outcome::Refused(_)
        ));
        assert_eq!(
            answer(
                &config(),
                &a,
                &[],
                "bob",
                Decision::Approve,
                Some("release")
            ),
            Outcome::Decided(Decision::Approve)
        );
    }
}
