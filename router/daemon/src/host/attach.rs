//! Joining container network namespaces to the bridge with veth pairs, detaching them, and
//! reading back what an attachment looks like (for CNI CHECK).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkFlags, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use rtnetlink::{LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::{Ipv4Addr, Ipv6Addr};
use tracing::{debug, warn};

use super::addrs::check_prefix;
use super::netlink::{check_ifname, errno, mac_of, mtu_of, NetDev};
use super::netns::{in_netns, open_netns};
use super::routes::{route_through, RouteSpec};
use super::sysctl::link_local_from_mac;
use super::guard;

/// What [`NetDev::attach_netns`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachInfo {
    /// Name of the veth end left in this namespace (enslaved to the bridge).
    pub host_ifname: String,
    /// Name of the veth end inside the container namespace.
    pub container_ifname: String,
    /// MAC address of the container end.
    pub container_mac: [u8; 6],
    /// MAC address of the host end.
    pub host_mac: [u8; 6],
}

/// What [`NetDev::attach_netns_with`] sets up inside the namespace.
#[derive(Debug, Clone, Copy)]
pub struct AttachOpts<'a> {
    /// Addresses with prefix length for the container end.
    pub addrs: &'a [(IpAddr, u8)],
    /// MTU of both ends.
    pub mtu: u32,
    /// Routes through the container end, added after the addresses.
    pub routes: &'a [RouteSpec],
    /// Hairpin mode on the host end's bridge port.
    pub hairpin: bool,
    /// The container end's MAC; a random one when `None`.
    pub mac: Option<[u8; 6]>,
    /// The network (segment) the bridge carries, 0 for the default one: recorded with the
    /// port's guard, so the router announces the MAC on that network.
    pub segment: u32,
}

/// State of an interface inside a namespace, see [`NetDev::netns_link_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    /// Addresses, including those the kernel added itself (IPv6 link-local).
    pub addrs: Vec<(IpAddr, u8)>,
    /// Routes of the main table whose output interface is this one.
    pub routes: Vec<RouteSpec>,
}

impl NetDev {
    /// Joins a network namespace (given as a path: /run/netns/NAME or /proc/PID/ns/net) to `bridge`.
    ///
    /// Creates a veth pair in this namespace, host end named
    /// [`host_ifname_for`]`(netns_path, ifname)`, moves the other end into the namespace and
    /// renames it to `ifname` there (one atomic request), sets its MTU, adds the addresses,
    /// brings it and `lo` up. Host end: same MTU, master = bridge, up.
    ///
    /// Fails with an error naming the namespace and interface if the namespace does not
    /// exist, `ifname` already exists in it, or `bridge` does not exist. On any failure after
    /// the veth pair was created, the pair is deleted again.
    pub async fn attach_netns(
        &self,
        bridge: &str,
        netns_path: &Path,
        ifname: &str,
        addrs: &[(IpAddr, u8)],
        mtu: u32,
    ) -> Result<AttachInfo> {
        let opts = AttachOpts { addrs, mtu, routes: &[], hairpin: false, mac: None, segment: 0 };
        self.attach_netns_with(bridge, netns_path, ifname, &opts).await
    }

    /// [`NetDev::attach_netns`] with routes inside the namespace (added after the
    /// addresses, so a gateway on the interface's subnet is reachable) and, optionally,
    /// hairpin mode on the bridge port (frames may go back out of the port they came in
    /// on: a container reaching itself through an address the host translates).
    pub async fn attach_netns_with(
        &self,
        bridge: &str,
        netns_path: &Path,
        ifname: &str,
        opts: &AttachOpts<'_>,
    ) -> Result<AttachInfo> {
        let AttachOpts { addrs, mtu, .. } = *opts;
        let ns_name = netns_path.display().to_string();
        check_ifname(ifname)
            .with_context(|| format!("cannot attach network namespace {ns_name}"))?;
        if ifname == "lo" {
            bail!("cannot attach network namespace {ns_name} as interface lo: choose another name");
        }
        for &(addr, prefix) in addrs {
            check_prefix(addr, prefix)
                .with_context(|| format!("cannot attach network namespace {ns_name}"))?;
        }
        let host_ifname = host_ifname_for(netns_path, ifname);
        let bridge_index = self
            .require_bridge(bridge)
            .await
            .with_context(|| format!("cannot attach network namespace {ns_name} as {ifname}"))?;
        let ns = open_netns(netns_path)?;
        if let (Some(own), Ok(meta)) = (self.own_ns, ns.metadata()) {
            if own == (meta.dev(), meta.ino()) {
                bail!(
                    "network namespace {ns_name} is the namespace the bridge lives in: \
                     pass the container's namespace"
                );
            }
        }

        // Check inside the namespace first, so that nothing is created when it would fail.
        let existing = {
            let name = ifname.to_owned();
            in_netns(&ns, netns_path, move |nd| async move {
                nd.link_index(&name).await
            })
            .await?
        };
        if existing.is_some() {
            bail!(
                "interface {ifname} already exists in network namespace {ns_name}: \
                 detach it first or choose another interface name"
            );
        }
        if self.link_index(&host_ifname).await?.is_some() {
            bail!(
                "host interface {host_ifname} (for {ifname} in network namespace {ns_name}) \
                 already exists: an earlier attach is still in place, detach it first"
            );
        }

        // The guard first: it matches the port by name, so the port never carries a frame
        // unchecked.
        let mac = opts.mac.unwrap_or_else(guard::random_mac);
        let rules = guard::Port::new(&host_ifname, mac, addrs, &format!("{ns_name} {ifname}"), opts.segment);
        guard::install(&rules)
            .await
            .with_context(|| format!("cannot attach network namespace {ns_name} as {ifname}"))?;
        debug!(host = %host_ifname, netns = %ns_name, ifname, mtu, "creating veth pair");
        if let Err(e) = self.create_pair(&host_ifname, ifname, mac, &ns, &ns_name, mtu, bridge_index).await {
            remove_guard(&host_ifname).await;
            return Err(e);
        }

        // From here on, everything we created is removed again on failure.
        let result = self
            .attach_created(&ns, netns_path, &host_ifname, ifname, opts)
            .await;
        match result {
            Ok((container_mac, host_mac, other_link_locals)) => {
                if let Err(e) = guard::allow_v6(&host_ifname, &other_link_locals).await {
                    warn!(host = %host_ifname, error = %format!("{e:#}"), "the container's IPv6 link-local is not the EUI-64 one and could not be allowed: its IPv6 will be dropped");
                }
                debug!(host = %host_ifname, netns = %ns_name, ifname, "namespace attached");
                Ok(AttachInfo {
                    host_ifname,
                    container_ifname: ifname.to_owned(),
                    container_mac,
                    host_mac,
                })
            }
            Err(e) => {
                warn!(host = %host_ifname, netns = %ns_name, ifname, error = %format!("{e:#}"), "attach failed, removing veth pair");
                if let Err(cleanup) = self.delete_link(&host_ifname).await {
                    warn!(host = %host_ifname, error = %format!("{cleanup:#}"), "could not remove veth after failed attach");
                }
                remove_guard(&host_ifname).await;
                Err(e)
            }
        }
    }

    /// A port for Docker's network driver protocol: a veth pair left in this namespace, host
    /// end `host_ifname` on `bridge` and up, the other end `peer_ifname` down with `mac` and
    /// `mtu`, for dockerd to move into the container and configure (it sets the address it got
    /// from IPAM itself). The guard goes in first, as for [`NetDev::attach_netns_with`]; on a
    /// failure nothing is left.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_docker_port(
        &self,
        bridge: &str,
        host_ifname: &str,
        peer_ifname: &str,
        mac: [u8; 6],
        addrs: &[(IpAddr, u8)],
        mtu: u32,
        segment: u32,
        label: &str,
    ) -> Result<()> {
        check_ifname(host_ifname)?;
        check_ifname(peer_ifname)?;
        let bridge_index = self.require_bridge(bridge).await.with_context(|| format!("cannot make Docker port {host_ifname}"))?;
        for name in [host_ifname, peer_ifname] {
            if self.link_index(name).await?.is_some() {
                bail!("interface {name} already exists: an earlier endpoint with the same ID is still in place");
            }
        }
        let rules = guard::Port::new(host_ifname, mac, addrs, label, segment);
        guard::install(&rules).await.with_context(|| format!("cannot make Docker port {host_ifname}"))?;
        let peer = LinkUnspec::new_with_name(peer_ifname).mtu(mtu).address(mac.to_vec()).build();
        let message = veth_on_bridge(host_ifname, peer, mtu, bridge_index);
        if let Err(e) = self.handle.link().add(message).execute().await {
            remove_guard(host_ifname).await;
            return Err(anyhow::Error::new(e).context(format!("creating veth pair {host_ifname} / {peer_ifname} failed")));
        }
        // The container end's IPv6 settings are made afresh in the container's namespace when
        // dockerd moves it there (its link-local is EUI-64 under the kernel's default; another
        // one is allowed once the container is known, see `crate::docker`).
        Ok(())
    }

    /// Removes a port made by [`NetDev::create_docker_port`] (both ends, wherever the other
    /// end is), then its guard. `Ok(false)` when it was not there.
    pub async fn remove_docker_port(&self, host_ifname: &str) -> Result<bool> {
        let removed = self.delete_link(host_ifname).await?;
        remove_guard(host_ifname).await;
        Ok(removed)
    }

    /// Removes the veth created by [`NetDev::attach_netns`] (deleting the host end removes
    /// both). `Ok(false)` if absent. `netns_path` must be spelled as it was for the attach,
    /// since the host end's name is derived from it.
    pub async fn detach_netns(&self, netns_path: &Path, ifname: &str) -> Result<bool> {
        let host_ifname = host_ifname_for(netns_path, ifname);
        let removed = self.delete_link(&host_ifname).await.with_context(|| {
            format!(
                "detaching {ifname} of network namespace {}",
                netns_path.display()
            )
        })?;
        // After the port is gone: its rules may go now, not before.
        remove_guard(&host_ifname).await;
        debug!(host = %host_ifname, netns = %netns_path.display(), ifname, removed, "detach");
        Ok(removed)
    }

    /// Addresses (IPv4 and IPv6, with prefix) of `ifname` inside the namespace at netns_path.
    ///
    /// Includes addresses the kernel assigned itself, such as the IPv6 link-local one.
    pub async fn netns_addresses(
        &self,
        netns_path: &Path,
        ifname: &str,
    ) -> Result<Vec<(IpAddr, u8)>> {
        check_ifname(ifname)?;
        let ns = open_netns(netns_path)?;
        let name = ifname.to_owned();
        let ns_name = netns_path.display().to_string();
        in_netns(&ns, netns_path, move |nd| async move {
            let index = nd.link_index(&name).await?.ok_or_else(|| {
                anyhow!("interface {name} does not exist in network namespace {ns_name}")
            })?;
            nd.addresses_of(index).await
        })
        .await
    }

    /// What `ifname` inside the namespace at `netns_path` looks like, or `None` when the
    /// namespace has no such interface. For verifying an attachment (CNI CHECK).
    pub async fn netns_link_state(&self, netns_path: &Path, ifname: &str) -> Result<Option<LinkState>> {
        check_ifname(ifname)?;
        let ns = open_netns(netns_path)?;
        let name = ifname.to_owned();
        in_netns(&ns, netns_path, move |nd| async move {
            let Some(link) = nd.get_link(&name).await? else {
                return Ok(None);
            };
            let index = link.header.index;
            let mut routes = Vec::new();
            for v6 in [false, true] {
                let msg = if v6 {
                    RouteMessageBuilder::<Ipv6Addr>::new().build()
                } else {
                    RouteMessageBuilder::<Ipv4Addr>::new().build()
                };
                let all: Vec<RouteMessage> = nd
                    .handle
                    .route()
                    .get(msg)
                    .execute()
                    .try_collect()
                    .await
                    .context("listing routes failed")?;
                routes.extend(all.iter().filter_map(|m| route_through(m, index)));
            }
            Ok(Some(LinkState {
                mtu: mtu_of(&link),
                mac: mac_of(&link),
                up: link.header.flags.contains(LinkFlags::Up),
                addrs: nd.addresses_of(index).await?,
                routes,
            }))
        })
        .await
    }

    /// Creates the veth pair with one request: the host end `host_ifname` in this
    /// namespace, on the bridge and up; the other end already inside the container's
    /// namespace as `ifname`. (Creating it here and moving it costs the kernel a network
    /// synchronisation, about 13 ms on the test machine.) A name taken on either side
    /// fails the request and creates nothing.
    #[allow(clippy::too_many_arguments)] // one netlink request's fields
    pub(super) async fn create_pair(
        &self,
        host_ifname: &str,
        ifname: &str,
        mac: [u8; 6],
        ns: &File,
        ns_name: &str,
        mtu: u32,
        bridge_index: u32,
    ) -> Result<()> {
        let peer = LinkUnspec::new_with_name(ifname)
            .mtu(mtu)
            .address(mac.to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let message = veth_on_bridge(host_ifname, peer, mtu, bridge_index);
        self.handle.link().add(message).execute().await.map_err(|e| {
            let hint = match errno(&e) {
                Some(libc::EEXIST) => format!(
                    ": interface {ifname} already exists in network namespace {ns_name}, or \
                     {host_ifname} here (an earlier attach still in place: detach it first)"
                ),
                Some(libc::EINVAL) => format!(" (is MTU {mtu} within 68..=65535?)"),
                Some(libc::EOPNOTSUPP) => {
                    " (is the veth kernel module available? modprobe veth)".to_owned()
                }
                _ => String::new(),
            };
            anyhow::Error::new(e).context(format!(
                "creating veth pair {host_ifname} / {ifname} (in network namespace {ns_name}) failed{hint}"
            ))
        })
    }

    /// The part of attach_netns after the veth pair exists: the container end's
    /// addresses, routes and state, and hairpin on the host end. Returns the container
    /// end's MAC, the host end's, and the container's IPv6 link-local addresses other than
    /// the EUI-64 one (none, unless the kernel would not take addr_gen_mode).
    async fn attach_created(
        &self,
        ns: &File,
        netns_path: &Path,
        host_ifname: &str,
        ifname: &str,
        opts: &AttachOpts<'_>,
    ) -> Result<([u8; 6], [u8; 6], Vec<Ipv6Addr>)> {
        let ns_name = netns_path.display().to_string();
        let name = ifname.to_owned();
        let addrs = opts.addrs.to_vec();
        let routes = opts.routes.to_vec();
        let ns_name2 = ns_name.clone();
        let (mac, other_link_locals) = in_netns(ns, netns_path, move |nd| async move {
            let link = nd.get_link(&name).await?.ok_or_else(|| {
                anyhow!("interface {name} disappeared from network namespace {ns_name2} right after it was moved there")
            })?;
            for (addr, prefix) in addrs {
                nd.add_address(&name, addr, prefix).await?;
            }
            link_local_from_mac(&name)?;
            nd.set_up(&name).await?;
            if nd.link_index("lo").await?.is_some() {
                nd.set_up("lo").await?;
            }
            for r in routes {
                nd.add_route(link.header.index, &name, r).await?;
            }
            let mac = mac_of(&link).ok_or_else(|| anyhow!("interface {name} has no Ethernet address"))?;
            let expected = guard::link_local(mac);
            let others = nd
                .addresses_of(link.header.index)
                .await?
                .into_iter()
                .filter_map(|(a, _)| match a {
                    IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 && v6 != expected => Some(v6),
                    _ => None,
                })
                .collect::<Vec<_>>();
            Ok((mac, others))
        })
        .await
        .with_context(|| format!("configuring {ifname} inside network namespace {ns_name} failed"))?;

        let host = self
            .get_link(host_ifname)
            .await?
            .ok_or_else(|| anyhow!("interface {host_ifname} does not exist"))?;
        if opts.hairpin {
            self.handle
                .link()
                .set_port(LinkBridgePort::new(host.header.index).hairpin(true).build())
                .execute()
                .await
                .with_context(|| format!("turning on hairpin mode on {host_ifname} failed"))?;
        }
        let host_mac = mac_of(&host)
            .ok_or_else(|| anyhow!("interface {host_ifname} has no Ethernet address"))?;
        Ok((mac, host_mac, other_link_locals))
    }
}

/// The request that makes a veth pair: host end `host_ifname` with `mtu`, on the bridge and up;
/// the other end as `peer` says.
fn veth_on_bridge(host_ifname: &str, peer: LinkMessage, mtu: u32, bridge_index: u32) -> LinkMessage {
    LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_ifname.to_owned())
        .mtu(mtu)
        .controller(bridge_index)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build()
}

/// Takes a port's guard out, saying so when that fails (its rules then stay until the router's
/// sweep; a new port of that name replaces them).
async fn remove_guard(port: &str) {
    if let Err(e) = guard::remove(port).await {
        warn!(port, error = %format!("{e:#}"), "could not remove the port guard");
    }
}

/// Name of the host end of the veth pair for `ifname` in the namespace at `netns_path`:
/// "vw" followed by 10 hex digits of an FNV-1a hash of both (12 characters). Stable across
/// runs and processes; the path is hashed as spelled, not canonicalised.
pub fn host_ifname_for(netns_path: &Path, ifname: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let bytes = netns_path
        .as_os_str()
        .as_bytes()
        .iter()
        .chain(std::iter::once(&0u8))
        .chain(ifname.as_bytes());
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(PRIME);
    }
    // Fold the high bits in, keep 40 bits = 10 hex digits.
    let folded = (hash ^ (hash >> 40)) & 0xff_ffff_ffff;
    format!("vw{folded:010x}")
}
