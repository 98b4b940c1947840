//! The weft router daemon: the I/O shell around `weft_proto`.
//!
//! It owns the sockets (TCP control connections, the UDP sleeve, the local
//! API, metrics), the TAP device and the kernel devices (bridge, veth) it
//! configures over netlink, and the clock. Protocol decisions live in
//! `weft_proto`; this crate feeds it and carries out what it asks for.
//! IPAM (`weft_ipam`) and DNS (`weft_dns`) ride on the router's gossip as
//! the `ipam` and `dns` channels. Left out for now: the kernel VXLAN fastpath.

pub mod api;
pub mod client;
pub mod cni;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod forwarder;
pub mod identity;
pub mod ipam;
pub mod metrics;
pub mod netdev;
pub mod tap;

pub use daemon::{run, Options, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU, DEFAULT_PORT};
