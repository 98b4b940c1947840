//! The actor: one task that owns the router core (`weft_proto::Router`) and drives the services.
//!
//! Everything that changes the control plane's state reaches it as an [`Input`] on one channel:
//! connection events, API requests (through [`super::handle::ControlHandle`]), results of work
//! done elsewhere. Finished saves arrive on a second channel from the persistence thread. After
//! every round of inputs it flushes the services (saves start, outputs whose saves are done go),
//! sends the core's transmits, acts on its events, and re-arms one timer. It never blocks: disk
//! writes, namespace checks and sleeve heartbeats happen on other threads.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use weft_ipam::NetnsRef;
use weft_proto::sleeve::{Cipher, Opener, Sealer};
use weft_proto::identity::Refused;
use weft_proto::router::Refusal;
use weft_proto::announce::{self, Announcements};
use weft_proto::{ConnId, ControlMsg, Event, Router};


use super::conns::{Conn, Conns};
use super::input::{Carrier, ConnUp, Input, Request};
use super::stats::ControlStats;
use super::status::{status, StatusInfo};
use super::fastpath::Fastpath;
use crate::frame::forwarder::{Forwarder, Paths, SleeveForwarder};
use crate::frame::plane::FramePath;
use crate::host::links::bridge_mac;
use crate::host::netns::netns_alive;
use crate::services::dns::DnsService;
use crate::services::identities::IdentityStore;
use crate::services::ipam::IpamService;
use crate::services::persist::{FileId, SaveDone, Writer};

/// Inputs taken in one round before the services are flushed: one save covers a batch of
/// requests.
const BATCH: usize = 256;
/// The actor's periodic work (paths, service timers, gauges).
const TICK: Duration = Duration::from_secs(1);
/// A MAC list whose peer has left the topology is kept this long.
const LIST_GRACE: Duration = Duration::from_secs(600);

/// Everything the actor owns, built by the wiring.
pub struct Actor {
    /// The control-plane core.
    pub core: Router,
    /// The frame path, to install links and routes.
    pub frames: Arc<FramePath>,
    /// Where to send the addresses the core asks us to dial (the dialing task holds the keys).
    pub dials: mpsc::UnboundedSender<(SocketAddr, weft_proto::Transport)>,
    /// Address allocation.
    pub ipam: IpamService,
    /// Container DNS.
    pub dns: DnsService,
    /// The persistence thread.
    pub writer: Writer,
    /// Counters and gauges.
    pub stats: Arc<ControlStats>,
    /// Fixed facts for the status.
    pub info: StatusInfo,
    /// Our own input channel, for work that reports back later.
    pub inputs: mpsc::Sender<Input>,
    /// Where the name bindings are kept.
    pub identities: IdentityStore,
    /// The kernel fastpath.
    pub fastpath: Arc<Fastpath>,
    conns: Conns,
    stopping: Option<&'static str>,
    /// The owners of source MACs are due to be published again (the peers changed).
    owners_due: bool,
    /// Origins of MAC lists missing from the topology, since when.
    list_absent: std::collections::HashMap<weft_proto::PeerName, Instant>,
}

impl Actor {
    /// Assembles an actor; see the fields.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: Router,
        frames: Arc<FramePath>,
        dials: mpsc::UnboundedSender<(SocketAddr, weft_proto::Transport)>,
        ipam: IpamService,
        dns: DnsService,
        writer: Writer,
        stats: Arc<ControlStats>,
        info: StatusInfo,
        inputs: mpsc::Sender<Input>,
        identities: IdentityStore,
        fastpath: Arc<Fastpath>,
    ) -> Self {
        Actor {
            core,
            frames,
            dials,
            ipam,
            dns,
            writer,
            stats,
            info,
            inputs,
            identities,
            fastpath,
            conns: Conns::default(),
            stopping: None,
            owners_due: true,
            list_absent: std::collections::HashMap::new(),
        }
    }

    /// Runs until told to stop (SIGINT, SIGTERM, `weft stop`, `weft reset`) or every input
    /// sender is gone.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>, mut saves: mpsc::Receiver<SaveDone>) -> Result<()> {
        self.drain();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = match self.ipam.poll_timeout() {
                Some(t) => t.min(self.core.poll_timeout()),
                None => self.core.poll_timeout(),
            };
            tokio::select! {
                m = inputs.recv() => match m {
                    Some(m) => {
                        self.handle(m);
                        for _ in 0..BATCH {
                            match inputs.try_recv() {
                                Ok(m) => self.handle(m),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                Some(done) = saves.recv() => self.saved(done),
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                    let now = Instant::now();
                    self.core.handle_timeout(now);
                    self.ipam.handle_timeout(&mut self.core, now);
                }
                _ = tick.tick() => self.tick(),
            }
            if let Some(why) = self.stopping {
                info!(reason = why, "stopping");
                break;
            }
            self.drain();
        }
        Ok(())
    }

    fn handle(&mut self, m: Input) {
        let now = Instant::now();
        match m {
            Input::ConnUp(up) => self.conn_up(now, *up),
            Input::ConnDown { id, reason } => {
                if let Some(c) = self.conns.remove(id) {
                    info!(peer = %c.peer, %reason, "connection down");
                    self.frames.remove_link(c.peer, c.index);
                    self.core.handle_connection_down(now, id, &reason);
                }
            }
            Input::ConnectFailed { addr, error } => {
                debug!(%addr, %error, "dial failed");
                self.core.handle_connect_failed(now, addr, error);
            }
            Input::Message { id, msg } => {
                if let ControlMsg::SleeveState { .. } | ControlMsg::FastpathState { .. } = msg {
                    if let Some(c) = self.conns.get_mut(id) {
                        if c.paths.handle_report(&msg) {
                            self.path_changed(id);
                        }
                    }
                    return;
                }
                if let Err(e) = self.core.handle_message(now, id, msg) {
                    let peer = self.conns.get(id).map(|c| c.peer.to_string()).unwrap_or_default();
                    warn!(%peer, error = %e, "refused gossip from peer");
                }
            }
            Input::Request(r) => self.request(now, r),
            Input::NetnsGone(gone) => {
                for id in self.ipam.netns_checked(&mut self.core, now, &gone) {
                    self.dns.remove(&mut self.core, &id, None, None);
                }
            }
            Input::LocalMacs(macs) => {
                let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                let delta = self.core.channel_mut::<Announcements>(announce::CHANNEL).and_then(|a| a.set_own(macs, ms));
                if let Some(delta) = delta {
                    debug!(macs = self.announcements_count(), "announcing this host's container MACs");
                    self.core.broadcast(announce::CHANNEL, delta);
                }
            }
            Input::Stop(why) => self.stopping = Some(why),
        }
    }

    fn announcements_count(&mut self) -> usize {
        let me = self.core.topology().me();
        self.core.channel_mut::<Announcements>(announce::CHANNEL).map_or(0, |a| a.count(me))
    }

    /// Gives the frame path and the fastpath the peer each source MAC may come from (the MACs
    /// each peer announced, and each peer's bridge MAC on every network it is a member of, the
    /// default one always), and the frame path each named network's routes: its broadcast trees
    /// pruned to its members.
    fn publish_owners(&mut self) {
        let me = self.core.topology().me();
        let peers: Vec<weft_proto::PeerName> = self.core.topology().peers().map(|p| p.name).filter(|p| *p != me).collect();
        let Some(a) = self.core.channel_mut::<Announcements>(announce::CHANNEL) else { return };
        let _ = a.take_changed();
        let mut owners = a.owners();
        let members = a.members();
        for p in &peers {
            owners.insert((0, weft_proto::Mac(bridge_mac(*p))), *p);
        }
        for (seg, m) in &members {
            for p in m.iter().filter(|p| **p != me) {
                owners.insert((*seg, weft_proto::Mac(bridge_mac(*p))), *p);
            }
        }
        let owners = Arc::new(owners);
        self.frames.set_owners(owners.clone());
        self.fastpath.set_announced(owners);
        let topology = self.core.topology();
        let routes = members.iter().filter(|(seg, _)| **seg != 0).map(|(seg, m)| (*seg, topology.routes_for(m))).collect();
        self.frames.set_segment_routes(routes);
    }

    /// The `macs` block of the status: what we announce, what each peer does, conflicts and
    /// refusals.
    fn macs_status(&mut self) -> serde_json::Value {
        let me = self.core.topology().me();
        let peers: Vec<weft_proto::PeerName> = self.core.topology().peers().map(|p| p.name).collect();
        let Some(a) = self.core.channel_mut::<Announcements>(announce::CHANNEL) else { return serde_json::Value::Null };
        let by_peer: serde_json::Map<String, serde_json::Value> =
            peers.iter().filter(|p| **p != me).map(|p| (p.to_string(), a.count(*p).into())).collect();
        let conflicts: Vec<serde_json::Value> = a
            .conflicts()
            .into_iter()
            .map(|(m, ps)| serde_json::json!({"mac": m.to_string(), "peers": ps.iter().map(ToString::to_string).collect::<Vec<_>>()}))
            .collect();
        let refused: serde_json::Map<String, serde_json::Value> = a.refused().map(|(l, n)| (l.to_string(), n.into())).collect();
        let members: serde_json::Map<String, serde_json::Value> = a
            .members()
            .into_iter()
            .map(|(seg, ps)| (format!("{seg:06x}"), ps.iter().map(ToString::to_string).collect::<Vec<_>>().into()))
            .collect();
        serde_json::json!({ "own": a.count(me), "by_peer": by_peer, "conflicts": conflicts, "refused": refused, "members": members })
    }

    fn conn_up(&mut self, now: Instant, up: ConnUp) {
        let ConnUp { id, remote, target, carrier, hello, our_fastpath, session, ciphers, our_index: lease, tx, close, reply } = up;
        let our_index = lease.index();
        let peer = hello.hello.name;
        let nick = hello.hello.nickname.clone();
        let binding = session.binding;
        match self.core.handle_connection_up(now, id, remote, target, hello.hello, session) {
            Ok(()) => {
                let encrypted = matches!(ciphers.0, Cipher::Aes256Gcm(_));
                // Over QUIC the peer's UDP address is the connection's own (a NAT's mapping
                // included); over TCP it is the peer's IP and the port it said.
                let udp = match carrier {
                    Carrier::Quic => remote,
                    Carrier::Tcp => SocketAddr::new(remote.ip(), hello.udp_port),
                };
                let link = self.frames.add_link(
                    peer,
                    udp,
                    lease,
                    Sealer::new(ciphers.0, hello.sleeve_index),
                    Opener::new(ciphers.1),
                );
                info!(%peer, nickname = %nick, %remote, outbound = target.is_some(), encrypted, transport = carrier.label(), "connection up");
                let sleeve: Box<dyn Forwarder> = Box::new(SleeveForwarder::new(link.clone(), self.info.udp_port));
                let paths = match self.fastpath.forwarder(peer, remote.ip(), &our_fastpath, &hello.fastpath, &binding) {
                    Ok(fast) => Paths::new(vec![Box::new(fast), sleeve]),
                    Err(why) => {
                        debug!(%peer, reason = %why, "no fastpath for this connection");
                        Paths::new(vec![sleeve]).with_note(bounded(why))
                    }
                };
                self.conns.insert(id, Conn { tx, close: Some(close), peer, index: our_index, encrypted, paths, carrier, link: link.clone(), told: None });
                let _ = reply.send(Some(link));
            }
            Err(Refusal::Identity(e)) => {
                warn!(%peer, %remote, reason = %e, "connection refused: the peer did not prove its name");
                let _ = reply.send(None);
            }
            Err(e) => {
                info!(%peer, %remote, reason = %e, "connection refused");
                let _ = reply.send(None);
            }
        }
    }

    fn request(&mut self, now: Instant, r: Request) {
        match r {
            Request::Status(reply) => {
                let mut v = status(&self.core, &self.conns, &self.frames, &self.stats, &self.info);
                v["fastpath"] = self.fastpath.status(self.unencrypted_peers());
                v["ipam"] = self.ipam.status(&mut self.core);
                v["dns"] = self.dns.status(&mut self.core);
                v["macs"] = self.macs_status();
                let _ = reply.send(v);
            }
            Request::Connect(addrs, reply) => {
                for a in addrs {
                    self.core.add_target(now, a);
                }
                let _ = reply.send(());
            }
            Request::Forget(addrs, reply) => {
                let r = addrs.into_iter().map(|a| (a, self.core.forget_target(a))).collect();
                let _ = reply.send(r);
            }
            Request::Ipam(r) => self.ipam.handle(&mut self.core, now, r),
            Request::Dns(r) => self.dns.handle(&mut self.core, r),
            Request::ForgetIdentity(name, reply) => {
                let done = self.core.forget_identity(now, name);
                if done {
                    warn!(peer = %name, "name binding forgotten by the operator: the next key to claim it is bound");
                }
                let _ = reply.send(done);
            }
            Request::Revoke(r, reply) => {
                let out = self.core.revoke(now, r).map_err(|e| e.to_string());
                if let Ok(Some(name)) = &out {
                    warn!(peer = %name, "key revoked by the mesh CA: peer cut off");
                }
                let _ = reply.send(out);
            }
        }
    }

    /// Peers whose container traffic crosses the underlay in plaintext: every connected peer
    /// without a password, those on the fastpath with one.
    fn unencrypted_peers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.encrypted || c.paths.active() == Some("fastpath"))
            .map(|(_, c)| c.peer.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn saved(&mut self, done: SaveDone) {
        let now = Instant::now();
        match done.file {
            FileId::Ipam => self.ipam.saved(&mut self.core, now, &done),
            FileId::Dns => self.dns.saved(&mut self.core, now, &done),
        }
    }

    /// The connection's working path changed: tell the core whether it has one.
    fn path_changed(&mut self, id: ConnId) {
        let Some(c) = self.conns.get(id) else { return };
        let active = c.paths.active();
        info!(peer = %c.peer, path = active.unwrap_or("none"), "data path changed");
        self.core.handle_sleeve_state(Instant::now(), id, active.is_some());
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if let Some(refs) = self.ipam.tick(&mut self.core, now) {
            self.check_namespaces(refs);
        }
        self.dns.tick(&mut self.core, now);
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.core.set_wall_clock(now, unix);
        let core = &self.core;
        if let Err(e) = self.identities.save_if_changed(|| core.identity_state()) {
            warn!(error = %format!("{e:#}"), "could not save the name bindings; retrying in a second");
        }
        for id in self.conns.ids() {
            let Some(c) = self.conns.get_mut(id) else { continue };
            let (reports, changed) = c.paths.tick();
            for r in reports {
                let _ = c.tx.try_send(r);
            }
            // The sleeve's round trip to the peer (its heartbeats' echoes): routes prefer fast paths.
            if let Some(rtt) = c.link.rtt() {
                self.core.handle_rtt(now, id, rtt);
            }
            // Tell the peer where its sleeve datagrams come from, once they have been heard
            // (so the address is one an authenticated datagram came from) and when it moves.
            let seen = c.link.dest();
            if c.link.heartbeat_age().is_some() && c.told != Some(seen) && c.tx.try_send(ControlMsg::Observed { udp: seen }).is_ok() {
                c.told = Some(seen);
            }
            if changed {
                self.path_changed(id);
            }
        }
        self.forget_gone_lists(now);
        self.refresh_gauges();
    }

    /// Drops the MAC lists of peers that have been out of the topology for [`LIST_GRACE`] (a
    /// list may arrive before its peer's topology entry, so absence alone proves nothing).
    fn forget_gone_lists(&mut self, now: Instant) {
        let known: std::collections::HashSet<weft_proto::PeerName> = self.core.topology().peers().map(|p| p.name).collect();
        let Some(a) = self.core.channel_mut::<Announcements>(announce::CHANNEL) else { return };
        let absent: Vec<weft_proto::PeerName> = a.origins().filter(|p| !known.contains(p)).collect();
        self.list_absent.retain(|p, _| absent.contains(p));
        for p in absent {
            self.list_absent.entry(p).or_insert(now);
        }
        let gone: Vec<weft_proto::PeerName> =
            self.list_absent.iter().filter(|(_, since)| now.duration_since(**since) >= LIST_GRACE).map(|(p, _)| *p).collect();
        if !gone.is_empty() {
            a.retain(|p| !gone.contains(&p));
            for p in gone {
                self.list_absent.remove(&p);
                debug!(peer = %p, "forgot the MAC list of a peer that left");
            }
        }
    }

    /// Checks which namespaces of allocations are gone, on a blocking thread; the answer comes
    /// back as [`Input::NetnsGone`].
    fn check_namespaces(&self, refs: Vec<NetnsRef>) {
        if refs.is_empty() {
            return;
        }
        let inputs = self.inputs.clone();
        tokio::task::spawn_blocking(move || {
            let gone: Vec<NetnsRef> = refs.into_iter().filter(|r| !netns_alive(r)).collect();
            let _ = inputs.blocking_send(Input::NetnsGone(gone));
        });
    }

    fn refresh_gauges(&mut self) {
        let s = &self.stats;
        let mut counts = [[0i64; 2]; 2];
        for (_, c) in self.conns.iter() {
            // Established exactly when a path works (see `Paths::describe`).
            let state = usize::from(c.paths.active().is_none());
            counts[state][usize::from(!c.encrypted)] += 1;
        }
        let mut paths = [0i64; 2];
        for (_, c) in self.conns.iter() {
            match c.paths.active() {
                Some("fastpath") => paths[0] += 1,
                Some(_) => paths[1] += 1,
                None => {}
            }
        }
        for (v, g) in paths.iter().zip(&s.paths) {
            g.store(*v, Relaxed);
        }
        for (row, gauges) in counts.iter().zip(&s.connections) {
            for (v, g) in row.iter().zip(gauges) {
                g.store(*v, Relaxed);
            }
        }
        let st = self.core.stats();
        s.gossip_received.store(st.gossip_received, Relaxed);
        s.gossip_sent.store(st.gossip_sent, Relaxed);
        s.gossip_refused.store(st.gossip_refused, Relaxed);
        for (label, c) in Refused::LABELS.iter().zip(&s.identity_refused) {
            c.store(st.identity_refused.get(label).copied().unwrap_or(0), Relaxed);
        }
        s.gossip_unverified.store(st.unverified, Relaxed);
        s.peers.store(self.core.topology().len() as u64, Relaxed);
        self.ipam.publish(&mut self.core, &s.ipam);
        let c = self.dns.counts(&mut self.core);
        s.dns_entries.live.store(c.live as u64, Relaxed);
        s.dns_entries.own.store(c.own as u64, Relaxed);
        s.dns_entries.tombstones.store(c.tombstones as u64, Relaxed);
        s.dns_entries.save_errors_total.store(self.dns.save_errors(&mut self.core), Relaxed);
        let (forged, unknown_key) = self.dns.unverified_totals(&mut self.core);
        s.dns_entries.forged_total.store(forged, Relaxed);
        s.dns_entries.unknown_key_total.store(unknown_key, Relaxed);
    }

    /// After a round: the services' outputs, the core's transmits and events.
    fn drain(&mut self) {
        loop {
            let now = Instant::now();
            self.ipam.flush(&mut self.core, now, &self.writer);
            self.dns.flush(&mut self.core, now, &self.writer);
            let mut stuck = Vec::new();
            while let Some(t) = self.core.poll_transmit() {
                if let Some(c) = self.conns.get(t.conn) {
                    if c.tx.try_send(t.msg).is_err() {
                        warn!(peer = %c.peer, "control send queue full; closing the connection");
                        stuck.push(t.conn);
                    }
                }
            }
            for id in stuck {
                self.close(id, "send queue full".into());
            }
            let changed = self.core.channel_mut::<Announcements>(announce::CHANNEL).is_some_and(|a| a.take_changed());
            if changed || std::mem::take(&mut self.owners_due) {
                self.publish_owners();
            }
            let Some(ev) = self.core.poll_event() else { break };
            match ev {
                Event::Connect { addr, transport } => {
                    if self.dials.send((addr, transport)).is_err() {
                        self.core.handle_connect_failed(Instant::now(), addr, "the router is stopping".into());
                    }
                }
                Event::Disconnect { conn, reason } => self.close(conn, reason),
                Event::RoutesChanged => {
                    self.owners_due = true;
                    debug!(routes = ?self.core.routes().unicast, "routes changed");
                    self.frames.set_routes(self.core.routes().clone());
                    self.ipam.routes_changed(&mut self.core);
                    self.dns.sync_origins(&mut self.core);
                }
                Event::Unicast { from, channel, .. } => debug!(%from, %channel, "unicast for an unknown channel"),
                Event::IdentitiesChanged => self.identities.changed(),
                Event::Forged { from, reasons } => {
                    let first = reasons.first().map(ToString::to_string).unwrap_or_default();
                    warn!(neighbour = %from, count = reasons.len(), first = %first, "dropped gossip that did not verify");
                }
            }
        }
    }

    fn close(&mut self, id: ConnId, reason: String) {
        if let Some(mut c) = self.conns.remove(id) {
            info!(peer = %c.peer, %reason, "closing connection");
            if let Some(cl) = c.close.take() {
                let _ = cl.send(());
            }
            self.frames.remove_link(c.peer, c.index);
        }
        self.core.handle_connection_down(Instant::now(), id, &reason);
    }
}

/// A peer's explanation, cut to a length a status line can show.
fn bounded(mut why: String) -> String {
    const MAX: usize = 200;
    if why.len() > MAX {
        let mut end = MAX;
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        why.truncate(end);
        why.push('…');
    }
    why
}

/// Forwards SIGINT and SIGTERM to the actor as [`Input::Stop`]. The signal streams are made once,
/// at start, so a signal that arrives while the actor is busy waits for it instead of being lost.
pub fn forward_signals(inputs: mpsc::Sender<Input>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let why = tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
        };
        let _ = inputs.send(Input::Stop(why)).await;
    });
    Ok(())
}
