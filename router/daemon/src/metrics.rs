//! Prometheus metrics, read at scrape time from the counters the data path
//! and the control plane keep as atomics (no locks on the hot path).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::dataplane::{Dataplane, DROP_LABELS};

/// Handshake failure labels, in counter order.
pub const HANDSHAKE_LABELS: [&str; 7] =
    ["bad_preamble", "version", "encryption_mismatch", "wrong_password", "malformed", "io", "timeout"];
/// Control read error labels, in counter order.
pub const READ_LABELS: [&str; 5] = ["closed", "oversized", "decrypt", "malformed", "io"];

/// Control-plane counters and gauges.
#[derive(Debug, Default)]
pub struct ControlStats {
    /// By [`HANDSHAKE_LABELS`].
    pub handshake_failures: [AtomicU64; 7],
    /// By [`READ_LABELS`]; bad input on established connections.
    pub read_errors: [AtomicU64; 5],
    /// Gossip refused as malformed or invalid.
    pub gossip_refused: AtomicU64,
    /// Gossip messages received.
    pub gossip_received: AtomicU64,
    /// Gossip messages sent.
    pub gossip_sent: AtomicU64,
    /// Connections by (state, encrypted), refreshed by the control loop.
    pub connections: Mutex<BTreeMap<(String, bool), i64>>,
    /// Known peers, including us.
    pub peers: AtomicU64,
    /// Address allocation, refreshed by the control loop.
    pub ipam: Mutex<IpamMetrics>,
    /// The DNS server's counters.
    pub dns: Arc<weft_dns::DnsStats>,
    /// DNS entries, refreshed by the control loop.
    pub dns_entries: Mutex<weft_dns::Counts>,
}

/// Address allocation figures.
#[derive(Debug, Default, Clone)]
pub struct IpamMetrics {
    /// Addresses held by containers here.
    pub allocations: u64,
    /// Addresses of the range this peer owns.
    pub owned: u64,
    /// Of those, free.
    pub free: u64,
    /// Addresses owned by unreachable peers.
    pub unreachable: u64,
    /// Requests waiting (consensus, donation).
    pub pending: u64,
    /// Addresses given out.
    pub allocated_total: u64,
    /// Addresses released.
    pub released_total: u64,
    /// Requests that failed.
    pub failed_total: u64,
    /// Donations made to other peers.
    pub donated_total: u64,
    /// Donations received.
    pub received_total: u64,
    /// Rings from peers refused.
    pub refused_rings_total: u64,
    /// State saves that failed.
    pub save_errors_total: u64,
}

impl ControlStats {
    /// Counts a handshake failure by label.
    pub fn handshake_failed(&self, label: &str) {
        if let Some(i) = HANDSHAKE_LABELS.iter().position(|l| *l == label) {
            self.handshake_failures[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a read error by label.
    pub fn read_failed(&self, label: &str) {
        if let Some(i) = READ_LABELS.iter().position(|l| *l == label) {
            self.read_errors[i].fetch_add(1, Relaxed);
        }
    }
}

/// Each label with its counter's current value.
pub fn labelled(labels: &[&'static str], counters: &[AtomicU64]) -> Vec<(&'static str, u64)> {
    labels.iter().zip(counters).map(|(l, c)| (*l, c.load(Relaxed))).collect()
}

/// Rows of a family labelled `reason`.
fn by_reason(labels: &[&'static str], counters: &[AtomicU64]) -> Vec<(Labels, u64)> {
    labelled(labels, counters).into_iter().map(|(l, v)| (vec![("reason", l.to_string())], v)).collect()
}

struct WeftCollector {
    dp: Arc<Dataplane>,
    ctl: Arc<ControlStats>,
}

impl fmt::Debug for WeftCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeftCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

fn family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: Vec<(Labels, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in rows {
        let e = m.encode_family(&labels)?;
        match ty {
            MetricType::Gauge => ConstGauge::new(v as i64).encode(e)?,
            _ => ConstCounter::new(v).encode(e)?,
        }
    }
    Ok(())
}

impl Collector for WeftCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.dp.stats;
        let dir = |d: &'static str| vec![("direction", d.to_string())];
        family(&mut enc, "weft_frames", "Ethernet frames through the sleeve", MetricType::Counter, vec![
            (dir("out"), s.frames_out.load(Relaxed)),
            (dir("in"), s.frames_in.load(Relaxed)),
            (dir("relayed"), s.frames_relayed.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_frame_bytes", "Bytes of Ethernet frames through the sleeve", MetricType::Counter, vec![
            (dir("out"), s.bytes_out.load(Relaxed)),
            (dir("in"), s.bytes_in.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_datagrams", "Sleeve UDP datagrams", MetricType::Counter, vec![
            (dir("out"), s.datagrams_out.load(Relaxed)),
            (dir("in"), s.datagrams_in.load(Relaxed)),
        ])?;
        let drops = by_reason(&DROP_LABELS, &s.drops);
        family(&mut enc, "weft_drops", "Frames or datagrams dropped, by reason", MetricType::Counter, drops)?;
        family(&mut enc, "weft_tap_filtered", "Kernel chatter from the TAP's own address, ignored", MetricType::Counter, vec![
            (vec![], s.filtered.load(Relaxed)),
        ])?;
        let c = &self.ctl;
        let hs = by_reason(&HANDSHAKE_LABELS, &c.handshake_failures);
        family(&mut enc, "weft_handshake_failures", "Control connections that failed before they were up", MetricType::Counter, hs)?;
        let rd = by_reason(&READ_LABELS, &c.read_errors);
        family(&mut enc, "weft_control_read_errors", "Control connections ended by bad input or errors", MetricType::Counter, rd)?;
        family(&mut enc, "weft_gossip_messages", "Gossip messages", MetricType::Counter, vec![
            (dir("in"), c.gossip_received.load(Relaxed)),
            (dir("out"), c.gossip_sent.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_gossip_refused", "Gossip refused as malformed or invalid", MetricType::Counter, vec![
            (vec![], c.gossip_refused.load(Relaxed)),
        ])?;
        let conns = c
            .connections
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|((state, enc), n)| {
                (vec![("state", state), ("encryption", if enc { "encrypted" } else { "plaintext" }.to_string())], n as u64)
            })
            .collect();
        family(&mut enc, "weft_connections", "Control connections by state and encryption", MetricType::Gauge, conns)?;
        family(&mut enc, "weft_peers", "Peers known, including this one", MetricType::Gauge, vec![
            (vec![], c.peers.load(Relaxed)),
        ])?;
        let i = c.ipam.lock().map(|m| m.clone()).unwrap_or_default();
        let one = |v: u64| vec![(Labels::new(), v)];
        family(&mut enc, "weft_ipam_allocations", "Addresses held by containers on this host", MetricType::Gauge, one(i.allocations))?;
        family(&mut enc, "weft_ipam_addresses", "Addresses of the range by who holds them", MetricType::Gauge, vec![
            (vec![("owner", "this_peer".to_string())], i.owned),
            (vec![("owner", "this_peer_free".to_string())], i.free),
            (vec![("owner", "unreachable_peers".to_string())], i.unreachable),
        ])?;
        family(&mut enc, "weft_ipam_pending_requests", "Allocation requests waiting for consensus or a donation", MetricType::Gauge, one(i.pending))?;
        family(&mut enc, "weft_ipam_allocated", "Addresses given out", MetricType::Counter, one(i.allocated_total))?;
        family(&mut enc, "weft_ipam_released", "Addresses released", MetricType::Counter, one(i.released_total))?;
        family(&mut enc, "weft_ipam_failed_requests", "Allocation requests that failed", MetricType::Counter, one(i.failed_total))?;
        family(&mut enc, "weft_ipam_donations", "Space donated between peers", MetricType::Counter, vec![
            (dir("out"), i.donated_total),
            (dir("in"), i.received_total),
        ])?;
        family(&mut enc, "weft_ipam_refused_rings", "Rings from peers refused (different seeds or range, conflicts)", MetricType::Counter, one(i.refused_rings_total))?;
        family(&mut enc, "weft_ipam_save_errors", "IPAM state saves that failed", MetricType::Counter, one(i.save_errors_total))?;
        let d = c.dns.snapshot();
        let qt = |t: &'static str, v: u64| (vec![("type", t.to_string())], v);
        family(&mut enc, "weft_dns_queries", "DNS queries by type", MetricType::Counter, vec![
            qt("A", d.queries_a),
            qt("AAAA", d.queries_aaaa),
            qt("PTR", d.queries_ptr),
            qt("other", d.queries_other),
        ])?;
        let rc = |r: &'static str, v: u64| (vec![("result", r.to_string())], v);
        family(&mut enc, "weft_dns_answers", "DNS answers by result", MetricType::Counter, vec![
            rc("noerror", d.noerror),
            rc("nxdomain", d.nxdomain),
            rc("servfail", d.servfail),
            rc("formerr", d.formerr),
            rc("refused", d.refused),
            rc("other", d.other_rcode),
        ])?;
        family(&mut enc, "weft_dns_forwarded", "DNS queries forwarded upstream", MetricType::Counter, one(d.forwarded))?;
        family(&mut enc, "weft_dns_upstream_failures", "Forwarded DNS queries that failed upstream", MetricType::Counter, one(d.upstream_failures))?;
        family(&mut enc, "weft_dns_dropped", "DNS datagrams dropped unanswered (malformed)", MetricType::Counter, one(d.dropped))?;
        let e = c.dns_entries.lock().map(|m| *m).unwrap_or_default();
        family(&mut enc, "weft_dns_entries", "DNS entries held", MetricType::Gauge, vec![
            (vec![("kind", "live".to_string())], e.live as u64),
            (vec![("kind", "own".to_string())], e.own as u64),
            (vec![("kind", "tombstone".to_string())], e.tombstones as u64),
        ])?;
        Ok(())
    }
}

/// A registry with weft's collector.
pub fn registry(dp: Arc<Dataplane>, ctl: Arc<ControlStats>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(WeftCollector { dp, ctl }));
    r
}

/// Renders the registry in the text exposition format.
pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, r).is_err() {
        out.clear();
    }
    out
}
