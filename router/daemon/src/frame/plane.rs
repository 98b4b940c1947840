//! [`FramePath`]: starts the frame path's threads and is the control path's handle on them:
//! links in and out, new routes, counters.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use weft_proto::sleeve::{Opener, Sealer};
use weft_proto::switch::{Limits, Mac};
use weft_proto::{PeerName, Routes};

use super::links::{lock, IndexLease, Link, NetworkTap, Published, Snapshot};
use super::shared::Shared;
use super::stats::Stats;
use super::tap::Tap;
use super::udp::SleeveSocket;
use super::{rx, tx};

/// MAC announcements the UDP thread may queue for the TAP thread.
const LEARN_QUEUE: usize = 4096;

/// The sleeve's path to a peer, for status.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where the sleeve sends (where the peer's datagrams come from).
    pub dest: SocketAddr,
    /// How often that moved.
    pub moves: u64,
    /// The largest datagram the path takes.
    pub max_datagram: usize,
    /// Whether sends use GSO.
    pub gso: bool,
    /// What path MTU probing found, in words.
    pub probing: String,
}

/// The frame path threads' default niceness (`--data-nice`): ahead of ordinary processes, as
/// the kernel's packet processing (softirq) is, so a frame does not wait for a busy host's
/// applications to give up the CPU. Measured in docs/benchmarks.md (data path).
pub const DATA_NICE: i32 = -20;

/// Sets the calling thread's niceness; says so and goes on when it may not (no CAP_SYS_NICE).
fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority(2) with who = 0 changes the calling thread only (Linux: per thread).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(nice, error = %e, "could not raise the frame path's scheduling priority (CAP_SYS_NICE?); frames may wait longer on a busy host");
    } else {
        tracing::debug!(nice, thread = ?std::thread::current().name(), "frame path thread niceness set");
    }
}

/// The running frame path. Stopping it (or dropping it) stops its threads.
pub struct FramePath {
    sh: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl FramePath {
    /// Starts the TAP and UDP threads on an open TAP and a bound sleeve socket.
    /// `nice` is the threads' scheduling niceness (0: left as they start).
    pub fn start(me: PeerName, tap: Tap, tap_mac: [u8; 6], sock: UdpSocket, max_datagram: usize, limits: Limits, nice: i32) -> Result<Self> {
        let sh = Arc::new(Shared {
            me,
            tap,
            tap_mac: Mac(tap_mac),
            udp: SleeveSocket::new(sock, max_datagram)?,
            snapshot: Published::new(Snapshot::default()),
            limits,
            moves_to_local: AtomicU64::new(0),
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
            learn_hook: std::sync::OnceLock::new(),
            quic_hook: std::sync::OnceLock::new(),
        });
        let (learn_tx, learn_rx) = std::sync::mpsc::sync_channel(LEARN_QUEUE);
        let a = sh.clone();
        let t1 = std::thread::Builder::new().name("weft-tap".into()).spawn(move || {
            set_nice(nice);
            tx::run(a, learn_rx)
        }).context("starting the TAP thread")?;
        let b = sh.clone();
        let t2 = match std::thread::Builder::new().name("weft-udp".into()).spawn(move || {
            set_nice(nice);
            rx::run(b, learn_tx)
        }) {
            Ok(t) => t,
            Err(e) => {
                sh.stop.store(true, Relaxed);
                let _ = t1.join();
                return Err(e).context("starting the UDP thread");
            }
        };
        Ok(FramePath { sh, threads: Mutex::new(vec![t1, t2]) })
    }

    /// Installs the hook told about learned and moved MACs (once; later calls are ignored).
    pub fn set_learn_hook(&self, hook: super::shared::LearnHook) {
        let _ = self.sh.learn_hook.set(hook);
    }

    /// Installs the hook given the QUIC packets that arrive on the sleeve port (once).
    pub fn set_quic_hook(&self, hook: super::shared::QuicHook) {
        let _ = self.sh.quic_hook.set(hook);
    }

    /// Sends one datagram from the sleeve port without waiting (see [`SleeveSocket::send_one`]).
    pub fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        self.sh.udp.send_one(to, datagram)
    }

    /// The sleeve socket's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sh.udp.local_addr()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.sh.stats
    }

    /// Whether the TAP has segmentation offload (the kernel hands us super-frames).
    pub fn offload(&self) -> bool {
        self.sh.tap.offload
    }

    /// GSO segments the kernel takes per send, as detected.
    pub fn gso_segments(&self) -> usize {
        self.sh.udp.gso_segments()
    }

    /// The largest UDP payload sent.
    pub fn max_datagram(&self) -> usize {
        self.sh.udp.max_datagram()
    }

    /// Adds (or replaces) the link to `peer`; returns it, for its path's health checks.
    /// The link holds `lease` (its receive index) until it is dropped.
    pub fn add_link(&self, peer: PeerName, addr: SocketAddr, lease: IndexLease, sealer: Sealer, opener: Opener) -> Arc<Link> {
        let index = lease.index();
        let link = Arc::new(Link::new(peer, addr, lease, sealer, opener, self.sh.epoch, self.sh.udp.max_datagram()));
        let l = link.clone();
        self.sh.snapshot.update(move |cur| {
            let mut s = cur.clone();
            if let Some(old) = s.links.insert(peer, l.clone()) {
                s.by_index.remove(&old.index);
            }
            s.by_index.insert(index, l);
            s
        });
        link
    }

    /// Removes the link to `peer` if it is still the one with `index` (a replaced duplicate must
    /// not take the winner's link with it).
    pub fn remove_link(&self, peer: PeerName, index: u32) {
        self.sh.snapshot.update(|cur| {
            let mut s = cur.clone();
            s.by_index.remove(&index);
            if s.links.get(&peer).is_some_and(|l| l.index == index) {
                s.links.remove(&peer);
            }
            s
        });
    }

    /// Installs new routes.
    pub fn set_routes(&self, routes: Routes) {
        self.sh.snapshot.update(|cur| Snapshot { routes, ..cur.clone() });
    }

    /// Installs which peer each (segment, source MAC) may come from: frames from peers with
    /// other source MACs are dropped.
    pub fn set_owners(&self, owners: Arc<HashMap<(u32, Mac), PeerName>>) {
        self.sh.snapshot.update(|cur| Snapshot { owners, ..cur.clone() });
    }

    /// Installs the routes of every named network with members.
    pub fn set_segment_routes(&self, routes: HashMap<u32, Routes>) {
        let segment_routes = Arc::new(routes);
        self.sh.snapshot.update(|cur| Snapshot { segment_routes, ..cur.clone() });
    }

    /// Adds (`Some`) or removes this host's TAP on named network `segment`.
    pub fn set_network_tap(&self, segment: u32, tap: Option<NetworkTap>) {
        self.sh.snapshot.update(|cur| {
            let mut taps = (*cur.taps).clone();
            match tap {
                Some(t) => taps.insert(segment, t),
                None => taps.remove(&segment),
            };
            Snapshot { taps: Arc::new(taps), ..cur.clone() }
        });
    }

    /// The sleeve's path to each linked peer.
    pub fn endpoints(&self) -> HashMap<PeerName, Endpoint> {
        let snap = self.sh.snapshot.reader();
        let max = self.sh.udp.max_datagram();
        snap.get()
            .links
            .iter()
            .map(|(p, l)| {
                let e = Endpoint {
                    dest: l.dest(),
                    moves: l.moves.load(Relaxed),
                    max_datagram: l.max_datagram(max),
                    gso: l.gso.load(Relaxed),
                    probing: lock(&l.prober).describe(),
                };
                (*p, e)
            })
            .collect()
    }

    /// Frames from each linked peer dropped for an unannounced source MAC.
    pub fn unannounced(&self) -> HashMap<PeerName, u64> {
        let snap = self.sh.snapshot.reader();
        snap.get().links.iter().map(|(p, l)| (*p, l.unannounced.load(Relaxed))).collect()
    }

    /// Stops the threads and waits for them (they notice within half a second): call it from a
    /// thread that may block.
    pub fn stop(&self) {
        self.sh.stop.store(true, Relaxed);
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a frame path thread panicked");
            }
        }
    }
}

impl Drop for FramePath {
    fn drop(&mut self) {
        self.sh.stop.store(true, Relaxed);
    }
}
