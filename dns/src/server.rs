//! The DNS server: answers names under the zone (`weft.local.` by default)
//! from a [`ZoneView`], PTR queries for container addresses, and forwards the
//! rest to upstream resolvers.
//!
//! Built on hickory-server: its `Server` runs the TCP listeners, and its
//! message types (`Request`, `MessageResponse`) parse, truncate and encode for
//! both transports. UDP has its own receive loops: hickory's UDP path spawns a
//! task and hops through a channel for every query, and on the 2-core
//! benchmark machine it served 0.7x the rate of these loops, below dnsmasq;
//! here zone answers are encoded and sent from the loop that received the
//! query, and only forwarded queries get a task.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::{DnsError, NetError};
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_server::resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::resolver::{Resolver, TokioResolver};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use hickory_server::Server;
use serde::Serialize;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::records::ZoneView;

/// The default zone.
pub const DEFAULT_DOMAIN: &str = "weft.local";
/// The default TTL of answers, seconds: short, since containers come and go.
pub const DEFAULT_TTL: u32 = 1;
/// How long an upstream gets to answer before the client gets SERVFAIL. Below
/// glibc's 5 s so the client sees the SERVFAIL rather than its own timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest UDP answer we send to a client that advertises more (EDNS); the
/// DNS flag day 2020 figure, which avoids IP fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Where to listen, UDP and TCP on each (e.g. the bridge address, port 53).
    /// Port 0 picks a free port (tests); see [`ServerHandle::udp_addrs`].
    pub listen: Vec<SocketAddr>,
    /// The zone, e.g. `weft.local` (trailing dot optional).
    pub domain: String,
    /// TTL of answers and of negative answers, seconds.
    pub ttl: u32,
    /// Upstream resolvers; `None` reads `nameserver` lines from `/etc/resolv.conf`.
    /// An empty list disables forwarding (queries outside the zone get REFUSED).
    pub upstreams: Option<Vec<SocketAddr>>,
    /// Address ranges (address, prefix length) whose reverse names we answer
    /// authoritatively: NXDOMAIN for addresses without a name. Pass the IPAM
    /// range. Reverse queries outside them are forwarded unless we know a name.
    pub reverse_ranges: Vec<(IpAddr, u8)>,
    /// How long upstreams get per query.
    pub upstream_timeout: Duration,
    /// A TCP connection that sends no query for this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl DnsConfig {
    /// Defaults: zone `weft.local`, TTL 1 s, upstreams from `/etc/resolv.conf`,
    /// no reverse ranges, 2 s upstream timeout.
    pub fn new(listen: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig {
            listen,
            domain: DEFAULT_DOMAIN.into(),
            ttl: DEFAULT_TTL,
            upstreams: None,
            reverse_ranges: Vec::new(),
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters the shell exports as metrics. All relaxed atomics.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// A queries.
    pub queries_a: AtomicU64,
    /// AAAA queries.
    pub queries_aaaa: AtomicU64,
    /// PTR queries.
    pub queries_ptr: AtomicU64,
    /// Queries of any other type, and messages without a usable question.
    pub queries_other: AtomicU64,
    /// Answers with NOERROR (including empty ones).
    pub noerror: AtomicU64,
    /// NXDOMAIN answers.
    pub nxdomain: AtomicU64,
    /// SERVFAIL answers.
    pub servfail: AtomicU64,
    /// FORMERR answers (malformed queries over UDP).
    pub formerr: AtomicU64,
    /// REFUSED answers.
    pub refused: AtomicU64,
    /// Answers with another code (NOTIMP, BADVERS, ...).
    pub other_rcode: AtomicU64,
    /// UDP answers cut short with the TC bit (the client retries over TCP).
    pub truncated: AtomicU64,
    /// Queries answered from the zone (or the reverse ranges).
    pub local: AtomicU64,
    /// Queries forwarded upstream.
    pub forwarded: AtomicU64,
    /// Forwarded queries that failed upstream (timeout, unreachable, an error
    /// code such as SERVFAIL or REFUSED from every upstream).
    pub upstream_failures: AtomicU64,
    /// UDP datagrams dropped without an answer (shorter than a DNS header,
    /// or a response sent to us).
    pub dropped: AtomicU64,
}

/// A copy of [`DnsStats`] for JSON output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub queries_a: u64,
    pub queries_aaaa: u64,
    pub queries_ptr: u64,
    pub queries_other: u64,
    pub noerror: u64,
    pub nxdomain: u64,
    pub servfail: u64,
    pub formerr: u64,
    pub refused: u64,
    pub other_rcode: u64,
    pub truncated: u64,
    pub local: u64,
    pub forwarded: u64,
    pub upstream_failures: u64,
    pub dropped: u64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl DnsStats {
    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            queries_a: g(&self.queries_a),
            queries_aaaa: g(&self.queries_aaaa),
            queries_ptr: g(&self.queries_ptr),
            queries_other: g(&self.queries_other),
            noerror: g(&self.noerror),
            nxdomain: g(&self.nxdomain),
            servfail: g(&self.servfail),
            formerr: g(&self.formerr),
            refused: g(&self.refused),
            other_rcode: g(&self.other_rcode),
            truncated: g(&self.truncated),
            local: g(&self.local),
            forwarded: g(&self.forwarded),
            upstream_failures: g(&self.upstream_failures),
            dropped: g(&self.dropped),
        }
    }

    fn count_type(&self, t: RecordType) {
        inc(match t {
            RecordType::A => &self.queries_a,
            RecordType::AAAA => &self.queries_aaaa,
            RecordType::PTR => &self.queries_ptr,
            _ => &self.queries_other,
        });
    }

    fn count_result(&self, info: &ResponseInfo) {
        inc(match info.response_code {
            ResponseCode::NoError => &self.noerror,
            ResponseCode::NXDomain => &self.nxdomain,
            ResponseCode::ServFail => &self.servfail,
            ResponseCode::FormErr => &self.formerr,
            ResponseCode::Refused => &self.refused,
            _ => &self.other_rcode,
        });
        if info.truncation {
            inc(&self.truncated);
        }
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A socket could not be bound.
    #[error("cannot listen for DNS on {proto} {addr}: {source}{hint}", hint = bind_hint(.source, .addr))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        proto: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The configuration is unusable.
    #[error("DNS configuration: {0}")]
    Config(String),
}

fn bind_hint(e: &io::Error, addr: &SocketAddr) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            " (another DNS server, e.g. dnsmasq or systemd-resolved, holds port {}: stop it, or give weft another address with --dns-listen)",
            addr.port()
        ),
        io::ErrorKind::AddrNotAvailable => " (no interface has this address: is the bridge up?)".into(),
        io::ErrorKind::PermissionDenied => format!(" (ports below 1024 need root or CAP_NET_BIND_SERVICE; port {})", addr.port()),
        _ => String::new(),
    }
}

/// A running server. [`ServerHandle::shutdown`] stops it; dropping the handle
/// stops it too (its tasks are aborted), so keep it for as long as it should run.
pub struct ServerHandle {
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .finish()
    }
}

impl ServerHandle {
    /// The bound UDP addresses (ports resolved), in `listen` order.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// The bound TCP addresses, in `listen` order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// Stops listening and waits for the loops to end. Forwarded queries in
    /// flight are dropped.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Reads the `nameserver` lines of a resolv.conf (port 53; IPv6 zone suffixes
/// such as `%eth0` are dropped).
pub fn read_resolv_conf(path: &Path) -> io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse_resolv_conf(&text))
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next() != Some("nameserver") {
                return None;
            }
            let a = w.next()?;
            let a = a.split('%').next().unwrap_or(a);
            a.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Starts the server: binds UDP and TCP on every `listen` address, then
/// answers until [`ServerHandle::shutdown`]. Must run inside a tokio runtime.
///
/// Upstreams that are one of our own listen addresses are left out (a host
/// whose resolv.conf points at weft would loop).
pub async fn serve(
    cfg: DnsConfig,
    view: ZoneView,
    stats: Arc<DnsStats>,
) -> Result<ServerHandle, ServeError> {
    let mut handler = Handler::new(&cfg, view, stats.clone())?;
    let mut udp_socks = Vec::new();
    let mut tcp_socks = Vec::new();
    for addr in &cfg.listen {
        let u = bind_udp(*addr).map_err(|source| ServeError::Bind {
            addr: *addr,
            proto: "UDP",
            source,
        })?;
        // TCP on the port UDP got, so a port of 0 gives one port for both.
        let uaddr = u.local_addr().map_err(|source| ServeError::Bind {
            addr: *addr,
            proto: "UDP",
            source,
        })?;
        let t = TcpListener::bind(uaddr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: uaddr,
                proto: "TCP",
                source,
            })?;
        udp_socks.push(u);
        tcp_socks.push(t);
    }
    let upstreams = match &cfg.upstreams {
        Some(u) => u.clone(),
        None => read_resolv_conf(Path::new("/etc/resolv.conf")).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read /etc/resolv.conf: names outside the zone will not be forwarded");
            Vec::new()
        }),
    };
    let udp: Vec<SocketAddr> = udp_socks
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect();
    let tcp: Vec<SocketAddr> = tcp_socks
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect();
    let upstreams: Vec<SocketAddr> = upstreams
        .into_iter()
        .filter(|u| !udp.contains(u) && !is_our_wildcard(u, &udp))
        .collect();
    if upstreams.is_empty() {
        tracing::warn!(
            "no upstream resolvers: DNS queries outside {} get REFUSED",
            cfg.domain
        );
    }
    handler.forwarder = if upstreams.is_empty() {
        None
    } else {
        forwarder(&upstreams, cfg.upstream_timeout)
    };
    let handler = Arc::new(handler);

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for sock in udp_socks {
        let sock = Arc::new(sock);
        for _ in 0..UDP_LOOPS_PER_SOCKET {
            tasks.spawn(udp_loop(sock.clone(), handler.clone(), stop_rx.clone()));
        }
    }
    let mut server = Server::new(TcpHandler(handler.clone()));
    for t in tcp_socks {
        server.register_listener(t, cfg.tcp_idle_timeout, 64);
    }
    let mut rx = stop_rx;
    tasks.spawn(async move {
        let _ = rx.wait_for(|s| *s).await;
        if let Err(e) = server.shutdown_gracefully().await {
            tracing::warn!(error = %e, "DNS TCP listener ended with an error");
        }
    });
    tracing::info!(?udp, upstreams = ?upstreams, domain = %cfg.domain, "DNS server listening");
    Ok(ServerHandle {
        udp,
        tcp,
        stop,
        tasks,
    })
}

fn is_our_wildcard(u: &SocketAddr, ours: &[SocketAddr]) -> bool {
    // Listening on 0.0.0.0:53 also means 127.0.0.1:53 etc. are us.
    ours.iter().any(|o| {
        o.ip().is_unspecified()
            && o.port() == u.port()
            && (u.ip().is_loopback() || u.ip().is_unspecified())
    })
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

fn forwarder(upstreams: &[SocketAddr], timeout: Duration) -> Option<TokioResolver> {
    let servers = upstreams
        .iter()
        .map(|u| {
            let mut udp = ConnectionConfig::udp();
            udp.port = u.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = u.port();
            NameServerConfig::new(u.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.preserve_intermediates = true;
    opts.ndots = 0;
    opts.cache_size = 4096;
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    );
    *b.options_mut() = opts;
    // Building fails only for TLS/DNSSEC settings, which we do not use.
    b.build().map_err(|e| tracing::error!(error = %e, "cannot build the DNS forwarder: nothing will be forwarded")).ok()
}

/// What one query gets.
struct Answer {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Answer {
    fn code(code: ResponseCode) -> Answer {
        Answer {
            code,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

enum Route {
    Local(Answer),
    Forward,
}

/// Answers queries. One per server, shared by every loop.
struct Handler {
    domain: LowerName,
    domain_labels: usize,
    soa: Record,
    ttl: u32,
    view: ZoneView,
    reverse_ranges: Vec<(IpAddr, u8)>,
    /// `None`: nothing is forwarded (REFUSED).
    forwarder: Option<TokioResolver>,
    upstream_timeout: Duration,
    stats: Arc<DnsStats>,
    /// Rotates the order of answers: query n starts at address n mod count.
    rotation: AtomicUsize,
}

impl Handler {
    fn new(cfg: &DnsConfig, view: ZoneView, stats: Arc<DnsStats>) -> Result<Handler, ServeError> {
        let d = cfg.domain.trim_end_matches('.');
        crate::records::validate_name(d)
            .map_err(|e| ServeError::Config(format!("--dns-domain {d}: {e}")))?;
        let name = Name::from_ascii(format!("{}.", d.to_ascii_lowercase()))
            .map_err(|e| ServeError::Config(format!("--dns-domain {d}: {e}")))?;
        let rname = name
            .prepend_label("hostmaster")
            .map_err(|e| ServeError::Config(format!("--dns-domain {d}: {e}")))?;
        for (a, p) in &cfg.reverse_ranges {
            let max = if a.is_ipv4() { 32 } else { 128 };
            if *p > max {
                return Err(ServeError::Config(format!(
                    "reverse range {a}/{p}: the prefix length is over {max}"
                )));
            }
        }
        // Negative answers are cached for min(SOA TTL, minimum): keep both at
        // the TTL so a new name is seen as soon as a positive answer would be.
        let soa = SOA::new(name.clone(), rname, 1, 3600, 600, 86400, cfg.ttl);
        let soa = Record::from_rdata(name.clone(), cfg.ttl, RData::SOA(soa));
        Ok(Handler {
            domain_labels: usize::from(name.num_labels()),
            domain: LowerName::from(name),
            soa,
            ttl: cfg.ttl,
            view,
            reverse_ranges: cfg.reverse_ranges.clone(),
            forwarder: None,
            upstream_timeout: cfg.upstream_timeout,
            stats,
            rotation: AtomicUsize::new(0),
        })
    }

    /// The query name relative to the zone, if it is in the zone: `Some("")`
    /// for the apex, `Some("web")`, or `None` outside. A label with characters
    /// no entry can have yields `Some` of something that matches nothing.
    fn relative(&self, name: &LowerName) -> Option<String> {
        if !self.domain.zone_of(name) {
            return None;
        }
        let n = usize::from(name.num_labels()).saturating_sub(self.domain_labels);
        let mut s = String::new();
        for (i, label) in name.iter().take(n).enumerate() {
            if i > 0 {
                s.push('.');
            }
            for &b in label {
                if b.is_ascii_alphanumeric() || b == b'-' {
                    s.push(char::from(b.to_ascii_lowercase()));
                } else {
                    // Cannot match an entry (names are validated); keep it non-empty.
                    s.push('\u{0}');
                }
            }
        }
        Some(s)
    }

    fn route(&self, name: &LowerName, qname: &Name, qtype: RecordType, qclass: DNSClass) -> Route {
        if let Some(rel) = self.relative(name) {
            if qclass != DNSClass::IN && qclass != DNSClass::ANY {
                return Route::Local(Answer::code(ResponseCode::Refused));
            }
            return Route::Local(self.zone_answer(&rel, qname, qtype));
        }
        // A single label that names a container (`web.`): answered from the zone, as if the
        // zone's name followed. Docker's embedded resolver passes such names on as they are.
        if name.num_labels() == 1 && matches!(qclass, DNSClass::IN | DNSClass::ANY) {
            if let Some(label) = name.iter().next() {
                let rel = String::from_utf8_lossy(label).to_ascii_lowercase();
                if self.view.read().lookup(&rel).is_some() {
                    return Route::Local(self.zone_answer(&rel, qname, qtype));
                }
            }
        }
        if let Ok(net) = name.parse_arpa_name() {
            let addr = net.addr();
            let full = net.prefix_len() == net.max_prefix_len();
            let ours = self
                .reverse_ranges
                .iter()
                .any(|(a, p)| net.prefix_len() >= *p && prefix_eq(*a, addr, *p));
            let class_ok = qclass == DNSClass::IN || qclass == DNSClass::ANY;
            if full && class_ok {
                let names = self.view.read().reverse(&addr).cloned();
                if let Some(names) = names {
                    return Route::Local(self.ptr_answer(&names, qname, qtype));
                }
            }
            if ours && class_ok {
                let mut a = Answer::code(if full {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                });
                a.authoritative = true;
                return Route::Local(a);
            }
        }
        Route::Forward
    }

    fn zone_answer(&self, rel: &str, qname: &Name, qtype: RecordType) -> Answer {
        let mut a = Answer::code(ResponseCode::NoError);
        a.authoritative = true;
        if rel.is_empty() {
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                a.answers.push(self.soa.clone());
            } else {
                a.authorities.push(self.soa.clone());
            }
            return a;
        }
        let zone = self.view.read();
        let Some(addrs) = zone.lookup(rel).cloned() else {
            if !zone.exists(rel) {
                a.code = ResponseCode::NXDomain;
            }
            drop(zone);
            a.authorities.push(self.soa.clone());
            return a;
        };
        drop(zone);
        let want = |ip: &IpAddr| match qtype {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            RecordType::ANY => true,
            _ => false,
        };
        let n = addrs.len();
        let start = if n > 1 {
            self.rotation.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        for i in 0..n {
            let ip = addrs[(start + i) % n];
            if !want(&ip) {
                continue;
            }
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            a.answers
                .push(Record::from_rdata(qname.clone(), self.ttl, rdata));
        }
        if a.answers.is_empty() {
            a.authorities.push(self.soa.clone());
        }
        a
    }

    fn ptr_answer(&self, names: &[String], qname: &Name, qtype: RecordType) -> Answer {
        let mut a = Answer::code(ResponseCode::NoError);
        a.authoritative = true;
        if matches!(qtype, RecordType::PTR | RecordType::ANY) {
            for n in names {
                let Ok(target) = Name::from_ascii(n).and_then(|t| t.append_domain(&self.domain))
                else {
                    continue;
                };
                a.answers.push(Record::from_rdata(
                    qname.clone(),
                    self.ttl,
                    RData::PTR(PTR(target)),
                ));
            }
        }
        a
    }

    async fn forward(&self, name: &LowerName, qtype: RecordType) -> Answer {
        let Some(resolver) = &self.forwarder else {
            return Answer::code(ResponseCode::Refused);
        };
        inc(&self.stats.forwarded);
        let name: Name = Name::from(name.clone());
        // The resolver has its own timeout per upstream; this bounds the whole.
        let limit = self.upstream_timeout * 2 + Duration::from_millis(100);
        let r = tokio::time::timeout(limit, resolver.lookup(name, qtype)).await;
        match r {
            Ok(Ok(lookup)) => Answer {
                code: ResponseCode::NoError,
                authoritative: false,
                answers: lookup.answers().to_vec(),
                authorities: lookup.authorities().to_vec(),
                additionals: lookup
                    .additionals()
                    .iter()
                    .filter(|r| r.record_type() != RecordType::OPT)
                    .cloned()
                    .collect(),
            },
            Ok(Err(NetError::Dns(DnsError::NoRecordsFound(nr)))) => {
                let mut a = Answer::code(nr.response_code);
                if let Some(auth) = nr.authorities.as_deref() {
                    a.authorities = auth.to_vec();
                } else if let Some(soa) = nr.soa {
                    a.authorities.push(soa.into_record_of_rdata());
                }
                a
            }
            Ok(Err(NetError::Dns(DnsError::ResponseCode(code)))) => {
                // SERVFAIL, REFUSED, ... from every upstream: passed on as is.
                inc(&self.stats.upstream_failures);
                Answer::code(code)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream DNS lookup failed");
                inc(&self.stats.upstream_failures);
                Answer::code(ResponseCode::ServFail)
            }
            Err(_) => {
                tracing::debug!("upstream DNS lookup timed out");
                inc(&self.stats.upstream_failures);
                Answer::code(ResponseCode::ServFail)
            }
        }
    }

    /// Where a well-formed single-question query goes; `None` for requests
    /// [`Handler::answer`] refuses before routing.
    fn route_request(&self, request: &Request) -> Option<Route> {
        if request.metadata.op_code != OpCode::Query
            || request.edns.as_ref().is_some_and(|e| e.version() > 0)
        {
            return None;
        }
        match request.queries.queries() {
            [q] => Some(self.route(
                q.name(),
                q.original().name(),
                q.query_type(),
                q.query_class(),
            )),
            _ => None,
        }
    }

    /// Answers one parsed request through `rh`; `route` if the caller routed it already.
    async fn answer<R: ResponseHandler>(
        &self,
        request: &Request,
        mut rh: R,
        route: Option<Route>,
    ) -> ResponseInfo {
        let mut resp_edns = None;
        if let Some(req) = request.edns.as_ref() {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e.set_version(0);
            resp_edns = Some(e);
        }
        let queries = request.queries.queries();
        let code = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Some(ResponseCode::BADVERS)
        } else if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else if queries.len() != 1 {
            Some(ResponseCode::FormErr)
        } else {
            None
        };
        if let Some(code) = code {
            inc(&self.stats.queries_other);
            let b = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
            return self
                .send(request, &mut rh, b.error_msg(&request.metadata, code))
                .await;
        }
        let q = &queries[0];
        let qtype = q.query_type();
        self.stats.count_type(qtype);
        let qname = q.original().name();
        let route = route.unwrap_or_else(|| self.route(q.name(), qname, qtype, q.query_class()));
        let answer = match route {
            Route::Local(a) => {
                inc(&self.stats.local);
                a
            }
            Route::Forward => self.forward(q.name(), qtype).await,
        };
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.response_code = answer.code;
        meta.authoritative = answer.authoritative;
        meta.recursion_available = self.forwarder.is_some();
        let b = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
        let resp = b.build(
            meta,
            answer.answers.iter(),
            answer.authorities.iter(),
            std::iter::empty(),
            answer.additionals.iter(),
        );
        self.send(request, &mut rh, resp).await
    }

    async fn send<'a, R: ResponseHandler>(
        &self,
        request: &Request,
        rh: &mut R,
        resp: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> ResponseInfo {
        match rh.send_response(resp).await {
            Ok(info) => {
                self.stats.count_result(&info);
                info
            }
            Err(e) => {
                tracing::debug!(error = %e, src = %request.src(), "cannot send a DNS answer");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// `a` and `b` agree on their first `p` bits (and are of one family).
fn prefix_eq(a: IpAddr, b: IpAddr, p: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = if p == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(p.min(32)))
            };
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = if p == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(p.min(128)))
            };
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// The handler as hickory's `Server` (TCP) calls it.
struct TcpHandler(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0.answer(request, response_handle, None).await
    }
}

/// Sends an encoded answer on a UDP socket, straight from the loop.
#[derive(Clone)]
struct UdpResponder {
    sock: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = response
            .edns()
            .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        let mut buf = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut buf);
        let mut info = response.destructive_emit(&mut enc)?;
        if buf.len() > usize::from(max) {
            // Cut at a record boundary ourselves rather than let the encoder
            // stop at the limit: it would drop the OPT record too (RFC 6891
            // wants it in truncated answers as well).
            let Some(counts) = truncate_udp(&mut buf, usize::from(max)) else {
                return Err(NetError::from("cannot truncate our own answer"));
            };
            let mut metadata = *info;
            metadata.truncation = true;
            info = ResponseInfo::from(Header { metadata, counts });
        }
        self.sock
            .send_to(&buf, self.dst)
            .await
            .map_err(NetError::from)?;
        Ok(info)
    }
}

/// Receive loops per UDP socket: one answers while the other waits in
/// recvmsg, which keeps two cores busy under load (measured: 1 loop on 2
/// worker threads gave 0.6x the rate of 2 loops; 4 loops no more than 2).
const UDP_LOOPS_PER_SOCKET: usize = 2;

/// Cuts an encoded answer to at most `max` bytes for UDP: the header and
/// question, as many answer records as fit, no authority or additional
/// records except the OPT record (kept when there was one), TC set. Returns the
/// new counts, or `None` if the message does not walk (not one of ours).
fn truncate_udp(buf: &mut Vec<u8>, max: usize) -> Option<HeaderCounts> {
    fn skip_name(b: &[u8], mut pos: usize) -> Option<usize> {
        loop {
            let len = *b.get(pos)?;
            match len & 0xc0 {
                0 if len == 0 => return Some(pos + 1),
                0 => pos += 1 + usize::from(len),
                0xc0 => return Some(pos + 2),
                _ => return None,
            }
        }
    }
    fn skip_record(b: &[u8], pos: usize) -> Option<usize> {
        let p = skip_name(b, pos)?;
        let rdlen = usize::from(u16::from_be_bytes([*b.get(p + 8)?, *b.get(p + 9)?]));
        let end = p + 10 + rdlen;
        (end <= b.len()).then_some(end)
    }
    let count = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *buf.get(i)?,
            *buf.get(i + 1)?,
        ])))
    };
    let (qd, an, ns, ar) = (count(4)?, count(6)?, count(8)?, count(10)?);
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(buf, pos)? + 4;
    }
    let mut starts = Vec::with_capacity(an + ns + ar);
    for _ in 0..an + ns + ar {
        starts.push(pos);
        pos = skip_record(buf, pos)?;
    }
    // The OPT record, if any, is the last one (we never sign answers).
    let opt = match starts.last() {
        Some(&s) if ar > 0 => {
            let t = skip_name(buf, s)?;
            (buf.get(t..t + 2)? == [0, 41]).then(|| buf[s..pos].to_vec())
        }
        _ => None,
    };
    let room = max.checked_sub(opt.as_ref().map_or(0, Vec::len))?;
    let mut keep = 0;
    let mut cut = *starts.first().unwrap_or(&pos);
    for i in 0..an {
        let end = starts.get(i + 1).copied().unwrap_or(pos);
        if end > room {
            break;
        }
        keep = i + 1;
        cut = end;
    }
    if cut > room {
        return None;
    }
    buf.truncate(cut);
    let ar = u16::from(opt.is_some());
    if let Some(o) = opt {
        buf.extend_from_slice(&o);
    }
    let keep = u16::try_from(keep).ok()?;
    buf[2] |= 0x02;
    buf[6..8].copy_from_slice(&keep.to_be_bytes());
    buf[8..10].copy_from_slice(&[0, 0]);
    buf[10..12].copy_from_slice(&ar.to_be_bytes());
    Some(HeaderCounts {
        queries: u16::try_from(qd).ok()?,
        answers: keep,
        authorities: 0,
        additionals: ar,
    })
}

/// Forwarded queries one UDP loop keeps in flight at most.
const MAX_FORWARDS_PER_LOOP: usize = 1024;

/// Receives queries on one UDP socket. Zone answers are sent inline; queries
/// to forward get a task each so a slow upstream holds up nobody.
async fn udp_loop(sock: Arc<UdpSocket>, h: Arc<Handler>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 4096];
    let mut forwards: JoinSet<()> = JoinSet::new();
    loop {
        let (len, src) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends surface here on Linux; keep going.
                    tracing::trace!(error = %e, "DNS UDP receive error");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        while forwards.try_join_next().is_some() {}
        let Some(raw) = buf.get(..len) else { continue };
        if src.port() == 0 || src.ip().is_unspecified() {
            inc(&h.stats.dropped);
            continue;
        }
        let request = match Request::from_bytes(raw.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(e) => {
                formerr(&sock, &h, raw, src, &e.to_string()).await;
                continue;
            }
        };
        if request.metadata.message_type == MessageType::Response {
            inc(&h.stats.dropped);
            continue;
        }
        let rh = UdpResponder {
            sock: sock.clone(),
            dst: src,
        };
        let route = h.route_request(&request);
        let forward = matches!(route, Some(Route::Forward));
        if forward && forwards.len() < MAX_FORWARDS_PER_LOOP {
            let h = h.clone();
            forwards.spawn(async move {
                h.answer(&request, rh, route).await;
            });
        } else if forward {
            // Too many queries waiting on upstreams: shed load rather than queue without bound.
            inc(&h.stats.upstream_failures);
            let b = MessageResponseBuilder::new(&request.queries, None);
            let mut rh = rh;
            h.send(
                &request,
                &mut rh,
                b.error_msg(&request.metadata, ResponseCode::ServFail),
            )
            .await;
        } else {
            h.answer(&request, rh, route).await;
        }
    }
    forwards.shutdown().await;
}

/// Answers a datagram that does not parse: FORMERR echoing its ID when it has
/// a header, nothing otherwise.
async fn formerr(sock: &UdpSocket, h: &Handler, raw: &[u8], src: SocketAddr, why: &str) {
    tracing::debug!(%src, error = why, "malformed DNS query");
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        // Shorter than a header, or a response (never answer those: reflection).
        inc(&h.stats.dropped);
        return;
    }
    inc(&h.stats.queries_other);
    inc(&h.stats.formerr);
    // ID, QR=1, the query's opcode and RD, RCODE=1, all counts 0.
    let out = [
        raw[0],
        raw[1],
        0x80 | (raw[2] & 0x79),
        0x01,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let _ = sock.send_to(&out, src).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let t = "# x\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch a\nnameserver bogus\n  nameserver 1.1.1.1 \n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
                "1.1.1.1:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(prefix_eq(ip("10.32.0.0"), ip("10.47.255.1"), 12));
        assert!(!prefix_eq(ip("10.32.0.0"), ip("10.48.0.1"), 12));
        assert!(prefix_eq(ip("10.32.0.0"), ip("1.2.3.4"), 0));
        assert!(prefix_eq(ip("fd00::"), ip("fd00::5"), 64));
        assert!(!prefix_eq(ip("fd00::"), ip("10.0.0.1"), 0));
    }

    #[test]
    fn bind_errors_say_what_to_do() {
        let e = ServeError::Bind {
            addr: "10.32.0.1:53".parse().unwrap(),
            proto: "UDP",
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        let s = e.to_string();
        assert!(
            s.contains("10.32.0.1:53") && s.contains("--dns-listen"),
            "{s}"
        );
    }
}
