//! The virtio-net header that travels with each frame (see `docs/protocol.md`, sleeve records),
//! checked against the frame it describes before it reaches this host's TAP.
//!
//! A peer's header is offload metadata for *our* kernel: whether the L4 checksum still has to be
//! filled in (and where), whether the kernel may trust it (`DATA_VALID`), and how to segment a
//! TCP super-frame (GSO). Taken unchecked, a peer could have our kernel skip checksum checks or
//! run its segmentation on metadata that does not describe the frame. So [`check`] parses the
//! frame's Ethernet, IP and TCP/UDP headers, refuses metadata that does not fit them, and returns
//! a header rebuilt from what the frame shows: `DATA_VALID` is never passed on (the kernel
//! verifies), `csum_start`/`csum_offset` are where the frame's TCP or UDP checksum is, `hdr_len`
//! is the end of the frame's L4 header, GSO only for TCP over the matching IP version with a
//! segment size between [`MIN_GSO_SIZE`] and the frame's length.
//!
//! The header is in little-endian byte order: the TAP is opened without `TUNSETVNETBE`, so the
//! kernel uses the host's order, and weft runs on little-endian hosts (x86-64, arm64).

use crate::sleeve::VNET_LEN;

/// Flag: the L4 checksum is to be completed from `csum_start`, the sum stored at `csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// Flag: the checksum was verified (never accepted from a peer).
pub const F_DATA_VALID: u8 = 2;
/// GSO type: none.
pub const GSO_NONE: u8 = 0;
/// GSO type: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// GSO type: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// GSO type bit: the TCP stream uses ECN (CWR is set on the first segment only).
pub const GSO_ECN: u8 = 0x80;
/// The smallest segment size accepted: Linux's own floor for a TCP sender's MSS
/// (`TCP_MIN_SND_MSS`). Smaller ones would let a peer have our kernel cut one frame into
/// thousands of segments.
pub const MIN_GSO_SIZE: u16 = 48;

/// Ethertypes (also read by `aqm` to find a frame's IP header).
pub(crate) const ETH_IPV4: u16 = 0x0800;
pub(crate) const ETH_IPV6: u16 = 0x86dd;
pub(crate) const ETH_VLAN: u16 = 0x8100;
const ETH_QINQ: u16 = 0x88a8;
const IP_TCP: u8 = 6;
const IP_UDP: u8 = 17;
/// Offset of the checksum in a TCP header.
const TCP_CSUM: u16 = 16;
/// Offset of the checksum in a UDP header.
const UDP_CSUM: u16 = 6;

/// Why a peer's virtio-net header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VnetError {
    /// Flag bits other than `NEEDS_CSUM` and `DATA_VALID`.
    #[error("unknown virtio-net flags")]
    Flags,
    /// A GSO type other than none, TCPv4 or TCPv6 (with or without ECN).
    #[error("unsupported GSO type")]
    GsoType,
    /// GSO without `NEEDS_CSUM`: the segments' checksums could not be filled in.
    #[error("GSO without checksum offload")]
    GsoWithoutCsum,
    /// Checksum offload asked for a frame that is not TCP or UDP over IPv4 or IPv6 (or whose
    /// headers are cut short, or an IP fragment).
    #[error("checksum offload for a frame without a TCP or UDP header")]
    NotTcpUdp,
    /// `csum_start` is not where the frame's TCP or UDP header starts.
    #[error("csum_start is not the frame's L4 header")]
    CsumStart,
    /// `csum_offset` is not the TCP (16) or UDP (6) checksum's place.
    #[error("csum_offset is not the L4 checksum")]
    CsumOffset,
    /// The GSO type does not match the frame (TCPv4 on IPv6, or on UDP, ...).
    #[error("GSO type does not match the frame")]
    GsoMismatch,
    /// The segment size is below [`MIN_GSO_SIZE`] or not below the frame's length.
    #[error("GSO segment size out of range")]
    GsoSize,
}

/// Where a frame's L4 header is, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct L4 {
    ipv6: bool,
    proto: u8,
    start: usize,
    end: usize,
}

/// The big-endian u16 at `at`, if `b` holds it.
pub(crate) fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn le16(v: &[u8; VNET_LEN], at: usize) -> u16 {
    u16::from_le_bytes([v[at], v[at + 1]])
}

/// Parses Ethernet (one VLAN tag allowed), IPv4 or IPv6 (hop-by-hop, routing and destination
/// options headers skipped) and the TCP or UDP header. `None` for anything else.
fn l4(frame: &[u8]) -> Option<L4> {
    let mut l3 = 14;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == ETH_VLAN || ethertype == ETH_QINQ {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    let (ipv6, proto, start) = match ethertype {
        ETH_IPV4 => {
            let vihl = *frame.get(l3)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            let frag = be16(frame, l3 + 6)?;
            // Version 4, a whole header, and not a fragment (MF set or an offset: no L4 header
            // of its own, or not all of it).
            if vihl >> 4 != 4 || ihl < 20 || frag & 0x3fff != 0 {
                return None;
            }
            (false, *frame.get(l3 + 9)?, l3 + ihl)
        }
        ETH_IPV6 => {
            if *frame.get(l3)? >> 4 != 6 {
                return None;
            }
            let mut next = *frame.get(l3 + 6)?;
            let mut at = l3 + 40;
            // Hop-by-hop, routing, destination options: (length + 1) × 8 bytes each. A fragment
            // header (44) or anything else ends the walk.
            for _ in 0..8 {
                if !matches!(next, 0 | 43 | 60) {
                    break;
                }
                let len = (usize::from(*frame.get(at + 1)?) + 1) * 8;
                next = *frame.get(at)?;
                at += len;
            }
            (true, next, at)
        }
        _ => return None,
    };
    let end = match proto {
        IP_TCP => {
            let doff = usize::from(*frame.get(start + 12)? >> 4) * 4;
            if doff < 20 {
                return None;
            }
            start + doff
        }
        IP_UDP => start + 8,
        _ => return None,
    };
    (end <= frame.len()).then_some(L4 { ipv6, proto, start, end })
}

/// Checks a peer's virtio-net header against `frame` and returns the header to write to the TAP
/// with it (see the module docs): rebuilt from the frame, never with `DATA_VALID`.
pub fn check(vnet: &[u8; VNET_LEN], frame: &[u8]) -> Result<[u8; VNET_LEN], VnetError> {
    let flags = vnet[0] & !F_DATA_VALID;
    if flags & !F_NEEDS_CSUM != 0 {
        return Err(VnetError::Flags);
    }
    let gso = vnet[1];
    let base = gso & !GSO_ECN;
    if !matches!(base, GSO_NONE | GSO_TCPV4 | GSO_TCPV6) || (base == GSO_NONE && gso != GSO_NONE) {
        return Err(VnetError::GsoType);
    }
    if flags & F_NEEDS_CSUM == 0 {
        if base != GSO_NONE {
            return Err(VnetError::GsoWithoutCsum);
        }
        // Nothing to offload: the frame is complete as it is, and our kernel checks it.
        return Ok([0; VNET_LEN]);
    }
    let l4 = l4(frame).ok_or(VnetError::NotTcpUdp)?;
    if usize::from(le16(vnet, 6)) != l4.start {
        return Err(VnetError::CsumStart);
    }
    let csum_offset = if l4.proto == IP_TCP { TCP_CSUM } else { UDP_CSUM };
    if le16(vnet, 8) != csum_offset {
        return Err(VnetError::CsumOffset);
    }
    let gso_size = if base == GSO_NONE {
        0
    } else {
        let want = if l4.ipv6 { GSO_TCPV6 } else { GSO_TCPV4 };
        if l4.proto != IP_TCP || base != want {
            return Err(VnetError::GsoMismatch);
        }
        let size = le16(vnet, 4);
        if size < MIN_GSO_SIZE || usize::from(size) >= frame.len() {
            return Err(VnetError::GsoSize);
        }
        size
    };
    let mut out = [0u8; VNET_LEN];
    out[0] = F_NEEDS_CSUM;
    out[1] = gso;
    // Both fit: the L4 header ends within the frame, which is far below 64 KiB here (the
    // caller's frames come from a sleeve record), and start < end.
    out[2..4].copy_from_slice(&(l4.end.min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out[4..6].copy_from_slice(&gso_size.to_le_bytes());
    out[6..8].copy_from_slice(&(l4.start.min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + IPv4 (20 bytes) + TCP with 12 bytes of options (32), then `payload` bytes:
    /// a TSO super-frame as a container's stack hands it to the bridge.
    fn tcp4(payload: usize) -> Vec<u8> {
        let total = (20 + 32 + payload) as u16;
        let mut f = vec![
            0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00, // dst, src, IPv4
            0x45, 0x00, (total >> 8) as u8, total as u8, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0, 0, // DF, TTL 64, TCP
            10, 32, 0, 1, 10, 32, 0, 2, // addresses
            0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x80, 0x10, 0x01, 0xf5, 0x12, 0x34, 0, 0, // ports, seq, ack, doff 8, ACK, csum
            0x01, 0x01, 0x08, 0x0a, 0, 0, 0, 1, 0, 0, 0, 2, // NOP NOP timestamps
        ];
        f.resize(f.len() + payload, 0xab);
        f
    }

    /// Ethernet + IPv6 + TCP (20 bytes, no options), then `payload` bytes.
    fn tcp6(payload: usize) -> Vec<u8> {
        let plen = (20 + payload) as u16;
        let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, (plen >> 8) as u8, plen as u8, 6, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0x01, 0xf5, 0, 0, 0, 0]);
        f.resize(f.len() + payload, 0xcd);
        f
    }

    /// Ethernet + 802.1Q tag + IPv4 + UDP (DNS-sized), then `payload` bytes.
    fn udp4_vlan(payload: usize) -> Vec<u8> {
        let total = (20 + 8 + payload) as u16;
        let ulen = (8 + payload) as u16;
        let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x81, 0x00, 0x00, 0x05, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0, 0, 64, 17, 0, 0, 10, 32, 0, 1, 10, 32, 0, 2]);
        f.extend_from_slice(&[0xd4, 0x31, 0x00, 0x35, (ulen >> 8) as u8, ulen as u8, 0, 0]);
        f.resize(f.len() + payload, 0x11);
        f
    }

    /// A virtio-net header from its fields.
    fn hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, offset: u16) -> [u8; VNET_LEN] {
        let mut v = [0u8; VNET_LEN];
        v[0] = flags;
        v[1] = gso;
        v[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        v[4..6].copy_from_slice(&gso_size.to_le_bytes());
        v[6..8].copy_from_slice(&start.to_le_bytes());
        v[8..10].copy_from_slice(&offset.to_le_bytes());
        v
    }

    #[test]
    fn honest_tso_headers_pass_rebuilt() {
        // What a TAP gives for a TCPv4 super-frame: hdr_len is the skb's linear part, not the
        // headers' end; it comes back as the end of the TCP header (14 + 20 + 32).
        let f = tcp4(60_000);
        let v = hdr(F_NEEDS_CSUM, GSO_TCPV4, 1024, 1448, 34, 16);
        assert_eq!(check(&v, &f), Ok(hdr(F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 34, 16)));
        let ecn = hdr(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 66, 1448, 34, 16);
        assert_eq!(check(&ecn, &f), Ok(ecn));
        let f = tcp6(30_000);
        let v = hdr(F_NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16);
        assert_eq!(check(&v, &f), Ok(v));
        // One segment's worth, checksum to complete, no GSO: gso_size and stray hdr_len dropped.
        let f = tcp4(100);
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_NONE, 0, 77, 34, 16), &f), Ok(hdr(F_NEEDS_CSUM, GSO_NONE, 66, 0, 34, 16)));
        let f = udp4_vlan(40);
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 38, 6), &f), Ok(hdr(F_NEEDS_CSUM, GSO_NONE, 46, 0, 38, 6)));
        // Nothing to offload.
        assert_eq!(check(&[0; VNET_LEN], &f), Ok([0; VNET_LEN]));
    }

    #[test]
    fn data_valid_is_never_passed_on() {
        let f = udp4_vlan(40);
        assert_eq!(check(&hdr(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0), &f), Ok([0; VNET_LEN]));
        let f = tcp4(5000);
        let v = hdr(F_NEEDS_CSUM | F_DATA_VALID, GSO_TCPV4, 66, 1448, 34, 16);
        assert_eq!(check(&v, &f), Ok(hdr(F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 34, 16)));
        // Not for frames the kernel cannot parse either: they go up unmarked.
        assert_eq!(check(&hdr(F_DATA_VALID, 0, 0, 0, 0, 0), &[0u8; 20]), Ok([0; VNET_LEN]));
    }

    #[test]
    fn inconsistent_headers_are_refused() {
        let t4 = tcp4(60_000);
        let t6 = tcp6(30_000);
        let u = udp4_vlan(40);
        let good = |g, s| hdr(F_NEEDS_CSUM, g, 66, 1448, s, 16);
        assert_eq!(check(&hdr(F_NEEDS_CSUM | 4, GSO_TCPV4, 66, 1448, 34, 16), &t4), Err(VnetError::Flags));
        // UDP fragmentation offload, USO, and a bare ECN bit.
        assert_eq!(check(&good(3, 34), &t4), Err(VnetError::GsoType));
        assert_eq!(check(&good(5, 34), &t4), Err(VnetError::GsoType));
        assert_eq!(check(&good(GSO_ECN, 34), &t4), Err(VnetError::GsoType));
        assert_eq!(check(&hdr(0, GSO_TCPV4, 66, 1448, 34, 16), &t4), Err(VnetError::GsoWithoutCsum));
        // Checksum placed elsewhere than the TCP header: into the IP header, past the frame.
        assert_eq!(check(&good(GSO_TCPV4, 14), &t4), Err(VnetError::CsumStart));
        assert_eq!(check(&good(GSO_TCPV4, 65_000), &t4), Err(VnetError::CsumStart));
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 34, 6), &t4), Err(VnetError::CsumOffset));
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 38, 16), &u), Err(VnetError::CsumOffset));
        // GSO that does not match the frame.
        assert_eq!(check(&good(GSO_TCPV6, 34), &t4), Err(VnetError::GsoMismatch));
        assert_eq!(check(&good(GSO_TCPV4, 54), &t6), Err(VnetError::GsoMismatch));
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 46, 1400, 38, 6), &u), Err(VnetError::GsoMismatch));
        // Segment sizes: zero, tiny (thousands of segments), the whole frame or more.
        for size in [0, 1, MIN_GSO_SIZE - 1, t4.len() as u16, u16::MAX] {
            assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 66, size, 34, 16), &t4), Err(VnetError::GsoSize), "{size}");
        }
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 66, MIN_GSO_SIZE, 34, 16), &t4).map(|_| ()), Ok(()));
    }

    #[test]
    fn checksum_offload_needs_a_whole_tcp_or_udp_header() {
        let v = hdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16);
        // ARP, cut short, ICMP, an IPv4 fragment.
        let mut arp = tcp4(0);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(check(&v, &arp), Err(VnetError::NotTcpUdp));
        assert_eq!(check(&v, &tcp4(0)[..60]), Err(VnetError::NotTcpUdp));
        let mut icmp = tcp4(0);
        icmp[23] = 1;
        assert_eq!(check(&v, &icmp), Err(VnetError::NotTcpUdp));
        let mut frag = tcp4(100);
        frag[20] = 0x20; // MF
        assert_eq!(check(&v, &frag), Err(VnetError::NotTcpUdp));
        // A TCP data offset below 5 words.
        let mut doff = tcp4(100);
        doff[46] = 0x40;
        assert_eq!(check(&v, &doff), Err(VnetError::NotTcpUdp));
        // IPv6 with a destination options header (8 bytes) before TCP: found behind it.
        let mut f = tcp6(100);
        f[20] = 60;
        f.splice(54..54, [6u8, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_TCPV6, 0, 1400, 62, 16), &f), Err(VnetError::GsoSize));
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 62, 16), &f), Ok(hdr(F_NEEDS_CSUM, GSO_NONE, 82, 0, 62, 16)));
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 54, 16), &f), Err(VnetError::CsumStart));
        // IPv6 fragment header: refused.
        f[20] = 44;
        assert_eq!(check(&hdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 62, 16), &f), Err(VnetError::NotTcpUdp));
    }
}
