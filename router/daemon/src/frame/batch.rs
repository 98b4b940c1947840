//! Messages being built, one per next hop: frames for the same hop are packed into one sleeve
//! message (one AEAD call, one segmented send) until it holds [`BATCH_BYTES`] or the thread
//! flushes after a read batch.

use std::sync::Arc;

use weft_proto::sleeve::{FrameMeta, MessageBuilder, TAG_LEN};
use weft_proto::switch::Reason;
use weft_proto::PeerName;

use super::links::{Link, Snapshot};
use super::shared::Shared;
use super::stats::DropReason;

/// A message is sent once it holds this much (one TSO super-frame fits alone).
const BATCH_BYTES: usize = 64 * 1024;
/// Message buffers kept for reuse after a flush.
const SPARE_BUFFERS: usize = 8;

/// See the module docs.
#[derive(Default)]
pub struct Batch {
    msgs: Vec<(Arc<Link>, Vec<u8>)>,
    wire: Vec<u8>,
    /// Emptied message buffers, reused (allocating and growing one per message cost a copy of
    /// each super-frame).
    spare: Vec<Vec<u8>>,
}

impl Batch {
    /// Adds a frame for `hop`. Returns false (and counts the drop) when there is no link to it.
    pub fn push(&mut self, sh: &Shared, snap: &Snapshot, hop: PeerName, meta: &FrameMeta, frame: &[u8]) -> bool {
        let Some(link) = snap.links.get(&hop) else {
            sh.stats.drop(DropReason::Switch(Reason::NoRoute));
            return false;
        };
        let cost = MessageBuilder::frame_cost(meta, frame.len());
        let i = match self.msgs.iter().position(|(l, _)| Arc::ptr_eq(l, link)) {
            Some(i) => i,
            None => {
                let mut m = self.spare.pop().unwrap_or_default();
                // With room for the AEAD tag, which sealing appends.
                m.reserve(cost.max(2048) + TAG_LEN);
                self.msgs.push((link.clone(), m));
                self.msgs.len() - 1
            }
        };
        let (l, m) = &mut self.msgs[i];
        if !m.is_empty() && m.len() + cost > BATCH_BYTES {
            sh.seal_and_send(l, m, &mut self.wire);
            m.clear();
            m.reserve(cost + TAG_LEN);
        }
        MessageBuilder::push_frame(m, meta, frame);
        true
    }

    /// Seals and sends every message built so far.
    pub fn flush(&mut self, sh: &Shared) {
        for (link, mut msg) in self.msgs.drain(..) {
            sh.seal_and_send(&link, &mut msg, &mut self.wire);
            if self.spare.len() < SPARE_BUFFERS {
                msg.clear();
                self.spare.push(msg);
            }
        }
    }

    /// Sends one heartbeat on `link` (through the same sealing as frames).
    pub fn heartbeat(&mut self, sh: &Shared, link: &Arc<Link>) {
        let mut msg = Vec::with_capacity(64);
        MessageBuilder::push_heartbeat(&mut msg);
        // With an echo request (the peer's next heartbeat answers it: the sleeve's round trip),
        // and the answer to the peer's last one.
        let now = sh.micros();
        MessageBuilder::push_ping(&mut msg, now);
        if let Some((stamp, held)) = link.take_echo(now) {
            MessageBuilder::push_pong(&mut msg, stamp, held);
        }
        sh.seal_and_send(link, &mut msg, &mut self.wire);
    }

    /// Sends a path MTU probe on `link` if its prober wants one now.
    pub fn probe(&mut self, sh: &Shared, link: &Arc<Link>) {
        let mut msg = Vec::new();
        sh.probe_if_due(link, &mut msg, &mut self.wire);
    }
}
