//! The DNS service: the record store (`weft_dns::Records`, the router core's `dns` gossip channel
//! behind a [`Gated`]) with this host's names saved in `dns.json`, so they are re-asserted after a
//! restart. Adding or removing a name is answered once the change is on disk.
//!
//! The actor drives it like the IPAM service: [`DnsService::handle`], [`DnsService::flush`],
//! [`DnsService::saved`], [`DnsService::tick`]. The server that answers queries is
//! [`super::dns_server`].

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use weft_dns::{Counts, DnsStats, Output, Records, Refusals, Registration};
use weft_proto::{PeerName, Router, SigningKey};

use super::persist::{Deferred, Durable, Gated, Pending, Released, SaveDone, SaveError, SaveGate, Writer};

/// The file our own names are saved in.
pub const STATE_FILE: &str = "dns.json";
/// Container ID for names added with `weft dns-add` without one.
pub const EXTERN_ID: &str = "weft:extern";
/// How often tombstones are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// DNS settings from the command line.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// Run the server at all.
    pub enabled: bool,
    /// Where to listen; `None`: port 53 on the bridge's IPv4 addresses, once it has one.
    pub listen: Option<Vec<SocketAddr>>,
    /// The zone.
    pub domain: String,
    /// TTL of answers, seconds.
    pub ttl: u32,
    /// Upstream resolvers; `None`: the host's /etc/resolv.conf.
    pub upstreams: Option<Vec<SocketAddr>>,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            enabled: true,
            listen: None,
            domain: weft_dns::server::DEFAULT_DOMAIN.into(),
            ttl: weft_dns::server::DEFAULT_TTL,
            upstreams: None,
        }
    }
}

/// Wall-clock milliseconds, for tombstones.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Loads our saved names and re-adds them to a fresh store: their new
/// versions outrank what the mesh holds from our previous life. `signing` is
/// this host's identity key, which signs its DNS entries.
///
/// Signatures and the state file: only our own registrations are saved (ID,
/// name, address; no versions, no signatures, no entries of other peers), and
/// [`Records::add`] signs each again with the current key at a new version. So
/// nothing loaded from disk is trusted as signed, there is nothing to
/// re-verify, and files written before entries were signed load unchanged.
/// Peers' entries come back only through gossip, verified on merge.
pub fn load(me: PeerName, initial_version: u64, signing: SigningKey, path: &Path) -> Result<Records> {
    let mut r = Records::new(me, initial_version, signing);
    match std::fs::read(path) {
        Ok(b) => {
            let regs: Vec<Registration> = serde_json::from_slice(&b).with_context(|| {
                format!("DNS state file {} is corrupt: fix it, or remove it (this host's names are then re-added as containers attach)", path.display())
            })?;
            for g in regs {
                r.add(&g.id, &g.name, g.addr).map_err(|e| anyhow!("DNS state file {}: {e}", path.display()))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading DNS state file {}", path.display())),
    }
    Ok(r)
}

impl Durable for Records {
    type Output = Output;
    fn take_dirty(&mut self) -> bool {
        Records::take_dirty(self)
    }
    fn is_dirty(&self) -> bool {
        Records::is_dirty(self)
    }
    fn save_bytes(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&self.own()).map_err(|e| format!("encoding this host's DNS names: {e}"))
    }
    fn poll_output(&mut self) -> Option<Output> {
        Records::poll_output(self)
    }
}

/// Why a DNS request failed.
#[derive(Debug, Clone)]
pub enum DnsError {
    /// A bad name, address or container ID.
    Invalid(String),
    /// The change could not be saved.
    Save(SaveError),
}

impl From<SaveError> for DnsError {
    fn from(e: SaveError) -> Self {
        DnsError::Save(e)
    }
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsError::Invalid(m) => f.write_str(m),
            DnsError::Save(e) => e.fmt(f),
        }
    }
}

/// A reply to an API caller.
pub type Reply<T> = oneshot::Sender<Result<T, DnsError>>;

/// Requests from the API.
pub enum DnsRequest {
    /// Registers `name` for container `id` at each address; answers the full name.
    Add { id: String, name: String, addrs: Vec<IpAddr>, reply: Reply<String> },
    /// Removes names of container `id`: all, or by name and/or addresses (any address when empty).
    /// Answers whether anything was removed.
    Remove { id: String, name: Option<String>, addrs: Vec<IpAddr>, reply: Reply<bool> },
    /// The addresses of a name (relative to the zone).
    Lookup { name: String, reply: oneshot::Sender<Vec<IpAddr>> },
    /// This host's names.
    Own { reply: oneshot::Sender<Vec<Registration>> },
    /// The status document.
    Status { reply: oneshot::Sender<Value> },
}

/// See the module docs.
pub struct DnsService {
    opts: DnsOptions,
    /// The server's counters.
    stats: Arc<DnsStats>,
    /// Where the server listens (see [`super::dns_server`]).
    listening: watch::Receiver<Vec<SocketAddr>>,
    next_expire: Instant,
    dropped: u64,
}

fn gated(core: &mut Router) -> &mut Gated<Records> {
    match core.channel_mut::<Gated<Records>>(weft_dns::CHANNEL) {
        Some(g) => g,
        None => unreachable!("the dns channel is registered at start"),
    }
}

impl DnsService {
    /// Registers the store (loaded from `gate`'s file) with the router core.
    pub fn register(
        core: &mut Router,
        records: Records,
        gate: SaveGate,
        opts: DnsOptions,
        stats: Arc<DnsStats>,
        listening: watch::Receiver<Vec<SocketAddr>>,
        now: Instant,
    ) -> Self {
        core.register_channel(weft_dns::CHANNEL, Box::new(Gated::new(records, gate)));
        DnsService { opts, stats, listening, next_expire: now + EXPIRE_EVERY, dropped: 0 }
    }

    /// The zone, without the final dot.
    fn zone(&self) -> &str {
        self.opts.domain.trim_end_matches('.')
    }

    /// A request from the API.
    pub fn handle(&mut self, core: &mut Router, req: DnsRequest) {
        match req {
            DnsRequest::Add { id, name, addrs, reply } => match self.add(core, &id, &name, &addrs) {
                Ok(fqdn) => gated(core).hold(Box::new(Deferred { tx: reply, value: fqdn })),
                Err(e) => {
                    let _ = reply.send(Err(DnsError::Invalid(e)));
                }
            },
            DnsRequest::Remove { id, name, addrs, reply } => {
                let removed = if addrs.is_empty() {
                    self.remove(core, &id, name.as_deref(), None)
                } else {
                    // Every address, not only up to the first that matched.
                    addrs.iter().fold(false, |any, ip| self.remove(core, &id, name.as_deref(), Some(*ip)) | any)
                };
                gated(core).hold(Box::new(Deferred { tx: reply, value: removed }));
            }
            DnsRequest::Lookup { name, reply } => {
                let _ = reply.send(gated(core).inner().lookup(&name));
            }
            DnsRequest::Own { reply } => {
                let _ = reply.send(gated(core).inner().own());
            }
            DnsRequest::Status { reply } => {
                let _ = reply.send(self.status(core));
            }
        }
    }

    fn add(&mut self, core: &mut Router, id: &str, name: &str, addrs: &[IpAddr]) -> Result<String, String> {
        let rel = weft_dns::relative_name(name, &self.opts.domain).map_err(|e| e.to_string())?;
        let g = gated(core);
        for a in addrs {
            if let Some(delta) = g.inner_mut().add(id, &rel, *a).map_err(|e| e.to_string())? {
                g.hold_delta(delta);
            }
        }
        Ok(format!("{rel}.{}", self.zone()))
    }

    /// Removes names of container `id` (all, or by name and/or address). Whether any went.
    pub fn remove(&mut self, core: &mut Router, id: &str, name: Option<&str>, addr: Option<IpAddr>) -> bool {
        let rel = name.map(|n| weft_dns::relative_name(n, &self.opts.domain).unwrap_or_else(|_| n.to_ascii_lowercase()));
        let g = gated(core);
        match g.inner_mut().remove(now_ms(), id, rel.as_deref(), addr) {
            Some(delta) => {
                g.hold_delta(delta);
                true
            }
            None => false,
        }
    }

    /// After a round of inputs (see [`super::persist`]).
    pub fn flush(&mut self, core: &mut Router, now: Instant, writer: &Writer) {
        let released = gated(core).flush(now, writer);
        self.carry_out(core, released);
    }

    /// A save of `dns.json` finished.
    pub fn saved(&mut self, core: &mut Router, now: Instant, done: &SaveDone) {
        let released = gated(core).saved(done, now);
        self.carry_out(core, released);
    }

    fn carry_out(&mut self, core: &mut Router, r: Released<Output>) {
        for p in r.ready {
            match p {
                Pending::Core(Output::Broadcast(b)) | Pending::Delta(b) => core.broadcast(weft_dns::CHANNEL, b),
                Pending::Core(Output::Unicast(to, b)) => {
                    core.send_unicast(to, weft_dns::CHANNEL, b);
                }
                Pending::Answer(a) => a.send(Ok(())),
            }
        }
        let Some(err) = r.error else { return };
        for p in r.failed {
            match p {
                Pending::Answer(a) => a.send(Err(err.clone())),
                Pending::Core(_) | Pending::Delta(_) => self.dropped += 1,
            }
        }
    }

    /// Entries of peers gone from the topology stop resolving; returning ones come back.
    pub fn sync_origins(&mut self, core: &mut Router) {
        let live: BTreeSet<PeerName> = core.topology().peers().map(|p| p.name).collect();
        gated(core).inner_mut().sync_origins(now_ms(), |p| live.contains(&p));
    }

    /// Once a second: origins, and now and then expired tombstones.
    pub fn tick(&mut self, core: &mut Router, now: Instant) {
        self.sync_origins(core);
        if now >= self.next_expire {
            self.next_expire = now + EXPIRE_EVERY;
            gated(core).inner_mut().expire_tombstones(now_ms(), weft_dns::records::DEFAULT_TOMBSTONE_TTL);
        }
    }

    /// Saves of `dns.json` that failed.
    pub fn save_errors(&self, core: &mut Router) -> u64 {
        gated(core).gate().errors()
    }

    /// Entry counts, for metrics.
    pub fn counts(&self, core: &mut Router) -> Counts {
        gated(core).inner().counts()
    }

    /// Entries from peers dropped unverified, for metrics: (bad signature, no key bound to
    /// the origin yet). Per sender in [`DnsService::status`].
    pub fn unverified_totals(&self, core: &mut Router) -> (u64, u64) {
        let r: &Refusals = gated(core).inner().refusals();
        (r.forged, r.unverified)
    }

    /// The DNS part of the status document.
    pub fn status(&self, core: &mut Router) -> Value {
        let zone = self.zone().to_string();
        let o = &self.opts;
        let listening: Vec<String> = self.listening.borrow().iter().map(|a| a.to_string()).collect();
        let g = gated(core);
        let r = g.inner();
        let entries: Vec<Value> = r
            .entries()
            .into_iter()
            .filter(|e| e.is_live())
            .map(|e| json!({"name": format!("{}.{zone}", e.name), "address": e.addr.to_string(), "id": e.id, "origin": e.origin.to_string()}))
            .collect();
        let refused = r.refusals();
        let by_sender: serde_json::Map<String, Value> = refused
            .by_sender
            .iter()
            .map(|(p, c)| (p.to_string(), json!({"bad_signature": c.forged, "unknown_key": c.unverified})))
            .collect();
        let unverified = json!({
            "bad_signature": refused.forged, "unknown_key": refused.unverified, "by_sender": by_sender,
        });
        json!({
            "enabled": o.enabled, "domain": o.domain, "ttl": o.ttl, "listening": listening,
            "upstreams": o.upstreams.as_ref().map(|u| u.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            "counts": r.counts(), "queries": self.stats.snapshot(), "entries": entries,
            "unverified_entries": unverified,
            "state_file": g.gate().path().display().to_string(),
            "save_errors": g.gate().errors(), "save_error": g.gate().failure(), "held": g.held(),
            "dropped_messages": self.dropped + g.dropped_deltas(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use weft_proto::identity::Claim;
    use weft_proto::{GossipChannel, Keys, Trust};

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed(&[n; 32]).unwrap()
    }

    /// A file saved before entries were signed (the format has not changed: our own
    /// registrations only) loads, and its names go out signed with the key given now.
    #[test]
    fn saved_names_load_and_are_signed_with_the_current_key() {
        let dir = std::env::temp_dir().join(format!("weft-dns-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(STATE_FILE);
        std::fs::write(
            &path,
            br#"[{"id":"c1","name":"web","addr":"10.32.0.1"},{"id":"weft:extern","name":"db.prod","addr":"fd00::5"}]"#,
        )
        .unwrap();
        let me = PeerName::from_u64(1);
        let mut keys = Keys::new(Trust::FirstUse);
        keys.admit(&Claim::self_signed(&key(3), me)).unwrap();

        let r = load(me, 1_000, key(3), &path).unwrap();
        assert_eq!(r.own().len(), 2);
        let mut peer = Records::new(PeerName::from_u64(2), 1, key(4));
        assert!(peer.merge_payload(me, &r.encode_full(), &keys).unwrap().is_some());
        assert_eq!(peer.lookup("web"), vec!["10.32.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(peer.lookup("db.prod"), vec!["fd00::5".parse::<IpAddr>().unwrap()]);
        assert_eq!(peer.refusals().forged, 0);

        // Loaded under a key that is not the one bound to our name: nobody takes them.
        let wrong = load(me, 1_000, key(5), &path).unwrap();
        let mut peer = Records::new(PeerName::from_u64(2), 1, key(4));
        assert_eq!(peer.merge_payload(me, &wrong.encode_full(), &keys).unwrap(), None);
        assert!(peer.lookup("web").is_empty());
        assert_eq!(peer.refusals().forged, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
