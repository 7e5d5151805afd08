//! Grants in the kernel: which grants the kernel may answer, and keeping its entries equal to
//! them. The daemon's grant list stays the truth; after every change to it (a grant issued,
//! revoked or expired) and to the policy (start, reload), the kernel's grant maps are rewritten
//! from it. An entry is written only where the kernel's answer is the policy's
//! (`policy::compile::grant_in_kernel`) and the kernel can recognise what the grant covers
//! ([`Daemon::kernel_key`]); everything else is answered by the daemon as before.
use std::path::{Path, PathBuf};

use super::{ActionKind, Daemon, Held, enrich, grants};
use crate::{
    ebpf,
    policy::{
        compile::{self, GrantMatch},
        schema::Protocol,
    },
};

impl Daemon {
    /// How the kernel would recognise what a grant of `key` for `held` covers; `None` where
    /// it cannot (a tree grant, a script, a file whose `stat` numbers are not the kernel's,
    /// another socket type than stream or datagram).
    pub(super) fn kernel_key(&self, held: &Held, key: &grants::Key) -> Option<grants::KernelKey> {
        match *key {
            grants::Key::Binary(file) => {
                let path: PathBuf = match held.kind {
                    ActionKind::Exec => {
                        let b = held.binding.as_ref()?;
                        enrich::resolve_in_task(held.tgid, &b.filename)
                    }
                    ActionKind::ExecLoaded => format!("/proc/{}/exe", held.tgid).into(),
                    ActionKind::Connect
                    | ActionKind::Send
                    | ActionKind::Socket
                    | ActionKind::Unix
                    | ActionKind::Listen => return None,
                };
                // The agent's file, on a file system that may not answer: off the loop.
                enrich::bounded(move || kernel_file(&path, file)).flatten()
            }
            grants::Key::Destination {
                addr,
                port,
                sock_type,
            } => {
                if sock_type > 2 {
                    return None;
                }
                let (family, bytes) = match addr {
                    std::net::IpAddr::V4(a) => {
                        let mut b = [0u8; 16];
                        b[..4].copy_from_slice(&a.octets());
                        (libc::AF_INET as u16, b)
                    }
                    std::net::IpAddr::V6(a) => (libc::AF_INET6 as u16, a.octets()),
                };
                Some(grants::KernelKey::Connect {
                    family,
                    addr: bytes,
                    port,
                    sock_type,
                })
            }
            grants::Key::Tree { .. } => None,
        }
    }

    /// Rewrites the kernel's grant entries from the grants in force and the policy in force.
    /// On failure the grants stay with the daemon (and a stale entry still ends at its
    /// expiry).
    pub(super) fn sync_grants(&mut self) {
        let now = std::time::SystemTime::now();
        let Some(boot) = grants::boot_ns() else {
            tracing::error!("cannot read CLOCK_BOOTTIME; grants are answered by the daemon");
            return;
        };
        let policy = self.policy.as_ref();
        let entries = self.grants.kernel_entries(now, boot, |g| {
            let what = match g.key {
                grants::Key::Binary(f) => GrantMatch::Binary(f),
                grants::Key::Destination {
                    addr,
                    port,
                    sock_type,
                } => GrantMatch::Destination {
                    addr,
                    port,
                    protocol: match i32::from(sock_type) {
                        libc::SOCK_STREAM => Protocol::Tcp,
                        libc::SOCK_DGRAM => Protocol::Udp,
                        _ => Protocol::Any,
                    },
                },
                grants::Key::Tree { .. } => return false,
            };
            let ok = compile::grant_in_kernel(policy, &g.label, &what);
            if !ok {
                tracing::debug!(
                    grant = g.id,
                    "a deny or kill rule could match what the grant covers: the daemon answers it"
                );
            }
            ok
        });
        let execs: Vec<_> = entries.execs.iter().map(|(k, (e, _))| (*k, *e)).collect();
        let connects: Vec<_> = entries
            .connects
            .iter()
            .map(|(k, (e, _))| (*k, *e))
            .collect();
        let (exec_ok, connect_ok) = match self.kernel.set_grants(&execs, &connects) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "writing the grant entries failed; the daemon answers the grants");
                self.grants.mark_in_kernel(&[]);
                return;
            }
        };
        let mut in_kernel = Vec::new();
        for (ok, (_, ids)) in exec_ok.iter().zip(entries.execs.values()) {
            if *ok {
                in_kernel.extend(ids.iter().cloned());
            }
        }
        for (ok, (_, ids)) in connect_ok.iter().zip(entries.connects.values()) {
            if *ok {
                in_kernel.extend(ids.iter().cloned());
            }
        }
        tracing::debug!(
            grants = self.grants.list().len(),
            in_kernel = in_kernel.len(),
            "grant entries written"
        );
        self.grants.mark_in_kernel(&in_kernel);
    }
}

/// The kernel's key for `file` at `path`, if the kernel identifies it like `stat` does and it
/// is not a script (whose interpreter the kernel checks separately). `path` must still be
/// that file.
fn kernel_file(path: &Path, file: enrich::FileId) -> Option<grants::KernelKey> {
    if enrich::file_id(path) != Some(file)
        || !compile::kernel_sees_stat_ids(path)
        || enrich::shebang(path).is_some()
    {
        return None;
    }
    Some(grants::KernelKey::Exec {
        dev: ebpf::kernel_dev(file.dev),
        ino: file.ino,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_files_the_kernel_identifies_like_stat_get_a_key() {
        let exe = std::env::current_exe().unwrap();
        let file = enrich::file_id(&exe).unwrap();
        if compile::kernel_sees_stat_ids(&exe) {
            assert_eq!(
                kernel_file(&exe, file),
                Some(grants::KernelKey::Exec {
                    dev: ebpf::kernel_dev(file.dev),
                    ino: file.ino,
                })
            );
        }
        // The path no longer is the granted file.
        let other = enrich::FileId {
            dev: file.dev,
            ino: file.ino + 1,
        };
        assert_eq!(kernel_file(&exe, other), None);
        // A filesystem whose numbers are not the kernel's view of an executable (procfs here,
        // as btrfs or overlayfs elsewhere).
        let proc_file = Path::new("/proc/self/status");
        let id = enrich::file_id(proc_file).unwrap();
        assert_eq!(kernel_file(proc_file, id), None);
        // A script: the kernel checks it and then its interpreter.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let id = enrich::file_id(&script).unwrap();
        assert_eq!(kernel_file(&script, id), None);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "\x7fELF").unwrap();
        let id = enrich::file_id(&plain).unwrap();
        assert_eq!(
            kernel_file(&plain, id).is_some(),
            compile::kernel_sees_stat_ids(&plain)
        );
    }
}
