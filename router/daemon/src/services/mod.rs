//! Services: address allocation (IPAM), container DNS and the router's side of CNI, as plain
//! structs the control path's actor drives, each around a sans-IO core that rides the router's
//! gossip. Their state reaches the disk through the persistence gate ([`persist`]) before
//! anything that depends on it leaves the process.
//!
//! Nothing here knows the actor, connections or the API: requests come in as values with a
//! reply channel, and the router core is passed in by the caller.

pub mod cni;
pub mod dns;
pub mod dns_server;
pub mod identities;
pub mod ipam;
pub mod persist;
