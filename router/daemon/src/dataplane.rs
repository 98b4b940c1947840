//! The sleeve data path: frames from the TAP go to peers over UDP, frames
//! from peers go to the TAP or on to the next hop.
//!
//! Two threads do the work, each blocking in poll(2) on one descriptor: the
//! TAP reader (learn source MAC, pick next hop, batch per hop, seal, send with
//! GSO) and the UDP reader (receive with GRO, reassemble, open, write to the
//! TAP or relay). The control plane changes links and routes under a lock
//! that the hot path only reads.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use weft_proto::sleeve::{
    records, FrameMeta, Header, MessageBuilder, Opener, Record, Sealer, SleeveError, FLAG_BROADCAST, INITIAL_TTL,
    VNET_LEN,
};
use weft_proto::{PeerName, Routes};

use crate::tap::{wait_fd, Tap};

/// A message is sent once it holds this much (one TSO super-frame fits alone).
const BATCH_BYTES: usize = 64 * 1024;
/// Frames read from the TAP before the batches are flushed.
const BATCH_FRAMES: usize = 64;
/// MAC table entries not refreshed for this long are forgotten.
const MAC_TTL: Duration = Duration::from_secs(600);
/// Socket buffer size asked for (forced as root), so bursts are not dropped.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Why a frame or datagram was dropped; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A sleeve parse/crypto error.
    Sleeve(SleeveError),
    /// No route to the destination peer.
    NoRoute,
    /// TTL ran out (a transient loop).
    TtlExpired,
    /// A frame shorter than an Ethernet header.
    Runt,
    /// Writing to the TAP failed.
    TapWrite,
    /// Sending on the UDP socket failed.
    UdpSend,
}

/// Labels of every drop reason, in counter order.
pub const DROP_LABELS: [&str; 13] = [
    "malformed",
    "unknown_kind",
    "unknown_session",
    "replay",
    "too_old",
    "auth",
    "mode_mismatch",
    "bad_record",
    "no_route",
    "ttl_expired",
    "runt",
    "tap_write",
    "udp_send",
];

impl DropReason {
    fn index(self) -> usize {
        let label = match self {
            DropReason::Sleeve(e) => e.label(),
            DropReason::NoRoute => "no_route",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::Runt => "runt",
            DropReason::TapWrite => "tap_write",
            DropReason::UdpSend => "udp_send",
        };
        DROP_LABELS.iter().position(|l| *l == label).unwrap_or(0)
    }
}

/// Data-path counters, exported as metrics.
#[derive(Default, Debug)]
pub struct Stats {
    /// Frames from the TAP sent to peers.
    pub frames_out: AtomicU64,
    /// Bytes of those frames.
    pub bytes_out: AtomicU64,
    /// Frames from peers written to the TAP.
    pub frames_in: AtomicU64,
    /// Bytes of those frames.
    pub bytes_in: AtomicU64,
    /// Frames passed on for other peers.
    pub frames_relayed: AtomicU64,
    /// UDP datagrams sent.
    pub datagrams_out: AtomicU64,
    /// UDP datagrams received.
    pub datagrams_in: AtomicU64,
    /// Frames the kernel sent out of the TAP from its own address (IPv6/IGMP chatter), ignored.
    pub filtered: AtomicU64,
    /// Drops by reason, indexed like [`DROP_LABELS`].
    pub drops: [AtomicU64; 13],
}

impl Stats {
    fn drop(&self, why: DropReason) {
        self.drops[why.index()].fetch_add(1, Relaxed);
    }
}

/// The data path to one directly connected peer.
pub struct Link {
    /// The peer.
    pub peer: PeerName,
    /// Where its sleeve listens.
    pub addr: SocketAddr,
    /// Our receive index for this link.
    pub index: u32,
    /// Whether messages are encrypted.
    pub encrypted: bool,
    sealer: Mutex<Sealer>,
    opener: Mutex<Opener>,
    /// Milliseconds since data-plane start of the last heartbeat received, 0 = never.
    last_heartbeat: AtomicU64,
}

#[derive(Default)]
struct State {
    routes: Routes,
    links: HashMap<PeerName, Arc<Link>>,
    by_index: HashMap<u32, Arc<Link>>,
}

/// The sleeve data plane. Share it in an `Arc`; see the module docs.
pub struct Dataplane {
    me: PeerName,
    tap: Tap,
    tap_mac: [u8; 6],
    sock: UdpSocket,
    udp: UdpSocketState,
    max_datagram: usize,
    state: RwLock<State>,
    macs: Mutex<HashMap<[u8; 6], (PeerName, Instant)>>,
    next_index: AtomicU64,
    start: Instant,
    stop: AtomicBool,
    /// Counters.
    pub stats: Stats,
}

impl Dataplane {
    /// Wraps an open TAP and a bound UDP socket. `max_datagram` is the largest UDP payload to send.
    pub fn new(me: PeerName, tap: Tap, tap_mac: [u8; 6], sock: UdpSocket, max_datagram: usize) -> anyhow::Result<Self> {
        sock.set_nonblocking(true)?;
        let udp = UdpSocketState::new((&sock).into())?;
        for (what, r) in [
            ("receive", force_buffer(&sock, libc::SO_RCVBUFFORCE, SOCKET_BUFFER)),
            ("send", force_buffer(&sock, libc::SO_SNDBUFFORCE, SOCKET_BUFFER)),
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, what, "could not force the UDP socket buffer size; bursts may be dropped");
            }
        }
        let seed = u64::from(rand::random::<u32>() | 1);
        Ok(Dataplane {
            me,
            tap,
            tap_mac,
            sock,
            udp,
            max_datagram,
            state: RwLock::new(State::default()),
            macs: Mutex::new(HashMap::new()),
            next_index: AtomicU64::new(seed),
            start: Instant::now(),
            stop: AtomicBool::new(false),
            stats: Stats::default(),
        })
    }

    /// Whether the TAP has segmentation offload (the kernel hands us super-frames).
    pub fn offload(&self) -> bool {
        self.tap.offload
    }

    /// GSO segments the kernel takes per send, as detected.
    pub fn gso_segments(&self) -> usize {
        self.udp.max_gso_segments()
    }

    /// A fresh receive index for a new link.
    pub fn alloc_index(&self) -> u32 {
        // Low 32 bits of a counter seeded randomly: unique for 2^32 links.
        self.next_index.fetch_add(1, Relaxed) as u32
    }

    /// Adds (or replaces) the link to `peer`.
    pub fn add_link(&self, peer: PeerName, addr: SocketAddr, index: u32, sealer: Sealer, opener: Opener) {
        let link = Arc::new(Link {
            peer,
            addr,
            index,
            encrypted: sealer.encrypted(),
            sealer: Mutex::new(sealer),
            opener: Mutex::new(opener),
            last_heartbeat: AtomicU64::new(0),
        });
        let mut st = write(&self.state);
        if let Some(old) = st.links.insert(peer, link.clone()) {
            st.by_index.remove(&old.index);
        }
        st.by_index.insert(index, link);
    }

    /// Removes the link to `peer` if it is still the one with `index`
    /// (a replaced duplicate must not take the winner's link with it).
    pub fn remove_link(&self, peer: PeerName, index: u32) {
        let mut st = write(&self.state);
        st.by_index.remove(&index);
        if st.links.get(&peer).is_some_and(|l| l.index == index) {
            st.links.remove(&peer);
        }
    }

    /// Installs new routes.
    pub fn set_routes(&self, routes: Routes) {
        write(&self.state).routes = routes;
    }

    /// Time since the last heartbeat from `peer` on link `index`, if any arrived.
    pub fn heartbeat_age(&self, peer: PeerName, index: u32) -> Option<Duration> {
        let st = read(&self.state);
        let l = st.links.get(&peer).filter(|l| l.index == index)?;
        let at = l.last_heartbeat.load(Relaxed);
        (at != 0).then(|| self.start.elapsed().saturating_sub(Duration::from_millis(at)))
    }

    /// Sends a heartbeat on every link.
    pub fn send_heartbeats(&self) {
        let links: Vec<Arc<Link>> = read(&self.state).links.values().cloned().collect();
        let mut wire = Vec::new();
        for l in links {
            let mut msg = Vec::with_capacity(64);
            MessageBuilder::push_heartbeat(&mut msg);
            self.seal_and_send(&l, &mut msg, &mut wire);
        }
    }

    /// Asks the threads to stop (they notice within half a second).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Starts the TAP and UDP threads.
    pub fn spawn(self: &Arc<Self>) -> anyhow::Result<()> {
        let a = self.clone();
        std::thread::Builder::new().name("weft-tap".into()).spawn(move || a.tap_loop())?;
        let b = self.clone();
        std::thread::Builder::new().name("weft-udp".into()).spawn(move || b.udp_loop())?;
        Ok(())
    }

    fn learn(&self, mac: &[u8], peer: PeerName) {
        if mac[0] & 1 != 0 {
            return;
        }
        let mut k = [0u8; 6];
        k.copy_from_slice(mac);
        let mut macs = lock(&self.macs);
        let now = Instant::now();
        match macs.get_mut(&k) {
            Some(e) if e.0 == peer => e.1 = now,
            Some(e) => {
                tracing::debug!(mac = %fmt_mac(&k), from = %e.0, to = %peer, "MAC moved");
                *e = (peer, now);
            }
            None => {
                if macs.len() > 100_000 {
                    macs.retain(|_, (_, t)| now.duration_since(*t) < MAC_TTL);
                }
                macs.insert(k, (peer, now));
            }
        }
    }

    fn lookup(&self, mac: &[u8]) -> Option<PeerName> {
        let mut k = [0u8; 6];
        k.copy_from_slice(mac);
        let macs = lock(&self.macs);
        macs.get(&k).filter(|(_, t)| t.elapsed() < MAC_TTL).map(|(p, _)| *p)
    }

    fn tap_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536 + VNET_LEN + 256];
        let mut batch = Batch::default();
        while !self.stop.load(Relaxed) {
            if !wait_fd(self.tap.raw_fd(), libc::POLLIN, 500) {
                continue;
            }
            for _ in 0..BATCH_FRAMES {
                match self.tap.read(&mut buf) {
                    Ok(Some(n)) => self.handle_tap_frame(&buf[..n], &mut batch),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the TAP failed");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
            self.flush(&mut batch);
        }
    }

    fn handle_tap_frame(&self, pkt: &[u8], batch: &mut Batch) {
        if pkt.len() < VNET_LEN + 14 {
            self.stats.drop(DropReason::Runt);
            return;
        }
        let mut vnet = [0u8; VNET_LEN];
        vnet.copy_from_slice(&pkt[..VNET_LEN]);
        let frame = &pkt[VNET_LEN..];
        let (dst, src) = (&frame[0..6], &frame[6..12]);
        if src == self.tap_mac {
            self.stats.filtered.fetch_add(1, Relaxed);
            return;
        }
        self.learn(src, self.me);
        let meta = |dst: PeerName, flags| FrameMeta { src: self.me, dst, flags, ttl: INITIAL_TTL, vnet };
        let st = read(&self.state);
        let unicast = if dst[0] & 1 == 0 { self.lookup(dst) } else { None };
        let sent = match unicast {
            Some(p) if p == self.me => false, // local; the bridge already delivered it
            Some(p) => match st.routes.next_hop(p) {
                Some(hop) => {
                    batch.push(self, &st, hop, &meta(p, 0), frame);
                    true
                }
                None => {
                    self.stats.drop(DropReason::NoRoute);
                    false
                }
            },
            // Broadcast, multicast, or unknown unicast: flood along our tree.
            None => {
                let hops = st.routes.broadcast_hops(self.me);
                for &hop in hops {
                    batch.push(self, &st, hop, &meta(PeerName::default(), FLAG_BROADCAST), frame);
                }
                !hops.is_empty()
            }
        };
        if sent {
            self.stats.frames_out.fetch_add(1, Relaxed);
            self.stats.bytes_out.fetch_add(frame.len() as u64, Relaxed);
        }
    }

    fn udp_loop(self: Arc<Self>) {
        let n_bufs = quinn_udp::BATCH_SIZE.clamp(1, 16);
        let buf_len = (self.udp.gro_segments().max(1) * self.max_datagram.max(1500)).max(65536);
        let mut storage: Vec<Vec<u8>> = (0..n_bufs).map(|_| vec![0u8; buf_len]).collect();
        let mut metas = vec![RecvMeta::default(); n_bufs];
        let mut batch = Batch::default();
        while !self.stop.load(Relaxed) {
            if !wait_fd(self.sock.as_raw_fd(), libc::POLLIN, 500) {
                continue;
            }
            for _ in 0..8 {
                let mut slices: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let n = match self.udp.recv((&self.sock).into(), &mut slices, &mut metas) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "UDP receive error");
                        break;
                    }
                };
                drop(slices);
                for (meta, buf) in metas.iter().zip(storage.iter()).take(n) {
                    let stride = meta.stride.max(1);
                    for dgram in buf[..meta.len].chunks(stride) {
                        self.stats.datagrams_in.fetch_add(1, Relaxed);
                        if let Err(e) = self.handle_datagram(dgram, &mut batch) {
                            self.stats.drop(DropReason::Sleeve(e));
                            tracing::trace!(error = %e, from = %meta.addr, "dropped sleeve datagram");
                        }
                    }
                }
            }
            self.flush(&mut batch);
        }
    }

    fn handle_datagram(&self, dgram: &[u8], batch: &mut Batch) -> Result<(), SleeveError> {
        let (head, body) = Header::parse(dgram)?;
        let st = read(&self.state);
        let link = st.by_index.get(&head.receiver).ok_or(SleeveError::UnknownSession)?;
        let Some(msg) = lock(&link.opener).open(head, body)? else { return Ok(()) };
        for rec in records(&msg) {
            match rec? {
                Record::Heartbeat => {
                    let ms = self.start.elapsed().as_millis() as u64;
                    link.last_heartbeat.store(ms.max(1), Relaxed);
                }
                Record::Frame(meta, frame) => self.handle_peer_frame(&st, link, meta, frame, batch),
            }
        }
        Ok(())
    }

    fn handle_peer_frame(&self, st: &State, link: &Link, meta: FrameMeta, frame: &[u8], batch: &mut Batch) {
        if frame.len() < 14 {
            self.stats.drop(DropReason::Runt);
            return;
        }
        if meta.src == self.me {
            return; // our own broadcast came back during a topology change
        }
        self.learn(&frame[6..12], meta.src);
        let deliver = meta.is_broadcast() || meta.dst == self.me;
        if deliver {
            match self.tap.write(&meta.vnet, frame) {
                Ok(()) => {
                    self.stats.frames_in.fetch_add(1, Relaxed);
                    self.stats.bytes_in.fetch_add(frame.len() as u64, Relaxed);
                }
                Err(e) => {
                    self.stats.drop(DropReason::TapWrite);
                    tracing::debug!(error = %e, "writing to the TAP failed");
                }
            }
        }
        if meta.is_broadcast() || meta.dst != self.me {
            if meta.ttl <= 1 {
                self.stats.drop(DropReason::TtlExpired);
                return;
            }
            let next = FrameMeta { ttl: meta.ttl - 1, ..meta };
            if meta.is_broadcast() {
                for &hop in st.routes.broadcast_hops(meta.src) {
                    if hop != link.peer {
                        batch.push(self, st, hop, &next, frame);
                        self.stats.frames_relayed.fetch_add(1, Relaxed);
                    }
                }
            } else {
                match st.routes.next_hop(meta.dst) {
                    Some(hop) if hop != link.peer => {
                        batch.push(self, st, hop, &next, frame);
                        self.stats.frames_relayed.fetch_add(1, Relaxed);
                    }
                    _ => self.stats.drop(DropReason::NoRoute),
                }
            }
        }
    }

    fn flush(&self, batch: &mut Batch) {
        let mut pending = std::mem::take(&mut batch.msgs);
        for (link, mut msg) in pending.drain(..) {
            self.seal_and_send(&link, &mut msg, &mut batch.wire);
        }
        batch.msgs = pending;
    }

    fn seal_and_send(&self, link: &Link, msg: &mut Vec<u8>, wire: &mut Vec<u8>) {
        let seg = lock(&link.sealer).seal(msg, self.max_datagram, wire);
        for chunk in wire.chunks(seg * gso_batch(seg, self.udp.max_gso_segments())) {
            if let Err(e) = self.send(link.addr, chunk, seg) {
                if e.raw_os_error() == Some(libc::EMSGSIZE) && chunk.len() > seg {
                    // The kernel refused the segmented send after all: one datagram per call.
                    tracing::debug!(error = %e, peer = %link.peer, "GSO send refused; sending datagrams one by one");
                    for d in chunk.chunks(seg) {
                        if let Err(e) = self.send(link.addr, d, seg) {
                            self.send_failed(link, &e);
                        }
                    }
                } else {
                    self.send_failed(link, &e);
                }
            }
        }
    }

    fn send_failed(&self, link: &Link, e: &std::io::Error) {
        self.stats.drop(DropReason::UdpSend);
        tracing::debug!(error = %e, peer = %link.peer, "sleeve send failed");
    }

    /// Sends `contents` (datagrams of `seg` bytes, the last maybe shorter) in one call,
    /// waiting briefly while the socket buffer is full.
    fn send(&self, destination: SocketAddr, contents: &[u8], seg: usize) -> std::io::Result<()> {
        let t = Transmit { destination, ecn: None, contents, segment_size: (contents.len() > seg).then_some(seg), src_ip: None };
        let mut tries = 0;
        loop {
            match self.udp.try_send((&self.sock).into(), &t) {
                Ok(()) => {
                    self.stats.datagrams_out.fetch_add(contents.len().div_ceil(seg) as u64, Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 50 => {
                    tries += 1;
                    wait_fd(self.sock.as_raw_fd(), libc::POLLOUT, 10);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Largest UDP payload of one segmented send: a GSO send is one IP packet
/// before segmentation, so its payload obeys the 16-bit IPv4 length
/// (65535 − 20 − 8).
const MAX_GSO_BYTES: usize = 65_507;

/// Datagrams per GSO send: what the kernel takes, and no more than fits [`MAX_GSO_BYTES`].
fn gso_batch(seg: usize, max_segments: usize) -> usize {
    (MAX_GSO_BYTES / seg.max(1)).clamp(1, max_segments.max(1))
}

/// Messages being built, one per next hop.
#[derive(Default)]
struct Batch {
    msgs: Vec<(Arc<Link>, Vec<u8>)>,
    wire: Vec<u8>,
}

impl Batch {
    fn push(&mut self, dp: &Dataplane, st: &State, hop: PeerName, meta: &FrameMeta, frame: &[u8]) {
        let Some(link) = st.links.get(&hop) else {
            dp.stats.drop(DropReason::NoRoute);
            return;
        };
        let cost = MessageBuilder::frame_cost(frame.len());
        let i = match self.msgs.iter().position(|(l, _)| Arc::ptr_eq(l, link)) {
            Some(i) => i,
            None => {
                self.msgs.push((link.clone(), Vec::with_capacity(cost.max(2048))));
                self.msgs.len() - 1
            }
        };
        let (l, m) = &mut self.msgs[i];
        if !m.is_empty() && m.len() + cost > BATCH_BYTES {
            dp.seal_and_send(l, m, &mut self.wire);
            m.clear();
        }
        MessageBuilder::push_frame(m, meta, frame);
    }
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

/// Formats a MAC address.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

// Poisoning only follows a panic on another data-path thread; the state is
// still consistent (every writer finishes its update before releasing), so
// keep going rather than take the router down.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
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
}
