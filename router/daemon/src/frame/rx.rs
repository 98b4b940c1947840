//! The UDP thread: sleeve datagrams from peers go to the TAP, or on to the next hop.
//!
//! Per receive batch (GRO, recvmmsg): pick up new links and routes; for each datagram find the
//! link by the header's receiver index, reassemble and open the message, then for each frame let
//! the receive side of the switch (`weft_proto::switch::Inbound`) decide: deliver to our TAP,
//! relay, or drop. What it learns about remote MACs goes to the TAP thread over a bounded queue;
//! a full queue loses the announcement, which is repeated with the MAC's next frame.
//!
//! How long each datagram waited in the socket's queue (the kernel's receive timestamp against
//! the clock when it is taken) drives CoDel (`weft_proto::aqm`): while the queue stands too
//! long, bulk frames are marked Congestion Experienced, or dropped when their flow does not
//! understand ECN, so TCP senders shrink their windows and the queue stays short.

use std::net::SocketAddr;
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn_udp::RecvMeta;
use weft_proto::sleeve::{records, FrameMeta, Header, MessageBuilder, Record, SleeveError};
use weft_proto::switch::{Inbound, Mac, Reason, Relay};
use weft_proto::aqm::{congestion_mark, Codel, Mark, BULK_FRAME};
use weft_proto::PeerName;

use super::batch::Batch;
use super::links::{lock, Link, Snapshot};
use super::shared::Shared;
use super::stats::DropReason;
use super::tap::wait_fd;

/// Receive batches per wake-up before the relay messages are flushed.
const RECV_ROUNDS: usize = 8;
/// Longest poll(2) wait, so the stop flag is noticed.
const POLL_MS: i32 = 500;

/// Runs the UDP thread until the stop flag is set.
pub fn run(sh: Arc<Shared>, learned: SyncSender<(u32, Mac, PeerName)>) {
    let mut view = sh.snapshot.reader();
    let mut inbound = Inbounds { main: Inbound::new(sh.me, sh.limits), nets: HashMap::new() };
    inbound.refresh(&sh, view.get());
    let mut moves = sh.moves_to_local.load(Relaxed);
    let n_bufs = quinn_udp::BATCH_SIZE.clamp(1, 16);
    let buf_len = (sh.udp.gro_segments().max(1) * sh.udp.max_datagram().max(1500)).max(65536);
    let mut storage: Vec<Vec<u8>> = (0..n_bufs).map(|_| vec![0u8; buf_len]).collect();
    let mut metas = vec![RecvMeta::default(); n_bufs];
    let mut batch = Batch::default();
    let mut rx = Rx { sh: &sh, learned: &learned, batch: &mut batch, codel: Codel::default(), sojourn: Duration::ZERO, marked: Vec::new() };
    while !rx.sh.stop.load(Relaxed) {
        let readable = wait_fd(rx.sh.udp.raw_fd(), libc::POLLIN, POLL_MS);
        if view.refresh(&rx.sh.snapshot) {
            inbound.refresh(rx.sh, view.get());
        }
        let m = rx.sh.moves_to_local.load(Relaxed);
        if m != moves {
            moves = m;
            inbound.main.remote_moved_to_local();
        }
        let now = Instant::now();
        // Does nothing until the next sweep is due.
        inbound.main.handle_timeout(now);
        for i in inbound.nets.values_mut() {
            i.handle_timeout(now);
        }
        if !readable {
            continue;
        }
        let snap = view.get();
        for _ in 0..RECV_ROUNDS {
            let mut slices: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n = match rx.sh.udp.recv(&mut slices, &mut metas) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive error");
                    break;
                }
            };
            drop(slices);
            // The wall clock, as the kernel's receive timestamps are.
            let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            // A read that did not fill every buffer emptied the queue: however long those
            // datagrams waited (the thread was not scheduled, say), nothing stands behind them,
            // and CoDel must not act (RFC 8289 does not drop when at most one packet is queued).
            let drained = n < metas.len();
            for (meta, buf) in metas.iter().zip(storage.iter()).take(n) {
                rx.sojourn = match meta.timestamp {
                    Some(t) if !drained => wall.saturating_sub(t),
                    _ => Duration::ZERO,
                };
                let stride = meta.stride.max(1);
                for dgram in buf[..meta.len].chunks(stride) {
                    rx.sh.stats.datagrams_in.fetch_add(1, Relaxed);
                    if super::shared::is_quic(dgram) {
                        // As the socket reports it: QUIC keeps its own view of addresses.
                        rx.quic(dgram, meta.addr);
                        continue;
                    }
                    if let Err(e) = rx.datagram(snap, &mut inbound, now, dgram, super::udp::canonical(meta.addr)) {
                        rx.sh.stats.drop(DropReason::Sleeve(e));
                        tracing::trace!(error = %e, from = %meta.addr, "dropped sleeve datagram");
                    }
                }
            }
        }
        rx.batch.flush(rx.sh);
    }
}

/// The receive side of the switch for the default network and for each named network with
/// members (whose frames this host delivers, when it is a member, or relays).
struct Inbounds {
    main: Inbound,
    nets: HashMap<u32, Inbound>,
}

impl Inbounds {
    fn refresh(&mut self, sh: &Shared, snap: &Snapshot) {
        self.main.set_routes(snap.routes.clone());
        self.main.set_owners(snap.owners.clone());
        self.nets.retain(|seg, _| snap.segment_routes.contains_key(seg));
        for (seg, routes) in snap.segment_routes.iter() {
            let i = self.nets.entry(*seg).or_insert_with(|| Inbound::new(sh.me, sh.limits));
            i.set_routes(routes.clone());
            i.set_owners(snap.owners.clone());
        }
    }

    fn get(&mut self, segment: u32) -> Option<&mut Inbound> {
        if segment == 0 {
            Some(&mut self.main)
        } else {
            self.nets.get_mut(&segment)
        }
    }
}

struct Rx<'a> {
    sh: &'a Shared,
    learned: &'a SyncSender<(u32, Mac, PeerName)>,
    batch: &'a mut Batch,
    /// Congestion control of the socket's receive queue.
    codel: Codel,
    /// How long the datagrams being handled waited in the socket's queue.
    sojourn: Duration,
    /// A frame marked Congestion Experienced (a copy: the received message is not changed).
    marked: Vec<u8>,
}

impl Rx<'_> {
    fn quic(&self, dgram: &[u8], from: SocketAddr) {
        let taken = self.sh.quic_hook.get().is_some_and(|hook| hook(dgram, from));
        let counter = if taken { &self.sh.stats.quic_in } else { &self.sh.stats.quic_dropped };
        counter.fetch_add(1, Relaxed);
    }

    fn datagram(&mut self, snap: &Snapshot, inbound: &mut Inbounds, now: Instant, dgram: &[u8], from: SocketAddr) -> Result<(), SleeveError> {
        let (head, body) = Header::parse(dgram)?;
        let link = snap.by_index.get(&head.receiver).ok_or(SleeveError::UnknownSession)?;
        let opened = {
            let mut opener = lock(&link.opener);
            let r = opener.open(head, body, now);
            let d = opener.take_discards();
            self.sh.stats.drop_n(DropReason::Sleeve(SleeveError::PartialExpired), d.expired);
            self.sh.stats.drop_n(DropReason::Sleeve(SleeveError::PartialEvicted), d.evicted);
            r
        };
        let Some(msg) = opened? else { return Ok(()) };
        if link.came_from(from) {
            tracing::info!(peer = %link.peer, said = %link.addr, from = %from, "the peer's sleeve datagrams come from another address (a NAT between us?): sending there");
        }
        for rec in records(&msg) {
            match rec? {
                Record::Heartbeat => link.heard(),
                Record::Probe { id, size } => {
                    // Answered on its own: a probe is rare (once a second at most per link).
                    let mut ack = Vec::with_capacity(16);
                    MessageBuilder::push_probe_ack(&mut ack, id, size);
                    self.sh.seal_and_send(link, &mut ack, &mut Vec::new());
                }
                Record::ProbeAck { id, size } => self.sh.probe_acked(link, id, usize::from(size)),
                Record::Ping(stamp) => link.echo_requested(stamp, self.sh.micros()),
                Record::Pong { stamp, held_us } => {
                    // Our own stamp back (authenticated by the link's keys), less the time the
                    // peer held it; a stamp from the future is ignored.
                    if let Some(rtt) = self.sh.micros().checked_sub(stamp).and_then(|d| d.checked_sub(u64::from(held_us))) {
                        link.rtt_sample(std::time::Duration::from_micros(rtt));
                    }
                }
                Record::Frame(meta, frame) => self.frame(snap, inbound, now, link, meta, frame),
            }
        }
        Ok(())
    }

    fn frame(&mut self, snap: &Snapshot, inbounds: &mut Inbounds, now: Instant, link: &Arc<Link>, meta: FrameMeta, frame: &[u8]) {
        let sh = self.sh;
        // The queue stands too long: this bulk frame carries the news to its sender.
        let mut signal = if frame.len() >= BULK_FRAME {
            self.codel.signal(now, self.sojourn)
        } else {
            self.codel.observe(now, self.sojourn);
            false
        };
        let mut frame = frame;
        if signal {
            self.marked.clear();
            self.marked.extend_from_slice(frame);
            match congestion_mark(&mut self.marked) {
                Mark::Marked | Mark::AlreadyMarked => {
                    sh.stats.ecn_marked.fetch_add(1, Relaxed);
                    frame = &self.marked;
                    signal = false;
                }
                Mark::NotEcnCapable => sh.stats.drop(DropReason::QueueDelay),
            }
        }
        let Some(inbound) = inbounds.get(meta.segment) else {
            sh.stats.drop(DropReason::UnknownSegment);
            return;
        };
        let d = inbound.handle_peer_frame(now, link.peer, &meta, frame);
        if let Some(r) = d.dropped {
            sh.stats.drop(DropReason::Switch(r));
            if r == Reason::Unannounced {
                link.unannounced.fetch_add(1, Relaxed);
                tracing::debug!(peer = %link.peer, source = %meta.src, mac = ?weft_proto::switch::src(frame), "dropped a frame from a MAC its source peer did not announce");
            }
        }
        let announce = d.announce;
        // A named network's frames go to its TAP; a host that only relays them has none.
        let tap = if meta.segment == 0 { Some(&sh.tap) } else { snap.taps.get(&meta.segment).map(|t| &*t.tap) };
        if let (true, Some(tap), false) = (d.deliver, tap, signal) {
            // The peer's offload metadata goes to our kernel only as checked against the frame
            // and rebuilt; relays pass it on as it came (the next hop checks it).
            match weft_proto::vnet::check(&meta.vnet, frame) {
                Ok(vnet) => match tap.write(&vnet, frame) {
                    Ok(()) => {
                        sh.stats.frames_in.fetch_add(1, Relaxed);
                        sh.stats.bytes_in.fetch_add(frame.len() as u64, Relaxed);
                    }
                    Err(e) => {
                        sh.stats.drop(DropReason::TapWrite);
                        tracing::debug!(error = %e, "writing to the TAP failed");
                    }
                },
                Err(e) => {
                    sh.stats.drop(DropReason::VnetHeader);
                    tracing::debug!(peer = %link.peer, error = %e, "dropped a frame whose virtio-net header does not fit it");
                }
            }
        }
        let next = FrameMeta { ttl: d.ttl, ..meta };
        let relay = if signal { Relay::None } else { d.relay };
        match relay {
            Relay::None => {}
            Relay::One(hop) => {
                if self.batch.push(sh, snap, hop, &next, frame) {
                    sh.stats.frames_relayed.fetch_add(1, Relaxed);
                }
            }
            Relay::Tree { hops, except } => {
                for &hop in hops.iter().filter(|h| **h != except) {
                    if self.batch.push(sh, snap, hop, &next, frame) {
                        sh.stats.frames_relayed.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        // After the relays: the decision borrows `inbound`.
        if let Some((mac, peer)) = announce {
            if let Some(hook) = sh.learn_hook.get() {
                hook(meta.segment, mac, peer);
            }
            match self.learned.try_send((meta.segment, mac, peer)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    sh.stats.announce_lost.fetch_add(1, Relaxed);
                    inbound.announce_failed(mac);
                }
                // The TAP thread is gone: the router is stopping.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}
