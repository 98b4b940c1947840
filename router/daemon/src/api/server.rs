//! The local API (HTTP/JSON on a root-only unix socket) used by the CLI and the CNI plugin, and
//! the health/metrics endpoint on 127.0.0.1:6782 (any local user can read it, so it serves
//! counters and health, never the full status). Routes come from one module per area.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::routing::get;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use super::state::Shared;
use super::{cni, containers, dns, docker, ipam, mesh};
use crate::control::stats::ControlStats;
use crate::frame::FramePath;
use crate::metrics;

/// Accepts only connections from root (checked with SO_PEERCRED), on top of
/// the socket file's 0600 mode.
pub(crate) struct RootOnly(pub(crate) UnixListener);

impl axum::serve::Listener for RootOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((s, a)) => match s.peer_cred() {
                    Ok(c) if c.uid() == 0 => return (s, a),
                    Ok(c) => warn!(uid = c.uid(), pid = ?c.pid(), "refused API connection from a non-root user"),
                    Err(e) => warn!(error = %e, "could not read API peer credentials; refusing"),
                },
                Err(e) => {
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Binds the API socket at `path` and serves it until `stop` turns true; requests under way
/// then finish (a `weft stop` or `weft reset` still gets its answer).
pub async fn serve_api(state: Shared, path: &std::path::Path, mut stop: watch::Receiver<bool>) -> Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!("another router is serving {}: stop it first (weft stop)", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", path.display()))?;
    let app = axum::Router::new()
        .merge(mesh::routes())
        .merge(containers::routes())
        .merge(ipam::routes())
        .merge(dns::routes())
        .merge(cni::routes())
        .merge(docker::routes())
        .with_state(state);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(RootOnly(listener), app).with_graceful_shutdown(shutdown).await {
            warn!(error = %e, "API server stopped");
        }
    }))
}

/// Serves `/metrics` and `/status` (the health document, see [`mesh::health`]) on a TCP address
/// (127.0.0.1:6782 by default).
pub async fn serve_metrics(state: Shared, frames: Arc<FramePath>, ctl: Arc<ControlStats>, addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
    let registry = Arc::new(metrics::registry(frames, ctl));
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let r = registry.clone();
                async move {
                    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics::render(&r))
                }
            }),
        )
        .route("/status", get(mesh::health))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
