//! Prometheus metrics, read at scrape time from the counters the frame path
//! and the control path keep as atomics (no locks anywhere).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::stats::{ControlStats, CONN_STATES, PATHS, HANDSHAKE_LABELS, READ_LABELS, REFUSAL_LABELS};
use crate::frame::stats::{labelled, DROP_LABELS};
use crate::frame::FramePath;

/// Rows of a family labelled `reason`.
fn by_reason(labels: &[&'static str], counters: &[AtomicU64]) -> Vec<(Labels, u64)> {
    labelled(labels, counters).into_iter().map(|(l, v)| (vec![("reason", l.to_string())], v)).collect()
}

struct WeftCollector {
    frames: Arc<FramePath>,
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
        let s = self.frames.stats();
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
        family(&mut enc, "weft_ecn_marked", "Bulk frames marked Congestion Experienced because the sleeve's receive queue stood too long", MetricType::Counter, vec![
            (vec![], s.ecn_marked.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_tap_filtered", "Kernel chatter from the TAP's own address, ignored", MetricType::Counter, vec![
            (vec![], s.filtered.load(Relaxed)),
        ])?;
        let c = &self.ctl;
        let hs = by_reason(&HANDSHAKE_LABELS, &c.handshake_failures);
        family(&mut enc, "weft_handshake_failures", "Control connections that failed before they were up", MetricType::Counter, hs)?;
        let refused = by_reason(&REFUSAL_LABELS, &c.handshakes_refused);
        family(&mut enc, "weft_handshakes_refused", "Control connections closed by the limits on handshakes (evicted: the oldest in progress made room)", MetricType::Counter, refused)?;
        family(&mut enc, "weft_handshakes_in_progress", "Inbound handshakes in progress", MetricType::Gauge, vec![
            (vec![], c.handshakes_in_progress.load(Relaxed)),
        ])?;
        let rd = by_reason(&READ_LABELS, &c.read_errors);
        family(&mut enc, "weft_control_read_errors", "Control connections ended by bad input or errors", MetricType::Counter, rd)?;
        family(&mut enc, "weft_sleeve_rekeys", "Sleeve key rotations completed", MetricType::Counter, vec![
            (vec![], c.sleeve_rekeys.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_sleeve_rekey_failures", "Sleeve key rotations that failed (connection closed)", MetricType::Counter, vec![
            (vec![], c.sleeve_rekey_failures.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_gossip_messages", "Gossip messages", MetricType::Counter, vec![
            (dir("in"), c.gossip_received.load(Relaxed)),
            (dir("out"), c.gossip_sent.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_gossip_refused", "Gossip refused as malformed or invalid", MetricType::Counter, vec![
            (vec![], c.gossip_refused.load(Relaxed)),
        ])?;
        let ident = by_reason(&weft_proto::identity::Refused::LABELS, &c.identity_refused);
        family(&mut enc, "weft_identity_refused", "Claims, connections and gossip entries refused for their identity (forged, impostor, revoked, ...)", MetricType::Counter, ident)?;
        family(&mut enc, "weft_gossip_unverified", "Gossip entries held back until their origin's key is known", MetricType::Counter, vec![
            (vec![], c.gossip_unverified.load(Relaxed)),
        ])?;
        let mut conns = Vec::new();
        for (state, row) in CONN_STATES.iter().zip(&c.connections) {
            for (encryption, n) in ["encrypted", "plaintext"].iter().zip(row) {
                let labels = vec![("state", state.to_string()), ("encryption", encryption.to_string())];
                conns.push((labels, n.load(Relaxed).max(0) as u64));
            }
        }
        family(&mut enc, "weft_connections", "Control connections by state and encryption", MetricType::Gauge, conns)?;
        let by_path = PATHS.iter().zip(&c.paths).map(|(p, n)| (vec![("path", p.to_string())], n.load(Relaxed).max(0) as u64)).collect();
        family(&mut enc, "weft_connection_paths", "Established connections by the path carrying their frames", MetricType::Gauge, by_path)?;
        let f = &c.fastpath;
        let pd = |p: &'static str, d: &'static str, v: u64| (vec![("path", p.to_string()), ("direction", d.to_string())], v);
        family(&mut enc, "weft_path_packets", "Frames between hosts by path (fastpath: the VXLAN device's packets, heartbeats included)", MetricType::Counter, vec![
            pd("sleeve", "out", s.frames_out.load(Relaxed)),
            pd("sleeve", "in", s.frames_in.load(Relaxed)),
            pd("fastpath", "out", f.tx_packets.load(Relaxed)),
            pd("fastpath", "in", f.rx_packets.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_path_bytes", "Bytes of frames between hosts by path", MetricType::Counter, vec![
            pd("sleeve", "out", s.bytes_out.load(Relaxed)),
            pd("sleeve", "in", s.bytes_in.load(Relaxed)),
            pd("fastpath", "out", f.tx_bytes.load(Relaxed)),
            pd("fastpath", "in", f.rx_bytes.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_fastpath_fallbacks", "Times a connection left the fastpath for the sleeve", MetricType::Counter, vec![
            (vec![], f.fallbacks.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_fastpath_activations", "Times a connection went (back) onto the fastpath", MetricType::Counter, vec![
            (vec![], f.activations.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_fastpath_entries", "Remote MACs with kernel forwarding entries on the fastpath", MetricType::Gauge, vec![
            (vec![], f.entries.load(Relaxed)),
        ])?;
        let hb = by_reason(&weft_proto::fastpath::HeartbeatError::LABELS, &f.heartbeats_refused);
        family(&mut enc, "weft_fastpath_heartbeats_refused", "Fastpath heartbeats refused (bad tag, replayed, unknown peer, ...)", MetricType::Counter, hb)?;
        family(&mut enc, "weft_fastpath_filtered", "Datagrams to the fastpath port dropped because they did not come from a peer with a fastpath", MetricType::Counter, vec![
            (vec![], f.filtered.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_fastpath_tx_dropped", "Frames the VXLAN device dropped on transmit", MetricType::Counter, vec![
            (vec![], f.tx_dropped.load(Relaxed)),
        ])?;
        let g = &c.guard;
        family(&mut enc, "weft_guard_dropped", "Frames from containers the port guard dropped, by reason (read every 10 s)", MetricType::Counter, by_reason(&crate::control::guard::REASONS, &g.dropped))?;
        family(&mut enc, "weft_guard_ports", "Container ports with guard rules", MetricType::Gauge, vec![(vec![], g.ports.load(Relaxed))])?;
        family(&mut enc, "weft_guard_unruled", "Frames from weft ports without guard rules, dropped", MetricType::Counter, vec![(vec![], g.unruled.load(Relaxed))])?;
        family(&mut enc, "weft_guard_swept", "Guard rules removed because their port was gone", MetricType::Counter, vec![(vec![], g.swept.load(Relaxed))])?;
        family(&mut enc, "weft_peers", "Peers known, including this one", MetricType::Gauge, vec![
            (vec![], c.peers.load(Relaxed)),
        ])?;
        let i = &c.ipam;
        let one = |v: &AtomicU64| vec![(Labels::new(), v.load(Relaxed))];
        family(&mut enc, "weft_ipam_allocations", "Addresses held by containers on this host", MetricType::Gauge, one(&i.allocations))?;
        family(&mut enc, "weft_ipam_addresses", "Addresses of the range by who holds them", MetricType::Gauge, vec![
            (vec![("owner", "this_peer".to_string())], i.owned.load(Relaxed)),
            (vec![("owner", "this_peer_free".to_string())], i.free.load(Relaxed)),
            (vec![("owner", "unreachable_peers".to_string())], i.unreachable.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_ipam_pending_requests", "Allocation requests waiting for consensus or a donation", MetricType::Gauge, one(&i.pending))?;
        family(&mut enc, "weft_ipam_allocated", "Addresses given out", MetricType::Counter, one(&i.allocated_total))?;
        family(&mut enc, "weft_ipam_released", "Addresses released", MetricType::Counter, one(&i.released_total))?;
        family(&mut enc, "weft_ipam_failed_requests", "Allocation requests that failed", MetricType::Counter, one(&i.failed_total))?;
        family(&mut enc, "weft_ipam_donations", "Space donated between peers", MetricType::Counter, vec![
            (dir("out"), i.donated_total.load(Relaxed)),
            (dir("in"), i.received_total.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_ipam_refused_rings", "Rings from peers refused (different seeds or range, conflicts)", MetricType::Counter, one(&i.refused_rings_total))?;
        family(&mut enc, "weft_ipam_save_errors", "IPAM state saves that failed", MetricType::Counter, one(&i.save_errors_total))?;
        let forged = by_reason(&weft_ipam::FORGED_REASONS, &i.forged_total);
        family(&mut enc, "weft_ipam_forged", "IPAM gossip entries dropped because they did not verify against their origin's key, by reason (per sender: `weft status ipam`, stats.forged_from)", MetricType::Counter, forged)?;
        family(&mut enc, "weft_ipam_dropped_messages", "IPAM gossip and donations dropped because their save failed", MetricType::Counter, one(&i.dropped_total))?;
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
        family(&mut enc, "weft_dns_forwarded", "DNS queries forwarded upstream", MetricType::Counter, vec![(Labels::new(), d.forwarded)])?;
        family(&mut enc, "weft_dns_upstream_failures", "Forwarded DNS queries that failed upstream", MetricType::Counter, vec![(Labels::new(), d.upstream_failures)])?;
        family(&mut enc, "weft_dns_dropped", "DNS datagrams dropped unanswered (malformed)", MetricType::Counter, vec![(Labels::new(), d.dropped)])?;
        let e = &c.dns_entries;
        family(&mut enc, "weft_dns_entries", "DNS entries held", MetricType::Gauge, vec![
            (vec![("kind", "live".to_string())], e.live.load(Relaxed)),
            (vec![("kind", "own".to_string())], e.own.load(Relaxed)),
            (vec![("kind", "tombstone".to_string())], e.tombstones.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_dns_save_errors", "DNS state saves that failed", MetricType::Counter, one(&e.save_errors_total))?;
        family(&mut enc, "weft_dns_unverified_entries",
            "DNS gossip entries dropped before merging: bad_signature (not signed by their origin's bound key: forged or altered), unknown_key (no key bound to the origin yet)",
            MetricType::Counter, vec![
            (vec![("reason", "bad_signature".to_string())], e.forged_total.load(Relaxed)),
            (vec![("reason", "unknown_key".to_string())], e.unknown_key_total.load(Relaxed)),
        ])?;
        family(&mut enc, "weft_macs", "MAC addresses the switch knows, by where they live", MetricType::Gauge, vec![
            (vec![("owner", "local".to_string())], s.macs_local.load(Relaxed)),
            (vec![("owner", "peers".to_string())], s.macs_remote.load(Relaxed)),
        ])?;
        Ok(())
    }
}

/// A registry with weft's collector.
pub fn registry(frames: Arc<FramePath>, ctl: Arc<ControlStats>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(WeftCollector { frames, ctl }));
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
