//! The sleeve's UDP socket: batched receive (GRO, recvmmsg) through quinn-udp, segmented send
//! (GSO, `UDP_SEGMENT`) with our own `sendmsg` so that every error reaches us (quinn-udp keeps
//! them: it drops a too-big datagram silently and turns GSO off for the whole socket on one
//! failure), and large socket buffers.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use quinn_udp::{RecvMeta, UdpSocketState};

use super::stats::{DropReason, Stats};
use super::tap::wait_fd;

/// Socket buffer size asked for (forced as root), so bursts are not dropped.
pub const SOCKET_BUFFER: usize = 8 << 20;
/// Largest UDP payload of one segmented send: a GSO send is one IP packet
/// before segmentation, so its payload obeys the 16-bit IPv4 length
/// (65535 − 20 − 8).
const MAX_GSO_BYTES: usize = 65_507;
/// How often a send retries while the socket buffer is full, 10 ms apart.
const SEND_TRIES: u32 = 50;
/// `UDP_SEGMENT` (linux/udp.h): the control message that asks for GSO.
const UDP_SEGMENT: libc::c_int = 103;

/// What a send found out about the path, for the link to act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendNews {
    /// Datagrams were bigger than the path MTU the kernel knows (they were dropped): read it
    /// again now.
    pub too_big: bool,
    /// GSO failed towards this peer and was turned off for it.
    pub gso_failed: bool,
}

/// The sleeve socket.
pub struct SleeveSocket {
    sock: UdpSocket,
    state: UdpSocketState,
    max_datagram: usize,
    /// Bound to an IPv6 address (`[::]`: dual-stack, IPv4 peers as mapped addresses).
    v6: bool,
}

/// `a` with an IPv4-mapped IPv6 address (what a dual-stack socket reports for an IPv4 peer)
/// written as the IPv4 address it is, so that one peer has one address whatever the socket.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// `a` as a socket of family `v6` takes it: an IPv4 address mapped for an IPv6 socket.
fn for_socket(a: SocketAddr, v6: bool) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) if v6 => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        other => other,
    }
}

impl SleeveSocket {
    /// Wraps a bound socket; `max_datagram` is the largest UDP payload to send.
    pub fn new(sock: UdpSocket, max_datagram: usize) -> anyhow::Result<Self> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        for (what, r) in [
            ("receive", force_buffer(&sock, libc::SO_RCVBUFFORCE, SOCKET_BUFFER)),
            ("send", force_buffer(&sock, libc::SO_SNDBUFFORCE, SOCKET_BUFFER)),
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, what, "could not force the UDP socket buffer size; bursts may be dropped");
            }
        }
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(SleeveSocket { sock, state, max_datagram, v6 })
    }

    /// The largest UDP payload sent.
    pub fn max_datagram(&self) -> usize {
        self.max_datagram
    }

    /// GSO segments the kernel takes per send, as detected.
    pub fn gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// GRO segments the kernel may hand over per receive.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// The raw descriptor, for poll(2).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    /// Our address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Sends one datagram now, never waiting (the socket does not block): for the control
    /// channel's QUIC packets, whose losses QUIC repairs.
    pub fn send_one(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        sendmsg(self.sock.as_raw_fd(), for_socket(to, self.v6), datagram, None)
    }

    /// Receives a batch; `Ok(0)` when nothing is waiting.
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], metas: &mut [RecvMeta]) -> std::io::Result<usize> {
        match self.state.recv((&self.sock).into(), bufs, metas) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Sends `wire` (datagrams of `seg` bytes, the last maybe shorter) to `to`, in as few
    /// segmented sends as the kernel takes while `gso` (the link's) holds. Failures are counted,
    /// not returned; what they say about the path is:
    /// - a GSO send refused for the device's sake (`EIO`: no checksum offload on the way out;
    ///   `EINVAL` for a segment the path takes) turns `gso` off, for this link only, and the
    ///   datagrams go one by one;
    /// - a datagram over the path MTU the kernel knows (`EMSGSIZE`, or `EINVAL` for a GSO
    ///   segment) is dropped and reported as `too_big`.
    pub fn send_all(&self, to: SocketAddr, wire: &[u8], seg: usize, gso: &AtomicBool, stats: &Stats) -> SendNews {
        self.send_all_with(to, wire, seg, gso, stats, &sendmsg)
    }

    /// [`Self::send_all`] with `sendmsg` as the system call (the tests put errors in).
    fn send_all_with(&self, to: SocketAddr, wire: &[u8], seg: usize, gso: &AtomicBool, stats: &Stats, sendmsg: &SendMsg<'_>) -> SendNews {
        let mut news = SendNews::default();
        let segments = if gso.load(Relaxed) { self.state.max_gso_segments() } else { 1 };
        for chunk in wire.chunks(seg * gso_batch(seg, segments)) {
            match self.send(to, chunk, seg, stats, sendmsg) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    news.too_big = true;
                    stats.drop_n(DropReason::PathMtu, chunk.len().div_ceil(seg) as u64);
                }
                Err(e) if chunk.len() > seg && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                    if e.raw_os_error() == Some(libc::EINVAL) && path_mtu(to).is_ok_and(|m| datagram_for_mtu(m, to) < seg) {
                        news.too_big = true;
                        stats.drop_n(DropReason::PathMtu, chunk.len().div_ceil(seg) as u64);
                        continue;
                    }
                    if gso.swap(false, Relaxed) {
                        news.gso_failed = true;
                        tracing::warn!(%to, error = %e, "segmentation offload (GSO) failed towards this peer: its datagrams go one by one from now on (other peers keep GSO)");
                    }
                    for d in chunk.chunks(seg) {
                        if let Err(e) = self.send(to, d, seg, stats, sendmsg) {
                            send_failed(to, &e, stats);
                        }
                    }
                }
                Err(e) => send_failed(to, &e, stats),
            }
        }
        news
    }

    /// One send of `contents` in datagrams of `seg` bytes, waiting briefly (at most
    /// [`SEND_TRIES`] × 10 ms) while the socket buffer is full.
    fn send(&self, destination: SocketAddr, contents: &[u8], seg: usize, stats: &Stats, sendmsg: &SendMsg<'_>) -> std::io::Result<()> {
        let gso = (contents.len() > seg).then(|| u16::try_from(seg).unwrap_or(u16::MAX));
        let destination = for_socket(destination, self.v6);
        let mut tries = 0;
        loop {
            match sendmsg(self.sock.as_raw_fd(), destination, contents, gso) {
                Ok(()) => {
                    stats.datagrams_out.fetch_add(contents.len().div_ceil(seg) as u64, Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < SEND_TRIES => {
                    tries += 1;
                    wait_fd(self.sock.as_raw_fd(), libc::POLLOUT, 10);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The shape of [`sendmsg`].
type SendMsg<'a> = dyn Fn(std::os::fd::RawFd, SocketAddr, &[u8], Option<u16>) -> std::io::Result<()> + 'a;

/// One `sendmsg(2)` of `contents` to `to`, cut by the kernel into datagrams of `segment` bytes
/// when given (`UDP_SEGMENT`).
fn sendmsg(fd: std::os::fd::RawFd, to: SocketAddr, contents: &[u8], segment: Option<u16>) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let addr_len = match to {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe { &mut *(&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let mut iov = libc::iovec { iov_base: contents.as_ptr() as *mut libc::c_void, iov_len: contents.len() };
    // Room for one cmsghdr with a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: all-zero is a valid msghdr; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = addr_len as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(seg) = segment {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the header and its data fit `control`
        // (32 bytes, of which a u16's cmsg takes 20), which CMSG_FIRSTHDR points into.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        }
    }
    // SAFETY: a valid descriptor and a msghdr whose buffers live until it returns.
    let r = unsafe { libc::sendmsg(fd, &msg, 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn send_failed(to: SocketAddr, e: &std::io::Error, stats: &Stats) {
    stats.drop(DropReason::UdpSend);
    tracing::debug!(error = %e, %to, "sleeve send failed");
}

/// Datagrams per GSO send: what the kernel takes, and no more than fits [`MAX_GSO_BYTES`].
fn gso_batch(seg: usize, max_segments: usize) -> usize {
    (MAX_GSO_BYTES / seg.max(1)).clamp(1, max_segments.max(1))
}

fn force_buffer(sock: &UdpSocket, opt: libc::c_int, size: usize) -> std::io::Result<()> {
    let v = size as libc::c_int;
    // SAFETY: setsockopt with a pointer to a c_int of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The path MTU the kernel knows towards `to` (from its routes and the ICMP "fragmentation
/// needed" / "packet too big" messages it took in), read from a socket connected to it.
pub fn path_mtu(to: SocketAddr) -> std::io::Result<usize> {
    let local: SocketAddr = if to.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let s = UdpSocket::bind(local)?;
    s.connect(to)?;
    let (level, opt) = if to.is_ipv4() { (libc::IPPROTO_IP, libc::IP_MTU) } else { (libc::IPPROTO_IPV6, libc::IPV6_MTU) };
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the size given.
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), level, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(v).unwrap_or(0))
}

/// The largest sleeve datagram (UDP payload) that fits a path MTU towards `to`.
pub fn datagram_for_mtu(mtu: usize, to: SocketAddr) -> usize {
    let headers = if to.is_ipv4() { 20 + 8 } else { 40 + 8 };
    mtu.saturating_sub(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_sends_stay_within_one_ip_packet() {
        // 64 segments of 1472 bytes would be 94 KB: the kernel refuses that with EMSGSIZE.
        assert_eq!(gso_batch(1472, 64), 44);
        assert!(gso_batch(1472, 64) * 1472 <= MAX_GSO_BYTES);
        assert_eq!(gso_batch(1000, 64), 64);
        assert_eq!(gso_batch(1472, 1), 1);
        assert_eq!(gso_batch(70_000, 64), 1);
    }

    /// A GSO send that the kernel refuses for the device's sake (EIO: this kernel gives it for
    /// an IPsec route; older ones for a device without checksum offload) turns GSO off for that
    /// link only, and its datagrams go one by one; another link on the same socket keeps GSO.
    /// (The error is put in: this machine has no route that makes the kernel give it.)
    #[test]
    fn a_gso_failure_towards_one_peer_leaves_the_others_on_gso() {
        let s = SleeveSocket::new(UdpSocket::bind("127.0.0.1:0").expect("bind"), 1472).expect("socket");
        if s.gso_segments() < 2 {
            eprintln!("skipping a_gso_failure_towards_one_peer_leaves_the_others_on_gso: this kernel has no UDP GSO");
            return;
        }
        let bad: SocketAddr = "10.77.1.2:6783".parse().expect("addr");
        let calls = std::sync::Mutex::new(Vec::new());
        let fake = |_fd, to: SocketAddr, d: &[u8], seg: Option<u16>| {
            calls.lock().expect("calls").push((to, d.len(), seg));
            if to == bad && seg.is_some() {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        };
        let stats = Stats::default();
        let wire = vec![7u8; 1000 * 10];
        let (bad_gso, good_gso) = (AtomicBool::new(true), AtomicBool::new(true));
        let good: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let news = s.send_all_with(bad, &wire, 1000, &bad_gso, &stats, &fake);
        assert!(news.gso_failed && !news.too_big, "{news:?}");
        assert!(!bad_gso.load(Relaxed), "GSO is off towards the failing peer");
        let news = s.send_all_with(good, &wire, 1000, &good_gso, &stats, &fake);
        assert_eq!(news, SendNews::default());
        assert!(good_gso.load(Relaxed), "GSO stays on towards the other peer");
        // The failing peer's datagrams were sent again one by one; the next message goes one by
        // one from the start; the good peer's went in one GSO send.
        s.send_all_with(bad, &wire, 1000, &bad_gso, &stats, &fake);
        let calls = calls.lock().expect("calls").clone();
        let to_bad: Vec<Option<u16>> = calls.iter().filter(|c| c.0 == bad).map(|c| c.2).collect();
        assert_eq!(to_bad.len(), 1 + 10 + 10, "{to_bad:?}");
        assert_eq!(to_bad.iter().filter(|s| s.is_some()).count(), 1, "only the first send tried GSO");
        assert_eq!(calls.iter().filter(|c| c.0 == good).map(|c| c.2).collect::<Vec<_>>(), vec![Some(1000)]);
        assert_eq!(stats.datagrams_out.load(Relaxed), 30);
        assert_eq!(stats.drops.iter().map(|d| d.load(Relaxed)).sum::<u64>(), 0);
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A datagram over the path MTU the kernel knows (DF is set) is refused, counted and
    /// reported, not lost without a word (quinn-udp's send dropped it silently): for one
    /// datagram (EMSGSIZE) and for a GSO send (EINVAL, told apart from a GSO failure by the
    /// path MTU).
    #[test]
    fn datagrams_over_the_path_mtu_are_reported() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping datagrams_over_the_path_mtu_are_reported: needs root (a network namespace)");
            return;
        }
        std::thread::spawn(|| {
            // This thread, and the `ip` commands it starts, get a namespace of their own; its
            // devices go with it when the thread ends.
            // SAFETY: unshare on this thread only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
            ip(&["link", "add", "wa", "mtu", "1280", "type", "veth", "peer", "name", "wb"]);
            ip(&["addr", "add", "10.77.1.1/24", "dev", "wa"]);
            ip(&["link", "set", "wa", "up"]);
            ip(&["link", "set", "wb", "up"]);
            let s = SleeveSocket::new(UdpSocket::bind("0.0.0.0:0").expect("bind"), 1472).expect("socket");
            let to: SocketAddr = "10.77.1.2:6783".parse().expect("addr");
            let stats = Stats::default();
            let gso = AtomicBool::new(true);
            let news = s.send_all(to, &[7u8; 1400], 1400, &gso, &stats);
            assert!(news.too_big, "one datagram: {news:?}");
            if s.gso_segments() >= 2 {
                let news = s.send_all(to, &[7u8; 1400 * 4], 1400, &gso, &stats);
                assert!(news.too_big && !news.gso_failed, "a GSO send: {news:?}");
                assert!(gso.load(Relaxed), "a path too small is not a GSO failure");
            }
            assert!(stats.drops[DropReason::PathMtu.index()].load(Relaxed) >= 1);
            let news = s.send_all(to, &[7u8; 1200 * 4], 1200, &gso, &stats);
            assert_eq!(news, SendNews::default(), "datagrams that fit go");
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn datagrams_fit_the_path_mtu() {
        let v4: SocketAddr = SocketAddr::from(([192, 0, 2, 1], 6783));
        let v6: SocketAddr = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), 6783);
        assert_eq!(datagram_for_mtu(1500, v4), 1472);
        assert_eq!(datagram_for_mtu(1280, v4), 1252);
        assert_eq!(datagram_for_mtu(1280, v6), 1232);
        // The kernel's answer for loopback is its MTU (65536).
        let lo = path_mtu(SocketAddr::from(([127, 0, 0, 1], 9))).unwrap_or(0);
        assert!(lo >= 1500, "{lo}");
    }
}
