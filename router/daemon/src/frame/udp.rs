//! The sleeve's UDP socket: batched receive (GRO, recvmmsg) and segmented send (GSO) through
//! quinn-udp, with large socket buffers.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

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

/// The sleeve socket.
pub struct SleeveSocket {
    sock: UdpSocket,
    state: UdpSocketState,
    max_datagram: usize,
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
        Ok(SleeveSocket { sock, state, max_datagram })
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
    pub fn send_one(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<usize> {
        self.sock.send_to(datagram, to)
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
    /// segmented sends as the kernel takes. Failures are counted, not returned. (quinn-udp's
    /// `try_send` reports only a full socket buffer: it drops a datagram too big for the path
    /// the kernel knows, and logs other errors itself. A path too small for our datagrams is
    /// found by reading its MTU, see [`path_mtu`].)
    pub fn send_all(&self, to: SocketAddr, wire: &[u8], seg: usize, stats: &Stats) {
        for chunk in wire.chunks(seg * gso_batch(seg, self.state.max_gso_segments())) {
            if let Err(e) = self.send(to, chunk, seg, stats) {
                send_failed(to, &e, stats);
            }
        }
    }

    /// One send of `contents` in datagrams of `seg` bytes, waiting briefly (at most
    /// [`SEND_TRIES`] × 10 ms) while the socket buffer is full.
    fn send(&self, destination: SocketAddr, contents: &[u8], seg: usize, stats: &Stats) -> std::io::Result<()> {
        let t = Transmit { destination, ecn: None, contents, segment_size: (contents.len() > seg).then_some(seg), src_ip: None };
        let mut tries = 0;
        loop {
            match self.state.try_send((&self.sock).into(), &t) {
                Ok(()) => {
                    stats.datagrams_out.fetch_add(contents.len().div_ceil(seg) as u64, Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < SEND_TRIES => {
                    tries += 1;
                    wait_fd(self.sock.as_raw_fd(), libc::POLLOUT, 10);
                }
                Err(e) => return Err(e),
            }
        }
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
