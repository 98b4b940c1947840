//! Keeps the DNS server (`weft_dns::serve`) listening where it should: `--dns-listen`, or port 53
//! on the bridge's IPv4 addresses, checked every second and at once when the router gives the
//! bridge an address ([`DnsServer::recheck`]). An address added by `weft expose` or by hand is
//! picked up, one removed is dropped. Where it listens is published for the status and for the
//! answers that name the server to containers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use weft_dns::{DnsConfig, DnsStats, ZoneView};

use super::dns::DnsOptions;
use crate::host::NetDev;

/// The running keeper's handle.
#[derive(Clone)]
pub struct DnsServer {
    listening: watch::Receiver<Vec<SocketAddr>>,
    recheck: Arc<Notify>,
}

impl DnsServer {
    /// A receiver of where it listens, for the DNS service's status.
    pub fn subscribe(&self) -> watch::Receiver<Vec<SocketAddr>> {
        self.listening.clone()
    }

    /// The name server containers should use: the first listen address.
    pub fn nameserver(&self) -> Option<IpAddr> {
        self.listening.borrow().first().map(SocketAddr::ip)
    }

    /// Checks the bridge's addresses now (one was just added).
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    /// The nameserver, waiting up to 3 s for the server to come up on a fresh address.
    pub async fn wait_nameserver(&self) -> Option<IpAddr> {
        let mut rx = self.listening.clone();
        let first = tokio::time::timeout(Duration::from_secs(3), async {
            rx.wait_for(|l| !l.is_empty()).await.ok().and_then(|l| l.first().map(SocketAddr::ip))
        });
        first.await.ok().flatten()
    }
}

/// A handle for a router without DNS (`--no-dns`): listens nowhere.
pub fn disabled() -> DnsServer {
    // With the sender gone, waiting for an address ends at once.
    let (_, rx) = watch::channel(Vec::new());
    DnsServer { listening: rx, recheck: Arc::new(Notify::new()) }
}

/// Starts the keeper task.
pub fn spawn(
    opts: DnsOptions,
    reverse: (IpAddr, u8),
    bridge: String,
    netdev: Arc<NetDev>,
    view: ZoneView,
    stats: Arc<DnsStats>,
) -> DnsServer {
    let (tx, rx) = watch::channel(Vec::new());
    let recheck = Arc::new(Notify::new());
    let wake = recheck.clone();
    tokio::spawn(async move {
        let mut last_error = String::new();
        let mut current: Vec<SocketAddr> = Vec::new();
        let mut server = None;
        loop {
            let want = match &opts.listen {
                Some(l) => l.clone(),
                None => match netdev.addresses(&bridge).await {
                    Ok(a) => a.into_iter().filter(|(ip, _)| ip.is_ipv4()).map(|(ip, _)| SocketAddr::new(ip, 53)).collect(),
                    Err(_) => Vec::new(),
                },
            };
            if want != current {
                server = None;
                current = Vec::new();
                tx.send_replace(Vec::new());
                if !want.is_empty() {
                    let mut cfg = DnsConfig::new(want.clone());
                    cfg.domain = opts.domain.clone();
                    cfg.ttl = opts.ttl;
                    cfg.upstreams = opts.upstreams.clone();
                    cfg.reverse_ranges = vec![reverse];
                    match weft_dns::serve(cfg, view.clone(), stats.clone()).await {
                        Ok(h) => {
                            info!(listen = ?h.udp_addrs(), domain = %opts.domain, "DNS server listening");
                            tx.send_replace(h.udp_addrs().to_vec());
                            server = Some(h);
                            current = want;
                            last_error.clear();
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            if msg != last_error {
                                warn!(error = %msg, "DNS server not started; retrying every second");
                                last_error = msg;
                            }
                        }
                    }
                }
            }
            if tx.is_closed() {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        }
        drop(server);
    });
    DnsServer { listening: rx, recheck }
}
