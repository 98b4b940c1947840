//! The TAP thread: frames from this host's bridge go to peers.
//!
//! It owns the MAC table used for lookups (inside a `weft_proto::switch::Switch`), so deciding
//! where a frame goes takes no lock. Per read batch: pick up new links and routes, apply what the
//! UDP thread learned about remote MACs, then for each frame let the switch decide (learn the
//! source, look up the destination, choose the next hop or the broadcast tree) and append it to
//! that hop's message; flush the messages. It also sends the sleeve heartbeats, once a second, so
//! no other thread ever waits on the socket.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::sleeve::{FrameMeta, FLAG_BROADCAST, INITIAL_TTL, VNET_LEN};
use weft_proto::switch::{Egress, Mac, Owner, Reason, Switch};
use weft_proto::{PeerName, Routes};

use super::batch::Batch;
use super::shared::Shared;
use super::stats::DropReason;
use super::tap::{wait_fds, Tap};

/// Frames read from the TAP before the batches are flushed.
const READ_BATCH: usize = 64;
/// MAC announcements applied per turn at most (the rest wait for the next turn).
const LEARN_BATCH: usize = 4096;
/// Sleeve heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the links' path MTU probers are asked whether a probe is due (a lost probe is
/// noticed this much after its time-out at most).
const PROBE_CHECK: Duration = Duration::from_millis(250);
/// Longest poll(2) wait, so the stop flag is noticed.
const POLL_MS: i32 = 500;

/// Runs the TAP thread until the stop flag is set. `learned` carries (segment, MAC, peer)
/// triples from the UDP thread.
pub fn run(sh: Arc<Shared>, learned: Receiver<(u32, Mac, PeerName)>) {
    let mut view = sh.snapshot.reader();
    let mut switch = Switch::new(sh.me, sh.tap_mac, sh.limits);
    switch.set_routes(view.get().routes.clone());
    // One switch per named network this host is a member of.
    let mut nets: HashMap<u32, Switch> = HashMap::new();
    let mut polled = Polled::new(&sh, view.get());
    let mut buf = vec![0u8; 65536 + VNET_LEN + 256];
    let mut batch = Batch::default();
    let mut next_heartbeat = Instant::now();
    let mut next_probe = Instant::now();
    let mut moves = 0;
    while !sh.stop.load(Relaxed) {
        let now = Instant::now();
        let wait = next_heartbeat.min(next_probe).saturating_duration_since(now).as_millis().min(POLL_MS as u128) as i32;
        let ready = wait_fds(&mut polled.fds, wait.max(1));
        let refreshed = view.refresh(&sh.snapshot);
        if refreshed {
            let snap = view.get();
            let purged = switch.set_routes(snap.routes.clone());
            if purged > 0 {
                tracing::debug!(purged, "forgot the MACs of peers no longer reachable");
            }
            nets.retain(|seg, _| snap.taps.contains_key(seg));
            for (seg, t) in snap.taps.iter() {
                let routes = snap.segment_routes.get(seg).cloned().unwrap_or_else(|| Routes { me: sh.me, ..Routes::default() });
                nets.entry(*seg).or_insert_with(|| Switch::new(sh.me, t.mac, sh.limits)).set_routes(routes);
            }
        }
        let now = Instant::now();
        for (seg, mac, peer) in learned.try_iter().take(LEARN_BATCH) {
            let sw = if seg == 0 { Some(&mut switch) } else { nets.get_mut(&seg) };
            if let Some(Err(r)) = sw.map(|sw| sw.handle_learned(now, mac, peer)) {
                sh.stats.drop(DropReason::Switch(r));
            }
        }
        if ready {
            let snap = view.get();
            for (i, _) in polled.fds.iter().enumerate().filter(|(_, p)| p.revents != 0) {
                let (seg, tap, sw) = if i == 0 {
                    (0, &sh.tap, &mut switch)
                } else {
                    let (seg, tap) = &polled.taps[i - 1];
                    let Some(sw) = nets.get_mut(seg) else { continue };
                    (*seg, &**tap, sw)
                };
                for _ in 0..READ_BATCH {
                    match tap.read(&mut buf) {
                        Ok(Some(n)) => handle_frame(&sh, sw, snap, now, &buf[..n], &mut batch, seg),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(error = %e, tap = tap.name(), "reading the TAP failed");
                            std::thread::sleep(Duration::from_millis(100));
                            break;
                        }
                    }
                }
            }
            batch.flush(&sh);
        }
        // The TAPs polled change only with the snapshot.
        if refreshed {
            polled = Polled::new(&sh, view.get());
        }
        if switch.moves_to_local() != moves {
            moves = switch.moves_to_local();
            sh.moves_to_local.store(moves, Relaxed);
        }
        let now = Instant::now();
        if now >= next_probe {
            next_probe = now + PROBE_CHECK;
            for link in view.get().links.values() {
                batch.probe(&sh, link);
            }
        }
        if now >= next_heartbeat {
            next_heartbeat = now + HEARTBEAT;
            for link in view.get().links.values() {
                batch.heartbeat(&sh, link);
            }
            // Once a second too: the sweep when due, and the table's gauges.
            switch.handle_timeout(now);
            for sw in nets.values_mut() {
                sw.handle_timeout(now);
            }
            let local = switch.table().count(Owner::Local) as u64;
            sh.stats.macs_local.store(local, Relaxed);
            sh.stats.macs_remote.store((switch.table().len() as u64).saturating_sub(local), Relaxed);
        }
    }
}

/// The TAPs the thread polls: the default network's first, then the named networks' in segment
/// order, with the `pollfd` array for them.
struct Polled {
    taps: Vec<(u32, Arc<Tap>)>,
    fds: Vec<libc::pollfd>,
}

impl Polled {
    fn new(sh: &Shared, snap: &super::links::Snapshot) -> Polled {
        let mut taps: Vec<(u32, Arc<Tap>)> = snap.taps.iter().map(|(s, t)| (*s, t.tap.clone())).collect();
        taps.sort_by_key(|(s, _)| *s);
        let fds = std::iter::once(sh.tap.raw_fd())
            .chain(taps.iter().map(|(_, t)| t.raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        Polled { taps, fds }
    }
}

fn handle_frame(sh: &Shared, switch: &mut Switch, snap: &super::links::Snapshot, now: Instant, pkt: &[u8], batch: &mut Batch, segment: u32) {
    if pkt.len() < VNET_LEN {
        sh.stats.drop(DropReason::Switch(Reason::Runt));
        return;
    }
    let mut vnet = [0u8; VNET_LEN];
    vnet.copy_from_slice(&pkt[..VNET_LEN]);
    let frame = &pkt[VNET_LEN..];
    let me = sh.me;
    let meta = |dst: PeerName, flags| FrameMeta { src: me, dst, flags, ttl: INITIAL_TTL, vnet, segment };
    let moves = switch.moves_to_local();
    let egress = switch.handle_local_frame(now, frame);
    let sent = match egress {
        Egress::Unicast { hop, dst } => batch.push(sh, snap, hop, &meta(dst, 0), frame),
        Egress::Flood(hops) => {
            let m = meta(PeerName::default(), FLAG_BROADCAST);
            let mut any = false;
            for &hop in hops {
                any |= batch.push(sh, snap, hop, &m, frame);
            }
            any
        }
        Egress::Ignore => {
            sh.stats.filtered.fetch_add(1, Relaxed);
            false
        }
        Egress::Drop(r) => {
            sh.stats.drop(DropReason::Switch(r));
            false
        }
    };
    // The source MAC was a peer's and is here now: the fastpath must stop sending it there.
    if switch.moves_to_local() != moves {
        if let (Some(hook), Some(src)) = (sh.learn_hook.get(), frame.get(6..12)) {
            let mut m = [0u8; 6];
            m.copy_from_slice(src);
            hook(segment, Mac(m), me);
        }
    }
    if sent {
        sh.stats.frames_out.fetch_add(1, Relaxed);
        sh.stats.bytes_out.fetch_add(frame.len() as u64, Relaxed);
    }
}
