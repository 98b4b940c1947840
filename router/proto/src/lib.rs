//! weft's protocol core: peer names, the topology CRDT and routes, the
//! control-plane state machine with its gossip channels, the sleeve wire
//! format with its encryption and replay window, and the Ethernet switch that
//! decides where each frame goes.
//!
//! This crate does no I/O: no sockets, no clock, no OS randomness. Time comes
//! in as `Instant` arguments and randomness from a caller-given seed, so the
//! simulator in `router/sim` can drive many routers deterministically. (The
//! one exception, the random hash keys of the switch's MAC table, cannot reach
//! any output; see `switch::MacTable`.) The daemon (`router/daemon`) is the
//! shell around it.

pub mod announce;
pub mod aqm;
pub mod fastpath;
pub mod identity;
pub mod name;
pub mod pmtu;
pub mod replay;
pub mod router;
pub mod sleeve;
pub mod switch;
pub mod topology;
pub mod vnet;

pub use identity::{Keys, PublicKey, Signature, SigningKey, Trust};
pub use name::PeerName;
pub use router::{ConnId, ControlMsg, Event, GossipChannel, Hello, Refusal, Router, RouterConfig, Transmit, Transport};
pub use switch::{Inbound, Mac, MacTable, Owner, Switch};
pub use topology::{PeerInfo, Routes, Topology};
