//! The frame path: Ethernet frames between this host's bridge and the peers, on std threads
//! (no tokio, no locks held per frame).
//!
//! ```text
//! bridge ─ TAP ─► [weft-tap thread]  switch: learn, look up, next hop ─► batch ─► seal ─GSO─► UDP ─► peer
//!          TAP ◄─ [weft-udp thread]  open ─► switch (Inbound): deliver / relay / drop ◄─GRO─ UDP ◄─ peer
//! ```
//!
//! Two threads do the work, each blocking in poll(2) on one descriptor: [`tx`] reads the TAP and
//! [`rx`] reads the sleeve socket. Their switching decisions are `weft_proto::switch`'s, which
//! does no I/O. The control path installs links and routes through [`plane::FramePath`] as a
//! published snapshot ([`links`]) and reads the counters ([`stats`]); each connection's choice of
//! path is a [`forwarder::Paths`] the control path drives.

pub mod batch;
pub mod forwarder;
pub mod links;
pub mod plane;
pub mod rx;
pub mod shared;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod udp;

pub use plane::FramePath;
