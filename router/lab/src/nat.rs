//! Hosts behind NAT routers, so tests can check weft across NATs (issue 15).
//!
//! [`LabConfig::behind_nat`] puts host `i` behind a NAT router of a [`Nat`] kind. Each such
//! host gets a NAT router namespace of its own; hosts not named keep the flat layout.
//!
//! # Layout
//!
//! For NATed host `i` (lab id `<id>`):
//!
//! ```text
//!  switch <id>-sw, br0            NAT router <id>-n<i>                host <id>-h<i>
//!  port s<i>  <── veth ──>  ul0 192.168.77.<i+1>/24   in0 10.200.<i>.1/24  <── veth ──>  ul0 10.200.<i>.2/24
//!                           (outside)                 (inside)                          default via 10.200.<i>.1
//! ```
//!
//! - The NAT router's outside port takes the switch port and the underlay address host `i` would
//!   have had without a NAT (`192.168.77.<i+1>`), so nothing collides with the other hosts
//!   (which keep `192.168.77.<j+1>` on their `ul0`), [`Lab::block`] and [`Lab::block_udp`] still
//!   work by host index (they cut the NAT router's switch port), and the address scheme holds
//!   for all 250 hosts.
//! - Host `i` keeps its namespace name and its interface name `ul0`, but `ul0` is the inside link
//!   to its NAT router: [`Host::underlay_ip`](crate::Host::underlay_ip) is the private address
//!   `10.200.<i>.2` (what its router binds and sends from), and its only route out is the default
//!   route via the NAT router. [`Host::public_ip`](crate::Host::public_ip) (and
//!   [`Lab::nat_outside`]) is the NAT router's outside address, what other hosts see as the source.
//! - Nothing on the underlay has a route into `10.200.0.0/16`, and the NAT router's forward chain
//!   drops anything from outside that is not part of a connection the host started (or, for
//!   [`Nat::PortPreserving`], a datagram to a port in its cone), even from a host that adds a
//!   route `10.200.<i>.0/24 via 192.168.77.<i+1>` itself. So a NATed host is only reachable
//!   through its NAT's translations.
//! - [`Lab::start_router`] gives peers by their `underlay_ip`. A NATed peer's is private and
//!   unreachable from anywhere else: tests name only public hosts as peers (a NATed host dials
//!   out to public ones; public ones learn it from its connection).
//!
//! The NAT router has `net.ipv4.ip_forward=1` and one nftables table, `ip weft_nat` (its text is
//! [`Nat::ruleset`]; the lab also writes it to `/tmp/weft-lab-<id>/n<i>.nft`). Its names:
//! chain `postnat` (postrouting, NAT: masquerade on `ul0`), `forward_guard` (forward, filter:
//! accept `ct state established,related` and inside to outside, drop the rest, counted),
//! `input_guard` (input, filter: unsolicited datagrams and connections to the NAT router itself
//! are dropped silently, counted, as most NAT routers do, rather than answered with ICMP port
//! unreachable; echo requests are answered so tests can ping the outside address), and for
//! [`Nat::PortPreserving`] also set `cone`, chain `cone_seen` (postrouting, after the NAT) and
//! `prenat` (prerouting, NAT).
//!
//! # What each kind is, in Linux terms (RFC 4787 words)
//!
//! Linux conntrack NAT on its own: the **mapping** is kept per 5-tuple, and `masquerade` keeps the
//! inside source port whenever the translated tuple is still free, which with one inside host is
//! practically always; so every destination sees the same outside port: endpoint-independent
//! mapping (EIM), port preserving. The **filtering** is address-and-port-dependent (APDF) without
//! any rule: a datagram from outside is translated back only if it is the reply direction of an
//! existing conntrack entry, i.e. comes from exactly the address and port the host sent to.
//! Anything else is addressed to the NAT router itself (there is no DNAT) and never reaches the
//! host, whatever the forward chain says. So plain masquerade *is* a port-restricted cone NAT, and
//! a forward chain cannot make it more restrictive for translated traffic: it only stops routed
//! access to the private subnet. A rule set without DNAT cannot make it *less* restrictive
//! either, since only DNAT delivers an unsolicited datagram to an inside address. The kinds are
//! therefore:
//!
//! | kind | mapping | filtering | what it is |
//! | --- | --- | --- | --- |
//! | [`Nat::PortPreserving`] | EIM, port kept | endpoint-independent (UDP) | full cone: masquerade, plus a dynamic DNAT of unsolicited UDP to every port the host has sent from |
//! | [`Nat::Filtering`] | EIM, port kept | address-and-port-dependent | port-restricted cone: plain masquerade |
//! | [`Nat::Symmetric`] | address-and-port-dependent, random port | address-and-port-dependent | symmetric: `masquerade random,fully-random` |
//!
//! All three drop routed (untranslated) access to the inside and unsolicited traffic to the NAT
//! router itself; TCP is the same in all three (outbound only, port kept except for Symmetric).
//!
//! # Timeouts and flushing
//!
//! A mapping lives as long as its conntrack entry: `net.netfilter.nf_conntrack_udp_timeout`
//! (no reply yet, or replies for under 2 s) or `net.netfilter.nf_conntrack_udp_timeout_stream`
//! (a flow with replies that has lasted 2 s), refreshed by every datagram either way. Both are
//! per network namespace; the lab sets them to 30 s and 120 s in every NAT router when it builds
//! it (the kernel's defaults), and [`Lab::nat_set_udp_timeout`] sets both to one value (and the
//! cone timeout of a [`Nat::PortPreserving`] NAT) to test keepalives.
//! [`Lab::nat_flush_conntrack`] (`conntrack -F`, package conntrack) drops all mappings at once,
//! as a NAT reboot would.
//!
//! Gotchas: an expired or flushed mapping is made again by the host's next datagram; Filtering
//! and PortPreserving then pick the same port, Symmetric a new one. Until then, datagrams from
//! outside to the old mapping are dropped silently (the `input_guard` counter, see
//! [`Lab::nat_dropped`]). The cone of a PortPreserving NAT (set `cone`) is refreshed only by
//! datagrams the host sends, and its DNAT keeps the port number (right as long as masquerade kept
//! it). A container namespace named `n<i>` would collide with host `i`'s NAT router namespace.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::{checked, ip, need_tool, nsenter, probe, stdout_of, Lab, LabConfig};

/// The NAT router's outside interface (on the underlay switch).
pub const NAT_OUTSIDE_IF: &str = "ul0";
/// The NAT router's inside interface (to its host's `ul0`).
pub const NAT_INSIDE_IF: &str = "in0";
/// The nftables table (family `ip`) in every NAT router namespace.
pub const NAT_TABLE: &str = "weft_nat";
/// `nf_conntrack_udp_timeout` set in every NAT router when it is built (the kernel default).
pub const DEFAULT_UDP_TIMEOUT: u32 = 30;
/// `nf_conntrack_udp_timeout_stream` set in every NAT router when it is built (the kernel
/// default since Linux 6.0) and the lifetime of a [`Nat::PortPreserving`] cone entry.
pub const DEFAULT_UDP_TIMEOUT_STREAM: u32 = 120;
const SYSCTL_UDP_TIMEOUT: &str = "net.netfilter.nf_conntrack_udp_timeout";
const SYSCTL_UDP_TIMEOUT_STREAM: &str = "net.netfilter.nf_conntrack_udp_timeout_stream";

/// The kind of NAT router in front of a lab host; see the [module docs](self) for what each
/// does in Linux terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Nat {
    /// Full cone: endpoint-independent mapping that keeps the source port (`masquerade`), and
    /// endpoint-independent filtering for UDP: once the host has sent from a port, a datagram to
    /// that outside port from any address and port reaches it (dynamic DNAT from set `cone`).
    PortPreserving,
    /// Port-restricted cone: endpoint-independent mapping that keeps the source port
    /// (`masquerade`), address-and-port-dependent filtering: only replies from exactly the
    /// address and port the host sent to get in (Linux conntrack's own behaviour).
    Filtering,
    /// Symmetric: `masquerade random,fully-random` picks a random outside port (1024-65535) for
    /// every new 5-tuple, so each destination (address or port) sees another port; filtering
    /// address-and-port-dependent as for [`Nat::Filtering`].
    Symmetric,
}

impl Nat {
    /// The nftables rule set of a NAT router of this kind with outside address `outside` whose
    /// host has private address `host` (for `nft -f`; several lines, one rule a line, as Debian's
    /// nftables 1.0.6 needs). `cone_timeout_secs` is the lifetime of a [`Nat::PortPreserving`]
    /// cone entry.
    pub fn ruleset(self, outside: Ipv4Addr, host: Ipv4Addr, cone_timeout_secs: u32) -> String {
        let (o, n) = (NAT_OUTSIDE_IF, NAT_INSIDE_IF);
        let cone = self == Nat::PortPreserving;
        let mut l: Vec<String> = vec![format!("table ip {NAT_TABLE} {{")];
        if cone {
            l.extend([
                "\tset cone {".into(),
                "\t\ttype inet_service".into(),
                "\t\tflags dynamic,timeout".into(),
                "\t}".into(),
            ]);
        }
        l.extend([
            "\tchain postnat {".into(),
            "\t\ttype nat hook postrouting priority 100; policy accept;".into(),
            match self {
                Nat::Symmetric => format!("\t\toifname \"{o}\" masquerade random,fully-random"),
                Nat::PortPreserving | Nat::Filtering => format!("\t\toifname \"{o}\" masquerade"),
            },
            "\t}".into(),
        ]);
        if cone {
            l.extend([
                "\tchain prenat {".into(),
                "\t\ttype nat hook prerouting priority -100; policy accept;".into(),
                format!("\t\tiifname \"{o}\" ip daddr {outside} udp dport @cone dnat to {host}"),
                "\t}".into(),
                // After the NAT (priority 100): `udp sport` is the outside port.
                "\tchain cone_seen {".into(),
                "\t\ttype filter hook postrouting priority 110; policy accept;".into(),
                cone_rule(cone_timeout_secs),
                "\t}".into(),
            ]);
        }
        l.extend([
            "\tchain forward_guard {".into(),
            "\t\ttype filter hook forward priority 0; policy accept;".into(),
            "\t\tct state established,related accept".into(),
            format!("\t\tiifname \"{n}\" oifname \"{o}\" accept"),
        ]);
        if cone {
            l.push(format!("\t\tiifname \"{o}\" oifname \"{n}\" ct status dnat accept"));
        }
        l.extend([
            "\t\tcounter drop".into(),
            "\t}".into(),
            "\tchain input_guard {".into(),
            "\t\ttype filter hook input priority 0; policy accept;".into(),
            format!("\t\tiifname \"{o}\" ct state established,related accept"),
            format!("\t\tiifname \"{o}\" icmp type echo-request accept"),
            format!("\t\tiifname \"{o}\" counter drop"),
            "\t}".into(),
            "}".into(),
        ]);
        let mut s = l.join("\n");
        s.push('\n');
        s
    }
}

/// The rule of chain `cone_seen`: every UDP datagram out adds or refreshes its outside source port.
fn cone_rule(secs: u32) -> String {
    format!(
        "\t\toifname \"{NAT_OUTSIDE_IF}\" update @cone {{ udp sport timeout {}s }}",
        secs.max(1)
    )
}

/// Host `i`'s private subnet behind its NAT: (the host's address `10.200.<i>.2`, the NAT router's
/// inside address `10.200.<i>.1`), both /24.
pub fn private_addrs(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    let i = i as u8;
    (Ipv4Addr::new(10, 200, i, 2), Ipv4Addr::new(10, 200, i, 1))
}

impl LabConfig {
    /// Puts host `host` behind a NAT router of kind `kind` (adds to [`LabConfig::nat`]).
    /// [`Lab::new`] rejects an index out of range or a host named twice.
    pub fn behind_nat(mut self, host: usize, kind: Nat) -> LabConfig {
        self.nat.push((host, kind));
        self
    }

    /// Gives host `host` an underlay of `stack` (IPv4 only by default).
    pub fn with_stack(mut self, host: usize, stack: crate::Stack) -> LabConfig {
        self.stacks.push((host, stack));
        self
    }

    /// The address families of host `host`'s underlay.
    pub fn stack_of(&self, host: usize) -> crate::Stack {
        self.stacks.iter().find(|(h, _)| *h == host).map_or(crate::Stack::V4, |&(_, s)| s)
    }

    /// The NAT kind host `host` sits behind, if any.
    pub fn nat_of(&self, host: usize) -> Option<Nat> {
        self.nat.iter().find(|(h, _)| *h == host).map(|&(_, k)| k)
    }
}

/// Fails unless every NAT entry names a host of the lab, once.
pub(crate) fn check_config(cfg: &LabConfig) -> Result<()> {
    let mut seen = BTreeSet::new();
    for &(h, kind) in &cfg.nat {
        if h >= cfg.hosts {
            bail!("LabConfig::nat puts host {h} behind a {kind:?} NAT, but the lab has hosts 0 to {}", cfg.hosts.saturating_sub(1));
        }
        if !seen.insert(h) {
            bail!("LabConfig::nat names host {h} twice (one NAT per host)");
        }
    }
    Ok(())
}

/// Writes sysctl `name` (dotted) in the namespace at `netns` and reads it back.
fn write_sysctl(netns: &Path, name: &str, value: u32) -> Result<()> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    probe::in_netns(netns, || {
        fs::write(&path, format!("{value}\n"))
            .with_context(|| format!("setting {name}={value} in {}", netns.display()))?;
        let back = fs::read_to_string(&path).with_context(|| format!("reading {name} back"))?;
        if back.trim() != value.to_string() {
            bail!("{name} in {} reads {} after writing {value}", netns.display(), back.trim());
        }
        Ok(())
    })
}

impl Lab {
    /// Builds host `i`'s NAT router namespace `nat_ns` and host namespace `ns` (see the module
    /// docs); returns the host's private address and the NAT router's outside address.
    pub(crate) fn build_nat_host(&mut self, i: usize, kind: Nat, nat_ns: &str, ns: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
        self.add_netns(nat_ns)?;
        self.add_netns(ns)?;
        let sw = self.switch.clone();
        let port = format!("s{i}");
        let (o, n) = (NAT_OUTSIDE_IF, NAT_INSIDE_IF);
        ip(&["link", "add", &port, "netns", &sw, "type", "veth", "peer", "name", o, "netns", nat_ns])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        let outside = Ipv4Addr::new(192, 168, 77, i as u8 + 1);
        ip(&["-n", nat_ns, "addr", "add", &format!("{outside}/24"), "dev", o])?;
        ip(&["-n", nat_ns, "link", "set", o, "up"])?;
        let (host_ip, router_ip) = private_addrs(i);
        ip(&["link", "add", n, "netns", nat_ns, "type", "veth", "peer", "name", "ul0", "netns", ns])?;
        ip(&["-n", nat_ns, "addr", "add", &format!("{router_ip}/24"), "dev", n])?;
        ip(&["-n", nat_ns, "link", "set", n, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{host_ip}/24"), "dev", "ul0"])?;
        ip(&["-n", ns, "link", "set", "ul0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &router_ip.to_string()])?;
        let path = self.netns_path(nat_ns)?;
        write_sysctl(&path, "net.ipv4.ip_forward", 1)?;
        let file = self.dir.join(format!("n{i}.nft"));
        fs::write(&file, kind.ruleset(outside, host_ip, DEFAULT_UDP_TIMEOUT_STREAM))
            .with_context(|| format!("cannot write {}", file.display()))?;
        checked(nsenter(nat_ns).arg("nft").arg("-f").arg(&file))
            .with_context(|| format!("loading the {kind:?} NAT rules of host {i} ({})", file.display()))?;
        // The rules use conntrack, so its sysctls exist in the namespace now.
        write_sysctl(&path, SYSCTL_UDP_TIMEOUT, DEFAULT_UDP_TIMEOUT)?;
        write_sysctl(&path, SYSCTL_UDP_TIMEOUT_STREAM, DEFAULT_UDP_TIMEOUT_STREAM)?;
        Ok((host_ip, outside))
    }

    /// Host `i`'s NAT router namespace and kind; errors if host `i` is not behind a NAT.
    fn nat_of_host(&self, i: usize) -> Result<(&str, Nat)> {
        let h = self.checked_host(i)?;
        match (&h.nat_ns, h.nat) {
            (Some(ns), Some(kind)) => Ok((ns, kind)),
            _ => Err(anyhow!("host {i} of lab {} is not behind a NAT (see LabConfig::behind_nat)", self.id)),
        }
    }

    /// The outside address of host `i`'s NAT router (`192.168.77.<i+1>`): the source address
    /// other hosts see. Errors if host `i` is not behind a NAT.
    pub fn nat_outside(&self, i: usize) -> Result<Ipv4Addr> {
        self.nat_of_host(i)?;
        Ok(self.hosts[i].public_ip)
    }

    /// The name of host `i`'s NAT router namespace (`<id>-n<i>`), for [`Lab::exec`] (e.g.
    /// `nft list ruleset`, `conntrack -L`). Errors if host `i` is not behind a NAT.
    pub fn nat_ns(&self, i: usize) -> Result<&str> {
        Ok(self.nat_of_host(i)?.0)
    }

    /// Sets `net.netfilter.nf_conntrack_udp_timeout` and `nf_conntrack_udp_timeout_stream` to
    /// `secs` (at least 1) in host `i`'s NAT router, so its UDP mappings expire after `secs`
    /// without traffic; for a [`Nat::PortPreserving`] NAT also the lifetime of new or refreshed
    /// cone entries. Entries already there keep the timeout they have until their next datagram.
    /// Errors if host `i` is not behind a NAT.
    pub fn nat_set_udp_timeout(&self, i: usize, secs: u32) -> Result<()> {
        let (ns, kind) = self.nat_of_host(i)?;
        let secs = secs.max(1);
        let path = self.netns_path(ns)?;
        write_sysctl(&path, SYSCTL_UDP_TIMEOUT, secs)?;
        write_sysctl(&path, SYSCTL_UDP_TIMEOUT_STREAM, secs)?;
        if kind == Nat::PortPreserving {
            let file = self.dir.join(format!("n{i}-timeout.nft"));
            let rules = format!(
                "flush chain ip {NAT_TABLE} cone_seen\nadd rule ip {NAT_TABLE} cone_seen {}\n",
                cone_rule(secs).trim()
            );
            fs::write(&file, rules).with_context(|| format!("cannot write {}", file.display()))?;
            checked(nsenter(ns).arg("nft").arg("-f").arg(&file))
                .with_context(|| format!("setting the cone timeout of host {i}'s NAT"))?;
        }
        Ok(())
    }

    /// Drops every mapping of host `i`'s NAT router at once, as a NAT reboot would: `conntrack -F`
    /// in its namespace (and, for a [`Nat::PortPreserving`] NAT, its cone). Needs `conntrack`
    /// (Debian package conntrack). Errors if host `i` is not behind a NAT.
    pub fn nat_flush_conntrack(&self, i: usize) -> Result<()> {
        let (ns, kind) = self.nat_of_host(i)?;
        need_tool("conntrack", "Lab::nat_flush_conntrack")?;
        if kind == Nat::PortPreserving {
            checked(nsenter(ns).args(["nft", "flush", "set", "ip", NAT_TABLE, "cone"]))?;
        }
        checked(nsenter(ns).args(["conntrack", "-F"]))
            .with_context(|| format!("flushing conntrack in host {i}'s NAT router"))
    }

    /// Packets host `i`'s NAT router has dropped so far: untranslated traffic from outside to the
    /// inside (chain `forward_guard`) and unsolicited traffic to the router itself, e.g. a
    /// datagram to an expired mapping (chain `input_guard`). Errors if host `i` is not behind a NAT.
    pub fn nat_dropped(&self, i: usize) -> Result<u64> {
        let (ns, _) = self.nat_of_host(i)?;
        let text = stdout_of(nsenter(ns).args(["nft", "list", "table", "ip", NAT_TABLE]))?;
        Ok(count_packets(&text))
    }

    /// Sets the MTU of interface `ifname` in lab namespace `ns` (`ip link set dev IF mtu N`),
    /// e.g. `ul0` of a host or `in0` of a NAT router. Only that end of a veth changes: set both
    /// ends for a symmetric link. Errors for a namespace that is not the lab's.
    pub fn set_mtu(&self, ns: &str, ifname: &str, mtu: u32) -> Result<()> {
        self.netns_path(ns)?;
        ip(&["-n", ns, "link", "set", "dev", ifname, "mtu", &mtu.to_string()])
    }
}

/// The sum of the `counter packets N` figures in an `nft list` output.
fn count_packets(text: &str) -> u64 {
    text.split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
#[path = "nat_tests.rs"]
mod tests;
