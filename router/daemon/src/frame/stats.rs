//! The frame path's counters, as atomics: its threads add, the control path and the metrics
//! endpoint read. Every frame or datagram the frame path drops is counted by reason.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use weft_proto::sleeve::SleeveError;
use weft_proto::switch::Reason;

/// Why a frame or datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A sleeve datagram that did not parse, open or pass the replay window.
    Sleeve(SleeveError),
    /// A switching decision (see `weft_proto::switch::Reason`).
    Switch(Reason),
    /// A peer's virtio-net header does not fit its frame (see `weft_proto::vnet`).
    VnetHeader,
    /// Writing to the TAP failed.
    TapWrite,
    /// Sending on the UDP socket failed.
    UdpSend,
    /// A peer's frame of a named network this host has no routes for.
    UnknownSegment,
    /// A datagram over the path MTU the kernel knows (refused with `EMSGSIZE`); the link's
    /// datagrams are fitted to the path at once.
    PathMtu,
    /// A bulk frame dropped to tell its sender that the sleeve's receive queue stands too long
    /// (see `weft_proto::aqm`); frames whose flow understands ECN are marked instead.
    QueueDelay,
}

/// Labels of every drop reason, in counter order.
pub const DROP_LABELS: [&str; 29] = [
    // sleeve
    "malformed",
    "unknown_kind",
    "unknown_session",
    "replay",
    "too_old",
    "auth",
    "mode_mismatch",
    "key_phase",
    "bad_record",
    "fragment_size",
    "fragment_count",
    "partial_expired",
    "partial_evicted",
    // switch
    "runt",
    "bad_source",
    "mac_limit",
    "table_full",
    "no_route",
    "ttl_expired",
    "unknown_source",
    "looped",
    "local_destination",
    "unannounced",
    // named networks
    "unknown_segment",
    // frames from peers
    "vnet_header",
    // I/O
    "tap_write",
    "udp_send",
    "path_mtu",
    // congestion
    "queue_delay",
];

impl DropReason {
    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Sleeve(e) => e.label(),
            DropReason::Switch(r) => r.label(),
            DropReason::VnetHeader => "vnet_header",
            DropReason::TapWrite => "tap_write",
            DropReason::UdpSend => "udp_send",
            DropReason::UnknownSegment => "unknown_segment",
            DropReason::PathMtu => "path_mtu",
            DropReason::QueueDelay => "queue_delay",
        }
    }

    pub(crate) fn index(self) -> usize {
        let label = self.label();
        DROP_LABELS.iter().position(|l| *l == label).unwrap_or(0)
    }
}

/// Frame path counters, exported as metrics.
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
    pub drops: [AtomicU64; DROP_LABELS.len()],
    /// MACs known to live on this host (gauge, refreshed by the TAP thread).
    pub macs_local: AtomicU64,
    /// MACs known to live behind peers (gauge, refreshed by the TAP thread).
    pub macs_remote: AtomicU64,
    /// MAC announcements from the UDP thread to the TAP thread lost to a full queue (each is
    /// repeated with the MAC's next frame).
    pub announce_lost: AtomicU64,
    /// QUIC packets (the control channel over UDP) received on the sleeve port and handed on.
    pub quic_in: AtomicU64,
    /// QUIC packets dropped: no QUIC endpoint (`--transport tcp`), or its queue was full.
    pub quic_dropped: AtomicU64,
    /// Bulk frames marked Congestion Experienced because the sleeve's receive queue stood too
    /// long (those of flows without ECN are dropped, as `queue_delay`).
    pub ecn_marked: AtomicU64,
}

impl Stats {
    /// Counts a drop.
    pub fn drop(&self, why: DropReason) {
        self.drop_n(why, 1);
    }

    /// Counts `n` drops for one reason.
    pub fn drop_n(&self, why: DropReason, n: u64) {
        if n > 0 {
            self.drops[why.index()].fetch_add(n, Relaxed);
        }
    }
}

/// Each label with its counter's current value.
pub fn labelled(labels: &[&'static str], counters: &[AtomicU64]) -> Vec<(&'static str, u64)> {
    labels.iter().zip(counters).map(|(l, c)| (*l, c.load(Relaxed))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let mut reasons: Vec<DropReason> = Reason::ALL.iter().map(|r| DropReason::Switch(*r)).collect();
        reasons.extend(SleeveError::ALL.iter().map(|e| DropReason::Sleeve(*e)));
        reasons.extend([DropReason::VnetHeader, DropReason::TapWrite, DropReason::UdpSend, DropReason::UnknownSegment, DropReason::PathMtu, DropReason::QueueDelay]);
        for r in &reasons {
            assert!(DROP_LABELS.contains(&r.label()), "{r:?} has no counter");
        }
        let mut labels: Vec<&str> = reasons.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DROP_LABELS.len(), "labels and reasons differ: {labels:?}");
    }
}
