//! Addresses on interfaces of our own namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::AddressMessageBuilder;
use tracing::debug;

use super::netlink::{errno, NetDev};

impl NetDev {
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

    /// Addresses on an interface of our own namespace.
    pub async fn addresses(&self, ifname: &str) -> Result<Vec<(IpAddr, u8)>> {
        let index = self.require_link(ifname).await?;
        self.addresses_of(index).await
    }

    pub(super) async fn addresses_of(&self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
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
}

pub(super) fn check_prefix(addr: IpAddr, prefix: u8) -> Result<()> {
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
