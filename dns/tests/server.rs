//! The DNS server on loopback, queried with raw packets built by hickory's
//! message types. Upstreams are fake resolvers the tests run on 127.0.0.1;
//! nothing leaves the machine.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use weft_dns::records::Records;
use weft_dns::server::{serve, DnsConfig, DnsStats, ServeError, ServerHandle};
use weft_proto::PeerName;

const WAIT: Duration = Duration::from_secs(3);

struct Fixture {
    records: Records,
    stats: Arc<DnsStats>,
    server: ServerHandle,
}

impl Fixture {
    fn udp(&self) -> SocketAddr {
        self.server.udp_addrs()[0]
    }
    fn tcp(&self) -> SocketAddr {
        self.server.tcp_addrs()[0]
    }
}

/// A server on 127.0.0.1 (ephemeral port) serving `names`.
async fn start(names: &[(&str, &str)], tweak: impl FnOnce(&mut DnsConfig)) -> Fixture {
    let mut records = Records::new(PeerName::from_u64(1), 1, signing_key());
    for (i, (n, a)) in names.iter().enumerate() {
        records
            .add(&format!("c{i}"), n, a.parse().unwrap())
            .unwrap();
    }
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
    cfg.upstreams = Some(Vec::new());
    cfg.reverse_ranges = vec![("10.32.0.0".parse().unwrap(), 12)];
    tweak(&mut cfg);
    let stats = Arc::new(DnsStats::default());
    let server = serve(cfg, records.view(), stats.clone()).await.unwrap();
    assert_eq!(server.udp_addrs()[0].port(), server.tcp_addrs()[0].port());
    Fixture {
        records,
        stats,
        server,
    }
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.metadata.recursion_desired = true;
    m
}

async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(server: SocketAddr, m: &Message) -> Message {
    let bytes = m.to_vec().unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    assert!(n <= 1232, "UDP answer of {n} bytes");
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, m.metadata.id);
    assert_eq!(r.metadata.message_type, MessageType::Response);
    r
}

async fn tcp(server: SocketAddr, m: &Message) -> Message {
    let mut c = TcpStream::connect(server).await.unwrap();
    let bytes = m.to_vec().unwrap();
    c.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    c.write_all(&bytes).await.unwrap();
    let len = tokio::time::timeout(WAIT, c.read_u16())
        .await
        .expect("no answer")
        .unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    c.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn has_soa(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_and_aaaa() {
    let f = start(
        &[
            ("web", "10.32.0.1"),
            ("web", "fd00::1"),
            ("db", "10.32.0.2"),
        ],
        |_| {},
    )
    .await;
    let r = udp(f.udp(), &query("web.weft.local.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(addrs(&r), vec!["10.32.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(r.answers[0].ttl, 1, "default TTL is 1 s");
    let r = udp(f.udp(), &query("web.weft.local.", RecordType::AAAA)).await;
    assert_eq!(addrs(&r), vec!["fd00::1".parse::<IpAddr>().unwrap()]);
    // A name with no address of the asked family: NOERROR, no answer, SOA.
    let r = udp(f.udp(), &query("db.weft.local.", RecordType::AAAA)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty() && has_soa(&r));
    // Other types at a name that exists: NODATA too.
    let r = udp(f.udp(), &query("db.weft.local.", RecordType::MX)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty() && has_soa(&r));
    // The apex has an SOA.
    let r = udp(f.udp(), &query("weft.local.", RecordType::SOA)).await;
    assert_eq!(r.answers.len(), 1);
    assert!(matches!(r.answers[0].data, RData::SOA(_)));
    let s = f.stats.snapshot();
    assert_eq!((s.queries_a, s.queries_aaaa, s.queries_other), (1, 2, 2));
    assert_eq!((s.noerror, s.local, s.forwarded), (5, 5, 0));
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_three_addresses() {
    let f = start(
        &[
            ("web", "10.32.0.1"),
            ("web", "10.32.0.2"),
            ("web", "10.32.0.3"),
            ("one", "10.32.0.9"),
        ],
        |_| {},
    )
    .await;
    let mut firsts = BTreeSet::new();
    let mut orders = BTreeSet::new();
    for _ in 0..12 {
        let r = udp(f.udp(), &query("web.weft.local.", RecordType::A)).await;
        let a = addrs(&r);
        assert_eq!(
            a.iter().collect::<BTreeSet<_>>().len(),
            3,
            "all three every time: {a:?}"
        );
        firsts.insert(a[0]);
        orders.insert(a);
    }
    assert_eq!(firsts.len(), 3, "each address comes first in turn");
    assert!(orders.len() >= 3);
    // Over TCP too.
    let r = tcp(f.tcp(), &query("web.weft.local.", RecordType::A)).await;
    assert_eq!(addrs(&r).len(), 3);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_insensitive() {
    let f = start(&[("Web", "10.32.0.1"), ("db.Prod", "10.32.0.2")], |_| {}).await;
    for q in ["WEB.weft.local.", "wEb.WeFt.LoCaL.", "DB.PROD.WEFT.LOCAL."] {
        let r = udp(f.udp(), &query(q, RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{q}");
        assert_eq!(addrs(&r).len(), 1, "{q}");
        // The question comes back as asked (0x20-randomising resolvers check it).
        assert_eq!(r.queries[0].name().to_ascii(), q);
    }
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_for_unknown_names() {
    let f = start(&[("web", "10.32.0.1"), ("db.prod", "10.32.0.2")], |_| {}).await;
    for q in [
        "nope.weft.local.",
        "web.nope.weft.local.",
        "we_b.weft.local.",
    ] {
        let r = udp(f.udp(), &query(q, RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{q}");
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        let soa = r.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(s) => Some(s.clone()),
            _ => None,
        });
        let soa: SOA = soa.expect("SOA in authority");
        assert_eq!(
            soa.minimum, 1,
            "negative answers are cached for the TTL only"
        );
    }
    // The parent of a dotted name exists.
    let r = udp(f.udp(), &query("prod.weft.local.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(f.stats.snapshot().nxdomain, 3);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_follow_the_records() {
    let mut f = start(&[], |c| {
        c.domain = "Mesh.Example.".into();
        c.ttl = 5;
    })
    .await;
    let q = query("api.mesh.example.", RecordType::A);
    assert_eq!(
        udp(f.udp(), &q).await.metadata.response_code,
        ResponseCode::NXDomain
    );
    f.records
        .add("c1", "api", "10.32.1.1".parse().unwrap())
        .unwrap();
    let r = udp(f.udp(), &q).await;
    assert_eq!(addrs(&r), vec!["10.32.1.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(r.answers[0].ttl, 5);
    f.records.remove_container(1, "c1");
    assert_eq!(
        udp(f.udp(), &q).await.metadata.response_code,
        ResponseCode::NXDomain
    );
    // weft.local is not our zone now: forwarded, and no upstream → REFUSED.
    let r = udp(f.udp(), &query("api.weft.local.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptr_for_container_addresses() {
    let up = FakeUpstream::start().await;
    let f = start(
        &[
            ("web", "10.32.0.7"),
            ("www", "10.32.0.7"),
            ("v6", "fd00::7"),
        ],
        |c| {
            c.upstreams = Some(vec![up.addr]);
            c.reverse_ranges.push(("fd00::".parse().unwrap(), 64));
        },
    )
    .await;
    let ptrs = |m: &Message| -> BTreeSet<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect()
    };
    let r = udp(f.udp(), &query("7.0.32.10.in-addr.arpa.", RecordType::PTR)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(
        ptrs(&r),
        ["web.weft.local.".to_string(), "www.weft.local.".to_string()].into()
    );
    let v6 = Name::from("fd00::7".parse::<IpAddr>().unwrap());
    let r = udp(f.udp(), &query(&v6.to_ascii(), RecordType::PTR)).await;
    assert_eq!(ptrs(&r), ["v6.weft.local.".to_string()].into());
    // An address in the range without a name: NXDOMAIN, not forwarded.
    let r = udp(f.udp(), &query("8.0.32.10.in-addr.arpa.", RecordType::PTR)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.metadata.authoritative);
    // Outside the range: forwarded (the fake upstream answers any PTR).
    let r = udp(f.udp(), &query("1.2.0.192.in-addr.arpa.", RecordType::PTR)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ptrs(&r), ["upstream.test.".to_string()].into());
    let s = f.stats.snapshot();
    assert_eq!((s.queries_ptr, s.forwarded), (4, 1));
    f.server.shutdown().await;
    up.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_over_udp_and_go_whole_over_tcp() {
    let names: Vec<(String, String)> = (1..=100)
        .map(|i| ("big".to_string(), format!("10.32.1.{i}")))
        .collect();
    let names: Vec<(&str, &str)> = names
        .iter()
        .map(|(n, a)| (n.as_str(), a.as_str()))
        .collect();
    let f = start(&names, |_| {}).await;
    let q = query("big.weft.local.", RecordType::A);
    // Plain UDP: 512 bytes at most, TC set.
    let r = udp(f.udp(), &q).await;
    assert!(r.metadata.truncation, "TC bit");
    assert!(r.answers.len() < 100);
    let raw = udp_raw(f.udp(), &q.to_vec().unwrap()).await.unwrap();
    assert!(raw.len() <= 512, "{} bytes", raw.len());
    // EDNS asking for 4096: capped at 1232, still truncated.
    let mut qe = query("big.weft.local.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    qe.set_edns(edns);
    let r = udp(f.udp(), &qe).await;
    assert!(r.metadata.truncation);
    assert!(r.edns.is_some(), "EDNS answered with EDNS");
    // TCP: all of them.
    let r = tcp(f.tcp(), &q).await;
    assert!(!r.metadata.truncation);
    assert_eq!(addrs(&r).iter().collect::<BTreeSet<_>>().len(), 100);
    assert!(f.stats.snapshot().truncated >= 3);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_outside_the_zone() {
    let up = FakeUpstream::start().await;
    let f = start(&[("web", "10.32.0.1")], |c| {
        c.upstreams = Some(vec![up.addr])
    })
    .await;
    let r = udp(f.udp(), &query("example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(!r.metadata.authoritative);
    assert!(r.metadata.recursion_available);
    assert_eq!(addrs(&r), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    // The upstream's NXDOMAIN comes through.
    let r = udp(f.udp(), &query("nx.example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    // Over TCP too.
    let r = tcp(f.tcp(), &query("tcp.example.com.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    // Zone names are never forwarded.
    let before = up.seen();
    let r = udp(f.udp(), &query("web.weft.local.", RecordType::A)).await;
    assert_eq!(addrs(&r).len(), 1);
    let r = udp(f.udp(), &query("nope.weft.local.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(up.seen(), before);
    // A single label naming a container is answered here (Docker's resolver passes `web.` on
    // as it is); one that names none still goes upstream.
    let r = udp(f.udp(), &query("web.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["10.32.0.1".parse::<IpAddr>().unwrap()]);
    assert!(r.metadata.authoritative);
    let r = udp(f.udp(), &query("WEB.", RecordType::AAAA)).await;
    assert!(addrs(&r).is_empty() && r.metadata.response_code == ResponseCode::NoError);
    assert_eq!(up.seen(), before);
    let r = udp(f.udp(), &query("elsewhere.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(up.seen(), before + 1);
    let s = f.stats.snapshot();
    assert_eq!(s.forwarded, 4);
    assert_eq!(s.upstream_failures, 0);
    f.server.shutdown().await;
    up.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_when_upstreams_fail() {
    // One upstream that never answers (a bound socket nobody reads) and one
    // that is closed (nothing listens).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    for upstream in [silent.local_addr().unwrap(), closed] {
        let f = start(&[("web", "10.32.0.1")], |c| {
            c.upstreams = Some(vec![upstream]);
            c.upstream_timeout = Duration::from_millis(300);
        })
        .await;
        let t = Instant::now();
        let r = udp(f.udp(), &query("example.com.", RecordType::A)).await;
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::ServFail,
            "{upstream}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        // Zone names still answer while the upstream is down.
        let r = udp(f.udp(), &query("web.weft.local.", RecordType::A)).await;
        assert_eq!(addrs(&r).len(), 1);
        let s = f.stats.snapshot();
        assert_eq!((s.forwarded, s.upstream_failures, s.servfail), (1, 1, 1));
        f.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_or_nothing() {
    let f = start(&[("web", "10.32.0.1")], |_| {}).await;
    let id = [0x12, 0x34];
    // Shorter than a header: no answer.
    assert_eq!(
        udp_raw(f.udp(), &[0x12, 0x34, 0x01, 0x00, 0x00]).await,
        None
    );
    // A header saying one question, and nothing after it.
    let r = udp_raw(f.udp(), &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .expect("FORMERR");
    assert_formerr(&r, id);
    // Wrong counts: one question, then claims of 5 answers that are not there.
    let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 5, 0, 0, 0, 0];
    p.extend_from_slice(&[
        3, b'w', b'e', b'b', 4, b'w', b'e', b'f', b't', 5, b'l', b'o', b'c', b'a', b'l', 0, 0, 1,
        0, 1,
    ]);
    assert_formerr(&udp_raw(f.udp(), &p).await.expect("FORMERR"), id);
    // A compression pointer to itself (offset 12), and a two-pointer loop.
    let p = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ];
    assert_formerr(&udp_raw(f.udp(), &p).await.expect("FORMERR"), id);
    let p = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1,
    ];
    assert_formerr(&udp_raw(f.udp(), &p).await.expect("FORMERR"), id);
    // A label longer than the packet.
    let p = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'a', b'b',
    ];
    assert_formerr(&udp_raw(f.udp(), &p).await.expect("FORMERR"), id);
    // A response sent to us: ignored (no reflection).
    let mut resp = query("web.weft.local.", RecordType::A);
    resp.metadata.message_type = MessageType::Response;
    assert_eq!(udp_raw(f.udp(), &resp.to_vec().unwrap()).await, None);
    // Two questions: FORMERR. An UPDATE: NOTIMP. EDNS version 1: BADVERS.
    let mut two = query("web.weft.local.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("db.weft.local.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        udp(f.udp(), &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    let mut upd = query("weft.local.", RecordType::SOA);
    upd.metadata.op_code = OpCode::Update;
    assert_eq!(
        udp(f.udp(), &upd).await.metadata.response_code,
        ResponseCode::NotImp
    );
    let mut v1 = query("web.weft.local.", RecordType::A);
    let mut e = Edns::new();
    e.set_version(1);
    v1.set_edns(e);
    let r = udp(f.udp(), &v1).await;
    // Extended RCODE 16 (BADVERS; hickory decodes 16 as BADSIG, its TSIG twin).
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert!(r.edns.is_some());
    // A non-IN class in the zone: REFUSED.
    let mut chaos = Message::query();
    let mut q = Query::query(Name::from_ascii("web.weft.local.").unwrap(), RecordType::A);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    assert_eq!(
        udp(f.udp(), &chaos).await.metadata.response_code,
        ResponseCode::Refused
    );

    // Random garbage, and mutations of a good query: never a crash.
    let good = query("web.weft.local.", RecordType::A).to_vec().unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..3000 {
        let p: Vec<u8> = if i % 2 == 0 {
            let n = (next() % 80) as usize;
            (0..n).map(|_| next() as u8).collect()
        } else {
            let mut p = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % p.len();
                p[at] = next() as u8;
            }
            p.truncate(12 + (next() as usize) % (p.len() - 11));
            p
        };
        s.send_to(&p, f.udp()).await.unwrap();
        if i % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Garbage over TCP: a bogus length and bytes, then close.
    let mut c = TcpStream::connect(f.tcp()).await.unwrap();
    c.write_all(&[0, 5, 1, 2, 3, 4, 5, 0xff, 0xff, 9, 9])
        .await
        .unwrap();
    drop(c);
    // Still answering, on both transports.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = udp(f.udp(), &query("web.weft.local.", RecordType::A)).await;
    assert_eq!(addrs(&r).len(), 1);
    let r = tcp(f.tcp(), &query("web.weft.local.", RecordType::A)).await;
    assert_eq!(addrs(&r).len(), 1);
    let st = f.stats.snapshot();
    assert!(st.formerr >= 5, "{st:?}");
    assert!(st.dropped >= 2, "{st:?}");
    f.server.shutdown().await;
}

fn assert_formerr(raw: &[u8], id: [u8; 2]) {
    assert!(raw.len() >= 12);
    assert_eq!(&raw[..2], &id);
    assert_eq!(raw[2] & 0x80, 0x80, "QR set");
    assert_eq!(raw[3] & 0x0f, 1, "RCODE FORMERR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_errors_name_the_address_and_shutdown_frees_the_port() {
    let f = start(&[], |_| {}).await;
    let taken = f.udp();
    let mut cfg = DnsConfig::new(vec![taken]);
    cfg.upstreams = Some(Vec::new());
    let e = serve(
        cfg.clone(),
        Records::new(PeerName::from_u64(1), 1, signing_key()).view(),
        Arc::new(DnsStats::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ServeError::Bind { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains(&taken.to_string()) && msg.contains("--dns-listen"),
        "{msg}"
    );
    f.server.shutdown().await;
    // Freed: the same address binds now.
    let g = serve(
        cfg,
        Records::new(PeerName::from_u64(1), 1, signing_key()).view(),
        Arc::new(DnsStats::default()),
    )
    .await
    .unwrap();
    g.shutdown().await;
    // A bad domain is a configuration error.
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
    cfg.domain = "bad_domain".into();
    let e = serve(
        cfg,
        Records::new(PeerName::from_u64(1), 1, signing_key()).view(),
        Arc::new(DnsStats::default()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("bad_domain"), "{e}");
}

/// A tiny resolver on 127.0.0.1: A 192.0.2.1 for any name, NXDOMAIN for
/// names starting with `nx.`, PTR `upstream.test.` for reverse names. UDP and
/// TCP on one port.
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s1 = seen.clone();
        let t1 = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, src)) = udp.recv_from(&mut buf).await {
                s1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(out) = Self::answer(&buf[..n]) {
                    let _ = udp.send_to(&out, src).await;
                }
            }
        });
        let s2 = seen.clone();
        let t2 = tokio::spawn(async move {
            while let Ok((mut c, _)) = tcp.accept().await {
                let s2 = s2.clone();
                tokio::spawn(async move {
                    while let Ok(len) = c.read_u16().await {
                        let mut buf = vec![0u8; usize::from(len)];
                        if c.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        s2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(out) = Self::answer(&buf) else {
                            return;
                        };
                        let _ = c.write_all(&(out.len() as u16).to_be_bytes()).await;
                        let _ = c.write_all(&out).await;
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            seen,
            tasks: vec![t1, t2],
        }
    }

    fn answer(q: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(q).ok()?;
        let question = q.queries.first()?.clone();
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.recursion_desired = q.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.add_query(question.clone());
        let name = question.name().clone();
        if name.to_ascii().starts_with("nx.") {
            r.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(
                Name::from_ascii("test.").ok()?,
                Name::from_ascii("h.test.").ok()?,
                1,
                1,
                1,
                1,
                30,
            );
            r.add_authority(Record::from_rdata(
                Name::from_ascii("test.").ok()?,
                30,
                RData::SOA(soa),
            ));
        } else if question.query_type() == RecordType::PTR {
            let target = Name::from_ascii("upstream.test.").ok()?;
            r.add_answer(Record::from_rdata(
                name,
                30,
                RData::PTR(hickory_server::proto::rr::rdata::PTR(target)),
            ));
        } else if question.query_type() == RecordType::A {
            r.add_answer(Record::from_rdata(
                name,
                30,
                RData::A(A([192, 0, 2, 1].into())),
            ));
        }
        r.to_vec().ok()
    }

    fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// A signing key for the store (its entries are never gossiped here).
fn signing_key() -> weft_proto::SigningKey {
    match weft_proto::SigningKey::from_seed(&[1; 32]) {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}
