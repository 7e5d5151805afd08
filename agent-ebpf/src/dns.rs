//! DNS capture for destination names, on the cgroup v2 root:
//!
//! - `connect4/6` and `sendmsg4/6` programs mark the UDP sockets that a program connects or
//!   sends to port 53 *in the daemon's network namespace* (their socket cookies go into
//!   [`DNS_SOCKETS`]): in another namespace any address can be local, so a program that made
//!   its own namespace could otherwise answer its own queries in a resolver's name;
//! - two `cgroup_skb` programs see the packets local sockets send (egress) and receive
//!   (ingress), and copy to [`DNS`] the UDP datagrams of marked sockets sent to port 53
//!   (queries) and received from port 53 (answers). Every other packet costs a header read
//!   and a return. They never drop a packet.
//!
//! Only headers are checked here; the daemon checks them again, trusts only answers from the
//! host's resolvers to queries seen here, and parses the DNS (`daemon::names`).
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_load_bytes},
    programs::{SkBuffContext, SockAddrContext},
};
use countersign_ebpf::{DNS_CAPTURE_BYTES, DnsPacket};

use crate::maps::{DNS, DNS_DROPPED, DNS_SOCKETS};

/// The daemon's network namespace cookie (`SO_NETNS_COOKIE`), set by the loader; 0 matches
/// nothing, so without it no socket is marked.
#[unsafe(no_mangle)]
pub static HOST_NETNS_COOKIE: u64 = 0;

const SOCK_DGRAM: u32 = 2;

/// `skb->protocol` (network byte order) of IPv4 and IPv6.
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86ddu16.to_be() as u32;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;

/// Marks a UDP socket that is connected, or sends, to port 53 in the daemon's namespace.
#[inline(always)]
pub fn mark(ctx: &SockAddrContext) {
    // SAFETY: the context pointer is valid for this run; these are direct context loads.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_DGRAM
        || sa.protocol != u32::from(IPPROTO_UDP)
        || u16::from_be(sa.user_port as u16) != DNS_PORT
    {
        return;
    }
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the
    // compiler does not fold the default in.
    let host = unsafe { core::ptr::read_volatile(&HOST_NETNS_COOKIE) };
    // SAFETY: helper calls on the program's own context.
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.sock_addr.cast()),
            bpf_get_socket_cookie(ctx.sock_addr.cast()),
        )
    };
    if host == 0 || netns != host {
        return;
    }
    // A full map evicts the least recently marked socket.
    let _ = DNS_SOCKETS.insert(&cookie, &1, 0);
}

/// Copies the packet to the DNS ring when it is UDP to (`outgoing`) or from port 53 of a
/// marked socket.
#[inline(always)]
pub fn capture(ctx: &SkBuffContext, outgoing: bool) {
    let Some(ports) = udp_ports(ctx) else {
        return;
    };
    let port = if outgoing { ports[1] } else { ports[0] };
    if port != DNS_PORT {
        return;
    }
    // SAFETY: helper call on the program's own context (the packet's socket: the sender on
    // egress, the receiver on ingress).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: the value is not kept.
    if unsafe { DNS_SOCKETS.get(&cookie) }.is_none() {
        return;
    }
    copy(ctx, outgoing);
}

/// The UDP source and destination ports of an unfragmented IPv4 or IPv6 (no extension
/// header) datagram.
#[inline(always)]
fn udp_ports(ctx: &SkBuffContext) -> Option<[u16; 2]> {
    // SAFETY: a read of the context the kernel passed in.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    let udp_at = if protocol == ETH_P_IP_BE {
        let ip: [u8; 20] = ctx.load(0).ok()?;
        let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        if ip[9] != IPPROTO_UDP || fragment != 0 {
            return None;
        }
        usize::from(ip[0] & 0x0f) * 4
    } else if protocol == ETH_P_IPV6_BE {
        let next: u8 = ctx.load(6).ok()?;
        if next != IPPROTO_UDP {
            return None;
        }
        40
    } else {
        return None;
    };
    let ports: [u8; 4] = ctx.load(udp_at).ok()?;
    Some([
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ])
}

#[inline(always)]
fn copy(ctx: &SkBuffContext, outgoing: bool) {
    let Some(mut entry) = DNS.reserve::<DnsPacket>(0) else {
        if let Some(n) = DNS_DROPPED.get_ptr_mut(0) {
            // SAFETY: the pointer comes from the map lookup and is valid for this run.
            unsafe { *n += 1 };
        }
        return;
    };
    let wire_len = ctx.len();
    let len = if wire_len as usize > DNS_CAPTURE_BYTES {
        DNS_CAPTURE_BYTES as u32
    } else {
        wire_len
    };
    // In 1..=DNS_CAPTURE_BYTES in a form every verifier can follow (the same value for every
    // `len` in that range; an empty packet asks for more bytes than it has, and fails).
    let len = (len.wrapping_sub(1) & (DNS_CAPTURE_BYTES as u32 - 1)) + 1;
    let packet = entry.as_mut_ptr();
    // SAFETY: `packet` is the reserved record, valid for writes of its size until submitted
    // or discarded; `len` is at most the size of `data`.
    let copied = unsafe {
        (*packet).len = len;
        (*packet).wire_len = wire_len;
        (*packet).outgoing = u32::from(outgoing);
        (*packet)._pad = 0;
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            0,
            (*packet).data.as_mut_ptr().cast(),
            len,
        ) == 0
    };
    if copied {
        entry.submit(0);
    } else {
        entry.discard(0);
    }
}
