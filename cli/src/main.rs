//! `weft`: the command line for the weft mesh. `weft router` is the daemon;
//! every other subcommand talks to a running router over its local API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use weft_router::api::client;
mod ca;
mod output;
mod setup_cni;
mod setup_docker;

#[derive(Parser)]
#[command(name = "weft", version, about = "weft: an encrypted mesh network for containers")]
struct Cli {
    /// The router's local API socket.
    #[arg(long, global = true, env = "WEFT_API_SOCKET", default_value = "/run/weft/weft.sock")]
    api_socket: PathBuf,
    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the router in the foreground (for systemd or a Kubernetes DaemonSet).
    Router(RouterArgs),
    /// Start the router in the background and return once it is ready.
    Launch(RouterArgs),
    /// Stop the running router.
    Stop,
    /// Show the router's state: peers, connections, targets, address allocation, DNS, CNI attachments, container ports and their guard.
    Status {
        /// Only this part.
        #[arg(value_parser = ["peers", "connections", "targets", "ipam", "dns", "cni", "ports", "networks"])]
        what: Option<String>,
    },
    /// Install the CNI plugin (weft-cni) and a network configuration for container runtimes.
    SetupCni(SetupCniArgs),
    /// Point dockerd at weft DNS (its daemon.json), so containers resolve names on other hosts;
    /// restart dockerd afterwards.
    SetupDocker {
        /// dockerd's configuration file.
        #[arg(long, default_value = "/etc/docker/daemon.json")]
        config: PathBuf,
    },
    /// Everything the router knows, as JSON.
    Report,
    /// Connect to more peers (HOST, HOST:PORT or IP).
    Connect {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Stop connecting to peers given with launch or connect.
    Forget {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Join a network namespace (name under /run/netns, path, or PID) to the weft network.
    Attach {
        /// Network namespace: NAME, /path/to/netns or PID.
        netns: String,
        /// Addresses: IP/PREFIX (claimed from weft's IPAM when inside its range),
        /// net:CIDR (any free address in that subnet) or net:default.
        /// None: one address from the default subnet.
        cidrs: Vec<String>,
        /// Interface name inside the namespace.
        #[arg(long, default_value = "ethwe")]
        ifname: String,
        /// MTU of the interface (default: the router's --mtu).
        #[arg(long)]
        mtu: Option<u32>,
        /// Container ID the addresses are kept under (default: the namespace's inode).
        #[arg(long)]
        id: Option<String>,
        /// How long to wait for an address (e.g. while peers agree on the ring).
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// DNS name for the container (NAME or NAME.weft.local).
        #[arg(long)]
        name: Option<String>,
        /// The network to join: its own L2 segment on every host, isolated from the others
        /// (default: the default network, weft).
        #[arg(long)]
        network: Option<String>,
    },
    /// Remove a namespace's weft interface and release its weft addresses and names.
    Detach {
        netns: String,
        /// The container ID given at attach, if one was.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "ethwe")]
        ifname: String,
    },
    /// Give this host an address on the weft network (on the bridge): IP/PREFIX,
    /// net:CIDR, or none for one from the default subnet.
    Expose {
        cidr: Option<String>,
        /// How long to wait for an address.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Remove an address given with expose (all of them when none is named).
    Hide { cidr: Option<String> },
    /// List the containers holding weft addresses on this host.
    Ps,
    /// Address allocation by hand: allocate, look up, release.
    Ipam {
        #[command(subcommand)]
        cmd: IpamCmd,
    },
    /// Register a DNS name for addresses: weft dns-add IP... NAME.
    DnsAdd {
        /// Addresses, then the name.
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
        /// Container ID the name belongs to.
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove a DNS name added on this host: weft dns-remove [IP...] NAME.
    DnsRemove {
        /// Addresses (optional), then the name.
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
        /// Container ID the name belongs to.
        #[arg(long)]
        id: Option<String>,
    },
    /// Look a name up in weft DNS (the mesh's view, as this router has it).
    DnsLookup { name: String },
    /// Take over the address space of a peer that is gone for good.
    Rmpeer {
        /// Peer name (or unique nickname).
        peer: String,
        /// Even when the peer is reachable (two peers may then hand out one address).
        #[arg(long)]
        force: bool,
    },
    /// Leave the mesh's address range: hand all of this peer's space to another
    /// peer, forget the IPAM state, and stop the router.
    Reset {
        /// Even when containers here still hold addresses.
        #[arg(long)]
        force: bool,
    },
    /// Print a strong random network password (32 bytes from the OS, base64url) for --password,
    /// WEFT_PASSWORD or a password file.
    Secret,
    /// This host's identity: its name and the key it is bound to; forget another host's
    /// binding; re-key this host.
    Identity {
        #[command(subcommand)]
        cmd: IdentityCmd,
    },
    /// A mesh certificate authority: routers started with --ca accept only peers it certified.
    Ca {
        #[command(subcommand)]
        cmd: ca::CaCmd,
    },
    /// A multi-host lab in network namespaces on this machine (needs root).
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Subcommand)]
enum IdentityCmd {
    /// Print this host's name and identity key (made on first use; the router need not run).
    Show {
        /// State directory.
        #[arg(long, default_value = "/var/lib/weft")]
        state_dir: PathBuf,
    },
    /// Unbind another host's name here, so that the next key to claim it is bound (after that
    /// host was re-installed and lost its key). Run it on every peer.
    Forget {
        /// The peer's name.
        name: String,
    },
    /// Give this host a new identity key, signed over by the old one so peers accept it. Stop
    /// the router first; it announces the change when it starts.
    Rekey {
        /// State directory.
        #[arg(long, default_value = "/var/lib/weft")]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum IpamCmd {
    /// Allocate an address for a container ID (the same ID gets the same address back).
    Alloc {
        /// Container ID.
        id: String,
        /// Any free address in this subnet (default: the default subnet).
        #[arg(long, conflicts_with = "address")]
        subnet: Option<String>,
        /// This address (a claim), as IP or IP/PREFIX.
        #[arg(long)]
        address: Option<String>,
        /// How long to wait for an address.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Show a container ID's addresses.
    Lookup { id: String },
    /// Release a container ID's addresses (or only ADDRESS).
    Release { id: String, address: Option<String> },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build hosts in namespaces, run a router on each, attach a container per host, ping across.
    Demo {
        /// Number of hosts.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Network password for the lab mesh.
        #[arg(long, default_value = "weft-lab-demo")]
        password: String,
        /// Run the lab without encryption.
        #[arg(long)]
        no_password: bool,
        /// Leave the lab running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Remove namespaces and routers left behind by labs whose process died.
    Cleanup,
}

#[derive(Args)]
struct SetupCniArgs {
    /// Where runtimes look for CNI plugin binaries.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// Where runtimes look for CNI network configurations.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The weft-cni binary to install (default: the one next to this weft binary).
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// The network's name, as runtimes know it (e.g. `podman run --network weft`).
    #[arg(long, default_value = "weft")]
    network: String,
    /// The router's API socket as the plugin should reach it (default: --api-socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Subnet of the weft range for this network's containers (default: the router's default subnet).
    #[arg(long)]
    subnet: Option<String>,
    /// Chain the standard portmap plugin, for published ports (`podman run -p`, hostPort).
    #[arg(long)]
    portmap: bool,
}

#[derive(Args, Clone)]
struct RouterArgs {
    /// Peers to connect to: HOST, HOST:PORT or IP.
    peers: Vec<String>,
    /// Network password: peers must share it; traffic is encrypted with keys derived from it.
    #[arg(long, env = "WEFT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Read the network password from this file.
    #[arg(long, conflicts_with = "password")]
    password_file: Option<PathBuf>,
    /// The mesh's name, the same on every router of the mesh: the password is stretched with a
    /// salt made from it, so meshes with their own names share no guessing work. Set your own.
    #[arg(long, env = "WEFT_MESH", default_value = weft_router::password::DEFAULT_MESH)]
    mesh: String,
    /// State directory (identity, logs).
    #[arg(long, default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// Nickname shown to peers (default: hostname).
    #[arg(long)]
    nickname: Option<String>,
    /// Peer name (default: random on first start, then kept in the state directory).
    #[arg(long)]
    name: Option<String>,
    /// Address for control connections (TCP) and the sleeve (UDP).
    #[arg(long, default_value = "0.0.0.0:6783")]
    listen: SocketAddr,
    /// Status and Prometheus metrics address ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:6782")]
    metrics_addr: String,
    /// Bridge name.
    #[arg(long, default_value = "weft")]
    bridge: String,
    /// Container MTU (fits the sleeve over a 1500-byte underlay).
    #[arg(long, default_value_t = weft_router::DEFAULT_MTU)]
    mtu: u32,
    /// Largest sleeve UDP payload; lower it when the underlay MTU is below 1500.
    #[arg(long, default_value_t = weft_router::DEFAULT_MAX_DATAGRAM)]
    max_datagram: usize,
    /// How control connections are dialled: auto (TCP, and QUIC on the UDP port when TCP does
    /// not connect within a second), tcp (no QUIC at all), or udp (QUIC only, for a firewall
    /// that passes only UDP 6783).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcp", "udp"])]
    transport: String,
    /// Do not connect to peers learned from other peers.
    #[arg(long)]
    no_discovery: bool,
    /// Never use the kernel VXLAN fastpath: all frames between hosts go through the sleeve.
    #[arg(long)]
    no_fastpath: bool,
    /// UDP port of the kernel VXLAN fastpath.
    #[arg(long, default_value_t = weft_proto::fastpath::DEFAULT_PORT)]
    fastpath_port: u16,
    /// With a password: underlay subnets (CIDR,...) towards which container traffic may take the
    /// fastpath, UNENCRYPTED on the underlay. Peers outside them always get the encrypted sleeve.
    #[arg(long, value_delimiter = ',')]
    trusted_subnets: Vec<String>,
    /// Do not ask the kernel for TAP segmentation offload.
    #[arg(long)]
    no_offload: bool,
    /// Scheduling niceness of the frame path's two threads (-20..=19; 0 leaves them as the rest
    /// of the router). Below 0 they run ahead of the host's ordinary processes when frames
    /// wait, as the kernel's own packet processing does, which keeps latency low on a busy host.
    #[arg(long, default_value_t = weft_router::frame::plane::DATA_NICE, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    data_nice: i32,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The address range every peer shares for containers.
    #[arg(long, default_value = "10.32.0.0/12")]
    ipalloc_range: String,
    /// Subnet containers get addresses from unless they ask for another
    /// (default: the whole range).
    #[arg(long)]
    ipalloc_default_subnet: Option<String>,
    /// How the range is first split: consensus (this peer and the peers given
    /// here agree), consensus=N (the first N peers), seed=NAME,... (these peers),
    /// or observer (never votes; gets space from others).
    #[arg(long, default_value = "consensus")]
    ipalloc_init: String,
    /// Seconds a container's network namespace must be gone before its
    /// addresses are released.
    #[arg(long, default_value_t = 60)]
    ipalloc_gc_grace: u64,
    /// Do not run the DNS server.
    #[arg(long)]
    no_dns: bool,
    /// Where the DNS server listens (IP:PORT, repeatable; default port 53 on the bridge's addresses).
    #[arg(long)]
    dns_listen: Vec<SocketAddr>,
    /// The DNS zone for container names.
    #[arg(long, default_value = "weft.local")]
    dns_domain: String,
    /// TTL of DNS answers, seconds.
    #[arg(long, default_value_t = 1)]
    dns_ttl: u32,
    /// The Docker Engine API socket the router follows (containers by name, restarts).
    #[arg(long, default_value = "/var/run/docker.sock")]
    docker_socket: PathBuf,
    /// Where dockerd looks for plugin sockets: the router serves its Docker network and IPAM
    /// plugin there as weft.sock.
    #[arg(long, default_value = "/run/docker/plugins")]
    docker_plugin_dir: PathBuf,
    /// No Docker plugin and no following of Docker's events.
    #[arg(long)]
    no_docker: bool,
    /// Upstream resolvers for other names (IP or IP:PORT, repeatable; default: /etc/resolv.conf).
    #[arg(long)]
    dns_upstream: Vec<String>,
    /// The mesh CA's public key (64 hex digits, or a file holding it, as `weft ca init` writes):
    /// only peers with a certificate from it are accepted.
    #[arg(long, env = "WEFT_CA")]
    ca: Option<String>,
    /// This router's certificate (`weft ca sign`'s output; default: identity.cert in the state
    /// directory).
    #[arg(long)]
    cert: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let sock = cli.api_socket.clone();
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Router(args) => router(args, sock),
        Cmd::Launch(args) => launch(args, &sock, cli.json, &mut out),
        Cmd::Stop => {
            client::call(&sock, "POST", "/v1/stop", None)?;
            let t0 = Instant::now();
            while sock.exists() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
            }
            writeln!(out, "weft router stopped")?;
            Ok(())
        }
        Cmd::Status { what } => {
            let v = client::call(&sock, "GET", "/v1/status", None)?;
            if cli.json {
                let part = what.as_deref().map(|w| v[w].clone()).unwrap_or(v);
                writeln!(out, "{}", serde_json::to_string_pretty(&part)?)?;
            } else {
                output::status(&mut out, &v, what.as_deref())?;
            }
            Ok(())
        }
        Cmd::SetupCni(a) => {
            let socket = a.socket.clone().unwrap_or_else(|| sock.clone());
            let done = setup_cni::setup_cni(&a, &socket)?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&done)?)?;
            } else {
                let s = |k: &str| done[k].as_str().unwrap_or_default().to_string();
                writeln!(out, "installed the CNI plugin {}", s("plugin"))?;
                writeln!(out, "wrote network configuration {} (network {:?})", s("conflist"), a.network)?;
                writeln!(out, "containers started on network {:?} now join weft (the router must be running)", a.network)?;
            }
            Ok(())
        }
        Cmd::SetupDocker { config } => {
            let v = client::call(&sock, "POST", "/v1/docker/setup", Some(&json!({})))?;
            let ns = v["nameserver"].as_str().unwrap_or_default().to_string();
            let done = setup_docker::setup_docker(&config, &ns)?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&json!({ "setup": done, "router": v }))?)?;
            } else if done["changed"] == true {
                writeln!(out, "{}: \"dns\" was {}, is now {}", config.display(), done["dns_before"], done["dns"])?;
                writeln!(out, "restart dockerd to read it (systemctl restart docker); containers started after that resolve weft names ({})", v["domain"].as_str().unwrap_or_default())?;
            } else {
                writeln!(out, "{} already has weft DNS ({ns}) first: nothing to change", config.display())?;
            }
            if v["docker_integration"] == true {
                writeln!(out, "the router serves the Docker plugin: docker network create -d weft --ipam-driver weft --subnet CIDR NAME")?;
            }
            Ok(())
        }
        Cmd::Report => {
            let v = client::call(&sock, "GET", "/v1/status", None)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            Ok(())
        }
        Cmd::Connect { peers } => simple(&sock, "/v1/connect", json!({ "peers": peers }), cli.json, &mut out, |v| {
            format!("connecting to {}", list(&v["added"]))
        }),
        Cmd::Forget { peers } => simple(&sock, "/v1/forget", json!({ "peers": peers }), cli.json, &mut out, |v| {
            format!("forgot {}", list(&v["forgotten"]))
        }),
        Cmd::Attach { netns, cidrs, ifname, mtu, id, timeout, name, network } => {
            let body = json!({ "netns": netns, "cidrs": cidrs, "ifname": ifname, "mtu": mtu, "id": id,
                "timeout_seconds": timeout, "name": name, "network": network });
            simple(&sock, "/v1/attach", body, cli.json, &mut out, |v| {
                let mut s = format!(
                    "attached {} as {} ({}, mtu {}) with {}",
                    v["netns"].as_str().unwrap_or(""),
                    v["ifname"].as_str().unwrap_or(""),
                    v["mac"].as_str().unwrap_or(""),
                    v["mtu"],
                    list(&v["addresses"])
                );
                if let Some(n) = v["name"].as_str() {
                    s.push_str(&format!(", name {n}"));
                }
                if let Some(n) = v["network"].as_str().filter(|n| *n != "weft") {
                    s.push_str(&format!(", network {n}"));
                }
                s
            })
        }
        Cmd::DnsAdd { mut args, id } => {
            let name = args.pop().unwrap_or_default();
            simple(&sock, "/v1/dns/add", json!({ "name": name, "addresses": args, "id": id }), cli.json, &mut out, |v| {
                format!("{} -> {}", v["name"].as_str().unwrap_or(""), list(&v["addresses"]))
            })
        }
        Cmd::DnsRemove { mut args, id } => {
            let name = args.pop().unwrap_or_default();
            simple(&sock, "/v1/dns/remove", json!({ "name": name, "addresses": args, "id": id }), cli.json, &mut out, |_| {
                format!("removed {name}")
            })
        }
        Cmd::DnsLookup { name } => {
            let v = client::call(&sock, "GET", &format!("/v1/dns/lookup?name={}", query_escape(&name)), None)?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                for a in v["addresses"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    writeln!(out, "{}", a.as_str().unwrap_or(""))?;
                }
            }
            Ok(())
        }
        Cmd::Detach { netns, ifname, id } => {
            simple(&sock, "/v1/detach", json!({ "netns": netns, "ifname": ifname, "id": id }), cli.json, &mut out, |v| {
                let released = list(&v["released"]);
                let released = if released.is_empty() { String::new() } else { format!(", released {released}") };
                format!("detached {}{released}", v["detached"].as_str().unwrap_or(""))
            })
        }
        Cmd::Expose { cidr, timeout } => {
            simple(&sock, "/v1/expose", json!({ "cidr": cidr, "timeout_seconds": timeout }), cli.json, &mut out, |v| {
                format!("exposed {} on bridge {}", v["exposed"].as_str().unwrap_or(""), v["bridge"].as_str().unwrap_or(""))
            })
        }
        Cmd::Hide { cidr } => simple(&sock, "/v1/hide", json!({ "cidr": cidr }), cli.json, &mut out, |v| {
            format!("hid {}", list(&v["hidden"]))
        }),
        Cmd::Ps => {
            let v = client::call(&sock, "GET", "/v1/ipam", None)?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&v["allocations"])?)?;
            } else {
                output::ps(&mut out, &v)?;
            }
            Ok(())
        }
        Cmd::Ipam { cmd } => ipam(cmd, &sock, cli.json, &mut out),
        Cmd::Rmpeer { peer, force } => {
            simple(&sock, "/v1/ipam/rmpeer", json!({ "peer": peer, "force": force }), cli.json, &mut out, |v| {
                let mut s = format!("took over {} addresses of peer {}", v["taken"], v["peer"].as_str().unwrap_or(""));
                if let Some(w) = v["warning"].as_str() {
                    s.push_str(&format!("\nWARNING: {w}"));
                }
                s
            })
        }
        Cmd::Reset { force } => {
            simple(&sock, "/v1/ipam/reset", json!({ "force": force }), cli.json, &mut out, |v| match v["handed_to"].as_str() {
                Some(p) if v["acknowledged"] == true => format!(
                    "handed {} addresses to peer {p}, which confirmed it has them; IPAM state forgotten; router stopping",
                    v["addresses"]
                ),
                Some(_) => format!("WARNING: {}; IPAM state forgotten; router stopping", v["warning"].as_str().unwrap_or("no confirmation")),
                None => "this peer owned no address space; IPAM state forgotten; router stopping".into(),
            })
        }
        Cmd::Secret => {
            let secret = weft_router::password::generate_secret()?;
            if cli.json {
                writeln!(out, "{}", json!({ "secret": secret }))?;
            } else {
                writeln!(out, "{secret}")?;
            }
            Ok(())
        }
        Cmd::Lab { cmd } => lab(cmd, &mut out),
        Cmd::Ca { cmd } => ca::run(cmd, &sock, cli.json, &mut out),
        Cmd::Identity { cmd } => identity(cmd, &sock, cli.json, &mut out),
    }
}

fn ipam(cmd: IpamCmd, sock: &Path, as_json: bool, out: &mut impl Write) -> Result<()> {
    match cmd {
        IpamCmd::Alloc { id, subnet, address, timeout } => {
            let body = json!({ "id": id, "subnet": subnet, "address": address, "timeout_seconds": timeout });
            simple(sock, "/v1/ipam/allocate", body, as_json, out, |v| {
                format!("{} {}", v["id"].as_str().unwrap_or(""), v["address"].as_str().unwrap_or(""))
            })
        }
        IpamCmd::Lookup { id } => {
            let v = client::call(sock, "GET", &format!("/v1/ipam/lookup?id={}", query_escape(&id)), None)?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                for a in v["addresses"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    writeln!(out, "{}", a["address"].as_str().unwrap_or(""))?;
                }
            }
            Ok(())
        }
        IpamCmd::Release { id, address } => {
            simple(sock, "/v1/ipam/release", json!({ "id": id, "address": address }), as_json, out, |v| {
                let addrs: Vec<&str> = v["released"].as_array().map(Vec::as_slice).unwrap_or_default().iter()
                    .filter_map(|a| a["address"].as_str()).collect();
                if addrs.is_empty() {
                    format!("{} held no address here; nothing released", v["id"].as_str().unwrap_or(""))
                } else {
                    format!("released {}", addrs.join(", "))
                }
            })
        }
    }
}

/// Percent-encodes a query-string value.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn list(v: &Value) -> String {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

fn simple(
    sock: &Path,
    path: &str,
    body: Value,
    as_json: bool,
    out: &mut impl Write,
    human: impl Fn(&Value) -> String,
) -> Result<()> {
    let v = client::call(sock, "POST", path, Some(&body))?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out, "{}", human(&v))?;
    }
    Ok(())
}

/// The network password from --password-file, --password or WEFT_PASSWORD; a placeholder is
/// refused here, before anything starts.
fn password(args: &RouterArgs) -> Result<Option<String>> {
    let p = match (&args.password_file, &args.password) {
        (Some(f), _) => {
            let p = std::fs::read_to_string(f).with_context(|| format!("reading password file {}", f.display()))?;
            let p = p.trim_end_matches(['\n', '\r']).to_string();
            if p.is_empty() {
                bail!("password file {} is empty", f.display());
            }
            Some(p)
        }
        (None, Some(p)) if p.is_empty() => bail!("the password is empty: give a real one (`weft secret` makes one) or none"),
        (None, p) => p.clone(),
    };
    if let Some(p) = &p {
        weft_router::password::check(p)?;
    }
    weft_router::password::check_mesh_name(&args.mesh)?;
    Ok(p)
}

fn router(args: RouterArgs, api_socket: PathBuf) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("hickory_server=warn".parse().context("log filter")?)
        .add_directive("hickory_proto=warn".parse().context("log filter")?);
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    if !weft_lab::is_root() {
        bail!("the router needs root (it creates a bridge, a TAP device and veth pairs)");
    }
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(a.parse().with_context(|| format!("--metrics-addr {a:?} is not an address like 127.0.0.1:6782"))?),
    };
    let name = match &args.name {
        Some(n) => Some(n.parse().map_err(|e| anyhow::anyhow!("--name: {e}"))?),
        None => None,
    };
    let opts = weft_router::Options {
        password: password(&args)?,
        mesh: args.mesh,
        state_dir: args.state_dir,
        api_socket,
        metrics_addr,
        bridge: args.bridge,
        mtu: args.mtu,
        listen: args.listen,
        nickname: args.nickname,
        name,
        discovery: !args.no_discovery,
        peers: args.peers,
        max_datagram: args.max_datagram,
        transport: args.transport.parse().map_err(|e: String| anyhow::anyhow!("--transport: {e}"))?,
        offload: !args.no_offload,
        data_nice: args.data_nice,
        fastpath: !args.no_fastpath,
        fastpath_port: args.fastpath_port,
        trusted_subnets: args
            .trusted_subnets
            .iter()
            .map(|t| t.parse().map_err(|e| anyhow::anyhow!("--trusted-subnets: {e}")))
            .collect::<Result<Vec<_>>>()?,
        ipam: weft_router::services::ipam::IpamOptions {
            range: args.ipalloc_range.parse().map_err(|e| anyhow::anyhow!("--ipalloc-range: {e}"))?,
            default_subnet: match &args.ipalloc_default_subnet {
                Some(s) => Some(s.parse().map_err(|e| anyhow::anyhow!("--ipalloc-default-subnet: {e}"))?),
                None => None,
            },
            init: args.ipalloc_init,
            gc_grace: Duration::from_secs(args.ipalloc_gc_grace),
        },
        dns: weft_router::services::dns::DnsOptions {
            enabled: !args.no_dns,
            listen: (!args.dns_listen.is_empty()).then_some(args.dns_listen),
            domain: args.dns_domain,
            ttl: args.dns_ttl,
            upstreams: if args.dns_upstream.is_empty() {
                None
            } else {
                Some(
                    args.dns_upstream
                        .iter()
                        .map(|u| {
                            u.parse::<SocketAddr>()
                                .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                                .map_err(|_| anyhow::anyhow!("--dns-upstream {u:?} is not IP or IP:PORT"))
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            },
        },
        ca: None,
        certificate: None,
        docker: (!args.no_docker).then(|| weft_router::config::DockerOptions {
            socket: args.docker_socket.clone(),
            plugin_dir: args.docker_plugin_dir.clone(),
        }),
    };
    let opts = weft_router::Options {
        ca: match &args.ca {
            Some(c) => Some(ca::parse_public(c)?),
            None => None,
        },
        certificate: match &args.cert {
            Some(p) => Some(weft_router::host::identity::load_certificate(p)?),
            None => None,
        },
        ..opts
    };
    if opts.mtu < 576 || opts.mtu > 65_000 {
        bail!("--mtu {} is out of range (576..=65000)", opts.mtu);
    }
    if opts.max_datagram < 576 || opts.max_datagram > 65_000 {
        bail!("--max-datagram {} is out of range (576..=65000)", opts.max_datagram);
    }
    weft_router::run(opts)
}

fn launch(args: RouterArgs, sock: &Path, as_json: bool, out: &mut impl Write) -> Result<()> {
    if sock.exists() && client::call(sock, "GET", "/v1/status", None).is_ok() {
        bail!("a weft router is already running on {} (weft stop first)", sock.display());
    }
    let pw = password(&args)?;
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let log_path = args.state_dir.join("router.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the weft binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--api-socket").arg(sock).arg("router");
    let a = &args;
    cmd.args(["--state-dir"]).arg(&a.state_dir).args(["--mesh", &a.mesh]);
    cmd.args(["--listen", &a.listen.to_string(), "--metrics-addr", &a.metrics_addr, "--bridge", &a.bridge]);
    cmd.args(["--mtu", &a.mtu.to_string(), "--max-datagram", &a.max_datagram.to_string(), "--log-format", &a.log_format]);
    cmd.args(["--transport", &a.transport]);
    cmd.arg(format!("--data-nice={}", a.data_nice));
    if let Some(n) = &a.nickname {
        cmd.args(["--nickname", n]);
    }
    if let Some(n) = &a.name {
        cmd.args(["--name", n]);
    }
    if a.no_discovery {
        cmd.arg("--no-discovery");
    }
    if a.no_offload {
        cmd.arg("--no-offload");
    }
    if a.no_fastpath {
        cmd.arg("--no-fastpath");
    }
    cmd.args(["--fastpath-port", &a.fastpath_port.to_string()]);
    if !a.trusted_subnets.is_empty() {
        cmd.args(["--trusted-subnets", &a.trusted_subnets.join(",")]);
    }
    if let Some(c) = &a.ca {
        cmd.args(["--ca", c]);
    }
    if let Some(c) = &a.cert {
        cmd.arg("--cert").arg(c);
    }
    cmd.args(["--ipalloc-range", &a.ipalloc_range, "--ipalloc-init", &a.ipalloc_init]);
    cmd.args(["--ipalloc-gc-grace", &a.ipalloc_gc_grace.to_string()]);
    if let Some(s) = &a.ipalloc_default_subnet {
        cmd.args(["--ipalloc-default-subnet", s]);
    }
    if a.no_dns {
        cmd.arg("--no-dns");
    }
    for l in &a.dns_listen {
        cmd.args(["--dns-listen", &l.to_string()]);
    }
    cmd.args(["--dns-domain", &a.dns_domain, "--dns-ttl", &a.dns_ttl.to_string()]);
    if a.no_docker {
        cmd.arg("--no-docker");
    }
    cmd.arg("--docker-socket").arg(&a.docker_socket).arg("--docker-plugin-dir").arg(&a.docker_plugin_dir);
    for u in &a.dns_upstream {
        cmd.args(["--dns-upstream", u]);
    }
    cmd.args(&a.peers);
    // The password goes through the environment, not argv (which `ps` shows).
    cmd.env_remove("WEFT_PASSWORD");
    if let Some(p) = &pw {
        cmd.env("WEFT_PASSWORD", p);
    }
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; it detaches the router from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the router")?;
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the router exited during start-up ({status}); last log lines:\n{}", tail(&log_path, 15));
        }
        if let Ok(v) = client::call(sock, "GET", "/v1/status", None) {
            let pid = child.id();
            std::fs::write(args.state_dir.join("router.pid"), format!("{pid}\n")).ok();
            let weak = match &pw {
                Some(p) => match weft_router::password::check(p)? {
                    weft_router::password::Strength::Weak(why) => Some(why),
                    weft_router::password::Strength::Strong => None,
                },
                None => None,
            };
            if as_json {
                writeln!(out, "{}", json!({"pid": pid, "name": v["name"], "log": log_path, "encryption": v["encryption"],
                    "warning": weak, "fastpath": v["fastpath"]}))?;
            } else {
                writeln!(out, "weft router started: pid {pid}, peer {} ({}), log {}", v["name"].as_str().unwrap_or("?"),
                    v["nickname"].as_str().unwrap_or("?"), log_path.display())?;
                if v["encryption"] != "enabled" {
                    writeln!(out, "WARNING: no password set: traffic between hosts is NOT encrypted")?;
                }
                if let Some(why) = weak {
                    writeln!(out, "WARNING: {why}")?;
                }
                let fp = &v["fastpath"];
                if fp["enabled"] == true {
                    let subnets: Vec<&str> = fp["trusted_subnets"].as_array().map(|a| a.iter().filter_map(|s| s.as_str()).collect()).unwrap_or_default();
                    if v["encryption"] == "enabled" && !subnets.is_empty() {
                        writeln!(out, "WARNING: fastpath on towards peers in {}: their container traffic crosses the underlay UNENCRYPTED (VXLAN, UDP {})", subnets.join(", "), fp["port"])?;
                    } else if v["encryption"] == "enabled" {
                        writeln!(out, "fastpath: not used (encrypted mesh and no --trusted-subnets): all traffic goes through the encrypted sleeve")?;
                    } else {
                        writeln!(out, "fastpath: on (kernel VXLAN, UDP {}) towards every peer where it works", fp["port"])?;
                    }
                } else {
                    writeln!(out, "fastpath: off: {}", fp["why_not"].as_str().unwrap_or("?"))?;
                }
            }
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the router did not become ready within 20 s; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn identity(cmd: IdentityCmd, sock: &Path, as_json: bool, out: &mut impl Write) -> Result<()> {
    use weft_router::host::identity as id;
    match cmd {
        IdentityCmd::Show { state_dir } => {
            let me = id::load_or_create(&state_dir, None, weft_router::control::handshake::generate_keypair)?;
            let key = me.signing.public();
            let cert = state_dir.join(id::CERT_FILE);
            let cert = cert.exists().then(|| id::load_certificate(&cert)).transpose()?;
            if as_json {
                writeln!(out, "{}", json!({ "name": me.name.to_string(), "key": key.to_string(),
                    "certificate_expires": cert.as_ref().map(|c| c.expires) }))?;
            } else {
                writeln!(out, "name: {}\nkey:  {key}", me.name)?;
                match cert {
                    Some(c) => writeln!(out, "certificate: from CA {}, expires {} (Unix time)", c.ca, c.expires)?,
                    None => writeln!(out, "certificate: none (names are bound on first use unless the mesh runs --ca)")?,
                }
            }
            Ok(())
        }
        IdentityCmd::Forget { name } => simple(sock, "/v1/identity/forget", json!({ "name": name }), as_json, out, |v| {
            format!("forgot the key bound to {}: the next key to claim it will be bound", v["forgotten"].as_str().unwrap_or("?"))
        }),
        IdentityCmd::Rekey { state_dir } => {
            if client::call(sock, "GET", "/v1/status", None).is_ok() {
                bail!("the router is running: stop it first (`weft stop`), re-key, then start it again");
            }
            let me = id::load_or_create(&state_dir, None, weft_router::control::handshake::generate_keypair)?;
            let (old, new) = id::rekey(&state_dir, me.name)?;
            if as_json {
                writeln!(out, "{}", json!({ "name": me.name.to_string(), "old_key": old.to_string(), "new_key": new.to_string() }))?;
            } else {
                writeln!(out, "{} now has key {new} (was {old}).\nStart the router: it tells its peers, with the old key's signature.", me.name)?;
                if state_dir.join(id::CERT_FILE).exists() {
                    writeln!(out, "This host has a CA certificate for the old key: get a new one with `weft ca sign --name {} --key {new}`.", me.name)?;
                }
            }
            Ok(())
        }
    }
}

fn lab(cmd: LabCmd, out: &mut impl Write) -> Result<()> {
    match cmd {
        LabCmd::Demo { hosts, password, no_password, keep } => {
            let exe = std::env::current_exe().context("finding the weft binary")?;
            let mut cfg = weft_lab::LabConfig::new(hosts, exe);
            cfg.password = (!no_password).then_some(password);
            cfg.keep = keep;
            weft_lab::cleanup_stale()?;
            weft_lab::demo(cfg, out)
        }
        LabCmd::Cleanup => {
            let n = weft_lab::cleanup_stale()?;
            writeln!(out, "removed {n} leftover lab namespaces")?;
            Ok(())
        }
    }
}
