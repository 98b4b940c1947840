//! weft's container DNS: names under `weft.local.` that resolve on every host.
//!
//! - [`records`]: the record store, a CRDT of `(origin peer, container ID,
//!   name, address)` entries with versions and tombstones, gossiped on the
//!   mesh's [`CHANNEL`] (it implements `weft_proto::GossipChannel`). Sans-IO:
//!   no sockets, no clock; time comes in as arguments. It publishes the live
//!   names to a [`records::ZoneView`] that other threads read.
//! - [`server`]: the DNS server (hickory-server) answering A, AAAA and PTR
//!   from a `ZoneView`, forwarding everything else to upstream resolvers
//!   (hickory-resolver), with counters in [`server::DnsStats`].
//!
//! What it leaves out: the daemon's side (flags, the local API, the CLI,
//! attach/detach hooks, persistence on disk, metrics export, writing
//! containers' resolv.conf) lives in `router/daemon`. No DNSSEC, no zone
//! transfers, no dynamic updates (UPDATE gets NOTIMP), no TLS.
//!
//! # Wiring it into the router daemon
//!
//! Time: `now_ms` is wall-clock milliseconds since the Unix epoch;
//! `start_us` is the start time in microseconds (the same value the router
//! uses as `RouterConfig::initial_version`).
//!
//! **Start.**
//! ```ignore
//! let mut records = Records::new(me, start_us, identity_key); // the key bound to `me`
//! for r in saved_registrations {            // from the daemon's state file
//!     if container_still_exists(&r.id) { records.add(&r.id, &r.name, r.addr)?; }
//! }
//! let view = records.view();
//! router.register_channel(weft_dns::CHANNEL, Box::new(records));
//! let mut cfg = DnsConfig::new(vec![SocketAddr::new(bridge_ip, 53)]); // or --dns-listen
//! cfg.domain = dns_domain;                  // --dns-domain, default "weft.local"
//! cfg.ttl = dns_ttl;                        // --dns-ttl, default 1
//! cfg.upstreams = dns_upstream;             // --dns-upstream; None = /etc/resolv.conf
//! cfg.reverse_ranges = vec![(ipam_range_addr, ipam_range_prefix)];
//! let stats = Arc::new(DnsStats::default());
//! let dns = serve(cfg, view, stats.clone()).await?; // ServeError says which address and what to do
//! ```
//! Re-adding after a restart is all the persistence the names need: the new
//! versions outrank the previous life's, and entries of containers that
//! vanished meanwhile are tombstoned when they come back by gossip (the store
//! *re-asserts* its own entries). Entries of other peers are never saved.
//!
//! **Events** (`r` is `router.channel_mut::<Records>(weft_dns::CHANNEL)`):
//!
//! | when | call | then |
//! | --- | --- | --- |
//! | `dns-add`, attach with a name (once per address) | `r.add(id, &relative_name(input, domain)?, ip)` | `Some(delta)` → `router.broadcast(CHANNEL, delta)` |
//! | `dns-remove`, detach, container gone | `r.remove(now_ms, id, name, addr)` / `r.remove_container(now_ms, id)` | same |
//! | after every `router.handle_message` | drain `r.poll_output()` | `Broadcast(p)` → `router.broadcast(CHANNEL, p)`; `Unicast(peer, p)` → `router.send_unicast(peer, CHANNEL, p)` |
//! | `Event::RoutesChanged`, and a periodic tick (1 s is fine) | `r.sync_origins(now_ms, \|p\| live.contains(&p))` with `live` = the names in `router.topology().peers()`, collected first | drain `r.poll_output()` |
//! | a slower tick (every 10 s or so) | `r.expire_tombstones(now_ms, DEFAULT_TOMBSTONE_TTL)` | |
//! | after `add`/`remove` | `if r.take_dirty() { save(r.own()) }` | |
//!
//! Names given by people go through [`records::relative_name`], which
//! accepts `web`, `web.weft.local` or `web.weft.local.` and refuses invalid
//! labels with a message fit for the CLI. `dns-add` without a container can
//! use a fixed ID such as `weft:extern`. `dns-lookup`: `r.lookup(name)`;
//! `status dns`: `r.counts()`, `r.entries()`, `stats.snapshot()`,
//! `dns.udp_addrs()`. Metrics: the counters of [`server::DnsStats`], the
//! sizes of [`records::Counts`] and the entries dropped unverified,
//! [`records::Refusals`] (`r.refusals()`).
//!
//! Logging: hickory-server logs every TCP query at INFO from target
//! `hickory_server`; add `hickory_server=warn` to the daemon's default filter.

pub mod records;
pub mod server;

pub use records::{
    encode_entries, relative_name, validate_name, Counts, Entry, Error, Output, Records, Refusals,
    Registration, SenderRefusals, SignedEntry, ZoneView, DOMAIN_DNS,
};
pub use server::{serve, DnsConfig, DnsStats, ServeError, ServerHandle, StatsSnapshot};

/// The gossip channel's name.
pub const CHANNEL: &str = "dns";
