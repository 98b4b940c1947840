//! The wiring: loads the state, binds the ports, builds the parts and starts them, then waits for
//! the actor to stop and takes everything down. No decisions are made here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use weft_proto::switch::Limits;
use weft_proto::identity::Certificate;
use weft_proto::{Router, RouterConfig, Trust};

use crate::api::state::ApiState;
use crate::api::server::{serve_api, serve_metrics};
use crate::config::Options;
use crate::control::actor::{forward_signals, Actor};
use crate::control::fastpath::{Fastpath, Settings};
use crate::control::conn::{accept_loop, accept_quic, dial_on_request, resolve, Dialer, Introduction, TransportChoice};
use crate::control::quic::Quic;
use crate::control::handshake::{generate_keypair, Handshaker};
use crate::control::stats::ControlStats;
use crate::control::status::StatusInfo;
use crate::control::ControlHandle;
use crate::frame::links::Indices;
use crate::frame::tap::{tap_name, Tap, TAP_MTU};
use crate::frame::FramePath;
use crate::host::identity;
use crate::host::links::{bridge_mac, hw_addr};
use crate::host::sysctl::disable_ipv6;
use crate::host::NetDev;
use crate::password;
use crate::services::dns::DnsService;
use crate::services::identities::IdentityStore;
use crate::services::ipam::IpamService;
use crate::services::persist::{FileId, SaveGate, Writer};
use crate::services::{dns, dns_server, ipam};

/// Inputs queued for the actor before senders wait.
const INPUT_QUEUE: usize = 4096;
/// How long requests under way get to finish when the router stops.
const API_DRAIN: Duration = Duration::from_secs(3);

/// Runs the router until SIGTERM/SIGINT, `weft stop` or `weft reset`.
pub fn run(opts: Options) -> Result<()> {
    // The state first, before any device is touched: a corrupt file stops the start here.
    let id = identity::load_or_create(&opts.state_dir, opts.name, generate_keypair)?;
    let uid = identity::fresh_uid();
    let (trust, certificate) = trust(&opts, &id)?;
    let rekey = identity::load_rekey(&opts.state_dir)?
        .filter(|r| r.name == id.name && r.new == id.signing.public());
    let ipam_cfg = weft_ipam::Config::new(
        id.name,
        opts.ipam.range,
        opts.ipam.default_subnet,
        ipam::parse_init(&opts.ipam.init, opts.peers.len())?,
        rand::random(),
        id.signing.clone(),
    )
    .map_err(|e| anyhow!(e))?;
    let ipam_path = opts.state_dir.join(ipam::STATE_FILE);
    let allocator = ipam::load(ipam_cfg.clone(), &ipam_path, Instant::now())?;
    // A restarted router's entries must outrank its previous life's: versions start at the
    // start time in µs.
    let initial_version = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1);
    let dns_path = opts.state_dir.join(dns::STATE_FILE);
    // DNS entries are signed with the identity key, the one our name is bound to mesh-wide.
    let records = dns::load(id.name, initial_version, id.signing.clone(), &dns_path)?;
    let psk = network_key(opts.password.as_deref(), &opts.mesh)?;
    let nickname = opts.nickname.clone().unwrap_or_else(hostname);
    let keys = Handshaker::new(psk, id.private_key);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    info!(range = %ipam_cfg.range, default_subnet = %ipam_cfg.default_subnet, init = %opts.ipam.init,
        ready = allocator.ready(), allocations = allocator.allocations().count(), file = %ipam_path.display(), "IPAM loaded");
    let who = Who { signing: id.signing.clone(), trust, certificate, rekey };
    let start = Start { opts, id_name: id.name, uid, nickname, keys, who, allocator, records, initial_version, ipam_cfg };
    rt.block_on(start.run(ipam_path, dns_path))
}

/// How this router's name is bound: under `--ca`, its certificate must be valid for its name
/// and key; without, names are bound on first use (a certificate, if there is one, is shown).
fn trust(opts: &Options, id: &identity::Identity) -> Result<(Trust, Option<Certificate>)> {
    let default_cert = opts.state_dir.join(identity::CERT_FILE);
    let cert = match &opts.certificate {
        Some(c) => Some(c.clone()),
        None if default_cert.exists() => Some(identity::load_certificate(&default_cert)?),
        None => None,
    };
    let key = id.signing.public();
    let how_to = || {
        format!(
            "this router is {} with identity key {key}: on the CA's host run `weft ca sign --name {} --key {key}` and put its output in {}",
            id.name,
            id.name,
            default_cert.display()
        )
    };
    if let Some(c) = &cert {
        if c.name != id.name || c.key != key {
            bail!("the certificate is for {} with key {}, not for this router: {}", c.name, c.key, how_to());
        }
    }
    let Some(ca) = opts.ca else { return Ok((Trust::FirstUse, cert)) };
    let Some(cert) = cert else { bail!("--ca is set but this router has no certificate: {}", how_to()) };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    cert.check(&ca, now).map_err(|e| anyhow!("{e}: {}", how_to()))?;
    Ok((Trust::Ca(ca), Some(cert)))
}

/// Who this router is: its identity key, how names are bound in its mesh, its certificate, and a
/// re-key hand-over to announce.
struct Who {
    signing: weft_proto::SigningKey,
    trust: Trust,
    certificate: Option<Certificate>,
    rekey: Option<weft_proto::identity::Rekey>,
}

/// What `run` loaded before the runtime started.
struct Start {
    opts: Options,
    id_name: weft_proto::PeerName,
    uid: u64,
    nickname: String,
    keys: Handshaker,
    who: Who,
    allocator: weft_ipam::Ipam,
    records: weft_dns::Records,
    initial_version: u64,
    ipam_cfg: weft_ipam::Config,
}

impl Start {
    async fn run(self, ipam_path: std::path::PathBuf, dns_path: std::path::PathBuf) -> Result<()> {
        let Start { opts, id_name, uid, nickname, keys, who, allocator, records, initial_version, ipam_cfg } = self;
        let Who { signing, trust, certificate, rekey } = who;
        let encrypted = keys.encrypted();
        // The ports first: if another router runs here, say so before touching any device.
        let udp = std::net::UdpSocket::bind(opts.listen)
            .with_context(|| format!("binding UDP {} for the sleeve: is another router running?", opts.listen))?;
        let udp_port = udp.local_addr()?.port();
        let listener = TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("binding TCP {} for control connections: is another router running?", opts.listen))?;
        let listen_port = listener.local_addr()?.port();

        // The host's devices: the bridge with its own MAC, and the TAP on it.
        let netdev = Arc::new(NetDev::new().await.context("opening a netlink socket")?);
        netdev.ensure_bridge(&opts.bridge, opts.mtu).await.with_context(|| format!("creating bridge {}", opts.bridge))?;
        netdev.set_mac(&opts.bridge, bridge_mac(id_name)).await?;
        let tap_name = tap_name(&opts.bridge);
        let tap = Tap::open(&tap_name, opts.offload)?;
        netdev.set_mtu(&tap_name, TAP_MTU).await?;
        if let Err(e) = disable_ipv6(&tap_name) {
            debug!(error = %e, "could not disable IPv6 on the TAP");
        }
        netdev.enslave(&tap_name, &opts.bridge).await?;
        let tap_mac = hw_addr(&tap_name)?;
        let offload = tap.offload;

        // The frame path.
        let frames = Arc::new(FramePath::start(id_name, tap, tap_mac, udp, opts.max_datagram, Limits::default(), opts.data_nice)?);
        let stats = Arc::new(ControlStats::default());

        // The kernel fastpath beside it: the VXLAN device on the bridge (or why there is none).
        let settings = Settings {
            enabled: opts.fastpath,
            port: opts.fastpath_port,
            trusted: opts.trusted_subnets.clone(),
            encrypted,
        };
        let fastpath = Fastpath::start(id_name, settings, netdev.clone(), &opts.bridge, &tap_name, stats.fastpath.clone()).await;
        frames.set_learn_hook(fastpath.learn_hook());

        // The control path's core, with its services.
        let now = Instant::now();
        let mut cfg = RouterConfig::new(id_name, nickname.clone(), uid, rand::random(), signing.clone());
        cfg.discovery = opts.discovery;
        cfg.initial_version = initial_version;
        cfg.listen_port = listen_port;
        cfg.trust = trust;
        cfg.certificate = certificate;
        let mut core = Router::new(cfg, now);
        let identities = IdentityStore::new(&opts.state_dir);
        if let Some(saved) = identities.load()? {
            for e in core.load_identity_state(now, saved) {
                warn!(error = %e, "a saved name binding no longer holds; dropped it");
            }
        }
        let claim = core.own_claim();
        if let Some(r) = rekey {
            match core.announce_rekey(r, claim.clone()) {
                Ok(()) => info!(key = %claim.key, "announcing this host's re-key to its peers"),
                Err(e) => warn!(error = %e, "the re-key hand-over in the state directory does not hold; peers that knew the old key will refuse the new one"),
            }
        }
        for p in &opts.peers {
            match resolve(p).await {
                Ok(a) => core.add_target(now, a),
                Err(e) => warn!(peer = %p, error = %format!("{e:#}"), "cannot resolve peer; ignoring it"),
            }
        }
        let (inputs_tx, inputs_rx) = mpsc::channel(INPUT_QUEUE);
        let (saves_tx, saves_rx) = mpsc::channel(16);
        let writer = Writer::spawn(saves_tx)?;
        let dns_server = if opts.dns.enabled {
            let reverse = (IpAddr::V4(ipam_cfg.range.addr.into()), ipam_cfg.range.prefix);
            dns_server::spawn(opts.dns.clone(), reverse, opts.bridge.clone(), netdev.clone(), records.view(), stats.dns.clone())
        } else {
            dns_server::disabled()
        };
        core.register_channel(weft_proto::announce::CHANNEL, Box::new(weft_proto::announce::Announcements::new(id_name, signing.clone())));
        let ipam = IpamService::register(&mut core, allocator, SaveGate::new(FileId::Ipam, ipam_path), opts.ipam.gc_grace, now);
        let dns = DnsService::register(
            &mut core,
            records,
            SaveGate::new(FileId::Dns, dns_path),
            opts.dns.clone(),
            stats.dns.clone(),
            dns_server.subscribe(),
            now,
        );

        // Connections.
        let me = Introduction { key: signing, claim, nickname: nickname.clone(), uid, listen_port };
        // QUIC on the sleeve port: control connections where TCP does not get through.
        let quic = match opts.transport {
            TransportChoice::Tcp => None,
            _ => Some(Quic::start(frames.clone()).context("starting the control channel over UDP (QUIC)")?),
        };
        let dialer = Arc::new(
            Dialer::new(keys, me, udp_port, Indices::new(), stats.clone(), inputs_tx.clone())
                .with_fastpath(fastpath.clone())
                .with_transport(opts.transport, quic.clone()),
        );
        let dials = dial_on_request(dialer.clone());
        if let Some(q) = &quic {
            tokio::spawn(accept_quic(dialer.clone(), q.clone()));
        }
        tokio::spawn(accept_loop(dialer, listener));

        // The API, and the port guard beside it.
        let control = ControlHandle::new(inputs_tx.clone());
        let guard = crate::control::guard::start(netdev.clone(), stats.guard.clone(), control.clone()).await;
        let networks = Arc::new(crate::control::networks::Networks::new(
            id_name, netdev.clone(), frames.clone(), fastpath.clone(), &opts.bridge, opts.mtu, offload, &opts.state_dir,
        ));
        networks.restore().await;
        let api = Arc::new(ApiState {
            control,
            netdev,
            bridge: opts.bridge.clone(),
            tap: tap_name.clone(),
            mtu: opts.mtu,
            ipam_range: ipam_cfg.range,
            ipam_default_subnet: ipam_cfg.default_subnet,
            dns: opts.dns.clone(),
            dns_server,
            host_addr_lock: tokio::sync::Mutex::new(()),
            guard,
            networks,
            engine: std::sync::OnceLock::new(),
        });
        let (stop_api, api_stopped) = watch::channel(false);
        let api_task = serve_api(api.clone(), &opts.api_socket, api_stopped.clone()).await?;
        if let Some(d) = &opts.docker {
            let docker = crate::docker::Docker::new(api.clone(), &opts.state_dir, d.socket.clone(), d.plugin_dir.clone());
            let _ = api.engine.set(Arc::new(crate::docker::engine::DockerEngine(docker.clone())));
            if let Err(e) = crate::docker::plugin::serve(docker.clone(), api_stopped).await {
                warn!(error = %format!("{e:#}"), "the Docker plugin is not served (docker network create -d weft will not find it)");
            }
            docker.spawn_events();
        }
        if let Some(addr) = opts.metrics_addr {
            if let Err(e) = serve_metrics(api.clone(), frames.clone(), stats.clone(), addr).await {
                warn!(%addr, error = %format!("{e:#}"), "metrics endpoint disabled");
            }
        }
        forward_signals(inputs_tx.clone())?;

        info!(
            name = %id_name, %nickname, uid, encryption = encrypted, bridge = %opts.bridge, tap = %tap_name,
            offload, gso_segments = frames.gso_segments(), port = listen_port, "router started"
        );
        let info = StatusInfo { bridge: opts.bridge.clone(), mtu: opts.mtu, udp_port, encrypted, started: now, transport: opts.transport };
        let actor = Actor::new(core, frames.clone(), dials, ipam, dns, writer, stats, info, inputs_tx, identities, fastpath.clone());
        let result = actor.run(inputs_rx, saves_rx).await;
        if let Some(q) = &quic {
            q.close();
        }

        // Down: answers under way go out, then the threads stop.
        let _ = stop_api.send(true);
        if tokio::time::timeout(API_DRAIN, api_task).await.is_err() {
            warn!("API requests still under way after {API_DRAIN:?}; stopping anyway");
        }
        let _ = tokio::task::spawn_blocking(move || frames.stop()).await;
        // What weft created goes with it: the VXLAN device and its entries.
        fastpath.stop().await;
        let _ = std::fs::remove_file(&opts.api_socket);
        result
    }
}

/// Checks the password (a placeholder stops the start, a weak one is warned about) and stretches
/// it into the PSK. Runs before the runtime exists: Argon2id takes a fraction of a second and
/// 64 MiB, once.
fn network_key(password: Option<&str>, mesh: &str) -> Result<Option<[u8; 32]>> {
    let Some(password) = password else {
        warn!("no password set: control and data traffic between hosts is NOT encrypted (set --password or WEFT_PASSWORD)");
        return Ok(None);
    };
    if let password::Strength::Weak(why) = password::check(password)? {
        warn!(%mesh, "{why}");
    }
    if mesh == password::DEFAULT_MESH {
        info!(%mesh, "the mesh name is the default: give your mesh its own (--mesh or WEFT_MESH, the same on every router) so its password's salt is not shared with other weft meshes");
    }
    let (psk, took) = password::derive_psk(password, mesh)?;
    info!(%mesh, kdf = "argon2id", memory_mib = password::KDF_MEMORY_KIB / 1024, passes = password::KDF_PASSES,
        lanes = password::KDF_LANES, ms = took.as_millis() as u64, "network password stretched");
    Ok(Some(psk))
}

fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most len bytes into b.
    let r = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    if r != 0 {
        return "weft".into();
    }
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let mut s = String::from_utf8_lossy(&b[..end]).into_owned();
    s.truncate(weft_proto::topology::MAX_NICKNAME);
    s
}
