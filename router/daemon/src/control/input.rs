//! What reaches the actor: connection events from the connection tasks, requests from the API
//! (through [`super::handle::ControlHandle`]), results of work done off the control path, and the
//! order to stop.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use weft_ipam::NetnsRef;
use weft_proto::sleeve::Cipher;
use weft_proto::{ConnId, ControlMsg};

use super::handshake::SessionHello;
use crate::frame::links::{IndexLease, Link};
use crate::services::dns::DnsRequest;
use crate::services::ipam::IpamRequest;

/// A connection finished its handshake and hello.
pub struct ConnUp {
    /// Its handle.
    pub id: ConnId,
    /// The remote socket address.
    pub remote: SocketAddr,
    /// The address we dialed, for an outbound connection.
    pub target: Option<SocketAddr>,
    /// What carries it (over QUIC, `remote` is also where the sleeve sends).
    pub carrier: Carrier,
    /// What the peer said about itself.
    pub hello: SessionHello,
    /// What we offered the peer about the fastpath in our hello.
    pub our_fastpath: weft_proto::fastpath::Offer,
    /// Our end's address and the handshake's binding value.
    pub session: weft_proto::router::Session,
    /// Sleeve keys: (send, receive).
    pub ciphers: (Cipher, Cipher),
    /// Our receive index on the sleeve for this link, held by the link.
    pub our_index: IndexLease,
    /// Messages to send on the connection.
    pub tx: mpsc::Sender<ControlMsg>,
    /// Closes the connection.
    pub close: oneshot::Sender<()>,
    /// The connection's sleeve link when the actor took it (`None`: refused, e.g. a duplicate);
    /// the connection task rotates its keys.
    pub reply: oneshot::Sender<Option<Arc<Link>>>,
}

/// What carries a control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// A TCP connection to the peer's control port.
    Tcp,
    /// A QUIC connection on the sleeve's UDP port.
    Quic,
}

impl Carrier {
    /// Its name, for status and logs.
    pub fn label(self) -> &'static str {
        match self {
            Carrier::Tcp => "tcp",
            Carrier::Quic => "quic",
        }
    }
}

/// One input for the actor.
pub enum Input {
    /// See [`ConnUp`].
    ConnUp(Box<ConnUp>),
    /// A connection ended.
    ConnDown {
        /// Which.
        id: ConnId,
        /// Why, for the log and the target's last error.
        reason: String,
    },
    /// A dial failed before the connection was up.
    ConnectFailed {
        /// Where we dialed.
        addr: SocketAddr,
        /// Why.
        error: String,
    },
    /// A control message arrived.
    Message {
        /// On which connection.
        id: ConnId,
        /// What.
        msg: ControlMsg,
    },
    /// A request from the API.
    Request(Request),
    /// Which namespaces of allocations are gone (checked off the control path).
    NetnsGone(Vec<NetnsRef>),
    /// The MACs of this host's container ports now, each with its network's segment (from the
    /// port guard): what we announce.
    LocalMacs(Vec<(u32, weft_proto::Mac)>),
    /// Stop the router.
    Stop(&'static str),
}

/// A request from the API, with where its answer goes.
pub enum Request {
    /// The status document (mesh, IPAM and DNS parts).
    Status(oneshot::Sender<Value>),
    /// Keep connections to these addresses.
    Connect(Vec<SocketAddr>, oneshot::Sender<()>),
    /// Stop keeping connections to these addresses; answers which were targets.
    Forget(Vec<SocketAddr>, oneshot::Sender<Vec<(SocketAddr, bool)>>),
    /// For the IPAM service.
    Ipam(IpamRequest),
    /// For the DNS service.
    Dns(DnsRequest),
    /// Unbind a name on this host (`weft identity forget`); answers whether it was bound.
    ForgetIdentity(weft_proto::PeerName, oneshot::Sender<bool>),
    /// Apply and pass on a CA revocation (`weft ca revoke`); answers the name cut off.
    Revoke(weft_proto::identity::Revocation, oneshot::Sender<Result<Option<weft_proto::PeerName>, String>>),
}
