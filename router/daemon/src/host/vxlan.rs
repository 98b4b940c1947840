//! The fastpath's kernel parts: the VXLAN device on the bridge, the bridge port flags that keep
//! it apart from the TAP, and the forwarding entries that send a peer's MACs into it.
//!
//! Shape (see ARCHITECTURE.md, "The fastpath"): the VXLAN device has no default destination and
//! learns nothing; the router gives it one entry per remote MAC (`MAC -> peer's underlay
//! address`, NTF_SELF) and the bridge a matching static, sticky entry (`MAC -> the VXLAN port`,
//! NTF_MASTER), so known unicast to a fastpath peer goes into the kernel tunnel. The VXLAN port
//! does not learn and gets no flooded frames (unknown unicast, broadcast, multicast): those go
//! to the TAP and the router's broadcast tree, which reaches every host exactly once. The TAP
//! and the VXLAN port are both *isolated* ports, so the bridge never forwards between them.

use std::net::IpAddr;

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkBridgePort, LinkUnspec, LinkVxlan};
use tracing::debug;
use weft_proto::switch::Mac;

use super::netlink::{errno, NetDev};

/// MTU of the VXLAN device. Larger than any container MTU, so the bridge never drops a frame
/// for size on the way in: a frame that does not fit the underlay is fragmented outside (the
/// device sends with DF clear) or, for IPv4 with DF set inside, answered with ICMP
/// "fragmentation needed" by the kernel. Below the device's maximum (65535 - 50).
pub const VXLAN_MTU: u32 = 65_000;

/// Name of the VXLAN device on `bridge` (`weft` -> `weft-vx`).
pub fn vxlan_name(bridge: &str) -> String {
    let base: String = bridge.chars().take(11).collect();
    format!("{base}-vx")
}

/// Transmit and receive counters of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets the device dropped on transmit (no forwarding entry, no route).
    pub tx_dropped: u64,
}

impl NetDev {
    /// (Re)creates the VXLAN device `name` on `bridge` for UDP `port`: an old one (from a
    /// router that did not stop cleanly) is removed first, so no stale entry survives. Puts it
    /// on the bridge as an isolated, non-learning port that gets no flooded frames, marks
    /// `tap` isolated too, and brings it up. Returns its index.
    ///
    /// The error says what the kernel refused: no VXLAN module, the port taken, no permission.
    pub async fn make_vxlan(&self, name: &str, vni: u32, port: u16, bridge: &str, tap: &str) -> Result<u32> {
        if let Some(old) = self.get_link(name).await? {
            if !is_vxlan(&old) {
                bail!("interface {name} exists and is not a VXLAN device: delete it (ip link del {name}) or use another bridge name");
            }
            self.delete_link(name).await?;
            debug!(ifname = name, "removed the VXLAN device of an earlier run");
        }
        let bridge_index = self.require_bridge(bridge).await?;
        let msg = LinkVxlan::new(name, vni).port(port).learning(false).mtu(VXLAN_MTU).build();
        if let Err(e) = self.handle.link().add(msg).execute().await {
            let why = match errno(&e) {
                Some(libc::EOPNOTSUPP) | Some(libc::EAFNOSUPPORT) => "this kernel has no VXLAN support (modprobe vxlan)".to_string(),
                Some(libc::EADDRINUSE) => format!("UDP port {port} is taken by another VXLAN device or socket"),
                Some(libc::EPERM) => "no permission (CAP_NET_ADMIN is needed)".to_string(),
                Some(libc::EEXIST) => format!("a device for VNI {vni} and port {port} exists already"),
                _ => format!("{e}"),
            };
            return Err(anyhow!("creating VXLAN device {name} (UDP {port}) failed: {why}"));
        }
        let index = self.require_link(name).await?;
        let setup = async {
            self.handle
                .link()
                .change(LinkUnspec::new_with_index(index).controller(bridge_index).build())
                .execute()
                .await
                .with_context(|| format!("putting {name} on bridge {bridge} failed"))?;
            // The UDP socket is opened when the device comes up.
            if let Err(e) = self.handle.link().change(LinkUnspec::new_with_index(index).up().build()).execute().await {
                let why = match errno(&e) {
                    Some(libc::EADDRINUSE) => format!("UDP port {port} is taken (another program or VXLAN device listens on it; choose another with --fastpath-port)"),
                    _ => format!("{e}"),
                };
                bail!("bringing up VXLAN device {name} on UDP {port} failed: {why}");
            }
            self.handle
                .link()
                .set_port(
                    LinkBridgePort::new(index)
                        .isolated(true)
                        .learning(false)
                        .flood(false)
                        .mcast_flood(false)
                        .bcast_flood(false)
                        .build(),
                )
                .execute()
                .await
                .with_context(|| format!("setting the bridge port flags of {name} failed (isolated, no learning, no flooding)"))?;
            self.isolate_port(tap).await
        };
        if let Err(e) = setup.await {
            let _ = self.delete_link(name).await;
            return Err(e);
        }
        debug!(ifname = name, index, vni, port, "VXLAN device ready");
        Ok(index)
    }

    /// Marks bridge port `ifname` isolated: the bridge never forwards between two isolated ports.
    pub async fn isolate_port(&self, ifname: &str) -> Result<()> {
        let index = self.require_link(ifname).await?;
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).isolated(true).build())
            .execute()
            .await
            .with_context(|| format!("making {ifname} an isolated bridge port failed"))
    }

    /// Sends frames for `mac` on VXLAN device `vx` to `dst` (UDP `port`): replaces any entry.
    pub async fn vxlan_fdb_add(&self, vx: u32, mac: [u8; 6], dst: IpAddr, port: u16) -> Result<()> {
        let mut req = self
            .handle
            .neighbours()
            .add_bridge(vx, &mac)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(dst)
            .replace();
        req.message_mut().attributes.push(NeighbourAttribute::Port(port));
        req.execute().await.with_context(|| format!("adding VXLAN entry {} -> {dst} failed", Mac(mac)))
    }

    /// Makes the bridge send frames for `mac` to its port `port` (static and sticky: learning
    /// on another port does not move it). Replaces any entry.
    pub async fn bridge_fdb_add(&self, port: u32, mac: [u8; 6]) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(port, &mac)
            .flags(NeighbourFlags::Controller | NeighbourFlags::Sticky)
            .state(NeighbourState::Noarp)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding bridge entry {} failed", Mac(mac)))
    }

    /// Removes the VXLAN device's entry for `mac`; `Ok(false)` if there was none.
    pub async fn vxlan_fdb_del(&self, vx: u32, mac: [u8; 6]) -> Result<bool> {
        self.fdb_del(vx, mac, NeighbourFlags::Own).await
    }

    /// Removes the bridge's entry for `mac` on port `port`; `Ok(false)` if there was none.
    pub async fn bridge_fdb_del(&self, port: u32, mac: [u8; 6]) -> Result<bool> {
        self.fdb_del(port, mac, NeighbourFlags::Controller).await
    }

    async fn fdb_del(&self, index: u32, mac: [u8; 6], flags: NeighbourFlags) -> Result<bool> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.flags = flags;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        match self.handle.neighbours().del(m).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing forwarding entry {} failed", Mac(mac))),
        }
    }

    /// The MACs with an entry on VXLAN device `vx` (NTF_SELF) and where they go.
    pub async fn vxlan_fdb(&self, vx: u32) -> Result<Vec<([u8; 6], Option<IpAddr>)>> {
        Ok(self
            .fdb_dump(vx, NeighbourFlags::Own)
            .await?
            .into_iter()
            .map(|e| (e.mac, e.dst))
            .collect())
    }

    /// The MACs the bridge sends to its port `port` by a static entry (NTF_MASTER), with how
    /// long each has gone unused.
    pub async fn bridge_fdb_idle(&self, port: u32) -> Result<Vec<([u8; 6], std::time::Duration)>> {
        Ok(self
            .fdb_dump(port, NeighbourFlags::Controller)
            .await?
            .into_iter()
            .filter(|e| e.state == NeighbourState::Noarp)
            .map(|e| (e.mac, e.idle))
            .collect())
    }

    async fn fdb_dump(&self, index: u32, flag: NeighbourFlags) -> Result<Vec<FdbEntry>> {
        let req = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge);
        let mut s = std::pin::pin!(req.execute());
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("listing forwarding entries failed")? {
            // A bridge (NTF_MASTER) entry names its bridge in NDA_MASTER; the device's own
            // (NTF_SELF) entries do not.
            let master = m.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Controller(_)));
            if m.header.ifindex != index || master != (flag == NeighbourFlags::Controller) {
                continue;
            }
            let mut mac = None;
            let mut dst = None;
            let mut idle = std::time::Duration::ZERO;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
                    NeighbourAttribute::Destination(d) => dst = ip_of(d),
                    // Clock ticks (USER_HZ, 100 a second) since the entry was last used.
                    NeighbourAttribute::CacheInfo(c) => idle = std::time::Duration::from_millis(u64::from(c.used) * 10),
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                out.push(FdbEntry { mac, dst, idle, state: m.header.state });
            }
        }
        Ok(out)
    }

    /// The device's counters, if it exists.
    pub async fn counters(&self, name: &str) -> Result<Option<Counters>> {
        let Some(link) = self.get_link(name).await? else { return Ok(None) };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Stats64(s) => Some(Counters {
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                tx_dropped: s.tx_dropped,
            }),
            _ => None,
        }))
    }
}

/// One forwarding entry as listed.
struct FdbEntry {
    mac: [u8; 6],
    dst: Option<IpAddr>,
    idle: std::time::Duration,
    state: NeighbourState,
}

fn is_vxlan(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan) | LinkInfo::Data(InfoData::Vxlan(_)))),
        _ => false,
    })
}

fn ip_of(a: &netlink_packet_route::neighbour::NeighbourAddress) -> Option<IpAddr> {
    use netlink_packet_route::neighbour::NeighbourAddress;
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        // In AF_BRIDGE messages the address comes unparsed.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}
