//! What handlers share to carry out a request: the caller's time-out, file-system work run off
//! the async workers, and the attach and detach requests (which a container engine plugged in
//! from above handles too, see `state::Engine`).

use std::time::Duration;

use serde::Deserialize;

use super::error::{internal, ApiError};
use crate::services::ipam::invalid;

/// Longest an API caller may ask to wait.
const MAX_WAIT: f64 = 600.0;

/// The caller's `timeout_seconds` (default 30 s, at most 600 s).
pub fn wait_time(secs: Option<f64>) -> Result<Duration, ApiError> {
    let s = secs.unwrap_or(30.0);
    if !(0.0..=MAX_WAIT).contains(&s) {
        return Err(invalid(format!("timeout_seconds must be between 0 and {MAX_WAIT}")).into());
    }
    Ok(Duration::from_secs_f64(s))
}

/// Runs file-system work (stat, resolv.conf) on a thread that may block.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| internal(anyhow::anyhow!("a blocking task failed: {e}")))
}

/// An attach request.
#[derive(Deserialize)]
pub struct AttachReq {
    /// A namespace (name, path or PID) or, when no namespace has that name, a Docker container.
    pub netns: String,
    /// `IP/PREFIX` (claimed from IPAM when inside its range), `net:CIDR`
    /// (any free address in that subnet) or `net:default`. None: one address
    /// from the default subnet.
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default = "default_ifname")]
    pub ifname: String,
    pub mtu: Option<u32>,
    /// Container ID for IPAM; the namespace's inode when absent.
    pub id: Option<String>,
    pub timeout_seconds: Option<f64>,
    /// A DNS name for the container (`web` or `web.weft.local`).
    pub name: Option<String>,
    /// The network to join; the default one when absent.
    pub network: Option<String>,
    /// The addresses outlive the namespace (a Docker container's, kept while it is stopped):
    /// not tied to it for IPAM's garbage collection.
    #[serde(skip)]
    pub outlives_netns: bool,
    /// The container end's MAC (one it had before); a fresh one when absent.
    #[serde(skip)]
    pub mac: Option<[u8; 6]>,
}

fn default_ifname() -> String {
    "ethwe".into()
}

/// A detach request.
#[derive(Deserialize)]
pub struct DetachReq {
    /// A namespace (name, path or PID) or, when no namespace has that name, a container.
    pub netns: String,
    /// The container ID given at attach, if one was.
    pub id: Option<String>,
    /// Interface name inside the namespace.
    #[serde(default = "default_ifname")]
    pub ifname: String,
}
