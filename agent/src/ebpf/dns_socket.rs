//! The packet socket through which the daemon sees DNS answers (`daemon::names` learns
//! destination names from them): `AF_PACKET`/`SOCK_DGRAM` on every interface, loopback
//! included, with a classic BPF socket filter so that only IPv4/IPv6 UDP answers received
//! from port 53, and the queries this host sends to port 53, ever reach user space.
//!
//! The filter only saves work: user space checks every header again (`daemon::names`).
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, socket};

/// `skb->pkt_type` of a packet this host sends (seen again on loopback as `PACKET_HOST`).
const PACKET_OUTGOING: u32 = 4;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
/// Bytes of a packet the filter lets through (a UDP datagram is at most 65535 bytes).
const SNAPLEN: u32 = 65_535;

// Classic BPF opcodes (linux/filter.h).
const LD_IMM: u16 = 0x00; // BPF_LD | BPF_W | BPF_IMM
const LD_MEM: u16 = 0x60; // BPF_LD | BPF_W | BPF_MEM
const LDX_MEM: u16 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const ST: u16 = 0x02; // BPF_ST
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND
const LDX_B_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH
const ADD_X: u16 = 0x0c; // BPF_ALU | BPF_ADD | BPF_X
const TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
const JA: u16 = 0x05; // BPF_JMP | BPF_JA
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// `SKF_AD_OFF`: loads at negative offsets read socket buffer metadata.
const AD_OFF: u32 = (-0x1000i32) as u32;
const AD_PROTOCOL: u32 = AD_OFF; // + SKF_AD_PROTOCOL (0): the ethertype, host order
const AD_PKTTYPE: u32 = AD_OFF + 4; // + SKF_AD_PKTTYPE

const fn ins(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter. Offsets are from the network header (a `SOCK_DGRAM` packet socket's packets
/// start there). Jumps are relative to the next instruction. It keeps IPv4 UDP that is not a
/// fragment and IPv6 UDP without extension headers that is either received with source port
/// 53 (answers) or sent by this host with destination port 53 (queries: the daemon matches
/// answers to them). Scratch `M[0]` holds the offset of the port to check in the UDP header.
pub const FILTER: [libc::sock_filter; 26] = [
    // 0: sent by this host → check the destination port (2), else the source port (0).
    ins(LD_W_ABS, 0, 0, AD_PKTTYPE),
    ins(JEQ_K, 0, 2, PACKET_OUTGOING), // else → 4
    ins(LD_IMM, 0, 0, 2),
    ins(JA, 0, 0, 1), // → 5
    ins(LD_IMM, 0, 0, 0),
    ins(ST, 0, 0, 0),
    // 6: IPv4 or IPv6?
    ins(LD_W_ABS, 0, 0, AD_PROTOCOL),
    ins(JEQ_K, 0, 10, ETH_P_IP), // else → 18
    // 8: IPv4: UDP, not a fragment, the port at IHL + M[0] is 53.
    ins(LD_B_ABS, 0, 0, 9),
    ins(JEQ_K, 0, 15, libc::IPPROTO_UDP as u32), // else → 25
    ins(LD_H_ABS, 0, 0, 6),
    ins(JSET_K, 13, 0, 0x3fff), // MF or a fragment offset → 25
    ins(LDX_B_MSH, 0, 0, 0),    // X = 4 * IHL
    ins(LD_MEM, 0, 0, 0),
    ins(ADD_X, 0, 0, 0),
    ins(TAX, 0, 0, 0),
    ins(LD_H_IND, 0, 0, 0),
    ins(JEQ_K, 6, 7, 53), // → 24 accept, else → 25
    // 18: IPv6: next header UDP, the port at 40 + M[0] is 53.
    ins(JEQ_K, 0, 6, ETH_P_IPV6), // else → 25
    ins(LD_B_ABS, 0, 0, 6),
    ins(JEQ_K, 0, 4, libc::IPPROTO_UDP as u32), // else → 25
    ins(LDX_MEM, 0, 0, 0),
    ins(LD_H_IND, 0, 0, 40),
    ins(JEQ_K, 0, 1, 53), // else → 25
    // 24: accept
    ins(RET_K, 0, 0, SNAPLEN),
    // 25: drop
    ins(RET_K, 0, 0, 0),
];

/// One packet: the network-layer bytes, the ethertype and the packet type.
#[derive(Debug, Clone, Copy)]
pub struct PacketInfo {
    pub len: usize,
    /// Host order (`0x0800` IPv4, `0x86dd` IPv6).
    pub ethertype: u16,
    pub pkttype: u8,
}

/// The packet socket (non-blocking).
#[derive(Debug)]
pub struct DnsSocket {
    fd: OwnedFd,
}

impl DnsSocket {
    /// Opens the socket and attaches (and locks) the filter. Needs `CAP_NET_RAW`.
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )?;
        let prog = libc::sock_fprog {
            len: FILTER.len() as u16,
            filter: FILTER.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points at FILTER (static, `len` instructions) for the duration of the
        // call; the kernel copies the program; the option length is that of `sock_fprog`.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                std::ptr::from_ref(&prog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Self { fd };
        // Packets queued between socket() and the filter were not filtered: drop them.
        let mut buf = [0u8; 64];
        for _ in 0..10_000 {
            match nix::sys::socket::recv(s.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(s)
    }

    /// Registers the socket with the async runtime.
    pub fn watch(self) -> io::Result<tokio::io::unix::AsyncFd<DnsSocket>> {
        // SAFETY: the socket owns its fd; it stays open and unchanged for as long as the
        // AsyncFd owns the socket.
        unsafe { tokio::io::unix::AsyncFd::register(self) }.map_err(|e| e.into_parts().1)
    }

    /// Reads one packet into `buf`; `None` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<PacketInfo>> {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut addr_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `addr` are valid for writes of the lengths given, for the call.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_fd().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::from_mut(&mut addr).cast(),
                &raw mut addr_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(PacketInfo {
            len: (n as usize).min(buf.len()),
            ethertype: u16::from_be(addr.sll_protocol),
            pkttype: addr.sll_pkttype,
        }))
    }
}

impl AsRawFd for DnsSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether a packet type is one this host sends.
#[must_use]
pub fn is_outgoing(pkttype: u8) -> bool {
    u32::from(pkttype) == PACKET_OUTGOING
}
