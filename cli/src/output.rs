//! Human-readable rendering of the router's status document.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// Prints `weft status [what]`.
pub(crate) fn status(out: &mut impl Write, v: &Value, what: Option<&str>) -> Result<()> {
    let empty = Vec::new();
    let conns = v["connections"].as_array().unwrap_or(&empty);
    let peers = v["peers"].as_array().unwrap_or(&empty);
    let targets = v["targets"].as_array().unwrap_or(&empty);
    if what.is_none() {
        writeln!(out, "     Version: weft {}", s(&v["version"]))?;
        writeln!(out, "        Peer: {} ({})", s(&v["name"]), s(&v["nickname"]))?;
        let enc = s(&v["encryption"]);
        if enc == "enabled" {
            writeln!(out, "  Encryption: enabled (Noise XXpsk3 control, AES-256-GCM sleeve)")?;
        } else {
            writeln!(out, "  Encryption: DISABLED -- no password set, traffic between hosts is NOT encrypted")?;
        }
        let id = &v["identity"];
        let trust = if s(&id["trust"]) == "first-use" { "names bound on first use".to_string() } else { format!("mesh CA {}", s(&id["trust"]).trim_start_matches("ca ")) };
        writeln!(out, "    Identity: key {}, {}, {} names bound", s(&id["key"]), trust, id["bound_names"])?;
        let refused: Vec<String> = id["refused"]
            .as_object()
            .map(|m| m.iter().filter(|(_, n)| n.as_u64().unwrap_or(0) > 0).map(|(k, n)| format!("{k} {n}")).collect())
            .unwrap_or_default();
        if !refused.is_empty() {
            let by: Vec<String> = id["forged_by"].as_object().map(|m| m.iter().map(|(p, n)| format!("{p} ({n})")).collect()).unwrap_or_default();
            let by = if by.is_empty() { String::new() } else { format!("; forged gossip from {}", by.join(", ")) };
            writeln!(out, "     Refused: {}{by}", refused.join(", "))?;
        }
        let est = conns.iter().filter(|c| c["state"] == "established").count();
        let reach = peers.iter().filter(|p| p["reachable"] == true).count();
        writeln!(out, "       Peers: {} ({} reachable)", peers.len(), reach)?;
        writeln!(out, " Connections: {} ({} established, {} pending)", conns.len(), est, conns.len() - est)?;
        writeln!(out, "     Targets: {}", targets.len())?;
        let sl = &v["sleeve"];
        writeln!(
            out,
            "      Sleeve: UDP {}, offload {}, max datagram {}, bridge {} (mtu {})",
            sl["port"], sl["offload"], sl["max_datagram"], s(&v["bridge"]), v["mtu"]
        )?;
        let outside: Vec<&str> = v["outside"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
        let quic = conns.iter().filter(|c| c["transport"] == "quic").count();
        writeln!(
            out,
            "   Transport: {} ({quic} connection(s) over QUIC); {}",
            s(&v["transport"]),
            if outside.is_empty() { "peers see us at our own address".to_string() } else { format!("behind a NAT: peers see us at {}", outside.join(", ")) }
        )?;
        let fp = &v["fastpath"];
        if fp["enabled"] == true {
            let on = conns.iter().filter(|c| c["path"] == "fastpath").count();
            let plain: Vec<&str> = fp["unencrypted_peers"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
            let plain = if v["encryption"] == "enabled" && !plain.is_empty() {
                format!("; UNENCRYPTED on the underlay to {}", plain.join(", "))
            } else {
                String::new()
            };
            writeln!(out, "    Fastpath: VXLAN {} on UDP {}, {on} connection(s) on it, {} fallback(s){plain}", s(&fp["device"]), fp["port"], fp["fallbacks"])?;
        } else if !fp.is_null() {
            writeln!(out, "    Fastpath: off: {}", s(&fp["why_not"]))?;
        }
        let g = &v["guard"];
        if let Some(e) = g["error"].as_str() {
            writeln!(out, "       Guard: UNKNOWN: {e}")?;
        } else if !g.is_null() {
            let ports = g["ports"].as_array().map_or(0, Vec::len);
            writeln!(out, "       Guard: {ports} container port(s), {}", guard_drops(&g["dropped"], g["unruled"].as_u64().unwrap_or(0)))?;
        }
        let d = &v["docker"];
        if !d.is_null() {
            let engine = if d["engine"]["connected"] == true { "following dockerd's events" } else { "dockerd not reachable" };
            let nets: Vec<String> = d["networks"]
                .as_array()
                .map(|a| a.iter().map(|n| format!("{} {}", n["name"].as_str().unwrap_or("?"), n["subnet"].as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            writeln!(
                out,
                "      Docker: {engine}; {} network(s){}, {} endpoint(s), {} attached, {} address(es) kept for stopped containers, {} call(s) refused",
                nets.len(),
                if nets.is_empty() { String::new() } else { format!(" ({})", nets.join(", ")) },
                d["endpoints"],
                d["attached"].as_array().map_or(0, Vec::len),
                d["kept_for_stopped"],
                d["refused"]
            )?;
        }
        let drops: u64 = v["stats"]["drops"].as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0);
        writeln!(
            out,
            "      Frames: {} out, {} in, {} relayed, {} dropped",
            v["stats"]["frames_out"], v["stats"]["frames_in"], v["stats"]["frames_relayed"], drops
        )?;
        writeln!(out)?;
    }
    if what.is_none() || what == Some("connections") {
        writeln!(out, "Connections:")?;
        if conns.is_empty() {
            writeln!(out, "  (none)")?;
        }
        for c in conns {
            writeln!(
                out,
                "  {} {:<21} {:<4} {:<11} {:<11} {:<8} mtu {:<5} rtt {:<8} {} ({})  {}",
                if c["outbound"] == true { "->" } else { "<-" },
                s(&c["address"]),
                s(&c["transport"]),
                s(&c["state"]),
                if c["encrypted"] == true && c["path"] != "fastpath" { "encrypted" } else { "PLAINTEXT" },
                s(&c["path"]),
                c["path_mtu"],
                c["rtt_ms"].as_f64().map_or("-".to_string(), |r| format!("{r:.1}ms")),
                s(&c["peer_name"]),
                s(&c["peer_nickname"]),
                s(&c["info"])
            )?;
        }
    }
    if what.is_none() || what == Some("peers") {
        writeln!(out, "Peers:")?;
        for p in peers {
            let cs = p["connections"].as_array().map(|a| a.len()).unwrap_or(0);
            let reach = if p["name"] == v["name"] {
                "  (this peer)".to_owned()
            } else if p["reachable"] == true {
                match p["via"]["nickname"].as_str() {
                    Some(n) => format!("  (relayed via {n}: {})", p["via"]["reason"].as_str().unwrap_or("no direct connection")),
                    None => String::new(),
                }
            } else {
                "  (unreachable)".to_owned()
            };
            writeln!(out, "  {} ({})  {} connections{}", s(&p["name"]), s(&p["nickname"]), cs, reach)?;
        }
    }
    if what.is_none() {
        if let Some(a) = v["attachments"].as_array().filter(|a| !a.is_empty()) {
            let ports: Vec<&str> = a.iter().map(|x| s(&x["host_ifname"])).collect();
            writeln!(out, "Attached (bridge ports): {}", ports.join(", "))?;
        }
    }
    if what == Some("ports") {
        ports(out, &v["guard"])?;
    }
    if what == Some("networks") {
        networks(out, v)?;
    }
    if what.is_none() || what == Some("cni") {
        cni(out, &v["cni"], what.is_some())?;
    }
    if what.is_none() || what == Some("ipam") {
        ipam(out, &v["ipam"])?;
    }
    if what.is_none() || what == Some("dns") {
        dns(out, &v["dns"], what.is_some())?;
    }
    if what.is_none() || what == Some("targets") {
        writeln!(out, "Targets:")?;
        if targets.is_empty() {
            writeln!(out, "  (none)")?;
        }
        for t in targets {
            let mut line = format!(
                "  {:<21} {:<10} {}",
                s(&t["address"]),
                s(&t["state"]),
                if t["configured"] == true { "configured" } else { "discovered" }
            );
            if let Some(r) = t["retry_in_seconds"].as_f64() {
                line.push_str(&format!(", next try in {r:.0}s"));
            }
            if let Some(e) = t["last_error"].as_str() {
                line.push_str(&format!(", last error: {e}"));
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// "N frames dropped (arp 2, mac 1)", or "nothing dropped".
fn guard_drops(dropped: &Value, unruled: u64) -> String {
    let mut parts: Vec<String> = dropped
        .as_object()
        .map(|m| m.iter().filter(|(_, n)| n.as_u64().unwrap_or(0) > 0).map(|(r, n)| format!("{r} {n}")).collect())
        .unwrap_or_default();
    if unruled > 0 {
        parts.push(format!("port without rules {unruled}"));
    }
    let total: u64 = dropped.as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum()) + unruled;
    if total == 0 {
        "nothing dropped".into()
    } else {
        format!("{total} frame(s) dropped ({})", parts.join(", "))
    }
}

/// `weft status networks`: the networks on this host, and the hosts on each.
fn networks(out: &mut impl Write, v: &Value) -> Result<()> {
    writeln!(out, "Networks on this host (each its own L2 segment, on the sleeve and the fastpath):")?;
    let empty = Vec::new();
    for n in v["networks"].as_array().unwrap_or(&empty) {
        let members = match &n["members"] {
            Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
            other => s(other).to_string(),
        };
        writeln!(out, "  {:<16} segment {}  bridge {:<10} {} container(s) here; hosts: {}", s(&n["name"]), s(&n["segment"]), s(&n["bridge"]), n["containers"], members)?;
    }
    Ok(())
}

/// `weft status ports`: each container port, what it may send, and what it was refused.
fn ports(out: &mut impl Write, g: &Value) -> Result<()> {
    writeln!(out, "Ports (the guard lets each send only from its own MAC and addresses):")?;
    if let Some(e) = g["error"].as_str() {
        writeln!(out, "  cannot read the guard: {e}")?;
        return Ok(());
    }
    let empty = Vec::new();
    let ports = g["ports"].as_array().unwrap_or(&empty);
    if ports.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for p in ports {
        let addrs: Vec<&str> = p["addresses"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
        writeln!(out, "  {}  {}  {}  [{}]", s(&p["port"]), s(&p["label"]), s(&p["mac"]), addrs.join(", "))?;
        writeln!(out, "      {}", guard_drops(&p["dropped"], 0))?;
    }
    if g["unruled"].as_u64().unwrap_or(0) > 0 {
        writeln!(out, "  frames from weft ports without rules, dropped: {}", g["unruled"])?;
    }
    Ok(())
}

/// The CNI part of `weft status`: a count, or (for `weft status cni`) every attachment.
fn cni(out: &mut impl Write, v: &Value, each: bool) -> Result<()> {
    let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        if each {
            writeln!(out, "CNI attachments: (none)")?;
        }
        return Ok(());
    }
    writeln!(out, "CNI attachments: {}", list.len())?;
    if !each {
        return Ok(());
    }
    for a in list {
        let join = |k: &str| a[k].as_array().map(|x| x.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")).unwrap_or_default();
        let id = s(&a["container_id"]);
        writeln!(
            out,
            "  {:<12} {:<16} {:<6} {:<18} {}",
            s(&a["network"]),
            id.get(..12).unwrap_or(id),
            s(&a["ifname"]),
            join("addresses"),
            join("names")
        )?;
    }
    Ok(())
}

/// The address allocation part of `weft status`.
fn ipam(out: &mut impl Write, v: &Value) -> Result<()> {
    writeln!(out, "Address allocation:")?;
    writeln!(
        out,
        "  Range {} (default subnet {}), init {}: {}",
        s(&v["range"]),
        s(&v["default_subnet"]),
        s(&v["init"]),
        s(&v["state"])
    )?;
    if let Some(e) = v["last_error"].as_str() {
        writeln!(out, "  Last refused ring: {e}")?;
    }
    save_failure(out, v)?;
    let empty = Vec::new();
    let peers = v["peers"].as_array().unwrap_or(&empty);
    let total: u64 = peers.iter().filter_map(|p| p["owned"].as_u64()).sum();
    for p in peers {
        let owned = p["owned"].as_u64().unwrap_or(0);
        let pct = if total > 0 { 100.0 * owned as f64 / total as f64 } else { 0.0 };
        let who = if p["me"] == true {
            " (this peer)"
        } else if p["reachable"] == true {
            ""
        } else {
            " (UNREACHABLE)"
        };
        writeln!(
            out,
            "  {} ({}){who}: {owned} addresses ({pct:.1}%), {} free",
            s(&p["peer"]),
            s(&p["nickname"]),
            p["free"]
        )?;
    }
    if v["unreachable_addresses"].as_u64().unwrap_or(0) > 0 {
        writeln!(
            out,
            "  {} addresses are held by unreachable peers; `weft rmpeer NAME` takes over the space of a peer gone for good",
            v["unreachable_addresses"]
        )?;
    }
    writeln!(out, "  Allocated here: {}, requests waiting: {}", v["allocated"], v["pending"])?;
    Ok(())
}

/// A line when the service's state file cannot be written: while it fails, nothing that
/// depends on the state leaves the router.
fn save_failure(out: &mut impl Write, v: &Value) -> Result<()> {
    if let Some(e) = v["save_error"].as_str() {
        writeln!(
            out,
            "  SAVING {} FAILS ({} failures so far): {e}\n  Until it works again, changes are answered with an error and not gossiped ({} waiting)",
            s(&v["state_file"]),
            v["save_errors"],
            v["held"]
        )?;
    }
    Ok(())
}

/// `weft ps`: the containers holding addresses here.
pub(crate) fn ps(out: &mut impl Write, v: &Value) -> Result<()> {
    let empty = Vec::new();
    let allocs = v["allocations"].as_array().unwrap_or(&empty);
    if allocs.is_empty() {
        writeln!(out, "(no container holds a weft address on this host)")?;
    }
    let w = allocs.iter().filter_map(|a| a["id"].as_str()).map(str::len).max().unwrap_or(2).max(2);
    for a in allocs {
        writeln!(out, "{:<w$}  {:<18}  {}", s(&a["id"]), s(&a["address"]), s(&a["netns"]))?;
    }
    Ok(())
}

/// The DNS part of `weft status`; the entries only for `weft status dns`.
fn dns(out: &mut impl Write, v: &Value, entries: bool) -> Result<()> {
    writeln!(out, "DNS:")?;
    if v["enabled"] != true {
        writeln!(out, "  disabled (--no-dns)")?;
        return Ok(());
    }
    let listening: Vec<&str> = v["listening"].as_array().map(Vec::as_slice).unwrap_or_default().iter().filter_map(Value::as_str).collect();
    let upstreams = match v["upstreams"].as_array() {
        Some(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
        None => "from /etc/resolv.conf".into(),
    };
    writeln!(
        out,
        "  Zone {}. (ttl {}s), listening on {}, upstreams {}",
        s(&v["domain"]),
        v["ttl"],
        if listening.is_empty() { "nothing yet (the bridge has no address: `weft expose`)".to_string() } else { listening.join(", ") },
        upstreams
    )?;
    save_failure(out, v)?;
    let c = &v["counts"];
    let q = &v["queries"];
    writeln!(
        out,
        "  Entries: {} live ({} from this host), {} names, {} tombstones; queries: {} answered here, {} forwarded, {} upstream failures",
        c["live"], c["own"], c["names"], c["tombstones"], q["local"], q["forwarded"], q["upstream_failures"]
    )?;
    let u = &v["unverified_entries"];
    let (forged, unknown) = (u["bad_signature"].as_u64().unwrap_or(0), u["unknown_key"].as_u64().unwrap_or(0));
    if forged + unknown > 0 {
        writeln!(out, "  Entries from peers dropped unverified: {forged} with a bad signature (forged), {unknown} of origins with no key yet")?;
        if let Some(by) = u["by_sender"].as_object() {
            for (peer, c) in by {
                writeln!(out, "    from {peer}: {} forged, {} no key yet", c["bad_signature"], c["unknown_key"])?;
            }
        }
    }
    if entries {
        for e in v["entries"].as_array().map(Vec::as_slice).unwrap_or_default() {
            writeln!(out, "  {:<32} {:<16} {}  {}", s(&e["name"]), s(&e["address"]), s(&e["origin"]), s(&e["id"]))?;
        }
    }
    Ok(())
}
