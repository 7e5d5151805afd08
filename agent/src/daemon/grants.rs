//! Grants: an approval that also covers the same label's later actions — the same binary,
//! the same destination, or anything the requesting process tree does — until it expires or
//! is revoked. The approver signs a grant into its decision; the daemon keeps it here and
//! applies it only where the policy would have asked a human (a rule that denies or kills
//! still does). Grants live in the daemon's memory: a restarted daemon has none, so what they
//! covered goes back to a human (fail closed).
//!
//! Binary and destination grants are also written into the kernel ([`Grants::kernel_entries`])
//! where the kernel's answer is the policy's (see `policy::compile::grant_in_kernel`): the
//! actions they cover then run without a stop and without an event. Those entries carry the
//! grant's expiry in `CLOCK_BOOTTIME` ([`boot_expiry`]), so an entry the daemon failed to
//! delete still ends on time. Tree and once grants stay in the daemon.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

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

/// How the kernel would recognise what a grant covers, where it can: known when the grant is
/// issued (from the held task), checked against the policy whenever entries are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKey {
    /// A file by the kernel's device number (`ebpf::kernel_dev`) and inode; only for files
    /// whose `stat` numbers are the kernel's, and not for scripts (the kernel checks a
    /// script and then its interpreter).
    Exec { dev: u64, ino: u64 },
    /// A destination: `AF_INET`/`AF_INET6`, address as in the kernel's events, port, and
    /// socket type (0: any, 1: stream, 2: datagram).
    Connect {
        family: u16,
        addr: [u8; 16],
        port: u16,
        sock_type: u16,
    },
}

#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub label: String,
    /// The kernel's id of `label`.
    pub label_id: u32,
    pub key: Key,
    pub expires: SystemTime,
    /// Who gave it (`bob via slack`).
    pub by: String,
    /// `None`: the kernel cannot recognise what it covers; the daemon answers.
    pub kernel: Option<KernelKey>,
    /// Whether an entry for it is in the kernel now (set when entries are written).
    pub in_kernel: bool,
}

/// The kernel entries of the grants: exec keys and destination keys, each with the latest
/// expiry (boot-time ns) among the grants that give it, and per destination one expiry per
/// socket type (0: any, 1: stream, 2: datagram). The ids of the grants behind each entry come
/// along, for marking them `in_kernel`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelEntries {
    pub execs: BTreeMap<(u32, u64, u64), (u64, Vec<String>)>,
    pub connects: BTreeMap<crate::ebpf::ConnectGrantKey, ([u64; 3], Vec<String>)>,
}

/// A wall-clock expiry in `CLOCK_BOOTTIME` nanoseconds, given both clocks read now; `None`
/// when it has passed. The kernel allows only while its boot-time clock is below it.
#[must_use]
pub fn boot_expiry(expires: SystemTime, now: SystemTime, now_boot_ns: u64) -> Option<u64> {
    let left = expires.duration_since(now).ok().filter(|d| !d.is_zero())?;
    let left = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
    Some(now_boot_ns.saturating_add(left))
}

/// `CLOCK_BOOTTIME` now, in nanoseconds (the clock of `bpf_ktime_get_boot_ns`).
#[must_use]
pub fn boot_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32).as_nanos() as u64)
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

    /// When the next grant expires.
    #[must_use]
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.list.iter().map(|g| g.expires).min()
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

    /// The kernel entries of the live grants that `eligible` lets into the kernel (the
    /// policy check), with their expiries converted to boot time.
    pub fn kernel_entries(
        &self,
        now: SystemTime,
        now_boot_ns: u64,
        eligible: impl Fn(&Grant) -> bool,
    ) -> KernelEntries {
        let mut out = KernelEntries::default();
        for g in &self.list {
            let Some(k) = g.kernel else { continue };
            let Some(expiry) = boot_expiry(g.expires, now, now_boot_ns) else {
                continue;
            };
            if !eligible(g) {
                continue;
            }
            match k {
                KernelKey::Exec { dev, ino } => {
                    let e = out.execs.entry((g.label_id, dev, ino)).or_default();
                    e.0 = e.0.max(expiry);
                    e.1.push(g.id.clone());
                }
                KernelKey::Connect {
                    family,
                    addr,
                    port,
                    sock_type,
                } => {
                    let Some(slot) = [0, 1, 2].iter().position(|t| *t == sock_type) else {
                        continue;
                    };
                    let e = out
                        .connects
                        .entry((g.label_id, family, addr, port))
                        .or_default();
                    e.0[slot] = e.0[slot].max(expiry);
                    e.1.push(g.id.clone());
                }
            }
        }
        out
    }

    /// Marks which grants have a kernel entry now.
    pub fn mark_in_kernel(&mut self, ids: &[String]) {
        for g in &mut self.list {
            g.in_kernel = ids.contains(&g.id);
        }
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
            label_id: 1,
            key,
            expires: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            by: "bob via api".into(),
            kernel: None,
            in_kernel: false,
        }
    }

    #[test]
    fn expiries_convert_to_boot_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let boot = 5_000_000_000;
        // 90 s left: 90 s past the boot-time clock read at the same moment.
        let at = now + Duration::from_secs(90);
        assert_eq!(boot_expiry(at, now, boot), Some(boot + 90_000_000_000));
        // Sub-second precision is kept.
        let at = now + Duration::from_millis(1_500);
        assert_eq!(boot_expiry(at, now, boot), Some(boot + 1_500_000_000));
        // Passed or due now: no entry at all.
        assert_eq!(boot_expiry(now, now, boot), None);
        assert_eq!(boot_expiry(now - Duration::from_secs(1), now, boot), None);
        // The clock is real and counts.
        let a = boot_ns().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boot_ns().unwrap() >= a + 5_000_000);
    }

    #[test]
    fn kernel_entries_keep_the_latest_expiry_and_skip_what_the_kernel_cannot_answer() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let boot = 1_000;
        let mut g = Grants::default();
        let f = FileId { dev: 1, ino: 2 };
        let exec = Some(KernelKey::Exec {
            dev: 1 << 20,
            ino: 2,
        });
        let mut a = grant("g-1", Key::Binary(f), 1_060);
        a.kernel = exec;
        let mut b = grant("g-2", Key::Binary(f), 1_600);
        b.kernel = exec;
        // Not recognisable in the kernel (a script, btrfs, a tree grant): daemon only.
        let c = grant("g-3", Key::Tree { pid: 1, start: 1 }, 1_600);
        // Expired: no entry.
        let mut d = grant("g-4", Key::Binary(FileId { dev: 1, ino: 9 }), 999);
        d.kernel = Some(KernelKey::Exec {
            dev: 1 << 20,
            ino: 9,
        });
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        let dest = |id: &str, sock_type, secs| {
            let mut x = grant(
                id,
                Key::Destination {
                    addr,
                    port: 443,
                    sock_type,
                },
                secs,
            );
            x.kernel = Some(KernelKey::Connect {
                family: 2,
                addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                port: 443,
                sock_type,
            });
            x
        };
        // Refused by the policy check.
        let mut e = grant("g-7", Key::Binary(FileId { dev: 1, ino: 7 }), 1_600);
        e.kernel = Some(KernelKey::Exec {
            dev: 1 << 20,
            ino: 7,
        });
        for x in [a, b, c, d, dest("g-5", 1, 1_010), dest("g-6", 0, 1_020), e] {
            g.add(x);
        }
        let k = g.kernel_entries(now, boot, |g| g.id != "g-7");
        assert_eq!(k.execs.len(), 1, "{k:?}");
        let (expiry, ids) = &k.execs[&(1, 1 << 20, 2)];
        assert_eq!(*expiry, boot + 600_000_000_000);
        assert_eq!(ids, &["g-1", "g-2"]);
        let (expiries, ids) =
            &k.connects[&(1, 2, [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 443)];
        assert_eq!(
            *expiries,
            [boot + 20_000_000_000, boot + 10_000_000_000, 0],
            "any, stream, datagram"
        );
        assert_eq!(ids, &["g-5", "g-6"]);
        g.mark_in_kernel(&["g-1".to_owned()]);
        assert!(g.list().iter().all(|x| x.in_kernel == (x.id == "g-1")));
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
