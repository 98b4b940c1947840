//! Kernel network devices over rtnetlink: the weft bridge, putting the router's TAP on it,
//! joining container network namespaces with veth pairs, and host addresses on the bridge.
//!
//! All requests go through one rtnetlink connection opened in the network namespace that
//! [`NetDev::new`] was called in. Work that must happen inside another namespace (the
//! container end of a veth pair) runs on a dedicated OS thread that `setns()`s into the
//! namespace and opens its own rtnetlink connection there: `setns` affects only the calling
//! thread, and a netlink socket stays bound to the namespace it was opened in.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec,
    LinkVeth, RouteMessageBuilder,
};
use tracing::{debug, warn};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// An rtnetlink connection to the network namespace [`NetDev::new`] was called in.
pub struct NetDev {
    handle: Handle,
    /// (st_dev, st_ino) of the namespace this handle talks to, when it could be read.
    own_ns: Option<(u64, u64)>,
}

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

impl NetDev {
    /// Opens an rtnetlink connection in the calling thread's current network namespace
    /// (spawns the connection task on the current tokio runtime).
    pub async fn new() -> Result<Self> {
        let (connection, handle, _messages) = rtnetlink::new_connection()
            .context("opening an rtnetlink socket (NETLINK_ROUTE) failed")?;
        tokio::spawn(connection);
        let own_ns = std::fs::metadata("/proc/thread-self/ns/net")
            .ok()
            .map(|m| (m.dev(), m.ino()));
        debug!(?own_ns, "rtnetlink connection opened");
        Ok(Self { handle, own_ns })
    }

    /// Index of the link called `name`, or `None` when there is no such link.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.get_link(name).await?.map(|m| m.header.index))
    }

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

    /// Adds addr/prefix to ifname (idempotent: already present is Ok).
    pub async fn add_address(&self, ifname: &str, addr: IpAddr, prefix: u8) -> Result<()> {
        check_prefix(addr, prefix)?;
        let index = self.require_link(ifname).await?;
        match self
            .handle
            .address()
            .add(index, addr, prefix)
            .execute()
            .await
        {
            Ok(()) => {
                debug!(ifname, %addr, prefix, "address added");
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                debug!(ifname, %addr, prefix, "address already present");
                Ok(())
            }
            Err(e) => Err(e).with_context(|| {
                let hint = if addr.is_ipv6() {
                    " (is IPv6 disabled on it?)"
                } else {
                    ""
                };
                format!("adding address {addr}/{prefix} to {ifname} failed{hint}")
            }),
        }
    }

    /// Removes addr/prefix from ifname; `Ok(false)` when it was not there.
    pub async fn del_address(&self, ifname: &str, addr: IpAddr, prefix: u8) -> Result<bool> {
        check_prefix(addr, prefix)?;
        let index = self.require_link(ifname).await?;
        let message = address_message(index, addr, prefix);
        match self.handle.address().del(message).execute().await {
            Ok(()) => {
                debug!(ifname, %addr, prefix, "address removed");
                Ok(true)
            }
            // EADDRNOTAVAIL: no such address; ENODEV: no IPv6/IPv4 state on the device at all.
            Err(e) if matches!(errno(&e), Some(libc::EADDRNOTAVAIL | libc::ENODEV)) => Ok(false),
            Err(e) => Err(e)
                .with_context(|| format!("removing address {addr}/{prefix} from {ifname} failed")),
        }
    }

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
        let opts = AttachOpts { addrs, mtu, routes: &[], hairpin: false };
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

        debug!(host = %host_ifname, netns = %ns_name, ifname, mtu, "creating veth pair");
        self.create_pair(&host_ifname, ifname, &ns, &ns_name, mtu, bridge_index).await?;

        // From here on, everything we created is removed again on failure.
        let result = self
            .attach_created(&ns, netns_path, &host_ifname, ifname, opts)
            .await;
        match result {
            Ok((container_mac, host_mac)) => {
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
                Err(e)
            }
        }
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

    /// Addresses on an interface of our own namespace.
    pub async fn addresses(&self, ifname: &str) -> Result<Vec<(IpAddr, u8)>> {
        let index = self.require_link(ifname).await?;
        self.addresses_of(index).await
    }

    // ---- private helpers ----

    async fn get_link(&self, name: &str) -> Result<Option<LinkMessage>> {
        check_ifname(name)?;
        let stream = self.handle.link().get().match_name(name).execute();
        let mut stream = std::pin::pin!(stream);
        match stream.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface {name} failed")),
        }
    }

    async fn require_link(&self, name: &str) -> Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| anyhow!("interface {name} does not exist"))
    }

    async fn require_bridge(&self, name: &str) -> Result<u32> {
        let link = self.get_link(name).await?.ok_or_else(|| {
            anyhow!("bridge {name} does not exist: create it first (ensure_bridge)")
        })?;
        if !is_bridge(&link) {
            bail!("interface {name} is not a bridge");
        }
        Ok(link.header.index)
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

    async fn set_up(&self, ifname: &str) -> Result<()> {
        let index = self.require_link(ifname).await?;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing up {ifname} failed"))
    }

    async fn addresses_of(&self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let messages: Vec<AddressMessage> = stream
            .try_collect()
            .await
            .context("listing addresses failed")?;
        Ok(messages
            .iter()
            .filter_map(|m| {
                let mut local = None;
                let mut address = None;
                for attr in &m.attributes {
                    match attr {
                        AddressAttribute::Local(a) => local = Some(*a),
                        AddressAttribute::Address(a) => address = Some(*a),
                        _ => {}
                    }
                }
                local.or(address).map(|a| (a, m.header.prefix_len))
            })
            .collect())
    }

    /// Creates the veth pair with one request: the host end `host_ifname` in this
    /// namespace, on the bridge and up; the other end already inside the container's
    /// namespace as `ifname`. (Creating it here and moving it costs the kernel a network
    /// synchronisation, about 13 ms on the test machine.) A name taken on either side
    /// fails the request and creates nothing.
    async fn create_pair(
        &self,
        host_ifname: &str,
        ifname: &str,
        ns: &File,
        ns_name: &str,
        mtu: u32,
        bridge_index: u32,
    ) -> Result<()> {
        let peer = LinkUnspec::new_with_name(ifname)
            .mtu(mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_ifname.to_owned())
            .mtu(mtu)
            .controller(bridge_index)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
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
    /// end's MAC and the host end's.
    async fn attach_created(
        &self,
        ns: &File,
        netns_path: &Path,
        host_ifname: &str,
        ifname: &str,
        opts: &AttachOpts<'_>,
    ) -> Result<([u8; 6], [u8; 6])> {
        let ns_name = netns_path.display().to_string();
        let name = ifname.to_owned();
        let addrs = opts.addrs.to_vec();
        let routes = opts.routes.to_vec();
        let ns_name2 = ns_name.clone();
        let mac = in_netns(ns, netns_path, move |nd| async move {
            let link = nd.get_link(&name).await?.ok_or_else(|| {
                anyhow!("interface {name} disappeared from network namespace {ns_name2} right after it was moved there")
            })?;
            for (addr, prefix) in addrs {
                nd.add_address(&name, addr, prefix).await?;
            }
            nd.set_up(&name).await?;
            if nd.link_index("lo").await?.is_some() {
                nd.set_up("lo").await?;
            }
            for r in routes {
                nd.add_route(link.header.index, &name, r).await?;
            }
            mac_of(&link).ok_or_else(|| anyhow!("interface {name} has no Ethernet address"))
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
        Ok((mac, host_mac))
    }

    /// Adds a route through interface `index` (called `ifname`) of this namespace.
    async fn add_route(&self, index: u32, ifname: &str, r: RouteSpec) -> Result<()> {
        let message = match (r.dst, r.gw) {
            (IpAddr::V4(dst), gw) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(dst, r.prefix)
                    .output_interface(index);
                if let Some(IpAddr::V4(gw)) = gw {
                    b = b.gateway(gw);
                }
                b.build()
            }
            (IpAddr::V6(dst), gw) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(dst, r.prefix)
                    .output_interface(index);
                if let Some(IpAddr::V6(gw)) = gw {
                    b = b.gateway(gw);
                }
                b.build()
            }
        };
        match self.handle.route().add(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| {
                let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
                format!("adding route {}/{}{via} on {ifname} failed", r.dst, r.prefix)
            }),
        }
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
}

/// A route: destination prefix and optional gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gw: Option<IpAddr>,
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

fn mac_of(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

fn mtu_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The route in `m` when it goes out of interface `index` (main table only).
fn route_through(m: &RouteMessage, index: u32) -> Option<RouteSpec> {
    if m.header.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let mut oif = None;
    let mut dst = None;
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gw = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gw = Some(IpAddr::V6(*v6)),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let unspecified = if m.header.address_family == AddressFamily::Inet6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    Some(RouteSpec { dst: dst.unwrap_or(unspecified), prefix: m.header.destination_prefix_length, gw })
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

/// Writes /proc/sys/net/ipv6/conf/<ifname>/disable_ipv6 = 1 (ignore absence of IPv6 support with Ok).
///
/// Acts on the calling thread's network namespace.
pub fn disable_ipv6(ifname: &str) -> Result<()> {
    check_ifname(ifname)?;
    if !Path::new("/proc/sys/net/ipv6").exists() {
        debug!(ifname, "no IPv6 support in this kernel: nothing to disable");
        return Ok(());
    }
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, b"1") {
        Ok(()) => {
            debug!(ifname, "IPv6 disabled");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(anyhow!(
            "cannot disable IPv6 on {ifname}: {path} does not exist (does the interface exist in this network namespace?)"
        )),
        Err(e) => Err(e).with_context(|| format!("writing 1 to {path} failed")),
    }
}

/// The positive errno of a netlink error reply, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

fn is_bridge(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace() || c.is_control())
    {
        bail!(
            "invalid interface name {name:?}: use 1 to {MAX_IFNAME_LEN} bytes without '/', ':', '%' or whitespace"
        );
    }
    Ok(())
}

fn check_prefix(addr: IpAddr, prefix: u8) -> Result<()> {
    if addr.is_multicast() || addr.is_unspecified() {
        bail!("{addr} cannot be assigned to an interface: use a unicast address");
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        bail!("invalid prefix length /{prefix} for {addr}: at most {max}");
    }
    Ok(())
}

fn address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    match addr {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, prefix)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, prefix)
            .build(),
    }
}

fn open_netns(path: &Path) -> Result<File> {
    match File::open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(anyhow!(
            "network namespace {} does not exist: create it first (ip netns add NAME) or pass \
             /proc/PID/ns/net of a running process",
            path.display()
        )),
        Err(e) => {
            Err(e).with_context(|| format!("opening network namespace {} failed", path.display()))
        }
    }
}

/// Runs `f` with a [`NetDev`] opened inside the namespace `ns` (opened from `path`), on a
/// dedicated thread with its own current-thread runtime. The calling task is not blocked.
async fn in_netns<T, F, Fut>(ns: &File, path: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(NetDev) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let fd = ns.try_clone().with_context(|| {
        format!(
            "duplicating descriptor of network namespace {}",
            path.display()
        )
    })?;
    let ns_name = path.display().to_string();
    let ns_name2 = ns_name.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            let result = run_in_netns(fd, &ns_name2, f);
            // The receiver only goes away if the caller was cancelled; nothing to report to.
            let _ = tx.send(result);
        })
        .context("spawning a thread for network namespace work failed")?;
    rx.await
        .map_err(|_| anyhow!("the thread working in network namespace {ns_name} died (panicked)"))?
}

fn run_in_netns<T, F, Fut>(fd: File, ns_name: &str, f: F) -> Result<T>
where
    F: FnOnce(NetDev) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    // SAFETY: `fd` is an open descriptor owned by this function; setns changes only the
    // network namespace of this (dedicated, short-lived) thread.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EINVAL) => anyhow!(
                "{ns_name} is not a network namespace (a /run/netns/NAME file that is no longer \
                 mounted? recreate it with ip netns add, or pass /proc/PID/ns/net)"
            ),
            Some(libc::EPERM) => anyhow!(
                "entering network namespace {ns_name} is not permitted: needs CAP_SYS_ADMIN"
            ),
            _ => anyhow::Error::new(err)
                .context(format!("entering network namespace {ns_name} failed")),
        });
    }
    drop(fd);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a runtime for network namespace work failed")?;
    runtime.block_on(async move {
        let nd = NetDev::new()
            .await
            .with_context(|| format!("in network namespace {ns_name}"))?;
        f(nd).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::mpsc;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs the test body on a thread in a fresh private network namespace.
    /// Runs `f` in a fresh private network namespace; skips (with a message) when not root.
    fn in_private_netns<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>>,
    {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let joined = std::thread::spawn(move || -> Result<()> {
            // SAFETY: unshare(CLONE_NEWNET) only affects this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f())
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e:#}"),
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// A "container" namespace: a thread that unshared and stays alive until dropped.
    struct TestNs {
        path: PathBuf,
        stop: Option<mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestNs {
        fn new() -> Result<Self> {
            Self::with_ipv6(true)
        }

        /// With `ipv6 == false`, interfaces that later enter the namespace get IPv6 disabled.
        fn with_ipv6(ipv6: bool) -> Result<Self> {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                // SAFETY: only affects this thread.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                let res = if rc == 0 {
                    if ipv6 {
                        Ok(())
                    } else {
                        // /proc/sys/net follows the calling thread's namespace.
                        std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", b"1")
                            .map_err(|e| e.to_string())
                    }
                    // SAFETY: gettid has no preconditions.
                    .map(|()| unsafe { libc::gettid() })
                } else {
                    Err(io::Error::last_os_error().to_string())
                };
                let _ = ready_tx.send(res);
                let _ = stop_rx.recv();
            });
            let tid = ready_rx.recv()?.map_err(|e| anyhow!("unshare: {e}"))?;
            Ok(Self {
                path: PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id())),
                stop: Some(stop_tx),
                thread: Some(thread),
            })
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            self.stop.take();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    async fn link(nd: &NetDev, name: &str) -> Result<LinkMessage> {
        nd.get_link(name)
            .await?
            .ok_or_else(|| anyhow!("{name} missing"))
    }

    fn controller_of(l: &LinkMessage) -> Option<u32> {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(m) => Some(*m),
            _ => None,
        })
    }

    fn is_up(l: &LinkMessage) -> bool {
        l.header.flags.contains(LinkFlags::Up)
    }

    fn is_veth(l: &LinkMessage) -> bool {
        l.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
            _ => false,
        })
    }

    async fn veth_count(nd: &NetDev) -> Result<usize> {
        let links: Vec<LinkMessage> = nd.handle.link().get().execute().try_collect().await?;
        Ok(links.iter().filter(|l| is_veth(l)).count())
    }

    /// Reads a link inside the namespace at `path`.
    async fn link_in(ns: &TestNs, name: &str) -> Result<Option<LinkMessage>> {
        let file = open_netns(&ns.path)?;
        let name = name.to_owned();
        in_netns(&file, &ns.path, move |nd| async move {
            nd.get_link(&name).await
        })
        .await
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED))
    }

    #[test]
    fn host_ifname_is_stable_and_short() {
        let a = host_ifname_for(Path::new("/run/netns/foo"), "eth0");
        assert_eq!(a, host_ifname_for(Path::new("/run/netns/foo"), "eth0"));
        assert_eq!(a.len(), 12);
        assert!(a.len() <= MAX_IFNAME_LEN);
        assert!(a.starts_with("vw"));
        assert!(a[2..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, host_ifname_for(Path::new("/run/netns/foo"), "eth1"));
        assert_ne!(a, host_ifname_for(Path::new("/run/netns/fop"), "eth0"));
        // Pinned: must never change between releases (existing veths are found by it).
        assert_eq!(a, host_ifname_for(Path::new("/run/netns/foo"), "eth0"));
        assert_eq!(
            host_ifname_for(Path::new("/run/netns/foo"), "eth0"),
            PINNED_FOO_ETH0
        );
    }

    const PINNED_FOO_ETH0: &str = "vw18e2daeba6";

    #[test]
    fn rejects_bad_names() {
        assert!(check_ifname("").is_err());
        assert!(check_ifname("abcdefghijklmnop").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("eth 0").is_err());
        assert!(check_ifname("abcdefghijklmno").is_ok());
    }

    #[test]
    fn bridge_is_idempotent_and_sets_mtu() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            let i1 = nd.ensure_bridge("weft", 1400).await?;
            let i2 = nd.ensure_bridge("weft", 1400).await?;
            assert_eq!(i1, i2);
            let l = link(&nd, "weft").await?;
            assert_eq!(mtu_of(&l), Some(1400));
            assert!(is_up(&l));
            assert!(is_bridge(&l));
            assert_eq!(nd.ensure_bridge("weft", 1376).await?, i1);
            assert_eq!(mtu_of(&link(&nd, "weft").await?), Some(1376));
            assert_eq!(nd.link_index("weft").await?, Some(i1));
            assert_eq!(nd.link_index("nosuchlink").await?, None);
            let err = nd
                .ensure_bridge("lo", 1500)
                .await
                .err()
                .ok_or_else(|| anyhow!("lo is no bridge"))?;
            assert!(format!("{err:#}").contains("not a bridge"), "{err:#}");
            // enslave: a stand-in for the router's TAP.
            nd.handle
                .link()
                .add(LinkVeth::new("taptest", "taptestpeer").build())
                .execute()
                .await?;
            nd.enslave("taptest", "weft").await?;
            let tap = link(&nd, "taptest").await?;
            assert_eq!(controller_of(&tap), Some(i1));
            assert!(is_up(&tap));
            let err = nd
                .enslave("taptest", "nobridge")
                .await
                .err()
                .ok_or_else(|| anyhow!("enslave to missing bridge"))?;
            assert!(format!("{err:#}").contains("nobridge"), "{err:#}");
            assert!(nd.enslave("notap", "weft").await.is_err());
            assert!(nd.delete_link("taptest").await?);
            nd.set_mtu("weft", 1300).await?;
            assert_eq!(mtu_of(&link(&nd, "weft").await?), Some(1300));
            assert!(nd.delete_link("weft").await?);
            assert!(!nd.delete_link("weft").await?);
            Ok(())
        });
    }

    #[test]
    fn add_del_address_idempotent() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            nd.ensure_bridge("weft", 1500).await?;
            let idx = nd.require_link("weft").await?;
            for (addr, prefix) in [(v4("10.47.0.1"), 16), (v6("fd47::1"), 64)] {
                nd.add_address("weft", addr, prefix).await?;
                nd.add_address("weft", addr, prefix).await?;
                let list = nd.addresses_of(idx).await?;
                assert_eq!(
                    list.iter().filter(|x| **x == (addr, prefix)).count(),
                    1,
                    "{list:?}"
                );
                assert!(nd.del_address("weft", addr, prefix).await?);
                assert!(!nd.del_address("weft", addr, prefix).await?);
                assert!(!nd.addresses_of(idx).await?.contains(&(addr, prefix)));
            }
            assert!(nd.add_address("nosuch", v4("10.47.0.1"), 16).await.is_err());
            assert!(nd.add_address("weft", v4("10.47.0.1"), 33).await.is_err());
            Ok(())
        });
    }

    #[test]
    fn attach_end_to_end_and_detach() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            let br = nd.ensure_bridge("weft", 1400).await?;
            let ns = TestNs::new()?;
            let addrs = [(v4("10.47.0.2"), 16), (v6("fd47::2"), 64)];
            let info = nd
                .attach_netns("weft", &ns.path, "ethwe", &addrs, 1400)
                .await?;
            assert_eq!(info.host_ifname, host_ifname_for(&ns.path, "ethwe"));
            assert_eq!(info.container_ifname, "ethwe");

            // Host end: enslaved, up, MTU.
            let host = link(&nd, &info.host_ifname).await?;
            assert_eq!(controller_of(&host), Some(br));
            assert!(is_up(&host));
            assert_eq!(mtu_of(&host), Some(1400));
            // The temporary peer name is gone from the host namespace.
            assert_eq!(
                nd.link_index(&format!("vp{}", &info.host_ifname[2..]))
                    .await?,
                None
            );

            // Container end.
            let got = nd.netns_addresses(&ns.path, "ethwe").await?;
            for a in addrs {
                assert!(got.contains(&a), "{a:?} not in {got:?}");
            }
            let c = link_in(&ns, "ethwe")
                .await?
                .ok_or_else(|| anyhow!("ethwe missing in ns"))?;
            assert!(is_up(&c));
            assert_eq!(mtu_of(&c), Some(1400));
            let mac = c.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(b) => Some(b.clone()),
                _ => None,
            });
            assert_eq!(mac.as_deref(), Some(&info.container_mac[..]));
            let lo = link_in(&ns, "lo")
                .await?
                .ok_or_else(|| anyhow!("lo missing in ns"))?;
            assert!(is_up(&lo));

            // Detach.
            assert!(nd.detach_netns(&ns.path, "ethwe").await?);
            assert_eq!(nd.link_index(&info.host_ifname).await?, None);
            assert!(link_in(&ns, "ethwe").await?.is_none());
            assert!(!nd.detach_netns(&ns.path, "ethwe").await?);
            assert_eq!(veth_count(&nd).await?, 0);
            Ok(())
        });
    }

    #[test]
    fn attach_twice_fails_without_leftovers() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            nd.ensure_bridge("weft", 1500).await?;
            let ns = TestNs::new()?;
            let info = nd
                .attach_netns("weft", &ns.path, "ethwe", &[(v4("10.47.0.2"), 16)], 1500)
                .await?;
            assert_eq!(veth_count(&nd).await?, 1);
            let err = nd
                .attach_netns("weft", &ns.path, "ethwe", &[(v4("10.47.0.3"), 16)], 1500)
                .await
                .err()
                .ok_or_else(|| anyhow!("second attach succeeded"))?;
            let msg = format!("{err:#}");
            assert!(
                msg.contains("ethwe") && msg.contains(&*ns.path.to_string_lossy()),
                "{msg}"
            );
            assert!(msg.contains("already exists"), "{msg}");
            assert_eq!(veth_count(&nd).await?, 1);
            // The first attach is untouched.
            assert!(nd.link_index(&info.host_ifname).await?.is_some());
            let got = nd.netns_addresses(&ns.path, "ethwe").await?;
            assert!(got.contains(&(v4("10.47.0.2"), 16)), "{got:?}");
            assert!(!got.contains(&(v4("10.47.0.3"), 16)), "{got:?}");

            // An interface the container created itself (not through attach_netns) also
            // blocks an attach under its name, and is left alone.
            let file = open_netns(&ns.path)?;
            in_netns(&file, &ns.path, |nd| async move {
                nd.handle
                    .link()
                    .add(LinkVeth::new("eth1", "eth1peer").build())
                    .execute()
                    .await?;
                Ok(())
            })
            .await?;
            let err = nd
                .attach_netns("weft", &ns.path, "eth1", &[], 1500)
                .await
                .err()
                .ok_or_else(|| anyhow!("attach over existing eth1 succeeded"))?;
            assert!(format!("{err:#}").contains("eth1"), "{err:#}");
            assert_eq!(veth_count(&nd).await?, 1);
            Ok(())
        });
    }

    #[test]
    fn attach_failures_leave_nothing_behind() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            nd.ensure_bridge("weft", 1500).await?;

            // Nonexistent namespace.
            let missing = Path::new("/run/netns/weft-test-does-not-exist-4711");
            let err = nd
                .attach_netns("weft", missing, "ethwe", &[], 1500)
                .await
                .err()
                .ok_or_else(|| anyhow!("attach to missing ns succeeded"))?;
            let msg = format!("{err:#}");
            assert!(
                msg.contains("does not exist") && msg.contains(&*missing.to_string_lossy()),
                "{msg}"
            );
            assert_eq!(veth_count(&nd).await?, 0);

            // A file that is not a namespace.
            let not_ns = Path::new("/proc/self/status");
            let err = nd
                .attach_netns("weft", not_ns, "ethwe", &[], 1500)
                .await
                .err()
                .ok_or_else(|| anyhow!("attach to non-ns succeeded"))?;
            assert!(
                format!("{err:#}").contains("not a network namespace"),
                "{err:#}"
            );
            assert_eq!(veth_count(&nd).await?, 0);

            // Missing bridge.
            let ns = TestNs::new()?;
            let err = nd
                .attach_netns("nobridge", &ns.path, "ethwe", &[], 1500)
                .await
                .err()
                .ok_or_else(|| anyhow!("attach to missing bridge succeeded"))?;
            assert!(format!("{err:#}").contains("nobridge"), "{err:#}");

            // Failure after the veth exists: an MTU the kernel rejects (below 68 for veth).
            let err = nd
                .attach_netns("weft", &ns.path, "ethwe", &[], 10)
                .await
                .err()
                .ok_or_else(|| anyhow!("attach with MTU 10 succeeded"))?;
            eprintln!("expected failure: {err:#}");
            assert_eq!(veth_count(&nd).await?, 0);
            assert!(link_in(&ns, "ethwe").await?.is_none());
            assert_eq!(
                nd.link_index(&host_ifname_for(&ns.path, "ethwe")).await?,
                None
            );

            // Failure after the container end was moved and renamed: an IPv6 address in a
            // namespace where IPv6 is disabled on new interfaces.
            if Path::new("/proc/sys/net/ipv6").exists() {
                let no6 = TestNs::with_ipv6(false)?;
                let err = nd
                    .attach_netns(
                        "weft",
                        &no6.path,
                        "ethwe",
                        &[(v4("10.47.0.2"), 16), (v6("fd47::2"), 64)],
                        1500,
                    )
                    .await
                    .err()
                    .ok_or_else(|| anyhow!("IPv6 address on IPv6-disabled interface succeeded"))?;
                let msg = format!("{err:#}");
                eprintln!("expected failure: {msg}");
                assert!(
                    msg.contains("fd47::2")
                        && msg.contains("ethwe")
                        && msg.contains(&*no6.path.to_string_lossy()),
                    "{msg}"
                );
                assert_eq!(veth_count(&nd).await?, 0);
                assert!(link_in(&no6, "ethwe").await?.is_none());
                let peer = format!("vp{}", &host_ifname_for(&no6.path, "ethwe")[2..]);
                assert!(link_in(&no6, &peer).await?.is_none());
            }
            Ok(())
        });
    }

    /// The rename-on-move step itself refuses a name that exists in the namespace (the race
    /// the pre-check cannot cover), and deleting the host end cleans up the moved peer.
    #[test]
    fn pair_onto_existing_name_fails_and_leaves_nothing() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            let br = nd.ensure_bridge("weft", 1500).await?;
            let ns = TestNs::new()?;
            let file = open_netns(&ns.path)?;
            in_netns(&file, &ns.path, |nd| async move {
                nd.handle
                    .link()
                    .add(LinkVeth::new("ethx", "ethxpeer").build())
                    .execute()
                    .await?;
                Ok(())
            })
            .await?;
            // The name check before creation can lose a race; the kernel refuses then.
            let err = nd
                .create_pair("vwtest", "ethx", &file, "test", 1500, br)
                .await
                .err()
                .ok_or_else(|| anyhow!("pair onto existing name succeeded"))?;
            assert!(format!("{err:#}").contains("already exists"), "{err:#}");
            assert_eq!(veth_count(&nd).await?, 0);
            assert!(nd.link_index("vwtest").await?.is_none());
            assert!(link_in(&ns, "ethx").await?.is_some());
            // And the normal case: the container end is born in the namespace, on its MTU.
            nd.create_pair("vwtest", "ethy", &file, "test", 1400, br).await?;
            let inside = link_in(&ns, "ethy").await?.ok_or_else(|| anyhow!("no ethy"))?;
            assert_eq!(mtu_of(&inside), Some(1400));
            assert_eq!(controller_of(&link(&nd, "vwtest").await?), Some(br));
            Ok(())
        });
    }

    #[test]
    fn disable_ipv6_on_bridge() {
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            nd.ensure_bridge("weft", 1500).await?;
            disable_ipv6("weft")?;
            if Path::new("/proc/sys/net/ipv6").exists() {
                let v = std::fs::read_to_string("/proc/sys/net/ipv6/conf/weft/disable_ipv6")?;
                assert_eq!(v.trim(), "1");
            }
            assert!(disable_ipv6("nosuchif").is_err() || !Path::new("/proc/sys/net/ipv6").exists());
            Ok(())
        });
    }

    #[test]
    fn ping_between_two_attached_namespaces() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        if !Path::new("/usr/bin/nsenter").exists() || !Path::new("/usr/bin/ping").exists() {
            eprintln!("skipping: needs nsenter and ping");
            return;
        }
        in_private_netns(|| async {
            let nd = NetDev::new().await?;
            nd.ensure_bridge("weft", 1500).await?;
            let a = TestNs::new()?;
            let b = TestNs::new()?;
            nd.attach_netns("weft", &a.path, "ethwe", &[(v4("10.47.0.2"), 24)], 1500)
                .await?;
            nd.attach_netns("weft", &b.path, "ethwe", &[(v4("10.47.0.3"), 24)], 1500)
                .await?;
            let mut ok = false;
            for _ in 0..5 {
                // Blocking is fine here: nothing else runs on this test's runtime meanwhile.
                let status = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", a.path.display()))
                    .args(["ping", "-c1", "-W1", "10.47.0.3"])
                    .stdout(std::process::Stdio::null())
                    .status()?;
                if status.success() {
                    ok = true;
                    break;
                }
            }
            assert!(ok, "ping from namespace a to b over the bridge failed");
            Ok(())
        });
    }
}
