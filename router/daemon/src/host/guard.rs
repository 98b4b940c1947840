//! The port guard: what a container may send into the bridge. A container with CAP_NET_RAW
//! (Docker and Kubernetes give it by default) could otherwise change its MAC, claim another
//! container's address in ARP or neighbour discovery, send router advertisements or DHCP
//! offers, or flood the bridge's MAC table.
//!
//! One nftables table, `bridge weft_guard`, holds a chain per container port. Its base chain
//! hooks bridge prerouting at priority -200, before the bridge learns the source MAC and before
//! br_netfilter, and sends each frame to its port's chain with one map lookup on the input
//! interface's name; a weft port (`vw…`) without an entry in the map carries nothing. A port's
//! chain passes only:
//! - frames from the port's own MAC;
//! - ARP whose sender is that MAC and one of the port's IPv4 addresses (or 0.0.0.0, a probe);
//! - IPv4 from one of its addresses, but not DHCP server replies (UDP source port 67);
//! - IPv6 from one of its addresses (its EUI-64 link-local included), and from `::` only
//!   duplicate address detection for its own addresses and MLD reports; no router
//!   advertisements or redirects, neighbour advertisements only for its own addresses, no
//!   DHCPv6 server replies (UDP source port 547);
//!
//! and drops everything else (other EtherTypes, VLAN tags, STP) with a named counter per reason.
//! Rules match the port by name, so they go in before the veth pair exists and come out after
//! it is gone, each change one `nft` transaction: there is no moment when the port carries a
//! frame unchecked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::Value;

use weft_proto::switch::Mac;

use super::nft;

/// The nftables table (bridge family).
pub const TABLE: &str = "weft_guard";
/// The prefix of every weft container port ([`super::host_ifname_for`]).
pub const PORT_PREFIX: &str = "vw";
/// Why a frame was dropped, one counter each per port.
pub const REASONS: [&str; 8] = ["mac", "arp", "ip4", "ip6", "nd", "ra", "dhcp", "proto"];

/// One container port's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The host end of the veth pair.
    pub port: String,
    /// The container end's MAC.
    pub mac: [u8; 6],
    pub v4: Vec<Ipv4Addr>,
    /// The container's IPv6 addresses, its EUI-64 link-local included.
    pub v6: Vec<Ipv6Addr>,
    /// What the port is for people: the namespace and interface.
    pub label: String,
    /// The network (segment) the port is on, 0 for the default one.
    pub segment: u32,
}

/// A port as the table shows it, with its drops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortStatus {
    pub port: String,
    pub label: String,
    /// The network (segment) of the port.
    pub segment: u32,
    pub mac: String,
    pub addresses: Vec<String>,
    /// Frames dropped, by reason (every reason present).
    pub dropped: BTreeMap<String, u64>,
}

/// The whole guard as the table shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub ports: Vec<PortStatus>,
    /// Frames from weft ports that had no rules (a port made by something else than weft, or
    /// left behind by a killed CNI plugin), dropped.
    pub unruled: u64,
}

impl Listing {
    /// Drops summed over the ports, by reason.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        let mut t: BTreeMap<String, u64> = REASONS.iter().map(|r| (r.to_string(), 0)).collect();
        for p in &self.ports {
            for (r, n) in &p.dropped {
                *t.entry(r.clone()).or_default() += n;
            }
        }
        t
    }
}

/// The link-local address the kernel gives an interface with this MAC (EUI-64, RFC 4291).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let m = mac;
    Ipv6Addr::from([
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5],
    ])
}

/// A random unicast, locally administered MAC for a container end.
pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Whether `name` is a weft port name: the prefix and 10 lower-case hex digits. Only such
/// names go into scripts.
pub fn is_port_name(name: &str) -> bool {
    name.len() == 12
        && name.starts_with(PORT_PREFIX)
        && name[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An IPv6 address as the 128-bit integer nft compares the ND target with.
fn nd_key(a: Ipv6Addr) -> String {
    format!("0x{:032x}", u128::from(a))
}

/// Text that can sit in an nft comment: printable ASCII without quotes or backslashes, at most
/// 100 characters.
fn comment_text(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').filter(|c| *c != '"' && *c != '\\').take(100).collect()
}

impl Port {
    /// The rules for a port carrying `mac` and the addresses `addrs`.
    pub fn new(port: &str, mac: [u8; 6], addrs: &[(IpAddr, u8)], label: &str, segment: u32) -> Port {
        let mut v4 = Vec::new();
        let mut v6 = vec![link_local(mac)];
        for &(a, _) in addrs {
            match a {
                IpAddr::V4(a) if !v4.contains(&a) => v4.push(a),
                IpAddr::V6(a) if !v6.contains(&a) => v6.push(a),
                _ => {}
            }
        }
        Port { port: port.to_owned(), mac, v4, v6, label: comment_text(label), segment }
    }

    /// The script that adds the port's sets, counters and chain and puts it in the map, the
    /// base table with it (every statement is idempotent but the port's, which
    /// [`remove_script`] clears first).
    pub fn add_script(&self) -> String {
        let p = &self.port;
        let t = format!("bridge {TABLE}");
        let mut s = base_script();
        let list = |items: Vec<String>| if items.is_empty() { String::new() } else { format!(" elements = {{ {} }} ;", items.join(", ")) };
        // The comment holds the segment, then the label.
        let _ = writeln!(s, "add set {t} {p}_mac {{ type ether_addr; comment \"{} {}\";{} }}", self.segment, self.label, list(vec![Mac(self.mac).to_string()]));
        let _ = writeln!(s, "add set {t} {p}_v4 {{ type ipv4_addr;{} }}", list(self.v4.iter().map(ToString::to_string).collect()));
        let _ = writeln!(s, "add set {t} {p}_v6 {{ type ipv6_addr;{} }}", list(self.v6.iter().map(ToString::to_string).collect()));
        let _ = writeln!(s, "add set {t} {p}_nd {{ typeof @th,64,128;{} }}", list(self.v6.iter().map(|a| nd_key(*a)).collect()));
        for r in REASONS {
            let _ = writeln!(s, "add counter {t} {p}_{r}");
        }
        let c = format!("{t} p_{p}");
        // The common case first and as plain compares (a container has one MAC and, nearly
        // always, one IPv4 address): a TCP segment from its own address takes four compares.
        let mac = Mac(self.mac);
        let v4 = match self.v4.as_slice() {
            [one] => one.to_string(),
            _ => format!("@{p}_v4"),
        };
        let rules = [
            format!("ether saddr != {mac} counter name {p}_mac drop"),
            format!("ether type ip ip saddr != {v4} counter name {p}_ip4 drop"),
            "ether type ip meta l4proto != udp accept".into(),
            format!("ether type ip udp sport 67 counter name {p}_dhcp drop"),
            "ether type ip accept".into(),
            format!("ether type arp arp saddr ether != {mac} counter name {p}_arp drop"),
            format!("ether type arp arp saddr ip != @{p}_v4 arp saddr ip != 0.0.0.0 counter name {p}_arp drop"),
            "ether type arp accept".into(),
            format!("ether type ip6 ip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 @{p}_nd accept"),
            "ether type ip6 ip6 saddr :: icmpv6 type mld2-listener-report accept".into(),
            format!("ether type ip6 ip6 saddr != @{p}_v6 counter name {p}_ip6 drop"),
            format!("ether type ip6 icmpv6 type {{ nd-router-advert, nd-redirect }} counter name {p}_ra drop"),
            format!("ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != @{p}_nd counter name {p}_nd drop"),
            format!("ether type ip6 udp sport 547 counter name {p}_dhcp drop"),
            "ether type ip6 accept".into(),
            format!("counter name {p}_proto drop"),
        ];
        let _ = writeln!(s, "add chain {c}");
        for r in rules {
            let _ = writeln!(s, "add rule {c} {r}");
        }
        let _ = writeln!(s, "add element {t} ports {{ \"{p}\" : jump p_{p} }}");
        s
    }
}

/// The table, its map of ports, and the base chain: frames from other ports (the TAP, the
/// fastpath's VXLAN device, uplinks) pass at the cost of one name compare, each weft port's
/// frames go to its chain, and weft ports without one are dropped. Idempotent.
pub fn base_script() -> String {
    let t = format!("bridge {TABLE}");
    format!(
        "add table {t}\n\
         add map {t} ports {{ type ifname : verdict; }}\n\
         add counter {t} unruled\n\
         add chain {t} pre {{ type filter hook prerouting priority -200; policy accept; }}\n\
         flush chain {t} pre\n\
         add rule {t} pre iifname != \"{PORT_PREFIX}*\" accept\n\
         add rule {t} pre iifname vmap @ports\n\
         add rule {t} pre counter name unruled drop\n"
    )
}

/// The script that takes a port's rules out (its frames then meet the base chain's drop).
pub fn remove_script(port: &str) -> String {
    let t = format!("bridge {TABLE}");
    let mut s = format!("delete element {t} ports {{ \"{port}\" }}\nflush chain {t} p_{port}\ndelete chain {t} p_{port}\n");
    for set in ["mac", "v4", "v6", "nd"] {
        let _ = writeln!(s, "delete set {t} {port}_{set}");
    }
    for r in REASONS {
        let _ = writeln!(s, "delete counter {t} {port}_{r}");
    }
    s
}

/// Installs the port's rules, replacing any left under its name.
pub async fn install(p: &Port) -> Result<()> {
    if !is_port_name(&p.port) {
        bail!("{:?} is not a weft port name", p.port);
    }
    // What a killed attach may have left. Until the add below, the port is unruled: dropped.
    let _ = nft::run(&remove_script(&p.port)).await;
    nft::run(&p.add_script())
        .await
        .map_err(|e| anyhow!("installing the port guard (anti-spoofing rules) for {} failed: {e}", p.port))
}

/// Takes the port's rules out; `Ok(false)` when it had none.
pub async fn remove(port: &str) -> Result<bool> {
    if !is_port_name(port) {
        bail!("{port:?} is not a weft port name");
    }
    match nft::run(&remove_script(port)).await {
        Ok(()) => Ok(true),
        Err(e) if nft::is_missing(&e) => Ok(false),
        Err(e) => Err(anyhow!("removing the port guard of {port} failed: {e}")),
    }
}

/// Allows more IPv6 addresses on a port (the link-local the kernel gave the container when it
/// was not the EUI-64 one).
pub async fn allow_v6(port: &str, addrs: &[Ipv6Addr]) -> Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    if !is_port_name(port) {
        bail!("{port:?} is not a weft port name");
    }
    let t = format!("bridge {TABLE}");
    let v6: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let nd: Vec<String> = addrs.iter().map(|a| nd_key(*a)).collect();
    let script = format!("add element {t} {port}_v6 {{ {} }}\nadd element {t} {port}_nd {{ {} }}\n", v6.join(", "), nd.join(", "));
    nft::run(&script).await.map_err(|e| anyhow!("allowing {v6:?} on {port} failed: {e}"))
}

/// The ports with rules, with their drops. An absent table is an empty listing.
pub async fn list() -> Result<Listing> {
    match nft::output(&["-j", "list", "table", "bridge", TABLE], "").await {
        Ok(out) => parse_listing(&out),
        Err(e) if nft::is_missing(&e) => Ok(Listing::default()),
        Err(e) => Err(anyhow!("reading the port guard: {e}")),
    }
}

/// The listing from `nft -j list table bridge weft_guard`.
pub fn parse_listing(json: &str) -> Result<Listing> {
    let v: Value = serde_json::from_str(json).map_err(|e| anyhow!("nft printed no JSON: {e}"))?;
    let items = v["nftables"].as_array().ok_or_else(|| anyhow!("nft printed no \"nftables\" list"))?;
    let mut ports: BTreeMap<String, PortStatus> = BTreeMap::new();
    let mut unruled = 0;
    let strings = |s: &Value| -> Vec<String> {
        s["elem"].as_array().map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    for item in items {
        if let Some(set) = item.get("set") {
            let name = set["name"].as_str().unwrap_or_default();
            let Some((port, kind)) = name.split_once('_') else { continue };
            if !is_port_name(port) {
                continue;
            }
            let e = ports.entry(port.to_owned()).or_default();
            match kind {
                "mac" => {
                    e.mac = strings(set).into_iter().next().unwrap_or_default();
                    let comment = set["comment"].as_str().unwrap_or_default();
                    let (segment, label) = comment.split_once(' ').unwrap_or((comment, ""));
                    e.segment = segment.parse().unwrap_or(0);
                    e.label = label.to_owned();
                }
                "v4" | "v6" => e.addresses.extend(strings(set)),
                _ => {}
            }
        } else if let Some(c) = item.get("counter") {
            let name = c["name"].as_str().unwrap_or_default();
            let packets = c["packets"].as_u64().unwrap_or(0);
            if name == "unruled" {
                unruled = packets;
            } else if let Some((port, reason)) = name.split_once('_') {
                if is_port_name(port) && REASONS.contains(&reason) {
                    ports.entry(port.to_owned()).or_default().dropped.insert(reason.to_owned(), packets);
                }
            }
        }
    }
    let ports = ports
        .into_iter()
        .map(|(port, mut s)| {
            s.port = port;
            for r in REASONS {
                s.dropped.entry(r.to_owned()).or_insert(0);
            }
            s
        })
        .collect();
    Ok(Listing { ports, unruled })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn link_local_is_eui64() {
        let ll = link_local([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(ll, "fe80::11:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap());
        let ll = link_local([0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(ll, "fe80::211:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn random_macs_are_unicast_and_local() {
        for _ in 0..1000 {
            let m = random_mac();
            assert_eq!(m[0] & 0x01, 0, "multicast bit");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered bit");
        }
    }

    #[test]
    fn only_weft_port_names_reach_a_script() {
        assert!(is_port_name("vw0123456789"));
        assert!(is_port_name("vwabcdefabcd"));
        for bad in ["vw012345678", "vw0123456789a", "vwABCDEF0123", "vx0123456789", "vw01234567;9", "vw0123 56789", ""] {
            assert!(!is_port_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_script_pins_the_mac_and_addresses_and_ends_in_a_drop() {
        let addrs = [(IpAddr::from([10, 32, 0, 5]), 12), ("fd00::5".parse().unwrap(), 64)];
        let p = Port::new("vw00000000aa", [2, 0, 0, 0, 0, 0xaa], &addrs, "/run/netns/c \"x\" ethwe", 0);
        assert_eq!(p.v4, vec![Ipv4Addr::new(10, 32, 0, 5)]);
        assert_eq!(p.v6, vec![link_local([2, 0, 0, 0, 0, 0xaa]), "fd00::5".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(p.label, "/run/netns/c x ethwe", "quotes cannot end the comment");
        let s = p.add_script();
        assert!(s.starts_with(&base_script()));
        assert!(s.contains("add set bridge weft_guard vw00000000aa_mac { type ether_addr; comment \"0 /run/netns/c x ethwe\"; elements = { 02:00:00:00:00:aa } ; }"));
        assert!(s.contains("vw00000000aa_v4 { type ipv4_addr; elements = { 10.32.0.5 } ; }"));
        assert!(s.contains("0xfd000000000000000000000000000005"));
        let rules: Vec<&str> = s.lines().filter(|l| l.starts_with("add rule bridge weft_guard p_vw00000000aa")).collect();
        assert!(rules[0].ends_with("ether saddr != 02:00:00:00:00:aa counter name vw00000000aa_mac drop"));
        assert!(rules[1].ends_with("ether type ip ip saddr != 10.32.0.5 counter name vw00000000aa_ip4 drop"), "one address: a plain compare");
        assert!(rules.last().unwrap().ends_with("counter name vw00000000aa_proto drop"), "a whitelist: everything else drops");
        // The map entry comes last, after the chain it jumps to.
        assert!(s.trim_end().ends_with("add element bridge weft_guard ports { \"vw00000000aa\" : jump p_vw00000000aa }"));
        // Every counter a rule names is made, and every made counter is removed again.
        for r in REASONS {
            assert!(s.contains(&format!("add counter bridge weft_guard vw00000000aa_{r}\n")));
            assert!(remove_script("vw00000000aa").contains(&format!("delete counter bridge weft_guard vw00000000aa_{r}\n")));
        }
    }

    #[test]
    fn an_ipv6_only_port_gets_an_empty_ipv4_set() {
        let p = Port::new("vw00000000ab", [2, 0, 0, 0, 0, 0xab], &[], "", 7);
        assert!(p.add_script().contains("vw00000000ab_v4 { type ipv4_addr; }"));
        assert!(p.add_script().contains("ip saddr != @vw00000000ab_v4 counter"), "no address or several: the set");
    }

    #[test]
    fn the_listing_is_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "bridge", "name": "weft_guard", "handle": 1}},
          {"set": {"family": "bridge", "name": "vw00000000aa_mac", "table": "weft_guard", "type": "ether_addr", "comment": "7 /run/netns/c ethwe", "elem": ["02:00:00:00:00:aa"]}},
          {"set": {"family": "bridge", "name": "vw00000000aa_v4", "table": "weft_guard", "type": "ipv4_addr", "elem": ["10.32.0.5"]}},
          {"set": {"family": "bridge", "name": "vw00000000aa_nd", "table": "weft_guard", "type": "integer", "elem": ["0xfe80"]}},
          {"set": {"family": "bridge", "name": "ports", "table": "weft_guard"}},
          {"counter": {"family": "bridge", "name": "unruled", "table": "weft_guard", "packets": 3, "bytes": 0}},
          {"counter": {"family": "bridge", "name": "vw00000000aa_arp", "table": "weft_guard", "packets": 7, "bytes": 0}},
          {"counter": {"family": "bridge", "name": "vw00000000aa_bogus", "table": "weft_guard", "packets": 9, "bytes": 0}}]}"#;
        let l = parse_listing(json).unwrap();
        assert_eq!(l.unruled, 3);
        assert_eq!(l.ports.len(), 1);
        let p = &l.ports[0];
        assert_eq!((p.port.as_str(), p.mac.as_str(), p.label.as_str(), p.segment), ("vw00000000aa", "02:00:00:00:00:aa", "/run/netns/c ethwe", 7));
        assert_eq!(p.addresses, vec!["10.32.0.5".to_string()]);
        assert_eq!(p.dropped["arp"], 7);
        assert_eq!(p.dropped["mac"], 0);
        assert_eq!(p.dropped.len(), REASONS.len());
        assert_eq!(l.totals()["arp"], 7);
        assert!(parse_listing("not json").is_err());
        assert!(parse_listing("{}").is_err());
    }
}
