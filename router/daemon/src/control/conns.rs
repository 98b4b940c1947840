//! The live control connections as the actor keeps them: where to send, how to close, and the
//! connection's data paths ([`Paths`]).

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};
use weft_proto::{ConnId, ControlMsg, PeerName};

use crate::frame::forwarder::Paths;

/// One live connection.
pub struct Conn {
    /// Messages to send on it.
    pub tx: mpsc::Sender<ControlMsg>,
    /// Closes it (taken when used).
    pub close: Option<oneshot::Sender<()>>,
    /// The peer.
    pub peer: PeerName,
    /// Our sleeve receive index for it.
    pub index: u32,
    /// Whether it is encrypted.
    pub encrypted: bool,
    /// Its data paths.
    pub paths: Paths,
    /// What carries it.
    pub carrier: super::input::Carrier,
    /// Its sleeve link.
    pub link: std::sync::Arc<crate::frame::links::Link>,
    /// The sleeve address of the peer we last told it we see (`ControlMsg::Observed`).
    pub told: Option<std::net::SocketAddr>,
}

/// The table of live connections.
#[derive(Default)]
pub struct Conns {
    map: HashMap<ConnId, Conn>,
}

impl Conns {
    /// Adds a connection.
    pub fn insert(&mut self, id: ConnId, c: Conn) {
        self.map.insert(id, c);
    }

    /// Removes a connection.
    pub fn remove(&mut self, id: ConnId) -> Option<Conn> {
        self.map.remove(&id)
    }

    /// A connection.
    pub fn get(&self, id: ConnId) -> Option<&Conn> {
        self.map.get(&id)
    }

    /// A connection, to change.
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.map.get_mut(&id)
    }

    /// Every connection's id.
    pub fn ids(&self) -> Vec<ConnId> {
        self.map.keys().copied().collect()
    }

    /// Every connection.
    pub fn iter(&self) -> impl Iterator<Item = (&ConnId, &Conn)> {
        self.map.iter()
    }

    /// (state, explanation) for status: established on the active path, pending with a reason,
    /// or failed when the connection is gone.
    pub fn state(&self, id: ConnId) -> (&'static str, String) {
        match self.map.get(&id) {
            Some(c) => c.paths.describe(),
            None => ("failed", String::new()),
        }
    }
}
