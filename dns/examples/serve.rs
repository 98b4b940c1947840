//! Runs weft's DNS server alone with a fixed set of names, for benchmarks and
//! manual testing (`bench/dns-qps.sh`).
//!
//! ```text
//! cargo run --release -p weft-dns --example serve -- \
//!     --listen 127.0.0.1:5353 --names web=10.32.0.1,web=10.32.0.2,db=fd00::5 \
//!     [--names-file FILE] [--domain weft.local] [--ttl 1] [--upstream 127.0.0.1:5300]... \
//!     [--reverse 10.32.0.0/12]... [--threads 2]
//! ```
//!
//! A names file has one `NAME ADDRESS` or `NAME=ADDRESS` per line (`#` comments).
//! Without `--upstream`, nothing is forwarded (queries outside the zone get
//! REFUSED); `--upstream resolv.conf` uses the host's resolvers. Runs until
//! SIGINT or SIGTERM, then prints the counters to stderr.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use weft_dns::records::Records;
use weft_dns::server::{serve, DnsConfig, DnsStats};
use weft_proto::PeerName;

fn usage(msg: &str) -> ExitCode {
    eprintln!("serve: {msg}\nusage: serve --listen ADDR:PORT [--names N=IP,...] [--names-file FILE] [--domain D] [--ttl S] [--upstream ADDR:PORT|resolv.conf]... [--reverse IP/LEN]... [--threads N]");
    ExitCode::from(2)
}

fn parse_pair(s: &str) -> Result<(String, IpAddr), String> {
    let (n, a) = s
        .split_once('=')
        .or_else(|| s.split_once(char::is_whitespace))
        .ok_or(format!("{s:?}: expected NAME=ADDRESS"))?;
    let a: IpAddr = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    Ok((n.trim().to_owned(), a))
}

fn main() -> ExitCode {
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut names: Vec<(String, IpAddr)> = Vec::new();
    let mut domain = weft_dns::server::DEFAULT_DOMAIN.to_owned();
    let mut ttl = weft_dns::server::DEFAULT_TTL;
    let mut upstreams: Option<Vec<SocketAddr>> = Some(Vec::new());
    let mut reverse = Vec::new();
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage(&format!("{a} needs a value"));
        };
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--listen" => listen.push(v.parse().map_err(|e| format!("--listen {v}: {e}"))?),
                "--names" => {
                    for p in v.split(',').filter(|p| !p.is_empty()) {
                        names.push(parse_pair(p)?);
                    }
                }
                "--names-file" => {
                    let text = std::fs::read_to_string(&v).map_err(|e| format!("{v}: {e}"))?;
                    for l in text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    {
                        names.push(parse_pair(l)?);
                    }
                }
                "--domain" => domain = v,
                "--ttl" => ttl = v.parse().map_err(|e| format!("--ttl {v}: {e}"))?,
                "--upstream" if v == "resolv.conf" => upstreams = None,
                "--upstream" => upstreams
                    .get_or_insert_with(Vec::new)
                    .push(v.parse().map_err(|e| format!("--upstream {v}: {e}"))?),
                "--reverse" => {
                    let (ip, len) = v
                        .split_once('/')
                        .ok_or(format!("--reverse {v}: expected IP/LEN"))?;
                    reverse.push((
                        ip.parse().map_err(|e| format!("--reverse {v}: {e}"))?,
                        len.parse().map_err(|e| format!("--reverse {v}: {e}"))?,
                    ));
                }
                "--threads" => threads = v.parse().map_err(|e| format!("--threads {v}: {e}"))?,
                _ => return Err(format!("unknown option {a}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            return usage(&e);
        }
    }
    if listen.is_empty() {
        return usage("--listen is required");
    }
    // The entries are never gossiped here: any key will do, a fixed one.
    let key = match weft_proto::SigningKey::from_seed(&[1; 32]) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut records = Records::new(PeerName::from_u64(1), 1, key);
    for (i, (n, a)) in names.iter().enumerate() {
        let n = match weft_dns::records::relative_name(n, &domain) {
            Ok(n) => n,
            Err(e) => return usage(&e.to_string()),
        };
        if let Err(e) = records.add(&format!("c{i}"), &n, *a) {
            return usage(&e.to_string());
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("serve: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut cfg = DnsConfig::new(listen);
        cfg.domain = domain;
        cfg.ttl = ttl;
        cfg.upstreams = upstreams;
        cfg.reverse_ranges = reverse;
        let stats = Arc::new(DnsStats::default());
        let handle = match serve(cfg, records.view(), stats.clone()).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("serve: {e}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!(
            "serve: {} names, listening on {:?}",
            records.counts().names,
            handle.udp_addrs()
        );
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("serve: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        handle.shutdown().await;
        eprintln!("serve: {:?}", stats.snapshot());
        ExitCode::SUCCESS
    })
}

