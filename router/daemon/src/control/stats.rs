//! Counters and gauges of the control path, as atomics: connection tasks count failures, the
//! actor refreshes its gauges once a second, and the metrics endpoint reads them at scrape time.
//! No lock anywhere.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::services::ipam::IpamGauges;

/// Handshake failure labels, in counter order.
pub const HANDSHAKE_LABELS: [&str; 7] =
    ["bad_preamble", "version", "encryption_mismatch", "wrong_password", "malformed", "io", "timeout"];
/// Why the admission limits closed connections before their handshake was over (see
/// `admission`), in counter order.
pub const REFUSAL_LABELS: [&str; 3] = ["evicted", "source_busy", "rate_limited"];
/// Control read error labels, in counter order.
pub const READ_LABELS: [&str; 5] = ["closed", "oversized", "decrypt", "malformed", "io"];
/// Data paths, in gauge order.
pub const PATHS: [&str; 2] = ["fastpath", "sleeve"];
/// Connection states, in gauge order.
pub const CONN_STATES: [&str; 2] = ["established", "pending"];

/// DNS entry counts, refreshed by the actor.
#[derive(Debug, Default)]
pub struct DnsGauges {
    /// Live entries (all origins).
    pub live: AtomicU64,
    /// Of which ours.
    pub own: AtomicU64,
    /// Tombstones.
    pub tombstones: AtomicU64,
    /// DNS state saves that failed.
    pub save_errors_total: AtomicU64,
    /// DNS entries from peers dropped for a bad origin signature (forged or altered).
    pub forged_total: AtomicU64,
    /// DNS entries from peers not merged because no key is bound to their origin yet.
    pub unknown_key_total: AtomicU64,
}

/// Control-plane counters and gauges.
#[derive(Debug, Default)]
pub struct ControlStats {
    /// By [`HANDSHAKE_LABELS`].
    pub handshake_failures: [AtomicU64; 7],
    /// By [`REFUSAL_LABELS`]; connections closed by the admission limits.
    pub handshakes_refused: [AtomicU64; 3],
    /// Inbound handshakes (with their hello) in progress now.
    pub handshakes_in_progress: AtomicU64,
    /// By [`READ_LABELS`]; bad input on established connections.
    pub read_errors: [AtomicU64; 5],
    /// Sleeve key rotations completed (each side counts its own).
    pub sleeve_rekeys: AtomicU64,
    /// Sleeve key rotations that failed (the connection was closed).
    pub sleeve_rekey_failures: AtomicU64,
    /// Gossip refused as malformed or invalid.
    pub gossip_refused: AtomicU64,
    /// Claims, connections and gossip entries refused for their identity, by
    /// `weft_proto::identity::Refused::LABELS`.
    pub identity_refused: [AtomicU64; 7],
    /// Gossip entries held back because no key was bound to their origin yet.
    pub gossip_unverified: AtomicU64,
    /// Gossip messages received.
    pub gossip_received: AtomicU64,
    /// Gossip messages sent.
    pub gossip_sent: AtomicU64,
    /// Connections by [`CONN_STATES`] × (encrypted, plaintext).
    pub connections: [[AtomicI64; 2]; 2],
    /// Known peers, including us.
    pub peers: AtomicU64,
    /// Address allocation.
    pub ipam: IpamGauges,
    /// The DNS server's counters.
    pub dns: Arc<weft_dns::DnsStats>,
    /// DNS entries.
    pub dns_entries: DnsGauges,
    /// Established connections by the path carrying them, by [`PATHS`].
    pub paths: [AtomicI64; 2],
    /// The kernel fastpath's counters.
    pub fastpath: Arc<super::fastpath::FastpathStats>,
    /// The port guard's counters.
    pub guard: Arc<crate::control::guard::GuardStats>,
}

impl ControlStats {
    /// Counts a handshake failure by label.
    pub fn handshake_failed(&self, label: &str) {
        if let Some(i) = HANDSHAKE_LABELS.iter().position(|l| *l == label) {
            self.handshake_failures[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a connection refused before its handshake, by label.
    pub fn handshake_refused(&self, label: &str) {
        if let Some(i) = REFUSAL_LABELS.iter().position(|l| *l == label) {
            self.handshakes_refused[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a read error by label.
    pub fn read_failed(&self, label: &str) {
        if let Some(i) = READ_LABELS.iter().position(|l| *l == label) {
            self.read_errors[i].fetch_add(1, Relaxed);
        }
    }
}
