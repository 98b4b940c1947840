//! The router daemon: a thin shell of sockets, TAP, netlink and timers
//! around the `weft_proto::Router` core and the sleeve data plane.
//!
//! One task (the *actor*) owns the core. Connection tasks, the API and the
//! timers talk to it over a channel; after every input it drains the core's
//! transmits and events and re-arms its single timer.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use weft_proto::router::TargetState;
use weft_proto::sleeve::{Cipher, Opener, Sealer};
use weft_proto::{ConnId, ControlMsg, Event, PeerName, Router, RouterConfig};

use crate::control::{self, HandshakeError, ReadError, RecordReader, RecordWriter, SessionHello};
use crate::dataplane::{Dataplane, DROP_LABELS};
use crate::forwarder::{Health, Paths, SleeveForwarder};
use crate::metrics::{labelled, ControlStats, HANDSHAKE_LABELS, READ_LABELS};
use crate::netdev::NetDev;
use crate::tap::Tap;
use crate::{api, identity};

/// The weft port (TCP control, UDP sleeve).
pub const DEFAULT_PORT: u16 = 6783;
/// Container MTU that fits sleeve encapsulation over a 1500-byte underlay
/// (1500 − 20 IP − 8 UDP − 16 sleeve header − 16 tag − 29 frame record − 14 Ethernet = 1397, rounded down as Weave did).
pub const DEFAULT_MTU: u32 = 1376;
/// Largest UDP payload the sleeve sends (1500-byte underlay, IPv4).
pub const DEFAULT_MAX_DATAGRAM: usize = 1472;
/// TAP MTU: large, so the bridge never drops a frame for size on its way to
/// the router; the sleeve fragments whatever it gets.
const TAP_MTU: u32 = 65_521;
/// Sleeve heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Control-connection keepalive and idle timeout.
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(10);
const CONTROL_IDLE: Duration = Duration::from_secs(35);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `weft router` is told on its command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Network password; `None` runs in plaintext.
    pub password: Option<String>,
    /// State directory (identity).
    pub state_dir: PathBuf,
    /// Local API socket.
    pub api_socket: PathBuf,
    /// Metrics and status HTTP address; `None` disables it.
    pub metrics_addr: Option<SocketAddr>,
    /// Bridge name.
    pub bridge: String,
    /// Container MTU.
    pub mtu: u32,
    /// Address to listen on (TCP and UDP).
    pub listen: SocketAddr,
    /// Nickname; hostname when `None`.
    pub nickname: Option<String>,
    /// Fixed peer name; from the state directory when `None`.
    pub name: Option<PeerName>,
    /// Connect to peers learned from other peers.
    pub discovery: bool,
    /// Peers to connect to.
    pub peers: Vec<String>,
    /// Largest sleeve UDP payload.
    pub max_datagram: usize,
    /// Ask the kernel for TAP segmentation offload.
    pub offload: bool,
    /// Address allocation.
    pub ipam: crate::ipam::IpamOptions,
    /// Container DNS.
    pub dns: crate::dns::DnsOptions,
}

pub(crate) type Call = Box<dyn FnOnce(&mut Actor) + Send>;

pub(crate) enum ActorMsg {
    ConnUp {
        id: ConnId,
        remote: SocketAddr,
        target: Option<SocketAddr>,
        hello: SessionHello,
        ciphers: (Cipher, Cipher),
        our_index: u32,
        tx: mpsc::Sender<ControlMsg>,
        close: oneshot::Sender<()>,
        reply: oneshot::Sender<bool>,
    },
    ConnDown {
        id: ConnId,
        reason: String,
    },
    ConnectFailed {
        addr: SocketAddr,
        error: String,
    },
    Message {
        id: ConnId,
        msg: ControlMsg,
    },
    Call(Call),
}

/// Things every task can reach.
pub(crate) struct Shared {
    pub(crate) opts: Options,
    pub(crate) dp: Arc<Dataplane>,
    pub(crate) ctl: Arc<ControlStats>,
    pub(crate) netdev: NetDev,
    pub(crate) actor: mpsc::Sender<ActorMsg>,
    pub(crate) private_key: [u8; 32],
    pub(crate) psk: Option<[u8; 32]>,
    pub(crate) hello: weft_proto::Hello,
    pub(crate) udp_port: u16,
    pub(crate) ipam_range: weft_ipam::Cidr,
    pub(crate) ipam_default_subnet: weft_ipam::Cidr,
    pub(crate) dns_server: std::sync::Mutex<Option<weft_dns::ServerHandle>>,
    /// Held while giving the host an address on the bridge, so that concurrent
    /// attachments do not each allocate one.
    pub(crate) host_addr_lock: tokio::sync::Mutex<()>,
    /// Wakes the DNS server's address check at once (a new bridge address).
    pub(crate) dns_recheck: tokio::sync::Notify,
    next_conn: AtomicU64,
    pub(crate) shutdown: tokio::sync::Notify,
}

impl Shared {
    fn conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Relaxed))
    }

    /// Sends a closure to run on the actor and waits for its answer.
    pub(crate) async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Actor) -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |a| {
            let _ = tx.send(f(a));
        });
        self.actor.send(ActorMsg::Call(call)).await.map_err(|_| anyhow::anyhow!("router is shutting down"))?;
        rx.await.map_err(|_| anyhow::anyhow!("router is shutting down"))
    }
}

struct ConnHandle {
    tx: mpsc::Sender<ControlMsg>,
    close: Option<oneshot::Sender<()>>,
    peer: PeerName,
    index: u32,
    encrypted: bool,
    paths: Paths,
}

/// The task that owns the core.
pub(crate) struct Actor {
    pub(crate) core: Router,
    conns: HashMap<ConnId, ConnHandle>,
    pub(crate) shared: Arc<Shared>,
    started: Instant,
    pub(crate) ipam_shell: crate::ipam::IpamShell,
    pub(crate) dns_shell: crate::dns::DnsShell,
}

/// Runs the router until SIGTERM/SIGINT or `weft stop`.
pub async fn run(opts: Options) -> Result<()> {
    let id = identity::load_or_create(&opts.state_dir, opts.name)?;
    let uid = identity::fresh_uid();
    // IPAM state next: a corrupt file must stop the start before any device is touched.
    let ipam_cfg = weft_ipam::Config::new(
        id.name,
        opts.ipam.range,
        opts.ipam.default_subnet,
        crate::ipam::parse_init(&opts.ipam.init, opts.peers.len())?,
        rand::random(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let ipam_path = opts.state_dir.join(crate::ipam::STATE_FILE);
    let ipam = crate::ipam::load(ipam_cfg.clone(), &ipam_path, Instant::now())?;
    let nickname = opts.nickname.clone().unwrap_or_else(hostname);
    let psk = opts.password.as_deref().map(identity::derive_psk);
    if psk.is_none() {
        warn!("no password set: control and data traffic between hosts is NOT encrypted (set --password or WEFT_PASSWORD)");
    }

    // The ports first: if another router runs here, say so before touching any device.
    let udp = std::net::UdpSocket::bind(opts.listen)
        .with_context(|| format!("binding UDP {} for the sleeve: is another router running?", opts.listen))?;
    let udp_port = udp.local_addr()?.port();
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding TCP {} for control connections: is another router running?", opts.listen))?;
    let listen_port = listener.local_addr()?.port();

    let netdev = NetDev::new().await.context("opening a netlink socket")?;
    netdev.ensure_bridge(&opts.bridge, opts.mtu).await.with_context(|| format!("creating bridge {}", opts.bridge))?;
    // A bridge without a MAC of its own takes the smallest of its ports', which
    // may be the TAP's: the host's own frames (an exposed address) would then
    // look like the TAP's chatter, which the data path drops. The peer name,
    // made a unicast, locally administered MAC, is stable across restarts.
    netdev.set_mac(&opts.bridge, bridge_mac(id.name)).await?;
    let tap_name = tap_name(&opts.bridge);
    let tap = Tap::open(&tap_name, opts.offload)?;
    netdev.set_mtu(&tap_name, TAP_MTU).await?;
    if let Err(e) = crate::netdev::disable_ipv6(&tap_name) {
        debug!(error = %e, "could not disable IPv6 on the TAP");
    }
    netdev.enslave(&tap_name, &opts.bridge).await?;
    let tap_mac = mac_of(&tap_name).with_context(|| format!("reading the MAC of {tap_name}"))?;
    let dp = Arc::new(Dataplane::new(id.name, tap, tap_mac, udp, opts.max_datagram)?);
    dp.spawn()?;

    let mut cfg = RouterConfig::new(id.name, nickname.clone(), uid, rand::random());
    cfg.discovery = opts.discovery;
    cfg.initial_version = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1);
    let cfg_version = cfg.initial_version;
    let now = Instant::now();
    let mut core = Router::new(cfg, now);
    info!(range = %ipam_cfg.range, default_subnet = %ipam_cfg.default_subnet, init = %opts.ipam.init,
        ready = ipam.ready(), allocations = ipam.allocations().count(), file = %ipam_path.display(), "IPAM loaded");
    core.register_channel(weft_ipam::CHANNEL, Box::new(ipam));
    let dns_path = opts.state_dir.join(crate::dns::STATE_FILE);
    let records = crate::dns::load(id.name, cfg_version, &dns_path)?;
    let zone = records.view();
    core.register_channel(weft_dns::CHANNEL, Box::new(records));

    let (actor_tx, mut actor_rx) = mpsc::channel::<ActorMsg>(4096);
    let ctl = Arc::new(ControlStats::default());
    let shared = Arc::new(Shared {
        hello: weft_proto::Hello { name: id.name, nickname: nickname.clone(), uid, listen_port },
        opts: opts.clone(),
        dp: dp.clone(),
        ctl: ctl.clone(),
        netdev,
        actor: actor_tx,
        private_key: id.private_key,
        psk,
        udp_port,
        ipam_range: ipam_cfg.range,
        ipam_default_subnet: ipam_cfg.default_subnet,
        dns_server: std::sync::Mutex::new(None),
        host_addr_lock: tokio::sync::Mutex::new(()),
        dns_recheck: tokio::sync::Notify::new(),
        next_conn: AtomicU64::new(1),
        shutdown: tokio::sync::Notify::new(),
    });
    for p in &opts.peers {
        match resolve(p).await {
            Ok(a) => core.add_target(now, a),
            Err(e) => warn!(peer = %p, error = %format!("{e:#}"), "cannot resolve peer; ignoring it"),
        }
    }

    let api_task = api::serve_api(shared.clone()).await?;
    if let Some(addr) = opts.metrics_addr {
        match api::serve_metrics(shared.clone(), addr).await {
            Ok(()) => {}
            Err(e) => warn!(%addr, error = %format!("{e:#}"), "metrics endpoint disabled"),
        }
    }
    tokio::spawn(accept_loop(shared.clone(), listener));
    if opts.dns.enabled {
        tokio::spawn(crate::dns::keep_serving(shared.clone(), zone));
    }

    info!(
        name = %id.name, %nickname, uid, encryption = psk.is_some(), bridge = %opts.bridge, tap = %tap_name,
        offload = dp.offload(), gso_segments = dp.gso_segments(), port = listen_port, "router started"
    );
    let ipam_shell = crate::ipam::IpamShell::new(ipam_path, opts.ipam.gc_grace, now);
    let dns_shell = crate::dns::DnsShell::new(dns_path, now);
    let mut actor = Actor { core, conns: HashMap::new(), shared: shared.clone(), started: now, ipam_shell, dns_shell };
    actor.drain();
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let deadline = tokio::time::Instant::from_std(actor.core.poll_timeout());
        tokio::select! {
            m = actor_rx.recv() => match m {
                Some(m) => {
                    actor.handle(m);
                    // Take what else is queued before draining, so that one save of
                    // the IPAM state covers a batch of requests.
                    for _ in 0..256 {
                        match actor_rx.try_recv() {
                            Ok(m) => actor.handle(m),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => actor.core.handle_timeout(Instant::now()),
            _ = tick.tick() => actor.tick(),
            _ = tokio::signal::ctrl_c() => { info!("interrupted; stopping"); break; }
            _ = sigterm.recv() => { info!("terminated; stopping"); break; }
            _ = shared.shutdown.notified() => { info!("stop requested; stopping"); break; }
        }
        actor.drain();
    }
    dp.stop();
    api_task.abort();
    if let Ok(mut g) = shared.dns_server.lock() {
        *g = None;
    }
    let _ = std::fs::remove_file(&opts.api_socket);
    Ok(())
}

impl Actor {
    fn handle(&mut self, m: ActorMsg) {
        let now = Instant::now();
        match m {
            ActorMsg::ConnUp { id, remote, target, hello, ciphers, our_index, tx, close, reply } => {
                let peer = hello.hello.name;
                let nick = hello.hello.nickname.clone();
                match self.core.handle_connection_up(now, id, remote, target, hello.hello) {
                    Ok(()) => {
                        let encrypted = matches!(ciphers.0, Cipher::Aes256Gcm(_));
                        let udp = SocketAddr::new(remote.ip(), hello.udp_port);
                        self.shared.dp.add_link(
                            peer,
                            udp,
                            our_index,
                            Sealer::new(ciphers.0, hello.sleeve_index),
                            Opener::new(ciphers.1),
                        );
                        info!(%peer, nickname = %nick, %remote, outbound = target.is_some(), encrypted, "connection up");
                        self.conns.insert(id, ConnHandle {
                            tx,
                            close: Some(close),
                            peer,
                            index: our_index,
                            encrypted,
                            paths: Paths::new(vec![Box::new(SleeveForwarder::new(
                                self.shared.dp.clone(),
                                peer,
                                our_index,
                                self.shared.udp_port,
                            ))]),
                        });
                        let _ = reply.send(true);
                    }
                    Err(e) => {
                        info!(%peer, %remote, reason = %e, "connection refused");
                        let _ = reply.send(false);
                    }
                }
            }
            ActorMsg::ConnDown { id, reason } => {
                if let Some(c) = self.conns.remove(&id) {
                    info!(peer = %c.peer, %reason, "connection down");
                    self.shared.dp.remove_link(c.peer, c.index);
                    self.core.handle_connection_down(now, id, &reason);
                }
            }
            ActorMsg::ConnectFailed { addr, error } => {
                debug!(%addr, %error, "dial failed");
                self.core.handle_connect_failed(now, addr, error);
            }
            ActorMsg::Message { id, msg } => {
                if let ControlMsg::SleeveState { .. } = msg {
                    if let Some(c) = self.conns.get_mut(&id) {
                        if c.paths.handle_report(&msg) {
                            self.path_changed(id);
                        }
                    }
                    return;
                }
                if let Err(e) = self.core.handle_message(now, id, msg) {
                    let peer = self.conns.get(&id).map(|c| c.peer.to_string()).unwrap_or_default();
                    warn!(%peer, error = %e, "refused gossip from peer");
                }
            }
            ActorMsg::Call(f) => f(self),
        }
    }

    /// The connection's working path changed: tell the core whether it has one.
    fn path_changed(&mut self, id: ConnId) {
        let Some(c) = self.conns.get(&id) else { return };
        let active = c.paths.active();
        info!(peer = %c.peer, path = active.unwrap_or("none"), "data path changed");
        self.core.handle_sleeve_state(Instant::now(), id, active.is_some());
    }

    fn tick(&mut self) {
        self.shared.dp.send_heartbeats();
        self.ipam_tick();
        self.dns_tick();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            let (reports, changed) = c.paths.tick();
            for r in reports {
                let _ = c.tx.try_send(r);
            }
            if changed {
                self.path_changed(id);
            }
        }
        let mut gauges: BTreeMap<(String, bool), i64> = BTreeMap::new();
        for (id, c) in &self.conns {
            *gauges.entry((self.conn_state(*id).0.to_string(), c.encrypted)).or_default() += 1;
        }
        if let Ok(mut g) = self.shared.ctl.connections.lock() {
            *g = gauges;
        }
        let st = self.core.stats();
        self.shared.ctl.gossip_received.store(st.gossip_received, Relaxed);
        self.shared.ctl.gossip_sent.store(st.gossip_sent, Relaxed);
        self.shared.ctl.gossip_refused.store(st.gossip_refused, Relaxed);
        self.shared.ctl.peers.store(self.core.topology().len() as u64, Relaxed);
    }

    /// Drains the core's transmits and events.
    pub(crate) fn drain(&mut self) {
        loop {
            // IPAM first: its state is saved before any of its messages leave.
            self.flush_ipam();
            self.flush_dns();
            while let Some(t) = self.core.poll_transmit() {
                if let Some(c) = self.conns.get(&t.conn) {
                    if c.tx.try_send(t.msg).is_err() {
                        warn!(peer = %c.peer, "control send queue full; closing the connection");
                        self.close(t.conn, "send queue full".into());
                    }
                }
            }
            let Some(ev) = self.core.poll_event() else { break };
            match ev {
                Event::Connect { addr } => {
                    tokio::spawn(dial(self.shared.clone(), addr));
                }
                Event::Disconnect { conn, reason } => self.close(conn, reason),
                Event::RoutesChanged => {
                    debug!(routes = ?self.core.routes().unicast, "routes changed");
                    self.shared.dp.set_routes(self.core.routes().clone());
                    self.ipam_routes_changed();
                    self.dns_sync_origins();
                }
                Event::Unicast { from, channel, .. } => debug!(%from, %channel, "unicast for an unknown channel"),
            }
        }
    }

    fn close(&mut self, id: ConnId, reason: String) {
        if let Some(mut c) = self.conns.remove(&id) {
            info!(peer = %c.peer, %reason, "closing connection");
            if let Some(cl) = c.close.take() {
                let _ = cl.send(());
            }
            self.shared.dp.remove_link(c.peer, c.index);
        }
        self.core.handle_connection_down(Instant::now(), id, &reason);
    }

    fn conn_state(&self, id: ConnId) -> (&'static str, String) {
        match self.conns.get(&id) {
            Some(c) => c.paths.describe(),
            None => ("failed", String::new()),
        }
    }

    /// The status document behind `weft status` and `weft report`.
    pub(crate) fn status(&self) -> Value {
        let now = Instant::now();
        let enc = self.shared.psk.is_some();
        let conns: Vec<Value> = self
            .core
            .connections()
            .iter()
            .map(|(id, c)| {
                let (state, info) = self.conn_state(*id);
                let h = self.conns.get(id);
                let encrypted = h.is_some_and(|h| h.encrypted);
                let path = h.and_then(|h| h.paths.active()).unwrap_or("none");
                let paths: Vec<Value> = h.map(|h| h.paths.report()).unwrap_or_default().into_iter().map(|(k, hl)| match hl {
                    Health::Up => json!({"kind": k, "up": true}),
                    Health::Down(r) => json!({"kind": k, "up": false, "reason": r}),
                }).collect();
                json!({
                    "peer_name": c.peer.to_string(), "peer_nickname": c.nickname, "address": c.remote.to_string(),
                    "outbound": c.outbound, "state": state, "encrypted": encrypted, "path": path, "paths": paths, "info": info,
                    "up_seconds": now.duration_since(c.since).as_secs(),
                })
            })
            .collect();
        let peers: Vec<Value> = self
            .core
            .topology()
            .peers()
            .map(|p| {
                let cs: Vec<Value> = p
                    .connections
                    .iter()
                    .map(|(n, ci)| json!({"peer": n.to_string(), "established": ci.established, "outbound": ci.outbound,
                        "address": ci.addr.map(|a| a.to_string())}))
                    .collect();
                json!({"name": p.name.to_string(), "nickname": p.nickname, "uid": p.uid, "version": p.version,
                    "reachable": p.name == self.core.name() || self.core.routes().next_hop(p.name).is_some(),
                    "connections": cs})
            })
            .collect();
        let targets: Vec<Value> = self
            .core
            .targets()
            .values()
            .map(|t| {
                let (state, retry) = match &t.state {
                    TargetState::Waiting(at) => ("retrying", Some(at.saturating_duration_since(now).as_secs_f64())),
                    TargetState::Connecting => ("connecting", None),
                    TargetState::Connected(_) => ("connected", None),
                    TargetState::Idle => ("idle", None),
                };
                json!({"address": t.addr.to_string(), "configured": t.configured, "peer": t.peer.map(|p| p.to_string()),
                    "state": state, "retry_in_seconds": retry, "attempts": t.attempts, "last_error": t.last_error})
            })
            .collect();
        let r = self.core.routes();
        let s = &self.shared.dp.stats;
        let as_map = |rows: Vec<(&str, u64)>| rows.into_iter().map(|(l, v)| (l.to_string(), json!(v))).collect::<serde_json::Map<_, _>>();
        let ctl = &self.shared.ctl;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "name": self.core.name().to_string(),
            "nickname": self.core.config().nickname,
            "uid": self.core.config().uid,
            "uptime_seconds": now.duration_since(self.started).as_secs(),
            "encryption": if enc { "enabled" } else { "disabled" },
            "warning": if enc { Value::Null } else { json!("NO PASSWORD SET: traffic between hosts is NOT encrypted") },
            "discovery": self.core.config().discovery,
            "bridge": self.shared.opts.bridge, "mtu": self.shared.opts.mtu,
            "sleeve": {"port": self.shared.udp_port, "offload": self.shared.dp.offload(),
                "gso_segments": self.shared.dp.gso_segments(), "max_datagram": self.shared.opts.max_datagram},
            "connections": conns,
            "peers": peers,
            "targets": targets,
            "routes": {
                "unicast": r.unicast.iter().map(|(d, h)| (d.to_string(), json!(h.to_string()))).collect::<serde_json::Map<_, _>>(),
                "broadcast": r.broadcast.iter().map(|(s, hs)| (s.to_string(), json!(hs.iter().map(|h| h.to_string()).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
            },
            "stats": {
                "frames_out": s.frames_out.load(Relaxed), "frames_in": s.frames_in.load(Relaxed),
                "frames_relayed": s.frames_relayed.load(Relaxed), "bytes_out": s.bytes_out.load(Relaxed),
                "bytes_in": s.bytes_in.load(Relaxed), "datagrams_out": s.datagrams_out.load(Relaxed),
                "datagrams_in": s.datagrams_in.load(Relaxed), "drops": as_map(labelled(&DROP_LABELS, &s.drops)),
                "gossip_refused": self.core.stats().gossip_refused,
                "handshake_failures": as_map(labelled(&HANDSHAKE_LABELS, &ctl.handshake_failures)),
                "control_read_errors": as_map(labelled(&READ_LABELS, &ctl.read_errors)),
            },
        })
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, remote)) => {
                let sh = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(sh.clone(), s, remote, None).await {
                        debug!(%remote, error = %e, "inbound connection ended");
                    }
                });
            }
            Err(e) => {
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn dial(shared: Arc<Shared>, addr: SocketAddr) {
    let s = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(&shared, addr, format!("connect: {e}")).await,
        Err(_) => return fail(&shared, addr, "connect: timed out".into()).await,
    };
    if let Err(e) = connection(shared.clone(), s, addr, Some(addr)).await {
        fail(&shared, addr, e).await;
    }
}

async fn fail(shared: &Shared, addr: SocketAddr, error: String) {
    let _ = shared.actor.send(ActorMsg::ConnectFailed { addr, error }).await;
}

/// One control connection from handshake to close. `Err` only for failures
/// before the connection was handed to the actor.
async fn connection(shared: Arc<Shared>, mut s: TcpStream, remote: SocketAddr, target: Option<SocketAddr>) -> Result<(), String> {
    let _ = s.set_nodelay(true);
    let outbound = target.is_some();
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        control::handshake(&mut s, outbound, shared.psk.as_ref(), &shared.private_key),
    )
    .await;
    let secured = match hs {
        Ok(Ok(sec)) => sec,
        Ok(Err(e)) => {
            shared.ctl.handshake_failed(e.label());
            match &e {
                HandshakeError::WrongPassword | HandshakeError::EncryptionMismatch(_) | HandshakeError::Version { .. } => {
                    warn!(%remote, error = %e, "refused a peer")
                }
                _ => debug!(%remote, error = %e, "handshake failed"),
            }
            return Err(e.to_string());
        }
        Err(_) => {
            shared.ctl.handshake_failed("timeout");
            return Err("handshake timed out".into());
        }
    };
    let (rd, wr) = s.into_split();
    let mut reader = RecordReader::new(rd, secured.transport.clone());
    let mut writer = RecordWriter::new(wr, secured.transport.clone());
    let our_index = shared.dp.alloc_index();
    let hello = SessionHello { hello: shared.hello.clone(), udp_port: shared.udp_port, sleeve_index: our_index };
    writer.send(&hello).await.map_err(|e| format!("sending hello: {e:#}"))?;
    let theirs: SessionHello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv()).await {
        Ok(Ok(h)) => h,
        Ok(Err(ReadError::Refused)) => {
            shared.ctl.handshake_failed("wrong_password");
            warn!(%remote, error = %ReadError::Refused, "refused by a peer");
            return Err(ReadError::Refused.to_string());
        }
        Ok(Err(e)) => {
            shared.ctl.read_failed(e.label());
            return Err(format!("reading hello: {e}"));
        }
        Err(_) => return Err("hello timed out".into()),
    };
    if theirs.hello.nickname.len() > weft_proto::topology::MAX_NICKNAME {
        return Err("peer nickname too long".into());
    }
    let (tx, mut rx) = mpsc::channel::<ControlMsg>(1024);
    let (close_tx, mut close_rx) = oneshot::channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    let id = shared.conn_id();
    let peer = theirs.hello.name;
    shared
        .actor
        .send(ActorMsg::ConnUp {
            id,
            remote,
            target,
            hello: theirs,
            ciphers: (secured.sleeve_send, secured.sleeve_recv),
            our_index,
            tx,
            close: close_tx,
            reply: reply_tx,
        })
        .await
        .map_err(|_| "router stopping".to_string())?;
    if !reply_rx.await.unwrap_or(false) {
        writer.shutdown().await;
        return Ok(());
    }
    let writer_task = tokio::spawn(async move {
        loop {
            let msg = match tokio::time::timeout(CONTROL_KEEPALIVE, rx.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => ControlMsg::Heartbeat,
            };
            if writer.send(&msg).await.is_err() {
                break;
            }
        }
        writer.shutdown().await;
    });
    let reason = loop {
        tokio::select! {
            r = tokio::time::timeout(CONTROL_IDLE, reader.recv::<ControlMsg>()) => match r {
                Ok(Ok(msg)) => {
                    if shared.actor.send(ActorMsg::Message { id, msg }).await.is_err() {
                        break "router stopping".to_string();
                    }
                }
                Ok(Err(e)) => {
                    if !matches!(e, ReadError::Closed) {
                        shared.ctl.read_failed(e.label());
                        warn!(%peer, %remote, error = %e, "bad input on control connection; closing it");
                    }
                    break e.to_string();
                }
                Err(_) => break format!("no control traffic for {CONTROL_IDLE:?}"),
            },
            _ = &mut close_rx => break "closed by us".to_string(),
        }
    };
    writer_task.abort();
    let _ = shared.actor.send(ActorMsg::ConnDown { id, reason }).await;
    Ok(())
}

/// Parses `host`, `host:port`, `ip` or `ip:port` into an address (default port 6783).
pub async fn resolve(peer: &str) -> Result<SocketAddr> {
    if let Ok(a) = peer.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = peer.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if peer.contains(':') { peer.to_string() } else { format!("{peer}:{DEFAULT_PORT}") };
    let mut addrs = tokio::net::lookup_host(&with_port).await.with_context(|| format!("resolving {peer}"))?;
    addrs.next().with_context(|| format!("{peer} resolved to no address"))
}

fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most len bytes into b.
    let r = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    if r != 0 {
        return "weft".into();
    }
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let mut s = String::from_utf8_lossy(&b[..end]).into_owned();
    s.truncate(weft_proto::topology::MAX_NICKNAME);
    s
}

/// The bridge's MAC: the peer name as a unicast, locally administered address.
pub fn bridge_mac(name: PeerName) -> [u8; 6] {
    let mut m = name.to_bytes();
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

/// The router's TAP name for a bridge ("weft" → "weft-tap").
pub fn tap_name(bridge: &str) -> String {
    let base: String = bridge.chars().take(10).collect();
    format!("{base}-tap")
}

/// Reads an interface's MAC with SIOCGIFHWADDR (sysfs shows the namespace
/// that mounted it, not ours, when started with `nsenter --net`).
fn mac_of(ifname: &str) -> Result<[u8; 6]> {
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("socket for ioctl")?;
    #[repr(C)]
    struct IfReqHw {
        name: [libc::c_char; libc::IFNAMSIZ],
        family: libc::sa_family_t,
        data: [u8; 14],
        _pad: [u8; 8],
    }
    let mut req = IfReqHw { name: [0; libc::IFNAMSIZ], family: 0, data: [0; 14], _pad: [0; 8] };
    for (i, b) in ifname.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        req.name[i] = b as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFHWADDR fills an ifreq whose union starts with a sockaddr (family + 14 bytes).
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(&req.data[..6]);
    Ok(m)
}
