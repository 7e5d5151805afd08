//! DNS capture for destination names. Where the kernel runs `fentry` programs (BPF LSM
//! kernels do), three of them on the kernel's UDP paths, so that no other packet pays:
//!
//! - `ip_send_skb`/`ip6_send_skb` (every UDP datagram a local socket sends) copy datagrams
//!   to port 53 (queries), and `__udp_enqueue_schedule_skb` (every datagram queued on a UDP
//!   socket) copies datagrams from port 53 (answers), when the socket's network namespace is
//!   the daemon's (in another namespace any address can be local, so a program that made its
//!   own namespace could otherwise answer its own queries in a resolver's name).
//!
//! Elsewhere, on the cgroup v2 root:
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
    helpers::{
        bpf_probe_read_kernel,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_probe_read_kernel as read_into,
            bpf_skb_load_bytes,
        },
    },
    programs::{SkBuffContext, SockAddrContext},
};
use countersign_ebpf::{DNS_CAPTURE_BYTES, DnsOffsets, DnsPacket};

use crate::maps::{DNS, DNS_DROPPED, DNS_SOCKETS};

/// The daemon's network namespace cookie (`SO_NETNS_COOKIE`), set by the loader; 0 matches
/// nothing, so without it no socket is marked.
#[unsafe(no_mangle)]
pub static HOST_NETNS_COOKIE: u64 = 0;

const SOCK_DGRAM: u32 = 2;

/// Set by the loader (see [`DnsOffsets`]); all zero means the `fentry` capture is off.
#[unsafe(no_mangle)]
pub static DNS_OFFSETS: DnsOffsets = DnsOffsets {
    valid: 0,
    host_netns_inum: 0,
    skb_sk: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_len: 0,
    skb_data_len: 0,
    sk_net: 0,
    net_inum: 0,
};

#[inline(always)]
pub fn offsets() -> &'static DnsOffsets {
    crate::maps::opaque(&DNS_OFFSETS)
}

/// A kernel value at `base + offset`, read with the checked helper (a bad address fails).
#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: read with the checked helper; a bad address fails the read, nothing else.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

/// `fentry` capture: copies `skb` when it is UDP to (`outgoing`) or from port 53, linear,
/// and its socket is in the daemon's network namespace. `sk` is the socket when the hook
/// has it, else the skb's. A datagram being sent has no IP length yet (`ip_local_out`
/// writes it): its length is the skb's, and the copy gets it.
#[inline(always)]
pub fn capture_kernel_skb(sk: *const u8, skb: *const u8, outgoing: bool) {
    let o = offsets();
    if o.valid == 0 {
        return;
    }
    let Some(head) = read::<u64>(skb, o.skb_head) else {
        return;
    };
    let Some(network) = read::<u16>(skb, o.skb_network_header) else {
        return;
    };
    let ip = (head as *const u8).wrapping_add(usize::from(network));
    // One read covers what either header says here (an IPv4 header has at least 20 bytes,
    // an IPv6 one 40): every UDP datagram of the host passes this.
    let Some(first) = read::<[u8; 12]>(ip, 0) else {
        return;
    };
    let v4 = first[0] >> 4 == 4;
    // The datagram's length from its IP header, and where its UDP header is.
    let (header_len, udp_at) = match first[0] >> 4 {
        4 => {
            let fragment = u16::from_be_bytes([first[6], first[7]]) & 0x3fff;
            if first[9] != IPPROTO_UDP || fragment != 0 {
                return;
            }
            (
                u32::from(u16::from_be_bytes([first[2], first[3]])),
                u32::from(first[0] & 0x0f) * 4,
            )
        }
        6 => {
            if first[6] != IPPROTO_UDP {
                return;
            }
            (40 + u32::from(u16::from_be_bytes([first[4], first[5]])), 40)
        }
        _ => return,
    };
    let Some(ports) = read::<[u8; 4]>(ip, udp_at) else {
        return;
    };
    let port = if outgoing {
        u16::from_be_bytes([ports[2], ports[3]])
    } else {
        u16::from_be_bytes([ports[0], ports[1]])
    };
    if port != DNS_PORT {
        return;
    }
    // Paged data would not follow the header in memory.
    if read::<u32>(skb, o.skb_data_len) != Some(0) {
        return;
    }
    let len = if outgoing {
        match read::<u32>(skb, o.skb_len) {
            Some(n) => n,
            None => return,
        }
    } else {
        header_len
    };
    let sk = if sk.is_null() {
        match read::<u64>(skb, o.skb_sk) {
            Some(p) => p as *const u8,
            None => return,
        }
    } else {
        sk
    };
    let Some(net) = read::<u64>(sk, o.sk_net) else {
        return;
    };
    if read::<u32>(net as *const u8, o.net_inum) != Some(o.host_netns_inum) {
        return;
    }
    // SAFETY: the source is kernel memory read with the checked helper.
    emit(
        outgoing,
        len,
        |to, n| unsafe { read_into(to, n, ip.cast()) == 0 },
        |data| {
            // A datagram being sent has no IP length yet; the copy gets it.
            if outgoing {
                if v4 {
                    let n = (len as u16).to_be_bytes();
                    data[2] = n[0];
                    data[3] = n[1];
                } else {
                    let n = (len.wrapping_sub(40) as u16).to_be_bytes();
                    data[4] = n[0];
                    data[5] = n[1];
                }
            }
        },
    );
}

/// Queues one packet of `wire_len` bytes on the DNS ring: `read(to, n)` copies its first `n`
/// bytes (1 ..= [`DNS_CAPTURE_BYTES`]) to `to`, `patch` may then change the copy.
#[inline(always)]
fn emit(
    outgoing: bool,
    wire_len: u32,
    read: impl FnOnce(*mut core::ffi::c_void, u32) -> bool,
    patch: impl FnOnce(&mut [u8; DNS_CAPTURE_BYTES]),
) {
    let Some(mut entry) = DNS.reserve::<DnsPacket>(0) else {
        count_dropped();
        return;
    };
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
        read((*packet).data.as_mut_ptr().cast(), len)
    };
    if copied {
        // SAFETY: as above.
        patch(unsafe { &mut (*packet).data });
        entry.submit(0);
    } else {
        entry.discard(0);
    }
}

#[inline(always)]
fn count_dropped() {
    if let Some(n) = DNS_DROPPED.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the map lookup and is valid for this run.
        unsafe { *n += 1 };
    }
}

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
    let skb = ctx.skb.skb.cast();
    // SAFETY: helper call on the program's own context, into the reserved record.
    emit(
        outgoing,
        ctx.len(),
        |to, n| unsafe { bpf_skb_load_bytes(skb, 0, to, n) == 0 },
        |_| {},
    );
}
