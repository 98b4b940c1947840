//! The mesh part of the status document behind `weft status` and `weft report`: this router,
//! its connections and their paths, the peers and routes it knows, its targets, and counters.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde_json::{json, Value};
use weft_proto::identity::{Proof, Trust};
use weft_proto::router::{Target, TargetState};
use weft_proto::{PeerInfo, Router, Transport};

use super::conns::Conns;
use super::stats::{ControlStats, HANDSHAKE_LABELS, READ_LABELS, REFUSAL_LABELS};
use crate::frame::forwarder::Health;
use crate::frame::plane::FramePath;
use crate::frame::stats::{labelled, DROP_LABELS};

/// Facts about this router that do not change while it runs.
pub struct StatusInfo {
    /// Bridge name.
    pub bridge: String,
    /// Container MTU.
    pub mtu: u32,
    /// Sleeve UDP port.
    pub udp_port: u16,
    /// How control connections are dialled.
    pub transport: super::conn::TransportChoice,
    /// Whether a password is set.
    pub encrypted: bool,
    /// When the router started.
    pub started: Instant,
}

/// The document.
pub fn status(core: &Router, conns: &Conns, frames: &FramePath, ctl: &ControlStats, info: &StatusInfo) -> Value {
    let now = Instant::now();
    let enc = info.encrypted;
    let unannounced = frames.unannounced();
    let endpoints = frames.endpoints();
    let connections: Vec<Value> = core
        .connections()
        .iter()
        .map(|(id, c)| {
            let (state, why) = conns.state(*id);
            let h = conns.get(*id);
            let encrypted = h.is_some_and(|h| h.encrypted);
            let path = h.and_then(|h| h.paths.active()).unwrap_or("none");
            let transport = h.map_or("tcp", |h| h.carrier.label());
            let e = endpoints.get(&c.peer);
            let paths: Vec<Value> = h
                .map(|h| h.paths.report())
                .unwrap_or_default()
                .into_iter()
                .map(|(k, hl)| match hl {
                    Health::Up => json!({"kind": k, "up": true}),
                    Health::Down(r) => json!({"kind": k, "up": false, "reason": r}),
                })
                .collect();
            json!({
                "peer_name": c.peer.to_string(), "peer_nickname": c.nickname, "address": c.remote.to_string(),
                "outbound": c.outbound, "transport": transport, "state": state, "encrypted": encrypted, "path": path, "paths": paths, "info": why,
                "up_seconds": now.duration_since(c.since).as_secs(),
                "rtt_ms": c.rtt.map(|r| r.as_secs_f64() * 1000.0),
                "unannounced_frames": unannounced.get(&c.peer).copied().unwrap_or(0),
                // Where the sleeve sends, and how often the peer's datagrams came from a new
                // address (a NAT mapping it).
                "udp_endpoint": e.map(|e| e.dest.to_string()),
                "udp_endpoint_moves": e.map_or(0, |e| e.moves),
                // The largest sleeve datagram the path takes, the path MTU that makes, and
                // what probing found.
                "max_datagram": e.map(|e| e.max_datagram),
                "path_mtu": e.map(|e| e.max_datagram + if e.dest.is_ipv4() { 28 } else { 48 }),
                "path_mtu_probing": e.map(|e| e.probing.clone()),
                // Whether the sleeve's sends to it use GSO (off for this peer alone after a failure).
                "gso": e.is_some_and(|e| e.gso),
            })
        })
        .collect();
    let peers: Vec<Value> = core
        .topology()
        .peers()
        .map(|p| {
            let cs: Vec<Value> = p
                .connections
                .iter()
                .map(|(n, ci)| {
                    json!({"peer": n.to_string(), "established": ci.established, "outbound": ci.outbound,
                    "address": ci.addr.map(|a| a.to_string())})
                })
                .collect();
            // A peer whose traffic goes through another (no direct connection: behind a NAT,
            // a firewall) is "relayed via" that next hop.
            let hop = core.routes().next_hop(p.name);
            let via = hop.filter(|h| *h != p.name).map(|h| {
                let nick = core.topology().get(h).map(|i| i.nickname.clone()).unwrap_or_default();
                json!({"name": h.to_string(), "nickname": nick, "reason": relay_reason(core, p, info.udp_port)})
            });
            json!({"name": p.name.to_string(), "nickname": p.nickname, "uid": p.uid, "version": p.version,
                "reachable": p.name == core.name() || hop.is_some(), "via": via,
                "outside": p.udp.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "connections": cs})
        })
        .collect();
    let targets: Vec<Value> = core
        .targets()
        .values()
        .map(|t| {
            let (state, retry) = match &t.state {
                TargetState::Waiting(at) => ("retrying", Some(at.saturating_duration_since(now).as_secs_f64())),
                TargetState::Connecting => ("connecting", None),
                TargetState::Connected(_) => ("connected", None),
                TargetState::Idle => ("idle", None),
            };
            json!({"address": t.addr.to_string(), "configured": t.configured, "peer": t.peer.map(|p| p.to_string()),
                "transport": match t.transport { Transport::Any => "any", Transport::Udp => "udp" },
                "state": state, "retry_in_seconds": retry, "attempts": t.attempts, "last_error": t.last_error})
        })
        .collect();
    let st = core.stats();
    let keys = core.keys();
    let claim = core.own_claim();
    let identity = json!({
        "key": claim.key.to_string(),
        "trust": match keys.trust() {
            Trust::FirstUse => "first-use".to_string(),
            Trust::Ca(ca) => format!("ca {ca}"),
        },
        "certificate_expires": match &claim.proof {
            Proof::Certified(c) => json!(c.expires),
            Proof::SelfSigned(_) => Value::Null,
        },
        "bound_names": keys.len(),
        "bindings": keys.claims().map(|c| json!({"name": c.name.to_string(), "key": c.key.to_string(),
            "certified": matches!(c.proof, Proof::Certified(_))})).collect::<Vec<_>>(),
        "revoked_keys": keys.revocations().count(),
        "refused": st.identity_refused.iter().map(|(l, v)| (l.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "forged_by": st.forged_by.iter().map(|(p, v)| (p.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "unverified": st.unverified,
    });
    let r = core.routes();
    let s = frames.stats();
    let as_map =
        |rows: Vec<(&str, u64)>| rows.into_iter().map(|(l, v)| (l.to_string(), json!(v))).collect::<serde_json::Map<_, _>>();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "name": core.name().to_string(),
        "nickname": core.config().nickname,
        "uid": core.config().uid,
        "uptime_seconds": now.duration_since(info.started).as_secs(),
        "encryption": if enc { "enabled" } else { "disabled" },
        "warning": if enc { Value::Null } else { json!("NO PASSWORD SET: traffic between hosts is NOT encrypted") },
        "discovery": core.config().discovery,
        "identity": identity,
        "bridge": info.bridge, "mtu": info.mtu,
        "sleeve": {"port": info.udp_port, "offload": frames.offload(),
            "gso_segments": frames.gso_segments(), "max_datagram": frames.max_datagram()},
        // How we dial, and where our peers see our datagrams come from (a NAT's outside).
        "transport": info.transport.label(),
        "outside": core.topology().my_info().udp.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "connections": connections,
        "peers": peers,
        "targets": targets,
        "routes": {
            "unicast": r.unicast.iter().map(|(d, h)| (d.to_string(), json!(h.to_string()))).collect::<serde_json::Map<_, _>>(),
            "broadcast": r.broadcast.iter().map(|(s, hs)| (s.to_string(), json!(hs.iter().map(|h| h.to_string()).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
        },
        "macs": {"local": s.macs_local.load(Relaxed), "remote": s.macs_remote.load(Relaxed),
            "announcements_lost": s.announce_lost.load(Relaxed)},
        "stats": {
            "frames_out": s.frames_out.load(Relaxed), "frames_in": s.frames_in.load(Relaxed),
            "frames_relayed": s.frames_relayed.load(Relaxed), "bytes_out": s.bytes_out.load(Relaxed),
            "bytes_in": s.bytes_in.load(Relaxed), "datagrams_out": s.datagrams_out.load(Relaxed),
            "datagrams_in": s.datagrams_in.load(Relaxed), "drops": as_map(labelled(&DROP_LABELS, &s.drops)),
            "gossip_refused": core.stats().gossip_refused,
            "handshake_failures": as_map(labelled(&HANDSHAKE_LABELS, &ctl.handshake_failures)),
            "handshakes_refused": as_map(labelled(&REFUSAL_LABELS, &ctl.handshakes_refused)),
            "handshakes_in_progress": ctl.handshakes_in_progress.load(Relaxed),
            "control_read_errors": as_map(labelled(&READ_LABELS, &ctl.read_errors)),
            "sleeve_rekeys": ctl.sleeve_rekeys.load(Relaxed),
            "sleeve_rekey_failures": ctl.sleeve_rekey_failures.load(Relaxed),
            "quic_in": s.quic_in.load(Relaxed), "quic_dropped": s.quic_dropped.load(Relaxed),
            "ecn_marked": s.ecn_marked.load(Relaxed),
            "punches_sent": st.punches_sent, "punches_answered": st.punches_answered,
            "observed_refused": st.observed_refused,
        },
    })
}

/// Why a peer is relayed rather than connected directly, from what this end tried and what the
/// two ends' NATs are seen to do.
fn relay_reason(core: &Router, peer: &PeerInfo, our_udp_port: u16) -> String {
    let tried: Vec<&Target> = core.targets().values().filter(|t| t.peer == Some(peer.name)).collect();
    if tried.is_empty() {
        return "no direct connection: no address of it to dial".into();
    }
    // A NAT that gives our datagrams another port than the one we send from likely maps each
    // destination anew (symmetric): no hole punched towards one peer serves another.
    let theirs = peer.addrs.first().map(|a| a.port());
    let their_nat_moves = peer.udp.iter().any(|o| Some(o.port()) != theirs);
    let our_nat_moves = core.topology().my_info().udp.iter().any(|o| o.port() != our_udp_port);
    let punched = tried.iter().any(|t| t.transport == Transport::Udp);
    let mut why = if punched {
        "no direct path: both ends sent to each other's outside address and nothing came through".to_string()
    } else {
        "no direct connection".to_string()
    };
    match (our_nat_moves, their_nat_moves) {
        (true, true) => why.push_str(", both ends behind NATs that change ports (symmetric NAT)"),
        (true, false) => why.push_str(", this host is behind a NAT that changes ports (symmetric NAT)"),
        (false, true) => why.push_str(", the peer is behind a NAT that changes ports (symmetric NAT)"),
        (false, false) => {}
    }
    if let Some(e) = tried.iter().filter_map(|t| t.last_error.as_deref()).next_back() {
        why.push_str(&format!("; last try: {e}"));
    }
    why
}
