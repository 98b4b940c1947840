//! Routes through an interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::netlink::{errno, NetDev};

/// A route: destination prefix and optional gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gw: Option<IpAddr>,
}

impl NetDev {
    /// Adds a route through interface `index` (called `ifname`) of this namespace.
    pub(super) async fn add_route(&self, index: u32, ifname: &str, r: RouteSpec) -> Result<()> {
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
}

/// The route in `m` when it goes out of interface `index` (main table only).
pub(super) fn route_through(m: &RouteMessage, index: u32) -> Option<RouteSpec> {
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
