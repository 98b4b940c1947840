//! The host: what the router configures on the machine it runs on. The kernel's network
//! devices over rtnetlink (links, addresses, routes, veth pairs into namespaces), network
//! namespaces, kernel settings, files under /etc/netns, and the router's identity on disk.
//!
//! Nothing here knows about peers, gossip or frames; the control path, the services and the API
//! call into it.

pub mod addrs;
pub mod attach;
pub mod identity;
pub mod isolate;
pub mod guard;
pub mod links;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod resolv;
pub mod routes;
pub mod sysctl;
pub mod vxlan;

#[cfg(test)]
mod tests;

pub use attach::{host_ifname_for, AttachInfo, AttachOpts, LinkState};
pub use netlink::NetDev;
pub use routes::RouteSpec;
