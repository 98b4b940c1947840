//! What the API's handlers share: the control path's handle and the host-side facts and
//! devices they work with. No key, no core, no frame path.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;
use weft_ipam::Cidr;

use super::error::ApiError;

use crate::control::ControlHandle;
use crate::host::NetDev;
use crate::services::dns::DnsOptions;
use crate::services::dns_server::DnsServer;

/// See the module docs.
pub struct ApiState {
    /// The way to the actor.
    pub control: ControlHandle,
    /// The port guard: MACs for new container ports.
    pub guard: Arc<crate::control::guard::Guard>,
    /// Named networks on this host.
    pub networks: Arc<crate::control::networks::Networks>,
    /// Kernel devices (attach, expose).
    pub netdev: Arc<NetDev>,
    /// The bridge.
    pub bridge: String,
    /// The TAP on it (not an attachment).
    pub tap: String,
    /// Container MTU.
    pub mtu: u32,
    /// The mesh's address range.
    pub ipam_range: Cidr,
    /// The subnet of requests that name none.
    pub ipam_default_subnet: Cidr,
    /// DNS settings.
    pub dns: DnsOptions,
    /// Where the DNS server listens.
    pub dns_server: DnsServer,
    /// Held while giving the host an address on the bridge, so that concurrent attachments do
    /// not each allocate one.
    pub host_addr_lock: tokio::sync::Mutex<()>,
    /// A container engine plugged in from above (the Docker integration), when it is on: set
    /// once, right after the state is made.
    pub engine: std::sync::OnceLock<Arc<dyn Engine>>,
}

/// What a container engine integration gives the API: `weft attach`/`detach` of a target that
/// names no namespace, and a block of the status. The API does not know the engine; the engine
/// uses the API's attach.
pub trait Engine: Send + Sync {
    /// Attaches the engine's container `req.netns`.
    fn attach<'a>(&'a self, sh: &'a Shared, req: super::request::AttachReq) -> BoxFuture<'a, Result<Value, ApiError>>;
    /// Detaches it.
    fn detach<'a>(&'a self, sh: &'a Shared, req: super::request::DetachReq) -> BoxFuture<'a, Result<Value, ApiError>>;
    /// Its key in the status document and what goes there.
    fn status(&self) -> BoxFuture<'_, (&'static str, Value)>;
}

/// The handlers' state.
pub type Shared = Arc<ApiState>;
