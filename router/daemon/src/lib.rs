//! The weft router daemon: the shell of threads, sockets, devices and files around the sans-IO
//! cores (`weft_proto`, `weft_ipam`, `weft_dns`). Two paths run through it:
//!
//! ```text
//!             ┌────────────────────── frame path (std threads, no tokio) ─────────────────────┐
//! container ─ bridge ─ TAP ─► tx thread: switch ─► batch ─► seal ─GSO─► UDP 6783 ─► peer      │
//!                      TAP ◄─ rx thread: open ─► switch: deliver / relay ◄─GRO─ UDP ◄─ peer   │
//!             └────────────▲ links + routes (published snapshot), counters ────────────────────┘
//!                          │
//!             ┌────────────┴──────────────── control path (tokio) ────────────────────────────┐
//! peer ◄─TCP 6783─► conn tasks (handshake, records) ─► actor: weft_proto::Router ─► services   │
//!             │                                          ▲ typed handle       (IPAM, DNS, CNI)│
//!             └──────────────────────────────────────────┼──────────────────────────────────-─┘
//!                                              api (unix socket, metrics)
//! ```
//!
//! - [`frame`]: Ethernet frames between the bridge and the peers. The switching decisions are
//!   `weft_proto::switch`'s; this module owns the TAP, the sleeve socket and the two threads.
//! - [`control`]: control connections and the actor that owns the router core, reached through
//!   [`control::ControlHandle`].
//! - [`services`]: IPAM, DNS and CNI as plain structs the actor drives; their state reaches the
//!   disk through a persistence gate before anything that depends on it leaves.
//! - [`host`]: what the router configures on the machine: links, addresses, routes, namespaces,
//!   sysctls, the identity on disk.
//! - [`api`]: the local HTTP/JSON API and the metrics endpoint; it reaches the control path only
//!   through the handle.
//! - [`wiring`]: binds the ports, builds the parts, starts them. [`config`]: the options.
//!
//! No module imports one that imports it back (`tests/layers.rs` checks), the private key stays
//! with the connection tasks' handshaker, and no blocking call runs on an async worker thread.

pub mod api;
pub mod config;
pub mod control;
pub mod docker;
pub mod frame;
pub mod host;
pub mod metrics;
pub mod password;
pub mod services;
pub mod wiring;

pub use config::{Options, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU};
pub use control::conn::DEFAULT_PORT;
pub use wiring::run;
