//! The control path (tokio): control connections (handshake, records, one task each), and the
//! actor that owns the router core and drives the services, reached through a typed handle.
//!
//! Frames never pass here: the control path installs links and routes in the frame path and
//! reads its counters.

pub mod actor;
pub mod admission;
pub mod conn;
pub mod conns;
pub mod fastpath;
pub mod guard;
pub mod handle;
pub mod handshake;
pub mod input;
pub mod networks;
pub mod quic;
pub mod records;
pub mod rekey;
pub mod stats;
pub mod status;

pub use handle::ControlHandle;
