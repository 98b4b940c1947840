//! Probes weft runs itself from inside a network namespace, so the lab needs no `ping` or `dig`:
//! an ICMP echo ([`icmp_echo`]) and a DNS A query ([`dns_query_a`]).
//!
//! Each probe runs on a short-lived thread that enters the namespace with `setns(CLONE_NEWNET)`
//! ([`in_netns`]); the namespace change affects that thread only, and the thread ends with the probe.
//! The packet formats are pure functions ([`echo_request`], [`is_echo_reply`], [`encode_query`],
//! [`parse_answer`]) tested on literal bytes.
//!
//! Left out: IPv6, TCP fallback for truncated DNS answers, EDNS, record types other than A.
//! Both probes need root (entering a namespace needs CAP_SYS_ADMIN; the ICMP probe uses a raw socket,
//! CAP_NET_RAW, because unprivileged ICMP "ping" sockets depend on `net.ipv4.ping_group_range`, which
//! is "1 0" (nobody) in a fresh namespace).

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// ICMP echo payload size, as `ping`'s default: an 8-byte timestamp and 48 pattern bytes.
const ECHO_PAYLOAD_LEN: usize = 56;
/// Longest DNS name in text form without the trailing dot (RFC 1035 2.3.4: 255 octets on the wire).
const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 2.3.4).
const MAX_LABEL_LEN: usize = 63;
/// Compression pointers followed while reading one name: a 255-octet name has at most 127 labels,
/// so a well-formed name never needs more; anything beyond is a pointer cycle.
const MAX_POINTER_HOPS: usize = 127;

static ECHO_SEQ: AtomicU16 = AtomicU16::new(0);

/// Runs `f` on a new thread that has entered the network namespace at `netns` (a file such as
/// `/run/netns/NAME` or `/proc/PID/ns/net`) and returns its result. The thread is joined before
/// this returns and the namespace fd closed, so nothing else in the process ever runs in the
/// namespace. `f` must not block without a timeout. Needs root (CAP_SYS_ADMIN).
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let shown = netns.display();
    let ns = File::open(netns).with_context(|| {
        format!("entering network namespace {shown}: cannot open it (does it exist?)")
    })?;
    thread::scope(|s| {
        let handle = thread::Builder::new()
            .name("weft-lab-netns".into())
            .spawn_scoped(s, || {
                // SAFETY: setns(2) on an fd we hold open for the whole call; CLONE_NEWNET moves
                // only the calling thread, which is this fresh thread and ends when `f` returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "entering network namespace {shown}: setns: {} (this needs root)",
                        std::io::Error::last_os_error()
                    );
                }
                f()
            })
            .with_context(|| format!("starting a thread to enter network namespace {shown}"))?;
        handle
            .join()
            .map_err(|_| anyhow!("the thread working in network namespace {shown} panicked"))?
    })
}

/// Sends one ICMP echo request to `dst` from inside the namespace at `netns` and waits up to
/// `timeout` for the matching reply; returns the round-trip time. Uses a raw ICMP socket (root).
pub fn icmp_echo(netns: &Path, dst: Ipv4Addr, timeout: Duration) -> Result<Duration> {
    let id = random_u16();
    let seq = ECHO_SEQ.fetch_add(1, Ordering::Relaxed);
    let payload = echo_payload();
    let packet = echo_request(id, seq, &payload);
    in_netns(netns, || {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            bail!(
                "opening a raw ICMP socket in {}: {} (this needs root or CAP_NET_RAW)",
                netns.display(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: `fd` is a fresh socket that nothing else owns; OwnedFd closes it on every path.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let to = sockaddr_in(dst);
        let sent_at = Instant::now();
        // SAFETY: sendto(2) reading `packet` (valid for its length) and a sockaddr_in of the given size.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!(
                "sending an ICMP echo request to {dst}: {}",
                std::io::Error::last_os_error()
            );
        }
        let deadline = sent_at + timeout;
        // Room for any IPv4 packet the interface MTU lets through; longer ones are not ours.
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = recv_before(&sock, &mut buf, deadline)
                .with_context(|| format!("waiting for an ICMP echo reply from {dst}"))?;
            let Some(n) = n else {
                bail!("no echo reply from {dst} within {timeout:?}");
            };
            // The raw socket sees every ICMP packet of the namespace (our own request too, on
            // loopback): keep only the reply to this request.
            if is_echo_reply(&buf[..n], dst, id, seq, &payload) {
                return Ok(sent_at.elapsed());
            }
        }
    })
}

/// Waits (poll) until `sock` is readable or `deadline`; then reads one packet. `Ok(None)` on timeout.
fn recv_before(sock: &OwnedFd, buf: &mut [u8], deadline: Instant) -> Result<Option<usize>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        // Round up so a sub-millisecond remainder still waits rather than spinning.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            bail!("poll: {e}");
        }
        if r == 0 {
            continue;
        }
        // SAFETY: recv(2) writing at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) {
                continue;
            }
            bail!("recv: {e}");
        }
        return Ok(Some(n as usize));
    }
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The Internet checksum (RFC 1071): one's complement of the one's complement sum of the 16-bit
/// big-endian words, an odd last byte padded with zero.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (type 8, code 0) with its checksum (RFC 792).
pub fn echo_request(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + payload.len());
    p.extend_from_slice(&[8, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Whether `packet` (an IPv4 packet as a raw ICMP socket delivers it, header included) is the
/// echo reply from `from` to the request `id`/`seq` carrying `payload`, with a valid ICMP checksum.
pub fn is_echo_reply(packet: &[u8], from: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4
        || ihl < 20
        || packet.len() < ihl + 8
        || packet[9] != libc::IPPROTO_ICMP as u8
    {
        return false;
    }
    if packet[12..16] != from.octets() {
        return false;
    }
    let icmp = &packet[ihl..];
    icmp[0] == 0
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && &icmp[8..] == payload
        && checksum(icmp) == 0
}

/// `ping`-style payload: the send time (ns since the Unix epoch, big-endian), then 0x10, 0x11, ...
fn echo_payload() -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut p = now.to_be_bytes().to_vec();
    p.extend((0x10u8..).take(ECHO_PAYLOAD_LEN - 8));
    p
}

/// 16 random bits from the kernel (getrandom), or from the clock if that fails.
fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 2 {
        return u16::from_ne_bytes(b);
    }
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ (t >> 16) ^ std::process::id()) as u16
}

/// Asks the DNS server `server` (UDP port 53) for the A records of `name`, from inside the
/// namespace at `netns`, waiting up to `timeout` for the answer. Returns the addresses, empty if
/// the name does not exist (NXDOMAIN) or has no A record. Errors on SERVFAIL and other failures,
/// malformed answers, no answer in time, or nothing listening. Replies with another id (stale
/// answers) are ignored.
pub fn dns_query_a(
    netns: &Path,
    server: Ipv4Addr,
    name: &str,
    timeout: Duration,
) -> Result<Vec<Ipv4Addr>> {
    let id = random_u16();
    let query = encode_query(id, name)?;
    in_netns(netns, || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .with_context(|| format!("opening a UDP socket in {}", netns.display()))?;
        sock.connect((server, 53)).with_context(|| {
            format!("DNS query for {name}: connecting a UDP socket to {server}:53")
        })?;
        let deadline = Instant::now() + timeout;
        sock.send(&query)
            .with_context(|| format!("sending the DNS query for {name} to {server}:53"))?;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no DNS answer from {server}:53 for {name} within {timeout:?}");
            }
            sock.set_read_timeout(Some(left))?;
            match sock.recv(&mut buf) {
                Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => {
                    return parse_answer(id, &buf[..n])
                        .with_context(|| format!("the DNS answer from {server}:53 for {name}"));
                }
                Ok(_) => {} // a late answer to some earlier query: not ours
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no DNS answer from {server}:53 for {name} within {timeout:?}");
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    bail!("DNS query for {name}: {server} refused it (port unreachable: no DNS server listens on UDP 53 there)");
                }
                Err(e) => bail!("waiting for the DNS answer from {server}:53 for {name}: {e}"),
            }
        }
    })
}

/// A DNS query message (RFC 1035 4.1): header with `id` and RD set, one question for `name`,
/// QTYPE A, QCLASS IN. `name` may end with a dot; labels are 1-63 bytes of printable ASCII, the
/// name at most 253 characters.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        bail!("DNS name {name:?} is empty");
    }
    if bare.len() > MAX_NAME_LEN {
        bail!(
            "DNS name {name:?} is {} characters long; at most {MAX_NAME_LEN} are allowed",
            bare.len()
        );
    }
    if let Some(c) = bare.chars().find(|c| !c.is_ascii_graphic()) {
        bail!("DNS name {name:?} contains {c:?}; only printable ASCII is allowed (use punycode for others)");
    }
    // header: id, flags (RD), QDCOUNT 1, ANCOUNT, NSCOUNT, ARCOUNT 0
    let mut m = Vec::with_capacity(12 + bare.len() + 6);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in bare.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            bail!(
                "DNS name {name:?} has a label of {} bytes ({label:?}); labels are 1 to {MAX_LABEL_LEN} bytes",
                label.len()
            );
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&[0, 1, 0, 1]); // QTYPE A, QCLASS IN
    Ok(m)
}

/// The A records (type A, class IN) in the answer section of DNS response `msg` to query `id`.
/// NXDOMAIN gives an empty list; SERVFAIL, REFUSED, other error codes, a truncated (TC) answer,
/// a wrong id, a message that is not a response, and any malformed or out-of-bounds field are
/// errors. Never panics.
pub fn parse_answer(id: u16, msg: &[u8]) -> Result<Vec<Ipv4Addr>> {
    if msg.len() < 12 {
        bail!(
            "DNS answer is {} bytes, shorter than the 12-byte header",
            msg.len()
        );
    }
    let got = u16::from_be_bytes([msg[0], msg[1]]);
    if got != id {
        bail!("DNS answer has id {got:#06x}, the query had {id:#06x}");
    }
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 == 0 {
        bail!("DNS message with id {id:#06x} is a query, not an answer (QR is 0)");
    }
    if flags & 0x0200 != 0 {
        bail!("DNS answer is truncated (TC set); it would need TCP, which this probe does not do");
    }
    match flags & 0x000f {
        0 => {}
        3 => return Ok(Vec::new()), // NXDOMAIN: the name does not exist
        2 => bail!("the DNS server failed to answer (SERVFAIL)"),
        5 => bail!("the DNS server refused the query (REFUSED)"),
        rcode => bail!("DNS answer has error code {rcode}"),
    }
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = 12;
    for q in 0..qdcount {
        let (_, end) = read_name(msg, pos).with_context(|| format!("DNS answer: question {q}"))?;
        pos = end + 4; // QTYPE, QCLASS
        if pos > msg.len() {
            bail!("DNS answer: question {q} is cut off at byte {}", msg.len());
        }
    }
    let mut addrs = Vec::new();
    for r in 0..ancount {
        let (_, end) = read_name(msg, pos).with_context(|| format!("DNS answer: record {r}"))?;
        let Some(fixed) = msg.get(end..end + 10) else {
            bail!("DNS answer: record {r} is cut off at byte {}", msg.len());
        };
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data_at = end + 10;
        let Some(rdata) = msg.get(data_at..data_at + rdlen) else {
            bail!(
                "DNS answer: record {r} is cut off: it has {rdlen} data bytes from byte {data_at}, the message ends at byte {}",
                msg.len()
            );
        };
        if rtype == 1 && class == 1 {
            let Ok(a) = <[u8; 4]>::try_from(rdata) else {
                bail!("DNS answer: A record {r} has {rdlen} data bytes, not 4");
            };
            addrs.push(Ipv4Addr::from(a));
        }
        pos = data_at + rdlen;
    }
    Ok(addrs)
}

/// Reads the (possibly compressed) name at `pos` of `msg`. Returns it in text form (bytes as
/// sent, no trailing dot; "." for the root) and the offset just after the name where it
/// starts, i.e. after its first pointer if it has one. Every offset is bounds-checked, pointer
/// hops are limited (cycles are errors), and the name may not exceed 255 octets.
fn read_name(msg: &[u8], pos: usize) -> Result<(String, usize)> {
    let mut name = String::new();
    let mut at = pos;
    let mut end = None; // where the name ends in the record, fixed at the first pointer
    let mut hops = 0;
    let mut wire_len = 0;
    loop {
        let Some(&len) = msg.get(at) else {
            bail!("name at byte {pos} runs past the end of the message (byte {at})");
        };
        match len & 0xc0 {
            0x00 if len == 0 => {
                if name.is_empty() {
                    name.push('.');
                }
                return Ok((name, end.unwrap_or(at + 1)));
            }
            0x00 => {
                let l = usize::from(len);
                let Some(label) = msg.get(at + 1..at + 1 + l) else {
                    bail!(
                        "name at byte {pos}: label at byte {at} runs past the end of the message"
                    );
                };
                wire_len += 1 + l;
                if wire_len + 1 > 255 {
                    bail!("name at byte {pos} is longer than 255 octets");
                }
                if !name.is_empty() {
                    name.push('.');
                }
                name.extend(label.iter().map(|&b| char::from(b)));
                at += 1 + l;
            }
            0xc0 => {
                let Some(&low) = msg.get(at + 1) else {
                    bail!("name at byte {pos}: compression pointer at byte {at} is cut off");
                };
                hops += 1;
                if hops > MAX_POINTER_HOPS {
                    bail!("name at byte {pos}: compression pointers loop");
                }
                end.get_or_insert(at + 2);
                at = usize::from(u16::from_be_bytes([len & 0x3f, low]));
            }
            _ => bail!("name at byte {pos}: unsupported label type {len:#04x} at byte {at}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn checksum_rfc1071_example() {
        // RFC 1071 section 3: the words sum to 0x2ddf0, folded 0xddf2; the checksum is its complement.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        // odd length: the last byte is padded with a zero
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234u16 + 0x5600));
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn echo_request_bytes() {
        let p = echo_request(0x1234, 1, b"abcd");
        // 0x0800 + 0x1234 + 0x0001 + 0x6162 + 0x6364 = 0xdefb; checksum 0x2104
        assert_eq!(
            p,
            [0x08, 0x00, 0x21, 0x04, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c', b'd']
        );
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        let q = echo_request(0xffff, 0xffff, &[0xff; 57]);
        assert_eq!(checksum(&q), 0);
    }

    /// An IPv4 packet from 192.168.77.2 to .1 with an echo reply for id 0x1234 seq 1, payload "abcd".
    fn reply() -> Vec<u8> {
        vec![
            0x45, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x40, 0x01, 0x00, 0x00, //
            192, 168, 77, 2, 192, 168, 77, 1, //
            0x00, 0x00, 0x29, 0x04, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c', b'd',
        ]
    }

    #[test]
    fn echo_reply_matching() {
        let from = Ipv4Addr::new(192, 168, 77, 2);
        let p = reply();
        assert!(is_echo_reply(&p, from, 0x1234, 1, b"abcd"));
        assert!(
            !is_echo_reply(&p, Ipv4Addr::new(192, 168, 77, 3), 0x1234, 1, b"abcd"),
            "other source"
        );
        assert!(!is_echo_reply(&p, from, 0x1235, 1, b"abcd"), "other id");
        assert!(!is_echo_reply(&p, from, 0x1234, 2, b"abcd"), "other seq");
        assert!(
            !is_echo_reply(&p, from, 0x1234, 1, b"abce"),
            "other payload"
        );
        let mut bad = p.clone();
        bad[22] ^= 1;
        assert!(
            !is_echo_reply(&bad, from, 0x1234, 1, b"abcd"),
            "bad checksum"
        );
        // our own request, as the raw socket also sees it on loopback
        let mut req = p[..20].to_vec();
        req.extend(echo_request(0x1234, 1, b"abcd"));
        assert!(
            !is_echo_reply(&req, from, 0x1234, 1, b"abcd"),
            "an echo request"
        );
        let mut udp = p.clone();
        udp[9] = 17;
        assert!(!is_echo_reply(&udp, from, 0x1234, 1, b"abcd"), "not ICMP");
        // IP options: IHL 6, four option bytes before the ICMP message
        let mut opts = p[..20].to_vec();
        opts[0] = 0x46;
        opts.extend([1, 1, 1, 1]);
        opts.extend(&p[20..]);
        assert!(is_echo_reply(&opts, from, 0x1234, 1, b"abcd"));
        for n in 0..p.len() {
            assert!(
                !is_echo_reply(&p[..n], from, 0x1234, 1, b"abcd"),
                "cut at {n}"
            );
        }
        let mut short_ihl = p.clone();
        short_ihl[0] = 0x44;
        assert!(!is_echo_reply(&short_ihl, from, 0x1234, 1, b"abcd"));
    }

    #[test]
    fn echo_payload_is_ping_sized() {
        let p = echo_payload();
        assert_eq!(p.len(), ECHO_PAYLOAD_LEN);
        assert_eq!(p[8], 0x10);
        assert_eq!(p[55], 0x10 + 47);
    }

    #[test]
    fn encode_query_bytes() {
        let q = encode_query(0xbeef, "c1.weft.local").unwrap();
        let want: &[u8] = &[
            0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            2, b'c', b'1', 4, b'w', b'e', b'f', b't', 5, b'l', b'o', b'c', b'a', b'l', 0, //
            0x00, 0x01, 0x00, 0x01,
        ];
        assert_eq!(q, want);
        assert_eq!(
            encode_query(0xbeef, "c1.weft.local.").unwrap(),
            want,
            "trailing dot"
        );
    }

    #[test]
    fn encode_query_rejects_bad_names() {
        let long_label = format!("{}.local", "x".repeat(64));
        let long_name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(long_name.len(), 254);
        for (bad, why) in [
            ("", "empty"),
            (".", "empty"),
            ("a..b", "label of 0"),
            (".a", "label of 0"),
            (long_label.as_str(), "label of 64"),
            (long_name.as_str(), "254 characters"),
            ("a b", "' '"),
            ("ä.local", "punycode"),
        ] {
            let err = format!("{:#}", encode_query(1, bad).unwrap_err());
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let ok = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(ok.len(), 253);
        assert_eq!(encode_query(1, &ok).unwrap().len(), 12 + 255 + 4);
    }

    /// A real answer (the shape of a weft DNS / dnsmasq reply) to id 0xbeef for web.weft.local:
    /// a CNAME-free answer with two A records whose owner names are compression pointers to the
    /// question (0xc00c), the second record's owner a pointer chain through the first.
    fn answer() -> Vec<u8> {
        vec![
            0xbe, 0xef, 0x81, 0x80, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, //
            // question at 12: web.weft.local A IN
            3, b'w', b'e', b'b', 4, b'w', b'e', b'f', b't', 5, b'l', b'o', b'c', b'a', b'l', 0,
            0x00, 0x01, 0x00, 0x01, //
            // answer 1 at 32: c00c A IN ttl 30 len 4 10.32.0.5
            0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x1e, 0x00, 0x04, 10, 32, 0,
            5, //
            // answer 2 at 48: TXT record (skipped) owned by "x" + pointer to "weft.local" (offset 16)
            1, b'x', 0xc0, 0x10, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x1e, 0x00, 0x03, 2,
            b'h', b'i', //
            // answer 3 at 65: owner pointer to answer 2's owner (offset 48), A 10.32.0.6
            0xc0, 0x30, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x1e, 0x00, 0x04, 10, 32, 0, 6,
        ]
    }

    #[test]
    fn parse_real_answer_with_compression() {
        let a = answer();
        assert_eq!(
            parse_answer(0xbeef, &a).unwrap(),
            [Ipv4Addr::new(10, 32, 0, 5), Ipv4Addr::new(10, 32, 0, 6)]
        );
        assert_eq!(
            read_name(&a, 12).unwrap(),
            ("web.weft.local".to_string(), 28)
        );
        assert_eq!(
            read_name(&a, 32).unwrap(),
            ("web.weft.local".to_string(), 34)
        );
        assert_eq!(read_name(&a, 48).unwrap(), ("x.weft.local".to_string(), 52));
        assert_eq!(read_name(&a, 65).unwrap(), ("x.weft.local".to_string(), 67));
        assert_eq!(a.len(), 81);
    }

    #[test]
    fn parse_nxdomain_and_errors() {
        // NXDOMAIN: header (rcode 3), question echoed, an SOA in authority (not parsed)
        let mut nx = answer()[..32].to_vec();
        nx[3] = 0x83;
        nx[7] = 0; // ANCOUNT 0
        assert!(parse_answer(0xbeef, &nx).unwrap().is_empty());
        for (rcode, want) in [(2, "SERVFAIL"), (5, "REFUSED"), (4, "error code 4")] {
            let mut m = nx.clone();
            m[3] = 0x80 | rcode;
            let err = format!("{:#}", parse_answer(0xbeef, &m).unwrap_err());
            assert!(err.contains(want), "{err}");
        }
        // NOERROR without answers
        let mut empty = nx.clone();
        empty[3] = 0x80;
        assert!(parse_answer(0xbeef, &empty).unwrap().is_empty());
        // wrong id
        let err = format!("{:#}", parse_answer(0xbeee, &answer()).unwrap_err());
        assert!(err.contains("id 0xbeef") && err.contains("0xbeee"), "{err}");
        // a query, not an answer
        let q = encode_query(0xbeef, "web.weft.local").unwrap();
        assert!(format!("{:#}", parse_answer(0xbeef, &q).unwrap_err()).contains("QR is 0"));
        // TC
        let mut tc = answer();
        tc[2] |= 0x02;
        assert!(format!("{:#}", parse_answer(0xbeef, &tc).unwrap_err()).contains("truncated"));
        // A record with 5 data bytes
        let mut a5 = answer()[..48].to_vec();
        a5[7] = 1;
        a5[43] = 5;
        a5.push(7);
        assert!(format!("{:#}", parse_answer(0xbeef, &a5).unwrap_err()).contains("not 4"));
    }

    #[test]
    fn parse_truncated_answers_fail_cleanly() {
        let a = answer();
        for n in 0..a.len() {
            let r = parse_answer(0xbeef, &a[..n]);
            assert!(r.is_err(), "answer cut at {n} bytes parsed: {r:?}");
        }
        let err = format!("{:#}", parse_answer(0xbeef, &a[..40]).unwrap_err());
        assert!(err.contains("record 0 is cut off"), "{err}");
        let err = format!("{:#}", parse_answer(0xbeef, &a[..5]).unwrap_err());
        assert!(err.contains("12-byte header"), "{err}");
    }

    #[test]
    fn pointer_loops_and_bad_pointers_are_errors() {
        // the question's name is a pointer to itself
        let mut self_loop = answer()[..12].to_vec();
        self_loop.extend([0xc0, 0x0c, 0, 1, 0, 1]);
        let err = format!("{:#}", parse_answer(0xbeef, &self_loop).unwrap_err());
        assert!(err.contains("loop"), "{err}");
        // two labels pointing at each other: "a" -> ptr 16, "b" -> ptr 12
        let mut two = answer()[..12].to_vec();
        two.extend([1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12]);
        let err = format!("{:#}", parse_answer(0xbeef, &two).unwrap_err());
        assert!(err.contains("loop") || err.contains("255 octets"), "{err}");
        // a pointer past the end
        let mut far = answer()[..12].to_vec();
        far.extend([0xc1, 0x00, 0, 1, 0, 1]);
        assert!(format!("{:#}", parse_answer(0xbeef, &far).unwrap_err()).contains("past the end"));
        // label type 0x40 (extended, obsolete)
        let mut ext = answer()[..12].to_vec();
        ext.extend([0x41, 0, 0, 1, 0, 1]);
        assert!(format!("{:#}", parse_answer(0xbeef, &ext).unwrap_err()).contains("label type"));
    }

    /// Deterministic xorshift64 (no proptest in this crate).
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn parse_answer_never_panics_on_garbage() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let base = answer();
        for round in 0..200_000 {
            let msg: Vec<u8> = match round % 3 {
                // random bytes, with the right id and QR set so parsing goes past the header
                0 => {
                    let len = (rng.next() % 600) as usize;
                    let mut m: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if m.len() >= 4 {
                        m[0] = 0xbe;
                        m[1] = 0xef;
                        m[2] |= 0x80;
                        m[2] &= !0x02;
                        m[3] &= 0xf0;
                    }
                    m
                }
                // the real answer with a few bytes changed
                1 => {
                    let mut m = base.clone();
                    for _ in 0..1 + rng.next() % 4 {
                        let i = 2 + (rng.next() as usize) % (m.len() - 2);
                        m[i] = rng.next() as u8;
                    }
                    m
                }
                // the real answer cut short, maybe with random bytes appended
                _ => {
                    let mut m = base[..(rng.next() as usize) % base.len()].to_vec();
                    m.extend((0..rng.next() % 8).map(|_| rng.next() as u8));
                    m
                }
            };
            if let Ok(addrs) = parse_answer(0xbeef, &msg) {
                assert!(addrs.len() <= usize::from(u16::MAX));
            }
        }
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let p = Path::new("/run/netns/weft-lab-no-such-namespace");
        let err = format!(
            "{:#}",
            icmp_echo(p, Ipv4Addr::LOCALHOST, Duration::from_millis(100)).unwrap_err()
        );
        assert!(
            err.contains("entering network namespace /run/netns/weft-lab-no-such-namespace"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            dns_query_a(
                p,
                Ipv4Addr::LOCALHOST,
                "x.local",
                Duration::from_millis(100)
            )
            .unwrap_err()
        );
        assert!(err.contains("entering network namespace"), "{err}");
        let err = format!(
            "{:#}",
            dns_query_a(p, Ipv4Addr::LOCALHOST, "a..b", Duration::from_millis(100)).unwrap_err()
        );
        assert!(
            err.contains("label of 0 bytes"),
            "the name is checked first: {err}"
        );
    }
}
