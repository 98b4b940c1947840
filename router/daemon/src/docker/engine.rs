//! `weft attach CONTAINER` and `weft detach CONTAINER`: the API's [`Engine`] for Docker. The
//! container's namespace comes from the Engine API, its addresses and name are kept under its
//! ID (not tied to the namespace), and it is attached again whenever it starts again (see the
//! events task in [`super::Docker`]).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use weft_ipam::Allocation;
use weft_proto::Mac;

use super::{book, ipam_id, Docker};
use crate::api::containers::{attach_netns, detach_netns, AttachReq, DetachReq};
use crate::api::error::{bad, ApiError};
use crate::api::state::{Engine, Shared};

/// How long the Engine API gets to show a container to `weft attach`.
const LOOKUP: Duration = Duration::from_secs(10);

/// The [`Engine`] over the Docker integration.
pub struct DockerEngine(pub Arc<Docker>);

impl Engine for DockerEngine {
    fn attach<'a>(&'a self, sh: &'a Shared, req: AttachReq) -> BoxFuture<'a, Result<Value, ApiError>> {
        Box::pin(attach(&self.0, sh, req))
    }

    fn detach<'a>(&'a self, sh: &'a Shared, req: DetachReq) -> BoxFuture<'a, Result<Value, ApiError>> {
        Box::pin(detach(&self.0, sh, req))
    }

    fn status(&self) -> BoxFuture<'_, (&'static str, Value)> {
        Box::pin(async move { ("docker", self.0.status().await) })
    }
}

async fn lookup(docker: &Docker, target: &str) -> Result<super::ContainerInfo, ApiError> {
    docker
        .inspect(target, LOOKUP)
        .await
        .map_err(|e| bad(format!("{target:?} is not a network namespace, and Docker could not be asked about a container of that name: {e:#}")))?
        .ok_or_else(|| bad(format!("no network namespace and no Docker container is called {target:?}")))
}

async fn attach(docker: &Docker, sh: &Shared, mut req: AttachReq) -> Result<Value, ApiError> {
    let info = lookup(docker, &req.netns).await?;
    let pid = info.pid.ok_or_else(|| bad(format!("Docker container {} is not running: start it first (weft attaches it again by itself whenever it starts)", info.name)))?;
    let dns_name = req.name.clone().or_else(|| weft_dns::relative_name(&info.name, &sh.dns.domain).ok().map(|_| info.name.clone()));
    let mut entry = book::Attached {
        name: info.name.clone(),
        cidrs: req.cidrs.clone(),
        network: req.network.clone(),
        dns_name: dns_name.clone(),
        ifname: req.ifname.clone(),
        pid: Some(pid),
        mac: None,
    };
    req.netns = pid.to_string();
    req.id = Some(ipam_id(&info.id));
    req.name = dns_name;
    req.outlives_netns = true;
    let mut v = attach_netns(sh, req).await?;
    entry.mac = v["mac"].as_str().and_then(|m| m.parse::<Mac>().ok()).map(|m| m.to_string());
    docker.remember_attached(&info.id, entry).await;
    v["container"] = json!(info.name);
    v["container_id"] = json!(info.id);
    Ok(v)
}

async fn detach(docker: &Docker, sh: &Shared, mut req: DetachReq) -> Result<Value, ApiError> {
    let info = lookup(docker, &req.netns).await?;
    // Forgotten first, so that it is not attached again.
    let forgotten = docker.forget_attached(&info.id).await;
    let id = ipam_id(&info.id);
    let Some(pid) = info.pid else {
        // Stopped: no port to remove; its addresses and name go.
        let released = sh.control.release(id.clone(), None).await?;
        sh.control.dns_remove(id, None, Vec::new()).await?;
        if forgotten.is_none() && released.is_empty() {
            return Err(bad(format!("Docker container {} is not attached to weft", info.name)));
        }
        let released: Vec<String> = released.iter().map(Allocation::cidr).collect();
        return Ok(json!({ "detached": info.name, "released": released }));
    };
    if let Some(f) = &forgotten {
        req.ifname = f.ifname.clone();
    }
    req.netns = pid.to_string();
    req.id = Some(id.clone());
    let mut v = detach_netns(sh, req).await?;
    // Its addresses are kept under its ID, not its namespace.
    let released: Vec<String> = sh.control.release(id, None).await?.iter().map(Allocation::cidr).collect();
    v["released"] = json!(released);
    v["detached"] = json!(info.name);
    Ok(v)
}
