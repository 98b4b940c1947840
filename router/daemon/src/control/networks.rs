//! Named networks on this host. Each is its own L2 segment: a bridge (`wn` + six hex digits of
//! its segment) with a TAP the frame path reads and, when there is a fastpath, a VXLAN device
//! whose VNI is the segment, made when the network's first container is attached here and
//! removed after its last one leaves. The default network (`weft`, segment 0) is the router's
//! own bridge and is always there.
//!
//! A network's segment is a hash of its name, the same on every host, so nothing has to be
//! agreed; two names with one segment cannot both be used on a host (the second is refused,
//! named). Membership reaches the peers through the MACs the router announces on the segment.
//! The host has an address on a named network's bridge only when a Docker network puts its
//! gateway there (IPv6 is off on these bridges); it never routes between networks: packets
//! forwarded from one weft bridge to another are dropped (`host::isolate`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{info, warn};
use weft_proto::switch::Mac;
use weft_proto::PeerName;

use super::fastpath::Fastpath;
use crate::frame::links::NetworkTap;
use crate::frame::plane::FramePath;
use crate::frame::tap::{tap_name, Tap, TAP_MTU};
use crate::host::links::{bridge_mac, hw_addr};
use crate::host::sysctl::disable_ipv6;
use crate::host::vxlan::vxlan_name;
use crate::host::NetDev;

/// The default network's name.
pub const DEFAULT: &str = "weft";
/// Named networks a host may be on at once.
pub const MAX_NETWORKS: usize = 256;

/// The segment of network `name`: 0 for the default, else 24 bits of its FNV-1a hash (never 0).
pub fn segment_of(name: &str) -> u32 {
    if name == DEFAULT {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let s = (h ^ (h >> 24)) & 0x00ff_ffff;
    if s == 0 { 1 } else { s }
}

/// Whether `name` may name a network: 1 to 32 of `a-z 0-9 . _ -`, starting with a letter or
/// digit.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        bail!("{name:?} is not a network name: use 1 to 32 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit")
    }
}

/// The subnet a named network's addresses come from when none is asked for: a /24 of the
/// mesh's range picked by the network's segment (the same on every host), or the whole range
/// when it is smaller.
pub fn subnet(range: weft_ipam::Cidr, segment: u32) -> weft_ipam::Cidr {
    if segment == 0 || range.prefix >= 24 {
        return range;
    }
    let blocks = 1u32 << (24 - range.prefix);
    weft_ipam::Cidr { addr: range.addr + (segment % blocks) * 256, prefix: 24 }
}

/// The weft network of a CNI network: the default one for `weft`, else the name in lower case
/// (CNI allows upper case, weft's names do not).
pub fn of_cni(name: &str) -> Result<String> {
    of_runtime("CNI", name)
}

/// The weft network of a container runtime's network (`runtime` names it in errors): its
/// name in lower case.
pub fn of_runtime(runtime: &str, name: &str) -> Result<String> {
    let n = name.to_ascii_lowercase();
    check_name(&n).with_context(|| format!("{runtime} network {name:?} cannot name a weft network"))?;
    Ok(n)
}

/// The bridge of a named network's segment.
pub fn bridge_of(segment: u32) -> String {
    format!("wn{segment:06x}")
}

/// A network as the status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInfo {
    pub name: String,
    pub segment: u32,
    pub bridge: String,
}

/// See the module docs.
pub struct Networks {
    me: PeerName,
    netdev: Arc<NetDev>,
    frames: Arc<FramePath>,
    fastpath: Arc<Fastpath>,
    default_bridge: String,
    mtu: u32,
    offload: bool,
    /// Where the names of this host's networks are kept, for a restart.
    file: PathBuf,
    /// Named networks present here, by segment.
    nets: Mutex<BTreeMap<u32, NetworkInfo>>,
}

impl Networks {
    /// The manager; [`Networks::restore`] takes up the networks a previous run left.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: PeerName,
        netdev: Arc<NetDev>,
        frames: Arc<FramePath>,
        fastpath: Arc<Fastpath>,
        default_bridge: &str,
        mtu: u32,
        offload: bool,
        state_dir: &std::path::Path,
    ) -> Self {
        Networks {
            me,
            netdev,
            frames,
            fastpath,
            default_bridge: default_bridge.to_owned(),
            mtu,
            offload,
            file: state_dir.join("networks"),
            nets: Mutex::new(BTreeMap::new()),
        }
    }

    /// The networks a previous run made (their bridges still hold containers): each gets its
    /// TAP again. A network whose bridge is gone is forgotten.
    pub async fn restore(&self) {
        if let Err(e) = crate::host::isolate::init(&self.default_bridge).await {
            warn!(error = %e, "could not keep networks apart at the IP layer (nftables table inet weft_isolate): a container with the host as its gateway could reach another network through it");
        }
        let saved = std::fs::read_to_string(&self.file).unwrap_or_default();
        for line in saved.lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            if check_name(name).is_err() || name == DEFAULT {
                continue;
            }
            let bridge = bridge_of(segment_of(name));
            if matches!(self.netdev.link_index(&bridge).await, Ok(Some(_))) {
                match self.ensure(name).await {
                    Ok(_) => info!(network = name, %bridge, "network taken up again"),
                    Err(e) => warn!(network = name, error = %format!("{e:#}"), "could not take up a network again"),
                }
            }
        }
        self.save().await;
    }

    /// The segment and bridge of network `name`, made here if it is not yet.
    pub async fn ensure(&self, name: &str) -> Result<(u32, String)> {
        check_name(name)?;
        let segment = segment_of(name);
        if segment == 0 {
            return Ok((0, self.default_bridge.clone()));
        }
        let mut nets = self.nets.lock().await;
        if let Some(n) = nets.get(&segment) {
            if n.name != name {
                bail!("network {name:?} has the same segment ({segment:06x}) as network {:?} on this host: choose another name", n.name);
            }
            return Ok((segment, n.bridge.clone()));
        }
        if nets.len() >= MAX_NETWORKS {
            bail!("this host is on {MAX_NETWORKS} networks already");
        }
        let bridge = bridge_of(segment);
        self.make(segment, &bridge).await.with_context(|| format!("making network {name:?} (bridge {bridge})"))?;
        nets.insert(segment, NetworkInfo { name: name.to_owned(), segment, bridge: bridge.clone() });
        drop(nets);
        self.save().await;
        info!(network = name, segment = %format!("{segment:06x}"), %bridge, "network made on this host");
        Ok((segment, bridge))
    }

    async fn make(&self, segment: u32, bridge: &str) -> Result<()> {
        self.netdev.ensure_bridge(bridge, self.mtu).await?;
        self.netdev.set_mac(bridge, bridge_mac(self.me)).await?;
        // No host presence on a named network: no IPv6 chatter from the bridge either.
        let _ = disable_ipv6(bridge);
        let tap = tap_name(bridge);
        let _ = self.netdev.delete_link(&tap).await;
        let t = Tap::open(&tap, self.offload)?;
        self.netdev.set_mtu(&tap, TAP_MTU).await?;
        let _ = disable_ipv6(&tap);
        self.netdev.enslave(&tap, bridge).await?;
        let mac = Mac(hw_addr(&tap)?);
        self.frames.set_network_tap(segment, Some(NetworkTap { tap: Arc::new(t), mac }));
        // Its own VXLAN device beside the TAP, when there is a fastpath.
        self.fastpath.add_network(segment, bridge, &tap).await;
        crate::host::isolate::member(bridge, true).await.map_err(|e| anyhow::anyhow!("keeping the network apart from the others: {e}"))?;
        Ok(())
    }

    /// Removes network `segment` from this host when its bridge holds no container any more.
    pub async fn release_if_empty(&self, segment: u32) {
        if segment == 0 {
            return;
        }
        let mut nets = self.nets.lock().await;
        let Some(n) = nets.get(&segment).cloned() else { return };
        let (tap, vx) = (tap_name(&n.bridge), vxlan_name(&n.bridge));
        // Empty: nothing on the bridge but the devices weft put there.
        match self.netdev.bridge_ports(&n.bridge).await {
            Ok(ports) if ports.iter().all(|p| *p == tap || *p == vx) => {}
            _ => return,
        }
        self.frames.set_network_tap(segment, None);
        self.fastpath.remove_network(segment, &n.bridge).await;
        let _ = self.netdev.delete_link(&tap).await;
        if let Err(e) = crate::host::isolate::member(&n.bridge, false).await {
            warn!(network = %n.name, error = %e, "could not take the bridge out of the isolation table");
        }
        if let Err(e) = self.netdev.delete_link(&n.bridge).await {
            warn!(network = %n.name, error = %format!("{e:#}"), "could not remove the network's bridge");
        }
        nets.remove(&segment);
        drop(nets);
        self.save().await;
        info!(network = %n.name, "last container left: network removed from this host");
    }

    /// The segment of the network on `bridge`, if it is one of ours.
    pub async fn segment_of_bridge(&self, bridge: &str) -> Option<u32> {
        if bridge == self.default_bridge {
            return Some(0);
        }
        self.nets.lock().await.values().find(|n| n.bridge == bridge).map(|n| n.segment)
    }

    /// The networks on this host, the default one first.
    pub async fn list(&self) -> Vec<NetworkInfo> {
        let mut v = vec![NetworkInfo { name: DEFAULT.into(), segment: 0, bridge: self.default_bridge.clone() }];
        v.extend(self.nets.lock().await.values().cloned());
        v
    }

    async fn save(&self) {
        let names: Vec<String> = self.nets.lock().await.values().map(|n| n.name.clone()).collect();
        let mut text = names.join("\n");
        text.push('\n');
        if let Err(e) = std::fs::write(&self.file, text) {
            warn!(file = %self.file.display(), error = %e, "could not save the names of this host's networks");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_24_bits_stable_and_never_the_default_s() {
        assert_eq!(segment_of(DEFAULT), 0);
        assert_eq!(segment_of("red"), segment_of("red"));
        assert_ne!(segment_of("red"), segment_of("blue"));
        for n in ["red", "blue", "a", "x.y-z_1"] {
            let s = segment_of(n);
            assert!(s != 0 && s <= 0x00ff_ffff, "{n}: {s:x}");
            assert_eq!(bridge_of(s).len(), 8);
        }
    }

    #[test]
    fn a_named_network_gets_a_24_of_the_range() {
        let range = weft_ipam::Cidr { addr: u32::from(std::net::Ipv4Addr::new(10, 32, 0, 0)), prefix: 12 };
        let s = subnet(range, segment_of("red"));
        assert_eq!(s.prefix, 24);
        assert!(s.addr >= range.addr && s.addr + 255 < range.addr + (1 << 20));
        assert_eq!(subnet(range, 0), range);
        let small = weft_ipam::Cidr { addr: u32::from(std::net::Ipv4Addr::new(10, 9, 9, 0)), prefix: 26 };
        assert_eq!(subnet(small, 5), small);
        assert_eq!(of_cni("weft").unwrap_or_default(), "weft");
        assert_eq!(of_cni("Red").unwrap_or_default(), "red");
        assert!(of_cni(&"x".repeat(40)).is_err());
    }

    #[test]
    fn network_names_are_checked() {
        for ok in ["red", "blue-2", "a", "app.v1_x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Red", "-x", "a b", "a/b", &"x".repeat(33), "ünï"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
