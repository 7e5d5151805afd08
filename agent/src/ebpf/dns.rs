//! The daemon's side of the DNS capture through which it sees DNS queries and answers
//! (`daemon::names` learns destination names from them): kernel programs copy the UDP
//! datagrams to and from port 53 of sockets in the daemon's network namespace to a ring
//! buffer; nothing else on the host is copied, and no packet waits for the daemon. Where the
//! kernel runs `fentry` programs, the `cs_fe_dns_*` programs on its UDP send and receive
//! paths do it (no other packet pays); elsewhere the `cs_cg_dns_*` programs on the cgroup v2
//! root (every packet of a local socket passes them).
//!
//! The programs only check headers; user space checks every header again (`daemon::names`).
use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{
    Btf,
    maps::{Array, MapData, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, FEntry},
};
use countersign_ebpf as shared;

use super::{Kernel, KernelError, Result, cgroup2_root, map_err, program_as, take_map};

/// One captured packet: the network-layer bytes and what they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Bytes of the packet in the caller's buffer.
    pub len: usize,
    /// `0x0800` IPv4, `0x86dd` IPv6 (from the IP version).
    pub ethertype: u16,
    /// Sent by a local socket (a query) rather than received (an answer).
    pub outgoing: bool,
}

/// The capture's ring buffer and drop counter; the programs stay attached while the
/// daemon's [`Kernel`] lives (they are not pinned).
pub struct DnsCapture {
    ring: RingBuf<MapData>,
    dropped: Array<MapData, u64>,
    /// Which programs capture (for `status`).
    pub programs: &'static str,
}

/// [`DnsCapture::programs`] of the two captures.
pub const CAPTURE_FENTRY: &str = "kernel UDP paths (fentry)";
pub const CAPTURE_CGROUP: &str = "cgroup programs";

impl std::fmt::Debug for DnsCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCapture").finish_non_exhaustive()
    }
}

impl DnsCapture {
    /// A descriptor of the ring buffer to wait on (a duplicate: the capture keeps reading
    /// through its own).
    pub fn readiness_fd(&self) -> io::Result<OwnedFd> {
        self.ring.as_fd().try_clone_to_owned()
    }

    /// Copies the next captured packet into `buf`; `None` when none is queued.
    pub fn next(&mut self, buf: &mut [u8]) -> Option<PacketInfo> {
        loop {
            let item = self.ring.next()?;
            if let Some(info) = read_record(&item, buf) {
                return Some(info);
            }
        }
    }

    /// Packets the programs could not queue (the ring was full).
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.get(&0, 0).unwrap_or(0)
    }
}

/// The packet of one ring record, or `None` for a malformed one.
fn read_record(record: &[u8], buf: &mut [u8]) -> Option<PacketInfo> {
    let header = size_of::<shared::DnsPacket>() - shared::DNS_CAPTURE_BYTES;
    if record.len() < size_of::<shared::DnsPacket>() {
        return None;
    }
    let word = |i: usize| {
        u32::from_ne_bytes(record[i * 4..i * 4 + 4].try_into().unwrap_or_default()) as usize
    };
    let (len, wire_len, outgoing) = (word(0), word(1), word(2));
    // A truncated packet is not parsed (its lengths would not add up).
    if len == 0 || len > shared::DNS_CAPTURE_BYTES || len < wire_len || len > buf.len() {
        return None;
    }
    let packet = &record[header..header + len];
    let ethertype = match packet[0] >> 4 {
        4 => 0x0800,
        6 => 0x86dd,
        _ => return None,
    };
    buf[..len].copy_from_slice(packet);
    Some(PacketInfo {
        len,
        ethertype,
        outgoing: outgoing != 0,
    })
}

impl Kernel {
    /// Attaches the DNS capture: on the kernel's UDP paths where it can, else on the cgroup v2
    /// root, which needs network namespace cookies (Linux 5.14) and a cgroup v2 mount.
    pub fn capture_dns(&mut self) -> Result<DnsCapture> {
        let programs = match self.attach_dns_fentry() {
            Ok(()) => CAPTURE_FENTRY,
            Err(why) => {
                tracing::info!(reason = %why, "DNS capture on the kernel's UDP paths not available; using cgroup programs");
                self.attach_dns_cgroup()?;
                CAPTURE_CGROUP
            }
        };
        let ring = RingBuf::try_from(take_map(&mut self.ebpf, shared::MAP_DNS)?)
            .map_err(|e| map_err(shared::MAP_DNS, &e))?;
        let dropped = Array::try_from(take_map(&mut self.ebpf, shared::MAP_DNS_DROPPED)?)
            .map_err(|e| map_err(shared::MAP_DNS_DROPPED, &e))?;
        Ok(DnsCapture {
            ring,
            dropped,
            programs,
        })
    }

    /// The `fentry` capture (all three programs, or none).
    fn attach_dns_fentry(&mut self) -> std::result::Result<(), String> {
        if self.dns_offsets.valid == 0 {
            return Err("the kernel's sk_buff/sock/net layout is unknown (no BTF)".into());
        }
        let btf = match self.aya_btf.take() {
            Some(b) => b,
            None => Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?,
        };
        let programs = [
            (shared::PROG_FE_DNS_SEND4, "ip_send_skb"),
            (shared::PROG_FE_DNS_SEND6, "ip6_send_skb"),
            (shared::PROG_FE_DNS_ENQUEUE, "__udp_enqueue_schedule_skb"),
        ];
        let attach = |ebpf: &mut aya::Ebpf| -> std::result::Result<(), String> {
            for (name, function) in programs {
                let p: &mut FEntry = program_as(ebpf, name).map_err(|e| e.to_string())?;
                p.load(function, &btf)
                    .and_then(|()| p.attach())
                    .map_err(|e| format!("{function}: {}", super::error_chain(&e)))?;
            }
            Ok(())
        };
        let result = attach(&mut self.ebpf);
        if result.is_err() {
            for (name, _) in programs {
                if let Ok(p) = program_as::<FEntry>(&mut self.ebpf, name) {
                    let _ = p.unload();
                }
            }
        }
        result
    }

    /// The cgroup capture.
    fn attach_dns_cgroup(&mut self) -> Result<()> {
        if self.netns_cookie == 0 {
            return Err(KernelError::Map {
                name: shared::GLOBAL_HOST_NETNS_COOKIE,
                detail: "the kernel does not report network namespace cookies (SO_NETNS_COOKIE, Linux 5.14)".into(),
            });
        }
        let root = cgroup2_root().ok_or(KernelError::NoCgroup2)?;
        let cgroup = File::open(&root).map_err(|error| KernelError::Io {
            path: root.clone(),
            error,
        })?;
        // Markers first: a socket must be marked before its packets are looked at.
        for name in [
            shared::PROG_CG_DNS_CONNECT4,
            shared::PROG_CG_DNS_CONNECT6,
            shared::PROG_CG_DNS_SENDMSG4,
            shared::PROG_CG_DNS_SENDMSG6,
        ] {
            let prog: &mut CgroupSockAddr = program_as(&mut self.ebpf, name)?;
            prog.load()
                .map_err(|error| KernelError::Program { name, error })?;
            // Links are "multi": other programs on the root or below keep working.
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|error| KernelError::Program { name, error })?;
        }
        for (name, direction) in [
            (shared::PROG_CG_DNS_EGRESS, CgroupSkbAttachType::Egress),
            (shared::PROG_CG_DNS_INGRESS, CgroupSkbAttachType::Ingress),
        ] {
            let prog: &mut CgroupSkb = program_as(&mut self.ebpf, name)?;
            prog.load()
                .map_err(|error| KernelError::Program { name, error })?;
            prog.attach(&cgroup, direction, CgroupAttachMode::Single)
                .map_err(|error| KernelError::Program { name, error })?;
        }
        Ok(())
    }
}

/// What the `fentry` capture reads, from the kernel's BTF, and this process's network
/// namespace; `valid` 0 when either is unknown.
pub(super) fn kernel_offsets(btf: Option<&super::btf::Btf>) -> shared::DnsOffsets {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(ns), Some(btf)) = (std::fs::metadata("/proc/self/ns/net"), btf) else {
        return shared::DnsOffsets::default();
    };
    match btf.dns_offsets() {
        Ok(mut o) => {
            o.host_netns_inum = ns.ino() as u32;
            o
        }
        Err(e) => {
            tracing::debug!(error = %e, "kernel layout for the DNS capture unknown");
            shared::DnsOffsets::default()
        }
    }
}

/// This process's network namespace cookie, or 0 where the kernel does not report one.
pub(super) fn netns_cookie() -> u64 {
    /// `SO_NETNS_COOKIE` (Linux 5.14).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { cookie } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: u32, wire_len: u32, outgoing: u32, first: u8) -> Vec<u8> {
        let mut r = vec![0u8; size_of::<shared::DnsPacket>()];
        r[0..4].copy_from_slice(&len.to_ne_bytes());
        r[4..8].copy_from_slice(&wire_len.to_ne_bytes());
        r[8..12].copy_from_slice(&outgoing.to_ne_bytes());
        r[16] = first;
        r
    }

    #[test]
    fn records_give_their_packet_and_direction() {
        let mut buf = vec![0u8; 65_536];
        let r = record(40, 40, 1, 0x45);
        assert_eq!(
            read_record(&r, &mut buf),
            Some(PacketInfo {
                len: 40,
                ethertype: 0x0800,
                outgoing: true
            })
        );
        assert_eq!(buf[0], 0x45);
        let r = record(60, 60, 0, 0x60);
        let info = read_record(&r, &mut buf).unwrap();
        assert_eq!((info.ethertype, info.outgoing), (0x86dd, false));
        // Truncated, empty, longer than the record, not IP, or cut short: skipped.
        assert_eq!(read_record(&record(4096, 5000, 0, 0x45), &mut buf), None);
        assert_eq!(read_record(&record(0, 0, 0, 0x45), &mut buf), None);
        assert_eq!(read_record(&record(5000, 5000, 0, 0x45), &mut buf), None);
        assert_eq!(read_record(&record(40, 40, 0, 0x15), &mut buf), None);
        assert_eq!(read_record(&record(40, 40, 0, 0x45)[..100], &mut buf), None);
    }

    #[test]
    fn this_kernel_reports_a_network_namespace_cookie() {
        assert_ne!(netns_cookie(), 0);
    }
}
