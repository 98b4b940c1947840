//! What `weft router` is told on its command line, and the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use weft_proto::PeerName;

use crate::services::dns::DnsOptions;
use crate::services::ipam::IpamOptions;

/// Container MTU that fits sleeve encapsulation over a 1500-byte underlay
/// (1500 − 20 IP − 8 UDP − 16 sleeve header − 16 tag − 29 frame record − 14 Ethernet = 1397, rounded down as Weave did).
pub const DEFAULT_MTU: u32 = 1376;
/// Largest UDP payload the sleeve sends (1500-byte underlay, IPv4).
pub const DEFAULT_MAX_DATAGRAM: usize = 1472;

/// Everything `weft router` is told on its command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Network password; `None` runs in plaintext.
    pub password: Option<String>,
    /// The mesh's name: the salt the password is stretched with (see `password`). Every router
    /// of a mesh must have the same one.
    pub mesh: String,
    /// State directory (identity, IPAM and DNS state).
    pub state_dir: PathBuf,
    /// Local API socket.
    pub api_socket: PathBuf,
    /// Metrics and status HTTP address; `None` disables it.
    pub metrics_addr: Option<SocketAddr>,
    /// Bridge name.
    pub bridge: String,
    /// Container MTU.
    pub mtu: u32,
    /// Address to listen on (TCP and UDP).
    pub listen: SocketAddr,
    /// Nickname; hostname when `None`.
    pub nickname: Option<String>,
    /// Fixed peer name; from the state directory when `None`.
    pub name: Option<PeerName>,
    /// Connect to peers learned from other peers.
    pub discovery: bool,
    /// Peers to connect to.
    pub peers: Vec<String>,
    /// Largest sleeve UDP payload.
    pub max_datagram: usize,
    /// How control connections are dialled (`--transport`).
    pub transport: crate::control::conn::TransportChoice,
    /// Ask the kernel for TAP segmentation offload.
    pub offload: bool,
    /// Niceness of the frame path's threads (`--data-nice`; 0 leaves them alone).
    pub data_nice: i32,
    /// Use the kernel VXLAN fastpath where it works and the policy allows it.
    pub fastpath: bool,
    /// Its UDP port.
    pub fastpath_port: u16,
    /// With a password, the underlay subnets the fastpath (plaintext) may be used towards.
    pub trusted_subnets: Vec<weft_proto::fastpath::Subnet>,
    /// Address allocation.
    pub ipam: IpamOptions,
    /// Container DNS.
    pub dns: DnsOptions,
    /// The mesh CA's public key: only peers it certified are accepted (`None`: names are
    /// bound to keys on first use).
    pub ca: Option<weft_proto::PublicKey>,
    /// This router's certificate from the CA (`None`: `identity.cert` in the state directory,
    /// if there is one).
    pub certificate: Option<weft_proto::identity::Certificate>,
    /// The Docker plugin and Docker's events (`None`: off).
    pub docker: Option<DockerOptions>,
}

/// Where Docker is.
#[derive(Clone, Debug)]
pub struct DockerOptions {
    /// The Engine API's socket.
    pub socket: PathBuf,
    /// Where dockerd looks for plugin sockets.
    pub plugin_dir: PathBuf,
}
