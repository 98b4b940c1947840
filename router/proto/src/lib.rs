//! weft's protocol core: peer names, the topology CRDT and routes, the
//! control-plane state machine with its gossip channels, and the sleeve wire
//! format with its encryption and replay window.
//!
//! This crate does no I/O: no sockets, no clock, no OS randomness. Time comes
//! in as `Instant` arguments and randomness from a caller-given seed, so the
//! simulator in `router/sim` can drive many routers deterministically. The
//! daemon (`router/daemon`) is the shell around it.

pub mod name;
pub mod replay;
pub mod router;
pub mod sleeve;
pub mod topology;

pub use name::PeerName;
pub use router::{ConnId, ControlMsg, Event, GossipChannel, Hello, Refusal, Router, RouterConfig, Transmit};
pub use topology::{PeerInfo, Routes, Topology};
