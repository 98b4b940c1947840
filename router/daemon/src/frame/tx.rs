//! The TAP thread: frames from this host's bridge go to peers.
//!
//! It owns the MAC table used for lookups (inside a `weft_proto::switch::Switch`), so deciding
//! where a frame goes takes no lock. Per read batch: pick up new links and routes, apply what the
//! UDP thread learned about remote MACs, then for each frame let the switch decide (learn the
//! source, look up the destination, choose the next hop or the broadcast tree) and append it to
//! that hop's message; flush the messages. It also sends the sleeve heartbeats, once a second, so
//! no other thread ever waits on the socket.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::sleeve::{FrameMeta, FLAG_BROADCAST, INITIAL_TTL, VNET_LEN};
use weft_proto::switch::{Egress, Mac, Owner, Reason, Switch};
use weft_proto::PeerName;

use super::batch::Batch;
use super::shared::Shared;
use super::stats::DropReason;
use super::tap::wait_fd;

/// Frames read from the TAP before the batches are flushed.
const READ_BATCH: usize = 64;
/// MAC announcements applied per turn at most (the rest wait for the next turn).
const LEARN_BATCH: usize = 4096;
/// Sleeve heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest poll(2) wait, so the stop flag is noticed.
const POLL_MS: i32 = 500;

/// Runs the TAP thread until the stop flag is set. `learned` carries (MAC, peer) pairs from the
/// UDP thread.
pub fn run(sh: Arc<Shared>, learned: Receiver<(Mac, PeerName)>) {
    let mut view = sh.snapshot.reader();
    let mut switch = Switch::new(sh.me, sh.tap_mac, sh.limits);
    switch.set_routes(view.get().routes.clone());
    let mut buf = vec![0u8; 65536 + VNET_LEN + 256];
    let mut batch = Batch::default();
    let mut next_heartbeat = Instant::now();
    let mut moves = 0;
    while !sh.stop.load(Relaxed) {
        let now = Instant::now();
        let wait = next_heartbeat.saturating_duration_since(now).as_millis().min(POLL_MS as u128) as i32;
        let readable = wait_fd(sh.tap.raw_fd(), libc::POLLIN, wait.max(1));
        if view.refresh(&sh.snapshot) {
            let purged = switch.set_routes(view.get().routes.clone());
            if purged > 0 {
                tracing::debug!(purged, "forgot the MACs of peers no longer reachable");
            }
        }
        let now = Instant::now();
        for (mac, peer) in learned.try_iter().take(LEARN_BATCH) {
            if let Err(r) = switch.handle_learned(now, mac, peer) {
                sh.stats.drop(DropReason::Switch(r));
            }
        }
        if readable {
            let snap = view.get();
            for _ in 0..READ_BATCH {
                match sh.tap.read(&mut buf) {
                    Ok(Some(n)) => handle_frame(&sh, &mut switch, snap, now, &buf[..n], &mut batch),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the TAP failed");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
            batch.flush(&sh);
        }
        if switch.moves_to_local() != moves {
            moves = switch.moves_to_local();
            sh.moves_to_local.store(moves, Relaxed);
        }
        let now = Instant::now();
        if now >= next_heartbeat {
            next_heartbeat = now + HEARTBEAT;
            for link in view.get().links.values() {
                batch.heartbeat(&sh, link);
            }
            // Once a second too: the sweep when due, and the table's gauges.
            switch.handle_timeout(now);
            let local = switch.table().count(Owner::Local) as u64;
            sh.stats.macs_local.store(local, Relaxed);
            sh.stats.macs_remote.store((switch.table().len() as u64).saturating_sub(local), Relaxed);
        }
    }
}

fn handle_frame(sh: &Shared, switch: &mut Switch, snap: &super::links::Snapshot, now: Instant, pkt: &[u8], batch: &mut Batch) {
    if pkt.len() < VNET_LEN {
        sh.stats.drop(DropReason::Switch(Reason::Runt));
        return;
    }
    let mut vnet = [0u8; VNET_LEN];
    vnet.copy_from_slice(&pkt[..VNET_LEN]);
    let frame = &pkt[VNET_LEN..];
    let me = sh.me;
    let meta = |dst: PeerName, flags| FrameMeta { src: me, dst, flags, ttl: INITIAL_TTL, vnet };
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
            hook(Mac(m), me);
        }
    }
    if sent {
        sh.stats.frames_out.fetch_add(1, Relaxed);
        sh.stats.bytes_out.fetch_add(frame.len() as u64, Relaxed);
    }
}
