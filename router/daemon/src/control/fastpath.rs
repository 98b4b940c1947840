//! The kernel fastpath as the router runs it: the VXLAN device (or why there is none), the
//! policy that says towards which peers it may be used, the heartbeats that probe it, the
//! [`FastpathForwarder`] each connection puts in front of its sleeve, and the task that programs
//! the kernel's forwarding entries.
//!
//! Frames never pass through here: the kernel carries them. The router decides, per connection,
//! whether a peer's MACs get entries on the VXLAN device (`activate`) or not (`deactivate`, and
//! the bridge sends them to the TAP, that is the sleeve). Which MACs belong to which peer comes
//! from the frame path: the UDP thread reports what it learns from sleeve frames (broadcasts,
//! ARP, and unicast before a peer's entries exist), the TAP thread reports MACs that moved here.
//!
//! Heartbeats (`weft_proto::fastpath`) are sent into the VXLAN device through a packet socket,
//! addressed to the peer's bridge MAC, and read from the bridge device through another, so they
//! take the container frames' path through both kernels. One thread sends and receives them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use weft_proto::fastpath::{self as proto, Heartbeat, HeartbeatError, HeartbeatKey, Offer, Probe, Subnet};
use weft_proto::switch::Mac;
use weft_proto::{ControlMsg, PeerName};

use crate::frame::forwarder::{Forwarder, Health};
use crate::frame::links::lock;
use crate::host::links::bridge_mac;
use crate::host::nft;
use crate::host::vxlan::{vxlan_name, Counters};
use crate::host::NetDev;

/// MACs of one peer with entries at most (the switch's limit per owner).
const MAX_PER_PEER: usize = 8192;
/// MACs whose owner we track at most (the switch's total).
const MAX_OWNERS: usize = 262_144;
/// MAC reports from the frame path waiting for the programming task at most; more are dropped
/// and counted (the frame path repeats them with the MAC's later frames).
const LEARN_QUEUE: usize = 16_384;
/// An entry the kernel has not used for this long is removed (the switch's MAC ttl).
const IDLE: Duration = Duration::from_secs(600);
/// How often idle entries are looked for, and the device's counters read.
const SWEEP: Duration = Duration::from_secs(60);

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--no-fastpath` turns it off.
    pub enabled: bool,
    /// `--fastpath-port`.
    pub port: u16,
    /// `--trusted-subnets`: with a password, the fastpath is used only towards these.
    pub trusted: Vec<Subnet>,
    /// Whether a password is set.
    pub encrypted: bool,
}

/// Counters, read by the metrics endpoint and the status.
#[derive(Debug, Default)]
pub struct FastpathStats {
    /// Connections that fell back from the fastpath to the sleeve.
    pub fallbacks: AtomicU64,
    /// Connections that went (back) onto the fastpath.
    pub activations: AtomicU64,
    /// Heartbeats sent.
    pub heartbeats_sent: AtomicU64,
    /// Heartbeats accepted.
    pub heartbeats_received: AtomicU64,
    /// Heartbeats refused, by [`HeartbeatError::LABELS`].
    pub heartbeats_refused: [AtomicU64; 5],
    /// Forwarding entries installed now (one per remote MAC on the fastpath).
    pub entries: AtomicU64,
    /// MAC reports from the frame path lost because the queue was full or the table at its bound.
    pub learn_lost: AtomicU64,
    /// Netlink operations that failed.
    pub program_errors: AtomicU64,
    /// Datagrams to the fastpath port dropped by the source filter (not from a peer).
    pub filtered: AtomicU64,
    /// Datagrams from peers dropped because their frame's source MAC is not one the peer
    /// announced, by peer address (as last read from the filter).
    pub unannounced: Mutex<BTreeMap<String, u64>>,
    /// The VXLAN device's counters, as last read.
    pub tx_packets: AtomicU64,
    /// See `tx_packets`.
    pub tx_bytes: AtomicU64,
    /// See `tx_packets`.
    pub rx_packets: AtomicU64,
    /// See `tx_packets`.
    pub rx_bytes: AtomicU64,
    /// See `tx_packets`.
    pub tx_dropped: AtomicU64,
}

impl FastpathStats {
    fn store(&self, c: Counters) {
        self.tx_packets.store(c.tx_packets, Relaxed);
        self.tx_bytes.store(c.tx_bytes, Relaxed);
        self.rx_packets.store(c.rx_packets, Relaxed);
        self.rx_bytes.store(c.rx_bytes, Relaxed);
        self.tx_dropped.store(c.tx_dropped, Relaxed);
    }
}

/// The VXLAN device weft made.
#[derive(Clone)]
struct Device {
    name: String,
    index: u32,
    /// Its source filter, or why there is none.
    filter: std::result::Result<Arc<SourceFilter>, String>,
}

/// One connection's heartbeat state, shared by its forwarder and the heartbeat thread.
struct Beat {
    generation: u64,
    key: HeartbeatKey,
    probe: Probe,
    next_seq: u64,
}

/// What the programming task is asked to do.
enum Cmd {
    /// A connection with a fastpath to `peer` at `ip:port` started probing.
    Open { peer: PeerName, generation: u64, ip: IpAddr, port: u16 },
    /// Its probes work both ways: give the peer's MACs entries.
    Activate { peer: PeerName, generation: u64 },
    /// They stopped working: remove them.
    Deactivate { peer: PeerName, generation: u64 },
    /// The connection is gone.
    Close { peer: PeerName, generation: u64 },
    /// The MACs each peer announced on each network (its bridge MAC included): the source
    /// filter lets a peer's datagrams in only with those inner source MACs, on that VNI.
    Announced(Arc<HashMap<(u32, Mac), PeerName>>),
    /// Named network `segment` got a VXLAN device (`Some(index)`) or lost it.
    Network { segment: u32, vx: Option<u32> },
}

/// The VXLAN VNI of a network: the default network's is [`proto::VNI`], a named one's its
/// segment.
pub fn vni_of(segment: u32) -> u32 {
    if segment == 0 { proto::VNI } else { segment }
}

/// See the module docs. Made once at start; [`Fastpath::stop`] removes the device.
pub struct Fastpath {
    settings: Settings,
    device: std::result::Result<Device, String>,
    netdev: Arc<NetDev>,
    cmds: mpsc::UnboundedSender<Cmd>,
    learned: mpsc::Sender<(u32, Mac, PeerName)>,
    beats: Arc<Mutex<HashMap<PeerName, Arc<Mutex<Beat>>>>>,
    generations: AtomicU64,
    stop: Arc<AtomicBool>,
    /// Named networks' VXLAN devices, by segment: removed with the default one at stop, so
    /// nothing accepts VXLAN once the router (and its source filter) is gone.
    named: Mutex<BTreeMap<u32, String>>,
    /// Counters.
    pub stats: Arc<FastpathStats>,
}

impl Fastpath {
    /// Makes the VXLAN device on `bridge` (beside the TAP `tap`) and starts the programming task
    /// and the heartbeat thread. When the device cannot be made, the fastpath is off and says
    /// why; the router runs on the sleeve. Call on the runtime.
    pub async fn start(
        me: PeerName,
        settings: Settings,
        netdev: Arc<NetDev>,
        bridge: &str,
        tap: &str,
        stats: Arc<FastpathStats>,
    ) -> Arc<Fastpath> {
        // Commands come one per connection event; MAC reports can come in bursts, so they queue
        // apart, bounded.
        let (cmds, rx) = mpsc::unbounded_channel();
        let (learned, learned_rx) = mpsc::channel(LEARN_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let beats = Arc::new(Mutex::new(HashMap::new()));
        let device = if !settings.enabled {
            Err("turned off here (--no-fastpath)".to_string())
        } else if settings.encrypted && settings.trusted.is_empty() {
            // No peer could use it: no device, so nothing listens on the port.
            Err("encrypted mesh and no --trusted-subnets given".to_string())
        } else {
            make(me, &settings, &netdev, bridge, tap, beats.clone(), stats.clone(), stop.clone()).await
        };
        match &device {
            Ok(d) => info!(device = %d.name, port = settings.port, encrypted = settings.encrypted,
                trusted = %settings.trusted.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), "fastpath ready"),
            Err(why) if settings.enabled && !settings.encrypted || !settings.trusted.is_empty() => {
                warn!(reason = %why, "no fastpath: frames between hosts go through the sleeve")
            }
            Err(why) => info!(reason = %why, "no fastpath: frames between hosts go through the sleeve"),
        }
        if settings.encrypted && device.is_ok() && !settings.trusted.is_empty() {
            warn!(subnets = %settings.trusted.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                "container traffic to peers in these trusted subnets crosses the underlay UNENCRYPTED (fastpath); other peers get the encrypted sleeve");
        }
        if let Ok(d) = &device {
            let p = Programmer {
                netdev: netdev.clone(),
                devices: HashMap::from([(0, d.index)]),
                name: d.name.clone(),
                peers: HashMap::new(),
                owners: HashMap::new(),
                stats: stats.clone(),
                filter: d.filter.as_ref().ok().cloned(),
                announced: Arc::new(HashMap::new()),
                allowed: BTreeSet::new(),
            };
            tokio::spawn(p.run(rx, learned_rx));
        }
        Arc::new(Fastpath { settings, device, netdev, cmds, learned, beats, generations: AtomicU64::new(1), stop, named: Mutex::new(BTreeMap::new()), stats })
    }

    /// What we say to a new connection's peer at `peer_ip` about the fastpath towards it.
    pub fn offer(&self, peer_ip: IpAddr) -> Offer {
        if let Err(why) = proto::allowed(self.settings.encrypted, &self.settings.trusted, peer_ip) {
            return Offer::No(why);
        }
        if let Err(why) = &self.device {
            return Offer::No(why.clone());
        }
        if !peer_ip.to_canonical().is_ipv4() {
            return Offer::No("the fastpath is IPv4-only in this version".into());
        }
        Offer::Yes { port: self.settings.port }
    }

    /// The forwarder for a new connection to `peer` at `ip`, when both ends offered a fastpath;
    /// otherwise why not (for the status). `binding` is the connection's channel binding.
    pub fn forwarder(
        self: &Arc<Self>,
        peer: PeerName,
        ip: IpAddr,
        ours: &Offer,
        theirs: &Offer,
        binding: &[u8; 32],
    ) -> std::result::Result<FastpathForwarder, String> {
        let port = match (ours, theirs) {
            (Offer::No(why), _) => return Err(why.clone()),
            (_, Offer::No(why)) => return Err(format!("the peer does not use the fastpath towards us: {why}")),
            (Offer::Yes { .. }, Offer::Yes { port }) => *port,
        };
        let generation = self.generations.fetch_add(1, Relaxed);
        let now = Instant::now();
        let beat = Arc::new(Mutex::new(Beat { generation, key: HeartbeatKey::from_binding(binding), probe: Probe::new(now, port), next_seq: 1 }));
        lock(&self.beats).insert(peer, beat.clone());
        let _ = self.cmds.send(Cmd::Open { peer, generation, ip, port });
        Ok(FastpathForwarder { fp: self.clone(), peer, generation, beat, ever_active: false })
    }

    /// A hook for the frame path: `(segment, mac, owner)` for each MAC it learns or sees move
    /// here.
    pub fn learn_hook(self: &Arc<Self>) -> Box<dyn Fn(u32, Mac, PeerName) + Send + Sync> {
        let learned = self.learned.clone();
        let stats = self.stats.clone();
        let on = self.device.is_ok();
        Box::new(move |segment, mac, owner| {
            if on && learned.try_send((segment, mac, owner)).is_err() {
                stats.learn_lost.fetch_add(1, Relaxed);
            }
        })
    }

    /// Gives named network `segment` (on `bridge`, beside its TAP `tap`) its own VXLAN device,
    /// VNI = the segment, on the fastpath's port. Without a fastpath, or when the device cannot
    /// be made, the network's frames take the sleeve (logged).
    pub async fn add_network(&self, segment: u32, bridge: &str, tap: &str) {
        if self.device.is_err() || segment == 0 {
            return;
        }
        if segment == proto::VNI {
            warn!(segment = %format!("{segment:06x}"), "this network's segment is the default network's VNI: it takes the sleeve");
            return;
        }
        let name = vxlan_name(bridge);
        match self.netdev.make_vxlan(&name, segment, self.settings.port, bridge, tap).await {
            Ok(index) => {
                lock(&self.named).insert(segment, name);
                self.send(Cmd::Network { segment, vx: Some(index) });
            }
            Err(e) => warn!(device = %name, error = %format!("{e:#}"), "no fastpath for this network: its frames take the sleeve"),
        }
    }

    /// Takes named network `segment`'s VXLAN device away (its entries go with it).
    pub async fn remove_network(&self, segment: u32, bridge: &str) {
        if self.device.is_err() || segment == 0 {
            return;
        }
        self.send(Cmd::Network { segment, vx: None });
        lock(&self.named).remove(&segment);
        let _ = self.netdev.delete_link(&vxlan_name(bridge)).await;
    }

    /// The MACs each peer announced on each network, for the source filter.
    pub fn set_announced(&self, owners: Arc<HashMap<(u32, Mac), PeerName>>) {
        if self.device.is_ok() {
            self.send(Cmd::Announced(owners));
        }
    }

    /// The status block.
    pub fn status(&self, unencrypted_peers: Vec<String>) -> Value {
        let s = &self.stats;
        let refused: serde_json::Map<String, Value> = HeartbeatError::LABELS
            .iter()
            .zip(&s.heartbeats_refused)
            .map(|(l, c)| (l.to_string(), json!(c.load(Relaxed))))
            .collect();
        json!({
            "enabled": self.device.is_ok(),
            "device": self.device.as_ref().ok().map(|d| d.name.clone()),
            "why_not": self.device.as_ref().err(),
            "port": self.settings.port,
            "vni": proto::VNI,
            "trusted_subnets": self.settings.trusted.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "unencrypted_peers": unencrypted_peers,
            "entries": s.entries.load(Relaxed),
            "fallbacks": s.fallbacks.load(Relaxed),
            "activations": s.activations.load(Relaxed),
            "heartbeats": {"sent": s.heartbeats_sent.load(Relaxed), "received": s.heartbeats_received.load(Relaxed), "refused": refused},
            "device_counters": {"tx_packets": s.tx_packets.load(Relaxed), "tx_bytes": s.tx_bytes.load(Relaxed),
                "rx_packets": s.rx_packets.load(Relaxed), "rx_bytes": s.rx_bytes.load(Relaxed), "tx_dropped": s.tx_dropped.load(Relaxed)},
            "learn_lost": s.learn_lost.load(Relaxed),
            "source_filter": match &self.device {
                Ok(d) => json!({"on": d.filter.is_ok(), "why_not": d.filter.as_ref().err(), "dropped": s.filtered.load(Relaxed),
                    "unannounced_by_peer": *lock(&s.unannounced)}),
                Err(_) => Value::Null,
            },
            "program_errors": s.program_errors.load(Relaxed),
        })
    }

    /// Stops the heartbeat thread and removes the devices, the named networks' too (`weft stop`, SIGTERM).
    pub async fn stop(&self) {
        self.stop.store(true, Relaxed);
        let named: Vec<String> = std::mem::take(&mut *lock(&self.named)).into_values().collect();
        for name in named {
            let _ = self.netdev.delete_link(&name).await;
        }
        if let Ok(d) = &self.device {
            if let Ok(f) = &d.filter {
                f.remove().await;
            }
            match self.netdev.delete_link(&d.name).await {
                Ok(_) => debug!(device = %d.name, "fastpath device removed"),
                Err(e) => warn!(device = %d.name, error = %format!("{e:#}"), "could not remove the fastpath device"),
            }
        }
    }

    fn send(&self, c: Cmd) {
        let _ = self.cmds.send(c);
    }
}

/// Makes the device and starts the heartbeat thread.
#[allow(clippy::too_many_arguments)]
async fn make(
    me: PeerName,
    settings: &Settings,
    netdev: &NetDev,
    bridge: &str,
    tap: &str,
    beats: Arc<Mutex<HashMap<PeerName, Arc<Mutex<Beat>>>>>,
    stats: Arc<FastpathStats>,
    stop: Arc<AtomicBool>,
) -> std::result::Result<Device, String> {
    let name = vxlan_name(bridge);
    let index = netdev
        .make_vxlan(&name, proto::VNI, settings.port, bridge, tap)
        .await
        .map_err(|e| format!("this kernel cannot make a VXLAN device: {e:#}"))?;
    let bridge_index = match netdev.link_index(bridge).await {
        Ok(Some(i)) => i,
        _ => return Err(format!("bridge {bridge} vanished")),
    };
    let sockets = HeartbeatSockets::open(index, bridge_index).map_err(|e| format!("heartbeat sockets: {e:#}"));
    let sockets = match sockets {
        Ok(s) => s,
        Err(e) => {
            let _ = netdev.delete_link(&name).await;
            return Err(e);
        }
    };
    let my_mac = bridge_mac(me);
    let spawned = std::thread::Builder::new()
        .name("weft-fastpath".into())
        .spawn(move || heartbeats(me, my_mac, sockets, beats, stats, stop));
    if let Err(e) = spawned {
        let _ = netdev.delete_link(&name).await;
        return Err(format!("starting the heartbeat thread: {e}"));
    }
    let filter = SourceFilter::make(bridge, settings.port).await.map(Arc::new);
    if let Err(why) = &filter {
        warn!(reason = %why, "fastpath: filter UDP {} to your peers' addresses yourself", settings.port);
    }
    Ok(Device { name, index, filter })
}

/// A connection's fastpath: healthy when its heartbeats get through both ways. See the module docs.
pub struct FastpathForwarder {
    fp: Arc<Fastpath>,
    peer: PeerName,
    generation: u64,
    beat: Arc<Mutex<Beat>>,
    ever_active: bool,
}

impl Forwarder for FastpathForwarder {
    fn kind(&self) -> &'static str {
        "fastpath"
    }

    fn health(&self) -> Health {
        match lock(&self.beat).probe.health(Instant::now()) {
            Ok(()) => Health::Up,
            Err(why) => Health::Down(why),
        }
    }

    fn tick(&mut self) -> Option<ControlMsg> {
        let hearing = lock(&self.beat).probe.tick(Instant::now())?;
        Some(ControlMsg::FastpathState { receiving: hearing })
    }

    fn handle_report(&mut self, msg: &ControlMsg) -> bool {
        match msg {
            ControlMsg::FastpathState { receiving } => {
                lock(&self.beat).probe.peer_reports(*receiving);
                true
            }
            _ => false,
        }
    }

    fn activate(&mut self) {
        let s = &self.fp.stats;
        s.activations.fetch_add(1, Relaxed);
        if self.fp.settings.encrypted {
            warn!(peer = %self.peer, "fastpath on: container traffic to this peer crosses the underlay UNENCRYPTED (it is in --trusted-subnets)");
        } else if self.ever_active {
            info!(peer = %self.peer, "back on the fastpath");
        }
        self.ever_active = true;
        self.fp.send(Cmd::Activate { peer: self.peer, generation: self.generation });
    }

    fn deactivate(&mut self) {
        self.fp.stats.fallbacks.fetch_add(1, Relaxed);
        let why = match self.health() {
            Health::Up => "another path took over".to_string(),
            Health::Down(why) => why,
        };
        warn!(peer = %self.peer, reason = %why, "fastpath off for this peer: its frames go through the sleeve");
        self.fp.send(Cmd::Deactivate { peer: self.peer, generation: self.generation });
    }
}

impl Drop for FastpathForwarder {
    fn drop(&mut self) {
        let mut beats = lock(&self.fp.beats);
        if beats.get(&self.peer).is_some_and(|b| lock(b).generation == self.generation) {
            beats.remove(&self.peer);
        }
        drop(beats);
        self.fp.send(Cmd::Close { peer: self.peer, generation: self.generation });
    }
}

/// The packet sockets: one to send into the VXLAN device, one to read heartbeats the bridge
/// hands to the host.
struct HeartbeatSockets {
    tx: OwnedFd,
    rx: OwnedFd,
    vx: u32,
}

impl HeartbeatSockets {
    fn open(vx: u32, bridge: u32) -> Result<Self> {
        let proto = proto::ETHERTYPE.to_be();
        let tx = packet_socket(0).context("opening the heartbeat send socket (AF_PACKET)")?;
        let rx = packet_socket(proto).context("opening the heartbeat receive socket (AF_PACKET)")?;
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = bridge as i32;
        // SAFETY: binds our own socket to a valid sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(rx.as_raw_fd(), (&sa as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("binding the heartbeat receive socket to the bridge");
        }
        Ok(HeartbeatSockets { tx, rx, vx })
    }

    fn send(&self, frame: &[u8], dst: [u8; 6]) -> std::io::Result<()> {
        // SAFETY: as above.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.vx as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&dst);
        // SAFETY: frame is a valid buffer of its length; sa is a valid sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.tx.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe { libc::recv(self.rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) }
    }
}

fn packet_socket(protocol: u16) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The heartbeat thread: every [`proto::INTERVAL`] a heartbeat to each peer with a fastpath
/// connection; in between, heartbeats from them, checked and handed to their probes.
fn heartbeats(
    me: PeerName,
    my_mac: [u8; 6],
    socks: HeartbeatSockets,
    beats: Arc<Mutex<HashMap<PeerName, Arc<Mutex<Beat>>>>>,
    stats: Arc<FastpathStats>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 2048];
    let mut next = Instant::now();
    while !stop.load(Relaxed) {
        let now = Instant::now();
        if now >= next {
            next = now + proto::INTERVAL;
            let targets: Vec<(PeerName, Arc<Mutex<Beat>>)> = lock(&beats).iter().map(|(p, b)| (*p, b.clone())).collect();
            for (peer, b) in targets {
                let frame = {
                    let mut b = lock(&b);
                    let hb = Heartbeat { from: me, to: peer, seq: b.next_seq };
                    b.next_seq += 1;
                    hb.frame(&b.key, bridge_mac(peer), my_mac)
                };
                match socks.send(&frame, bridge_mac(peer)) {
                    Ok(()) => {
                        stats.heartbeats_sent.fetch_add(1, Relaxed);
                    }
                    Err(e) => debug!(%peer, error = %e, "sending a fastpath heartbeat failed"),
                }
            }
        }
        let wait = next.saturating_duration_since(Instant::now()).as_millis().clamp(1, 500) as i32;
        if !crate::frame::tap::wait_fd(socks.rx.as_raw_fd(), libc::POLLIN, wait) {
            continue;
        }
        // Bounded per wake-up, so a flood cannot keep the sender waiting.
        for _ in 0..256 {
            let n = match socks.recv(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "reading fastpath heartbeats failed");
                    break;
                }
            };
            let now = Instant::now();
            let r = Heartbeat::parse(&buf[..n], me).and_then(|u| {
                let b = lock(&beats).get(&u.heartbeat.from).cloned().ok_or(HeartbeatError::UnknownPeer)?;
                let mut b = lock(&b);
                let hb = u.verify(&b.key)?;
                b.probe.heard(now, hb.seq)
            });
            match r {
                Ok(()) => {
                    stats.heartbeats_received.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    stats.heartbeats_refused[e as usize].fetch_add(1, Relaxed);
                    debug!(error = %e, "refused a fastpath heartbeat");
                }
            }
        }
    }
}

/// The kernel accepts VXLAN from any source. This nftables table drops datagrams to the fastpath
/// port from every address but the peers we have a fastpath connection with (counted), so nobody
/// else can put frames on the bridge through it; and from those peers, every datagram whose
/// frame's source MAC the peer has not announced (counted per peer), so a peer cannot speak for
/// another's containers. Made with the `nft` command; without it the fastpath runs unfiltered
/// and the status says so.
struct SourceFilter {
    table: String,
}

/// The VNI and the inner source MAC's places in a VXLAN datagram, in bits from the UDP header:
/// 8 bytes of UDP and 4 of VXLAN flags before the VNI; 8 of VXLAN and 6 of destination MAC
/// before the source MAC.
const INNER_SOURCE: &str = "@th,96,24 . @th,176,48";

impl SourceFilter {
    /// Makes (or remakes) the table for UDP `port`; `Err` says why there is no filter.
    async fn make(bridge: &str, port: u16) -> std::result::Result<SourceFilter, String> {
        let clean: String = bridge.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let table = format!("weft_fastpath_{clean}");
        let _ = nft::run(&format!("delete table ip {table}")).await;
        let script = format!(
            "add table ip {table}\n\
             add set ip {table} peers {{ type ipv4_addr; }}\n\
             add set ip {table} macs {{ typeof ip saddr . {INNER_SOURCE}; }}\n\
             add set ip {table} unannounced {{ type ipv4_addr; size 4096; flags dynamic; counter; }}\n\
             add chain ip {table} input {{ type filter hook input priority 0; policy accept; }}\n\
             add rule ip {table} input udp dport {port} ip saddr . {INNER_SOURCE} @macs accept\n\
             add rule ip {table} input udp dport {port} ip saddr @peers add @unannounced {{ ip saddr }} drop\n\
             add rule ip {table} input udp dport {port} counter drop\n"
        );
        nft::run(&script).await.map_err(|e| format!("no source filter on UDP {port} (the kernel accepts VXLAN from anyone who can reach it): {e}"))?;
        Ok(SourceFilter { table })
    }

    async fn allow(&self, ip: IpAddr, yes: bool) -> Result<()> {
        let verb = if yes { "add" } else { "delete" };
        nft::run(&format!("{verb} element ip {} peers {{ {ip} }}", self.table)).await.map_err(anyhow::Error::msg)
    }

    /// Lets (`yes`) or stops letting frames from `mac` on VNI `vni` in from `ip`, in one
    /// transaction.
    async fn macs(&self, changes: &[(Ipv4Addr, u32, Mac, bool)]) -> Result<()> {
        let mut script = String::new();
        for (ip, vni, mac, yes) in changes {
            let verb = if *yes { "add" } else { "delete" };
            let m = mac.0;
            script.push_str(&format!(
                "{verb} element ip {} macs {{ {ip} . 0x{vni:06x} . 0x{:02x}{:02x}{:02x}{:02x}{:02x}{:02x} }}\n",
                self.table, m[0], m[1], m[2], m[3], m[4], m[5]
            ));
        }
        if script.is_empty() {
            return Ok(());
        }
        nft::run(&script).await.map_err(anyhow::Error::msg)
    }

    /// Datagrams dropped so far because they did not come from a peer.
    async fn dropped(&self) -> u64 {
        let Ok(out) = nft::output(&[], &format!("list chain ip {} input", self.table)).await else { return 0 };
        out.lines()
            .filter_map(|l| l.split("packets ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Datagrams dropped so far because of an unannounced source MAC, by peer address.
    async fn unannounced(&self) -> BTreeMap<String, u64> {
        let Ok(out) = nft::output(&["-j", "list", "set", "ip", &self.table, "unannounced"], "").await else { return BTreeMap::new() };
        let Ok(v) = serde_json::from_str::<Value>(&out) else { return BTreeMap::new() };
        let mut by_peer = BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                if let (Some(ip), Some(n)) = (e["elem"]["val"].as_str(), e["elem"]["counter"]["packets"].as_u64()) {
                    by_peer.insert(ip.to_owned(), n);
                }
            }
        }
        by_peer
    }

    async fn remove(&self) {
        let _ = nft::run(&format!("delete table ip {}", self.table)).await;
    }
}

/// One peer's fastpath as the programming task keeps it.
struct PeerState {
    generation: u64,
    ip: IpAddr,
    port: u16,
    active: bool,
    /// (segment, MAC)s with entries now.
    programmed: BTreeSet<(u32, Mac)>,
}

/// The task that owns the forwarding entries. Everything goes through it in order, so entries
/// never outlive the decision that made them.
struct Programmer {
    netdev: Arc<NetDev>,
    /// The VXLAN device of each network with one: the default network's (0), and named ones'.
    devices: HashMap<u32, u32>,
    /// The default network's device, for its counters.
    name: String,
    peers: HashMap<PeerName, PeerState>,
    /// The peer each remote (segment, MAC) was last seen at.
    owners: HashMap<(u32, Mac), PeerName>,
    stats: Arc<FastpathStats>,
    filter: Option<Arc<SourceFilter>>,
    /// Which peer announced each (segment, MAC).
    announced: Arc<HashMap<(u32, Mac), PeerName>>,
    /// What the source filter lets in now: (peer address, VNI, MAC).
    allowed: BTreeSet<(Ipv4Addr, u32, Mac)>,
}

impl Programmer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, mut learned: mpsc::Receiver<(u32, Mac, PeerName)>) {
        let mut sweep = tokio::time::interval(SWEEP);
        let mut counters = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                // Connection events first: a fallback must not wait behind a burst of MACs.
                biased;
                c = rx.recv() => match c {
                    Some(c) => self.handle(c).await,
                    None => break,
                },
                Some((segment, mac, owner)) = learned.recv() => self.learned(segment, mac, owner).await,
                _ = sweep.tick() => self.sweep().await,
                _ = counters.tick() => {
                    if let Ok(Some(c)) = self.netdev.counters(&self.name).await {
                        self.stats.store(c);
                    }
                    if let Some(f) = &self.filter {
                        self.stats.filtered.store(f.dropped().await, Relaxed);
                        *lock(&self.stats.unannounced) = f.unannounced().await;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Open { peer, generation, ip, port } => {
                // A newer connection to the same peer replaces the older one's state.
                if let Some(old) = self.peers.remove(&peer) {
                    self.unprogram_all(peer, &old).await;
                }
                self.peers.insert(peer, PeerState { generation, ip, port, active: false, programmed: BTreeSet::new() });
                // Its datagrams may come in, and the heartbeats know the way to it.
                if let Some(f) = &self.filter {
                    let r = f.allow(ip, true).await;
                    self.ok(r);
                }
                self.ok(self.netdev.vxlan_fdb_add(self.devices[&0], bridge_mac(peer), ip, port).await);
            }
            Cmd::Activate { peer, generation } => {
                let Some(st) = self.peers.get_mut(&peer).filter(|s| s.generation == generation) else { return };
                st.active = true;
                let macs: Vec<(u32, Mac)> = self.owners.iter().filter(|(_, o)| **o == peer).map(|(m, _)| *m).collect();
                for m in macs {
                    self.program(peer, m).await;
                }
            }
            Cmd::Deactivate { peer, generation } => {
                let Some(st) = self.peers.get_mut(&peer).filter(|s| s.generation == generation) else { return };
                st.active = false;
                let macs: Vec<(u32, Mac)> = std::mem::take(&mut st.programmed).into_iter().collect();
                for m in macs {
                    self.unprogram(peer, m).await;
                }
            }
            Cmd::Close { peer, generation } => {
                if self.peers.get(&peer).is_some_and(|s| s.generation == generation) {
                    if let Some(st) = self.peers.remove(&peer) {
                        self.unprogram_all(peer, &st).await;
                    }
                }
            }
            Cmd::Announced(owners) => self.announced = owners,
            Cmd::Network { segment, vx: Some(index) } => {
                self.devices.insert(segment, index);
                // Active peers' MACs on it get their entries now.
                let macs: Vec<((u32, Mac), PeerName)> = self
                    .owners
                    .iter()
                    .filter(|((s, _), p)| *s == segment && self.peers.get(p).is_some_and(|st| st.active))
                    .map(|(m, p)| (*m, *p))
                    .collect();
                for (m, p) in macs {
                    self.program(p, m).await;
                }
            }
            Cmd::Network { segment, vx: None } => {
                // The device goes, and its entries with it: forget them.
                self.devices.remove(&segment);
                for st in self.peers.values_mut() {
                    let before = st.programmed.len();
                    st.programmed.retain(|(s, _)| *s != segment);
                    let gone = (before - st.programmed.len()) as u64;
                    let _ = self.stats.entries.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(gone)));
                }
                self.owners.retain(|(s, _), _| *s != segment);
            }
        }
        self.sync_filter().await;
    }

    /// Brings the source filter's (address, MAC) pairs in line with the open connections and
    /// the announcements: one transaction for all the changes.
    async fn sync_filter(&mut self) {
        let Some(f) = self.filter.clone() else { return };
        let want: BTreeSet<(Ipv4Addr, u32, Mac)> = self
            .announced
            .iter()
            .filter(|((seg, _), _)| self.devices.contains_key(seg))
            .filter_map(|((seg, mac), peer)| match self.peers.get(peer)?.ip.to_canonical() {
                IpAddr::V4(ip) => Some((ip, vni_of(*seg), *mac)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut changes: Vec<(Ipv4Addr, u32, Mac, bool)> = want.difference(&self.allowed).map(|(ip, v, m)| (*ip, *v, *m, true)).collect();
        changes.extend(self.allowed.difference(&want).map(|(ip, v, m)| (*ip, *v, *m, false)));
        if changes.is_empty() {
            return;
        }
        let r = f.macs(&changes).await;
        if r.is_ok() {
            self.allowed = want;
        }
        self.ok(r);
    }

    async fn learned(&mut self, segment: u32, mac: Mac, owner: PeerName) {
        let mac = (segment, mac);
        let before = self.owners.get(&mac).copied();
        if before == Some(owner) {
            return;
        }
        if before.is_none() && self.owners.len() >= MAX_OWNERS {
            self.stats.learn_lost.fetch_add(1, Relaxed);
            return;
        }
        self.owners.insert(mac, owner);
        // Moved away from a peer whose entries send it there.
        if let Some(old) = before {
            if self.peers.get_mut(&old).is_some_and(|s| s.programmed.remove(&mac)) {
                self.unprogram(old, mac).await;
            }
        }
        if self.peers.get(&owner).is_some_and(|s| s.active) {
            self.program(owner, mac).await;
        }
    }

    async fn program(&mut self, peer: PeerName, (segment, mac): (u32, Mac)) {
        // A network without a device of its own here keeps its frames on the sleeve.
        let Some(&vx) = self.devices.get(&segment) else { return };
        let Some(st) = self.peers.get_mut(&peer) else { return };
        if st.programmed.contains(&(segment, mac)) {
            return;
        }
        if st.programmed.len() >= MAX_PER_PEER {
            self.stats.learn_lost.fetch_add(1, Relaxed);
            return;
        }
        let (ip, port) = (st.ip, st.port);
        st.programmed.insert((segment, mac));
        // The device's entry first: the bridge's then sends into a tunnel that knows the way.
        let a = self.netdev.vxlan_fdb_add(vx, mac.0, ip, port).await;
        let ok = a.is_ok();
        self.ok(a);
        if ok {
            let b = self.netdev.bridge_fdb_add(vx, mac.0).await;
            self.ok(b);
        }
        self.stats.entries.fetch_add(1, Relaxed);
    }

    async fn unprogram(&mut self, peer: PeerName, (segment, mac): (u32, Mac)) {
        let Some(&vx) = self.devices.get(&segment) else { return };
        // The bridge's entry first: from then on it sends the MAC to the TAP (or floods), never
        // into the tunnel.
        let b = self.netdev.bridge_fdb_del(vx, mac.0).await;
        self.ok(b.map(|_| ()));
        // The peer's bridge MAC keeps its default device entry while the connection probes.
        if segment != 0 || mac.0 != bridge_mac(peer) || !self.peers.contains_key(&peer) {
            let a = self.netdev.vxlan_fdb_del(vx, mac.0).await;
            self.ok(a.map(|_| ()));
        }
        let _ = self.stats.entries.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
    }

    async fn unprogram_all(&mut self, peer: PeerName, st: &PeerState) {
        for m in &st.programmed {
            self.unprogram(peer, *m).await;
        }
        let a = self.netdev.vxlan_fdb_del(self.devices[&0], bridge_mac(peer)).await;
        self.ok(a.map(|_| ()));
        // Another live connection may share the address (two routers behind one NAT, later).
        if let Some(f) = &self.filter {
            if !self.peers.values().any(|p| p.ip == st.ip) {
                let _ = f.allow(st.ip, false).await;
            }
        }
    }

    /// Removes entries the kernel has not used for [`IDLE`] (containers that went away), and
    /// forgets owners of MACs no peer has.
    async fn sweep(&mut self) {
        let devices: Vec<(u32, u32)> = self.devices.iter().map(|(s, v)| (*s, *v)).collect();
        for (segment, vx) in devices {
            let idle = match self.netdev.bridge_fdb_idle(vx).await {
                Ok(v) => v,
                Err(e) => {
                    debug!(error = %format!("{e:#}"), "listing the fastpath's entries failed");
                    continue;
                }
            };
            for (mac, for_) in idle {
                if for_ < IDLE {
                    continue;
                }
                let mac = (segment, Mac(mac));
                let Some(owner) = self.owners.remove(&mac) else { continue };
                if self.peers.get_mut(&owner).is_some_and(|s| s.programmed.remove(&mac)) {
                    debug!(mac = %mac.1, segment, peer = %owner, "removing an idle fastpath entry");
                    self.unprogram(owner, mac).await;
                }
            }
        }
    }

    fn ok(&self, r: Result<()>) {
        if let Err(e) = r {
            self.stats.program_errors.fetch_add(1, Relaxed);
            warn!(device = %self.name, error = %format!("{e:#}"), "programming the fastpath failed");
        }
    }
}
