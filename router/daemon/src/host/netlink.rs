//! The rtnetlink connection every host module works through, and the lookups they share.
//!
//! All requests go through one rtnetlink connection opened in the network namespace that
//! [`NetDev::new`] was called in. The operations live beside their concern (links, addresses,
//! routes, attaching namespaces), each in an `impl NetDev` block of its own file: `NetDev` is
//! only a handle on the kernel's tables and holds no state of its own, so splitting it by
//! concern creates no dependency between those files.

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};
use std::os::unix::fs::MetadataExt;
use tracing::debug;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub(super) const MAX_IFNAME_LEN: usize = 15;

/// An rtnetlink connection to the network namespace [`NetDev::new`] was called in.
pub struct NetDev {
    pub(super) handle: Handle,
    /// (st_dev, st_ino) of the namespace this handle talks to, when it could be read.
    pub(super) own_ns: Option<(u64, u64)>,
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

    pub(super) async fn get_link(&self, name: &str) -> Result<Option<LinkMessage>> {
        check_ifname(name)?;
        let stream = self.handle.link().get().match_name(name).execute();
        let mut stream = std::pin::pin!(stream);
        match stream.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface {name} failed")),
        }
    }

    pub(super) async fn require_link(&self, name: &str) -> Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| anyhow!("interface {name} does not exist"))
    }

    pub(super) async fn require_bridge(&self, name: &str) -> Result<u32> {
        let link = self.get_link(name).await?.ok_or_else(|| {
            anyhow!("bridge {name} does not exist: create it first (ensure_bridge)")
        })?;
        if !is_bridge(&link) {
            bail!("interface {name} is not a bridge");
        }
        Ok(link.header.index)
    }

    pub(super) async fn set_up(&self, ifname: &str) -> Result<()> {
        let index = self.require_link(ifname).await?;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing up {ifname} failed"))
    }
}

pub(super) fn mac_of(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

pub(super) fn mtu_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The positive errno of a netlink error reply, if that is what `e` is.
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

pub(super) fn is_bridge(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

pub(super) fn check_ifname(name: &str) -> Result<()> {
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
