//! Grants: an approval that also covers the same label's later actions — the same binary,
//! the same destination, or anything the requesting process tree does — until it expires or
//! is revoked. The approver signs a grant into its decision; the daemon keeps it here and
//! applies it only where the policy would have asked a human (a rule that denies or kills
//! still does). Grants live in the daemon's memory: a restarted daemon has none, so what they
//! covered goes back to a human (fail closed).
use std::{net::IpAddr, time::SystemTime};

use super::enrich::FileId;

/// Most grants held at once (further ones are refused: the approval still applies).
pub const MAX_GRANTS: usize = 4096;

/// What a grant matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// Execs of this file.
    Binary(FileId),
    /// Connects to this address and port with this socket type (0: any).
    Destination {
        addr: IpAddr,
        port: u16,
        sock_type: u16,
    },
    /// Anything done by this process (pid and start time) or its descendants.
    Tree { pid: u32, start: u64 },
}

#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub label: String,
    pub key: Key,
    pub expires: SystemTime,
    /// Who gave it (`bob via slack`).
    pub by: String,
}

/// A held action, as grants see it.
#[derive(Debug, Default)]
pub struct Subject {
    pub binary: Option<FileId>,
    pub destination: Option<(IpAddr, u16, u16)>,
    /// The requesting process and its ancestors: (pid, start time).
    pub lineage: Vec<(u32, u64)>,
}

#[derive(Debug, Default)]
pub struct Grants {
    list: Vec<Grant>,
}

impl Grants {
    /// Keeps `g` (replacing one with the same id); false when full.
    pub fn add(&mut self, g: Grant) -> bool {
        self.list.retain(|x| x.id != g.id);
        if self.list.len() >= MAX_GRANTS {
            return false;
        }
        self.list.push(g);
        true
    }

    /// Removes grant `id`.
    pub fn revoke(&mut self, id: &str) -> Option<Grant> {
        let i = self.list.iter().position(|g| g.id == id)?;
        Some(self.list.remove(i))
    }

    /// Removes and returns the grants expired at `now`.
    pub fn expire(&mut self, now: SystemTime) -> Vec<Grant> {
        let (gone, keep) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|g| g.expires <= now);
        self.list = keep;
        gone
    }

    /// A live grant of `label` that covers `subject`.
    #[must_use]
    pub fn find(&self, label: &str, subject: &Subject, now: SystemTime) -> Option<&Grant> {
        self.list.iter().find(|g| {
            g.label == label
                && g.expires > now
                && match &g.key {
                    Key::Binary(f) => subject.binary == Some(*f),
                    Key::Destination {
                        addr,
                        port,
                        sock_type,
                    } => subject.destination.is_some_and(|(a, p, t)| {
                        a == *addr && p == *port && (*sock_type == 0 || t == *sock_type)
                    }),
                    Key::Tree { pid, start } => subject.lineage.contains(&(*pid, *start)),
                }
        })
    }

    #[must_use]
    pub fn list(&self) -> &[Grant] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn grant(id: &str, key: Key, secs: u64) -> Grant {
        Grant {
            id: id.into(),
            label: "coder".into(),
            key,
            expires: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            by: "bob via api".into(),
        }
    }

    #[test]
    fn a_grant_covers_only_its_label_key_and_time() {
        let mut g = Grants::default();
        let f = FileId { dev: 1, ino: 2 };
        g.add(grant("g-1", Key::Binary(f), 100));
        g.add(grant("g-2", Key::Tree { pid: 10, start: 5 }, 100));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(50);
        let bin = Subject {
            binary: Some(f),
            ..Subject::default()
        };
        assert_eq!(g.find("coder", &bin, at).unwrap().id, "g-1");
        assert!(g.find("other", &bin, at).is_none());
        let other = Subject {
            binary: Some(FileId { dev: 1, ino: 3 }),
            ..Subject::default()
        };
        assert!(g.find("coder", &other, at).is_none());
        // The tree: a descendant of pid 10 that started at 5, not a reused pid 10.
        let child = Subject {
            lineage: vec![(11, 7), (10, 5)],
            ..Subject::default()
        };
        assert_eq!(g.find("coder", &child, at).unwrap().id, "g-2");
        let reused = Subject {
            lineage: vec![(10, 9)],
            ..Subject::default()
        };
        assert!(g.find("coder", &reused, at).is_none());
        // Expiry and revocation.
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert!(g.find("coder", &bin, later).is_none());
        assert!(g.revoke("g-2").is_some());
        assert_eq!(g.expire(later).len(), 1);
        assert!(g.list().is_empty());
    }

    #[test]
    fn destinations_match_address_port_and_protocol() {
        let mut g = Grants::default();
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        g.add(grant(
            "g-3",
            Key::Destination {
                addr,
                port: 443,
                sock_type: 1,
            },
            100,
        ));
        let at = SystemTime::UNIX_EPOCH;
        let s = |port, t| Subject {
            destination: Some((addr, port, t)),
            ..Subject::default()
        };
        assert!(g.find("coder", &s(443, 1), at).is_some());
        assert!(g.find("coder", &s(443, 2), at).is_none());
        assert!(g.find("coder", &s(80, 1), at).is_none());
    }
}
