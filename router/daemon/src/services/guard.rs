//! The router's side of the port guard ([`crate::host::guard`]): the base table at start (so a
//! weft port without rules carries nothing even before the first attach), the drop counters
//! read every few seconds for metrics, and the sweep of rules whose port is gone (a container
//! that died without a detach, a CNI DEL without a namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::host::guard::{self, Listing, REASONS};
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

/// Makes the base table and starts the task; an error (no nft) is logged, since attaching will
/// fail with the same message.
pub async fn start(netdev: Arc<NetDev>, stats: Arc<GuardStats>) {
    if let Err(e) = nft::run(&guard::base_script()).await {
        warn!(error = %e, "cannot set up the port guard: containers cannot be attached until nft works");
    }
    tokio::spawn(async move {
        let mut gone_once: BTreeSet<String> = BTreeSet::new();
        let mut last = BTreeMap::new();
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            let Ok(listing) = guard::list().await else { continue };
            stats.take(&listing, &mut last);
            gone_once = sweep(&netdev, &listing, &gone_once, &stats).await;
        }
    });
}

/// Removes the rules of ports that were absent in this pass and the one before (rules go in
/// before their port is made, so one pass alone proves nothing). Returns this pass's absent
/// ports.
async fn sweep(netdev: &NetDev, listing: &Listing, before: &BTreeSet<String>, stats: &GuardStats) -> BTreeSet<String> {
    let mut gone = BTreeSet::new();
    for p in &listing.ports {
        if !matches!(netdev.link_index(&p.port).await, Ok(None)) {
            continue;
        }
        if !before.contains(&p.port) {
            gone.insert(p.port.clone());
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
    gone
}
