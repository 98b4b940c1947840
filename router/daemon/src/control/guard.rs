//! The router's side of the port guard ([`crate::host::guard`]): the base table at start (so a
//! weft port without rules carries nothing even before the first attach), the drop counters
//! read every few seconds for metrics, the sweep of rules whose port is gone for 30 s (a container
//! that died without a detach, a CNI DEL without a namespace), and the list of this host's
//! container MACs that the router announces to its peers (the guarded ports', and MACs handed
//! out for attachments about to be made).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{info, warn};
use weft_proto::Mac;

use super::handle::ControlHandle;
use crate::host::guard::{self, Listing};
pub use crate::host::guard::REASONS;
use crate::host::{nft, NetDev};

/// How often the counters are read and the rules swept.
const EVERY: Duration = Duration::from_secs(10);

/// The guard's counters, as of the last read.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Ports with rules.
    pub ports: AtomicU64,
    /// Frames dropped, by [`REASONS`], over all ports since the router started.
    pub dropped: [AtomicU64; REASONS.len()],
    /// Frames from weft ports without rules, dropped.
    pub unruled: AtomicU64,
    /// Rules removed because their port was gone.
    pub swept: AtomicU64,
}

impl GuardStats {
    /// Takes in a listing: the drops since `last` (per port and reason, which this updates)
    /// are added, so the totals only grow even as ports come and go.
    fn take(&self, l: &Listing, last: &mut BTreeMap<(String, String), u64>) {
        self.ports.store(l.ports.len() as u64, Relaxed);
        let mut now = BTreeMap::new();
        for p in &l.ports {
            for (r, &n) in &p.dropped {
                let key = (p.port.clone(), r.clone());
                // A counter below its last value belongs to a port made again under that name.
                let before = last.get(&key).copied().filter(|b| *b <= n).unwrap_or(0);
                if let Some(i) = REASONS.iter().position(|x| x == r) {
                    self.dropped[i].fetch_add(n - before, Relaxed);
                }
                now.insert(key, n);
            }
        }
        *last = now;
        self.unruled.store(l.unruled, Relaxed);
    }
}

/// A MAC handed out for an attachment is announced this long before its port shows up.
const PROMISE: Duration = Duration::from_secs(60);

/// The handle the API uses: MACs about to be attached.
#[derive(Debug)]
pub struct Guard {
    /// MACs handed out, with their network and when.
    pending: Mutex<HashMap<[u8; 6], (u32, Instant)>>,
    wake: Notify,
}

impl Guard {
    /// A fresh MAC for a container port on network `segment` that is about to be made,
    /// announced at once (so peers take the container's first frames).
    pub fn promise(&self, segment: u32) -> [u8; 6] {
        self.promise_mac(segment, guard::random_mac())
    }

    /// [`Guard::promise`] of a given MAC: a container attached again keeps its MAC, so that its
    /// neighbours' ARP caches stay right.
    pub fn promise_mac(&self, segment: u32, mac: [u8; 6]) -> [u8; 6] {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(mac, (segment, Instant::now()));
        self.wake.notify_one();
        mac
    }

    /// A port was removed: announce without it soon.
    pub fn changed(&self) {
        self.wake.notify_one();
    }
}

/// Makes the base table and starts the task; an error (no nft) is logged, since attaching will
/// fail with the same message.
pub async fn start(netdev: Arc<NetDev>, stats: Arc<GuardStats>, control: ControlHandle) -> Arc<Guard> {
    if let Err(e) = nft::run(&guard::base_script()).await {
        warn!(error = %e, "cannot set up the port guard: containers cannot be attached until nft works");
    }
    let g = Arc::new(Guard { pending: Mutex::new(HashMap::new()), wake: Notify::new() });
    let g2 = g.clone();
    tokio::spawn(async move {
        let mut missing: BTreeMap<String, Instant> = BTreeMap::new();
        let mut last = BTreeMap::new();
        let mut announced: Option<Vec<(u32, Mac)>> = None;
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = g2.wake.notified() => {}
            }
            let Ok(listing) = guard::list().await else { continue };
            stats.take(&listing, &mut last);
            sweep(&netdev, &listing, &mut missing, &stats).await;
            let macs = g2.local_macs(&listing);
            if announced.as_ref() != Some(&macs) {
                if control.local_macs(macs.clone()).await.is_err() {
                    break;
                }
                announced = Some(macs);
            }
        }
    });
    g
}

impl Guard {
    /// The guarded ports' MACs and the promised ones still young, each with its network,
    /// sorted.
    fn local_macs(&self, listing: &Listing) -> Vec<(u32, Mac)> {
        let mut macs: BTreeSet<(u32, Mac)> = listing.ports.iter().filter_map(|p| Some((p.segment, p.mac.parse().ok()?))).collect();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|m, (_, at)| at.elapsed() < PROMISE && !macs.iter().any(|(_, x)| x.0 == *m));
        macs.extend(pending.iter().map(|(m, (seg, _))| (*seg, Mac(*m))));
        macs.into_iter().collect()
    }
}

/// Rules whose port has been missing this long are removed. Rules go in before their port is
/// made (milliseconds before, or longer on a loaded host), so absence alone proves nothing.
const GONE_FOR: Duration = Duration::from_secs(30);

/// Removes the rules of ports missing for [`GONE_FOR`]; `since` keeps when each missing port
/// was first seen missing.
async fn sweep(netdev: &NetDev, listing: &Listing, since: &mut BTreeMap<String, Instant>, stats: &GuardStats) {
    let mut missing = BTreeMap::new();
    for p in &listing.ports {
        if !matches!(netdev.link_index(&p.port).await, Ok(None)) {
            continue;
        }
        let first = since.get(&p.port).copied().unwrap_or_else(Instant::now);
        if first.elapsed() < GONE_FOR {
            missing.insert(p.port.clone(), first);
            continue;
        }
        match guard::remove(&p.port).await {
            Ok(_) => {
                stats.swept.fetch_add(1, Relaxed);
                info!(port = %p.port, container = %p.label, "removed the guard of a port that is gone");
            }
            Err(e) => warn!(port = %p.port, error = %format!("{e:#}"), "could not remove the guard of a port that is gone"),
        }
    }
    *since = missing;
}
