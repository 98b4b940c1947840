//! weft's address allocator (IPAM): one range shared by every peer.
//!
//! - [`ring`]: the range cut into pieces owned by peers, merged as a CRDT.
//! - [`paxos`]: consensus on which peers start the ring.
//! - [`alloc`]: one peer's allocator: its containers' addresses inside its
//!   own pieces, donation between peers, the gossip channel.
//!
//! Like `weft-proto`, this crate does no I/O: time comes in as `Instant`
//! arguments, randomness from a seed, and persistence is a value
//! ([`alloc::State`]) the shell writes and reads back.

pub mod addr;
pub mod alloc;
pub mod paxos;
pub mod ring;

pub use addr::Cidr;
pub use alloc::{Allocation, Config, FORGED_REASONS, Failure, FailureKind, Init, Ipam, NetnsRef, Output, PendingHandover, State, Status, Want};
pub use ring::{Ring, RingError};

/// The gossip channel's name.
pub const CHANNEL: &str = "ipam";
