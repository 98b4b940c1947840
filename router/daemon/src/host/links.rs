//! Links: the bridge, putting ports on it, MAC addresses and MTUs, deleting interfaces.

use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{LinkBridge, LinkUnspec};
use tracing::debug;

use super::netlink::{errno, is_bridge, NetDev};

impl NetDev {
    /// Creates bridge `name` if absent (idempotent), sets its MTU, brings it up. Returns ifindex.
    ///
    /// Fails if `name` exists but is not a bridge.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<u32> {
        let index = match self.get_link(name).await? {
            Some(link) => {
                if !is_bridge(&link) {
                    bail!(
                        "interface {name} exists but is not a bridge: delete it \
                         (ip link del {name}) or configure another bridge name"
                    );
                }
                link.header.index
            }
            None => {
                debug!(bridge = name, mtu, "creating bridge");
                match self
                    .handle
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    // Someone else created it in the meantime: fine, checked below.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "creating bridge {name} failed: is the bridge kernel module \
                                 available (modprobe bridge) and do we have CAP_NET_ADMIN?"
                            )
                        })
                    }
                }
                let link = self.get_link(name).await?.ok_or_else(|| {
                    anyhow!("bridge {name} vanished right after it was created: retry")
                })?;
                if !is_bridge(&link) {
                    bail!("interface {name} was created concurrently and is not a bridge");
                }
                link.header.index
            }
        };
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .with_context(|| format!("setting MTU {mtu} and bringing up bridge {name} failed"))?;
        debug!(bridge = name, index, mtu, "bridge ready");
        Ok(index)
    }

    /// Names of the interfaces whose master is `bridge`, in index order.
    pub async fn bridge_ports(&self, bridge: &str) -> Result<Vec<String>> {
        let bridge_index = self.require_bridge(bridge).await?;
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = links.try_next().await.context("listing links failed")? {
            let mut name = None;
            let mut master = None;
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Controller(c) => master = Some(*c),
                    _ => {}
                }
            }
            if let (Some(n), Some(c)) = (name, master) {
                if c == bridge_index {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Sets `ifname`'s master to `bridge`, and brings it up.
    pub async fn enslave(&self, ifname: &str, bridge: &str) -> Result<()> {
        let index = self.require_link(ifname).await?;
        let bridge_index = self.require_bridge(bridge).await?;
        self.set_master_and_up(ifname, index, bridge, bridge_index)
            .await
    }

    /// Sets the MAC address of `ifname`.
    pub async fn set_mac(&self, ifname: &str, mac: [u8; 6]) -> Result<()> {
        let index = self.require_link(ifname).await?;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).address(mac.to_vec()).build())
            .execute()
            .await
            .with_context(|| format!("setting MAC address on {ifname} failed"))?;
        debug!(ifname, ?mac, "MAC set");
        Ok(())
    }

    /// Sets the MTU of `ifname`.
    pub async fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<()> {
        let index = self.require_link(ifname).await?;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| {
                format!("setting MTU {mtu} on {ifname} failed (is it within the device's limits?)")
            })?;
        debug!(ifname, mtu, "MTU set");
        Ok(())
    }

    /// Deletes link `name`; `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                debug!(ifname = name, index, "link deleted");
                Ok(true)
            }
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting interface {name} failed")),
        }
    }

    async fn set_master_and_up(
        &self,
        ifname: &str,
        index: u32,
        bridge: &str,
        bridge_index: u32,
    ) -> Result<()> {
        self.handle
            .link()
            .change(
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| {
                format!("putting {ifname} on bridge {bridge} and bringing it up failed")
            })?;
        debug!(ifname, bridge, "enslaved and up");
        Ok(())
    }
}

/// The bridge's MAC: the peer name as a unicast, locally administered address. A bridge
/// without a MAC of its own takes the smallest of its ports', which may be the TAP's: the host's
/// own frames (an exposed address) would then look like the TAP's chatter, which the frame path
/// ignores. The peer name is stable across restarts.
pub fn bridge_mac(name: weft_proto::PeerName) -> [u8; 6] {
    let mut m = name.to_bytes();
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

/// Reads an interface's MAC with SIOCGIFHWADDR (sysfs shows the namespace that mounted it, not
/// ours, when the router was started with `nsenter --net`).
pub fn hw_addr(ifname: &str) -> Result<[u8; 6]> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct IfReqHw {
        name: [libc::c_char; libc::IFNAMSIZ],
        family: libc::sa_family_t,
        data: [u8; 14],
        _pad: [u8; 8],
    }
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("socket for ioctl")?;
    let mut req = IfReqHw { name: [0; libc::IFNAMSIZ], family: 0, data: [0; 14], _pad: [0; 8] };
    for (i, b) in ifname.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        req.name[i] = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills an ifreq whose union starts with a sockaddr (family + 14 bytes).
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if r != 0 {
        return Err(anyhow!(std::io::Error::last_os_error())).with_context(|| format!("reading the MAC of {ifname}"));
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(&req.data[..6]);
    Ok(m)
}
