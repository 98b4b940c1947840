//! The control path's handle: the one way the API (or anything else outside the actor) reaches
//! the router core and the services. Each method sends a typed request and waits for its answer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use weft_dns::Registration;
use weft_ipam::{Allocation, Failure, FailureKind, NetnsRef, Want};

use super::input::{Input, Request};
use crate::services::dns::{DnsError, DnsRequest};
use crate::services::ipam::{IpamError, IpamRequest, ResetOutcome};

/// The router is stopping: nobody will answer.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the router is stopping")]
pub struct Stopping;

impl From<Stopping> for IpamError {
    fn from(_: Stopping) -> Self {
        IpamError::Refused(Failure { kind: FailureKind::Timeout, message: Stopping.to_string() })
    }
}

impl From<Stopping> for DnsError {
    fn from(_: Stopping) -> Self {
        DnsError::Invalid(Stopping.to_string())
    }
}

/// A cloneable handle on the actor.
#[derive(Clone)]
pub struct ControlHandle {
    inputs: mpsc::Sender<Input>,
}

impl ControlHandle {
    pub(crate) fn new(inputs: mpsc::Sender<Input>) -> Self {
        ControlHandle { inputs }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, Stopping> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Request(make(tx))).await.map_err(|_| Stopping)?;
        rx.await.map_err(|_| Stopping)
    }

    async fn ipam<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> IpamRequest) -> Result<T, Stopping> {
        self.ask(|tx| Request::Ipam(make(tx))).await
    }

    async fn dns<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> DnsRequest) -> Result<T, Stopping> {
        self.ask(|tx| Request::Dns(make(tx))).await
    }

    /// The MACs of this host's container ports, to announce to the peers.
    pub async fn local_macs(&self, macs: Vec<(u32, weft_proto::Mac)>) -> Result<(), Stopping> {
        self.inputs.send(Input::LocalMacs(macs)).await.map_err(|_| Stopping)
    }

    /// Stops the router.
    pub async fn stop(&self, why: &'static str) {
        let _ = self.inputs.send(Input::Stop(why)).await;
    }

    /// The status document behind `weft status` and `weft report`.
    pub async fn status(&self) -> Result<Value, Stopping> {
        self.ask(Request::Status).await
    }

    /// Keeps connections to these addresses (`weft connect`).
    pub async fn connect(&self, addrs: Vec<SocketAddr>) -> Result<(), Stopping> {
        self.ask(|tx| Request::Connect(addrs, tx)).await
    }

    /// Stops keeping connections to these addresses (`weft forget`); which were targets.
    pub async fn forget(&self, addrs: Vec<SocketAddr>) -> Result<Vec<(SocketAddr, bool)>, Stopping> {
        self.ask(|tx| Request::Forget(addrs, tx)).await
    }

    /// Unbinds a name on this host; whether it was bound.
    pub async fn forget_identity(&self, name: weft_proto::PeerName) -> Result<bool, Stopping> {
        self.ask(|tx| Request::ForgetIdentity(name, tx)).await
    }

    /// Applies a CA revocation and passes it on; the name it cut off, or why it was refused.
    pub async fn revoke(&self, r: weft_proto::identity::Revocation) -> Result<Result<Option<weft_proto::PeerName>, String>, Stopping> {
        self.ask(|tx| Request::Revoke(r, tx)).await
    }

    /// An address for container `id`; waits up to `timeout` (consensus, donation).
    pub async fn allocate(&self, id: String, want: Want, netns: Option<NetnsRef>, timeout: Duration) -> Result<Allocation, IpamError> {
        self.ipam(|reply| IpamRequest::Allocate { id, want, netns, timeout, reply }).await?
    }

    /// The addresses container `id` holds here.
    pub async fn lookup(&self, id: String) -> Result<Vec<Allocation>, Stopping> {
        self.ipam(|reply| IpamRequest::Lookup { id, reply }).await
    }

    /// Every allocation of this host.
    pub async fn allocations(&self) -> Result<Vec<Allocation>, Stopping> {
        self.ipam(|reply| IpamRequest::Allocations { reply }).await
    }

    /// Releases container `id`'s addresses (or one).
    pub async fn release(&self, id: String, addr: Option<u32>) -> Result<Vec<Allocation>, IpamError> {
        self.ipam(|reply| IpamRequest::Release { id, addr, reply }).await?
    }

    /// Releases the addresses of a namespace (by inode).
    pub async fn release_netns(&self, inode: u64) -> Result<Vec<Allocation>, IpamError> {
        self.ipam(|reply| IpamRequest::ReleaseNetns { inode, reply }).await?
    }

    /// The IPAM status document, with the allocations when asked.
    pub async fn ipam_status(&self, allocations: bool) -> Result<Value, Stopping> {
        self.ipam(|reply| IpamRequest::Status { allocations, reply }).await
    }

    /// Takes over a gone peer's space (`weft rmpeer`).
    pub async fn rmpeer(&self, peer: String, force: bool) -> Result<Value, IpamError> {
        self.ipam(|reply| IpamRequest::Rmpeer { peer, force, reply }).await?
    }

    /// Hands our space to another peer and forgets the IPAM state (`weft reset`); answers once the
    /// receiving peer confirmed, or after a time-out.
    pub async fn reset(&self, force: bool) -> Result<ResetOutcome, IpamError> {
        self.ipam(|reply| IpamRequest::Reset { force, reply }).await?
    }

    /// Starts consensus if nothing has yet; (ready, state in words).
    pub async fn prime(&self) -> Result<(bool, String), Stopping> {
        self.ipam(|reply| IpamRequest::Prime { reply }).await
    }

    /// Registers a DNS name for container `id`; answers the full name once it is saved.
    pub async fn dns_add(&self, id: String, name: String, addrs: Vec<IpAddr>) -> Result<String, DnsError> {
        self.dns(|reply| DnsRequest::Add { id, name, addrs, reply }).await?
    }

    /// Removes names of container `id` (all, or by name and/or addresses); whether any went.
    pub async fn dns_remove(&self, id: String, name: Option<String>, addrs: Vec<IpAddr>) -> Result<bool, DnsError> {
        self.dns(|reply| DnsRequest::Remove { id, name, addrs, reply }).await?
    }

    /// The addresses of a name relative to the zone.
    pub async fn dns_lookup(&self, name: String) -> Result<Vec<IpAddr>, Stopping> {
        self.dns(|reply| DnsRequest::Lookup { name, reply }).await
    }

    /// This host's DNS names.
    pub async fn dns_own(&self) -> Result<Vec<Registration>, Stopping> {
        self.dns(|reply| DnsRequest::Own { reply }).await
    }

    /// The DNS status document.
    pub async fn dns_status(&self) -> Result<Value, Stopping> {
        self.dns(|reply| DnsRequest::Status { reply }).await
    }
}
