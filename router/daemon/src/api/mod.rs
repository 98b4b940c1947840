//! The API: the local HTTP/JSON API on a root-only unix socket (for the CLI and the CNI
//! plugin), the status and metrics endpoint, and the blocking client both callers use.
//!
//! Handlers reach the control path only through its handle ([`crate::control::ControlHandle`])
//! and the host through [`crate::host`]; one module per area (mesh, containers, IPAM, DNS, CNI)
//! holds its routes, and every handler answers errors with [`error::ApiError`].

pub mod client;
pub mod cni;
pub mod containers;
pub mod dns;
pub mod docker;
pub mod error;
pub mod ipam;
pub mod mesh;
pub mod request;
pub mod server;
pub mod state;
